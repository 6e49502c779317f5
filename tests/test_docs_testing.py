"""docs/testing.md runs as written: every `fed` block is a file (named on its first
line), every `python` block a test module of its own whose `test_*` functions are
run here, in a folder holding the `fed` files. The page documents the whole public
API of fedlang.testing and the four examples the issue asks for."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

import fedlang.testing
from conftest import ROOT

DOC = ROOT / "docs" / "testing.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks(kind: str, keep_lines: bool = False) -> list[str]:
    """The bodies of the blocks of one kind; with `keep_lines`, each preceded by blank lines,
    so a traceback's line numbers are the page's."""
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) == kind:
            out.append("\n" * text.count("\n", 0, m.start(2)) * keep_lines + m.group(2))
    return out


def fed_files() -> dict[str, str]:
    files = {}
    for body in blocks("fed"):
        first = body.splitlines()[0]
        match = re.fullmatch(r"#\s*(\S+\.fed)\s*", first)
        assert match, f"a fed block of docs/testing.md must start with `# NAME.fed`, not {first!r}"
        files[match.group(1)] = body
    return files


def _example_id(body: str) -> str:
    names = re.findall(r"^def (test_\w+)", body, re.M)
    return names[0] if names else "no-test"


PYTHON = blocks("python", keep_lines=True)


@pytest.fixture
def doc_folder(tmp_path, monkeypatch):
    for name, text in fed_files().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("body", PYTHON, ids=[_example_id(b) for b in PYTHON])
def test_python_example(body, doc_folder):
    namespace = {"__name__": "docs_testing_example"}
    exec(compile(body, str(DOC), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert tests, "an example of docs/testing.md defines no test"
    for test in tests:
        test()


def test_every_fed_block_checks(doc_folder):
    import fedlang

    files = fed_files()
    assert {"histogram.fed", "fedprox.fed", "stats.fed"} <= set(files)
    for name in files:
        result = fedlang.check(name)
        assert result.ok, result.render()


def test_the_page_shows_what_the_issue_asks_for():
    text = DOC.read_text(encoding="utf-8")
    python = "\n".join(PYTHON)
    fed = "\n".join(blocks("fed"))
    assert "federated_secure_sum" in fed and "federated_sum" in fed
    assert "comp fedprox" in fed and "comp fedavg" in fed and "import" not in fed    # self-contained
    assert "federated_aggregate" in fed and "st.permutations" in python
    assert "is_assignable" in python
    assert "assert_backends_agree" in python
    for name in fedlang.testing.__all__:
        assert f"`{name}" in text or f"{name}(" in text, f"docs/testing.md does not mention `{name}`"


def test_the_backends_failure_message_shown_is_the_real_one(tmp_path, monkeypatch):
    import fedlang

    shown = next(b for b in blocks("text") if "disagree on" in b)
    source = (ROOT / "examples" / "mean_temperature.fed").read_text(encoding="utf-8")
    (tmp_path / "max.fed").write_text(source.replace("federated_mean(readings)", "federated_max(readings)"),
                                      encoding="utf-8")
    prog = fedlang.load(str(ROOT / "examples" / "mean_temperature.fed"))
    monkeypatch.setitem(fedlang.testing.backends._PLANS, prog.program,
                        fedlang.testing.plan_of((str(tmp_path / "max.fed"), "mean_temperature")))
    with pytest.raises(AssertionError) as failure:
        fedlang.testing.assert_backends_agree(prog.mean_temperature, [[1.0, 2.0]])
    assert shown.strip() == "AssertionError: " + str(failure.value)


def test_the_package_points_to_the_page():
    assert "docs/testing.md" in (fedlang.testing.__doc__ or "")


def test_the_global_norm_pitfall_the_page_describes_is_real(doc_folder):
    """The page says FedProx with square(global_norm(m - g)) makes a mu = 0 round NaN, and
    shows the shrunk counterexample; that counterexample must show it."""
    import numpy as np

    import fedlang
    from fedlang.ir.values import Struct

    text = fed_files()["fedprox.fed"]
    term = "(sum(square(m.w - g.w)) + square(m.b - g.b))"
    assert term in text
    (doc_folder / "norm.fed").write_text(text.replace(term, "square(global_norm(m - g))"), encoding="utf-8")
    prog = fedlang.load("norm.fed")
    model = Struct([np.zeros(3, np.float32), np.float32(0)], ["w", "b"])
    data = [[Struct([np.zeros((1, 3), np.float32), np.zeros(1, np.float32)], ["x", "y"])]]
    assert np.isnan(prog.fedprox(model, data, 0.0).w).all()
    with pytest.raises(AssertionError) as failure:
        fedlang.testing.assert_close(prog.fedprox(model, data, 0.0), prog.fedavg(model, data), rtol=1e-5, atol=1e-6)
    shown = next(b for b in blocks("text") if "global_norm" not in b and "values differ" in b)
    assert shown.splitlines()[0] == "AssertionError: " + str(failure.value).splitlines()[0]
    assert not np.isnan(prog.fedavg(model, data).w).any()
    assert not np.isnan(fedlang.load("fedprox.fed").fedprox(model, data, 0.0).w).any()
