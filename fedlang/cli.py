"""The `fedlang` command line.

    fedlang check FILE... [--format text|json]   exit 0 clean, 1 on errors
    fedlang types FILE                           each declaration with its type
    fedlang compile FILE [--emit ir|dot|phases|png|svg] [-O0] [-o OUT]
                                                 the optimized IR, its graph, or the
                                                 server and client phases of each comp;
                                                 without --emit, -o OUT writes an
                                                 executable plan (a directory)
    fedlang run FILE.fed|PLAN [options]          run a process for R rounds (or a comp
                                                 once) on client data, in the simulator
                                                 (or on Ray workers: --runtime ray)
    fedlang --version

Users never see a Python traceback: their mistakes are diagnostics, and a bug
in fedlang is reported as an internal error that says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    from fedlang import __version__

    parser = argparse.ArgumentParser(
        prog="fedlang", description="A typed language and compiler for federated computations.")
    parser.add_argument("--version", action="version", version=f"fedlang {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="check that programs are well typed and correctly placed")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--format", choices=("text", "json"), default="text",
                       help="json: machine-readable diagnostics on stdout")
    types = commands.add_parser("types", help="print each declaration with its type")
    types.add_argument("file", metavar="FILE")
    compile_ = commands.add_parser(
        "compile", help="compile a program and show the result (IR text, DOT graph, phases)",
        description="Compile FILE: check it, build its IR and optimize it. --emit shows the result: "
                    "ir (the IR as text), dot (Graphviz DOT), phases (each comp cut into server and "
                    "client phases, with their types), png or svg (a drawing of the IR).")
    compile_.add_argument("file", metavar="FILE")
    compile_.add_argument("--emit", choices=EMITS, help="what to print (to OUT with -o)")
    compile_.add_argument("-O0", dest="optimize", action="store_false",
                          help="no optimization passes (phases still inline the comps a comp calls)")
    compile_.add_argument("-o", dest="output", metavar="OUT",
                          help="write what --emit produces to OUT; without --emit, write the "
                               "executable plan (a directory, e.g. prog.fedplan)")
    run = commands.add_parser(
        "run", help="run a program or a compiled plan (in the local simulator, or on Ray workers)",
        description="Run a process of FILE (a .fed program, compiled in memory, or a plan directory "
                    "written by `fedlang compile -o`) for --rounds rounds, or, if it has no process, "
                    "its first comp once. Client parameters are bound to data with --data NAME=SPEC "
                    "(default: a built-in data set whose type fits; see docs/data.md).")
    run.add_argument("target", metavar="FILE")
    run.add_argument("--entry", metavar="NAME", help="the process or comp to run (default: the first process, "
                                                     "else the first comp)")
    run.add_argument("--rounds", type=_positive, metavar="R", help="rounds to run (default 50)")
    run.add_argument("--clients-per-round", type=_positive, metavar="K",
                     help="clients sampled per round (default 10)")
    run.add_argument("--seed", type=int, default=0, help="seed of client sampling and dropout (default 0)")
    run.add_argument("--data", action="append", default=[], metavar="NAME=SPEC",
                     help="bind client parameter NAME: digits, digits:test[:N], sensors[:N], a folder of "
                          ".npz files, a TFF .sqlite[.lzma][:SPLIT] or .h5 file")
    run.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                     help="value of a server parameter (a number or JSON)")
    run.add_argument("--batch-size", type=_positive, metavar="B", help="examples per batch (default: the "
                                                                       "program's fixed batch size, else 16)")
    run.add_argument("--clients-per-chunk", type=_positive, metavar="N",
                     help="clients vectorized together (default: as many as fit about 256 MB of data)")
    run.add_argument("--dp-delta", type=_probability, default=1e-5, metavar="D",
                     help="delta of the (epsilon, delta) a differentially private process reports (default 1e-5)")
    run.add_argument("--dp-accountant", choices=("rdp", "pld"), default="rdp",
                     help="privacy accountant of dp-accounting (default rdp)")
    run.add_argument("--dropout", type=_probability, default=0.0, metavar="P",
                     help="drop each selected client with probability P (seeded)")
    run.add_argument("--out", metavar="DIR", help="output folder (default runs/NAME-TIMESTAMP)")
    run.add_argument("--logdir", metavar="DIR", help="also write TensorBoard summaries to DIR")
    run.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    run.add_argument("--plot", metavar="FILE.png", help="draw the metrics of every round into FILE.png "
                                                        "(matplotlib)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.add_argument("--runtime", choices=("local", "ray"),
                     help="where client phases run: local (the simulator, the default) or ray (sharded over "
                          "Ray workers; pip install 'fedlang[ray]'; see docs/distributed.md)")
    run.add_argument("--address", metavar="auto|ray://HOST:PORT",
                     help="with --runtime ray: the Ray cluster (auto: the one this node joined with "
                          "`ray start`; default: start a local Ray instance)")
    run.add_argument("--num-workers", type=_positive, metavar="N",
                     help="with --runtime ray: Ray workers (default: one per free CPU of the cluster)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "check":
            return _check(args.files, args.format)
        if args.command == "types":
            return _types(args.file)
        if args.command == "compile":
            return _compile(args.file, args.emit, args.optimize, args.output)
        if args.command == "run":
            defaults = _run_defaults(args.target)
            if defaults is None:
                return EXIT_USAGE
            if defaults:                     # the program's own `# fedlang run:` flags, then the user's
                rest = list(argv if argv is not None else sys.argv[1:])
                rest = rest[rest.index("run") + 1:]
                args = parser.parse_args(["run", *defaults, *rest])
            return _run(args)
    except KeyboardInterrupt:
        print("fedlang: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # a reader that stops early (`fedlang types f.fed | head`)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as error:       # noqa: BLE001 - the last line of defence against tracebacks
        print(f"internal compiler error: {type(error).__name__}: {error}\n"
              "This is a bug in fedlang, not in your program. Please report it with the file that caused it.",
              file=sys.stderr)
        if os.environ.get("FEDLANG_DEBUG"):
            traceback.print_exc()
        return EXIT_INTERNAL
    raise AssertionError(args.command)


def _check(files: list[str], fmt: str) -> int:
    from fedlang.api import check
    from fedlang.diagnostics import to_json

    result = check(*files)
    errors = len(result.errors)
    warnings = len(result.diagnostics) - errors
    if fmt == "json":
        json.dump({"files": files, "ok": result.ok, "errors": errors, "warnings": warnings,
                   "diagnostics": [to_json(d) for d in result.diagnostics]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK if result.ok else EXIT_ERRORS
    if result.diagnostics:
        print(result.render() + "\n", file=sys.stderr)
    noun = "file" if len(files) == 1 else "files"
    if errors:
        print(f"fedlang: {_plural(errors, 'error')} in {len(files)} {noun}", file=sys.stderr)
        return EXIT_ERRORS
    print(f"fedlang: {len(files)} {noun} checked, no errors"
          + (f" ({_plural(warnings, 'warning')})" if warnings else ""))
    return EXIT_OK


def _checked(file: str):
    """Check one file, printing its diagnostics; the result, or None when it has errors."""
    from fedlang.api import check

    result = check(file)
    if result.diagnostics:
        print(result.render() + "\n", file=sys.stderr)
    if not result.ok:
        print(f"fedlang: {_plural(len(result.errors), 'error')} in 1 file", file=sys.stderr)
        return None
    return result


def _types(file: str) -> int:
    result = _checked(file)
    if result is None:
        return EXIT_ERRORS
    for kind, name, t in result.module().declarations:
        if kind == "type":
            print(f"type {name} = {t}")
        else:
            print(f"{kind} {name} : {t}")
    return EXIT_OK


EMITS = ("ir", "dot", "phases", "png", "svg")


def _compile(file: str, emit: str | None, optimize: bool, output: str | None) -> int:
    """`fedlang compile`. Passes and phase splitting are imported here, not at start-up, so
    `fedlang check` stays fast."""
    if output is not None and emit is None:
        return _write_plan(file, output, optimize)
    from fedlang.api import compile_ir

    result = _checked(file)
    if result is None:
        return EXIT_ERRORS

    from fedlang.ir.graph import format_program, to_dot
    from fedlang.ir.verify import verify

    program = compile_ir(result, optimize=optimize)
    verify(program, "optimize" if optimize else "build")
    if emit is None:
        names = [name for name in program.root if name in program.functions]
        comps = sum(1 for name in names if program.functions[name].federated)
        print(f"fedlang: {file} compiled: {_plural(len(names), 'computation')} "
              f"({comps} comp{'' if comps == 1 else 's'}), {program.size()} IR nodes"
              + ("" if optimize else " (passes off)")
              + "; see it with --emit ir|dot|phases|png|svg")
        return EXIT_OK
    if emit in ("png", "svg"):
        return _draw(program, to_dot(program), emit, output or f"{os.path.splitext(os.path.basename(file))[0]}.{emit}")
    status = EXIT_OK
    if emit == "ir":
        text = format_program(program)
    elif emit == "dot":
        text = to_dot(program)
    else:
        from fedlang.ir.phases import PhaseSplitError, format_phases, split_phases
        from fedlang.ir.verify import verify_function

        parts, unsplit = [], 0
        for name in program.root:
            function = program.functions.get(name)
            if function is None or not function.federated:
                continue
            try:
                phases = split_phases(function, program)
            except PhaseSplitError as error:
                print(f"fedlang compile: cannot split `{name}` into phases: {error}\n"
                      "This is a limitation of this version of fedlang, not an error in your program.",
                      file=sys.stderr)
                unsplit += 1
                continue
            for phase in phases:
                verify_function(phase.function, phase.globals, f"phase splitting ({phase.name})")
            parts.append(format_phases(phases))
        if not parts and not unsplit:
            print(f"fedlang: {file} declares no comp, so there are no phases", file=sys.stderr)
        text = "\n\n".join(parts)
        status = EXIT_INTERNAL if unsplit else EXIT_OK
    if output is None:
        if text:
            _print_all(text)
    else:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    return status


def _print_all(text: str) -> None:
    """Print to stdout; a reader that stops early (`| head`) is not an error."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _draw(program, dot_text: str, fmt: str, output: str) -> int:
    """A drawing of the IR: Graphviz's `dot` if it is on PATH, else matplotlib and networkx."""
    import importlib.util
    import shutil
    import subprocess

    dot = shutil.which("dot")
    if dot is not None:
        done = subprocess.run([dot, f"-T{fmt}", "-o", output], input=dot_text, text=True, capture_output=True)
        if done.returncode != 0:
            print(f"fedlang compile: dot failed: {done.stderr.strip()}", file=sys.stderr)
            return EXIT_INTERNAL
    elif importlib.util.find_spec("matplotlib") is not None:
        _draw_with_matplotlib(program, fmt, output)
    else:
        print(f"fedlang compile: --emit {fmt} needs Graphviz (the `dot` program on PATH) or matplotlib "
              "(pip install matplotlib); neither is available here.\n"
              f"= help: --emit dot prints the graph as DOT text, e.g. for "
              f"`fedlang compile FILE --emit dot | dot -T{fmt} -o out.{fmt}` on a machine with Graphviz",
              file=sys.stderr)
        return EXIT_USAGE
    print(f"fedlang: wrote {output}", file=sys.stderr)
    return EXIT_OK


