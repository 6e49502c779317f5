"""Phase splitting: a federated computation cut at its communication points.

`split_phases(comp)` gives an ordered list of phases that alternate between the
server and the clients, starting at the server:

    server_prepare -> broadcast -> client_work -> aggregate -> server_update

for a round that talks once (TFF's MapReduce form), and a longer chain
(server_prepare, client_work_1, server_step_1, client_work_2, server_update)
for one that talks more. Every node of the comp is scheduled in the earliest
phase where its inputs exist (a broadcast in the client phase right after the
server phase that computes its value; an aggregation at the end of the client
phase that computes its operand). Each phase is an ordinary local `Function`
with unplaced types: a client phase is written for ONE client (its parameters
are member types) and runs once per client; a server phase runs once.

A phase's inputs say where each value comes from:

  param         an argument of the comp (client phases: this client's member)
  broadcast     a server value, sent to every client before the phase
  aggregation   the result of an aggregation at the end of the previous client phase
  server        a value an earlier server phase computed (the server keeps it)
  client        a value an earlier client phase computed on this client (the client keeps it)

and its outputs what each result is for (broadcast, aggregate, server, client,
result). Placement soundness: a server phase never takes a per-client value
except as the result of an aggregation; a client phase never takes a server
value except as a broadcast.

`run_phases(phases, args, num_clients)` runs the phases in order with the
reference interpreter; it must equal running the comp itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from fedlang.diagnostics import InternalCompilerError
from fedlang.ir.graph import Function, Node, Program, attach, gc_paused, positions, prim
from fedlang.ir.interpreter import Closure, Interpreter
from fedlang.ir.passes import copy_function, globals_used, live_nodes, lower_computation, order, renumber
from fedlang.ir.primitives import NUM_CLIENTS, PRIMITIVES
from fedlang.ir.types import FederatedType, FunctionType, Placement, StructType, Type, is_placed
from fedlang.ir.values import Struct

AGGREGATIONS = frozenset({"federated_sum", "federated_mean", "federated_min", "federated_max",
                          "federated_aggregate", "federated_secure_sum", "federated_median",
                          "federated_trimmed_mean", "federated_clipped_mean", "federated_zeroing_mean",
                          "federated_krum"})
SERVER, CLIENT = "server", "client"


class PhaseSplitError(Exception):
    """A well-typed computation this version cannot split into phases (a limitation, not a user error)."""


@dataclass(frozen=True)
class PhaseValue:
    """An input or output of a phase. `role` of an input: param | broadcast | aggregation | server |
    client; of an output: what it is for, several joined by '+' (broadcast, aggregate, server, client,
    result). `param`: for a comp argument, its index and the path of fields selected from it."""

    name: str
    type: Type
    role: str
    param: tuple[int, ...] | None = None

    def __str__(self) -> str:
        return f"{self.name}: {self.type}"


@dataclass(frozen=True)
class Aggregation:
    """An aggregation at the end of a client phase: `op` over the clients' `value` (and `weight`)
    gives the next server phase's input `result` (of type `type`). For federated_aggregate, `zero`
    is a value the server phase before the client phase outputs, and `functions` holds accumulate
    (<U,T> -> U), merge (<U,U> -> U) and report (U -> R) as local functions, each with the names
    of the server values it captures (outputs of that server phase too)."""

    op: str
    value: str
    result: str
    type: Type
    weight: str | None = None
    attrs: tuple[tuple[str, Any], ...] = ()
    zero: str | None = None
    functions: tuple[tuple[str, Function, tuple[str, ...]], ...] = ()

    def __str__(self) -> str:
        args = [self.value] + ([f"weight={self.weight}"] if self.weight else [])
        args += [f"zero={self.zero}"] if self.zero else []
        args += [f"{k}={v}" for k, v in self.attrs] + [f"{k}=@{f.name}" for k, f, _ in self.functions]
        return f"{self.op}({', '.join(args)}) -> {self.result}: {self.type}"


@dataclass
class Phase:
    index: int
    kind: str                                  # "server" | "client"
    name: str                                  # server_prepare, client_work, server_update, ...
    inputs: tuple[PhaseValue, ...]
    outputs: tuple[PhaseValue, ...]
    aggregations: tuple[Aggregation, ...]      # at the end of a client phase
    function: Function                         # unplaced: (inputs) -> <outputs>
    globals: dict[str, Function] = field(default_factory=dict)   # top-level functions it refers to


class Phases(list):
    """The phases of one comp, in order; `result` says how the comp's result is assembled:
    ("server", name) | ("client", name) | ("replicate", name) (an all-equal client value the
    server computed) | ("struct", names, parts)."""

    def __init__(self, phases: list[Phase], computation: str, type: FunctionType, result: tuple):
        super().__init__(phases)
        self.computation, self.type, self.result = computation, type, result


# ==== splitting ====================================================================================

def split_phases(function: Function, program: Program | None = None) -> Phases:
    """Cut federated computation `function` into phases (`program` resolves the functions it names)."""
    if not function.federated:
        raise ValueError(f"split_phases takes a comp; {function.name} is a local function")
    with gc_paused():
        functions = program.functions if program is not None else {}
        if function.name not in functions:         # (else the program's own dict: it is only read)
            functions = {**functions, function.name: function}
        comp = lower_computation(function, Program(functions))
        return _Splitter(comp, functions).split()


def _is_wiring(t: Type) -> bool:
    """An unplaced struct that holds placed values: comp-level wiring, not data."""
    return isinstance(t, StructType) and is_placed(t)


def _clients_placed(t: Type) -> bool:
    return isinstance(t, FederatedType) and t.placement is Placement.CLIENTS


def _member(t: Type) -> Type:
    return t.member if isinstance(t, FederatedType) else t


class _Builder:
    """One phase's function under construction."""

    def __init__(self, index: int, comp: Function):
        self.index = index
        self.kind = SERVER if index % 2 == 0 else CLIENT
        self.function = Function(f"{comp.name}.phase{index}", (), StructType(()), span=comp.span)
        self.mapping: dict[int, int] = {}                           # comp node -> local node
        self.inputs: dict[str, tuple[PhaseValue, int]] = {}          # name -> (value, param node)
        self.outputs: dict[str, list] = {}                          # name -> [local node, type, roles]
        self.aggregations: list[Aggregation] = []

    def add(self, node: Node) -> int:
        nid = len(self.function.graph)
        attach(self.function.graph, nid, node, self.function.name)
        return nid

    def input(self, name: str, t: Type, role: str, span, param: tuple[int, ...] | None = None) -> int:
        if name not in self.inputs:
            local = self.add(Node(prim("param"), (), t, (("index", -1),), span))
            self.inputs[name] = (PhaseValue(name, t, role, param), local)
        return self.inputs[name][1]

    def output(self, name: str, local: int, t: Type, role: str) -> None:
        entry = self.outputs.setdefault(name, [local, t, []])
        if role not in entry[2]:
            entry[2].append(role)


