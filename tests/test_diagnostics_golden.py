"""Golden diagnostics: every code in docs/errors.md has a program in
tests/diagnostics/ that causes it, and the exact text `fedlang check` prints
for it is pinned in the matching .out file.

When a message changes on purpose, regenerate the goldens with

    python tests/update_golden.py

and review the diff of tests/diagnostics/*.out.
"""

from __future__ import annotations

import difflib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

_HARNESS = Path(__file__).resolve().parent / "update_golden.py"
_spec = importlib.util.spec_from_file_location("fedlang_update_golden", _HARNESS)
golden = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = golden          # dataclasses look their module up
_spec.loader.exec_module(golden)

CASES = golden.cases()
REGENERATE = "run `python tests/update_golden.py` to regenerate the goldens if the change is intended"


def _diff(expected: str, actual: str, name: str) -> str:
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                        f"{name} (golden)", f"{name} (now)"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case):
    result = golden.run_case(case)
    # What the case is for, independent of the golden text: its own code and
    # nothing else, the right exit status, never a crash.
    assert "Traceback" not in result.stderr + result.stdout
    assert "internal compiler error" not in result.stderr, result.stderr
    assert f"{case.severity}[{case.code}]" in result.stderr, \
        f"{case.display} no longer produces {case.code}:\n{result.stderr}"
    assert set(result.codes()) == {case.code}, \
        f"{case.display} should produce only {case.code}, got {result.codes()}:\n{result.stderr}"
    assert result.exit == case.expected_exit, f"exit status {result.exit}:\n{result.stderr}"
    assert case.out.exists(), f"{case.out.name} is missing; {REGENERATE}"
    expected = case.out.read_text(encoding="utf-8")
    assert f"{case.severity}[{case.code}]" in expected, f"{case.out.name} does not show its own code"
    if result.stderr != expected:
        pytest.fail(f"the diagnostics of {case.display} changed; {REGENERATE}\n"
                    + _diff(expected, result.stderr, case.out.name), pytrace=False)


def test_every_documented_code_has_a_golden():
    documented = golden.documented_codes()
    assert len(documented) > 30, "could not parse the code tables of docs/errors.md"
    have = {c.code for c in CASES}
    missing = sorted(documented - have)
    assert not missing, f"codes in docs/errors.md without tests/diagnostics/EXXX.fed: {missing}"


def test_every_golden_code_is_documented():
    documented = golden.documented_codes()
    unknown = sorted({c.code for c in CASES} - documented)
    assert not unknown, f"golden cases for codes that docs/errors.md does not list: {unknown}"


def test_goldens_and_programs_pair_up():
    names = {c.name for c in CASES}
    outs = {p.stem for p in golden.DIAGNOSTICS.glob("*.out")}
    assert not names - outs, f"cases without a .out ({REGENERATE}): {sorted(names - outs)}"
    assert not outs - names, f".out files without a .fed ({REGENERATE}): {sorted(outs - names)}"
    for generated in golden.GENERATED:
        assert generated in names, f"GENERATED names a case that does not exist: {generated}"


def test_generated_fixtures_are_not_committed():
    """Binary and non-UTF-8 fixtures exist only in the temporary copy."""
    for files in golden.GENERATED.values():
        for relative in files:
            assert not (golden.DIAGNOSTICS / relative).exists(), \
                f"tests/diagnostics/{relative} should not exist in the tree (it is generated)"


@pytest.mark.parametrize("name", ["E030", "E060_2"])
def test_golden_through_the_installed_command(name):
    """The same text from a real `fedlang` process as from main() in-process."""
    case = next(c for c in CASES if c.name == name)
    script = Path(sys.executable).with_name("fedlang")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fedlang.cli"]
    done = subprocess.run(command + ["check", case.display], cwd=golden.ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == case.expected_exit
    assert done.stderr == case.out.read_text(encoding="utf-8"), \
        _diff(case.out.read_text(encoding="utf-8"), done.stderr, case.out.name)


def test_update_script_check_mode_agrees():
    """`update_golden.py --check` finds nothing stale right after the goldens pass."""
    assert golden.main(["--check", "E040"]) == 0
