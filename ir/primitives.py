"""The primitive table: every local builtin (LANGUAGE.md section 5), every
operator, and every federated intrinsic (section 6), declared once.

Each entry carries its parameter list (which arguments are values and which
are static: an axis, a shape, a dtype, a placement) and its type rule. The
checker uses the rule on abstract values; later stages add their rules
(reference implementation, derivative, batching, lowering) to the same entry.

A type rule takes the bound arguments (values as `AVal`, statics as Python
values) and returns an `AVal`, or raises `TypeRuleError` naming the argument
at fault, so the checker can point at it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable

from fedlang.ir.lazy_numpy import np

from fedlang.ir.avals import (UNKNOWN, UNKNOWN_AVAL, AVal, accepts, describe, function_parameters, parameters_for,
                              strong)
from fedlang.ir.values import Struct, leafwise
from fedlang.ir.types import (FLOAT_DTYPES, INTEGER_DTYPES, NUMERIC_DTYPES, FederatedType, FunctionType,
                              Placement, SequenceType, StructType, TensorType, Type, is_assignable, leaves)

REQUIRED = object()
ORDINALS = ("1st", "2nd", "3rd") + tuple(f"{i}th" for i in range(4, 21))


class TypeRuleError(Exception):
    """A call is ill typed. `arg` is the parameter name at fault (None: the call)."""

    def __init__(self, message: str, arg: str | None = None, help: str | None = None,
                 code: str = "E040", label: str | None = None):
        super().__init__(message)
        self.message, self.arg, self.help, self.code, self.label = message, arg, help, code, label


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: str = "value"          # value | int | shape | dtype | placement
    default: Any = REQUIRED


@dataclass(frozen=True, slots=True)
class Primitive:
    """One entry of the table: every rule of one op, side by side.

    type_rule  bound arguments (AVals and statics) -> AVal, or TypeRuleError
    impl       the reference (NumPy) implementation: the meaning of the op
    vjp        derivative rule (reverse mode, in IR ops): see "derivative rules"
    batch      batching rule (how the op acts on a leading client axis, in IR ops):
               see "batching rules"; None only for the federated intrinsics
               (UNBATCHED_INTRINSICS), which a vectorized client phase sits between
    lowering   TensorFlow lowering, filled by the TensorFlow backend when it loads
               (fedlang.backends.tensorflow.registry; None until then): called like
               `impl` -- `lowering(*inputs, **attrs)` -- on TF values (tensors, weak
               Python numbers, Struct of TF values, function values as Python
               callables) and returning the TF value of the result
    """

    name: str
    signature: str               # one line, in type notation, for docs and messages
    params: tuple[Param, ...]
    type_rule: Callable[..., AVal]
    impl: Callable[..., Any] | None = None   # reference (NumPy) implementation; None: the interpreter reads it
    federated: bool = False      # an intrinsic: only inside a `comp`
    variadic: bool = False       # the last value parameter takes the remaining positionals
    operator: str | None = None  # the source operator it implements ("+", "not", ...)
    typed_impl: bool = False     # impl takes the node's type as `out_type=`
    callable: bool = True        # a program may call it by name (structural nodes may not)
    vjp: Callable[..., tuple] | None = None   # derivative rule (reverse mode, in IR ops); see below
    batch: Callable[..., Any] | None = None   # batching rule (vectorizing over clients, in IR ops); see below
    lowering: Callable[..., Any] | None = None   # TensorFlow lowering (the TensorFlow backend); see above


# ---- helpers used by the rules ------------------------------------------------------

def _tensor(aval: AVal, arg: str, what: str = "a tensor") -> TensorType:
    if isinstance(aval.type, TensorType):
        return aval.type
    raise TypeRuleError(f"expected {what}, found {describe(aval.type)}", arg)


def broadcast_shapes(a: tuple, b: tuple) -> tuple | None:
    """NumPy broadcasting with unknown (`None`) dimensions; None if incompatible."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x == y:
            out.append(x)
        elif x == 1:
            out.append(y)
        elif y == 1:
            out.append(x)
        elif x is None:
            out.append(y)
        elif y is None:
            out.append(x)
        else:
            return None
    return tuple(reversed(out))


def _shape_text(shape: tuple) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def unify_dtypes(a: AVal, b: AVal, arg_a: str, arg_b: str) -> tuple[str, str | None]:
    """The common dtype of two scalars-or-tensors, adapting weak literals.

    Returns (dtype, weak kind of the result or None)."""
    ta, tb = a.type, b.type
    if a.weak and b.weak:
        kind = "float" if "float" in (a.weak, b.weak) else "int"
        return ("float32" if kind == "float" else "int32"), kind
    if a.weak or b.weak:
        literal, other, literal_arg = (a, tb, arg_a) if a.weak else (b, ta, arg_b)
        if literal.weak == "float" and other.dtype not in FLOAT_DTYPES:
            raise TypeRuleError(f"a float literal cannot become {other.dtype}", literal_arg, code="E055",
                                help=f"write an integer, or cast the other side: cast(x, float32)")
        if other.dtype in ("bool", "string"):
            raise TypeRuleError(f"a number cannot meet a {other.dtype} value", literal_arg)
        return other.dtype, None
    if ta.dtype != tb.dtype:
        raise TypeRuleError(f"mismatched dtypes {ta.dtype} and {tb.dtype}", None, code="E044",
                            help=f"there is no implicit conversion; use cast(x, {ta.dtype}) on one side")
    return ta.dtype, None


def _leafwise(a: Type, b: Type, fn: Callable[[TensorType, TensorType], TensorType], arg_a, arg_b) -> Type:
    """Apply `fn` leaf by leaf: struct-struct (same structure), or struct-tensor."""
    if isinstance(a, StructType) and isinstance(b, StructType):
        if a.names != b.names:
            raise TypeRuleError(f"structs of different shapes: {a} and {b}", None, code="E044",
                                help="leaf-wise arithmetic needs structs with the same fields in the same order")
        return StructType(tuple((n, _leafwise(x, y, fn, arg_a, arg_b)) for (n, x), (_, y) in zip(a.fields, b.fields)))
    if isinstance(a, StructType):
        return StructType(tuple((n, _leafwise(x, b, fn, arg_a, arg_b)) for n, x in a.fields))
    if isinstance(b, StructType):
        return StructType(tuple((n, _leafwise(a, y, fn, arg_a, arg_b)) for n, y in b.fields))
    if not isinstance(a, TensorType):
        raise TypeRuleError(f"expected a tensor or a struct of tensors, found {describe(a)}", arg_a, code="E044")
    if not isinstance(b, TensorType):
        raise TypeRuleError(f"expected a tensor or a struct of tensors, found {describe(b)}", arg_b, code="E044")
    return fn(a, b)


def elementwise(a: AVal, b: AVal, dtypes: frozenset[str] | None, result_dtype: str | None = None,
                what: str = "this operation", arg_a: str = "x", arg_b: str = "y") -> AVal:
    """Type of a broadcasting binary op, leaf-wise on structs, with weak literals."""
    if a.unknown or b.unknown:
        return UNKNOWN_AVAL
    result_weak: list[str | None] = [None]

    def on_tensors(x: TensorType, y: TensorType) -> TensorType:
        dtype, weak = unify_dtypes(AVal(x, a.weak), AVal(y, b.weak), arg_a, arg_b)
        if dtypes is not None and dtype not in dtypes:
            raise TypeRuleError(f"{what} is not defined on {dtype}", None, code="E050",
                                help=_dtype_help(dtypes))
        shape = broadcast_shapes(x.shape, y.shape)
        if shape is None:
            raise TypeRuleError(f"shapes {_shape_text(x.shape)} and {_shape_text(y.shape)} do not broadcast",
                                None, code="E044", help="dimensions must be equal, or 1, as in NumPy")
        result_weak[0] = weak
        return TensorType(result_dtype or dtype, shape)

    t = _leafwise(a.type, b.type, on_tensors, arg_a, arg_b)
    weak = result_weak[0] if isinstance(t, TensorType) and result_dtype is None else None
    return AVal(t, weak)


def _dtype_help(dtypes: frozenset[str]) -> str:
    if dtypes == FLOAT_DTYPES:
        return "it needs floating-point values; cast(x, float32) first"
    if dtypes == NUMERIC_DTYPES:
        return "it needs numbers (int or float)"
    if dtypes == frozenset({"bool"}):
        return "it needs bool values; compare first, e.g. x > 0"
    return "allowed dtypes: " + ", ".join(sorted(dtypes))


def unary_elementwise(x: AVal, dtypes: frozenset[str], what: str, arg: str = "x") -> AVal:
    """Type of a leaf-wise unary op on a tensor or a struct of tensors."""
    if x.unknown:
        return UNKNOWN_AVAL

    def on(t: Type) -> Type:
        if isinstance(t, StructType):
            return StructType(tuple((n, on(f)) for n, f in t.fields))
        if not isinstance(t, TensorType):
            raise TypeRuleError(f"expected a tensor or a struct of tensors, found {describe(t)}", arg)
        if x.weak:
            return t
        if t.dtype not in dtypes:
            raise TypeRuleError(f"{what} is not defined on {t.dtype}", arg, code="E050", help=_dtype_help(dtypes))
        return t

    t = on(x.type)
    if x.weak and dtypes == FLOAT_DTYPES and x.weak == "int":
        return AVal(TensorType("float32"), "float")
    return AVal(t, x.weak)


