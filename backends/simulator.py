"""The local simulator: runs a plan's computations over many clients on one machine.

    sim = Simulator(plan)
    result = sim.call("mean_temperature", [[20.0, 22.5, 19.0]])
    state = sim.call("initialize", [])
    out = sim.call("round", [state, client_datasets])      # client_datasets: one value per client

Arguments and results are interpreter values (fedlang.ir.values; a list with
one entry per client for values at CLIENTS). A value at CLIENTS may also be a
NumPy array whose first axis is the client axis (client c's value is row c),
or `BoundClients` (data bound chunk by chunk). Server phases run once. A
vectorized client phase runs once per chunk of clients: the chunk's values are
stacked along a leading client axis (sequences padded, with per-client lengths
and per-step row counts so every client computes exactly what it would alone)
and each aggregation folds the chunk's stacked results into a partial
(fedlang.backends.aggregation) before the next chunk runs, so memory is bounded
by the chunk size. A `per_client` phase runs client by client.

The chunk loop is `Simulator.run_clients` (one group of clients: all of a call's
here, a worker's shard in the Ray runtime, fedlang.backends.ray_runtime, which
subclasses Simulator and replaces `_client_phase`, the executor of client phases).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fedlang.backends.aggregation import Aggregator
from fedlang.backends.layout import StackedSequence
from fedlang.backends.plan import ComputationPlan, PhasePlan, Plan, PlanError, _parse_type
from fedlang.ir.values import Struct, leafwise

# Automatic chunk size: about this many scalars of client data per chunk (~256 MB of float32).
CHUNK_BUDGET = 64_000_000


@dataclass
class ClientGroup:
    """What `Simulator.run_clients` gives for one group of clients (a whole call's clients in
    the simulator, a worker's shard in the Ray runtime)."""
    partials: list              # one Partial per aggregation (an empty one for those deferred)
    deferred: dict[int, list]   # deferred aggregation index -> per chunk, in client order, what
                                # Aggregator.add takes: (first client, clients, value, weights)
    outputs: dict[str, list]    # client outputs kept for a later client phase or the result -> per client


def phase_values(phase: PhasePlan, args: Sequence[Any], kept: dict) -> list:
    """One entry per input of client phase `phase`, as `Simulator.run_clients` reads them."""
    return [None if v["role"] == "broadcast" else kept[v["name"]] if v["role"] == "client"
            else _argument(args, v["param"]) for v in phase.inputs]


class Simulator:
    def __init__(self, plan: Plan, clients_per_chunk: int | None = None,
                 on_chunk: Callable[[int, int], None] | None = None):
        self.plan = plan
        self.clients_per_chunk = clients_per_chunk
        self.on_chunk = on_chunk           # progress: (clients done, clients total) per client phase
        self._types: dict[str, Any] = {}

    def type_of(self, text: str):
        t = self._types.get(text)
        if t is None:
            t = self._types[text] = _parse_type(text)
        return t

    # ---------------------------------------------------------------------------------------------
    def call(self, name: str, args: Sequence[Any], clients: int | None = None) -> Any:
        """Run computation `name`; `clients` is the number of clients when no argument at
        CLIENTS says it (a comp that only broadcasts)."""
        comp = self.plan.computations.get(name)
        if comp is None:
            raise PlanError(f"the plan has no computation `{name}`")
        n = _num_clients(comp, args, self, clients)
        server: dict[str, Any] = {}
        kept: dict[str, Any] = {}           # client values kept between client phases: name -> per-client list
        results: dict[str, list] = {}       # client values in the result
        for phase in comp.phases:
            if phase.kind == "server":
                values = [self._server_input(v, server, args) for v in phase.inputs]
                if phase.forward is not None:
                    outs = [_path(values[f[0]], f[1:]) for f in phase.forward]
                else:
                    outs = phase.function(*values).values
                server.update(zip((o["name"] for o in phase.outputs), outs))
            else:
                self._client_phase(phase, args, n, server, kept, results)
        return _assemble(comp.result, server, results, n)

    def _server_input(self, v: dict, server: dict, args) -> Any:
        if v["role"] == "param":
            return _argument(args, v["param"])
        return server[v["name"]]

    def _chunks(self, n: int, phase: PhasePlan, values: list) -> list[range]:
        size = self.clients_per_chunk
        if size is None:
            size = max(1, min(n, CHUNK_BUDGET // max(1, _scalars_per_client(phase, values, n))))
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    def _client_phase(self, phase: PhasePlan, args, n: int, server: dict, kept: dict, results: dict) -> None:
        """Run a client phase over all `n` clients of the call (the local executor; a distributed
        runtime overrides this and runs `run_clients` on each worker's shard)."""
        aggregators = [self._aggregator(a, server) for a in phase.aggregations]
        group = self.run_clients(phase, phase_values(phase, args, kept), n, server, aggregators,
                                 total=n, on_chunk=self.on_chunk)
        for name, values in group.outputs.items():
            kept[name] = values
            results[name] = values
        for agg, spec, partial in zip(aggregators, phase.aggregations, group.partials):
            server[spec["result"]] = agg.report(partial)

    def run_clients(self, phase: PhasePlan, values: list, n: int, server: dict, aggregators: list[Aggregator],
                    *, offset: int = 0, total: int | None = None, defer: Sequence[int] = (),
                    on_chunk: Callable[[int, int], None] | None = None) -> "ClientGroup":
        """The chunk loop: run client phase `phase` on a group of `n` clients and fold each chunk's
        results into partial aggregates at once.

        `values` holds one entry per phase input (`phase_values`): for a `param` input the
        argument (a list, array or BoundClients with one entry per client of the group when the
        input is listed), for a `client` input the group's kept values, for a `broadcast` input
        anything (it is read from `server`). The group's clients are clients `offset ..
        offset + n - 1` of a call over `total` (where federated_aggregate cuts its halves).
        Aggregations whose index is in `defer` are not folded here: what each chunk would add is
        returned (`deferred`, chunk starts relative to the group) for the caller to add in client
        order -- for the aggregations whose partials cannot be merged (a federated_aggregate fold
        is sequential; a secure sum is one protocol over all of a call's clients), so that a
        worker of a distributed runtime cannot finish its part alone."""
        from fedlang.ir.batching import unstack_clients

        total = n if total is None else total
        defer = frozenset(defer)
        partials = [a.empty() for a in aggregators]
        deferred: dict[int, list] = {k: [] for k in defer}
        names = [o["name"] for o in phase.outputs]
        keep = [o["name"] for o in phase.outputs if "client" in o["role"].split("+") or
                "result" in o["role"].split("+")]
        collected: dict[str, list] = {k: [] for k in keep}
        stack_kwargs = {"ragged": True}
        if phase.rows:
            stack_kwargs["rows"] = True
        done = 0
        for chunk in self._chunks(n, phase, values):
            columns = []
            for v, value in zip(phase.inputs, values):
                if v["role"] == "broadcast":
                    columns.append(server[v["name"]])
                elif v["role"] == "client":
                    columns.append(value[chunk.start:chunk.stop])
                else:
                    # a list, or BoundClients (binds just this chunk's clients)
                    columns.append(value[chunk.start:chunk.stop] if v.get("listed") else value)
            stacked_in = None
            if phase.mode == "vectorized":
                try:
                    stacked_in = [self._stack(col, self.type_of(v["type"]), stack_kwargs)
                                  if v.get("batched") else col[0] if v.get("listed") else col
                                  for v, col in zip(phase.inputs, columns)]
                except ValueError:
                    # clients' tensors of different shapes (a `?` outside a sequence): client by client
                    if phase.fallback is None:
                        raise
            if stacked_in is not None:
                out = phase.function(*stacked_in)
                stacked = dict(zip(names, out.values))
                for k in keep:
                    collected[k].extend(unstack_clients(stacked[k], len(chunk), ragged=True))

                def chunk_members(name, stacked=stacked, size=len(chunk)):
                    return unstack_clients(stacked[name], size, ragged=True)
            else:
                function = phase.fallback if phase.mode == "vectorized" else phase.function
                per_client = []
                for j in range(len(chunk)):
                    one = [col[j] if v.get("listed") else col for v, col in zip(phase.inputs, columns)]
                    per_client.append(function(*one))
                stacked, columns_out = {}, {}
                for i, name in enumerate(names):
                    column = columns_out[name] = [o.values[i] for o in per_client]
                    if name in collected:
                        collected[name].extend(column)
                    stacked[name] = _stack(column)

                def chunk_members(name, columns_out=columns_out):
                    return columns_out[name]
            for k, (agg, spec) in enumerate(zip(aggregators, phase.aggregations)):
                weights = stacked[spec["weight"]] if spec["weight"] else None
                value = chunk_members(spec["value"]) if spec["op"] == "federated_aggregate" else stacked[spec["value"]]
                if k in defer:
                    deferred[k].append((chunk.start, len(chunk), value, weights))
                    continue
                partials[k] = agg.add(partials[k], value, len(chunk), weights, start=offset + chunk.start,
                                      total=total)
            done += len(chunk)
            if on_chunk is not None:
                on_chunk(done, n)
        return ClientGroup(partials, deferred, collected)

    def _stack(self, values: list, t, kwargs: dict) -> Any:
        from fedlang.ir.batching import stack_clients

        from fedlang.ir.types import TensorType

        if isinstance(t, TensorType) and t.dtype != "string":
            try:
                stacked = np.asarray(values, np.dtype(t.dtype))   # one C loop, not one per client
            except ValueError:
                stacked = None                                   # shapes differ: np.stack says so below
            if stacked is not None and stacked.shape[1:] == tuple(np.shape(values[0])):
                return stacked
        if kwargs.get("rows"):
            fast = _stack_uniform_sequences(values, t)
            if fast is not None:
                return _pad_steps(fast)
        return _pad_steps(stack_clients(values, declared=t, **kwargs))

    def _aggregator(self, spec: dict, server: dict) -> Aggregator:
        functions = {}
        for role, ref in spec["functions"].items():
            pf = self.plan.functions[ref["key"]]
            captured = [server[c] for c in ref["captured"]]
            functions[role] = _bind(pf, ref["arity"], captured)
        zero = server[spec["zero"]] if spec["zero"] else None
        return Aggregator(spec["op"], self.type_of(spec["type"]), spec["attrs"], zero, functions)


def _stack_uniform_sequences(values: list, t) -> Any:
    """stack_clients(values, ragged=True, rows=True) for the common case where it has nothing
    to pad: every client's sequence has the same length and, at each step, the same shapes.
    One np.stack per leaf and step instead of work per client; None when the case does not hold."""
    from fedlang.ir.batching import ROWS_FIELDS
    from fedlang.ir.types import SequenceType, TensorType, leaves

    if not isinstance(t, SequenceType) or not values or not all(isinstance(v, list) for v in values):
        return None
    steps = len(values[0])
    if any(len(v) != steps for v in values):
        return None
    leaf_types = list(leaves(t.element))
    row_leaf = next((k for k, lt in enumerate(leaf_types) if lt.rank and lt.shape[0] is None), None)
    n = len(values)
    columns = [[_leaves(e) for e in v] for v in values]          # client -> step -> leaves
    shapes = [[np.shape(a) for a in step] for step in columns[0]]
    for client in columns:
        for step, want in zip(client, shapes):
            if len(step) != len(want) or any(np.shape(a) != s for a, s in zip(step, want)):
                return None
    if steps and all(s == shapes[0] for s in shapes):
        # one shape at every step too: each leaf becomes [steps, clients, ..] in one copy
        stacked = []
        for k, lt in enumerate(leaf_types):
            out = np.empty((steps, n) + shapes[0][k], np.dtype(lt.dtype) if lt.dtype != "string" else np.str_)
            for c, client in enumerate(columns):
                for step in range(steps):
                    out[step, c] = client[step][k]
            stacked.append(out)
        elements = StackedSequence(steps, stacked)
        count = shapes[0][row_leaf][0] if row_leaf is not None else 0
        rows = StackedSequence(steps, [np.full((steps, n), count, np.int32)])
        return Struct((elements, np.full(n, steps, np.int32), rows), ROWS_FIELDS)
    elements, rows = [], []
    for step in range(steps):
        stacked = [np.stack([client[step][k] for client in columns]) for k in range(len(shapes[step]))]
        elements.append(_rebuild(values[0][step], iter(stacked)))
        rows.append(np.full(n, shapes[step][row_leaf][0] if row_leaf is not None else 0, np.int32))
    return Struct((elements, np.full(n, steps, np.int32), rows), ROWS_FIELDS)


def _pad_steps(value: Any) -> Any:
    """Stacked ragged sequences with row counts hold each step padded to that step's largest
    batch; a graph wants one shape for all steps, so every step is padded further to the
    largest, with copies of its last row (real data; the row counts mask it)."""
    if not isinstance(value, Struct):
        return value
    if value.names == ("elements", "lengths", "rows") and isinstance(value.values[0], list):
        steps = value.values[0]
        if len(steps) > 1 and not isinstance(steps, StackedSequence):
            leaves = [_leaves(e) for e in steps]
            widest = [np.max([leaf[k].shape for leaf in leaves], axis=0) for k in range(len(leaves[0]))]
            steps = [_rebuild(e, iter([_pad_to(x, w) for x, w in zip(leaf, widest)]))
                     for e, leaf in zip(steps, leaves)]
        return Struct((steps, *value.values[1:]), value.names)
    return Struct((_pad_steps(v) for v in value.values), value.names)


def _leaves(value: Any) -> list:
    if isinstance(value, Struct):
        return [x for v in value.values for x in _leaves(v)]
    return [value]


def _rebuild(like: Any, parts) -> Any:
    if isinstance(like, Struct):
        return Struct((_rebuild(v, parts) for v in like.values), like.names)
    return next(parts)


def _pad_to(x: np.ndarray, shape) -> np.ndarray:
    if tuple(x.shape) == tuple(shape):
        return x
    widths = [(0, int(w) - n) for n, w in zip(x.shape, shape)]
    if any(n == 0 and w > 0 for n, (_, w) in zip(x.shape, widths)):
        return np.zeros(tuple(int(w) for w in shape), x.dtype)     # nothing to copy (an empty batch)
    return np.pad(x, widths, mode="edge")


def _bind(pf, arity: int, captured: list) -> Callable:
    def call(*args):
        if len(args) != arity:
            args = (Struct(args),) if arity == 1 else tuple(args[0].values)
        return pf(*args, *captured)
    return call


def _stack(values: list) -> Any:
    if not values:
        return None
    first = values[0]
    if isinstance(first, Struct):
        return Struct((_stack([v.values[i] for v in values]) for i in range(len(first))), first.names)
    if isinstance(first, list):
        return None                      # sequences are never aggregated
    return np.stack([np.asarray(v) for v in values])


def _path(value: Any, path: Sequence[int]) -> Any:
    for k in path:
        value = value[k]
    return value


def _argument(args: Sequence[Any], path: Sequence[int]) -> Any:
    value = args[path[0]]
    for k in path[1:]:
        value = value[k]
    return value


def _num_clients(comp: ComputationPlan, args: Sequence[Any], sim: Simulator, clients: int | None) -> int:
    from fedlang.ir.types import FederatedType, Placement

    counts = set()
    for phase in comp.phases:
        for v in phase.inputs:
            if v["role"] == "param" and v.get("batched"):
                counts.add(len(_argument(args, v["param"])))
    if len(counts) > 1:
        raise PlanError(f"every value at CLIENTS needs one entry per client; got {sorted(counts)}")
    if counts:
        return counts.pop()
    for (_, text), a in zip(comp.params, args):
        t = sim.type_of(text)
        if isinstance(t, FederatedType) and t.placement is Placement.CLIENTS and \
                not isinstance(a, (Struct, np.ndarray)) and hasattr(a, "__len__"):
            return len(a)
    return clients or 0


def _scalars_per_client(phase: PhasePlan, values: list, n: int) -> int:
    """A rough size of one client's inputs (for the automatic chunk size)."""
    if n == 0:
        return 1
    sample = range(0, n, max(1, n // 64))          # about 64 clients, evenly spread
    total = 0
    for v, value in zip(phase.inputs, values):
        if v["role"] == "param" and v.get("batched"):
            total += max(_size(value[c]) for c in sample)
    return max(total, 1)


def _size(value: Any) -> int:
    if isinstance(value, Struct):
        return sum(_size(v) for v in value.values)
    if isinstance(value, list):
        return sum(_size(v) for v in value)
    return int(np.size(value))


def _assemble(layout: list, server: dict, results: dict, n: int) -> Any:
    kind = layout[0]
    if kind == "struct":
        return Struct((_assemble(part, server, results, n) for part in layout[2]), layout[1])
    if kind == "server":
        return server[layout[1]]
    if kind == "replicate":
        return [server[layout[1]]] * n
    return results[layout[1]]
