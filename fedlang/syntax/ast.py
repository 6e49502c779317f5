"""The abstract syntax tree: frozen dataclasses, each with the span it came from.

One node class per construct of LANGUAGE.md sections 2-4. Type annotations
stay syntax here (`TypeExpr`): they may name aliases that only the checker can
resolve.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlang.diagnostics import Span


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """Base of every AST node. Identity equality: two nodes are the same node."""

    span: Span


# ---- type expressions -------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class TensorTypeExpr(Node):
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True, slots=True, eq=False)
class StructTypeExpr(Node):
    fields: tuple[tuple[str | None, "TypeExpr"], ...]


@dataclass(frozen=True, slots=True, eq=False)
class SequenceTypeExpr(Node):
    element: "TypeExpr"


@dataclass(frozen=True, slots=True, eq=False)
class FunctionTypeExpr(Node):
    parameter: "TypeExpr | None"
    result: "TypeExpr"


@dataclass(frozen=True, slots=True, eq=False)
class FederatedTypeExpr(Node):
    member: "TypeExpr"
    placement: str               # "CLIENTS" | "SERVER"
    all_equal: bool


@dataclass(frozen=True, slots=True, eq=False)
class NamedTypeExpr(Node):
    module: str | None           # alias of an imported module, or None
    name: str


TypeExpr = (TensorTypeExpr | StructTypeExpr | SequenceTypeExpr | FunctionTypeExpr
            | FederatedTypeExpr | NamedTypeExpr)


# ---- expressions -------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class Name(Node):
    id: str


@dataclass(frozen=True, slots=True, eq=False)
class IntLit(Node):
    value: int


@dataclass(frozen=True, slots=True, eq=False)
class FloatLit(Node):
    value: float
    text: str


@dataclass(frozen=True, slots=True, eq=False)
class BoolLit(Node):
    value: bool


@dataclass(frozen=True, slots=True, eq=False)
class StringLit(Node):
    value: str


@dataclass(frozen=True, slots=True, eq=False)
class DTypeLit(Node):
    """A dtype name used as a value: `cast(x, float64)`, `ones([3], int32)`."""

    dtype: str


@dataclass(frozen=True, slots=True, eq=False)
class PlacementLit(Node):
    """`CLIENTS` or `SERVER` as an argument of federated_value / federated_eval."""

    placement: str


@dataclass(frozen=True, slots=True, eq=False)
class StructLit(Node):
    fields: tuple[tuple[str | None, "Expr"], ...]


@dataclass(frozen=True, slots=True, eq=False)
class ListLit(Node):
    """`[64, 10]`: only meaningful as a static shape argument."""

    items: tuple["Expr", ...]


@dataclass(frozen=True, slots=True, eq=False)
class Select(Node):
    base: "Expr"
    name: str
    name_span: Span


@dataclass(frozen=True, slots=True, eq=False)
class Index(Node):
    base: "Expr"
    index: "Expr"


@dataclass(frozen=True, slots=True, eq=False)
class Arg(Node):
    keyword: str | None
    value: "Expr"


@dataclass(frozen=True, slots=True, eq=False)
class Call(Node):
    func: "Expr"
    args: tuple[Arg, ...]


@dataclass(frozen=True, slots=True, eq=False)
class BinOp(Node):
    op: str                      # + - * / % ** == != < <= > >= and or
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True, slots=True, eq=False)
class UnaryOp(Node):
    op: str                      # - not
    operand: "Expr"


@dataclass(frozen=True, slots=True, eq=False)
class If(Node):
    cond: "Expr"
    then: "Expr"
    orelse: "Expr"


@dataclass(frozen=True, slots=True, eq=False)
class Param(Node):
    name: str
    type: TypeExpr


@dataclass(frozen=True, slots=True, eq=False)
class Let(Node):
    names: tuple[str, ...]       # one name, or several for `let (a, b) = e`
    destructure: bool
    value: "Expr"


@dataclass(frozen=True, slots=True, eq=False)
class Block(Node):
    lets: tuple[Let, ...]
    result: "Expr"


@dataclass(frozen=True, slots=True, eq=False)
class Lambda(Node):
    params: tuple[Param, ...]
    result: TypeExpr | None
    body: "Expr | Block"


Expr = (Name | IntLit | FloatLit | BoolLit | StringLit | DTypeLit | PlacementLit
        | StructLit | ListLit | Select | Index | Call | BinOp | UnaryOp | If | Lambda)


# ---- declarations --------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class Import(Node):
    alias: str
    alias_span: Span
    dotted: tuple[str, ...] | None   # `import std.NAME`: ("std", "NAME")
    path: str | None                 # `import "file.fed"`: the path as written
    target_span: Span


@dataclass(frozen=True, slots=True, eq=False)
class TypeDecl(Node):
    name: str
    name_span: Span
    type: TypeExpr


@dataclass(frozen=True, slots=True, eq=False)
class FunctionDecl(Node):
    """`fn` (federated=False) or `comp` (federated=True)."""

    name: str
    name_span: Span
    federated: bool
    params: tuple[Param, ...]
    result: TypeExpr
    body: "Expr | Block"


@dataclass(frozen=True, slots=True, eq=False)
class ProcessDecl(Node):
    name: str
    name_span: Span
    fields: tuple[tuple[str, Span, "Expr"], ...]   # (init|next, span of the key, value)


Decl = Import | TypeDecl | FunctionDecl | ProcessDecl


@dataclass(frozen=True, slots=True, eq=False)
class Module(Node):
    decls: tuple[Decl, ...]
