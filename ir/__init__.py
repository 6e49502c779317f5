"""fedlang's middle (installed as fedlang.ir): the type system, abstract values,
the primitive table and the checker. It reads the front end's AST and never
imports TensorFlow."""
