"""The fedlang standard library: .fed modules reached as `import std.NAME`."""