def _axis(rank: int, axis: int, arg: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise TypeRuleError(f"axis {axis} is out of range for a tensor of rank {rank}", arg, code="E049")
    return axis % rank


def _require_dtype(t: TensorType, dtypes: frozenset[str], arg: str, what: str) -> None:
    if t.dtype not in dtypes:
        raise TypeRuleError(f"{what} is not defined on {t.dtype}", arg, code="E050", help=_dtype_help(dtypes))


def _scalar(aval: AVal, dtypes: frozenset[str], arg: str, what: str) -> None:
    """A scalar of one of `dtypes`; weak literals of the right kind are fine."""
    if aval.unknown:
        return
    if aval.weak:
        if aval.weak == "float" and not (dtypes & FLOAT_DTYPES):
            raise TypeRuleError(f"{what} must be an integer, found a float literal", arg, code="E055")
        return
    t = _tensor(aval, arg, f"a scalar ({what})")
    if t.shape != () or t.dtype not in dtypes:
        raise TypeRuleError(f"{what} must be a scalar of {' or '.join(sorted(dtypes))}, found {t}", arg)


def _function(aval: AVal, arg: str) -> FunctionType:
    if isinstance(aval.type, FunctionType):
        return aval.type
    raise TypeRuleError(f"expected a function, found {describe(aval.type)}", arg,
                        help="pass an `fn` by name or a lambda: fn(x: T) -> U = ...")


def _check_call(fn: AVal, args: list[AVal], arg: str, context: str) -> Type:
    """Type of calling function value `fn` with `args`; errors name `context`."""
    ft = _function(fn, arg)
    params = function_parameters(fn)
    if params is not None and len(params) != len(args) and len(params) == 1 and len(args) > 1 \
            and isinstance(ft.parameter, StructType) and len(ft.parameter.fields) == len(args):
        params = ft.parameter.types
    if params is None or len(params) != len(args):
        expects = "no argument" if not params else f"{len(params)} argument{'s' if len(params) != 1 else ''}"
        raise TypeRuleError(f"{context}: the function takes {expects} but gets {len(args)}", arg, code="E041",
                            label=f"this is {ft}")
    for i, (expected, given) in enumerate(zip(params, args)):
        if not accepts(expected, given):
            raise TypeRuleError(
                f"{context}: the function's {ORDINALS[i]} parameter is {expected} but it gets {given.type}", arg,
                label=f"this is {ft}")
    return ft.result


def _member(aval: AVal) -> Type:
    return aval.type.member if isinstance(aval.type, FederatedType) else aval.type


def _at(aval: AVal, placement: Placement, arg: str, prim: str, position: int, code: str = "E068") -> FederatedType:
    """`aval` must be a federated value at `placement`."""
    t = aval.type
    if isinstance(t, FederatedType) and t.placement is placement:
        return t
    where = "unplaced" if not isinstance(t, FederatedType) else f"at {t.placement}"
    help_line = {
        (Placement.CLIENTS, "unplaced"): "place it first: federated_value(v, CLIENTS)",
        (Placement.SERVER, "unplaced"): "place it first: federated_value(v, SERVER)",
        (Placement.CLIENTS, "at SERVER"): ("it is already one value at the server; aggregations take client values"
                                           if prim.startswith("federated_") and prim not in ("federated_map", "federated_zip")
                                           else "send it to the clients first: federated_broadcast(v)"),
        (Placement.SERVER, "at CLIENTS"): "aggregate it first: federated_sum, federated_mean, ...",
    }.get((placement, where))
    raise TypeRuleError(f"the {ORDINALS[position]} argument of {prim} must be at {placement}; "
                        f"this value is {describe(t)}", arg, help=help_line,
                        code=code if isinstance(t, FederatedType) else "E040", label=f"{where}")


def _numeric_leaves(t: Type, dtypes: frozenset[str], arg: str, prim: str, what: str) -> None:
    if isinstance(t, StructType):
        for _, f in t.fields:
            _numeric_leaves(f, dtypes, arg, prim, what)
        return
    if not isinstance(t, TensorType):
        raise TypeRuleError(f"{prim} needs {what} values (tensors or structs of them), found {describe(t)}", arg)
    if t.dtype not in dtypes:
        raise TypeRuleError(f"{prim} needs {what} values, found {t.dtype}", arg, code="E050",
                            help=_dtype_help(dtypes))


# ---- rules: operators ----------------------------------------------------------------

def _arith(name: str, dtypes: frozenset[str]):
    def rule(x: AVal, y: AVal) -> AVal:
        return elementwise(x, y, dtypes, what=f"`{name}`")
    return rule


def _compare(name: str, dtypes: frozenset[str] | None):
    def rule(x: AVal, y: AVal) -> AVal:
        if isinstance(x.type, StructType) or isinstance(y.type, StructType):
            raise TypeRuleError(f"`{name}` compares tensors, not structs", None, code="E044")
        return elementwise(x, y, dtypes, result_dtype="bool", what=f"`{name}`")
    return rule


def _neg(x: AVal) -> AVal:
    return unary_elementwise(x, NUMERIC_DTYPES, "`-`")


def _not(x: AVal) -> AVal:
    return unary_elementwise(x, frozenset({"bool"}), "`not`")


def _div(x: AVal, y: AVal) -> AVal:
    if x.weak == "int" and y.weak == "int":
        raise TypeRuleError("`/` divides floating-point values; both sides are integer literals", None,
                            code="E050", help="write a float literal, e.g. 1.0 / 2")
    return elementwise(x, y, FLOAT_DTYPES, what="`/`")


# ---- rules: local builtins -----------------------------------------------------------

def _unary(name: str, dtypes: frozenset[str]):
    def rule(x: AVal) -> AVal:
        return unary_elementwise(x, dtypes, f"{name}")
    return rule


def _binary(name: str, dtypes: frozenset[str]):
    def rule(x: AVal, y: AVal) -> AVal:
        return elementwise(x, y, dtypes, what=name)
    return rule


def _matmul(a: AVal, b: AVal) -> AVal:
    if a.unknown or b.unknown:
        return UNKNOWN_AVAL
    x, y = _tensor(a, "a"), _tensor(b, "b")
    dtype, _ = unify_dtypes(strong(a), strong(b), "a", "b")
    if dtype not in NUMERIC_DTYPES:
        raise TypeRuleError(f"matmul is not defined on {dtype}", "a", code="E050")
    if x.rank == 0 or y.rank == 0:
        raise TypeRuleError("matmul needs tensors of rank 1 or more", "a" if x.rank == 0 else "b", code="E056")
    xs = x.shape if x.rank > 1 else (1,) + x.shape
    ys = y.shape if y.rank > 1 else y.shape + (1,)
    k1, k2 = xs[-1], ys[-2]
    if k1 is not None and k2 is not None and k1 != k2:
        raise TypeRuleError(f"matmul of {x} and {y}: inner dimensions {k1} and {k2} differ", None, code="E056")
    batch = broadcast_shapes(xs[:-2], ys[:-2])
    if batch is None:
        raise TypeRuleError(f"matmul of {x} and {y}: batch dimensions do not broadcast", None, code="E056")
    shape = batch + ((xs[-2],) if x.rank > 1 else ()) + ((ys[-1],) if y.rank > 1 else ())
    return AVal(TensorType(dtype, shape))


def _softmax(name: str):
    def rule(x: AVal, axis: int) -> AVal:
        t = _tensor(strong(x), "x")
        _require_dtype(t, FLOAT_DTYPES, "x", name)
        if t.rank == 0:
            raise TypeRuleError(f"{name} needs a tensor of rank 1 or more", "x", code="E056")
        _axis(t.rank, axis)
        return AVal(t)
    return rule


def _sparse_xent(labels: AVal, logits: AVal) -> AVal:
    lab, log = _tensor(strong(labels), "labels"), _tensor(strong(logits), "logits")
    _require_dtype(lab, INTEGER_DTYPES, "labels", "the labels of sparse_softmax_cross_entropy")
    _require_dtype(log, FLOAT_DTYPES, "logits", "the logits of sparse_softmax_cross_entropy")
    if log.rank != lab.rank + 1:
        raise TypeRuleError(f"logits {log} must have one more dimension than labels {lab}", "logits",
                            code="E056", help="labels[i] is a class index; logits[i] a row of class scores")
    if any(d is not None and e is not None and d != e for d, e in zip(lab.shape, log.shape[:-1])):
        raise TypeRuleError(f"labels {lab} and logits {log} disagree on the leading dimensions", "logits",
                            code="E056")
    shape = tuple(d if d is not None else e for d, e in zip(lab.shape, log.shape[:-1]))
    return AVal(TensorType(log.dtype, shape))


def _reduction(name: str, dtypes: frozenset[str]):
    def rule(x: AVal, axis: int | None) -> AVal:
        t = _tensor(strong(x), "x")
        _require_dtype(t, dtypes, "x", name)
        if axis is None:
            return AVal(TensorType(t.dtype))
        if t.rank == 0:
            raise TypeRuleError(f"{name} over an axis needs a tensor of rank 1 or more", "x", code="E049")
        a = _axis(t.rank, axis)
        return AVal(TensorType(t.dtype, t.shape[:a] + t.shape[a + 1:]))
    return rule


def _argmax(x: AVal, axis: int) -> AVal:
    t = _tensor(strong(x), "x")
    _require_dtype(t, NUMERIC_DTYPES, "x", "argmax")
    if t.rank == 0:
        raise TypeRuleError("argmax needs a tensor of rank 1 or more", "x", code="E049")
    a = _axis(t.rank, axis)
    return AVal(TensorType("int32", t.shape[:a] + t.shape[a + 1:]))


def _one_hot(i: AVal, depth: int) -> AVal:
    t = _tensor(strong(i), "i")
    _require_dtype(t, INTEGER_DTYPES, "i", "one_hot")
    if depth <= 0:
        raise TypeRuleError(f"one_hot needs a positive depth, found {depth}", "depth", code="E049")
    return AVal(TensorType("float32", t.shape + (depth,)))


def _cast(x: AVal, dtype: str) -> AVal:
    def on(t: Type) -> Type:
        if isinstance(t, StructType):
            return StructType(tuple((n, on(f)) for n, f in t.fields))
        if not isinstance(t, TensorType):
            raise TypeRuleError(f"cast needs a tensor or a struct of tensors, found {describe(t)}", "x")
        if (t.dtype == "string") != (dtype == "string"):
            raise TypeRuleError(f"cannot cast {t.dtype} to {dtype}", "x", code="E050")
        return TensorType(dtype, t.shape)
    return AVal(on(strong(x).type))


def _reshape(x: AVal, shape: tuple[int, ...]) -> AVal:
    t = _tensor(strong(x), "x")
    if sum(1 for d in shape if d == -1) > 1 or any(d < -1 for d in shape):
        raise TypeRuleError(f"bad shape {list(shape)}: sizes are >= 0, with at most one -1", "shape", code="E049")
    known = None if any(d is None for d in t.shape) else _product(t.shape)
    fixed = _product(d for d in shape if d != -1)
    if -1 in shape:
        inferred = None
        if known is not None:
            if fixed == 0 or known % fixed:
                raise TypeRuleError(f"cannot reshape {t} to {list(shape)}", "shape", code="E056")
            inferred = known // fixed
        return AVal(TensorType(t.dtype, tuple(inferred if d == -1 else d for d in shape)))
    if known is not None and known != fixed:
        raise TypeRuleError(f"cannot reshape {t} ({known} elements) to {list(shape)} ({fixed} elements)",
                            "shape", code="E056")
    return AVal(TensorType(t.dtype, tuple(shape)))


def _product(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _like(x: AVal) -> AVal:
    x = strong(x)
    list(_walk_value(x.type, "x", "zeros_like and ones_like"))   # raises unless tensors
    return AVal(x.type)


def _walk_value(t: Type, arg: str, prim: str):
    if isinstance(t, StructType):
        for _, f in t.fields:
            yield from _walk_value(f, arg, prim)
    elif isinstance(t, TensorType):
        yield t
    else:
        raise TypeRuleError(f"{prim} needs a tensor or a struct of tensors, found {describe(t)}", arg)


def _where(c: AVal, a: AVal, b: AVal) -> AVal:
    ct = _tensor(strong(c), "c", "a bool tensor")
    if ct.dtype != "bool":
        raise TypeRuleError(f"the condition of where must be bool, found {ct}", "c",
                            help="compare first, e.g. where(x > 0, x, 0.0)")
    _tensor(a, "a"), _tensor(b, "b")
    value = elementwise(a, b, None, what="where", arg_a="a", arg_b="b")
    shape = broadcast_shapes(ct.shape, value.type.shape)
    if shape is None:
        raise TypeRuleError(f"the condition {ct} does not broadcast with {value.type}", "c", code="E044")
    return AVal(TensorType(value.type.dtype, shape))     # depends on c: never a weak constant


def _clip(x: AVal, lo: AVal, hi: AVal) -> AVal:
    out = elementwise(x, lo, NUMERIC_DTYPES, what="clip", arg_a="x", arg_b="lo")
    out = elementwise(out, hi, NUMERIC_DTYPES, what="clip", arg_a="x", arg_b="hi")
    for name, bound in (("lo", lo), ("hi", hi)):
        if isinstance(bound.type, TensorType) and bound.type.shape != ():
            raise TypeRuleError(f"the bound {name} of clip must be a scalar, found {bound.type}", name)
    if not isinstance(x.type, StructType) and out.type != x.type and not x.weak:
        raise TypeRuleError(f"clip bounds change the shape of {x.type} to {out.type}", "x", code="E044")
    return out


def _global_norm(x: AVal) -> AVal:
    ts = list(_walk_value(x.type, "x", "global_norm"))
    dtypes = {t.dtype for t in ts}
    if not ts or len(dtypes) != 1 or not dtypes <= FLOAT_DTYPES:
        raise TypeRuleError(f"global_norm needs float tensors of one dtype, found {x.type}", "x", code="E050")
    return AVal(TensorType(dtypes.pop()))


def _size(x: AVal) -> AVal:
    _tensor(x, "x")
    return AVal(TensorType("int32"))


def _differentiable(t: Type, arg: str) -> None:
    if isinstance(t, StructType):
        for _, f in t.fields:
            _differentiable(f, arg)
    elif not (isinstance(t, TensorType) and t.dtype in FLOAT_DTYPES):
        raise TypeRuleError(f"grad differentiates with respect to float tensors; the first parameter holds {t}",
                            arg, code="E053", help="make the first parameter the model (float tensors), "
                                                   "and pass the data after it")


def _wrt(f: AVal, prim: str) -> tuple[FunctionType, Type]:
    ft = _function(f, "f")
    params = function_parameters(f)
    if not params:
        raise TypeRuleError(f"{prim} needs a function with at least one parameter", "f", code="E053")
    result = ft.result
    if not (isinstance(result, TensorType) and result.shape == () and result.dtype in FLOAT_DTYPES):
        raise TypeRuleError(f"{prim} needs a function with a float scalar result; this one returns {result}",
                            "f", code="E053", help="reduce the loss to a scalar first, e.g. mean(...)")
    _differentiable(params[0], "f")
    return ft, params[0]


def _grad(f: AVal) -> AVal:
    ft, wrt = _wrt(f, "grad")
    return AVal(FunctionType(ft.parameter, wrt), arity=f.arity)


def _value_and_grad(f: AVal) -> AVal:
    ft, wrt = _wrt(f, "value_and_grad")
    return AVal(FunctionType(ft.parameter, StructType(((None, ft.result), (None, wrt)))), arity=f.arity)


def _sequence(aval: AVal, arg: str, prim: str) -> SequenceType:
    if isinstance(aval.type, SequenceType):
        return aval.type
    raise TypeRuleError(f"{prim} needs a sequence (T*), found {describe(aval.type)}", arg)


def _reduce(seq: AVal, init: AVal, f: AVal) -> AVal:
    st = _sequence(seq, "seq", "reduce")
    ft = _function(f, "f")
    params = parameters_for(f, 2)
    if params is None:
        raise TypeRuleError(f"the function of reduce takes (accumulator, element); this one is {ft}", "f",
                            code="E041")
    acc, elem = params
    if not accepts(acc, init):
        raise TypeRuleError(f"the initial value is {init.type} but the accumulator parameter is {acc}", "init")
    if not is_assignable(elem, st.element):
        raise TypeRuleError(f"the elements are {st.element} but the element parameter is {elem}", "f")
    if not is_assignable(acc, ft.result):
        raise TypeRuleError(f"the function returns {ft.result} but the accumulator is {acc}", "f",
                            help="return a new accumulator of the same type")
    return AVal(acc)


def _map(seq: AVal, f: AVal) -> AVal:
    st = _sequence(seq, "seq", "map")
    result = _check_call(f, [AVal(st.element)], "f", "map")
    return AVal(SequenceType(result))


def _count(seq: AVal) -> AVal:
    _sequence(seq, "seq", "count")
    return AVal(TensorType("int32"))


def _num_examples(seq: AVal) -> AVal:
    st = _sequence(seq, "seq", "num_examples")
    first = next(leaves(st.element), None)
    if first is None or first.rank == 0:
        raise TypeRuleError(f"num_examples sums the leading dimension of each element; {st.element} has none",
                            "seq", code="E056", help="use count(seq) to count elements")
    return AVal(TensorType("int32"))


def _filled(shape: tuple[int, ...], dtype: str) -> AVal:
    if any(d < 0 for d in shape):
        raise TypeRuleError(f"bad shape {list(shape)}", "shape", code="E049")
    return AVal(TensorType(dtype, tuple(shape)))


def _random_normal(shape: tuple[int, ...], stddev: AVal, seed: AVal) -> AVal:
    _scalar(stddev, FLOAT_DTYPES, "stddev", "stddev")
    _scalar(seed, INTEGER_DTYPES, "seed", "the seed")
    return _filled(shape, "float32")


def _random_uniform(shape: tuple[int, ...], lo: AVal, hi: AVal, seed: AVal) -> AVal:
    _scalar(lo, FLOAT_DTYPES, "lo", "lo")
    _scalar(hi, FLOAT_DTYPES, "hi", "hi")
    _scalar(seed, INTEGER_DTYPES, "seed", "the seed")
    return _filled(shape, "float32")


def _random_normal_like(x: AVal, stddev: AVal, seed: AVal) -> AVal:
    _scalar(stddev, FLOAT_DTYPES, "stddev", "stddev")
    _scalar(seed, INTEGER_DTYPES, "seed", "the seed")
    _numeric_leaves(strong(x).type, FLOAT_DTYPES, "x", "random_normal_like", "float")
    return AVal(strong(x).type)


# ---- rules: federated intrinsics ------------------------------------------------------

def _federated_value(v: AVal, placement: Placement) -> AVal:
    v = strong(v)
    if isinstance(v.type, FederatedType) or (isinstance(v.type, StructType) and _has_federated(v.type)):
        raise TypeRuleError(f"federated_value places an unplaced value; this one is already {v.type}", "v",
                            code="E064", help="federated types cannot nest")
    if isinstance(v.type, FunctionType):
        raise TypeRuleError("function values cannot be placed", "v", code="E065",
                            help="use federated_eval(f, P) to run a ( -> T) function at P")
    return AVal(FederatedType(v.type, placement, all_equal=True))


def _has_federated(t: Type) -> bool:
    return isinstance(t, FederatedType) or (isinstance(t, StructType) and any(_has_federated(f) for _, f in t.fields))


def _federated_eval(f: AVal, placement: Placement) -> AVal:
    ft = _function(f, "f")
    if ft.parameter is not None:
        raise TypeRuleError(f"federated_eval runs a function of no parameter ( -> T); this one is {ft}", "f",
                            code="E041")
    if _has_federated(ft.result) or f.federated_function:
        raise TypeRuleError("federated_eval runs a local function (fn); this one is federated", "f", code="E064")
    return AVal(FederatedType(ft.result, placement, all_equal=placement is Placement.SERVER))


def _federated_broadcast(x: AVal) -> AVal:
    t = x.type
    if isinstance(t, FederatedType) and t.placement is Placement.CLIENTS:
        raise TypeRuleError(f"only a server value can be broadcast; this value is {t}", "x", code="E062",
                            label="at CLIENTS",
                            help="a value at CLIENTS reaches the server only through an aggregation "
                                 "(federated_sum, federated_mean, ...)")
    ft = _at(x, Placement.SERVER, "x", "federated_broadcast", 0)
    return AVal(FederatedType(ft.member, Placement.CLIENTS, all_equal=True))


def _same_placement(xs: list[AVal], prim: str, first: int) -> Placement:
    placements = []
    for i, x in enumerate(xs):
        if not isinstance(x.type, FederatedType):
            raise TypeRuleError(f"the {ORDINALS[first + i]} argument of {prim} must be placed; "
                                f"this value is {describe(x.type)}", f"xs[{i}]",
                                help="place it with federated_value(v, CLIENTS) or federated_broadcast(v)")
        placements.append(x.type.placement)
    if len(set(placements)) > 1:
        i = placements.index(next(p for p in placements if p != placements[0]))
        raise TypeRuleError(f"{prim} needs all its values at one placement; the {ORDINALS[first]} is at "
                            f"{placements[0]} and the {ORDINALS[first + i]} at {placements[i]}", f"xs[{i}]",
                            code="E068",
                            help="broadcast the server value first: federated_broadcast(v)")
    return placements[0]


def _federated_map(f: AVal, *xs: AVal) -> AVal:
    if not xs:
        raise TypeRuleError("federated_map needs a function and at least one value", None, code="E041")
    _function(f, "f")
    if f.federated_function:
        raise TypeRuleError("federated_map applies a local function (fn); this one is a comp", "f", code="E064",
                            help="call the comp directly")
    placement = _same_placement(list(xs), "federated_map", 1)
    result = _check_call(f, [AVal(_member(x)) for x in xs], "f", "federated_map")
    if _has_federated(result):
        raise TypeRuleError("federated_map's function must return an unplaced value", "f", code="E064")
    if placement is Placement.SERVER:
        return AVal(FederatedType(result, Placement.SERVER, True))
    return AVal(FederatedType(result, Placement.CLIENTS, False))


def _federated_apply(f: AVal, x: AVal) -> AVal:
    _function(f, "f")
    ft = _at(x, Placement.SERVER, "x", "federated_apply", 1)
    result = _check_call(f, [AVal(ft.member)], "f", "federated_apply")
    return AVal(FederatedType(result, Placement.SERVER, True))


def _federated_zip(*xs: AVal) -> AVal:
    if not xs:
        raise TypeRuleError("federated_zip needs at least one value", None, code="E041")
    placement = _same_placement(list(xs), "federated_zip", 0)
    member = StructType(tuple((None, _member(x)) for x in xs))
    if placement is Placement.SERVER:
        return AVal(FederatedType(member, Placement.SERVER, True))
    return AVal(FederatedType(member, Placement.CLIENTS, False))


def _aggregation(name: str, dtypes: frozenset[str], what: str):
    def rule(x: AVal) -> AVal:
        ft = _at(x, Placement.CLIENTS, "x", name, 0)
        _numeric_leaves(ft.member, dtypes, "x", name, what)
        return AVal(FederatedType(ft.member, Placement.SERVER, True))
    return rule


def _federated_mean(x: AVal, weight: AVal | None) -> AVal:
    ft = _at(x, Placement.CLIENTS, "x", "federated_mean", 0)
    _numeric_leaves(ft.member, FLOAT_DTYPES, "x", "federated_mean", "floating-point")
    if weight is not None and not weight.unknown:
        wt = _at(weight, Placement.CLIENTS, "weight", "federated_mean", 1)
        if wt.member != TensorType("float32"):
            raise TypeRuleError(f"the weight of federated_mean is {{float32}}@CLIENTS; this one is {weight.type}",
                                "weight", help="cast it: federated_map(fn(n: int32) -> float32 = cast(n, float32), w)")
    return AVal(FederatedType(ft.member, Placement.SERVER, True))


def _robust(name: str):
    """Type rule of a robust aggregation: {T}@CLIENTS -> T@SERVER, T's leaves floating point."""
    def rule(x: AVal, **statics) -> AVal:
        ft = _at(x, Placement.CLIENTS, "x", name, 0)
        _numeric_leaves(ft.member, FLOAT_DTYPES, "x", name, "floating-point")
        for key, value in statics.items():
            low, high = _ROBUST_RANGES[key]
            if not low <= value <= high:
                raise TypeRuleError(f"`{key}` of {name} must be between {low} and {high}, found {value}", key,
                                    code="E049")
        return AVal(FederatedType(ft.member, Placement.SERVER, True))
    return rule


# The static parameters of the robust aggregations and their ranges.
_ROBUST_RANGES = {"percent": (0, 49), "bound": (0.0, float("inf")), "byzantine": (0, 2 ** 31 - 1)}


def _federated_aggregate(x: AVal, zero: AVal, accumulate: AVal, merge: AVal, report: AVal) -> AVal:
    ft = _at(x, Placement.CLIENTS, "x", "federated_aggregate", 0)
    accumulate_params = function_parameters(accumulate) if isinstance(accumulate.type, FunctionType) else None
    if zero.weak and accumulate_params and accepts(accumulate_params[0], zero):
        zero = AVal(accumulate_params[0])     # a literal zero takes the accumulator's type
    zero = strong(zero)
    if _has_federated(zero.type) or isinstance(zero.type, FunctionType):
        raise TypeRuleError(f"the zero of federated_aggregate is an unplaced value; this one is {zero.type}",
                            "zero", code="E064" if _has_federated(zero.type) else "E040")
    u = zero.type
    acc = _check_call(accumulate, [AVal(u), AVal(ft.member)], "accumulate", "accumulate")
    if not is_assignable(u, acc):
        raise TypeRuleError(f"accumulate must return the accumulator type {u}, it returns {acc}", "accumulate")
    merged = _check_call(merge, [AVal(u), AVal(u)], "merge", "merge")
    if not is_assignable(u, merged):
        raise TypeRuleError(f"merge must return the accumulator type {u}, it returns {merged}", "merge")
    result = _check_call(report, [AVal(u)], "report", "report")
    if _has_federated(result):
        raise TypeRuleError("report must return an unplaced value", "report", code="E064")
    return AVal(FederatedType(result, Placement.SERVER, True))


def _federated_secure_sum(x: AVal, bitwidth: int) -> AVal:
    ft = _at(x, Placement.CLIENTS, "x", "federated_secure_sum", 0)
    _numeric_leaves(ft.member, INTEGER_DTYPES, "x", "federated_secure_sum", "integer")
    if not 1 <= bitwidth <= 62:
        raise TypeRuleError(f"bitwidth must be between 1 and 62, found {bitwidth}", "bitwidth", code="E049")
    return AVal(FederatedType(ft.member, Placement.SERVER, True))


# ---- reference implementations (NumPy) ----------------------------------------------------
#
# Values: numpy arrays of the exact dtype, Struct, list (sequences; values at
# CLIENTS, one per client), Python callables (functions). Weak literals arrive
# as Python numbers and take the other operand's dtype (NumPy's NEP 50 rule is
# fedlang's weak-literal rule).

NUM_CLIENTS: contextvars.ContextVar[int] = contextvars.ContextVar("fedlang_num_clients", default=0)


class FedlangRuntimeError(Exception):
    """A computation failed while running (an index out of range, ...)."""


def _a(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _numpy(name: str):
    """NumPy's function `name`, looked up when called (the table is built before NumPy loads)."""
    def call(*args, **kwargs):
        return getattr(np, name)(*args, **kwargs)
    call.__name__ = name
    return call


def _binary_impl(fn):
    def impl(x, y):
        if not isinstance(x, (np.ndarray, Struct)) and not isinstance(y, (np.ndarray, Struct)):
            return fn(x, y)                          # two weak literals: fold in Python
        return leafwise(lambda a, b: _a(fn(a, b)), x, y)
    return impl


def _unary_impl(fn):
    def impl(x):
        if not isinstance(x, (np.ndarray, Struct)):
            return fn(x)
        return leafwise(lambda a: _a(fn(a)), x)
    return impl


def _np_relu(x):
    if isinstance(x, (np.ndarray, np.generic)):
        return _a(np.maximum(x, np.zeros((), x.dtype)))
    return x if x > 0 else type(x)(0)


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_divide(x, y):
    return x / y


def _np_softmax(x, axis=-1):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=axis, keepdims=True)


def _np_log_softmax(x, axis=-1):
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _np_sparse_xent(labels, logits):
    logp = _np_log_softmax(logits)
    picked = np.take_along_axis(logp, labels[..., None].astype(np.int64), axis=-1)[..., 0]
    return _a(-picked)


def _reduction_impl(fn):
    def impl(x, axis=None):
        return _a(fn(x, axis=axis)).astype(x.dtype)
    return impl


def _np_mean(x, axis=None):
    return _a(np.mean(x, axis=axis, dtype=np.float64 if x.dtype == np.float64 else np.float32)).astype(x.dtype)


def _np_argmax(x, axis):
    return _a(np.argmax(x, axis=axis)).astype(np.int32)


def _np_one_hot(i, depth):
    return (i[..., None] == np.arange(depth)).astype(np.float32)


def _np_cast(x, dtype):
    return leafwise(lambda a: _a(a).astype(np.str_ if dtype == "string" else np.dtype(dtype)), x)


def _np_reshape(x, shape):
    return np.reshape(x, shape)


def _np_zeros_like(x):
    return leafwise(lambda a: np.zeros_like(a), x)


def _np_ones_like(x):
    return leafwise(lambda a: np.ones_like(a), x)


def _dtype_of(*values) -> np.dtype | None:
    for v in values:
        if isinstance(v, (np.ndarray, np.generic)):
            return v.dtype
    return None


def _np_where(c, a, b):
    dtype = _dtype_of(a, b)
    if dtype is None:                    # two literals: float32 if either is a float, else int32
        dtype = np.dtype(np.float32 if isinstance(a, float) or isinstance(b, float) else np.int32)
    out = np.where(c, a, b)
    if dtype.kind in "US":               # strings: keep NumPy's common width, never truncate
        return _a(out)
    return _a(out).astype(dtype)


def _np_clip(x, lo, hi):
    def one(a):
        dtype = _dtype_of(a, lo, hi)      # a literal x takes the dtype of a tensor bound
        if dtype is None:
            return min(max(a, lo), hi)    # all literals: fold in Python
        return _a(np.clip(a, lo, hi)).astype(dtype)
    return leafwise(one, x)


def _np_global_norm(x):
    leaves_ = _leaves(x)
    dtype = leaves_[0].dtype
    return _a(np.sqrt(sum(np.sum(np.square(l, dtype=dtype), dtype=dtype) for l in leaves_))).astype(dtype)


def _leaves(x) -> list:
    if isinstance(x, Struct):
        return [leaf for v in x.values for leaf in _leaves(v)]
    return [x]


def _np_size(x):
    return np.int32(_a(x).size).reshape(())


def _np_reduce(seq, init, f):
    acc = init
    for element in seq:
        acc = f(acc, element)
    return acc


def _np_map(seq, f):
    return [f(element) for element in seq]


def _np_count(seq):
    return np.asarray(len(seq), np.int32)


def _np_num_examples(seq):
    return np.asarray(sum(int(_leaves(e)[0].shape[0]) for e in seq), np.int32)


def _np_filled(value):
    def impl(shape, dtype="float32"):
        return np.full(shape, value, np.str_ if dtype == "string" else np.dtype(dtype))
    return impl


# Counter-based random numbers, reproducible on every backend: the i-th number
# of a tensor drawn with seed s is a hash of (s, i) in 32-bit integer
# arithmetic (murmur3's finalizer), which NumPy and TensorFlow compute alike.
def _hash32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def counter_uniform(shape, seed, stream: int = 0) -> np.ndarray:
    """Floats in [0, 1): 24 random bits of hash(hash(seed + stream) + i)."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    with np.errstate(over="ignore"):
        key = _hash32(np.asarray([(int(seed) * 0x9E3779B1 + stream * 0x632BE5AB) & 0xFFFFFFFF], np.uint64))
        bits = _hash32((np.arange(n, dtype=np.uint64) + key.astype(np.uint64)) & np.uint64(0xFFFFFFFF))
    return ((bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)).reshape(shape)


def counter_normal(shape, seed) -> np.ndarray:
    """Standard normal floats by Box-Muller over two counter-based streams."""
    u1 = counter_uniform(shape, seed, 1)
    u2 = counter_uniform(shape, seed, 2)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u1))
    return (radius * np.cos(np.float32(2.0 * np.pi) * u2)).astype(np.float32)


def _np_random_normal(shape, stddev, seed):
    return (counter_normal(tuple(shape), int(seed)) * np.float32(stddev)).astype(np.float32)


def _np_random_uniform(shape, lo, hi, seed):
    u = counter_uniform(tuple(shape), int(seed))
    return (np.float32(lo) + (np.float32(hi) - np.float32(lo)) * u).astype(np.float32)


def _np_random_normal_like(x, stddev, seed):
    """Leaf k of a struct draws with seed `seed * 1000003 + k`."""
    counter = iter(range(10 ** 9))
    return leafwise(lambda a: (counter_normal(a.shape, int(seed) * 1000003 + next(counter))
                               * np.float32(stddev)).astype(a.dtype), x)


def _clients(value) -> list:
    return value if isinstance(value, list) else [value] * NUM_CLIENTS.get()


def _np_federated_value(v, placement):
    return [v] * NUM_CLIENTS.get() if str(placement) == "CLIENTS" else v


def _np_federated_eval(f, placement):
    return [f() for _ in range(NUM_CLIENTS.get())] if str(placement) == "CLIENTS" else f()


def _np_federated_broadcast(x):
    return [x] * NUM_CLIENTS.get()


def _np_federated_map(f, *xs, out_type=None):
    if out_type is not None and out_type.placement is Placement.SERVER:
        return f(*xs)
    columns = [_clients(x) for x in xs]
    return [f(*row) for row in zip(*columns)]


def _np_federated_apply(f, x):
    return f(x)


def _np_federated_zip(*xs, out_type=None):
    if out_type.placement is Placement.SERVER:
        return Struct(xs)
    return [Struct(row) for row in zip(*(_clients(x) for x in xs))]


def _zeros_of(t: Type):
    if isinstance(t, StructType):
        return Struct((_zeros_of(f) for f in t.types), t.names)
    return np.zeros([d or 0 for d in t.shape], np.dtype(t.dtype))


def _fold(values: list, combine):
    acc = values[0]
    for v in values[1:]:
        acc = combine(acc, v)
    return acc


def _np_federated_sum(x, out_type=None):
    values = _clients(x)
    if not values:
        return _zeros_of(out_type.member)
    return _fold(values, lambda a, b: leafwise(lambda p, q: _a(p + q), a, b))


def _np_federated_mean(x, weight=None, out_type=None):
    values = _clients(x)
    if not values:
        return leafwise(lambda z: np.full_like(z, np.nan), _zeros_of(out_type.member))
    if weight is None:
        total = _fold(values, lambda a, b: leafwise(lambda p, q: _a(p + q), a, b))
        return leafwise(lambda t: _a(t / t.dtype.type(len(values))), total)
    weights = _clients(weight)
    scaled = [leafwise(lambda p: _a(p * p.dtype.type(w)), v) for v, w in zip(values, weights)]
    total = _fold(scaled, lambda a, b: leafwise(lambda p, q: _a(p + q), a, b))
    wsum = float(np.sum(np.asarray(weights, np.float64)))
    return leafwise(lambda t: _a(t / t.dtype.type(wsum)), total)


def _extreme(fn, empty):
    def impl(x, out_type=None):
        values = _clients(x)
        if not values:
            return leafwise(lambda z: np.full_like(z, empty(z.dtype)), _zeros_of(out_type.member))
        return _fold(values, lambda a, b: leafwise(lambda p, q: _a(fn(p, q)), a, b))
    return impl


def _lowest(dtype):
    return np.iinfo(dtype).min if np.issubdtype(dtype, np.integer) else -np.inf


def _highest(dtype):
    return np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else np.inf


def _np_federated_aggregate(x, zero, accumulate, merge, report):
    """Two partial aggregates (first and second half of the clients), merged:
    so `merge` is part of the meaning, as in a real two-level aggregation."""
    values = _clients(x)
    half = len(values) // 2
    first = _np_reduce(values[:half], zero, accumulate)
    second = _np_reduce(values[half:], zero, accumulate)
    return report(merge(first, second))


def _np_federated_secure_sum(x, bitwidth, out_type=None):
    """The sum modulo 2**bitwidth (the group secure aggregation works in)."""
    modulus = 1 << int(bitwidth)

    def wrap(t):
        return _a(np.mod(t.astype(np.int64), modulus)).astype(t.dtype)

    total = _np_federated_sum([leafwise(lambda a: a.astype(np.int64), v) for v in _clients(x)],
                           out_type=FederatedType(_int64_like(out_type.member), Placement.SERVER, True))
    return leafwise(lambda t, z: _a(np.mod(t, modulus)).astype(z.dtype), total, _zeros_of(out_type.member))


# Robust aggregations (Yin et al. 2018: coordinate-wise median and trimmed mean; Blanchard
# et al. 2017: Krum; norm bounding as in TFF's clipping and zeroing factories). Each works on
# the clients' values stacked along a leading axis, leaf by leaf, so the runtime calls the same
# code on the arrays it already has; the norm of a client's value is over all its leaves.

def robust_aggregate(op: str, stacked: Any, attrs: dict) -> Any:
    """Robust aggregation `op` of stacked client values (a struct of [clients, ..] arrays)."""
    if op == "federated_median":
        return leafwise(lambda a: _a(np.median(a, axis=0)).astype(a.dtype), stacked)
    if op == "federated_trimmed_mean":
        return leafwise(lambda a: _trimmed_mean(a, int(attrs["percent"])), stacked)
    if op in ("federated_clipped_mean", "federated_zeroing_mean"):
        norms = _client_norms(stacked)
        bound = float(attrs["bound"])
        with np.errstate(all="ignore"):
            if op == "federated_clipped_mean":
                scale = np.where(norms > bound, bound / norms, 1.0)
            else:
                scale = np.where(norms > bound, 0.0, 1.0)
        return leafwise(lambda a: _a(np.mean(a * scale.reshape((-1,) + (1,) * (a.ndim - 1)).astype(a.dtype),
                                             axis=0, dtype=a.dtype)).astype(a.dtype), stacked)
    if op == "federated_krum":
        k = krum_index(stacked, int(attrs["byzantine"]))
        return leafwise(lambda a: _a(a[k]), stacked)
    raise ValueError(op)


def _trimmed_mean(a: np.ndarray, percent: int) -> np.ndarray:
    """Coordinate-wise: sort the clients' values, drop floor(n * percent / 100) at each end."""
    n = a.shape[0]
    cut = (n * percent) // 100
    kept = np.sort(a, axis=0)[cut:n - cut]
    return _a(np.mean(kept, axis=0, dtype=np.float64)).astype(a.dtype)


def _client_norms(stacked: Any) -> np.ndarray:
    leaves_ = _leaves(stacked)
    total = sum(np.sum(np.square(l.astype(np.float64)).reshape(l.shape[0], -1), axis=1) for l in leaves_)
    return np.sqrt(total)


def krum_index(stacked: Any, byzantine: int) -> int:
    """Krum: the client whose value has the smallest sum of squared distances to its
    n - f - 2 nearest other values (ties: the lowest index)."""
    flat = np.concatenate([l.astype(np.float64).reshape(l.shape[0], -1) for l in _leaves(stacked)], axis=1)
    n = flat.shape[0]
    if n - byzantine - 2 < 1:
        raise FedlangRuntimeError(f"federated_krum with byzantine={byzantine} needs at least {byzantine + 3} "
                                  f"clients, got {n}")
    squared = np.sum((flat[:, None, :] - flat[None, :, :]) ** 2, axis=2)
    closest = np.sort(squared + np.diag(np.full(n, np.inf)), axis=1)[:, :n - byzantine - 2]
    return int(np.argmin(np.sum(closest, axis=1)))


def _robust_impl(op: str):
    def impl(x, out_type=None, **attrs):
        values = _clients(x)
        if not values:
            return leafwise(lambda z: np.full_like(z, np.nan), _zeros_of(out_type.member))
        stacked = leafwise(lambda *leaves_: np.stack(leaves_), *values) if isinstance(values[0], Struct) \
            else np.stack([_a(v) for v in values])
        return robust_aggregate(op, stacked, attrs)
    return impl


def _int64_like(t: Type) -> Type:
    if isinstance(t, StructType):
        return StructType(tuple((n, _int64_like(f)) for n, f in t.fields))
    return TensorType("int64", t.shape)


# structural nodes ------------------------------------------------------------------------

def _np_const(value):
    return value


def _np_struct(*values, names=()):
    return Struct(values, names or None)


def _np_select(value, index, out_type=None):
    if isinstance(value, list):                  # a federated struct at CLIENTS: select per client
        return [v[index] for v in value]
    return value[index]                          # a struct (maybe of placed values), or a server value


def _np_index(x, i):
    k = int(i)
    if not 0 <= k < x.shape[0]:
        raise FedlangRuntimeError(f"index {k} is out of range for a first axis of size {x.shape[0]}")
    return _a(x[k])


def _np_call(f, *args):
    return f(*args)


def _np_cond(c, a, b):
    return a if bool(c) else b


def _no_type(*args, **kwargs) -> AVal:
    raise TypeRuleError("this node is built by the compiler, not called by a program", None)


# ---- internal primitives of reverse-mode autodiff (fedlang.ir.autodiff) ----------------
#
# Built only by the compiler (`callable=False`): a program cannot name them. Each
# has a type rule, a NumPy implementation and a derivative rule like any other
# entry, so a gradient is ordinary IR (and a gradient of a gradient works).
# `like` arguments give a runtime shape: a dimension may be unknown (`?`) in the type.

def _like_shape(x: AVal, like: AVal, what: str) -> AVal:
    t, lt = _tensor(strong(x), "x"), _tensor(strong(like), "like")
    return AVal(TensorType(t.dtype, lt.shape))


def _broadcast_to(x: AVal, like: AVal) -> AVal:
    return _like_shape(x, like, "broadcast_to")


def _unbroadcast(x: AVal, like: AVal) -> AVal:
    return _like_shape(x, like, "unbroadcast")


def _reshape_like(x: AVal, like: AVal) -> AVal:
    return _like_shape(x, like, "reshape_like")


def _expand_dims(x: AVal, axis: int) -> AVal:
    t = _tensor(strong(x), "x")
    a = _axis(t.rank + 1, axis)
    return AVal(TensorType(t.dtype, t.shape[:a] + (1,) + t.shape[a:]))


def _matrix_transpose(x: AVal) -> AVal:
    t = _tensor(strong(x), "x")
    if t.rank < 2:
        raise TypeRuleError("matrix_transpose needs a tensor of rank 2 or more", "x", code="E056")
    return AVal(TensorType(t.dtype, t.shape[:-2] + (t.shape[-1], t.shape[-2])))


def _one_hot_like(i: AVal, like: AVal) -> AVal:
    _require_dtype(_tensor(strong(i), "i"), INTEGER_DTYPES, "i", "one_hot_like")
    return AVal(_tensor(strong(like), "like"))


def _scatter_row(x: AVal, like: AVal, i: AVal) -> AVal:
    t = _tensor(strong(x), "x")
    return AVal(TensorType(t.dtype, _tensor(strong(like), "like").shape))


def _zip_seq(*seqs: AVal) -> AVal:
    return AVal(SequenceType(StructType(tuple((None, _sequence(s, f"seqs[{i}]", "zip_seq").element)
                                              for i, s in enumerate(seqs)))))


def _scan(seq: AVal, init: AVal, f: AVal, reverse: int) -> AVal:
    _sequence(seq, "seq", "scan")
    result = _function(f, "f").result
    if not (isinstance(result, StructType) and len(result.fields) == 2):
        raise TypeRuleError(f"the function of scan returns <carry, y>; this one returns {result}", "f")
    return AVal(StructType(((None, result.types[0]), (None, SequenceType(result.types[1])))))


def _np_broadcast_to(x, like):
    return np.array(np.broadcast_to(x, np.shape(like)))


def _np_unbroadcast(x, like):
    """Sum `x` down to the shape of `like` (undo NumPy broadcasting)."""
    x, shape = _a(x), np.shape(like)
    extra = x.ndim - len(shape)
    if extra > 0:
        x = np.sum(x, axis=tuple(range(extra)), dtype=x.dtype)
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    if axes:
        x = np.sum(x, axis=axes, keepdims=True, dtype=x.dtype)
    return _a(np.broadcast_to(x, shape)).copy()


def _np_reshape_like(x, like):
    return np.reshape(x, np.shape(like))


def _np_expand_dims(x, axis):
    return np.expand_dims(x, axis)


def _np_matrix_transpose(x):
    return np.swapaxes(x, -1, -2).copy()


def _np_one_hot_like(i, like):
    return (_a(i)[..., None] == np.arange(np.shape(like)[-1])).astype(_a(like).dtype)


def _np_scatter_row(x, like, i):
    out = np.zeros(np.shape(like), _a(x).dtype)
    out[int(i)] = x
    return out


def _np_zip_seq(*seqs):
    return [Struct(row) for row in zip(*seqs)]


def _np_scan(seq, init, f, reverse=0):
    """JAX's lax.scan: f(carry, x) -> <carry, y>; returns <final carry, ys> (ys in the
    order of `seq`, also when the loop runs from the last element to the first)."""
    carry, ys = init, [None] * len(seq)
    for i in (reversed(range(len(seq))) if reverse else range(len(seq))):
        out = f(carry, seq[i])
        carry, ys[i] = out[0], out[1]
    return Struct((carry, ys))


# ---- derivative rules (reverse mode, in IR ops) -------------------------------------------
#
# `vjp(emit, out, node, ct, wants) -> tuple` with one entry per input of `node`:
# the cotangent of that input, or None (zero; also for inputs with wants[i]
# False, which need none: integers, literals, values not depending on the
# differentiated parameter). `out` is the node's id (its value, for rules that
# use the result), `ct` the cotangent of the result: a node id, or for struct and
# function values a tuple with one entry (cotangent or None) per field or per
# captured value. `emit` is fedlang.ir.autodiff.Emitter: `emit(prim, *inputs,
# **statics)` adds a node (type from the type rule; an input is a node id, or a
# Python float: a weak literal) to the gradient function being built and
# returns its id.
# Rules see tensors only: autodiff splits leaf-wise struct arithmetic into one
# node per leaf first (so a scalar applied to every leaf gets the sum of its
# cotangents) and inlines calls of functions known at compile time.

def _when(wanted: bool, thunk):
    return thunk() if wanted else None


def _vjp_add(emit, out, node, ct, wants):
    x, y = node.inputs
    return (_when(wants[0], lambda: emit.unbroadcast(ct, x)), _when(wants[1], lambda: emit.unbroadcast(ct, y)))


def _vjp_sub(emit, out, node, ct, wants):
    x, y = node.inputs
    return (_when(wants[0], lambda: emit.unbroadcast(ct, x)),
            _when(wants[1], lambda: emit.unbroadcast(emit("neg", ct), y)))


def _vjp_mul(emit, out, node, ct, wants):
    x, y = node.inputs
    return (_when(wants[0], lambda: emit.unbroadcast(emit("mul", ct, y), x)),
            _when(wants[1], lambda: emit.unbroadcast(emit("mul", ct, x), y)))


def _vjp_div(emit, out, node, ct, wants):
    x, y = node.inputs
    return (_when(wants[0], lambda: emit.unbroadcast(emit("div", ct, y), x)),
            _when(wants[1], lambda: emit.unbroadcast(emit("neg", emit("div", emit("mul", ct, out), y)), y)))


def _vjp_mod(emit, out, node, ct, wants):
    # x % y = x - floor(x / y) * y, and floor(x / y) = (x - x % y) / y
    x, y = node.inputs
    return (_when(wants[0], lambda: emit.unbroadcast(ct, x)),
            _when(wants[1], lambda: emit.unbroadcast(
                emit("neg", emit("mul", ct, emit("div", emit("sub", x, out), y))), y)))


def _vjp_pow(emit, out, node, ct, wants):
    x, y = node.inputs

    def dx():
        return emit.unbroadcast(emit("mul", ct, emit("mul", y, emit("pow", x, emit("sub", y, 1.0)))), x)

    def dy():           # x ** y * log(x), taken as 0 where x == 0 (JAX's convention)
        literal = emit.literal(x)
        if literal is not None:
            log_x = float(np.log(literal)) if literal > 0 else 0.0
        else:
            log_x = emit("log", emit("where", emit("eq", x, 0.0), 1.0, x))
        return emit.unbroadcast(emit("mul", ct, emit("mul", out, log_x)), y)

    return _when(wants[0], dx), _when(wants[1], dy)


def _vjp_neg(emit, out, node, ct, wants):
    return (emit("neg", ct),)


def _vjp_matmul(emit, out, node, ct, wants):
    a, b = node.inputs
    ra, rb, ro = emit.rank(a), emit.rank(b), emit.rank(out)

    def t(v):
        return emit("matrix_transpose", v)

    if ra == 1 and rb == 1:                      # <k>.<k> -> scalar
        return (_when(wants[0], lambda: emit("mul", ct, b)), _when(wants[1], lambda: emit("mul", ct, a)))
    if ra == 1:                                  # [k] @ [..,k,n] -> [..,n]: a is a row [1,k]
        row_ct = lambda: emit("expand_dims", ct, axis=ro - 1)                      # noqa: E731
        return (_when(wants[0], lambda: emit.unbroadcast(emit("matmul", row_ct(), t(b)), a)),
                _when(wants[1], lambda: emit.unbroadcast(
                    emit("matmul", emit("expand_dims", a, axis=1), row_ct()), b)))
    if rb == 1:                                  # [..,m,k] @ [k] -> [..,m]: b is a column [k,1]
        col_ct = lambda: emit("expand_dims", ct, axis=ro)                          # noqa: E731
        return (_when(wants[0], lambda: emit.unbroadcast(
                    emit("matmul", col_ct(), emit("expand_dims", b, axis=0)), a)),
                _when(wants[1], lambda: emit.unbroadcast(
                    emit("sum", emit("matmul", t(a), col_ct()), axis=-1), b)))
    return (_when(wants[0], lambda: emit.unbroadcast(emit("matmul", ct, t(b)), a)),
            _when(wants[1], lambda: emit.unbroadcast(emit("matmul", t(a), ct), b)))


def _vjp_relu(emit, out, node, ct, wants):
    return (emit("where", emit("gt", node.inputs[0], 0.0), ct, 0.0),)


def _vjp_sigmoid(emit, out, node, ct, wants):
    return (emit("mul", ct, emit("mul", out, emit("sub", 1.0, out))),)


def _vjp_tanh(emit, out, node, ct, wants):
    return (emit("mul", ct, emit("sub", 1.0, emit("mul", out, out))),)


def _vjp_exp(emit, out, node, ct, wants):
    return (emit("mul", ct, out),)


def _vjp_log(emit, out, node, ct, wants):
    return (emit("div", ct, node.inputs[0]),)


def _vjp_sqrt(emit, out, node, ct, wants):
    return (emit("div", ct, emit("mul", 2.0, out)),)


def _vjp_abs(emit, out, node, ct, wants):
    x = node.inputs[0]
    return (emit("where", emit("gt", x, 0.0), ct, emit("where", emit("lt", x, 0.0), emit("neg", ct), 0.0)),)


def _vjp_square(emit, out, node, ct, wants):
    return (emit("mul", ct, emit("mul", 2.0, node.inputs[0])),)


def _vjp_extremum(wins: str):
    """maximum (wins="gt") and minimum ("lt"): the cotangent goes to the winner; ties share it."""
    def rule(emit, out, node, ct, wants):
        x, y = node.inputs
        tie = lambda: emit("where", emit("eq", x, y), emit("mul", ct, 0.5), 0.0)     # noqa: E731
        return (_when(wants[0], lambda: emit.unbroadcast(emit("where", emit(wins, x, y), ct, tie()), x)),
                _when(wants[1], lambda: emit.unbroadcast(emit("where", emit(wins, y, x), ct, tie()), y)))
    return rule


def _vjp_softmax(emit, out, node, ct, wants):
    a = node.attr("axis") % emit.rank(out)
    inner = emit("expand_dims", emit("sum", emit("mul", ct, out), axis=a), axis=a)
    return (emit("mul", out, emit("sub", ct, inner)),)


def _vjp_log_softmax(emit, out, node, ct, wants):
    a = node.attr("axis") % emit.rank(out)
    return (emit("sub", ct, emit("mul", emit("exp", out), emit("expand_dims", emit("sum", ct, axis=a), axis=a))),)


def _vjp_sparse_xent(emit, out, node, ct, wants):
    labels, logits = node.inputs
    diff = emit("sub", emit("softmax", logits, axis=-1), emit("one_hot_like", labels, logits))
    return None, emit("mul", diff, emit("expand_dims", ct, axis=emit.rank(logits) - 1))


def _spread(emit, ct, x, axis):
    """The cotangent of a reduction over `axis` (None: all), broadcast back to x's shape."""
    if axis is not None:
        ct = emit("expand_dims", ct, axis=axis % emit.rank(x))
    return emit("broadcast_to", ct, x)


def _vjp_sum(emit, out, node, ct, wants):
    x = node.inputs[0]
    return (_spread(emit, ct, x, node.attr("axis")),)


def _vjp_mean(emit, out, node, ct, wants):
    x, axis = node.inputs[0], node.attr("axis")
    shape = emit.type(x).shape
    counted = shape if axis is None else (shape[axis % len(shape)],)
    if all(d is not None for d in counted):
        n = int(np.prod(counted, dtype=np.int64))
        scale = 1.0 / n if n else 0.0
    else:           # unknown dimensions: size(result) / size(x), at run time
        dtype = emit.type(x).dtype
        kept = 1.0 if axis is None else emit("cast", emit("size", out), dtype=dtype)
        scale = emit("div", kept, emit("cast", emit("size", x), dtype=dtype))
    return (emit("mul", _spread(emit, ct, x, axis), scale),)


def _vjp_extreme_reduction(emit, out, node, ct, wants):
    """max and min: the cotangent goes to the extreme elements, shared equally among ties."""
    x, axis = node.inputs[0], node.attr("axis")
    a = None if axis is None else axis % emit.rank(x)
    peak = out if a is None else emit("expand_dims", out, axis=a)
    mask = emit("cast", emit("eq", x, peak), dtype=emit.type(x).dtype)
    share = emit("div", ct, emit("sum", mask, axis=a))
    return (emit("mul", mask, share if a is None else emit("expand_dims", share, axis=a)),)


def _vjp_cast(emit, out, node, ct, wants):
    return (emit("cast", ct, dtype=emit.type(node.inputs[0]).dtype),)


def _vjp_reshape(emit, out, node, ct, wants):
    return (emit("reshape_like", ct, node.inputs[0]),)


def _vjp_zero(emit, out, node, ct, wants):
    """The result does not change with the (float) inputs: zeros_like, ones_like, ..."""
    return (None,) * len(node.inputs)


def _vjp_where(emit, out, node, ct, wants):
    c, a, b = node.inputs
    return (None, _when(wants[1], lambda: emit.unbroadcast(emit("where", c, ct, 0.0), a)),
            _when(wants[2], lambda: emit.unbroadcast(emit("where", c, 0.0, ct), b)))


def _vjp_clip(emit, out, node, ct, wants):
    # NumPy's clip is minimum(maximum(x, lo), hi): above hi (or lo > hi) the result is hi
    x, lo, hi = node.inputs
    above = emit("logical_or", emit("gt", x, hi), emit("gt", lo, hi))
    below = emit("logical_and", emit("lt", x, lo), emit("logical_not", above))
    return (_when(wants[0], lambda: emit("where", emit("logical_or", above, below), 0.0, ct)),
            _when(wants[1], lambda: emit.unbroadcast(emit("where", below, ct, 0.0), lo)),
            _when(wants[2], lambda: emit.unbroadcast(emit("where", above, ct, 0.0), hi)))


def _vjp_global_norm(emit, out, node, ct, wants):
    x = node.inputs[0]                           # a tensor or a struct: x * (ct / norm), leaf-wise
    return (emit("mul", x, emit("div", ct, out)),)


def _vjp_random_normal(emit, out, node, ct, wants):
    # random_normal(shape, s, seed) = s * N: d/ds = N = random_normal(shape, 1, seed)
    stddev, seed = node.inputs
    noise = emit("random_normal", 1.0, seed, shape=node.attr("shape"))
    return _when(wants[0], lambda: emit("cast", emit("sum", emit("mul", ct, noise)),
                                        dtype=emit.type(stddev).dtype)), None


def _vjp_random_uniform(emit, out, node, ct, wants):
    # lo + (hi - lo) * U: d/dlo = 1 - U, d/dhi = U
    lo, hi, seed = node.inputs
    u = emit("random_uniform", 0.0, 1.0, seed, shape=node.attr("shape"))
    return (_when(wants[0], lambda: emit("cast", emit("sum", emit("mul", ct, emit("sub", 1.0, u))),
                                         dtype=emit.type(lo).dtype)),
            _when(wants[1], lambda: emit("cast", emit("sum", emit("mul", ct, u)), dtype=emit.type(hi).dtype)),
            None)


def _vjp_random_normal_like(emit, out, node, ct, wants):
    x, stddev, seed = node.inputs                # the values of x do not matter, only its shape
    if not wants[1]:
        return None, None, None
    dtype = emit.type(stddev).dtype
    noise = emit.leaves(emit("random_normal_like", x, 1.0, seed))
    cts = emit.leaves(emit.materialize(ct, out))
    total = None
    for c, n in zip(cts, noise):
        part = emit("cast", emit("sum", emit("mul", c, n)), dtype=dtype)
        total = part if total is None else emit("add", total, part)
    return None, total, None


def _vjp_index(emit, out, node, ct, wants):
    x, i = node.inputs
    return emit("scatter_row", ct, x, i), None


def _vjp_struct(emit, out, node, ct, wants):
    if isinstance(ct, tuple):
        return tuple(c if w else None for c, w in zip(ct, wants))
    return tuple(emit.select(ct, k) if w else None for k, w in enumerate(wants))


def _vjp_select(emit, out, node, ct, wants):
    index = node.attr("index")           # (placed values are never differentiated)
    return (tuple(ct if k == index else None for k in range(len(emit.type(node.inputs[0]).fields))),)


def _vjp_closure(emit, out, node, ct, wants):
    # the cotangent of a function value: one entry per captured value
    return tuple(c if w else None for c, w in zip(ct, wants))


def _vjp_cond(emit, out, node, ct, wants):
    c, a, b = node.inputs
    full = emit.materialize(ct, out)
    t = emit.type(out)
    return (None, _when(wants[1], lambda: emit.typed("cond", (c, full, emit.zeros(a)), t)),
            _when(wants[2], lambda: emit.typed("cond", (c, emit.zeros(b), full), t)))


def _vjp_call(emit, out, node, ct, wants):
    return emit.call_vjp(out, node, ct, wants)


def _vjp_reduce(emit, out, node, ct, wants):
    return emit.loop_vjp("reduce", out, node, ct, wants)


def _vjp_scan(emit, out, node, ct, wants):
    return emit.loop_vjp("scan", out, node, ct, wants)


def _vjp_map(emit, out, node, ct, wants):
    return emit.loop_vjp("map", out, node, ct, wants)


def _vjp_broadcast_to(emit, out, node, ct, wants):
    return emit.unbroadcast(ct, node.inputs[0]), None


def _vjp_unbroadcast(emit, out, node, ct, wants):
    return emit("broadcast_to", ct, node.inputs[0]), None


def _vjp_reshape_like(emit, out, node, ct, wants):
    return emit("reshape_like", ct, node.inputs[0]), None


def _vjp_expand_dims(emit, out, node, ct, wants):
    return (emit("sum", ct, axis=node.attr("axis")),)


def _vjp_matrix_transpose(emit, out, node, ct, wants):
    return (emit("matrix_transpose", ct),)


def _vjp_scatter_row(emit, out, node, ct, wants):
    x, like, i = node.inputs
    return emit.typed("index", (ct, i), emit.type(x)), None, None


def _vjp_zip_seq(emit, out, node, ct, wants):
    return tuple(_when(w, lambda k=k: emit.map_select(ct, k)) for k, w in enumerate(wants))


# ---- internal primitives of vectorization (fedlang.ir.batching) ------------------------
#
# Built only by the vectorizer (`callable=False`) where a builtin has no parameter for
# what a batching rule needs: leading axes to `keep` as they are, an axis to insert or
# remove, random numbers for many seeds at once, a row picked per client, the valid rows
# of a padded batch. Each has a type rule, a NumPy implementation, a derivative rule and
# a batching rule like every entry, so a vectorized function is ordinary IR (it can be
# vectorized again, or differentiated).

def _first_tensor(t: Type) -> TensorType | None:
    """The first tensor of a value: itself, a struct's first leaf, a sequence element's."""
    if isinstance(t, TensorType):
        return t
    if isinstance(t, SequenceType):
        return _first_tensor(t.element)
    if isinstance(t, StructType):
        for f in t.types:
            found = _first_tensor(f)
            if found is not None:
                return found
    return None


def _broadcast_leading(x: AVal, like: AVal, axis: int, like_axis: int) -> AVal:
    t = _tensor(strong(x), "x")
    lt = _first_tensor(like.type)
    if lt is None or not 0 <= like_axis < lt.rank:
        raise TypeRuleError(f"broadcast_leading takes the size of axis {like_axis} of a tensor; "
                            f"found {describe(like.type)}", "like", code="E049")
    if not 0 <= axis <= t.rank:
        raise TypeRuleError(f"axis {axis} is out of range for inserting into a tensor of rank {t.rank}", "axis",
                            code="E049")
    return AVal(TensorType(t.dtype, t.shape[:axis] + (lt.shape[like_axis],) + t.shape[axis:]))


def _reshape_keep(x: AVal, shape: tuple[int, ...], keep: int) -> AVal:
    t = _tensor(strong(x), "x")
    if not 0 <= keep <= t.rank:
        raise TypeRuleError(f"reshape_keep keeps {keep} axes of a tensor of rank {t.rank}", "keep", code="E049")
    inner = _reshape(AVal(TensorType(t.dtype, t.shape[keep:])), shape)
    return AVal(TensorType(t.dtype, t.shape[:keep] + inner.type.shape))


def _shape_size(x: AVal, start: int, stop: int | None) -> AVal:
    t = _tensor(strong(x), "x")
    if not (0 <= start <= t.rank and (stop is None or start <= stop <= t.rank)):
        raise TypeRuleError(f"axes {start}:{stop} are out of range for a tensor of rank {t.rank}", "start",
                            code="E049")
    return AVal(TensorType("int32"))


def _squeeze(x: AVal, axis: int) -> AVal:
    t = _tensor(strong(x), "x")
    if t.rank == 0:
        raise TypeRuleError("squeeze needs a tensor of rank 1 or more", "x", code="E049")
    a = _axis(t.rank, axis)
    if t.shape[a] not in (1, None):
        raise TypeRuleError(f"squeeze removes an axis of size 1; axis {axis} of {t} has size {t.shape[a]}", "axis",
                            code="E056")
    return AVal(TensorType(t.dtype, t.shape[:a] + t.shape[a + 1:]))


def _counter_noise(seed: AVal, like: AVal, kind: str, salt: int | None, keep: int) -> AVal:
    st, lt = _tensor(strong(seed), "seed"), _tensor(strong(like), "like")
    _require_dtype(st, INTEGER_DTYPES, "seed", "the seed of counter_noise")
    if kind not in ("normal", "uniform"):
        raise TypeRuleError(f"counter_noise draws normal or uniform numbers, not {kind!r}", "kind")
    if not 0 <= keep <= lt.rank:
        raise TypeRuleError(f"counter_noise keeps {keep} axes of a tensor of rank {lt.rank}", "keep", code="E049")
    return AVal(TensorType("float32", st.shape + lt.shape[keep:]))


def _gather_batch(x: TensorType, i: TensorType, keep: int, what: str) -> tuple:
    """The batch shape of index_along and scatter_along: x's `keep` leading axes with i's shape."""
    _require_dtype(i, INTEGER_DTYPES, "i", f"the index of {what}")
    if not 0 <= keep < x.rank:
        raise TypeRuleError(f"{what} indexes axis {keep} of a tensor of rank {x.rank}", "keep", code="E049")
    batch = broadcast_shapes(x.shape[:keep], i.shape)
    if batch is None:
        raise TypeRuleError(f"the index {i} does not broadcast with the leading axes of {x}", "i", code="E044")
    return batch


def _index_along(x: AVal, i: AVal, keep: int) -> AVal:
    t, it = _tensor(strong(x), "x"), _tensor(strong(i), "i")
    batch = _gather_batch(t, it, keep, "index_along")
    return AVal(TensorType(t.dtype, batch + t.shape[keep + 1:]))


def _scatter_along(x: AVal, like: AVal, i: AVal, keep: int) -> AVal:
    t, lt, it = _tensor(strong(x), "x"), _tensor(strong(like), "like"), _tensor(strong(i), "i")
    _gather_batch(lt, it, keep, "scatter_along")
    return AVal(TensorType(t.dtype, lt.shape))


def _row_mask(counts: AVal, like: AVal, axis: int) -> AVal:
    ct, lt = _tensor(strong(counts), "counts"), _tensor(strong(like), "like")
    _require_dtype(ct, INTEGER_DTYPES, "counts", "the counts of row_mask")
    if not ct.rank <= axis < lt.rank:
        raise TypeRuleError(f"row_mask marks axis {axis} of {lt} after the {ct.rank} axes of the counts", "axis",
                            code="E049")
    return AVal(TensorType("bool", ct.shape + tuple(lt.shape[i] if i == axis else 1
                                                    for i in range(ct.rank, lt.rank))))


def _first_leaf_value(value) -> np.ndarray:
    if isinstance(value, Struct):
        return _first_leaf_value(value.values[0])
    if isinstance(value, list):
        if not value:
            raise FedlangRuntimeError("cannot tell the number of clients from an empty sequence "
                                      "(vectorize with ragged=True: per-client lengths carry it)")
        return _first_leaf_value(value[0])
    return _a(value)


def _np_broadcast_leading(x, like, axis=0, like_axis=0):
    x = _a(x)
    size = _first_leaf_value(like).shape[like_axis]
    return np.broadcast_to(np.expand_dims(x, axis), x.shape[:axis] + (size,) + x.shape[axis:]).copy()


def _np_reshape_keep(x, shape, keep):
    x = _a(x)
    size = int(np.prod(x.shape[keep:], dtype=np.int64))
    shape = tuple(shape)
    if -1 in shape:
        fixed = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        inferred = size // fixed if fixed else 0
        shape = tuple(inferred if d == -1 else d for d in shape)
    return np.reshape(x, x.shape[:keep] + shape)


def _np_shape_size(x, start=0, stop=None):
    return np.asarray(int(np.prod(np.shape(x)[start:stop], dtype=np.int64)), np.int32)


def _np_squeeze(x, axis):
    return np.squeeze(_a(x), axis)


_MASK32 = 0xFFFFFFFF


def _counter_uniform_many(seeds: np.ndarray, shape: tuple, stream: int, salt: int | None) -> np.ndarray:
    """counter_uniform(shape, s, stream) for every seed s of `seeds` (stacked in front);
    with `salt` k the seed is s * 1000003 + k (random_normal_like's k-th leaf). Seeds
    enter modulo 2**32, as they do in counter_uniform."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    mask = np.uint64(_MASK32)
    with np.errstate(over="ignore"):
        s = seeds.astype(np.int64).astype(np.uint64) & mask
        if salt is not None:
            s = (s * np.uint64(1000003) + np.uint64(salt)) & mask
        key = _hash32((s * np.uint64(0x9E3779B1) + np.uint64(stream * 0x632BE5AB)) & mask)
        bits = _hash32((np.arange(n, dtype=np.uint64) + key.astype(np.uint64)[..., None]) & mask)
    return ((bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)).reshape(seeds.shape + tuple(shape))


def _np_counter_noise(seed, like, kind, salt=None, keep=0):
    """counter_normal / counter_uniform of like's trailing shape, one draw per seed."""
    seeds, shape = _a(seed), tuple(np.shape(like)[keep:])
    if kind == "uniform":
        return _counter_uniform_many(seeds, shape, 0, salt)
    u1 = _counter_uniform_many(seeds, shape, 1, salt)
    u2 = _counter_uniform_many(seeds, shape, 2, salt)
    radius = np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u1))
    return (radius * np.cos(np.float32(2.0 * np.pi) * u2)).astype(np.float32)


