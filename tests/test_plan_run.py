"""Plans on disk and `fedlang run`: what a user sees.

  * `fedlang compile -o` writes a plan that runs in a fresh process with the
    source deleted and gives the same result; corrupt or partial plans give a
    clear error (no traceback, non-zero exit);
  * `fedlang run` on the examples with no flags; processes write metrics.jsonl,
    a checkpoint per round and the final state; the same seed gives the same
    bits; dropout; a round with no survivor keeps the state and says so;
  * a run killed with SIGKILL mid-run and resumed ends with exactly the state
    of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from fedlang.ir.values import Struct

MEAN = "examples/mean_temperature.fed"
FEDAVG = "examples/fedavg_digits.fed"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def fedlang(*argv: str, cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    """`fedlang ARGV` in a fresh Python process."""
    proc = subprocess.run([sys.executable, "-m", "fedlang", *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def state_arrays(out: Path, name: str = "state.npz") -> list[np.ndarray]:
    with np.load(out / name, allow_pickle=False) as data:
        return [data[f"a{i}"] for i in range(len(data.files))]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- running examples -------------------------------------------------------------------------

def test_run_a_comp_with_no_flags(capsys, repo_root, tmp_path):
    code, out, err = run_cli(capsys, "run", MEAN, "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "sensors: 100 clients" in out
    assert "mean_temperature(readings) over 100 clients = 23.925" in out
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["clients"] == 100 and abs(result["result"]["value"] - 23.925) < 1e-5


def test_run_binds_data_and_server_arguments(capsys, repo_root, tmp_path):
    code, out, err = run_cli(capsys, "run", MEAN, "--entry", "share_above", "--data", "readings=sensors:17",
                             "--arg", "threshold=24", "--out", str(tmp_path / "r"))
    assert code == 0, err
    # readings 20, 20.5, ..., 28: above 24 are 24.5 .. 28, 8 of 17
    assert f"share_above(readings, threshold) over 17 clients = {np.float32(8 / 17):.6g}" in out


@pytest.mark.parametrize("argv, message", [
    (["--data", "readings=nonsense.sqlite"], "nonsense.sqlite"),
    (["--data", "temps=sensors"], "no parameter named temps"),
    (["--entry", "share_above"], "parameter `threshold: float32@SERVER` needs a value; pass --arg threshold="),
    (["--entry", "nothing"], "no process or comp `nothing`"),
    (["--data", "readings"], "expected NAME=VALUE"),
])
def test_run_errors_are_clear(capsys, repo_root, tmp_path, argv, message):
    code, out, err = run_cli(capsys, "run", MEAN, "--out", str(tmp_path / "r"), *argv)
    assert code in (1, 2) and message in err


def test_run_a_process_writes_metrics_checkpoints_and_the_final_state(capsys, repo_root, tmp_path):
    out = tmp_path / "r"
    code, text, err = run_cli(capsys, "run", FEDAVG, "--rounds", "3", "--clients-per-round", "5", "--out",
                              str(out), "--no-progress")
    assert code == 0, err
    assert "data: data = digits: 100 clients" in text
    assert "round   3/3" in text and "loss=" in text
    lines = metrics(out)
    assert [m["round"] for m in lines] == [0, 1, 2]
    assert all(m["clients"] == 5 and m["dropped"] == 0 and 0 <= m["accuracy"] <= 1 for m in lines)
    assert (out / "state.npz").exists() and (out / "checkpoint" / "state.npz").exists()
    assert json.loads((out / "state.json").read_text())["type"].startswith("<w1=float32[64,32]")
    for a, b in zip(state_arrays(out), state_arrays(out / "checkpoint")):
        assert np.array_equal(a, b)
    # the same seed gives the same bits
    code, _, err = run_cli(capsys, "run", FEDAVG, "--rounds", "3", "--clients-per-round", "5", "--out",
                           str(tmp_path / "again"), "--no-progress")
    assert code == 0, err
    for a, b in zip(state_arrays(out), state_arrays(tmp_path / "again")):
        assert np.array_equal(a, b)


def test_logdir_gets_tensorboard_summaries(capsys, repo_root, tmp_path):
    code, _, err = run_cli(capsys, "run", FEDAVG, "--rounds", "2", "--clients-per-round", "3", "--out",
                           str(tmp_path / "r"), "--logdir", str(tmp_path / "tb"), "--no-progress")
    assert code == 0, err
    import tensorflow as tf
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events
    tags = {(v.tag, e.step) for e in tf.compat.v1.train.summary_iterator(str(events[0])) for v in e.summary.value}
    assert {("loss", 0), ("accuracy", 1), ("clients", 1)} <= tags


def test_a_program_gives_run_defaults_and_plot_draws_the_metrics(capsys, repo_root, tmp_path):
    source = (ROOT / FEDAVG).read_text()
    program = tmp_path / "fedavg.fed"
    program.write_text("# fedlang run: --rounds 2 --clients-per-round 3 --seed 4\n" + source)
    out = tmp_path / "r"
    code, text, err = run_cli(capsys, "run", str(program), "--seed", "5", "--out", str(out), "--no-progress",
                              "--plot", str(tmp_path / "m.png"))
    assert code == 0, err
    assert "2 rounds, 3 of 100 clients per round, seed 5" in text        # the user's flag wins
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    program.write_text("# fedlang run: --resume x\n" + source)
    code, _, err = run_cli(capsys, "run", str(program))
    assert code == 2 and "cannot set --resume" in err


def test_dropout_aggregates_over_survivors_and_an_empty_round_keeps_the_state(capsys, repo_root, tmp_path):
    out = tmp_path / "r"
    code, text, err = run_cli(capsys, "run", FEDAVG, "--rounds", "4", "--clients-per-round", "2", "--dropout",
                              "0.9", "--seed", "3", "--out", str(out), "--no-progress")
    assert code == 0, err
    lines = metrics(out)
    assert all(m["clients"] + m["dropped"] == 2 for m in lines)
    assert any(m["clients"] == 0 for m in lines), lines       # with p=0.9 some round loses both clients
    assert "no client survived: the state is kept" in text


# ---- plans -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_saved_plan_runs_in_a_fresh_process_without_the_source(tmp_path):
    src = tmp_path / "fedavg.fed"
    shutil.copy(ROOT / FEDAVG, src)
    proc = fedlang("compile", str(src), "-o", str(tmp_path / "fedavg.fedplan"))
    assert "wrote" in proc.stdout
    manifest = json.loads((tmp_path / "fedavg.fedplan" / "plan.json").read_text())
    assert manifest["format"] == "fedlang-plan" and manifest["version"] == 1
    assert [p["name"] for p in manifest["computations"]["round"]["phases"]] == \
        ["server_prepare", "client_work", "server_update"]
    args = ["--rounds", "2", "--clients-per-round", "4", "--no-progress"]
    fedlang("run", str(src), "--out", str(tmp_path / "from_source"), *args)
    src.unlink()
    proc = fedlang("run", str(tmp_path / "fedavg.fedplan"), "--out", str(tmp_path / "from_plan"), *args)
    assert "round   2/2" in proc.stdout
    for a, b in zip(state_arrays(tmp_path / "from_source"), state_arrays(tmp_path / "from_plan")):
        assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def mean_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plans") / "mean.fedplan"
    from fedlang.cli import main
    os.chdir(ROOT)
    assert main(["compile", MEAN, "-o", str(folder)]) == 0
    return folder


def _corrupt(kind: str, plan: Path) -> None:
    manifest = plan / "plan.json"
    if kind == "no manifest":
        manifest.unlink()
    elif kind == "bad json":
        manifest.write_text("{not json")
    elif kind == "version":
        data = json.loads(manifest.read_text())
        data["version"] = 99
        manifest.write_text(json.dumps(data))
    elif kind == "missing function":
        shutil.rmtree(next((plan / "functions").iterdir()))
    elif kind == "garbage function":
        pb = next((plan / "functions").iterdir()) / "saved_model.pb"
        pb.write_bytes(b"\x00garbage" * 10)
    elif kind == "bad entry":
        data = json.loads(manifest.read_text())
        del data["computations"]["mean_temperature"]["phases"][0]["function"]
        manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("kind, message", [
    ("no manifest", "not a plan: plan.json is missing"),
    ("bad json", "corrupt plan manifest"),
    ("version", "plan format version 99"),
    ("missing function", "the plan is incomplete"),
    ("garbage function", "cannot be loaded"),
    ("bad entry", "corrupt plan manifest"),
])
def test_a_corrupt_plan_is_a_clear_error(capsys, mean_plan, tmp_path, kind, message):
    plan = tmp_path / "mean.fedplan"
    shutil.copytree(mean_plan, plan)
    _corrupt(kind, plan)
    code, out, err = run_cli(capsys, "run", str(plan), "--out", str(tmp_path / "r"))
    assert code == 1 and message in err and "compile" in err


def test_a_plan_runs_like_its_source(capsys, mean_plan, tmp_path):
    code, out, err = run_cli(capsys, "run", str(mean_plan), "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "mean_temperature(readings) over 100 clients = 23.925" in out


# ---- resume ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_kill_9_ends_with_the_state_of_an_uninterrupted_run(tmp_path):
    args = [FEDAVG, "--rounds", "14", "--clients-per-round", "10", "--dropout", "0.2", "--seed", "5",
            "--no-progress"]
    fedlang("run", *args, "--out", str(tmp_path / "whole"))
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "fedlang", "run", *args, "--out", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            path = out / "metrics.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= 4:
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(metrics(out))
    assert 4 <= done < 14, "the run must be cut mid-way"
    resumed = fedlang("run", FEDAVG, "--resume", str(out), "--no-progress")
    assert "resuming" in resumed.stdout
    assert [m["round"] for m in metrics(out)] == list(range(14))
    for a, b in zip(state_arrays(tmp_path / "whole"), state_arrays(out)):
        assert np.array_equal(a, b)
    whole, cut = metrics(tmp_path / "whole"), metrics(out)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(whole) == strip(cut)


def test_a_save_killed_between_its_renames_loses_nothing(tmp_path):
    from fedlang.backends.runner import load_state, save_state
    from fedlang.types import parse

    t = parse("<w=float32[2],n=int32>")
    first = Struct((np.asarray([1.0, 2.0], np.float32), np.asarray(1, np.int32)), ("w", "n"))
    second = Struct((np.asarray([3.0, 4.0], np.float32), np.asarray(2, np.int32)), ("w", "n"))
    folder = tmp_path / "checkpoint"
    save_state(folder, first, t, {"round": 0})
    os.replace(folder, tmp_path / "checkpoint.old")          # killed after moving the old save aside
    (tmp_path / "checkpoint.tmp123").mkdir()                  # and a half-written new one
    state, info = load_state(folder)
    assert info["round"] == 0 and np.array_equal(state["w"], first["w"])
    assert not (tmp_path / "checkpoint.tmp123").exists()
    save_state(folder, second, t, {"round": 1})               # the leftover .old does not block saving
    state, info = load_state(folder)
    assert info["round"] == 1 and np.array_equal(state["w"], second["w"])
    assert not (tmp_path / "checkpoint.old").exists()
