"""The Ray runtime (`fedlang run --runtime ray`) against the local simulator.

  * FedAvg on digits: the same metrics and final weights as the simulator (1e-5), with
    dropout; a Ray run interrupted and resumed ends where an uninterrupted local one does;
  * a comp that talks to its clients twice (client values kept on the workers between
    phases), every aggregation operator (federated_aggregate folded at the driver), client
    values in the result: the simulator's results;
  * a worker killed (SIGKILL, by the test hook) mid-round: its shard is retried on another
    worker -- the same final weights, `retried_shards` says so -- or, in a run with dropout,
    its clients count as lost; a kill between the two client phases of one call replays the
    shard's first phase on the other worker;
  * `fedlang run --runtime ray` through the CLI; without Ray, a clear error.

One local Ray instance for the module: 2 CPUs, loopback only (node address 127.0.0.1, so
Ray binds its servers to 127.0.0.1: see fedlang.backends.ray_runtime.loopback_settings; a
test checks every listening socket), no dashboard, no usage statistics; shut down after.
Skipped when Ray is not installed.
"""

from __future__ import annotations

import json
import os
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # before Ray is imported: loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from conftest import ROOT, run_cli  # noqa: E402
from test_phases import PROGRAMS  # noqa: E402

# test_phases' comp that talks to its clients twice, and more
EXTRA = PROGRAMS["talks_twice"] + """
fn to_int(x: float32) -> int32 = cast(x * 10.0, int32)
comp all_kinds(d: {float32}@CLIENTS, w: {float32}@CLIENTS, z0: float32)
    -> <s=float32@SERVER,m=float32@SERVER,lo=float32@SERVER,hi=float32@SERVER,med=float32@SERVER,agg=float32@SERVER> =
  (s = federated_sum(d), m = federated_mean(d, weight=w), lo = federated_min(d), hi = federated_max(d),
   med = federated_median(d),
   agg = federated_aggregate(d, z0, fn(acc: float32, x: float32) -> float32 = acc * 0.5 + x * z0,
                             fn(a: float32, b: float32) -> float32 = a - b, fn(a: float32) -> float32 = a * 2.0))
comp secure(d: {float32}@CLIENTS) -> int32@SERVER = federated_secure_sum(federated_map(to_int, d), 8)
comp client_result(d: {float32}@CLIENTS, s: float32@SERVER) -> <float32@SERVER,{float32}@CLIENTS> {
  let b = federated_map(sub, d, federated_broadcast(s))
  return (federated_sum(b), federated_map(sub, b, federated_broadcast(federated_sum(b))))
}
"""


def close(a, b, tol=1e-5) -> bool:
    from fedlang.ir.values import Struct
    if isinstance(a, Struct):
        return (isinstance(b, Struct) and a.names == b.names
                and all(close(x, y, tol) for x, y in zip(a.values, b.values)))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.allclose(a, b, rtol=tol, atol=tol))


def listening_sockets(pids: set[int]) -> list:
    import psutil
    return [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]


@pytest.fixture(scope="module")
def ray_instance():
    import psutil

    from fedlang.backends.ray_runtime import init_local_ray

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    init_local_ray(num_cpus=2, object_store_memory=256 * 2 ** 20)
    try:
        yield {p.pid for p in psutil.Process().children(recursive=True)} - before
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    """examples/fedavg_digits.fed plus comps that talk twice, aggregate every way and return
    client values, as a plan directory."""
    import fedlang
    from fedlang.api import compile_ir
    from fedlang.backends.plan import compile_plan
    from fedlang.backends.tensorflow import import_quietly

    import_quietly()
    source = (ROOT / "examples" / "fedavg_digits.fed").read_text() + EXTRA
    result = fedlang.check_source(source, "ray_test.fed")
    assert result.ok, result.render()
    plan = compile_plan(compile_ir(result), "ray_test.fed", result.sources.texts)
    assert not plan.skipped, plan.skipped
    path = tmp_path_factory.mktemp("plan") / "ray_test.fedplan"
    plan.save(path)
    return path


@pytest.fixture(scope="module")
def runtime(ray_instance, plan_dir):
    """Two workers kept warm for the module, on the loaded plan."""
    from fedlang.backends.plan import load_plan
    from fedlang.backends.ray_runtime import RaySimulator

    rt = RaySimulator(load_plan(plan_dir), plan_dir, num_workers=2)
    rt.start()
    try:
        yield rt
    finally:
        rt.close()


