"""How fast is `fedlang check`, and what does starting it cost?

    python bench/bench_check.py            # 1k, 10k and 50k lines
    python bench/bench_check.py --quick    # 1k and 10k lines, fewer repeats
    python bench/bench_check.py --gc-off   # also with Python's cyclic GC disabled

1. Throughput: generates valid programs of about 1k, 10k and 50k lines (the
   FedAvg and federated-analytics code of examples/, repeated with fresh names
   and varied shapes), and times `fedlang check FILE` in this process (the CLI's
   main(), output discarded), best of 3. Prints lines, seconds, lines/s, and the
   time per line relative to the smallest program: about 1.0 at every size
   means checking is linear in the program's length.
2. Start-up: the whole CLI as a fresh process on examples/mean_temperature.fed,
   median wall time of 5 runs, and what such a process imports (how many
   modules; whether TensorFlow, NumPy or networkx are among them), with the
   slowest imports from `python -X importtime`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/mean_temperature.fed"

# One block: a small FedAvg (types, local training, metrics, two comps and a
# process) and some federated analytics. `{i}` makes every name unique; the
# sizes vary from block to block so types are not all identical.
BLOCK = """\
# ---- block {i} -------------------------------------------------------------
type Batch_{i} = <x=float32[?,{d}],y=int32[?]>
type Model_{i} = <w1=float32[{d},{h}],b1=float32[{h}],w2=float32[{h},{k}],b2=float32[{k}]>
type Totals_{i} = <loss=float32,correct=float32,n=float32>
type Metrics_{i} = <loss=float32,accuracy=float32>

fn predict_{i}(m: Model_{i}, x: float32[?,{d}]) -> float32[?,{k}] =
  matmul(relu(matmul(x, m.w1) + m.b1), m.w2) + m.b2

fn batch_loss_{i}(m: Model_{i}, b: Batch_{i}) -> float32 =
  mean(sparse_softmax_cross_entropy(b.y, predict_{i}(m, b.x)))

fn sgd_step_{i}(m: Model_{i}, b: Batch_{i}) -> Model_{i} =
  m - {lr} * grad(batch_loss_{i})(m, b)

fn client_update_{i}(m: Model_{i}, data: Batch_{i}*) -> Model_{i} =
  reduce(data, m, sgd_step_{i})

fn client_metrics_{i}(m: Model_{i}, data: Batch_{i}*) -> Metrics_{i} {{
  let totals = reduce(data, (loss=0.0, correct=0.0, n=0.0), fn(acc: Totals_{i}, b: Batch_{i}) -> Totals_{i} {{
    let logits = predict_{i}(m, b.x)
    let n = cast(size(b.y), float32)
    return (loss = acc.loss + n * mean(sparse_softmax_cross_entropy(b.y, logits)),
            correct = acc.correct + sum(cast(argmax(logits, 1) == b.y, float32)),
            n = acc.n + n)
  }})
  return (loss = totals.loss / totals.n, accuracy = totals.correct / totals.n)
}}

fn example_count_{i}(data: Batch_{i}*) -> float32 = cast(num_examples(data), float32)

fn initial_model_{i}() -> Model_{i} = (
  w1 = random_uniform([{d}, {h}], -0.25, 0.25, {seed}),
  b1 = zeros([{h}]),
  w2 = random_uniform([{h}, {k}], -0.3, 0.3, {seed2}),
  b2 = zeros([{k}]))

comp initialize_{i}() -> Model_{i}@SERVER = federated_eval(initial_model_{i}, SERVER)

comp round_{i}(model: Model_{i}@SERVER, data: {{Batch_{i}*}}@CLIENTS)
    -> <state=Model_{i}@SERVER,metrics=Metrics_{i}@SERVER> {{
  let local = federated_broadcast(model)
  let weights = federated_map(example_count_{i}, data)
  let updated = federated_map(client_update_{i}, local, data)
  let metrics = federated_mean(federated_map(client_metrics_{i}, local, data), weight=weights)
  return (state = federated_mean(updated, weight=weights), metrics = metrics)
}}

process fedavg_{i}(init = initialize_{i}, next = round_{i})

fn above_{i}(reading: float32, threshold: float32) -> float32 =
  if reading > threshold then 1.0 else 0.0

fn clipped_{i}(reading: float32) -> float32 = clip(reading * {scale}, -50.0, 60.0)

comp mean_temperature_{i}(readings: {{float32}}@CLIENTS) -> float32@SERVER =
  federated_mean(federated_map(clipped_{i}, readings))

comp share_above_{i}(readings: {{float32}}@CLIENTS, threshold: float32@SERVER) -> float32@SERVER =
  federated_mean(federated_map(above_{i}, readings, federated_broadcast(threshold)))

