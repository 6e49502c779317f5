"""std.learning (stdlib/learning.fed) on the TensorFlow backend, against NumPy and the interpreter.

  * FedAvg, FedProx with mu = 0 and FedAvgM with momentum 0 give the same model;
  * FedProx with mu > 0 keeps the client models closer to the broadcast model;
  * every algorithm on softmax regression equals a NumPy version written from the
    papers (FedAvg, FedProx, FedSGD, FedAvgM, and Reddi et al. 2021 Algorithm 2 for
    FedAdagrad, FedAdam and FedYogi) for a few rounds, model and optimizer state;
  * the MLP's FedAvg with several epochs equals tests/test_fedavg_reference.py's NumPy
    client update, applied epoch after epoch;
  * one round of every algorithm on the simulator equals the reference interpreter;
  * federated evaluation is the example-weighted loss and accuracy;
  * FedAvg of the MLP reaches 90% test accuracy on digits in 50 rounds of 10 clients.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import fedlang
from fedlang.api import compile_ir
from fedlang.backends.data import bind, digits_w1, open_source
from fedlang.backends.plan import compile_plan
from fedlang.backends.simulator import Simulator
from fedlang.ir.interpreter import Interpreter
from fedlang.ir.values import Struct
from fedlang.types import parse

import test_fedavg_reference as reference

# A user program over the library: hyperparameters are comp parameters here, so that one
# plan serves every test (a program would usually write them as literals).
HEADER = """
import std.learning as learning
type B = learning.Batch
type M = learning.Metrics
"""

MLP_PROGRAM = HEADER + """
type MS = learning.MlpState
comp mlp_init() -> MS@SERVER = learning.mlp_initialize()
comp mlp_avg(state: MS@SERVER, data: {B*}@CLIENTS, epochs: int32) -> <state=MS@SERVER,metrics=M@SERVER> =
  learning.mlp_fed_avg(state, data, client_lr=0.1, epochs=epochs)
comp mlp_prox(state: MS@SERVER, data: {B*}@CLIENTS, epochs: int32, mu: float32)
    -> <state=MS@SERVER,metrics=M@SERVER> =
  learning.mlp_fed_prox(state, data, client_lr=0.1, epochs=epochs, mu=mu)
comp mlp_avgm(state: MS@SERVER, data: {B*}@CLIENTS, epochs: int32, momentum: float32)
    -> <state=MS@SERVER,metrics=M@SERVER> =
  learning.mlp_fed_avg_m(state, data, client_lr=0.1, epochs=epochs, server_lr=1.0, momentum=momentum)

fn distance(r: learning.MlpResult) -> float32 = global_norm(r.update)

# The example-weighted mean distance of the trained client models to the broadcast one.
comp mlp_drift(model: learning.Mlp@SERVER, data: {B*}@CLIENTS, mu: float32) -> float32@SERVER {
  let results = federated_map(learning.mlp_client_prox_update, federated_broadcast(model), data,
                              federated_value(0.1, CLIENTS), federated_value(5, CLIENTS),
                              federated_value(mu, CLIENTS))
  return federated_mean(federated_map(distance, results), weight=results.update_weight)
}
comp mlp_eval(model: learning.Mlp@SERVER, data: {B*}@CLIENTS) -> M@SERVER = learning.mlp_fed_eval(model, data)
"""

# Hyperparameters are comp parameters here, so that one plan serves every test (a program
# would usually write them as literals).
LINEAR_PROGRAM = HEADER + """
type LS = learning.LinearState
comp lin_init() -> LS@SERVER = learning.linear_initialize()
comp lin_avg(state: LS@SERVER, data: {B*}@CLIENTS, lr: float32, epochs: int32)
    -> <state=LS@SERVER,metrics=M@SERVER> = learning.linear_fed_avg(state, data, lr, epochs)
comp lin_prox(state: LS@SERVER, data: {B*}@CLIENTS, lr: float32, epochs: int32, mu: float32)
    -> <state=LS@SERVER,metrics=M@SERVER> = learning.linear_fed_prox(state, data, lr, epochs, mu)
comp lin_sgd(state: LS@SERVER, data: {B*}@CLIENTS, server_lr: float32)
    -> <state=LS@SERVER,metrics=M@SERVER> = learning.linear_fed_sgd(state, data, server_lr)
