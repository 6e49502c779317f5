"""Vectorizing over clients (fedlang.ir.batching, the `batch` rules of the primitive table).

  * the table: every primitive has a batching rule, or is a federated intrinsic
    listed in UNBATCHED_INTRINSICS; every local primitive has a case below;
  * every local primitive, one node at a time: the vectorized function on stacked
    inputs equals the per-client results of the reference interpreter, stacked
    (hypothesis: shapes, values, 1..6 clients, each input batched or not, weak
    literals, structs built from inputs batched differently, sequences with equal
    or ragged per-client lengths); the vectorized IR passes the verifier;
  * whole client functions of examples/fedavg_digits.fed (`client_update`: grad and
    reduce over batches; `client_metrics`; `example_count`) vectorized over clients
    equal the per-client loop, with equal numbers of batches and ragged ones (the
    step mask);
  * the helpers stack_clients / unstack_clients, what is not vectorizable, and a
    wrong batching rule is caught.
"""

from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fedlang
from fedlang.api import compile_ir
from fedlang.ir.autodiff import Emitter
from fedlang.ir.batching import (RAGGED_FIELDS, NotVectorizable, stack_clients, unstack_clients, vectorize)
from fedlang.ir.graph import Function, Node
from fedlang.ir.interpreter import Interpreter
from fedlang.ir.primitives import PRIMITIVES, UNBATCHED_INTRINSICS, FedlangRuntimeError
from fedlang.ir.types import SequenceType, StructType, TensorType, Type
from fedlang.ir.values import Struct

try:                                     # the IR verifier (fedlang.ir.verify), where present
    from fedlang.ir.verify import verify_function
except ImportError:                      # pragma: no cover
    verify_function = None

ROOT = Path(__file__).resolve().parent.parent