comp spread_{i}(readings: {{float32}}@CLIENTS) -> <lo=float32@SERVER,hi=float32@SERVER> =
  (lo = federated_min(readings), hi = federated_max(readings))

"""


def program(target_lines: int) -> str:
    blocks, lines, i = [], 0, 0
    while lines < target_lines:
        d, h, k = (16, 32, 64)[i % 3], (8, 16, 32, 64)[i % 4], (2, 5, 10)[i % 3]
        block = BLOCK.format(i=i, d=d, h=h, k=k, lr=(0.1, 0.05, 0.01)[i % 3], seed=2 * i + 1, seed2=2 * i + 2,
                             scale=(1.0, 0.5, 2.0)[i % 3])
        blocks.append(block)
        lines += block.count("\n")
        i += 1
    return "".join(blocks)


def check_in_process(path: Path, gc_off: bool = False) -> float:
    """Seconds for `fedlang check path` through the CLI's main(); fails loudly on errors."""
    from fedlang.cli import main

    out, err = io.StringIO(), io.StringIO()
    gc.collect()
    if gc_off:
        gc.disable()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check", str(path)])
    finally:
        seconds = time.perf_counter() - start
        gc.enable()
    if code != 0:
        raise SystemExit(f"the generated program does not check (exit {code}):\n{err.getvalue()[:3000]}")
    return seconds


def throughput(sizes: list[int], repeats: int, gc_off: bool = False) -> None:
    print(f"fedlang check in-process, best of {repeats}" + (", cyclic GC disabled" if gc_off else ""))
    print(f"{'lines':>8} {'seconds':>9} {'lines/s':>10} {'us/line':>9} {'vs first':>9}")
    first = None
    with tempfile.TemporaryDirectory(prefix="fedlang-bench-") as tmp:
        for size in sizes:
            text = program(size)
            path = Path(tmp) / f"program_{size}.fed"
            path.write_text(text, encoding="utf-8")
            lines = text.count("\n")
            best = min(check_in_process(path, gc_off) for _ in range(repeats))
            per_line = best / lines
            first = first or per_line
            print(f"{lines:>8} {best:>9.3f} {lines / best:>10.0f} {per_line * 1e6:>9.1f} {per_line / first:>8.2f}x")
    print("(vs first: time per line relative to the smallest program; ~1.0x at every size = linear)")


def _cli_command() -> list[str]:
    script = Path(sys.executable).with_name("fedlang")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedlang.cli"]


_MODULES = ("import json, sys, fedlang.cli; code = fedlang.cli.main(['check', %r]); "
            "print(json.dumps({'exit': code, 'modules': sorted(sys.modules)}))")


def startup(runs: int) -> None:
    command = _cli_command() + ["check", EXAMPLE]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    print(f"\nwhole CLI as a process: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(command))}")
    print(f"  wall time, median of {runs}: {statistics.median(times) * 1000:.0f} ms "
          f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})")

    done = subprocess.run([sys.executable, "-c", _MODULES % EXAMPLE], cwd=ROOT, capture_output=True, text=True)
    report = json.loads(done.stdout.splitlines()[-1])
    modules = report["modules"]
    top = {m.split(".")[0] for m in modules}
    heavy = {name: name in top for name in ("tensorflow", "numpy", "networkx")}
    print(f"  modules imported by `fedlang check`: {len(modules)} "
          f"({len([m for m in modules if m.startswith('fedlang')])} fedlang, "
          f"{len([m for m in modules if m.startswith('lark')])} lark)")
    print("  " + ", ".join(f"{name}: {'IMPORTED' if yes else 'no'}" for name, yes in heavy.items()))

    done = subprocess.run([sys.executable, "-X", "importtime", "-c", _MODULES % EXAMPLE], cwd=ROOT,
                          capture_output=True, text=True)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line.split(":", 1)[1].split("|")
        if not name[1:].startswith(" "):                 # depth 0: a package imported at the top
            rows.append((int(cumulative_us), name.strip()))
    rows.sort(reverse=True)
    total = sum(us for us, _ in rows)
    print(f"  import time of top-level packages: {total / 1000:.0f} ms; slowest: "
          + ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in rows[:5]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k lines, fewer repeats")
    parser.add_argument("--gc-off", action="store_true",
                        help="also time with Python's cyclic GC disabled (how much of the time is GC)")
    args = parser.parse_args()
    os.chdir(ROOT)
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 50_000]
    throughput(sizes, repeats=2 if args.quick else 3)
    if args.gc_off:
        print()
        throughput(sizes, repeats=2 if args.quick else 3, gc_off=True)
    startup(runs=3 if args.quick else 5)


if __name__ == "__main__":
    main()
