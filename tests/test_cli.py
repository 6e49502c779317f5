"""The `fedlang` command line: exit statuses, output formats, and the promise
that a user never sees a Python traceback, whatever file they hand it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

import fedlang
from fedlang.cli import main

ROOT = Path(__file__).resolve().parent.parent
MEAN_TEMPERATURE = "examples/mean_temperature.fed"
FEDAVG = "examples/fedavg_digits.fed"

# Three independent mistakes in three declarations: an unknown name, a result
# of the wrong type, a missing struct field.
THREE_ERRORS = """\
type Batch = <x=float32[?,4],y=int32[?]>

fn celsius(fahrenheit: float32) -> float32 = (farenheit - 32.0) * 5.0 / 9.0

fn count(x: float32[10]) -> float32 = sum(cast(x > 0.0, int32))

fn labels(b: Batch) -> int32[?] = b.label
"""


def run(capsys, *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, *argv)


# ---- exit statuses and summaries ----------------------------------------------------------

def test_clean_file_exits_0(capsys, repo_root):
    code, out, err = run(capsys, "check", MEAN_TEMPERATURE)
    assert code == 0
    assert out == "fedlang: 1 file checked, no errors\n"
    assert err == ""


def test_clean_files_exit_0(capsys, repo_root):
    code, out, err = run(capsys, "check", MEAN_TEMPERATURE, FEDAVG)
    assert code == 0
    assert out == "fedlang: 2 files checked, no errors\n"


def test_errors_exit_1(capsys, tmp_path):
    bad = tmp_path / "bad.fed"
    bad.write_text("fn f(x: float32) -> int32 = x\n")
    code, out, err = run(capsys, "check", str(bad))
    assert code == 1
    assert out == ""
    assert f"{bad}:1:29: error[E040]:" in err
    assert err.endswith("fedlang: 1 error in 1 file\n")


def test_no_command_is_a_usage_error(capsys):
    code, out, err = run(capsys)
    assert code == 2
    assert "usage: fedlang" in err


def test_check_without_files_is_a_usage_error(capsys):
    code, out, err = run(capsys, "check")
    assert code == 2
    assert "usage:" in err


def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"fedlang {fedlang.__version__}"


def test_version_subprocess(repo_root):
    done = subprocess.run([sys.executable, "-m", "fedlang.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"fedlang {fedlang.__version__}"


# ---- JSON ---------------------------------------------------------------------------------------

def test_json_clean(capsys, repo_root):
    code, out, err = run(capsys, "check", "--format", "json", MEAN_TEMPERATURE)
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True
    assert report["errors"] == 0 and report["warnings"] == 0
    assert report["diagnostics"] == []
    assert report["files"] == [MEAN_TEMPERATURE]


def test_json_errors(capsys, tmp_path):
    bad = tmp_path / "three.fed"
    bad.write_text(THREE_ERRORS)
    code, out, err = run(capsys, "check", "--format", "json", str(bad))
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["errors"] == 3
    for d in report["diagnostics"]:
        for key in ("severity", "code", "message", "file", "line", "column", "end_line", "end_column",
                    "label", "help", "notes"):
            assert key in d, f"{key} missing from {d}"
        assert d["severity"] == "error"
        assert d["file"] == str(bad)
        assert isinstance(d["line"], int) and isinstance(d["column"], int)
        assert (d["line"], d["column"]) <= (d["end_line"], d["end_column"])
    first = report["diagnostics"][0]
    assert (first["code"], first["line"], first["column"], first["end_column"]) == ("E030", 3, 47, 56)
    assert first["help"] == "did you mean `fahrenheit`?"


def test_json_warning_is_ok(capsys, tmp_path):
    empty = tmp_path / "empty.fed"
    empty.write_text("")
    code, out, err = run(capsys, "check", "--format", "json", str(empty))
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["warnings"] == 1
    assert [d["code"] for d in report["diagnostics"]] == ["W001"]
    assert report["diagnostics"][0]["severity"] == "warning"


def test_json_missing_file(capsys, tmp_path):
    code, out, err = run(capsys, "check", "--format", "json", str(tmp_path / "nope.fed"))
    assert code == 1
    report = json.loads(out)
    assert [d["code"] for d in report["diagnostics"]] == ["E010"]


# ---- all errors, several files ------------------------------------------------------------------

def test_all_errors_in_a_file_are_reported(capsys, tmp_path):
    bad = tmp_path / "three.fed"
    bad.write_text(THREE_ERRORS)
    code, out, err = run(capsys, "check", str(bad))
    assert code == 1
    assert [line.split("error[")[1][:4] for line in err.splitlines() if "error[" in line] == \
        ["E030", "E040", "E045"]
    assert err.endswith("fedlang: 3 errors in 1 file\n")


def test_several_files(capsys, tmp_path, repo_root):
    one = tmp_path / "one.fed"
    one.write_text("fn f(x: float32) -> float32 = y\n")
    two = tmp_path / "two.fed"
    two.write_text("comp g(t: {float32}@CLIENTS) -> float32@SERVER = t\n")
    code, out, err = run(capsys, "check", str(one), MEAN_TEMPERATURE, str(two))
    assert code == 1
    assert f"{one}:1:31: error[E030]" in err
    assert f"{two}:1:50: error[E060]" in err
    assert err.endswith("fedlang: 2 errors in 3 files\n")


def test_same_file_twice_is_checked_once(capsys, tmp_path):
    bad = tmp_path / "bad.fed"
    bad.write_text("fn f(x: float32) -> float32 = y\n")
    code, out, err = run(capsys, "check", str(bad), str(bad))
    assert code == 1
    assert err.count("error[E030]") == 1


# ---- files that cannot be read -----------------------------------------------------------------

def test_missing_file(capsys, tmp_path):
    code, out, err = run(capsys, "check", str(tmp_path / "nope.fed"))
    assert code == 1
    assert f"error[E010]: cannot read `{tmp_path / 'nope.fed'}`: no such file" in err


def test_missing_file_suggests_a_sibling(capsys, tmp_path):
    (tmp_path / "model.fed").write_text("fn f(x: float32) -> float32 = x\n")
    code, out, err = run(capsys, "check", str(tmp_path / "modle.fed"))
    assert code == 1
    assert "error[E010]" in err
    assert "did you mean `model.fed`?" in err


def test_directory(capsys, tmp_path):
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 1
    assert "error[E010]" in err and "it is a directory" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_file(capsys, tmp_path):
    locked = tmp_path / "locked.fed"
    locked.write_text("fn f(x: float32) -> float32 = x\n")
    locked.chmod(0)
    try:
        code, out, err = run(capsys, "check", str(locked))
    finally:
        locked.chmod(0o644)
    assert code == 1
    assert "error[E010]" in err and "permission denied" in err


def test_binary_file(capsys, tmp_path):
    binary = tmp_path / "a.out.fed"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    code, out, err = run(capsys, "check", str(binary))
    assert code == 1
    assert "error[E011]" in err and "binary" in err


def test_non_utf8_file(capsys, tmp_path):
    latin = tmp_path / "latin.fed"
    latin.write_bytes(b"fn f(x: float32) -> float32 = x\n# caf\xe9\n")
    code, out, err = run(capsys, "check", str(latin))
    assert code == 1
    assert "error[E011]" in err
    assert "byte 0xe9 at line 2, column 6" in err


def test_utf8_bom_is_accepted(capsys, tmp_path):
    bom = tmp_path / "bom.fed"
    bom.write_bytes("\ufefffn f(x: float32) -> float32 = x\n".encode("utf-8"))
    code, out, err = run(capsys, "check", str(bom))
    assert code == 0, err


def test_empty_file_warns(capsys, tmp_path):
    empty = tmp_path / "empty.fed"
    empty.write_text("")
    code, out, err = run(capsys, "check", str(empty))
    assert code == 0
    assert f"warning[W001]: `{empty}` is empty" in err
    assert out == "fedlang: 1 file checked, no errors (1 warning)\n"


def test_whitespace_only_file_warns(capsys, tmp_path):
    blank = tmp_path / "blank.fed"
    blank.write_text("  \n\t\n\n")
    code, out, err = run(capsys, "check", str(blank))
    assert code == 0
    assert "warning[W001]" in err


@pytest.mark.parametrize("name,data", [
    ("random.fed", bytes(range(1, 256)) * 3),
    ("control.fed", b"fn f(x: float32) -> float32 = x \x01\x02\n"),
    ("crlf.fed", b"fn f(x: float32) -> float32 =\r\n  x + y\r\n"),
    ("only_comment.fed", b"# nothing here\n"),
    ("deep.fed", b"fn f(x: float32) -> float32 = " + b"(" * 2000 + b"x" + b")" * 2000 + b"\n"),
    ("unterminated.fed", b'import "abc as m\n'),
    ("lone_bracket.fed", b"}"),
])
def test_odd_input_never_crashes(capsys, tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    code, out, err = run(capsys, "check", str(path))
    assert code in (0, 1), err
    assert "internal compiler error" not in err


def test_types_on_a_file_with_errors(capsys, tmp_path):
    bad = tmp_path / "bad.fed"
    bad.write_text("fn f(x: float32) -> int32 = x\n")
    code, out, err = run(capsys, "types", str(bad))
    assert code == 1
    assert out == ""
    assert "error[E040]" in err


def test_types_on_a_missing_file(capsys, tmp_path):
    code, out, err = run(capsys, "types", str(tmp_path / "nope.fed"))
    assert code == 1
    assert "error[E010]" in err


# ---- fedlang types -------------------------------------------------------------------------------

def test_types_mean_temperature(capsys, repo_root):
    code, out, err = run(capsys, "types", MEAN_TEMPERATURE)
    assert code == 0
    assert err == ""
    assert out.splitlines() == [
        "comp mean_temperature : ({float32}@CLIENTS -> float32@SERVER)",
        "fn above : (<reading=float32,threshold=float32> -> float32)",
        "comp share_above : (<readings={float32}@CLIENTS,threshold=float32@SERVER> -> float32@SERVER)",
    ]


def test_types_fedavg(capsys, repo_root):
    code, out, err = run(capsys, "types", FEDAVG)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "type Batch = <x=float32[?,64],y=int32[?]>"
    assert "fn example_count : (<x=float32[?,64],y=int32[?]>* -> float32)" in lines
    assert lines[-1].startswith("process fedavg : <init=( -> <w1=float32[64,32]")


# ---- what `fedlang check` imports -----------------------------------------------------------------

_IMPORTS = """
import json, sys, fedlang.cli
code = fedlang.cli.main(['check', 'examples/mean_temperature.fed'])
print(json.dumps({'exit': code, 'tensorflow': 'tensorflow' in sys.modules,
                  'modules': sorted(sys.modules)}))
