"""The reference interpreter against hand-computed NumPy, and the Python API."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fedlang
from fedlang.ir.values import Struct


def load_source(tmp_path, source: str, name: str = "prog.fed"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return fedlang.load(str(path), optimize=False)


readings = st.lists(st.floats(-50, 50, width=32), min_size=1, max_size=30)


@given(readings)
def test_mean_temperature_is_the_mean(values):
    prog = fedlang.load("examples/mean_temperature.fed", optimize=False)
    expected = np.mean(np.asarray(values, np.float32), dtype=np.float32)
    assert prog.mean_temperature(values) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


def test_mean_temperature_example_from_the_issue():
    prog = fedlang.load("examples/mean_temperature.fed", optimize=False)
    assert prog.mean_temperature([20.0, 22.5, 19.0]) == 20.5


@given(readings, st.floats(-50, 50, width=32))
def test_share_above_counts_clients_above_the_threshold(values, threshold):
    prog = fedlang.load("examples/mean_temperature.fed", optimize=False)
    expected = np.mean(np.asarray(values, np.float32) > np.float32(threshold))
    assert prog.share_above(values, threshold) == pytest.approx(float(expected), abs=1e-6)


@given(readings)
def test_std_analytics_match_numpy(values):
    prog_text = """
        import std.analytics as a
        comp count(t: {float32}@CLIENTS) -> float32@SERVER = a.count_clients(t)
        comp total(t: {float32}@CLIENTS) -> float32@SERVER = a.total(t)
        comp lo(t: {float32}@CLIENTS) -> float32@SERVER = a.smallest(t)
        comp hi(t: {float32}@CLIENTS) -> float32@SERVER = a.largest(t)
        comp wavg(t: {float32}@CLIENTS, w: {float32}@CLIENTS) -> float32@SERVER = a.weighted_average(t, w)
    """
    result = fedlang.check_source(textwrap.dedent(prog_text), "analytics_probe.fed")
    assert result.ok, result.render()
    from fedlang.api import Loaded, compile_ir

    prog = Loaded(compile_ir(result, optimize=False))
    x = np.asarray(values, np.float32)
    w = np.arange(1, len(values) + 1, dtype=np.float32)
    assert prog.count(values) == len(values)
    assert prog.total(values) == pytest.approx(float(np.sum(x)), rel=1e-5, abs=1e-3)
    assert prog.lo(values) == float(np.min(x))
    assert prog.hi(values) == float(np.max(x))
    assert prog.wavg(values, list(w)) == pytest.approx(float(np.sum(x * w) / np.sum(w)), rel=1e-4, abs=1e-4)


def test_local_builtins_match_numpy(tmp_path):
    prog = load_source(tmp_path, """
        fn mlp(x: float32[?,3], w: float32[3,2], b: float32[2]) -> float32[?,2] = relu(matmul(x, w) + b)
        fn xent(y: int32[?], logits: float32[?,4]) -> float32 = mean(sparse_softmax_cross_entropy(y, logits))
        fn stats(x: float64[?,3]) -> <float64[3],float64[?],int32[?]> = (mean(x, axis=0), max(x, axis=1), argmax(x, 1))
        fn norm(m: <a=float32[2],b=float32>) -> float32 = global_norm(m)
        fn onehot(y: int32[?]) -> float32[?,3] = one_hot(y, 3)
        fn shapes(x: float32[2,6]) -> float32[3,4] = reshape(x, [-1, 4])
        fn pick(c: bool[3], a: float32[3]) -> float32[3] = where(c, a, 0.0)
        fn clipped(x: float64[4]) -> float64[4] = clip(x, -1, 1)
        fn soft(x: float32[2,3]) -> float32[2,3] = softmax(x)
    """)
    rng = np.random.default_rng(0)
    x, w, b = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32), \
        rng.normal(size=2).astype(np.float32)
    np.testing.assert_allclose(prog.mlp(x, w, b), np.maximum(x @ w + b, 0), rtol=1e-6)
    y, logits = np.array([0, 3, 1], np.int32), rng.normal(size=(3, 4)).astype(np.float32)
    logp = logits - np.log(np.sum(np.exp(logits), axis=1, keepdims=True))
    assert prog.xent(y, logits) == pytest.approx(float(-np.mean(logp[np.arange(3), y])), rel=1e-5)
    x64 = rng.normal(size=(4, 3))
    m, mx, am = prog.stats(x64).values
    np.testing.assert_allclose(m, x64.mean(axis=0))
    np.testing.assert_allclose(mx, x64.max(axis=1))
    np.testing.assert_array_equal(am, x64.argmax(axis=1))
    assert am.dtype == np.int32
    assert prog.norm({"a": [3.0, 4.0], "b": 12.0}) == pytest.approx(13.0)
    np.testing.assert_array_equal(prog.onehot([2, 0]), [[0, 0, 1], [1, 0, 0]])
    assert prog.shapes(np.arange(12, dtype=np.float32).reshape(2, 6)).shape == (3, 4)
    np.testing.assert_array_equal(prog.pick([True, False, True], [1.0, 2.0, 3.0]), [1.0, 0.0, 3.0])
    out = prog.clipped([-3.0, 0.5, 2.0, -0.25])
    assert out.dtype == np.float64 and list(out) == [-1.0, 0.5, 1.0, -0.25]
    s = prog.soft(logits[:2, :3])
    np.testing.assert_allclose(s.sum(axis=1), [1, 1], rtol=1e-6)


def test_weak_literals_take_the_dtype_they_meet(tmp_path):
    prog = load_source(tmp_path, """
        fn half(x: float16[2]) -> float16[2] = x * 0.5
        fn scale(m: <a=float64,b=float32>) -> <a=float64,b=float32> = m * 2.0
        fn lit() -> float64 = 1.0 / 3
        fn f(x: float64) -> float64 = x
        fn g() -> float64 = f(0.1)
    """)
    assert prog.half([1.0, 3.0]).dtype == np.float16
    scaled = prog.scale({"a": 1.5, "b": 2.5})
    assert scaled.a == 3.0 and scaled.b == 5.0
    assert prog.lit() == pytest.approx(1 / 3, rel=1e-12)     # folded in full precision, then made float64
    assert prog.g() == 0.1


def test_reduce_map_and_lambdas_with_captures(tmp_path):
    prog = load_source(tmp_path, """
        fn total(d: float32[?]*, scale: float32) -> float32 =
          reduce(d, 0.0, fn(acc: float32, b: float32[?]) -> float32 = acc + scale * sum(b))
        fn sizes(d: float32[?]*) -> int32* = map(d, fn(b: float32[?]) = size(b))
        fn n(d: <x=float32[?,2]>*) -> <int32,int32> = (count(d), num_examples(d))
    """)
    batches = [np.ones(3, np.float32), np.full(2, 2.0, np.float32)]
    assert prog.total(batches, 0.5) == pytest.approx(0.5 * 7)
    assert prog.sizes(batches) == [3, 2]
    data = [{"x": np.zeros((3, 2))}, {"x": np.zeros((1, 2))}]
    assert list(prog.n(data).values) == [2, 4]


def test_federated_intrinsics(tmp_path):
    prog = load_source(tmp_path, """
        comp zipped(a: {float32}@CLIENTS, b: {int32}@CLIENTS) -> {<float32,int32>}@CLIENTS = federated_zip(a, b)
        comp sums(a: {<x=int32,y=float32[2]>}@CLIENTS) -> <x=int32,y=float32[2]>@SERVER = federated_sum(a)
        comp agg(a: {float32}@CLIENTS) -> float32@SERVER =
          federated_aggregate(a, 0.0, fn(u: float32, v: float32) = u + v * v, fn(u: float32, v: float32) = u + v,
                              fn(u: float32) = sqrt(u))
        comp secure(a: {int32}@CLIENTS) -> int32@SERVER = federated_secure_sum(a, 4)
        comp everyone(s: float32@SERVER) -> {float32}@CLIENTS =
          federated_map(fn(x: float32) = x + 1.0, federated_broadcast(s))
        comp constant() -> {int32}@CLIENTS = federated_eval(fn() -> int32 = 7, CLIENTS)
        comp server_map(s: float32@SERVER) -> float32@SERVER = federated_map(fn(x: float32) = x * 2.0, s)
        comp fields(s: <a=float32,b=int32>@SERVER) -> int32@SERVER = s.b
    """)
    pairs = prog.zipped([1.0, 2.0], [3, 4])
    assert [list(p.values) for p in pairs] == [[1.0, 3], [2.0, 4]]
    total = prog.sums([{"x": 1, "y": [1.0, 2.0]}, {"x": 2, "y": [0.5, 0.5]}])
    assert total.x == 3 and list(total.y) == [1.5, 2.5]
    assert prog.agg([3.0, 4.0]) == pytest.approx(5.0)
    assert prog.secure([9, 9]) == 2                       # (9 + 9) mod 2**4
    assert prog.everyone(1.5, clients=3) == [2.5, 2.5, 2.5]
    assert prog.constant(clients=2) == [7, 7]
    assert prog.server_map(2.0) == 4.0
    assert prog.fields({"a": 1.0, "b": 5}) == 5


def test_zero_clients(tmp_path):
    prog = load_source(tmp_path, """
        comp total(a: {float32}@CLIENTS) -> float32@SERVER = federated_sum(a)
        comp avg(a: {float32}@CLIENTS) -> float32@SERVER = federated_mean(a)
    """)
    assert prog.total([]) == 0.0
    assert np.isnan(prog.avg([]))


def test_process_runs_round_after_round(tmp_path):
    prog = load_source(tmp_path, """
        comp init() -> float32@SERVER = federated_value(0.0, SERVER)
        comp step(s: float32@SERVER, c: {float32}@CLIENTS) -> <state=float32@SERVER,metrics=float32@SERVER> {
          let next = federated_map(fn(x: float32, y: float32) = x + y, federated_broadcast(s), c)
          return (state = federated_mean(next), metrics = federated_sum(c))
        }
        process counter(init = init, next = step)
    """)
    state, history = prog.counter.run(3, lambda r: [float(r), float(r) + 2.0])
    assert float(state) == pytest.approx(1 + 2 + 3)   # adds the mean reading (r + 1) of round r
    assert [float(m) for m in history] == [2.0, 4.0, 6.0]


def test_api_errors_are_clear(tmp_path):
    prog = fedlang.load("examples/mean_temperature.fed", optimize=False)
    with pytest.raises(TypeError, match="takes 1 argument"):
        prog.mean_temperature([1.0], [2.0])
    with pytest.raises(TypeError, match="client"):
        prog.mean_temperature(3.0)
    with pytest.raises(AttributeError, match="no computation or process `nope`"):
        prog.nope
    (tmp_path / "bad.fed").write_text("fn f(x: float32) -> int32 = x\n")
    with pytest.raises(fedlang.diagnostics.FedlangError, match="E040"):
        fedlang.load(str(tmp_path / "bad.fed"))


def test_random_numbers_are_seeded_and_shaped(tmp_path):
    prog = load_source(tmp_path, """
        fn n(s: int32) -> float32[1000] = random_normal([1000], 2.0, s)
        fn u() -> float32[1000] = random_uniform([1000], -1.0, 3.0, 5)
    """)
    a, b, c = prog.n(1), prog.n(1), prog.n(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(a.mean()) < 0.2 and 1.8 < a.std() < 2.2
    u = prog.u()
    assert u.min() >= -1.0 and u.max() < 3.0 and abs(u.mean() - 1.0) < 0.15
    assert isinstance(prog.u, fedlang.api.Computation) and not isinstance(u, Struct)


def test_literal_calls_fold_or_run_like_any_other(tmp_path):
    prog = load_source(tmp_path, """
        fn a() -> float32 = clip(2.0, 1.5, 2.0)
        fn b() -> int32 = 7 % 0
        fn c(x: float64[2]) -> float64 = where(x[0] > 0.0, x[0], x[1])
    """)
    assert prog.a() == 2.0
    assert prog.b() == 0                       # integer modulo by zero is 0, as NumPy and TF's floormod give
    out = prog.interpreter.call("c", [np.array([1.0, 2.0])], 0)
    assert out.dtype == np.float64 and float(out) == 1.0


def test_runtime_errors_name_the_place(tmp_path):
    prog = load_source(tmp_path, """
        fn pick(x: float32[3], i: int32) -> float32 = x[i]
        fn xent(y: int32[1], logits: float32[1,3]) -> float32 = sum(sparse_softmax_cross_entropy(y, logits))
    """)
    from fedlang.ir.primitives import FedlangRuntimeError

    with pytest.raises(FedlangRuntimeError, match=r"prog.fed:2:\d+: index 5 is out of range"):
        prog.pick([1.0, 2.0, 3.0], 5)
    with pytest.raises(FedlangRuntimeError, match="sparse_softmax_cross_entropy failed"):
        prog.xent([7], [[0.0, 1.0, 2.0]])
