"""Hypothesis strategies for fedlang.

* `types()` draws any valid type (LANGUAGE.md section 2), so properties of the
  printer, the parser and assignability are tested on every shape, not on the
  few a person thinks of; `supertypes(t)` / `subtypes(t)` draw types related to
  `t` by assignability, so transitivity and variance are exercised, not vacuous.
* `programs()` draws well-typed programs built from the typing rules, together
  with the type the checker must infer for every declaration and every `let`:
  a type-directed generator ("an expression of type T in this scope") that
  knows each builtin and intrinsic rule of sections 4-6.
* `ill_placed(program)` breaks exactly one placement rule of such a program
  and says which diagnostic (code and span) the checker must give for it.
* `values(t)` / `arguments(comp)` (from fedlang.testing.generate, re-exported
  here) draw values of a type and argument lists of a computation.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple

from hypothesis import strategies as st

from fedlang.ir.types import (DTYPES, FLOAT_DTYPES, INTEGER_DTYPES, NUMERIC_DTYPES, FederatedType, FunctionType,
                              Placement, SequenceType, StructType, TensorType, Type, is_assignable, is_placed, walk)
from fedlang.ir.primitives import CALLABLE
from fedlang.syntax.parser import KEYWORDS

CLIENTS, SERVER = Placement.CLIENTS, Placement.SERVER
_RESERVED = frozenset(KEYWORDS) | frozenset(DTYPES)

__all__ = ["GeneratedProgram", "IllPlaced", "arguments", "ill_placed", "names", "programs", "subtypes",
           "supertypes", "types", "values"]


# ---- names and types ----------------------------------------------------------------------

def names() -> st.SearchStrategy[str]:
    """Identifiers usable as names and field names: never a keyword or a dtype."""
    return st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(lambda s: s not in _RESERVED)


_DIMS = st.one_of(st.none(), st.integers(0, 8), st.integers(0, 2 ** 40))


def _tensor_types(max_dim: int | None = None) -> st.SearchStrategy[TensorType]:
    dims = _DIMS if max_dim is None else st.one_of(st.none(), st.integers(0, max_dim))
    return st.builds(TensorType, st.sampled_from(DTYPES), st.lists(dims, max_size=3).map(tuple))


def _unique_names(fields: list[tuple[str | None, Type]]) -> StructType:
    seen: set[str] = set()
    out = []
    for n, t in fields:
        if n is not None and n in seen:
            n = None
        if n is not None:
            seen.add(n)
        out.append((n, t))
    return StructType(tuple(out))


def _structs(fields: st.SearchStrategy[Type]) -> st.SearchStrategy[StructType]:
    return st.lists(st.tuples(st.none() | names(), fields), max_size=4).map(_unique_names)


def _federated(members: st.SearchStrategy[Type]) -> st.SearchStrategy[FederatedType]:
    def build(member: Type, placement: Placement, all_equal: bool) -> FederatedType:
        return FederatedType(member, placement, all_equal or placement is SERVER)
    return st.builds(build, members, st.sampled_from(Placement), st.booleans())


_TYPE_CACHE: dict = {}


def _type(depth: int, placed: bool, functions: bool, role: str,
          max_dim: int | None = None) -> st.SearchStrategy[Type]:
    """role: "any" (function and federated types as the flags allow), "data"
    (what may be placed: tensors, structs, sequences), "elem" (what a
    sequence may hold).

    A sequence never holds a sequence (TFF's rule)."""
    key = (depth, placed, functions, role, max_dim)
    if key not in _TYPE_CACHE:
        tensor = _tensor_types(max_dim)
        if depth <= 0:
            strategy = tensor
        else:
            elem = _type(depth - 1, placed, functions, "elem", max_dim)
            if role == "any":
                inner = _type(depth - 1, placed, functions, "any", max_dim)
                options = [tensor, _structs(inner), elem.map(SequenceType)]
                if functions:
                    options.append(st.builds(FunctionType, st.none() | inner, inner))
                if placed:
                    options.append(_federated(_type(depth - 1, placed, functions, "data", max_dim)))
            elif role == "data":
                options = [tensor, _structs(_type(depth - 1, placed, functions, "data", max_dim)),
                           elem.map(SequenceType)]
            else:
                options = [tensor, _structs(elem)]
            strategy = st.one_of(options)
        _TYPE_CACHE[key] = strategy
    return _TYPE_CACHE[key]


def types(max_depth: int = 3, placed: bool = True, functions: bool = True,
          max_dim: int | None = None) -> st.SearchStrategy[Type]:
    """Random valid fedlang types, up to `max_depth` constructors deep.

    Construction rules hold by design (no federated type inside a federated
    type or a sequence, no placed function, SERVER always all-equal, unique
    field names), so every drawn value is a type a program could write.
    `placed=False` leaves out federated types, `functions=False` function
    types; with both False the result can always be placed (`{T}@CLIENTS`).
    Known dimensions are small (0..8) or huge (up to 2**40, a type is only
    text); `max_dim` bounds them, for types whose values will be built
    (`values(t)`)."""
    return _type(max_depth, placed, functions, "any", max_dim)


def supertypes(t: Type) -> st.SearchStrategy[Type]:
    """Types `u` with `is_assignable(u, t)`: known dims forgotten (`?`),
    unnamed fields named, `T@CLIENTS` widened to `{T}@CLIENTS`, function
    parameters narrowed (contravariance). Chains of these exercise transitivity."""
    return _related(t, wider=True)


def subtypes(t: Type) -> st.SearchStrategy[Type]:
    """Types `u` with `is_assignable(t, u)`: the mirror image of `supertypes`."""
    return _related(t, wider=False)


@st.composite
def _related(draw, t: Type, wider: bool) -> Type:
    return _widen(draw, t) if wider else _narrow(draw, t)


def _widen(draw, t: Type) -> Type:
    if isinstance(t, TensorType):
        return TensorType(t.dtype, tuple(None if d is None or draw(st.booleans()) else d for d in t.shape))
    if isinstance(t, StructType):
        used = {n for n in t.names if n is not None}
        fields = []
        for n, f in t.fields:
            if n is None and draw(st.booleans()):
                candidate = draw(names())
                if candidate not in used:
                    n = candidate
                    used.add(n)
            fields.append((n, _widen(draw, f)))
        return StructType(tuple(fields))
    if isinstance(t, SequenceType):
        return SequenceType(_widen(draw, t.element))
    if isinstance(t, FunctionType):
        return FunctionType(None if t.parameter is None else _narrow(draw, t.parameter), _widen(draw, t.result))
    if isinstance(t, FederatedType):
        all_equal = t.all_equal
        if t.placement is CLIENTS and all_equal and draw(st.booleans()):
            all_equal = False
        return FederatedType(_widen(draw, t.member), t.placement, all_equal)
    raise TypeError(t)


def _narrow(draw, t: Type) -> Type:
    if isinstance(t, TensorType):
        return TensorType(t.dtype, tuple(draw(st.integers(0, 8)) if d is None and draw(st.booleans()) else d
                                         for d in t.shape))
    if isinstance(t, StructType):
        return StructType(tuple((None if n is not None and draw(st.booleans()) else n, _narrow(draw, f))
                                for n, f in t.fields))
    if isinstance(t, SequenceType):
        return SequenceType(_narrow(draw, t.element))
    if isinstance(t, FunctionType):
        return FunctionType(None if t.parameter is None else _widen(draw, t.parameter), _narrow(draw, t.result))
    if isinstance(t, FederatedType):
        all_equal = t.all_equal or (t.placement is CLIENTS and draw(st.booleans()))
        return FederatedType(_narrow(draw, t.member), t.placement, all_equal)
    raise TypeError(t)


# ---- type predicates used by the program generator ----------------------------------------------

def _leaf_dtypes(t: Type) -> set[str] | None:
    """The dtypes of a tensor or a struct of tensors; None for anything else."""
    if isinstance(t, TensorType):
        return {t.dtype}
    if isinstance(t, StructType):
        out: set[str] = set()
        for _, f in t.fields:
            sub = _leaf_dtypes(f)
            if sub is None:
                return None
            out |= sub
        return out
    return None


def _all_in(t: Type, dtypes) -> bool:
    ds = _leaf_dtypes(t)
    return ds is not None and ds <= dtypes


def _constructible(t: Type, local: bool) -> bool:
    """Whether an expression of exactly `t` can be built from nothing."""
    if isinstance(t, TensorType):
        return None not in t.shape and t.dtype != "string"
    if isinstance(t, StructType):
        return all(_constructible(f, local) for _, f in t.fields)
    if isinstance(t, FunctionType):
        return not ((t.parameter is not None and is_placed(t.parameter)) or is_placed(t.result)) \
            and _constructible(t.result, True)
    if isinstance(t, FederatedType):
        return not local and _constructible(t.member, True)
    return False


def _max_refine(t: Type) -> Type:
    if isinstance(t, TensorType):
        return TensorType(t.dtype, tuple(1 if d is None else d for d in t.shape))
    if isinstance(t, StructType):
        return StructType(tuple((n, _max_refine(f)) for n, f in t.fields))
    if isinstance(t, FederatedType):
        return FederatedType(_max_refine(t.member), t.placement, t.all_equal)
    return t


def _match(mode: str, target: Type, t: Type) -> bool:
    return t == target if mode == "exact" else is_assignable(target, t)


def _param_type(params) -> Type | None:
    if not params:
        return None
    if len(params) == 1:
        return params[0][1]
    return StructType(tuple(params))


def _arg_types(t: FunctionType, nparams: int | None) -> list[Type]:
    """What a call of a function value passes, one type per argument."""
    if t.parameter is None:
        return []
    if nparams is not None and nparams > 1 and isinstance(t.parameter, StructType):
        return list(t.parameter.types)
    return [t.parameter]


# ---- the program generator ----------------------------------------------------------------------

@dataclass(frozen=True)
class _E:
    """A generated expression and the type the checker infers for it."""

    text: str
    type: Type
    atom: bool = True            # usable as an operand, callee or selection base without parentheses
    nparams: int | None = None   # declared parameter count, for function values
    weak: bool = False           # a weak literal (or a let of one) standing where another dtype is required


class _Var(NamedTuple):
    name: str
    type: Type
    nparams: int | None = None
    weak: str | None = None      # "int" / "float": a let bound to a bare literal keeps its weakness


@dataclass(frozen=True)
class _Fn:
    name: str
    params: tuple[tuple[str, Type], ...]
    result: Type
    federated: bool

    @property
    def type(self) -> FunctionType:
        return FunctionType(_param_type(self.params), self.result)


class _Env:
    """Names in scope. `local`: inside an fn or a lambda (no intrinsics, nothing placed)."""

    def __init__(self, vars=(), local: bool = True):
        self.vars: tuple[_Var, ...] = tuple(vars)
        self.local = local
        self._paths: list[_Var] | None = None
        self.avail_cache: dict = {}

    def extend(self, *vs: _Var) -> "_Env":
        return _Env(self.vars + tuple(vs), self.local)

    def unplaced(self) -> "_Env":
        return _Env([v for v in self.vars if not is_placed(v.type)], True)

    def paths(self) -> list[_Var]:
        if self._paths is None:
            self._paths = []
            for v in self.vars:
                self._paths.append(v)
                self._paths += list(_paths_of(v.name, v.type, v.nparams, 2))[1:]
        return self._paths


def _paths_of(text: str, t: Type, nparams: int | None, depth: int):
    yield _Var(text, t, nparams)
    if depth == 0:
        return
    struct, fed = (t.member, t) if isinstance(t, FederatedType) else (t, None)
    if isinstance(struct, StructType):
        for i, (n, f) in enumerate(struct.fields):
            ft = FederatedType(f, fed.placement, fed.all_equal) if fed is not None else f
            if n is not None:
                yield from _paths_of(f"{text}.{n}", ft, None, depth - 1)
            yield from _paths_of(f"{text}[{i}]", ft, None, depth - 1)


@dataclass(frozen=True)
class _Site:
    kind: str                    # ret | map | bcast | fnbody | ann
    regions: tuple               # marker ids, then (start, end) offsets once resolved
    info: tuple = ()


_MARK = re.compile("\ue000(\\d+)\ue001|\ue002(\\d+)\ue001")
_FIELD_NAMES = ("a", "b", "w", "x", "y", "n", "loss", "state", "metrics", "mean", "sum", "count", "acc", "b1", "w1")
_ALIAS_NAMES = ("Batch", "Model", "State", "Point", "Pair", "Stats", "Weights")
_FLOAT_LITS = ("0.5", "2.0", "0.1", "1.5", "3.25", "1e-3", "2.5E+1", "10.0")
_INT_LITS = ("0", "1", "2", "3", "7", "42")


class _Builder:
    """Draws one program; every method that writes an expression returns the
    type the checker must infer for it (see `_E`)."""

    def __init__(self, draw, max_decls: int, max_depth: int, max_lets: int, process: bool):
        self.draw, self.max_decls, self.max_depth, self.max_lets = draw, max_decls, max_depth, max_lets
        self.want_process = process
        self.ids = itertools.count()
        self.marks = itertools.count()
        self.sites: list[_Site] = []
        self.fns: list[_Fn] = []
        self.alias_decls: list[str] = []
        self.alias_by_type: dict[Type, list[str]] = {}
        self.decls: list[str] = []
        self.decl_types: dict[str, Type] = {}
        self.let_types: dict[tuple[str, str], Type] = {}
        self.spaced = False

    # -- drawing helpers (all shrink towards the first / the simplest choice)
    def int(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def pick(self, seq):
        seq = list(seq)
        return seq[self.int(0, len(seq) - 1)]

    def chance(self, percent: int) -> bool:
        return self.int(0, 99) >= 100 - percent

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids)}"

    def mark(self, text: str) -> tuple[int, str]:
        i = next(self.marks)
        return i, f"\ue000{i}\ue001{text}\ue002{i}\ue001"

    # -- types
    def dtype(self, numeric: bool = False, floating: bool = False) -> str:
        if floating:
            return self.pick(("float32", "float64", "float32"))
        if numeric:
            return self.pick(("float32", "int32", "float64", "int64", "float32", "int32"))
        return self.pick(("float32", "int32", "float64", "int64", "bool", "float32"))

    def dim(self, known: bool) -> int | None:
        return self.pick((1, 2, 3, 4) if known else (1, 2, 3, 4, None, None))

    def tensor_type(self, known: bool = True, numeric: bool = False, floating: bool = False,
                    max_rank: int = 2) -> TensorType:
        dtype = self.dtype(numeric, floating)
        return TensorType(dtype, tuple(self.dim(known) for _ in range(self.int(0, max_rank))))

    def struct_of(self, make: Callable[[], Type], lo: int = 1, hi: int = 3) -> StructType:
        fields, used = [], set()
        for _ in range(self.int(lo, hi)):
            n = self.pick(_FIELD_NAMES)
            if n in used or self.chance(15):
                n = None
            else:
                used.add(n)
            fields.append((n, make()))
        return StructType(tuple(fields))

    def value_type(self, depth: int = 2, known: bool = True, seq: bool = False, fn: bool = False,
                   numeric: bool = False, floating: bool = False) -> Type:
        r = self.int(0, 19)
        if r < 12 or depth <= 0:
            return self.tensor_type(known, numeric, floating)
        if r < 17 or not (seq or fn):
            return self.struct_of(lambda: self.value_type(depth - 1, known, seq, False, numeric, floating))
        if r < 19 or not fn:
            return SequenceType(self.elem_type())
        return FunctionType(self.tensor_type(known, numeric=True) if self.chance(80) else None,
                            self.tensor_type(True, numeric=True))

    def elem_type(self) -> Type:
        """An element of a client dataset: a batch of examples (leading dim unknown)."""
        def column() -> TensorType:
            return TensorType(self.dtype(numeric=True), (None,) + tuple(self.dim(True) for _ in range(self.int(0, 1))))
        if self.chance(50):
            return self.struct_of(column, 1, 2)
        return column()

    def render(self, t: Type) -> str:
        """A type annotation for `t`, using aliases for some parts."""
        aliases = self.alias_by_type.get(t)
        if aliases and self.chance(60):
            return self.pick(aliases)
        comma = ", " if self.spaced else ","
        if isinstance(t, TensorType):
            return str(t)
        if isinstance(t, StructType):
            return "<" + comma.join(self.render(f) if n is None else f"{n}={self.render(f)}" for n, f in t.fields) + ">"
        if isinstance(t, SequenceType):
            return f"{self.render(t.element)}*"
        if isinstance(t, FunctionType):
            return f"({'' if t.parameter is None else self.render(t.parameter)} -> {self.render(t.result)})"
        if isinstance(t, FederatedType):
            member = self.render(t.member)
            return f"{member}@{t.placement}" if t.all_equal else f"{{{member}}}@{t.placement}"
        raise TypeError(t)

    def maybe_alias(self, t: Type) -> None:
        if not isinstance(t, (StructType, FederatedType, SequenceType)) or t in self.alias_by_type:
            return
        if not self.chance(30):
            return
        name = self.fresh(self.pick(_ALIAS_NAMES))
        text = self.render(t)
        if isinstance(t, FederatedType):
            i, text = self.mark(text)
            self.sites.append(_Site("ann", (i,), (t,)))
        self.alias_decls.append(f"type {name} = {text}")
        self.alias_by_type.setdefault(t, []).append(name)
        self.decl_types[name] = t

    # -- availability: can an expression of type t (mode) be written in env?
    def values(self, env: _Env) -> list[_Var]:
        return env.paths() + [_Var(f.name, f.type, len(f.params)) for f in self.fns if not f.federated]

    def avail(self, t: Type, env: _Env, mode: str) -> bool:
        key = (t, mode)
        if key in env.avail_cache:
            return env.avail_cache[key]
        env.avail_cache[key] = False          # no infinite regress through recursive types
        result = self._avail(t, env, mode)
        env.avail_cache[key] = result
        return result

    def _avail(self, t: Type, env: _Env, mode: str) -> bool:
        if any(_match(mode, t, v.type) for v in self.values(env)):
            return True
        if _constructible(t if mode == "exact" else _max_refine(t), env.local):
            return True
        sub = "exact" if mode == "exact" else "assign"
        if isinstance(t, StructType):
            return all(self.avail(f, env, sub) for _, f in t.fields)
        if isinstance(t, FunctionType):
            if (t.parameter is not None and is_placed(t.parameter)) or is_placed(t.result):
                return False
            inner = env.unplaced()
            if t.parameter is not None:
                inner = inner.extend(_Var("q", t.parameter))
            return self.avail(t.result, inner, sub)
        if isinstance(t, FederatedType):
            if env.local:
                return False
            if self.avail(t.member, env.unplaced(), sub):
                return True
            if t.placement is SERVER and _all_in(t.member, NUMERIC_DTYPES):
                return any(isinstance(v.type, FederatedType) and v.type.placement is CLIENTS
                           and _match(sub, t.member, v.type.member) for v in env.paths())
        return False

    # -- expressions
    def gen(self, t: Type, env: _Env, mode: str, depth: int) -> _E:
        """An expression whose inferred type is `t` (exact), assignable to `t`
        (assign), accepted where `t` is required (accept: weak scalar literals
        too), or accepted where `t` is the declared type of an argument, a
        result or an initial value (expect: struct literals of literals also
        take `t`'s dtypes, docs/language.md "Weak literals")."""
        candidates = self.candidates(t, env, mode, depth)
        if not candidates:
            raise AssertionError(f"fedlang.testing: no way to write {t} ({mode}) with "
                                 f"{[(v.name, str(v.type)) for v in env.vars]}")
        e = self.pick(candidates)()
        ok = _match(mode, t, e.type) or (mode in ("accept", "expect") and _weak_ok(t, e))
        if not ok:
            raise AssertionError(f"fedlang.testing: generated {e.text!r} of type {e.type} for {t} ({mode})")
        return e

    def candidates(self, t: Type, env: _Env, mode: str, depth: int) -> list[Callable[[], _E]]:
        c: list[Callable[[], _E]] = []
        paths = [v for v in self.values(env) if _match(mode, t, v.type)]
        if paths:
            c += [lambda: self.path(paths)] * 6          # names in scope are the usual operands
        if isinstance(t, TensorType) and t.shape == ():
            c += self.literal_candidates(t, mode, env)
        exact_ok = self.avail(t, env, "exact")
        if mode != "exact" and _constructible(_max_refine(t), env.local) and _max_refine(t) != t:
            c.append(lambda: self.gen(self.refine(t), env, "exact", depth))
        if exact_ok:
            if isinstance(t, TensorType):
                c += self.tensor_candidates(t, env, depth)
            elif isinstance(t, StructType):
                c += self.struct_candidates(t, env, depth)
            elif isinstance(t, SequenceType):
                c += self.sequence_candidates(t, env, depth)
            elif isinstance(t, FederatedType):
                c += self.federated_candidates(t, env, depth)
            if depth > 0:
                c += self.call_candidates(t, env, depth) * 3
                if isinstance(t, (TensorType, StructType)) and not is_placed(t):
                    c.append(lambda: self.if_expr(t, env, depth))
                    c += self.reduce_candidates(t, env, depth) * 3
        if isinstance(t, FunctionType):
            c += self.function_candidates(t, env, depth)
        if isinstance(t, StructType) and mode == "expect" and all(self.avail(f, env, "expect") for _, f in t.fields):
            c += [lambda: self.struct_literal(t, env, "expect", depth)] * 2
        elif isinstance(t, StructType) and not exact_ok and all(self.avail(f, env, "assign") for _, f in t.fields):
            c.append(lambda: self.struct_literal(t, env, "assign", depth))
        return c

    def refine(self, t: Type) -> Type:
        """A type assignable to `t` with every unknown dim made known."""
        if isinstance(t, TensorType):
            return TensorType(t.dtype, tuple(self.dim(True) if d is None else d for d in t.shape))
        if isinstance(t, StructType):
            return StructType(tuple((None if n is not None and self.chance(15) else n, self.refine(f))
                                    for n, f in t.fields))
        if isinstance(t, FederatedType):
            all_equal = t.all_equal or (t.placement is CLIENTS and self.chance(30))
            return FederatedType(self.refine(t.member), t.placement, all_equal)
        return t

    def path(self, paths: list[_Var]) -> _E:
        v = self.pick(paths)
        return _E(v.name, v.type, True, v.nparams)

    def literal_candidates(self, t: TensorType, mode: str, env: _Env) -> list[Callable[[], _E]]:
        d = t.dtype
        if d == "bool":
            return [lambda: _E(self.pick(("true", "false")), t)]
        out = []
        loose = mode in ("accept", "expect")
        if d == "int32" or (loose and d in NUMERIC_DTYPES):
            out.append(lambda: _E(self.pick(_INT_LITS), TensorType("int32")))
        if d == "float32" or (loose and d in FLOAT_DTYPES):
            out.append(lambda: _E(self.pick(_FLOAT_LITS), TensorType("float32")))
        weak = [v for v in env.vars if v.weak is not None and loose and d in NUMERIC_DTYPES
                and d != v.type.dtype and (v.weak == "int" or d in FLOAT_DTYPES)]
        if weak:
            out.append(lambda: (lambda v: _E(v.name, v.type, weak=True))(self.pick(weak)))
        return out

    def partner(self, t: TensorType, dtype: str | None = None) -> TensorType:
        """A tensor that broadcasts against `t` to `t`'s shape."""
        k = self.int(0, t.rank)
        dims = tuple(1 if d is None else self.pick((d, 1)) for d in t.shape[t.rank - k:])
        return TensorType(dtype or t.dtype, dims)

    def operand(self, e: _E) -> str:
        return e.text if e.atom else f"({e.text})"

    def shape_text(self, shape) -> str:
        return "[" + ", ".join(str(d) for d in shape) + "]"

    def tensor_candidates(self, t: TensorType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        d, known = t.dtype, None not in t.shape
        numeric, floating = d in NUMERIC_DTYPES, d in FLOAT_DTYPES
        c: list[Callable[[], _E]] = []
        if known and numeric:
            c.append(lambda: self.filled(t))
        if known and d == "bool" and t.shape:
            c.append(lambda: _E(f"zeros({self.shape_text(t.shape)}) < ones({self.shape_text(t.shape)})", t, False))
        if known and d == "float32":
            c.append(lambda: self.random_tensor(t))
        if depth <= 0:
            return c
        sub = depth - 1
        if numeric:
            c.append(lambda: self.arith(t, env, sub))
            c.append(lambda: _E("-" + self.operand(self.gen(t, env, "exact", sub)), t, False))
            c.append(lambda: self.unary_builtin(t, env, sub, ("relu", "abs", "square") +
                                                (("sigmoid", "tanh", "exp", "log", "sqrt") if floating else ())))
            c.append(lambda: self.binary_builtin(t, env, sub))
            c.append(lambda: self.clip(t, env, sub))
            c.append(lambda: _E(f"{self.pick(('zeros_like', 'ones_like'))}({self.gen(t, env, 'exact', sub).text})", t))
        if floating and t.rank >= 1:
            c.append(lambda: _E(f"{self.pick(('softmax', 'log_softmax'))}({self.gen(t, env, 'exact', sub).text})", t))
        if floating:
            c.append(lambda: _E(f"random_normal_like({self.gen(t, env, 'exact', sub).text}, 0.5, "
                                f"{self.pick(_INT_LITS)})", t))
        if known and d != "string":
            c.append(lambda: self.cast(t, env, sub))
        if known and numeric:
            c.append(lambda: self.reduction(t, env, sub))
            c.append(lambda: self.index(t, env, sub))
            c.append(lambda: self.reshape(t, env, sub))
            if 1 <= t.rank <= 2:
                c.append(lambda: self.matmul(t, env, sub))
        if known and d == "int32":
            c.append(lambda: self.argmax(t, env, sub))
        if t == TensorType("int32"):
            c.append(lambda: _E(f"size({self.gen(self.tensor_type(), env, 'exact', sub).text})", t))
            seqs = [v for v in env.paths() if isinstance(v.type, SequenceType)]
            if seqs:
                c += [lambda: _E(f"count({self.sequence(seqs, env, sub).text})", t)] * 3
            counted = [v for v in seqs if _first_leaf(v.type.element) is not None
                       and _first_leaf(v.type.element).rank > 0]
            if counted:
                c += [lambda: _E(f"num_examples({self.pick(counted).name})", t)] * 3
        if known and d == "float32" and t.rank >= 1 and t.shape[-1] >= 1:
            def one_hot() -> _E:
                labels = TensorType(self.pick(("int32", "int64")), t.shape[:-1])
                return _E(f"one_hot({self.gen(labels, env, 'exact', sub).text}, {t.shape[-1]})", t)
            c.append(one_hot)
        if known and floating:
            c.append(lambda: self.xent(t, env, sub))
        if floating and t.shape == ():
            c.append(lambda: self.global_norm(t, env, sub))
        if d == "bool":
            c.append(lambda: self.comparison(t, env, sub))
            c.append(lambda: self.logical(t, env, sub))
        if d != "string":
            c.append(lambda: self.where(t, env, sub))
        tensor_paths = [v for v in env.paths() if isinstance(v.type, TensorType) and v.type.rank >= 1
                        and v.type.dtype == d and v.type.shape[1:] == t.shape]
        if tensor_paths:
            c.append(lambda: _E(f"{self.pick(tensor_paths).name}[{self.index_text(env, sub)}]", t))
        c += self.grad_candidates(t, env, sub) * 4
        return c

    def filled(self, t: TensorType) -> _E:
        name = self.pick(("zeros", "ones"))
        dtype = "" if t.dtype == "float32" and self.chance(50) else f", {t.dtype}"
        return _E(f"{name}({self.shape_text(t.shape)}{dtype})", t)

    def random_tensor(self, t: TensorType) -> _E:
        seed = self.pick(_INT_LITS)
        if self.chance(50):
            return _E(f"random_normal({self.shape_text(t.shape)}, {self.pick(_FLOAT_LITS)}, {seed})", t)
        return _E(f"random_uniform({self.shape_text(t.shape)}, -{self.pick(_FLOAT_LITS)}, {self.pick(_FLOAT_LITS)}, "
                  f"{seed})", t)

    def literal(self, dtype: str, env: _Env | None = None) -> str:
        """A literal that takes `dtype` next to a tensor: a number, or a let bound to one."""
        if env is not None:
            weak = [v.name for v in env.vars if v.weak == "int" or (v.weak == "float" and dtype in FLOAT_DTYPES)]
            if weak and dtype in NUMERIC_DTYPES and self.chance(30):
                return self.pick(weak)
        return self._number(dtype)

    def _number(self, dtype: str) -> str:
        if dtype in FLOAT_DTYPES and self.chance(80):
            return self.pick(_FLOAT_LITS)
        return self.pick(_INT_LITS)

    def arith(self, t: TensorType, env: _Env, depth: int) -> _E:
        ops = ["+", "-", "*", "**", "%"] + (["/"] if t.dtype in FLOAT_DTYPES else [])
        op = self.pick(ops)
        a = self.gen(t, env, "exact", depth)
        if self.chance(40):
            b_text = self.literal(t.dtype, env)
        else:
            b_text = self.operand(self.gen(self.partner(t), env, "exact", depth))
        left, right = self.operand(a), b_text
        if self.chance(50):
            left, right = right, left
        if op == "/" and right in _INT_LITS and left in _INT_LITS:      # never int-literal / int-literal
            right = "2.0"
        return _E(f"{left} {op} {right}", t, False)

    def unary_builtin(self, t: Type, env: _Env, depth: int, names_) -> _E:
        return _E(f"{self.pick(names_)}({self.gen(t, env, 'exact', depth).text})", t)

    def binary_builtin(self, t: TensorType, env: _Env, depth: int) -> _E:
        a = self.gen(t, env, "exact", depth).text
        b = self.literal(t.dtype, env) if self.chance(30) else self.gen(self.partner(t), env, "exact", depth).text
        if self.chance(50):
            a, b = b, a
        return _E(f"{self.pick(('maximum', 'minimum'))}({a}, {b})", t)

    def clip(self, t: TensorType, env: _Env, depth: int) -> _E:
        x = self.gen(t, env, "exact", depth).text
        bounds = []
        for _ in range(2):
            if self.chance(60):
                bounds.append(self.literal(t.dtype, env))
            else:
                bounds.append(self.gen(TensorType(t.dtype), env, "exact", depth).text)
        return _E(f"clip({x}, {bounds[0]}, {bounds[1]})", t)

    def cast(self, t: Type, env: _Env, depth: int) -> _E:
        def other(u: Type) -> Type:
            if isinstance(u, StructType):
                return StructType(tuple((n, other(f)) for n, f in u.fields))
            return TensorType(self.pick(("float32", "int32", "float64", "int64", "bool")), u.shape)
        source = other(t)
        dtype = next(iter(_leaf_dtypes(t)))
        if not self.avail(source, env, "exact"):
            source = t
        return _E(f"cast({self.gen(source, env, 'exact', depth).text}, {dtype})", t)

    def reduction(self, t: TensorType, env: _Env, depth: int) -> _E:
        floating = t.dtype in FLOAT_DTYPES
        name = self.pick(("sum", "max", "min") + (("mean",) if floating else ()))
        if t.shape == () and self.chance(50):
            source = TensorType(t.dtype, tuple(self.dim(True) for _ in range(self.int(0, 2))))
            return _E(f"{name}({self.gen(source, env, 'exact', depth).text})", t)
        axis = self.int(0, t.rank)
        source = TensorType(t.dtype, t.shape[:axis] + (self.dim(True),) + t.shape[axis:])
        shown = axis if self.chance(60) else axis - source.rank
        keyword = "axis=" if self.chance(50) else ""
        return _E(f"{name}({self.gen(source, env, 'exact', depth).text}, {keyword}{shown})", t)

    def argmax(self, t: TensorType, env: _Env, depth: int) -> _E:
        axis = self.int(0, t.rank)
        source = TensorType(self.dtype(numeric=True), t.shape[:axis] + (self.dim(True),) + t.shape[axis:])
        keyword = "axis=" if self.chance(50) else ""
        return _E(f"argmax({self.gen(source, env, 'exact', depth).text}, {keyword}{axis})", t)

    def index_text(self, env: _Env, depth: int, n: int | None = None) -> str:
        if self.chance(70):
            return str(self.int(0, (n or 1) - 1))
        return self.gen(TensorType("int32"), env, "exact", depth).text

    def index(self, t: TensorType, env: _Env, depth: int) -> _E:
        n = self.dim(True)
        base = self.gen(TensorType(t.dtype, (n,) + t.shape), env, "exact", depth)
        return _E(f"{self.operand(base)}[{self.index_text(env, depth, n)}]", t)

    def reshape(self, t: TensorType, env: _Env, depth: int) -> _E:
        size = 1
        for d in t.shape:
            size *= d
        source = TensorType(t.dtype, self.pick(((size,), tuple(reversed(t.shape)), t.shape)))
        dims = list(t.shape)
        if dims and self.chance(40):
            dims[self.int(0, len(dims) - 1)] = -1
        return _E(f"reshape({self.gen(source, env, 'exact', depth).text}, {self.shape_text(dims)})", t)

    def matmul(self, t: TensorType, env: _Env, depth: int) -> _E:
        k = self.dim(True)
        if t.rank == 2:
            a, b = TensorType(t.dtype, (t.shape[0], k)), TensorType(t.dtype, (k, t.shape[1]))
        else:
            a, b = TensorType(t.dtype, (k,)), TensorType(t.dtype, (k, t.shape[0]))
        return _E(f"matmul({self.gen(a, env, 'exact', depth).text}, {self.gen(b, env, 'exact', depth).text})", t)

    def xent(self, t: TensorType, env: _Env, depth: int) -> _E:
        labels = TensorType(self.pick(("int32", "int64")), t.shape)
        logits = TensorType(t.dtype, t.shape + (self.dim(True),))
        return _E(f"sparse_softmax_cross_entropy({self.gen(labels, env, 'exact', depth).text}, "
                  f"{self.gen(logits, env, 'exact', depth).text})", t)

    def global_norm(self, t: TensorType, env: _Env, depth: int) -> _E:
        source = self.struct_of(lambda: TensorType(t.dtype, tuple(self.dim(True) for _ in range(self.int(0, 2)))))
        return _E(f"global_norm({self.gen(source, env, 'exact', depth).text})", t)

    def comparison(self, t: TensorType, env: _Env, depth: int) -> _E:
        dtype = self.dtype(numeric=True)
        if not self.avail(TensorType(dtype, t.shape), env, "exact"):
            dtype = "bool"
        a = self.gen(TensorType(dtype, t.shape), env, "exact", depth)
        ops = ("==", "!=") if dtype == "bool" else ("<", "<=", ">", ">=", "==", "!=")
        if dtype != "bool" and self.chance(40):
            b = self.literal(dtype, env)
        else:
            b = self.operand(self.gen(self.partner(TensorType(dtype, t.shape)), env, "exact", depth))
        left, right = self.operand(a), b
        if self.chance(50):
            left, right = right, left
        return _E(f"{left} {self.pick(ops)} {right}", t, False)

    def logical(self, t: TensorType, env: _Env, depth: int) -> _E:
        a = self.operand(self.gen(t, env, "exact", depth))
        if self.chance(30):
            return _E(f"not {a}", t, False)
        b = self.operand(self.gen(self.partner(t), env, "exact", depth))
        if self.chance(50):
            a, b = b, a
        return _E(f"{a} {self.pick(('and', 'or'))} {b}", t, False)

    def where(self, t: TensorType, env: _Env, depth: int) -> _E:
        c = self.gen(self.partner(t, "bool"), env, "exact", depth).text
        a = self.gen(t, env, "exact", depth).text
        b = self.gen(t, env, "exact", depth).text
        return _E(f"where({c}, {a}, {b})", t)

    def if_expr(self, t: Type, env: _Env, depth: int) -> _E:
        cond = self.gen(TensorType("bool"), env, "exact", depth - 1)
        a = self.gen(t, env, "exact", depth - 1)
        b = self.gen(t, env, "exact", depth - 1)
        return _E(f"if {cond.text} then {a.text} else {b.text}", t, False)

    def grad_candidates(self, t: Type, env: _Env, depth: int) -> list[Callable[[], _E]]:
        """`grad(f)(args)` where f's first parameter has type t."""
        fs = [f for f in self.fns if not f.federated and f.params and f.params[0][1] == t
              and isinstance(f.result, TensorType) and f.result.shape == () and f.result.dtype in FLOAT_DTYPES
              and _all_in(t, FLOAT_DTYPES) and all(self.avail(p, env, "accept") for _, p in f.params)]
        if not fs:
            return []

        def make() -> _E:
            f = self.pick(fs)
            args = ", ".join(self.gen(p, env, "expect", depth).text for _, p in f.params)
            return _E(f"grad({f.name})({args})", t)
        return [make]

    def struct_candidates(self, t: StructType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        c: list[Callable[[], _E]] = [lambda: self.struct_literal(t, env, "exact", depth)]
        if depth <= 0:
            return c
        sub = depth - 1
        dtypes = _leaf_dtypes(t)
        if dtypes is not None and dtypes <= NUMERIC_DTYPES:
            c.append(lambda: self.struct_arith(t, env, sub))
            c.append(lambda: _E("-" + self.operand(self.gen(t, env, "exact", sub)), t, False))
            c.append(lambda: self.unary_builtin(t, env, sub, ("relu", "abs", "square") +
                                                (("sigmoid", "tanh", "exp") if dtypes <= FLOAT_DTYPES else ())))
            c.append(lambda: _E(f"{self.pick(('zeros_like', 'ones_like'))}({self.gen(t, env, 'exact', sub).text})", t))
            if dtypes <= FLOAT_DTYPES:
                c.append(lambda: _E(f"random_normal_like({self.gen(t, env, 'exact', sub).text}, 0.1, 3)", t))
        if dtypes is not None and len(dtypes) == 1 and "string" not in dtypes:
            c.append(lambda: self.cast(t, env, sub))
        c += self.grad_candidates(t, env, sub) * 4
        if len(t.fields) == 2 and t.names == (None, None):
            vg = [f for f in self.fns if not f.federated and f.params and f.params[0][1] == t.types[1]
                  and f.result == t.types[0] and f.result.shape == () and f.result.dtype in FLOAT_DTYPES
                  and _all_in(f.params[0][1], FLOAT_DTYPES) and all(self.avail(p, env, "accept") for _, p in f.params)]
            if vg:
                def value_and_grad() -> _E:
                    f = self.pick(vg)
                    args = ", ".join(self.gen(p, env, "expect", sub).text for _, p in f.params)
                    return _E(f"value_and_grad({f.name})({args})", t)
                c += [value_and_grad] * 4
        return c

    def struct_literal(self, t: StructType, env: _Env, mode: str, depth: int) -> _E:
        sub = {"exact": "exact", "expect": "expect"}.get(mode, "assign")
        parts, fields = [], []
        for n, f in t.fields:
            e = self.gen(f, env, sub, depth - 1)
            name = n if mode == "exact" or n is None or not self.chance(20) else None
            parts.append(e.text if name is None else f"{name}={e.text}")
            # a literal inside a struct literal takes the expected dtype
            fields.append((name, f if sub == "expect" and not _match("assign", f, e.type) else e.type))
        if not parts:
            text = "()"
        elif len(parts) == 1 and (fields[0][0] is None or self.chance(30)):
            text = f"({parts[0]},)"
        else:
            text = "(" + ", ".join(parts) + ("," if self.chance(10) else "") + ")"
        return _E(text, StructType(tuple(fields)))

    def struct_arith(self, t: StructType, env: _Env, depth: int) -> _E:
        dtypes = _leaf_dtypes(t)
        floating = dtypes <= FLOAT_DTYPES
        op = self.pick(("+", "-", "*") + (("/",) if floating else ()))
        a = self.operand(self.gen(t, env, "exact", depth))
        r = self.int(0, 2)
        if r == 0:
            b = self.literal("float64" if floating else "int64", env)
            if not floating and b in _FLOAT_LITS:
                b = self.pick(_INT_LITS)
        elif r == 1 and len(dtypes) == 1:
            b = self.operand(self.gen(TensorType(next(iter(dtypes))), env, "exact", depth))
        else:
            b = self.operand(self.gen(t, env, "exact", depth))
        if self.chance(50):
            a, b = b, a
        return _E(f"{a} {op} {b}", t, False)

    def sequence(self, seqs: list[_Var], env: _Env, depth: int) -> _E:
        """A sequence: a name in scope, or `map` over one."""
        s = self.pick(seqs)
        if depth <= 0 or not self.chance(40):
            return _E(s.name, s.type)
        element = self.value_type(1)
        lam = self.lambda_expr([(self.fresh("e"), s.type.element)], element, env, depth - 1)
        return _E(f"map({s.name}, {lam.text})", SequenceType(element))

    def sequence_candidates(self, t: SequenceType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        seqs = [v for v in env.paths() if isinstance(v.type, SequenceType)]
        if depth <= 0 or not seqs:
            return []

        def make() -> _E:
            s = self.pick(seqs)
            lam = self.lambda_expr([(self.fresh("e"), s.type.element)], t.element, env, depth - 1)
            return _E(f"map({s.name}, {lam.text})", t)
        return [make] if self.avail(t.element, env.unplaced().extend(_Var("e", seqs[0].type.element)), "exact") else []

    def reduce_candidates(self, t: Type, env: _Env, depth: int) -> list[Callable[[], _E]]:
        seqs = [v for v in env.paths() if isinstance(v.type, SequenceType)]
        if not seqs or isinstance(t, FunctionType) or is_placed(t):
            return []

        def make() -> _E:
            s = self.sequence(seqs, env, depth - 1)
            init = self.gen(t, env, "expect", depth - 1)
            lam = self.lambda_expr([(self.fresh("acc"), t), (self.fresh("e"), s.type.element)], t, env, depth - 1,
                                   annotate=True)
            return _E(f"reduce({s.text}, {init.text}, {lam.text})", t)
        return [make]

    def lambda_expr(self, params, result: Type, env: _Env, depth: int, annotate: bool | None = None) -> _E:
        """`fn(params) -> result = body`; the body sees the unplaced names around it."""
        inner = env.unplaced().extend(*(_Var(n, p, None) for n, p in params))
        if annotate is None:
            annotate = self.chance(70)
        # "accept", not "expect": the checker does not give a lambda's declared
        # result type to a struct literal of literals, as it does for an fn's
        # (reported; `fn() -> <a=float64> = (a=1.0)` is E040)
        body = self.gen(result, inner, "accept" if annotate else "exact", depth)
        i, body_text = self.mark(body.text)
        self.sites.append(_Site("fnbody", (i,)))
        plist = ", ".join(f"{n}: {self.render(p)}" for n, p in params)
        head = f"fn({plist})" + (f" -> {self.render(result)}" if annotate else "")
        if self.chance(15):
            text = f"{head} {{ return {body_text} }}"
        else:
            text = f"{head} = {body_text}"
        return _E(text, FunctionType(_param_type(params), result if annotate else body.type), False, len(params))

    def function_candidates(self, t: FunctionType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        c: list[Callable[[], _E]] = []
        if not ((t.parameter is not None and is_placed(t.parameter)) or is_placed(t.result)):
            inner = env.unplaced()
            if t.parameter is not None:
                inner = inner.extend(_Var("q", t.parameter))
            exact_body = self.avail(t.result, inner, "exact")

            def make() -> _E:
                p = t.parameter
                if p is None:
                    params = []
                elif isinstance(p, StructType) and len(p.fields) >= 2 and all(p.names) and self.chance(60) \
                        and not set(p.names) & (set(CALLABLE) | {v.name for v in env.vars}):
                    params = list(p.fields)
                else:
                    params = [(self.fresh("q"), p)]
                lam = self.lambda_expr(params, t.result, env, depth - 1, annotate=None if exact_body else True)
                return lam
            if exact_body or self.avail(t.result, inner, "assign"):
                c.append(make)
        for name in ("grad", "value_and_grad"):
            fs = [f for f in self.fns if not f.federated and f.params and isinstance(f.result, TensorType)
                  and f.result.shape == () and f.result.dtype in FLOAT_DTYPES and _all_in(f.params[0][1], FLOAT_DTYPES)
                  and FunctionType(f.type.parameter, f.params[0][1] if name == "grad"
                                   else StructType(((None, f.result), (None, f.params[0][1])))) == t]
            if fs:
                def differentiate(fs=fs, name=name) -> _E:
                    f = self.pick(fs)
                    return _E(f"{name}({f.name})", t, True, len(f.params))
                c.append(differentiate)
        return c

    # -- calls
    def call_candidates(self, t: Type, env: _Env, depth: int) -> list[Callable[[], _E]]:
        sub = depth - 1
        fns = [f for f in self.fns if not (f.federated and env.local) and _match("exact", t, f.result)
               and all(self.avail(p, env, "accept") for _, p in f.params)]
        values = [v for v in env.paths() if isinstance(v.type, FunctionType) and v.type.result == t
                  and all(self.avail(p, env, "accept") for p in _arg_types(v.type, v.nparams))]
        c: list[Callable[[], _E]] = []
        if fns:
            def call_fn() -> _E:
                f = self.pick(fns)
                args = [(n, self.gen(p, env, "expect", sub).text) for n, p in f.params]
                if args and self.chance(25):
                    order = self.draw(st.permutations(range(len(args))))
                    text = ", ".join(f"{args[i][0]}={args[i][1]}" for i in order)
                else:
                    text = ", ".join(a for _, a in args)
                return _E(f"{f.name}({text})", t)
            c.append(call_fn)
        if values:
            def call_value() -> _E:
                v = self.pick(values)
                args = ", ".join(self.gen(p, env, "expect", sub).text for p in _arg_types(v.type, v.nparams))
                return _E(f"{v.name}({args})", t)
            c.append(call_value)
        return c

    # -- federated values (only inside a comp)
    def client_paths(self, env: _Env) -> list[str]:
        return [v.name for v in env.paths() if isinstance(v.type, FederatedType) and v.type.placement is CLIENTS]

    def federated_candidates(self, t: FederatedType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        if env.local:
            return []
        m, p = t.member, t.placement
        unplaced = env.unplaced()
        c: list[Callable[[], _E]] = []
        member_ok = self.avail(m, unplaced, "exact")
        if member_ok and t.all_equal:
            def value() -> _E:
                v = self.gen(m, _Env(unplaced.vars, local=True), "exact", depth - 1)
                return _E(f"federated_value({v.text}, {p})", t)
            c.append(value)
        if member_ok and (p is SERVER or not t.all_equal):
            c.append(lambda: self.federated_eval(t, unplaced, depth))
        aggregations = self.aggregation_candidates(t, env, depth) * 3
        if depth <= 0:
            return c + aggregations
        sub = depth - 1
        c += aggregations
        if p is CLIENTS and t.all_equal:
            server = FederatedType(m, SERVER, True)
            if self.avail(server, env, "exact"):
                def broadcast() -> _E:
                    i, arg = self.mark(self.gen(server, env, "exact", sub).text)
                    self.sites.append(_Site("bcast", (i,), tuple(self.client_paths(env))))
                    return _E(f"federated_broadcast({arg})", t)
                c += [broadcast] * 4
        if not (p is CLIENTS and t.all_equal):
            c += self.map_candidates(t, env, sub) * 3
            if isinstance(m, StructType) and m.fields and all(n is None for n in m.names):
                parts = [FederatedType(f, p, p is SERVER) for f in m.types]
                if all(self.avail(x, env, "exact") for x in parts):
                    def zip_() -> _E:
                        args = []
                        for x in parts:
                            same = FederatedType(x.member, p, True)
                            if p is CLIENTS and self.chance(30) and self.avail(same, env, "exact"):
                                x = same
                            args.append(self.gen(x, env, "exact", sub).text)
                        return _E(f"federated_zip({', '.join(args)})", t)
                    c += [zip_] * 3
        if p is SERVER:
            c += self.apply_candidates(t, env, sub)
            if _constructible(m, True):
                c.append(lambda: self.aggregate(t, env, sub))
        return c

    def federated_eval(self, t: FederatedType, unplaced: _Env, depth: int) -> _E:
        zero = [f for f in self.fns if not f.federated and not f.params and f.result == t.member]
        if zero and self.chance(50):
            fn_text = self.pick(zero).name
        else:
            fn_text = self.lambda_expr([], t.member, unplaced, depth - 1).text
        return _E(f"federated_eval({fn_text}, {t.placement})", t)

    def aggregation_candidates(self, t: FederatedType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        if t.placement is not SERVER:
            return []
        m = t.member
        sources = [FederatedType(m, CLIENTS, False), FederatedType(m, CLIENTS, True)]
        if depth <= 0:
            ok = [x for x in sources if any(v.type == x for v in env.paths())]
        else:
            ok = [x for x in sources if self.avail(x, env, "exact")]
        if not ok:
            return []
        names_ = []
        if _all_in(m, NUMERIC_DTYPES):
            names_ += ["federated_sum", "federated_min", "federated_max"]
        if _all_in(m, FLOAT_DTYPES):
            names_ += ["federated_mean", "federated_mean"]
        if _all_in(m, INTEGER_DTYPES):
            names_ += ["federated_secure_sum"]
        if not names_:
            return []

        def make() -> _E:
            name = self.pick(names_)
            x = self.pick(ok)
            arg = self.gen(x, env, "exact", depth - 1).text
            if name == "federated_mean" and self.chance(50):
                w = FederatedType(TensorType("float32"), CLIENTS, False)
                if self.avail(w, env, "exact"):
                    return _E(f"federated_mean({arg}, weight={self.gen(w, env, 'exact', depth - 1).text})", t)
            if name == "federated_secure_sum":
                bits = self.int(1, 62)
                return _E(f"federated_secure_sum({arg}, {'bitwidth=' if self.chance(50) else ''}{bits})", t)
            return _E(f"{name}({arg})", t)
        return [make]

    def map_candidates(self, t: FederatedType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        """federated_map(f, x1..xn): f an fn, a function-valued name or a lambda."""
        p = t.placement
        m = t.member

        def placed(u: Type) -> FederatedType:
            return FederatedType(u, p, p is SERVER)

        def mappable(args: list[Type]) -> bool:
            return bool(args) and all(not any(isinstance(x, FunctionType) for x in walk(a)) and
                                      self.avail(placed(a), env, "assign") for a in args)

        named = [(f.name, [pt for _, pt in f.params], f.result) for f in self.fns
                 if not f.federated and f.result == m and mappable([pt for _, pt in f.params])]
        named += [(v.name, _arg_types(v.type, v.nparams), v.type.result) for v in env.paths()
                  if isinstance(v.type, FunctionType) and not is_placed(v.type) and v.type.result == m
                  and "." not in v.name and "[" not in v.name and mappable(_arg_types(v.type, v.nparams))]
        c: list[Callable[[], _E]] = []
        if named:
            def by_name() -> _E:
                name, params, _ = self.pick(named)
                args = [self.gen(placed(a), env, "assign", depth).text for a in params]
                prefix = f"federated_map({name}, "
                i, prefix_marked = self.mark(prefix)
                j, first = self.mark(args[0])
                self.sites.append(_Site("map", (i, j), (name,)))
                return _E(prefix_marked + ", ".join([first] + args[1:]) + ")", t)
            c += [by_name] * 3
        sources = [v for v in env.paths() if isinstance(v.type, FederatedType) and v.type.placement is p
                   and not any(isinstance(x, FunctionType) for x in walk(v.type.member))]
        base_ok = self.avail(m, env.unplaced(), "exact")
        # sources whose member, as the lambda's parameter, lets the body be written
        enabling = sources if base_ok else \
            [v for v in sources if self.avail(m, env.unplaced().extend(_Var("q", v.type.member)), "exact")]
        if enabling:
            def by_lambda() -> _E:
                params, args = [], []
                if not base_ok or self.chance(75):
                    v = self.pick(enabling)
                    params.append((self.fresh("q"), v.type.member))
                    args.append(v.name)
                else:
                    u = self.value_type(1)
                    params.append((self.fresh("q"), u))
                    args.append(self.gen(placed(u), env, "assign", depth).text)
                if self.chance(30):
                    if self.chance(60):
                        v = self.pick(sources)
                        params.append((self.fresh("q"), v.type.member))
                        args.append(v.name)
                    else:
                        u = self.value_type(1)
                        params.append((self.fresh("q"), u))
                        args.append(self.gen(placed(u), env, "assign", depth).text)
                lam = self.lambda_expr(params, m, env, depth)
                return _E(f"federated_map({lam.text}, {', '.join(args)})", t)
            c.append(by_lambda)
        elif base_ok:
            def by_lambda_fresh() -> _E:
                u = self.value_type(1)
                arg = self.gen(placed(u), env, "assign", depth).text
                lam = self.lambda_expr([(self.fresh("q"), u)], m, env, depth)
                return _E(f"federated_map({lam.text}, {arg})", t)
            c.append(by_lambda_fresh)
        return c

    def apply_candidates(self, t: FederatedType, env: _Env, depth: int) -> list[Callable[[], _E]]:
        m = t.member
        fs = [f for f in self.fns if not f.federated and len(f.params) == 1 and f.result == m
              and not any(isinstance(x, FunctionType) for x in walk(f.params[0][1]))
              and self.avail(FederatedType(f.params[0][1], SERVER, True), env, "assign")]
        c: list[Callable[[], _E]] = []
        if fs:
            def named() -> _E:
                f = self.pick(fs)
                arg = self.gen(FederatedType(f.params[0][1], SERVER, True), env, "assign", depth).text
                return _E(f"federated_apply({f.name}, {arg})", t)
            c.append(named)
        servers = [v for v in env.paths() if isinstance(v.type, FederatedType) and v.type.placement is SERVER
                   and not any(isinstance(x, FunctionType) for x in walk(v.type.member))]
        if servers and self.avail(m, env.unplaced().extend(_Var("q", servers[0].type.member)), "exact"):
            def lam() -> _E:
                v = self.pick(servers)
                inner_ok = self.avail(m, env.unplaced().extend(_Var("q", v.type.member)), "exact")
                if not inner_ok:
                    v = servers[0]
                f = self.lambda_expr([(self.fresh("q"), v.type.member)], m, env, depth)
                return _E(f"federated_apply({f.text}, {v.name})", t)
            c.append(lam)
        return c

    def aggregate(self, t: FederatedType, env: _Env, depth: int) -> _E:
        """federated_aggregate(x, zero, accumulate, merge, report)."""
        sources = [v for v in env.paths() if isinstance(v.type, FederatedType) and v.type.placement is CLIENTS
                   and not any(isinstance(x, FunctionType) for x in walk(v.type.member))]
        if sources and self.chance(70):
            v = self.pick(sources)
            x_text, member = v.name, v.type.member
        else:
            member = self.value_type(1)
            x_text = self.gen(FederatedType(member, CLIENTS, False), env, "exact", depth).text
        u = self.value_type(1, numeric=True)
        zero = self.gen(u, env.unplaced(), "exact", depth)
        a, b, e = self.fresh("a"), self.fresh("m"), self.fresh("e")
        accumulate = self.lambda_expr([(a, u), (e, member)], u, env, depth, annotate=True)
        if self.chance(50):
            merge_text = f"fn({a}: {self.render(u)}, {b}: {self.render(u)}) -> {self.render(u)} = {a} + {b}"
        else:
            merge_text = self.lambda_expr([(a, u), (b, u)], u, env, depth, annotate=True).text
        report = self.lambda_expr([(a, u)], t.member, env, depth, annotate=True)
        return _E(f"federated_aggregate({x_text}, {zero.text}, {accumulate.text}, {merge_text}, {report.text})", t)

    # -- declarations
    def target_type(self, env: _Env, comp: bool) -> Type:
        """A type for a `let` (exact) that can be written here."""
        r = self.int(0, 9)
        paths = [v for v in env.paths() if not isinstance(v.type, FunctionType)]
        t: Type
        losses = self.losses()
        mappable = [f for f in self.fns if not f.federated and f.params and _placeable(f.result)
                    and not any(isinstance(x, FunctionType) for _, pt in f.params for x in walk(pt))]
        if comp and mappable and self.chance(35):     # federated_map of an earlier fn
            placement = self.pick((CLIENTS, CLIENTS, SERVER))
            t = FederatedType(self.pick(mappable).result, placement, placement is SERVER)
        elif r < 3 and paths:
            t = self.pick(paths).type
        elif r < 5 and any(isinstance(v.type, SequenceType) for v in paths):
            t = self.pick((TensorType("int32"), TensorType("float32")))      # count, num_examples, reduce
        elif comp and r < 7:
            clients = [v.type.member for v in env.paths() if isinstance(v.type, FederatedType)
                       and v.type.placement is CLIENTS and _all_in(v.type.member, NUMERIC_DTYPES)]
            k = self.int(0, 4)
            if k == 0 and clients:
                t = FederatedType(self.pick(clients), SERVER, True)
            elif k == 4:
                placement = self.pick((CLIENTS, SERVER))
                members = [v.type.member for v in env.paths() if isinstance(v.type, FederatedType)
                           and v.type.placement is placement]
                parts = [self.pick(members) if members and self.chance(70) else self.value_type(1)
                         for _ in range(self.int(1, 3))]
                t = FederatedType(StructType(tuple((None, u) for u in parts)), placement, placement is SERVER)
            elif k <= 1:
                placement = self.pick((SERVER, CLIENTS))
                t = FederatedType(self.value_type(1), placement, placement is SERVER or self.chance(50))
            elif k == 2:
                t = FederatedType(self.value_type(1, numeric=True), CLIENTS, False)
            else:
                t = self.struct_of(lambda: FederatedType(self.value_type(1, floating=True), SERVER, True), 1, 2)
        elif r == 9 or (r == 8 and losses):
            if losses and self.chance(70):
                f = self.pick(losses)
                model = f.params[0][1]
                t = self.pick((FunctionType(f.type.parameter, model), model,
                               StructType(((None, f.result), (None, model)))))
            else:
                t = FunctionType(self.value_type(1, known=False) if self.chance(80) else None, self.value_type(1))
        else:
            t = self.value_type(2)
        if not self.avail(t, env, "exact"):
            t = self.value_type(2)
        return t

    def body(self, decl: str, result: Type, env: _Env, comp: bool) -> tuple[str, _Env, int]:
        """`= expr` or a block with lets; returns its text, the scope at the
        result and the marker id of the result expression."""
        lets = []
        for _ in range(self.int(0, self.max_lets)):
            if self.chance(20):
                structs = [v.type for v in env.paths() if (isinstance(v.type, StructType) and v.type.fields) or
                           (isinstance(v.type, FederatedType) and isinstance(v.type.member, StructType)
                            and v.type.member.fields)]
                if structs and self.chance(50):
                    t = self.pick(structs)
                else:
                    t = self.struct_of(lambda: self.value_type(1), 1, 3)
                    if comp and self.chance(50):
                        t = FederatedType(t, self.pick((CLIENTS, SERVER)), True)
                e = self.gen(t, env, "exact", self.max_depth)
                names_ = [self.fresh("v") for _ in _fields_of(t)]
                self.let_types[(decl, ",".join(names_))] = e.type
                env = env.extend(*(_Var(n, u) for n, u in zip(names_, _fields_of(t))))
                pattern = f"({names_[0]},)" if len(names_) == 1 else f"({', '.join(names_)})"
                lets.append(f"let {pattern} = {e.text}")
            else:
                projections = [v for v in env.paths() if "." in v.name or "[" in v.name]
                if projections and self.chance(20):     # `let x = s.a` / `s[0]`: selection on every kind of struct
                    v = self.pick(projections)
                    e = _E(v.name, v.type, True, v.nparams)
                elif self.chance(15):                     # `let lr = 0.1`: a let keeps the literal's weakness
                    e = self.pick((lambda: _E(self.pick(_FLOAT_LITS), TensorType("float32")),
                                   lambda: _E(self.pick(_INT_LITS), TensorType("int32"))))()
                else:
                    t = self.target_type(env, comp)
                    e = self.gen(t, env, "exact", self.max_depth)
                name = self.fresh("v")
                self.let_types[(decl, name)] = e.type
                weak = "int" if e.text in _INT_LITS else "float" if e.text in _FLOAT_LITS else None
                env = env.extend(_Var(name, e.type, e.nparams, weak))
                lets.append(f"let {name} = {e.text}")
        result_e = self.gen(result, env, "expect", self.max_depth)
        i, result_text = self.mark(result_e.text)
        if not lets and self.chance(80):
            return f" =\n  {result_text}" if self.chance(20) else f" = {result_text}", env, i
        if self.chance(20):
            return " { " + "; ".join(lets + [f"return {result_text}"]) + " }", env, i
        sep = self.pick(("\n  ", ";\n  "))
        return " {\n  " + sep.join(lets) + ("\n  " if lets else "") + f"return {result_text}\n}}", env, i

    def losses(self) -> list[_Fn]:
        """fns that `grad` can differentiate: float scalar result, float first parameter."""
        return [f for f in self.fns if not f.federated and f.params and isinstance(f.result, TensorType)
                and f.result.shape == () and f.result.dtype in FLOAT_DTYPES and _all_in(f.params[0][1], FLOAT_DTYPES)]

    def fn_decl(self) -> None:
        name = self.fresh("f")
        params = []
        shape = self.int(0, 9)
        losses = self.losses()
        if shape == 8 and losses:               # an update step: takes what a loss takes, returns the model
            loss = self.pick(losses)
            params = [(self.fresh("p"), t) for _, t in loss.params]
            result: Type | None = loss.params[0][1]
        elif shape >= 7:                        # a loss: model first, then data
            model = self.value_type(2, floating=True)
            self.maybe_alias(model)
            params = [(self.fresh("p"), model)]
            if self.chance(70):
                data = self.value_type(1, known=False, seq=self.chance(30))
                self.maybe_alias(data)
                params.append((self.fresh("p"), data))
            result = TensorType(self.pick(("float32", "float32", "float64")))
        else:
            result = None
            aliased = [t for t in self.alias_by_type if not is_placed(t)]
            for _ in range(self.int(0, 3)):
                if self.fns and self.chance(30):
                    t = self.pick(self.fns).result
                    if is_placed(t):
                        t = self.value_type(2, known=False, seq=True)
                elif aliased and self.chance(30):
                    t = self.pick(aliased)
                else:
                    t = self.value_type(2, known=False, seq=True, fn=True)
                self.maybe_alias(t)
                params.append((self.fresh("p"), t))
        env = _Env([_Var(n, t) for n, t in params], local=True)
        if result is not None:
            text, _, i = self.body(name, result, env, comp=False)
            self.sites.append(_Site("fnbody", (i,)))
            plist = ", ".join(f"{n}: {self.render(t)}" for n, t in params)
            self.decls.append(f"fn {name}({plist}) -> {self.render(result)}{text}")
            fn = _Fn(name, tuple(params), result, False)
            self.fns.append(fn)
            self.decl_types[name] = fn.type
            return
        env = _Env([_Var(n, t) for n, t in params], local=True)
        result = self.target_type(env, comp=False)
        if self.chance(30):
            result = _widen(self.draw, result)
        text, _, i = self.body(name, result, env, comp=False)
        self.sites.append(_Site("fnbody", (i,)))
        plist = ", ".join(f"{n}: {self.render(t)}" for n, t in params)
        self.decls.append(f"fn {name}({plist}) -> {self.render(result)}{text}")
        fn = _Fn(name, tuple(params), result, False)
        self.fns.append(fn)
        self.decl_types[name] = fn.type

    def comp_param_type(self) -> Type:
        r = self.int(0, 9)
        if self.fns and self.chance(40):
            candidates = [pt for f in self.fns if not f.federated for _, pt in f.params if not is_placed(pt)
                          and not any(isinstance(x, FunctionType) for x in walk(pt))]
            member = self.pick(candidates) if candidates else self.value_type(1, known=False, seq=True)
        elif self.chance(40):
            member = self.struct_of(lambda: self.value_type(1, known=False, seq=r < 3))
        else:
            member = self.value_type(1, known=False, seq=r < 3)
        if r < 4:
            return FederatedType(member, CLIENTS, False)
        if r < 6:
            return FederatedType(member, SERVER, True)
        if r < 8:
            return FederatedType(member, CLIENTS, True)
        return member

    def comp_result_type(self, env: _Env) -> Type:
        r = self.int(0, 9)
        clients = [v.type.member for v in env.paths() if isinstance(v.type, FederatedType)
                   and v.type.placement is CLIENTS and _all_in(v.type.member, NUMERIC_DTYPES)]
        t: Type
        if r < 3 and clients:
            t = FederatedType(self.pick(clients), SERVER, True)
        elif r < 5:
            t = FederatedType(self.value_type(2), SERVER, True)
        elif r < 7:
            mappable = [f for f in self.fns if not f.federated and f.params
                        and _placeable(f.result)
                        and not any(isinstance(x, FunctionType) for _, pt in f.params for x in walk(pt))]
            member = self.pick(mappable).result if mappable and self.chance(60) else self.value_type(1)
            t = FederatedType(member, CLIENTS, self.chance(20))
        elif r < 8:
            t = self.struct_of(lambda: FederatedType(self.value_type(1), SERVER, True), 1, 3)
        else:
            t = self.target_type(env, comp=True)
        if not self.avail(t, env, "accept"):
            t = FederatedType(self.value_type(2), SERVER, True)
        return t

    def comp_decl(self, name: str | None = None, params=None, result: Type | None = None) -> _Fn:
        name = name or self.fresh("c")
        if params is None:
            params = []
            for _ in range(self.int(0, 3)):
                t = self.comp_param_type()
                self.maybe_alias(t)
                params.append((self.fresh("p"), t))
        env = _Env([_Var(n, t) for n, t in params], local=False)
        if result is None:
            result = self.comp_result_type(env)
        text, end_env, i = self.body(name, result, env, comp=True)
        if isinstance(result, FederatedType) and result.placement is SERVER:
            self.sites.append(_Site("ret", (i,), tuple(self.client_paths(end_env))))
        rendered = []
        for n, t in params:
            shown = self.render(t)
            if isinstance(t, FederatedType):
                j, shown = self.mark(shown)
                self.sites.append(_Site("ann", (j,), (t,)))
            rendered.append(f"{n}: {shown}")
        result_text = self.render(result)
        if isinstance(result, FederatedType):
            j, result_text = self.mark(result_text)
            self.sites.append(_Site("ann", (j,), (result,)))
        self.decls.append(f"comp {name}({', '.join(rendered)}) -> {result_text}{text}")
        fn = _Fn(name, tuple(params), result, True)
        self.fns.append(fn)
        self.decl_types[name] = fn.type
        return fn

    def mappable_fns(self) -> list[_Fn]:
        return [f for f in self.fns if not f.federated and f.params and _placeable(f.result)
                and all(_placeable(pt) for _, pt in f.params)]

    def round_decl(self, f: _Fn) -> None:
        """A comp shaped like a round of federated training: broadcast the
        server values f needs, map f at the clients, aggregate what it returns."""
        name = self.fresh("c")
        params, lets, args = [], [], []
        env = _Env(local=False)
        for _, pt in f.params:
            r = self.int(0, 2)
            pname = self.fresh("p")
            if r == 0:
                params.append((pname, FederatedType(pt, SERVER, True)))
                env = env.extend(_Var(pname, params[-1][1]))
                local = self.fresh("v")
                i, arg = self.mark(pname)
                self.sites.append(_Site("bcast", (i,), tuple(self.client_paths(env))))
                lets.append(f"let {local} = federated_broadcast({arg})")
                self.let_types[(name, local)] = FederatedType(pt, CLIENTS, True)
                env = env.extend(_Var(local, FederatedType(pt, CLIENTS, True)))
                args.append(local)
            else:
                params.append((pname, FederatedType(pt, CLIENTS, r == 2)))
                env = env.extend(_Var(pname, params[-1][1]))
                args.append(pname)
        mapped = self.fresh("v")
        i, prefix = self.mark(f"federated_map({f.name}, ")
        j, first = self.mark(args[0])
        self.sites.append(_Site("map", (i, j), (f.name,)))
        lets.append(f"let {mapped} = {prefix}{', '.join([first] + args[1:])})")
        clients = FederatedType(f.result, CLIENTS, False)
        self.let_types[(name, mapped)] = clients
        env = env.extend(_Var(mapped, clients))
        if _all_in(f.result, FLOAT_DTYPES):
            weights = [v.name for v in env.paths() if v.type in (FederatedType(TensorType("float32"), CLIENTS, False),
                                                                  FederatedType(TensorType("float32"), CLIENTS, True))]
            weight = f", weight={self.pick(weights)}" if weights and self.chance(50) else ""
            result, result_text = FederatedType(f.result, SERVER, True), f"federated_mean({mapped}{weight})"
        elif _all_in(f.result, NUMERIC_DTYPES):
            result, result_text = FederatedType(f.result, SERVER, True), f"federated_sum({mapped})"
        else:
            result, result_text = clients, mapped
        k, result_text = self.mark(result_text)
        if result.placement is SERVER:
            self.sites.append(_Site("ret", (k,), tuple(self.client_paths(env))))
        rendered = []
        for n, t in params:
            j, shown = self.mark(self.render(t))
            self.sites.append(_Site("ann", (j,), (t,)))
            rendered.append(f"{n}: {shown}")
        body = "\n  ".join(lets + [f"return {result_text}"])
        self.decls.append(f"comp {name}({', '.join(rendered)}) -> {self.render(result)} {{\n  {body}\n}}")
        fn = _Fn(name, tuple(params), result, True)
        self.fns.append(fn)
        self.decl_types[name] = fn.type

    def process_decl(self) -> None:
        state = FederatedType(self.value_type(2, floating=True), SERVER, True)
        self.maybe_alias(state)
        init = self.comp_decl(self.fresh("initialize"), [], state)
        params = [(self.fresh("state"), state)]
        for _ in range(self.int(0, 2)):
            params.append((self.fresh("p"), self.comp_param_type()))
        if self.chance(50):
            result = state
        else:
            result = StructType((("state", state),
                                 ("metrics", FederatedType(self.value_type(1, floating=True), SERVER, True))))
        nxt = self.comp_decl(self.fresh("next_round"), params, result)
        name = self.fresh("process")
        fields = [f"init = {init.name}", f"next = {nxt.name}"]
        if self.chance(30):
            fields.reverse()
        self.decls.append(f"process {name}({', '.join(fields)}{',' if self.chance(20) else ''})")
        self.decl_types[name] = StructType((("init", init.type), ("next", nxt.type)))

    def build(self) -> "GeneratedProgram":
        self.spaced = self.chance(30)
        for _ in range(self.int(0, 2)):
            t = self.value_type(2, seq=True)
            if isinstance(t, TensorType):
                t = self.struct_of(lambda: self.value_type(1), 1, 3)
            if t not in self.alias_by_type:
                name = self.fresh(self.pick(_ALIAS_NAMES))
                self.alias_decls.append(f"type {name} = {self.render(t)}")
                self.alias_by_type.setdefault(t, []).append(name)
                self.decl_types[name] = t
        for _ in range(self.int(1, self.max_decls)):
            mappable = self.mappable_fns()
            if mappable and self.chance(45):
                self.round_decl(self.pick(mappable))
            elif self.chance(45 if self.fns else 25):
                self.comp_decl()
            else:
                self.fn_decl()
        if self.want_process and self.chance(35):
            self.process_decl()
        decls = self.alias_decls + self.decls
        if len(decls) > 1 and self.chance(20):      # top-level declarations may come in any order
            decls = [decls[i] for i in self.draw(st.permutations(range(len(decls))))]
        parts = ["# generated by fedlang.testing.strategies.programs()"] + decls
        marked = "\n\n".join(parts) + "\n"
        source, offsets = _strip_marks(marked)
        sites = tuple(_Site(s.kind, tuple(offsets[i] for i in s.regions), s.info) for s in self.sites)
        return GeneratedProgram(source, dict(self.decl_types), dict(self.let_types), sites)


def _placeable(t: Type) -> bool:
    return not any(isinstance(x, (FunctionType, FederatedType)) for x in walk(t))


def _first_leaf(t: Type) -> TensorType | None:
    if isinstance(t, TensorType):
        return t
    if isinstance(t, StructType):
        for _, f in t.fields:
            leaf = _first_leaf(f)
            if leaf is not None:
                return leaf
    return None


def _fields_of(t: Type) -> list[Type]:
    if isinstance(t, FederatedType):
        return [FederatedType(f, t.placement, t.all_equal) for f in t.member.types]
    return list(t.types)


def _weak_ok(t: Type, e: _E) -> bool:
    """A weak literal accepted where a scalar of another numeric dtype is required."""
    if e.weak:
        return True
    return (isinstance(t, TensorType) and t.shape == () and isinstance(e.type, TensorType)
            and e.type.shape == () and e.text in _INT_LITS + _FLOAT_LITS
            and (t.dtype in FLOAT_DTYPES or (e.text in _INT_LITS and t.dtype in NUMERIC_DTYPES)))


def _strip_marks(text: str) -> tuple[str, dict[int, tuple[int, int]]]:
    out, opened, spans = [], {}, {}
    pos = length = 0
    for m in _MARK.finditer(text):
        chunk = text[pos:m.start()]
        out.append(chunk)
        length += len(chunk)
        if m.group(1) is not None:
            opened[int(m.group(1))] = length
        else:
            i = int(m.group(2))
            spans[i] = (opened.pop(i), length)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), spans


@dataclass(frozen=True, eq=False)
class GeneratedProgram:
    """A well-typed program and what the checker must infer for it.

    `decl_types`: declaration name -> its type (fn/comp as a function type,
    `type` aliases as the aliased type, a process as <init=...,next=...>).
    `let_types`: (declaration name, let name) -> the type of the bound
    expression, for the lets of top-level bodies; for `let (a, b) = e` the
    key's let name is "a,b"."""

    source: str
    decl_types: Mapping[str, Type]
    let_types: Mapping[tuple[str, str], Type]
    sites: tuple = field(default=(), repr=False)

    def __repr__(self) -> str:
        return f"GeneratedProgram(source=\n{self.source})"


def programs(max_decls: int = 4, max_depth: int = 3, max_lets: int = 3,
             process: bool = True) -> st.SearchStrategy[GeneratedProgram]:
    """Random well-typed programs: type aliases, `fn`s, `comp`s and maybe a
    `process`, bodies written by a type-directed generator over the rules of
    LANGUAGE.md (intrinsics, builtins, struct arithmetic, lambdas, lets, calls
    of earlier declarations, weak literals). Shrinks towards small programs."""
    return _programs(max_decls, max_depth, max_lets, process)


@st.composite
def _programs(draw, max_decls: int, max_depth: int, max_lets: int, process: bool) -> GeneratedProgram:
    return _Builder(draw, max_decls, max_depth, max_lets, process).build()


# ---- placement mutations ------------------------------------------------------------------------

@dataclass(frozen=True)
class IllPlaced:
    """A program with exactly one placement error: the checker must report
    `code` at `span` = (line, column, end_line, end_column), 1-based, end exclusive,
    and nothing else."""

    source: str
    code: str
    span: tuple[int, int, int, int]
    rule: str

    def __repr__(self) -> str:
        return f"IllPlaced(code={self.code}, span={self.span}, rule={self.rule!r}, source=\n{self.source})"


_SITE_OF_CODE = {"E060": "ret", "E061": "map", "E062": "bcast", "E063": "fnbody", "E064": "ann"}


def ill_placed(program: GeneratedProgram,
               codes=("E060", "E061", "E062", "E063", "E064")) -> st.SearchStrategy[IllPlaced]:
    """Mutations of `program` that break exactly one placement rule:
    E060 a comp returns a client value as its server result; E061 an fn is
    called on a placed value instead of through federated_map; E062 a client
    value is broadcast; E063 an intrinsic is called inside an fn or a lambda;
    E064 a type annotation nests placements. Where the program has no place
    for a mutation, a small declaration that makes it is appended."""
    return _ill_placed(program, tuple(codes))


@st.composite
def _ill_placed(draw, program: GeneratedProgram, codes: tuple[str, ...]) -> IllPlaced:
    code = draw(st.sampled_from(codes))
    sites = [s for s in program.sites if s.kind == _SITE_OF_CODE[code]]
    if sites and draw(st.integers(0, 9)) < 9:
        return _mutate(draw, program.source, draw(st.sampled_from(sites)), code)
    return _append(draw, program.source, code)


def _position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _result(text: str, start: int, end: int, code: str, rule: str) -> IllPlaced:
    return IllPlaced(text, code, _position(text, start) + _position(text, end), rule)


def _mutate(draw, source: str, site: _Site, code: str) -> IllPlaced:
    if site.kind == "map":
        (ps, pe), (a0, a1) = site.regions
        (name,) = site.info
        text = source[:ps] + name + "(" + source[pe:]
        start = ps + len(name) + 1
        return _result(text, start, start + (a1 - a0), code, f"`{name}` called on a placed value")
    ((s, e),) = site.regions
    orig = source[s:e]
    if site.kind in ("ret", "bcast"):
        options = list(site.info) + [f"federated_broadcast({orig})"]
        new = draw(st.sampled_from(options))
        rule = "a client value returned as a server value" if site.kind == "ret" else "a client value broadcast"
    elif site.kind == "fnbody":
        new = draw(st.sampled_from((f"federated_sum({orig})", f"federated_value({orig}, SERVER)",
                                    f"federated_value({orig}, CLIENTS)", f"federated_broadcast({orig})",
                                    f"federated_mean({orig})", f"federated_zip({orig})")))
        rule = "an intrinsic inside a local function"
    else:
        new = draw(st.sampled_from((f"{{{orig}}}@CLIENTS", f"{orig}@SERVER", f"{orig}@CLIENTS",
                                    f"{{<a={orig}>}}@CLIENTS", f"<{orig},float32>@SERVER")))
        rule = "nested placements in a type annotation"
    text = source[:s] + new + source[e:]
    return _result(text, s, s + len(new), code, rule)


def _append(draw, source: str, code: str) -> IllPlaced:
    t = draw(st.sampled_from(("float32", "int32[3]", "<a=float32,b=int32[?]>", "float64[?,2]")))
    base = source if source.endswith("\n") else source + "\n"
    if code == "E060":
        decl = f"comp zz_bad(x: {{{t}}}@CLIENTS) -> {t}@SERVER = "
        return _result(base + decl + "x\n", len(base) + len(decl), len(base) + len(decl) + 1, code,
                       "a client value returned as a server value")
    if code == "E061":
        head = f"fn zz_local(x: {t}) -> {t} = x\ncomp zz_bad(y: {{{t}}}@CLIENTS) -> {{{t}}}@CLIENTS = zz_local("
        return _result(base + head + "y)\n", len(base) + len(head), len(base) + len(head) + 1, code,
                       "an fn called on a placed value")
    if code == "E062":
        head = f"comp zz_bad(x: {{{t}}}@CLIENTS) -> {t}@CLIENTS = federated_broadcast("
        return _result(base + head + "x)\n", len(base) + len(head), len(base) + len(head) + 1, code,
                       "a client value broadcast")
    if code == "E063":
        head = f"fn zz_bad(x: {t}) -> {t} = "
        call = "federated_sum(x)"
        return _result(base + head + call + "\n", len(base) + len(head), len(base) + len(head) + len(call), code,
                       "an intrinsic inside an fn")
    head = "comp zz_bad(x: "
    nested = f"{{{t}@SERVER}}@CLIENTS"
    return _result(base + head + nested + f") -> {t}@SERVER = x\n", len(base) + len(head),
                   len(base) + len(head) + len(nested), code, "nested placements in a type annotation")


from fedlang.testing.generate import arguments, values  # noqa: E402  (re-exported: one module of strategies)
