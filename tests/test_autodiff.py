"""Reverse-mode autodiff (fedlang.ir.autodiff, the `vjp` rules of the primitive table).

Every differentiable primitive: grad(f) of a small float64 program agrees with
central finite differences of f on random inputs (hypothesis), and so does the
gradient part of value_and_grad(f), whose value is f's. Composed programs: the
MLP loss of examples/fedavg_digits.fed, losses through reduce and map over
sequences of batches with lambdas capturing the model, leaf-wise struct
arithmetic, where, calls, closures, gradients of gradients. Plus the table
itself: every primitive that takes float tensors has a derivative rule or is
listed below as not differentiable.

Inputs that sit on a kink (relu at 0, ties of max, the branch point of a
condition) would make finite differences meaningless, so those tests draw
values from a grid that keeps them at least 1/64 away (the difference step is
1e-6).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import fedlang
from fedlang.api import compile_ir
from fedlang.diagnostics import FedlangError
from fedlang.ir import autodiff
from fedlang.ir import primitives as primitives_module
from fedlang.ir.graph import Function, Program, nested_functions
from fedlang.ir.interpreter import Interpreter
from fedlang.ir.primitives import PRIMITIVES
from fedlang.ir.types import FLOAT_DTYPES, StructType, TensorType, leaves, walk
from fedlang.ir.values import Struct, conform

try:                                     # the IR verifier (fedlang.ir.verify), where present
    from fedlang.ir import verify
except ImportError:                      # pragma: no cover
    verify = None

ROOT = Path(__file__).resolve().parent.parent

# A quarter of the profile's examples per parametrized case (there are many cases).
FEW = settings(max_examples=max(8, settings.default.max_examples // 4))


# ---- compiling and running ----------------------------------------------------------------------

class Prog:
    """A program compiled without passes, with grad_F / vg_F wrappers for each `fn F`
    whose first parameter is float and result a float scalar."""

    def __init__(self, src: str):
        base = _compile(src)
        wrappers = []
        for name, fn in base.functions.items():
            if not fn.params or not _float_result(fn.result_type) or not _float_tree(fn.params[0][1]):
                continue
            params = ", ".join(f"{n}: {t}" for n, t in fn.params)
            names = ", ".join(n for n, _ in fn.params)
            wrt = fn.params[0][1]
            wrappers.append(f"fn grad_{name}({params}) -> {wrt} = grad({name})({names})")
            wrappers.append(f"fn vg_{name}({params}) -> <{fn.result_type},{wrt}> = value_and_grad({name})({names})")
        self.program = _compile(src + "\n" + "\n".join(wrappers) + "\n")
        self.interpreter = Interpreter(self.program)

    def __call__(self, name: str, *args):
        fn = self.program.functions[name]
        values = [conform(a, t, n) for a, (n, t) in zip(args, fn.params)]
        return self.interpreter.call(name, values, 0)


def _compile(src: str) -> Program:
    result = fedlang.check_source(src)
    assert result.ok, result.render()
    compiled = compile_ir(result, optimize=False)
    if verify is not None:
        verify.verify(compiled)          # well-typed, well-wired IR (no grad node left)
    return compiled


def _float_result(t) -> bool:
    return isinstance(t, TensorType) and t.shape == () and t.dtype in FLOAT_DTYPES


def _float_tree(t) -> bool:
    return all(isinstance(x, (TensorType, StructType)) for x in walk(t)) and \
        all(leaf.dtype in FLOAT_DTYPES for leaf in leaves(t))


@functools.lru_cache(maxsize=None)
def program(src: str) -> Prog:
    return Prog(src)


# ---- finite differences ----------------------------------------------------------------------------

def flat(value) -> list[np.ndarray]:
    if isinstance(value, Struct):
        return [leaf for v in value.values for leaf in flat(v)]
    return [np.asarray(value)]


def rebuild(value, new: list[np.ndarray]):
    it = iter(new)

    def go(v):
        if isinstance(v, Struct):
            return Struct([go(x) for x in v.values], v.names)
        return next(it)

    return go(value)


def numeric_grad(f: Callable, args: list, eps: float) -> list[np.ndarray]:
    """Central differences of f(*args) w.r.t. every element of args[0]."""
    x0 = args[0]
    base = flat(x0)
    out = []
    for k, leaf in enumerate(base):
        g = np.zeros(leaf.shape, np.float64)
        for idx in np.ndindex(*leaf.shape):
            values = []
            for sign in (1, -1):
                copies = [b.copy() for b in base]
                copies[k][idx] = leaf[idx] + leaf.dtype.type(sign * eps)
                values.append((float(copies[k][idx]), float(f(rebuild(x0, copies), *args[1:]))))
            (xp, fp), (xm, fm) = values
            g[idx] = (fp - fm) / (xp - xm)
        out.append(g)
    return out


def check_grad(prog: Prog, name: str, args: list, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-6):
    """grad(name) and value_and_grad(name) at args against finite differences."""
    fn = prog.program.functions[name]
    args = [conform(a, t, n) for a, (n, t) in zip(args, fn.params)]
    analytic = flat(prog(f"grad_{name}", *args))
    value, analytic_vg = prog(f"vg_{name}", *args)
    numeric = numeric_grad(lambda *a: prog(name, *a), args, eps)
    assert len(analytic) == len(numeric)
    for a, n in zip(analytic, numeric):
        assert a.shape == n.shape
        np.testing.assert_allclose(a, n, rtol=rtol, atol=atol)
    for a, b in zip(flat(analytic_vg), analytic):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(value, prog(name, *args))
    return analytic


# ---- value strategies --------------------------------------------------------------------------------

def smooth(shape, lo=-2.0, hi=2.0):
    return arrays(np.float64, shape, elements=st.floats(lo, hi, allow_nan=False, allow_infinity=False))


def positive(shape):
    return smooth(shape, 0.5, 2.0)


def away_from_zero(shape, lo=0.5, hi=2.0):
    return arrays(np.float64, shape, elements=st.floats(lo, hi) | st.floats(-hi, -lo))


def half_grid(shape, unique=True):
    """Values (k + 1/2) / 32, distinct: never 0, never tied, at least 1/64 from any k / 32."""
    return arrays(np.float64, shape, elements=st.integers(-64, 63).map(lambda k: (k + 0.5) / 32), unique=unique)


def grid(shape):
    """Values k / 32: at least 1/64 away from every half_grid value."""
    return arrays(np.float64, shape, elements=st.integers(-64, 64).map(lambda k: k / 32))


def T(shape, dtype="float64") -> str:
    return dtype + ("[" + ",".join("?" if d is None else str(d) for d in shape) + "]" if shape else "")


@dataclass
class Case:
    """A program; `draw` gives the arguments of its `fn f`; `checks` are the functions
    to differentiate, with the order of f's arguments each takes."""
    id: str
    src: str
    draw: Callable
    checks: tuple = (("f", None),)
    eps: float = 1e-6
    rtol: float = 1e-5
    atol: float = 1e-6


