"""Abstract values: what the checker knows about an expression.

An `AVal` is a type plus two facts the type notation does not carry:
  * `weak`: the value is built from numeric literals only, so its dtype adapts
    to the tensor it meets (LANGUAGE.md section 1: `x * 2.0` keeps x's dtype);
  * `arity`: the declared parameter names of a function value, so calls can
    use keywords and `grad` knows which parameter is the first one.
`UNKNOWN` stands for the type of an expression that already has an error; it
is accepted everywhere so one mistake is reported once.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlang.ir.types import (FLOAT_DTYPES, FederatedType, FunctionType, StructType, TensorType, Type,
                              is_assignable)


class _Unknown:
    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __str__(self) -> str:
        return "<unknown>"


UNKNOWN = _Unknown()


@dataclass(frozen=True, slots=True)
class AVal:
    type: Type | _Unknown
    weak: str | None = None                  # "int" | "float" for literal-only scalars
    arity: tuple[str, ...] | None = None     # parameter names of a function value
    federated_function: bool = False         # a `comp` (may only be called from a comp)

    @property
    def unknown(self) -> bool:
        return self.type is UNKNOWN

    def __str__(self) -> str:
        return str(self.type)


UNKNOWN_AVAL = AVal(UNKNOWN)


def strong(aval: AVal) -> AVal:
    """Forget weakness: a literal on its own is int32 or float32."""
    return AVal(aval.type, None, aval.arity, aval.federated_function) if aval.weak else aval


def weak_scalar(kind: str) -> AVal:
    return AVal(TensorType("float32" if kind == "float" else "int32"), weak=kind)


def accepts(expected: Type | _Unknown, aval: AVal) -> bool:
    """Whether `aval` may be passed where `expected` is required."""
    if expected is UNKNOWN or aval.unknown:
        return True
    if aval.weak and isinstance(expected, TensorType) and expected.shape == ():
        if aval.weak == "float":
            return expected.dtype in FLOAT_DTYPES
        return expected.dtype not in ("bool", "string")
    return is_assignable(expected, aval.type)


def function_parameters(fn: AVal) -> tuple[Type, ...] | None:
    """The parameters of a function value as a tuple (one per declared param).

    A function declared with several parameters takes a struct; one declared
    with a single parameter takes it whole, even when it is a struct.
    """
    t = fn.type
    if not isinstance(t, FunctionType):
        return None
    if t.parameter is None:
        return ()
    if fn.arity is not None and len(fn.arity) != 1 and isinstance(t.parameter, StructType):
        return t.parameter.types
    return (t.parameter,)


def parameters_for(fn: AVal, n: int) -> tuple[Type, ...] | None:
    """The parameters a call with `n` arguments fills: the declared ones, or the
    fields of a single struct parameter (TFF's auto-unpacking), or None."""
    params = function_parameters(fn)
    if params is None:
        return None
    if len(params) == n:
        return params
    if len(params) == 1 and n > 1 and isinstance(params[0], StructType) and len(params[0].fields) == n:
        return params[0].types
    return None


def describe(t: Type | _Unknown) -> str:
    """A short phrase for messages: 'float32@SERVER', 'a function (x -> y)'."""
    if isinstance(t, FunctionType):
        return f"a function {t}"
    return str(t)


def placement_word(t: Type) -> str:
    if isinstance(t, FederatedType):
        return f"at {t.placement}"
    return "unplaced"
