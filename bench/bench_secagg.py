"""What does secure aggregation cost? `federated_secure_sum` by the protocol of fedlang.backends.secagg
against a plain NumPy sum of the same values.

    python bench/bench_secagg.py                # 100 .. 10,000 clients x 10,000 int32 (about 2 minutes)
    python bench/bench_secagg.py --quick        # 1,000 values per client, up to 1,000 clients
    python bench/bench_secagg.py --full-1000    # also run full SecAgg at 1,000 clients (minutes more)

One round per row: every client holds a vector of `--dim` int32 values (bitwidth 32), drawn from a
fixed seed chunk by chunk (1,000 clients at a time, as the runtime hands chunks to the
aggregation; drawing is not timed). Full SecAgg masks every pair of clients, O(n^2 d) work; SecAgg+
masks each client with k = 2 ceil(log2 n) neighbours on a random Harary graph, O(n k d). Full SecAgg
is measured where it takes seconds (100 and 300 clients) and estimated beyond, from the 300-client
row with its O(n^2) per-round growth. Each row checks the result against the plain sum.

Columns:
  round s        wall time of the whole protocol (keys, shares, masked inputs, unmasking)
  client ms      time in client code per client (key agreement, encryption, masking, unmasking)
  server s       time in server code (collecting, forwarding, reconstructing, unmasking)
  numpy s        np.sum of the same values (int64 accumulation, mod 2^32)
  ratio          round s / numpy s
  up/client      bytes a client uploads, all rounds (masked input packed to 32 bits)
  x plain        up/client relative to sending the plain vector (4 bytes a value)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlang.backends.secagg import SecureSumSession, suggested_neighbours  # noqa: E402

BITWIDTH = 32
CHUNK = 1000


def run(n: int, dim: int, neighbours: int | None, seed: int = 0) -> dict:
    """One secure sum of n clients' vectors, and a plain NumPy sum of the same chunks."""
    rng = np.random.default_rng([seed, n])
    clock = time.perf_counter()
    session = SecureSumSession(n, dim, BITWIDTH, neighbours=neighbours, seed=seed)
    secure_s = time.perf_counter() - clock
    plain = np.zeros(dim, np.int64)
    numpy_s = 0.0
    for start in range(0, n, CHUNK):
        values = rng.integers(-2**31, 2**31, (min(CHUNK, n - start), dim), dtype=np.int64).astype(np.int32)
        clock = time.perf_counter()
        session.submit(values, start=start)
        secure_s += time.perf_counter() - clock
        clock = time.perf_counter()
        plain += values.sum(axis=0, dtype=np.int64)
        numpy_s += time.perf_counter() - clock
    clock = time.perf_counter()
    result = session.finish()
    secure_s += time.perf_counter() - clock
    clock = time.perf_counter()
    expected = np.mod(plain, 1 << BITWIDTH)
    numpy_s += time.perf_counter() - clock
    if not np.array_equal(result.sum, expected):
        raise AssertionError(f"{n} clients: the secure sum differs from the plain sum")
    upload = sum(result.traffic.bytes.values()) / n
    return dict(n=n, k=result.params.neighbours, t=result.params.threshold, round_s=secure_s,
                client_ms=1000 * result.client_seconds / n, server_s=result.server_seconds,
                numpy_s=numpy_s, upload=upload, plain_bytes=4 * dim)


def row(r: dict, label: str) -> str:
    k = "all" if r["k"] is None else str(r["k"])
    est = r.get("estimated", False)
    mark = "~" if est else " "
    ratio = r["round_s"] / r["numpy_s"] if r["numpy_s"] else float("inf")
    numpy_s = f"{r['numpy_s']:9.4f}" if not est else "        -"
    ratio_s = f"{ratio:9.0f}x" if not est else "         -"
    server = f"{r['server_s']:8.2f}" if not est else "       -"
    return (f"{r['n']:>7,} {label:<18} {k:>4} {r['t']:>5} {mark}{r['round_s']:9.2f} {mark}{r['client_ms']:9.2f} "
            f"{server} {numpy_s} {ratio_s} {mark}{r['upload'] / 1024:8.1f}K {mark}{r['upload'] / r['plain_bytes']:6.2f}")


def estimate_full(measured: dict, n: int) -> dict:
    """Full SecAgg at n clients from a measured full run at m clients: per-client work grows
    with n (one key agreement, one encrypted share and one d-vector mask per other client), so the
    round grows with n^2 and a client's upload by its n - 1 encrypted shares."""
    m = measured["n"]
    growth = n / m
    per_pair_bytes = (measured["upload"] - measured["plain_bytes"]) / (m - 1)
    return dict(n=n, k=None, t=n // 2 + 1, round_s=measured["round_s"] * growth ** 2,
                client_ms=measured["client_ms"] * growth, server_s=0.0, numpy_s=0.0,
                upload=measured["plain_bytes"] + per_pair_bytes * (n - 1), plain_bytes=measured["plain_bytes"],
                estimated=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 values per client, at most 1,000 clients")
    parser.add_argument("--dim", type=int, default=None, help="values per client (default 10,000)")
    parser.add_argument("--full-1000", action="store_true", help="also measure full SecAgg at 1,000 clients")
    args = parser.parse_args(argv)
    dim = args.dim or (1000 if args.quick else 10_000)
    sizes = [100, 1000] if args.quick else [100, 1000, 10_000]
    print(f"secure sum, one round: {dim:,} int32 per client, bitwidth {BITWIDTH}; "
          f"k = neighbours (all: full SecAgg), t = threshold; ~ = estimated, not run")
    print(f"{'clients':>7} {'protocol':<18} {'k':>4} {'t':>5} {'round s':>10} {'client ms':>10} {'server s':>8} "
          f"{'numpy s':>9} {'ratio':>10} {'up/client':>9} {'x plain':>7}")
    full_ref = None
    for n in [100, 300]:
        r = run(n, dim, None)
        print(row(r, "full SecAgg"), flush=True)
        full_ref = r
    for n in sizes:
        k = suggested_neighbours(n, full_up_to=0)
        r = run(n, dim, k)
        print(row(r, "SecAgg+"), flush=True)
    if args.full_1000:
        print(row(run(1000, dim, None), "full SecAgg"), flush=True)
    for n in sizes:
        if n > full_ref["n"] and not (n == 1000 and args.full_1000):
            print(row(estimate_full(full_ref, n), "full SecAgg (est.)"))


if __name__ == "__main__":
    main()
