"""Optimization passes: pure functions `Program -> Program`, run by `optimize`.

Every pass returns a new Program and never touches its input: a function the
pass changes is copied first, one it leaves alone is shared. The passes, in the
order of the one pipeline (`pipeline()`):

  inline             calls of known functions (a `global` or a `closure` node) are
                     replaced by the callee's body: always for a `comp` called from a
                     comp (phase splitting needs one graph per computation) and for a
                     closure called once; for an `fn` up to INLINE_LIMIT nodes.
  fold_constants     a pure local operation on constants is replaced by its value,
                     computed by the primitive's own reference implementation (never
                     random_*, never a federated intrinsic).
  simplify           algebraic and structural laws (SIMPLIFY_RULES).
  fuse_maps          federated_map(f, federated_map(g, x)) -> federated_map(f . g, x).
  hoist_broadcasts   one broadcast per server value, as early as the value exists;
                     client work on broadcast values only is done once at the server.
  cse                common subexpression elimination by structural hashing.
  dce                dead nodes, unused captures and unreferenced imported functions.

Local rewrites are declarative `Rule(law, pattern, fn)` entries, each with its
law in a comment and in `law`; `rewrite_program` runs a rule set to a fixpoint
over every function, nested closures included (tinygrad's graph_rewrite), and a
function it rewrote keeps only what its result needs. The walker (`transform`)
is written once: the passes that are not rule sets (cse, dce) use it too.

    program = optimize(program)                         # the whole pipeline
    program = optimize(program, dump="/tmp/ir")         # also 00-input.ir, 01-inline.ir, ...
    program = optimize(program, dump=lambda name, p: verify(p, name))
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import networkx as nx
import numpy as np

from fedlang.diagnostics import InternalCompilerError
from fedlang.ir.avals import AVal, function_parameters
from fedlang.ir.graph import (ORDER_KEY, Function, Node, Program, attach, cached, cached_order, format_program,
                              gc_paused, graph_from, next_id, positions, prim, topological_order)
from fedlang.ir.types import FederatedType, FunctionType, Placement, StructType, TensorType, Type, leaves
from fedlang.ir.values import Struct

INLINE_LIMIT = 60          # nodes (nested functions included) of an `fn` inlined at every call
FOLD_LIMIT = 1 << 16       # elements of the largest constant folding may create
_MAX_SWEEPS = 10_000       # a rule set that has not converged by then is a bug


# ==== copying and the walker ====================================================================

def copy_function(function: Function) -> Function:
    """A deep copy: a new graph and new nested functions; node payloads (frozen) are shared."""
    return Function(function.name, function.params, function.result_type, function.federated,
                    function.captures, _copy_graph(function.graph), function.result, function.span)


def _copy_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of a function's graph, the functions of its closure nodes copied too: what
    add_nodes_from / add_edges_from build (the nodes, then every edge with its `positions`, a
    tuple), written on networkx's dicts directly (passes copy every function they change).
    The copy keeps the facts cached for the graph that hold for it too."""
    if type(graph) is not nx.DiGraph:
        out = nx.DiGraph()
        out.add_nodes_from((nid, {"node": _copy_nested(data["node"])}) for nid, data in graph.nodes(data=True))
        out.add_edges_from((source, target, {"positions": positions(data["positions"])})
                           for source, target, data in graph.edges(data=True))
        return out
    out = nx.DiGraph()
    payload, succ, pred = out._node, out._succ, out._pred
    copies: list[Function] = []
    for nid, data in graph._node.items():
        node = data["node"]
        if node.prim.name == "closure":
            node = _copy_nested(node)
            copies.extend(nested(node))
        payload[nid] = {"node": node}
        succ[nid] = {}
        pred[nid] = {}
    for source, users in graph._succ.items():
        if users:
            mine = succ[source]
            for target, data in users.items():
                data = {"positions": positions(data["positions"])}
                mine[target] = data
                pred[target][source] = data
    cache, old = getattr(out, "__networkx_cache__", None), getattr(graph, "__networkx_cache__", None)
    if cache is not None and old is not None:
        order = old.get(ORDER_KEY)
        if order is not None:
            cache[ORDER_KEY] = list(order)
        index = old.get(_INDEX)
        if index is not None:               # the same, but for the copies of the nested functions
            cache[_INDEX] = _Index(tuple(copies), index.globals, index.prims)
    return out


def _copy_nested(node: Node) -> Node:
    if node.prim.name != "closure":
        return node
    nested_ = {key: copy_function(value) for key, value in node.attrs if isinstance(value, Function)}
    return node.with_attrs(**nested_) if nested_ else node


def copy_program(program: Program) -> Program:
    return Program({name: copy_function(f) for name, f in program.functions.items()},
                   dict(program.processes), list(program.root))


def nested(node: Node) -> list[Function]:
    if node.prim.name != "closure":
        return []
    return [value for _, value in node.attrs if isinstance(value, Function)]


def order(function: Function) -> list[int]:
    """Node ids in dependency order, ties by id: Function.order() (cached until the graph changes;
    the ids themselves when every edge goes from a smaller id to a larger one, as after `renumber`)."""
    try:
        return topological_order(function.graph)
    except nx.NetworkXUnfeasible:
        raise InternalCompilerError(f"{function.name}: the graph has a cycle") from None


def size(function: Function) -> int:
    """Nodes, nested functions included (Function.size() without ordering the nodes)."""
    return len(function.graph) + sum(size(inner) for inner in _nested_functions(function.graph))


def all_functions(program: Program) -> Iterator[Function]:
    """Every function of the program, nested closures included (nested ones first)."""
    for function in program.functions.values():
        yield from postorder(function)


def postorder(function: Function) -> Iterator[Function]:
    """The functions nested in `function` (innermost first), then `function`."""
    out: list[Function] = []
    _postorder(function, out)
    return iter(out)


def _postorder(function: Function, out: list[Function]) -> None:
    for inner in _nested_functions(function.graph):
        _postorder(inner, out)
    out.append(function)


_INDEX = "fedlang.passes.index"


@dataclass(frozen=True)
class _Index:
    """What the walker asks of every function again and again, found in one look at its nodes
    and kept as a cached fact of its graph (see graph.cached): the functions of its closure
    nodes in node order, the names of its `global` nodes, and its primitives' names."""

    nested: tuple[Function, ...]
    globals: frozenset[str]
    prims: frozenset[str]


def _index(graph: nx.DiGraph) -> _Index:
    inner: list[Function] = []
    names: set[str] = set()
    prims: set[str] = set()
    for data in graph._node.values():
        node = data["node"]
        name = node.prim.name
        prims.add(name)
        if name == "closure":
            inner.extend(nested(node))
        elif name == "global":
            names.add(node.attr("name"))
    return _Index(tuple(inner), frozenset(names), frozenset(prims))


def stale_fact(function: Function, key: str, value: Any, functions: dict[str, Function]) -> str | None:
    """For `verify`: why the fact cached under `key` for `function`'s graph is not what computing
    it again gives, or None when it is."""
    if key == _INDEX:
        fresh = _index(function.graph)
        if (fresh.globals, fresh.prims) != (value.globals, value.prims) or len(fresh.nested) != len(value.nested) \
                or any(a is not b for a, b in zip(fresh.nested, value.nested)):
            return f"its cached index {value} is not {fresh}"
        return None
    rule_set = _FACT_RULE_SETS.get(key)
    if rule_set is None:
        rules = next((rules for rules, fact in _FACT_KEYS.items() if fact == key), None)
        if rules is None:
            return f"it has a cached fact {key!r} nothing computes"
        rule_set = _FACT_RULE_SETS[key] = RuleSet(rules)
    fresh = _would_rewrite(function, Program(functions), rule_set)
    if value != fresh:
        laws = ", ".join(sorted({rule.law for rule in rule_set.rules}))
        return f"its cached fact {key!r} (would the rules {laws[:80]}... rewrite it) is {value}, not {fresh}"
    return None