# Half the profile's examples per primitive (there are many primitives).
FEW = settings(max_examples=max(8, settings.default.max_examples // 2))

HELPERS = """
fn affine(x: float64[3], w: float64[3,2]) -> float64[2] = matmul(x, w) + 1.0
fn scaled_sum(acc: float64[2], x: float64[2]) -> float64[2] = acc * 0.5 + x
fn pair_sum(p: <float64[2],float64[2]>) -> float64[2] = p[0] + p[1]
fn weighted(x: float64[2], w: float64) -> float64[2] = x * w
"""


@functools.lru_cache(maxsize=None)
def helpers():
    result = fedlang.check_source(textwrap.dedent(HELPERS), "helpers.fed")
    assert result.ok, result.render()
    return compile_ir(result, optimize=False)


# ---- building one-node functions ------------------------------------------------------------------

def T(dtype: str, *shape) -> TensorType:
    return TensorType(dtype, tuple(shape))


F64, F32, I32, BOOL = "float64", "float32", "int32", "bool"


def make_function(types: list[Type], build: Callable[[Emitter, list[int]], int]) -> Function:
    f = Function("probe", tuple((f"p{k}", t) for k, t in enumerate(types)), StructType(()))
    em = Emitter(f, helpers())
    params = [em.typed("param", (), t, index=k) for k, t in enumerate(types)]
    f.result = build(em, params)
    f.result_type = em.type(f.result)
    return f


def lam(em: Emitter, params: list[tuple[str, Type]], body, captures: tuple[int, ...] = ()) -> int:
    """A closure node in em's function: fn(params) = body(inner emitter, params, captures)."""
    g = Function(f"{em.f.name}.fn", tuple(params), StructType(()),
                 captures=tuple((f"c{k}", em.type(c)) for k, c in enumerate(captures)))
    inner = Emitter(g, em.program)
    ps = [inner.typed("param", (), t, index=k) for k, (_, t) in enumerate(params)]
    cs = [inner.typed("capture", (), em.type(c), index=k) for k, c in enumerate(captures)]
    g.result = body(inner, ps, cs)
    g.result_type = inner.type(g.result)
    return em.typed("closure", tuple(captures), g.type, function=g, arity=tuple(n for n, _ in params))


def struct(em: Emitter, ids: list[int], names=None) -> int:
    names = names or (None,) * len(ids)
    return em.struct(ids, StructType(tuple((n, em.type(i)) for n, i in zip(names, ids))))


def literal(em: Emitter, dtype: str) -> int:
    """A weak literal that meets a tensor of `dtype`."""
    return em.const(1.5 if dtype.startswith("float") else 2)


def typed_const(em: Emitter, value, t: TensorType) -> int:
    return em.typed("const", (), t, value=np.asarray(value, np.dtype(t.dtype)))


def global_fn(em: Emitter, name: str, arity: tuple[str, ...] | None = None) -> int:
    """A `global` node: the helper function `name` as a value."""
    return em.add(Node(PRIMITIVES["global"], (), helpers().functions[name].type, (("name", name), ("arity", arity))))


# ---- cases: what to run, on which inputs ------------------------------------------------------------

@dataclass
class Case:
    types: list[Type]                        # parameter types; `?` dims are drawn (per step, for sequences)
    build: Callable[[Emitter, list[int]], int]
    elements: dict[int, Any] = field(default_factory=dict)    # per-parameter element strategies
    exact: bool = False                      # results must be bitwise equal (random numbers)
    shapes: dict[int, tuple] = field(default_factory=dict)    # the shape of a tensor declared with `?`


CASES: dict[str, Callable[[Any], Case]] = {}


def case(*names: str):
    def register(fn):
        for name in names:
            CASES[name] = functools.partial(fn, name)
        return fn
    return register


def elements_for(dtype: str):
    if dtype == F32:
        return st.floats(-4, 4, width=32)
    if dtype == F64:
        return st.floats(-4, 4)
    if dtype == BOOL:
        return st.booleans()
    return st.integers(-6, 6)


draw_dim = st.integers(1, 3)


@st.composite
def shapes(draw, min_rank=0, max_rank=3):
    return tuple(draw(st.lists(draw_dim, min_size=min_rank, max_size=max_rank)))


@st.composite
def broadcastable(draw, n: int, max_rank: int = 3, min_rank: int = 0):
    """n shapes that broadcast together: suffixes of one shape, some dimensions 1."""
    base = draw(shapes(min_rank, max_rank))
    out = []
    for _ in range(n):
        rank = draw(st.integers(min(min_rank, len(base)), len(base)))
        suffix = base[len(base) - rank:]
        ones = draw(st.lists(st.booleans(), min_size=rank, max_size=rank))
        out.append(tuple(1 if one else d for d, one in zip(suffix, ones)))
    return out


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def factored(draw, total: int, allow_infer: bool = True):
    """A shape with `total` elements, maybe with one -1."""
    rank = draw(st.integers(1, 3))
    dims, rest = [], total
    for _ in range(rank - 1):
        d = draw(st.sampled_from(divisors(rest)))
        dims.append(d)
        rest //= d
    dims.append(rest)
    if allow_infer and draw(st.booleans()):
        dims[draw(st.integers(0, rank - 1))] = -1
    return tuple(dims)


LEAFWISE_BINARY = {"add", "sub", "mul", "div", "mod", "pow", "maximum", "minimum"}
BINARY_DTYPES = {
    "add": [F64, F32, I32], "sub": [F64, I32], "mul": [F64, F32, I32], "div": [F64, F32],
    "mod": [F64, I32], "pow": [F64, I32], "maximum": [F64, I32], "minimum": [F32, I32],
    "eq": [F64, I32, BOOL], "ne": [F32, BOOL], "lt": [F64, I32], "le": [F64, I32], "gt": [F32, I32],
    "ge": [F64, I32], "logical_and": [BOOL], "logical_or": [BOOL],
}


@case(*BINARY_DTYPES)
def _binary(name, data) -> Case:
    dtype = data.draw(st.sampled_from(BINARY_DTYPES[name]))
    elements = st.integers(0, 3) if name == "pow" and dtype == I32 else elements_for(dtype)
    modes = ["tensors"] + (["literal"] if dtype != BOOL else []) + (["structs"] if name in LEAFWISE_BINARY else [])
    mode = data.draw(st.sampled_from(modes))
    sx, sy, sz = data.draw(broadcastable(3))
    every = {k: elements for k in range(4)}
    if mode == "literal":
        left = data.draw(st.booleans())
        return Case([T(dtype, *sx)], lambda em, p: em(name, p[0], literal(em, dtype)) if left
                    else em(name, literal(em, dtype), p[0]), every)
    if mode == "structs":      # <x, y> op <z, y> and <x, y> op scalar: fields batched independently
        other = data.draw(st.sampled_from(["struct", "scalar"]))
        if other == "scalar":
            return Case([T(dtype, *sx), T(dtype, *sy), T(dtype)],
                        lambda em, p: em(name, struct(em, p[:2], ("a", "b")), p[2]), every)
        return Case([T(dtype, *sx), T(dtype, *sy), T(dtype, *sz), T(dtype, *sy)],
                    lambda em, p: em(name, struct(em, p[:2], ("a", "b")), struct(em, p[2:], ("a", "b"))), every)
    return Case([T(dtype, *sx), T(dtype, *sy)], lambda em, p: em(name, *p), every)


UNARY_DTYPES = {"neg": [F64, I32], "logical_not": [BOOL], "relu": [F64, I32], "sigmoid": [F32, F64],
                "tanh": [F64], "exp": [F32, F64], "log": [F64], "sqrt": [F32, F64], "abs": [F64, I32],
                "square": [F64, I32]}


@case(*UNARY_DTYPES)
def _unary(name, data) -> Case:
    dtype = data.draw(st.sampled_from(UNARY_DTYPES[name]))
    elements = st.floats(0.125, 4, width=32 if dtype == F32 else 64) if name in ("log", "sqrt") \
        else elements_for(dtype)
    sx, sy = data.draw(st.tuples(shapes(), shapes()))
    every = {0: elements, 1: elements}
    if dtype != BOOL and data.draw(st.booleans()):      # leaf-wise on a struct of two inputs
        return Case([T(dtype, *sx), T(dtype, *sy)], lambda em, p: em(name, struct(em, p)), every)
    return Case([T(dtype, *sx)], lambda em, p: em(name, p[0]), every)


@case("matmul")
def _matmul(name, data) -> Case:
    dtype = data.draw(st.sampled_from([F64, F32, I32]))
    k, m, n, s = (data.draw(draw_dim) for _ in range(4))
    ra, rb = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    sa, sb = (data.draw(st.sampled_from([s, 1])) for _ in range(2))
    a = ((sa,) if ra == 3 else ()) + ((m,) if ra >= 2 else ()) + (k,)
    b = ((sb,) if rb == 3 else ()) + (k,) + ((n,) if rb >= 2 else ())
    return Case([T(dtype, *a), T(dtype, *b)], lambda em, p: em("matmul", *p))


@case("softmax", "log_softmax")
def _softmax(name, data) -> Case:
    shape = data.draw(shapes(1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    return Case([T(data.draw(st.sampled_from([F32, F64])), *shape)], lambda em, p: em(name, p[0], axis=axis))


@case("sparse_softmax_cross_entropy")
def _xent(name, data) -> Case:
    s, n = data.draw(shapes(0, 2)), data.draw(st.integers(1, 4))
    return Case([T(I32, *s), T(F32, *s, n)], lambda em, p: em(name, *p), {0: st.integers(0, n - 1)})


REDUCTION_DTYPES = {"sum": [F64, I32], "mean": [F32, F64], "max": [F64, I32], "min": [F32, I32]}


@case(*REDUCTION_DTYPES)
def _reduction(name, data) -> Case:
    shape = data.draw(shapes())
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1))) if shape else None
    return Case([T(data.draw(st.sampled_from(REDUCTION_DTYPES[name])), *shape)],
                lambda em, p: em(name, p[0], axis=axis))


@case("argmax")
def _argmax(name, data) -> Case:
    shape = data.draw(shapes(1))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    return Case([T(data.draw(st.sampled_from([F64, I32])), *shape)], lambda em, p: em(name, p[0], axis=axis),
                {0: st.integers(-2, 2)})


@case("one_hot")
def _one_hot(name, data) -> Case:
    depth = data.draw(st.integers(1, 4))
    return Case([T(I32, *data.draw(shapes(0, 2)))], lambda em, p: em(name, p[0], depth=depth),
                {0: st.integers(0, depth)})


@case("cast")
def _cast(name, data) -> Case:
    source, target = (data.draw(st.sampled_from([F32, F64, I32, "int8", BOOL])) for _ in range(2))
    sx, sy = data.draw(st.tuples(shapes(), shapes()))
    if data.draw(st.booleans()):
        return Case([T(source, *sx), T(F64, *sy)], lambda em, p: em(name, struct(em, p), dtype=target))
    return Case([T(source, *sx)], lambda em, p: em(name, p[0], dtype=target))


@case("reshape")
def _reshape(name, data) -> Case:
    shape = data.draw(shapes(1))
    target = data.draw(factored(int(np.prod(shape))))
    if -1 in target and data.draw(st.booleans()):       # a `?` dimension in the declared type
        return Case([T(F64, None, *shape[1:])], lambda em, p: em(name, p[0], shape=target), shapes={0: shape})
    return Case([T(F64, *shape)], lambda em, p: em(name, p[0], shape=target))


@case("zeros_like", "ones_like")
def _like(name, data) -> Case:
    dtype = data.draw(st.sampled_from([F64, I32, BOOL]))
    sx, sy = data.draw(st.tuples(shapes(), shapes()))
    if data.draw(st.booleans()):
        return Case([T(dtype, *sx), T(F32, *sy)], lambda em, p: em(name, struct(em, p)))
    return Case([T(dtype, *sx)], lambda em, p: em(name, p[0]))


@case("where")
def _where(name, data) -> Case:
    sc, sa, sb = data.draw(broadcastable(3))
    dtype = data.draw(st.sampled_from([F64, I32, BOOL]))
    if dtype != BOOL and data.draw(st.booleans()):
        return Case([T(BOOL, *sc), T(dtype, *sa)], lambda em, p: em(name, p[0], p[1], literal(em, dtype)))
    return Case([T(BOOL, *sc), T(dtype, *sa), T(dtype, *sb)], lambda em, p: em(name, *p))


@case("clip")
def _clip(name, data) -> Case:
    dtype = data.draw(st.sampled_from([F64, I32]))
    sx, sy = data.draw(st.tuples(shapes(), shapes()))
    if data.draw(st.booleans()):            # a struct of two inputs, bounds for every leaf
        return Case([T(dtype, *sx), T(dtype, *sy), T(dtype), T(dtype)],
                    lambda em, p: em(name, struct(em, p[:2]), p[2], p[3]))
    if data.draw(st.booleans()):
        return Case([T(dtype, *sx), T(dtype)], lambda em, p: em(name, p[0], literal(em, dtype), p[1]))
    return Case([T(dtype, *sx), T(dtype), T(dtype)], lambda em, p: em(name, *p))


@case("global_norm")
def _global_norm(name, data) -> Case:
    dtype = data.draw(st.sampled_from([F32, F64]))
    leaves = data.draw(st.lists(shapes(), min_size=1, max_size=3))
    if len(leaves) == 1 and data.draw(st.booleans()):
        return Case([T(dtype, *leaves[0])], lambda em, p: em(name, p[0]))
    return Case([T(dtype, *s) for s in leaves], lambda em, p: em(name, struct(em, p)))


@case("size")
def _size(name, data) -> Case:
    return Case([T(data.draw(st.sampled_from([F64, I32, BOOL])), *data.draw(shapes()))],
                lambda em, p: em(name, p[0]))


@case("zeros", "ones")
def _filled(name, data) -> Case:
    shape, dtype = data.draw(shapes()), data.draw(st.sampled_from([F32, I32]))
    return Case([T(F64)], lambda em, p: em(name, shape=shape, dtype=dtype))


@case("random_normal")
def _random_normal(name, data) -> Case:
    shape = data.draw(shapes())
    return Case([T(data.draw(st.sampled_from([F32, F64]))), T(I32)],
                lambda em, p: em(name, *p, shape=shape), {0: st.floats(0, 3), 1: st.integers(-10 ** 6, 10 ** 6)},
                exact=True)


@case("random_uniform")
def _random_uniform(name, data) -> Case:
    shape = data.draw(shapes())
    if data.draw(st.booleans()):            # literal bounds
        return Case([T(I32)], lambda em, p: em(name, -0.378, 0.378, p[0], shape=shape),
                    {0: st.integers(-10 ** 6, 10 ** 6)}, exact=True)
    return Case([T(F32), T(F64), T(I32)], lambda em, p: em(name, *p, shape=shape),
                {0: st.floats(-3, 0), 1: st.floats(0, 3), 2: st.integers(-10 ** 6, 10 ** 6)}, exact=True)


@case("random_normal_like")
def _random_normal_like(name, data) -> Case:
    sx, sy = data.draw(st.tuples(shapes(), shapes()))
    seeds = {2: st.integers(-10 ** 6, 10 ** 6), 3: st.integers(-10 ** 6, 10 ** 6), 1: st.floats(0, 3)}
    if data.draw(st.booleans()):
        return Case([T(F32, *sx), T(F32), T(I32)], lambda em, p: em(name, *p), seeds, exact=True)
    return Case([T(F32, *sx), T(F64, *sy), T(F32), T(I32)],
                lambda em, p: em(name, struct(em, p[:2]), p[2], p[3]),
                {2: st.floats(0, 3), 3: st.integers(-10 ** 6, 10 ** 6)}, exact=True)


# structural nodes -----------------------------------------------------------------------------

@case("param")
def _param(name, data) -> Case:
    t = data.draw(st.sampled_from([T(F64, 2), StructType((("a", T(I32)), ("b", T(F32, 2)))),
                                   SequenceType(T(F64, 2)), StructType((("s", SequenceType(T(I32))), ("x", T(F64))))]))
    return Case([t], lambda em, p: p[0])


@case("capture", "closure")
def _closure(name, data) -> Case:
    # a lambda capturing two values (and calling a lambda it builds itself), called
    def body(inner, ps, cs):
        scale = inner("mul", cs[0], cs[1])
        nested = lam(inner, [("y", T(F64, 2))], lambda e, q, c: e("add", q[0], c[0]), (scale,))
        return inner.typed("call", (nested, ps[0]), T(F64, 2))

    def build(em, p):
        fn = lam(em, [("x", T(F64, 2))], body, (p[0], p[1]))
        return em.typed("call", (fn, p[2]), T(F64, 2))

    return Case([T(F64, 2), T(F64), T(F64, 2)], build)


@case("global", "call")
def _call(name, data) -> Case:
    kind = data.draw(st.sampled_from(["affine", "pack", "unpack", "weighted"]))
    if kind == "affine":
        return Case([T(F64, 3), T(F64, 3, 2)],
                    lambda em, p: em.typed("call", (global_fn(em, "affine", ("x", "w")), *p), T(F64, 2)))
    if kind == "pack":      # two arguments fill a function's one struct parameter
        return Case([T(F64, 2), T(F64, 2)],
                    lambda em, p: em.typed("call", (global_fn(em, "pair_sum", ("p",)), *p), T(F64, 2)))
    if kind == "unpack":    # one struct argument fills a function's two parameters
        return Case([T(F64, 2), T(F64)],
                    lambda em, p: em.typed("call", (global_fn(em, "weighted"), struct(em, p)), T(F64, 2)))
    return Case([T(F64, 2), T(F64)],
                lambda em, p: em.typed("call", (global_fn(em, "weighted", ("x", "w")), *p), T(F64, 2)))


@case("const")
def _const(name, data) -> Case:
    return Case([T(F64, 2)], lambda em, p: struct(em, [em("add", p[0], typed_const(em, [1.0, 2.0], T(F64, 2))),
                                                       typed_const(em, 7, T(I32))]))


@case("struct", "select")
def _struct(name, data) -> Case:
    k = data.draw(st.integers(0, 2))
    nested = data.draw(st.booleans())

    def build(em, p):
        s = struct(em, [p[0], struct(em, [p[1], p[2]], ("u", "v")), p[2]], ("a", "b", "c"))
        return em.select(em.select(s, 1), k % 2) if nested else em.select(s, k) if name == "select" else s

    return Case([T(F64, 2), T(I32), StructType((("z", T(F32)),))], build)


@case("index")
def _index(name, data) -> Case:
    n, row = data.draw(draw_dim), data.draw(shapes(0, 2))
    return Case([T(F64, n, *row), T(I32)], lambda em, p: em.typed("index", tuple(p), T(F64, *row)),
                {1: st.integers(0, n - 1)})


@case("cond")
def _cond(name, data) -> Case:
    if data.draw(st.booleans()):
        t = StructType((("a", T(F64, 2)), ("b", T(I32))))
    else:
        t = T(F64, *data.draw(shapes()))
    return Case([T(BOOL), t, t], lambda em, p: em.typed("cond", tuple(p), t))


# sequences ------------------------------------------------------------------------------------

@case("reduce")
def _reduce(name, data) -> Case:
    kind = data.draw(st.sampled_from(["closure", "global", "struct", "ignores"]))
    s = data.draw(draw_dim)
    if kind == "global":
        return Case([SequenceType(T(F64, 2)), T(F64, 2)],
                    lambda em, p: em("reduce", p[0], p[1], global_fn(em, "scaled_sum", ("acc", "x"))))
    if kind == "struct":   # <sum, count>: the count does not depend on the elements
        acc_t = StructType((("s", T(F64, s)), ("n", T(F64))))

        def body(e, q, c):
            return e.struct([e("add", e.select(q[0], 0), q[1]), e("add", e.select(q[0], 1), 1.0)], acc_t)

        return Case([SequenceType(T(F64, s)), T(F64, s), T(F64)],
                    lambda em, p: em("reduce", p[0], em.struct([p[1], p[2]], acc_t),
                                     lam(em, [("acc", acc_t), ("x", T(F64, s))], body)))
    if kind == "ignores":  # acc + c: batched only where c is
        return Case([SequenceType(T(F64, s)), T(F64, s), T(F64)],
                    lambda em, p: em("reduce", p[0], p[1], lam(em, [("acc", T(F64, s)), ("x", T(F64, s))],
                                                               lambda e, q, c: e("add", q[0], c[0]), (p[2],))))
    return Case([SequenceType(T(F64, s)), T(F64, s), T(F64)],
                lambda em, p: em("reduce", p[0], p[1], lam(em, [("acc", T(F64, s)), ("x", T(F64, s))],
                                                           lambda e, q, c: e("add", e("mul", q[0], c[0]), q[1]),
                                                           (p[2],))))


@case("scan")
def _scan(name, data) -> Case:
    reverse = data.draw(st.integers(0, 1))
    out_t = StructType(((None, T(F64, 2)), (None, T(F64))))

    def body(e, q, c):
        return e.struct([e("add", e("mul", q[0], c[0]), q[1]), e("sum", e("sub", q[0], q[1]))], out_t)

    return Case([SequenceType(T(F64, 2)), T(F64, 2), T(F64)],
                lambda em, p: em("scan", p[0], p[1], lam(em, [("c", T(F64, 2)), ("x", T(F64, 2))], body, (p[2],)),
                                 reverse=reverse))


@case("map")
def _map(name, data) -> Case:
    kind = data.draw(st.sampled_from(["closure", "constant"]))
    if kind == "constant":       # the result does not depend on the element
        return Case([SequenceType(T(F64, 2)), T(F64)],
                    lambda em, p: em("map", p[0], lam(em, [("x", T(F64, 2))], lambda e, q, c: c[0], (p[1],))))
    return Case([SequenceType(StructType((("x", T(F64, None, 2)), ("y", T(I32))))), T(F64)],
                lambda em, p: em("map", p[0], lam(em, [("b", em.type(p[0]).element)],
                                                  lambda e, q, c: e("mul", e("tanh", e.select(q[0], 0)), c[0]),
                                                  (p[1],))))


@case("zip_seq")
def _zip(name, data) -> Case:
    return Case([SequenceType(T(F64, 2)), SequenceType(StructType(((None, T(I32)),)))],
                lambda em, p: em("zip_seq", *p))


@case("count")
def _count(name, data) -> Case:
    return Case([SequenceType(T(F64, 2))], lambda em, p: em(name, p[0]))


@case("num_examples")
def _num_examples(name, data) -> Case:
    element = StructType((("x", T(F64, None, 2)), ("y", T(I32, None))))
    return Case([SequenceType(element)], lambda em, p: em(name, p[0]))


# internal nodes of autodiff ---------------------------------------------------------------------

@case("broadcast_to")
def _broadcast_to(name, data) -> Case:
    target = data.draw(shapes())
    rank = data.draw(st.integers(0, len(target)))
    x = tuple(1 if data.draw(st.booleans()) else d for d in target[len(target) - rank:])
    return Case([T(F64, *x), T(F32, *target)], lambda em, p: em(name, *p))


@case("unbroadcast")
def _unbroadcast(name, data) -> Case:
    like = tuple(data.draw(st.sampled_from([1, d])) for d in data.draw(shapes()))
    extra = data.draw(shapes(0, 2))
    x = extra + tuple(data.draw(draw_dim) if d == 1 else d for d in like)
    return Case([T(F64, *x), T(F32, *like)], lambda em, p: em(name, *p))


@case("reshape_like")
def _reshape_like(name, data) -> Case:
    x = data.draw(shapes(1))
    like = data.draw(factored(int(np.prod(x)), allow_infer=False))
    return Case([T(F64, *x), T(F32, *like)], lambda em, p: em(name, *p))


@case("expand_dims")
def _expand_dims(name, data) -> Case:
    shape = data.draw(shapes())
    axis = data.draw(st.integers(-len(shape) - 1, len(shape)))
    return Case([T(F64, *shape)], lambda em, p: em(name, p[0], axis=axis))


@case("matrix_transpose")
def _matrix_transpose(name, data) -> Case:
    return Case([T(I32, *data.draw(shapes(2, 4)))], lambda em, p: em(name, p[0]))


@case("one_hot_like")
def _one_hot_like(name, data) -> Case:
    s, n = data.draw(shapes(0, 2)), data.draw(draw_dim)
    return Case([T(I32, *s), T(data.draw(st.sampled_from([F32, F64])), *s, n)], lambda em, p: em(name, *p),
                {0: st.integers(0, n - 1)})


@case("scatter_row")
def _scatter_row(name, data) -> Case:
    n, row = data.draw(draw_dim), data.draw(shapes(0, 2))
    return Case([T(F64, *row), T(F32, n, *row), T(I32)], lambda em, p: em(name, *p), {2: st.integers(0, n - 1)})


# internal nodes of vectorization -----------------------------------------------------------------

@case("broadcast_leading")
def _broadcast_leading(name, data) -> Case:
    x, like = data.draw(shapes(0, 2)), data.draw(shapes(1, 3))
    axis, like_axis = data.draw(st.integers(0, len(x))), data.draw(st.integers(0, len(like) - 1))
    return Case([T(I32, *x), T(F32, *like)], lambda em, p: em(name, *p, axis=axis, like_axis=like_axis))


@case("reshape_keep")
def _reshape_keep(name, data) -> Case:
    shape = data.draw(shapes(1))
    keep = data.draw(st.integers(0, len(shape)))
    target = data.draw(factored(int(np.prod(shape[keep:]))))
    return Case([T(F64, *shape)], lambda em, p: em(name, p[0], shape=target, keep=keep))


@case("shape_size")
def _shape_size(name, data) -> Case:
    shape = data.draw(shapes())
    start = data.draw(st.integers(0, len(shape)))
    stop = data.draw(st.one_of(st.none(), st.integers(start, len(shape))))
    return Case([T(BOOL, *shape)], lambda em, p: em(name, p[0], start=start, stop=stop))


@case("squeeze")
def _squeeze(name, data) -> Case:
    shape = list(data.draw(shapes()))
    position = data.draw(st.integers(0, len(shape)))
    shape.insert(position, 1)
    axis = data.draw(st.sampled_from([position, position - len(shape)]))
    return Case([T(F64, *shape)], lambda em, p: em(name, p[0], axis=axis))


@case("counter_noise")
def _counter_noise(name, data) -> Case:
    seed, like = data.draw(shapes(0, 1)), data.draw(shapes(0, 2))
    keep = data.draw(st.integers(0, len(like)))
    kind, salt = data.draw(st.sampled_from(["normal", "uniform"])), data.draw(st.one_of(st.none(), st.integers(0, 3)))
    return Case([T(I32, *seed), T(F64, *like)], lambda em, p: em(name, *p, kind=kind, salt=salt, keep=keep),
                {0: st.integers(-10 ** 6, 10 ** 6)}, exact=True)


@case("index_along", "scatter_along")
def _gather(name, data) -> Case:
    keep, n, rows = data.draw(st.integers(0, 2)), data.draw(draw_dim), data.draw(shapes(0, 1))
    base = data.draw(shapes(keep, 2))           # x's `keep` leading axes and i's shape: suffixes, some 1s
    rank = data.draw(st.integers(0, len(base)))
    lead = tuple(1 if data.draw(st.booleans()) else d for d in base[len(base) - keep:])
    index = tuple(1 if data.draw(st.booleans()) else d for d in base[len(base) - rank:])
    batch = np.broadcast_shapes(lead, index)
    if name == "index_along":
        return Case([T(F64, *lead, n, *rows), T(I32, *index)], lambda em, p: em(name, *p, keep=keep),
                    {1: st.integers(0, n - 1)})
    return Case([T(F64, *batch, *rows), T(F32, *lead, n, *rows), T(I32, *index)],
                lambda em, p: em(name, *p, keep=keep), {2: st.integers(0, n - 1)})


@case("row_mask")
def _row_mask(name, data) -> Case:
    lead, rest = data.draw(shapes(0, 1)), data.draw(shapes(1, 3))
    axis = len(lead) + data.draw(st.integers(0, len(rest) - 1))
    return Case([T(I32, *lead), T(F64, *lead, *rest)], lambda em, p: em(name, *p, axis=axis),
                {0: st.integers(-1, 4)})


# Primitives without a case: never in IR that reaches vectorization.
NO_CASE = {"grad", "value_and_grad"}       # expanded by the IR builder (their rule says so)


# ---- running a case -------------------------------------------------------------------------------

def concrete(data, t: Type, fixed_shape=None) -> Type:
    """`t` with its `?` dimensions drawn."""
    if isinstance(t, TensorType):
        if fixed_shape is not None:
            return TensorType(t.dtype, fixed_shape)
        return TensorType(t.dtype, tuple(data.draw(st.integers(0, 3)) if d is None else d for d in t.shape))
    if isinstance(t, StructType):
        return StructType(tuple((n, concrete(data, f)) for n, f in t.fields))
    return t


def draw_value(data, t: Type, elements):
    """A runtime value of concrete type `t` (tensors and structs of them)."""
    if isinstance(t, TensorType):
        return data.draw(hnp.arrays(np.dtype(t.dtype), t.shape, elements=elements if elements is not None else elements_for(t.dtype)))
    if isinstance(t, StructType):
        return Struct([draw_value(data, f, elements) for f in t.types], t.names)
    raise TypeError(t)


def client_values(data, case_: Case, flags: list[bool], clients: int, ragged: bool) -> list[list[Any]]:
    """Per parameter, one value per client (the same one when the parameter is not batched)."""
    columns = []
    for k, (t, batched) in enumerate(zip(case_.types, flags)):
        elements, fixed = case_.elements.get(k), case_.shapes.get(k)
        if isinstance(t, StructType) and any(isinstance(f, SequenceType) for f in t.types):
            columns.append(_struct_with_sequences(data, t, batched, clients, ragged))
            continue
        if isinstance(t, SequenceType):
            columns.append(_sequences(data, t, batched, clients, ragged, elements))
            continue
        value_type = concrete(data, t, fixed)
        count = clients if batched else 1
        values = [draw_value(data, value_type, elements) for _ in range(count)]
        columns.append(values if batched else values * clients)
    return columns


def _sequences(data, t: SequenceType, batched: bool, clients: int, ragged: bool, elements) -> list:
    """Client sequences: every client's step t has the same shapes (drawn per step)."""
    if batched and ragged:
        lengths = [data.draw(st.integers(0, 3), label="length") for _ in range(clients)]
    else:
        lengths = [data.draw(st.integers(1, 3), label="length")] * clients
    steps = [concrete(data, t.element) for _ in range(max(lengths))]
    if not batched:
        value = [draw_value(data, s, elements) for s in steps]
        return [value] * clients
    return [[draw_value(data, s, elements) for s in steps[:n]] for n in lengths]


def _struct_with_sequences(data, t: StructType, batched: bool, clients: int, ragged: bool) -> list:
    columns = []
    for f in t.types:
        if isinstance(f, SequenceType):
            columns.append(_sequences(data, f, batched, clients, ragged, None))
        else:
            ft = concrete(data, f)
            values = [draw_value(data, ft, None) for _ in range(clients if batched else 1)]
            columns.append(values if batched else values * clients)
    return [Struct([column[c] for column in columns], t.names) for c in range(clients)]


def _names_agree(got: tuple, expected: tuple, lenient: bool) -> bool:
    if got == expected:
        return True
    return lenient and len(got) == len(expected) and all(g == e or None in (g, e) for g, e in zip(got, expected))


def assert_same(got, expected, exact: bool, where: str = "result", lenient_names: bool = False):
    """Equal values: structure, names, dtypes, shapes; floats within rounding unless `exact`.
    `lenient_names`: a field may be unnamed on one side (the reference interpreter keeps
    the names a struct value was built with, which may be fewer than its type's)."""
    if isinstance(expected, Struct):
        assert isinstance(got, Struct) and _names_agree(got.names, expected.names, lenient_names), \
            f"{where}: {got!r} vs {expected!r}"
        for k, (g, e) in enumerate(zip(got.values, expected.values)):
            assert_same(g, e, exact, f"{where}.{expected.names[k] or k}", lenient_names)
        return
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{where}: {len(got)} vs {len(expected)} elements"
        for k, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, exact, f"{where}[{k}]", lenient_names)
        return
    g, e = np.asarray(got), np.asarray(expected)
    assert g.dtype == e.dtype, f"{where}: dtype {g.dtype} vs {e.dtype}"
    assert g.shape == e.shape, f"{where}: shape {g.shape} vs {e.shape}"
    if exact or g.dtype.kind not in "fc":
        np.testing.assert_array_equal(g, e, err_msg=where)
    else:
        tolerance = 1e-4 if g.dtype == np.float32 else 1e-9
        np.testing.assert_allclose(g, e, rtol=tolerance, atol=tolerance, equal_nan=True, err_msg=where)


