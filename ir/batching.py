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
    SeqBatch(e, L, R)  a sequence of elements batched as `e` says: one element per
                    step, all clients stepping together. With lengths L (the id of an
                    int32[C] node) client c has only its first L[c] elements and the
                    rest is padding: the step mask is `t < L[c]`. With rows R (an
                    int32[C]* node, one count per client and step) the Rows in `e`
                    count their rows in R.
    Rows(n, a)      a batched tensor padded along axis a of each client's slice:
                    client c's value is its first n[c] entries there (n: an int32[C]
                    node); the rest is garbage, maybe inf or NaN, that only `where`
                    ever drops.
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

Batches of different sizes
  Client datasets are sequences of batches with a short last one, so at one step
  clients hold different numbers of rows. `vectorize(..., ragged=True, rows=True)`
  gives batched sequence parameters the type
  `<elements=E*, lengths=int32[?], rows=int32[?]*>`: element leaves with a leading
  `?` are padded to the step's largest row count (they share their element's count,
  rows[t][c]) and get the state Rows(rows, 0). `stack_clients(..., rows=True,
  declared=T)` pads with copies of real rows (a client's first, else another
  client's): ordinary finite data. Rows propagate through elementwise ops, axis
  moves and free matmul axes; where padding would mix with real entries it is
  replaced first by `where` with the op's identity (0 for sums and contractions,
  both operands, since 0 * garbage may be NaN; -inf for max, argmax and softmax),
  and sizes and means count real rows only, so every client gets exactly what it
  computes alone. An op on an empty slice fails as it fails alone. A sequence
  result with padded leading `?` leaves is `<elements, lengths, rows>`.

Limits
  NotVectorizable (the runtime then runs the phase client by client): a call of,
  or a loop over, a function value not known at compile time (a parameter of
  function type) with batched arguments; a condition that differs between
  clients choosing between sequences or function values; sequences with
  different per-client lengths meeting in one value. With rows, whatever padding
  cannot keep exact: a padded axis meeting an axis that is not 1 (a client's count
  could be 1 and broadcast), two padded axes in one value, indexing, gathering,
  squeezing or merging (reshape) along the padded axis, padded classes, padded
  values carried from step to step or in a result outside a sequence.
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

# The fields of a ragged sequence value: the padded elements and the per-client lengths;
# with rows, also the per-client row counts of every step.
RAGGED_FIELDS = ("elements", "lengths")
ROWS_FIELDS = ("elements", "lengths", "rows")

_INT32 = TensorType("int32")
_LENGTHS = TensorType("int32", (None,))
_BINDINGS = frozenset({"param", "capture"})
_MAX_DEPTH = 64


class NotVectorizable(Exception):
    """A function the vectorizer cannot batch; the runtime runs it client by client."""


@dataclass(frozen=True, slots=True)
class SeqBatch:
    """The state of a sequence: its elements' state, maybe per-client lengths (a node id)
    and maybe per-step row counts (the id of an int32[C]* node; the element state's
    Rows name it as their `n`)."""

    element: Any
    lengths: int | None = None
    rows: int | None = None


@dataclass(frozen=True, slots=True)
class Rows:
    """A batched tensor padded along `axis` of each client's slice: client c's value is
    its first n[c] entries there, the rest is garbage that only `where` may drop."""

    n: int          # the id of an int32[C] node (in a sequence's element state: its rows)
    axis: int


# ---- states ------------------------------------------------------------------------------------

def is_batched(state: Any) -> bool:
    """Whether a value in `state` differs between clients somewhere."""
    if isinstance(state, Rows):
        return True
    if isinstance(state, SeqBatch):
        return state.lengths is not None or state.rows is not None or is_batched(state.element)
    if isinstance(state, tuple):
        return any(is_batched(s) for s in state)
    return bool(state)


def is_padded(state: Any) -> bool:
    """Whether a value in `state` holds padded rows somewhere."""
    if isinstance(state, Rows):
        return True
    if isinstance(state, SeqBatch):
        return state.rows is not None or is_padded(state.element)
    if isinstance(state, tuple):
        return any(is_padded(s) for s in state)
    return False


def plain(state: Any) -> Any:
    """`state` with padded tensors as plain batched ones (what the primitives' rules see)."""
    if isinstance(state, Rows):
        return True
    if isinstance(state, tuple):
        return tuple(plain(s) for s in state)
    if isinstance(state, SeqBatch):
        return SeqBatch(plain(state.element), state.lengths)
    return state


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
        rows = s.rows if is_padded(element) else None
        if s.lengths is None and rows is None and isinstance(element, bool):
            return element
        return SeqBatch(element, s.lengths, rows)
    if isinstance(state, Rows) and isinstance(t, TensorType):
        return state
    return is_batched(state)


def join(a: Any, b: Any, t: Type) -> Any:
    """The least state at least as batched as `a` and `b`."""
    if isinstance(t, StructType):
        return canon(tuple(join(field_state(a, k), field_state(b, k), f) for k, f in enumerate(t.types)), t)
    if isinstance(t, SequenceType):
        sa, sb = seq_state(a), seq_state(b)
        if sa.lengths != sb.lengths:
            raise NotVectorizable("sequences with different per-client lengths meet (a condition or a loop carry)")
        if sa.rows != sb.rows:
            raise NotVectorizable("sequences with different per-client row counts meet (a condition or a loop carry)")
        return canon(SeqBatch(join(sa.element, sb.element, t.element), sa.lengths, sa.rows), t)
    if isinstance(a, Rows) or isinstance(b, Rows):
        if a != b:
            raise NotVectorizable("a value padded along its rows meets one padded otherwise or not at all "
                                  "(a condition or a loop carry)")
        return a
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
    """`state` with every leaf batched (a sequence keeps its lengths and rows, a tensor its padding)."""
    if isinstance(t, StructType):
        return canon(tuple(_full(f, field_state(state, k)) for k, f in enumerate(t.types)), t)
    if isinstance(t, SequenceType):
        s = seq_state(state)
        return canon(SeqBatch(_full(t.element, s.element), s.lengths, s.rows), t)
    if isinstance(t, FunctionType):
        raise NotVectorizable(f"a function value {t} cannot carry a client axis")
    return state if isinstance(state, Rows) else True