_ROLE_RANK = {"param": 0, "broadcast": 1, "aggregation": 2, "server": 3, "client": 4}


class _Splitter:
    def __init__(self, comp: Function, functions: dict[str, Function]):
        self.comp, self.functions = comp, functions
        self.live = live_nodes(comp)
        self.side: dict[int, str] = {}        # server | client | free | wiring
        self.stage: dict[int, int] = {}       # phase index of non-free nodes
        self.param_path: dict[int, tuple[int, ...]] = {}
        self.builders: list[_Builder] = []
        self.reserved = {name for name, _ in comp.params}

    def fail(self, nid: int, message: str):
        node = self.comp.node(nid)
        where = f" ({node.span})" if node.span is not None else ""
        raise PhaseSplitError(f"{self.comp.name}: %{nid} = {node.prim.name}{where}: {message}")

    # ---- 1. when can each node run? --------------------------------------------------------------
    def classify(self) -> None:
        for nid in order(self.comp):
            if nid not in self.live:
                continue
            node = self.comp.node(nid)
            side, stage = self._classify(nid, node)
            self.side[nid] = side
            if stage is not None:
                self.stage[nid] = stage

    def _classify(self, nid: int, node: Node) -> tuple[str, int | None]:
        name, t = node.prim.name, node.type
        ins = node.inputs
        if name == "param" or (name == "select" and self.side.get(ins[0]) == "wiring-param"):
            path = (node.attr("index"),) if name == "param" else self.param_path[ins[0]] + (node.attr("index"),)
            self.param_path[nid] = path
            if _is_wiring(t):
                return "wiring-param", None
            return (CLIENT, 1) if _clients_placed(t) else (SERVER, 0)
        for i in ins:
            if self.side[i] in ("wiring", "wiring-param"):
                self.fail(nid, "uses a struct of placed values as a whole; select its fields first")
        if _is_wiring(t):
            if name != "struct":
                self.fail(nid, f"computes a struct of placed values ({t}) other than by a struct literal")
            return "wiring", None
        if name == "federated_broadcast":
            x = ins[0]
            return ("free", None) if self.side[x] == "free" else (CLIENT, self.stage[x] + 1)
        if name in AGGREGATIONS:
            return SERVER, self._aggregation_stage(nid, node)
        if name == "federated_value" and node.attr("placement") is Placement.CLIENTS:
            v = ins[0]
            return ("free", None) if self.side[v] == "free" else (CLIENT, self.stage[v] + 1)
        stages = []
        if _clients_placed(t):
            for i in ins:
                if self.side[i] == CLIENT:
                    stages.append(self.stage[i])
                elif self.side[i] == SERVER:
                    if is_placed(self.comp.node(i).type):
                        self.fail(nid, "a client value computed from a server value that was not broadcast")
                    stages.append(self.stage[i] + 1)      # an unplaced value the clients need: sent along
            return (CLIENT, max(stages)) if stages else ("free", None)
        for i in ins:
            if self.side[i] == CLIENT:
                self.fail(nid, "a server value computed from a client value that was not aggregated")
            if self.side[i] == SERVER:
                stages.append(self.stage[i])
        return (SERVER, max(stages)) if stages else ("free", None)

    def _aggregation_stage(self, nid: int, node: Node) -> int:
        names = node.attr("args") or ("x",)
        stage = 2
        for arg, i in zip(names, node.inputs):
            if arg in ("x", "weight"):
                if self.side[i] == CLIENT:
                    stage = max(stage, self.stage[i] + 1)
            elif self.side[i] != "free":
                stage = max(stage, self.stage[i] + 2)     # a server value, known before the clients report
        return stage

    # ---- 2. build the phases from the result backwards ---------------------------------------------
    def split(self) -> Phases:
        self.classify()
        tree = self.result_tree(self.comp.result)
        last = max(self.stage.values(), default=0)
        self.builders = [_Builder(k, self.comp) for k in range(last + 1)]
        layout = self.layout(tree)
        phases = [self.finish(b, last) for b in self.builders]
        return Phases(phases, self.comp.name, self.comp.type, layout)

    def result_tree(self, nid: int) -> tuple:
        """The comp's result: structs of placed values taken apart down to their leaves."""
        node = self.comp.node(nid)
        side = self.side[nid]
        if side == "wiring":
            return ("struct", node.attr("names"), tuple(self.result_tree(i) for i in node.inputs))
        if side == "wiring-param":
            t = node.type
            return ("struct", t.names, tuple(self.result_tree(self._select_param(nid, k)) for k in range(len(t.fields))))
        return ("leaf", nid)

    def layout(self, tree: tuple) -> tuple:
        if tree[0] == "struct":
            return ("struct", tree[1], tuple(self.layout(part) for part in tree[2]))
        nid = tree[1]
        node = self.comp.node(nid)
        side = self.side[nid]
        last = len(self.builders) - 1
        name = self.name(nid)
        if _clients_placed(node.type):
            if side == "free" and last % 2 == 0:
                self.output(nid, last, "result")
                return ("replicate", name)
            p = last if side == "free" else self.stage[nid]
            self.output(nid, p, "result")
            return ("client", name)
        p = (last if last % 2 == 0 else last - 1) if side == "free" else self.stage[nid]
        self.output(nid, p, "result")
        return ("server", name)

    def _select_param(self, nid: int, k: int) -> int:
        """A select of field k of wiring parameter `nid` (made when the comp returns it whole)."""
        node = self.comp.node(nid)
        t = node.type.types[k]
        new = max(self.comp.graph.nodes) + 1
        self.comp.graph.add_node(new, node=Node(prim("select"), (nid,), t, (("index", k),), node.span))
        self.comp.graph.add_edge(nid, new, positions=positions([0]))
        self.live.add(new)
        self.side[new], stage = self._classify(new, self.comp.node(new))
        if stage is not None:
            self.stage[new] = stage
        return new

    def name(self, nid: int) -> str:
        """A value's name in the phases: a comp parameter's own name (`p.a` for a field of it),
        else made from the node (broadcast_3, mean_5, v7), never equal to a parameter's name."""
        node = self.comp.node(nid)
        if nid in self.param_path:
            path = self.param_path[nid]
            name, t = self.comp.params[path[0]]
            for k in path[1:]:
                name += f".{t.names[k] or k}"
                t = t.types[k]
            return name
        if node.prim.name == "federated_broadcast":
            name = f"broadcast_{nid}"
        elif node.prim.name in AGGREGATIONS:
            name = f"{node.prim.name.removeprefix('federated_')}_{nid}"
        else:
            name = f"v{nid}"
        while name in self.reserved:
            name += "_"
        return name

    def output(self, nid: int, p: int, role: str, name: str | None = None) -> None:
        local = self.need(nid, p)
        self.builders[p].output(name or self.name(nid), local, self._local_type(nid), role)

    def _local_type(self, nid: int) -> Type:
        return _member(self.comp.node(nid).type)

    def need(self, nid: int, p: int) -> int:
        """Node `nid` of the comp as a node of phase p's function (computed there, or an input)."""
        b = self.builders[p]
        if nid in b.mapping:
            return b.mapping[nid]
        node = self.comp.node(nid)
        side = self.side[nid]
        name = self.name(nid)
        span = node.span
        if nid in self.param_path:
            if side == b.kind:
                local = b.input(name, self._local_type(nid), "param", span, self.param_path[nid])
            elif side == SERVER and not is_placed(node.type):     # an unplaced argument the clients need
                if isinstance(node.type, FunctionType):
                    self.fail(nid, "a function argument of the comp cannot be sent to the clients")
                local = self._broadcast_input(nid, p, name)
            else:
                self.fail(nid, f"a {side} value is needed in the {b.kind} phase {p}")
        elif side == "free":
            local = self.translate(nid, p)
        elif side == b.kind:
            stage = self.stage[nid]
            if stage == p:
                local = self.at_stage(nid, p)
            elif stage < p:                                        # kept from an earlier phase of this side
                local = b.input(name, self._local_type(nid), side, span)
                self.output(nid, stage, side)
            else:
                raise InternalCompilerError(f"{self.comp.name}: %{nid} is needed in phase {p} before stage {stage}")
        elif side == SERVER and not is_placed(node.type):
            if isinstance(node.type, FunctionType):                 # rebuilt on the clients from its captures
                local = self.translate(nid, p)
            else:
                local = self._broadcast_input(nid, p, name)
        else:
            self.fail(nid, f"a {side} value is needed in the {b.kind} phase {p}")
        b.mapping[nid] = local
        return local

    def _broadcast_input(self, nid: int, p: int, name: str) -> int:
        """Server value `nid` sent to the clients of phase p by the server phase before it."""
        local = self.builders[p].input(name, self._local_type(nid), "broadcast", self.comp.node(nid).span)
        self.output(nid, p - 1, "broadcast", name)
        return local

    def at_stage(self, nid: int, p: int) -> int:
        """Node `nid` in the phase of its own stage: communication nodes become inputs."""
        node = self.comp.node(nid)
        b = self.builders[p]
        name = node.prim.name
        if name == "federated_broadcast" or (name == "federated_value" and node.attr("placement") is Placement.CLIENTS):
            local = b.input(self.name(nid), self._local_type(nid), "broadcast", node.span)
            self.output(node.inputs[0], p - 1, "broadcast", self.name(nid))
            return local
        if name in AGGREGATIONS:
            local = b.input(self.name(nid), self._local_type(nid), "aggregation", node.span)
            self.builders[p - 1].aggregations.append(self.aggregation(nid, node, p - 1))
            return local
        return self.translate(nid, p)

    def aggregation(self, nid: int, node: Node, p: int) -> Aggregation:
        names = node.attr("args") or ("x",)
        operands = dict(zip(names, node.inputs))
        x = operands["x"]
        self.output(x, p, "aggregate")
        weight = operands.get("weight")
        if weight is not None:
            self.output(weight, p, "aggregate")
        attrs = tuple((k, v) for k, v in node.attrs if k not in ("args", "weak", "arity"))
        zero, functions = None, ()
        if node.prim.name == "federated_aggregate":
            zero = f"zero_{nid}"
            while zero in self.reserved:
                zero += "_"
            self.output(operands["zero"], p - 1, "aggregate", zero)    # the server starts from it
            functions = self.aggregate_functions(nid, node, operands, p)
        return Aggregation(node.prim.name, self.name(x), self.name(nid), self._local_type(nid),
                           None if weight is None else self.name(weight), attrs, zero, functions)

    def aggregate_functions(self, nid: int, node: Node, operands: dict[str, int], p: int) -> tuple:
        """federated_aggregate's accumulate, merge and report as standalone local functions."""
        zero_t = _member(self.comp.node(operands["zero"]).type)
        value_t = _member(self.comp.node(operands["x"]).type)
        out = []
        for role, params in (("accumulate", (zero_t, value_t)), ("merge", (zero_t, zero_t)),
                             ("report", (zero_t,))):
            out.append((role, *self._standalone(operands[role], role, params, node, p)))
        return tuple(out)

    def _standalone(self, source: int, role: str, params: tuple[Type, ...], agg: Node,
                    p: int) -> tuple[Function, tuple[str, ...]]:
        """A local function that calls function value `source` with its parameters. Server values
        the function value depends on become captures, output by the server phase before p."""
        f = Function(f"{self.comp.name}.{role}", tuple((f"p{k}", t) for k, t in enumerate(params)),
                     self.comp.node(source).type.result, span=agg.span)
        scratch = _Builder(0, self.comp)
        scratch.function = f
        captured: list[str] = []
        mapping: dict[int, int] = {}

        def get(nid: int) -> int:
            if nid in mapping:
                return mapping[nid]
            node = self.comp.node(nid)
            if is_placed(node.type):
                self.fail(nid, f"the {role} function of federated_aggregate depends on a placed value")
            if self.side[nid] != "free" and not isinstance(node.type, FunctionType):
                name = self.name(nid)
                f.captures += ((name, node.type),)
                local = scratch.add(Node(prim("capture"), (), node.type, (("index", len(captured)),), node.span))
                captured.append(name)
                self.output(nid, p - 1, "aggregate")
            else:
                copied = node.with_inputs(tuple(get(i) for i in node.inputs))
                nested = {k: copy_function(v) for k, v in node.attrs if isinstance(v, Function)}
                local = scratch.add(copied.with_attrs(**nested) if nested else copied)
            mapping[nid] = local
            return local

        value = get(source)
        locals_ = [scratch.add(Node(prim("param"), (), t, (("index", k),), agg.span)) for k, t in enumerate(params)]
        f.result = scratch.add(Node(prim("call"), (value, *locals_), f.result_type, (), agg.span))
        renumber(f)
        return f, tuple(captured)

    def translate(self, nid: int, p: int) -> int:
        """Node `nid` computed in phase p, on unplaced values: federated_map f x becomes a call."""
        node = self.comp.node(nid)
        b = self.builders[p]
        name = node.prim.name
        member = _member(node.type)
        if name in ("federated_value", "federated_broadcast"):     # the member value itself
            return self.need(node.inputs[0], p)
        inputs = tuple(self.need(i, p) for i in node.inputs)
        if name in ("federated_map", "federated_apply"):
            return b.add(Node(prim("call"), inputs, member, (), node.span))
        if name == "federated_eval":
            return b.add(Node(prim("call"), inputs, member, (), node.span))
        if name == "federated_zip":
            return b.add(Node(prim("struct"), inputs, member, (("names", member.names),), node.span))
        if name == "select":
            return b.add(Node(prim("select"), inputs, member, node.attrs, node.span))
        if node.prim.federated or is_placed(node.type):
            self.fail(nid, f"{name} on placed values cannot run inside one phase")
        copied = node.with_inputs(inputs)
        nested = {k: copy_function(v) for k, v in node.attrs if isinstance(v, Function)}
        return b.add(copied.with_attrs(**nested) if nested else copied)

    # ---- 3. finish each phase's function ------------------------------------------------------------
    def finish(self, b: _Builder, last: int) -> Phase:
        f = b.function
        ordered = sorted(b.inputs.values(), key=lambda item: (_ROLE_RANK[item[0].role], item[0].param or (),
                                                              item[0].name))
        f.params = tuple((value.name, value.type) for value, _ in ordered)
        for k, (value, local) in enumerate(ordered):
            f.replace_node(local, f.node(local).with_attrs(index=k))
        outputs = tuple(PhaseValue(name, t, "+".join(roles)) for name, (_, t, roles) in b.outputs.items())
        result_type = StructType(tuple((v.name, v.type) for v in outputs))
        f.result = b.add(Node(prim("struct"), tuple(local for local, _, _ in b.outputs.values()), result_type,
                              (("names", result_type.names),), self.comp.span))
        f.result_type = result_type
        f.name = f"{self.comp.name}.{_phase_name(b.index, last)}"
        renumber(f)
        used = set()
        for g in [f] + [fn for agg in b.aggregations for _, fn, _ in agg.functions]:
            used |= globals_used(g)
        return Phase(b.index, b.kind, _phase_name(b.index, last), tuple(v for v, _ in ordered), outputs,
                     tuple(b.aggregations), f, _closure_of(used, self.functions))