_FACT_RULE_SETS: dict[str, "RuleSet"] = {}       # (for stale_fact: the rule set of each fact key)


def _nested_functions(graph: nx.DiGraph) -> tuple[Function, ...]:
    """The functions of the closure nodes of a graph, in node order (a cached fact of the graph)."""
    return cached(graph, _INDEX, _index).nested


def globals_used(function: Function) -> set[str]:
    """Names of the top-level functions `function` (or a function nested in it) refers to."""
    out = set()
    for f in postorder(function):
        out |= cached(f.graph, _INDEX, _index).globals
    return out


def callees_first(program: Program) -> list[str]:
    """Top-level names ordered so that a function comes after every function it refers to."""
    uses = {name: sorted(globals_used(f) & program.functions.keys()) for name, f in program.functions.items()}
    result: list[str] = []
    state: dict[str, int] = {}
    for root in program.functions:
        if state.get(root):
            continue
        state[root] = 1
        stack = [(root, iter(uses[root]))]
        while stack:
            current, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                result.append(current)
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(uses[child])))
    return result


Probe = Callable[[Function, Program], bool]


def transform(program: Program, rewrite: Callable[[Function, Program], None], probe: Probe | None = None,
              callees_before_callers: bool = False, compact_ids: bool = False,
              copy: Callable[[Function], Function] = copy_function) -> Program:
    """The walker, written once. Returns a new Program in which `rewrite(function, program)` has run
    on a copy of every function, nested functions before the function holding them (and, if
    asked, callees before callers); every rewritten function is renumbered in dependency order.

    `probe(function, program) -> bool` says whether `rewrite` would change a function; a function
    for which it (and every function nested in it) says no is shared with the input instead of
    copied. The input program is never modified. `copy`: how a function is copied before `rewrite`
    runs (copy_function, or a copy that does the pass's work as it goes, as dce and compact do)."""
    with gc_paused():
        out = Program(dict(program.functions), dict(program.processes), list(program.root))
        names = callees_first(program) if callees_before_callers else list(program.functions)
        for name in names:
            original = program.functions[name]
            if probe is not None and not any(probe(f, out) for f in postorder(original)):
                continue
            function = copy(original)
            for f in list(postorder(function)):
                rewrite(f, out)
            for f in postorder(function):
                renumber(f, compact=compact_ids)
            out.functions[name] = function
        return out


def _has_gaps(function: Function, program: Program) -> bool:
    graph = function.graph
    ordered = cached_order(graph)
    if ordered is not None:         # (the order is 0, 1, ... just when the ids are and every edge goes up)
        return ordered != list(range(len(ordered)))
    return not (max(graph, default=-1) == len(graph) - 1 and all(source < target for source, target in graph.edges))


def compact(program: Program) -> Program:
    """Node ids 0, 1, ... in every function (passes may leave gaps where nodes went away)."""
    return transform(program, lambda function, prog: None, probe=_has_gaps, compact_ids=True,
                     copy=_compacted_copy)


def _compacted_copy(function: Function) -> Function:
    """copy_function, then renumber (compact) every function of the copy: in one go."""
    return _rebuilt(function, function.graph._node, order(function), _compacted_copy)


def _rebuilt(function: Function, payload: dict[int, dict], ordered: list[int],
             copy_nested: Callable[[Function], Function], result: int | None = None) -> Function:
    """A copy of `function` with the nodes `ordered` (a dependency order, of `payload`: node ->
    {"node": Node}) numbered 0, 1, ... in that order, the functions of closure nodes copied by
    `copy_nested`, and the edges their inputs give: what renumber (compact) makes of a copy.
    `result`: the result's old id (by default the function's)."""
    identity = ordered == list(range(len(ordered)))
    mapping = None if identity else {old: new for new, old in enumerate(ordered)}
    nodes = []
    for new, old in enumerate(ordered):
        node = payload[old]["node"]
        if node.prim.name == "closure":
            copies = {key: copy_nested(value) for key, value in node.attrs if isinstance(value, Function)}
            if copies:
                node = node.with_attrs(**copies)
        if mapping is not None and node.inputs:
            node = node.with_inputs(tuple(map(mapping.__getitem__, node.inputs)))
        nodes.append((new, node))
    graph = graph_from(nodes, list(range(len(nodes))))
    result = function.result if result is None else result
    return Function(function.name, function.params, function.result_type, function.federated,
                    function.captures, graph, result if identity else mapping[result], function.span)


def renumber(function: Function, compact: bool = True) -> None:
    """Node ids in dependency order (ties by old id), so printed IR is stable: 0, 1, ... when
    `compact`, else only when some edge goes from a larger id to a smaller one."""
    graph = function.graph
    ordered = order(function)
    n = len(ordered)
    if (not ordered or (ordered[0] == 0 and ordered[-1] == n - 1)) and ordered == list(range(n)):
        return
    if not compact and all(a < b for a, b in zip(ordered, ordered[1:])):
        return
    mapping = {old: new for new, old in enumerate(ordered)}
    payload = graph._node
    nodes = []
    inner: list[Function] = []
    for new, old in enumerate(ordered):
        node = payload[old]["node"]
        if node.prim.name == "closure":
            inner.extend(nested(node))
        nodes.append((new, node.with_inputs(tuple(map(mapping.__getitem__, node.inputs))) if node.inputs else node))
    new_graph = graph_from(nodes, list(range(n)))       # (the edges the inputs give, as in the old graph)
    index = getattr(graph, "__networkx_cache__", {}).get(_INDEX)
    cache = getattr(new_graph, "__networkx_cache__", None)
    if index is not None and cache is not None:         # the same nodes, in their new order
        cache[_INDEX] = _Index(tuple(inner), index.globals, index.prims)
    function.graph = new_graph
    function.result = mapping[function.result]


def live_nodes(function: Function) -> set[int]:
    """The nodes the result depends on (the result included)."""
    payload = function.graph._node
    live = {function.result}
    stack = [function.result]
    while stack:
        for source in payload[stack.pop()]["node"].inputs:
            if source not in live:
                live.add(source)
                stack.append(source)
    return live


# ==== the rewrite engine ========================================================================

@dataclass(frozen=True)
class Pat:
    """A pattern on the graph: the node's primitive(s) and patterns for its first inputs;
    `name` binds the matched node id for the rule's function."""

    prim: str | tuple[str, ...] | None = None
    src: tuple["Pat", ...] | None = None
    name: str | None = None

    @property
    def prims(self) -> tuple[str, ...] | None:
        return (self.prim,) if isinstance(self.prim, str) else self.prim

    def match(self, rw: "Rewriter", nid: int, bound: dict[str, int]) -> bool:
        node = rw.node(nid)
        if self.prim is not None and node.prim.name not in self.prims:
            return False
        if self.src is not None:
            if len(node.inputs) < len(self.src):
                return False
            for pattern, source in zip(self.src, node.inputs):
                if not pattern.match(rw, source, bound):
                    return False
        if self.name is not None:
            bound[self.name] = nid
        return True


