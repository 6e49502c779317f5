"""The Python API of the front end: check programs, get their types.

    result = fedlang.check("examples/mean_temperature.fed")
    result.ok, result.diagnostics, result.render()
    result.types("examples/mean_temperature.fed")   # {name: Type}
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlang.diagnostics import Diagnostic, SourceMap, render_all
from fedlang.ir.checker import CheckedModule, ModuleInterface, check_module
from fedlang.modules import LoadedProgram, load


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
    return _check(load(list(paths)))


def check_source(text: str, file: str = "<input>.fed") -> CheckResult:
    """Check program text that is not on disk (imports resolve relative to `file`)."""
    return _check(load([file], texts={file: text}))


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
        diagnostics.extend(sorted(result.diagnostics, key=_position))
    return CheckResult(program, checked, diagnostics)


def _position(d: Diagnostic):
    return (0, 0) if d.span is None else (d.span.line, d.span.column)
