"""Diagnostics are data; rendering them is separate (Elm's Reporting/, rustc).

A `Diagnostic` names a stable code (listed in docs/errors.md), a message, the
span it is about with a short label, notes and a help line. `render` turns it
into the text of LANGUAGE.md section 7; `to_json` into a dict for tools.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable


@dataclass(frozen=True, slots=True)
class Span:
    """A source range: 1-based lines and columns, `end_column` exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"

    def contains(self, other: "Span") -> bool:
        return (self.file == other.file
                and (self.line, self.column) <= (other.line, other.column)
                and (other.end_line, other.end_column) <= (self.end_line, self.end_column))

    @staticmethod
    def join(first: "Span", last: "Span") -> "Span":
        return Span(first.file, first.line, first.column, last.end_line, last.end_column)


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str                    # "E040"; warnings start with "W"
    message: str
    span: Span | None
    label: str = ""              # printed after the carets
    help: str | None = None
    notes: tuple[str, ...] = ()
    file: str | None = None      # for a diagnostic about a whole file (no span)

    @property
    def path(self) -> str | None:
        return self.span.file if self.span is not None else self.file

    @property
    def severity(self) -> str:
        return "warning" if self.code.startswith("W") else "error"

    def with_note(self, note: str) -> "Diagnostic":
        return dataclasses.replace(self, notes=self.notes + (note,))


class FedlangError(Exception):
    """Raised by API entry points when a program has errors; carries them."""

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: "SourceMap | None" = None):
        self.diagnostics = tuple(diagnostics)
        self.sources = sources or SourceMap()
        super().__init__(render_all(self.diagnostics, self.sources))


class InternalCompilerError(Exception):
    """A bug in fedlang, never the user's fault; the CLI says so."""


@dataclass
class SourceMap:
    """The text of every file a run read, so diagnostics can quote it."""

    texts: dict[str, str] = field(default_factory=dict)

    def line(self, file: str, line: int) -> str | None:
        text = self.texts.get(file)
        if text is None:
            return None
        lines = text.split("\n")
        if 1 <= line <= len(lines):
            return lines[line - 1].rstrip("\r")
        return None


def render(diagnostic: Diagnostic, sources: SourceMap) -> str:
    """`path:line:col: error[E0xx]: message`, the source line, carets, help."""
    d = diagnostic
    head = f"{d.severity}[{d.code}]: {d.message}"
    if d.span is None:
        lines = [f"{d.file}: {head}" if d.file else head]
    else:
        lines = [f"{d.span}: {head}"]
        source_line = sources.line(d.span.file, d.span.line)
        if source_line is not None:
            source_line = source_line.expandtabs(1)
            gutter = str(d.span.line)
            pad = " " * len(gutter)
            start = d.span.column - 1
            if d.span.end_line == d.span.line:
                stop = max(d.span.end_column - 1, start + 1)
            else:
                stop = max(len(source_line), start + 1)
            if len(source_line) > _MAX_SHOWN:
                source_line, start, stop = _window(source_line, start, stop)
            carets = " " * start + "^" * (stop - start)
            label = f" {d.label}" if d.label else ""
            lines += [f"{pad} |", f"{gutter} | {source_line}", f"{pad} | {carets}{label}"]
    for note in d.notes:
        lines.append(f"  = note: {note}")
    if d.help:
        lines.append(f"  = help: {d.help}")
    return "\n".join(line.rstrip() for line in lines)


_MAX_SHOWN = 100


def _window(line: str, start: int, stop: int) -> tuple[str, int, int]:
    """Cut a long source line to about _MAX_SHOWN characters around the span."""
    left = max(0, start - 30)
    right = min(len(line), left + _MAX_SHOWN)
    prefix = "..." if left > 0 else ""
    suffix = "..." if right < len(line) else ""
    shift = len(prefix) - left
    return prefix + line[left:right] + suffix, start + shift, min(stop, right) + shift


def render_all(diagnostics: Iterable[Diagnostic], sources: SourceMap) -> str:
    return "\n\n".join(render(d, sources) for d in diagnostics)


def to_json(diagnostic: Diagnostic) -> dict:
    d = diagnostic
    out: dict = {"severity": d.severity, "code": d.code, "message": d.message}
    if d.span is not None:
        out.update(file=d.span.file, line=d.span.line, column=d.span.column,
                   end_line=d.span.end_line, end_column=d.span.end_column)
    elif d.file is not None:
        out.update(file=d.file)
    out.update(label=d.label, help=d.help, notes=list(d.notes))
    return out


def closest_names(name: str, candidates: Iterable[str], limit: int = 3) -> list[str]:
    """Names a typo probably meant (for "did you mean" help lines)."""
    import difflib

    return difflib.get_close_matches(name, sorted(set(candidates)), n=limit, cutoff=0.7)
