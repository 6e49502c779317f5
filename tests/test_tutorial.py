"""docs/tutorial.md and docs/stdlib.md stay true: every snippet in them runs.

Conventions of those pages:
  * a ```fedlang block is a file: its first line is `# NAME.fed` (a new file) or
    `# NAME.fed, continued` (added to the end of an earlier block's file); after every
    block the file checks clean, unless the page goes on to show `fedlang check NAME`
    reporting its errors;
  * a ```sh block holds `$ fedlang ...` commands, each followed by what it prints: those
    lines must appear in the output, in order (`...` stands for lines left out; the
    `(N ms)` a round took is ignored);
  * a ```pycon block is a doctest.
Commands and doctests run in one temporary folder per page, holding the page's files and a
link to the repository's examples/.
"""

from __future__ import annotations

import doctest
import os
import re
import shlex
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

import fedlang

from conftest import ROOT, run_cli

BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
FILE = re.compile(r"# ([\w./-]+\.fed)(, continued)?$")


def blocks(page: str) -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "docs" / page).read_text())


def normalize(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\(\d+ ms\)", "", line)).strip()


def expect_lines(shown: list[str], printed: str, command: str) -> None:
    actual = [normalize(line) for line in printed.splitlines()]
    at = 0
    for line in shown:
        if line.strip() == "...":
            continue
        want = normalize(line)
        try:
            at = actual.index(want, at) + 1
        except ValueError:
            pytest.fail(f"`{command}` did not print, in this order, the line\n  {line}\nIt printed:\n{printed}")


def run_page(page: str, tmp_path: Path, capsys, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    files: dict[str, str] = {}
    globs: dict = {}
    failing: set[str] = set()          # files that do not check: a `fedlang check` must show why
    counts = {"fedlang": 0, "sh": 0, "pycon": 0}
    for kind, body in blocks(page):
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "fedlang":
            first, _, rest = body.partition("\n")
            named = FILE.fullmatch(first.strip())
            assert named, f"{page}: a fedlang block starts with '# NAME.fed': {first}"
            name, continued = named.group(1), named.group(2)
            assert bool(continued) == (name in files), f"{page}: {first}"
            files[name] = files[name] + "\n" + body if continued else body
            (tmp_path / name).write_text(files[name])
            result = fedlang.check(name)
            if not result.ok:
                failing.add(name)
        elif kind == "sh":
            commands: list[tuple[str, list[str]]] = []
            for line in body.splitlines():
                if line.startswith("$ "):
                    commands.append((line[2:], []))
                else:
                    assert commands, f"{page}: output before any command: {line}"
                    commands[-1][1].append(line)
            for command, shown in commands:
                argv = shlex.split(command)
                assert argv[0] == "fedlang", command
                code, out, err = run_cli(capsys, *argv[1:])
                errors = argv[1] == "check" and any("error[" in line for line in shown)
                assert code == (1 if errors else 0), (command, out, err)
                expect_lines(shown, out + err, command)
                if errors:
                    failing.difference_update(argv[2:])
        elif kind == "pycon":
            test = doctest.DocTestParser().get_doctest(body, globs, f"{page} pycon", page, 0)
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
            runner.run(test, out=lambda text: pytest.fail(f"{page}: doctest failed:\n{text}"), clear_globs=False)
            globs.update(test.globs)
        else:
            pytest.fail(f"{page}: a ```{kind} block: this test runs fedlang, sh and pycon blocks only")
    for name in failing:
        pytest.fail(f"{page}: {name} does not check, and the page never shows why:\n"
                    f"{fedlang.check(name).render()}")
    return counts


def test_every_snippet_of_the_tutorial_runs(tmp_path, capsys, monkeypatch):
    counts = run_page("tutorial.md", tmp_path, capsys, monkeypatch)
    assert counts["fedlang"] >= 10 and counts["sh"] >= 5 and counts["pycon"] >= 4, counts


def test_every_snippet_of_the_stdlib_page_runs(tmp_path, capsys, monkeypatch):
    counts = run_page("stdlib.md", tmp_path, capsys, monkeypatch)
    assert counts["fedlang"] >= 1, counts


def test_the_tutorial_follows_tffs_custom_federated_algorithms():
    text = (ROOT / "docs" / "tutorial.md").read_text()
    for name in ("get_average_temperature", "add_half", "get_fraction_over_threshold",
                 "get_local_temperature_average", "batch_loss", "batch_train", "local_train", "local_eval",
                 "federated_train"):
        assert f"fn {name}(" in text or f"comp {name}(" in text, name
