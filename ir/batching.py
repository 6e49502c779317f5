"""Vectorizing over clients: `vectorize(function, batched_params, program)` is JAX's vmap on fedlang IR.

The local simulator runs a client phase for all selected clients at once
(DESIGN.md, Runtimes): the phase's local function is rewritten node by node into
one whose batched parameters carry a leading client axis C and whose result
carries one, with each primitive's batching rule (`Primitive.batch` in
fedlang.ir.primitives, next to its type rule, implementation and derivative
rule). Nodes that depend on no batched value stay as they are, so a model
broadcast to every client is used once, not copied C times.

Batching states
  Every value of the function being built has a state that says how it is batched:
    False           the same for every client: not batched
    True            every leaf carries the client axis: a tensor T[d..] is T[C,d..]
                    (C is `?` in types); a sequence is one of batched elements
    (s1, .., sn)    a struct whose fields are batched independently (one state each)
    SeqBatch(e, L)  a sequence of elements batched as `e` says: one element per step,
                    all clients stepping together. With lengths L (the id of an
                    int32[C] node) client c has only its first L[c] elements and the
                    rest is padding: the step mask is `t < L[c]`.
  A function value is batched when a value it captures is. Calls of functions known
  at compile time (a `global`, a `closure` node) are inlined, vectorized with the
  states of their arguments; a call of another function value is NotVectorizable.

Loops
  reduce, scan and map get a new step function: the callee vectorized with the
  states of the accumulator and of the elements. The accumulator's state is a fixed
  point (a batched element makes an unbatched accumulator batched after one step),
  and `init` is broadcast to it. With lengths, the accumulator is batched and the
  step also counts steps: it keeps the old accumulator where the step is padding,
  `where(t < L, f(acc, e_t), acc)` leaf by leaf, so a client with fewer elements
  stops changing its accumulator. It is all ordinary IR (reduce over a carry
  <acc, t>), so autodiff and every backend see nothing new.

Ragged client data
  `vectorize(..., ragged=True)` gives every batched sequence parameter the type
  `<elements=E*, lengths=int32[?]>` (E batched) and a ragged sequence result the
  same type. `stack_clients(values, ragged=True)` builds such values from
  per-client lists (a client's missing steps are another client's element of that
  step, so padding has real shapes and ordinary values); `unstack_clients` undoes
  stacking. Without `ragged` every client must have the same number of elements,
  and where the vectorized function needs the number of clients and only a
  sequence can tell it, an empty sequence is a run-time error.

Limits
  NotVectorizable (the runtime then runs the phase client by client): a call of,
  or a loop over, a function value not known at compile time (a parameter of
  function type) with batched arguments; a condition that differs between
  clients choosing between sequences or function values; sequences with
  different per-client lengths meeting in one value. Within one step of a
  sequence every client's element has the same shape: ragged batch sizes
  (different numbers of examples at the same step) are not padded here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import networkx as nx
import numpy as np

from fedlang.diagnostics import InternalCompilerError
from fedlang.ir.autodiff import Emitter, clone
from fedlang.ir.graph import Function, Node, Program, known_function
from fedlang.ir.types import FunctionType, SequenceType, StructType, TensorType, Type
from fedlang.ir.values import Struct

# The fields of a ragged sequence value: the padded elements and the per-client lengths.
RAGGED_FIELDS = ("elements", "lengths")

_INT32 = TensorType("int32")
_LENGTHS = TensorType("int32", (None,))
_BINDINGS = frozenset({"param", "capture"})
_MAX_DEPTH = 64


class NotVectorizable(Exception):
    """A function the vectorizer cannot batch; the runtime runs it client by client."""


@dataclass(frozen=True, slots=True)
class SeqBatch:
    """The state of a sequence: its elements' state and maybe per-client lengths (a node id)."""

    element: Any
    lengths: int | None = None


# ---- states ------------------------------------------------------------------------------------

def is_batched(state: Any) -> bool:
    """Whether a value in `state` differs between clients somewhere."""
    if isinstance(state, SeqBatch):
        return state.lengths is not None or is_batched(state.element)
    if isinstance(state, tuple):
        return any(is_batched(s) for s in state)
    return bool(state)


def field_state(state: Any, k: int) -> Any:
    """The state of field k of a struct in `state`."""
    return state[k] if isinstance(state, tuple) else state


def seq_state(state: Any) -> SeqBatch:
    return state if isinstance(state, SeqBatch) else SeqBatch(bool(state))


def canon(state: Any, t: Type) -> Any:
    """The one spelling of a state for type `t`: False, True, a tuple or a SeqBatch."""
    if isinstance(t, StructType):
        fields = tuple(canon(field_state(state, k), f) for k, f in enumerate(t.types))
        if all(f is False for f in fields):
            return False
        if all(f is True for f in fields):
            return True
        return fields
    if isinstance(t, SequenceType):
        s = seq_state(state)
        element = canon(s.element, t.element)
        if s.lengths is None and isinstance(element, bool):
            return element
        return SeqBatch(element, s.lengths)
    return is_batched(state)


