"""The IR: every computation is a networkx.DiGraph of value nodes.

A node's payload is a frozen `Node`: the primitive that computes it (an entry
of the primitive table), its inputs in argument order, its static attributes,
its fedlang type (placement included) and its source span. The graph's edges
mirror the inputs (the wiring); the payload is the meaning. `fn`s and lambdas
are nested `Function`s, referenced from `closure` nodes.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import networkx as nx

from fedlang.diagnostics import InternalCompilerError, Span
from fedlang.ir.gcpause import gc_paused  # noqa: F401  (re-exported for the passes)
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
        # The constructor, not dataclasses.replace: this runs for most nodes of every pass.
        return self.__class__(self.prim, tuple(inputs), self.type, self.attrs, self.span)

    def with_attrs(self, **changes: Any) -> "Node":
        attrs = dict(self.attrs)
        attrs.update(changes)
        return self.__class__(self.prim, self.inputs, self.type, tuple(attrs.items()), self.span)


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
        nid = next_id(self.graph)
        attach(self.graph, nid, node, self.name)
        return nid

    def _next_id(self) -> int:
        return next_id(self.graph)

    def node(self, nid: int) -> Node:
        return self.graph._node[nid]["node"]

    def replace_node(self, nid: int, node: Node) -> None:
        """Give `nid` a new payload, rewiring its input edges."""
        graph = self.graph
        if nid not in graph._node:
            raise nx.NetworkXError(f"The node {nid} is not in the digraph.")
        if type(graph) is not nx.DiGraph:
            _clear(graph)
            for source in list(graph.predecessors(nid)):
                graph.remove_edge(source, nid)
            graph.nodes[nid]["node"] = node
            for source, found in _positions_by_source(node.inputs).items():
                graph.add_edge(source, nid, positions=found)
            return
        # What remove_edge / add_edge do, on networkx's dicts directly (this runs for every
        # node a pass rewires); the caches of the graph are dropped as networkx drops them.
        succ, pred = graph._succ, graph._pred
        mine = pred[nid]
        for source in mine:
            del succ[source][nid]
        mine.clear()
        graph._node[nid]["node"] = node
        for position, source in enumerate(node.inputs):
            data = mine.get(source)
            if data is not None:
                data["positions"] = positions(data["positions"] + (position,))
                continue
            if source not in succ:              # as add_edge: a missing input becomes a bare node
                succ[source], pred[source], graph._node[source] = {}, {}, {}
            data = {"positions": _AT[position] if position < _MANY else (position,)}
            succ[source][nid] = data
            mine[source] = data
        _clear(graph)

    def order(self) -> list[int]:
        """Node ids so that every node comes after its inputs (ties by id)."""
        return topological_order(self.graph)

    def nodes(self) -> Iterator[tuple[int, Node]]:
        payload = self.graph._node
        for nid in self.order():
            yield nid, payload[nid]["node"]

    def users(self, nid: int) -> list[int]:
        return sorted(self.graph._succ[nid])

    def size(self) -> int:
        """Nodes, nested functions included."""
        return sum(1 + sum(f.size() for f in _nested(data["node"])) for data in self.graph._node.values())


# ---- the wiring: networkx graphs, fast paths and caches -------------------------------------------
#
# A function's graph is a plain networkx.DiGraph. Facts derived from it are kept in the graph's
# own cache, `graph.__networkx_cache__`, which every networkx method that adds or removes a node
# or an edge (add_node included, which also sets a payload) clears, and so do `replace_node` and
# `attach`: a cached fact can never outlive the graph it was computed from. (A payload is changed
# only through those: never by writing `graph.nodes[n]["node"]` directly.) The facts: the
# dependency order (`topological_order`), the next free node id (`next_id`), and what passes.py
# asks again and again (`cached`: the nested functions, the globals used, whether a rule set is
# at its fixpoint). Adding a node whose id is larger than every other id keeps the order and the
# next id (such a node comes last in the order), so building a function never sorts it again.
# `attach`, `replace_node` and `graph_from` write networkx's adjacency dicts directly (the same
# writes add_node / add_edge make, several times faster). `verify` checks every cached fact
# against a fresh computation, and the edges against the inputs.

ORDER_KEY = "fedlang.order"        # keys of graph.__networkx_cache__ (all start with "fedlang.")
NEXT_ID_KEY = "fedlang.next_id"


def _cache(graph: nx.DiGraph) -> dict | None:
    return getattr(graph, "__networkx_cache__", None)


def cached(graph: nx.DiGraph, key: str, compute: Callable[[nx.DiGraph], Any]) -> Any:
    """`compute(graph)`, kept in the graph's cache under `key` until the graph changes. Only for
    facts that depend on nothing but the graph: its nodes, edges and payloads."""
    cache = _cache(graph)
    if cache is None:
        return compute(graph)
    value = cache.get(key, _MISSING)
    if value is _MISSING:
        value = cache[key] = compute(graph)
    return value


def cached_facts(graph: nx.DiGraph) -> dict[str, Any]:
    """The facts cached for `graph` (for `verify`)."""
    cache = _cache(graph) or {}
    return {key: value for key, value in cache.items() if isinstance(key, str) and key.startswith("fedlang.")}


_MISSING = object()


def next_id(graph: nx.DiGraph) -> int:
    """1 + the largest node id (0 for an empty graph)."""
    cache = _cache(graph)
    if cache is not None:
        nid = cache.get(NEXT_ID_KEY)
        if nid is not None:
            return nid
    nid = max(graph._node, default=-1) + 1
    if cache is not None:
        cache[NEXT_ID_KEY] = nid
    return nid


def attach(graph: nx.DiGraph, nid: int, node: Node, owner: str = "?") -> None:
    """Add node `nid`, larger than every id of `graph`, with an edge from each of its inputs
    (attribute `positions`: the argument positions the input fills, a tuple)."""
    if type(graph) is not nx.DiGraph:
        graph.add_node(nid, node=node)
        for source, found in _positions_by_source(node.inputs).items():
            if source not in graph:
                raise InternalCompilerError(f"{owner}: input %{source} of a {node.prim.name} node is missing")
            graph.add_edge(source, nid, positions=found)
        return
    succ = graph._succ
    if nid in succ:
        raise InternalCompilerError(f"{owner}: node %{nid} exists already")
    # The cache keeps the next id and the order (a node with the largest id that no node uses
    # comes last), when they are known; every other fact goes.
    cache = _cache(graph)
    known = order = None
    if cache:
        known = cache.get(NEXT_ID_KEY)
        if known is not None and nid >= known:
            order = cache.get(ORDER_KEY)
            if len(cache) > (1 if order is None else 2):
                cache.clear()
                if order is not None:
                    cache[ORDER_KEY] = order
        else:
            known = None
            cache.clear()
    mine: dict = {}
    succ[nid] = {}
    graph._pred[nid] = mine
    graph._node[nid] = {"node": node}
    position = 0
    for source in node.inputs:
        data = mine.get(source)
        if data is None:
            users = succ.get(source)
            if users is None:
                _clear(graph)
                raise InternalCompilerError(f"{owner}: input %{source} of a {node.prim.name} node is missing")
            users[nid] = mine[source] = {"positions": _AT[position] if position < _MANY else (position,)}
        else:
            data["positions"] = positions(data["positions"] + (position,))
        position += 1
    if known is not None:       # (else the next id is found again when it is asked for)
        cache[NEXT_ID_KEY] = nid + 1
        if order is not None:
            order.append(nid)


# An edge's `positions`: the argument positions its source fills in its target's inputs, a tuple.
# Equal tuples are one object ((0,), (1,), ... are made here, once): the cyclic collector stops
# tracking a tuple of ints, and a dict created with nothing tracked in it is not tracked either,
# so the edges' attribute dicts, most of a graph's objects, are never scanned.
_MANY = 64
_AT = tuple((position,) for position in range(_MANY))
_POSITIONS: dict[tuple[int, ...], tuple[int, ...]] = {}


def positions(found: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The shared tuple of these positions."""
    found = tuple(found)
    if len(found) == 1 and found[0] < _MANY:
        return _AT[found[0]]
    return _POSITIONS.setdefault(found, found)


