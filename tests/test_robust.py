"""Robust aggregations: federated_median, federated_trimmed_mean, federated_clipped_mean,
federated_zeroing_mean and federated_krum.

  * each equals its NumPy definition, written here from the papers (hypothesis),
    in the reference interpreter and on the TensorFlow backend's simulator with
    any chunking;
  * median and Krum resist f Byzantine clients sending scaled-up garbage where
    the mean does not;
  * the checker rejects bad uses with a clear diagnostic.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fedlang
from fedlang.api import compile_ir
from fedlang.backends.plan import compile_plan
from fedlang.backends.simulator import Simulator
from fedlang.ir.values import Struct

SOURCE = """
type P = <w=float32[3],b=float64>
comp median(x: {P}@CLIENTS) -> P@SERVER = federated_median(x)
comp trimmed(x: {P}@CLIENTS) -> P@SERVER = federated_trimmed_mean(x, percent=20)
comp clipped(x: {P}@CLIENTS) -> P@SERVER = federated_clipped_mean(x, bound=2.5)
comp zeroing(x: {P}@CLIENTS) -> P@SERVER = federated_zeroing_mean(x, bound=2.5)
comp krum(x: {P}@CLIENTS) -> P@SERVER = federated_krum(x, byzantine=1)
comp mean(x: {P}@CLIENTS) -> P@SERVER = federated_mean(x)
"""


@pytest.fixture(scope="module")
def compiled():
    result = fedlang.check_source(SOURCE, "robust.fed")
    assert result.ok, result.render()
    program = compile_ir(result)
    return fedlang.api.Loaded(program), compile_plan(program, "robust.fed", result.sources.texts)


# ---- the definitions, from the papers ----------------------------------------------------------

def flat(v: Struct) -> np.ndarray:
    return np.concatenate([np.ravel(v["w"]).astype(np.float64), [float(v["b"])]])


def median_def(values):
    return np.median(np.stack([flat(v) for v in values]), axis=0)


def trimmed_def(values, percent=20):
    a = np.sort(np.stack([flat(v) for v in values]), axis=0)
    cut = len(values) * percent // 100
    return a[cut:len(values) - cut].mean(axis=0)


def bounded_def(values, bound, zeroing):
    out = []
    for v in values:
        x = flat(v)
        norm = np.linalg.norm(x)
        out.append(x * (0.0 if zeroing else bound / norm) if norm > bound else x)
    return np.mean(out, axis=0)


def krum_def(values, f=1):
    xs = [flat(v) for v in values]
    n = len(xs)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((xs[i] - xs[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:n - f - 2]))
    return xs[int(np.argmin(scores))]


DEFINITIONS = {"median": median_def, "trimmed": trimmed_def,
               "clipped": lambda v: bounded_def(v, 2.5, False), "zeroing": lambda v: bounded_def(v, 2.5, True),
               "krum": krum_def}


def client_values(draw_seed: int, n: int) -> list[Struct]:
    rng = np.random.default_rng(draw_seed)
    return [Struct(((rng.normal(size=3) * rng.choice([1.0, 3.0])).astype(np.float32), np.float64(rng.normal())),
                   ("w", "b")) for _ in range(n)]


@given(name=st.sampled_from(sorted(DEFINITIONS)), n=st.integers(4, 12), seed=st.integers(0, 10 ** 6),
       chunk=st.sampled_from([None, 1, 4]))
def test_each_robust_aggregation_equals_its_definition(compiled, name, n, seed, chunk):
    loaded, plan = compiled
    values = client_values(seed, n)
    expected = DEFINITIONS[name](values)
    reference = loaded.interpreter.call(name, [values], n)
    backend = Simulator(plan, clients_per_chunk=chunk).call(name, [values])
    for got in (reference, backend):
        assert got["w"].dtype == np.float32 and np.asarray(got["b"]).dtype == np.float64
        np.testing.assert_allclose(flat(got), expected, rtol=1e-5, atol=1e-5)


def test_median_and_krum_resist_byzantine_clients_where_the_mean_does_not(compiled):
    _, plan = compiled
    sim = Simulator(plan)
    rng = np.random.default_rng(7)
    truth = np.array([1.0, -2.0, 0.5, 3.0])
    honest = [truth + rng.normal(scale=0.05, size=4) for _ in range(9)]
    byzantine = [-100.0 * truth + rng.normal(scale=5.0, size=4) for _ in range(2)]   # scaled-up garbage
    values = [Struct((x[:3].astype(np.float32), np.float64(x[3])), ("w", "b")) for x in honest + byzantine]
    error = {name: float(np.max(np.abs(flat(sim.call(name, [values])) - truth)))
             for name in ("mean", "median", "krum", "trimmed")}
    assert error["mean"] > 10
    for robust in ("median", "krum", "trimmed"):
        assert error[robust] < 0.2, error


def test_krum_needs_enough_clients(compiled):
    loaded, _ = compiled
    with pytest.raises(fedlang.ir.primitives.FedlangRuntimeError, match="needs at least 4 clients"):
        loaded.interpreter.call("krum", [client_values(0, 3)], 3)


@pytest.mark.parametrize("call, code, message", [
    ("federated_trimmed_mean(x, percent=50)", "E049", "`percent` of federated_trimmed_mean must be between 0 and 49"),
    ("federated_clipped_mean(x, bound=-1.0)", "E049", "`bound` of federated_clipped_mean must be between 0.0"),
    ("federated_clipped_mean(x, bound=b)", "E049", "`bound` of federated_clipped_mean must be a number literal"),
    ("federated_median(y)", "E050", "federated_median needs floating-point values, found int32"),
    ("federated_krum(s, byzantine=1)", "E068", "the 1st argument of federated_krum must be at CLIENTS"),
])
def test_bad_uses_are_diagnosed(call, code, message):
    source = (f"comp f(x: {{float32}}@CLIENTS, y: {{int32}}@CLIENTS, s: float32@SERVER, b: float32) "
              f"-> float32@SERVER = {call}")
    result = fedlang.check_source(source, "bad.fed")
    assert not result.ok
    assert any(d.code == code and message in d.message for d in result.errors), result.render()