"""


def test_check_does_not_import_tensorflow(repo_root):
    # The exact one-liner of the design notes, as a user would run it.
    done = subprocess.run(
        [sys.executable, "-c", "import sys, fedlang.cli; fedlang.cli.main(['check','examples/mean_temperature.fed']);"
                               " print('tensorflow' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"


def test_check_imports_only_the_front_end(repo_root):
    done = subprocess.run([sys.executable, "-c", _IMPORTS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["exit"] == 0
    top = {m.split(".")[0] for m in report["modules"]}
    assert "tensorflow" not in top
    assert not {"keras", "jax", "torch", "tensorflow_federated"} & top
    assert not [m for m in report["modules"] if m.startswith("fedlang.backends")], \
        "fedlang check imported a backend"
    heavy = sorted({"numpy", "networkx", "scipy"} & top)
    assert not heavy, f"fedlang check imports {heavy}: the front end needs none of them (start-up time)"


# ---- bugs in fedlang itself ------------------------------------------------------------------------

def test_internal_error_is_reported_without_traceback(capsys, monkeypatch, repo_root):
    import fedlang.api

    def broken(*paths):
        raise RuntimeError("boom")

    monkeypatch.setattr(fedlang.api, "check", broken)
    monkeypatch.delenv("FEDLANG_DEBUG", raising=False)
    code, out, err = run(capsys, "check", MEAN_TEMPERATURE)
    assert code == 3
    assert err.startswith("internal compiler error: RuntimeError: boom\n")
    assert "bug in fedlang" in err


def test_internal_error_traceback_with_fedlang_debug(capsys, monkeypatch, repo_root):
    import fedlang.api

    def broken(*paths):
        raise RuntimeError("boom")

    monkeypatch.setattr(fedlang.api, "check", broken)
    monkeypatch.setenv("FEDLANG_DEBUG", "1")
    code = main(["check", MEAN_TEMPERATURE])
    out, err = capsys.readouterr()
    assert code == 3
    assert "internal compiler error" in err and "Traceback" in err


@pytest.mark.parametrize("text", [
    "fn f(x: float32, x: int32) -> float32 = x\n",
    "fn g(s: float32*) -> float32* = map(s, fn(x: float32, x: float32) -> float32 = x)\n",
])
def test_duplicate_parameter_is_a_diagnostic(capsys, tmp_path, text):
    # Once an internal compiler error (the struct type of the parameters rejected the duplicate).
    path = tmp_path / "dup.fed"
    path.write_text(text)
    code, out, err = run(capsys, "check", str(path))
    assert code == 1
    assert "internal compiler error" not in err
    assert "error[E031]" in err