comp lin_avgm(state: LS@SERVER, data: {B*}@CLIENTS, lr: float32, epochs: int32, server_lr: float32,
              momentum: float32) -> <state=LS@SERVER,metrics=M@SERVER> =
  learning.linear_fed_avg_m(state, data, lr, epochs, server_lr, momentum)
comp lin_adagrad(state: LS@SERVER, data: {B*}@CLIENTS, lr: float32, epochs: int32, server_lr: float32,
                 beta1: float32, tau: float32) -> <state=LS@SERVER,metrics=M@SERVER> =
  learning.linear_fed_adagrad(state, data, lr, epochs, server_lr, beta1, tau)
comp lin_adam(state: LS@SERVER, data: {B*}@CLIENTS, lr: float32, epochs: int32, server_lr: float32,
              beta1: float32, beta2: float32, tau: float32) -> <state=LS@SERVER,metrics=M@SERVER> =
  learning.linear_fed_adam(state, data, lr, epochs, server_lr, beta1, beta2, tau)
comp lin_yogi(state: LS@SERVER, data: {B*}@CLIENTS, lr: float32, epochs: int32, server_lr: float32,
              beta1: float32, beta2: float32, tau: float32) -> <state=LS@SERVER,metrics=M@SERVER> =
  learning.linear_fed_yogi(state, data, lr, epochs, server_lr, beta1, beta2, tau)
comp lin_eval(model: learning.Linear@SERVER, data: {B*}@CLIENTS) -> M@SERVER = learning.linear_fed_eval(model, data)
"""

BATCH = parse("<x=float32[?,64],y=int32[?]>*")
f32 = np.float32


def compile_program(source: str):
    result = fedlang.check_source(source, "learning_test.fed")
    assert result.ok, result.render()
    program = compile_ir(result)
    plan = compile_plan(program, "learning_test.fed", result.sources.texts)
    assert not plan.skipped, plan.skipped
    for name, comp in plan.computations.items():          # every client phase runs all clients at once
        assert all(p.mode in ("server", "vectorized") for p in comp.phases), name
    return program, Simulator(plan)


@pytest.fixture(scope="module")
def linear():
    return compile_program(LINEAR_PROGRAM)


@pytest.fixture(scope="module")
def mlp():
    return compile_program(MLP_PROGRAM)


def interpret(program, name, args, clients):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return Interpreter(program).call(name, args, clients)


def digits_clients(clients, batch=16):
    return bind(open_source("digits"), BATCH, batch, list(clients))


def synthetic(seed, sizes, batch=4):
    """Client data sets as (x, y) batches: random pixels in [0, 1), random labels."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        x = rng.random((n, 64), dtype=np.float32)
        y = rng.integers(0, 10, n).astype(np.int32)
        out.append([(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)])
    return out


def as_values(clients):
    return [[Struct((x, y), ("x", "y")) for x, y in batches] for batches in clients]


def arrays(value) -> dict:
    """A Struct of tensors (possibly nested) as {path: float64 array}."""
    out = {}
    for name, v in value.items():
        if isinstance(v, Struct):
            out.update({f"{name}.{k}": a for k, a in arrays(v).items()})
        else:
            out[name] = np.asarray(v, np.float64)
    return out


def assert_close(got, expected: dict, rtol=1e-4, atol=1e-5):
    got = arrays(got)
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=rtol, atol=atol, err_msg=k)


# ---- a NumPy federated learning of softmax regression, from the papers ---------------------------

def softmax_grad(w, b, x, y):
    logits = x @ w + b
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.mean(np.log(p[np.arange(n), y]))
    d = p.copy()
    d[np.arange(n), y] -= 1
    d /= n
    return loss, {"w": x.T @ d, "b": d.sum(axis=0)}, logits


def np_client(model, batches, lr, epochs, mu=0.0):
    """Local SGD on loss + mu/2 |w - model|^2; returns (delta, n, loss sum, correct, seen)."""
    m = {k: v.copy() for k, v in model.items()}
    loss_sum = correct = seen = 0.0
    for _ in range(epochs):
        for x, y in batches:
            loss, g, logits = softmax_grad(m["w"], m["b"], x, y)
            loss_sum += len(y) * loss
            correct += np.sum(np.argmax(logits, 1) == y)
            seen += len(y)
            m = {k: m[k] - lr * (g[k] + mu * (m[k] - model[k])) for k in m}
    n = sum(len(y) for _, y in batches)
    return {k: m[k] - model[k] for k in m}, n, loss_sum, correct, seen


