"""Phase splitting (ir/phases.py): a comp cut at its communication points.

Running the phases in order (`run_phases`: server phases once, client phases
once per client, aggregations between them) must give what the reference
interpreter gives for the whole comp, on random inputs and client counts (0 and
1 included), with and without the optimization passes. And the split must be
placement-sound: a server phase takes per-client values only as results of
aggregations, a client phase takes server values only as broadcasts, and every
phase function is local (unplaced types only).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedlang
from fedlang.testing.strategies import programs as generated_programs
from fedlang.ir import passes
from fedlang.ir.graph import Program
from fedlang.ir.phases import PhaseSplitError, Phases, format_phases, run_phases, split_phases
from fedlang.ir.types import FederatedType, Placement, is_placed, walk
from fedlang.ir.values import Struct
from fedlang.ir.verify import verify_function
from test_passes import CORPUS, build, built_or_reject, random_args, run, runnable, same

ROOT = Path(__file__).resolve().parent.parent

PROGRAMS = {
    "mean_temperature": (ROOT / "examples" / "mean_temperature.fed").read_text(encoding="utf-8"),
    # A FedAvg-like round without grad: each client moves the model towards the mean of its data.
    "fedavg_like": """
type Model = <w=float32[3],b=float32>
fn local_update(m: Model, data: float32[?,3]*) -> Model =
  reduce(data, m, fn(acc: Model, x: float32[?,3]) -> Model = (w = acc.w * 0.5 + 0.5 * mean(x, 0), b = acc.b + 0.1 * mean(x)))
fn examples(data: float32[?,3]*) -> float32 = cast(num_examples(data), float32)
fn loss(m: Model, data: float32[?,3]*) -> float32 =
  reduce(data, 0.0, fn(acc: float32, x: float32[?,3]) -> float32 = acc + sum(square(x - m.w)))
comp round(model: Model@SERVER, data: {float32[?,3]*}@CLIENTS) -> <state=Model@SERVER,metrics=float32@SERVER> {
  let local = federated_broadcast(model)
  let weights = federated_map(examples, data)
  let updated = federated_map(local_update, local, data)
  return (state = federated_mean(updated, weight=weights), metrics = federated_sum(federated_map(loss, local, data)))
}
""",
    # broadcast -> aggregate -> broadcast -> aggregate: 3 server phases, 2 client phases; a client value
    # (scaled) and a server value (s2) are kept from an early phase for a later one.
    "talks_twice": """
fn sub(x: float32, c: float32) -> float32 = x - c
fn sq(x: float32) -> float32 = x * x
comp variance(d: {float32}@CLIENTS, scale: float32@SERVER) -> <mean=float32@SERVER,var=float32@SERVER> {
  let s2 = federated_map(sq, scale)
  let scaled = federated_map(fn(x: float32, s: float32) -> float32 = x * s, d, federated_broadcast(scale))
  let center = federated_mean(scaled)
  let centered = federated_map(sub, scaled, federated_broadcast(center))
  let var = federated_mean(federated_map(sq, centered))
  return (mean = federated_map(fn(c: float32, s: float32) -> float32 = c * s, center, s2),
          var = federated_map(fn(v: float32, s: float32) -> float32 = v / s, var, s2))
}
""",
    "aggregations": """
fn to_int(x: float32) -> int32 = cast(x * 10.0, int32)
comp all_kinds(d: {float32}@CLIENTS, w: {float32}@CLIENTS, z0: float32)
    -> <s=float32@SERVER,m=float32@SERVER,lo=float32@SERVER,hi=float32@SERVER,secure=int32@SERVER,agg=float32@SERVER> =
  (s = federated_sum(d), m = federated_mean(d, weight=w), lo = federated_min(d), hi = federated_max(d),
   secure = federated_secure_sum(federated_map(to_int, d), 8),
   agg = federated_aggregate(d, z0, fn(acc: float32, x: float32) -> float32 = acc + x * z0,
                             fn(a: float32, b: float32) -> float32 = a + b, fn(a: float32) -> float32 = a * 2.0))
""",
    "odd_shapes": """
fn add(x: float32, y: float32) -> float32 = x + y
comp scaled(d: {float32}@CLIENTS, k: float32) -> {float32}@CLIENTS = federated_map(fn(x: float32) -> float32 = x * k, d)
comp placed_k(d: {float32}@CLIENTS, k: float32) -> float32@SERVER =
  federated_sum(federated_map(add, d, federated_value(k, CLIENTS)))
