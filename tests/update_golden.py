"""Regenerate the golden diagnostics in tests/diagnostics/.

    python tests/update_golden.py            # rewrite every EXXX.out
    python tests/update_golden.py E040 E060  # only these codes (all their variants)
    python tests/update_golden.py --check    # write nothing; exit 1 if any golden is stale

Each golden case is `tests/diagnostics/EXXX.fed` (or `EXXX_N.fed`, a variant of
the same code). Its golden `EXXX.out` is the exact stderr of

    fedlang check tests/diagnostics/EXXX.fed

run from the repository root, so the paths in it are relative to the root. The
exit status is not stored: it is 1 for an error code (`E...`) and 0 for a
warning (`W...`), and tests/test_diagnostics_golden.py checks it.

A few cases need files that are not committed (a binary file, a file that is
not UTF-8): `GENERATED` lists them. Those cases run in a temporary copy of
tests/diagnostics/ with the files written into it, from the copy's root, so the
displayed paths are the same as for every other case.

This module is also the harness of tests/test_diagnostics_golden.py, which
imports `cases` and `run_case` from it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIAGNOSTICS = ROOT / "tests" / "diagnostics"
ERRORS_DOC = ROOT / "docs" / "errors.md"

CASE_NAME = re.compile(r"^(?P<code>[EW]\d{3})(?:_(?P<variant>\d+))?$")
SHOWN_CODE = re.compile(r"\b(?:error|warning)\[([A-Z]\d{3})\]")

# Files some cases need that are not committed, by case name: path relative to
# tests/diagnostics/ -> bytes. They are written into a temporary copy.
GENERATED: dict[str, dict[str, bytes]] = {
    # Latin-1 "café" in a comment: byte 0xe9 at line 2, column 6.
    "E011": {"support/latin1.fed": b"# A comment saved as Latin-1, not UTF-8:\n# caf\xe9 au lait\n"
                                   b"fn identity(x: float32) -> float32 = x\n"},
    # NUL bytes: a binary file.
    "E011_2": {"support/binary.fed": b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00fn\x00"},
}


@dataclass(frozen=True)
class Case:
    name: str          # "E060_2"
    code: str          # "E060"
    fed: Path          # tests/diagnostics/E060_2.fed (absolute)
    out: Path          # tests/diagnostics/E060_2.out (absolute)

    @property
    def display(self) -> str:
        """The path given to `fedlang check`, relative to the repository root."""
        return f"tests/diagnostics/{self.fed.name}"

    @property
    def severity(self) -> str:
        return "warning" if self.code.startswith("W") else "error"

    @property
    def expected_exit(self) -> int:
        return 0 if self.severity == "warning" else 1


@dataclass(frozen=True)
class Result:
    exit: int
    stdout: str
    stderr: str

    def codes(self) -> list[str]:
        """Every diagnostic code the output shows, in order."""
        return SHOWN_CODE.findall(self.stderr + self.stdout)


def cases() -> list[Case]:
    """Every golden case, in name order."""
    out = []
    for fed in sorted(DIAGNOSTICS.glob("*.fed")):
        m = CASE_NAME.match(fed.stem)
        if m is None:
            raise ValueError(f"{fed.relative_to(ROOT)}: golden cases are named EXXX.fed or EXXX_N.fed")
        out.append(Case(fed.stem, m["code"], fed, fed.with_suffix(".out")))
    return out


def documented_codes() -> set[str]:
    """The codes in the tables of docs/errors.md (`| E040 | ... |`)."""
    codes = set()
    for line in ERRORS_DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*`?([EW]\d{3})`?\s*\|", line)
        if m:
            codes.add(m[1])
    return codes


def _run_cli(argv: list[str], cwd: Path) -> Result:
    """`fedlang.cli.main(argv)` in this process, from `cwd`, capturing its output."""
    from fedlang.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(argv)
            except SystemExit as exit_:           # argparse
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(previous)
    return Result(code, stdout.getvalue(), stderr.getvalue())


def run_case(case: Case) -> Result:
    """Run `fedlang check tests/diagnostics/<case>.fed` as from the repository root."""
    generated = GENERATED.get(case.name)
    if not generated:
        return _run_cli(["check", case.display], ROOT)
    with tempfile.TemporaryDirectory(prefix="fedlang-golden-") as tmp:
        copy = Path(tmp) / "tests" / "diagnostics"
        shutil.copytree(DIAGNOSTICS, copy, ignore=shutil.ignore_patterns("*.out", "__pycache__"))
        for relative, data in generated.items():
            target = copy / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return _run_cli(["check", case.display], Path(tmp))


def problems(case: Case, result: Result) -> list[str]:
    """Why an output cannot be a golden for its case (empty: it can)."""
    found = []
    if f"{case.severity}[{case.code}]" not in result.stderr:
        found.append(f"the output does not contain {case.severity}[{case.code}]")
    other = sorted(set(result.codes()) - {case.code})
    if other:
        found.append(f"the output shows other codes too: {', '.join(other)}")
    if result.exit != case.expected_exit:
        found.append(f"exit status {result.exit}, expected {case.expected_exit}")
    if "Traceback" in result.stderr + result.stdout or "internal compiler error" in result.stderr:
        found.append("the output is a crash (traceback or internal compiler error)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("codes", nargs="*", help="only these codes (E040) or cases (E060_2)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a golden is stale")
    args = parser.parse_args(argv)

    selected = [c for c in cases() if not args.codes or c.code in args.codes or c.name in args.codes]
    if args.codes and not selected:
        print(f"no golden case matches {' '.join(args.codes)}", file=sys.stderr)
        return 2
    changed, bad = [], []
    for case in selected:
        result = run_case(case)
        why = problems(case, result)
        if why:
            bad.append(case)
            print(f"NOT WRITTEN {case.display}: " + "; ".join(why), file=sys.stderr)
            print("    " + result.stderr.replace("\n", "\n    "), file=sys.stderr)
            continue
        old = case.out.read_text(encoding="utf-8") if case.out.exists() else None
        if old == result.stderr:
            continue
        changed.append(case)
        print(f"{'stale' if args.check else 'updated'} {case.out.relative_to(ROOT)}")
        if not args.check:
            case.out.write_text(result.stderr, encoding="utf-8", newline="")
    if not args.codes:
        names = {c.name for c in cases()}
        for out in sorted(DIAGNOSTICS.glob("*.out")):
            if out.stem not in names:
                print(f"{'orphan' if args.check else 'removed'} {out.relative_to(ROOT)} (no .fed)")
                changed.append(out)
                if not args.check:
                    out.unlink()
    print(f"{len(selected)} golden cases, {len(changed)} {'stale' if args.check else 'changed'}, "
          f"{len(bad)} not written", file=sys.stderr)
    if bad:
        return 1
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