def _gather_indices(batch: tuple, lead_shape: tuple, i: np.ndarray, size: int) -> tuple:
    """Index arrays (broadcast to `batch`) into a tensor whose leading axes are `lead_shape`
    (right-aligned in `batch`, size-1 axes broadcast) and whose next axis (of `size`) `i` picks."""
    if i.size and (int(i.min()) < 0 or int(i.max()) >= size):
        bad = int(i.min()) if int(i.min()) < 0 else int(i.max())
        raise FedlangRuntimeError(f"index {bad} is out of range for a first axis of size {size}")
    offset = len(batch) - len(lead_shape)
    index = []
    for j, d in enumerate(lead_shape):
        axis_shape = [1] * len(batch)
        axis_shape[offset + j] = d
        grid = np.arange(d).reshape(axis_shape) if d != 1 else np.zeros([1] * len(batch), np.int64)
        index.append(np.broadcast_to(grid, batch))
    return tuple(index) + (np.broadcast_to(i, batch),)


def _np_index_along(x, i, keep):
    """x[b.., i[b..]] for every b of the leading axes (x's first `keep`, broadcast with i's)."""
    x, i = _a(x), _a(i)
    batch = tuple(np.broadcast_shapes(x.shape[:keep], i.shape))
    return np.array(x[_gather_indices(batch, x.shape[:keep], i, x.shape[keep])])