def run_case(case: Case, data) -> None:
    prog = program(case.src)
    args = case.draw(data)
    for name, order in case.checks:
        check_grad(prog, name, args if order is None else [args[i] for i in order], case.eps, case.rtol, case.atol)


def draws(*strategies):
    return lambda data: [data.draw(s) for s in strategies]


# ---- per-primitive cases ------------------------------------------------------------------------------

def _binary_cases():
    ops = {
        "add": ("x + y", smooth, smooth), "sub": ("x - y", smooth, smooth), "mul": ("x * y", smooth, smooth),
        "div": ("x / y", smooth, away_from_zero),
        "mod": ("x % y", lambda s: away_from_zero(s, 0.1, 1.9), lambda s: smooth(s, 2.0, 3.0)),
        "pow": ("x ** y", positive, smooth),
        "maximum": ("maximum(x, y)", half_grid, grid), "minimum": ("minimum(x, y)", half_grid, grid),
    }
    shapes = [((2, 3), (3,)), ((2, 1), (1, 3))]
    scalar_shapes = [((), (2,)), ((2, 3), ())]
    for name, (expr, sx, sy) in ops.items():
        for xs, ys in shapes + (scalar_shapes if name in ("add", "mul", "div", "maximum") else []):
            os_ = np.broadcast_shapes(xs, ys)
            src = (f"fn f(x: {T(xs)}, y: {T(ys)}, w: {T(os_)}) -> float64 = sum(({expr}) * w)\n"
                   f"fn fy(y: {T(ys)}, x: {T(xs)}, w: {T(os_)}) -> float64 = f(x, y, w)\n")
            unique = name in ("maximum", "minimum")
            yield Case(f"{name}{list(xs)}{list(ys)}", src,
                       draws(sx(xs), sy(ys) if not unique else grid(ys), smooth(os_)),
                       (("f", None), ("fy", (1, 0, 2))))


def _unary_cases():
    ops = {"neg": ("-x", smooth), "relu": ("relu(x)", half_grid), "sigmoid": ("sigmoid(x)", smooth),
           "tanh": ("tanh(x)", smooth), "exp": ("exp(x)", smooth), "log": ("log(x)", positive),
           "sqrt": ("sqrt(x)", positive), "abs": ("abs(x)", half_grid), "square": ("square(x)", smooth)}
    for name, (expr, sx) in ops.items():
        yield Case(name, f"fn f(x: float64[2,3], w: float64[2,3]) -> float64 = sum({expr} * w)\n",
                   draws(sx((2, 3)), smooth((2, 3))))


def _literal_cases():
    # weak literals on either side are constants (no cotangent); the tensor side still gets one
    yield Case("pow_literal_exponent", "fn f(x: float64[3], w: float64[3]) -> float64 = sum((x ** 3 + x ** 0.5) * w)\n",
               draws(positive((3,)), smooth((3,))))
    yield Case("pow_literal_base", "fn f(x: float64[3], w: float64[3]) -> float64 = sum((2.0 ** x + 0.0 ** x) * w)\n",
               draws(positive((3,)), smooth((3,))))
    yield Case("literal_arith", "fn f(x: float64[3], w: float64[3]) -> float64 = "
               "sum((1.0 - x / 2.0 + 3.0 / x - (2 * x) % 5.0) * w)\n", draws(positive((3,)), smooth((3,))))


def _matmul_cases():
    shapes = [((2, 3), (3, 4)), ((3,), (3, 2)), ((2, 3), (3,)), ((3,), (3,)), ((2, 2, 3), (3, 2)),
              ((2, 3), (2, 3, 2)), ((2, 1, 2, 3), (3, 3, 2)), ((3,), (2, 3, 2)), ((2, 2, 3), (3,))]
    for a, b in shapes:
        out = np.matmul(np.zeros(a), np.zeros(b)).shape
        src = (f"fn f(a: {T(a)}, b: {T(b)}, w: {T(out)}) -> float64 = sum(matmul(a, b) * w)\n"
               f"fn fb(b: {T(b)}, a: {T(a)}, w: {T(out)}) -> float64 = f(a, b, w)\n")
        yield Case(f"matmul{list(a)}{list(b)}", src, draws(smooth(a), smooth(b), smooth(out)),
                   (("f", None), ("fb", (1, 0, 2))))
    src = ("fn f(a: float64[?,3], b: float64[3,2], w: float64[2]) -> float64 = sum(matmul(a, b) * w)\n"
           "fn fb(b: float64[3,2], a: float64[?,3], w: float64[2]) -> float64 = f(a, b, w)\n")
    yield Case("matmul_unknown_dim", src, draws(smooth((4, 3)), smooth((3, 2)), smooth((2,))),
               (("f", None), ("fb", (1, 0, 2))))


def _softmax_cases():
    for op in ("softmax", "log_softmax"):
        for axis in (-1, 0):
            yield Case(f"{op}_axis{axis}", f"fn f(x: float64[2,3], w: float64[2,3]) -> float64 = "
                       f"sum({op}(x, axis={axis}) * w)\n", draws(smooth((2, 3)), smooth((2, 3))))
    labels = arrays(np.int32, (2,), elements=st.integers(0, 2))
    yield Case("sparse_softmax_cross_entropy", "fn f(z: float64[2,3], y: int32[2], w: float64[2]) -> float64 = "
               "sum(sparse_softmax_cross_entropy(y, z) * w)\n", draws(smooth((2, 3)), labels, smooth((2,))))
    yield Case("sparse_softmax_cross_entropy_rank1", "fn f(z: float64[4], y: int32) -> float64 = "
               "sparse_softmax_cross_entropy(y, z)\n", draws(smooth((4,)), st.integers(0, 3)))


