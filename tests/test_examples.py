"""Every example, run by the reference interpreter, against an independent NumPy version."""

from __future__ import annotations

import numpy as np
import pytest

import fedlang
from fedlang.ir.values import Struct


# ---- a plain NumPy FedAvg of the same MLP (written by hand, no fedlang) ----------------------------

def forward(m, x):
    h_pre = x @ m["w1"] + m["b1"]
    h = np.maximum(h_pre, 0)
    return h_pre, h, h @ m["w2"] + m["b2"]


def batch_loss_and_grad(m, x, y):
    h_pre, h, logits = forward(m, x)
    shifted = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    n = len(y)
    loss = -np.mean(np.log(p[np.arange(n), y]))
    d_logits = p.copy()
    d_logits[np.arange(n), y] -= 1
    d_logits /= n
    d_h = d_logits @ m["w2"].T
    d_pre = d_h * (h_pre > 0)
    grads = {"w1": x.T @ d_pre, "b1": d_pre.sum(0), "w2": h.T @ d_logits, "b2": d_logits.sum(0)}
    return loss, grads


def numpy_round(model, clients):
    updated, weights, losses, accs = [], [], [], []
    for batches in clients:
        m = {k: v.copy() for k, v in model.items()}
        for x, y in batches:
            _, g = batch_loss_and_grad(m, x, y)
            m = {k: m[k] - 0.1 * g[k] for k in m}
        updated.append(m)
        n = sum(len(y) for _, y in batches)
        weights.append(n)
        total_loss = sum(len(y) * batch_loss_and_grad(model, x, y)[0] for x, y in batches)
        correct = sum(np.sum(np.argmax(forward(model, x)[2], 1) == y) for x, y in batches)
        losses.append(total_loss / n)
        accs.append(correct / n)
    w = np.asarray(weights, np.float64)
    new = {k: sum(wi * u[k] for wi, u in zip(w, updated)) / w.sum() for k in model}
    return new, float(np.dot(w, losses) / w.sum()), float(np.dot(w, accs) / w.sum())


def synthetic_clients(seed, sizes, batch=4):
    rng = np.random.default_rng(seed)
    clients = []
    for size in sizes:
        x = rng.normal(size=(size, 64)).astype(np.float32)
        y = rng.integers(0, 10, size=size).astype(np.int32)
        clients.append([(x[i:i + batch], y[i:i + batch]) for i in range(0, size, batch)])
    return clients


def as_fedlang(clients):
    return [[{"x": x, "y": y} for x, y in batches] for batches in clients]


@pytest.mark.parametrize("optimize", [False, True])
def test_fedavg_digits_equals_a_numpy_fedavg(optimize):
    prog = fedlang.load("examples/fedavg_digits.fed", optimize=optimize)
    state = prog.fedavg.initialize()
    model = {k: np.asarray(v, np.float64) for k, v in state.items()}
    for r in range(3):
        clients = synthetic_clients(r, sizes=[7, 4, 13][: r + 1] + [5])
        state, metrics = prog.fedavg.next(state, as_fedlang(clients))
        model, loss, acc = numpy_round(model, [[(x.astype(np.float64), y) for x, y in b] for b in clients])
        for k in model:
            np.testing.assert_allclose(np.asarray(state[k], np.float64), model[k], atol=2e-5, rtol=1e-4)
        assert float(metrics.loss) == pytest.approx(loss, rel=1e-4)
        assert float(metrics.accuracy) == pytest.approx(acc, abs=1e-6)


def test_fedavg_initial_model_is_glorot_uniform():
    prog = fedlang.load("examples/fedavg_digits.fed", optimize=False)
    state = prog.fedavg.initialize()
    assert state.w1.shape == (64, 32) and state.w1.dtype == np.float32
    assert np.abs(state.w1).max() <= 0.25 and np.abs(state.w2).max() <= 0.378
    assert not state.b1.any() and not state.b2.any()
    assert abs(state.w1.std() - 0.25 / np.sqrt(3)) < 0.01       # uniform(-l, l) has std l / sqrt(3)


def test_fedavg_training_lowers_the_loss():
    prog = fedlang.load("examples/fedavg_digits.fed", optimize=False)
    rng = np.random.default_rng(7)
    teacher = rng.normal(size=(64, 10))
    clients = []
    for size in (16, 12, 20):
        x = rng.normal(size=(size, 64)).astype(np.float32)
        y = np.argmax(x @ teacher, 1).astype(np.int32)
        clients.append([{"x": x[i:i + 4], "y": y[i:i + 4]} for i in range(0, size, 4)])
    state, history = prog.fedavg.run(6, clients)
    losses = [float(m.loss) for m in history]
    assert losses[-1] < losses[0] * 0.8, losses