def join(a: Any, b: Any, t: Type) -> Any:
    """The least state at least as batched as `a` and `b`."""
    if isinstance(t, StructType):
        return canon(tuple(join(field_state(a, k), field_state(b, k), f) for k, f in enumerate(t.types)), t)
    if isinstance(t, SequenceType):
        sa, sb = seq_state(a), seq_state(b)
        if sa.lengths != sb.lengths:
            raise NotVectorizable("sequences with different per-client lengths meet (a condition or a loop carry)")
        return canon(SeqBatch(join(sa.element, sb.element, t.element), sa.lengths), t)
    return is_batched(a) or is_batched(b)


def batched_type(t: Type, state: Any) -> Type:
    """The type of a value of unbatched type `t` in `state` (lengths are separate nodes)."""
    if isinstance(t, TensorType):
        return TensorType(t.dtype, (None,) + t.shape) if is_batched(state) else t
    if isinstance(t, StructType):
        return StructType(tuple((n, batched_type(f, field_state(state, k))) for k, (n, f) in enumerate(t.fields)))
    if isinstance(t, SequenceType):
        return SequenceType(batched_type(t.element, seq_state(state).element))
    if isinstance(t, FunctionType) and is_batched(state):
        raise NotVectorizable(f"a function value {t} that differs between clients cannot be a parameter")
    return t


def _full(t: Type, state: Any) -> Any:
    """`state` with every leaf batched (a sequence keeps its lengths)."""
    if isinstance(t, StructType):
        return canon(tuple(_full(f, field_state(state, k)) for k, f in enumerate(t.types)), t)
    if isinstance(t, SequenceType):
        s = seq_state(state)
        return canon(SeqBatch(_full(t.element, s.element), s.lengths), t)
    if isinstance(t, FunctionType):
        raise NotVectorizable(f"a function value {t} cannot carry a client axis")
    return True


def _lengths_in(state: Any) -> Iterator[int]:
    if isinstance(state, SeqBatch):
        if state.lengths is not None:
            yield state.lengths
        yield from _lengths_in(state.element)
    elif isinstance(state, tuple):
        for s in state:
            yield from _lengths_in(s)


def _remap(state: Any, local: dict[int, int]) -> Any:
    """`state` with its lengths nodes replaced by their copies in another function."""
    if isinstance(state, SeqBatch):
        return SeqBatch(_remap(state.element, local), None if state.lengths is None else local[state.lengths])
    if isinstance(state, tuple):
        return tuple(_remap(s, local) for s in state)
    return state


# ---- the entry point -----------------------------------------------------------------------------

def vectorize(function: Function, batched_params: tuple[bool, ...], program: Program,
              ragged: bool = False) -> Function:
    """A new function computing `function` for all clients at once (vmap).

    Parameter k is batched when `batched_params[k]` is True: every leaf of it has a
    leading client axis (a sequence: every element; with `ragged`, a sequence is
    `<elements=E*, lengths=int32[?]>`, see the module docstring); the others are the
    same for every client. The result has the client axis on every leaf. Nodes that
    depend on no batched value are copied as they are."""
    if len(batched_params) != len(function.params):
        raise ValueError(f"{function.name} has {len(function.params)} parameters; "
                         f"batched_params gives {len(batched_params)} flags")
    if function.federated:
        raise NotVectorizable(f"{function.name} is a comp: its client phases are vectorized, not the comp")
    layout = tuple((n, _param_layout(t, b, ragged)) for (n, t), b in zip(function.params, batched_params))
    g = Function(f"{function.name}.batched", layout, StructType(()), captures=function.captures, span=function.span)
    em = BatchEmitter(g, program, span=function.span)
    params = []
    for k, ((_, t), b) in enumerate(zip(function.params, batched_params)):
        nid = em.typed("param", (), layout[k][1], index=k)
        params.append(em.record(*_unpack(em, nid, t, bool(b), ragged)))
    captures = [em.record(em.typed("capture", (), t, index=k), False) for k, (_, t) in enumerate(function.captures)]
    result, state = em.run(function, params, captures)
    result = em.broadcast_state(result, state, _full(function.result_type, state))
    result = _pack(em, result, em.state(result))
    g.result, g.result_type = result, em.type(result)
    _prune(g)
    return g


def _param_layout(t: Type, batched: bool, ragged: bool) -> Type:
    if not batched:
        return t
    if isinstance(t, TensorType):
        return TensorType(t.dtype, (None,) + t.shape)
    if isinstance(t, StructType):
        return StructType(tuple((n, _param_layout(f, True, ragged)) for n, f in t.fields))
    if isinstance(t, SequenceType):
        elements = SequenceType(_param_layout(t.element, True, False))
        return StructType(((RAGGED_FIELDS[0], elements), (RAGGED_FIELDS[1], _LENGTHS))) if ragged else elements
    raise NotVectorizable(f"a parameter of type {t} cannot be batched")


def _has_sequence(t: Type) -> bool:
    return isinstance(t, SequenceType) or (isinstance(t, StructType) and any(_has_sequence(f) for f in t.types))