def check_vectorized(f: Function, flags: list[bool], columns: list[list[Any]], clients: int, ragged: bool,
                     exact: bool = False, program=None, lenient_names: bool = False) -> None:
    """vectorize(f) on stacked inputs == f run client by client, stacked."""
    program = program or helpers()
    g = vectorize(f, tuple(flags), program, ragged=ragged)
    if verify_function is not None:
        verify_function(g, program.functions)
    interpreter = Interpreter(program)
    with np.errstate(all="ignore"):
        expected = [interpreter.run(f, [column[c] for column in columns]) for c in range(clients)]
        args = [stack_clients(column, ragged) if batched else column[0] for column, batched in zip(columns, flags)]
        got = interpreter.run(g, args)
    for c, (value, want) in enumerate(zip(unstack_clients(got, clients, ragged), expected)):
        assert_same(value, want, exact, f"client {c}", lenient_names)


def _draw_flags(data, n: int) -> list[bool]:
    flags = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="batched")
    if not any(flags):
        flags[data.draw(st.integers(0, n - 1), label="first batched")] = True
    return flags


def _has_sequence(t: Type) -> bool:
    return isinstance(t, SequenceType) or (isinstance(t, StructType) and any(_has_sequence(f) for f in t.types))


# ---- the table ---------------------------------------------------------------------------------------

