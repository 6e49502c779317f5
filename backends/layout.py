"""How a value of a fedlang type travels as a flat list of arrays (a phase's signature).

A plan's phases are TensorFlow functions of flat tensor lists; the runtime
holds interpreter values (fedlang.ir.values). One layout, derived from the
type alone, maps between them, on the NumPy side here and on the TensorFlow
side in fedlang.backends.tensorflow.lower:

  tensor T[d..]   one slot T[d..] (`?` -> any size)
  struct          the slots of its fields, in order
  sequence E*     a length slot int32[], then per leaf of E either
                    stacked: one slot [steps, d..]                  (dense)
                    flat:    values [rows, d..] + splits int32[steps+1]
                  flat is used for leaves with a leading `?` when `ragged`
                  (unbatched phases, whose batches may differ in size, e.g. a
                  short last batch); vectorized phases are dense

Functions have no layout: a phase never takes or returns one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from fedlang.ir.types import FunctionType, SequenceType, StructType, TensorType, Type, leaves
from fedlang.ir.values import Struct


class LayoutError(Exception):
    """A type that has no flat layout (a function value in a phase signature)."""


@dataclass(frozen=True)
class Slot:
    """One flat array: its dtype, its shape (None: any size) and what it holds."""

    dtype: str
    shape: tuple[int | None, ...]
    role: str = "tensor"          # tensor | length | stacked | values | splits

    def to_json(self) -> list:
        return [self.dtype, list(self.shape), self.role]

    @classmethod
    def from_json(cls, data: list) -> "Slot":
        dtype, shape, role = data
        return cls(str(dtype), tuple(None if d is None else int(d) for d in shape), str(role))


class StackedSequence(list):
    """A sequence whose element leaves are already stacked along the step axis (`leaves`,
    in the element's leaf order): the dense layout without another copy. As a list it
    holds nothing; only `flatten` reads it."""

    def __init__(self, steps: int, leaves_: list):
        super().__init__()
        self.steps, self.leaves = steps, leaves_


def is_flat_leaf(t: TensorType, ragged: bool) -> bool:
    return ragged and t.rank >= 1 and t.shape[0] is None


def slots(t: Type, ragged: bool) -> list[Slot]:
    """The flat slots of a value of type `t`."""
    if isinstance(t, TensorType):
        return [Slot(t.dtype, t.shape)]
    if isinstance(t, StructType):
        return [s for _, f in t.fields for s in slots(f, ragged)]
    if isinstance(t, SequenceType):
        out = [Slot("int32", (), "length")]
        for leaf in leaves(t.element):
            if is_flat_leaf(leaf, ragged):
                out += [Slot(leaf.dtype, leaf.shape, "values"), Slot("int32", (None,), "splits")]
            else:
                out.append(Slot(leaf.dtype, (None,) + leaf.shape, "stacked"))
        return out
    if isinstance(t, FunctionType):
        raise LayoutError(f"a function value ({t}) cannot cross a phase boundary")
    raise LayoutError(f"no layout for {t}")


def _np_dtype(dtype: str):
    return np.str_ if dtype == "string" else np.dtype(dtype)


def _empty(t: TensorType, lead: tuple[int, ...] = ()) -> np.ndarray:
    return np.zeros(lead + tuple(0 if d is None else d for d in t.shape), _np_dtype(t.dtype))


def flatten(value: Any, t: Type, ragged: bool, out: list | None = None) -> list:
    """Interpreter value of type `t` -> its flat arrays (appended to `out`)."""
    out = [] if out is None else out
    if isinstance(t, TensorType):
        out.append(np.asarray(value, _np_dtype(t.dtype)))
    elif isinstance(t, StructType):
        for k, (_, f) in enumerate(t.fields):
            flatten(value[k], f, ragged, out)
    elif isinstance(t, SequenceType) and isinstance(value, StackedSequence) and \
            not any(is_flat_leaf(leaf, ragged) for leaf in leaves(t.element)):
        out.append(np.asarray(value.steps, np.int32))
        out.extend(value.leaves)
    elif isinstance(t, SequenceType):
        steps = list(value)
        out.append(np.asarray(len(steps), np.int32))
        columns = [list(leaf_values(e, t.element)) for e in steps]
        for k, leaf in enumerate(leaves(t.element)):
            column = [np.asarray(c[k], _np_dtype(leaf.dtype)) for c in columns]
            if is_flat_leaf(leaf, ragged):
                sizes = [c.shape[0] for c in column]
                out.append(np.concatenate(column) if column else _empty(leaf))
                out.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32))
            else:
                out.append(np.stack(column) if column else _empty(leaf, (0,)))
    else:
        raise LayoutError(f"no layout for {t}")
    return out


def leaf_values(value: Any, t: Type) -> Iterator[Any]:
    """The tensors of a value of type `t`, in leaf order."""
    if isinstance(t, StructType):
        for k, (_, f) in enumerate(t.fields):
            yield from leaf_values(value[k], f)
    else:
        yield value


def unflatten(arrays: Iterator[np.ndarray], t: Type, ragged: bool) -> Any:
    """The inverse of `flatten`: consumes arrays from the iterator."""
    if isinstance(t, TensorType):
        return np.asarray(next(arrays))
    if isinstance(t, StructType):
        return Struct((unflatten(arrays, f, ragged) for _, f in t.fields), t.names)
    if isinstance(t, SequenceType):
        n = int(next(arrays))
        columns = []
        for leaf in leaves(t.element):
            if is_flat_leaf(leaf, ragged):
                values, splits = next(arrays), next(arrays)
                columns.append([values[splits[i]:splits[i + 1]] for i in range(n)])
            else:
                stacked = next(arrays)
                columns.append([stacked[i] for i in range(n)])
        return [_build(t.element, iter([c[i] for c in columns])) for i in range(n)]
    raise LayoutError(f"no layout for {t}")


def _build(t: Type, parts: Iterator[Any]) -> Any:
    if isinstance(t, StructType):
        return Struct((_build(f, parts) for _, f in t.fields), t.names)
    return np.asarray(next(parts))


def flatten_all(values: Sequence[Any], types: Sequence[Type], ragged: bool) -> list:
    out: list = []
    for v, t in zip(values, types):
        flatten(v, t, ragged, out)
    return out


def unflatten_all(arrays: Sequence[np.ndarray], types: Sequence[Type], ragged: bool) -> list:
    it = iter(arrays)
    values = [unflatten(it, t, ragged) for t in types]
    if next(it, None) is not None:
        raise LayoutError("more arrays than the layout has slots")
    return values