def _np_scatter_along(x, like, i, keep):
    """Zeros shaped like `like`, with x[b..] added at row i[b..] of b's leading axes: the
    cotangent of index_along (rows picked twice get the sum)."""
    x, i, shape = _a(x), _a(i), np.shape(like)
    batch = tuple(np.broadcast_shapes(shape[:keep], i.shape))
    out = np.zeros(shape, x.dtype)
    np.add.at(out, _gather_indices(batch, shape[:keep], i, shape[keep]),
              np.broadcast_to(x, batch + tuple(shape[keep + 1:])))
    return out


def _np_row_mask(counts, like, axis):
    """True where the index along `axis` is below the count of its leading index."""
    counts, shape = _a(counts), np.shape(like)
    k, rank = counts.ndim, len(shape)
    iota = np.arange(shape[axis]).reshape((1,) * k + tuple(shape[i] if i == axis else 1 for i in range(k, rank)))
    return iota < counts.reshape(counts.shape + (1,) * (rank - k))


def _vjp_broadcast_leading(emit, out, node, ct, wants):
    return emit("sum", ct, axis=node.attr("axis")), None


def _vjp_reshape_keep(emit, out, node, ct, wants):
    return (emit("reshape_like", ct, node.inputs[0]),)


def _vjp_squeeze(emit, out, node, ct, wants):
    return (emit("expand_dims", ct, axis=node.attr("axis")),)