def test_every_primitive_has_a_batching_rule_or_is_an_unbatched_intrinsic():
    missing = [n for n, p in PRIMITIVES.items() if p.batch is None and n not in UNBATCHED_INTRINSICS]
    stale = [n for n in UNBATCHED_INTRINSICS if n not in PRIMITIVES or PRIMITIVES[n].batch is not None]
    local = [n for n in UNBATCHED_INTRINSICS if n in PRIMITIVES and not PRIMITIVES[n].federated]
    assert not missing, f"no batching rule and not listed as an unbatched intrinsic: {missing}"
    assert not stale, f"listed as unbatched but unknown or with a rule: {stale}"
    assert not local, f"only federated intrinsics go unbatched: {local}"
    assert {n for n, p in PRIMITIVES.items() if p.federated} == UNBATCHED_INTRINSICS


def test_every_local_primitive_has_a_case():
    local = {n for n, p in PRIMITIVES.items() if not p.federated}
    assert set(CASES) | NO_CASE == local, (f"no case: {sorted(local - set(CASES) - NO_CASE)}; "
                                           f"not a local primitive: {sorted(set(CASES) - local)}")


def test_every_primitive_has_a_lowering_slot():
    assert all(hasattr(p, "lowering") for p in PRIMITIVES.values())
    assert "lowering(*inputs, **attrs)" in type(PRIMITIVES["add"]).__doc__