def _unpack(em: "BatchEmitter", nid: int, t: Type, batched: bool, ragged: bool) -> tuple[int, Any]:
    """A batched parameter as a value of the function: ragged sequences become their
    elements, with the lengths node in the state."""
    if not batched:
        return nid, False
    if not ragged or not _has_sequence(t):
        return nid, True
    if isinstance(t, SequenceType):
        lengths, _ = em.record(em.select(nid, 1), True)
        return em.select(nid, 0), SeqBatch(True, lengths)
    parts = [em.record(*_unpack(em, em.select(nid, k), f, True, ragged)) for k, f in enumerate(t.types)]
    st = StructType(tuple((n, em.type(p)) for (n, _), (p, _) in zip(t.fields, parts)))
    return em.struct([p for p, _ in parts], st), tuple(s for _, s in parts)


def _pack(em: "BatchEmitter", nid: int, state: Any) -> int:
    """The inverse of _unpack for a result: a ragged sequence as <elements, lengths>."""
    if not any(True for _ in _lengths_in(state)):
        return nid
    t = em.type(nid)
    if isinstance(t, SequenceType):
        s = seq_state(state)
        if any(True for _ in _lengths_in(s.element)):
            raise NotVectorizable("a result holds ragged sequences inside a sequence")
        return em.struct([nid, s.lengths], StructType(((RAGGED_FIELDS[0], t), (RAGGED_FIELDS[1], _LENGTHS))))
    fields = [_pack(em, em.select(nid, k), field_state(state, k)) for k in range(len(t.fields))]
    return em.struct(fields, StructType(tuple((n, em.type(f)) for (n, _), f in zip(t.fields, fields))))


def _prune(g: Function) -> None:
    """Drop nodes the result does not use (parameters and captures stay)."""
    keep = nx.ancestors(g.graph, g.result) | {g.result}
    dead = [n for n in g.graph if n not in keep and g.node(n).prim.name not in _BINDINGS]
    g.graph.remove_nodes_from(dead)


def _cloned(node: Node) -> Node:
    if not any(isinstance(v, Function) for _, v in node.attrs):
        return node
    return replace(node, attrs=tuple((k, clone(v) if isinstance(v, Function) else v) for k, v in node.attrs))


# ---- the emitter: the `emit` of batching rules -----------------------------------------------------

