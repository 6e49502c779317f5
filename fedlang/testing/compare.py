"""Comparing fedlang values: equal up to float rounding, and where they differ when not."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlang.ir.values import Struct

__all__ = ["DEFAULT_TOLERANCE", "assert_close", "first_difference", "show"]

#: (rtol, atol) by float dtype when none is given: a few units of rounding after a sum of many terms.
DEFAULT_TOLERANCE = {"float16": (5e-3, 5e-3), "float32": (1e-5, 1e-5), "float64": (1e-9, 1e-9)}


def first_difference(expected: Any, got: Any, rtol: float | None = None, atol: float | None = None,
                     path: str = "result") -> str | None:
    """None when `got` equals `expected` up to float rounding, else where and how they differ.

    Same structure (Struct field names, list lengths), same dtype and shape; floats equal
    to `rtol`/`atol` (by default per dtype, DEFAULT_TOLERANCE), NaN equals NaN; everything
    else exactly. Python numbers compare as NumPy arrays of their natural dtype, except that
    a Python float gets float32's default tolerance (a computation of `fedlang.load` returns
    its float32 scalars as Python floats)."""
    if isinstance(expected, Struct) or isinstance(got, Struct):
        if not (isinstance(expected, Struct) and isinstance(got, Struct)):
            return f"{path}: {_kind(expected)} vs {_kind(got)}"
        if expected.names != got.names:
            return f"{path}: the fields {list(expected.names)} vs {list(got.names)}"
        for i, (n, a, b) in enumerate(zip(expected.names, expected.values, got.values)):
            found = first_difference(a, b, rtol, atol, f"{path}.{n}" if n is not None else f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(expected, (list, tuple)) or isinstance(got, (list, tuple)):
        if not (isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple))):
            return f"{path}: {_kind(expected)} vs {_kind(got)}"
        if len(expected) != len(got):
            return f"{path}: a list of {len(expected)} vs a list of {len(got)}"
        for i, (a, b) in enumerate(zip(expected, got)):
            found = first_difference(a, b, rtol, atol, f"{path}[{i}]")
            if found:
                return found
        return None
    if callable(expected) or callable(got):
        return None if callable(expected) and callable(got) else f"{path}: {_kind(expected)} vs {_kind(got)}"
    python_float = type(expected) is float or type(got) is float
    a, b = np.asarray(expected), np.asarray(got)
    if a.dtype != b.dtype and not (a.dtype.kind == b.dtype.kind == "U"):
        return f"{path}: dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"{path}: shape {list(a.shape)} vs {list(b.shape)}"
    if a.dtype.kind in "fc":
        # Python floats are what fedlang.load's computations return for float32 scalars too.
        r, t = DEFAULT_TOLERANCE.get("float32" if python_float else a.dtype.name, (1e-5, 1e-5))
        r = r if rtol is None else rtol
        t = t if atol is None else atol
        bad = ~np.isclose(a, b, rtol=r, atol=t, equal_nan=True)
        tolerance = f" (rtol={r:g}, atol={t:g})"
    else:
        bad = a != b
        tolerance = ""
    bad = np.asarray(bad)
    if not bad.any():
        return None
    if a.ndim == 0:
        return f"{path}: {a.item()!r} vs {b.item()!r}{tolerance}"
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"{path}[{', '.join(map(str, index))}]"
    return (f"{where}: {a[index].item()!r} vs {b[index].item()!r}{tolerance}; "
            f"{int(bad.sum())} of {bad.size} elements differ")


def _kind(v: Any) -> str:
    if isinstance(v, Struct):
        return f"a struct of {len(v)} fields"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)}"
    if callable(v):
        return "a function"
    a = np.asarray(v)
    return f"a {a.dtype} tensor of shape {list(a.shape)}"


def show(value: Any, limit: int = 2000) -> str:
    """`repr` of a value with long arrays elided and the whole cut at `limit` characters."""
    with np.printoptions(threshold=24, edgeitems=3, precision=7):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def assert_close(got: Any, expected: Any, rtol: float | None = None, atol: float | None = None,
                 message: str = "") -> None:
    """Raise AssertionError, saying where, unless `got` equals `expected` up to float rounding
    (`first_difference`)."""
    found = first_difference(expected, got, rtol, atol, "value")
    if found:
        head = f"{message}\n" if message else ""
        raise AssertionError(f"{head}values differ (expected vs got) at {found}\n"
                             f"  expected: {show(expected)}\n  got:      {show(got)}")