def _phase_name(index: int, last: int) -> str:
    if index % 2 == 1:
        return "client_work" if last <= 2 else f"client_work_{(index + 1) // 2}"
    if index == 0:
        return "server" if last == 0 else "server_prepare"
    if index == last:
        return "server_update"
    return f"server_step_{index // 2}"


def _closure_of(names: set[str], functions: dict[str, Function]) -> dict[str, Function]:
    out: dict[str, Function] = {}
    frontier = sorted(names)
    while frontier:
        name = frontier.pop()
        if name in out:
            continue
        if name not in functions:
            raise InternalCompilerError(f"a phase refers to the unknown function {name}")
        out[name] = functions[name]
        frontier.extend(sorted(globals_used(functions[name]) - out.keys()))
    return out


# ==== running ======================================================================================

def run_phases(phases: Phases, args: Sequence[Any], num_clients: int) -> Any:
    """Run the phases in order with the reference interpreter: server phases once, client phases
    once per client, aggregations between them. Arguments and the result are interpreter values
    (a list per client for values at CLIENTS), as for `Interpreter.call`."""
    token = NUM_CLIENTS.set(num_clients)
    try:
        server: dict[str, Any] = {}
        clients: list[dict[str, Any]] = [{} for _ in range(num_clients)]
        for phase in phases:
            interpreter = Interpreter(Program(dict(phase.globals)))
            names = [v.name for v in phase.outputs]
            if phase.kind == SERVER:
                values = [_server_input(v, server, args) for v in phase.inputs]
                server.update(zip(names, interpreter.run(phase.function, values).values))
                continue
            for c, env in enumerate(clients):
                values = [_client_input(v, server, env, args, c) for v in phase.inputs]
                env.update(zip(names, interpreter.run(phase.function, values).values))
            for agg in phase.aggregations:
                server[agg.result] = _aggregate(agg, clients, server, interpreter)
        return _assemble(phases.result, server, clients)
    finally:
        NUM_CLIENTS.reset(token)


