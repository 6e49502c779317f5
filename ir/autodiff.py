"""Reverse-mode automatic differentiation as an IR transformation.

`grad(f)` and `value_and_grad(f)` (LANGUAGE.md section 5) become a new
`Function` built from f's graph: a copy of the forward computation, then the
backward pass emitted node by node from the primitives' derivative rules
(`Primitive.vjp` in fedlang.ir.primitives). Every backend and every pass sees
ordinary IR: no grad node survives.

How the forward copy is prepared
  * calls of functions known at compile time (a `global`, or a `closure` node)
    are inlined, recursively, so residuals are shared and callees need no
    separate derivative;
  * leaf-wise struct arithmetic (`m - lr * g`) is split into one node per leaf,
    so rules only see tensors and a scalar applied to every leaf receives the
    sum of its per-leaf cotangents by ordinary accumulation.

Cotangents
  A cotangent is None (a symbolic zero), a node id, or a tuple: for a struct
  value one entry per field, for a function value one entry per captured value
  (the closure's inputs). Tuples are turned into struct nodes (zeros filled
  in) only where a value is needed (`Emitter.materialize`). Cotangents of
  integer and bool leaves are never computed (only zeros appear there).

Loops (`reduce`, and `map`, and the internal `scan`)
  reduce(seq, init, f) is differentiated like JAX differentiates lax.scan:
    1. residuals: accs = scan(seq, init, (c, x) -> <f(c, x), c>) keeps the
       accumulator entering every step;
    2. a reverse scan runs over zip(accs, seq) with the carry
       <ct_acc, ct_captures>: its step function is f's own body (recomputed from
       acc_i, x_i) followed by f's backward pass, which turns ct_acc_{i+1} into
       ct_acc_i, adds the step's cotangents of f's captured values (the model a
       loss lambda captures) and yields the step's element cotangent (when the
       sequence itself depends on the parameter, e.g. it comes from `map`).
  The carry at the end holds the cotangent of `init` and of the function value
  (its captures). `map` is a forward scan over zip(seq, ct_ys) with the capture
  cotangents as carry; `scan` itself (so a gradient of a gradient) works like
  reduce with the step's `y` cotangents zipped in.
  Function values that a loop's function captures (a lambda using a lambda) are
  rebuilt inside the step function from their own captures, so calls through
  them are inlined there too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable

import numpy as np

from fedlang.diagnostics import Diagnostic, FedlangError, InternalCompilerError, Span
from fedlang.ir.avals import AVal
from fedlang.ir.graph import Function, Node, known_function
from fedlang.ir.primitives import PRIMITIVES, Primitive, TypeRuleError
from fedlang.ir.types import FLOAT_DTYPES, FunctionType, SequenceType, StructType, TensorType, Type

# Primitives that apply leaf by leaf to structs (their type rules accept struct operands).
LEAFWISE = frozenset({"add", "sub", "mul", "div", "mod", "pow", "neg", "relu", "sigmoid", "tanh", "exp", "log",
                      "sqrt", "abs", "square", "maximum", "minimum", "cast", "clip"})

# Nodes that are not operations: the leaves of a graph.
_LEAVES = frozenset({"param", "capture", "global", "const"})

# Inline calls of statically known functions while copying the forward graph
# (else the `call` rule differentiates them, recomputing the callee's forward).
INLINE_CALLS = True

_MAX_DEPTH = 200

Cotangent = Any          # None | int | tuple[Cotangent, ...]


def _error(message: str, span: Span | None, help: str | None = None) -> FedlangError:
    return FedlangError([Diagnostic("E053", message, span, help=help)])


def differentiable(t: Type) -> bool:
    """Whether a value of type `t` can carry a (non-zero) cotangent."""
    if isinstance(t, TensorType):
        return t.dtype in FLOAT_DTYPES
    if isinstance(t, StructType):
        return any(differentiable(f) for f in t.types)
    if isinstance(t, SequenceType):
        return differentiable(t.element)
    return isinstance(t, FunctionType)


# ---- entry point (called by fedlang.ir.build for grad / value_and_grad) --------------------------

def build_grad(builder, fn_node_id: int, prim_name: str, aval: AVal, span: Span | None, scope=None) -> int:
    """A `closure` node in `builder.f` whose function computes grad(f) or value_and_grad(f).

    `fn_node_id` is f: a `global` or a `closure` node of builder.f, or (given the
    builder's lexical `scope`) a `capture` of a lambda defined in an enclosing
    function. The gradient is with respect to f's first declared parameter."""
    outer = builder.f
    node = outer.node(fn_node_id)
    program = builder.module.program
    if scope is not None:
        fn_node_id = _resolve(builder, scope, fn_node_id)
        node = outer.node(fn_node_id)
    if node.prim.name == "global":
        name = node.attr("name")
        function = program.functions.get(name)
        prefix = builder.module.prefix
        if function is None and (not prefix or name.startswith(prefix + ".")):
            function = builder.module.function(name[len(prefix) + 1:] if prefix else name)
    elif node.prim.name == "closure":
        function = node.attr("function")
    else:
        raise _error("grad needs a function known at compile time", span,
                     help="pass a top-level `fn` by name or a lambda, not a function value")
    if function is None or function.result is None:
        raise InternalCompilerError(f"grad of {node.attr('name')!r}: the function is not built")
    plan = CapturePlan(Emitter(outer, program), node.inputs if node.prim.name == "closure" else ())
    g = grad_function(function, program, prim_name, aval.type.result, plan, span)
    return builder.add("closure", plan.sources, aval.type, span, function=g, arity=aval.arity)


def _resolve(builder, scope, nid: int) -> int:
    """Function value `nid` of builder.f with the function values it captures from
    enclosing functions (`let`-bound lambdas) rebuilt here, so they are known at
    compile time; `nid` itself when there is nothing to rebuild."""
    node = builder.f.node(nid)
    if node.prim.name == "capture" and isinstance(node.type, FunctionType):
        origin = _origin(scope, nid)
        return nid if origin is None else _localize(builder, scope, *origin)
    if node.prim.name == "closure":
        inputs = tuple(_resolve(builder, scope, i) for i in node.inputs)
        if inputs != node.inputs:
            return builder.f.add(_with_cloned_functions(node.with_inputs(inputs)))
    return nid


def _origin(scope, nid: int):
    """(owner scope, node) in the enclosing function that capture `nid` of scope's
    function holds. Reads the IR builder's scopes (fedlang.ir.build._Scope):
    `root.captured` maps (id(owner function), owner node) to the capture node."""
    for (owner_id, owner_nid), local in scope.root.captured.items():
        if local == nid:
            owner = scope.root.parent
            while owner is not None and id(owner.function) != owner_id:
                owner = owner.parent
            return None if owner is None else (owner, owner_nid)
    return None


def _localize(builder, scope, owner, nid: int) -> int:
    """Node `nid` of an enclosing function as a node of builder.f: function values
    known there are rebuilt (closures from their localized inputs), others captured."""
    node = owner.function.node(nid)
    kind = node.prim.name
    if kind == "closure":
        inputs = tuple(_localize(builder, scope, owner, i) for i in node.inputs)
        return builder.f.add(_with_cloned_functions(node.with_inputs(inputs)))
    if kind == "global":
        return builder.f.add(node)
    if kind == "capture" and isinstance(node.type, FunctionType):
        origin = _origin(owner, nid)
        if origin is not None:
            return _localize(builder, scope, *origin)
    return scope.local(owner, nid)


def grad_function(function: Function, program, prim_name: str = "grad", result_type: Type | None = None,
                  plan: "CapturePlan | None" = None, span: Span | None = None) -> Function:
    """A new function with `function`'s parameters (and the captures of `plan`)
    computing grad(function) or value_and_grad(function) w.r.t. the first parameter."""
    if not function.params:
        raise InternalCompilerError("grad of a function without parameters")
    wrt = function.params[0][1]
    if result_type is None:
        result_type = wrt if prim_name == "grad" else StructType(((None, function.result_type), (None, wrt)))
    g = Function(f"{function.name}.{prim_name}", function.params, result_type,
                 captures=plan.capture_types() if plan else (), span=span)
    em = Emitter(g, program, span)
    params = [em.typed("param", (), t, index=i) for i, (_, t) in enumerate(function.params)]
    captures = plan.instantiate(em) if plan else []
    value = em.copy(function, params, captures)
    one = em.typed("const", (), function.result_type, value=np.asarray(1, np.dtype(function.result_type.dtype)))
    cts = em.backward(em.since(0), {params[0]}, {value: one})
    gradient = em.materialize(cts.get(params[0]), params[0])
    if prim_name == "grad":
        g.result = gradient
    else:
        g.result = em.typed("struct", (value, gradient), result_type, names=(None, None))
    return g


# ---- capture plans: the values a nested function needs, function values rebuilt ----------------

class CapturePlan:
    """How to give a new function the values of some nodes of the enclosing one.

    Plain values become captures (`sources`, deduplicated); `closure` and `global`
    nodes are rebuilt inside the new function from their own (captured) inputs,
    and constants are copied, so calls through them stay statically known."""

    def __init__(self, outer: "Emitter", ids: Iterable[int]):
        self.outer = outer
        self.sources: list[int] = []
        self.trees = [self._plan(i) for i in ids]

    def _plan(self, nid: int):
        node = self.outer.node(nid)
        kind = node.prim.name
        if kind == "closure":
            return ("closure", nid, [self._plan(i) for i in node.inputs])
        if kind in ("global", "const"):
            return ("copy", nid)
        if nid not in self.sources:
            self.sources.append(nid)
        return ("value", self.sources.index(nid))

    def capture_types(self) -> tuple[tuple[str, Type], ...]:
        return tuple((f"c{k}", self.outer.type(s)) for k, s in enumerate(self.sources))

    def active(self) -> list[int]:
        """Indices of the captures that may carry a cotangent."""
        return [k for k, s in enumerate(self.sources) if self.outer.is_active(s)]

    def instantiate(self, em: "Emitter") -> list[int]:
        """Inside the new function: one node per planned id (captures first, in order)."""
        self.captured = [em.typed("capture", (), self.outer.type(s), index=k) for k, s in enumerate(self.sources)]

        def build(tree):
            if tree[0] == "value":
                return self.captured[tree[1]]
            node = self.outer.node(tree[1])
            if tree[0] == "copy":
                return em.add(node)
            return em.add(_with_cloned_functions(node.with_inputs(tuple(build(t) for t in tree[2]))))

        return [build(t) for t in self.trees]

    def cotangents(self, flat: dict[int, Cotangent]) -> list[Cotangent]:
        """Per planned id, the cotangent (a tuple for a function value) from the
        captures' cotangents `flat`; each capture's is given once (no double counting)."""
        given: set[int] = set()

        def build(tree):
            if tree[0] == "value":
                if tree[1] in given:
                    return None
                given.add(tree[1])
                return flat.get(tree[1])
            if tree[0] == "copy":
                return None
            parts = tuple(build(t) for t in tree[2])
            return parts if any(p is not None for p in parts) else None

        return [build(t) for t in self.trees]


# ---- the emitter: adds nodes to the function being built ------------------------------------------

class Emitter:
    """Adds nodes to `function`; the `emit` of the derivative rules.

    `emit(prim, *inputs, **statics)` adds a node whose type comes from the
    primitive's type rule; inputs are node ids (ints) or Python floats, which
    become weak literals (literal-only arithmetic is folded). The other methods
    are the services rules use."""

    def __init__(self, function: Function, program, span: Span | None = None):
        self.f, self.program, self.span = function, program, span
        self.active: set[int] = set()
        self._selects: dict[tuple[int, int], int] = {}
        self._log: list[int] = []

    # -- reading ----------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self.f.node(nid)

    def type(self, nid: int) -> Type:
        return self.f.node(nid).type

    def rank(self, nid: int) -> int:
        return self.type(nid).rank

    def literal(self, nid: int):
        """The Python number of a weak literal node, else None."""
        node = self.f.node(nid)
        return node.attr("value") if node.prim.name == "const" and node.attr("weak") else None

    def is_active(self, nid: int) -> bool:
        return nid in self.active

    def aval(self, nid: int) -> AVal:
        value = self.literal(nid)
        if value is None:
            return AVal(self.type(nid))
        return AVal(self.type(nid), weak="float" if isinstance(value, float) else "int")

    # -- adding -----------------------------------------------------------------------
    def add(self, node: Node) -> int:
        nid = self.f.add(node)
        self._log.append(nid)
        return nid

    def mark(self) -> int:
        return len(self._log)

    def since(self, mark: int) -> list[int]:
        return self._log[mark:]

    def typed(self, name: str, inputs: Iterable[int], t: Type, **attrs) -> int:
        """A node of an explicitly given type (structural primitives)."""
        return self.add(Node(PRIMITIVES[name], tuple(inputs), t, tuple(attrs.items()), self.span))

    def const(self, value: int | float) -> int:
        kind = "float" if isinstance(value, float) else "int"
        return self.typed("const", (), TensorType("float32" if kind == "float" else "int32"), value=value, weak=True)

    def __call__(self, name: str, *inputs, **statics) -> int:
        p: Primitive = PRIMITIVES[name]
        ids = [self.const(v) if isinstance(v, float) else v for v in inputs]   # floats are literals, ints ids
        value_params = [q for q in p.params if q.kind == "value"]
        attrs = {q.name: statics.pop(q.name, q.default) for q in p.params if q.kind != "value"}
        if statics:
            raise InternalCompilerError(f"{name}: unknown static arguments {sorted(statics)}")
        avals = [self.aval(i) for i in ids]
        try:
            if p.variadic:
                fixed = len(value_params) - 1
                aval = p.type_rule(*avals[:fixed], *avals[fixed:], **attrs)
            else:
                kwargs = {q.name: (avals[k] if k < len(avals) else None) for k, q in enumerate(value_params)}
                aval = p.type_rule(**kwargs, **attrs)
        except TypeRuleError as error:
            raise InternalCompilerError(f"autodiff built an ill-typed {name} node: {error.message} "
                                        f"({', '.join(str(a.type) for a in avals)})") from None
        if aval.weak and ids and all(self.literal(i) is not None for i in ids) and p.impl is not None:
            folded = p.impl(*(self.literal(i) for i in ids), **attrs)
            folded = folded.item() if isinstance(folded, (np.generic, np.ndarray)) else folded
            return self.const(float(folded) if aval.weak == "float" else int(folded))
        if not p.variadic:
            attrs["args"] = tuple(q.name for q in value_params[:len(ids)])
        return self.add(Node(p, tuple(ids), aval.type, tuple(attrs.items()), self.span))

    # -- structs ------------------------------------------------------------------------
    def select(self, nid: int, index: int) -> int:
        key = (nid, index)
        if key not in self._selects:
            t = self.type(nid)
            self._selects[key] = self.typed("select", (nid,), t.types[index], index=index)
        return self._selects[key]

    def struct(self, ids: list[int], t: StructType) -> int:
        return self.typed("struct", ids, t, names=t.names)

    def leaves(self, nid: int) -> list[int]:
        """The tensors of a struct value (or the tensor itself), as nodes."""
        t = self.type(nid)
        if isinstance(t, StructType):
            return [leaf for k in range(len(t.fields)) for leaf in self.leaves(self.select(nid, k))]
        return [nid]

    # -- cotangent algebra --------------------------------------------------------------
    def unbroadcast(self, ct: int, like: int) -> int:
        """`ct` summed down to the shape of `like` (undoing NumPy broadcasting)."""
        ct_type, like_type = self.type(ct), self.type(like)
        if ct_type.shape == like_type.shape and None not in like_type.shape:
            return ct
        return self("unbroadcast", ct, like)

    def zeros(self, like: int) -> int:
        """A zero cotangent shaped like the value `like`."""
        t = self.type(like)
        if isinstance(t, TensorType):
            return self("zeros_like", like)
        if isinstance(t, StructType):
            if all(isinstance(leaf, TensorType) for leaf in _leaf_types(t)):
                return self("zeros_like", like)
            return self.struct([self.zeros(self.select(like, k)) for k in range(len(t.fields))], t)
        if isinstance(t, SequenceType):
            return self.map_with(like, t.element, lambda em, x: em.zeros(x))
        raise _error(f"grad cannot build a zero cotangent for a value of type {t}", self.span)

    def materialize(self, ct: Cotangent, like: int) -> int:
        """The cotangent `ct` of value `like` as one node (zeros where it is None)."""
        if ct is None:
            return self.zeros(like)
        if not isinstance(ct, tuple):
            return ct
        t = self.type(like)
        if not isinstance(t, StructType):
            raise _error(f"grad cannot pass the derivative of a function value ({t}) through here", self.span,
                         help="call the function instead of storing it in a struct, a condition or a loop")
        return self.struct([c if isinstance(c, int) else self.materialize(c, self.select(like, k))
                            for k, c in enumerate(ct)], t)

    def accumulate(self, a: Cotangent, b: Cotangent) -> Cotangent:
        """a + b for cotangents (None is zero)."""
        if a is None:
            return b
        if b is None:
            return a
        if isinstance(a, tuple) or isinstance(b, tuple):
            a, b = self._split(a, b), self._split(b, a)
            return tuple(self.accumulate(x, y) for x, y in zip(a, b))
        t = self.type(a)
        if isinstance(t, TensorType):
            return self("add", a, b) if t.dtype in FLOAT_DTYPES else a
        if isinstance(t, StructType):
            return tuple(self.accumulate(self.select(a, k), self.select(b, k)) for k in range(len(t.fields)))
        if isinstance(t, SequenceType):
            pair = StructType(((None, t.element), (None, t.element)))
            return self.map_with(self("zip_seq", a, b), pair,
                                 lambda em, p: em.materialize(em.accumulate(em.select(p, 0), em.select(p, 1)),
                                                              em.select(p, 0)))
        raise InternalCompilerError(f"cannot add cotangents of type {t}")

    def _split(self, ct: Cotangent, other: Cotangent) -> tuple:
        if isinstance(ct, tuple):
            return ct
        return tuple(self.select(ct, k) for k in range(len(other)))

    # -- nested functions ---------------------------------------------------------------------
    def new_function(self, name: str, params: list[tuple[str, Type]], plan: CapturePlan | None = None):
        """An empty function and its emitter (with param nodes, and the plan's values)."""
        g = Function(f"{self.f.name}.{name}", tuple(params), StructType(()),
                     captures=plan.capture_types() if plan else (), span=self.span)
        em = Emitter(g, self.program, self.span)
        param_ids = [em.typed("param", (), t, index=k) for k, (_, t) in enumerate(params)]
        planned = plan.instantiate(em) if plan else []
        return g, em, param_ids, planned

    def finish(self, g: Function, em: "Emitter", result: int) -> None:
        g.result = result
        g.result_type = em.type(result)

    def map_with(self, seq: int, element: Type, body: Callable[["Emitter", int], int]) -> int:
        """map(seq, fn(x) -> body(x)) with the body built by a Python callback."""
        g, em, (x,), _ = self.new_function("map", [("x", element)])
        self.finish(g, em, body(em, x))
        return self("map", seq, self.typed("closure", (), g.type, function=g, arity=("x",)))

    def map_select(self, seq: int, index: int) -> int:
        element = self.type(seq).element
        return self.map_with(seq, element, lambda em, p: em.select(p, index))

    # -- copying a forward graph ---------------------------------------------------------------
    def copy(self, source: Function, params: list[int], captures: list[int], depth: int = 0) -> int:
        """Copy `source`'s graph here (its params and captures are the given nodes),
        inlining calls of known functions and splitting leaf-wise struct operations.
        Returns the id of the copied result."""
        if depth > _MAX_DEPTH:
            raise _error("grad: calls nest too deeply", source.span)
        mapped: dict[int, int] = {}
        for nid, node in source.nodes():
            kind = node.prim.name
            if kind == "param":
                mapped[nid] = params[node.attr("index")]
                continue
            if kind == "capture":
                mapped[nid] = captures[node.attr("index")]
                continue
            inputs = tuple(mapped[i] for i in node.inputs)
            self.span = node.span
            if kind == "call" and INLINE_CALLS:
                known = self.known_function(inputs[0])
                if known is not None:
                    callee, callee_captures = known
                    args = self.bind(callee, list(inputs[1:]))
                    mapped[nid] = self.copy(callee, args, callee_captures, depth + 1)
                    continue
            if kind in LEAFWISE and isinstance(node.type, StructType):
                mapped[nid] = self._split_leafwise(node, inputs, node.type)
                continue
            mapped[nid] = self.add(_with_cloned_functions(node.with_inputs(inputs)))
        return mapped[source.result]

    def _split_leafwise(self, node: Node, inputs: tuple[int, ...], t: StructType) -> int:
        fields = []
        for k, (_, ft) in enumerate(t.fields):
            parts = tuple(self.select(i, k) if isinstance(self.type(i), StructType) else i for i in inputs)
            if isinstance(ft, StructType):
                fields.append(self._split_leafwise(node, parts, ft))
            else:
                fields.append(self.add(replace(node, inputs=parts, type=ft)))
        return self.struct(fields, t)

    def known_function(self, nid: int) -> tuple[Function, list[int]] | None:
        """(function, its captured values) of a function value known here, else None."""
        return known_function(self.f, nid, self.program)

    def bind(self, function: Function, args: list[int]) -> list[int]:
        """Call arguments -> parameter values (TFF's struct packing and unpacking)."""
        n = len(function.params)
        if len(args) == n:
            return args
        if n == 1:
            t = function.params[0][1]
            return [self.struct(args, t if isinstance(t, StructType) else StructType(tuple((None, self.type(a))
                                                                                           for a in args)))]
        if len(args) == 1 and isinstance(self.type(args[0]), StructType):
            return [self.select(args[0], k) for k in range(n)]
        raise InternalCompilerError(f"{function.name} takes {n} arguments, got {len(args)}")

    # -- the backward pass ---------------------------------------------------------------------
    def backward(self, forward: list[int], seeds: set[int], cts: dict[int, Cotangent]) -> dict[int, Cotangent]:
        """Propagate cotangents `cts` back through the nodes `forward` (in order).

        `seeds` are the values differentiated against; a node is active when it
        depends on one and its type can carry a cotangent. Returns every
        cotangent found, the seeds' included."""
        self.active |= set(seeds)
        for nid in forward:
            node = self.node(nid)
            if node.prim.name not in _LEAVES and any(i in self.active for i in node.inputs) \
                    and differentiable(node.type):
                self.active.add(nid)
        for nid in reversed(forward):
            if nid not in self.active or nid not in cts or nid in seeds:
                continue
            node = self.node(nid)
            if node.prim.name in _LEAVES:
                continue
            wants = tuple(i in self.active for i in node.inputs)
            rule = node.prim.vjp
            if rule is None:
                raise _error(f"grad cannot differentiate through `{node.prim.name}`", node.span,
                             help="the value it computes depends on the parameter being differentiated")
            self.span = node.span
            ct = cts.pop(nid)
            input_cts = rule(self, nid, node, ct, wants)
            if len(input_cts) != len(node.inputs):
                raise InternalCompilerError(f"the vjp of {node.prim.name} gives {len(input_cts)} cotangents "
                                            f"for {len(node.inputs)} inputs")
            for i, c in zip(node.inputs, input_cts):
                if c is not None and i in self.active:
                    cts[i] = self.accumulate(cts.get(i), c)
        return cts

    # -- services for the rules of structural primitives -------------------------------------------
    def call_vjp(self, out: int, node: Node, ct: Cotangent, wants) -> tuple:
        """Rule of `call` (calls not inlined while copying): recompute the callee here
        and run its backward pass."""
        known = self.known_function(node.inputs[0])
        if known is None:
            raise _error("grad cannot differentiate a call of a function value not known at compile time",
                         node.span, help="call a top-level `fn` or a lambda directly")
        callee, captures = known
        args = list(node.inputs[1:])
        self._selects.clear()       # the copy's selects must be new nodes, part of the copied forward
        start = self.mark()
        bound = self.bind(callee, args)
        result = self.copy(callee, bound, captures)
        seeds = {i for i in args + captures if i in self.active}
        cts = self.backward(self.since(start), seeds, {result: ct})
        given: set[int] = set()

        def once(i):
            if i in given:
                return None
            given.add(i)
            return cts.get(i)

        arg_cts = [once(a) for a in args]
        if self.node(node.inputs[0]).prim.name == "closure":
            parts = tuple(once(c) for c in captures)
            fn_ct = parts if any(p is not None for p in parts) else None
        else:
            fn_ct = None
        return (fn_ct, *arg_cts)

    def loop_vjp(self, kind: str, out: int, node: Node, ct: Cotangent, wants) -> tuple:
        """Rules of reduce, scan and map (see the module docstring)."""
        if kind == "map":
            seq, fnode = node.inputs
            init = None
            reverse = False
        else:
            seq, init, fnode = node.inputs
            reverse = bool(node.attr("reverse", 0))
        known = self.known_function(fnode)
        if known is None:
            raise _error(f"grad cannot differentiate {kind} with a function value not known at compile time",
                         node.span, help="pass a top-level `fn` or a lambda")
        g, _ = known
        plan = CapturePlan(self, self.node(fnode).inputs if self.node(fnode).prim.name == "closure" else ())
        active_caps = plan.active()
        seq_type: SequenceType = self.type(seq)
        want_seq = wants[0]
        # the cotangents arriving: of the carry (reduce, scan) and of the ys (scan, map)
        ct_carry = ct_ys = carry_type = None
        if kind == "reduce":
            ct_carry, carry_type = ct, self.type(out)
        elif kind == "scan":
            ct_carry, ct_ys = ct if isinstance(ct, tuple) else (self.select(ct, 0), self.select(ct, 1))
            carry_type = self.type(out).types[0]
        else:
            ct_ys = ct
        if kind != "map":
            ct_carry_node = self.materialize(ct_carry, out if kind == "reduce" else self.select(out, 0))
        if ct_ys is not None:
            ct_ys = self.materialize(ct_ys, self.select(out, 1) if kind == "scan" else out)

        # 1. residuals: the carry entering every step
        elements = []
        if kind != "map":
            accs = self._residual_carries(kind, seq, init, fnode, g, carry_type, seq_type.element, reverse)
            elements.append(accs)
        elements.append(seq)
        if ct_ys is not None:
            elements.append(ct_ys)
        zipped = self("zip_seq", *elements)

        # 2. the backward step: (state=<ct_carry?, ct_caps>, elem=<carry_i?, x_i, ct_y_i?>) -> <state, ct_x>
        caps_type = StructType(tuple((None, self.type(plan.sources[k])) for k in active_caps))
        state_fields = ([(None, carry_type)] if kind != "map" else []) + [(None, caps_type)]
        state_type = StructType(tuple(state_fields))
        elem_type = self.type(zipped).element
        step, em, (state, elem), planned = self.new_function(f"{kind}_vjp", [("state", state_type),
                                                                           ("elem", elem_type)], plan)
        k = 0
        carry_i = None
        if kind != "map":
            carry_i, k = em.select(elem, 0), 1
        x_i = em.select(elem, k)
        args = [carry_i, x_i] if kind != "map" else [x_i]
        bound = em.bind(g, args)
        result = em.copy(g, bound, planned)
        if kind == "reduce":
            result_ct = em.select(state, 0)
        elif kind == "scan":
            result_ct = (em.select(state, 0), em.select(elem, k + 1) if ct_ys is not None else None)
        else:
            result_ct = em.select(elem, k + 1)
        seeds = {plan.captured[c] for c in active_caps}
        if carry_i is not None:
            seeds.add(carry_i)
        if want_seq:
            seeds.add(x_i)
        cts = em.backward(em.since(0), seeds, {result: result_ct})
        old_caps = em.select(state, len(state_fields) - 1)
        new_caps = [em.materialize(em.accumulate(cts.get(plan.captured[c]), em.select(old_caps, j)),
                                   plan.captured[c]) for j, c in enumerate(active_caps)]
        new_state = ([em.materialize(cts.get(carry_i), carry_i)] if carry_i is not None else []) \
            + [em.struct(new_caps, caps_type)]
        y = em.materialize(cts.get(x_i), x_i) if want_seq else em.struct([], StructType(()))
        state_out = em.struct(new_state, state_type)
        self.finish(step, em, em.struct([state_out, y], StructType(((None, state_type), (None, em.type(y))))))

        # 3. run it, last step first for reduce and scan
        init_state = ([ct_carry_node] if kind != "map" else []) \
            + [self.struct([self.zeros(plan.sources[c]) for c in active_caps], caps_type)]
        fn = self.typed("closure", plan.sources, step.type, function=step, arity=("state", "elem"))
        swept = self("scan", zipped, self.struct(init_state, state_type), fn,
                     reverse=int(not reverse) if kind != "map" else 0)
        final = self.select(swept, 0)
        caps = self.select(final, len(state_fields) - 1)
        fn_ct = tuple(plan.cotangents({c: self.select(caps, j) for j, c in enumerate(active_caps)}))
        fn_ct = fn_ct if any(c is not None for c in fn_ct) else None
        seq_ct = self.select(swept, 1) if want_seq else None
        if kind == "map":
            return seq_ct, fn_ct
        return seq_ct, self.select(final, 0) if wants[1] else None, fn_ct

    def _residual_carries(self, kind, seq, init, fnode, g, carry_type, element, reverse) -> int:
        """scan(seq, init, (c, x) -> <next carry, c>): the carry entering every step."""
        fw, em, (c, x), _ = self.new_function(f"{kind}_residuals", [("c", carry_type), ("x", element)])
        fn = em.typed("capture", (), self.type(fnode), index=0)
        fw.captures = (("f", self.type(fnode)),)
        nxt = em.typed("call", (fn, c, x), g.result_type)
        if kind == "scan":
            nxt = em.select(nxt, 0)
        self.finish(fw, em, em.struct([nxt, c], StructType(((None, carry_type), (None, carry_type)))))
        closure = self.typed("closure", (fnode,), fw.type, function=fw, arity=("c", "x"))
        return self.select(self("scan", seq, init, closure, reverse=int(reverse)), 1)


def clone(function: Function) -> Function:
    """A copy of `function` (node ids kept) whose nested functions are copies too:
    every nested function belongs to exactly one closure node."""
    g = Function(function.name, function.params, function.result_type, federated=function.federated,
                 captures=function.captures, result=function.result, span=function.span)
    for nid in function.graph.nodes:
        g.graph.add_node(nid, node=_with_cloned_functions(function.node(nid)))
    for source, target, data in function.graph.edges(data=True):
        g.graph.add_edge(source, target, positions=list(data.get("positions", ())))
    return g


def _with_cloned_functions(node: Node) -> Node:
    if not any(isinstance(v, Function) for _, v in node.attrs):
        return node
    return replace(node, attrs=tuple((k, clone(v) if isinstance(v, Function) else v) for k, v in node.attrs))


def _leaf_types(t: Type):
    if isinstance(t, StructType):
        for f in t.types:
            yield from _leaf_types(f)
    else:
        yield t