def _vjp_index_along(emit, out, node, ct, wants):
    x, i = node.inputs
    return emit("scatter_along", ct, x, i, keep=node.attr("keep")), None


def _vjp_scatter_along(emit, out, node, ct, wants):
    x, like, i = node.inputs
    return _when(wants[0], lambda: emit("index_along", ct, i, keep=node.attr("keep"))), None, None


# ---- batching rules (vectorizing over clients, in IR ops) ----------------------------------
#
# `batch(emit, node, inputs, batched) -> node id | (node id, state)` rewrites one node of
# a function being vectorized (fedlang.ir.batching.vectorize) when some of its inputs are
# batched: they carry a leading client axis C, one slice per client. `node` is the
# original node (its static attributes, its unbatched type); `inputs` are the ids of its
# inputs in the function being built; `batched[i]` says whether input i is batched: a
# bool for a tensor, and for a struct, a sequence or a function value its batching
# state (fedlang.ir.batching: a tuple with one state per struct field, a SeqBatch for a
# sequence: batched elements and maybe per-client lengths). An unbatched input is the
# same for every client.
# The rule returns a node that computes, for every client c, what `node` computes from
# client c's inputs: stacked along a leading axis when the rule returns a plain id,
# else batched as the returned state says (False: the same for every client, so not
# stacked: size, count without lengths, noise that depends on shapes only).
# `emit` is fedlang.ir.batching.BatchEmitter, an autodiff Emitter (`emit(prim, *inputs,
# **statics)` adds a node typed by the type rule; a Python float is a weak literal) with
# services for the rules: `same(node, inputs, **statics)` (the node's op again, on new
# inputs), `unbatched_rank`, `align(x, batched, rank)` (axes after the client axis, so
# that NumPy's right-aligned broadcasting pairs client with client: a batched scalar [C]
# meeting an unbatched [n] becomes [C,1]), `broadcast(x)` (give an unbatched value the
# client axis), `leafwise` (split struct operands, one node per leaf), `float32`, and the
# structural and loop services (`bound`, `closure`, `call`, `cond`, `loop`, ...).

