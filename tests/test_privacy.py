"""Differential privacy: the runner's privacy ledger against dp-accounting called directly."""

from __future__ import annotations

import math

import dp_accounting
import pytest

from fedlang.backends.privacy import PrivacyLedger, noise_multiplier_of


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("q, z, rounds", [(0.1, 1.0, 50), (0.01, 0.7, 200), (1.0, 2.0, 10)])
def test_the_ledger_reports_what_dp_accounting_computes(accountant, q, z, rounds):
    ledger = PrivacyLedger(delta=1e-5, accountant=accountant)
    for _ in range(rounds):
        ledger.spend(q, z)
    direct = dp_accounting.pld.PLDAccountant() if accountant == "pld" else dp_accounting.rdp.RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_grows_with_rounds_and_no_noise_is_no_privacy():
    ledger = PrivacyLedger(delta=1e-5)
    eps = []
    for _ in range(3):
        ledger.spend(0.1, 1.1)
        eps.append(ledger.epsilon())
    assert eps[0] < eps[1] < eps[2]
    ledger.spend(0.1, 0.0)
    assert math.isinf(ledger.epsilon())


def test_the_noise_multiplier_is_read_from_the_metrics():
    assert noise_multiplier_of({"loss": 1.0, "privacy/noise_multiplier": 1.2}) == 1.2
    assert noise_multiplier_of({"noise_multiplier": 0.5}) == 0.5
    assert noise_multiplier_of({"loss": 1.0}) is None


# ---- std.privacy ------------------------------------------------------------------------------

import numpy as np  # noqa: E402

import fedlang  # noqa: E402
from conftest import ROOT  # noqa: E402
from fedlang.ir.values import Struct  # noqa: E402

SHAPES = {"w1": (64, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)}


def _privacy():
    return fedlang.load(str(ROOT / "stdlib" / "privacy.fed"))


def _model(rng, scale) -> Struct:
    return Struct((rng.normal(scale=scale, size=s).astype(np.float32) for s in SHAPES.values()), tuple(SHAPES))


def _norm(m: Struct) -> float:
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float64))) for v in m.values)))


def test_clipping_bounds_every_clients_contribution():
    prog = _privacy()
    rng = np.random.default_rng(0)
    totals = Struct((np.float32(0), np.float32(0), np.float32(0), np.int32(0), np.int32(0)),
                    ("loss", "correct", "seen", "examples", "clients"))
    for scale in (1e-4, 0.01, 1.0, 100.0):
        update = _model(rng, scale)
        result = Struct((update, np.float32(1.0), totals), ("update", "update_weight", "totals"))
        clipped = prog.interpreter.run(prog.program.functions["clip_update"], [result, np.float32(0.5)])
        norm = _norm(update)
        assert _norm(clipped["update"]) <= 0.5 * (1 + 1e-6)
        assert float(clipped["unclipped"]) == (1.0 if norm <= 0.5 else 0.0)
        if norm <= 0.5:                               # small updates pass unchanged
            assert all(np.array_equal(a, b) for a, b in zip(clipped["update"].values, update.values))


def test_the_server_noise_has_the_configured_stddev():
    prog = _privacy()
    f = prog.program.functions["dp_server_update"]
    zeros = Struct((np.zeros(s, np.float32) for s in SHAPES.values()), tuple(SHAPES))
    model = Struct((zeros, zeros, zeros), ("model", "m", "v"))
    samples = []
    for r in range(8):
        state = Struct((model, np.float32(0.8), np.int32(r)), ("server", "clip", "round"))
        out = prog.interpreter.run(f, [state, zeros, np.float32(0), np.float32(1.5), np.float32(1.0),
                                              np.float32(0.5), np.float32(0.0), np.float32(1.0)])
        samples.append(np.concatenate([np.ravel(v) for v in out["state"]["server"]["model"].values]))
    noise = np.concatenate(samples)              # delta = noise / expected_clients (1.0), lr 1
    # 8 x 2410 draws of N(0, (z C)^2) = N(0, 1.2^2): the sample stddev is within 3% (about 6 standard errors)
    assert abs(noise.std() / 1.2 - 1) < 0.03
    assert abs(noise.mean()) < 0.05
    assert not np.array_equal(samples[0], samples[1])       # a new draw every round


def test_fedlang_run_reports_the_epsilon_dp_accounting_computes(capsys, repo_root, tmp_path):
    import json

    from conftest import run_cli
    out = tmp_path / "r"
    code, text, err = run_cli(capsys, "run", "examples/dp_fedavg_digits.fed", "--rounds", "3", "--out", str(out),
                              "--no-progress", "--dp-delta", "1e-6")
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r, line in enumerate(lines, 1):
        direct = dp_accounting.rdp.RdpAccountant()
        direct.compose(dp_accounting.PoissonSampledDpEvent(20 / 100, dp_accounting.GaussianDpEvent(1.0)), r)
        assert line["epsilon"] == pytest.approx(direct.get_epsilon(1e-6), rel=1e-9)
        assert line["delta"] == 1e-6
    assert "epsilon=" in text.splitlines()[-2]