comp no_talk(s: float32@SERVER) -> float32@SERVER = federated_map(fn(x: float32) -> float32 = x + 1.0, s)
comp client_const() -> float32@CLIENTS = federated_value(3.0, CLIENTS)
comp count(d: {float32}@CLIENTS) -> float32@SERVER = federated_sum(federated_value(1.0, CLIENTS))
comp pairs(p: <a={float32}@CLIENTS,b=float32@SERVER>) -> float32@SERVER =
  federated_sum(federated_map(add, p.a, federated_broadcast(p.b)))
comp ident(p: <a={float32}@CLIENTS,b=float32@SERVER>) -> <a={float32}@CLIENTS,b=float32@SERVER> = p
comp client_result(d: {float32}@CLIENTS, s: float32@SERVER) -> <float32@SERVER,{float32}@CLIENTS> {
  let b = federated_map(add, d, federated_broadcast(s))
  return (federated_sum(b), federated_map(add, b, federated_broadcast(federated_sum(b))))
}
""",
    "calls": CORPUS["inline"],
    "fused": CORPUS["fuse"],
    "broadcasts": CORPUS["broadcast"],
}


@functools.lru_cache(maxsize=None)
def program(name: str, optimized: bool) -> Program:
    plain = build(PROGRAMS[name], f"{name}.fed")
    return passes.optimize(plain) if optimized else plain


@functools.lru_cache(maxsize=None)
def phases_of(name: str, comp: str, optimized: bool) -> Phases:
    p = program(name, optimized)
    phases = split_phases(p.functions[comp], p)
    for phase in phases:
        verify_function(phase.function, phase.globals, f"phase splitting ({phase.name})")
    return phases


def comps(name: str) -> list[str]:
    p = program(name, False)
    return [c for c in runnable(p) if p.functions[c].federated]


CASES = [(name, comp) for name in sorted(PROGRAMS) for comp in comps(name)]


def assert_sound(phases: Phases, comp_params) -> None:
    """Placement soundness of a split (see the module docstring)."""
    assert phases, "no phases"
    outputs = [{v.name for v in phase.outputs} for phase in phases]
    for k, phase in enumerate(phases):
        assert phase.index == k and phase.kind == ("server" if k % 2 == 0 else "client")
        for value in phase.inputs + phase.outputs:
            assert not any(isinstance(t, FederatedType) for t in walk(value.type)), f"{value} is placed"
        for _, data in phase.function.graph.nodes(data=True):
            assert not is_placed(data["node"].type) and not data["node"].prim.federated
        for value in phase.inputs:
            if value.role == "param":
                t = comp_params[value.param[0]][1]
                for index in value.param[1:]:
                    t = t.types[index]
                clients = isinstance(t, FederatedType) and t.placement is Placement.CLIENTS
                assert clients == (phase.kind == "client"), f"{phase.name} takes the argument {value.name} ({t})"
            elif phase.kind == "server":
                assert value.role in ("aggregation", "server"), f"{phase.name} takes {value.name} as {value.role}"
                if value.role == "aggregation":
                    assert value.name in {a.result for a in phases[k - 1].aggregations}
                else:
                    assert any(value.name in outputs[j] for j in range(0, k, 2))
            else:
                assert value.role in ("broadcast", "client"), f"{phase.name} takes {value.name} as {value.role}"
                if value.role == "broadcast":
                    assert value.name in outputs[k - 1]
                else:
                    assert any(value.name in outputs[j] for j in range(1, k, 2))
        for agg in phase.aggregations:
            assert phase.kind == "client"
            assert agg.value in outputs[k] and (agg.weight is None or agg.weight in outputs[k])
            assert k + 1 < len(phases) and agg.result in {v.name for v in phases[k + 1].inputs}
            server_side = ([agg.zero] if agg.zero else []) + [n for _, _, names in agg.functions for n in names]
            for name in server_side:
                assert name in outputs[k - 1], f"{name} is not sent by the server phase before {phase.name}"


# ==== meaning ===================================================================================

@pytest.mark.parametrize("name, comp", CASES)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), clients=st.sampled_from([0, 1, 2, 5]))
def test_running_the_phases_equals_running_the_comp(name, comp, seed, clients):
    plain = program(name, False)
    args = random_args(plain.functions[comp], seed, clients)
    expected = run(plain, comp, args, clients)
    for optimized in (False, True):
        with np.errstate(all="ignore"):
            got = run_phases(phases_of(name, comp, optimized), args, clients)
        assert same(expected, got), f"{name}.{comp} (optimized={optimized}, {clients} clients): {expected} != {got}"


@pytest.mark.parametrize("name, comp", CASES)
def test_phases_are_placement_sound(name, comp):
    for optimized in (False, True):
        assert_sound(phases_of(name, comp, optimized), program(name, optimized).functions[comp].params)


# ==== shapes of the split ========================================================================

def _shape(phases: Phases) -> list[tuple[str, str]]:
    return [(p.name, p.kind) for p in phases]


MAP_REDUCE = [("server_prepare", "server"), ("client_work", "client"), ("server_update", "server")]


def test_a_round_that_talks_once_is_the_map_reduce_form():
    phases = phases_of("mean_temperature", "share_above", True)
    assert _shape(phases) == MAP_REDUCE
    prepare, work, update = phases
    assert [(v.name, str(v.type), v.role) for v in prepare.inputs] == [("threshold", "float32", "param")]
    assert [v.role for v in prepare.outputs] == ["broadcast"]
    assert sorted((str(v.type), v.role) for v in work.inputs) == [("float32", "broadcast"), ("float32", "param")]
    assert [a.op for a in work.aggregations] == ["federated_mean"]
    assert [v.role for v in update.inputs] == ["aggregation"]
    assert str(work.function.type).startswith("(<readings=float32,")


def test_share_above_prints_its_phases():
    assert format_phases(phases_of("mean_temperature", "share_above", True)) == """\