def _bind(pattern: Pat, rw: "Rewriter", nid: int) -> dict[str, int] | None:
    """What `pattern` binds matching node `nid`, or None: `pattern.match` for a rule's root pattern,
    whose primitive RuleSet.for_prim has checked already."""
    if pattern.src is None:
        return {} if pattern.name is None else {pattern.name: nid}
    bound: dict[str, int] = {}
    return bound if pattern.match(rw, nid, bound) else None


@dataclass(frozen=True)
class Rule:
    """`law` (the comment), the pattern, and `fn(rw, **bound) -> replacement node id or None`."""

    law: str
    pattern: Pat
    fn: Callable[..., int | None]


class Rewriter:
    """Rewrites one function in place to a fixpoint of a rule set."""

    def __init__(self, function: Function, program: Program, rules: "RuleSet"):
        self.function, self.program, self.rules = function, program, rules
        self.graph = function.graph
        self.next_id = next_id(self.graph)
        # How many nodes a rule could start from (None: every node): none, and a sweep is a no-op.
        roots = rules.roots
        self.candidates = None if roots is None else \
            sum(1 for data in self.graph._node.values() if data["node"].prim.name in roots)

    # ---- reading ---------------------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self.graph._node[nid]["node"]

    def users(self, nid: int) -> list[int]:
        return sorted(self.graph._succ[nid])

    def const(self, nid: int) -> tuple[bool, Any]:
        """(True, value) for a constant node."""
        node = self.node(nid)
        if node.prim.name == "const":
            return True, node.attr("value")
        return False, None

    def known_function(self, nid: int) -> tuple[Function, tuple[int, ...]] | None:
        """The function a `global` or `closure` node denotes, with the node ids of its captures."""
        node = self.node(nid)
        if node.prim.name == "global":
            target = self.program.functions.get(node.attr("name"))
            return None if target is None else (target, ())
        if node.prim.name == "closure":
            return node.attr("function"), node.inputs
        return None

    # ---- writing ---------------------------------------------------------------------------------
    def add(self, node: Node) -> int:
        nid = self.next_id
        self.next_id += 1
        if self.candidates is not None and node.prim.name in self.rules.roots:
            self.candidates += 1
        for source in node.inputs:
            if source not in self.graph:
                self.graph.add_node(nid, node=node)
                raise InternalCompilerError(f"{self.function.name}: a rewrite used the missing node %{source}")
        attach(self.graph, nid, node, self.function.name)
        return nid

    def make(self, name: str, inputs: Iterable[int], t: Type, span=None, **attrs: Any) -> int:
        return self.add(Node(prim(name), tuple(inputs), t, tuple(attrs.items()), span))

    def splice(self, callee: Function, params: list[int], captured: Iterable[int], span=None) -> int:
        """Copy `callee`'s live body here with its parameters and captures bound; its result's id."""
        captured = tuple(captured)
        live = live_nodes(callee)
        mapping: dict[int, int] = {}
        for nid in order(callee):
            node = callee.node(nid)
            if nid not in live:
                continue
            name = node.prim.name
            if name == "param":
                mapping[nid] = params[node.attr("index")]
            elif name == "capture":
                mapping[nid] = captured[node.attr("index")]
            else:
                mapping[nid] = self.add(_copy_nested(node.with_inputs(tuple(map(mapping.__getitem__, node.inputs)))))
        return mapping[callee.result]

    def replace(self, old: int, new: int) -> None:
        """Every use of `old` becomes a use of `new`; `old` is removed."""
        if self.graph.has_edge(old, new):
            raise InternalCompilerError(f"{self.function.name}: a rewrite of %{old} uses %{old} itself")
        for user in list(self.graph._succ[old]):
            node = self.node(user)
            self.function.replace_node(user, node.with_inputs(tuple(new if i == old else i for i in node.inputs)))
        if self.function.result == old:
            self.function.result = new
        if self.candidates is not None and self.node(old).prim.name in self.rules.roots:
            self.candidates -= 1
        self.graph.remove_node(old)

    # ---- the fixpoint ------------------------------------------------------------------------------
    def run(self, done: dict[int, Function]) -> None:
        """Rewrite to a fixpoint; if anything changed, keep only what the result needs."""
        fired = False
        for sweep in range(_MAX_SWEEPS):
            changed = False
            if self.candidates != 0:            # (none: no node a rule starts from, nothing would change)
                changed = self._sweep(done)
                fired = fired or changed
            if not changed:
                if fired:
                    live = live_nodes(self.function)
                    self.graph.remove_nodes_from([nid for nid in list(self.graph) if nid not in live])
                return
        raise InternalCompilerError(f"{self.function.name}: the rewrite rules did not reach a fixpoint")

    def _sweep(self, done: dict[int, Function]) -> bool:
        """One visit of the live nodes in dependency order, trying the rules on each; whether one fired."""
        changed = False
        live = live_nodes(self.function)
        payload = self.graph._node
        for nid in order(self.function):
            if nid not in live or nid not in payload:
                continue
            node = payload[nid]["node"]
            for rule in self.rules.for_prim(node.prim.name):
                bound = _bind(rule.pattern, self, nid)
                if bound is None:
                    continue
                first_new = self.next_id
                new = rule.fn(self, **bound)
                if new is None or new == nid:
                    continue
                self.replace(nid, new)
                self.rules.fired[rule.law] += 1
                self._rewrite_new_closures(first_new, done)
                changed = True
                break
        return changed

    def _rewrite_new_closures(self, first_new: int, done: dict[int, Function]) -> None:
        for nid in range(first_new, self.next_id):
            if nid in self.graph:
                for inner in nested(self.node(nid)):
                    _rewrite_function(inner, self.program, self.rules, done)


class RuleSet:
    """Rules indexed by the primitive at the root of their pattern; counts what fired."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = tuple(rules)
        self.by_prim: dict[str | None, list[Rule]] = {}
        for rule in self.rules:
            for name in rule.pattern.prims or (None,):
                self.by_prim.setdefault(name, []).append(rule)
        self.fired: Counter[str] = Counter()
        self._for: dict[str, tuple[Rule, ...]] = {}
        self.fact_key = _fact_key(self.rules)
        # the primitives a rule's pattern can start from (None: a rule starts from any node)
        self.roots = None if None in self.by_prim else frozenset(self.by_prim)

    def for_prim(self, name: str) -> tuple[Rule, ...]:
        rules = self._for.get(name)
        if rules is None:
            rules = self._for[name] = tuple(self.by_prim.get(name, []) + self.by_prim.get(None, []))
        return rules


_FACT_KEYS: dict[tuple[Rule, ...], str] = {}


def _fact_key(rules: tuple[Rule, ...]) -> str | None:
    """The graph-cache key of "would this rule set rewrite the function", for a rule set of
    LOCAL_RULES only (whose answer depends on the function alone, not on the program)."""
    if not all(rule in LOCAL_RULES for rule in rules):
        return None
    key = _FACT_KEYS.get(rules)
    if key is None:
        key = _FACT_KEYS[rules] = f"fedlang.passes.would_rewrite.{len(_FACT_KEYS)}"
    return key


def _rewrite_function(function: Function, program: Program, rules: RuleSet, done: dict[int, Function]) -> None:
    # `done` holds the functions rewritten already, by id, and keeps them alive: the id of a
    # function a rewrite dropped must not come back as the id of a new one (skipping it).
    if id(function) in done:
        return
    for inner in list(postorder(function))[:-1]:
        if id(inner) not in done:
            done[id(inner)] = inner
            Rewriter(inner, program, rules).run(done)
    done[id(function)] = function
    Rewriter(function, program, rules).run(done)


class _WouldChange(Exception):
    pass


class _ReadOnly(Rewriter):
    """A rewriter that only finds out whether a rule would fire."""

    def __init__(self, function: Function, program: Program, rules: "RuleSet"):
        # (no next_id, no candidates: nothing is ever added, no sweep runs)
        self.function, self.program, self.rules = function, program, rules
        self.graph = function.graph

    def add(self, node: Node) -> int:
        raise _WouldChange

    def splice(self, callee: Function, params: list[int], captured: Iterable[int], span=None) -> int:
        # A splice either adds a node or gives a parameter or capture binding: the call's argument
        # or the closure's input, never the call itself. Either way the rule fires.
        raise _WouldChange


def would_rewrite(function: Function, program: Program, rules: RuleSet) -> bool:
    """Whether any rule of `rules` fires on a live node of `function` (not its nested functions).
    For a rule set whose rules read nothing but the function (LOCAL_RULES), the answer is a
    cached fact of the function's graph: a function no pass changed is not asked again."""
    key = rules.fact_key
    if key is not None:
        return cached(function.graph, key, lambda graph: _would_rewrite(function, program, rules))
    return _would_rewrite(function, program, rules)


