"""`verify(program)`: ill-typed IR cannot survive (JAX's check_jaxpr).

Every node's type is derived again from its inputs with the primitive table's
type rules (weak constants as weak abstract values; structural nodes checked
structurally) and must be assignable to the type the node records: a pass may
make types more precise (inlining passes a `float32[3]` where a `float32[?]`
was declared), never wrong. Besides types it checks the wiring: edges mirror
the inputs, parameter and capture indices are in range, the result exists, no
`grad` node is left, a local function holds no placed value, every nested
function belongs to exactly one closure node, and every fact cached for a graph
(its dependency order, next node id, the passes' indices) is up to date.

A failure is an `InternalCompilerError` naming the function, the node and the
pass after which it was found: a bug in fedlang, never the user's fault.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np

from fedlang.diagnostics import InternalCompilerError
from fedlang.ir.avals import AVal, accepts
from fedlang.ir.graph import NEXT_ID_KEY, ORDER_KEY, Function, Node, Program, cached_facts, gc_paused
from fedlang.ir.primitives import PRIMITIVES, REQUIRED, TypeRuleError, _check_call
from fedlang.ir.types import FederatedType, FunctionType, SequenceType, StructType, TensorType, Type, is_placed
from fedlang.ir.values import Struct

_STRUCTURAL = frozenset({"param", "capture", "global", "closure", "const", "struct", "select", "index", "call",
                         "cond"})
_GRAD = frozenset({"grad", "value_and_grad"})


class _Failure(Exception):
    pass


def verify(program: Program, after: str | None = None) -> None:
    """Raise InternalCompilerError unless every function of `program` is well formed."""
    with gc_paused():
        _verify(program, after)


def _verify(program: Program, after: str | None) -> None:
    owners: dict[int, str] = {}
    for name, function in program.functions.items():
        if function.name != name:
            _fail(after, function, None, None, f"is stored under the name {name!r}")
        if function.captures:
            _fail(after, function, None, None, "a top-level function captures nothing")
        verify_function(function, program.functions, after, _owners=owners)
    for name in program.root:
        if name not in program.functions and name not in program.processes:
            raise InternalCompilerError(f"verify{_after(after)}: the root declaration {name} is missing")
    for process, (init, next_) in program.processes.items():
        for part in (init, next_):
            if part not in program.functions:
                raise InternalCompilerError(f"verify{_after(after)}: process {process} names {part}, "
                                            "which is not a function of the program")


def verify_function(function: Function, functions: dict[str, Function] | None = None, after: str | None = None,
                    _owners: dict[int, str] | None = None) -> None:
    """Check one function (and the functions nested in it); `functions` resolves `global` nodes."""
    functions = {} if functions is None else functions
    owners = {} if _owners is None else _owners
    with gc_paused():
        _Verifier(function, functions, after, owners).run()


def _after(after: str | None) -> str:
    return f" after {after}" if after else ""


def _fail(after, function: Function, nid: int | None, node: Node | None, message: str):
    where = function.name if nid is None else f"{function.name}: %{nid}"
    if node is not None:
        where += f" = {node.prim.name}"
    raise InternalCompilerError(f"ill-formed IR{_after(after)}: {where}: {message} (this is a bug in fedlang)")


class _Verifier:
    def __init__(self, function: Function, functions: dict[str, Function], after: str | None,
                 owners: dict[int, str]):
        self.f, self.functions, self.after, self.owners = function, functions, after, owners

    def fail(self, nid: int | None, message: str):
        node = None
        if nid is not None and nid in self.f.graph and "node" in self.f.graph.nodes[nid]:
            node = self.f.graph.nodes[nid]["node"]
        _fail(self.after, self.f, nid, node, message)

    def run(self) -> None:
        f, graph = self.f, self.f.graph
        if not nx.is_directed_acyclic_graph(graph):
            self.fail(None, "the graph has a cycle")
        for nid in graph.nodes:
            payload = graph.nodes[nid].get("node")
            if not isinstance(payload, Node):
                self.fail(nid, "the node has no Node payload")
            if PRIMITIVES.get(payload.prim.name) is not payload.prim:
                self.fail(nid, f"{payload.prim.name} is not an entry of the primitive table")
        self.check_edges()
        if f.result is None or f.result not in graph:
            self.fail(None, f"the result %{f.result} is not a node of the function")
        self.check_cached_facts()
        for nid, node in f.nodes():
            try:
                self.check_node(nid, node)
            except TypeRuleError as error:
                self.fail(nid, f"its type does not follow from its inputs: {error.message}")
            except _Failure as error:
                self.fail(nid, str(error))
        result = f.node(f.result)
        if not accepts(f.result_type, self.aval(f.result)):
            self.fail(f.result, f"the function returns {f.result_type} but its result node is {result.type}")

    def check_edges(self) -> None:
        graph = self.f.graph
        for nid in graph.nodes:
            node: Node = graph.nodes[nid]["node"]
            expected: dict[int, list[int]] = {}
            for position, source in enumerate(node.inputs):
                if source not in graph:
                    self.fail(nid, f"input %{source} is not a node of the function")
                expected.setdefault(source, []).append(position)
            found = {source: sorted(graph.edges[source, nid].get("positions", ()))
                     for source in graph.predecessors(nid)}
            if found != expected:
                self.fail(nid, f"the edges {found} do not mirror the inputs {node.inputs}")

    def check_cached_facts(self) -> None:
        """Every fact cached for the graph (see graph.cached) is what computing it again gives."""
        from fedlang.ir.passes import stale_fact

        graph = self.f.graph
        for key, value in cached_facts(graph).items():
            if key == ORDER_KEY:
                fresh = list(nx.lexicographical_topological_sort(graph))
                if list(value) != fresh:
                    self.fail(None, f"its cached dependency order {list(value)} is not its order {fresh}")
            elif key == NEXT_ID_KEY:
                fresh = max(graph, default=-1) + 1
                if value != fresh:
                    self.fail(None, f"its cached next node id {value} is not {fresh}")
            else:
                message = stale_fact(self.f, key, value, self.functions)
                if message is not None:
                    self.fail(None, message)

    # ---- abstract values of inputs -----------------------------------------------------------
    def aval(self, nid: int) -> AVal:
        node = self.f.node(nid)
        name = node.prim.name
        if name == "const" and node.attr("weak"):
            return AVal(node.type, weak="float" if isinstance(node.attr("value"), float) else "int")
        if isinstance(node.type, FunctionType):
            federated = name == "global" and getattr(self.functions.get(node.attr("name")), "federated", False)
            return AVal(node.type, arity=node.attr("arity"), federated_function=federated)
        return AVal(node.type)

    # ---- one node -------------------------------------------------------------------------------
    def check_node(self, nid: int, node: Node) -> None:
        name = node.prim.name
        if name in _GRAD:
            raise _Failure(f"{name} must have been expanded by autodiff")
        if not self.f.federated and (node.prim.federated or is_placed(node.type)):
            raise _Failure(f"a local function holds a placed value ({node.type})")
        if name in _STRUCTURAL:
            derived = getattr(self, "_" + name)(nid, node)
        else:
            derived = self.primitive(node)
        if derived is None:
            return
        if derived.unknown:
            raise _Failure("its type rule gives no type")
        if not accepts(node.type, derived):
            raise _Failure(f"it records {node.type} but its inputs give {derived.type}")

    def primitive(self, node: Node) -> AVal:
        prim = node.prim
        avals = [self.aval(i) for i in node.inputs]
        if not prim.federated:
            for aval in avals:
                if is_placed(aval.type):
                    raise _Failure(f"the local builtin {prim.name} takes a placed value ({aval.type})")
        if prim.variadic:
            fixed = [p for p in prim.params[:-1] if p.kind == "value"]
            if len(avals) < len(fixed):
                raise _Failure(f"{prim.name} needs at least {len(fixed)} inputs, it has {len(avals)}")
            statics = self.statics(node)
            return prim.type_rule(*avals, **statics)
        value_params = [p.name for p in prim.params if p.kind == "value"]
        names = node.attr("args")
        names = tuple(value_params[:len(avals)]) if names is None else tuple(names)
        if len(names) != len(avals) or not set(names) <= set(value_params):
            raise _Failure(f"the inputs {names} do not match the parameters {tuple(value_params)}")
        kwargs: dict[str, Any] = dict(zip(names, avals))
        for p in prim.params:
            if p.kind == "value" and p.name not in kwargs:
                if p.default is REQUIRED:
                    raise _Failure(f"the argument {p.name} is missing")
                kwargs[p.name] = p.default
        kwargs.update(self.statics(node))
        return prim.type_rule(**kwargs)

    def statics(self, node: Node) -> dict[str, Any]:
        out = {}
        for p in node.prim.params:
            if p.kind == "value":
                continue
            value = node.attr(p.name, p.default)
            if value is REQUIRED:
                raise _Failure(f"the static argument {p.name} is missing")
            out[p.name] = value
        return out

    # ---- structural nodes ----------------------------------------------------------------------
    def _inputs(self, node: Node, n: int) -> None:
        if len(node.inputs) != n:
            raise _Failure(f"it takes {n} inputs, it has {len(node.inputs)}")

    def _param(self, nid: int, node: Node) -> None:
        self._inputs(node, 0)
        self._declared(node, self.f.params, "parameter")
        return None

    def _capture(self, nid: int, node: Node) -> None:
        self._inputs(node, 0)
        self._declared(node, self.f.captures, "capture")
        return None

    def _declared(self, node: Node, declared, what: str) -> None:
        index = node.attr("index")
        if not isinstance(index, int) or not 0 <= index < len(declared):
            raise _Failure(f"{what} index {index!r} is out of range ({len(declared)} {what}s)")
        if node.type != declared[index][1]:
            raise _Failure(f"{what} {index} is declared {declared[index][1]} but the node says {node.type}")

    def _global(self, nid: int, node: Node) -> AVal:
        self._inputs(node, 0)
        target = self.functions.get(node.attr("name"))
        if target is None:
            raise _Failure(f"there is no top-level function {node.attr('name')!r}")
        return AVal(target.type)

    def _closure(self, nid: int, node: Node) -> AVal:
        inner = node.attr("function")
        if not isinstance(inner, Function):
            raise _Failure("a closure node needs a nested function")
        owner = f"{self.f.name} %{nid}"
        if id(inner) in self.owners:
            raise _Failure(f"its function {inner.name} also belongs to {self.owners[id(inner)]}")
        self.owners[id(inner)] = owner
        if inner.federated:
            raise _Failure(f"the nested function {inner.name} is federated")
        self._inputs(node, len(inner.captures))
        for i, ((_, expected), source) in enumerate(zip(inner.captures, node.inputs)):
            if not accepts(expected, self.aval(source)):
                raise _Failure(f"capture {i} of {inner.name} is {expected} but gets {self.f.node(source).type}")
        _Verifier(inner, self.functions, self.after, self.owners).run()
        return AVal(inner.type)

    def _const(self, nid: int, node: Node) -> None:
        self._inputs(node, 0)
        value, t = node.attr("value"), node.type
        if node.attr("weak"):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise _Failure(f"a weak constant holds a Python number, not {type(value).__name__}")
            if not (isinstance(t, TensorType) and t.shape == () and t.dtype in ("int32", "float32")):
                raise _Failure(f"a weak constant is an int32 or float32 scalar, not {t}")
            return None
        _conforms(value, t)
        return None

    def _struct(self, nid: int, node: Node) -> AVal:
        t = node.type
        if not isinstance(t, StructType):
            raise _Failure(f"a struct node has the type {t}")
        if tuple(node.attr("names", ())) != t.names:
            raise _Failure(f"the names {node.attr('names')} differ from the type's {t.names}")
        self._inputs(node, len(t.fields))
        for (name, expected), source in zip(t.fields, node.inputs):
            if not accepts(expected, self.aval(source)):
                raise _Failure(f"field {name or '?'} is {expected} but gets {self.f.node(source).type}")
        return None

    def _select(self, nid: int, node: Node) -> AVal:
        self._inputs(node, 1)
        t = self.f.node(node.inputs[0]).type
        member = t.member if isinstance(t, FederatedType) else t
        if not isinstance(member, StructType):
            raise _Failure(f"select on {t}, which is not a struct")
        index = node.attr("index")
        if not isinstance(index, int) or not 0 <= index < len(member.fields):
            raise _Failure(f"field index {index!r} is out of range for {t}")
        field = member.types[index]
        if isinstance(t, FederatedType):
            return AVal(FederatedType(field, t.placement, t.all_equal))
        return AVal(field)

    def _index(self, nid: int, node: Node) -> AVal:
        self._inputs(node, 2)
        x, i = (self.f.node(n).type for n in node.inputs)
        if not (isinstance(x, TensorType) and x.rank >= 1):
            raise _Failure(f"index needs a tensor of rank 1 or more, found {x}")
        if not (isinstance(i, TensorType) and i.shape == () and i.dtype.startswith(("int", "uint"))):
            raise _Failure(f"the index must be an integer scalar, found {i}")
        return AVal(TensorType(x.dtype, x.shape[1:]))

    def _call(self, nid: int, node: Node) -> AVal:
        if not node.inputs:
            raise _Failure("a call needs a function")
        fn = self.aval(node.inputs[0])
        if not isinstance(fn.type, FunctionType):
            raise _Failure(f"it calls {fn.type}, which is not a function")
        args = [self.aval(i) for i in node.inputs[1:]]
        if fn.federated_function and not self.f.federated:
            raise _Failure("a local function calls a federated one")
        errors = []
        # The declared arity first, then TFF's struct (un)packing: without an arity, several
        # parameters are one struct parameter, which a struct argument fills.
        for candidate in (fn, AVal(fn.type)):
            try:
                return AVal(_check_call(candidate, args, "f", "call"))
            except TypeRuleError as error:
                errors.append(error.message)
        raise _Failure(errors[0])

    def _cond(self, nid: int, node: Node) -> AVal:
        self._inputs(node, 3)
        c = self.f.node(node.inputs[0]).type
        if c != TensorType("bool"):
            raise _Failure(f"the condition is {c}, not a bool scalar")
        for source in node.inputs[1:]:
            if not accepts(node.type, self.aval(source)):
                raise _Failure(f"a branch is {self.f.node(source).type}, the node says {node.type}")
        return None


def _conforms(value: Any, t: Type) -> None:
    """A typed constant's value must be a runtime value of its type."""
    if isinstance(t, TensorType):
        if not isinstance(value, np.ndarray):
            raise _Failure(f"a {t} constant holds {type(value).__name__}, not a numpy array")
        kind_ok = value.dtype.kind == "U" if t.dtype == "string" else value.dtype == np.dtype(t.dtype)
        if not kind_ok:
            raise _Failure(f"a {t} constant holds {value.dtype} values")
        if value.ndim != t.rank or any(d is not None and d != s for d, s in zip(t.shape, value.shape)):
            raise _Failure(f"a {t} constant holds an array of shape {list(value.shape)}")
        return
    if isinstance(t, StructType):
        if not isinstance(value, Struct) or len(value) != len(t.fields) or tuple(value.names) != t.names:
            raise _Failure(f"a {t} constant holds {value!r}")
        for v, ft in zip(value.values, t.types):
            _conforms(v, ft)
        return
    if isinstance(t, SequenceType):
        if not isinstance(value, list):
            raise _Failure(f"a {t} constant holds {type(value).__name__}")
        for v in value:
            _conforms(v, t.element)
        return
    raise _Failure(f"a constant cannot have the type {t}")

