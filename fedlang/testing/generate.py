"""Random values of fedlang types, as the reference interpreter represents them.

One generator, two sources of randomness:

* `draw_value(t, rng, clients, unknown)` draws from a NumPy `Generator`:
  deterministic for a seed, fast, used where a test wants many values cheaply
  (the project's pass and phase tests);
* `values(t)` and `arguments(comp)` are Hypothesis strategies over the same
  code, drawing every choice (numbers of clients, sequence lengths, sizes of
  `?` dimensions, tensor elements) from Hypothesis, so a failing example
  shrinks to few clients, short sequences, small shapes and simple numbers.

The values (`fedlang.ir.values`): a tensor is a NumPy array of exactly the
type's dtype (0-d for a scalar; `string` is a NumPy `str_` array), a struct a
`Struct` with the type's field names, a sequence a list, `{T}@CLIENTS` a list
with one member per client, `T@CLIENTS` such a list with every entry the same
value, `T@SERVER` the member itself. Function types have no random values
(`NoValue`).

Every `?` dimension of one drawn value (or one argument list) takes the same
size, so `float32[?]` arguments combine elementwise as a program expects; the
exception is the leading dimension of a sequence element, which each element
draws for itself, as batches of a client's data set differ in size (the
fields of one element share it: `<x=float32[?,64],y=int32[?]>*` gives batches
whose `x` and `y` have the same number of rows). With `ragged_clients`, each
client's member of a `{T}@CLIENTS` value draws its own leading size the same
way (data sets of different sizes); it is off by default because a program that
aggregates `?`-shaped client values needs them to have one shape.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlang.ir.types import (FederatedType, FunctionType, Placement, SequenceType, StructType, TensorType, Type,
                              walk)
from fedlang.ir.values import Struct

__all__ = ["Arguments", "NoValue", "arguments", "draw_arguments", "draw_value", "is_value_of", "mismatch",
           "parameter_types", "values"]

CLIENTS, SERVER = Placement.CLIENTS, Placement.SERVER

#: Nonzero floats `values` draws are at least this large in magnitude: the square root of the
#: smallest normal number, so a product of two is not subnormal either (TensorFlow flushes
#: subnormal results to zero on CPU, the reference interpreter does not).
TINY = {"float16": 2.0 ** -7, "float32": 2.0 ** -63, "float64": 2.0 ** -511}

#: Floats `draw_value` mixes in (a quarter of the elements), so sign-of-zero and identity laws are exercised.
SPECIAL_FLOATS = (-0.0, 0.0, 1.0, -1.0, 2.5, -3.0)


class NoValue(ValueError):
    """The type has no random values here (a function type, or a parameter of one)."""


class Arguments(list):
    """The argument list of a computation (one value per parameter) and `clients`, the
    number of clients every CLIENTS argument holds (also what to pass as `clients=`
    when no argument is at CLIENTS but the result is)."""

    def __init__(self, values: Iterable[Any] = (), clients: int = 0):
        super().__init__(values)
        self.clients = clients

    def __repr__(self) -> str:
        return f"Arguments({list.__repr__(self)}, clients={self.clients})"

    def _repr_pretty_(self, p, cycle) -> None:          # Hypothesis prints falsifying examples with this
        p.text(repr(self))


# ---- the generator ----------------------------------------------------------------------------------

def _int_range(dtype: str, ints: tuple[int, int]) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return max(int(ints[0]), int(info.min)), min(int(ints[1]), int(info.max))


class _NumpySource:
    """Choices from a NumPy Generator (the project's historical `random_value` draws, bit for bit)."""

    def __init__(self, rng: np.random.Generator, max_length: int, rows: tuple[int, int],
                 ints: tuple[int, int], floats: tuple[float, float]):
        self.rng, self.max_length, self.row_range, self.ints, self.floats = rng, max_length, rows, ints, floats
        self.specials = tuple(s for s in SPECIAL_FLOATS if floats[0] <= s <= floats[1])

    def length(self) -> int:
        return int(self.rng.integers(0, self.max_length + 1))

    def rows(self) -> int:
        return int(self.rng.integers(self.row_range[0], self.row_range[1] + 1))

    def tensor(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        rng = self.rng
        if dtype == "bool":
            return np.asarray(rng.random(shape) < 0.5)
        if dtype == "string":
            return np.asarray(rng.choice(["a", "b"], size=shape), np.str_)
        if dtype.startswith("float"):
            values = rng.uniform(self.floats[0], self.floats[1], shape)
            if self.specials:
                special = rng.random(shape) < 0.25
                values = np.where(special, rng.choice(self.specials, size=shape), values)
            return np.asarray(values, dtype)
        lo, hi = _int_range(dtype, self.ints)
        return np.asarray(rng.integers(lo, hi + 1, shape), dtype)


@functools.lru_cache(maxsize=None)
def _elements(dtype: str, ints: tuple[int, int], floats: tuple[float, float]) -> st.SearchStrategy:
    if dtype == "bool":
        return st.booleans()
    if dtype == "string":
        return st.text(alphabet="abc", max_size=3)
    if dtype.startswith("float"):
        width = np.dtype(dtype).itemsize * 8
        info = np.finfo(np.dtype(dtype))
        with np.errstate(over="ignore"):                       # bounds representable at the width
            lo, hi = (float(np.clip(np.asarray(v, dtype), info.min, info.max)) for v in floats)
        tiny = TINY[dtype]
        return st.floats(lo, hi, width=width, allow_nan=False, allow_infinity=False, allow_subnormal=False).map(
            lambda x: x if abs(x) >= tiny else math.copysign(0.0, x))
    lo, hi = _int_range(dtype, ints)
    return st.integers(lo, hi)


class _HypothesisSource:
    """Every choice drawn by Hypothesis, so examples shrink."""

    def __init__(self, draw, lengths: st.SearchStrategy[int], dims: st.SearchStrategy[int],
                 ints: tuple[int, int], floats: tuple[float, float]):
        self.draw, self.lengths, self.dims, self.ints, self.floats = draw, lengths, dims, ints, floats

    def length(self) -> int:
        return self.draw(self.lengths)

    def rows(self) -> int:
        return self.draw(self.dims)

    def tensor(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        np_dtype = np.dtype("<U3") if dtype == "string" else np.dtype(dtype)
        array = self.draw(hnp.arrays(np_dtype, shape, elements=_elements(dtype, self.ints, self.floats)))
        if dtype == "string":
            array = np.asarray(array, np.str_)
        return np.asarray(array)


def _with_rows(t: Type, rows: int) -> Type:
    """`t` with every leading `?` fixed to `rows` (one batch of a sequence)."""
    if isinstance(t, TensorType):
        return TensorType(t.dtype, (rows,) + t.shape[1:]) if t.rank and t.shape[0] is None else t
    if isinstance(t, StructType):
        return StructType(tuple((n, _with_rows(f, rows)) for n, f in t.fields))
    return t


def _value(t: Type, src, clients: int, unknown: int, ragged: bool, ragged_clients: bool = False) -> Any:
    if isinstance(t, TensorType):
        return src.tensor(t.dtype, tuple(unknown if d is None else d for d in t.shape))
    if isinstance(t, StructType):
        return Struct([_value(f, src, clients, unknown, ragged, ragged_clients) for f in t.types], t.names)
    if isinstance(t, SequenceType):
        n = src.length()
        if ragged:
            return [_value(_with_rows(t.element, src.rows()), src, clients, unknown, ragged) for _ in range(n)]
        return [_value(t.element, src, clients, unknown, ragged) for _ in range(n)]
    if isinstance(t, FederatedType):
        if t.placement is SERVER:
            return _value(t.member, src, clients, unknown, ragged)
        if t.all_equal:
            return [_value(t.member, src, clients, unknown, ragged)] * clients
        if ragged_clients and _leading_unknown(t.member):
            return [_value(_with_rows(t.member, src.rows()), src, clients, unknown, ragged) for _ in range(clients)]
        return [_value(t.member, src, clients, unknown, ragged) for _ in range(clients)]
    raise NoValue(f"no random values of type {t}")


def _leading_unknown(t: Type) -> bool:
    if isinstance(t, TensorType):
        return t.rank > 0 and t.shape[0] is None
    if isinstance(t, StructType):
        return any(_leading_unknown(f) for f in t.types)
    return False


def draw_value(t: Type, rng: np.random.Generator, clients: int, unknown: int, *, ragged: bool = False,
               ragged_clients: bool = False, max_length: int = 2, rows: tuple[int, int] = (0, 4),
               ints: tuple[int, int] = (-5, 5), floats: tuple[float, float] = (-3.0, 3.0)) -> Any:
    """A random value of type `t` from the NumPy generator `rng` (deterministic for a seed).

    `clients` members at CLIENTS; `unknown` is the size of every `?` dimension;
    sequences have 0..`max_length` elements; with `ragged`, each sequence element
    draws its own leading size from `rows` (inclusive), like batches; with
    `ragged_clients`, so does each client's member of a `{T}@CLIENTS` value. Integers
    lie in `ints` (inclusive, clipped to the dtype; unsigned from 0), floats in `floats`,
    a quarter of them one of SPECIAL_FLOATS; bools are fair coins and strings "a" or "b".
    Raises `NoValue` for a function type."""
    return _value(t, _NumpySource(rng, max_length, rows, ints, floats), clients, unknown, ragged, ragged_clients)


def parameter_types(comp: Any) -> list[Type]:
    """The parameter types of what `arguments` and `draw_arguments` accept: a computation of
    `fedlang.load(...)` (one argument per declared parameter), an IR function, a
    `FunctionType` (its single parameter, or none) or a list of types."""
    function = getattr(comp, "function", None)
    if function is not None and hasattr(function, "params"):
        return [t for _, t in function.params]
    if hasattr(comp, "params"):
        return [t for _, t in comp.params]
    if isinstance(comp, FunctionType):
        return [] if comp.parameter is None else [comp.parameter]
    if isinstance(comp, (list, tuple)) and all(isinstance(t, Type) for t in comp):
        return list(comp)
    raise TypeError(f"expected a computation, an IR function, a function type or a list of types; got {comp!r}")


def draw_arguments(comp: Any, rng: np.random.Generator, clients: int, unknown: int | None = None,
                   **options: Any) -> Arguments:
    """Random arguments for `comp` (see `parameter_types`) from `rng`: every CLIENTS argument
    holds `clients` members and every `?` has the same size (`unknown`, drawn from 1..3 when
    not given). `options` as for `draw_value`."""
    if unknown is None:
        unknown = int(rng.integers(1, 4))
    return Arguments((draw_value(t, rng, clients, unknown, **options) for t in parameter_types(comp)), clients)


# ---- the Hypothesis strategies ----------------------------------------------------------------------

def _strategy(x: int | st.SearchStrategy[int], what: str) -> st.SearchStrategy[int]:
    if isinstance(x, st.SearchStrategy):
        return x
    if isinstance(x, int) and x >= 0:
        return st.just(x)
    raise TypeError(f"{what} must be a non-negative int or a Hypothesis strategy of ints, got {x!r}")


def _require_values(ts: Sequence[Type]) -> None:
    for t in ts:
        if not isinstance(t, Type):
            raise TypeError(f"expected a fedlang type, got {t!r} (fedlang.types.parse reads one from text)")
        if any(isinstance(x, FunctionType) for x in walk(t)):
            raise NoValue(f"no random values of type {t}: it holds a function type")


def _ranges(ints, floats) -> tuple[tuple[int, int], tuple[float, float]]:
    ints, floats = (int(ints[0]), int(ints[1])), (float(floats[0]), float(floats[1]))
    if ints[0] > ints[1] or floats[0] > floats[1]:
        raise ValueError(f"empty range: ints={ints}, floats={floats}")
    return ints, floats


def values(t: Type, clients: int | st.SearchStrategy[int] = st.integers(1, 20), *,
           lengths: st.SearchStrategy[int] = st.integers(0, 4), dims: st.SearchStrategy[int] = st.integers(1, 4),
           ints: tuple[int, int] = (-5, 5), floats: tuple[float, float] = (-3.0, 3.0),
           ragged: bool = True, ragged_clients: bool = False) -> st.SearchStrategy[Any]:
    """Random values of type `t` (a `fedlang.types.Type`; `fedlang.types.parse("{float32}@CLIENTS")`).

    `clients`: how many members a value at CLIENTS has (an int or a strategy);
    `lengths`: sequence lengths; `dims`: the size of `?` dimensions (all `?` of the
    value share one, except that with `ragged` each sequence element draws its own
    leading size, like batches, and with `ragged_clients` each client's member of a
    `{T}@CLIENTS` value does, like data sets of different sizes); `ints`, `floats`:
    inclusive ranges of the numbers (clipped to the dtype; unsigned integers from 0;
    floats finite and either zero or at least `TINY[dtype]` in magnitude, so no product
    of two is subnormal). Raises `NoValue` for a type holding a function type."""
    _require_values([t])
    ints, floats = _ranges(ints, floats)
    return _values(t, _strategy(clients, "clients"), lengths, dims, ints, floats, ragged, ragged_clients)


def _has(t: Type, what) -> bool:
    return any(what(x) for x in walk(t))


def _clients_in(t: Type) -> bool:
    return _has(t, lambda x: isinstance(x, FederatedType) and x.placement is CLIENTS)


def _unknown_in(t: Type) -> bool:
    return _has(t, lambda x: isinstance(x, TensorType) and None in x.shape)


@st.composite
def _values(draw, t, clients, lengths, dims, ints, floats, ragged, ragged_clients) -> Any:
    n = draw(clients) if _clients_in(t) else 0
    unknown = draw(dims) if _unknown_in(t) else 1
    return _value(t, _HypothesisSource(draw, lengths, dims, ints, floats), n, unknown, ragged, ragged_clients)


def arguments(comp: Any, clients: int | st.SearchStrategy[int] = st.integers(1, 20), *,
              lengths: st.SearchStrategy[int] = st.integers(0, 4), dims: st.SearchStrategy[int] = st.integers(1, 4),
              ints: tuple[int, int] = (-5, 5), floats: tuple[float, float] = (-3.0, 3.0),
              ragged: bool = True, ragged_clients: bool = False) -> st.SearchStrategy[Arguments]:
    """Random argument lists for `comp`: a computation of `fedlang.load(...)`, an IR
    function, a `FunctionType` or a list of parameter types (see `parameter_types`).

    Every CLIENTS argument holds the same number of clients, drawn once from `clients`
    and kept in the result's `.clients`; every `?` dimension has one size (sequence
    elements their own leading size with `ragged`, client members with
    `ragged_clients`). Other options as for `values`.

        args = data.draw(arguments(prog.round))
        prog.round(*args, clients=args.clients)
    """
    types = parameter_types(comp)
    _require_values(types)
    ints, floats = _ranges(ints, floats)
    return _arguments(tuple(types), _strategy(clients, "clients"), lengths, dims, ints, floats, ragged,
                      ragged_clients)


@st.composite
def _arguments(draw, types, clients, lengths, dims, ints, floats, ragged, ragged_clients) -> Arguments:
    n = draw(clients)
    unknown = draw(dims) if any(_unknown_in(t) for t in types) else 1
    src = _HypothesisSource(draw, lengths, dims, ints, floats)
    return Arguments((_value(t, src, n, unknown, ragged, ragged_clients) for t in types), n)


# ---- membership ------------------------------------------------------------------------------------

def is_value_of(value: Any, t: Type, clients: int | None = None) -> bool:
    """Whether `value` is an interpreter value of type `t` (see `mismatch`)."""
    return mismatch(value, t, clients) is None


def mismatch(value: Any, t: Type, clients: int | None = None, path: str = "value") -> str | None:
    """None when `value` is an interpreter value of type `t`, else where and why it is not.

    Tensors: a NumPy array (or NumPy scalar) of exactly the dtype and rank, every known
    dimension equal (`?` is free); structs: a `Struct` with the type's field names, in
    order; sequences: a list of element values; `{T}@CLIENTS`: a list of members with one
    entry per client (`clients`, or the same count for every CLIENTS value inside `value`);
    `T@CLIENTS`: such a list whose entries are all equal; functions: any callable."""
    return _mismatch(value, t, [clients], path)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Struct) and isinstance(b, Struct):
        return a.names == b.names and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (Struct, list)) or isinstance(b, (Struct, list)):
        return False
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _mismatch(value: Any, t: Type, clients: list, path: str) -> str | None:
    if isinstance(t, TensorType):
        if not isinstance(value, (np.ndarray, np.generic)):
            return f"{path}: expected a NumPy array of type {t}, got {type(value).__name__}"
        if t.dtype == "string":
            if value.dtype.kind != "U":
                return f"{path}: expected a string array ({t}), got dtype {value.dtype}"
        elif value.dtype != np.dtype(t.dtype):
            return f"{path}: expected dtype {t.dtype} ({t}), got {value.dtype}"
        shape = np.shape(value)
        if len(shape) != t.rank or any(d is not None and d != s for d, s in zip(t.shape, shape)):
            return f"{path}: expected shape {t}, got shape {list(shape)}"
        return None
    if isinstance(t, StructType):
        if not isinstance(value, Struct):
            return f"{path}: expected a Struct of type {t}, got {type(value).__name__}"
        if value.names != t.names:
            return f"{path}: expected the fields {list(t.names)} ({t}), got {list(value.names)}"
        for i, ((n, f), v) in enumerate(zip(t.fields, value.values)):
            problem = _mismatch(v, f, clients, f"{path}.{n}" if n is not None else f"{path}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(t, SequenceType):
        if not isinstance(value, list):
            return f"{path}: expected a list (a sequence {t}), got {type(value).__name__}"
        for i, v in enumerate(value):
            problem = _mismatch(v, t.element, clients, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(t, FederatedType):
        if t.placement is SERVER:
            return _mismatch(value, t.member, clients, path)
        if not isinstance(value, list):
            return f"{path}: a value of {t} is a list with one entry per client, got {type(value).__name__}"
        if clients[0] is None:
            clients[0] = len(value)
        elif len(value) != clients[0]:
            return f"{path}: expected {clients[0]} clients, got {len(value)}"
        if t.all_equal and any(not _equal(value[0], v) for v in value[1:]):
            return f"{path}: the members of {t} must all be equal; they differ"
        for i, v in enumerate(value):
            problem = _mismatch(v, t.member, clients, f"{path}[client {i}]")
            if problem:
                return problem
        return None
    if isinstance(t, FunctionType):
        return None if callable(value) else f"{path}: expected a function {t}, got {type(value).__name__}"
    return f"{path}: unknown type {t!r}"