# ---- every local primitive, one node at a time ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
@FEW
@given(data=st.data())
def test_batching_rule_matches_per_client_runs(name, data):
    case_ = CASES[name](data)
    clients = data.draw(st.integers(1, 6), label="clients")
    flags = _draw_flags(data, len(case_.types))
    ragged = any(_has_sequence(t) for t in case_.types) and data.draw(st.booleans(), label="ragged")
    columns = client_values(data, case_, flags, clients, ragged)
    f = make_function(case_.types, case_.build)
    check_vectorized(f, flags, columns, clients, ragged, exact=case_.exact)


# ---- whole client functions -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def fedavg():
    return fedlang.load(str(ROOT / "examples" / "fedavg_digits.fed"), optimize=False).program


def _batch(rs, n: int) -> Struct:
    return Struct((rs.rand(n, 64).astype(np.float32), rs.randint(0, 10, n).astype(np.int32)), ("x", "y"))


def _models(rs, clients: int) -> list[Struct]:
    program = fedavg()
    base = Interpreter(program).run(program.functions["initial_model"], [])
    return [Struct([v + rs.normal(0, 0.05, v.shape).astype(np.float32) for v in base.values], base.names)
            for _ in range(clients)]


# (clients, batches per client, batch size, model batched, seed); no batches at all is the
# case test_empty_sequences_need_ragged_to_tell_the_number_of_clients covers
fedavg_data = st.tuples(st.integers(1, 6), st.integers(1, 3), st.integers(1, 5), st.booleans(), st.integers(0, 99))