def _reduction_cases():
    for op in ("sum", "mean", "max", "min"):
        values = half_grid if op in ("max", "min") else smooth
        yield Case(f"{op}_all", f"fn f(x: float64[2,3], w: float64) -> float64 = {op}(x) * w\n",
                   draws(values((2, 3)), smooth(())))
        for axis, kept in ((0, 3), (1, 2), (-1, 2)):
            yield Case(f"{op}_axis{axis}", f"fn f(x: float64[2,3], w: float64[{kept}]) -> float64 = "
                       f"sum({op}(x, axis={axis}) * w)\n", draws(values((2, 3)), smooth((kept,))))
    yield Case("mean_unknown_dims", "fn f(x: float64[?,3], w: float64[3]) -> float64 = "
               "sum(mean(x, axis=0) * w) + mean(x) * w[0] + sum(mean(x, axis=1))\n",
               draws(smooth((4, 3)), smooth((3,))))
    yield Case("sum_unknown_dims", "fn f(x: float64[?,3], w: float64[3]) -> float64 = sum(sum(x, axis=0) * w)\n",
               draws(smooth((2, 3)), smooth((3,))))


def _shape_cases():
    yield Case("reshape", "fn f(x: float64[2,3], w: float64[3,2], v: float64[6]) -> float64 = "
               "sum(reshape(x, [3,2]) * w) + sum(reshape(x, [-1]) * v)\n",
               draws(smooth((2, 3)), smooth((3, 2)), smooth((6,))))
    yield Case("reshape_unknown", "fn f(x: float64[?,3], w: float64[?]) -> float64 = sum(reshape(x, [-1]) * w)\n",
               draws(smooth((2, 3)), smooth((6,))))
    yield Case("index", "fn f(x: float64[3,2], w: float64[2]) -> float64 = sum(x[1] * w) + sum(x[2] * x[1])\n",
               draws(smooth((3, 2)), smooth((2,))))
    yield Case("cast_float", "fn f(x: float64[3], w: float64[3]) -> float64 = sum(cast(x, float64) * w) "
               "+ sum(cast(cast(x, int32), float64))\n", draws(half_grid((3,)), smooth((3,))))
    yield Case("cast_from_float32", "fn f(x: float32[3], w: float64[3]) -> float64 = sum(cast(x, float64) * w)\n",
               draws(arrays(np.float32, (3,), elements=st.floats(-2, 2, width=32)), smooth((3,))),
               eps=1e-2, rtol=1e-4, atol=1e-4)
    yield Case("zeros_ones_like", "fn f(x: float64[3], w: float64[3]) -> float64 = "
               "sum((zeros_like(x) + ones_like(x)) * x * w) + sum(zeros_like(x * x))\n",
               draws(smooth((3,)), smooth((3,))))


def _selection_cases():
    yield Case("where", "fn f(x: float64[2,3], w: float64[2,3]) -> float64 = "
               "sum(where(x > 0.0, x * x, 3.0 * x) * w)\n", draws(half_grid((2, 3)), smooth((2, 3))))
    src = ("fn f(x: float64[2,3], b: float64[3], a: float64, w: float64[2,3]) -> float64 = "
           "sum(where(x > 0.0, a, b) * w)\n"
           "fn fb(b: float64[3], x: float64[2,3], a: float64, w: float64[2,3]) -> float64 = f(x, b, a, w)\n"
           "fn fa(a: float64, x: float64[2,3], b: float64[3], w: float64[2,3]) -> float64 = f(x, b, a, w)\n")
    yield Case("where_broadcast", src, draws(half_grid((2, 3)), smooth((3,)), smooth(()), smooth((2, 3))),
               (("fb", (1, 0, 2, 3)), ("fa", (2, 0, 1, 3))))
    yield Case("clip_literals", "fn f(x: float64[2,3], w: float64[2,3]) -> float64 = sum(clip(x, -0.5, 0.5) * w)\n",
               draws(half_grid((2, 3)), smooth((2, 3))))
    src = ("fn f(x: float64[2,3], lo: float64, hi: float64, w: float64[2,3]) -> float64 = "
           "sum(clip(x, lo, hi) * w)\n"
           "fn flo(lo: float64, x: float64[2,3], hi: float64, w: float64[2,3]) -> float64 = f(x, lo, hi, w)\n"
           "fn fhi(hi: float64, x: float64[2,3], lo: float64, w: float64[2,3]) -> float64 = f(x, lo, hi, w)\n")
    bounds = st.tuples(st.integers(-40, 40), st.integers(-40, 40)).filter(lambda b: b[0] != b[1])

    def draw_clip(data):
        lo, hi = data.draw(bounds)
        return [data.draw(half_grid((2, 3))), np.float64(lo / 32), np.float64(hi / 32), data.draw(smooth((2, 3)))]

    yield Case("clip_bounds", src, draw_clip, (("f", None), ("flo", (1, 0, 2, 3)), ("fhi", (2, 0, 1, 3))))
    yield Case("cond", "fn f(x: float64[3], w: float64[3]) -> float64 = "
               "sum((if sum(x) > 0.0 then x * x else 3.0 * x) * w)\n", draws(half_grid((3,)), smooth((3,))))
    yield Case("cond_struct", "type M = <a=float64[2],b=float64>\n"
               "fn f(m: M, c: bool) -> float64 { let s = if c then m else (a = m.a * 2.0, b = m.b * m.b)\n"
               "  return sum(s.a * s.a) + s.b }\n", draws(_struct_m(), st.booleans()))


def _struct_m():
    return st.builds(lambda a, b: Struct([a, b], ["a", "b"]), smooth((2,)), smooth(()))


