"""Runtime values of the reference interpreter (plain NumPy and Python).

  tensor                   numpy.ndarray of the exact dtype (0-d for scalars)
  struct                   Struct: ordered (name or None, value) pairs
  sequence                 list of element values
  {T}@CLIENTS, T@CLIENTS   list with one member value per client
  T@SERVER                 the member value itself
  function                 a Python callable (a Closure over an IR function)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from fedlang.ir.lazy_numpy import np

from fedlang.ir.types import (FederatedType, FunctionType, Placement, SequenceType, StructType, TensorType, Type)


class Struct:
    """An ordered struct value; fields are reached by position or by name."""

    __slots__ = ("names", "values")

    def __init__(self, values: Iterable[Any], names: Iterable[str | None] | None = None):
        self.values = tuple(values)
        self.names = tuple(names) if names is not None else (None,) * len(self.values)
        if len(self.names) != len(self.values):
            raise ValueError("a struct needs one name (or None) per value")

    @classmethod
    def of(cls, **fields: Any) -> "Struct":
        return cls(fields.values(), fields.keys())

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return self.values[self.names.index(key)]
        return self.values[key]

    def __getattr__(self, name: str) -> Any:
        try:
            names = object.__getattribute__(self, "names")
            return object.__getattribute__(self, "values")[names.index(name)]
        except ValueError:
            raise AttributeError(name) from None

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values)

    def items(self):
        return zip(self.names, self.values)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Struct) and self.names == other.names
                and all(_equal(a, b) for a, b in zip(self.values, other.values)))

    def __repr__(self) -> str:
        inner = ", ".join(repr(v) if n is None else f"{n}={v!r}" for n, v in self.items())
        return f"Struct({inner})"


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def leafwise(fn: Callable[..., Any], *values: Any) -> Any:
    """Apply `fn` to tensors, leaf by leaf through structs (tensors broadcast over leaves)."""
    structs = [v for v in values if isinstance(v, Struct)]
    if not structs:
        return fn(*values)
    first = structs[0]
    return Struct((leafwise(fn, *(v[i] if isinstance(v, Struct) else v for v in values))
                   for i in range(len(first))), first.names)


def tensor(value: Any, dtype: str) -> np.ndarray:
    return np.asarray(value, dtype=np.dtype(dtype) if dtype != "string" else np.str_)


def conform(value: Any, t: Type, what: str = "value") -> Any:
    """Convert a Python value to the runtime value of type `t`, or raise TypeError.

    Used by the Python API: `prog.mean_temperature([20.0, 22.5, 19.0])`."""
    if isinstance(t, TensorType):
        if isinstance(value, (list, tuple)) and t.rank == 0:
            raise TypeError(f"{what}: expected a scalar {t}, got a sequence")
        try:
            array = tensor(value, t.dtype)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{what}: cannot convert {value!r} to {t}: {error}") from None
        if array.ndim != t.rank or any(d is not None and d != s for d, s in zip(t.shape, array.shape)):
            raise TypeError(f"{what}: expected shape {t}, got shape {list(array.shape)}")
        return array
    if isinstance(t, StructType):
        if isinstance(value, Struct):
            items = list(value.values)
        elif isinstance(value, dict):
            missing = [n for n in t.names if n not in value]
            if missing or None in t.names:
                raise TypeError(f"{what}: expected {t}, got the keys {sorted(value)}")
            items = [value[n] for n in t.names]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise TypeError(f"{what}: expected a struct {t}, got {type(value).__name__}")
        if len(items) != len(t.fields):
            raise TypeError(f"{what}: expected {len(t.fields)} fields for {t}, got {len(items)}")
        return Struct((conform(v, ft, f"{what}.{n or i}") for i, ((n, ft), v) in enumerate(zip(t.fields, items))),
                      t.names)
    if isinstance(t, SequenceType):
        return [conform(v, t.element, f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(t, FederatedType):
        if t.placement is Placement.SERVER:
            return conform(value, t.member, what)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{what}: a value at CLIENTS is a list with one entry per client")
        return [conform(v, t.member, f"{what}[client {i}]") for i, v in enumerate(value)]
    if isinstance(t, FunctionType):
        if not callable(value):
            raise TypeError(f"{what}: expected a function {t}")
        return value
    raise TypeError(f"unknown type {t!r}")


def to_python(value: Any) -> Any:
    """Runtime value -> plain Python: 0-d arrays become numbers, structs stay Structs."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, Struct):
        return Struct((to_python(v) for v in value.values), value.names)
    if isinstance(value, list):
        return [to_python(v) for v in value]
    return value