def run(plan_dir, tmp_path, name: str, executor=None, resume: bool = False, stop_after: int | None = None,
        **settings):
    """A fedavg run of the plan (the Runner, as `fedlang run` drives it): the out folder."""
    import io

    from fedlang.backends.plan import load_plan
    from fedlang.backends.runner import RunConfig, Runner

    config = RunConfig(target=str(plan_dir), rounds=settings.pop("rounds", 4), clients_per_round=10,
                       **settings)
    out = tmp_path / name
    runner = Runner(load_plan(plan_dir) if executor is None else executor.plan, config, out,
                    stdout=io.StringIO(), progress=False, executor=executor)
    if stop_after is not None:           # Ctrl-C after that many rounds
        say = runner.say

        def interrupt(self, text):
            say(text)
            if text.startswith(f"round {stop_after:>3}/"):
                raise KeyboardInterrupt
        runner.say = types.MethodType(interrupt, runner)
    status = runner.run(resume=resume)
    assert status == (130 if stop_after else 0), runner.stdout.getvalue()
    return out


def final_state(out):
    with np.load(out / "state.npz") as data:
        return [data[f"a{i}"] for i in range(len(data.files))]


def lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b):
    return all(np.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(final_state(a), final_state(b)))


PROGRAM_METRICS = ("round", "loss", "accuracy", "clients", "dropped")


# ---- the instance ------------------------------------------------------------------------------

def test_the_local_instance_listens_on_loopback_only(ray_instance, runtime):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    import psutil
    pids = ray_instance | {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = listening_sockets(pids)
    assert sockets, "no Ray server found"
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for c in sockets), sockets


# ---- same results as the simulator ---------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fedavg_on_ray_equals_the_simulator(plan_dir, runtime, tmp_path, dropout):
    local = run(plan_dir, tmp_path, "local", dropout=dropout, seed=3)
    remote = run(plan_dir, tmp_path, "ray", executor=runtime, dropout=dropout, seed=3)
    assert same_weights(local, remote)
    for a, b in zip(lines(local), lines(remote)):
        assert b["retried_shards"] == 0 and b["lost_clients"] == 0
        assert a["round"] == b["round"] and a["clients"] == b["clients"] and a["dropped"] == b["dropped"]
        assert np.isclose(a["loss"], b["loss"], rtol=1e-5) and np.isclose(a["accuracy"], b["accuracy"], rtol=1e-5)
    if dropout:
        assert sum(m["dropped"] for m in lines(remote)) > 0


def test_a_ray_run_interrupted_and_resumed_ends_like_an_uninterrupted_local_one(plan_dir, runtime, tmp_path):
    whole = run(plan_dir, tmp_path, "whole", dropout=0.2, seed=5)
    cut = run(plan_dir, tmp_path, "cut", executor=runtime, dropout=0.2, seed=5, stop_after=2)
    assert [m["round"] for m in lines(cut)] == [0, 1]
    run(plan_dir, tmp_path, "cut", executor=runtime, resume=True, dropout=0.2, seed=5)
    assert [m["round"] for m in lines(cut)] == [0, 1, 2, 3]
    assert same_weights(whole, cut)


def test_talking_twice_every_aggregation_and_client_results_equal_the_simulator(runtime):
    from fedlang.backends.simulator import Simulator

    rng = np.random.default_rng(0)
    d = [np.float32(x) for x in rng.normal(3.0, 2.0, 7)]
    w = [np.float32(x) for x in rng.uniform(0.5, 2.0, 7)]
    sim = Simulator(runtime.plan, clients_per_chunk=2)
    calls = [("variance", [d, np.float32(1.5)]), ("all_kinds", [d, w, np.float32(0.25)]),
             ("client_result", [d, np.float32(1.0)]), ("all_kinds", [d[:1], w[:1], np.float32(0.25)])]
    for name, args in calls:
        assert close(runtime.call(name, args), sim.call(name, args)), name
    kinds = [p.outputs for p in runtime.plan.computations["variance"].phases if p.kind == "client"]
    assert len(kinds) == 2 and any("client" in o["role"] for o in kinds[0]), "variance keeps client values"


