"""Privacy accounting for `fedlang run`: the (epsilon, delta) a DP process has spent so far.

A process whose round metrics report its noise multiplier (a metric named
`noise_multiplier`, or ending in `/noise_multiplier`, e.g. the `privacy` field
of std.privacy's metrics) is accounted after every round with Google's
`dp-accounting` library: each round is one Gaussian mechanism with that noise
multiplier, run on a sample of the clients. The runner samples K of N clients
uniformly without replacement; like TFF's DP tutorials, the accountant models
it as Poisson sampling with q = K / N (the standard analysis of DP-FedAvg,
McMahan et al. 2018). Client dropout only removes participants, so it is not
charged. The RDP accountant is the default (`--dp-accountant pld` for the PLD
one, which gives tighter numbers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field


def noise_multiplier_of(metrics: dict) -> float | None:
    for key, value in metrics.items():
        if (key == "noise_multiplier" or key.endswith("/noise_multiplier")) and isinstance(value, (int, float)):
            return float(value)
    return None


@dataclass
class PrivacyLedger:
    """Rounds composed so far, grouped by (sampling rate, noise multiplier)."""

    delta: float
    accountant: str = "rdp"                               # rdp | pld
    rounds: list[tuple[float, float]] = field(default_factory=list)

    def spend(self, sampling_rate: float, noise_multiplier: float) -> None:
        self.rounds.append((float(sampling_rate), float(noise_multiplier)))

    def epsilon(self) -> float:
        """The epsilon of every round so far, at `delta` (inf with zero noise)."""
        import dp_accounting

        if any(z <= 0 for _, z in self.rounds):
            return float("inf")
        accountant = dp_accounting.pld.PLDAccountant() if self.accountant == "pld" \
            else dp_accounting.rdp.RdpAccountant()
        groups: dict[tuple[float, float], int] = {}
        for key in self.rounds:
            groups[key] = groups.get(key, 0) + 1
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)          # orders that do not converge are skipped, and said to be
        try:
            for (q, z), count in groups.items():
                accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)
            return float(accountant.get_epsilon(self.delta))
        finally:
            absl.setLevel(level)