@settings(max_examples=6)
@given(fedavg_data, st.sampled_from(["client_update", "client_metrics"]))
def test_fedavg_client_functions_with_equal_batches(setup, name):
    clients, batches, size, model_batched, seed = setup
    rs = np.random.RandomState(seed)
    models = _models(rs, clients) if model_batched else _models(rs, 1) * clients
    data = [[_batch(rs, size) for _ in range(batches)] for _ in range(clients)]
    check_vectorized(fedavg().functions[name], [model_batched, True], [models, data], clients, ragged=False,
                     program=fedavg())


@settings(max_examples=6)
@given(st.integers(1, 6), st.data())
def test_fedavg_client_functions_with_ragged_batches(clients, data):
    """Clients with different numbers of batches (and batch sizes per step): the step mask."""
    rs = np.random.RandomState(data.draw(st.integers(0, 99)))
    counts = data.draw(st.lists(st.integers(1, 4), min_size=clients, max_size=clients), label="batches")
    sizes = data.draw(st.lists(st.integers(1, 6), min_size=max(counts), max_size=max(counts)), label="sizes")
    model_batched = data.draw(st.booleans())
    models = _models(rs, clients) if model_batched else _models(rs, 1) * clients
    batches = [[_batch(rs, sizes[t]) for t in range(n)] for n in counts]
    for name in ("client_update", "client_metrics"):
        check_vectorized(fedavg().functions[name], [model_batched, True], [models, batches], clients, ragged=True,
                         program=fedavg())
    check_vectorized(fedavg().functions["example_count"], [True], [batches], clients, ragged=True, program=fedavg())


