"""Every example runs with `fedlang run examples/NAME.fed` and no flags, and ends with the number the
README's examples section says; the README lists every example; the test accuracies the README
quotes are those of the final models."""

from __future__ import annotations

import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()
SECTION = README[README.index("<!-- examples"):README.index("<!-- /examples -->")]
LINE = re.compile(r"^- `(examples/[\w./-]+\.fed)` — (.*): `([^`]+)`(?: \(test accuracy ([0-9.]+)\))?\.$")


def listed() -> list[tuple[str, str, str | None]]:
    rows = []
    for line in SECTION.splitlines()[1:]:
        match = LINE.match(line)
        assert match, f"README examples line not in the form '- `examples/X.fed` — what: `NUMBER`.': {line}"
        rows.append((match.group(1), match.group(3), match.group(4)))
    return rows


def squeeze(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_the_readme_lists_every_example_once():
    names = [path for path, _, _ in listed()]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(f"examples/{p.name}" for p in (ROOT / "examples").glob("*.fed"))


def test_the_readme_shows_the_fedavg_plot_right_after_the_examples():
    after = README[README.index("<!-- /examples -->"):].split("\n")[1]
    assert re.fullmatch(r"!\[[^\]]+\]\(docs/images/fedavg_digits\.png\)", after), after
    assert (ROOT / "docs" / "images" / "fedavg_digits.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("example, number, test_accuracy", listed(), ids=[p for p, _, _ in listed()])
def test_each_example_runs_with_no_flags_and_ends_with_the_readme_number(capsys, monkeypatch, tmp_path,
                                                                         example, number, test_accuracy):
    monkeypatch.chdir(tmp_path)                 # runs/NAME-... lands here
    code, out, err = run_cli(capsys, "run", str(ROOT / example), "--no-progress")
    assert code == 0, err
    result = [line for line in out.splitlines() if line.startswith("done:") or " clients = " in line]
    assert result, out
    assert squeeze(number) in squeeze(result[-1]), f"{example}: README says {number}; the run ends with {result[-1]}"
    if test_accuracy is not None:
        from fedlang.backends.data import digits_w1
        (run,) = (tmp_path / "runs").iterdir()
        with np.load(run / "state.npz") as state:
            w1, b1, w2, b2 = (state[f"a{i}"] for i in range(4))
        data = digits_w1()
        logits = np.maximum(data.x_test @ w1 + b1, 0) @ w2 + b2
        accuracy = float(np.mean(np.argmax(logits, 1) == data.y_test))
        assert f"{accuracy:.4f}" == test_accuracy, (example, accuracy)
