"""How much do the passes shrink a program, and how fast is compiling to phases?

    python bench/bench_passes.py            # fedavg_digits.fed, then a 10,000-line program
    python bench/bench_passes.py --lines 2000

1. IR size: the nodes (nested functions included) of examples/fedavg_digits.fed
   before and after `optimize`, with the node count and time after each pass
   of the pipeline (median of 5 runs). If the example does not compile (grad
   not available), examples/mean_temperature.fed is used instead and the
   output says so.
2. Whole compile of a generated program of about 10,000 lines (bench_check's
   generator: FedAvg and federated analytics blocks with fresh names), from
   text to phases: check (parse, resolve, type-check), build the IR,
   optimize, split every comp into phases, in this process. Target: < 2 s.
   Each stage's time includes what Python's cyclic garbage collector spent
   in it (fedlang pauses the collector while it works; the objects made are
   scanned once it is back on, often as a stage ends): shown as "GC".
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_check import program as generated_program  # noqa: E402

import fedlang  # noqa: E402
from fedlang.api import compile_ir  # noqa: E402
from fedlang.ir import passes  # noqa: E402
from fedlang.ir.phases import split_phases  # noqa: E402
from fedlang.ir.verify import verify  # noqa: E402


def load_example() -> tuple[str, object]:
    for name in ("fedavg_digits.fed", "mean_temperature.fed"):
        path = ROOT / "examples" / name
        try:
            result = fedlang.check(str(path))
            return name, compile_ir(result, optimize=False)
        except Exception as error:      # noqa: BLE001 - grad may not be available yet
            print(f"{name} does not compile ({type(error).__name__}: {error}); trying the next example")
    raise SystemExit("no example compiles")


def ir_size(repeats: int) -> None:
    name, program = load_example()
    verify(program, "build")
    print(f"IR size of examples/{name} (nodes, nested functions included)")
    print(f"  {'pass':<18} {'nodes':>7} {'ms (median of ' + str(repeats) + ')':>20}")
    print(f"  {'(built)':<18} {program.size():>7}")
    current = program
    for pass_name, run_pass in passes.pipeline():
        times = []
        for _ in range(repeats):
            fresh = passes.copy_program(current)    # (what a pass finds out is cached on the graphs)
            start = time.perf_counter()
            out = run_pass(fresh)
            times.append(time.perf_counter() - start)
        verify(out, pass_name)
        current = out
        print(f"  {pass_name:<18} {current.size():>7} {statistics.median(times) * 1000:>20.2f}")
    final = passes.optimize(program)
    print(f"  {'optimize()':<18} {final.size():>7}   ({program.size()} -> {final.size()} nodes, "
          f"{100 * (program.size() - final.size()) / program.size():.0f}% fewer)")
    assert final.size() < program.size(), "the passes did not make the program smaller"


def whole_compile(lines: int) -> None:
    text = generated_program(lines)
    n_lines = text.count("\n")
    collecting = {"since": 0.0, "total": 0.0}       # seconds the cyclic GC has run so far

    def count_gc(phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            collecting["since"] = now
        else:
            collecting["total"] += now - collecting["since"]

    stage_gc = {}                                    # stage -> seconds of GC in it

    def gc_of(stage: str) -> None:
        stage_gc[stage] = collecting["total"] - sum(stage_gc.values())

    with tempfile.TemporaryDirectory(prefix="fedlang-bench-") as tmp:
        path = Path(tmp) / "program.fed"
        path.write_text(text, encoding="utf-8")
        gc.callbacks.append(count_gc)
        start = time.perf_counter()
        result = fedlang.check(str(path))
        checked = time.perf_counter()
        gc_of("check")
        if not result.ok:
            raise SystemExit(result.render()[:3000])
        program = compile_ir(result, optimize=False)
        built = time.perf_counter()
        gc_of("build")
        timings = {}
        optimized = program
        for pass_name, run_pass in passes.pipeline():
            t0 = time.perf_counter()
            optimized = run_pass(optimized)
            timings[pass_name] = timings.get(pass_name, 0.0) + time.perf_counter() - t0
        optimized = passes.compact(optimized)
        done_passes = time.perf_counter()
        gc_of("optimize")
        comps = [name for name in optimized.root
                 if name in optimized.functions and optimized.functions[name].federated]
        n_phases = sum(len(split_phases(optimized.functions[name], optimized)) for name in comps)
        finished = time.perf_counter()
        gc_of("phases")
        gc.callbacks.remove(count_gc)
    total = finished - start
    print(f"\nwhole compile of a generated program: {n_lines} lines, {program.size()} IR nodes "
          f"-> {optimized.size()} after the passes, {len(comps)} comps -> {n_phases} phases")
    print(f"  check (parse, load, type-check) {checked - start:7.3f} s   GC {stage_gc['check']:.3f}")
    print(f"  build the IR                    {built - checked:7.3f} s   GC {stage_gc['build']:.3f}")
    print(f"  optimize (all passes)           {done_passes - built:7.3f} s   GC {stage_gc['optimize']:.3f}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in timings.items()))
    print(f"  split into phases               {finished - done_passes:7.3f} s   GC {stage_gc['phases']:.3f}")
    print(f"  total                           {total:7.3f} s   GC {sum(stage_gc.values()):.3f}   (target < 2 s: "
          f"{'met' if total < 2 else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ir_size(args.repeats)
    whole_compile(args.lines)


if __name__ == "__main__":
    main()