def _argument(args: Sequence[Any], path: tuple[int, ...]) -> Any:
    value = args[path[0]]
    for k in path[1:]:
        value = value[k]
    return value


def _server_input(v: PhaseValue, server: dict, args) -> Any:
    if v.role == "param":
        return _argument(args, v.param)
    if v.role in ("aggregation", "server"):
        return server[v.name]
    raise InternalCompilerError(f"a server phase takes {v.name} as a {v.role} value")


def _client_input(v: PhaseValue, server: dict, env: dict, args, c: int) -> Any:
    if v.role == "param":
        value = _argument(args, v.param)
        return value[c] if isinstance(value, list) else value
    if v.role == "broadcast":
        return server[v.name]
    if v.role == "client":
        return env[v.name]
    raise InternalCompilerError(f"a client phase takes {v.name} as a {v.role} value")


def _aggregate(agg: Aggregation, clients: list[dict], server: dict, interpreter: Interpreter) -> Any:
    p = PRIMITIVES[agg.op]
    kwargs: dict[str, Any] = {"x": [env[agg.value] for env in clients]}
    if agg.weight is not None:
        kwargs["weight"] = [env[agg.weight] for env in clients]
    kwargs.update(agg.attrs)
    if agg.zero is not None:
        kwargs["zero"] = server[agg.zero]
    for role, function, captured in agg.functions:
        kwargs[role] = Closure(function, tuple(server[name] for name in captured), interpreter)
    if p.typed_impl:
        kwargs["out_type"] = FederatedType(agg.type, Placement.SERVER, True)
    return p.impl(**kwargs)