def _positions_by_source(inputs: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    found: dict[int, list[int]] = {}
    for position, source in enumerate(inputs):
        found.setdefault(source, []).append(position)
    return {source: positions(ps) for source, ps in found.items()}


def _clear(graph: nx.DiGraph) -> None:
    cache = _cache(graph)
    if cache:
        cache.clear()


def graph_from(nodes: Iterable[tuple[int, Node]], order: list[int] | None = None) -> nx.DiGraph:
    """A new graph of `nodes` (id, payload), in that order, with the edges their inputs give;
    `order`: its dependency order when the caller knows it (it is cached)."""
    graph = nx.DiGraph()
    payload, succ, pred = graph._node, graph._succ, graph._pred
    nodes = nodes if isinstance(nodes, (list, tuple)) else list(nodes)
    for nid, node in nodes:
        payload[nid] = {"node": node}
        succ[nid] = {}
        pred[nid] = {}
    for nid, node in nodes:
        if not node.inputs:
            continue
        mine = pred[nid]
        for position, source in enumerate(node.inputs):
            data = mine.get(source)
            if data is not None:
                data["positions"] = positions(data["positions"] + (position,))
                continue
            users = succ.get(source)
            if users is None:
                raise InternalCompilerError(f"input %{source} of a {node.prim.name} node is missing")
            data = {"positions": _AT[position] if position < _MANY else (position,)}
            users[nid] = data
            mine[source] = data
    cache = _cache(graph)
    if order is not None and cache is not None:
        cache[ORDER_KEY] = order
    return graph


def cached_order(graph: nx.DiGraph) -> list[int] | None:
    """The dependency order `topological_order` cached for `graph`, if any (not a copy)."""
    cache = _cache(graph)
    return None if cache is None else cache.get(ORDER_KEY)


def topological_order(graph: nx.DiGraph) -> list[int]:
    """Node ids so that every node comes after its inputs, ties by the smaller id (networkx's
    lexicographical_topological_sort), cached until the graph changes. A cycle raises
    networkx.NetworkXUnfeasible."""
    cache = _cache(graph)
    if cache is not None:
        cached = cache.get(ORDER_KEY)
        if cached is not None:
            return list(cached)
    pred = graph._pred
    for target, sources in pred.items():
        if sources and max(sources) >= target:
            out = _kahn(graph)
            break
    else:                                   # every edge goes from a smaller id to a larger one
        out = sorted(pred)
    if cache is not None:
        cache[ORDER_KEY] = out
        return list(out)
    return out


def _kahn(graph: nx.DiGraph) -> list[int]:
    pred, succ = graph._pred, graph._succ
    waiting = {nid: len(sources) for nid, sources in pred.items()}
    ready = [nid for nid, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        nid = heapq.heappop(ready)
        out.append(nid)
        for user in succ[nid]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(out) != len(waiting):
        raise nx.NetworkXUnfeasible("Graph contains a cycle or graph changed during iteration")
    return out


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


def known_function(function: "Function", nid: int, program: "Program") -> "tuple[Function, list[int]] | None":
    """(function, its captured values) of a function value known at compile time
    (a closure or a global of `program`), else None."""
    node = function.node(nid)
    if node.prim.name == "closure":
        return node.attr("function"), list(node.inputs)
    if node.prim.name == "global":
        target = program.functions.get(node.attr("name"))
        if target is not None and target.result is not None:
            return target, []
    return None


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
