"""The fedlang grammar (fedlang.lark), shipped as package data."""
