"""Filling the primitive table's `lowering` slot (fedlang.ir.primitives.Primitive).

The front end never imports TensorFlow, so the table is built with the slot
empty and the backend fills it when it loads: `@lowering("add")` on a function
sets `PRIMITIVES["add"].lowering`. A lowering is called exactly like the
primitive's NumPy `impl` in the reference interpreter -- the node's inputs by
parameter name (or positionally), its static attributes, and `out_type=` when
the primitive is `typed_impl` -- but gets TensorFlow values:

  tensor        tf.Tensor of the exact dtype
  weak literal  a Python int or float (it takes the other operand's dtype, as in NumPy)
  struct        fedlang.ir.values.Struct of TF values
  function      a Python callable on TF values (traced into the same graph)

and returns the TF value of the result. Sequences and the structural,
federated and loop nodes are the lowering loop's own business
(fedlang.backends.tensorflow.lower).
"""

from __future__ import annotations

from typing import Callable

from fedlang.ir.primitives import PRIMITIVES


def lowering(*names: str) -> Callable:
    """Register the decorated function as the TensorFlow lowering of primitives `names`."""
    def register(fn: Callable) -> Callable:
        for name in names:
            object.__setattr__(PRIMITIVES[name], "lowering", fn)
        return fn
    return register