def _lengths_in(state: Any) -> Iterator[int]:
    if isinstance(state, SeqBatch):
        if state.lengths is not None:
            yield state.lengths
        yield from _lengths_in(state.element)
    elif isinstance(state, tuple):
        for s in state:
            yield from _lengths_in(s)


def _nodes_in(state: Any) -> Iterator[int]:
    """The nodes a state names: lengths, rows, row counts."""
    if isinstance(state, Rows):
        yield state.n
    elif isinstance(state, SeqBatch):
        yield from (i for i in (state.lengths, state.rows) if i is not None)
        yield from _nodes_in(state.element)
    elif isinstance(state, tuple):
        for s in state:
            yield from _nodes_in(s)


def _remap(state: Any, local: dict[int, int]) -> Any:
    """`state` with the nodes it names replaced by their copies in another function."""
    if isinstance(state, Rows):
        return Rows(local[state.n], state.axis)
    if isinstance(state, SeqBatch):
        return SeqBatch(_remap(state.element, local), None if state.lengths is None else local[state.lengths],
                        None if state.rows is None else local[state.rows])
    if isinstance(state, tuple):
        return tuple(_remap(s, local) for s in state)
    return state


class _Identity(dict):
    """A node map that leaves the nodes it does not name as they are."""

    def __missing__(self, key):
        return key


def _lift(state: Any, count: int | None, rows: int | None, what: str) -> Any:
    """A state in a loop's step function (padded by the step's row counts `count`) as the
    element state of the sequence the loop yields (padded by the sequence's `rows`)."""
    if isinstance(state, Rows):
        if state.n != count:
            raise NotVectorizable(f"{what} yields values padded otherwise than its elements")
        return Rows(rows, state.axis)
    if isinstance(state, tuple):
        return tuple(_lift(s, count, rows, what) for s in state)
    if isinstance(state, SeqBatch) and is_padded(state):
        raise NotVectorizable(f"{what} yields sequences of padded rows")
    return state


def _element_rows(t: Type, rows: int) -> Any:
    """The element state of a sequence parameter with rows: leaves with a leading `?` are padded."""
    if isinstance(t, StructType):
        return tuple(_element_rows(f, rows) for f in t.types)
    if isinstance(t, TensorType) and t.shape and t.shape[0] is None:
        return Rows(rows, 0)
    return True


# ---- the entry point -----------------------------------------------------------------------------

def vectorize(function: Function, batched_params: tuple[bool, ...], program: Program,
              ragged: bool = False, rows: bool = False) -> Function:
    """A new function computing `function` for all clients at once (vmap).

    Parameter k is batched when `batched_params[k]` is True: every leaf of it has a
    leading client axis (a sequence: every element; with `ragged`, a sequence is
    `<elements=E*, lengths=int32[?]>`, with `rows` also `rows=int32[?]*`, see the
    module docstring); the others are the same for every client. The result has the
    client axis on every leaf. Nodes that depend on no batched value are copied as
    they are."""
    if len(batched_params) != len(function.params):
        raise ValueError(f"{function.name} has {len(function.params)} parameters; "
                         f"batched_params gives {len(batched_params)} flags")
    if rows and not ragged:
        raise ValueError("rows=True pads the batches of ragged sequences: it needs ragged=True")
    if function.federated:
        raise NotVectorizable(f"{function.name} is a comp: its client phases are vectorized, not the comp")
    layout = tuple((n, _param_layout(t, b, ragged, rows)) for (n, t), b in zip(function.params, batched_params))
    g = Function(f"{function.name}.batched", layout, StructType(()), captures=function.captures, span=function.span)
    em = BatchEmitter(g, program, span=function.span)
    params = []
    for k, ((_, t), b) in enumerate(zip(function.params, batched_params)):
        nid = em.typed("param", (), layout[k][1], index=k)
        params.append(em.record(*_unpack(em, nid, t, bool(b), ragged, rows)))
    captures = [em.record(em.typed("capture", (), t, index=k), False) for k, (_, t) in enumerate(function.captures)]
    result, state = em.run(function, params, captures)
    result = em.broadcast_state(result, state, _full(function.result_type, state))
    result = _pack(em, result, em.state(result))
    g.result, g.result_type = result, em.type(result)
    _prune(g)
    return g


def _param_layout(t: Type, batched: bool, ragged: bool, rows: bool = False) -> Type:
    if not batched:
        return t
    if isinstance(t, TensorType):
        return TensorType(t.dtype, (None,) + t.shape)
    if isinstance(t, StructType):
        return StructType(tuple((n, _param_layout(f, True, ragged, rows)) for n, f in t.fields))
    if isinstance(t, SequenceType):
        elements = SequenceType(_param_layout(t.element, True, False))
        if not ragged:
            return elements
        fields = ((RAGGED_FIELDS[0], elements), (RAGGED_FIELDS[1], _LENGTHS))
        return StructType(fields + (((ROWS_FIELDS[2], SequenceType(_LENGTHS)),) if rows else ()))
    raise NotVectorizable(f"a parameter of type {t} cannot be batched")


def _has_sequence(t: Type) -> bool:
    return isinstance(t, SequenceType) or (isinstance(t, StructType) and any(_has_sequence(f) for f in t.types))


def _unpack(em: "BatchEmitter", nid: int, t: Type, batched: bool, ragged: bool, rows: bool) -> tuple[int, Any]:
    """A batched parameter as a value of the function: ragged sequences become their
    elements, with the lengths (and rows) nodes in the state."""
    if not batched:
        return nid, False
    if not ragged or not _has_sequence(t):
        return nid, True
    if isinstance(t, SequenceType):
        lengths, _ = em.record(em.select(nid, 1), True)
        if not rows:
            return em.select(nid, 0), SeqBatch(True, lengths)
        counts, _ = em.record(em.select(nid, 2), True)
        return em.select(nid, 0), SeqBatch(_element_rows(t.element, counts), lengths, counts)
    parts = [em.record(*_unpack(em, em.select(nid, k), f, True, ragged, rows)) for k, f in enumerate(t.types)]
    st = StructType(tuple((n, em.type(p)) for (n, _), (p, _) in zip(t.fields, parts)))
    return em.struct([p for p, _ in parts], st), tuple(s for _, s in parts)


