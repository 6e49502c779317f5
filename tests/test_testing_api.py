"""fedlang.testing, the public property-testing API (docs/testing.md):

  * every value `values(t)` draws is a value of `t` (dtype, shape with `?` free, struct
    names, sequence elements, client lists), for types drawn by `types()`; the same for
    the NumPy-driven `draw_value` and for `arguments(comp)`;
  * the generator's documented choices: clients, shared `?` sizes, ragged batches,
    ranges, shrinking;
  * the membership check and the comparison say where a value is wrong;
  * `assert_backends_agree` passes on examples/mean_temperature.fed and a FedAvg round,
    and fails, saying where, on a deliberately different computation;
  * the package imports without TensorFlow and says how to install hypothesis.

That generated programs check clean with their types and that `ill_placed` mutations
give their diagnostic is tests/test_program_properties.py's job (same strategies).
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import fedlang
import fedlang.testing as ft
from conftest import ROOT
from fedlang.ir.types import FederatedType, FunctionType, Placement, SequenceType, StructType, TensorType, walk
from fedlang.ir.values import Struct
from fedlang.testing import strategies as fst
from fedlang.types import parse

MEAN = str(ROOT / "examples" / "mean_temperature.fed")
FEDAVG = str(ROOT / "examples" / "fedavg_digits.fed")


def _leaves_are_arrays(value) -> bool:
    if isinstance(value, Struct):
        return all(_leaves_are_arrays(v) for v in value.values)
    if isinstance(value, list):
        return all(_leaves_are_arrays(v) for v in value)
    return isinstance(value, np.ndarray)


def _finite(value) -> bool:
    if isinstance(value, (Struct, list)):
        return all(_finite(v) for v in value)
    return value.dtype.kind not in "fc" or bool(np.isfinite(value).all())


# ---- values are members of their type -----------------------------------------------------------

@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_values_have_their_type(data):
    t = data.draw(fst.types(max_depth=3, functions=False, max_dim=4), label="type")
    value = data.draw(ft.values(t, clients=st.integers(0, 4), lengths=st.integers(0, 3)), label="value")
    assert ft.mismatch(value, t) is None, ft.mismatch(value, t)
    assert _leaves_are_arrays(value) and _finite(value)


@given(t=fst.types(max_depth=3, functions=False, max_dim=4), seed=st.integers(0, 2 ** 32 - 1),
       clients=st.integers(0, 4), ragged=st.booleans())
def test_numpy_drawn_values_have_their_type(t, seed, clients, ragged):
    value = ft.draw_value(t, np.random.default_rng(seed), clients, 2, ragged=ragged, ragged_clients=ragged)
    assert ft.is_value_of(value, t, clients if any(isinstance(x, FederatedType) and x.placement is Placement.CLIENTS
                                                   for x in walk(t)) else None)
    assert _leaves_are_arrays(value)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_arguments_have_the_parameter_types_and_one_client_count(data):
    params = data.draw(st.lists(fst.types(max_depth=2, functions=False, max_dim=3), max_size=3), label="params")
    args = data.draw(ft.arguments(params, clients=st.integers(0, 5)), label="args")
    assert isinstance(args, ft.Arguments) and len(args) == len(params)
    for value, t in zip(args, params):
        assert ft.mismatch(value, t, args.clients) is None, ft.mismatch(value, t, args.clients)


def test_function_types_have_no_values():
    with pytest.raises(ft.NoValue, match="function"):
        ft.values(parse("<a=(float32 -> float32)>"))
    with pytest.raises(ft.NoValue):
        ft.draw_value(parse("(float32 -> float32)"), np.random.default_rng(0), 1, 1)
    with pytest.raises(TypeError, match="fedlang.types.parse"):
        ft.values("float32")


# ---- the generator's choices ---------------------------------------------------------------------

@given(ft.values(parse("{float32}@CLIENTS")))
def test_clients_default_to_1_to_20(value):
    assert 1 <= len(value) <= 20


@given(ft.values(parse("<float32[?],int32[?,?]>@CLIENTS"), clients=3))
def test_all_equal_clients_and_shared_unknown_sizes(value):
    assert len(value) == 3 and all(v is value[0] for v in value)
    a, b = value[0].values
    assert a.shape[0] == b.shape[0] == b.shape[1]


@given(ft.values(parse("{<x=float32[?,3],y=int32[?]>*}@CLIENTS"), clients=st.integers(1, 4),
                 ints=(0, 9), floats=(-1.0, 1.0)))
def test_batches_share_their_rows_and_numbers_stay_in_range(data):
    for batches in data:
        assert len(batches) <= 4
        for batch in batches:
            assert batch.x.shape[0] == batch.y.shape[0] and batch.x.shape[1] == 3
            assert ((0 <= batch.y) & (batch.y <= 9)).all() and (np.abs(batch.x) <= 1).all()


def test_ragged_batches_and_ragged_clients_occur():
    seq = parse("{float32[?]*}@CLIENTS")
    found = find(ft.values(seq, clients=1), lambda v: len({b.shape[0] for b in v[0]}) > 1)
    assert [b.shape for b in found[0]] in ([(1,), (2,)], [(2,), (1,)])       # shrunk to the smallest such
    same = find(ft.values(parse("{float32[?]}@CLIENTS")), lambda v: len(v) > 1)
    assert len({v.shape for v in same}) == 1                                # one size unless asked
    ragged = find(ft.values(parse("{float32[?]}@CLIENTS"), ragged_clients=True),
                  lambda v: len({x.shape for x in v}) > 1)
    assert len(ragged) == 2


def test_examples_shrink_to_small_simple_values():
    t = parse("<m=float32[2]@SERVER,data={<x=float32[?,2]>*}@CLIENTS>")
    found = find(ft.values(t), lambda v: len(v.data) >= 3 and any(len(c) for c in v.data))
    assert len(found.data) == 3 and sum(len(c) for c in found.data) == 1
    assert not found.m.any()


def test_integers_are_clipped_to_their_dtype():
    value = find(ft.values(parse("<uint8[4],int8[4]>"), ints=(-1000, 1000)),
                 lambda v: v[0].max() >= 255 and v[1].min() <= -128)
    assert value[0].dtype == np.uint8 and value[0].max() == 255 and value[1].min() == -128
    assert ft.draw_value(parse("uint8[50]"), np.random.default_rng(1), 0, 0).min() >= 0


def test_draw_value_is_deterministic_and_mixes_in_special_floats():
    t = parse("{<a=float32[8],b=int64[?]>*}@CLIENTS")
    first = ft.draw_value(t, np.random.default_rng(5), 4, 3, max_length=4)
    assert repr(first) == repr(ft.draw_value(t, np.random.default_rng(5), 4, 3, max_length=4))
    leaves = np.concatenate([e.a for client in first for e in client] + [np.zeros(0, np.float32)])
    assert set(leaves.tolist()) & set(ft.SPECIAL_FLOATS)


def test_draw_arguments_accepts_what_arguments_accepts():
    prog = fedlang.load(MEAN)
    f = prog.share_above
    for comp in (f, f.function, [t for _, t in f.function.params]):
        args = ft.draw_arguments(comp, np.random.default_rng(3), 5)
        assert args.clients == 5 and len(args) == 2 and len(args[0]) == 5
    assert ft.parameter_types(FunctionType(None, parse("float32@SERVER"))) == []
    with pytest.raises(TypeError):
        ft.parameter_types(42)


@given(ft.arguments(fedlang.load(MEAN).share_above, clients=st.integers(2, 6)))
def test_arguments_of_a_computation_run(args):
    prog = fedlang.load(MEAN)
    assert 2 <= args.clients <= 6 and len(args[0]) == args.clients
    result = prog.share_above(*args)
    assert 0.0 <= result <= 1.0


# ---- membership and comparison say where ----------------------------------------------------------

@pytest.mark.parametrize("text,value,where", [
    ("float32", np.float64(1.0), "expected dtype float32"),
    ("float32[2]", np.zeros(3, np.float32), "expected shape float32[2]"),
    ("float32[?,2]", np.zeros((5, 2), np.float32), None),
    ("float32[?,2]", np.zeros((5, 3), np.float32), "shape"),
    ("float32", 1.0, "NumPy array"),
    ("<a=int32>", Struct([np.int32(1)], ["b"]), "fields"),
    ("<a=int32,b=float32[?]>", Struct([np.int32(1), np.zeros(2, np.float64)], ["a", "b"]), "value.b"),
    ("int32*", [np.int32(1), np.zeros(1, np.int32)], "value[1]"),
    ("{int32}@CLIENTS", np.int32(1), "one entry per client"),
    ("int32@CLIENTS", [np.int32(1), np.int32(2)], "all be equal"),
    ("<{int32}@CLIENTS,{int32}@CLIENTS>", Struct([[np.int32(1)], [np.int32(1)] * 2]), "expected 1 clients"),
    ("string[2]", np.asarray(["a", "bc"]), None),
    ("(float32 -> float32)", len, None),
])
def test_mismatch_says_where(text, value, where):
    problem = ft.mismatch(value, parse(text))
    if where is None:
        assert problem is None
    else:
        assert problem is not None and where in problem, problem


def test_assert_close_names_the_first_difference():
    a = Struct([np.array([1.0, 2.0, 3.0], np.float32), [np.int32(1), np.int32(2)]], ["w", "n"])
    ft.assert_close(a, Struct([np.array([1.0, 2.0, 3.000001], np.float32), [np.int32(1), np.int32(2)]], ["w", "n"]))
    with pytest.raises(AssertionError, match=r"value\.w\[2\]: 3\.0 vs 3\.5.*1 of 3 elements differ"):
        ft.assert_close(Struct([np.array([1, 2, 3.5], np.float32), a.n], ["w", "n"]), a)
    with pytest.raises(AssertionError, match=r"value\.n\[1\]: 2 vs 3"):
        ft.assert_close(Struct([a.w, [np.int32(1), np.int32(3)]], ["w", "n"]), a)
    assert "dtype float32 vs float64" in ft.first_difference(np.float32(1), np.float64(1))
    assert "shape [2] vs [3]" in ft.first_difference(np.zeros(2), np.zeros(3))
    assert "the fields" in ft.first_difference(Struct([1], ["a"]), Struct([1], ["b"]))
    assert "a list of 1 vs a list of 2" in ft.first_difference([1], [1, 2])
    assert ft.first_difference(np.float32("nan"), np.float32("nan")) is None
    assert ft.first_difference(0.1 + 1e-7, 0.1) is None                        # Python floats: float32's tolerance
    assert ft.first_difference(np.float64(0.1 + 1e-7), np.float64(0.1)) is not None


# ---- the reference interpreter against the TensorFlow backend --------------------------------------

@settings(max_examples=20, deadline=None)
@given(args=ft.arguments(fedlang.load(MEAN).share_above), chunk=st.sampled_from([None, 1, 3]))
def test_backends_agree_on_mean_temperature(args, chunk):
    ft.assert_backends_agree((MEAN, "share_above"), args, clients_per_chunk=chunk)
    ft.assert_backends_agree((MEAN, "mean_temperature"), args[:1])


def test_backends_agree_with_plain_python_arguments():
    prog = fedlang.load(MEAN)
    result = ft.assert_backends_agree(prog.mean_temperature, [[20.0, 22.5, 19.0]])
    assert result == np.float32(20.5)


@pytest.fixture(scope="module")
def fedavg():
    return fedlang.load(FEDAVG)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_backends_agree_on_a_fedavg_round(fedavg, data):
    model = ft.assert_backends_agree(fedavg.initialize, [])
    (client_data,) = data.draw(ft.arguments([parse("{<x=float32[?,64],y=int32[?]>*}@CLIENTS")],
                                            clients=st.integers(1, 5), dims=st.integers(0, 6), ints=(0, 9),
                                            floats=(0.0, 1.0)))
    ft.assert_backends_agree(fedavg.round, [model, client_data], rtol=2e-5, atol=2e-6)


def test_plans_are_compiled_once_per_program(fedavg):
    assert ft.plan_of(fedavg.round) is ft.plan_of(fedavg.initialize)
    assert ft.plan_of((FEDAVG, "round")) is ft.plan_of((FEDAVG, "initialize"))


def test_a_different_computation_fails_with_the_arguments_both_results_and_where(monkeypatch, tmp_path):
    prog = fedlang.load(MEAN)
    other = fedlang.load(MEAN)
    ft.plan_of(prog.mean_temperature)
    # the TensorFlow side runs a program whose mean_temperature is a max instead
    source = open(MEAN, encoding="utf-8").read().replace("federated_mean(readings)", "federated_max(readings)")
    path = tmp_path / "max.fed"
    path.write_text(source, encoding="utf-8")
    monkeypatch.setitem(ft.backends._PLANS, other.program, ft.plan_of((str(path), "mean_temperature")))
    ft.assert_backends_agree(other.mean_temperature, [[2.0, 2.0]])          # max = mean here: agree
    with pytest.raises(AssertionError) as failure:
        ft.assert_backends_agree(other.mean_temperature, [[1.0, 2.0]])
    message = str(failure.value)
    assert "disagree on `mean_temperature` (2 clients)" in message
    assert "first difference (interpreter vs TensorFlow): result: 1.5 vs 2.0" in message
    assert "readings = [array(1., dtype=float32), array(2., dtype=float32)]" in message
    assert "reference interpreter: array(1.5, dtype=float32)" in message
    assert "TensorFlow backend:    array(2., dtype=float32)" in message


def test_a_perturbed_backend_result_is_found_inside_the_model(fedavg, monkeypatch):
    from fedlang.backends.simulator import Simulator

    call = Simulator.call

    def perturbed(self, name, args, clients=None):
        out = call(self, name, args, clients)
        if name == "round":
            out["state"]["b2"][3] += 1e-3
        return out

    model = ft.run_interpreter(fedavg.initialize, [])
    data = ft.draw_arguments([parse("{<x=float32[?,64],y=int32[?]>*}@CLIENTS")], np.random.default_rng(0), 3,
                             ragged=True, ints=(0, 9))[0]
    monkeypatch.setattr(Simulator, "call", perturbed)
    where = r"\(interpreter vs TensorFlow\): result\.state\.b2\[3\]: .* vs .*; 1 of 10 elements differ"
    with pytest.raises(AssertionError, match=where):
        ft.assert_backends_agree(fedavg.round, [model, data])


def test_what_the_backend_cannot_run_is_said():
    prog = fedlang.load(MEAN)
    with pytest.raises(ft.BackendCannotRun, match="`above` is an fn"):
        ft.assert_backends_agree(prog.above, [1.0, 2.0])
    with pytest.raises(TypeError, match="process"):
        ft.assert_backends_agree((FEDAVG, "fedavg"), [])
    with pytest.raises(ValueError, match="clients=3 but the arguments hold 2 clients"):
        ft.assert_backends_agree(prog.share_above, [[1.0, 2.0], 1.0], clients=3)


def test_backends_agree_when_clients_hold_tensors_of_different_sizes(tmp_path):
    source = tmp_path / "ragged.fed"
    source.write_text("comp total(x: {float32[?]}@CLIENTS) -> float32@SERVER =\n"
                      "  federated_sum(federated_map(fn(v: float32[?]) -> float32 = sum(v), x))\n", encoding="utf-8")
    ft.assert_backends_agree((str(source), "total"), [[np.zeros(1, np.float32), np.ones(2, np.float32)]])


# ---- the package ---------------------------------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_import_is_light_and_says_how_to_install_hypothesis():
    out = _python("import sys, fedlang.testing; print('tensorflow' in sys.modules)")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
    out = _python("import sys; sys.modules['hypothesis'] = None\n"
                  "try:\n    import fedlang.testing\nexcept ImportError as e:\n    print(e)\n")
    assert "pip install 'fedlang[test]'" in out.stdout and "pip install hypothesis" in out.stdout, out


def test_the_public_names():
    assert ft.types is fst.types and ft.programs is fst.programs and ft.ill_placed is fst.ill_placed
    assert fst.values is ft.values and fst.arguments is ft.arguments
    for name in ft.__all__:
        assert getattr(ft, name) is not None


def test_register_profile_does_not_change_the_loaded_profile():
    before = settings.default
    ft.register_profile("fedlang-test", max_examples=7)
    assert settings.get_profile("fedlang-test").max_examples == 7
    assert settings.get_profile("fedlang-test").deadline is None
    assert settings.default is before
