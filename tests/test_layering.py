"""The folder layout is the architecture: who may import whom.

  * the front end (fedlang/syntax/, fedlang/diagnostics.py, fedlang/modules.py)
    reads text; it never imports the checker (fedlang.ir) or a backend;
  * ir/ (installed as fedlang.ir) never imports a backend, the CLI or the API;
  * nothing in fedlang/ or ir/ imports TensorFlow: `fedlang check` must run
    without it.

Imports are read with `ast`, so an import inside a function counts as much as
one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Source folder -> the package it installs as (pyproject.toml [tool.setuptools.package-dir]).
PACKAGES = {"fedlang": "fedlang", "ir": "fedlang.ir"}

FRONT_END = ["fedlang/syntax", "fedlang/diagnostics.py", "fedlang/modules.py"]
FRONT_END_MAY_NOT = ["fedlang.ir", "fedlang.backends", "ir", "backends"]
IR_MAY_NOT = ["fedlang.backends", "fedlang.cli", "fedlang.api", "backends"]
NOWHERE = ["tensorflow", "tensorflow_federated", "keras"]


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    package = PACKAGES[relative.parts[0]]
    rest = list(relative.with_suffix("").parts[1:])
    if rest and rest[-1] == "__init__":
        rest.pop()
    return ".".join([package, *rest])


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names.

    `from a.b import c` counts as importing both `a.b` and `a.b.c` (c may be a
    submodule); relative imports are resolved against the module's package;
    `importlib.import_module("x")` and `__import__("x")` with a literal count too."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = _module_name(path)
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                found.add(node.args[0].value)
    return found


def _within(module: str, forbidden: list[str]) -> list[str]:
    return [f for f in forbidden if module == f or module.startswith(f + ".")]


def _sources(*relative: str) -> list[Path]:
    out = []
    for r in relative:
        p = ROOT / r
        out.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else [])
    return out


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


FRONT_END_FILES = _sources(*FRONT_END)
IR_FILES = _sources("ir")
ALL_FILES = _sources("fedlang", "ir")


def _violations(path: Path, forbidden: list[str]) -> list[str]:
    return sorted(m for m in imports_of(path) if _within(m, forbidden))


def test_the_layers_exist():
    assert len(FRONT_END_FILES) >= 4, _ids(FRONT_END_FILES)
    assert len(IR_FILES) >= 4, _ids(IR_FILES)
    assert (ROOT / "ir" / "checker.py") in IR_FILES


@pytest.mark.parametrize("path", FRONT_END_FILES, ids=_ids(FRONT_END_FILES))
def test_front_end_does_not_import_the_checker_or_backends(path):
    bad = _violations(path, FRONT_END_MAY_NOT)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the front end only reads text"


@pytest.mark.parametrize("path", IR_FILES, ids=_ids(IR_FILES))
def test_ir_does_not_import_backends_cli_or_api(path):
    bad = _violations(path, IR_MAY_NOT)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: ir/ sits below the API and the backends"


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_no_tensorflow(path):
    bad = _violations(path, NOWHERE)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: fedlang check must run without TensorFlow"


# ---- the import reader itself ----------------------------------------------------------------------

def test_imports_of_reads_every_form(tmp_path, monkeypatch):
    fake = ROOT / "ir" / "_layering_probe.py"      # never written: parse a string under that name
    source = ("import os, tensorflow as tf\n"
              "from fedlang import backends\n"
              "from . import avals\n"
              "from .types import TensorType\n"
              "from ..api import check\n"
              "def late():\n"
              "    import importlib\n"
              "    importlib.import_module('fedlang.cli')\n")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    found = imports_of(fake)
    assert {"os", "tensorflow", "fedlang.backends", "fedlang.ir.avals", "fedlang.ir.types",
            "fedlang.ir.types.TensorType", "fedlang.api", "fedlang.api.check", "fedlang.cli"} <= found
    assert _within("fedlang.backends", IR_MAY_NOT) and _within("tensorflow.keras", NOWHERE)
    assert not _within("fedlang.irony", FRONT_END_MAY_NOT)
