"""Built-in data sets: the digits split of BENCHMARKS W1 and the sensors of W0.

`digits_w1()` is the one definition of the W1 data (clients, test set, initial
MLP weights) that the benchmarks and the tests share; `digits`,
`digits:test` and `digits:test:N` serve it as client data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedlang.backends.data.errors import DataError
from fedlang.backends.data.sources import ArraySource, readonly

DIGITS_CLIENTS = 100
DIGITS_TRAIN = 1500
DIGITS_TEST = 297
HIDDEN = 32
CLASSES = 10
SENSORS_DEFAULT = 100


@dataclass(frozen=True)
class DigitsW1:
    """BENCHMARKS W1, exactly: per-client x [n,64] float32 and y [n] int32 (stored
    order), the 297 test examples, and the initial MLP weights (read-only arrays)."""

    client_x: tuple[np.ndarray, ...]
    client_y: tuple[np.ndarray, ...]
    x_test: np.ndarray
    y_test: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def npz_arrays(self) -> dict[str, np.ndarray]:
        """The arrays under the keys of BENCHMARKS' `data/digits_clients.npz`."""
        out: dict[str, np.ndarray] = {}
        for i, (x, y) in enumerate(zip(self.client_x, self.client_y)):
            out[f"x_{i}"], out[f"y_{i}"] = x, y
        out.update(x_test=self.x_test, y_test=self.y_test, w1=self.w1, b1=self.b1, w2=self.w2, b2=self.b2)
        return out


@functools.lru_cache(maxsize=1)
def digits_w1() -> DigitsW1:
    """The W1 data, computed once per process (BENCHMARKS "Exact choices")."""
    from sklearn.datasets import load_digits   # bundled with scikit-learn: no download

    digits = load_digits()
    x = (digits.data / 16).astype(np.float32)
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    x_train, y_train = x[:DIGITS_TRAIN], y[:DIGITS_TRAIN]
    x_test, y_test = x[DIGITS_TRAIN:], y[DIGITS_TRAIN:]

    rng = np.random.default_rng(1)
    chunks: list[list[np.ndarray]] = [[] for _ in range(DIGITS_CLIENTS)]
    for c in range(CLASSES):
        p = rng.dirichlet(0.5 * np.ones(DIGITS_CLIENTS))
        members = np.flatnonzero(y_train == c)
        for i, part in enumerate(np.split(members, (np.cumsum(p) * len(members)).astype(int)[:-1])):
            chunks[i].append(part)
    indices = [np.sort(np.concatenate(parts)) for parts in chunks]

    rng = np.random.default_rng(2)
    w1 = rng.uniform(-_glorot(64, HIDDEN), _glorot(64, HIDDEN), size=(64, HIDDEN)).astype(np.float32)
    w2 = rng.uniform(-_glorot(HIDDEN, CLASSES), _glorot(HIDDEN, CLASSES), size=(HIDDEN, CLASSES)).astype(np.float32)
    return DigitsW1(client_x=tuple(readonly(x_train[ix]) for ix in indices),
                    client_y=tuple(readonly(y_train[ix]) for ix in indices),
                    x_test=readonly(x_test), y_test=readonly(y_test),
                    w1=readonly(w1), b1=readonly(np.zeros(HIDDEN, np.float32)),
                    w2=readonly(w2), b2=readonly(np.zeros(CLASSES, np.float32)))


def _glorot(fan_in: int, fan_out: int) -> float:
    return float(np.sqrt(6 / (fan_in + fan_out)))


def digits_source(split: str = "train") -> ArraySource:
    """`digits` (100 clients "0".."99", features x and y) or `digits:test` (one client "test")."""
    data = digits_w1()
    if split == "test":
        return ArraySource("digits:test", ["test"], per_client=[{"x": data.x_test, "y": data.y_test}])
    return ArraySource("digits", [str(i) for i in range(DIGITS_CLIENTS)],
                       per_client=[{"x": x, "y": y} for x, y in zip(data.client_x, data.client_y)])


def digits_test_source(spec: str, count: str) -> ArraySource:
    """`digits:test:N`: the 297 test examples in order, split into N clients "0".."N-1" of
    consecutive examples (sizes differ by at most one, as numpy.array_split makes them), so
    a program can evaluate on clients that pair up with the N clients of another data set."""
    n = int(count) if count.isdigit() else 0
    if not 1 <= n <= DIGITS_TEST:
        raise DataError(f"{spec}: the number of test clients must be a whole number from 1 to {DIGITS_TEST}, "
                        f"as in digits:test:100")
    data = digits_w1()
    offsets = np.concatenate([[0], np.cumsum([len(part) for part in np.array_split(np.arange(DIGITS_TEST), n)])])
    return ArraySource(spec, [str(i) for i in range(n)], features={"x": data.x_test, "y": data.y_test},
                       offsets=offsets)


def sensor_readings(n: int) -> np.ndarray:
    """W0: client i reads `20 + (i % 17) * 0.5` (exact in float32)."""
    return (20 + (np.arange(n) % 17) * 0.5).astype(np.float32)


def sensors_source(spec: str) -> ArraySource:
    """`sensors` (100 clients) or `sensors:N`: one float32 `temperature` per client."""
    _, _, count = spec.partition(":")
    if not count:
        n = SENSORS_DEFAULT
    else:
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1 or not count.strip().isdigit():
            raise DataError(f"{spec}: the number of sensors must be a whole number of at least 1, "
                            f"as in sensors:1000")
    readings = sensor_readings(n)
    return ArraySource(spec, [str(i) for i in range(n)], features={"temperature": readings},
                       offsets=np.arange(n + 1))