def _struct_cases():
    yield Case("global_norm_tensor", "fn f(x: float64[2,3]) -> float64 = global_norm(x)\n",
               draws(half_grid((2, 3))))
    yield Case("global_norm_struct", "fn f(m: <a=float64[2],b=<c=float64[3]>>) -> float64 = global_norm(m)\n",
               draws(st.builds(lambda a, c: Struct([a, Struct([c], ["c"])], ["a", "b"]),
                               half_grid((2,)), half_grid((3,)))))
    yield Case("struct_select", "type N = <a=float64[2],b=<c=float64[3],d=float64>>\n"
               "fn f(m: N, w: float64[2]) -> float64 {\n"
               "  let s = (p = m.b, q = m.a * w, r = (m.a, m.b.d))\n"
               "  let (u, v) = s.r\n"
               "  return sum(s.q) + sum(s.p.c * m.b.d) + m.b.d * m.b.d + sum(u * v) + s[2][1] }\n",
               draws(st.builds(lambda a, c, d: Struct([a, Struct([c, d], ["c", "d"])], ["a", "b"]),
                               smooth((2,)), smooth((3,)), smooth(())), smooth((2,))))
    src = ("type M = <w=float64[2,2],b=float64[2]>\n"
           "fn f(m: M, g: M, lr: float64, v: M) -> float64 {\n"
           "  let n = m - lr * g * m + 1.0\n"
           "  let o = relu(n) / (2.0 + m * m) + exp(-m) - square(m) * lr + clip(m, -0.5, 0.5) + maximum(m, lr)\n"
           "  let p = (o + cast(m, float64) ** 2 + tanh(sigmoid(m)) - abs(n) % 7.0 + minimum(lr, -m)) * v\n"
           "  return sum(p.w) + sum(p.b) + sum(sqrt(abs(n)).b) + sum(log(1.0 + m * m).w) }\n"
           "fn flr(lr: float64, m: M, g: M, v: M) -> float64 = f(m, g, lr, v)\n"
           "fn fg(g: M, m: M, lr: float64, v: M) -> float64 = f(m, g, lr, v)\n")
    model = st.builds(lambda w, b: Struct([w, b], ["w", "b"]), half_grid((2, 2)), half_grid((2,)))
    smooth_model = st.builds(lambda w, b: Struct([w, b], ["w", "b"]), smooth((2, 2)), smooth((2,)))

    def draw(data):
        # relu and abs have a kink at n = 0; maximum(m, lr) never ties (half grid vs grid)
        m, g, v = data.draw(model), data.draw(smooth_model), data.draw(smooth_model)
        lr = np.float64(data.draw(st.integers(-8, 8)) / 32)
        for mk, gk in zip(m.values, g.values):
            assume(np.abs(mk - lr * gk * mk + 1.0).min() > 0.05)
        return [m, g, lr, v]

    yield Case("struct_leafwise", src, draw, (("f", None), ("flr", (2, 0, 1, 3)), ("fg", (1, 0, 2, 3))))


def _function_cases():
    yield Case("closure_capture", "fn f(x: float64[3], w: float64[3]) -> float64 {\n"
               "  let h = fn(y: float64[3]) -> float64 = sum(x * y * w)\n"
               "  let k = fn(z: float64[3]) -> float64 = h(z) * h(x)\n"
               "  return h(x) + h(w) + k(tanh(x)) }\n", draws(smooth((3,)), smooth((3,))))
    yield Case("calls", "fn h(a: float64[3], b: float64[3]) -> float64[3] = sin_like(a) * b\n"
               "fn sin_like(a: float64[3]) -> float64[3] = tanh(a) * a\n"
               "fn g(p: <a=float64[3],b=float64[3]>) -> float64 = sum(h(p.a, p.b))\n"
               "fn f(x: float64[3], w: float64[3]) -> float64 = g((a = x, b = w)) + g((a = w, b = x * x))\n",
               draws(smooth((3,)), smooth((3,))))


_BATCH = "type B = <x=float64[?,2],y=float64[?]>\ntype M = <w=float64[2],b=float64>\n"


def _batches(max_batches=3):
    def batch(n):
        return st.builds(lambda x, y: Struct([x, y], ["x", "y"]), smooth((n, 2)), smooth((n,)))
    return st.lists(st.integers(1, 3).flatmap(batch), min_size=0, max_size=max_batches)


def _model():
    return st.builds(lambda w, b: Struct([w, b], ["w", "b"]), smooth((2,)), smooth(()))


def _loop_cases():
    loss = "fn loss(m: M, b: B) -> float64 = mean(square(tanh(matmul(b.x, m.w) + m.b) - b.y))\n"
    yield Case("reduce_capturing_model", _BATCH + loss +
               "fn f(m: M, data: B*) -> float64 = reduce(data, 0.0, fn(acc: float64, b: B) -> float64 = "
               "acc + loss(m, b) * (1.0 + acc))\n", draws(_model(), _batches()))
    yield Case("reduce_model_as_accumulator", _BATCH +
               "fn step(acc: M, b: B) -> M = (w = acc.w - 0.1 * tanh(acc.w) * sum(b.y), b = acc.b * mean(b.x))\n"
               "fn f(m: M, data: B*) -> float64 { let r = reduce(data, m, step)\n"
               "  return sum(r.w * r.w) + r.b }\n", draws(_model(), _batches()))
    yield Case("reduce_int_accumulator_field", _BATCH + loss +
               "fn f(m: M, data: B*) -> float64 {\n"
               "  let t = reduce(data, (s = cast(0.0, float64), n = 0), fn(acc: <s=float64,n=int32>, b: B) -> <s=float64,n=int32> =\n"
               "    (s = acc.s + loss(m, b), n = acc.n + 1))\n"
               "  return t.s / (1.0 + cast(t.n, float64)) + m.b }\n", draws(_model(), _batches()))
    yield Case("map_then_reduce", _BATCH +
               "fn f(m: M, data: B*) -> float64 {\n"
               "  let preds = map(data, fn(b: B) -> float64[?] = tanh(matmul(b.x, m.w)) * m.b)\n"
               "  return reduce(preds, 0.0, fn(acc: float64, p: float64[?]) -> float64 = acc * 0.5 + sum(p * p)) }\n",
               draws(_model(), _batches()))
    yield Case("reduce_captured_lambda", _BATCH +
               "fn f(m: M, data: B*) -> float64 {\n"
               "  let h = fn(b: B) -> float64 = sum(tanh(matmul(b.x, m.w))) * m.b\n"
               "  return reduce(data, 0.0, fn(acc: float64, b: B) -> float64 = acc + h(b) * h(b)) }\n",
               draws(_model(), _batches()))
    yield Case("nested_reduce", _BATCH +
               "fn f(m: M, data: B*) -> float64 = reduce(data, 0.0, fn(acc: float64, b: B) -> float64 =\n"
               "  acc + reduce(data, m.b, fn(inner: float64, c: B) -> float64 = inner * 0.5 + sum(b.y) * "
               "sum(matmul(c.x, m.w))))\n", draws(_model(), _batches()))