def _assemble(layout: tuple, server: dict, clients: list[dict]) -> Any:
    kind = layout[0]
    if kind == "struct":
        return Struct((_assemble(part, server, clients) for part in layout[2]), layout[1])
    if kind == "server":
        return server[layout[1]]
    if kind == "replicate":
        return [server[layout[1]]] * len(clients)
    return [env[layout[1]] for env in clients]


# ==== printing =====================================================================================

def format_phases(phases: Phases) -> str:
    """The phases of a comp with their types, for `fedlang compile --emit phases`."""
    lines = [f"comp {phases.computation} : {phases.type}"]
    for phase in phases:
        lines.append(f"  phase {phase.index} {phase.name} ({phase.kind}) : {phase.function.type}")
        for v in phase.inputs:
            source = f"argument {_path_text(v.param)}" if v.role == "param" else v.role
            lines.append(f"    in  {v.name}: {v.type}  <- {source}")
        for v in phase.outputs:
            lines.append(f"    out {v.name}: {v.type}  -> {v.role}")
        for agg in phase.aggregations:
            lines.append(f"    aggregate {agg}")
    lines.append(f"  result {_layout_text(phases.result)}")
    return "\n".join(lines)


def _path_text(path: tuple[int, ...] | None) -> str:
    return "?" if not path else str(path[0]) + "".join(f".{k}" for k in path[1:])


def _layout_text(layout: tuple) -> str:
    kind = layout[0]
    if kind == "struct":
        parts = [(_layout_text(p) if n is None else f"{n}={_layout_text(p)}") for n, p in zip(layout[1], layout[2])]
        return "<" + ",".join(parts) + ">"
    suffix = {"server": "@SERVER", "client": "@CLIENTS", "replicate": "@CLIENTS (all equal)"}[kind]
    return f"{layout[1]}{suffix}"
