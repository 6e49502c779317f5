"""The IR: every computation is a networkx.DiGraph of value nodes.

A node's payload is a frozen `Node`: the primitive that computes it (an entry
of the primitive table), its inputs in argument order, its static attributes,
its fedlang type (placement included) and its source span. The graph's edges
mirror the inputs (the wiring); the payload is the meaning. `fn`s and lambdas
are nested `Function`s, referenced from `closure` nodes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import networkx as nx

from fedlang.diagnostics import InternalCompilerError, Span
from fedlang.ir.primitives import PRIMITIVES, Primitive
from fedlang.ir.types import FunctionType, StructType, Type


@dataclass(frozen=True, slots=True)
class Node:
    prim: Primitive
    inputs: tuple[int, ...]
    type: Type
    attrs: tuple[tuple[str, Any], ...] = ()
    span: Span | None = None

    def attr(self, name: str, default: Any = None) -> Any:
        for key, value in self.attrs:
            if key == name:
                return value
        return default

    def with_inputs(self, inputs: tuple[int, ...]) -> "Node":
        return replace(self, inputs=tuple(inputs))

    def with_attrs(self, **changes: Any) -> "Node":
        attrs = dict(self.attrs)
        attrs.update(changes)
        return replace(self, attrs=tuple(attrs.items()))


_ids = itertools.count(1)


@dataclass(eq=False)
class Function:
    """A computation: parameters, a graph of nodes, and the node it returns.

    `captures` come first when a closure calls it: the values a lambda uses
    from the scope around it."""

    name: str
    params: tuple[tuple[str, Type], ...]
    result_type: Type
    federated: bool = False
    captures: tuple[tuple[str, Type], ...] = ()
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    result: int | None = None
    span: Span | None = None
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def type(self) -> FunctionType:
        if not self.params:
            parameter = None
        elif len(self.params) == 1:
            parameter = self.params[0][1]
        else:
            parameter = StructType(tuple(self.params))
        return FunctionType(parameter, self.result_type)

    def add(self, node: Node) -> int:
        """Add a node (its inputs must exist); returns its id."""
        nid = self._next_id()
        self.graph.add_node(nid, node=node)
        for position, source in enumerate(node.inputs):
            if source not in self.graph:
                raise InternalCompilerError(f"{self.name}: input %{source} of a {node.prim.name} node is missing")
            if self.graph.has_edge(source, nid):
                self.graph.edges[source, nid]["positions"].append(position)
            else:
                self.graph.add_edge(source, nid, positions=[position])
        return nid

    def _next_id(self) -> int:
        return max(self.graph.nodes, default=-1) + 1

    def node(self, nid: int) -> Node:
        return self.graph.nodes[nid]["node"]

    def replace_node(self, nid: int, node: Node) -> None:
        """Give `nid` a new payload, rewiring its input edges."""
        for source in list(self.graph.predecessors(nid)):
            self.graph.remove_edge(source, nid)
        self.graph.nodes[nid]["node"] = node
        for position, source in enumerate(node.inputs):
            if self.graph.has_edge(source, nid):
                self.graph.edges[source, nid]["positions"].append(position)
            else:
                self.graph.add_edge(source, nid, positions=[position])

    def order(self) -> list[int]:
        """Node ids so that every node comes after its inputs (ties by id)."""
        return list(nx.lexicographical_topological_sort(self.graph))

    def nodes(self) -> Iterator[tuple[int, Node]]:
        for nid in self.order():
            yield nid, self.node(nid)

    def users(self, nid: int) -> list[int]:
        return sorted(self.graph.successors(nid))

    def size(self) -> int:
        """Nodes, nested functions included."""
        return sum(1 + sum(f.size() for f in _nested(n)) for _, n in self.nodes())


def _nested(node: Node) -> list["Function"]:
    out = []
    for _, value in node.attrs:
        if isinstance(value, Function):
            out.append(value)
    return out


def nested_functions(function: Function) -> Iterator[Function]:
    """The functions referenced by closure nodes of `function`, transitively."""
    for _, node in function.nodes():
        for inner in _nested(node):
            yield inner
            yield from nested_functions(inner)


@dataclass(eq=False)
class Program:
    """Every top-level computation of a program and of the modules it imports.

    Names of the root module's declarations are plain; an imported module's
    are prefixed with the module (`std.analytics.average`)."""

    functions: dict[str, Function] = field(default_factory=dict)
    processes: dict[str, tuple[str, str]] = field(default_factory=dict)     # name -> (init, next)
    root: list[str] = field(default_factory=list)                           # the root module's names

    def size(self) -> int:
        return sum(f.size() for f in self.functions.values())


def prim(name: str) -> Primitive:
    return PRIMITIVES[name]


# ---- text and DOT ----------------------------------------------------------------------------

def format_function(function: Function, indent: str = "") -> str:
    """The canonical text form: one line per node, nested functions indented."""
    kind = "comp" if function.federated else "fn"
    params = ", ".join(f"%{n}: {t}" for n, t in function.captures + function.params)
    lines = [f"{indent}{kind} {function.name}({params}) -> {function.result_type} {{"]
    for nid, node in function.nodes():
        lines.extend(_format_node(nid, node, indent + "  "))
    lines.append(f"{indent}  return %{function.result}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def _format_node(nid: int, node: Node, indent: str) -> list[str]:
    args = [f"%{i}" for i in node.inputs]
    nested = []
    for key, value in node.attrs:
        if isinstance(value, Function):
            nested.append(value)
            args.append(f"{key}=@{value.name}")
        else:
            args.append(f"{key}={_format_attr(value)}")
    lines = [f"{indent}%{nid}: {node.type} = {node.prim.name}({', '.join(args)})"]
    for inner in nested:
        lines.append(format_function(inner, indent + "    "))
    return lines


def _format_attr(value: Any) -> str:
    import numpy as np

    if isinstance(value, np.ndarray):
        return repr(value.tolist()) if value.size <= 8 else f"array{list(value.shape)}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_format_attr(v) for v in value) + ")"
    if isinstance(value, str):
        return value
    return repr(value)


def format_program(program: Program) -> str:
    return "\n\n".join(format_function(f) for f in program.functions.values())


def to_dot(program: Program) -> str:
    """Graphviz DOT: one cluster per top-level computation, nested ones inside."""
    lines = ["digraph fedlang {", "  node [shape=box, fontname=monospace, fontsize=10];"]
    counter = itertools.count()

    def emit(function: Function, indent: str) -> dict[int, str]:
        cluster = next(counter)
        lines.append(f'{indent}subgraph cluster_{cluster} {{')
        lines.append(f'{indent}  label="{function.name}: {function.type}";')
        names: dict[int, str] = {}
        for nid, node in function.nodes():
            key = f"n{cluster}_{nid}"
            names[nid] = key
            label = f"%{nid} {node.prim.name}\\n{node.type}".replace('"', "'")
            lines.append(f'{indent}  {key} [label="{label}"];')
            for inner in _nested(node):
                inner_names = emit(inner, indent + "  ")
                if inner.result is not None:
                    lines.append(f'{indent}  {inner_names[inner.result]} -> {key} [style=dashed];')
        for nid, node in function.nodes():
            for source in node.inputs:
                lines.append(f"{indent}  {names[source]} -> {names[nid]};")
        lines.append(f"{indent}}}")
        return names

    for function in program.functions.values():
        emit(function, "  ")
    lines.append("}")
    return "\n".join(lines)
