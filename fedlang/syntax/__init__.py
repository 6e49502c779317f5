"""The front end's syntax layer: grammar -> AST with spans."""
