"""How fast does fedlang run federated computations, against hand-written baselines?

    python bench/bench_runtime.py              # W0, W1, W3 in full (a few minutes)
    python bench/bench_runtime.py --quick      # fewer sizes and rounds: a smoke run
    python bench/bench_runtime.py --only W1    # one workload (W0, W1 or W3)

Runs the workloads of ../shared/BENCHMARKS.md for every implementation in this
process and prints one table per workload, with each figure's ratio to the
vectorized TensorFlow baseline measured in the same run (`vs tf`: the time
relative to it, 2.00x = twice as long). The implementations:

  loop          NumPy, one client at a time (the plain reference; defines correctness)
  numpy         NumPy, all clients of a round at once (padded and masked)
  tf            TensorFlow, all clients of a round in batched ops, one tf.function
                per round with an input_signature (never retraces): the baseline
  tf xla        the same tf.function with jit_compile=True
  fedlang       the fedlang simulator running examples/*.fed (FEDLANG_RUNNERS)

W0  federated mean of N readings (N = 10, 1_000, 100_000): median seconds per
    call after one warm-up call, and the result's difference from the loop's.
W1  50 rounds of FedAvg on the digits split: median seconds per round after
    round 0 (round 0, which includes tracing and compiling, is shown apart; so is
    `build s`, the time to make the implementation: for fedlang, checking,
    optimizing and compiling the program to a plan),
    test accuracy after the last round (256/297 = 0.8620 when correct), and the
    largest absolute difference of the final weights from the loop's.
W3  10_000 clients, 1000 per round, 5 rounds: clients per second (median over
    rounds 1..4) and the weight difference from the loop's after the last round.

Every timed call starts from the clients' NumPy arrays and ends with the server's
result as NumPy arrays: padding (vectorized baselines), cutting into batches and
building the simulator's values (fedlang) are part of the time.

The data comes from bench/workloads.py (cached in $FEDLANG_BENCH_DATA, by
default ~/.cache/fedlang/bench). Numbers depend on the machine; compare the
ratios rather than the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
import workloads  # noqa: E402

BASELINE = "tf"


class Unavailable(Exception):
    """An implementation that cannot run here (why is the message); its row says so."""


# ---- fedlang runners ------------------------------------------------------------------
#
# One factory per workload. Each returns a callable with the baselines' interface:
#   W0:       f(readings float32[N]) -> float
#   W1, W3:   f(server Model, clients [(x, y), ...]) -> Model   (one FedAvg round)
# and raises Unavailable when fedlang cannot run it yet.

def _simulator(path: str):
    """A fedlang.backends.simulator.Simulator running the plan of the program at `path`
    (checked, optimized and compiled to a plan in memory), or Unavailable."""
    try:
        from fedlang.backends.simulator import Simulator
    except ImportError as error:
        raise Unavailable(f"no fedlang.backends.simulator.Simulator yet ({error})") from None
    import fedlang
    from fedlang.api import compile_ir
    from fedlang.backends.plan import compile_plan

    result = fedlang.check(path)
    if not result.ok:
        raise Unavailable(f"{path} does not check ({len(result.errors)} error(s))")
    try:
        plan = compile_plan(compile_ir(result), path, result.sources.texts)
    except ImportError as error:
        raise Unavailable(f"compiling {path} to a plan fails: {error}") from None
    return Simulator(plan)


def fedlang_w0() -> Callable:
    """examples/mean_temperature.fed's `mean_temperature`; the readings array is the
    simulator's value at CLIENTS (its first axis is the client axis)."""
    sim = _simulator(str(ROOT / "examples" / "mean_temperature.fed"))

    def mean(readings: np.ndarray) -> float:
        return float(np.asarray(sim.call("mean_temperature", [readings])))
    return mean