def _pack(em: "BatchEmitter", nid: int, state: Any) -> int:
    """The inverse of _unpack for a result: a ragged sequence as <elements, lengths>, with
    padded rows as <elements, lengths, rows>."""
    if not any(True for _ in _lengths_in(state)):
        if is_padded(state):
            raise NotVectorizable("a result holds padded rows outside a ragged sequence")
        return nid
    t = em.type(nid)
    if isinstance(t, SequenceType):
        s = seq_state(state)
        if any(True for _ in _lengths_in(s.element)):
            raise NotVectorizable("a result holds ragged sequences inside a sequence")
        if s.rows is None:
            return em.struct([nid, s.lengths], StructType(((RAGGED_FIELDS[0], t), (RAGGED_FIELDS[1], _LENGTHS))))
        for leaf, leaf_state in _leaf_types_states(t.element, s.element):
            dims = leaf.shape[1:] if is_batched(leaf_state) else leaf.shape
            trimmed = bool(dims) and dims[0] is None        # what unstack_clients trims
            if isinstance(leaf_state, Rows) != trimmed or (trimmed and leaf_state != Rows(s.rows, 0)):
                raise NotVectorizable("a sequence result is padded on other axes than its leaves' leading `?`")
        return em.struct([nid, s.lengths, s.rows],
                         StructType(((ROWS_FIELDS[0], t), (ROWS_FIELDS[1], _LENGTHS),
                                     (ROWS_FIELDS[2], SequenceType(_LENGTHS)))))
    fields = [_pack(em, em.select(nid, k), field_state(state, k)) for k in range(len(t.fields))]
    return em.struct(fields, StructType(tuple((n, em.type(f)) for (n, _), f in zip(t.fields, fields))))


