"""Backends (installed as fedlang.backends): plan format, TensorFlow lowering,
the local simulator and the Ray runtime. They read checked, optimized IR from
fedlang.ir and never import the front end's internals."""