def fedlang_round() -> Callable:
    """bench/fedavg_w1.fed's `round` (examples/fedavg_digits.fed's round without its client
    metrics, which the baselines do not compute), the server model passed in (the npz initial
    weights in round 0), each client's data cut into batches of 16 (the last shorter)
    inside the call; returns the new server model (the result's `state`)."""
    from fedlang.ir.values import Struct

    sim = _simulator(str(ROOT / "bench" / "fedavg_w1.fed"))
    batch = baselines.BATCH

    def fedavg_round(server, clients):
        model = Struct((server[k] for k in baselines.MODEL_KEYS), baselines.MODEL_KEYS)
        data = [[Struct((x[s:s + batch], y[s:s + batch]), ("x", "y")) for s in range(0, len(y), batch)]
                for x, y in clients]
        state = sim.call("round", [model, data])
        return {k: np.asarray(state[k], np.float32) for k in baselines.MODEL_KEYS}
    return fedavg_round


FEDLANG_RUNNERS: dict[str, Callable[[], Callable]] = {
    "W0": fedlang_w0,
    "W1": fedlang_round,
    "W3": fedlang_round,
}


# ---- the implementations of each workload ---------------------------------------------

def w0_implementations() -> dict[str, Callable[[], Callable]]:
    return {"loop": lambda: baselines.w0_loop, "numpy": lambda: baselines.w0_numpy,
            "tf": baselines.W0TF, "fedlang": FEDLANG_RUNNERS["W0"]}


def round_implementations(workload: str) -> dict[str, Callable[[], Callable]]:
    return {"loop": lambda: baselines.round_loop, "numpy": lambda: baselines.round_numpy,
            "tf": baselines.TFRound, "tf xla": lambda: baselines.TFRound(jit_compile=True),
            "fedlang": FEDLANG_RUNNERS[workload]}


def _make(factories: dict[str, Callable[[], Callable]]) -> tuple[dict[str, tuple[Callable, float]], dict[str, str]]:
    """Build every implementation: ({name: (callable, seconds to build it)} for the ones
    that run, {name: why not} for the others). Building the fedlang ones compiles the
    program to a plan; a failure there is reported, not raised."""
    made, missing = {}, {}
    for name, factory in factories.items():
        start = time.perf_counter()
        try:
            fn = factory()
        except Unavailable as why:
            missing[name] = str(why)
            continue
        except Exception as error:                     # noqa: BLE001 (a broken runner must not stop the bench)
            missing[name] = f"FAILED while building: {type(error).__name__}: {error}"
            continue
        made[name] = (fn, time.perf_counter() - start)
    return made, missing


def _ratio(seconds: float, baseline: float | None) -> str:
    return f"{seconds / baseline:.2f}x" if baseline else "-"


def _print_missing(missing: dict[str, str], width: int) -> None:
    for name, why in missing.items():
        why = why.strip().splitlines()[0] if why.strip() else why
        print(f"{name:<{width}} not run: {why[:300]}")


# ---- W0 -------------------------------------------------------------------------------

def per_call(fn: Callable, arg, min_calls: int = 5, max_calls: int = 1000, budget_s: float = 0.5) -> float:
    """Median seconds per call after one warm-up call: at least min_calls calls, more
    while the budget lasts."""
    fn(arg)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_calls or (spent < budget_s and len(times) < max_calls):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def bench_w0(sizes: list[int]) -> None:
    made, missing = _make(w0_implementations())
    print("W0 federated mean: median seconds per call after one warm-up")
    print(f"{'N':>8} {'implementation':<14} {'s/call':>10} {'vs tf':>8} {'mean':>10} {'|diff| vs loop':>15}")
    for n in sizes:
        readings = workloads.w0_readings(n)
        results = {}
        for name, (fn, _) in made.items():
            try:
                results[name] = (per_call(fn, readings), float(fn(readings)))
            except Exception as error:                 # noqa: BLE001 (a failing row must not stop the bench)
                missing[name] = f"FAILED at N={n}: {type(error).__name__}: {error}"
        reference = results["loop"][1]
        baseline = results.get(BASELINE, (None,))[0]
        for name, (seconds, value) in results.items():
            print(f"{n:>8} {name:<14} {seconds:>10.2e} {_ratio(seconds, baseline):>8} {value:>10.5f} "
                  f"{abs(value - reference):>15.1e}")
    _print_missing(missing, 23)


# ---- W1 and W3 ------------------------------------------------------------------------

