"""Hypothesis profiles: `ci` (derandomized, so a landing never hangs on luck),
`dev` (the default locally) and `deep` (many more examples, for bug hunting:
`pytest --hypothesis-profile deep`). CI selects `ci` through the environment
variable FEDLANG_HYPOTHESIS_PROFILE or `--hypothesis-profile ci`."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent

settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("FEDLANG_HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def repo_root(monkeypatch):
    """Run the test from the repository root (examples/ and tests/ as users name them)."""
    monkeypatch.chdir(ROOT)
    return ROOT


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`fedlang ARGV` in-process: (exit status, stdout, stderr); argparse exits count too.
    A traceback in front of a user is a bug, so none may appear."""
    from fedlang.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err
