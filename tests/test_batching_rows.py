"""Vectorizing over clients whose batches differ in size (fedlang.ir.batching, rows=True).

  * FedAvg's client phase (examples/fedavg_digits.fed split by fedlang.ir.phases: SGD
    with its gradient, metrics, example counts) on random client datasets cut into
    batches with a short last one, vectorized with padded rows, equals each client run
    alone (hypothesis, to 1e-5); a client without data keeps the model it got;
  * each op that meets padding: masked reductions (sum, mean, max, min, argmax,
    global_norm), sizes, num_examples, matmul contracting the padded axis, softmax
    along it, reshapes, a sequence of padded results, gradients through loops; with
    a 0-row batch and a client without batches; where a client alone fails (max of
    no rows) the vectorized run fails too;
  * ops that cannot stay exact raise NotVectorizable;
  * random well-typed programs with batch-sequence parameters: NotVectorizable, or the
    per-client results;
  * stack_clients / unstack_clients with rows: padding is copies of real rows.
"""

from __future__ import annotations

import functools
import textwrap

import numpy as np
import pytest
from hypothesis import assume, given, reject, settings
from hypothesis import strategies as st

import fedlang
from fedlang.api import compile_ir
from fedlang.ir.batching import ROWS_FIELDS, NotVectorizable, stack_clients, unstack_clients, vectorize
from fedlang.ir.autodiff import Emitter
from fedlang.ir.graph import Function, Program
from fedlang.ir.interpreter import Interpreter
from fedlang.ir.phases import split_phases
from fedlang.ir.primitives import FedlangRuntimeError
from fedlang.ir.types import FunctionType, SequenceType, StructType, TensorType, Type, is_placed
from fedlang.ir.values import Struct
from fedlang.ir.verify import verify, verify_function

from test_batching import CASES, ROOT, _names_agree, assert_same, concrete, draw_value, helpers, lam, loops, \
    typed_const

TOLERANCE = 1e-5

# A client's batch of no rows has a NaN mean, alone and vectorized alike.
pytestmark = pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")


def assert_close(got, expected, where: str = "result", tolerance: float = TOLERANCE, lenient_names: bool = False):
    """Equal structure, names, dtypes and shapes; floats within `tolerance` (NaN equals NaN)."""
    if isinstance(expected, Struct):
        assert isinstance(got, Struct) and _names_agree(got.names, expected.names, lenient_names), \
            f"{where}: {got!r} vs {expected!r}"
        for k, (g, e) in enumerate(zip(got.values, expected.values)):
            assert_close(g, e, f"{where}.{expected.names[k] or k}", tolerance, lenient_names)
        return
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{where}: {len(got)} vs {len(expected)} elements"
        for k, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{where}[{k}]", tolerance, lenient_names)
        return
    g, e = np.asarray(got), np.asarray(expected)
    assert g.dtype == e.dtype and g.shape == e.shape, f"{where}: {g.dtype}{g.shape} vs {e.dtype}{e.shape}"
    if g.dtype.kind in "fc":
        np.testing.assert_allclose(g, e, rtol=tolerance, atol=tolerance, equal_nan=True, err_msg=where)
    else:
        np.testing.assert_array_equal(g, e, err_msg=where)


def run_vectorized(f, flags, columns, clients: int, program: Program):
    """vectorize(f, rows=True) on the stacked columns -> the per-client results."""
    g = vectorize(f, tuple(flags), program, ragged=True, rows=True)
    verify_function(g, program.functions)
    args = [stack_clients(column, ragged=True, rows=True, declared=t) if batched else column[0]
            for column, batched, (_, t) in zip(columns, flags, f.params)]
    with np.errstate(all="ignore"):
        out = Interpreter(program).run(g, args)
    return unstack_clients(out, clients, ragged=True, declared=f.result_type)


def run_alone(f, columns, clients: int, program: Program) -> list:
    with np.errstate(all="ignore"):
        return [Interpreter(program).run(f, [column[c] for column in columns]) for c in range(clients)]


def check_rows(f, flags, columns, clients: int, program: Program, tolerance: float = TOLERANCE,
               lenient_names: bool = False) -> None:
    expected = run_alone(f, columns, clients, program)
    for c, (got, want) in enumerate(zip(run_vectorized(f, flags, columns, clients, program), expected)):
        assert_close(got, want, f"client {c}", tolerance, lenient_names)