def _would_rewrite(function: Function, program: Program, rules: RuleSet) -> bool:
    if rules.roots is not None and rules.roots.isdisjoint(cached(function.graph, _INDEX, _index).prims):
        return False                # no node any rule could start from
    rw = _ReadOnly(function, program, rules)
    for nid, data in function.graph._node.items():
        for rule in rules.for_prim(data["node"].prim.name):
            bound = _bind(rule.pattern, rw, nid)
            if bound is None:
                continue
            try:
                new = rule.fn(rw, **bound)
            except _WouldChange:
                return True
            if new is not None and new != nid:
                return True
    return False


def rewrite_function(function: Function, program: Program, rules: Iterable[Rule]) -> Function:
    """A rewritten copy of one function (`program` resolves its `global` nodes)."""
    out = copy_function(function)
    _rewrite_function(out, program, RuleSet(rules), {})
    for f in postorder(out):
        renumber(f)
    return out


def rewrite_program(program: Program, rules: Iterable[Rule], fired: Counter | None = None) -> Program:
    """A copy of `program` with `rules` applied to a fixpoint in every function."""
    rule_set = RuleSet(rules)
    done: dict[int, Function] = {}
    inlining = any(rule.pattern.prims == ("call",) for rule in rule_set.rules)
    out = transform(program, lambda function, prog: _rewrite_function(function, prog, rule_set, done),
                    probe=lambda function, prog: would_rewrite(function, prog, rule_set),
                    callees_before_callers=inlining)
    if fired is not None:
        fired.update(rule_set.fired)
    return out


# ==== helpers for rules ===========================================================================

def _is_one(value: Any) -> bool:
    return _all_equal_to(value, 1)


def _is_zero(value: Any) -> bool:
    """0, or +0.0 (not -0.0: x - (-0.0) is x + 0.0, which turns -0.0 into +0.0)."""
    return _all_equal_to(value, 0) and not bool(np.any(np.signbit(value)))


def _all_equal_to(value: Any, target: int) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value == target
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf" and value.size:
        return bool(np.all(value == target))
    return False


def _weak(rw: Rewriter, x: int) -> bool:
    node = rw.node(x)
    return node.prim.name == "const" and bool(node.attr("weak"))


def _plain(rw: Rewriter, x: int, out: int) -> bool:
    """`x` can stand for `out`: the same type, and `x` is not a weak literal."""
    return rw.node(x).type == rw.node(out).type and not _weak(rw, x)


def _integer_leaves(t: Type) -> bool:
    ls = list(leaves(t))
    return bool(ls) and all(leaf.dtype in ("int8", "int16", "int32", "int64", "uint8") for leaf in ls)


def _member(t: Type) -> Type:
    return t.member if isinstance(t, FederatedType) else t


def arg_types(node: Node, k: int) -> list[Type] | None:
    """The parameter type each of `k` arguments meets when function value `node` is called with
    them (declared parameters, or TFF's packing of several arguments into a struct parameter)."""
    ft = node.type
    if not isinstance(ft, FunctionType):
        return None
    params = function_parameters(AVal(ft, arity=node.attr("arity")))
    if params is None:
        return None
    if len(params) == k:
        return list(params)
    if len(params) == 1 and k > 1 and isinstance(ft.parameter, StructType) and len(ft.parameter.fields) == k:
        return list(ft.parameter.types)
    return None


def bind_params(rw: Rewriter, callee: Function, args: tuple[int, ...], span) -> list[int] | None:
    """Node ids for `callee`'s parameters given call arguments `args` (the interpreter's calling
    convention: one per parameter, several packed into one struct parameter, or one struct
    argument unpacked into several parameters)."""
    n, k = len(callee.params), len(args)
    if n == k:
        return list(args)
    if n == 1 and k > 1:
        t = callee.params[0][1]
        if isinstance(t, StructType) and len(t.fields) == k:
            return [rw.make("struct", args, t, span, names=t.names)]
        return None
    if k == 1 and n > 1:
        t = rw.node(args[0]).type
        if isinstance(t, StructType) and len(t.fields) == n:
            return [rw.make("select", args, ft, span, index=i) for i, ft in enumerate(t.types)]
        if isinstance(t, FederatedType) and t.placement is Placement.SERVER and isinstance(t.member, StructType) \
                and len(t.member.fields) == n:
            return [rw.make("select", args, FederatedType(ft, Placement.SERVER, True), span, index=i)
                    for i, ft in enumerate(t.member.types)]
    return None


# ==== inline ======================================================================================

def _inline_call(rw: Rewriter, call: int, f: int, only_federated: bool = False) -> int | None:
    """call(f, args) -> the body of f with its parameters bound to args."""
    known = rw.known_function(f)
    if known is None:
        return None
    callee, captured = known
    if callee is rw.function:
        return None
    fnode = rw.node(f)
    if only_federated and not callee.federated:
        return None
    if not (callee.federated or size(callee) <= INLINE_LIMIT
            or (fnode.prim.name == "closure" and rw.users(f) == [call]
                and list(rw.node(call).inputs).count(f) == 1)):
        return None
    node = rw.node(call)
    params = bind_params(rw, callee, node.inputs[1:], node.span)
    if params is None:
        return None
    return rw.splice(callee, params, captured, node.span)


INLINE_RULES = [
    # call(global g, args) -> body of g[params := args];  call(closure(@h, caps), args) -> body of h[...]
    Rule("call(f, args) -> body of f with its parameters bound to args (f a global or a closure)",
         Pat("call", (Pat(("global", "closure"), name="f"),), name="call"), _inline_call),
]

INLINE_COMPUTATION_RULES = [
    # call(comp c, args) -> body of c[params := args]   (phase splitting needs one graph per comp)
    Rule("call(c, args) -> body of c with its parameters bound to args (c a comp)",
         Pat("call", (Pat("global", name="f"),), name="call"),
         lambda rw, call, f: _inline_call(rw, call, f, only_federated=True)),
]


def inline(program: Program) -> Program:
    """Inline calls of known functions (see INLINE_RULES)."""
    return rewrite_program(program, INLINE_RULES)


def inline_computations(program: Program) -> Program:
    """Inline only calls of `comp`s from comps: the lowering phase splitting needs (also at -O0)."""
    return rewrite_program(program, INLINE_COMPUTATION_RULES + WIRING_RULES)


