"""std.analytics (stdlib/analytics.fed): every computation equals its NumPy counterpart on random
client data, on the TensorFlow backend (the simulator, whole and in chunks of clients) and in the
reference interpreter."""

from __future__ import annotations

import functools
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fedlang
from fedlang.api import compile_ir
from fedlang.backends.plan import compile_plan
from fedlang.backends.simulator import Simulator
from fedlang.ir.interpreter import Interpreter

from conftest import ROOT


@functools.lru_cache(maxsize=1)
def compiled():
    """(IR program, plan) of stdlib/analytics.fed, once per test session."""
    result = fedlang.check(str(ROOT / "stdlib" / "analytics.fed"))
    assert result.ok, result.render()
    program = compile_ir(result)
    plan = compile_plan(program, "analytics.fed", result.sources.texts)
    assert not plan.skipped
    return program, plan


def histogram_bins(x: np.ndarray, lo: np.float32, hi: np.float32) -> np.ndarray:
    """The bins as documented: floor((x - lo) * 10 / (hi - lo)) in float32, hi in the last bin,
    readings outside [lo, hi] dropped."""
    x = x.astype(np.float32)
    inside = (x >= lo) & (x <= hi)
    with np.errstate(all="ignore"):
        k = np.clip((x - lo) * np.float32(10.0) / (hi - lo), 0, 9).astype(np.int32)
    return np.bincount(k[inside], minlength=10).astype(np.int32)


def numpy_counterparts(x: np.ndarray, w: np.ndarray, threshold: np.float32, lo: np.float32, hi: np.float32):
    x64 = x.astype(np.float64)
    return {
        "count_clients": ([x], len(x)),
        "total": ([x], x64.sum()),
        "average": ([x], x64.mean()),
        "weighted_average": ([x, w], np.average(x64, weights=w.astype(np.float64))),
        "smallest": ([x], x.min()),
        "largest": ([x], x.max()),
        "variance": ([x], x64.var()),
        "standard_deviation": ([x], x64.std()),
        "share_above": ([x, threshold], np.mean(x > threshold)),
        "histogram": ([x, lo, hi], histogram_bins(x, lo, hi)),
    }


readings = st.lists(st.floats(-1000, 1000, width=32), min_size=1, max_size=40)


@given(values=readings, data=st.data())
def test_every_computation_equals_numpy_on_the_simulator(values, data):
    program, plan = compiled()
    x = np.asarray(values, np.float32)
    w = np.asarray(data.draw(st.lists(st.floats(0.125, 100, width=32), min_size=len(x), max_size=len(x))),
                   np.float32)
    threshold = np.float32(data.draw(st.floats(-1000, 1000, width=32)))
    lo = np.float32(data.draw(st.floats(-1000, 1000, width=32)))
    hi = lo + np.float32(data.draw(st.floats(0.5, 1000, width=32)))
    chunk = data.draw(st.sampled_from([None, 1, 7]))
    sim = Simulator(plan, clients_per_chunk=chunk)
    scale = float(np.max(np.abs(x))) + 1.0
    for name, (args, expected) in numpy_counterparts(x, w, threshold, lo, hi).items():
        clients = [list(a) if isinstance(a, np.ndarray) else a for a in args]
        got = sim.call(name, clients)
        if name == "histogram":
            assert got.dtype == np.int32 and got.tolist() == expected.tolist(), (name, got, expected)
        elif name in ("variance", "standard_deviation"):
            tolerance = 1e-5 * scale ** (2 if name == "variance" else 1)
            assert float(got) == pytest.approx(float(expected), rel=1e-4, abs=tolerance), name
        else:
            assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-5 * scale * len(x)), name


@given(values=st.lists(st.floats(-50, 50, width=32), min_size=1, max_size=8), data=st.data())
def test_the_interpreter_agrees(values, data):
    program, plan = compiled()
    x = np.asarray(values, np.float32)
    w = np.ones_like(x) + np.arange(len(x), dtype=np.float32)
    lo, hi = np.float32(-20), np.float32(30)
    sim = Simulator(plan)
    for name, (args, expected) in numpy_counterparts(x, w, np.float32(1.5), lo, hi).items():
        clients = [[np.float32(v) for v in a] if isinstance(a, np.ndarray) else a for a in args]
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            reference = Interpreter(program).call(name, clients, len(x))
        got = sim.call(name, clients)
        assert np.asarray(reference).dtype == np.asarray(got).dtype, name
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(reference, np.float64),
                                   rtol=1e-5, atol=1e-4, err_msg=name)


def test_histogram_matches_numpy_histogram_away_from_bin_edges():
    _, plan = compiled()
    rng = np.random.default_rng(0)
    x = rng.uniform(15, 33, 500).astype(np.float32)
    edges = np.linspace(20, 28, 11)
    x = x[np.min(np.abs(x[:, None] - edges[None, :]), axis=1) > 1e-3]     # no reading on an edge
    got = Simulator(plan).call("histogram", [list(x), np.float32(20), np.float32(28)])
    assert got.tolist() == np.histogram(x, bins=10, range=(20, 28))[0].tolist()


def test_the_existing_functions_keep_their_behaviour():
    _, plan = compiled()
    sim = Simulator(plan)
    readings = [np.float32(v) for v in (20.0, 22.5, 19.0, 30.25)]
    assert sim.call("average", [readings]) == np.float32(22.9375)
    assert sim.call("share_above", [readings, np.float32(21.0)]) == np.float32(0.5)
    assert sim.call("count_clients", [readings]) == np.float32(4)
    assert sim.call("smallest", [readings]) == np.float32(19.0) and sim.call("largest", [readings]) == np.float32(30.25)