def _shifted(axis: int, rank: int) -> int:
    """Axis `axis` of an unbatched tensor of rank `rank`, as an axis of its batched form."""
    return axis % rank + 1


def _batch_elementwise(emit, node, inputs, batched):
    """Broadcasting ops (operators, maximum, minimum, where, unary ops), leaf-wise on structs."""
    return emit.leafwise(node, inputs, batched, _batch_aligned)


def _batch_aligned(emit, node, inputs, batched):
    rank = max(emit.unbatched_rank(x, b) for x, b in zip(inputs, batched))
    return emit.same(node, [emit.align(x, b, rank) for x, b in zip(inputs, batched)])


def _batch_same(emit, node, inputs, batched):
    """The op maps each slice along a new leading axis to its result (one_hot, matrix_transpose)."""
    return emit.same(node, inputs)


def _batch_all(emit, node, inputs, batched):
    """Operands that share their leading axes (labels and logits): batch every operand."""
    return emit.same(node, [x if b else emit.broadcast(x) for x, b in zip(inputs, batched)])


def _batch_like(emit, node, inputs, batched):
    """zeros_like, ones_like: leaf by leaf, batched where the input is."""
    return emit.same(node, inputs), batched[0]


def _batch_clip(emit, node, inputs, batched):
    return emit.leafwise(node, inputs, batched, _batch_clip_tensor)


def _batch_clip_tensor(emit, node, inputs, batched):
    x, lo, hi = inputs
    if not (batched[1] or batched[2]):
        return emit.same(node, inputs)
    # per-client bounds: clip(x, lo, hi) = minimum(maximum(x, lo), hi), NumPy's definition
    rank = emit.unbatched_rank(x, batched[0])
    lo, hi = emit.align(lo, batched[1], rank), emit.align(hi, batched[2], rank)
    return emit("minimum", emit("maximum", x, lo), hi)


def _batch_matmul(emit, node, inputs, batched):
    # vectors become a row [1,k] (a) and a column [k,1] (b); the batched operands get their
    # matrix stacks aligned after the client axis; the added row and column go at the end
    (a, b), (ba, bb) = inputs, batched
    ra, rb = emit.unbatched_rank(a, ba), emit.unbatched_rank(b, bb)
    if ra == 1:
        a = emit("expand_dims", a, axis=-2)
    if rb == 1:
        b = emit("expand_dims", b, axis=-1)
    stack = max(ra, rb, 2)
    out = emit("matmul", emit.align(a, ba, stack), emit.align(b, bb, stack))
    if rb == 1:
        out = emit("squeeze", out, axis=-1)
    if ra == 1:
        out = emit("squeeze", out, axis=-1 if rb == 1 else -2)
    return out


def _batch_axis(emit, node, inputs, batched):
    """Ops along one axis (softmax, argmax, squeeze, a reduction over an axis): shift it."""
    (x,) = inputs
    return emit.same(node, [x], axis=_shifted(node.attr("axis"), emit.unbatched_rank(x, True)))


def _batch_reduction(emit, node, inputs, batched):
    """sum, mean, max, min: axis=None reduces every axis but the client axis."""
    if node.attr("axis") is not None:
        return _batch_axis(emit, node, inputs, batched)
    return emit.same(node, [emit("reshape_keep", inputs[0], shape=(-1,), keep=1)], axis=1)


def _batch_expand_dims(emit, node, inputs, batched):
    (x,) = inputs
    return emit.same(node, [x], axis=_shifted(node.attr("axis"), emit.unbatched_rank(x, True) + 1))


def _batch_reshape(emit, node, inputs, batched):
    return emit("reshape_keep", inputs[0], shape=node.attr("shape"), keep=1)


def _batch_reshape_keep(emit, node, inputs, batched):
    return emit.same(node, inputs, keep=node.attr("keep") + 1)


def _batch_size(emit, node, inputs, batched):
    # every client's slice has the same shape: one size for all
    return emit("shape_size", inputs[0], start=1, stop=None), False


def _batch_shape_size(emit, node, inputs, batched):
    stop = node.attr("stop")
    return emit.same(node, inputs, start=node.attr("start") + 1, stop=None if stop is None else stop + 1), False


def _batch_global_norm(emit, node, inputs, batched):
    # sqrt(sum over leaves of sum(square(leaf))), leaves added in order as the impl does
    total = None
    for leaf, b in emit.leaves_with_states(inputs[0], batched[0]):
        if b:
            part = emit("sum", emit("square", emit("reshape_keep", leaf, shape=(-1,), keep=1)), axis=1)
        else:
            part = emit("sum", emit("square", leaf))
        total = part if total is None else emit("add", total, part)
    return emit("sqrt", total)


def _batch_random_normal(emit, node, inputs, batched):
    # random_normal(shape, s, seed) = N(seed) * float32(s); N drawn per client seed
    (stddev, seed), (b_stddev, _) = inputs, batched
    shape = node.attr("shape")
    noise = emit("counter_noise", seed, emit("zeros", shape=shape), kind="normal", salt=None, keep=0)
    return emit("mul", noise, emit.align(emit.float32(stddev), b_stddev, len(shape)))


def _batch_random_uniform(emit, node, inputs, batched):
    # float32(lo) + (float32(hi) - float32(lo)) * U(seed)
    (lo, hi, seed), (b_lo, b_hi, _) = inputs, batched
    shape = node.attr("shape")
    u = emit("counter_noise", seed, emit("zeros", shape=shape), kind="uniform", salt=None, keep=0)
    lo = emit.align(emit.float32(lo), b_lo, len(shape))
    hi = emit.align(emit.float32(hi), b_hi, len(shape))
    return emit("add", lo, emit("mul", emit("sub", hi, lo), u))


def _batch_random_normal_like(emit, node, inputs, batched):
    # leaf k: N(seed * 1000003 + k) of the leaf's shape * float32(s), in the leaf's dtype;
    # the values of x do not matter, so a leaf is batched only where s or the seed is
    (x, stddev, seed), (b_x, b_stddev, b_seed) = inputs, batched
    leaves_ = []
    for k, (leaf, b_leaf) in enumerate(emit.leaves_with_states(x, b_x)):
        noise = emit("counter_noise", seed, leaf, kind="normal", salt=k, keep=1 if b_leaf else 0)
        value = emit("mul", noise, emit.align(emit.float32(stddev), b_stddev, emit.unbatched_rank(leaf, b_leaf)))
        dtype = emit.type(leaf).dtype
        leaves_.append((value if dtype == "float32" else emit("cast", value, dtype=dtype), b_stddev or b_seed))
    return emit.rebuild(x, leaves_)


def _batch_broadcast_to(emit, node, inputs, batched):
    (x, like), (b_x, b_like) = inputs, batched
    if not b_like:               # each client's result has like's shape: give it the client axis
        like = emit.broadcast(like)
    return emit.same(node, [emit.align(x, b_x, emit.unbatched_rank(like, True)), like])


