"""Lowering IR functions to TensorFlow: the reference interpreter's loop, on TF values.

`phase_function(function, program, ragged)` gives a `tf.function` of the flat
layout (fedlang.backends.layout) of the function's parameters, returning the
flat layout of its result. Inside, one loop over the nodes in dependency order
calls each primitive's lowering (the table's `lowering` slot, filled by
fedlang.backends.tensorflow.ops); structural nodes, function values and
sequences are handled here. Everything is traced once into one graph: a call
of a phase is one graph execution, whatever the number of clients.

Sequences are `TFSeq`: a length and, per leaf of the element type, either the
leaf stacked along a leading step axis or (ragged layouts) the leaves
concatenated with row splits. reduce, map and scan are `tf.while_loop`s;
function values are Python callables that trace their body where they are
called, so a lambda inside a reduce becomes the loop body.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import tensorflow as tf

import fedlang.backends.tensorflow.ops  # noqa: F401  (fills the lowering slots)
from fedlang.backends.layout import LayoutError, is_flat_leaf, leaf_values, slots
from fedlang.diagnostics import InternalCompilerError
from fedlang.ir.graph import Function, Program
from fedlang.ir.types import FunctionType, SequenceType, StructType, TensorType, Type, leaves
from fedlang.ir.values import Struct

try:                                      # internal primitives of the vectorizer, where present
    import fedlang.backends.tensorflow.ops_internal  # noqa: F401
except ImportError:                       # pragma: no cover
    pass

# Attributes that describe a node for printing and passes, not lowering arguments (as in the interpreter).
_NOT_ATTRS = frozenset({"args", "weak", "arity"})


class LoweringError(Exception):
    """A program this backend cannot lower (says what and why)."""


def tf_dtype(dtype: str) -> tf.DType:
    return tf.string if dtype == "string" else tf.as_dtype(dtype)


def tensor_spec(slot) -> tf.TensorSpec:
    return tf.TensorSpec(slot.shape, tf_dtype(slot.dtype))


class TFSeq:
    """A sequence in a graph: `length` (int32 scalar) and per element leaf (values, splits or None)."""

    __slots__ = ("type", "length", "leaves")

    def __init__(self, t: SequenceType, length, leaves_: list[tuple[Any, Any]]):
        self.type, self.length, self.leaves = t, length, leaves_

    def element(self, i) -> Any:
        parts = [v[s[i]:s[i + 1]] if s is not None else v[i] for v, s in self.leaves]
        return _build(self.type.element, iter(parts))

    def rows(self, k: int):
        """The total leading size of leaf k over the first `length` elements."""
        values, splits = self.leaves[k]
        if splits is not None:
            return splits[self.length] - splits[0]
        return self.length * tf.shape(values, out_type=tf.int32)[1]


def _build(t: Type, parts: Iterator[Any]) -> Any:
    if isinstance(t, StructType):
        return Struct((_build(f, parts) for _, f in t.fields), t.names)
    return next(parts)


def as_tensor(value: Any, t: TensorType):
    """A TF tensor of type `t` (weak Python numbers take the declared dtype)."""
    if isinstance(value, tf.Tensor) and value.dtype == tf_dtype(t.dtype):
        return value
    return tf.cast(value, tf_dtype(t.dtype)) if isinstance(value, tf.Tensor) else tf.constant(value, tf_dtype(t.dtype))


# ---- the flat layout on the TF side ------------------------------------------------------------

def unflatten(flat: Iterator[Any], t: Type, ragged: bool) -> Any:
    if isinstance(t, TensorType):
        return next(flat)
    if isinstance(t, StructType):
        return Struct((unflatten(flat, f, ragged) for _, f in t.fields), t.names)
    if isinstance(t, SequenceType):
        length = next(flat)
        parts = []
        for leaf in leaves(t.element):
            parts.append((next(flat), next(flat)) if is_flat_leaf(leaf, ragged) else (next(flat), None))
        return TFSeq(t, length, parts)
    raise LayoutError(f"no layout for {t}")


def flatten(value: Any, t: Type, ragged: bool, out: list) -> list:
    if isinstance(t, TensorType):
        out.append(as_tensor(value, t))
    elif isinstance(t, StructType):
        for k, (_, f) in enumerate(t.fields):
            flatten(value[k], f, ragged, out)
    elif isinstance(t, SequenceType):
        seq = value
        out.append(seq.length)
        for leaf, (values, splits) in zip(leaves(t.element), seq.leaves):
            if is_flat_leaf(leaf, ragged):
                if splits is None:          # dense -> flat: merge the step axis into the rows
                    shape = tf.shape(values)
                    n = seq.length
                    values = tf.reshape(values[:n], tf.concat([[n * shape[1]], shape[2:]], 0))
                    splits = tf.range(n + 1, dtype=tf.int32) * shape[1]
                else:
                    values = values[splits[0]:splits[seq.length]]
                    splits = splits[:seq.length + 1] - splits[0]
                out += [values, splits]
            else:
                if splits is not None:          # flat -> stacked (here every element has one shape)
                    per = splits[tf.minimum(1, seq.length)] - splits[0]
                    values = tf.reshape(values[splits[0]:splits[seq.length]],
                                        tf.concat([[seq.length, per], tf.shape(values)[1:]], 0))
                out.append(values[:seq.length])
    else:
        raise LayoutError(f"no layout for {t}")
    return out


# ---- the lowering loop ------------------------------------------------------------------------

class FunctionValue:
    """A function value while tracing: calling it traces its body in place."""

    __slots__ = ("lowerer", "function", "captured")

    def __init__(self, lowerer: "Lowerer", function: Function, captured: tuple):
        self.lowerer, self.function, self.captured = lowerer, function, captured

    def __call__(self, *args: Any) -> Any:
        n = len(self.function.params)
        if len(args) != n:
            if n == 1:
                args = (Struct(args),)
            elif len(args) == 1 and isinstance(args[0], Struct) and len(args[0]) == n:
                args = tuple(args[0].values)
            else:
                raise InternalCompilerError(f"{self.function.name} takes {n} arguments, got {len(args)}")
        return self.lowerer.run(self.function, args, self.captured)


class Lowerer:
    """Traces IR functions into the current TF graph. `ragged`: sequences a map builds may
    have elements whose leading size differs (unbatched code); vectorized code is dense."""

    def __init__(self, program: Program, ragged: bool):
        self.program, self.ragged = program, ragged

    def run(self, function: Function, args: Sequence[Any], captured: Sequence[Any] = ()) -> Any:
        env: dict[int, Any] = {}
        for nid, node in function.nodes():
            name = node.prim.name
            inputs = [env[i] for i in node.inputs]
            special = _STRUCTURAL.get(name)
            if special is not None:
                value = special(self, node, inputs, args, captured)
            else:
                lowering = node.prim.lowering
                if lowering is None:
                    raise LoweringError(f"{name} has no TensorFlow lowering")
                attrs = {k: v for k, v in node.attrs if k not in _NOT_ATTRS}
                if node.prim.typed_impl:
                    attrs["out_type"] = node.type
                names = node.attr("args")
                value = lowering(**dict(zip(names, inputs)), **attrs) if names is not None \
                    else lowering(*inputs, **attrs)
            env[nid] = value
        return env[function.result]

    # sequences -----------------------------------------------------------------------------
    def reduce(self, seq: TFSeq, init: Any, f: Callable, acc_t: Type) -> Any:
        carry, _ = self._loop(seq, init, lambda acc, e: (f(acc, e), None), acc_t, None, False)
        return carry

    def map(self, seq: TFSeq, f: Callable, out_t: SequenceType) -> TFSeq:
        _, ys = self._loop(seq, None, lambda acc, e: (None, f(e)), None, out_t, False)
        return ys

    def scan(self, seq: TFSeq, init: Any, f: Callable, out_t: StructType, reverse: bool) -> Struct:
        def step(acc, e):
            out = f(acc, e)
            return out[0], out[1]
        carry, ys = self._loop(seq, init, step, out_t.types[0], out_t.types[1], reverse)
        return Struct((carry, ys), out_t.names)

    def _loop(self, seq: TFSeq, init: Any, step: Callable, acc_t: Type | None, ys_t: SequenceType | None,
              reverse: bool):
        acc_leaves = [] if acc_t is None else _carry_leaves(init, acc_t)
        ys_leaf_types = [] if ys_t is None else list(leaves(ys_t.element))
        flat_ys = [is_flat_leaf(t, self.ragged) for t in ys_leaf_types]
        arrays = [tf.TensorArray(tf_dtype(t.dtype), size=seq.length, infer_shape=False,
                                 element_shape=tf.TensorShape(t.shape))
                  for t, flat in zip(ys_leaf_types, flat_ys)]
        sizes = [tf.TensorArray(tf.int32, size=seq.length) for flat in flat_ys if flat]
        n = seq.length

        def body(i, accs, arrays, sizes):
            k = n - 1 - i if reverse else i
            acc = None if acc_t is None else _build(acc_t, iter(accs))
            new_acc, y = step(acc, seq.element(k))
            new_accs = [] if acc_t is None else _carry_leaves(new_acc, acc_t)
            new_accs = [tf.ensure_shape(a, old.shape) if a.shape != old.shape else a
                        for a, old in zip(new_accs, accs)]
            if ys_t is not None:
                ys = list(leaf_values(y, ys_t.element))
                ys = [as_tensor(v, t) for v, t in zip(ys, ys_leaf_types)]
                arrays = [a.write(k, v) for a, v in zip(arrays, ys)]
                flat_values = [v for v, flat in zip(ys, flat_ys) if flat]
                sizes = [s.write(k, tf.shape(v, out_type=tf.int32)[0]) for s, v in zip(sizes, flat_values)]
            return i + 1, new_accs, arrays, sizes

        invariants = (tf.TensorShape([]), [tf.TensorShape(t.shape) for t in leaves(acc_t)] if acc_t else [],
                      [tf.TensorShape(None) for _ in arrays], [tf.TensorShape(None) for _ in sizes])
        _, accs, arrays, sizes = tf.while_loop(
            lambda i, *_: i < n, body, (tf.constant(0), acc_leaves, arrays, sizes),
            shape_invariants=invariants)
        carry = None if acc_t is None else _build(acc_t, iter(accs))
        if ys_t is None:
            return carry, None
        parts, size_iter = [], iter(sizes)
        for t, a, flat in zip(ys_leaf_types, arrays, flat_ys):
            if flat:
                counts = next(size_iter).stack()
                values = _unless_empty(n, a.concat, t.shape, t.dtype)
                parts.append((_with_shape(values, t.shape), tf.concat([[0], tf.cumsum(counts)], 0)))
            else:
                stacked = _unless_empty(n, a.stack, (0,) + t.shape, t.dtype)
                parts.append((_with_shape(stacked, (None,) + t.shape), None))
        return carry, TFSeq(ys_t, n, parts)


def _unless_empty(n, gather: Callable, empty_shape, dtype: str):
    """`gather()` of a loop's TensorArray, or an empty tensor when the loop ran no step
    (TensorFlow cannot concatenate or stack an empty list of tensors of unknown shape)."""
    if all(d is not None for d in empty_shape[1:]):
        return gather()
    zeros = [0 if d is None else d for d in empty_shape]
    return tf.cond(n > 0, gather, lambda: tf.zeros(zeros, tf_dtype(dtype)))


def _with_shape(x, shape) -> Any:
    x.set_shape(tf.TensorShape(shape)) if x.shape.rank is None else None
    return x


def _carry_leaves(value: Any, t: Type) -> list:
    if isinstance(t, SequenceType) or isinstance(t, FunctionType):
        raise LoweringError(f"a loop accumulator of type {t} (sequences and functions cannot be carried)")
    if isinstance(t, StructType):
        return [x for k, (_, f) in enumerate(t.fields) for x in _carry_leaves(value[k], f)]
    return [as_tensor(value, t)]


# ---- structural and sequence nodes ------------------------------------------------------------

def _const(lw, node, inputs, args, captured):
    value = node.attr("value")
    if isinstance(value, (bool, int, float)) and node.attr("weak"):
        return value
    if isinstance(node.type, TensorType):
        return tf.constant(value, tf_dtype(node.type.dtype))
    return _const_value(value, node.type)


def _const_value(value: Any, t: Type) -> Any:
    if isinstance(t, StructType):
        return Struct((_const_value(v, f) for v, (_, f) in zip(value.values, t.fields)), t.names)
    if isinstance(t, TensorType):
        return tf.constant(value, tf_dtype(t.dtype))
    raise LoweringError(f"a constant of type {t}")


def _cond(lw, node, inputs, args, captured):
    c, a, b = inputs
    t = node.type
    if isinstance(t, FunctionType):
        return lambda *xs: _select(c, a(*xs), b(*xs), t.result)
    return _select(c, a, b, t)


def _select(c, a, b, t: Type) -> Any:
    if isinstance(c, bool):
        return a if c else b
    if isinstance(t, SequenceType):
        raise LoweringError("a condition choosing between sequences")
    a_leaves, b_leaves = _carry_leaves(a, t), _carry_leaves(b, t)
    out = tf.cond(tf.convert_to_tensor(c), lambda: a_leaves, lambda: b_leaves)
    return _build(t, iter(out if isinstance(out, (list, tuple)) else [out]))


def _count(lw, node, inputs, args, captured):
    return tf.identity(inputs[0].length)


def _num_examples(lw, node, inputs, args, captured):
    return inputs[0].rows(0)


def _zip_seq(lw, node, inputs, args, captured):
    length = inputs[0].length
    for s in inputs[1:]:
        length = tf.minimum(length, s.length)
    return TFSeq(node.type, length, [part for s in inputs for part in s.leaves])


_STRUCTURAL: dict[str, Callable] = {
    "param": lambda lw, node, inputs, args, captured: args[node.attr("index")],
    "capture": lambda lw, node, inputs, args, captured: captured[node.attr("index")],
    "global": lambda lw, node, inputs, args, captured:
        FunctionValue(lw, lw.program.functions[node.attr("name")], ()),
    "closure": lambda lw, node, inputs, args, captured: FunctionValue(lw, node.attr("function"), tuple(inputs)),
    "const": _const,
    "struct": lambda lw, node, inputs, args, captured: Struct(inputs, node.attr("names") or None),
    "select": lambda lw, node, inputs, args, captured: inputs[0][node.attr("index")],
    "call": lambda lw, node, inputs, args, captured: inputs[0](*inputs[1:]),
    "cond": _cond,
    "reduce": lambda lw, node, inputs, args, captured: lw.reduce(inputs[0], inputs[1], inputs[2], node.type),
    "map": lambda lw, node, inputs, args, captured: lw.map(inputs[0], inputs[1], node.type),
    "scan": lambda lw, node, inputs, args, captured:
        lw.scan(inputs[0], inputs[1], inputs[2], node.type, bool(node.attr("reverse"))),
    "count": _count,
    "num_examples": _num_examples,
    "zip_seq": _zip_seq,
}


# ---- phases as tf.functions -------------------------------------------------------------------

def signature(types: Sequence[Type], ragged: Sequence[bool]) -> list[tf.TensorSpec]:
    return [tensor_spec(s) for t, r in zip(types, ragged) for s in slots(t, r)]


def phase_function(function: Function, program: Program, ragged: bool, captured_types: Sequence[Type] = (),
                   in_ragged: Sequence[bool] | None = None):
    """A tf.function of the flat layout of `function`'s parameters (then of the values it
    captures, for aggregation functions) returning the flat layout of its result. `ragged`:
    the result's layout; `in_ragged`: each input's (default `ragged`)."""
    param_types = [t for _, t in function.params]
    types = param_types + list(captured_types)
    in_ragged = list(in_ragged) if in_ragged is not None else [ragged] * len(types)
    result_t = function.type.result if isinstance(function.type, FunctionType) else None
    if result_t is None:
        raise InternalCompilerError(f"{function.name} is not a function")
    specs = signature(types, in_ragged)
    slots(result_t, ragged)                   # a result without a layout fails here, not at trace time

    def run(*flat):
        it = iter(flat)
        values = [unflatten(it, t, r) for t, r in zip(types, in_ragged)]
        lw = Lowerer(program, True)           # loops build flat sequences: any element shapes
        out = lw.run(function, values[:len(param_types)], values[len(param_types):])
        return flatten(out, result_t, ragged, [])

    run.__name__ = function.name.replace("~", "_").replace(".", "_") or "phase"
    return tf.function(run, input_signature=specs, autograph=False, reduce_retracing=False)