def lower_computation(function: Function, program: Program) -> Function:
    """`function` (a comp) with the comps it calls inlined, wiring structs taken apart and dead
    nodes removed: what phase splitting works on. Not an optimization: it runs at -O0 too."""
    with gc_paused():
        out = rewrite_function(function, program, INLINE_COMPUTATION_RULES + WIRING_RULES)
        _dce_in_place(out)          # (dce_function without its copy: `out` is a private copy already)
        return out


# ==== constant folding ============================================================================

_NEVER_FOLD = frozenset({"random_normal", "random_uniform", "random_normal_like", "param", "capture", "global",
                         "closure", "const", "struct", "select", "call", "cond", "reduce", "map"})
_NOT_IMPL_ATTRS = frozenset({"args", "weak", "arity"})


def _foldable(node: Node) -> bool:
    p = node.prim
    return not p.federated and p.impl is not None and p.name not in _NEVER_FOLD


def evaluate(node: Node, values: list[Any]) -> Any:
    """Run `node`'s reference implementation on input values, as the interpreter does."""
    attrs = {k: v for k, v in node.attrs if k not in _NOT_IMPL_ATTRS}
    if node.prim.typed_impl:
        attrs["out_type"] = node.type
    names = node.attr("args")
    with np.errstate(all="ignore"):
        if names is not None:
            return node.prim.impl(**dict(zip(names, values)), **attrs)
        return node.prim.impl(*values, **attrs)


def _known_value(rw: Rewriter, nid: int) -> tuple[bool, Any]:
    """A constant's value; nullary constructors (zeros, ones) count as constants here."""
    is_const, value = rw.const(nid)
    if is_const:
        return True, value
    node = rw.node(nid)
    if not node.inputs and _foldable(node) and isinstance(node.type, TensorType) \
            and None not in node.type.shape and int(np.prod(node.type.shape, dtype=np.int64)) <= FOLD_LIMIT:
        try:
            return True, evaluate(node, [])
        except Exception:   # noqa: BLE001 - a value that cannot be computed now is computed at run time
            return False, None
    return False, None


def _as_constant(value: Any, t: Type) -> np.ndarray | None:
    """`value` as the array of a typed constant of type `t`, or None when it is not one."""
    if not isinstance(t, TensorType):
        return None
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        return None
    dtype_ok = value.dtype.kind == "U" if t.dtype == "string" else value.dtype == np.dtype(t.dtype)
    if not dtype_ok or value.ndim != t.rank or value.size > FOLD_LIMIT:
        return None
    if any(d is not None and d != s for d, s in zip(t.shape, value.shape)):
        return None
    return value


def _fold(rw: Rewriter, x: int) -> int | None:
    node = rw.node(x)
    if not node.inputs or not _foldable(node):
        return None
    values = []
    for source in node.inputs:
        known, value = _known_value(rw, source)
        if not known:
            return None
        values.append(value)
    try:
        value = evaluate(node, values)
    except Exception:   # noqa: BLE001 - e.g. an index out of range: the error happens at run time
        return None
    array = _as_constant(value, node.type)
    if array is None:
        return None
    return rw.make("const", (), node.type, node.span, value=array)


def _fold_size(rw: Rewriter, x: int, v: int) -> int | None:
    t = rw.node(v).type
    if not isinstance(t, TensorType) or None in t.shape:
        return None
    return rw.make("const", (), rw.node(x).type, rw.node(x).span,
                   value=np.asarray(int(np.prod(t.shape, dtype=np.int64)), np.int32))


def _fold_cond(rw: Rewriter, x: int, c: int) -> int | None:
    is_const, value = rw.const(c)
    if not is_const or not isinstance(value, np.ndarray) or value.dtype != np.bool_ or value.shape != ():
        return None
    _, then, orelse = rw.node(x).inputs
    chosen = then if bool(value) else orelse
    return None if _weak(rw, chosen) else chosen


FOLD_RULES = [
    # p(c1, .., cn) -> const(p.impl(c1, .., cn))   for a pure local p (not random_*, not an intrinsic)
    Rule("p(const..) -> const(p.impl(const..))", Pat(None, name="x"), _fold),
    # size(x) -> const(number of elements)   when x's shape is static
    Rule("size(x) -> const(prod(shape of x))", Pat("size", (Pat(name="v"),), name="x"), _fold_size),
    # cond(true, a, b) -> a ;  cond(false, a, b) -> b
    Rule("cond(const c, a, b) -> a if c else b", Pat("cond", (Pat("const", name="c"),), name="x"), _fold_cond),
]


def fold_constants(program: Program) -> Program:
    """Evaluate pure local operations on constants at compile time (see FOLD_RULES)."""
    return rewrite_program(program, FOLD_RULES)


# ==== simplify =====================================================================================

def _select_struct(rw: Rewriter, x: int, s: int) -> int | None:
    return rw.node(s).inputs[rw.node(x).attr("index")]


def _select_zip(rw: Rewriter, x: int, z: int) -> int | None:
    return rw.node(z).inputs[rw.node(x).attr("index")]


def _struct_of_selects(rw: Rewriter, x: int) -> int | None:
    node = rw.node(x)
    if not node.inputs:
        return None
    sources = set()
    for i, source in enumerate(node.inputs):
        sel = rw.node(source)
        if sel.prim.name != "select" or sel.attr("index") != i:
            return None
        sources.add(sel.inputs[0])
    if len(sources) != 1:
        return None
    (s,) = sources
    t = rw.node(s).type
    if not isinstance(t, StructType) or t.names != node.type.names or len(t.fields) != len(node.inputs):
        return None
    return s


def _same_branches(rw: Rewriter, x: int) -> int | None:
    _, then, orelse = rw.node(x).inputs
    return then if then == orelse and not _weak(rw, then) else None


def _identity(position: int, test: Callable[[Any], bool], integer_only: bool = False):
    """op(x, c) -> x (position 1) or op(c, x) -> x (position 0) when c passes `test` and x's type
    is the result's type (so the constant neither broadcasts x to a larger shape nor changes it)."""
    def fn(rw: Rewriter, x: int) -> int | None:
        node = rw.node(x)
        if len(node.inputs) != 2:
            return None
        other, kept = node.inputs[position], node.inputs[1 - position]
        is_const, value = rw.const(other)
        if not is_const or not test(value) or not _plain(rw, kept, x):
            return None
        if integer_only and not _integer_leaves(node.type):
            return None
        return kept
    return fn


def _involution(rw: Rewriter, x: int, y: int) -> int | None:
    inner = rw.node(y).inputs[0]
    return inner if _plain(rw, inner, x) else None


def _bool_identity(position: int, neutral: bool):
    def fn(rw: Rewriter, x: int) -> int | None:
        node = rw.node(x)
        other, kept = node.inputs[position], node.inputs[1 - position]
        is_const, value = rw.const(other)
        if not is_const or not isinstance(value, np.ndarray) or value.dtype != np.bool_:
            return None
        if not bool(np.all(value == neutral)) or not _plain(rw, kept, x):
            return None
        return kept
    return fn


def _same_type(rw: Rewriter, x: int) -> int | None:
    kept = rw.node(x).inputs[0]
    return kept if _plain(rw, kept, x) else None


