"""`bind`: a source's clients as interpreter values of a `{T}@CLIENTS` parameter's member type T.

Shapes of T and what each client gets (n = the client's examples, in stored order):

  S* where every leaf of S leads with `?`     batches of `batch_size` (default 16): ceil(n / b)
                                              batches, all full but the last; nothing padded or dropped
  S* where every leaf leads with the same N   batches of exactly N; the last n % N examples are dropped
                                              (unless the stored examples already have S's full shape:
                                              then it is a sequence of single examples)
  S* otherwise                                n single examples
  S (not a sequence)                          the client's one example (it must hold exactly one)

Struct fields bind to features by name (features the type does not name are
ignored); a bare tensor binds to the only feature of a one-feature source.
Dtypes must match except float64 -> float32 and int64 -> int32 (when every
value fits); a flat TFF feature of L values per example takes any declared
per-example shape of L elements. Every mismatch is a DataError naming the
source, the client and the field. Tensors are read-only views of the source's
arrays wherever no conversion is needed.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from fedlang.backends.data.errors import DataError
from fedlang.backends.data.sources import ClientSource, dtype_name, index_error
from fedlang.ir.types import FederatedType, Placement, SequenceType, StructType, TensorType, Type, parse
from fedlang.ir.values import Struct

DEFAULT_BATCH_SIZE = 16
_INT32 = np.iinfo(np.int32)


def bind(source: ClientSource, member_type: Type | str, batch_size: int | None = None,
         clients: Iterable[int] | None = None) -> list:
    """One value of `member_type` per client index in `clients` (default: every client, in order).

    `member_type` is T of a `{T}@CLIENTS` parameter (the federated type itself, or
    its text, is accepted too). `batch_size` applies where T's batch dimension is `?`."""
    plan = _Plan(source.name, _member(member_type, source.name), batch_size)
    n = len(source.client_ids)
    indices = range(n) if clients is None else clients
    out = []
    for i in indices:
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < n:
            raise DataError(index_error(source, i))
        out.append(plan.bind_client(source, int(i)))
    return out


def _member(t: Type | str, name: str) -> Type:
    if isinstance(t, str):
        try:
            t = parse(t)
        except Exception as error:
            raise DataError(f"{name}: cannot read the type {t!r}: {error}") from None
    if isinstance(t, FederatedType):
        if t.placement is not Placement.CLIENTS or t.all_equal:
            raise DataError(f"{name}: client data binds to {{T}}@CLIENTS parameters (one value per "
                            f"client), not to {t}")
        t = t.member
    return t