def _more_cases():
    yield Case("grad_of_a_later_fn", "fn f(x: float64[2], w: float64[2]) -> float64 = sum(grad(later)(x, w) * w)\n"
               "fn later(x: float64[2], w: float64[2]) -> float64 = sum(tanh(x) * w) * sum(x)\n",
               draws(smooth((2,)), smooth((2,))))
    yield Case("nested_struct_arithmetic", "type N = <a=float64[2],b=<c=float64[3],d=float64>>\n"
               "fn f(m: N, v: N) -> float64 { let n = m * v - 0.5 * exp(m) / (1.0 + m * m)\n"
               "  return sum(n.a) + sum(n.b.c) + n.b.d }\n",
               draws(*[st.builds(lambda a, c, d: Struct([a, Struct([c, d], ["c", "d"])], ["a", "b"]),
                                 smooth((2,)), smooth((3,)), smooth(()))] * 2))
    # a struct holding a sequence goes through a condition, then the sequence through reduce
    yield Case("struct_with_sequence", "fn f(m: float64[2], data: float64[2]*, c: bool) -> float64 {\n"
               "  let s = if c then (a = m, d = data) else (a = m * 2.0, d = map(data, fn(x: float64[2]) -> "
               "float64[2] = x * m))\n"
               "  return sum(s.a) + reduce(s.d, 0.0, fn(acc: float64, x: float64[2]) -> float64 = "
               "acc + sum(tanh(x * m))) }\n",
               draws(smooth((2,)), st.lists(smooth((2,)), max_size=3), st.booleans()))


def _random_cases():
    yield Case("random_normal", "fn f(s: float64, w: float64[3]) -> float64 = "
               "sum(cast(random_normal([3], s, 7), float64) * w)\n", draws(positive(()), smooth((3,))),
               eps=1e-2, rtol=1e-4, atol=1e-4)
    src = ("fn f(lo: float64, hi: float64, w: float64[3]) -> float64 = "
           "sum(cast(random_uniform([3], lo, hi, 3), float64) * w)\n"
           "fn fhi(hi: float64, lo: float64, w: float64[3]) -> float64 = f(lo, hi, w)\n")
    yield Case("random_uniform", src, draws(smooth(()), smooth(()), smooth((3,))),
               (("f", None), ("fhi", (1, 0, 2))), eps=1e-2, rtol=1e-4, atol=1e-4)
    src = ("type M = <a=float64[2],b=float64[3]>\n"
           "fn f(s: float64, m: M) -> float64 = global_norm(random_normal_like(m, s, 5))\n"
           "fn fm(m: M, s: float64) -> float64 = global_norm(random_normal_like(m, s, 5)) + sum(m.a)\n")
    yield Case("random_normal_like", src,
               draws(positive(()), st.builds(lambda a, b: Struct([a, b], ["a", "b"]), smooth((2,)), smooth((3,)))),
               (("f", None), ("fm", (1, 0))), eps=1e-2, rtol=1e-4, atol=1e-4)


CASES = [*_binary_cases(), *_unary_cases(), *_literal_cases(), *_matmul_cases(), *_softmax_cases(),
         *_reduction_cases(), *_shape_cases(), *_selection_cases(), *_struct_cases(), *_function_cases(),
         *_loop_cases(), *_more_cases(), *_random_cases()]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@FEW
@given(data=st.data())
def test_gradient_matches_finite_differences(case, data):
    run_case(case, data)


# ---- targeted cases ---------------------------------------------------------------------------------

def test_ties_share_the_cotangent():
    prog = program("fn f(x: float64[4]) -> float64 = max(x) + minimum(x[0], x[1]) + sum(max(reshape(x, [2,2]), axis=1))\n")
    g = prog("grad_f", np.array([1.0, 1.0, 0.0, 1.0]))
    # max: a third to each of the three 1.0s; minimum(1, 1): half each; row maxima [1,1] and [0,1]
    np.testing.assert_allclose(g, [1 / 3 + 0.5 + 0.5, 1 / 3 + 0.5 + 0.5, 0.0, 1 / 3 + 1.0])


def test_relu_at_zero_and_abs_at_zero_have_zero_derivative():
    prog = program("fn f(x: float64[2]) -> float64 = sum(relu(x)) + sum(abs(x))\n")
    np.testing.assert_array_equal(prog("grad_f", np.array([0.0, 2.0])), [0.0, 2.0])


def test_empty_sequence_gives_zero_gradient_and_passes_the_initial_cotangent():
    src = _BATCH + ("fn f(m: M, data: B*) -> float64 = reduce(data, m.b * 3.0, fn(acc: float64, b: B) -> float64 = "
                    "acc * sum(matmul(b.x, m.w)))\n")
    prog = program(src)
    g = prog("grad_f", Struct([np.array([1.0, 2.0]), np.float64(0.5)], ["w", "b"]), [])
    np.testing.assert_array_equal(g.w, [0.0, 0.0])
    assert g.b == 3.0


def test_value_and_grad_returns_the_value():
    prog = program(_BATCH + "fn f(m: M, b: B) -> float64 = mean(square(matmul(b.x, m.w) + m.b - b.y))\n")
    m = Struct([np.array([0.5, -1.0]), np.float64(0.25)], ["w", "b"])
    b = Struct([np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, -1.0])], ["x", "y"])
    value, g = prog("vg_f", m, b)
    residual = b.x @ m.w + m.b - b.y
    assert value == pytest.approx(np.mean(residual ** 2))
    np.testing.assert_allclose(g.w, 2 * residual @ b.x / 2)
    assert g.b == pytest.approx(np.mean(2 * residual))