def np_client_gradient(model, batches):
    total = {k: np.zeros_like(v) for k, v in model.items()}
    loss_sum = correct = seen = 0.0
    for x, y in batches:
        loss, g, logits = softmax_grad(model["w"], model["b"], x, y)
        total = {k: total[k] + len(y) * g[k] for k in total}
        loss_sum += len(y) * loss
        correct += np.sum(np.argmax(logits, 1) == y)
        seen += len(y)
    return {k: -total[k] / max(seen, 1.0) for k in total}, int(seen), loss_sum, correct, seen


def np_round(model, clients, client):
    outs = [client(model, batches) for batches in clients]
    weights = np.array([o[1] for o in outs], np.float64)
    delta = {k: sum(w * o[0][k] for w, o in zip(weights, outs)) / weights.sum() for k in model}
    seen = sum(o[4] for o in outs)
    metrics = {"num_examples": int(weights.sum()), "num_clients": len(outs),
               "loss": sum(o[2] for o in outs) / seen, "accuracy": sum(o[3] for o in outs) / seen}
    return delta, metrics


def np_server(rule, state, delta, **h):
    """Server updates on the averaged delta: SGD, SGD with momentum (FedAvgM) and Reddi et al.
    2021, Algorithm 2 (m = b1 m + (1 - b1) D; v per variant; x = x + lr m / (sqrt(v) + tau))."""
    x, m, v = state["model"], state["m"], state["v"]
    if rule == "sgd":
        return {"model": {k: x[k] + h["server_lr"] * delta[k] for k in x}, "m": m, "v": v}
    if rule == "sgdm":
        m = {k: h["momentum"] * m[k] + delta[k] for k in x}
        return {"model": {k: x[k] + h["server_lr"] * m[k] for k in x}, "m": m, "v": v}
    m = {k: h["beta1"] * m[k] + (1 - h["beta1"]) * delta[k] for k in x}
    d2 = {k: delta[k] ** 2 for k in x}
    if rule == "adagrad":
        v = {k: v[k] + d2[k] for k in x}
    elif rule == "adam":
        v = {k: h["beta2"] * v[k] + (1 - h["beta2"]) * d2[k] for k in x}
    elif rule == "yogi":
        v = {k: v[k] - (1 - h["beta2"]) * d2[k] * np.sign(v[k] - d2[k]) for k in x}
    return {"model": {k: x[k] + h["server_lr"] * m[k] / (np.sqrt(v[k]) + h["tau"]) for k in x}, "m": m, "v": v}


def flat_state(state) -> dict:
    return {f"{part}.{k}": state[part][k] for part in ("model", "m", "v") for k in state[part]}


