"""Hand-written implementations of the runtime benchmarks (../shared/BENCHMARKS.md),
without fedlang: what fedlang's simulator is measured against.

W0 (federated mean of one float per client):
    w0_loop(readings)     a Python loop over the clients (the plain reference)
    w0_numpy(readings)    np.mean
    W0TF()(readings)      one tf.function, input_signature float32[None]

W1 and W3 (FedAvg rounds of a 64-32-10 MLP; batches of 16, the last one shorter;
plain SGD, lr 0.1; the server takes the mean of the client models weighted by
their example counts). Every round function has the same interface,

    new_server = round_fn(server: Model, clients: list[(x float32[n,64], y int32[n])])

with Model = dict w1, b1, w2, b2 of NumPy arrays:

    round_loop      one client at a time, one SGD step per batch, in NumPy. This is
                    the plain reference: it defines what a correct result is.
    round_numpy     all clients of the round at once: clients padded to the same
                    number of batches and every batch to 16 rows (pad_clients), the
                    loss mean and its gradient masked by each batch's true row
                    count, a client that has run out of batches keeps its weights.
    TFRound()       the same in TensorFlow: ONE tf.function per round (broadcast,
                    every step of every client in batched ops, weighted server
                    mean), with an input_signature so it never retraces.

The vectorized functions pad inside the call, so their time includes it, as a
runtime's would. `accuracy(model, x, y)` evaluates any model in NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LR = np.float32(0.1)
BATCH = 16
MODEL_KEYS = ("w1", "b1", "w2", "b2")
Model = dict  # str -> np.ndarray (w1 [64,32], b1 [32], w2 [32,10], b2 [10]), float32


# ---- W0 -------------------------------------------------------------------------------

def w0_loop(readings: np.ndarray) -> np.float32:
    """Mean of the readings, one client at a time (float64 accumulator)."""
    total = 0.0
    for reading in readings.tolist():
        total += reading
    return np.float32(total / len(readings))


def w0_numpy(readings: np.ndarray) -> np.float32:
    return np.float32(np.mean(readings, dtype=np.float32))


class W0TF:
    """Federated mean as one tf.function over the vector of client readings."""

    def __init__(self) -> None:
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def mean(readings):
            return tf.reduce_mean(readings)

        self._mean = mean

    def __call__(self, readings: np.ndarray) -> np.float32:
        return np.float32(self._mean(readings).numpy())


# ---- the model in NumPy ---------------------------------------------------------------

def predict(m: Model, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ m["w1"] + m["b1"], 0) @ m["w2"] + m["b2"]


def accuracy(m: Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(predict(m, x), axis=-1) == y))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def max_abs_diff(a: Model, b: Model) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in MODEL_KEYS)


def copy_model(m: Model) -> Model:
    return {k: np.array(m[k], dtype=np.float32) for k in MODEL_KEYS}


# ---- per-client loop (the reference) --------------------------------------------------

def sgd_step(m: Model, x: np.ndarray, y: np.ndarray) -> Model:
    """One SGD step on the mean sparse softmax cross-entropy of the batch (x, y)."""
    pre = x @ m["w1"] + m["b1"]
    h = np.maximum(pre, 0)
    logits = h @ m["w2"] + m["b2"]
    d_logits = _softmax(logits)
    d_logits[np.arange(len(y)), y] -= 1
    d_logits /= np.float32(len(y))
    d_h = (d_logits @ m["w2"].T) * (pre > 0)
    grads = {"w1": x.T @ d_h, "b1": d_h.sum(0), "w2": h.T @ d_logits, "b2": d_logits.sum(0)}
    return {k: m[k] - LR * grads[k] for k in MODEL_KEYS}


def client_update(m: Model, x: np.ndarray, y: np.ndarray) -> Model:
    """One epoch over the client's data in stored order, batches of 16, the last one shorter."""
    for start in range(0, len(y), BATCH):
        m = sgd_step(m, x[start:start + BATCH], y[start:start + BATCH])
    return m


def server_mean(models: list[Model], counts) -> Model:
    """Mean of the client models weighted by their example counts."""
    counts = np.asarray(counts, np.float32)
    return {k: np.tensordot(counts, np.stack([m[k] for m in models]), axes=1) / counts.sum()
            for k in MODEL_KEYS}


def round_loop(server: Model, clients) -> Model:
    """One FedAvg round, one client after the other."""
    models = [client_update(server, x, y) for x, y in clients]
    return server_mean(models, [len(y) for _, y in clients])


# ---- padding for the vectorized implementations ----------------------------------------

@dataclass(frozen=True)
class Padded:
    """A round's clients as dense arrays: K clients, B = most batches of any client.

    x float32[K,B,16,64], y int32[K,B,16] (zeros where padded), rows float32[K,B]
    (true rows of each batch: 0 for a batch the client does not have), counts
    float32[K] (each client's examples)."""
    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    counts: np.ndarray


