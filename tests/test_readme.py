"""The README stays true: its commands, its error example and its snippets."""

from __future__ import annotations

import re
from pathlib import Path

import fedlang
from fedlang import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_second():
    first_block = code_blocks(README)[0].strip().splitlines()
    assert README.index("```") < README.index("\n\n", README.index("# fedlang") + 10) + 3
    assert len(first_block) == 2
    install_and_run, install_and_test = first_block
    assert "pip install ." in install_and_run and "fedlang " in install_and_run
    assert "pip install '.[test,ray]'" in install_and_test
    test_command = install_and_test.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines(), f"{test_command!r} is not a line of .ci/run"
    for example in re.findall(r"examples/\S+\.fed", install_and_run):
        assert (ROOT / example).is_file()


def test_readme_error_example_is_what_fedlang_prints(tmp_path, capsys, monkeypatch):
    block = next(b for b in code_blocks(README) if b.startswith("$ fedlang check bad.fed"))
    expected = block.split("\n", 1)[1].rstrip("\n")
    source_line = re.search(r"^1 \| (.*)$", expected, re.M).group(1)
    (tmp_path / "bad.fed").write_text(source_line + "\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check", "bad.fed"]) == 1
    printed = capsys.readouterr().err
    assert printed.startswith(expected), printed


def test_readme_snippets_are_taken_from_the_examples():
    fedavg = (ROOT / "examples" / "fedavg_digits.fed").read_text()
    temps = (ROOT / "examples" / "mean_temperature.fed").read_text()
    for block in code_blocks(README):
        if block.startswith("# examples/mean_temperature.fed"):
            assert block.split("\n", 1)[1].strip() in temps
        elif "sgd_step" in block:
            for line in block.strip().splitlines():
                assert line.strip() in fedavg, line


def test_readme_python_api_claims():
    result = fedlang.check(str(ROOT / "examples" / "mean_temperature.fed"))
    assert result.ok
    assert str(result.types()["mean_temperature"]) == "({float32}@CLIENTS -> float32@SERVER)"
    assert str(fedlang.types.parse("{float32}@CLIENTS")) == "{float32}@CLIENTS"


def test_readme_reference_interpreter_claims():
    prog = fedlang.load(str(ROOT / "examples" / "mean_temperature.fed"))
    assert prog.mean_temperature([20.0, 22.5, 19.0]) == 20.5
    assert "prog.mean_temperature([20.0, 22.5, 19.0])           # 20.5" in README