class BatchEmitter(Emitter):
    """Builds one vectorized function; the `emit` of the batching rules.

    An autodiff Emitter (`emit(prim, *inputs, **statics)` adds a node typed by the
    primitive's type rule) that knows the batching state of every value it holds,
    with the services the rules use."""

    def __init__(self, function: Function, program: Program, depth: int = 0, span=None):
        super().__init__(function, program, span)
        self.depth = depth
        self.states: dict[int, Any] = {}
        self.origin: dict[int, tuple[Function, list[int]]] = {}   # batched closure -> (function, captures)
        self._bindings: tuple[list, list] = ([], [])
        self._witness: int | None = None
        self._aligned: dict[tuple[int, int], int] = {}

    def __call__(self, name: str, *inputs, **statics) -> int:
        try:
            return super().__call__(name, *inputs, **statics)
        except InternalCompilerError as error:
            raise InternalCompilerError(str(error).replace("autodiff built", "vectorize built")) from None

    # -- states -----------------------------------------------------------------------------
    def state(self, nid: int) -> Any:
        return self.states.get(nid, False)

    def record(self, nid: int, state: Any) -> tuple[int, Any]:
        state = canon(state, self.type(nid))
        self.states[nid] = state
        return nid, state

    is_batched = staticmethod(is_batched)
    field_state = staticmethod(field_state)

    def fail(self, message: str):
        raise InternalCompilerError(f"vectorize: {message} (this is a bug in fedlang)")

    # -- the loop over a function body -------------------------------------------------------
    def run(self, source: Function, params: list[tuple[int, Any]], captures: list[tuple[int, Any]]) -> tuple[int, Any]:
        """Add `source`'s nodes here with its parameters and captures bound to the given
        (node, state) pairs: batched nodes through their rules, the others copied.
        Returns the (node, state) of the result."""
        saved, self._bindings = self._bindings, (list(params), list(captures))
        mapped: dict[int, tuple[int, Any]] = {}
        try:
            for nid, node in source.nodes():
                ids = tuple(mapped[i][0] for i in node.inputs)
                states = tuple(mapped[i][1] for i in node.inputs)
                self.span = node.span
                if node.prim.name in _BINDINGS or any(is_batched(s) for s in states):
                    rule = node.prim.batch
                    if rule is None:
                        self.fail(f"{node.prim.name} has no batching rule")
                    out = rule(self, node, ids, states)
                    new, state = out if isinstance(out, tuple) else (out, True)
                else:
                    new, state = self.copy(node, ids), False
                mapped[nid] = self.record(new, state)
        finally:
            self._bindings = saved
        return mapped[source.result]

    def copy(self, node: Node, inputs: Sequence[int]) -> int:
        """`node` on new inputs of the same types (nested functions copied)."""
        return self.add(_cloned(node.with_inputs(tuple(inputs))))

    def same(self, node: Node, inputs: Sequence[int], **changes) -> int:
        """The op of `node`, with its static arguments (updated by `changes`), on new inputs."""
        statics = {q.name: node.attr(q.name, q.default) for q in node.prim.params if q.kind != "value"}
        statics.update(changes)
        return self(node.prim.name, *inputs, **statics)

    # -- services for tensor rules -----------------------------------------------------------
    def unbatched_rank(self, nid: int, batched: Any) -> int:
        """The rank of each client's slice of tensor `nid`."""
        return self.type(nid).rank - (1 if batched else 0)

    def align(self, nid: int, batched: Any, rank: int) -> int:
        """A batched tensor with axes of size 1 after the client axis up to `rank` axes per
        client, so it broadcasts client against client with operands of that rank (NumPy
        aligns shapes on the right). An unbatched tensor already does."""
        if not batched:
            return nid
        key = (nid, rank)
        if key not in self._aligned:
            out = nid
            for _ in range(rank - self.unbatched_rank(nid, True)):
                out = self("expand_dims", out, axis=1)
            self._aligned[key] = out
        return self._aligned[key]

    def int32(self, value: int) -> int:
        return self.typed("const", (), _INT32, value=np.asarray(value, np.int32))

    def float32(self, nid: int) -> int:
        """A float scalar as float32 (what the random_* implementations compute with)."""
        value = self.literal(nid)
        if value is not None:
            return self.typed("const", (), TensorType("float32"), value=np.asarray(value, np.float32))
        return nid if self.type(nid).dtype == "float32" else self("cast", nid, dtype="float32")

    def leafwise(self, node: Node, inputs: Sequence[int], batched: Sequence[Any], rule: Callable):
        """Apply a tensor rule leaf by leaf to a node whose operands may be structs (a
        tensor operand meets every leaf); leaves that no batched operand reaches stay
        unbatched."""
        t = node.type
        if not isinstance(t, StructType):
            return rule(self, node, inputs, batched)
        fields, states = [], []
        for k, (_, ft) in enumerate(t.fields):
            parts, part_states = [], []
            for x, b in zip(inputs, batched):
                if isinstance(self.type(x), StructType):
                    parts.append(self.select(x, k))
                    part_states.append(field_state(b, k))
                else:
                    parts.append(x)
                    part_states.append(b)
            sub = replace(node, type=ft)
            if any(is_batched(s) for s in part_states):
                out = self.leafwise(sub, parts, part_states, rule)
                nid, state = out if isinstance(out, tuple) else (out, True)
            else:
                nid, state = self.same(sub, parts), False
            fields.append(nid)
            states.append(state)
        st = StructType(tuple((n, self.type(f)) for (n, _), f in zip(t.fields, fields)))
        return self.struct(fields, st), tuple(states)

    def leaves_with_states(self, nid: int, state: Any) -> list[tuple[int, bool]]:
        """The tensors of a struct value (or the tensor itself), each with its state."""
        t = self.type(nid)
        if isinstance(t, StructType):
            return [leaf for k in range(len(t.fields))
                    for leaf in self.leaves_with_states(self.select(nid, k), field_state(state, k))]
        return [(nid, is_batched(state))]

    def rebuild(self, like: int, leaves: list[tuple[int, Any]]) -> tuple[int, Any]:
        """A struct shaped like value `like` from new (node, state) leaves, in order."""
        it = iter(leaves)

        def build(nid: int) -> tuple[int, Any]:
            t = self.type(nid)
            if not isinstance(t, StructType):
                return next(it)
            parts = [build(self.select(nid, k)) for k in range(len(t.fields))]
            st = StructType(tuple((n, self.type(p)) for (n, _), (p, _) in zip(t.fields, parts)))
            return self.struct([p for p, _ in parts], st), tuple(s for _, s in parts)

        return build(like)

    # -- the client axis -----------------------------------------------------------------------
    def clients(self) -> int:
        """A batched value of this function whose first tensor leaf's first axis is the
        client axis (a tensor, lengths, or a batched sequence as a last resort)."""
        if self._witness is None:
            self._witness = self._find_witness(True) or self._find_witness(False)
            if self._witness is None:
                raise NotVectorizable("no batched value here tells the number of clients")
        return self._witness

    def _find_witness(self, tensors_only: bool) -> int | None:
        for nid, state in list(self.states.items()):
            found = self._witness_in(nid, state, tensors_only)
            if found is not None:
                return found
        return None

    def _witness_in(self, nid: int, state: Any, tensors_only: bool) -> int | None:
        if not is_batched(state):
            return None
        t = self.type(nid)
        if isinstance(t, TensorType):
            return nid
        if isinstance(t, StructType):
            for k in range(len(t.fields)):
                if is_batched(field_state(state, k)):
                    found = self._witness_in(self.select(nid, k), field_state(state, k), tensors_only)
                    if found is not None:
                        return found
        if isinstance(t, SequenceType):
            s = seq_state(state)
            if s.lengths is not None:
                return s.lengths
            if not tensors_only and s.element is True:
                return nid
        return None

    def broadcast(self, nid: int) -> int:
        """An unbatched tensor or struct of tensors with the client axis (the same value
        for every client)."""
        t = self.type(nid)
        value = self.literal(nid)
        if value is not None:
            nid = self.typed("const", (), t, value=np.asarray(value, np.dtype(t.dtype)))
        if isinstance(t, TensorType):
            return self("broadcast_leading", nid, self.clients(), axis=0, like_axis=0)
        if isinstance(t, StructType):
            fields = [self.broadcast(self.select(nid, k)) for k in range(len(t.fields))]
            return self.struct(fields, StructType(tuple((n, self.type(f)) for (n, _), f in zip(t.fields, fields))))
        raise NotVectorizable(f"a {t} value would need a client axis")

    def broadcast_state(self, nid: int, have: Any, want: Any) -> int:
        """Value `nid` in state `have` as a value in the more batched state `want`."""
        t = self.type(nid)
        have, want = canon(have, t), canon(want, t)
        if have == want:
            return nid
        out = self._broadcast_state(nid, t, have, want)
        self.record(out, want)
        return out

    def _broadcast_state(self, nid: int, t: Type, have: Any, want: Any) -> int:
        if isinstance(t, TensorType):
            if have:
                self.fail("a batched value cannot lose its client axis")
            return self.broadcast(nid)
        if isinstance(t, StructType):
            fields = [self.broadcast_state(self.select(nid, k), field_state(have, k), field_state(want, k))
                      for k in range(len(t.fields))]
            return self.struct(fields, StructType(tuple((n, self.type(f)) for (n, _), f in zip(t.fields, fields))))
        if isinstance(t, SequenceType):
            sh, sw = seq_state(have), seq_state(want)
            if sh.lengths != sw.lengths:
                raise NotVectorizable("a sequence would need per-client lengths it does not have")
            witness = self.clients()
            sub, (x,), (w,), sources = self.nested("broadcast", [("x", t.element, sh.element)], [witness])
            sub._witness = w[0]
            body = sub.broadcast_state(x[0], sh.element, sw.element)
            fn = self.close(sub, body, sources, ("x",))
            return self.typed("map", (nid, fn), SequenceType(self.type(fn).result), args=("seq", "f"))
        raise NotVectorizable(f"a {t} value would need a client axis")

    # -- structural services ---------------------------------------------------------------------
    def bound(self, node: Node) -> tuple[int, Any]:
        """The (node, state) bound to a param or capture node of the function being run."""
        params, captures = self._bindings
        return (params if node.prim.name == "param" else captures)[node.attr("index")]

    def function_of(self, nid: int) -> tuple[Function, list[int]] | None:
        """(unvectorized function, its captured values here) of a function value known
        at compile time, else None."""
        if nid in self.origin:
            return self.origin[nid]
        return known_function(self.f, nid, self.program)

    def bind_args(self, function: Function, args: Sequence[int], states: Sequence[Any]):
        """Call arguments -> parameter values and states (TFF's struct packing and unpacking)."""
        n = len(function.params)
        if len(args) == n:
            return list(args), list(states)
        if n == 1:
            declared = function.params[0][1]
            names = declared.names if isinstance(declared, StructType) and len(declared.fields) == len(args) \
                else (None,) * len(args)
            t = StructType(tuple((name, self.type(a)) for name, a in zip(names, args)))
            packed, state = self.record(self.struct(list(args), t), tuple(states))
            return [packed], [state]
        if len(args) == 1 and isinstance(self.type(args[0]), StructType):
            parts = [self.record(self.select(args[0], k), field_state(states[0], k)) for k in range(n)]
            return [p for p, _ in parts], [s for _, s in parts]
        self.fail(f"{function.name} takes {n} arguments, a call gives {len(args)}")

    def call(self, node: Node, inputs: Sequence[int], batched: Sequence[Any]) -> tuple[int, Any]:
        """A call with a batched argument or of a batched closure: the callee inlined here,
        vectorized with the states of its arguments and captures."""
        known = self.function_of(inputs[0])
        if known is None:
            raise NotVectorizable("a call of a function value not known at compile time gets values that differ "
                                  "between clients")
        function, captures = known
        args, states = self.bind_args(function, inputs[1:], batched[1:])
        if self.depth >= _MAX_DEPTH:
            raise NotVectorizable(f"calls nest more than {_MAX_DEPTH} deep")
        self.depth += 1
        try:
            return self.run(function, list(zip(args, states)), [(c, self.state(c)) for c in captures])
        finally:
            self.depth -= 1

    def closure(self, node: Node, inputs: Sequence[int], batched: Sequence[Any]) -> tuple[int, Any]:
        """A closure capturing batched values: a closure of its function vectorized with
        those captures and unbatched parameters; a call with batched arguments vectorizes
        the function again, with their states."""
        return self.closure_of(node.attr("function"), list(inputs), node.attr("arity")), True

    def closure_of(self, function: Function, captures: list[int], arity) -> int:
        sub, params, caps, sources = self.nested(function.name.rpartition(".")[2] + "_batched",
                                                 [(n, t, False) for n, t in function.params], captures)
        result, _ = sub.run(function, params, caps)
        nid = self.close(sub, result, sources, arity)
        self.origin[nid] = (function, list(captures))
        return nid

    def nested(self, name: str, params: list[tuple[str, Type, Any]], capture_ids: Sequence[int]):
        """An empty nested function with the given (name, type, state) parameters that
        captures values of this one (function values known here are rebuilt inside, so
        calls through them stay known). Returns (its emitter, its parameters and the
        captured values as (node, state) pairs, the closure's inputs here)."""
        plan = _Plan(self, capture_ids)
        g = Function(f"{self.f.name}.{name}", tuple((n, t) for n, t, _ in params), StructType(()),
                     captures=plan.capture_types(), span=self.span)
        sub = BatchEmitter(g, self.program, self.depth + 1, self.span)
        param_values = [sub.record(sub.typed("param", (), t, index=k), s) for k, (_, t, s) in enumerate(params)]
        return sub, param_values, plan.instantiate(sub), plan.sources

    def close(self, sub: "BatchEmitter", result: int, sources: Sequence[int], arity) -> int:
        """Finish nested function `sub` with `result`; its closure node here."""
        g = sub.f
        g.result, g.result_type = result, sub.type(result)
        _prune(g)
        nid = self.typed("closure", tuple(sources), g.type, function=g, arity=arity)
        self.record(nid, any(is_batched(self.state(s)) for s in sources))
        return nid

    def cond(self, node: Node, inputs: Sequence[int], batched: Sequence[Any]) -> tuple[int, Any]:
        """Branches batched differently meet in their join; a batched condition picks
        per client: `where` over the leaves of both branches (both are computed anyway)."""
        (c, a, b), (b_c, s_a, s_b) = inputs, batched
        if not b_c:
            joined = join(s_a, s_b, node.type)
            a, b = self.broadcast_state(a, s_a, joined), self.broadcast_state(b, s_b, joined)
            return self.typed("cond", (c, a, b), self.type(a)), joined
        return self.where_tree(c, a, s_a, b, s_b), True

    def where_tree(self, c: int, a: int, s_a: Any, b: int, s_b: Any) -> int:
        """where(c, a, b) leaf by leaf, for a batched bool scalar c (one per client)."""
        t = self.type(a)
        if isinstance(t, TensorType):
            rank = self.unbatched_rank(a, is_batched(s_a))
            return self("where", self.align(c, True, rank), a, b)
        if isinstance(t, StructType):
            fields = [self.where_tree(c, self.select(a, k), field_state(s_a, k), self.select(b, k), field_state(s_b, k))
                      for k in range(len(t.fields))]
            return self.struct(fields, StructType(tuple((n, self.type(f)) for (n, _), f in zip(t.fields, fields))))
        raise NotVectorizable(f"a condition that differs between clients chooses between {t} values")

    # -- sequences -------------------------------------------------------------------------------
    def loop(self, kind: str, node: Node, inputs: Sequence[int], batched: Sequence[Any]) -> tuple[int, Any]:
        """reduce, scan, map with a batched sequence, initial value or function."""
        fn = inputs[-1]
        known = self.function_of(fn)
        if known is None:
            raise NotVectorizable(f"{kind} with a function value not known at compile time")
        function, captures = known
        seq, s_seq = inputs[0], seq_state(batched[0])
        element = self.type(seq).element
        if kind == "map":
            sub, (x,), caps, sources = self.nested("map_step", [("x", element, s_seq.element)], captures)
            args, states = sub.bind_args(function, [x[0]], [x[1]])
            y, s_y = sub.run(function, list(zip(args, states)), caps)
            step = self.close(sub, y, sources, ("x",))
            out = self.typed("map", (seq, step), SequenceType(sub.type(y)), args=("seq", "f"))
            return out, SeqBatch(s_y, s_seq.lengths)
        init, s_init = inputs[1], batched[1]
        carry_t = node.type if kind == "reduce" else node.type.types[0]
        lengths = s_seq.lengths
        carry = True if lengths is not None else canon(s_init, carry_t)
        while True:             # the carry's state: a fixed point of the step
            step, s_out = self._step(kind, function, captures, carry_t, carry, element, s_seq.element, lengths,
                                     bool(node.attr("reverse", 0)))
            grown = join(carry, s_out if kind == "reduce" else field_state(s_out, 0), carry_t)
            if grown == carry:
                break
            carry = grown
        init = self.broadcast_state(init, s_init, carry)
        carry_b = batched_type(carry_t, carry)
        reverse = node.attr("reverse", 0)
        statics = {"args": ("seq", "init", "f")} if kind == "reduce" else {"args": ("seq", "init", "f"),
                                                                          "reverse": reverse}
        if lengths is None:
            if kind == "reduce":
                return self.typed("reduce", (seq, init, step), carry_b, **statics), carry
            ys = SequenceType(self.type(step).result.types[1])
            out = self.typed("scan", (seq, init, step), StructType(((None, carry_b), (None, ys))), **statics)
            return out, (carry, SeqBatch(field_state(s_out, 1)))
        # with lengths: the carry is <acc, step counter>; the counter runs backwards when reverse
        start = self("sub", self("count", seq), self.int32(1)) if reverse else self.int32(0)
        counted = StructType(((None, carry_b), (None, _INT32)))
        first = self.struct([init, start], counted)
        if kind == "reduce":
            out = self.typed("reduce", (seq, first, step), counted, **statics)
            return self.select(out, 0), True
        ys = SequenceType(self.type(step).result.types[1])
        out = self.typed("scan", (seq, first, step), StructType(((None, counted), (None, ys))), **statics)
        result = self.struct([self.select(self.select(out, 0), 0), self.select(out, 1)],
                             StructType(((None, carry_b), (None, ys))))
        return result, (True, SeqBatch(field_state(s_out, 1), lengths))

    def _step(self, kind: str, function: Function, captures: list[int], carry_t: Type, carry: Any,
              element: Type, s_element: Any, lengths: int | None, reverse: bool) -> tuple[int, Any]:
        """The step function of a reduce or scan, vectorized for the carry in state
        `carry`: its closure node here, and the state of what `function` returns."""
        carry_b = batched_type(carry_t, carry)
        first = ("acc", carry_b, carry) if lengths is None else \
            ("state", StructType(((None, carry_b), (None, _INT32))), (carry, False))
        ids = list(captures) + ([lengths] if lengths is not None else [])
        sub, (p_carry, p_x), caps, sources = self.nested(f"{kind}_step", [first, ("x", element, s_element)], ids)
        if lengths is None:
            acc = p_carry
        else:
            acc = sub.record(sub.select(p_carry[0], 0), carry)
            counter = sub.record(sub.select(p_carry[0], 1), False)[0]
            lengths_here, caps = caps[-1][0], caps[:-1]
        args, states = sub.bind_args(function, [acc[0], p_x[0]], [acc[1], p_x[1]])
        out, s_out = sub.run(function, list(zip(args, states)), caps)
        if kind == "reduce":
            new, s_new = out, s_out
        else:
            new, s_new = sub.select(out, 0), field_state(s_out, 0)
        if lengths is None:
            if join(s_new, carry, carry_t) == carry:      # (else the caller grows the carry and asks again)
                new = sub.broadcast_state(new, s_new, carry)
        else:
            keep = sub("lt", counter, lengths_here)     # the step mask: step t is real for client c
            new = sub.where_tree(keep, new, s_new, acc[0], carry)
            moved = sub("sub" if reverse else "add", counter, sub.int32(1))
            new = sub.struct([new, moved], StructType(((None, sub.type(new)), (None, _INT32))))
        result = new if kind == "reduce" else \
            sub.struct([new, sub.select(out, 1)], StructType(((None, sub.type(new)), (None, sub.type(out).types[1]))))
        return self.close(sub, result, sources, ("acc", "x")), s_out

    def zip(self, node: Node, inputs: Sequence[int], batched: Sequence[Any]) -> tuple[int, Any]:
        """zip_seq: elements batched field by field; with lengths, a client's zipped
        sequence ends where its shortest one does."""
        states = [seq_state(b) for b in batched]
        lengths = None
        if any(s.lengths is not None for s in states):
            terms: list[int] = []
            for seq, s in zip(inputs, states):
                term = s.lengths if s.lengths is not None else self("count", seq)
                if term not in terms:
                    terms.append(term)
            lengths = terms[0]
            for term in terms[1:]:
                lengths = self("minimum", lengths, term)
            self.record(lengths, True)
        t = SequenceType(StructType(tuple((None, self.type(i).element) for i in inputs)))
        return self.typed("zip_seq", tuple(inputs), t), SeqBatch(tuple(s.element for s in states), lengths)

    def count(self, node: Node, inputs: Sequence[int], batched: Sequence[Any]) -> tuple[int, Any]:
        s = seq_state(batched[0])
        if s.lengths is not None:
            return s.lengths, True
        return self.same(node, inputs), False          # every client has every element

    def num_examples(self, node: Node, inputs: Sequence[int], batched: Sequence[Any]) -> tuple[int, Any]:
        """Sum of the first leaf's leading dimension over the elements (per client: its
        real elements only). Every client's element at a step has the same leading
        dimension, so without lengths the sum is the same for every client."""
        seq, s = inputs[0], seq_state(batched[0])
        element = self.type(seq).element
        leaf_batched = _first_leaf_state(element, s.element)
        axis = 1 if leaf_batched else 0
        if s.lengths is None:
            sub, (acc, x), _, sources = self.nested("num_examples_step", [("acc", _INT32, False),
                                                                          ("x", element, s.element)], [])
            n = sub("shape_size", sub.first_leaf(x[0]), start=axis, stop=axis + 1)
            step = self.close(sub, sub("add", acc[0], n), sources, ("acc", "x"))
            return self.typed("reduce", (seq, self.int32(0), step), _INT32, args=("seq", "init", "f")), False
        counted = StructType(((None, _LENGTHS), (None, _INT32)))
        sub, (state, x), (lengths,), sources = self.nested("num_examples_step", [("state", counted, (True, False)),
                                                                                ("x", element, s.element)],
                                                           [s.lengths])
        acc, counter = sub.select(state[0], 0), sub.select(state[0], 1)
        n = sub("shape_size", sub.first_leaf(x[0]), start=axis, stop=axis + 1)
        real = sub("where", sub("lt", counter, lengths[0]), n, sub.int32(0))
        body = sub.struct([sub("add", acc, real), sub("add", counter, sub.int32(1))], counted)
        step = self.close(sub, body, sources, ("acc", "x"))
        first = self.struct([self("zeros_like", s.lengths), self.int32(0)], counted)
        out = self.typed("reduce", (seq, first, step), counted, args=("seq", "init", "f"))
        return self.select(out, 0), True

    def first_leaf(self, nid: int) -> int:
        while isinstance(self.type(nid), StructType):
            nid = self.select(nid, 0)
        return nid