comp share_above : (<readings={float32}@CLIENTS,threshold=float32@SERVER> -> float32@SERVER)
  phase 0 server_prepare (server) : (float32 -> <broadcast_3=float32>)
    in  threshold: float32  <- argument 1
    out broadcast_3: float32  -> broadcast
  phase 1 client_work (client) : (<readings=float32,broadcast_3=float32> -> <v4=float32>)
    in  readings: float32  <- argument 0
    in  broadcast_3: float32  <- broadcast
    out v4: float32  -> aggregate
    aggregate federated_mean(v4) -> mean_5: float32
  phase 2 server_update (server) : (float32 -> <mean_5=float32>)
    in  mean_5: float32  <- aggregation
    out mean_5: float32  -> result
  result mean_5@SERVER"""


def test_fedavg_like_round():
    phases = phases_of("fedavg_like", "round", True)
    assert _shape(phases) == MAP_REDUCE
    work = phases[1]
    ops = sorted((a.op, a.weight is not None) for a in work.aggregations)
    assert ops == [("federated_mean", True), ("federated_sum", False)]
    model = "<w=float32[3],b=float32>"
    assert {(str(v.type), v.role) for v in work.inputs} == {(model, "broadcast"), ("float32[?,3]*", "param")}
    assert phases.result[0] == "struct" and phases.result[1] == ("state", "metrics")


def test_a_round_that_talks_twice_has_two_client_phases():
    for optimized in (False, True):
        phases = phases_of("talks_twice", "variance", optimized)
        assert _shape(phases) == [("server_prepare", "server"), ("client_work_1", "client"),
                                  ("server_step_1", "server"), ("client_work_2", "client"),
                                  ("server_update", "server")]
        roles = {(p.name, v.role) for p in phases for v in p.inputs}
        assert ("client_work_2", "client") in roles          # `scaled` stays on the client
        assert ("server_update", "server") in roles          # `s2` stays on the server


def test_every_aggregation_operator():
    phases = phases_of("aggregations", "all_kinds", True)
    assert _shape(phases) == MAP_REDUCE
    aggs = {a.op: a for a in phases[1].aggregations}
    assert set(aggs) == {"federated_sum", "federated_mean", "federated_min", "federated_max",
                         "federated_secure_sum", "federated_aggregate"}
    assert dict(aggs["federated_secure_sum"].attrs) == {"bitwidth": 8}
    aggregate = aggs["federated_aggregate"]
    assert [role for role, _, _ in aggregate.functions] == ["accumulate", "merge", "report"]
    accumulate = aggregate.functions[0]
    assert accumulate[2] == ("z0",) and aggregate.zero in {v.name for v in phases[0].outputs}


def test_unplaced_arguments_the_clients_need_are_sent_along():
    phases = phases_of("odd_shapes", "scaled", True)
    assert [(v.name, v.role) for v in phases[1].inputs if v.role != "param"] == [("k", "broadcast")]
    assert _shape(phases_of("odd_shapes", "no_talk", True)) == [("server", "server")]
    assert phases_of("odd_shapes", "client_const", True).result[0] == "replicate"
    assert phases_of("odd_shapes", "ident", False).result == ("struct", ("a", "b"), (("client", "p.a"),
                                                                                     ("server", "p.b")))


def test_fields_of_a_struct_of_placed_values_are_separate_inputs():
    phases = phases_of("odd_shapes", "pairs", False)
    assert [(v.name, v.param) for v in phases[0].inputs] == [("p.b", (0, 1))]
    assert [(v.name, v.param) for v in phases[1].inputs if v.role == "param"] == [("p.a", (0, 0))]
    readings = [np.asarray(-1.0, np.float32), np.asarray(2.5, np.float32)]
    threshold = np.asarray(2.0, np.float32)
    got = run_phases(phases, [Struct([readings, threshold], ["a", "b"])], 2)
    assert same(got, np.asarray(5.5, np.float32))


def test_fedavg_digits_splits_into_the_map_reduce_form():
    try:
        loaded = fedlang.load(str(ROOT / "examples" / "fedavg_digits.fed"))
    except Exception as error:       # noqa: BLE001 - grad not landed yet
        pytest.skip(f"fedavg_digits.fed does not load: {error}")
    p = loaded.program
    phases = split_phases(p.functions["round"], p)
    assert _shape(phases) == MAP_REDUCE
    assert_sound(phases, p.functions["round"].params)
    model = loaded.interpreter.call("initialize", [], 0)
    rng = np.random.default_rng(1)
    data = [[Struct([rng.standard_normal((4, 64)).astype(np.float32), rng.integers(0, 10, 4).astype(np.int32)],
                    ["x", "y"])] for _ in range(3)]
    assert same(run(p, "round", [model, data], 3), run_phases(phases, [model, data], 3))


def test_value_names_never_clash_with_parameter_names():
    p = build("""
