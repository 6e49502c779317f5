"""W3 on the Ray runtime against the local simulator, and the per-round overhead Ray adds.

    python bench/bench_ray.py                  # W3: 5 rounds of 1000 clients, 2 workers (~2 min on 2 CPUs)
    python bench/bench_ray.py --rounds 3       # fewer rounds
    python bench/bench_ray.py --workers 4      # another number of workers (and Ray CPUs)

W3 of ../shared/BENCHMARKS.md: 10,000 synthetic clients of 32 examples (x ~ N(0,1)^64,
y = argmax(x @ T)), round r trains clients r*1000 .. r*1000+999, FedAvg of the 64-32-10 MLP
(bench/fedavg_w1.fed: one epoch, batches of 16, lr 0.1) from W1's initial weights.

Both runtimes read the clients the way `fedlang run` does: from a data spec, a folder of
10,000 `CLIENT.npz` files made once from bench/workloads.py's W3 arrays (in
$FEDLANG_BENCH_DATA/scale_npz), bound lazily (`BoundClients`). The simulator binds them in the
driver; each Ray worker opens the folder itself and binds only its shard. Every round reads
its 1000 clients' files for the first time in both, so reading is part of the per-client cost.

It prints, per runtime, the median seconds per round over rounds 1.. (round 0 traces the
TensorFlow functions) and clients per second; the largest difference of the final weights
(Ray vs simulator); and the overhead per round that Ray adds, measured on rounds too small to
cost anything but the overhead (1 client: one shard, one worker; 2 clients: two shards): the
median round time minus the simulator's on the same clients. From these it fits

    T_ray(N, W) = o + d * W + c * N / W        (o, d: driver overhead; c: seconds per client
                                                on one worker; N clients over W workers)

and prints the model of rounds per hour for 1M clients per round (docs/distributed.md
explains it). A local Ray instance is started on loopback only (2 CPUs by default) and shut
down at the end. Numbers depend on the machine: on 2 CPUs, 2 workers and the driver share
the cores the simulator has to itself.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")     # local instance on loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads  # noqa: E402

PER_ROUND = 1000
MEMBER = "<x=float32[?,64],y=int32[?]>*"


def scale_folder() -> Path:
    """W3 as a folder of 10,000 CLIENT.npz files (x [32,64] float32, y [32] int32), made once."""
    folder = workloads.cache_dir() / "scale_npz"
    done = folder / ".complete"
    if done.exists():
        return folder
    x, y = workloads.scale()
    work = Path(tempfile.mkdtemp(prefix=".scale_npz.", dir=folder.parent))
    for i in range(len(x)):
        np.savez(work / f"{i}.npz", x=x[i], y=y[i])
    (work / ".complete").write_text("10000 clients\n")
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    os.replace(work, folder)
    return folder


def compile_plan_dir(path: Path):
    import fedlang
    from fedlang.api import compile_ir
    from fedlang.backends.plan import compile_plan, load_plan

    result = fedlang.check(str(ROOT / "bench" / "fedavg_w1.fed"))
    assert result.ok, result.render()
    compile_plan(compile_ir(result), "fedavg_w1.fed", result.sources.texts).save(path)
    return load_plan(path)


def initial_model():
    from fedlang.ir.values import Struct
    init = workloads.initial_model()
    return Struct((init[k] for k in workloads.MODEL_KEYS), workloads.MODEL_KEYS)


def timed_rounds(runtime, spec: str, clients_of_round, rounds: int):
    """(final model, seconds per round)."""
    from fedlang.backends.data import BoundClients, open_source

    source = open_source(spec)
    model, times = initial_model(), []
    for r in range(rounds):
        data = BoundClients(source, MEMBER, 16, clients_of_round(r), spec)
        start = time.perf_counter()
        model = runtime.call("round", [model, data])
        times.append(time.perf_counter() - start)
    return model, times


def small_round_seconds(runtime, spec: str, clients: list[int], repeats: int) -> float:
    """Median seconds of a round over `clients` (each call binds its clients afresh: cached by
    the source after the first)."""
    from fedlang.backends.data import BoundClients, open_source

    source = open_source(spec)
    model, times = initial_model(), []
    for _ in range(repeats + 1):
        data = BoundClients(source, MEMBER, 16, clients, spec)
        start = time.perf_counter()
        runtime.call("round", [model, data])
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 1000 clients (default 5; median over 1..)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: --workers)")
    args = parser.parse_args()
    os.chdir(ROOT)
    from fedlang.backends.tensorflow import import_quietly
    import_quietly()
    import ray
    import tensorflow as tf

    from fedlang.backends.ray_runtime import RaySimulator, init_local_ray
    from fedlang.backends.simulator import Simulator

    print(f"TensorFlow {tf.__version__}, Ray {ray.__version__}, {os.cpu_count()} CPUs")
    began = time.perf_counter()
    spec = str(scale_folder())
    print(f"W3 data: {spec} ({time.perf_counter() - began:.1f} s)")
    work = Path(tempfile.mkdtemp(prefix="bench_ray."))
    plan_path = work / "fedavg_w1.fedplan"
    plan = compile_plan_dir(plan_path)

    def clients_of_round(r):
        return list(workloads.w3_clients(r))

    local = Simulator(plan)
    local_model, local_times = timed_rounds(local, spec, clients_of_round, args.rounds)

    began = time.perf_counter()
    init_local_ray(num_cpus=args.cpus or args.workers, object_store_memory=512 * 2 ** 20)
    ray_up = time.perf_counter() - began
    try:
        began = time.perf_counter()
        remote = RaySimulator(plan, plan_path, num_workers=args.workers)
        remote.start()
        workers_up = time.perf_counter() - began
        ray_model, ray_times = timed_rounds(remote, spec, clients_of_round, args.rounds)
        # overhead: rounds of 1 and 2 clients (already read, so only the overhead remains)
        small = {}
        for k in (1, 2):
            clients = list(range(10 * k, 10 * k + k))
            small[k] = (small_round_seconds(local, spec, clients, 15), small_round_seconds(remote, spec, clients, 15))
        remote.close()
    finally:
        ray.shutdown()

    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(local_model.values, ray_model.values))
    t_local, t_ray = statistics.median(local_times[1:]), statistics.median(ray_times[1:])
    W = args.workers
    print(f"\nW3 scale: {args.rounds} rounds of {PER_ROUND} clients; median over rounds 1..{args.rounds - 1}")
    print(f"{'runtime':<22} {'s/round':>8} {'clients/s':>10} {'round 0 s':>10}")
    print(f"{'simulator':<22} {t_local:>8.3f} {PER_ROUND / t_local:>10.0f} {local_times[0]:>10.3f}")
    print(f"{f'ray, {W} workers':<22} {t_ray:>8.3f} {PER_ROUND / t_ray:>10.0f} {ray_times[0]:>10.3f}")
    print(f"max |w_ray - w_simulator| after {args.rounds} rounds: {diff:.1e}")
    print(f"start-up: Ray instance {ray_up:.1f} s, {W} workers (TensorFlow, plan loaded) {workers_up:.1f} s")

    print("\noverhead per round (rounds of 1 and 2 clients, median of 15):")
    print(f"{'clients':>8} {'shards':>7} {'simulator s':>12} {'ray s':>8} {'ray adds s':>11}")
    for k, (a, b) in small.items():
        print(f"{k:>8} {k:>7} {a:>12.4f} {b:>8.4f} {b - a:>11.4f}")
    o1, o2 = small[1][1] - small[1][0], small[2][1] - small[2][0]
    d = max(o2 - o1, 0.0)                 # driver cost per worker (task, result, merge)
    o = max(o1 - d, 0.0)
    c = max(t_ray - o - d * W, 1e-9) * W / PER_ROUND          # seconds per client on one worker
    c_local = t_local / PER_ROUND
    indices = np.arange(1_000_000, dtype=np.int32)
    start = time.perf_counter()
    pickle.dumps(indices)
    e = (time.perf_counter() - start) / 1_000_000              # driver: shipping client indices
    print(f"fit: o = {o * 1e3:.1f} ms per round, d = {d * 1e3:.1f} ms per worker, "
          f"c = {c * 1e3:.3f} ms per client on one worker (simulator: {c_local * 1e3:.3f} ms per client "
          f"on {os.cpu_count()} CPUs), e = {e * 1e9:.1f} ns per client (driver, indices)")

    n = 1_000_000
    print(f"\nmodel: T(W) = o + d*W + (c/W + e)*N, N = {n:,} clients per round; rounds/hour = 3600 / T(W)")
    print(f"{'workers':>8} {'s/round':>10} {'rounds/hour':>12}")
    for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        t = o + d * w + (c / w + e) * n
        print(f"{w:>8} {t:>10.1f} {3600 / t:>12.1f}")
    if d > 0:
        print(f"best W = sqrt(c*N/d) = {np.sqrt(c * n / d):.0f}")
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