# ---- FedAvg's client phase ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def fedavg_phase(optimized: bool):
    program = fedlang.load(str(ROOT / "examples" / "fedavg_digits.fed"), optimize=optimized).program
    phase = next(p for p in split_phases(program.functions["round"], program) if p.kind == "client")
    model = Interpreter(program).run(program.functions["initial_model"], [])
    return phase.function, Program(dict(phase.globals)), model


def client_dataset(rs: np.random.RandomState, examples: int, batch_size: int) -> list[Struct]:
    """`examples` random digits-shaped examples cut into batches (the last one short)."""
    x = rs.rand(examples, 64).astype(np.float32) * 4
    y = rs.randint(0, 10, examples).astype(np.int32)
    return [Struct((x[i:i + batch_size], y[i:i + batch_size]), ("x", "y")) for i in range(0, examples, batch_size)]


@settings(max_examples=25)
@given(clients=st.integers(1, 6), examples=st.lists(st.integers(0, 40), min_size=6, max_size=6),
       batch_size=st.sampled_from([16, 16, 5, 7, 32]), optimized=st.booleans(), model_batched=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_fedavg_client_phase_with_batches_of_different_sizes(clients, examples, batch_size, optimized,
                                                             model_batched, seed):
    f, program, model = fedavg_phase(optimized)
    rs = np.random.RandomState(seed)
    data = [client_dataset(rs, examples[c], batch_size) for c in range(clients)]
    models = [Struct([v + rs.normal(0, 0.05, v.shape).astype(np.float32) for v in model.values], model.names)
              for _ in range(clients)] if model_batched else [model] * clients
    check_rows(f, [True, model_batched], [data, models], clients, program)


def test_fedavg_client_without_data_keeps_its_model():
    f, program, model = fedavg_phase(True)
    rs = np.random.RandomState(3)
    data = [client_dataset(rs, 37, 16), [], client_dataset(rs, 5, 16), [Struct((np.zeros((0, 64), np.float32),
                                                                               np.zeros(0, np.int32)), ("x", "y"))]]
    got = run_vectorized(f, [True, False], [data, [model] * 4], 4, program)
    for c in (1, 3):       # no batches; one batch of no rows: the model is what the client got, exactly
        assert_same(got[c][0], model, exact=True)
    assert got[0][1] == np.float32(37) and got[1][1] == np.float32(0)
    check_rows(f, [True, False], [data, [model] * 4], 4, program)


def test_fedavg_padding_never_meets_the_model_by_multiplication():
    """Inf in a client's padding (its first row copied) cannot reach other entries."""
    f, program, model = fedavg_phase(False)
    rs = np.random.RandomState(5)
    data = [client_dataset(rs, 20, 16), client_dataset(rs, 3, 16)]
    data[1][0].values[0][0, 0] = np.float32(1e30)        # a huge first row, copied into the padding
    check_rows(f, [True, False], [data, [model] * 2], 2, program)


# ---- one op at a time ---------------------------------------------------------------------------

OPS = """
type B = <x=float32[?,3],y=int32[?]>
fn total(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(b.x))
fn column_totals(data: B*) -> float32[3] = reduce(data, zeros([3]), fn(a: float32[3], b: B) -> float32[3] = a + sum(b.x, 0))
fn row_totals(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(square(sum(b.x, 1))))
fn label_total(data: B*) -> int32 = reduce(data, 0, fn(a: int32, b: B) -> int32 = a + sum(b.y))
fn average(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + mean(b.x))
fn column_means(data: B*) -> float32[3] = reduce(data, zeros([3]), fn(a: float32[3], b: B) -> float32[3] = a + mean(b.x, 0))
fn row_means(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(mean(b.x, 1)))
fn norm(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + global_norm((u=b.x, v=b.x * 2.0)))
fn sizes(data: B*) -> int32 = reduce(data, 0, fn(a: int32, b: B) -> int32 = a + size(b.x) * 10 + size(b.y))
fn examples(data: B*) -> int32 = num_examples(data)
fn contraction(data: B*) -> float32[3] =
  reduce(data, zeros([3]), fn(a: float32[3], b: B) -> float32[3] = a + matmul(cast(b.y, float32), b.x))
fn projected(w: float32[3,2], data: B*) -> float32[2] =
  reduce(data, zeros([2]), fn(a: float32[2], b: B) -> float32[2] = a + sum(relu(matmul(b.x, w) - 0.5), 0))
fn classified(data: B*) -> float32 =
  reduce(data, 0.0, fn(a: float32, b: B) -> float32 =
    a + mean(sparse_softmax_cross_entropy(b.y, b.x)) + sum(one_hot(b.y, 3) * log_softmax(b.x, 1)))
fn chosen(data: B*) -> int32 = reduce(data, 0, fn(a: int32, b: B) -> int32 = a + sum(argmax(b.x, 1)))
fn clipped(data: B*) -> float32 =
  reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(where(b.x > 1.0, clip(b.x, 0.0, 1.5), b.x * 0.5)))
fn reshaped(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(reshape(b.x, [-1, 3, 1]) * 2.0))
fn scores(w: float32[3], data: B*) -> float32[?]* = map(data, fn(b: B) -> float32[?] = matmul(b.x, w))
fn weighted(data: B*) -> float32 {
  let n = cast(num_examples(data), float32)
  return reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(b.x) / n)
}
fn largest(data: B*) -> float32 = reduce(data, -100.0, fn(a: float32, b: B) -> float32 = maximum(a, max(b.x)))
fn column_max(data: B*) -> float32[3] = reduce(data, zeros([3]), fn(a: float32[3], b: B) -> float32[3] = a + max(b.x, 0))
fn smallest(data: B*) -> int32 = reduce(data, 100, fn(a: int32, b: B) -> int32 = minimum(a, min(b.y)))
fn best_rows(data: B*) -> int32 = reduce(data, 0, fn(a: int32, b: B) -> int32 = a + sum(argmax(b.x, 0)))
fn spread(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(softmax(b.x, 0) * b.x))
"""

# Ops that fail for a client with a batch of no rows (max of nothing): they fail vectorized too.
FAIL_ON_EMPTY = ("largest", "column_max", "smallest", "best_rows", "spread")


@functools.lru_cache(maxsize=None)
def ops() -> Program:
    result = fedlang.check_source(textwrap.dedent(OPS), "ops.fed")
    assert result.ok, result.render()
    return compile_ir(result, optimize=False)


def batch(rs, rows: int) -> Struct:
    return Struct(((rs.rand(rows, 3).astype(np.float32) * 4 - 2), rs.randint(0, 3, rows).astype(np.int32)), ("x", "y"))


def ragged_data(rs, with_empty_batch: bool) -> list[list[Struct]]:
    """4 clients: 2 batches (3 and 0 or 2 rows), none, 3 batches (5, 2, 1 rows), 2 batches (1, 4)."""
    return [[batch(rs, 3), batch(rs, 0 if with_empty_batch else 2)], [], [batch(rs, 5), batch(rs, 2), batch(rs, 1)],
            [batch(rs, 1), batch(rs, 4)]]


def _columns(f, rs, data) -> tuple[list, list]:
    flags, columns = [], []
    for _, t in f.params:
        if isinstance(t, SequenceType):
            flags.append(True)
            columns.append(data)
        else:
            flags.append(False)
            columns.append([rs.rand(*t.shape).astype(np.float32)] * len(data))
    return flags, columns


@pytest.mark.parametrize("name", [line.split()[1].split("(")[0] for line in OPS.splitlines() if line.startswith("fn ")])
def test_each_op_on_padded_rows(name):
    program = ops()
    f = program.functions[name]
    rs = np.random.RandomState(11)
    for empty in (False, True):
        data = ragged_data(rs, empty)
        flags, columns = _columns(f, rs, data)
        if empty and name in FAIL_ON_EMPTY:
            with pytest.raises(FedlangRuntimeError):
                run_alone(f, columns, len(data), program)
            with pytest.raises(FedlangRuntimeError):
                run_vectorized(f, flags, columns, len(data), program)
            continue
        check_rows(f, flags, columns, len(data), program)


def test_padded_sequence_results_lose_their_padding():
    program = ops()
    rs = np.random.RandomState(2)
    data = ragged_data(rs, True)
    w = rs.rand(3).astype(np.float32)
    g = vectorize(program.functions["scores"], (False, True), program, ragged=True, rows=True)
    assert g.result_type.names == ROWS_FIELDS
    got = run_vectorized(program.functions["scores"], [False, True], [[w] * 4, data], 4, program)
    assert [[s.shape for s in client] for client in got] == [[(3,), (0,)], [], [(5,), (2,), (1,)], [(1,), (4,)]]


@pytest.mark.parametrize("name", ["loss", "gradient", "value_and_gradient", "mapped", "mapped_gradient", "captured"])
def test_gradients_through_loops_over_padded_batches(name):
    """grad of a reduce: a forward scan, a zip and a reverse scan, all over padded batches."""
    program = loops()
    rs = np.random.RandomState(4)
    counts = [[2, 0, 3], [], [1], [4, 4]]
    data = [[Struct((rs.rand(n, 3).astype(np.float32), rs.rand(n).astype(np.float32)), ("x", "y")) for n in client]
            for client in counts]
    ws = [rs.rand(3).astype(np.float32) for _ in counts]
    check_rows(program.functions[name], [True, True], [ws, data], len(counts), program)


# Cases of tests/test_batching.py without a tensor parameter to pad: structural nodes and loops
# (the tests above cover them), scalar parameters only, a cond typed before its inputs.
NOT_PADDABLE_CASES = {"param", "capture", "closure", "global", "call", "const", "struct", "select", "reduce", "scan",
                      "map", "zip_seq", "count", "num_examples", "zeros", "ones", "random_normal", "random_uniform",
                      "cond"}


def _probe(case_, element: StructType, kind: str) -> Function:
    """map(data, b -> op(b.p0, ..)), or reduce summing every leaf of op(b.p0, ..) as float64."""
    f = Function(f"probe_{kind}", (("data", SequenceType(element)),), StructType(()))
    em = Emitter(f, helpers())
    data = em.typed("param", (), SequenceType(element), index=0)

    def op(inner, b):
        return case_.build(inner, [inner.select(b, k) for k in range(len(element.fields))])

    if kind == "map":
        f.result = em("map", data, lam(em, [("b", element)], lambda inner, ps, cs: op(inner, ps[0])))
    else:
        def step(inner, ps, cs):
            total = ps[0]
            for leaf in inner.leaves(op(inner, ps[1])):
                total = inner("add", total, inner("sum", inner("cast", leaf, dtype="float64")))
            return total
        f.result = em("reduce", data, typed_const(em, 0.0, TensorType("float64")),
                      lam(em, [("a", TensorType("float64")), ("b", element)], step))
    f.result_type = em.type(f.result)
    return f


@pytest.mark.parametrize("name", sorted(set(CASES) - NOT_PADDABLE_CASES))
@settings(max_examples=10)
@given(data=st.data())
def test_each_primitive_on_padded_rows(name, data):
    """Every primitive's case of tests/test_batching.py, some parameters given a padded
    leading axis, mapped over batches (a sequence of padded results) and reduced (every
    leaf summed, through the padding): NotVectorizable, or the per-client results."""
    case_ = CASES[name](data)
    assume(all(isinstance(t, TensorType) for t in case_.types))
    types = [concrete(data, t, case_.shapes.get(k)) for k, t in enumerate(case_.types)]
    padded = [t.rank >= 1 and data.draw(st.booleans(), label=f"pad p{k}") for k, t in enumerate(types)]
    assume(any(padded))
    element = StructType(tuple((f"p{k}", TensorType(t.dtype, (None,) + t.shape[1:]) if pad else t)
                               for k, (t, pad) in enumerate(zip(types, padded))))
    try:
        probes = [_probe(case_, element, kind) for kind in ("map", "reduce")]
        for f in probes:
            verify_function(f, helpers().functions)
    except Exception:       # noqa: BLE001 - the op's type rule does not take a `?` there
        reject()
    clients = data.draw(st.integers(1, 4), label="clients")
    lengths = data.draw(st.lists(st.integers(0, 3), min_size=clients, max_size=clients), label="lengths")

    def batch(rows: int) -> Struct:
        shapes = [((rows,) + t.shape[1:]) if pad else t.shape for t, pad in zip(types, padded)]
        return Struct([draw_value(data, TensorType(t.dtype, shape), case_.elements.get(k))
                       for k, (t, shape) in enumerate(zip(types, shapes))], element.names)

    sequences = [[batch(data.draw(st.integers(0, 3), label="rows")) for _ in range(n)] for n in lengths]
    for f in probes:
        try:
            run_alone(f, [sequences], clients, helpers())
        except FedlangRuntimeError:
            continue
        try:
            vectorize(f, (True,), helpers(), ragged=True, rows=True)
        except NotVectorizable:
            continue
        check_rows(f, [True], [sequences], clients, helpers())


NOT_EXACT = """
type B = <x=float32[?,3],y=int32[?]>
fn flattened(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(reshape(b.x, [-1])))
fn first_row(data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(b.x[0]))
fn unpadded(v: float32[?,3], data: B*) -> float32 = reduce(data, 0.0, fn(a: float32, b: B) -> float32 = a + sum(b.x + v))
fn carried(x: float32[?,3], data: B*) -> float32[?,3] = reduce(data, x, fn(a: float32[?,3], b: B) -> float32[?,3] = b.x)
fn against(v: float32[?], data: B*) -> float32[3] =
  reduce(data, zeros([3]), fn(a: float32[3], b: B) -> float32[3] = a + matmul(v, b.x))
"""


@pytest.mark.parametrize("name, message", [("flattened", "reshap"), ("first_row", "index"),
                                           ("unpadded", "not 1"), ("carried", "carries"),
                                           ("against", "contracting")])
def test_what_padding_cannot_keep_exact_is_not_vectorizable(name, message):
    result = fedlang.check_source(textwrap.dedent(NOT_EXACT), "not_exact.fed")
    assert result.ok, result.render()
    program = compile_ir(result, optimize=False)
    f = program.functions[name]
    flags = (True,) * len(f.params)
    with pytest.raises(NotVectorizable, match=message):
        vectorize(f, flags, program, ragged=True, rows=True)
    vectorize(f, flags, program, ragged=True)       # batches of one size per step: fine


# ---- generated programs ---------------------------------------------------------------------------

def _value(t: Type, rng: np.random.Generator, unknown: int, rows: int | None = None):
    """A random value of `t`; `rows`: the leading `?` of the tensors of a batch."""
    if isinstance(t, TensorType):
        shape = tuple((rows if k == 0 and rows is not None else unknown) if d is None else d
                      for k, d in enumerate(t.shape))
        if t.dtype == "bool":
            return np.asarray(rng.random(shape) < 0.5)
        if t.dtype.startswith("float"):
            return np.asarray(rng.uniform(-3, 3, shape), t.dtype)
        return np.asarray(rng.integers(0 if t.dtype == "uint8" else -5, 6, shape), t.dtype)
    if isinstance(t, StructType):
        return Struct([_value(f, rng, unknown, rows) for f in t.types], t.names)
    raise TypeError(t)


def _client_value(t: Type, rng: np.random.Generator, unknown: int, length: int):
    """A value of `t` with sequences of `length` batches of 0..3 rows each."""
    if isinstance(t, SequenceType):
        return [_value(t.element, rng, unknown, int(rng.integers(0, 4))) for _ in range(length)]
    if isinstance(t, StructType):
        return Struct([_client_value(f, rng, unknown, length) for f in t.types], t.names)
    return _value(t, rng, unknown)


def _has_sequence(t: Type) -> bool:
    return isinstance(t, SequenceType) or (isinstance(t, StructType) and any(_has_sequence(f) for f in t.types))


def _tensors(t: Type) -> list[tuple[str, TensorType]] | None:
    """(access path, type) of every leaf of a tensor or struct of tensors (None: something else)."""
    if isinstance(t, TensorType):
        return None if t.dtype == "string" else [("", t)]
    if isinstance(t, StructType):
        paths = [_tensors(f) for f in t.types]
        return None if any(p is None for p in paths) else [(f"[{k}]{q}", u) for k, p in enumerate(paths) for q, u in p]
    return None


def batch_wrappers(program: Program) -> str:
    """For each local fn of tensors: a map and a reduce of it over a sequence of batches of
    its parameters, so every generated computation runs on padded rows."""
    out = []
    for k, (name, f) in enumerate(program.functions.items()):
        if f.federated or "." in name or not f.params or _tensors(f.result_type) is None \
                or any(_tensors(t) is None for _, t in f.params):
            continue
        element = "<" + ",".join(f"p{i}={t}" for i, (_, t) in enumerate(f.params)) + ">"
        call = f"{name}(" + ", ".join(f"b.p{i}" for i in range(len(f.params))) + ")"
        out.append(f"fn rows_map_{k}(data: {element}*) -> {f.result_type}* = map(data, fn(b: {element}) -> "
                   f"{f.result_type} = {call})")
        leaves = [f"sum(cast(r{path}, float64))" for path, _ in _tensors(f.result_type)]
        if leaves:
            out.append(f"fn rows_sum_{k}(data: {element}*) -> float64 = reduce(data, cast(0.0, float64), "
                       f"fn(a: float64, b: {element}) -> float64 {{\n  let r = {call}\n  return a + "
                       f"{' + '.join(leaves)}\n}})")
    return "\n".join(out)


def _compiled(source: str) -> Program | None:
    result = fedlang.check_source(source, "generated.fed")
    if not result.ok:
        return None
    program = compile_ir(result, optimize=False)
    verify(program, "build")
    return program


@settings(max_examples=60)
@given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1))
def test_generated_functions_over_batches_of_different_sizes(data, seed):
    """Every local fn of a random program (and maps and reduces of each over batches of
    its parameters) with batch-sequence parameters: NotVectorizable, or what every client
    computes alone."""
    from fedlang.testing.strategies import programs

    generated = data.draw(programs(process=False))
    try:
        program = _compiled(generated.source)
        assert program is not None
        program = _compiled(generated.source + "\n" + batch_wrappers(program) + "\n") or program
    except Exception:        # noqa: BLE001 - the program's own IR is ill-formed (another test's business)
        reject()
    rng = np.random.default_rng(seed)
    for f in program.functions.values():
        if f.federated or isinstance(f.result_type, FunctionType) or not any(_has_sequence(t) for _, t in f.params) \
                or any(isinstance(t, FunctionType) or is_placed(t) for _, t in f.params):
            continue
        clients, unknown = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        flags = [_has_sequence(t) or bool(rng.random() < 0.5) for _, t in f.params]
        columns = []
        for (_, t), batched in zip(f.params, flags):
            if batched:
                columns.append([_client_value(t, rng, unknown, int(rng.integers(0, 4))) for _ in range(clients)])
            else:
                columns.append([_client_value(t, rng, unknown, int(rng.integers(1, 3)))] * clients)
        try:
            run_alone(f, columns, clients, program)
        except Exception:    # noqa: BLE001 - a client fails alone (an index out of range, ...)
            continue
        try:
            vectorize(f, tuple(flags), program, ragged=True, rows=True)
        except NotVectorizable:
            continue
        check_rows(f, flags, columns, clients, program, tolerance=1e-4, lenient_names=True)