fn add(x: float32, y: float32) -> float32 = x + y
comp f(v5: {float32}@CLIENTS, broadcast_4: float32@SERVER, sum_6: float32@SERVER) -> <float32@SERVER,float32@SERVER> =
  (federated_sum(federated_map(add, v5, federated_broadcast(broadcast_4))), sum_6)
""")
    phases = split_phases(p.functions["f"], p)
    assert {v.name for v in phases[1].inputs} == {"v5", "broadcast_4_"}
    assert [v.name for v in phases[1].outputs] == ["v5_"]
    for phase in phases:
        names = [v.name for v in phase.inputs]
        assert len(names) == len(set(names))
    args = [[np.asarray(1.0, np.float32), np.asarray(2.0, np.float32)], np.asarray(0.5, np.float32),
            np.asarray(7.0, np.float32)]
    assert same(run(p, "f", args, 2), run_phases(phases, args, 2))


def test_split_phases_wants_a_comp():
    p = program("talks_twice", False)
    with pytest.raises(ValueError, match="local function"):
        split_phases(p.functions["sq"], p)


def test_a_function_argument_used_on_the_clients_is_a_clear_limitation():
    p = build("comp f(g: (float32 -> float32), d: {float32}@CLIENTS) -> {float32}@CLIENTS = federated_map(g, d)")
    with pytest.raises(PhaseSplitError, match="function argument"):
        split_phases(p.functions["f"], p)


def test_splitting_does_not_modify_the_program():
    p = program("calls", False)
    from fedlang.ir.graph import format_program

    before = format_program(p)
    split_phases(p.functions["outer"], p)
    assert format_program(p) == before


# ==== random programs ==============================================================================

@settings(max_examples=80, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2 ** 32 - 1))
def test_generated_comps_split_soundly_and_run_alike(data, seed):
    generated = data.draw(generated_programs())
    result = fedlang.check_source(generated.source, "generated.fed")
    assert result.ok, result.render()
    plain = built_or_reject(result)
    optimized = passes.optimize(plain)
    for name in runnable(plain):
        if not plain.functions[name].federated:
            continue
        for p in (plain, optimized):
            phases = split_phases(p.functions[name], p)
            for phase in phases:
                verify_function(phase.function, phase.globals, "phase splitting")
            assert_sound(phases, p.functions[name].params)
        for clients in (0, 1, 3):
            args = random_args(plain.functions[name], seed + clients, clients)
            try:
                expected = run(plain, name, args, clients)
            except Exception:     # noqa: BLE001 - the reference fails (runtime error or a bug elsewhere)
                continue
            for p in (plain, optimized):
                try:
                    with np.errstate(all="ignore"):
                        got = run_phases(split_phases(p.functions[name], p), args, clients)
                except Exception:
                    # With no clients, client work the server does once (a replicated or hoisted value)
                    # may fail where the comp never ran it.
                    if clients == 0:
                        continue
                    raise
                assert same(expected, got, lenient_dtypes=True), f"{name}:\n{generated.source}\n{expected}\n{got}"