def _first_leaf_state(t: Type, state: Any) -> bool:
    while isinstance(t, StructType):
        t, state = t.types[0], field_state(state, 0)
    return is_batched(state)


class _Plan:
    """How a nested function gets values of the function around it: plain values become
    captures (their lengths nodes too), closures and globals are rebuilt inside and
    constants copied, so calls through them stay known at compile time."""

    def __init__(self, outer: BatchEmitter, ids: Sequence[int]):
        self.outer = outer
        self.sources: list[int] = []
        self.trees = [self._plan(i) for i in ids]

    def _plan(self, nid: int):
        node = self.outer.node(nid)
        if node.prim.name == "closure":
            origin = self.outer.origin.get(nid)
            inputs = origin[1] if origin is not None else node.inputs
            return ("closure", nid, [self._plan(i) for i in inputs])
        if node.prim.name in ("global", "const"):
            return ("copy", nid)
        for source in [nid, *_lengths_in(self.outer.state(nid))]:
            if source not in self.sources:
                self.sources.append(source)
        return ("value", nid)

    def capture_types(self) -> tuple[tuple[str, Type], ...]:
        return tuple((f"c{k}", self.outer.type(s)) for k, s in enumerate(self.sources))

    def instantiate(self, inner: BatchEmitter) -> list[tuple[int, Any]]:
        local = {s: inner.typed("capture", (), self.outer.type(s), index=k) for k, s in enumerate(self.sources)}
        for s in self.sources:
            inner.record(local[s], _remap(self.outer.state(s), local))

        def build(tree) -> tuple[int, Any]:
            kind, nid = tree[0], tree[1]
            if kind == "value":
                return local[nid], inner.state(local[nid])
            node = self.outer.node(nid)
            if kind == "copy":
                return inner.record(inner.add(node), False)
            parts = [build(t) for t in tree[2]]
            origin = self.outer.origin.get(nid)
            if origin is None:
                return inner.record(inner.add(_cloned(node.with_inputs(tuple(p for p, _ in parts)))), False)
            return inner.record(inner.closure_of(origin[0], [p for p, _ in parts], node.attr("arity")), True)

        return [build(t) for t in self.trees]