# ---- the runtime helpers ---------------------------------------------------------------------------

def test_stack_clients_pads_rows_with_real_rows_and_unstack_undoes_it():
    t = SequenceType(StructType((("x", TensorType("float32", (None, 2))), ("y", TensorType("int32", (None,))),
                                 ("w", TensorType("float32", (2,))))))
    def element(rows, start):
        return Struct((np.arange(start, start + 2 * rows, dtype=np.float32).reshape(rows, 2),
                       np.arange(rows, dtype=np.int32) + start, np.full(2, start, np.float32)), ("x", "y", "w"))
    values = [[element(3, 0), element(0, 10)], [element(1, 20)], []]
    stacked = stack_clients(values, ragged=True, rows=True, declared=t)
    assert stacked.names == ROWS_FIELDS
    np.testing.assert_array_equal(stacked.lengths, [2, 1, 0])
    np.testing.assert_array_equal(stacked.rows[0], [3, 1, 3])     # client 2 has no step 0: its filler's count
    np.testing.assert_array_equal(stacked.rows[1], [0, 0, 0])
    x0 = stacked.elements[0].x
    assert x0.shape == (3, 3, 2) and stacked.elements[0].w.shape == (3, 2)
    np.testing.assert_array_equal(x0[1], [[20, 21], [20, 21], [20, 21]])     # the client's own first row
    np.testing.assert_array_equal(stacked.elements[1].x.shape, (3, 0, 2))
    assert all(np.isfinite(e.x).all() for e in stacked.elements)
    assert_same(unstack_clients(stacked, 3, ragged=True, declared=t), values, exact=True)
    with pytest.raises(ValueError, match="rows"):
        stack_clients([[Struct((np.zeros((2, 2)), np.zeros(3, np.int32), np.zeros(2)), ("x", "y", "w"))]],
                      ragged=True, rows=True, declared=t)
    with pytest.raises(ValueError, match="ragged"):
        stack_clients(values, rows=True)


def test_a_row_borrowed_from_another_client_when_a_batch_has_none():
    values = [[np.zeros((0, 2), np.float32)], [np.ones((2, 2), np.float32) * 7]]
    stacked = stack_clients(values, ragged=True, rows=True)       # no declared type: leaves of rank >= 1
    np.testing.assert_array_equal(stacked.elements[0][0], [[7, 7], [7, 7]])
    np.testing.assert_array_equal(stacked.rows[0], [0, 2])
    assert_same(unstack_clients(stacked, 2, ragged=True), values, exact=True)


def test_rows_needs_ragged():
    program = ops()
    with pytest.raises(ValueError, match="ragged"):
        vectorize(program.functions["total"], (True,), program, rows=True)