LR, EPOCHS = 0.5, 2
ALGORITHMS = {
    # name: (comp, its hyperparameters after the data, NumPy client, NumPy server rule, server hparams)
    "fed_avg": ("lin_avg", [f32(LR), np.int32(EPOCHS)], lambda m, d: np_client(m, d, LR, EPOCHS), "sgd",
                {"server_lr": 1.0}),
    "fed_prox": ("lin_prox", [f32(LR), np.int32(EPOCHS), f32(0.5)], lambda m, d: np_client(m, d, LR, EPOCHS, 0.5),
                 "sgd", {"server_lr": 1.0}),
    "fed_sgd": ("lin_sgd", [f32(0.7)], np_client_gradient, "sgd", {"server_lr": 0.7}),
    "fed_avg_m": ("lin_avgm", [f32(LR), np.int32(EPOCHS), f32(0.8), f32(0.9)],
                  lambda m, d: np_client(m, d, LR, EPOCHS), "sgdm", {"server_lr": 0.8, "momentum": 0.9}),
    "fed_adagrad": ("lin_adagrad", [f32(LR), np.int32(EPOCHS), f32(0.1), f32(0.9), f32(1e-3)],
                    lambda m, d: np_client(m, d, LR, EPOCHS), "adagrad", {"server_lr": 0.1, "beta1": 0.9, "tau": 1e-3}),
    "fed_adam": ("lin_adam", [f32(LR), np.int32(EPOCHS), f32(0.1), f32(0.9), f32(0.99), f32(1e-3)],
                 lambda m, d: np_client(m, d, LR, EPOCHS), "adam",
                 {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
    "fed_yogi": ("lin_yogi", [f32(LR), np.int32(EPOCHS), f32(0.1), f32(0.9), f32(0.99), f32(1e-3)],
                 lambda m, d: np_client(m, d, LR, EPOCHS), "yogi",
                 {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}),
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_softmax_regression_rounds_follow_the_papers(linear, algorithm):
    """Three rounds on a small problem (clients of 0 to 11 examples, batches of 4, a short
    last batch), starting from a state with nonzero moments; model and optimizer state
    after each round, and the round's metrics, against NumPy (float64)."""
    _, sim = linear
    comp, hparams, np_client_fn, rule, server_h = ALGORITHMS[algorithm]
    rng = np.random.default_rng(7)
    start = {part: {"w": (rng.normal(size=(64, 10)) * scale).astype(np.float32),
                    "b": (rng.normal(size=10) * scale).astype(np.float32)}
             for part, scale in (("model", 0.1), ("m", 0.01), ("v", 0.0))}
    start["v"] = {k: (np.abs(rng.normal(size=v.shape)) * 1e-3).astype(np.float32) for k, v in start["v"].items()}
    state = Struct([Struct((start[p]["w"], start[p]["b"]), ("w", "b")) for p in ("model", "m", "v")],
                   ("model", "m", "v"))
    expected = {p: {k: v.astype(np.float64) for k, v in part.items()} for p, part in start.items()}
    for r in range(3):
        clients = synthetic(r, [5, 11, 0, 8][: 2 + r])
        out = sim.call(comp, [state, as_values(clients)] + hparams)
        delta, metrics = np_round(expected["model"], [[(x.astype(np.float64), y) for x, y in b] for b in clients],
                                  np_client_fn)
        expected = np_server(rule, expected, delta, **server_h)
        state = out["state"]
        assert_close(state, flat_state(expected))
        got = out["metrics"]
        assert int(got["num_examples"]) == metrics["num_examples"]
        assert int(got["num_clients"]) == metrics["num_clients"]
        assert float(got["loss"]) == pytest.approx(metrics["loss"], rel=1e-4)
        assert float(got["accuracy"]) == pytest.approx(metrics["accuracy"], abs=1e-6)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_one_round_equals_the_reference_interpreter(linear, algorithm):
    program, sim = linear
    comp, hparams, *_ = ALGORITHMS[algorithm]
    state = sim.call("lin_init", [])
    data = as_values(synthetic(11, [6, 0, 9]))
    for _ in range(2):
        got = sim.call(comp, [state, data] + hparams)
        expected = interpret(program, comp, [state, data] + hparams, len(data))
        assert_close(got["state"], arrays(expected["state"]), rtol=1e-5, atol=1e-6)
        assert_close(got["metrics"], arrays(expected["metrics"]), rtol=1e-5, atol=1e-6)
        state = got["state"]


@pytest.mark.slow
def test_mlp_fed_avg_with_epochs_equals_numpy(mlp):
    """The MLP's client update for E epochs is tests/test_fedavg_reference.py's one-epoch NumPy
    update (lr 0.1, batches of 16) applied E times; the server adds the weighted mean delta."""
    _, sim = mlp
    data = digits_w1()
    state = sim.call("mlp_init", [])
    model = {k: np.asarray(state["model"][k]) for k in reference.FIELDS}
    for r, epochs in enumerate((1, 3, 5)):
        clients = [(r * 7 + k * 13) % 100 for k in range(4)]
        state = sim.call("mlp_avg", [state, digits_clients(clients), np.int32(epochs)])["state"]
        updates, weights = [], []
        for c in clients:
            p = model
            for _ in range(epochs):
                p = reference.numpy_client_update(p, data.client_x[c], data.client_y[c])
            updates.append(p)
            weights.append(len(data.client_y[c]))
        w = np.asarray(weights, np.float64)
        model = {k: sum(wi * u[k] for wi, u in zip(w, updates)) / w.sum() for k in reference.FIELDS}
        worst = max(float(np.max(np.abs(np.asarray(state["model"][k]) - model[k]))) for k in reference.FIELDS)
        assert worst < 1e-4, (epochs, worst)


@pytest.mark.slow
def test_fed_avg_fed_prox_mu_0_and_fed_avg_m_momentum_0_agree(mlp):
    _, sim = mlp
    states = {name: sim.call("mlp_init", []) for name in ("avg", "prox", "avgm")}
    for r in range(4):
        data = digits_clients(range(r * 10, r * 10 + 10))
        outs = {"avg": sim.call("mlp_avg", [states["avg"], data, np.int32(2)]),
                "prox": sim.call("mlp_prox", [states["prox"], data, np.int32(2), f32(0.0)]),
                "avgm": sim.call("mlp_avgm", [states["avgm"], data, np.int32(2), f32(0.0)])}
        states = {k: o["state"] for k, o in outs.items()}
        for other in ("prox", "avgm"):
            assert_close(states[other]["model"], arrays(states["avg"]["model"]), rtol=1e-5, atol=1e-6)
            assert_close(outs[other]["metrics"], arrays(outs["avg"]["metrics"]), rtol=1e-5, atol=1e-6)
    changed = max(float(np.max(np.abs(np.asarray(states["avg"]["model"][k]) - np.asarray(sim.call("mlp_init", [])["model"][k]))))
                  for k in reference.FIELDS)
    assert changed > 0.05                      # the models did train


@pytest.mark.slow
def test_fed_prox_keeps_client_models_closer_to_the_global_model(mlp):
    _, sim = mlp
    model = sim.call("mlp_init", [])["model"]
    data = digits_clients(range(0, 100, 10))
    drift = {mu: float(sim.call("mlp_drift", [model, data, f32(mu)])) for mu in (0.0, 0.1, 1.0, 10.0)}
    assert drift[0.0] > drift[0.1] > drift[1.0] > drift[10.0] > 0, drift
    assert drift[1.0] < 0.9 * drift[0.0], drift


def test_federated_evaluation_is_example_weighted(linear):
    _, sim = linear
    rng = np.random.default_rng(3)
    model = Struct(((rng.normal(size=(64, 10)) * 0.3).astype(np.float32),
                    (rng.normal(size=10) * 0.3).astype(np.float32)), ("w", "b"))
    clients = synthetic(5, [1, 17, 4, 0, 9], batch=5)
    got = sim.call("lin_eval", [model, as_values(clients)])
    x = np.concatenate([x for b in clients for x, _ in b]).astype(np.float64)
    y = np.concatenate([y for b in clients for _, y in b])
    logits = x @ model["w"].astype(np.float64) + model["b"]
    shifted = logits - logits.max(1, keepdims=True)
    losses = -(shifted[np.arange(len(y)), y] - np.log(np.exp(shifted).sum(1)))
    assert int(got["num_examples"]) == len(y) == 31 and int(got["num_clients"]) == 5
    assert float(got["loss"]) == pytest.approx(losses.mean(), rel=1e-5)
    assert float(got["accuracy"]) == pytest.approx(np.mean(np.argmax(logits, 1) == y), abs=1e-6)


def sampled(seed: int, r: int, total: int = 100, per_round: int = 10) -> list[int]:
    """The clients `fedlang run` samples in round r (backends/runner.py)."""
    rng = np.random.default_rng([seed, r])
    return sorted(int(c) for c in rng.choice(total, per_round, replace=False))


@pytest.mark.slow
def test_fed_avg_reaches_90_percent_test_accuracy_on_digits_in_50_rounds(mlp):
    """docs/stdlib.md's settings: client lr 0.1, 5 epochs, batches of 16, 10 clients a round
    sampled as `fedlang run` samples them (seed 0)."""
    _, sim = mlp
    data = digits_w1()
    state = sim.call("mlp_init", [])
    for r in range(50):
        state = sim.call("mlp_avg", [state, digits_clients(sampled(0, r)), np.int32(5)])["state"]
    model = {k: np.asarray(state["model"][k]) for k in reference.FIELDS}
    accuracy = reference.accuracy(model, data.x_test, data.y_test)
    assert accuracy >= 0.90, accuracy
    # federated evaluation over the test set split into 100 clients says the same
    test = bind(open_source("digits:test:100"), BATCH, 16)
    metrics = sim.call("mlp_eval", [state["model"], test])
    assert int(metrics["num_examples"]) == 297 and int(metrics["num_clients"]) == 100
    assert float(metrics["accuracy"]) == pytest.approx(accuracy, abs=1e-6)
