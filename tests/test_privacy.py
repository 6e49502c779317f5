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
