"""Aggregations between a client phase and the next server phase, over stacked client values.

A runtime runs a client phase on groups of clients (chunks of one round, or
the shards of Ray workers) and gets their outputs stacked along a leading
client axis. Each group is reduced to a *partial* aggregate right away, the
partials are merged, and the server phase receives the finished value --
TFF's MapReduce form (accumulate on the worker, merge at the server, report).

  federated_sum       partial = sum                  merge = +
  federated_mean      partial = (sum w*x, sum w)     merge = +      report = num / den
  federated_min/max   partial = min / max            merge = min / max
  federated_secure_sum  the secure aggregation protocol (fedlang.backends.secagg): each
                      group's clients submit masked inputs to one session per round,
                      the server unmasks the sum modulo 2**bitwidth when the round ends
  robust ones         (median, trimmed mean, clipped or zeroing mean, Krum) keep the
                      stacked values and decide in `report`, with the same code as
                      the reference interpreter (fedlang.ir.primitives.robust_aggregate)
  federated_aggregate accumulate folds the group's clients in order from the
                      previous partial (the first from `zero`); the clients
                      are cut in two halves, each folded, then merged and
                      reported -- exactly the reference interpreter's meaning

With no client at all, the results are the reference interpreter's (sum: zeros,
mean: NaN, min/max: the dtype's extreme values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fedlang.ir.types import StructType, TensorType, Type
from fedlang.ir.values import Struct, leafwise


# Robust aggregations need every client's value at once (a median is not a sum of medians).
ROBUST = frozenset({"federated_median", "federated_trimmed_mean", "federated_clipped_mean",
                    "federated_zeroing_mean", "federated_krum"})


@dataclass
class Partial:
    op: str
    value: Any = None          # sum / min / max / numerator / accumulator(s)
    weight: float = 0.0        # mean: the sum of weights
    clients: int = 0


def _zeros(t: Type) -> Any:
    if isinstance(t, StructType):
        return Struct((_zeros(f) for f in t.types), t.names)
    return np.zeros([d or 0 for d in t.shape], np.dtype(t.dtype))


def _extreme(t: Type, highest: bool) -> Any:
    def fill(z):
        if np.issubdtype(z.dtype, np.integer):
            info = np.iinfo(z.dtype)
            return np.full_like(z, info.max if highest else info.min)
        return np.full_like(z, np.inf if highest else -np.inf)
    return leafwise(fill, _zeros(t))


class Aggregator:
    """One aggregation of a plan: `partial(stacked, weights)` per group, `merge`, `report`.
    `functions` (federated_aggregate) maps accumulate/merge/report to callables on
    interpreter values (the plan's lowered functions with their captured server values)."""

    def __init__(self, op: str, member_type: Type, attrs: dict | None = None,
                 zero: Any = None, functions: dict[str, Callable] | None = None):
        self.op, self.type, self.attrs = op, member_type, dict(attrs or {})
        self.zero, self.functions = zero, functions or {}

    def empty(self) -> Partial:
        if self.op == "federated_aggregate":
            return Partial(self.op, value=[self.zero, self.zero])
        return Partial(self.op)

    def add(self, partial: Partial, stacked: Any, clients: int, weights: np.ndarray | None = None,
            start: int = 0, total: int | None = None) -> Partial:
        """Fold a group of `clients` stacked values into `partial`. For federated_aggregate,
        `stacked` is the list of the clients' values and `start` the group's first client index
        among `total` (the halves are cut there)."""
        if clients == 0:
            return partial
        op = self.op
        if op == "federated_aggregate":
            return self._accumulate(partial, stacked, clients, start, total)
        if op == "federated_secure_sum":            # the real protocol (fedlang.backends.secagg)
            from fedlang.backends.secagg import SecureSumSession, flatten_clients, suggested_neighbours
            flat, layout = flatten_clients(stacked)     # struct of [clients, ..] ints -> int64 [clients, D]
            if partial.value is None:
                n = total if total is not None else clients
                session = SecureSumSession(n, flat.shape[1], int(self.attrs["bitwidth"]),
                                           neighbours=suggested_neighbours(n))
            else:
                session, layout = partial.value
            session.submit(flat, start=start)
            return Partial(op, (session, layout), 0.0, partial.clients + clients)
        if op == "federated_sum":
            part = leafwise(lambda x: np.sum(x, axis=0, dtype=x.dtype), stacked)
            value = part if partial.value is None else leafwise(lambda a, b: a + b, partial.value, part)
            return Partial(op, value, 0.0, partial.clients + clients)
        if op == "federated_mean":
            if weights is None:
                part = leafwise(lambda x: np.sum(x, axis=0, dtype=x.dtype), stacked)
                wsum = float(clients)
            else:
                w = np.asarray(weights)
                with np.errstate(all="ignore"):     # IEEE: inf * 0 is NaN, as in the interpreter
                    part = leafwise(lambda x: np.sum(x * w.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)),
                                                     axis=0, dtype=x.dtype), stacked)
                wsum = float(np.sum(w.astype(np.float64)))
            value = part if partial.value is None else leafwise(lambda a, b: a + b, partial.value, part)
            return Partial(op, value, partial.weight + wsum, partial.clients + clients)
        if op in ROBUST:                       # not decomposable: keep the values, decide at the end
            value = (partial.value or []) + [stacked]
            return Partial(op, value, 0.0, partial.clients + clients)
        if op in ("federated_min", "federated_max"):
            fn = np.min if op == "federated_min" else np.max
            both = np.minimum if op == "federated_min" else np.maximum
            part = leafwise(lambda x: fn(x, axis=0), stacked)
            value = part if partial.value is None else leafwise(both, partial.value, part)
            return Partial(op, value, 0.0, partial.clients + clients)
        raise ValueError(f"unknown aggregation {op}")

    def _accumulate(self, partial: Partial, stacked: Any, clients: int, start: int, total: int | None) -> Partial:
        accumulate = self.functions["accumulate"]
        half = (total if total is not None else clients) // 2
        accs = list(partial.value)
        for c in range(clients):
            k = 0 if start + c < half else 1
            accs[k] = accumulate(accs[k], stacked[c])
        return Partial(self.op, accs, 0.0, partial.clients + clients)

    def merge(self, a: Partial, b: Partial) -> Partial:
        """Two partials of disjoint groups (for every op but federated_aggregate, whose
        partials are carried from group to group in client order)."""
        if a.value is None:
            return b
        if b.value is None:
            return a
        op = self.op
        if op == "federated_secure_sum":
            raise ValueError("a secure sum runs one protocol over all of a round's clients; its partials "
                             "cannot be merged")
        if op in ("federated_sum", "federated_mean"):
            value = leafwise(lambda x, y: x + y, a.value, b.value)
        elif op in ROBUST:
            value = a.value + b.value
        elif op == "federated_min":
            value = leafwise(np.minimum, a.value, b.value)
        elif op == "federated_max":
            value = leafwise(np.maximum, a.value, b.value)
        else:
            raise ValueError(f"{op} partials are carried, not merged")
        return Partial(op, value, a.weight + b.weight, a.clients + b.clients)

    def report(self, partial: Partial) -> Any:
        op, t = self.op, self.type
        if op == "federated_aggregate":
            merged = self.functions["merge"](partial.value[0], partial.value[1])
            return self.functions["report"](merged)
        if partial.clients == 0:
            if op == "federated_mean" or op in ROBUST:
                return leafwise(lambda z: np.full_like(z, np.nan), _zeros(t))
            if op in ("federated_min", "federated_max"):
                return _extreme(t, op == "federated_min")
            return _zeros(t)
        if op == "federated_mean":
            with np.errstate(all="ignore"):          # IEEE: a zero total weight gives inf or NaN, as in the interpreter
                return leafwise(lambda x: np.asarray(x / x.dtype.type(partial.weight)).astype(x.dtype),
                                partial.value)
        if op in ROBUST:
            from fedlang.ir.primitives import robust_aggregate
            stacked = leafwise(lambda *parts: np.concatenate(parts), *partial.value)
            return robust_aggregate(op, stacked, self.attrs)
        if op == "federated_secure_sum":
            from fedlang.backends.secagg import unflatten
            session, layout = partial.value
            total = unflatten(session.finish().sum, layout)     # int64 leaves in [0, 2^bitwidth)
            return leafwise(lambda x, z: np.asarray(x).astype(z.dtype), total, _zeros(t))
        return leafwise(lambda x, z: np.asarray(x).astype(z.dtype), partial.value, _zeros(t))


def tensor_types(t: Type) -> list[TensorType]:
    if isinstance(t, StructType):
        return [x for f in t.types for x in tensor_types(f)]
    return [t]