def test_gradient_of_a_gradient():
    # f(x) = sum(grad(cube)(x) * w) = sum(3 x^2 w): the rules of the internal nodes are differentiated too
    src = ("fn cube(x: float64[3]) -> float64 = sum(x * x * x) + mean(x) + max(x)\n"
           "fn f(x: float64[3], w: float64[3]) -> float64 = sum(grad(cube)(x) * w)\n")
    x, w = np.array([0.5, -1.0, 2.0]), np.array([1.0, 2.0, 3.0])
    g = check_grad(program(src), "f", [x, w])
    np.testing.assert_allclose(g[0], 6 * x * w)


def test_gradient_of_a_gradient_through_reduce_and_map():
    src = _BATCH + ("fn over(m: M, data: B*) -> float64 = reduce(data, 0.0, fn(acc: float64, b: B) -> float64 = "
                    "acc * 0.5 + sum(tanh(matmul(b.x, m.w) * m.b)))\n"
                    "fn mapped(m: M, data: B*) -> float64 = reduce(map(data, fn(b: B) -> float64[?] = "
                    "matmul(b.x, m.w) * m.b), 0.0, fn(acc: float64, p: float64[?]) -> float64 = acc + sum(tanh(p)))\n"
                    "fn f(m: M, data: B*, v: M) -> float64 { let g = grad(over)(m, data)\n"
                    "  let h = grad(mapped)(m, data)\n"
                    "  return sum(g.w * v.w) + g.b * v.b + sum(h.w * h.w) }\n")
    rs = np.random.RandomState(1)
    m = Struct([rs.randn(2), np.float64(0.7)], ["w", "b"])
    v = Struct([rs.randn(2), np.float64(-0.3)], ["w", "b"])
    data = [Struct([rs.randn(n, 2), rs.randn(n)], ["x", "y"]) for n in (2, 1, 3)]
    check_grad(program(src), "f", [m, data, v])


def test_calls_differentiated_without_inlining(monkeypatch):
    """The `call` rule (recompute the callee, then its backward pass) gives what inlining gives."""
    src = ("fn h(a: float64[3], b: float64[3]) -> float64[3] = tanh(a) * b\n"
           "fn f(x: float64[3], w: float64[3]) -> float64 {\n"
           "  let k = fn(y: float64[3]) -> float64 = sum(h(y, x) * w)\n"
           "  return k(x) + k(w) + sum(h(x, x)) }\n")
    x, w = np.array([0.3, -0.7, 1.1]), np.array([0.5, 2.0, -1.0])
    inlined = check_grad(Prog(src), "f", [x, w])
    monkeypatch.setattr(autodiff, "INLINE_CALLS", False)
    prog = Prog(src)
    assert any(n.prim.name == "call" for fn in _all_functions(prog.program)
               if fn.name.endswith(".grad") for _, n in fn.nodes())
    np.testing.assert_allclose(check_grad(prog, "f", [x, w])[0], inlined[0], rtol=1e-12)


def _all_functions(program: Program):
    for fn in program.functions.values():
        yield fn
        yield from nested_functions(fn)


def test_gradient_ir_is_ordinary_ir():
    src = (ROOT / "examples" / "fedavg_digits.fed").read_text()
    program_ = compile_ir(fedlang.check_source(src, str(ROOT / "examples" / "fedavg_digits.fed")), optimize=False)
    names = {n.prim.name for fn in _all_functions(program_) for _, n in fn.nodes()}
    assert "grad" not in names and "value_and_grad" not in names
    assert {"scan", "zip_seq"} & names == set()            # no loop in batch_loss: no loop derivative
    assert {"unbroadcast", "matrix_transpose"} <= names


def test_grad_of_a_function_value_is_E053():
    """The checker rejects it (the IR builder's own E053 is a second line of defence)."""
    src = "fn h(f: (float64 -> float64), x: float64) -> float64 = grad(f)(x)\n"
    result = fedlang.check_source(src)
    (d,) = result.diagnostics
    assert d.code == "E053" and d.message == "grad needs a function known at compile time"
    assert (d.span.line, d.span.column, d.span.end_column) == (1, 61, 62)


def test_a_wrong_rule_is_caught(monkeypatch):
    """The finite-difference check can fail: a tanh rule missing a factor is detected."""
    bad = replace(PRIMITIVES["tanh"], vjp=lambda emit, out, node, ct, wants: (emit("mul", ct, out),))
    monkeypatch.setitem(PRIMITIVES, "tanh", bad)
    monkeypatch.setitem(primitives_module.CALLABLE, "tanh", bad)
    prog = Prog("fn f(x: float64[3]) -> float64 = sum(tanh(x))\n")
    with pytest.raises(AssertionError):
        check_grad(prog, "f", [np.array([0.5, -0.2, 1.0])])


# ---- the MLP of examples/fedavg_digits.fed ------------------------------------------------------------

def _digits_program(dtype: str) -> Prog:
    text = (ROOT / "examples" / "fedavg_digits.fed").read_text()
    text = text[:text.index("# One step of plain SGD")].replace("float32", dtype)
    return program(text)


def _digits_model(rs, dtype):
    shapes = [("w1", (64, 32)), ("b1", (32,)), ("w2", (32, 10)), ("b2", (10,))]
    return Struct([(rs.randn(*s) * 0.3).astype(dtype) for _, s in shapes], [n for n, _ in shapes])


def _digits_batch(rs, n, dtype):
    return Struct([rs.rand(n, 64).astype(dtype), rs.randint(0, 10, n).astype(np.int32)], ["x", "y"])


def test_mlp_batch_loss_gradient_float64():
    prog = _digits_program("float64")
    rs = np.random.RandomState(0)
    m, b = _digits_model(rs, np.float64), _digits_batch(rs, 5, np.float64)
    g = flat(prog("grad_batch_loss", m, b))
    base = flat(m)
    for _ in range(4):                      # directional derivatives along random directions
        d = [rs.randn(*x.shape) for x in base]
        h = 1e-6
        plus = prog("batch_loss", rebuild(m, [x + h * y for x, y in zip(base, d)]), b)
        minus = prog("batch_loss", rebuild(m, [x - h * y for x, y in zip(base, d)]), b)
        numeric = (float(plus) - float(minus)) / (2 * h)
        analytic = sum(float(np.sum(gx * dx)) for gx, dx in zip(g, d))
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    for k, idx in ((1, (3,)), (3, (7,)), (0, (10, 5)), (2, (31, 9))):   # a few single coordinates
        e = [np.zeros_like(x) for x in base]
        e[k][idx] = 1.0
        h = 1e-6
        plus = prog("batch_loss", rebuild(m, [x + h * y for x, y in zip(base, e)]), b)
        minus = prog("batch_loss", rebuild(m, [x - h * y for x, y in zip(base, e)]), b)
        assert g[k][idx] == pytest.approx((float(plus) - float(minus)) / (2 * h), rel=1e-5, abs=1e-8)