SIMPLIFY_RULES = [
    # select(struct(a0, .., an), i) -> ai
    Rule("select(struct(a0..an), i) -> ai", Pat("select", (Pat("struct", name="s"),), name="x"), _select_struct),
    # select(federated_zip(x0, .., xn), i) -> xi
    Rule("select(federated_zip(x0..xn), i) -> xi", Pat("select", (Pat("federated_zip", name="z"),), name="x"),
         _select_zip),
    # struct(select(s, 0), .., select(s, n-1)) -> s   (s an unplaced struct with the same names)
    Rule("struct(select(s,0)..select(s,n-1)) -> s", Pat("struct", name="x"), _struct_of_selects),
    # cond(c, a, a) -> a
    Rule("cond(c, a, a) -> a", Pat("cond", name="x"), _same_branches),
    # mul(x, 1) -> x ;  mul(1, x) -> x   (exact, NaN and -0.0 included)
    Rule("mul(x, 1) -> x", Pat("mul", name="x"), _identity(1, _is_one)),
    Rule("mul(1, x) -> x", Pat("mul", name="x"), _identity(0, _is_one)),
    # div(x, 1) -> x
    Rule("div(x, 1) -> x", Pat("div", name="x"), _identity(1, _is_one)),
    # pow(x, 1) -> x
    Rule("pow(x, 1) -> x", Pat("pow", name="x"), _identity(1, _is_one)),
    # sub(x, 0) -> x   (exact for +0: -0.0 - 0.0 is -0.0; not for -0.0)
    Rule("sub(x, 0) -> x", Pat("sub", name="x"), _identity(1, _is_zero)),
    # add(x, 0) -> x ;  add(0, x) -> x   integers only: for floats -0.0 + 0.0 is +0.0
    Rule("add(x, 0) -> x  (integer x)", Pat("add", name="x"), _identity(1, _is_zero, integer_only=True)),
    Rule("add(0, x) -> x  (integer x)", Pat("add", name="x"), _identity(0, _is_zero, integer_only=True)),
    # logical_and(x, true) -> x ;  logical_or(x, false) -> x   (and mirrored)
    Rule("logical_and(x, true) -> x", Pat("logical_and", name="x"), _bool_identity(1, True)),
    Rule("logical_and(true, x) -> x", Pat("logical_and", name="x"), _bool_identity(0, True)),
    Rule("logical_or(x, false) -> x", Pat("logical_or", name="x"), _bool_identity(1, False)),
    Rule("logical_or(false, x) -> x", Pat("logical_or", name="x"), _bool_identity(0, False)),
    # neg(neg(x)) -> x ;  logical_not(logical_not(x)) -> x
    Rule("neg(neg(x)) -> x", Pat("neg", (Pat("neg", name="y"),), name="x"), _involution),
    Rule("logical_not(logical_not(x)) -> x", Pat("logical_not", (Pat("logical_not", name="y"),), name="x"),
         _involution),
    # cast(x, d) -> x   when x already has dtype d ;  reshape(x, s) -> x   when x already has shape s
    Rule("cast(x, dtype of x) -> x", Pat("cast", name="x"), _same_type),
    Rule("reshape(x, shape of x) -> x", Pat("reshape", name="x"), _same_type),
]

# The structural part of SIMPLIFY_RULES: phase splitting needs it even at -O0.
WIRING_RULES = SIMPLIFY_RULES[:3]


def simplify(program: Program) -> Program:
    """Algebraic and structural laws (see SIMPLIFY_RULES)."""
    return rewrite_program(program, SIMPLIFY_RULES)


# ==== fusion of federated_maps =======================================================================

def _short(rw: Rewriter, f: int) -> str:
    node = rw.node(f)
    if node.prim.name == "global":
        return node.attr("name").rsplit(".", 1)[-1]
    return node.attr("function").name.rsplit(".", 1)[-1]


def _function_value(rw: Rewriter, body: Function, f: int, first_capture: int, captures: list[int]) -> int:
    """Rebuild function value `f` (of the outer function) inside `body`: a global node, or a closure
    over `body`'s captures first_capture.. (the values the original closure captured)."""
    node = rw.node(f)
    if node.prim.name == "global":
        return body.add(node)
    inner = node.attr("function")
    inputs = tuple(captures[first_capture + i] for i in range(len(inner.captures)))
    return body.add(node.with_inputs(inputs).with_attrs(function=copy_function(inner)))


def _fuse(rw: Rewriter, outer: int) -> int | None:
    o = rw.node(outer)
    f = o.inputs[0]
    for inner in dict.fromkeys(o.inputs[1:]):
        i = rw.node(inner)
        if i.prim.name not in ("federated_map", "federated_apply") or rw.users(inner) != [outer]:
            continue
        if isinstance(i.type, FederatedType) and isinstance(o.type, FederatedType) \
                and i.type.placement is not o.type.placement:
            continue
        fused = _compose(rw, o, i, f, i.inputs[0], inner)
        if fused is not None:
            return fused
    return None


def _compose(rw: Rewriter, o: Node, i: Node, f: int, g: int, inner: int) -> int | None:
    if rw.known_function(f) is None or rw.known_function(g) is None:
        return None
    outer_args, inner_args = o.inputs[1:], i.inputs[1:]
    f_types, g_types = arg_types(rw.node(f), len(outer_args)), arg_types(rw.node(g), len(inner_args))
    if f_types is None or g_types is None:
        return None
    # The composed function's arguments: the outer ones, with the inner map's spliced in at its place.
    new_args: list[int] = []
    param_types: list[Type] = []
    f_sources: list[int | None] = []          # per outer argument: a parameter index, or None (g's result)
    g_params: list[int] = []
    for a, t in zip(outer_args, f_types):
        if a == inner:
            if not g_params:
                g_params = list(range(len(new_args), len(new_args) + len(inner_args)))
                new_args.extend(inner_args)
                param_types.extend(g_types)
            f_sources.append(None)
        else:
            f_sources.append(len(new_args))
            new_args.append(a)
            param_types.append(t)
    f_fn, f_caps = rw.known_function(f)
    g_fn, g_caps = rw.known_function(g)
    f_caps = f_caps if rw.node(f).prim.name == "closure" else ()
    g_caps = g_caps if rw.node(g).prim.name == "closure" else ()
    f_type, g_type = rw.node(f).type, rw.node(g).type
    declared = (f_fn.captures if f_caps else ()) + (g_fn.captures if g_caps else ())
    body = Function(f"{_short(rw, f)}_o_{_short(rw, g)}", tuple((f"x{k}", t) for k, t in enumerate(param_types)),
                    f_type.result, captures=tuple((f"c{k}", t) for k, (_, t) in enumerate(declared)), span=o.span)
    captures = [body.add(Node(prim("capture"), (), t, (("index", k),), o.span))
                for k, (_, t) in enumerate(body.captures)]
    params = [body.add(Node(prim("param"), (), t, (("index", k),), o.span)) for k, t in enumerate(param_types)]
    f_value = _function_value(rw, body, f, 0, captures)
    g_value = _function_value(rw, body, g, len(f_caps), captures)
    g_result = body.add(Node(prim("call"), (g_value, *(params[k] for k in g_params)), g_type.result, (), i.span))
    f_inputs = tuple(g_result if k is None else params[k] for k in f_sources)
    body.result = body.add(Node(prim("call"), (f_value, *f_inputs), f_type.result, (), o.span))
    closure = rw.make("closure", f_caps + g_caps, body.type, o.span, function=body,
                      arity=tuple(name for name, _ in body.params))
    name = "federated_apply" if o.prim.name == "federated_apply" and len(new_args) == 1 else "federated_map"
    return rw.make(name, (closure, *new_args), o.type, o.span)


FUSION_RULES = [
    # federated_map(f, federated_map(g, x)) -> federated_map(f . g, x)
    #   (several arguments: federated_map(f, a, federated_map(g, x, y), b) -> federated_map(f . g, a, x, y, b);
    #    the inner map has no other user; federated_apply likewise)
    Rule("federated_map(f, federated_map(g, x)) -> federated_map(f . g, x)",
         Pat(("federated_map", "federated_apply"), name="outer"), _fuse),
]