def test_a_secure_sum_refuses_the_ray_runtime(runtime):
    from fedlang.backends.ray_runtime import SecureSumOnRay
    with pytest.raises(SecureSumOnRay, match="does not run on the Ray runtime yet"):
        runtime.call("secure", [[np.float32(1.0), np.float32(2.0)]])


# ---- faults --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_run_ends_as_without_the_fault(plan_dir, runtime, tmp_path, monkeypatch):
    runtime.wait_healthy()               # a worker killed by an earlier test is back
    marker = tmp_path / "killed"
    monkeypatch.setenv("FEDLANG_RAY_TEST_KILL_MARKER", str(marker))
    monkeypatch.setenv("FEDLANG_RAY_TEST_KILL_AT", "1")          # in round 1
    pids = {w["pid"] for w in runtime.worker_info}
    remote = run(plan_dir, tmp_path, "ray", executor=runtime, seed=7)
    killed = int(marker.read_text())
    assert killed in pids and not _alive(killed)
    assert [m["retried_shards"] for m in lines(remote)] == [0, 1, 0, 0]
    assert all(m["lost_clients"] == 0 and m["clients"] == 10 for m in lines(remote))
    local = run(plan_dir, tmp_path, "local", seed=7)
    assert same_weights(local, remote)


@pytest.mark.slow
def test_with_dropout_a_killed_workers_clients_count_as_lost(plan_dir, runtime, tmp_path, monkeypatch):
    runtime.wait_healthy()
    marker = tmp_path / "killed"
    monkeypatch.setenv("FEDLANG_RAY_TEST_KILL_MARKER", str(marker))
    monkeypatch.setenv("FEDLANG_RAY_TEST_KILL_AT", "1")
    out = run(plan_dir, tmp_path, "ray", executor=runtime, seed=7, dropout=0.1)
    assert marker.exists()
    ms = lines(out)
    assert [m["round"] for m in ms] == [0, 1, 2, 3]
    assert ms[1]["lost_clients"] > 0 and ms[1]["retried_shards"] == 0
    assert all(m["clients"] + m["dropped"] == 10 for m in ms)
    assert [m["lost_clients"] > 0 for m in ms] == [False, True, False, False]
    assert all(np.isfinite(a).all() for a in final_state(out))


@pytest.mark.slow
def test_a_worker_killed_between_two_client_phases_is_replayed(runtime, tmp_path, monkeypatch):
    from fedlang.backends.simulator import Simulator

    d = [np.float32(x) for x in np.random.default_rng(1).normal(3.0, 2.0, 9)]
    runtime.wait_healthy()
    monkeypatch.setattr(runtime, "on_worker_loss", "retry")     # a run with dropout set "drop"
    monkeypatch.setenv("FEDLANG_RAY_TEST_KILL_MARKER", str(tmp_path / "killed"))
    monkeypatch.setenv("FEDLANG_RAY_TEST_KILL_AT", "1")          # the second client phase of the call
    got = runtime.call("variance", [d, np.float32(2.0)])
    assert (tmp_path / "killed").exists() and runtime.last_stats == {"retried_shards": 1, "lost_clients": 0}
    assert close(got, Simulator(runtime.plan).call("variance", [d, np.float32(2.0)]))


def _alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- the command line ----------------------------------------------------------------------------

@pytest.mark.slow
def test_fedlang_run_runtime_ray(capsys, repo_root, ray_instance, plan_dir, tmp_path):
    code, out, err = run_cli(capsys, "run", str(plan_dir), "--runtime", "ray", "--num-workers", "2",
                             "--rounds", "2", "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 0, err
    assert "runtime: ray, 2 workers on 1 node" in out
    saved = json.loads((tmp_path / "r" / "run.json").read_text())
    assert saved["runtime"] == "ray" and saved["num_workers"] == 2
    assert [m["retried_shards"] for m in lines(tmp_path / "r")] == [0, 0]


def test_without_ray_the_cli_says_how_to_install_it(capsys, repo_root, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code, out, err = run_cli(capsys, "run", "examples/mean_temperature.fed", "--runtime", "ray",
                             "--out", str(tmp_path / "r"))
    assert code == 1 and "pip install 'fedlang[ray]'" in err
    code, out, err = run_cli(capsys, "run", "examples/mean_temperature.fed", "--num-workers", "2")
    assert code == 2 and "--runtime ray" in err
