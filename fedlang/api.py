"""The Python API of the front end: check programs, get their types.

    result = fedlang.check("examples/mean_temperature.fed")
    result.ok, result.diagnostics, result.render()
    result.types("examples/mean_temperature.fed")   # {name: Type}
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlang.diagnostics import Diagnostic, FedlangError, SourceMap, render_all
from fedlang.ir.checker import CheckedModule, ModuleInterface, check_module
from fedlang.ir.gcpause import gc_paused
from fedlang.modules import LoadedProgram
from fedlang.modules import load as load_sources


@dataclass
class CheckResult:
    program: LoadedProgram
    checked: dict[str, CheckedModule]         # key -> checked module, dependencies first
    diagnostics: list[Diagnostic]

    @property
    def sources(self) -> SourceMap:
        return self.program.sources

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        return render_all(self.diagnostics, self.sources)

    def module(self, file: str | None = None) -> CheckedModule:
        """The checked module of a root file (the first one by default)."""
        for key in self.program.roots:
            module = self.checked.get(key)
            if module is not None and (file is None or module.file == file):
                return module
        raise KeyError(f"no checked module for {file!r}")

    def types(self, file: str | None = None) -> dict[str, object]:
        return {name: t for _, name, t in self.module(file).declarations}


def check(*paths: str) -> CheckResult:
    """Check the given .fed files and everything they import."""
    with gc_paused():
        return _check(load_sources(list(paths)))


def check_source(text: str, file: str = "<input>.fed") -> CheckResult:
    """Check program text that is not on disk (imports resolve relative to `file`)."""
    with gc_paused():
        return _check(load_sources([file], texts={file: text}))


def _check(program: LoadedProgram) -> CheckResult:
    checked: dict[str, CheckedModule] = {}
    diagnostics = list(program.diagnostics)
    for key, loaded in program.modules.items():       # dependencies come first
        interfaces: dict[str, ModuleInterface] = {}
        for alias, target in loaded.imports.items():
            if target in checked:
                interfaces[alias] = checked[target].interface
        result = check_module(loaded.module, loaded.file, loaded.name, interfaces)
        checked[key] = result
        diagnostics.extend(result.diagnostics)
    files = {path: i for i, path in enumerate(program.sources.texts)}      # in the order they were read
    diagnostics.sort(key=lambda d: (files.get(d.path, -1), _position(d)))  # grouped by file, stable
    return CheckResult(program, checked, diagnostics)


def _position(d: Diagnostic):
    return (0, 0) if d.span is None else (d.span.line, d.span.column)


# ---- running programs with the reference interpreter --------------------------------------

def load(path: str, optimize: bool = True) -> "Loaded":
    """Compile a program for the reference interpreter; its computations become callables.

        prog = fedlang.load("examples/mean_temperature.fed")
        prog.mean_temperature([20.0, 22.5, 19.0])     # 20.5
    """
    result = check(path)
    if not result.ok:
        raise FedlangError(result.errors, result.sources)
    return Loaded(compile_ir(result, optimize=optimize))


def compile_ir(result: CheckResult, optimize: bool = True):
    """The IR of a checked program (root module first-class, imports prefixed)."""
    from fedlang.ir.build import build_program

    prefixes: dict[str, str] = {}
    used: set[str] = set()
    root = result.program.roots[0]
    for key, loaded in result.program.modules.items():
        if key == root:
            prefixes[key] = ""
            continue
        prefix, k = loaded.name, 1
        while prefix in used:
            k += 1
            prefix = f"{loaded.name}~{k}"
        used.add(prefix)
        prefixes[key] = prefix
    items = []
    for key, loaded in result.program.modules.items():
        imports = {alias: prefixes[target] for alias, target in loaded.imports.items()}
        items.append((result.checked[key], imports, prefixes[key]))
    with gc_paused():                         # (as for checking: many small objects, few cycles)
        try:
            program = build_program(items)
        except FedlangError as error:          # a diagnostic found while building IR: show the source
            raise FedlangError(error.diagnostics, result.sources) from None
        if optimize:
            from fedlang.ir.passes import optimize as run_passes

            program = run_passes(program)
    return program


class Loaded:
    """A compiled program: `prog.NAME` is a computation or a process."""

    def __init__(self, program):
        from fedlang.ir.interpreter import Interpreter

        self.program = program
        self.interpreter = Interpreter(program)

    def __getattr__(self, name: str):
        program = self.__dict__.get("program")
        if program is not None:
            if name in program.processes:
                return Process(self, name)
            if name in program.functions and name in program.root:
                return Computation(self, name)
        raise AttributeError(f"the program has no computation or process `{name}`")

    def __dir__(self):
        return sorted(set(self.program.root))


class Computation:
    """A top-level fn or comp, callable with Python values (lists for CLIENTS)."""

    def __init__(self, loaded: Loaded, name: str):
        self.loaded, self.name = loaded, name
        self.function = loaded.program.functions[name]

    @property
    def type(self):
        return self.function.type

    def __call__(self, *args, clients: int | None = None):
        from fedlang.ir.values import conform, to_python

        params = self.function.params
        if len(args) != len(params):
            raise TypeError(f"{self.name} takes {len(params)} argument(s) ({self.type}), got {len(args)}")
        values = [conform(a, t, f"{self.name}: argument `{n}`") for a, (n, t) in zip(args, params)]
        n = _num_clients(values, params, clients, self.name)
        return to_python(self.loaded.interpreter.call(self.name, values, n))


class Process:
    """An iterative process: `initialize()`, `next(state, ...)`, `run(rounds, ...)`."""

    def __init__(self, loaded: Loaded, name: str):
        self.loaded, self.name = loaded, name
        self.init_name, self.next_name = loaded.program.processes[name]

    def initialize(self, clients: int = 0):
        return self.loaded.interpreter.call(self.init_name, [], clients)

    def next(self, state, *args, clients: int | None = None):
        """One round: returns (state, metrics or None) as interpreter values."""
        from fedlang.ir.values import Struct, conform

        function = self.loaded.program.functions[self.next_name]
        params = function.params
        values = [state] + [conform(a, t, f"{self.name}.next: argument `{n}`") for a, (n, t) in zip(args, params[1:])]
        n = _num_clients(values, params, clients, self.name)
        out = self.loaded.interpreter.call(self.next_name, values, n)
        if isinstance(out, Struct) and out.names == ("state", "metrics"):
            return out["state"], out["metrics"]
        return out, None

    def run(self, rounds: int, *args):
        """Run `rounds` rounds; an argument may be a function of the round index."""
        state, history = self.initialize(), []
        for r in range(rounds):
            state, metrics = self.next(state, *(a(r) if callable(a) else a for a in args))
            history.append(metrics)
        return state, history


def _num_clients(values, params, clients, name) -> int:
    from fedlang.ir.types import FederatedType, Placement

    counts = {len(v) for v, (_, t) in zip(values, params)
              if isinstance(t, FederatedType) and t.placement is Placement.CLIENTS}
    if len(counts) > 1:
        raise ValueError(f"{name}: every value at CLIENTS needs one entry per client; got {sorted(counts)}")
    if counts:
        (n,) = counts
        if clients is not None and clients != n:
            raise ValueError(f"{name}: clients={clients} but the arguments hold {n} clients")
        return n
    return clients or 0
