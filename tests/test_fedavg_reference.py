"""examples/fedavg_digits.fed on the TensorFlow backend against an independent FedAvg.

The reference below is plain NumPy written from the algorithm (McMahan et al.,
2017), not from fedlang: each client copies the global MLP, runs one epoch of
SGD (lr 0.1, batches of 16 in stored order, the last one shorter) on the mean
sparse softmax cross-entropy, and the server averages the client models
weighted by their example counts. Clients per round follow BENCHMARKS W1.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

import fedlang
from fedlang.api import compile_ir
from fedlang.backends.data import bind, digits_w1, open_source
from fedlang.backends.plan import compile_plan
from fedlang.backends.simulator import Simulator
from fedlang.ir.values import Struct
from fedlang.types import parse

from conftest import ROOT

ROUNDS, PER_ROUND, LR, BATCH = 20, 10, np.float32(0.1), 16
FIELDS = ("w1", "b1", "w2", "b2")


def numpy_client_update(params: dict, x: np.ndarray, y: np.ndarray) -> dict:
    p = {k: v.copy() for k, v in params.items()}
    for start in range(0, len(y), BATCH):
        xb, yb = x[start:start + BATCH], y[start:start + BATCH]
        n = np.float32(len(yb))
        h_pre = xb @ p["w1"] + p["b1"]
        h = np.maximum(h_pre, 0)
        logits = h @ p["w2"] + p["b2"]
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        d_logits = probs.copy()
        d_logits[np.arange(len(yb)), yb] -= 1
        d_logits /= n
        grads = {"w2": h.T @ d_logits, "b2": d_logits.sum(axis=0)}
        d_h = (d_logits @ p["w2"].T) * (h_pre > 0)
        grads.update(w1=xb.T @ d_h, b1=d_h.sum(axis=0))
        for k in FIELDS:
            p[k] = (p[k] - LR * grads[k]).astype(np.float32)
    return p


def numpy_fedavg_round(params: dict, clients: list[int], data) -> dict:
    updates, weights = [], []
    for c in clients:
        updates.append(numpy_client_update(params, data.client_x[c], data.client_y[c]))
        weights.append(len(data.client_y[c]))
    total = float(sum(weights))
    return {k: (sum(u[k] * np.float32(w) for u, w in zip(updates, weights)) / np.float32(total)).astype(np.float32)
            for k in FIELDS}


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    logits = np.maximum(x @ params["w1"] + params["b1"], 0) @ params["w2"] + params["b2"]
    return float(np.mean(np.argmax(logits, axis=1) == y))


@pytest.mark.slow
def test_fedavg_digits_equals_an_independent_numpy_fedavg_for_20_rounds():
    result = fedlang.check(str(ROOT / "examples" / "fedavg_digits.fed"))
    assert result.ok
    plan = compile_plan(compile_ir(result), "fedavg_digits.fed", result.sources.texts)
    sim = Simulator(plan)
    data = digits_w1()
    source = open_source("digits")
    member = parse("<x=float32[?,64],y=int32[?]>*")
    state = sim.call("initialize", [])
    reference = {k: np.array(state[k]) for k in FIELDS}
    for r in range(ROUNDS):
        clients = [(r * PER_ROUND + k) % 100 for k in range(PER_ROUND)]
        out = sim.call("round", [state, bind(source, member, BATCH, clients)])
        state = out["state"]
        reference = numpy_fedavg_round(reference, clients, data)
    ours = {k: np.asarray(state[k]) for k in FIELDS}
    worst = max(float(np.max(np.abs(ours[k] - reference[k]))) for k in FIELDS)
    assert worst < 1e-4, worst
    ours_acc, ref_acc = accuracy(ours, data.x_test, data.y_test), accuracy(reference, data.x_test, data.y_test)
    assert ours_acc == ref_acc
    assert ours_acc > 0.5                       # it learns (10% is chance)
    assert isinstance(out["metrics"], Struct) and 0 < float(out["metrics"]["accuracy"]) <= 1