def _batch_unbroadcast(emit, node, inputs, batched):
    (x, like), (b_x, b_like) = inputs, batched
    x = x if b_x else emit.broadcast(x)
    like = like if b_like else emit.broadcast(like)
    # sum the axes NumPy broadcasting added (right after the client axis), then the rest
    rank, target = emit.unbatched_rank(x, True), emit.unbatched_rank(like, True)
    for _ in range(rank - target):
        x = emit("sum", x, axis=1)
    return emit.same(node, [emit.align(x, True, target), like])


def _batch_reshape_like(emit, node, inputs, batched):
    (x, like), (b_x, b_like) = inputs, batched
    shape = emit.type(like).shape
    if b_x and not b_like and None not in shape:
        return emit("reshape_keep", x, shape=shape, keep=1)
    return emit.same(node, [x if b_x else emit.broadcast(x), like if b_like else emit.broadcast(like)])


def _batch_one_hot_like(emit, node, inputs, batched):
    (i, like), (b_i, b_like) = inputs, batched
    t = emit.type(like)
    if b_i and not b_like and t.shape[-1] is not None:
        out = emit("one_hot", i, depth=t.shape[-1])
        return out if t.dtype == "float32" else emit("cast", out, dtype=t.dtype)
    return _batch_all(emit, node, inputs, batched)


def _batch_index(emit, node, inputs, batched):
    """x[i] picks, per client, a row of the client's x with the client's i."""
    return _index_batched(emit, *inputs, *batched, keep=0)


def _batch_index_along(emit, node, inputs, batched):
    return _index_batched(emit, *inputs, *batched, keep=node.attr("keep"))


def _index_batched(emit, x, i, b_x, b_i, keep):
    rank = max(keep, emit.unbatched_rank(i, b_i))      # the result's leading (batch) axes, per client
    if b_x:
        x = emit.align(x, True, emit.unbatched_rank(x, True) + rank - keep)
        keep = rank + 1
    return emit("index_along", x, emit.align(i, b_i, rank), keep=keep)


def _batch_scatter_row(emit, node, inputs, batched):
    return _scatter_batched(emit, *inputs, *batched, keep=0)


def _batch_scatter_along(emit, node, inputs, batched):
    return _scatter_batched(emit, *inputs, *batched, keep=node.attr("keep"))


def _scatter_batched(emit, x, like, i, b_x, b_like, b_i, keep):
    # like lends its shape; every client's result has it, so like gets the client axis;
    # axes i has beyond like's `keep` are summed into size-1 axes of like, removed after
    like = like if b_like else emit.broadcast(like)
    rank = max(keep, emit.unbatched_rank(i, b_i))
    row_rank = emit.unbatched_rank(like, True) - keep - 1
    padded = emit.align(like, True, emit.unbatched_rank(like, True) + rank - keep)
    out = emit("scatter_along", emit.align(x, b_x, rank + row_rank), padded, emit.align(i, b_i, rank),
               keep=rank + 1)
    for _ in range(rank - keep):
        out = emit("squeeze", out, axis=1)
    return out


def _batch_broadcast_leading(emit, node, inputs, batched):
    # the size comes from like's slice when like is batched: the same for every client
    (x, like), (b_x, b_like) = inputs, batched
    out = emit.same(node, inputs, axis=node.attr("axis") + (1 if b_x else 0),
                    like_axis=node.attr("like_axis") + (1 if emit.is_batched(b_like) else 0))
    return out if b_x else (out, False)


def _batch_counter_noise(emit, node, inputs, batched):
    # the numbers depend on the seed and on like's shape only
    (seed, like), (b_seed, b_like) = inputs, batched
    out = emit.same(node, inputs, keep=node.attr("keep") + (1 if b_like else 0))
    return out if b_seed else (out, False)


def _batch_row_mask(emit, node, inputs, batched):
    # the counts get the client axis (they are small); like only lends a size, so a
    # size-1 leading axis does for an unbatched one
    (counts, like), (b_counts, b_like) = inputs, batched
    counts = counts if b_counts else emit.broadcast(counts)
    like = like if b_like else emit("expand_dims", like, axis=0)
    return emit.same(node, [counts, like], axis=node.attr("axis") + 1)


# structural nodes and loops: services of the vectorizer (fedlang.ir.batching.BatchEmitter)

def _batch_binding(emit, node, inputs, batched):
    """param, capture: the value the vectorizer bound to it (batched or not)."""
    return emit.bound(node)


def _batch_leaf(emit, node, inputs, batched):
    """A node without value inputs (global, const, zeros, ones) is the same for every client."""
    return emit.copy(node, inputs), False


def _batch_expanded(emit, node, inputs, batched):
    return emit.fail(f"{node.prim.name} is expanded by the IR builder; it never reaches vectorization")


def _batch_struct(emit, node, inputs, batched):
    t = StructType(tuple((n, emit.type(i)) for n, i in zip(node.type.names, inputs)))
    return emit.struct(list(inputs), t), tuple(batched)


def _batch_select(emit, node, inputs, batched):
    k = node.attr("index")
    return emit.select(inputs[0], k), emit.field_state(batched[0], k)


def _batch_closure(emit, node, inputs, batched):
    return emit.closure(node, inputs, batched)


def _batch_call(emit, node, inputs, batched):
    return emit.call(node, inputs, batched)


def _batch_cond(emit, node, inputs, batched):
    return emit.cond(node, inputs, batched)


def _batch_reduce(emit, node, inputs, batched):
    return emit.loop("reduce", node, inputs, batched)


def _batch_scan(emit, node, inputs, batched):
    return emit.loop("scan", node, inputs, batched)


def _batch_map(emit, node, inputs, batched):
    return emit.loop("map", node, inputs, batched)


def _batch_zip_seq(emit, node, inputs, batched):
    return emit.zip(node, inputs, batched)


def _batch_count(emit, node, inputs, batched):
    return emit.count(node, inputs, batched)


def _batch_num_examples(emit, node, inputs, batched):
    return emit.num_examples(node, inputs, batched)


# ---- the table -------------------------------------------------------------------------

def _p(*names_kinds) -> tuple[Param, ...]:
    out = []
    for item in names_kinds:
        if isinstance(item, Param):
            out.append(item)
        else:
            out.append(Param(item))
    return tuple(out)


_FLOATS, _NUMS, _BOOL = FLOAT_DTYPES, NUMERIC_DTYPES, frozenset({"bool"})
_ANY = frozenset({"bool", "string"}) | NUMERIC_DTYPES

_ENTRIES: list[Primitive] = [
    # operators ---------------------------------------------------------------------------
    Primitive("add", "<T,T> -> T  (numeric, broadcasting, leaf-wise)", _p("x", "y"), _arith("+", _NUMS), _binary_impl(lambda x, y: x + y), operator="+", vjp=_vjp_add, batch=_batch_elementwise),
    Primitive("sub", "<T,T> -> T", _p("x", "y"), _arith("-", _NUMS), operator="-", impl=_binary_impl(lambda x, y: x - y), vjp=_vjp_sub, batch=_batch_elementwise),
    Primitive("mul", "<T,T> -> T", _p("x", "y"), _arith("*", _NUMS), operator="*", impl=_binary_impl(lambda x, y: x * y), vjp=_vjp_mul, batch=_batch_elementwise),
    Primitive("div", "<T,T> -> T  (floating)", _p("x", "y"), _div, operator="/", impl=_binary_impl(_np_divide), vjp=_vjp_div, batch=_batch_elementwise),
    Primitive("mod", "<T,T> -> T", _p("x", "y"), _arith("%", _NUMS), operator="%", impl=_binary_impl(lambda x, y: x % y), vjp=_vjp_mod, batch=_batch_elementwise),
    Primitive("pow", "<T,T> -> T", _p("x", "y"), _arith("**", _NUMS), operator="**", impl=_binary_impl(lambda x, y: x ** y), vjp=_vjp_pow, batch=_batch_elementwise),
    Primitive("neg", "T -> T", _p("x"), _neg, operator="neg", impl=_unary_impl(lambda x: -x), vjp=_vjp_neg, batch=_batch_elementwise),
    Primitive("eq", "<T,T> -> bool", _p("x", "y"), _compare("==", _ANY), operator="==", impl=_binary_impl(_numpy("equal")), batch=_batch_elementwise),
    Primitive("ne", "<T,T> -> bool", _p("x", "y"), _compare("!=", _ANY), operator="!=", impl=_binary_impl(_numpy("not_equal")), batch=_batch_elementwise),
    Primitive("lt", "<T,T> -> bool", _p("x", "y"), _compare("<", _NUMS), operator="<", impl=_binary_impl(_numpy("less")), batch=_batch_elementwise),
    Primitive("le", "<T,T> -> bool", _p("x", "y"), _compare("<=", _NUMS), operator="<=", impl=_binary_impl(_numpy("less_equal")), batch=_batch_elementwise),
    Primitive("gt", "<T,T> -> bool", _p("x", "y"), _compare(">", _NUMS), operator=">", impl=_binary_impl(_numpy("greater")), batch=_batch_elementwise),
    Primitive("ge", "<T,T> -> bool", _p("x", "y"), _compare(">=", _NUMS), operator=">=", impl=_binary_impl(_numpy("greater_equal")), batch=_batch_elementwise),
    Primitive("logical_and", "<bool,bool> -> bool", _p("x", "y"), _arith("and", _BOOL), operator="and", impl=_binary_impl(_numpy("logical_and")), batch=_batch_elementwise),
    Primitive("logical_or", "<bool,bool> -> bool", _p("x", "y"), _arith("or", _BOOL), operator="or", impl=_binary_impl(_numpy("logical_or")), batch=_batch_elementwise),
    Primitive("logical_not", "bool -> bool", _p("x"), _not, operator="not", impl=_unary_impl(_numpy("logical_not")), batch=_batch_elementwise),
    # local builtins ----------------------------------------------------------------------
    Primitive("matmul", "<T[..,m,k],T[..,k,n]> -> T[..,m,n]", _p("a", "b"), _matmul, impl=lambda a, b: np.matmul(a, b), vjp=_vjp_matmul, batch=_batch_matmul),
    Primitive("relu", "T -> T  (leaf-wise)", _p("x"), _unary("relu", _NUMS), impl=_unary_impl(_np_relu), vjp=_vjp_relu, batch=_batch_elementwise),
    Primitive("sigmoid", "T -> T  (floating)", _p("x"), _unary("sigmoid", _FLOATS), impl=_unary_impl(_np_sigmoid), vjp=_vjp_sigmoid, batch=_batch_elementwise),
    Primitive("tanh", "T -> T  (floating)", _p("x"), _unary("tanh", _FLOATS), impl=_unary_impl(_numpy("tanh")), vjp=_vjp_tanh, batch=_batch_elementwise),
    Primitive("exp", "T -> T  (floating)", _p("x"), _unary("exp", _FLOATS), impl=_unary_impl(_numpy("exp")), vjp=_vjp_exp, batch=_batch_elementwise),
    Primitive("log", "T -> T  (floating)", _p("x"), _unary("log", _FLOATS), impl=_unary_impl(_numpy("log")), vjp=_vjp_log, batch=_batch_elementwise),
    Primitive("sqrt", "T -> T  (floating)", _p("x"), _unary("sqrt", _FLOATS), impl=_unary_impl(_numpy("sqrt")), vjp=_vjp_sqrt, batch=_batch_elementwise),
    Primitive("abs", "T -> T", _p("x"), _unary("abs", _NUMS), impl=_unary_impl(_numpy("abs")), vjp=_vjp_abs, batch=_batch_elementwise),
    Primitive("square", "T -> T", _p("x"), _unary("square", _NUMS), impl=_unary_impl(_numpy("square")), vjp=_vjp_square, batch=_batch_elementwise),
    Primitive("maximum", "<T,T> -> T", _p("x", "y"), _binary("maximum", _NUMS), impl=_binary_impl(_numpy("maximum")), vjp=_vjp_extremum("gt"), batch=_batch_elementwise),
    Primitive("minimum", "<T,T> -> T", _p("x", "y"), _binary("minimum", _NUMS), impl=_binary_impl(_numpy("minimum")), vjp=_vjp_extremum("lt"), batch=_batch_elementwise),
    Primitive("softmax", "<float[..,n], axis=-1> -> float[..,n]", _p("x", Param("axis", "int", -1)),
              _softmax("softmax"), impl=_np_softmax, vjp=_vjp_softmax, batch=_batch_axis),
    Primitive("log_softmax", "<float[..,n], axis=-1> -> float[..,n]", _p("x", Param("axis", "int", -1)),
              _softmax("log_softmax"), impl=_np_log_softmax, vjp=_vjp_log_softmax, batch=_batch_axis),
    Primitive("sparse_softmax_cross_entropy", "<int[S],float[S,n]> -> float[S]", _p("labels", "logits"),
              _sparse_xent, impl=_np_sparse_xent, vjp=_vjp_sparse_xent, batch=_batch_all),
    Primitive("sum", "<T[..], axis?> -> T[..]", _p("x", Param("axis", "int", None)), _reduction("sum", _NUMS), impl=_reduction_impl(_numpy("sum")), vjp=_vjp_sum, batch=_batch_reduction),
    Primitive("mean", "<float[..], axis?> -> float[..]", _p("x", Param("axis", "int", None)),
              _reduction("mean", _FLOATS), impl=_np_mean, vjp=_vjp_mean, batch=_batch_reduction),
    Primitive("max", "<T[..], axis?> -> T[..]", _p("x", Param("axis", "int", None)), _reduction("max", _NUMS), impl=_reduction_impl(_numpy("max")), vjp=_vjp_extreme_reduction, batch=_batch_reduction),
    Primitive("min", "<T[..], axis?> -> T[..]", _p("x", Param("axis", "int", None)), _reduction("min", _NUMS), impl=_reduction_impl(_numpy("min")), vjp=_vjp_extreme_reduction, batch=_batch_reduction),
    Primitive("argmax", "<T[..], axis> -> int32[..]", _p("x", Param("axis", "int")), _argmax, impl=_np_argmax, batch=_batch_axis),
    Primitive("one_hot", "<int[S], depth> -> float32[S,depth]", _p("i", Param("depth", "int")), _one_hot, impl=_np_one_hot, batch=_batch_same),
    Primitive("cast", "<T, dtype> -> dtype (leaf-wise)", _p("x", Param("dtype", "dtype")), _cast, impl=_np_cast, vjp=_vjp_cast, batch=_batch_elementwise),
    Primitive("reshape", "<T[..], [dims]> -> T[dims]", _p("x", Param("shape", "shape")), _reshape, impl=_np_reshape, vjp=_vjp_reshape, batch=_batch_reshape),
    Primitive("zeros_like", "T -> T", _p("x"), _like, impl=_np_zeros_like, vjp=_vjp_zero, batch=_batch_like),
    Primitive("ones_like", "T -> T", _p("x"), _like, impl=_np_ones_like, vjp=_vjp_zero, batch=_batch_like),
    Primitive("where", "<bool[..],T[..],T[..]> -> T[..]", _p("c", "a", "b"), _where, impl=_np_where, vjp=_vjp_where, batch=_batch_elementwise),
    Primitive("clip", "<T,lo,hi> -> T", _p("x", "lo", "hi"), _clip, impl=_np_clip, vjp=_vjp_clip, batch=_batch_clip),
    Primitive("global_norm", "<float tensors> -> float", _p("x"), _global_norm, impl=_np_global_norm, vjp=_vjp_global_norm, batch=_batch_global_norm),
    Primitive("size", "T[..] -> int32", _p("x"), _size, impl=_np_size, batch=_batch_size),
    Primitive("grad", "(<P,..> -> float) -> (<P,..> -> P)", _p("f"), _grad, impl=None, batch=_batch_expanded),
    Primitive("value_and_grad", "(<P,..> -> float) -> (<P,..> -> <float,P>)", _p("f"), _value_and_grad, impl=None, batch=_batch_expanded),
    Primitive("reduce", "<T*,U,(<U,T> -> U)> -> U", _p("seq", "init", "f"), _reduce, impl=_np_reduce, vjp=_vjp_reduce, batch=_batch_reduce),
    Primitive("map", "<T*,(T -> U)> -> U*", _p("seq", "f"), _map, impl=_np_map, vjp=_vjp_map, batch=_batch_map),
    Primitive("count", "T* -> int32", _p("seq"), _count, impl=_np_count, batch=_batch_count),
    Primitive("num_examples", "T[n,..]* -> int32", _p("seq"), _num_examples, impl=_np_num_examples, batch=_batch_num_examples),
    Primitive("zeros", "<[dims], dtype=float32> -> dtype[dims]",
              _p(Param("shape", "shape"), Param("dtype", "dtype", "float32")), _filled, impl=_np_filled(0), batch=_batch_leaf),
    Primitive("ones", "<[dims], dtype=float32> -> dtype[dims]",
              _p(Param("shape", "shape"), Param("dtype", "dtype", "float32")), _filled, impl=_np_filled(1), batch=_batch_leaf),
    Primitive("random_normal", "<[dims],float,int> -> float32[dims]",
              _p(Param("shape", "shape"), "stddev", "seed"), _random_normal, impl=_np_random_normal, vjp=_vjp_random_normal, batch=_batch_random_normal),
    Primitive("random_uniform", "<[dims],float,float,int> -> float32[dims]",
              _p(Param("shape", "shape"), "lo", "hi", "seed"), _random_uniform, impl=_np_random_uniform, vjp=_vjp_random_uniform, batch=_batch_random_uniform),
    Primitive("random_normal_like", "<T,float,int> -> T", _p("x", "stddev", "seed"), _random_normal_like, impl=_np_random_normal_like, vjp=_vjp_random_normal_like, batch=_batch_random_normal_like),
    # federated intrinsics ---------------------------------------------------------------
    Primitive("federated_value", "<T,P> -> T@P", _p("v", Param("placement", "placement")), _federated_value,
              federated=True, impl=_np_federated_value),
    Primitive("federated_eval", "<( -> T),P> -> T@P", _p("f", Param("placement", "placement")),
              _federated_eval, federated=True, impl=_np_federated_eval),
    Primitive("federated_broadcast", "T@SERVER -> T@CLIENTS", _p("x"), _federated_broadcast, federated=True, impl=_np_federated_broadcast),
    Primitive("federated_map", "<(<T1..Tn> -> U),{T1}@CLIENTS..> -> {U}@CLIENTS", _p("f", "xs"),
              _federated_map, federated=True, variadic=True, typed_impl=True, impl=_np_federated_map),
    Primitive("federated_apply", "<(T -> U),T@SERVER> -> U@SERVER", _p("f", "x"), _federated_apply,
              federated=True, impl=_np_federated_apply),
    Primitive("federated_zip", "<{T1}@CLIENTS..> -> {<T1..>}@CLIENTS", _p("xs"), _federated_zip,
              federated=True, variadic=True, typed_impl=True, impl=_np_federated_zip),
    Primitive("federated_sum", "{T}@CLIENTS -> T@SERVER", _p("x"), _aggregation("federated_sum", _NUMS, "numeric"),
              federated=True, typed_impl=True, impl=_np_federated_sum),
    Primitive("federated_mean", "<{T}@CLIENTS,weight={float32}@CLIENTS> -> T@SERVER",
              _p("x", Param("weight", "value", None)), _federated_mean, federated=True, typed_impl=True, impl=_np_federated_mean),
    Primitive("federated_min", "{T}@CLIENTS -> T@SERVER", _p("x"), _aggregation("federated_min", _NUMS, "numeric"),
              federated=True, typed_impl=True, impl=_extreme(_numpy("minimum"), _highest)),
    Primitive("federated_max", "{T}@CLIENTS -> T@SERVER", _p("x"), _aggregation("federated_max", _NUMS, "numeric"),
              federated=True, typed_impl=True, impl=_extreme(_numpy("maximum"), _lowest)),
    Primitive("federated_aggregate", "<{T}@CLIENTS,U,(<U,T> -> U),(<U,U> -> U),(U -> R)> -> R@SERVER",
              _p("x", "zero", "accumulate", "merge", "report"), _federated_aggregate, federated=True, impl=_np_federated_aggregate),
    Primitive("federated_secure_sum", "<{T}@CLIENTS,bitwidth> -> T@SERVER  (integer)",
              _p("x", Param("bitwidth", "int")), _federated_secure_sum, federated=True, typed_impl=True, impl=_np_federated_secure_sum),
    # robust aggregations (docs/language.md, "Robust aggregation")
    Primitive("federated_median", "{T}@CLIENTS -> T@SERVER  (coordinate-wise median; float)", _p("x"),
              _robust("federated_median"), federated=True, typed_impl=True, impl=_robust_impl("federated_median")),
    Primitive("federated_trimmed_mean", "<{T}@CLIENTS,percent> -> T@SERVER  (drops percent% at each end)",
              _p("x", Param("percent", "int")), _robust("federated_trimmed_mean"), federated=True,
              typed_impl=True, impl=_robust_impl("federated_trimmed_mean")),
    Primitive("federated_clipped_mean", "<{T}@CLIENTS,bound> -> T@SERVER  (each value's norm clipped to bound)",
              _p("x", Param("bound", "float")), _robust("federated_clipped_mean"), federated=True,
              typed_impl=True, impl=_robust_impl("federated_clipped_mean")),
    Primitive("federated_zeroing_mean", "<{T}@CLIENTS,bound> -> T@SERVER  (values of norm > bound count as zero)",
              _p("x", Param("bound", "float")), _robust("federated_zeroing_mean"), federated=True,
              typed_impl=True, impl=_robust_impl("federated_zeroing_mean")),
    Primitive("federated_krum", "<{T}@CLIENTS,byzantine> -> T@SERVER  (Krum's choice among the values)",
              _p("x", Param("byzantine", "int")), _robust("federated_krum"), federated=True,
              typed_impl=True, impl=_robust_impl("federated_krum")),
]