def test_mlp_batch_loss_gradient_float32_agrees_with_float64():
    rs = np.random.RandomState(3)
    m64, b64 = _digits_model(rs, np.float64), _digits_batch(rs, 6, np.float64)
    m32 = Struct([x.astype(np.float32) for x in m64.values], m64.names)
    b32 = Struct([b64.x.astype(np.float32), b64.y], b64.names)
    m64 = Struct([x.astype(np.float64) for x in m32.values], m32.names)       # the same (rounded) values
    b64 = Struct([b32.x.astype(np.float64), b32.y], b32.names)
    g64 = flat(_digits_program("float64")("grad_batch_loss", m64, b64))
    g32 = flat(_digits_program("float32")("grad_batch_loss", m32, b32))
    for a, b in zip(g32, g64):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


def test_fedavg_example_trains():
    prog = fedlang.load(str(ROOT / "examples" / "fedavg_digits.fed"), optimize=False)
    rs = np.random.RandomState(0)
    batches = [dict(x=rs.rand(8, 64).astype(np.float32), y=rs.randint(0, 10, 8).astype(np.int32)) for _ in range(3)]
    m = prog.initial_model()
    before = prog.client_metrics(m, batches).loss
    after = prog.client_metrics(prog.client_update(m, batches), batches).loss
    assert after < before - 0.05


# ---- the table --------------------------------------------------------------------------------------

# Primitives that take float values but have no derivative rule, on purpose.
NOT_DIFFERENTIABLE = {
    # comparisons: bool results
    "eq", "ne", "lt", "le", "gt", "ge",
    # integer results
    "argmax", "size", "count", "num_examples",
    # expanded by the IR builder into ordinary nodes (fedlang.ir.autodiff): never in the IR
    "grad", "value_and_grad",
    # federated intrinsics: grad differentiates local computations (`fn`s)
    "federated_value", "federated_eval", "federated_broadcast", "federated_map", "federated_apply",
    "federated_zip", "federated_sum", "federated_mean", "federated_min", "federated_max",
    "federated_aggregate", "federated_secure_sum", "federated_median", "federated_trimmed_mean",
    "federated_clipped_mean", "federated_zeroing_mean", "federated_krum",
}

# Primitives that never take a float value: nothing to differentiate. Bool or integer
# operands (logical_*, one_hot), only static arguments (zeros, ones), or no inputs at
# all: the leaves of a graph (param, capture, global, const).
NO_FLOAT_INPUTS = {"logical_and", "logical_or", "logical_not", "one_hot", "zeros", "ones",
                   "param", "capture", "global", "const"}


def test_every_primitive_with_float_inputs_has_a_rule_or_is_listed():
    missing, stale = [], []
    for name, p in PRIMITIVES.items():
        if name in NO_FLOAT_INPUTS:
            continue
        if p.vjp is None and name not in NOT_DIFFERENTIABLE:
            missing.append(name)
        if p.vjp is not None and name in NOT_DIFFERENTIABLE:
            stale.append(name)
    assert not missing, f"no derivative rule and not listed as non-differentiable: {missing}"
    assert not stale, f"listed as non-differentiable but has a rule: {stale}"


def test_internal_autodiff_primitives_cannot_be_named_by_programs():
    internal = {"broadcast_to", "unbroadcast", "reshape_like", "expand_dims", "matrix_transpose",
                "one_hot_like", "scatter_row", "zip_seq", "scan"}
    assert internal <= set(PRIMITIVES)
    assert not internal & set(primitives_module.CALLABLE)
    result = fedlang.check_source("fn f(x: float32[3]) -> float32[3] = unbroadcast(x, x)\n")
    assert not result.ok


# The internal nodes, each differentiated on its own (hand-built IR: a program cannot name them).
def _internal(name: str, x_type: TensorType, build, w_shape):
    """fn f(x, w) = sum(build(emit, x) * w), differentiated with fedlang.ir.autodiff.grad_function."""
    f = Function(f"internal_{name}", (("x", x_type), ("w", TensorType("float64", w_shape))), TensorType("float64"))
    em = autodiff.Emitter(f, Program())
    x = em.typed("param", (), x_type, index=0)
    w = em.typed("param", (), TensorType("float64", w_shape), index=1)
    f.result = em("sum", em("mul", build(em, x), w))
    return f


INTERNAL_CASES = {
    "broadcast_to": ((2, 1), lambda em, x: em("broadcast_to", x, em("zeros", shape=(3, 2, 4), dtype="float64")),
                     (3, 2, 4)),
    "unbroadcast": ((3, 2, 4), lambda em, x: em("unbroadcast", x, em("zeros", shape=(2, 1), dtype="float64")),
                    (2, 1)),
    "reshape_like": ((2, 3), lambda em, x: em("reshape_like", x, em("zeros", shape=(3, 2), dtype="float64")),
                     (3, 2)),
    "expand_dims": ((2, 3), lambda em, x: em("expand_dims", x, axis=1), (2, 1, 3)),
    "matrix_transpose": ((2, 2, 3), lambda em, x: em("matrix_transpose", x), (2, 3, 2)),
    "scatter_row": ((3,), lambda em, x: em("scatter_row", x, em("zeros", shape=(4, 3), dtype="float64"),
                                            em.typed("const", (), TensorType("int32"), value=np.asarray(2, np.int32))), (4, 3)),
    "one_hot_like": ((2, 3), lambda em, x: em("add", x, em("one_hot_like", em.typed(
        "const", (), TensorType("int32", (2,)), value=np.array([0, 2], np.int32)), x)), (2, 3)),
}