def _leaf_types_states(t: Type, state: Any) -> Iterator[tuple[TensorType, Any]]:
    """The tensor types of an element (not inside nested sequences), each with its state."""
    if isinstance(t, StructType):
        for k, f in enumerate(t.types):
            yield from _leaf_types_states(f, field_state(state, k))
    elif isinstance(t, TensorType):
        yield t, state


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
        self._masks: dict[tuple[int, int, int], int] = {}

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
                    if node.prim.name not in _ROWS_PASS and any(is_padded(s) for s in states):
                        rule = _ROWS_RULES.get(node.prim.name, _not_on_rows)
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

    def scalar(self, value, dtype: str) -> int:
        return self.typed("const", (), TensorType(dtype), value=np.asarray(value, np.dtype(dtype)))

    # -- padded rows ---------------------------------------------------------------------------
    def masked(self, x: int, s: "Rows", fill) -> int:
        """Padded tensor x with `fill` in its padding (by `where`: garbage may be inf or NaN)."""
        rank = self.type(x).rank
        key = (s.n, rank, s.axis)       # every tensor padded by n has the same padded size
        if key not in self._masks:
            self._masks[key] = self("row_mask", s.n, x, axis=s.axis + 1)
        return self("where", self._masks[key], x, self.scalar(fill, self.type(x).dtype))

    def true_size(self, x: int, s: "Rows") -> int:
        """Each client's number of entries of padded tensor x (int32[C])."""
        before = self("shape_size", x, start=1, stop=s.axis + 1)
        after = self("shape_size", x, start=s.axis + 2, stop=None)
        return self("mul", s.n, self("mul", before, after))

    def nonempty(self, n: int, value: int) -> int:
        """`value`, failing at run time where a client's slice is empty, as max, min,
        argmax and softmax fail on one client's empty axis (an index out of range)."""
        empty = self("sum", self("cast", self("eq", n, self.int32(0)), dtype="int32"))
        one = self.typed("const", (), TensorType("bool", (1,)), value=np.asarray([True]))
        ok = self.typed("index", (one, empty), TensorType("bool"))
        return self("where", ok, value, value)

    def element_of(self, x: tuple[int, Any], s_seq: "SeqBatch") -> tuple[int, Any, int | None]:
        """A loop step's element, its state and the step's row counts: with rows the step
        gets <element, counts> (the sequence zipped with its rows)."""
        if s_seq.rows is None:
            return x[0], x[1], None
        counts = self.record(self.select(x[0], 1), True)[0]
        element = self.select(x[0], 0)
        self.record(element, _remap(s_seq.element, _Identity({s_seq.rows: counts})))
        return element, self.state(element), counts

    def with_rows(self, seq: int, s_seq: "SeqBatch") -> tuple[int, Type, Any]:
        """What a loop iterates: the sequence, or it zipped with its rows; the step's element
        type and its parameter's state (element_of reads it)."""
        element = self.type(seq).element
        if s_seq.rows is None:
            return seq, element, s_seq.element
        t = StructType(((None, element), (None, _LENGTHS)))
        return self.typed("zip_seq", (seq, s_seq.rows), SequenceType(t)), t, (plain(s_seq.element), True)

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
            if isinstance(have, Rows) or isinstance(want, Rows):
                raise NotVectorizable("a value padded along its rows would need to be unpadded or padded "
                                      "(a condition, a loop carry or a result)")
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
            if sh.rows is not None or sw.rows is not None:
                raise NotVectorizable("a sequence of padded rows would need a client axis on more of its leaves")
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
        return self.where_tree(c, a, s_a, b, s_b)

    def where_tree(self, c: int, a: int, s_a: Any, b: int, s_b: Any) -> tuple[int, Any]:
        """where(c, a, b) leaf by leaf, for a batched bool scalar c (one per client)."""
        t = self.type(a)
        if isinstance(t, TensorType):
            state = True
            if isinstance(s_a, Rows) or isinstance(s_b, Rows):
                if s_a != s_b:
                    raise NotVectorizable("a condition that differs between clients chooses between a value "
                                          "padded along its rows and one padded otherwise or not at all")
                state = s_a
            rank = self.unbatched_rank(a, is_batched(s_a))
            return self("where", self.align(c, True, rank), a, b), state
        if isinstance(t, StructType):
            parts = [self.where_tree(c, self.select(a, k), field_state(s_a, k), self.select(b, k), field_state(s_b, k))
                     for k in range(len(t.fields))]
            st = StructType(tuple((n, self.type(f)) for (n, _), (f, _) in zip(t.fields, parts)))
            return self.struct([f for f, _ in parts], st), tuple(s for _, s in parts)
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
        seq_in, element, s_element = self.with_rows(seq, s_seq)
        if kind == "map":
            sub, (x,), caps, sources = self.nested("map_step", [("x", element, s_element)], captures)
            x_, s_x, counts = sub.element_of(x, s_seq)
            args, states = sub.bind_args(function, [x_], [s_x])
            y, s_y = sub.run(function, list(zip(args, states)), caps)
            step = self.close(sub, y, sources, ("x",))
            out = self.typed("map", (seq_in, step), SequenceType(sub.type(y)), args=("seq", "f"))
            return out, SeqBatch(_lift(s_y, counts, s_seq.rows, "map"), s_seq.lengths, s_seq.rows)
        init, s_init = inputs[1], batched[1]
        carry_t = node.type if kind == "reduce" else node.type.types[0]
        lengths = s_seq.lengths
        carry = True if lengths is not None else canon(s_init, carry_t)
        while True:             # the carry's state: a fixed point of the step
            if is_padded(carry):
                raise NotVectorizable(f"{kind} carries values padded along their rows from step to step")
            step, s_out = self._step(kind, function, captures, carry_t, carry, element, s_element, s_seq,
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
                return self.typed("reduce", (seq_in, init, step), carry_b, **statics), carry
            ys = SequenceType(self.type(step).result.types[1])
            out = self.typed("scan", (seq_in, init, step), StructType(((None, carry_b), (None, ys))), **statics)
            return out, (carry, SeqBatch(field_state(s_out, 1), None, s_seq.rows))
        # with lengths: the carry is <acc, step counter>; the counter runs backwards when reverse
        start = self("sub", self("count", seq), self.int32(1)) if reverse else self.int32(0)
        counted = StructType(((None, carry_b), (None, _INT32)))
        first = self.struct([init, start], counted)
        if kind == "reduce":
            out = self.typed("reduce", (seq_in, first, step), counted, **statics)
            return self.select(out, 0), True
        ys = SequenceType(self.type(step).result.types[1])
        out = self.typed("scan", (seq_in, first, step), StructType(((None, counted), (None, ys))), **statics)
        result = self.struct([self.select(self.select(out, 0), 0), self.select(out, 1)],
                             StructType(((None, carry_b), (None, ys))))
        return result, (True, SeqBatch(field_state(s_out, 1), lengths, s_seq.rows))

    def _step(self, kind: str, function: Function, captures: list[int], carry_t: Type, carry: Any,
              element: Type, s_element: Any, s_seq: SeqBatch, reverse: bool) -> tuple[int, Any]:
        """The step function of a reduce or scan, vectorized for the carry in state
        `carry`: its closure node here, and the state of what `function` returns (what
        it yields as the element state of the scan's sequence)."""
        lengths = s_seq.lengths
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
        x, s_x, counts = sub.element_of(p_x, s_seq)
        args, states = sub.bind_args(function, [acc[0], x], [acc[1], s_x])
        out, s_out = sub.run(function, list(zip(args, states)), caps)
        if kind == "reduce":
            new, s_new = out, s_out
        else:
            new, s_new = sub.select(out, 0), field_state(s_out, 0)
            s_out = (s_new, _lift(field_state(s_out, 1), counts, s_seq.rows, "scan"))
        if is_padded(s_new):
            raise NotVectorizable(f"{kind} carries values padded along their rows from step to step")
        if lengths is None:
            if join(s_new, carry, carry_t) == carry:      # (else the caller grows the carry and asks again)
                new = sub.broadcast_state(new, s_new, carry)
        else:
            keep = sub("lt", counter, lengths_here)     # the step mask: step t is real for client c
            new, _ = sub.where_tree(keep, new, s_new, acc[0], carry)
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
        rows = {s.rows for s in states if s.rows is not None}
        if len(rows) > 1:
            raise NotVectorizable("a zip of sequences padded with different row counts")
        t = SequenceType(StructType(tuple((None, self.type(i).element) for i in inputs)))
        return self.typed("zip_seq", tuple(inputs), t), SeqBatch(tuple(s.element for s in states), lengths,
                                                                 rows.pop() if rows else None)

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
        if s.rows is not None and _first_leaf_raw(element, s.element) == Rows(s.rows, 0):
            return self._rows_examples(s)
        s = SeqBatch(plain(s.element), s.lengths)
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

    def _rows_examples(self, s: SeqBatch) -> tuple[int, Any]:
        """num_examples of a sequence whose first leaf is padded: its real steps' row counts."""
        counted = StructType(((None, _LENGTHS), (None, _INT32)))
        ids = [s.lengths] if s.lengths is not None else []
        sub, (state, x), caps, sources = self.nested("num_examples_step", [("state", counted, (True, False)),
                                                                          ("x", _LENGTHS, True)], ids)
        acc, counter = sub.select(state[0], 0), sub.select(state[0], 1)
        real = x[0] if not caps else sub("where", sub("lt", counter, caps[0][0]), x[0], sub.int32(0))
        body = sub.struct([sub("add", acc, real), sub("add", counter, sub.int32(1))], counted)
        step = self.close(sub, body, sources, ("acc", "x"))
        first = self.struct([self("zeros_like", self.clients_counts(s)), self.int32(0)], counted)
        out = self.typed("reduce", (s.rows, first, step), counted, args=("seq", "init", "f"))
        return self.select(out, 0), True

    def clients_counts(self, s: SeqBatch) -> int:
        """An int32[C] of this function (for zeros per client)."""
        if s.lengths is not None:
            return s.lengths
        return self("broadcast_leading", self.int32(0), self.clients(), axis=0, like_axis=0)

    def first_leaf(self, nid: int) -> int:
        while isinstance(self.type(nid), StructType):
            nid = self.select(nid, 0)
        return nid


def _first_leaf_state(t: Type, state: Any) -> bool:
    return is_batched(_first_leaf_raw(t, state))


def _first_leaf_raw(t: Type, state: Any) -> Any:
    while isinstance(t, StructType):
        t, state = t.types[0], field_state(state, 0)
    return state


# ---- padded rows: the rules for tensors padded along an axis ------------------------------------------
#
# A rule below sees the states of a node's inputs (Rows for padded tensors) and returns the
# node and its state; the primitive's own batching rule does the work on the padded tensors
# as if they were plain batched ones (`_plain_rule`), after padding was masked where it
# would mix with real entries. An op whose result cannot be kept exact raises NotVectorizable.

# Nodes whose rule only moves states around (or the vectorizer's own sequence code).
_ROWS_PASS = frozenset({"param", "capture", "struct", "select", "call", "closure", "cond", "reduce", "scan", "map",
                        "zip_seq", "count", "num_examples"})


def _not_on_rows(em: BatchEmitter, node: Node, inputs, states):
    raise NotVectorizable(f"{node.prim.name} of a value padded along its rows (batches of different sizes) "
                          "cannot be vectorized exactly")


def _plain_rule(em: BatchEmitter, node: Node, inputs, states) -> tuple[int, Any]:
    out = node.prim.batch(em, node, list(inputs), [plain(s) for s in states])
    return out if isinstance(out, tuple) else (out, True)


def _dims(em: BatchEmitter, x: int, state: Any) -> tuple:
    """The shape of each client's slice of tensor x."""
    shape = em.type(x).shape
    return shape[1:] if is_batched(state) else shape


def _rank(em: BatchEmitter, x: int, state: Any) -> int:
    return em.unbatched_rank(x, is_batched(state))


def _fails(node: Node, why: str):
    raise NotVectorizable(f"{node.prim.name}: {why} (batches of different sizes)")


def _lowest(dtype: str):
    return np.iinfo(dtype).min if np.issubdtype(np.dtype(dtype), np.integer) else -np.inf


def _highest(dtype: str):
    return np.iinfo(dtype).max if np.issubdtype(np.dtype(dtype), np.integer) else np.inf


def _rows_broadcasting(em, node, inputs, states):
    """A broadcasting op on tensors: padded operands line up (NumPy aligns on the right);
    an operand's axis that meets the padded one must be missing or 1 (a client's row count
    could be 1 and broadcast, which padding would not)."""
    ranks = [_rank(em, x, s) for x, s in zip(inputs, states)]
    rank = max(ranks)
    padded = {(s.n, s.axis + rank - r) for s, r in zip(states, ranks) if isinstance(s, Rows)}
    if not padded:
        return _plain_rule(em, node, inputs, states)
    if len(padded) > 1:
        _fails(node, "operands padded along different axes or with different row counts")
    ((n, axis),) = padded
    for x, s, r in zip(inputs, states, ranks):
        j = axis - (rank - r)
        if not isinstance(s, Rows) and j >= 0 and _dims(em, x, s)[j] != 1:
            _fails(node, "a padded axis meets an axis of another operand that is not 1")
    return _plain_rule(em, node, inputs, states)[0], Rows(n, axis)


def _rows_elementwise(em, node, inputs, states):
    return em.leafwise(node, inputs, states, _rows_broadcasting)


def _rows_like(em, node, inputs, states):
    """zeros_like, ones_like: padded like their input (the padding is zeros or ones too)."""
    return em.same(node, inputs), states[0]


def _leaf_states(em: BatchEmitter, nid: int, state: Any) -> list[tuple[int, Any]]:
    t = em.type(nid)
    if isinstance(t, StructType):
        return [leaf for k in range(len(t.fields))
                for leaf in _leaf_states(em, em.select(nid, k), field_state(state, k))]
    return [(nid, state)]


def _rows_random_normal_like(em, node, inputs, states):
    # numbers are counted in row-major order, so rows padded at the end keep their numbers
    (x, stddev, seed), (s_x, b_stddev, b_seed) = inputs, states
    leaves = []
    for k, (leaf, s_leaf) in enumerate(_leaf_states(em, x, s_x)):
        if isinstance(s_leaf, Rows) and s_leaf.axis != 0:
            _fails(node, "noise shaped like a value padded inside its shape")
        b_leaf = is_batched(s_leaf)
        noise = em("counter_noise", seed, leaf, kind="normal", salt=k, keep=1 if b_leaf else 0)
        value = em("mul", noise, em.align(em.float32(stddev), b_stddev, em.unbatched_rank(leaf, b_leaf)))
        dtype = em.type(leaf).dtype
        value = value if dtype == "float32" else em("cast", value, dtype=dtype)
        state = bool(b_stddev or b_seed)
        if isinstance(s_leaf, Rows):
            value, state = (value if state else em.broadcast(value)), s_leaf
        leaves.append((value, state))
    return em.rebuild(x, leaves)


def _rows_reduction(em, node, inputs, states):
    """sum, mean, max, min: over the padded axis, padding becomes the op's identity first."""
    (x,), (s,) = inputs, states
    rank, axis, name = _rank(em, x, s), node.attr("axis"), node.prim.name
    if axis is not None and axis % rank != s.axis:
        return _plain_rule(em, node, inputs, states)[0], Rows(s.n, s.axis - (axis % rank < s.axis))
    dtype = em.type(x).dtype
    fill = 0 if name in ("sum", "mean") else _lowest(dtype) if name == "max" else _highest(dtype)
    masked = em.masked(x, s, fill)
    if name == "mean":          # the sum of the real entries over their number
        if axis is None:
            total, count = em("sum", em("reshape_keep", masked, shape=(-1,), keep=1), axis=1), em.true_size(x, s)
        else:
            total, count = em("sum", masked, axis=s.axis + 1), s.n
        return em("div", total, em.align(em("cast", count, dtype=dtype), True, em.unbatched_rank(total, True))), True
    out, _ = _plain_rule(em, node, [masked], [True])
    return (em.nonempty(s.n, out) if name in ("max", "min") else out), True


def _rows_argmax(em, node, inputs, states):
    (x,), (s,) = inputs, states
    rank, axis = _rank(em, x, s), node.attr("axis") % _rank(em, x, s)
    if axis != s.axis:
        return _plain_rule(em, node, inputs, states)[0], Rows(s.n, s.axis - (axis < s.axis))
    out, _ = _plain_rule(em, node, [em.masked(x, s, _lowest(em.type(x).dtype))], [True])
    return em.nonempty(s.n, out), True


def _rows_softmax(em, node, inputs, states):
    """softmax, log_softmax: along the padded axis, padding is -inf (it adds exp(-inf) = 0)."""
    (x,), (s,) = inputs, states
    if node.attr("axis") % _rank(em, x, s) != s.axis:
        return _plain_rule(em, node, inputs, states)[0], s
    out, _ = _plain_rule(em, node, [em.masked(x, s, -np.inf)], [True])
    return em.nonempty(s.n, out), s


def _rows_global_norm(em, node, inputs, states):
    total = None
    for leaf, s in _leaf_states(em, inputs[0], states[0]):
        if isinstance(s, Rows):
            leaf, s = em.masked(leaf, s, 0), True
        if is_batched(s):
            part = em("sum", em("square", em("reshape_keep", leaf, shape=(-1,), keep=1)), axis=1)
        else:
            part = em("sum", em("square", leaf))
        total = part if total is None else em("add", total, part)
    return em("sqrt", total), True


def _rows_size(em, node, inputs, states):
    (x,), (s,) = inputs, states
    if not isinstance(s, Rows):
        return _plain_rule(em, node, inputs, states)
    return em.true_size(x, s), True


def _rows_shape_size(em, node, inputs, states):
    (x,), (s,) = inputs, states
    start, stop = node.attr("start"), node.attr("stop")
    stop = _rank(em, x, s) if stop is None else stop
    if not isinstance(s, Rows) or not start <= s.axis < stop:
        return _plain_rule(em, node, inputs, states)
    before = em("shape_size", x, start=start + 1, stop=s.axis + 1)
    after = em("shape_size", x, start=s.axis + 2, stop=stop + 1)
    return em("mul", s.n, em("mul", before, after)), True


def _rows_axis_kept(em, node, inputs, states):
    """one_hot: a new last axis; the padded one stays where it is."""
    return _plain_rule(em, node, inputs, states)[0], states[0]


def _rows_expand_dims(em, node, inputs, states):
    (x,), (s,) = inputs, states
    p = node.attr("axis") % (_rank(em, x, s) + 1)
    return _plain_rule(em, node, inputs, states)[0], Rows(s.n, s.axis + (p <= s.axis))


def _rows_squeeze(em, node, inputs, states):
    (x,), (s,) = inputs, states
    p = node.attr("axis") % _rank(em, x, s)
    if p == s.axis:
        _fails(node, "squeezing the padded axis")
    return _plain_rule(em, node, inputs, states)[0], Rows(s.n, s.axis - (p < s.axis))


def _rows_transpose(em, node, inputs, states):
    (x,), (s,) = inputs, states
    rank = _rank(em, x, s)
    axis = {rank - 1: rank - 2, rank - 2: rank - 1}.get(s.axis, s.axis)
    return _plain_rule(em, node, inputs, states)[0], Rows(s.n, axis)


def _rows_one_hot_like(em, node, inputs, states):
    (i, like), (s_i, s_like) = inputs, states
    if isinstance(s_like, Rows) and s_like.axis == _rank(em, like, s_like) - 1:
        _fails(node, "padded classes")
    out, state = _plain_rule(em, node, inputs, states)
    return out, s_i if isinstance(s_i, Rows) else state


def _rows_xent(em, node, inputs, states):
    (labels, logits), (s_labels, s_logits) = inputs, states
    if not (isinstance(s_labels, Rows) and s_labels == s_logits and s_labels.axis < _rank(em, labels, s_labels)):
        _fails(node, "labels and logits padded differently, or padded classes")
    return _plain_rule(em, node, inputs, states)[0], s_labels


def _rows_matmul(em, node, inputs, states):
    """A padded free or stacked axis stays padded in the result; a contracted one must be
    padded the same way on both sides, and both sides get zeros there (0 * 0, never
    0 * garbage, which may be inf)."""
    (a, b), (s_a, s_b) = inputs, states
    ra, rb = _rank(em, a, s_a), _rank(em, b, s_b)
    stack = max(ra - 2, rb - 2, 0)

    def places(rank: int, left: bool) -> list:       # each axis's place in the result (None: contracted)
        if rank == 1:
            return [None]
        lead = [stack - (rank - 2) + i for i in range(rank - 2)]
        return lead + ([stack, None] if left else [None, stack + (1 if ra >= 2 else 0)])

    pa, pb = places(ra, True), places(rb, False)
    out, contracted = None, []
    for s, pl in ((s_a, pa), (s_b, pb)):
        if isinstance(s, Rows):
            if pl[s.axis] is None:
                contracted.append(s.n)
            elif out not in (None, (s.n, pl[s.axis])):
                _fails(node, "two padded axes in the result")
            else:
                out = (s.n, pl[s.axis])
    if contracted:
        if len(contracted) != 2 or contracted[0] != contracted[1]:
            _fails(node, "contracting a padded axis with one padded otherwise or not at all")
        a, b, s_a, s_b = em.masked(a, s_a, 0), em.masked(b, s_b, 0), True, True
    if out is not None:
        for x, s, pl in ((a, s_a, pa), (b, s_b, pb)):
            if not isinstance(s, Rows) and any(p == out[1] and d != 1 for p, d in zip(pl, _dims(em, x, s))):
                _fails(node, "a padded stacked axis meets an axis of the other operand that is not 1")
    nid, _ = _plain_rule(em, node, [a, b], [s_a, s_b])
    return nid, Rows(*out) if out is not None else True


def _rows_broadcast_to(em, node, inputs, states):
    (x, like), (s_x, s_like) = inputs, states
    offset = _rank(em, like, s_like) - _rank(em, x, s_x)
    if not isinstance(s_like, Rows):
        _fails(node, "broadcasting a padded value to a shape that is not padded")
    j = s_like.axis - offset
    if isinstance(s_x, Rows):
        if s_x != Rows(s_like.n, j):
            _fails(node, "broadcasting a value padded otherwise")
    elif j >= 0 and _dims(em, x, s_x)[j] != 1:
        _fails(node, "a padded axis meets an axis that is not 1")
    return _plain_rule(em, node, inputs, states)[0], s_like


def _rows_unbroadcast(em, node, inputs, states):
    """Sums x down to like's shape: a padded axis summed away is masked with zeros first."""
    (x, like), (s_x, s_like) = inputs, states
    extra = _rank(em, x, s_x) - _rank(em, like, s_like)
    like_dims = _dims(em, like, s_like)
    if isinstance(s_x, Rows):
        j = s_x.axis - extra
        if j >= 0 and s_like == Rows(s_x.n, j):
            pass                                            # padded in the result too
        elif j < 0 or (like_dims[j] == 1 and not (isinstance(s_like, Rows) and s_like.axis == j)):
            x, s_x = em.masked(x, s_x, 0), True             # summed away
        else:
            _fails(node, "a padded axis that may or may not be summed away")
    if isinstance(s_like, Rows):
        i = s_like.axis + extra
        if s_x != Rows(s_like.n, i) and i >= 0 and _dims(em, x, s_x)[i] != 1:
            _fails(node, "a padded shape for a value that is not padded the same way")
        return _plain_rule(em, node, [x, like], [s_x, s_like])[0], s_like
    return _plain_rule(em, node, [x, like], [s_x, s_like])


def _product(dims) -> int:
    return int(np.prod(dims, dtype=np.int64))


def _rows_kept_layout(dims: tuple, axis: int) -> bool:
    return all(d is not None for i, d in enumerate(dims) if i != axis)


def _rows_reshape(em, node, inputs, states):
    """Only a reshape of the axes after the padded one (each row reshaped alike)."""
    (x,), (s,) = inputs, states
    dims, target, a = _dims(em, x, s), tuple(node.attr("shape")), s.axis
    if not (_rows_kept_layout(dims, a) and len(target) > a and target[:a] == dims[:a] and target[a] == -1
            and -1 not in target[a + 1:] and _product(target[a + 1:]) == _product(dims[a + 1:])):
        _fails(node, f"reshaping to {list(target)} mixes the padded axis with others")
    return em("reshape_keep", x, shape=target[a + 1:], keep=a + 2), s


def _rows_reshape_like(em, node, inputs, states):
    (x, like), (s_x, s_like) = inputs, states
    dx, dl = _dims(em, x, s_x), _dims(em, like, s_like)
    if not (isinstance(s_x, Rows) and s_x == s_like and _rows_kept_layout(dx, s_x.axis)
            and _rows_kept_layout(dl, s_x.axis) and dx[:s_x.axis] == dl[:s_x.axis]
            and _product(dx[s_x.axis + 1:]) == _product(dl[s_x.axis + 1:])):
        _fails(node, "a reshape that mixes the padded axis with others")
    return _plain_rule(em, node, inputs, states)[0], s_like


def _rows_index(em, node, inputs, states):
    (x, i), (s_x, s_i) = inputs, states
    if not isinstance(s_x, Rows) or s_x.axis == 0 or is_padded(s_i):
        _fails(node, "indexing along the padded axis")
    return _plain_rule(em, node, inputs, states)[0], Rows(s_x.n, s_x.axis - 1 + _rank(em, i, s_i))


def _rows_scatter_row(em, node, inputs, states):
    (x, like, i), (s_x, s_like, s_i) = inputs, states
    if not isinstance(s_like, Rows) or s_like.axis == 0 or is_padded(s_i):
        _fails(node, "scattering along the padded axis or into a shape that is not padded")
    j = s_like.axis - 1 - (_rank(em, like, s_like) - 1 - _rank(em, x, s_x))
    if s_x != Rows(s_like.n, j) and (isinstance(s_x, Rows) or (j >= 0 and _dims(em, x, s_x)[j] != 1)):
        _fails(node, "a row padded otherwise than its destination")
    return _plain_rule(em, node, inputs, states)[0], s_like


_ELEMENTWISE = ("add", "sub", "mul", "div", "mod", "pow", "neg", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
                "logical_or", "logical_not", "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "abs", "square",
                "maximum", "minimum", "cast", "where", "clip")

_ROWS_RULES: dict[str, Callable] = {
    **{name: _rows_elementwise for name in _ELEMENTWISE},
    "zeros_like": _rows_like, "ones_like": _rows_like, "random_normal_like": _rows_random_normal_like,
    "sum": _rows_reduction, "mean": _rows_reduction, "max": _rows_reduction, "min": _rows_reduction,
    "argmax": _rows_argmax, "softmax": _rows_softmax, "log_softmax": _rows_softmax,
    "global_norm": _rows_global_norm, "size": _rows_size, "shape_size": _rows_shape_size,
    "one_hot": _rows_axis_kept, "one_hot_like": _rows_one_hot_like, "sparse_softmax_cross_entropy": _rows_xent,
    "expand_dims": _rows_expand_dims, "squeeze": _rows_squeeze, "matrix_transpose": _rows_transpose,
    "matmul": _rows_matmul, "broadcast_to": _rows_broadcast_to, "unbroadcast": _rows_unbroadcast,
    "reshape": _rows_reshape, "reshape_like": _rows_reshape_like, "index": _rows_index,
    "scatter_row": _rows_scatter_row,
}


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
        for source in [nid, *_nodes_in(self.outer.state(nid))]:
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

def stack_clients(values: Sequence[Any], ragged: bool = False, rows: bool = False, declared: Type | None = None) -> Any:
    """Per-client runtime values -> one batched value: every tensor stacked along a new
    leading client axis, through structs; a sequence becomes the sequence of its stacked
    elements. With `ragged`, clients' sequences may differ in length: such a sequence
    becomes Struct(elements, lengths) (RAGGED_FIELDS), a client's missing steps filled
    with another client's element of that step. With `rows` too, the leaves of an element
    with a leading `?` in `declared` (the clients' type; without it, every leaf of
    rank 1 or more) may differ in row count between clients: they are padded to the
    step's largest count with copies of a real row (the client's first, else another
    client's), and the sequence becomes Struct(elements, lengths, rows) (ROWS_FIELDS),
    rows holding each step's int32[C] counts (a client without the step: its filler's)."""
    values = list(values)
    if not values:
        raise ValueError("stack_clients needs at least one client's value")
    if rows and not ragged:
        raise ValueError("rows=True pads the batches of ragged sequences: it needs ragged=True")
    first = values[0]
    if isinstance(first, Struct):
        types = declared.types if isinstance(declared, StructType) else (None,) * len(first)
        return Struct((stack_clients([v[k] for v in values], ragged, rows, types[k]) for k in range(len(first))),
                      first.names)
    if isinstance(first, list):
        lengths = [len(v) for v in values]
        steps = max(lengths)
        if not ragged:
            if len(set(lengths)) > 1:
                raise ValueError(f"clients' sequences have different lengths {lengths}; stack them with ragged=True")
            return [stack_clients([v[t] for v in values]) for t in range(steps)]
        if rows:
            element_type = declared.element if isinstance(declared, SequenceType) else None
            steps_and_counts = [_padded_step([v[t] if len(v) > t else None for v in values], element_type)
                                for t in range(steps)]
            return Struct(([stack_clients(e) for e, _ in steps_and_counts], np.asarray(lengths, np.int32),
                           [c for _, c in steps_and_counts]), ROWS_FIELDS)
        elements = []
        for t in range(steps):
            filler = next(v[t] for v in values if len(v) > t)
            elements.append(stack_clients([v[t] if len(v) > t else filler for v in values]))
        return Struct((elements, np.asarray(lengths, np.int32)), RAGGED_FIELDS)
    return np.stack([np.asarray(v) for v in values])


def _has_rows(array: np.ndarray, t: Type | None) -> bool:
    if isinstance(t, TensorType):
        return bool(t.shape) and t.shape[0] is None
    return array.ndim >= 1


def _row_counts(value: Any, t: Type | None) -> list[int]:
    if isinstance(value, Struct):
        types = t.types if isinstance(t, StructType) else (None,) * len(value)
        return [n for v, f in zip(value.values, types) for n in _row_counts(v, f)]
    if isinstance(value, list):                     # a sequence inside an element: not padded
        return []
    array = np.asarray(value)
    return [array.shape[0]] if _has_rows(array, t) else []


def _pad_rows(value: Any, donor: Any, t: Type | None, size: int) -> Any:
    """`value` with its row leaves padded to `size` rows by copies of its first row (of
    donor's when it has none)."""
    if isinstance(value, Struct):
        types = t.types if isinstance(t, StructType) else (None,) * len(value)
        return Struct((_pad_rows(v, None if donor is None else donor[k], types[k], size)
                       for k, v in enumerate(value.values)), value.names)
    if isinstance(value, list):
        return value
    array = np.asarray(value)
    if not _has_rows(array, t) or array.shape[0] == size:
        return array
    source = array[:1] if array.shape[0] else np.asarray(donor)[:1].astype(array.dtype)
    return np.concatenate([array, np.repeat(source, size - array.shape[0], axis=0)])


def _padded_step(elements: list[Any], t: Type | None) -> tuple[list[Any], np.ndarray]:
    """One step of every client's sequence (None: the client has no such step), padded;
    and the clients' row counts."""
    counts: dict[int, int] = {}
    for c, e in enumerate(elements):
        if e is not None:
            found = set(_row_counts(e, t))
            if len(found) > 1:
                raise ValueError(f"the leaves of one element have different numbers of rows {sorted(found)}; "
                                 "every leaf with a leading `?` shares its element's row count")
            counts[c] = found.pop() if found else 0
    size = max(counts.values())
    donor = next((elements[c] for c, n in counts.items() if n > 0), None)
    padded = {c: _pad_rows(elements[c], donor, t, size) for c in counts}
    filler = next(iter(counts))
    return ([padded.get(c, padded[filler]) for c in range(len(elements))],
            np.asarray([counts.get(c, counts[filler]) for c in range(len(elements))], np.int32))


def unstack_clients(value: Any, n: int, ragged: bool = False, declared: Type | None = None) -> list[Any]:
    """A batched runtime value -> the list of the `n` clients' values (stack_clients undone;
    with `ragged`, Struct(elements, lengths) values become per-client sequences, and
    Struct(elements, lengths, rows) ones also lose their padding rows: of the leaves
    with a leading `?` in `declared`, the clients' type, else of every leaf of
    rank 1 or more)."""
    if isinstance(value, Struct):
        if ragged and value.names in (RAGGED_FIELDS, ROWS_FIELDS) and isinstance(value.values[0], list):
            elements, lengths = value.values[:2]
            columns = [unstack_clients(e, n) for e in elements]
            if value.names == ROWS_FIELDS:
                element_type = declared.element if isinstance(declared, SequenceType) else None
                columns = [[_trim_rows(column[c], element_type, int(counts[c])) for c in range(n)]
                           for column, counts in zip(columns, value.values[2])]
            return [[columns[t][c] for t in range(int(lengths[c]))] for c in range(n)]
        types = declared.types if isinstance(declared, StructType) else (None,) * len(value)
        fields = [unstack_clients(v, n, ragged, f) for v, f in zip(value.values, types)]
        return [Struct((f[c] for f in fields), value.names) for c in range(n)]
    if isinstance(value, list):
        columns = [unstack_clients(e, n) for e in value]
        return [[column[c] for column in columns] for c in range(n)]
    array = np.asarray(value)
    if array.ndim == 0 or array.shape[0] != n:
        raise ValueError(f"expected a leading client axis of size {n}, found shape {list(array.shape)}")
    return [array[c] for c in range(n)]


def _trim_rows(value: Any, t: Type | None, count: int) -> Any:
    if isinstance(value, Struct):
        types = t.types if isinstance(t, StructType) else (None,) * len(value)
        return Struct((_trim_rows(v, f, count) for v, f in zip(value.values, types)), value.names)
    if isinstance(value, list):
        return value
    return value[:count] if _has_rows(np.asarray(value), t) else value