def _draw_with_matplotlib(program, fmt: str, output: str) -> None:
    """Every top-level function as layers of nodes (by dependency depth), drawn with networkx."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    graph, labels, positions = nx.DiGraph(), {}, {}
    x_offset = 0.0
    for function in program.functions.values():
        depth: dict[int, int] = {}
        for nid, node in function.nodes():
            depth[nid] = 1 + max((depth[i] for i in node.inputs), default=-1)
        columns: dict[int, int] = {}
        for nid, node in function.nodes():
            key = (function.name, nid)
            graph.add_node(key)
            labels[key] = f"%{nid} {node.prim.name}\n{node.type}"
            column = columns.get(depth[nid], 0)
            columns[depth[nid]] = column + 1
            positions[key] = (x_offset + column * 3.0, -depth[nid] * 1.5)
            for source in node.inputs:
                graph.add_edge((function.name, source), key)
        x_offset += 3.0 * (max(columns.values(), default=1) + 1)
    width = max(6.0, min(60.0, x_offset))
    height = max(4.0, min(60.0, 1.5 * max((-y for _, y in positions.values()), default=1) + 2))
    figure = plt.figure(figsize=(width, height))
    nx.draw_networkx(graph, positions, labels=labels, node_shape="s", node_color="#e8eef7", node_size=900,
                     font_size=6, arrows=True)
    plt.axis("off")
    figure.savefig(output, format=fmt, bbox_inches="tight")
    plt.close(figure)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


if __name__ == "__main__":
    sys.exit(main())


# ---- plans and runs ---------------------------------------------------------------------------

def _quiet_tensorflow() -> None:
    from fedlang.backends.tensorflow import import_quietly
    import_quietly()


def _plan_from_source(file: str, optimize: bool = True):
    """Check and compile FILE into an in-memory plan; None (diagnostics printed) on errors."""
    result = _checked(file)
    if result is None:
        return None
    _quiet_tensorflow()
    from fedlang.api import compile_ir
    from fedlang.backends.plan import compile_plan

    program = compile_ir(result, optimize=optimize)
    return compile_plan(program, os.path.basename(file), dict(result.sources.texts))


def _backend_failure(what: str, error: Exception) -> int:
    print(f"fedlang: {what}: {error}\n"
          "This is a limitation of this version of fedlang's TensorFlow backend, not an error in your "
          "program.", file=sys.stderr)
    return EXIT_ERRORS


def _write_plan(file: str, output: str, optimize: bool) -> int:
    from fedlang.backends.plan import PlanError

    try:
        plan = _plan_from_source(file, optimize)
        if plan is None:
            return EXIT_ERRORS
        plan.run_defaults = _run_defaults(file) or []
        plan.save(output)
    except PlanError as error:
        print(f"fedlang compile: {error}", file=sys.stderr)
        return EXIT_ERRORS
    except _backend_errors() as error:
        return _backend_failure(f"cannot compile {file} to a plan", error)
    except OSError as error:
        print(f"fedlang compile: cannot write {output}: {error.strerror or error}", file=sys.stderr)
        return EXIT_ERRORS
    comps = len(plan.computations)
    print(f"fedlang: wrote {output}: {_plural(comps, 'computation')}, "
          f"{_plural(len(plan.functions), 'TensorFlow function')}; run it with `fedlang run {output}`")
    return EXIT_OK


def _backend_errors() -> tuple:
    from fedlang.backends.layout import LayoutError
    from fedlang.backends.tensorflow.lower import LoweringError
    from fedlang.ir.phases import PhaseSplitError
    return (LoweringError, LayoutError, PhaseSplitError)


def _pairs(items: list[str], flag: str) -> dict[str, str] | None:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value:
            print(f"fedlang run: {flag} {item}: expected NAME=VALUE", file=sys.stderr)
            return None
        out[name.strip()] = value
    return out


RUN_DEFAULTS = "# fedlang run:"


def _run_defaults(target: str) -> list[str] | None:
    """Default flags a program gives `fedlang run` in a comment line `# fedlang run: FLAGS`
    (a plan keeps those of its source); [] when there are none, None (reported) when bad."""
    import shlex

    text = None
    try:
        if os.path.isdir(target):
            manifest = json.loads(open(os.path.join(target, "plan.json"), encoding="utf-8").read())
            return [str(x) for x in manifest.get("run_defaults", [])] if isinstance(manifest, dict) else []
        with open(target, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, ValueError):
        return []                        # the run itself reports an unreadable target
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(RUN_DEFAULTS):
            try:
                tokens = shlex.split(line[len(RUN_DEFAULTS):])
            except ValueError as error:
                print(f"{target}:{number}: bad `{RUN_DEFAULTS}` line: {error}", file=sys.stderr)
                return None
            if "--resume" in tokens or "--out" in tokens:
                print(f"{target}:{number}: `{RUN_DEFAULTS}` cannot set --resume or --out", file=sys.stderr)
                return None
            return tokens
    return []


def _run(args) -> int:
    import time
    from pathlib import Path

    from fedlang.backends.plan import PlanError

    target = args.target
    data, values = _pairs(args.data, "--data"), _pairs(args.arg, "--arg")
    if data is None or values is None:
        return EXIT_USAGE
    _quiet_tensorflow()
    from fedlang.backends.runner import RunConfig, Runner, RunError

    config = RunConfig(target=target, entry=args.entry, rounds=args.rounds,
                       clients_per_round=args.clients_per_round, seed=args.seed, data=data, args=values,
                       batch_size=args.batch_size, clients_per_chunk=args.clients_per_chunk,
                       dropout=args.dropout, out=args.out, logdir=args.logdir,
                       dp_delta=args.dp_delta, dp_accountant=args.dp_accountant, runtime=args.runtime,
                       address=args.address, num_workers=args.num_workers)
    resume = args.resume is not None
    if resume:
        out = Path(args.resume)
        try:
            saved = json.loads((out / "run.json").read_text())
            from fedlang.backends.runner import saved_state
            if saved_state(out / "checkpoint") is None:
                raise FileNotFoundError("no checkpoint")
        except (OSError, ValueError) as error:
            print(f"fedlang run: --resume {out}: not a run folder with a checkpoint ({error}); "
                  "a run folder holds run.json and checkpoint/ once its first round has finished",
                  file=sys.stderr)
            return EXIT_ERRORS
        config = RunConfig(**{**saved, "target": target})
    # where the client phases run does not change the result: given flags win over the saved ones
    for flag in ("runtime", "address", "num_workers"):
        if getattr(args, flag) is not None:
            setattr(config, flag, getattr(args, flag))
    if config.runtime is None:
        config.runtime = "local"
    if config.runtime != "ray" and (args.address is not None or args.num_workers is not None):
        print("fedlang run: --address and --num-workers go with --runtime ray", file=sys.stderr)
        return EXIT_USAGE
    if config.runtime == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            print("fedlang run: --runtime ray needs Ray, which is not installed here: "
                  "pip install 'fedlang[ray]'  (or: pip install 'ray>=2.9')", file=sys.stderr)
            return EXIT_ERRORS
    if not os.path.exists(target):
        print(f"fedlang run: {target}: no such file or plan directory", file=sys.stderr)
        return EXIT_ERRORS
    try:
        if os.path.isdir(target):
            from fedlang.backends.plan import load_plan
            plan = load_plan(target)
        else:
            plan = _plan_from_source(target)
            if plan is None:
                return EXIT_ERRORS
        if not resume:
            stem = os.path.splitext(os.path.basename(target.rstrip("/")))[0]
            out = Path(config.out or os.path.join("runs", f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                print("fedlang run: --plot needs matplotlib: pip install matplotlib", file=sys.stderr)
                return EXIT_USAGE
        status = Runner(plan, config, out, progress=args.progress).run(resume=resume)
        if args.plot and status == 0 and (out / "metrics.jsonl").exists():
            from fedlang.backends.plot import plot_metrics
            try:
                plot_metrics(out / "metrics.jsonl", Path(args.plot), os.path.basename(target.rstrip("/")))
            except (OSError, ValueError) as error:
                print(f"fedlang run: --plot {args.plot}: {error}", file=sys.stderr)
                return EXIT_ERRORS
            print(f"plot: {args.plot}")
        return status
    except (PlanError, RunError) as error:
        print(f"fedlang run: {error}", file=sys.stderr)
        return EXIT_ERRORS
    except _backend_errors() as error:
        return _backend_failure(f"cannot run {target}", error)