def pad_clients(clients, batch: int = BATCH) -> Padded:
    counts = np.array([len(y) for _, y in clients])
    k, b = len(clients), max(1, int(-(-counts.max() // batch)))
    features = clients[0][0].shape[-1]
    x = np.zeros((k, b * batch, features), np.float32)
    y = np.zeros((k, b * batch), np.int32)
    if (counts == b * batch).all():                  # every client fills every batch (W3)
        x[:] = np.stack([cx for cx, _ in clients])
        y[:] = np.stack([cy for _, cy in clients])
    else:
        for i, (cx, cy) in enumerate(clients):
            x[i, :len(cy)] = cx
            y[i, :len(cy)] = cy
    rows = np.clip(counts[:, None] - batch * np.arange(b)[None, :], 0, batch).astype(np.float32)
    return Padded(x.reshape(k, b, batch, features), y.reshape(k, b, batch), rows, counts.astype(np.float32))


# ---- vectorized NumPy -----------------------------------------------------------------

def round_numpy(server: Model, clients) -> Model:
    """One FedAvg round with all clients at once (a leading client axis K)."""
    p = pad_clients(clients)
    k, n_batches, batch = p.y.shape
    m = {name: np.broadcast_to(v, (k, *v.shape)).copy() for name, v in server.items()}
    row_ids = np.arange(batch)
    for b in range(n_batches):
        x, y, rows = p.x[:, b], p.y[:, b], p.rows[:, b]             # [K,16,64], [K,16], [K]
        mask = (row_ids[None, :] < rows[:, None]).astype(np.float32)  # [K,16]
        pre = x @ m["w1"] + m["b1"][:, None, :]
        h = np.maximum(pre, 0)
        logits = h @ m["w2"] + m["b2"][:, None, :]
        d_logits = _softmax(logits)
        d_logits[np.arange(k)[:, None], row_ids[None, :], y] -= 1
        d_logits *= (mask / np.maximum(rows, 1)[:, None])[:, :, None]
        d_h = (d_logits @ m["w2"].transpose(0, 2, 1)) * (pre > 0)
        grads = {"w1": x.transpose(0, 2, 1) @ d_h, "b1": d_h.sum(1),
                 "w2": h.transpose(0, 2, 1) @ d_logits, "b2": d_logits.sum(1)}
        active = rows > 0
        for name in MODEL_KEYS:
            keep = active.reshape((k,) + (1,) * (m[name].ndim - 1))
            m[name] = np.where(keep, m[name] - LR * grads[name], m[name])
    return {name: np.tensordot(p.counts, m[name], axes=1) / p.counts.sum() for name in MODEL_KEYS}


# ---- vectorized TensorFlow ------------------------------------------------------------

class TFRound:
    """One FedAvg round as ONE tf.function: broadcast the server model to the K clients,
    run every SGD step of every client in batched ops (a while loop over the batch
    index), and take the weighted server mean. The input_signature leaves K and B
    open, so one trace serves every round of W1 and W3."""

    def __init__(self, jit_compile: bool = False) -> None:
        import tensorflow as tf

        f32, i32 = tf.float32, tf.int32
        signature = [tf.TensorSpec([64, 32], f32), tf.TensorSpec([32], f32),
                     tf.TensorSpec([32, 10], f32), tf.TensorSpec([10], f32),
                     tf.TensorSpec([None, None, BATCH, 64], f32), tf.TensorSpec([None, None, BATCH], i32),
                     tf.TensorSpec([None, None], f32), tf.TensorSpec([None], f32)]

        @tf.function(input_signature=signature, jit_compile=jit_compile)
        def fedavg_round(w1, b1, w2, b2, x, y, rows, counts):
            k = tf.shape(x)[0]
            params = tuple(tf.tile(v[None], tf.concat([[k], tf.ones([tf.rank(v)], tf.int32)], 0))
                           for v in (w1, b1, w2, b2))
            row_ids = tf.range(BATCH, dtype=f32)

            def step(b, params):
                xb, yb, rb = x[:, b], y[:, b], rows[:, b]
                mask = tf.cast(row_ids[None, :] < rb[:, None], f32)
                with tf.GradientTape() as tape:
                    tape.watch(params)
                    v1, c1, v2, c2 = params
                    h = tf.nn.relu(tf.matmul(xb, v1) + c1[:, None, :])
                    logits = tf.matmul(h, v2) + c2[:, None, :]
                    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb, logits=logits)
                    loss = tf.reduce_sum(tf.reduce_sum(ce * mask, 1) / tf.maximum(rb, 1.0))
                grads = tape.gradient(loss, params)
                active = rb > 0
                new = []
                for p, g in zip(params, grads):
                    keep = tf.reshape(active, tf.concat([[k], tf.ones([tf.rank(p) - 1], tf.int32)], 0))
                    new.append(tf.where(keep, p - 0.1 * g, p))
                return b + 1, tuple(new)

            _, params = tf.while_loop(lambda b, _: b < tf.shape(x)[1], step, (tf.constant(0), params))
            total = tf.reduce_sum(counts)
            return tuple(tf.tensordot(counts, p, axes=1) / total for p in params)

        self._round = fedavg_round

    def __call__(self, server: Model, clients) -> Model:
        p = pad_clients(clients)
        out = self._round(server["w1"], server["b1"], server["w2"], server["b2"], p.x, p.y, p.rows, p.counts)
        return {name: v.numpy() for name, v in zip(MODEL_KEYS, out)}

    def traces(self) -> int:
        """How many times the round function was traced (1 once called: it never retraces)."""
        return self._round.experimental_get_tracing_count()