def run_rounds(round_fn: Callable, init, clients_of_round: Callable[[int], list], rounds: int):
    """(final model, seconds of each round) for `rounds` rounds from `init`."""
    model = baselines.copy_model(init)
    times = []
    for r in range(rounds):
        clients = clients_of_round(r)
        start = time.perf_counter()
        model = round_fn(model, clients)
        times.append(time.perf_counter() - start)
    return model, times


def _run_all(workload: str, init, clients_of_round, rounds: int):
    """Every implementation's (final model, round times, build seconds); {name: why not}."""
    made, missing = _make(round_implementations(workload))
    results = {}
    for name, (fn, build_s) in made.items():
        try:
            results[name] = (*run_rounds(fn, init, clients_of_round, rounds), build_s)
        except Exception as error:                     # noqa: BLE001 (a failing row must not stop the bench)
            missing[name] = f"FAILED: {type(error).__name__}: {error}"
    baseline = statistics.median(results[BASELINE][1][1:]) if BASELINE in results else None
    return results, missing, baseline


def bench_w1(rounds: int) -> None:
    data = workloads.digits()

    def clients_of_round(r):
        return [data.clients[i] for i in workloads.w1_clients(r)]
    results, missing, baseline = _run_all("W1", data.init, clients_of_round, rounds)
    reference = results["loop"][0]
    print(f"W1 digits FedAvg, {rounds} rounds of 10 clients: median seconds per round after round 0")
    print(f"{'implementation':<14} {'s/round':>10} {'vs tf':>8} {'round 0 s':>10} {'build s':>8} "
          f"{'accuracy':>13} {'max|dw| vs loop':>16}")
    for name, (model, times, build_s) in results.items():
        seconds = statistics.median(times[1:])
        acc = baselines.accuracy(model, data.x_test, data.y_test)
        correct = round(acc * len(data.y_test))
        print(f"{name:<14} {seconds:>10.2e} {_ratio(seconds, baseline):>8} {times[0]:>10.3f} {build_s:>8.3f} "
              f"{acc:>6.4f} {correct:>3}/{len(data.y_test)} {baselines.max_abs_diff(model, reference):>16.1e}")
    _print_missing(missing, 14)
    if rounds == 50:
        print("(correct: accuracy 0.8620 = 256/297 and max|dw| about 1e-6 or less)")


def bench_w3(rounds: int) -> None:
    x, y = workloads.scale()
    init = workloads.initial_model()

    def clients_of_round(r):
        return [(x[i], y[i]) for i in workloads.w3_clients(r)]
    results, missing, baseline = _run_all("W3", init, clients_of_round, rounds)
    reference = results["loop"][0]
    print(f"W3 scale, {rounds} rounds of 1000 clients (32 examples each): "
          f"clients per second, median over rounds 1..{rounds - 1}")
    print(f"{'implementation':<14} {'clients/s':>10} {'vs tf':>8} {'s/round':>9} {'round 0 s':>10} {'build s':>8} "
          f"{'max|dw| vs loop':>16}")
    for name, (model, times, build_s) in results.items():
        seconds = statistics.median(times[1:])
        print(f"{name:<14} {1000 / seconds:>10.0f} {_ratio(seconds, baseline):>8} {seconds:>9.4f} "
              f"{times[0]:>10.3f} {build_s:>8.3f} {baselines.max_abs_diff(model, reference):>16.1e}")
    _print_missing(missing, 14)


def _machine() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return (f"TensorFlow {tf.__version__}, NumPy {np.__version__}, {os.cpu_count()} CPUs, "
            + (f"{len(gpus)} GPU(s)" if gpus else "no GPU"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and rounds: a smoke run")
    parser.add_argument("--only", choices=["W0", "W1", "W3"], help="run one workload")
    args = parser.parse_args()
    os.chdir(ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(_machine())
    print("(vs tf: time relative to the vectorized TensorFlow baseline of the same run; 2.00x = twice as long)\n")
    workloads_to_run = [args.only] if args.only else ["W0", "W1", "W3"]
    for i, workload in enumerate(workloads_to_run):
        if i:
            print()
        if workload == "W0":
            bench_w0([10, 1_000] if args.quick else [10, 1_000, 100_000])
        elif workload == "W1":
            bench_w1(5 if args.quick else 50)
        else:
            bench_w3(3 if args.quick else 5)


if __name__ == "__main__":
    main()