# Structural nodes of the IR (built by the compiler; a program cannot name them).
_STRUCTURAL = [
    Primitive("param", "parameter `index` of the function", (Param("index", "int"),), _no_type, callable=False, batch=_batch_binding),
    Primitive("capture", "captured value `index` of a closure", (Param("index", "int"),), _no_type, callable=False, batch=_batch_binding),
    Primitive("global", "the top-level computation `name`", (Param("name", "name"),), _no_type, callable=False, batch=_batch_leaf),
    Primitive("closure", "<captures..> -> a function value of `function`", (Param("function", "function"),),
              _no_type, callable=False, vjp=_vjp_closure, batch=_batch_closure),
    Primitive("const", "a constant `value` (a Python number when weak)", (Param("value", "value"),), _no_type,
              impl=_np_const, callable=False, batch=_batch_leaf),
    Primitive("struct", "<T1..Tn> -> <names=T1..Tn>", (Param("names", "names"),), _no_type, impl=_np_struct,
              callable=False, vjp=_vjp_struct, batch=_batch_struct),
    Primitive("select", "<..,T_index,..> -> T_index  (placement kept)", (Param("index", "int"),), _no_type,
              impl=_np_select, typed_impl=True, callable=False, vjp=_vjp_select, batch=_batch_select),
    Primitive("index", "<T[n,..],int> -> T[..]", _p("x", "i"), _no_type, impl=_np_index, callable=False, vjp=_vjp_index, batch=_batch_index),
    Primitive("call", "<(T -> U),T> -> U", _p("f", "args"), _no_type, impl=_np_call, variadic=True, callable=False, vjp=_vjp_call, batch=_batch_call),
    Primitive("cond", "<bool,T,T> -> T", _p("c", "a", "b"), _no_type, impl=_np_cond, callable=False, vjp=_vjp_cond, batch=_batch_cond),
]
_ENTRIES += _STRUCTURAL

# Internal nodes of reverse-mode autodiff (fedlang.ir.autodiff; a program cannot name them).
_AUTODIFF = [
    Primitive("broadcast_to", "<T[..],like[dims]> -> T[dims]", _p("x", "like"), _broadcast_to,
              impl=_np_broadcast_to, callable=False, vjp=_vjp_broadcast_to, batch=_batch_broadcast_to),
    Primitive("unbroadcast", "<T[..],like[dims]> -> T[dims]  (sums broadcast dimensions away)", _p("x", "like"),
              _unbroadcast, impl=_np_unbroadcast, callable=False, vjp=_vjp_unbroadcast, batch=_batch_unbroadcast),
    Primitive("reshape_like", "<T[..],like[dims]> -> T[dims]", _p("x", "like"), _reshape_like,
              impl=_np_reshape_like, callable=False, vjp=_vjp_reshape_like, batch=_batch_reshape_like),
    Primitive("expand_dims", "<T[..], axis> -> T[..,1,..]", _p("x", Param("axis", "int")), _expand_dims,
              impl=_np_expand_dims, callable=False, vjp=_vjp_expand_dims, batch=_batch_expand_dims),
    Primitive("matrix_transpose", "T[..,m,n] -> T[..,n,m]", _p("x"), _matrix_transpose,
              impl=_np_matrix_transpose, callable=False, vjp=_vjp_matrix_transpose, batch=_batch_same),
    Primitive("one_hot_like", "<int[S],like[S,n]> -> like  (one_hot in like's dtype)", _p("i", "like"),
              _one_hot_like, impl=_np_one_hot_like, callable=False, vjp=_vjp_zero, batch=_batch_one_hot_like),
    Primitive("scatter_row", "<T[..],like[n,..],int> -> T[n,..]  (zeros, row i = x)", _p("x", "like", "i"),
              _scatter_row, impl=_np_scatter_row, callable=False, vjp=_vjp_scatter_row, batch=_batch_scatter_row),
    Primitive("zip_seq", "<T1*..Tn*> -> <T1..Tn>*", _p("seqs"), _zip_seq, impl=_np_zip_seq, variadic=True,
              callable=False, vjp=_vjp_zip_seq, batch=_batch_zip_seq),
    Primitive("scan", "<T*,U,(<U,T> -> <U,Y>),reverse> -> <U,Y*>",
              _p("seq", "init", "f", Param("reverse", "int", 0)), _scan, impl=_np_scan, callable=False,
              vjp=_vjp_scan, batch=_batch_scan),
]
_ENTRIES += _AUTODIFF

# Internal nodes of vectorization (fedlang.ir.batching; a program cannot name them).
_BATCHING = [
    Primitive("broadcast_leading", "<T[a..,b..],like,axis,like_axis> -> T[a..,n,b..]  (n: like's axis like_axis)",
              _p("x", "like", Param("axis", "int", 0), Param("like_axis", "int", 0)), _broadcast_leading,
              impl=_np_broadcast_leading, callable=False, vjp=_vjp_broadcast_leading, batch=_batch_broadcast_leading),
    Primitive("reshape_keep", "<T[a..,b..],[dims],keep> -> T[a..,dims]  (the first `keep` axes stay)",
              _p("x", Param("shape", "shape"), Param("keep", "int")), _reshape_keep, impl=_np_reshape_keep,
              callable=False, vjp=_vjp_reshape_keep, batch=_batch_reshape_keep),
    Primitive("shape_size", "<T[..],start,stop> -> int32  (the product of dimensions start:stop)",
              _p("x", Param("start", "int", 0), Param("stop", "int", None)), _shape_size, impl=_np_shape_size,
              callable=False, vjp=_vjp_zero, batch=_batch_shape_size),
    Primitive("squeeze", "<T[..,1,..],axis> -> T[..]", _p("x", Param("axis", "int")), _squeeze, impl=_np_squeeze,
              callable=False, vjp=_vjp_squeeze, batch=_batch_axis),
    Primitive("counter_noise", "<int[S],like[k..,d..],kind,salt,keep> -> float32[S,d..]  (random_* per seed)",
              _p("seed", "like", Param("kind", "name"), Param("salt", "int", None), Param("keep", "int", 0)),
              _counter_noise, impl=_np_counter_noise, callable=False, vjp=_vjp_zero, batch=_batch_counter_noise),
    Primitive("index_along", "<T[B..,n,R..],int[I..],keep> -> T[B|I..,R..]  (x[b.., i[b..]])",
              _p("x", "i", Param("keep", "int")), _index_along, impl=_np_index_along, callable=False,
              vjp=_vjp_index_along, batch=_batch_index_along),
    Primitive("scatter_along", "<T[B|I..,R..],like[B..,n,R..],int[I..],keep> -> T[B..,n,R..]  (rows added)",
              _p("x", "like", "i", Param("keep", "int")), _scatter_along, impl=_np_scatter_along, callable=False,
              vjp=_vjp_scatter_along, batch=_batch_scatter_along),
    Primitive("row_mask", "<int[S..],like[S..,..,n,..],axis> -> bool[S..,1..,n,1..]  (index along axis < counts[S..])",
              _p("counts", "like", Param("axis", "int")), _row_mask, impl=_np_row_mask, callable=False,
              vjp=_vjp_zero, batch=_batch_row_mask),
]
_ENTRIES += _BATCHING

# Federated intrinsics have no batching rule: a vectorized client phase runs between
# them. federated_value, federated_eval and federated_broadcast give it values that are
# the same for every client (unbatched), federated_map's function is the phase itself,
# federated_zip pairs its inputs, and the aggregations (sum, mean, min, max, aggregate,
# secure_sum) consume its stacked results. Every other entry has a batching rule.
UNBATCHED_INTRINSICS = frozenset({
    "federated_value", "federated_eval", "federated_broadcast", "federated_map", "federated_apply",
    "federated_zip", "federated_sum", "federated_mean", "federated_min", "federated_max",
    "federated_aggregate", "federated_secure_sum", "federated_median", "federated_trimmed_mean",
    "federated_clipped_mean", "federated_zeroing_mean", "federated_krum",
})

PRIMITIVES: dict[str, Primitive] = {p.name: p for p in _ENTRIES}
OPERATORS: dict[str, Primitive] = {p.operator: p for p in _ENTRIES if p.operator}
# Names a program can call: builtins and intrinsics, not the operator entries.
CALLABLE: dict[str, Primitive] = {p.name: p for p in _ENTRIES if p.operator is None and p.callable}