def test_client_update_ragged_example():
    """Three clients with 3, 1 and 2 batches: each model equals its own SGD epoch."""
    program = fedavg()
    rs = np.random.RandomState(7)
    models = _models(rs, 3)
    data = [[_batch(rs, 4) for _ in range(n)] for n in (3, 1, 2)]
    g = vectorize(program.functions["client_update"], (True, True), program, ragged=True)
    out = Interpreter(program).run(g, [stack_clients(models), stack_clients(data, ragged=True)])
    for c, model in enumerate(unstack_clients(out, 3)):
        alone = Interpreter(program).run(program.functions["client_update"], [models[c], data[c]])
        assert_same(model, alone, exact=False)
    untouched = Interpreter(program).run(g, [stack_clients(models),
                                              stack_clients([data[0], [], data[2]], ragged=True)])
    assert_same(unstack_clients(untouched, 3)[1], models[1], exact=True)     # no batches: the model it got


LOOPS = """
type Batch = <x=float32[?,3],y=float32[?]>
fn loss(w: float32[3], data: Batch*) -> float32 =
  reduce(data, 0.0, fn(acc: float32, b: Batch) -> float32 = acc + mean(square(matmul(b.x, w) - b.y)))
fn gradient(w: float32[3], data: Batch*) -> float32[3] = grad(loss)(w, data)
fn value_and_gradient(w: float32[3], data: Batch*) -> <float32,float32[3]> = value_and_grad(loss)(w, data)
fn mapped(w: float32[3], data: Batch*) -> float32 =
  reduce(map(data, fn(b: Batch) -> float32[?] = matmul(b.x, w)), 0.0, fn(a: float32, p: float32[?]) -> float32 = a + sum(p))
fn mapped_gradient(w: float32[3], data: Batch*) -> float32[3] = grad(mapped)(w, data)
fn captured(w: float32[3], data: Batch*) -> float32 {
  let f = fn(s: float32) -> float32 =
    s * cast(count(data), float32) + reduce(data, s, fn(a: float32, b: Batch) -> float32 = a + sum(b.y))
  return f(sum(w))
}
"""


@functools.lru_cache(maxsize=None)
def loops():
    result = fedlang.check_source(textwrap.dedent(LOOPS), "loops.fed")
    assert result.ok, result.render()
    return compile_ir(result, optimize=False)


@pytest.mark.parametrize("name", ["loss", "gradient", "value_and_gradient", "mapped", "mapped_gradient", "captured"])
@settings(max_examples=4)
@given(data=st.data())
def test_gradients_through_loops_and_lambdas_capturing_client_data(name, data):
    """grad of a reduce is a forward scan, a zip and a reverse scan (fedlang.ir.autodiff):
    all of it vectorized, with ragged data too; a lambda captures the client's data."""
    clients = data.draw(st.integers(1, 5), label="clients")
    ragged = data.draw(st.booleans(), label="ragged")
    counts = data.draw(st.lists(st.integers(0, 3), min_size=clients, max_size=clients)) if ragged \
        else [data.draw(st.integers(1, 3))] * clients
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=3, max_size=3), label="sizes")
    rs = np.random.RandomState(data.draw(st.integers(0, 99), label="seed"))
    batches = [[Struct((rs.rand(sizes[t], 3).astype(np.float32), rs.rand(sizes[t]).astype(np.float32)), ("x", "y"))
                for t in range(n)] for n in counts]
    w_batched = data.draw(st.booleans(), label="w batched")
    ws = [rs.rand(3).astype(np.float32) for _ in range(clients)] if w_batched \
        else [rs.rand(3).astype(np.float32)] * clients
    check_vectorized(loops().functions[name], [w_batched, True], [ws, batches], clients, ragged, program=loops())


# ---- generated programs -------------------------------------------------------------------------------------

def _generated_programs():
    try:
        from fedlang.testing.strategies import programs
    except ImportError:      # pragma: no cover - the strategies module is another engineer's
        return None
    return programs


