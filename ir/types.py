"""The fedlang type system: a small closed set of immutable types.

Mirrors federated-language's computation_types: tensors, structs, sequences,
functions and federated types (placement + all-equal flag). Constructors reject
types that cannot exist (a federated type inside a federated type, a placed
function). `str(t)` prints TFF's notation and `parse` reads it back:
`parse(str(t)) == t` for every type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator

DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64", "string")
INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8"})
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
NUMERIC_DTYPES = INTEGER_DTYPES | FLOAT_DTYPES


class Placement(str, enum.Enum):
    CLIENTS = "CLIENTS"
    SERVER = "SERVER"

    def __str__(self) -> str:
        return self.value


class TypeConstructionError(ValueError):
    """A type that cannot exist (nested placement, placed function, ...)."""


@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: str
    shape: tuple[int | None, ...] = ()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise TypeConstructionError(f"unknown dtype {self.dtype!r}")
        for d in self.shape:
            if d is not None and (not isinstance(d, int) or d < 0):
                raise TypeConstructionError(f"bad dimension {d!r} in a tensor shape")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        if not self.shape:
            return self.dtype
        return f"{self.dtype}[{','.join('?' if d is None else str(d) for d in self.shape)}]"


@dataclass(frozen=True, slots=True)
class StructType:
    fields: tuple[tuple[str | None, "Type"], ...] = ()

    def __post_init__(self):
        names = [n for n, _ in self.fields if n is not None]
        if len(names) != len(set(names)):
            raise TypeConstructionError("a struct type names a field twice")

    @property
    def names(self) -> tuple[str | None, ...]:
        return tuple(n for n, _ in self.fields)

    @property
    def types(self) -> tuple["Type", ...]:
        return tuple(t for _, t in self.fields)

    def field(self, name: str) -> "Type | None":
        for n, t in self.fields:
            if n == name:
                return t
        return None

    def __str__(self) -> str:
        return "<" + ",".join(str(t) if n is None else f"{n}={t}" for n, t in self.fields) + ">"


@dataclass(frozen=True, slots=True)
class SequenceType:
    element: "Type"

    def __post_init__(self):
        for t in walk(self.element):
            if isinstance(t, (FederatedType, FunctionType)):
                raise TypeConstructionError(f"a sequence cannot hold {_kind(t)} values")
            if isinstance(t, SequenceType):
                raise TypeConstructionError("a sequence cannot hold sequences (as in TFF)")

    def __str__(self) -> str:
        return f"{self.element}*"


@dataclass(frozen=True, slots=True)
class FunctionType:
    parameter: "Type | None"
    result: "Type"

    def __str__(self) -> str:
        return f"({'' if self.parameter is None else self.parameter} -> {self.result})"


@dataclass(frozen=True, slots=True)
class FederatedType:
    member: "Type"
    placement: Placement
    all_equal: bool

    def __post_init__(self):
        if not isinstance(self.placement, Placement):
            object.__setattr__(self, "placement", Placement(self.placement))
        if self.placement is Placement.SERVER and not self.all_equal:
            raise TypeConstructionError("a value at SERVER is always all-equal: write T@SERVER")
        for t in walk(self.member):
            if isinstance(t, FederatedType):
                raise TypeConstructionError("federated types cannot nest")
            if isinstance(t, FunctionType):
                raise TypeConstructionError("function types cannot be placed")

    def __str__(self) -> str:
        if self.all_equal:
            return f"{self.member}@{self.placement}"
        return f"{{{self.member}}}@{self.placement}"


Type = TensorType | StructType | SequenceType | FunctionType | FederatedType


def _kind(t: Type) -> str:
    return "federated" if isinstance(t, FederatedType) else "function"


def walk(t: Type) -> Iterator[Type]:
    """`t` and every type inside it, outside in."""
    yield t
    if isinstance(t, StructType):
        for _, f in t.fields:
            yield from walk(f)
    elif isinstance(t, SequenceType):
        yield from walk(t.element)
    elif isinstance(t, FunctionType):
        if t.parameter is not None:
            yield from walk(t.parameter)
        yield from walk(t.result)
    elif isinstance(t, FederatedType):
        yield from walk(t.member)


def leaves(t: Type) -> Iterator[TensorType]:
    """The tensors of a struct (or the tensor itself), in order."""
    if isinstance(t, TensorType):
        yield t
    elif isinstance(t, StructType):
        for _, f in t.fields:
            yield from leaves(f)


def is_placed(t: Type) -> bool:
    """Whether `t` is federated or holds federated values (a struct of them)."""
    if isinstance(t, FederatedType):
        return True
    return isinstance(t, StructType) and any(is_placed(f) for _, f in t.fields)


def placements_in(t: Type) -> set[Placement]:
    """Placements of the values a (struct) type holds."""
    if isinstance(t, FederatedType):
        return {t.placement}
    if isinstance(t, StructType):
        return set().union(*(placements_in(f) for _, f in t.fields))
    return set()


# ---- assignability (LANGUAGE.md section 2) ------------------------------------

def is_assignable(target: Type, source: Type) -> bool:
    """Whether a value of type `source` may be used where `target` is expected."""
    if target == source:
        return True
    if isinstance(target, TensorType):
        return (isinstance(source, TensorType) and target.dtype == source.dtype
                and len(target.shape) == len(source.shape)
                and all(t is None or t == s for t, s in zip(target.shape, source.shape)))
    if isinstance(target, StructType):
        # A named field accepts a field of the same name or an unnamed one; an
        # unnamed field accepts only an unnamed one (so the relation is
        # transitive; docs/language.md says why).
        return (isinstance(source, StructType) and len(target.fields) == len(source.fields)
                and all((tn is None and sn is None) or (tn is not None and sn in (tn, None))
                        for (tn, _), (sn, _) in zip(target.fields, source.fields))
                and all(is_assignable(tt, st) for (_, tt), (_, st) in zip(target.fields, source.fields)))
    if isinstance(target, SequenceType):
        return isinstance(source, SequenceType) and is_assignable(target.element, source.element)
    if isinstance(target, FunctionType):
        if not isinstance(source, FunctionType):
            return False
        if (target.parameter is None) != (source.parameter is None):
            return False
        return ((target.parameter is None or is_assignable(source.parameter, target.parameter))
                and is_assignable(target.result, source.result))
    if isinstance(target, FederatedType):
        return (isinstance(source, FederatedType) and target.placement == source.placement
                and (source.all_equal or not target.all_equal)
                and is_assignable(target.member, source.member))
    raise TypeError(f"not a fedlang type: {target!r}")


# ---- the notation parser --------------------------------------------------------

def parse(text: str) -> Type:
    """Read a type in TFF's notation, e.g. `parse("{float32}@CLIENTS")`.

    Uses the language's own grammar (start symbol `type_only`), so the notation
    the printer writes and the one `.fed` files use are the same. Raises
    `fedlang.diagnostics.FedlangError` with a diagnostic on bad input.
    """
    from fedlang.diagnostics import Diagnostic, FedlangError, SourceMap
    from fedlang.syntax import ast
    from fedlang.syntax.parser import parse_type_expr

    sources = SourceMap({"<type>": text})
    try:
        expr = parse_type_expr(text, "<type>")
    except FedlangError as error:
        raise FedlangError(error.diagnostics, sources) from None

    def convert(e: ast.TypeExpr) -> Type:
        if isinstance(e, ast.TensorTypeExpr):
            return TensorType(e.dtype, e.shape)
        if isinstance(e, ast.StructTypeExpr):
            return StructType(tuple((n, convert(f)) for n, f in e.fields))
        if isinstance(e, ast.SequenceTypeExpr):
            return SequenceType(convert(e.element))
        if isinstance(e, ast.FunctionTypeExpr):
            return FunctionType(None if e.parameter is None else convert(e.parameter), convert(e.result))
        if isinstance(e, ast.FederatedTypeExpr):
            member = convert(e.member)
            if any(isinstance(t, FederatedType) for t in walk(member)):
                raise FedlangError([Diagnostic("E064", "placements cannot nest", e.span)], sources)
            if any(isinstance(t, FunctionType) for t in walk(member)):
                raise FedlangError([Diagnostic("E065", "function types cannot be placed", e.span)], sources)
            return FederatedType(member, Placement(e.placement), e.all_equal)
        raise FedlangError([Diagnostic("E034", f"unknown type `{e.name}`", e.span,
                                       help="type notation has no aliases: spell the type out")], sources)

    try:
        return convert(expr)
    except TypeConstructionError as error:
        raise FedlangError([Diagnostic("E051", str(error), expr.span)], sources) from None
    except RecursionError:
        raise FedlangError([Diagnostic("E003", "this type nests too deeply", expr.span)], sources) from None