@pytest.mark.parametrize("name", sorted(INTERNAL_CASES))
@FEW
@given(data=st.data())
def test_internal_primitive_gradients(name, data):
    shape, build, w_shape = INTERNAL_CASES[name]
    f = _internal(name, TensorType("float64", shape), build, w_shape)
    g = autodiff.grad_function(f, Program())
    if verify is not None:
        verify.verify_function(f)
        verify.verify_function(g)
    interpreter = Interpreter(Program())
    x, w = data.draw(smooth(shape)), data.draw(smooth(w_shape))
    analytic = interpreter.run(g, [x, w])
    numeric = numeric_grad(lambda x_, w_: interpreter.run(f, [x_, w_]), [x, w], 1e-6)[0]
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


def test_grad_of_let_bound_lambdas_inside_a_training_loop():
    """grad(loss) where loss is a lambda of an enclosing function (so a captured value
    in the loop's lambda), capturing another lambda: resolved at compile time, and equal
    to the same program written with top-level fns."""
    src = ("type M = <w=float64[2],b=float64>\n"
           "fn h_top(q: M, x: float64[2], m: M) -> float64 = sum(tanh(q.w * x)) * m.b\n"
           "fn loss_top(q: M, x: float64[2], m: M) -> float64 = h_top(q, x, m) * q.b\n"
           "fn inner_top(q: M, x: float64[2], m: M) -> float64 = loss_top(q, x, m) + h_top(q, x, m)\n"
           "fn train_top(m: M, data: float64[2]*) -> M = reduce(data, m, fn(acc: M, x: float64[2]) -> M =\n"
           "  acc - 0.1 * grad(loss_top)(acc, x, m) + 0.01 * grad(inner_top)(acc, x, m))\n"
           "fn train(m: M, data: float64[2]*) -> M {\n"
           "  let h = fn(q: M, x: float64[2]) -> float64 = sum(tanh(q.w * x)) * m.b\n"
           "  let loss = fn(q: M, x: float64[2]) -> float64 = h(q, x) * q.b\n"
           "  return reduce(data, m, fn(acc: M, x: float64[2]) -> M {\n"
           "    let inner = fn(q: M) -> float64 = loss(q, x) + h(q, x)\n"
           "    return acc - 0.1 * grad(loss)(acc, x) + 0.01 * grad(inner)(acc) })\n"
           "}\n")
    prog = program(src)
    m = Struct([np.array([1.0, 2.0]), np.float64(3.0)], ["w", "b"])
    data = [np.array([0.5, -1.0]), np.array([1.0, 1.0]), np.array([-0.25, 0.75])]
    got, want = prog("train", m, data), prog("train_top", m, data)
    for a, b in zip(flat(got), flat(want)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    w, b = m.w.copy(), float(m.b)                  # and by hand
    for x in data:
        t = np.tanh(w * x)
        gw, gb = (1 - t * t) * x * m.b * b, np.sum(t) * m.b
        iw, ib = gw + (1 - t * t) * x * m.b, gb
        w, b = w - 0.1 * gw + 0.01 * iw, b - 0.1 * gb + 0.01 * ib
    np.testing.assert_allclose(got.w, w, rtol=1e-12)
    assert got.b == pytest.approx(b, rel=1e-12)


def test_grad_of_a_lambda_captured_two_levels_down():
    src = ("fn f(m: float64[2], data: float64[2]*) -> float64 {\n"
           "  let loss = fn(q: float64[2], x: float64[2]) -> float64 = sum(tanh(q * x) * m)\n"
           "  return reduce(data, 0.0, fn(acc: float64, x: float64[2]) -> float64 =\n"
           "    acc + reduce(data, 0.0, fn(a: float64, y: float64[2]) -> float64 = a + sum(grad(loss)(m * y, x))))\n"
           "}\n")
    prog = program(src)
    m, data = np.array([0.5, -1.0]), [np.array([1.0, 2.0]), np.array([-0.5, 0.25])]
    want = sum(np.sum((1 - np.tanh(m * y * x) ** 2) * x * m) for x in data for y in data)
    assert float(prog("f", m, data)) == pytest.approx(want, rel=1e-12)
    # the loss is defined inside a loop's lambda and calls a lambda of the top-level fn
    src = ("fn f(m: float64[2], data: float64[2]*) -> float64 {\n"
           "  let h = fn(q: float64[2], x: float64[2]) -> float64 = sum(tanh(q * x) * m)\n"
           "  return reduce(data, 1.0, fn(acc: float64, x: float64[2]) -> float64 {\n"
           "    let loss = fn(q: float64[2]) -> float64 = h(q, x) * acc\n"
           "    return reduce(data, acc, fn(a: float64, y: float64[2]) -> float64 = a + sum(grad(loss)(m * y))) })\n"
           "}\n")
    prog = program(src)
    acc = 1.0
    for x in data:
        acc = acc + sum(np.sum((1 - np.tanh(m * y * x) ** 2) * x * m) * acc for y in data)
    assert acc != 1.0 and float(prog("f", m, data)) == pytest.approx(acc, rel=1e-12)


@pytest.mark.parametrize("body", [
    "g(x) * x",                                                          # a call of a run-time function
    "reduce(data, x, fn(acc: float64, y: float64) -> float64 = g(acc) + y)",
    "reduce(map(map(data, fn(y: float64) -> float64 = y * x), g), 0.0, "     # a loop over one
    "fn(acc: float64, y: float64) -> float64 = acc + y)",
])
def test_differentiating_through_a_run_time_function_is_E053(body):
    src = (f"fn f(x: float64, g: (float64 -> float64), data: float64*) -> float64 = {body}\n"
           "fn d(x: float64, g: (float64 -> float64), data: float64*) -> float64 = grad(f)(x, g, data)\n")
    result = fedlang.check_source(src)
    assert result.ok, result.render()
    with pytest.raises(FedlangError) as error:
        compile_ir(result, optimize=False)
    assert [d.code for d in error.value.diagnostics] == ["E053"]
    assert "not known at compile time" in error.value.diagnostics[0].message


def test_grad_of_a_function_chosen_at_run_time_is_E053():
    src = ("fn a(x: float64) -> float64 = x * x\nfn b(x: float64) -> float64 = x\n"
           "fn f(x: float64, c: bool) -> float64 = grad(if c then a else b)(x)\n")
    with pytest.raises(FedlangError) as error:
        compile_ir(fedlang.check_source(src), optimize=False)
    assert [d.code for d in error.value.diagnostics] == ["E053"]
