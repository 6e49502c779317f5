"""The TensorFlow backend and the local simulator against the reference interpreter.

  * examples: mean_temperature, share_above and a FedAvg round on ragged client
    data (short last batches, different numbers of batches, clients with no
    data) give what the interpreter gives, vectorized, chunked and per client;
  * random well-typed programs (fedlang.testing.strategies.programs) with random
    client counts and random ragged client data: the plan's result equals the
    interpreter's to float tolerance;
  * aggregation partials merged over any chunking equal the intrinsic's meaning.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import fedlang
from fedlang.api import compile_ir
from fedlang.backends.aggregation import Aggregator
from fedlang.backends.plan import compile_plan
from fedlang.backends.simulator import Simulator
from fedlang.ir import passes
from fedlang.ir.interpreter import Interpreter
from fedlang.ir.primitives import PRIMITIVES
from fedlang.ir.types import FederatedType, Placement
from fedlang.ir.values import Struct
from fedlang.types import parse
from test_passes import NoValue, built_or_reject, random_args, random_value, runnable
from fedlang.ir.types import SequenceType, StructType, TensorType
from fedlang.testing.strategies import programs as generated_programs


def plan_of(path_or_source: str, name: str = "test.fed"):
    if path_or_source.endswith(".fed") and os.path.exists(path_or_source):
        result = fedlang.check(path_or_source)
    else:
        result = fedlang.check_source(path_or_source, name)
    assert result.ok, result.render()
    program = compile_ir(result)
    return program, compile_plan(program, name, result.sources.texts)


def close(a, b, rtol=1e-5, atol=1e-5) -> bool:
    """Equal up to float rounding: same structure, dtype and shape; NaN equals NaN."""
    if isinstance(a, Struct) or isinstance(b, Struct):
        return (isinstance(a, Struct) and isinstance(b, Struct) and a.names == b.names
                and all(close(x, y, rtol, atol) for x, y in zip(a.values, b.values)))
    if isinstance(a, list) or isinstance(b, list):
        return (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
                and all(close(x, y, rtol, atol) for x, y in zip(a, b)))
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    return bool(np.array_equal(a, b))


def interpret(program, name, args, clients):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return Interpreter(program).call(name, args, clients)


# ---- examples ---------------------------------------------------------------------------------

def test_mean_temperature_and_share_above(repo_root):
    program, plan = plan_of(str(repo_root / "examples" / "mean_temperature.fed"))
    readings = [np.float32(v) for v in (20.0, 22.5, 19.0, 30.25)]
    sim = Simulator(plan)
    assert sim.call("mean_temperature", [readings]) == np.float32(22.9375)
    assert sim.call("mean_temperature", [np.asarray(readings)]) == np.float32(22.9375)   # rows are clients
    for chunk in (1, 3, None):
        got = Simulator(plan, clients_per_chunk=chunk).call("share_above", [readings, np.float32(21.0)])
        assert got == interpret(program, "share_above", [readings, np.float32(21.0)], 4) == np.float32(0.5)


def _digits_clients(sizes, seed=0, batch=16):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = rng.random((n, 64), dtype=np.float32)
        y = rng.integers(0, 10, n).astype(np.int32)
        out.append([Struct((x[i:i + batch], y[i:i + batch]), ("x", "y")) for i in range(0, n, batch)])
    return out


@pytest.fixture(scope="module")
def fedavg():
    from conftest import ROOT
    return plan_of(str(ROOT / "examples" / "fedavg_digits.fed"))


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_fedavg_round_on_ragged_clients_equals_the_interpreter(fedavg, chunk):
    program, plan = fedavg
    data = _digits_clients([3, 16, 33, 0, 21, 40])
    sim = Simulator(plan, clients_per_chunk=chunk)
    model = sim.call("initialize", [])
    assert close(model, interpret(program, "initialize", [], 0))
    got = sim.call("round", [model, data])
    expected = interpret(program, "round", [model, data], len(data))
    assert close(got, expected, rtol=2e-5, atol=2e-6)


def test_the_client_phase_of_fedavg_is_vectorized(fedavg):
    _, plan = fedavg
    modes = {p.name: p.mode for p in plan.computations["round"].phases}
    assert modes == {"server_prepare": "server", "client_work": "vectorized", "server_update": "server"}


# ---- random programs ---------------------------------------------------------------------------

def _with_rows(t, rows: int):
    """`t` with every leading `?` fixed to `rows` (one batch of a sequence)."""
    if isinstance(t, TensorType):
        return TensorType(t.dtype, (rows,) + t.shape[1:]) if t.rank and t.shape[0] is None else t
    if isinstance(t, StructType):
        return StructType(tuple((n, _with_rows(f, rows)) for n, f in t.fields))
    return t


def ragged_value(t, rng, clients: int, unknown: int):
    """Like test_passes.random_value, but every sequence has 0..4 elements and each element
    its own number of rows (a leading `?`), as client data sets of batches have."""
    if isinstance(t, SequenceType):
        return [ragged_value(_with_rows(t.element, int(rng.integers(0, 5))), rng, clients, unknown)
                for _ in range(int(rng.integers(0, 5)))]
    if isinstance(t, StructType):
        return Struct([ragged_value(f, rng, clients, unknown) for f in t.types], t.names)
    if isinstance(t, FederatedType):
        if t.placement is Placement.SERVER:
            return ragged_value(t.member, rng, clients, unknown)
        if t.all_equal:
            return [ragged_value(t.member, rng, clients, unknown)] * clients
        return [ragged_value(t.member, rng, clients, unknown) for _ in range(clients)]
    return random_value(t, rng, clients, unknown)


def ragged_args(function, seed: int, clients: int) -> list:
    rng = np.random.default_rng(seed)
    unknown = int(rng.integers(1, 4))
    return [ragged_value(t, rng, clients, unknown) for _, t in function.params]


# What the TensorFlow backend does not lower (docs/runtime.md, Limits): such comps are listed as
# skipped in the plan with one of these reasons.
KNOWN_LIMITS = ("function value", "sequences and functions cannot be carried", "choosing between sequences")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
@given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1), chunk=st.sampled_from([None, 1, 2]))
def test_generated_programs_agree_with_the_interpreter(data, seed, chunk):
    generated = data.draw(generated_programs())
    result = fedlang.check_source(generated.source, "generated.fed")
    assert result.ok, result.render()
    program = passes.optimize(built_or_reject(result))
    comps = [n for n in runnable(program) if program.functions[n].federated]
    if not comps:
        return
    plan = compile_plan(program, "generated.fed", result.sources.texts)
    for name, why in plan.skipped.items():      # only the documented limits (docs/runtime.md) are out of reach
        assert any(limit in why for limit in KNOWN_LIMITS), why
    sim = Simulator(plan, clients_per_chunk=chunk)
    for name in comps:
        if name in plan.skipped:
            continue
        for clients, make in ((1, random_args), (4, random_args), (3, ragged_args), (5, ragged_args)):
            try:
                args = make(program.functions[name], seed + clients, clients)
            except NoValue:
                break
            try:
                expected = interpret(program, name, args, clients)
            except Exception:      # noqa: BLE001 - the reference fails (a run-time error): nothing to compare
                continue
            got = sim.call(name, args, clients)
            event(f"compared ({make.__name__}, {plan.computations[name].phases[1].mode if len(plan.computations[name].phases) > 1 else 'server'})")
            assert close(got, expected, rtol=1e-4, atol=1e-5), \
                f"{name} ({clients} clients):\n{generated.source}\nexpected {expected}\ngot {got}"


# ---- aggregation partials --------------------------------------------------------------------

@given(n=st.integers(0, 9), cuts=st.lists(st.integers(1, 4), max_size=4),
       op=st.sampled_from(["federated_sum", "federated_mean", "federated_min", "federated_max",
                           "federated_secure_sum"]),
       weighted=st.booleans(), seed=st.integers(0, 1000))
def test_partials_merged_over_any_chunking_equal_the_intrinsic(n, cuts, op, weighted, seed):
    rng = np.random.default_rng(seed)
    integer = op == "federated_secure_sum"
    member = parse("<a=int32[2],b=int32>" if integer else "<a=float32[2],b=float64>")
    values = [Struct((rng.integers(-50, 50, 2).astype(np.int32), np.int32(rng.integers(-9, 9)))
                     if integer else (rng.normal(size=2).astype(np.float32), np.float64(rng.normal())),
                     ("a", "b")) for _ in range(n)]
    weights = [np.float32(rng.uniform(0.5, 3)) for _ in range(n)] if weighted and op == "federated_mean" else None
    attrs = {"bitwidth": 7} if integer else {}
    kwargs = {"x": values, "out_type": FederatedType(member, Placement.SERVER, True), **attrs}
    if weights is not None:
        kwargs["weight"] = weights
    expected = PRIMITIVES[op].impl(**kwargs)
    agg = Aggregator(op, member, attrs)
    partial, start = agg.empty(), 0
    bounds = []
    for c in cuts + [n]:
        end = min(n, start + c)
        if end > start:
            bounds.append((start, end))
        start = end
    if start < n:
        bounds.append((start, n))
    partials = []
    for lo, hi in bounds:
        stacked = Struct((np.stack([v[0] for v in values[lo:hi]]), np.stack([v[1] for v in values[lo:hi]])),
                         ("a", "b"))
        w = None if weights is None else np.asarray(weights[lo:hi])
        if integer:       # one secure aggregation session for the round, fed group by group
            partial = agg.add(partial, stacked, hi - lo, w, start=lo, total=n)
        else:
            partials.append(agg.add(agg.empty(), stacked, hi - lo, w))
    for p in partials:
        partial = agg.merge(partial, p)
    assert close(agg.report(partial), expected, rtol=1e-5, atol=1e-6)
