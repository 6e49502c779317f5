"""Reading source files and resolving imports into a set of parsed modules.

`import std.NAME as X` reads `stdlib/NAME.fed` (shipped as package data);
`import "path.fed" as X` reads a file relative to the importing file. Missing
files, unreadable, binary or non-UTF-8 input, and import cycles are
diagnostics, never exceptions.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path

from fedlang.diagnostics import Diagnostic, FedlangError, SourceMap, Span, closest_names
from fedlang.syntax import ast
from fedlang.syntax.parser import parse_module


@dataclass
class LoadedModule:
    key: str                      # identity: an absolute path, or "std:NAME"
    file: str                     # the path diagnostics show
    name: str                     # how it was imported: "std.learning", "models/mlp.fed", or its path
    module: ast.Module
    imports: dict[str, str] = field(default_factory=dict)    # alias -> key of the imported module


@dataclass
class LoadedProgram:
    roots: list[str]                                         # keys of the files asked for
    modules: dict[str, LoadedModule]                         # every module, dependencies first
    diagnostics: list[Diagnostic]
    sources: SourceMap


def stdlib_dir() -> Path:
    return Path(str(importlib.resources.files("fedlang.stdlib")))


def stdlib_modules() -> list[str]:
    return sorted(p.stem for p in stdlib_dir().glob("*.fed"))


def read_source(path: Path, display: str, span: Span | None = None) -> tuple[str | None, Diagnostic | None]:
    """The text of a file, or a diagnostic saying why it cannot be read."""
    text, problem = _read(path, display, span)
    if problem is not None and span is None:
        problem = dataclasses.replace(problem, file=display)
    return text, problem


def _read(path: Path, display: str, span: Span | None) -> tuple[str | None, Diagnostic | None]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, Diagnostic("E010", f"cannot read `{display}`: no such file", span,
                                help=_missing_file_help(path))
    except IsADirectoryError:
        return None, Diagnostic("E010", f"cannot read `{display}`: it is a directory", span,
                                help="name a .fed file")
    except PermissionError:
        return None, Diagnostic("E010", f"cannot read `{display}`: permission denied", span)
    except OSError as error:
        return None, Diagnostic("E010", f"cannot read `{display}`: {error.strerror or error}", span)
    if b"\x00" in data:
        return None, Diagnostic("E011", f"`{display}` is a binary file, not fedlang source", span,
                                help="fedlang reads UTF-8 text files (.fed)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        return None, Diagnostic("E011", f"`{display}` is not valid UTF-8 (byte 0x{data[error.start]:02x} at "
                                        f"line {line}, column {column})", span,
                                help="save the file as UTF-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, None


def _missing_file_help(path: Path) -> str | None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return None
    try:
        siblings = [p.name for p in parent.iterdir() if p.suffix == ".fed"]
    except OSError:
        return None
    close = closest_names(path.name, siblings)
    return f"did you mean `{close[0]}`?" if close else None


def load(paths: list[str], texts: dict[str, str] | None = None) -> LoadedProgram:
    """Parse the files at `paths` and everything they import.

    `texts` maps a path to its source text when it does not come from disk
    (the Python API's `check_source`)."""
    loader = _Loader(texts or {})
    roots = []
    for p in paths:
        key = loader.load_file(Path(p), p, p, span=None)
        if key is not None:
            roots.append(key)
    return LoadedProgram(roots, loader.modules, loader.diagnostics, loader.sources)


class _Loader:
    def __init__(self, texts: dict[str, str]):
        self.texts = texts
        self.modules: dict[str, LoadedModule] = {}
        self.failed: set[str] = set()
        self.stack: list[tuple[str, str]] = []          # (key, display) of modules being loaded
        self.diagnostics: list[Diagnostic] = []
        self.sources = SourceMap()

    def load_file(self, path: Path, display: str, name: str, span: Span | None) -> str | None:
        key = str(path) if display in self.texts else os.path.abspath(path)
        return self._load(key, display, name, span, lambda: self._text(path, display, span), path.parent)

    def load_std(self, std: str, span: Span) -> str | None:
        path = stdlib_dir() / f"{std}.fed"
        if not path.is_file():
            available = stdlib_modules()
            close = closest_names(std, available)
            self.diagnostics.append(Diagnostic(
                "E020", f"there is no standard module `std.{std}`", span, "not found",
                help=(f"did you mean `std.{close[0]}`?" if close else
                      "the standard modules are " + ", ".join(f"std.{m}" for m in available) if available
                      else "import a file instead: import \"path/to/file.fed\" as name")))
            return None
        return self._load(f"std:{std}", f"std/{std}.fed", f"std.{std}", span,
                          lambda: read_source(path, f"std/{std}.fed", span), path.parent)

    def _text(self, path: Path, display: str, span: Span | None):
        if display in self.texts:
            return self.texts[display], None
        return read_source(path, display, span)

    def _load(self, key: str, display: str, name: str, span: Span | None, read, directory: Path) -> str | None:
        if key in self.modules:
            return key
        if key in self.failed:
            return None
        on_stack = [k for k, _ in self.stack]
        if key in on_stack:
            cycle = [d for _, d in self.stack[on_stack.index(key):]] + [display]
            self.diagnostics.append(Diagnostic(
                "E021", f"import cycle: {' -> '.join(cycle)}", span, "closes the cycle",
                help="modules cannot import each other; move what both need into a third module"))
            return None
        text, problem = read()
        if problem is not None:
            self.diagnostics.append(problem)
            self.failed.add(key)
            return None
        self.sources.texts[display] = text
        try:
            module = parse_module(text, display)
        except FedlangError as error:
            self.diagnostics.extend(error.diagnostics)
            self.failed.add(key)
            return None
        if not module.decls and not text.strip("\ufeff \t\r\n"):
            self.diagnostics.append(Diagnostic("W001", f"`{display}` is empty", None,
                                               help="a module declares fn, comp, type or process", file=display))
        loaded = LoadedModule(key, display, name, module)
        self.stack.append((key, display))
        for decl in module.decls:
            if not isinstance(decl, ast.Import):
                continue
            if decl.dotted is not None and (len(decl.dotted) != 2 or decl.dotted[0] != "std"):
                self.diagnostics.append(Diagnostic(
                    "E020", f"cannot import `{'.'.join(decl.dotted)}`", decl.target_span, "not a module path",
                    help='import a standard module as `std.NAME` or a file as `"path/to/file.fed"`'))
                continue
            if decl.dotted is not None:
                target = self.load_std(decl.dotted[1], decl.target_span)
            elif not decl.path.endswith(".fed"):
                self.diagnostics.append(Diagnostic(
                    "E020", f"cannot import `{decl.path}`: fedlang imports .fed files", decl.target_span,
                    "not a .fed file", help='name a fedlang source file, e.g. import "models/mlp.fed" as mlp'))
                continue
            else:
                relative = Path(decl.path)
                shown = os.path.normpath(os.path.join(os.path.dirname(display), decl.path))
                target = self.load_file(directory / relative, shown, decl.path, decl.target_span)
            if target is not None:
                loaded.imports[decl.alias] = target
        self.stack.pop()
        self.modules[key] = loaded
        return key