def fuse_maps(program: Program) -> Program:
    """Fuse adjacent federated_maps into one map of the composed function (see FUSION_RULES)."""
    return rewrite_program(program, FUSION_RULES)


# ==== broadcasts ========================================================================================

def _broadcast_of_value(rw: Rewriter, x: int, v: int) -> int | None:
    node = rw.node(v)
    if node.attr("placement") is not Placement.SERVER:
        return None
    moved = replace(node, type=rw.node(x).type, span=rw.node(x).span).with_attrs(placement=Placement.CLIENTS)
    return rw.add(moved)


def _first_broadcast(rw: Rewriter, x: int) -> int | None:
    source = rw.node(x).inputs[0]
    earlier = [u for u in rw.users(source) if u < x and rw.node(u).prim.name == "federated_broadcast"]
    return earlier[0] if earlier else None


def _broadcast_select(rw: Rewriter, x: int, s: int) -> int | None:
    """broadcast(select(v, i)) -> select(broadcast(v), i) when v itself is broadcast already."""
    v = rw.node(s).inputs[0]
    whole = [u for u in rw.users(v) if rw.node(u).prim.name == "federated_broadcast"]
    if not whole:
        return None
    member = rw.node(x).type.member
    return rw.make("select", (whole[0],), FederatedType(member, Placement.CLIENTS, True), rw.node(x).span,
                   index=rw.node(s).attr("index"))


def _map_of_broadcasts(rw: Rewriter, x: int) -> int | None:
    node = rw.node(x)
    if not isinstance(node.type, FederatedType) or node.type.placement is not Placement.CLIENTS:
        return None
    args = node.inputs[1:]
    if not args or any(rw.node(a).prim.name != "federated_broadcast" for a in args):
        return None
    member = node.type.member
    server = rw.make("federated_map", (node.inputs[0], *(rw.node(a).inputs[0] for a in args)),
                     FederatedType(member, Placement.SERVER, True), node.span)
    return rw.make("federated_broadcast", (server,), FederatedType(member, Placement.CLIENTS, True), node.span,
                   args=("x",))


BROADCAST_RULES = [
    # federated_broadcast(x) -> the first federated_broadcast(x)   (one broadcast per server value)
    Rule("federated_broadcast(x), federated_broadcast(x) -> one federated_broadcast(x)",
         Pat("federated_broadcast", name="x"), _first_broadcast),
    # federated_broadcast(select(v, i)) -> select(federated_broadcast(v), i)   when v is broadcast anyway
    Rule("federated_broadcast(select(v, i)) -> select(federated_broadcast(v), i)",
         Pat("federated_broadcast", (Pat("select", name="s"),), name="x"), _broadcast_select),
    # federated_broadcast(federated_value(v, SERVER)) -> federated_value(v, CLIENTS)   (no communication)
    Rule("federated_broadcast(federated_value(v, SERVER)) -> federated_value(v, CLIENTS)",
         Pat("federated_broadcast", (Pat("federated_value", name="v"),), name="x"), _broadcast_of_value),
    # federated_map(f, federated_broadcast(x1), ..) -> federated_broadcast(federated_map(f, x1, ..))
    #   (f runs once at the server instead of once per client; the result is all-equal)
    Rule("federated_map(f, broadcast(x1)..broadcast(xn)) -> broadcast(federated_map(f, x1..xn))",
         Pat("federated_map", name="x"), _map_of_broadcasts),
]


# Rules that read nothing but the function they rewrite (not the program's other functions):
# whether they would rewrite a function is a fact of its graph (see would_rewrite).
LOCAL_RULES = frozenset(FOLD_RULES + SIMPLIFY_RULES + BROADCAST_RULES)


def hoist_broadcasts(program: Program) -> Program:
    """One broadcast per server value, as early as it exists (see BROADCAST_RULES)."""
    return rewrite_program(program, BROADCAST_RULES)


# ==== common subexpression elimination ================================================================

def value_key(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """A hashable key equal for equal static values: arrays by dtype, shape and bytes; floats by
    repr (so 0.0 and -0.0 differ and 1 and 1.0 differ); functions by structure."""
    memo = {} if memo is None else memo
    if isinstance(value, Function):
        return function_key(value, memo)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return value_key(np.asarray(value), memo)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, str):
        return ("str", value)
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        return (type(value).__name__, value.value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(value_key(v, memo) for v in value))
    if isinstance(value, Struct):
        return ("struct", value.names, tuple(value_key(v, memo) for v in value.values))
    return ("object", id(value))


def function_key(function: Function, memo: dict[int, Any]) -> Any:
    """Structural key of a function: equal for functions that compute alike (names and spans aside)."""
    if id(function) in memo:
        return memo[id(function)]
    ordered = order(function)
    position = {nid: k for k, nid in enumerate(ordered)}
    nodes = tuple((node.prim.name, tuple(position[i] for i in node.inputs), _attrs_key(node.attrs, memo), node.type)
                  for node in (function.node(nid) for nid in ordered))
    key = ("function", function.params, function.captures, function.result_type, function.federated, nodes,
           position[function.result])
    memo[id(function)] = key
    return key


_PLAIN = (str, int, type(None), Placement)      # bool is not among them: True == 1 must not merge


def _attrs_key(attrs, memo) -> tuple:
    return tuple((name, value if type(value) in _PLAIN or (type(value) is tuple and all(type(v) in _PLAIN for v in value))
                  else value_key(value, memo)) for name, value in attrs)


class _Canonical:
    """`of(nid, node)`: the first node given with the same key (primitive, inputs, attributes,
    type) as `node`, else `nid`. The whole key (attributes and type: the costly part) is made
    only for nodes whose primitive and inputs an earlier node has too."""

    def __init__(self):
        self.first: dict[tuple[str, tuple[int, ...]], tuple[int, Node]] = {}
        self.full: dict[tuple[str, tuple[int, ...]], dict[Any, int]] = {}
        self.memo: dict[int, Any] = {}

    def key(self, node: Node) -> Any:
        return (node.prim.name, node.inputs, _attrs_key(node.attrs, self.memo), node.type)

    def of(self, nid: int, node: Node) -> int:
        short = (node.prim.name, node.inputs)
        seen = self.first.get(short)
        if seen is None:
            self.first[short] = (nid, node)
            return nid
        keys = self.full.get(short)
        if keys is None:
            keys = self.full[short] = {self.key(seen[1]): seen[0]}
        return keys.setdefault(self.key(node), nid)


def _has_duplicates(function: Function, program: Program) -> bool:
    canonical = _Canonical()
    payload = function.graph._node
    for nid in order(function):
        if canonical.of(nid, payload[nid]["node"]) != nid:
            return True
    return False


def _cse_copy(function: Function) -> Function:
    """copy_function, then common subexpression elimination in every function of the copy (nested
    ones first) and renumber (not compact): in one go, building each function's graph once."""
    nodes: dict[int, Node] = {}
    for nid, data in function.graph._node.items():
        node = data["node"]
        if node.prim.name == "closure":
            copies = {key: _cse_copy(value) for key, value in node.attrs if isinstance(value, Function)}
            if copies:
                node = node.with_attrs(**copies)
        nodes[nid] = node
    canonical = _Canonical()
    representative: dict[int, int] = {}
    for nid in order(function):
        node = nodes[nid]
        if node.inputs:
            inputs = tuple(map(representative.__getitem__, node.inputs))
            if inputs != node.inputs:
                node = nodes[nid] = node.with_inputs(inputs)
        representative[nid] = canonical.of(nid, node)
    kept = [(nid, node) for nid, node in nodes.items() if representative[nid] == nid]
    result = representative[function.result]
    if all(source < nid for nid, node in kept for source in node.inputs):
        graph = graph_from(kept, sorted(nid for nid, _ in kept))
    else:                           # renumber: ids in dependency order
        graph = graph_from(kept)
        return _rebuilt(function, graph._node, topological_order(graph), lambda inner: inner, result)
    return Function(function.name, function.params, function.result_type, function.federated,
                    function.captures, graph, result, function.span)