class _Plan:
    """What the type asks of each client, worked out once per `bind` call."""

    def __init__(self, name: str, t: Type, batch_size: int | None):
        self.name = name
        self.type = t
        sequence = isinstance(t, SequenceType)
        element = t.element if sequence else t
        if isinstance(element, TensorType):
            self.names = None
            self.leaves = [(None, element)]
        elif isinstance(element, StructType):
            if not element.fields:
                raise DataError(f"{name}: cannot bind data to {t}: the struct names no fields")
            for field, ft in element.fields:
                if field is None:
                    raise DataError(f"{name}: cannot bind data to {t}: every field needs a name, "
                                    f"which is the feature it binds to")
                if not isinstance(ft, TensorType):
                    raise DataError(f"{name}: cannot bind data to {t}: field '{field}' is {ft}; "
                                    f"fields bind to features, so each must be a tensor")
            self.names = element.names
            self.leaves = list(element.fields)
        else:
            raise DataError(f"{name}: cannot bind data to {t}: client data is a tensor, a struct of "
                            f"tensors, or a sequence of either")
        leads = {lt.shape[0] if lt.rank else "scalar" for _, lt in self.leaves}
        self.fixed = 0
        if not sequence:
            self.mode = "one"
        elif leads == {None}:
            self.mode = "batch"
        elif len(leads) == 1 and isinstance(next(iter(leads)), int) and next(iter(leads)) > 0:
            self.mode = "fixed_or_single"
            self.fixed = next(iter(leads))
        else:
            self.mode = "single"
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise DataError(f"{name}: the batch size must be a whole number of at least 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.size = (batch_size or DEFAULT_BATCH_SIZE) if self.mode == "batch" else self.fixed
        # (feature, declared type, numpy dtype or None for string, per-example shape when batched)
        self.checks = [(f, lt, None if lt.dtype == "string" else np.dtype(lt.dtype), lt.shape[1:])
                       for f, lt in self.leaves]

    # ---- one client ------------------------------------------------------------------------------

    def bind_client(self, source: ClientSource, i: int):
        client = source.client_ids[i]
        features = source.examples(i)
        checks = self.checks
        if self.names is None:
            checks = [(self._only_feature(features, client), *checks[0][1:])]
        flat = source.flat
        mode = self.mode
        if mode == "fixed_or_single":
            whole = [_fit_shape(features.get(f), lt.shape, flat) for f, lt, _, _ in checks]
            if all(a is not None for a in whole):
                mode, arrays = "single", whole
            else:
                mode, arrays = "fixed", None
                if self.batch_size is not None and self.batch_size != self.fixed:
                    f, lt = checks[0][:2]
                    raise DataError(f"{self.name}: client {client}, field '{f}': declared {lt} fixes "
                                    f"batches of {self.fixed}, but batch size {self.batch_size} was asked "
                                    f"for; write ? for the batch dimension to choose it at run time")
        else:
            arrays = None
        batched = mode in ("batch", "fixed")
        values = []
        for k, (f, lt, dtype, batch_shape) in enumerate(checks):
            array = features.get(f)
            if array is None:
                raise DataError(f"{self.name}: client {client}, field '{f}': declared {lt}, found no such "
                                f"feature (the client has {_features(features)})")
            shaped = arrays[k] if arrays is not None else _fit_shape(array, batch_shape if batched else lt.shape, flat)
            converted = _convert(shaped, dtype) if shaped is not None else None
            if converted is None:
                raise DataError(f"{self.name}: client {client}, field '{f}': declared {lt}, found "
                                f"{dtype_name(array.dtype)} examples of shape {_dims(array.shape[1:])}")
            if converted is _OVERFLOW:
                bad = array[(array < _INT32.min) | (array > _INT32.max)].flat[0]
                raise DataError(f"{self.name}: client {client}, field '{f}': declared {lt}, found int64 "
                                f"value {bad}, which does not fit int32; declare int64")
            if values and len(converted) != len(values[0]):
                raise DataError(f"{self.name}: client {client}, field '{f}': found {len(converted)} "
                                f"examples, but field '{checks[0][0]}' has {len(values[0])}; every field "
                                f"needs one entry per example")
            values.append(converted)
        n = len(values[0])
        names = self.names
        if batched:
            size = self.size
            stop = n if mode == "batch" else n - n % size
            if names is None:
                only = values[0]
                return [only[s:s + size] for s in range(0, stop, size)]
            return [Struct([v[s:s + size] for v in values], names) for s in range(0, stop, size)]
        if mode == "one":
            if n != 1:
                f, lt = checks[0][:2]
                raise DataError(f"{self.name}: client {client}, field '{f}': declared {lt} (one value per "
                                f"client), found {n} examples; declare a sequence {{{self.type}*}}@CLIENTS "
                                f"to bind all of a client's examples")
            if names is None:
                return values[0][0, ...]
            return Struct([v[0, ...] for v in values], names)
        columns = [_rows(v) for v in values]
        if names is None:
            return columns[0]
        return [Struct(row, names) for row in zip(*columns)]

    def _only_feature(self, features: dict, client: str) -> str:
        if len(features) != 1:
            lt = self.leaves[0][1]
            raise DataError(f"{self.name}: client {client}: declared the bare tensor {lt}, which binds the "
                            f"only feature of a one-feature source, but the client has {len(features)} "
                            f"features ({_features(features)}); declare a struct naming the features to "
                            f"bind, as in <{','.join(f'{k}=...' for k in sorted(features))}>")
        return next(iter(features))


_OVERFLOW = object()


def _fit_shape(array: np.ndarray | None, shape: tuple, flat: bool) -> np.ndarray | None:
    """`array` ([n, ...]) when its per-example shape is `shape` (`None` matching any size); a flat
    [n, L] array reshaped to [n, *shape] when `flat` and `shape` has L elements; else None."""
    if array is None:
        return None
    found = array.shape[1:]
    if found == shape:
        return array
    if len(found) == len(shape) and all(d is None or d == s for d, s in zip(shape, found)):
        return array
    if flat and array.ndim == 2 and None not in shape and math.prod(shape) == array.shape[1]:
        return array.reshape((array.shape[0], *shape))
    return None


def _convert(array: np.ndarray, dtype: np.dtype | None):
    """`array` as `dtype` (None = string) when exact or lossless, _OVERFLOW, or None when not allowed."""
    have = array.dtype
    if dtype is None:
        return array if have.kind == "U" else None
    if have == dtype:
        return array
    if have == np.float64 and dtype == np.float32:
        return array.astype(np.float32)
    if have == np.int64 and dtype == np.int32:
        if array.size and (array.min() < _INT32.min or array.max() > _INT32.max):
            return _OVERFLOW
        return array.astype(np.int32)
    return None


def _rows(array: np.ndarray) -> list:
    """The examples of [n, ...] `array` as arrays (0-d for scalars), views, in order."""
    if array.ndim >= 2:
        return list(array)
    return [array[k, ...] for k in range(array.shape[0])]


def _dims(shape: tuple) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _features(features: dict) -> str:
    return ", ".join(f"'{k}'" for k in sorted(features)) if features else "no features"


class BoundClients:
    """Clients `clients` of `source`, bound to `member_type` only when read: `len()`, an index
    or a slice (a slice binds just those clients). The simulator reads one chunk at a time,
    so a round never holds more bound client data than a chunk; a distributed runtime ships
    the spec and the indices, and each worker binds its own shard."""

    def __init__(self, source: ClientSource, member_type: Type | str, batch_size: int | None,
                 clients: Iterable[int], spec: str | None = None):
        self.source, self.member_type, self.batch_size = source, member_type, batch_size
        self.clients = [int(c) for c in clients]
        self.spec = spec

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return bind(self.source, self.member_type, self.batch_size, self.clients[k])
        return bind(self.source, self.member_type, self.batch_size, [self.clients[k]])[0]

    def __iter__(self):
        return iter(self[:])

    def __repr__(self) -> str:
        return f"BoundClients({self.spec or self.source.name}, {len(self)} clients)"