def _random_value(t: Type, rng: np.random.Generator, unknown: int, length: int):
    if isinstance(t, TensorType):
        shape = tuple(unknown if d is None else d for d in t.shape)
        if t.dtype == BOOL:
            return np.asarray(rng.random(shape) < 0.5)
        if t.dtype == "string":
            return np.asarray(rng.choice(["a", "b"], size=shape), np.str_)
        if t.dtype.startswith("float"):
            return np.asarray(rng.uniform(-3, 3, shape), t.dtype)
        return np.asarray(rng.integers(0 if t.dtype == "uint8" else -5, 6, shape), t.dtype)
    if isinstance(t, StructType):
        return Struct([_random_value(f, rng, unknown, length) for f in t.types], t.names)
    if isinstance(t, SequenceType):
        return [_random_value(t.element, rng, unknown, 2) for _ in range(length)]
    raise TypeError(t)


@pytest.mark.skipif(_generated_programs() is None, reason="fedlang.testing.strategies.programs() is not available")
@settings(max_examples=100)
@given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1))
def test_generated_functions_vectorize_like_per_client_runs(data, seed):
    """Every local fn of a random well-typed program, random parameters batched."""
    from hypothesis import reject

    from fedlang.ir.types import FunctionType, is_placed
    from fedlang.ir.verify import verify

    generated = data.draw(_generated_programs()(process=False))
    try:
        program = compile_ir(fedlang.check_source(generated.source, "generated.fed"), optimize=False)
        verify(program, "build")
    except Exception:        # noqa: BLE001 - the program's own IR is ill-formed: a builder bug (see the report)
        reject()
    rng = np.random.default_rng(seed)
    for name, f in program.functions.items():
        if f.federated or not f.params or isinstance(f.result_type, FunctionType) \
                or any(isinstance(t, FunctionType) or is_placed(t) for _, t in f.params):
            continue
        clients, unknown, ragged = int(rng.integers(1, 4)), int(rng.integers(1, 3)), bool(rng.random() < 0.5)
        flags = [bool(rng.random() < 0.6) for _ in f.params]
        flags[int(rng.integers(0, len(flags)))] = True
        columns = []
        for (_, t), batched in zip(f.params, flags):
            if batched:
                lengths = [int(rng.integers(0, 3)) for _ in range(clients)] if ragged else [int(rng.integers(1, 3))] * clients
                columns.append([_random_value(t, rng, unknown, n) for n in lengths])
            else:
                columns.append([_random_value(t, rng, unknown, int(rng.integers(1, 3)))] * clients)
        try:
            with np.errstate(all="ignore"):
                for c in range(clients):
                    Interpreter(program).run(f, [column[c] for column in columns])
        except Exception:    # noqa: BLE001 - the reference fails (an index out of range, ...)
            continue
        check_vectorized(f, flags, columns, clients, ragged, program=program, lenient_names=True)


# ---- the helpers and the limits ------------------------------------------------------------------------------

def test_stack_and_unstack_clients_round_trip():
    values = [Struct((np.full(2, c, np.float32), [np.int32(c)] * (c + 1)), ("a", "s")) for c in range(3)]
    stacked = stack_clients(values, ragged=True)
    assert stacked.names == ("a", "s") and stacked.s.names == RAGGED_FIELDS
    np.testing.assert_array_equal(stacked.s.lengths, [1, 2, 3])
    assert len(stacked.s.elements) == 3 and stacked.s.elements[2].shape == (3,)
    assert unstack_clients(stacked, 3, ragged=True) == values
    with pytest.raises(ValueError, match="ragged=True"):
        stack_clients([[np.zeros(2)], []])


def test_unbatched_nodes_are_copied_and_the_model_is_not_broadcast():
    program = fedavg()
    g = vectorize(program.functions["client_metrics"], (False, True), program)
    step = next(node.attr("function") for _, node in g.nodes() if node.prim.name == "closure")
    nodes = [node for _, node in step.nodes()]
    assert "broadcast_leading" not in {node.prim.name for node in nodes}    # the shared model is not copied
    weights = [node for node in nodes if node.prim.name == "matmul"]
    assert [str(step.node(node.inputs[1]).type) for node in weights] == ["float32[64,32]", "float32[32,10]"]
    assert [str(node.type) for node in weights] == ["float32[?,?,32]", "float32[?,?,10]"]


def test_empty_sequences_need_ragged_to_tell_the_number_of_clients():
    program = fedavg()
    models = _models(np.random.RandomState(0), 1)
    g = vectorize(program.functions["client_update"], (False, True), program)
    with pytest.raises(FedlangRuntimeError, match="ragged=True"):
        Interpreter(program).run(g, [models[0], stack_clients([[], []])])
    g = vectorize(program.functions["client_update"], (False, True), program, ragged=True)
    out = Interpreter(program).run(g, [models[0], stack_clients([[], []], ragged=True)])
    assert_same(unstack_clients(out, 2)[1], models[0], exact=True)


def test_calls_of_unknown_function_values_are_not_vectorizable():
    source = "fn apply(f: (float32 -> float32), x: float32, y: float32) -> float32 = f(x) + y\n"
    program = compile_ir(fedlang.check_source(source, "apply.fed"), optimize=False)
    apply = program.functions["apply"]
    with pytest.raises(NotVectorizable, match="not known at compile time"):
        vectorize(apply, (False, True, False), program)
    g = vectorize(apply, (False, False, True), program)     # the call is the same for every client: copied
    assert [node.prim.name for _, node in g.nodes()].count("call") == 1
    with pytest.raises(NotVectorizable, match="number of clients"):
        vectorize(apply, (False, False, False), program)    # nothing batched: no client axis to give the result


def test_a_wrong_batching_rule_is_caught(monkeypatch):
    """add without aligning a batched scalar [C] to an unbatched [3]: NumPy pairs the
    client axis with the data axis (no error when C == 3), and the check sees it."""
    naive = replace(PRIMITIVES["add"], batch=lambda emit, node, inputs, batched: emit.same(node, inputs))
    monkeypatch.setitem(PRIMITIVES, "add", naive)
    f = make_function([T(F64), T(F64, 3)], lambda em, p: em("add", *p))
    columns = [[np.float64(c) * np.ones(()) for c in range(3)], [np.arange(3.0)] * 3]
    with pytest.raises(AssertionError):
        check_vectorized(f, [True, False], columns, 3, ragged=False)
