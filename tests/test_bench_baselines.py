"""The hand-written baselines of bench/bench_runtime.py compute what the plain
per-client NumPy loop computes (bench/baselines.py), on the data of
../shared/BENCHMARKS.md (bench/workloads.py). No timing is asserted here.

The data cache goes to a temporary folder ($FEDLANG_BENCH_DATA), so the tests
neither read nor write the user's cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import baselines  # noqa: E402
import workloads  # noqa: E402

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDLANG_BENCH_DATA", str(tmp_path_factory.mktemp("bench-data")))
    try:
        yield workloads.digits()
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def tf_round():
    pytest.importorskip("tensorflow")
    return baselines.TFRound()


def _rounds(round_fn, init, clients_of_round, rounds):
    model = baselines.copy_model(init)
    for r in range(rounds):
        model = round_fn(model, clients_of_round(r))
    return model


def test_digits_split_is_the_one_benchmarks_md_describes(digits):
    sizes = digits.sizes
    assert len(sizes) == 100 and sizes.sum() == 1500
    assert (sizes.min(), np.median(sizes), sizes.max()) == (3, 14, 33)
    assert digits.x_test.shape == (297, 64) and digits.y_test.shape == (297,)
    assert all(x.dtype == np.float32 and y.dtype == np.int32 and x.shape == (len(y), 64)
               for x, y in digits.clients)
    assert {k: v.shape for k, v in digits.init.items()} == {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)}
    assert not digits.init["b1"].any() and not digits.init["b2"].any()
    assert np.abs(digits.init["w1"]).max() <= np.sqrt(6 / 96)


def test_digits_cache_has_the_npz_keys_and_a_bad_file_is_made_again(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLANG_BENCH_DATA", str(tmp_path))
    path = workloads.digits_path()
    assert [p.name for p in tmp_path.iterdir()] == ["digits_clients.npz"]   # no temporary file left over
    with np.load(path) as arrays:
        expected = {f"{p}_{i}" for p in "xy" for i in range(100)} | {"x_test", "y_test", "w1", "b1", "w2", "b2"}
        assert set(arrays.files) == expected
        assert np.array_equal(arrays["x_7"], digits.clients[7][0])
    path.write_bytes(b"not an npz file")
    assert np.array_equal(workloads.digits().clients[7][1], digits.clients[7][1])


def test_w0_mean_is_the_same_in_every_implementation():
    tf_mean = baselines.W0TF() if _has_tf() else None
    for n in (10, 1_000):
        readings = workloads.w0_readings(n)
        expected = float(np.mean(readings.astype(np.float64)))
        assert baselines.w0_loop(readings) == pytest.approx(expected, rel=1e-6)
        assert baselines.w0_numpy(readings) == pytest.approx(expected, rel=1e-6)
        if tf_mean is not None:
            assert tf_mean(readings) == pytest.approx(expected, rel=1e-6)


def test_padding_counts_true_rows_per_batch():
    rng = np.random.default_rng(0)
    clients = [(rng.standard_normal((n, 64)).astype(np.float32), np.arange(n, dtype=np.int32) % 10)
               for n in (3, 16, 33)]
    p = baselines.pad_clients(clients)
    assert p.x.shape == (3, 3, 16, 64) and p.y.shape == (3, 3, 16)
    assert p.rows.tolist() == [[3, 0, 0], [16, 0, 0], [16, 16, 1]]
    assert p.counts.tolist() == [3, 16, 33]
    assert np.array_equal(p.x[2].reshape(48, 64)[:33], clients[2][0]) and not p.x[2].reshape(48, 64)[33:].any()


def test_w1_vectorized_numpy_equals_the_per_client_loop(digits):
    def clients_of_round(r):
        return [digits.clients[i] for i in workloads.w1_clients(r)]
    reference = _rounds(baselines.round_loop, digits.init, clients_of_round, 3)
    vectorized = _rounds(baselines.round_numpy, digits.init, clients_of_round, 3)
    assert baselines.max_abs_diff(vectorized, reference) < 1e-5


def test_w1_vectorized_tensorflow_equals_the_per_client_loop(digits, tf_round):
    def clients_of_round(r):
        return [digits.clients[i] for i in workloads.w1_clients(r)]
    reference = _rounds(baselines.round_loop, digits.init, clients_of_round, 3)
    vectorized = _rounds(tf_round, digits.init, clients_of_round, 3)
    assert baselines.max_abs_diff(vectorized, reference) < 1e-5
    assert tf_round.traces() == 1


def test_w1_fifty_rounds_reach_the_accuracy_benchmarks_md_states(digits, tf_round):
    """BENCHMARKS.md's check: 256 of 297 test examples right after 50 rounds, and final
    weights within ~1e-6 of the per-client loop, for every implementation."""
    def clients_of_round(r):
        return [digits.clients[i] for i in workloads.w1_clients(r)]
    reference = _rounds(baselines.round_loop, digits.init, clients_of_round, 50)
    assert round(baselines.accuracy(reference, digits.x_test, digits.y_test) * 297) == 256
    for round_fn in (baselines.round_numpy, tf_round):
        model = _rounds(round_fn, digits.init, clients_of_round, 50)
        assert round(baselines.accuracy(model, digits.x_test, digits.y_test) * 297) == 256
        assert baselines.max_abs_diff(model, reference) < 1e-5


def test_w3_vectorized_baselines_equal_the_per_client_loop(tf_round):
    x, y = workloads.make_scale_arrays(50)           # the first 50 of W3's 10_000 clients
    init = workloads.make_digits_arrays()
    init = {k: np.array(init[k]) for k in baselines.MODEL_KEYS}

    def clients_of_round(r):
        return [(x[i], y[i]) for i in range(r * 25, r * 25 + 25)]
    reference = _rounds(baselines.round_loop, init, clients_of_round, 2)
    for round_fn in (baselines.round_numpy, tf_round):
        assert baselines.max_abs_diff(_rounds(round_fn, init, clients_of_round, 2), reference) < 1e-5
    assert tf_round.traces() == 1                    # W1's trace serves W3's shapes too


def test_scale_prefix_is_the_start_of_the_full_data():
    x, y = workloads.make_scale_arrays(3)
    assert x.shape == (3, 32, 64) and x.dtype == np.float32 and y.dtype == np.int32
    assert y.min() >= 0 and y.max() < 10


def test_bench_w1_prints_a_row_per_implementation(digits, tf_round, capsys):
    import bench_runtime

    def not_yet():
        raise bench_runtime.Unavailable("stub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workloads, "digits", lambda: digits)
        mp.setattr(bench_runtime, "round_implementations", lambda workload: {
            "loop": lambda: baselines.round_loop, "numpy": lambda: baselines.round_numpy,
            "tf": lambda: tf_round, "fedlang": not_yet})
        bench_runtime.bench_w1(rounds=2)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"loop", "numpy", "tf", "fedlang"} <= set(rows)
    assert "1.00x" in rows["tf"] and "not run: stub" in rows["fedlang"]
    assert set(bench_runtime.FEDLANG_RUNNERS) == {"W0", "W1", "W3"}


def _has_tf() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True