def cse(program: Program) -> Program:
    """Common subexpression elimination: one node per (primitive, inputs, attributes, type).
    Sound because every primitive is pure (random numbers are seeded, so equal seeds give equal
    values); two federated_sums of the same value are one communication."""
    return transform(program, lambda function, prog: None, probe=_has_duplicates, copy=_cse_copy)


# ==== dead code elimination ===============================================================================

def _dce_function(function: Function, program: Program) -> None:
    for nid in list(function.graph.nodes):
        node = function.node(nid)
        if node.prim.name == "closure":
            _prune_captures(function, nid, node)
    live = live_nodes(function)
    function.graph.remove_nodes_from([nid for nid in list(function.graph.nodes) if nid not in live])


def _has_dead_code(function: Function, program: Program) -> bool:
    if len(live_nodes(function)) != len(function.graph):
        return True
    for inner in _nested_functions(function.graph):
        used = {inner.node(n).attr("index") for n in live_nodes(inner) if inner.node(n).prim.name == "capture"}
        if len(used) != len(inner.captures):
            return True
    return False


def _dce_copy(function: Function, used: list[int] | None = None) -> Function:
    """copy_function, then _dce_function on every function of the copy (nested ones first) and
    renumber (compact) every one: in one go, building each function's graph once. With `used`
    (a closure's function), also _prune_captures: the captures it uses go to `used`."""
    nodes: dict[int, Node] = {}
    for nid, data in function.graph._node.items():
        node = data["node"]
        if node.prim.name == "closure":
            node = _dce_closure(node)
        nodes[nid] = node
    live = {function.result}
    stack = [function.result]
    while stack:
        for source in nodes[stack.pop()].inputs:
            if source not in live:
                live.add(source)
                stack.append(source)
    kept = {nid: node for nid, node in nodes.items() if nid in live}
    captures = function.captures
    if used is not None:
        used.extend(sorted({node.attr("index") for node in kept.values() if node.prim.name == "capture"}))
        if len(used) != len(captures):
            new_index = {old: new for new, old in enumerate(used)}
            kept = {nid: node.with_attrs(index=new_index[node.attr("index")]) if node.prim.name == "capture" else node
                    for nid, node in kept.items()}
            captures = tuple(captures[i] for i in used)
    if all(source < nid for nid, node in kept.items() for source in node.inputs):
        ordered = sorted(kept)
    else:                           # (the dependency order of what is kept, as renumber finds it)
        ordered = topological_order(graph_from(list(kept.items())))
    out = _rebuilt(function, {nid: {"node": node} for nid, node in kept.items()}, ordered, lambda inner: inner)
    out.captures = captures
    return out


def _dce_closure(node: Node) -> Node:
    """A closure node whose functions are _dce_copy'd, its function without the captures it does
    not use, and the node without their inputs (_prune_captures)."""
    pruned = node.attr("function")
    used: list[int] = []
    copies = {key: _dce_copy(value, used if value is pruned else None)
              for key, value in node.attrs if isinstance(value, Function)}
    if not copies:
        return node
    node = node.with_attrs(**copies)
    if not isinstance(pruned, Function) or len(used) == len(pruned.captures):
        return node
    return node.with_inputs(tuple(node.inputs[i] for i in used))


def _prune_captures(function: Function, nid: int, node: Node) -> None:
    """A closure's function loses the captures it does not use, and the closure node their inputs."""
    inner: Function = node.attr("function")
    used = sorted({inner.node(n).attr("index") for n in live_nodes(inner)
                   if inner.node(n).prim.name == "capture"})
    if len(used) == len(inner.captures):
        return
    new_index = {old: new for new, old in enumerate(used)}
    for n in list(inner.graph.nodes):
        payload = inner.node(n)
        if payload.prim.name == "capture":
            if payload.attr("index") in new_index:
                inner.replace_node(n, payload.with_attrs(index=new_index[payload.attr("index")]))
            else:
                inner.graph.remove_node(n)
    inner.captures = tuple(inner.captures[i] for i in used)
    function.replace_node(nid, node.with_inputs(tuple(node.inputs[i] for i in used)))


def dce_function(function: Function) -> Function:
    """A copy of one function without dead nodes and unused captures."""
    out = copy_function(function)
    _dce_in_place(out)
    return out


def _dce_in_place(function: Function) -> None:
    for f in list(postorder(function)):
        _dce_function(f, None)
    for f in postorder(function):
        renumber(f)


def dce(program: Program) -> Program:
    """Remove nodes the result does not need, captures a closure does not use, and imported
    functions nothing refers to (root declarations and processes are kept)."""
    out = transform(program, lambda function, prog: None, probe=_has_dead_code, compact_ids=True, copy=_dce_copy)
    keep = set(out.root) | {name for pair in out.processes.values() for name in pair}
    keep &= out.functions.keys()
    frontier = list(keep)
    while frontier:
        for name in globals_used(out.functions[frontier.pop()]) & out.functions.keys():
            if name not in keep:
                keep.add(name)
                frontier.append(name)
    out.functions = {name: f for name, f in out.functions.items() if name in keep}
    return out


# ==== the pipeline ==========================================================================================

Pass = Callable[[Program], Program]


def pipeline() -> list[tuple[str, Pass]]:
    """The passes of `optimize`, in order."""
    return [
        ("inline", inline),
        ("fold_constants", fold_constants),
        ("simplify", simplify),
        ("fuse_maps", fuse_maps),
        ("inline", inline),                  # flattens the composed functions fusion made
        ("hoist_broadcasts", hoist_broadcasts),
        ("cse", cse),
        ("fold_constants", fold_constants),
        ("simplify", simplify),
        ("dce", dce),
    ]
    # optimize() then numbers the nodes of every function 0, 1, ... again (`compact`).


PASSES: dict[str, Pass] = {name: p for name, p in pipeline()}


def optimize(program: Program, dump: Callable[[str, Program], None] | str | Path | None = None) -> Program:
    """Run the pipeline. `dump`: a callback `(pass name, program)` called after every pass, or a
    directory that receives the IR text before (00-input.ir) and after every pass (01-inline.ir, ...)."""
    if isinstance(dump, (str, Path)):
        folder = Path(dump)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "00-input.ir").write_text(format_program(program) + "\n", encoding="utf-8")
        counter = iter(range(1, 1000))

        def dump(name: str, p: Program) -> None:    # noqa: F811 - the directory becomes a callback
            (folder / f"{next(counter):02d}-{name}.ir").write_text(format_program(p) + "\n", encoding="utf-8")

    with gc_paused():
        for name, run_pass in pipeline():
            program = run_pass(program)
            if dump is not None:
                dump(name, program)
        return compact(program)


__all__ = ["optimize", "pipeline", "PASSES", "inline", "inline_computations", "fold_constants", "simplify",
           "fuse_maps", "hoist_broadcasts", "cse", "dce", "rewrite_program", "rewrite_function", "lower_computation", "transform", "copy_program",
           "copy_function", "Rule", "Pat", "Rewriter"]
