"""The data of the runtime benchmarks W0, W1 and W3 (../shared/BENCHMARKS.md), made
deterministically from fixed seeds and cached outside git.

    w0_readings(n)   float32[n]: client i reads 20 + (i % 17) * 0.5
    digits()         W1: Digits(clients=[(x, y), ...] x 100, x_test, y_test, init)
    scale()          W3: (x float32[10000,32,64], y int32[10000,32]) and the same init

The cache folder is `$FEDLANG_BENCH_DATA`, by default `~/.cache/fedlang/bench`:
`digits_clients.npz` (keys x_<i>, y_<i> for i < 100, x_test, y_test, w1, b1, w2, b2)
and `scale_x.npy`, `scale_y.npy`. Files are written to a temporary name in the same
folder and renamed, so a reader never sees half a file and two processes making the
cache at once do no harm. A cached file with the wrong keys or shapes is made again.

The digits split and the W0 readings are defined once, in fedlang's built-in data
(fedlang.backends.data.builtins: `digits_w1`, `sensor_readings`, which also serve
`--data digits` and `--data sensors:N`); this module caches them and adds W3.

After making the digits split, its client sizes are checked (min 3, median 14,
max 33, 1500 examples in all): a different NumPy or scikit-learn that changed the
data would fail here rather than silently benchmark something else.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_CLIENTS = 100                      # W1
N_TRAIN, N_TEST = 1500, 297
SCALE_CLIENTS, SCALE_EXAMPLES = 10_000, 32   # W3
FEATURES, HIDDEN, CLASSES = 64, 32, 10
DIGITS_SIZES = {"min": 3, "median": 14, "max": 33}
MODEL_KEYS = ("w1", "b1", "w2", "b2")


def cache_dir() -> Path:
    """$FEDLANG_BENCH_DATA, or ~/.cache/fedlang/bench; created if missing."""
    folder = Path(os.environ.get("FEDLANG_BENCH_DATA") or Path.home() / ".cache" / "fedlang" / "bench")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_atomically(path: Path, write) -> None:
    """write(file object) into a temporary file beside `path`, then rename it to `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)                        # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- W0 -------------------------------------------------------------------------------

def w0_readings(n: int) -> np.ndarray:
    """float32[n]: client i holds the reading 20 + (i % 17) * 0.5 (fedlang's `sensors:N`)."""
    from fedlang.backends.data.builtins import sensor_readings

    return sensor_readings(n)


# ---- the model (W1 and W3) ------------------------------------------------------------

def initial_model() -> dict[str, np.ndarray]:
    """Glorot-uniform w1 [64,32] then w2 [32,10] from one default_rng(2); zero biases
    (writable copies of the W1 data's initial weights)."""
    return {k: np.array(v) for k, v in digits().init.items()}


# ---- W1 -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Digits:
    """W1: clients[i] = (x float32[n_i,64], y int32[n_i]) in stored order; the test set;
    the initial model (w1, b1, w2, b2)."""
    clients: list[tuple[np.ndarray, np.ndarray]]
    x_test: np.ndarray
    y_test: np.ndarray
    init: dict[str, np.ndarray]

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(y) for _, y in self.clients])


def make_digits_arrays() -> dict[str, np.ndarray]:
    """The W1 arrays under the npz keys. The one definition is fedlang's built-in `digits`
    data (fedlang.backends.data.builtins.digits_w1): sklearn digits permuted by
    default_rng(0), a Dirichlet(0.5) label split over 100 clients (default_rng(1)),
    Glorot-uniform weights from default_rng(2)."""
    from fedlang.backends.data.builtins import digits_w1

    return digits_w1().npz_arrays()


def check_digits_sizes(sizes) -> None:
    """The split BENCHMARKS.md describes: 1500 examples, client sizes min 3, median 14, max 33."""
    sizes = np.asarray(sizes)
    got = {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())}
    if len(sizes) != N_CLIENTS or sizes.sum() != N_TRAIN or got != DIGITS_SIZES:
        raise RuntimeError(f"the digits split is not the one BENCHMARKS.md describes: {len(sizes)} clients, "
                           f"{sizes.sum()} examples, sizes {got} (expected {N_CLIENTS}, {N_TRAIN}, "
                           f"{DIGITS_SIZES}); did NumPy or scikit-learn change?")


def _digits_arrays_valid(arrays) -> bool:
    keys = {f"{p}_{i}" for p in "xy" for i in range(N_CLIENTS)} | {"x_test", "y_test", *MODEL_KEYS}
    if set(arrays.files) != keys:
        return False
    shapes = {"w1": (FEATURES, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, CLASSES), "b2": (CLASSES,)}
    return (arrays["x_test"].shape == (N_TEST, FEATURES)
            and all(arrays[k].shape == shape for k, shape in shapes.items())
            and sum(len(arrays[f"y_{i}"]) for i in range(N_CLIENTS)) == N_TRAIN)


def digits_path() -> Path:
    """The cached W1 file, made first if missing or malformed."""
    path = cache_dir() / "digits_clients.npz"
    if path.exists():
        try:
            with np.load(path) as arrays:
                if _digits_arrays_valid(arrays):
                    return path
        except (OSError, ValueError):
            pass
    arrays = make_digits_arrays()
    check_digits_sizes([len(arrays[f"y_{i}"]) for i in range(N_CLIENTS)])
    _write_atomically(path, lambda f: np.savez(f, **arrays))
    return path


def digits() -> Digits:
    """W1's data from the cache (made first if needed); the client sizes are checked."""
    with np.load(digits_path()) as arrays:
        data = Digits(clients=[(arrays[f"x_{i}"], arrays[f"y_{i}"]) for i in range(N_CLIENTS)],
                      x_test=arrays["x_test"], y_test=arrays["y_test"],
                      init={k: arrays[k] for k in MODEL_KEYS})
    check_digits_sizes(data.sizes)
    return data


def w1_clients(r: int) -> list[int]:
    """The clients W1's round r trains."""
    return [(r * 10 + k) % N_CLIENTS for k in range(10)]


# ---- W3 -------------------------------------------------------------------------------

def make_scale_arrays(n_clients: int = SCALE_CLIENTS) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(0,1) float32 [10000,32,64] from default_rng(3); y = argmax(x @ T) for T from
    default_rng(4). With n_clients < 10000: the first n_clients clients of the same data
    (the generator fills the array in order), for tests that need only a few."""
    x = np.random.default_rng(3).standard_normal((n_clients, SCALE_EXAMPLES, FEATURES), dtype=np.float32)
    teacher = np.random.default_rng(4).standard_normal((FEATURES, CLASSES))
    y = np.argmax(x @ teacher, axis=-1).astype(np.int32)
    return x, y


def scale() -> tuple[np.ndarray, np.ndarray]:
    """W3's (x, y) from the cache (made first if missing or malformed)."""
    folder = cache_dir()
    px, py = folder / "scale_x.npy", folder / "scale_y.npy"
    try:
        x, y = np.load(px), np.load(py)
        if x.shape == (SCALE_CLIENTS, SCALE_EXAMPLES, FEATURES) and y.shape == x.shape[:2] \
                and x.dtype == np.float32 and y.dtype == np.int32:
            return x, y
    except (OSError, ValueError):
        pass
    x, y = make_scale_arrays()
    _write_atomically(px, lambda f: np.save(f, x))
    _write_atomically(py, lambda f: np.save(f, y))
    return x, y


def w3_clients(r: int) -> range:
    """The clients W3's round r trains."""
    return range(r * 1000, r * 1000 + 1000)