# ---- runtime values --------------------------------------------------------------------------------

def stack_clients(values: Sequence[Any], ragged: bool = False) -> Any:
    """Per-client runtime values -> one batched value: every tensor stacked along a new
    leading client axis, through structs; a sequence becomes the sequence of its stacked
    elements. With `ragged`, clients' sequences may differ in length: such a sequence
    becomes Struct(elements, lengths) (RAGGED_FIELDS), a client's missing steps filled
    with another client's element of that step."""
    values = list(values)
    if not values:
        raise ValueError("stack_clients needs at least one client's value")
    first = values[0]
    if isinstance(first, Struct):
        return Struct((stack_clients([v[k] for v in values], ragged) for k in range(len(first))), first.names)
    if isinstance(first, list):
        lengths = [len(v) for v in values]
        steps = max(lengths)
        if not ragged:
            if len(set(lengths)) > 1:
                raise ValueError(f"clients' sequences have different lengths {lengths}; stack them with ragged=True")
            return [stack_clients([v[t] for v in values]) for t in range(steps)]
        elements = []
        for t in range(steps):
            filler = next(v[t] for v in values if len(v) > t)
            elements.append(stack_clients([v[t] if len(v) > t else filler for v in values]))
        return Struct((elements, np.asarray(lengths, np.int32)), RAGGED_FIELDS)
    return np.stack([np.asarray(v) for v in values])


def unstack_clients(value: Any, n: int, ragged: bool = False) -> list[Any]:
    """A batched runtime value -> the list of the `n` clients' values (stack_clients undone;
    with `ragged`, Struct(elements, lengths) values become per-client sequences)."""
    if isinstance(value, Struct):
        if ragged and value.names == RAGGED_FIELDS and isinstance(value.values[0], list):
            elements, lengths = value.values
            columns = [unstack_clients(e, n) for e in elements]
            return [[columns[t][c] for t in range(int(lengths[c]))] for c in range(n)]
        fields = [unstack_clients(v, n, ragged) for v in value.values]
        return [Struct((f[c] for f in fields), value.names) for c in range(n)]
    if isinstance(value, list):
        columns = [unstack_clients(e, n) for e in value]
        return [[column[c] for column in columns] for c in range(n)]
    array = np.asarray(value)
    if array.ndim == 0 or array.shape[0] != n:
        raise ValueError(f"expected a leading client axis of size {n}, found shape {list(array.shape)}")
    return [array[c] for c in range(n)]
