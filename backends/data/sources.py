"""Client data sources: the interface every format implements, and in-memory arrays.

A source holds clients in a fixed order. `examples(i)` gives client i's data as
one array per feature, each with a leading example axis, in stored order; all
of a client's arrays are read-only (views of cached data may be handed out).
Binding (binding.py) checks and converts them against a declared type.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Mapping, Sequence

import numpy as np

from fedlang.backends.data.errors import DataError


class ClientSource(ABC):
    """Per-client examples, feature by feature.

    Subclasses set `name` (how messages name the source), `client_ids` (the
    clients in order; index i is client `client_ids[i]`) and implement
    `_load(i)`; `examples(i)` caches what `_load` returns. `flat` is True for
    sources whose features are flat lists per example (TFF's tf.train.Example
    rows): binding may then reshape a [n, L] feature to the declared
    per-example shape when it has L elements."""

    name: str = "data"
    client_ids: list[str]
    flat: bool = False

    def __init__(self) -> None:
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def examples(self, i: int) -> dict[str, np.ndarray]:
        found = self._cache.get(i)
        if found is None:
            if not 0 <= i < len(self.client_ids):
                raise DataError(index_error(self, i))
            found = self._cache[i] = {k: readonly(v) for k, v in self._load(i).items()}
        return found

    @abstractmethod
    def _load(self, i: int) -> Mapping[str, np.ndarray]:
        """Client i's features (index checked), before caching."""

    def __len__(self) -> int:
        return len(self.client_ids)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self.client_ids)} clients>"


class ArraySource(ClientSource):
    """Clients whose examples are already in memory.

    Either `per_client` (one {feature: array} per client) or `features` (each
    feature's examples of all clients concatenated) with `offsets` (client i
    holds rows offsets[i]:offsets[i+1]); the second form hands out views."""

    def __init__(self, name: str, client_ids: Sequence[str], *,
                 per_client: Sequence[Mapping[str, np.ndarray]] | None = None,
                 features: Mapping[str, np.ndarray] | None = None,
                 offsets: Sequence[int] | np.ndarray | None = None):
        super().__init__()
        self.name = name
        self.client_ids = [str(c) for c in client_ids]
        if (per_client is None) == (features is None):
            raise ValueError("give either per_client or features with offsets")
        if per_client is not None:
            if len(per_client) != len(self.client_ids):
                raise ValueError("per_client needs one entry per client id")
            self._per_client = [{k: readonly(np.asarray(v)) for k, v in c.items()} for c in per_client]
            self._features = None
        else:
            if offsets is None or len(offsets) != len(self.client_ids) + 1:
                raise ValueError("offsets needs one entry per client id, plus one")
            self._features = {k: readonly(np.asarray(v)) for k, v in features.items()}
            self._offsets = [int(o) for o in offsets]
            self._per_client = None

    def examples(self, i: int) -> dict[str, np.ndarray]:
        """Read-only views already: no cache needed."""
        if not 0 <= i < len(self.client_ids):
            raise DataError(index_error(self, i))
        return self._load(i)

    def _load(self, i: int) -> dict[str, np.ndarray]:
        if self._per_client is not None:
            return self._per_client[i]
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return {k: v[lo:hi] for k, v in self._features.items()}


# ---- helpers shared by the formats ---------------------------------------------------------------

def readonly(array: np.ndarray) -> np.ndarray:
    """`array`, marked read-only (a view when it was writable), so cached data stays intact."""
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


def natural_key(text: str) -> tuple:
    """Sort key that orders "2" before "10" ("client2" before "client10"); ties by the text."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if k % 2 else p for k, p in enumerate(parts)), text


def dtype_name(dtype: np.dtype) -> str:
    """A stored dtype in fedlang's words: "float32", "int64", "string", ..."""
    if dtype.kind == "U":
        return "string"
    if dtype.kind == "S":
        return "bytes"
    return dtype.name


def decode_strings(array: np.ndarray, where: str) -> np.ndarray:
    """Byte strings (and object arrays of them) as a unicode array; other arrays unchanged."""
    if array.dtype.kind == "S" or (array.dtype.kind == "O" and array.size
                                   and all(isinstance(v, (bytes, str)) for v in array.flat)):
        try:
            return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in array.flat],
                            dtype=np.str_).reshape(array.shape)
        except UnicodeDecodeError:
            raise DataError(f"{where}: holds bytes that are not UTF-8 text; fedlang's string tensors "
                            f"hold text") from None
    return array


def index_error(source: ClientSource, i: object) -> str:
    n = len(source.client_ids)
    return (f"{source.name}: no client at index {i!r} (the source has {n} clients"
            + (f", indices 0..{n - 1})" if n else ")"))


def check_example_axis(source_name: str, client_id: str, features: Mapping[str, np.ndarray]) -> None:
    """Every feature needs a leading example axis (a 0-d array has none)."""
    for key, value in features.items():
        if value.ndim == 0:
            raise DataError(f"{source_name}: client {client_id}, field '{key}': stored as a single "
                            f"{dtype_name(value.dtype)} with no example axis; store it with shape [1] "
                            f"for one example")
        if value.dtype.kind == "O":
            raise DataError(f"{source_name}: client {client_id}, field '{key}': holds Python objects; "
                            f"store numeric or string arrays")
