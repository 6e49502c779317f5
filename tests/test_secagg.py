"""Secure aggregation (fedlang.backends.secagg) and the fixed-point helpers (stdlib/secure.fed).

  * the protocol's sum equals the plain sum modulo 2^bitwidth of the clients whose masked input
    arrived, for random values, client counts, bitwidths, dropouts at every stage (up to what the
    threshold allows), full SecAgg and SecAgg+; beyond the threshold it raises SecAggError;
  * an observer of every message the server receives never sees a client's plain vector, a
    client's masked input is uniform (chi-square, fixed seed, significance 0.001), and no client's
    self-mask seed and mask key are both revealed;
  * tampered shares are detected (SecAggError, never a wrong sum);
  * stdlib/secure.fed round-trips floats within its documented error, and the secure histogram
    example counts the sensors' readings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedlang
from fedlang.backends import secagg
from fedlang.backends.secagg import (STAGES, AdvertiseKeys, Dropouts, MaskedInput, SecAggClient, SecAggError,
                                     SecAggServer, SecureSumSession, ShareKeys, UnmaskingShares, flatten_clients,
                                     secure_aggregate, secure_sum, unflatten)
from fedlang.ir.values import Struct

ALPHA = 0.001           # significance level of the uniformity tests


def plain(values: np.ndarray, bitwidth: int, included) -> np.ndarray:
    rows = np.asarray(values, np.int64)[list(included)]
    return np.mod(rows.sum(axis=0, dtype=np.int64), 1 << bitwidth) if len(rows) else \
        np.zeros(values.shape[1], np.int64)


def chi_square_critical(df: int, alpha: float = ALPHA) -> float:
    """The (1 - alpha) quantile of chi^2(df) by the Wilson-Hilferty approximation (within 0.1 of
    scipy's for df >= 255), so the test needs no SciPy."""
    z = {0.001: 3.090232306167813, 0.01: 2.3263478740408408}[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(samples: np.ndarray, bins: int) -> float:
    counts = np.bincount(samples.astype(np.int64), minlength=bins)
    expected = len(samples) / bins
    return float(((counts - expected) ** 2 / expected).sum())


# ---- correctness ---------------------------------------------------------------------------------

@st.composite
def protocol_runs(draw, neighbours: bool = False):
    """(values, bitwidth, neighbours, threshold, dropouts) with at most as many dropouts as the
    threshold tolerates: n - t in full SecAgg, (k + 1) - t in SecAgg+ (every neighbourhood then
    keeps t clients whatever the graph)."""
    if neighbours:
        k = draw(st.sampled_from([2, 4, 6]))
        n = draw(st.integers(k + 2, 16))
        holders = k + 1
    else:
        k = None
        n = draw(st.integers(1, 12))
        holders = n
    t = draw(st.one_of(st.none(), st.integers(1, holders)))
    tolerated = holders - (secagg.default_threshold(holders) if t is None else t)
    d = draw(st.integers(0, 6))
    bitwidth = draw(st.integers(1, 62))
    values = np.array(draw(st.lists(st.lists(st.integers(-2**62, 2**62), min_size=d, max_size=d),
                                    min_size=n, max_size=n)), np.int64).reshape(n, d)
    dropped = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=tolerated))
    stages = {s: [] for s in STAGES}
    for c in dropped:
        stages[draw(st.sampled_from(STAGES))].append(c)
    return values, bitwidth, k, t, Dropouts(**stages)


def expected_included(n: int, dropouts: Dropouts) -> tuple[int, ...]:
    gone = dropouts.advertise_keys | dropouts.share_keys | dropouts.masked_input
    return tuple(u for u in range(n) if u not in gone)


@given(protocol_runs(), st.integers(0, 3))
def test_secure_sum_is_the_sum_modulo_2_to_the_bitwidth(run, seed):
    values, bitwidth, _, threshold, dropouts = run
    result = secure_aggregate(values, bitwidth, threshold=threshold, dropouts=dropouts, seed=seed)
    assert result.included == expected_included(len(values), dropouts)
    assert result.sum.dtype == np.int64
    np.testing.assert_array_equal(result.sum, plain(values, bitwidth, result.included))


@given(protocol_runs(neighbours=True), st.integers(0, 3))
def test_secagg_plus_is_the_sum_modulo_2_to_the_bitwidth(run, seed):
    values, bitwidth, k, threshold, dropouts = run
    result = secure_aggregate(values, bitwidth, threshold=threshold, dropouts=dropouts, seed=seed, neighbours=k)
    assert result.included == expected_included(len(values), dropouts)
    np.testing.assert_array_equal(result.sum, plain(values, bitwidth, result.included))


def test_fresh_os_randomness_gives_the_same_sum():
    values = np.random.default_rng(5).integers(-1000, 1000, (6, 50))
    np.testing.assert_array_equal(secure_sum(values, 12), plain(values, 12, range(6)))


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_each_stage_up_to_the_threshold(stage):
    n = 9                                            # t = 5: four may drop
    values = np.arange(n * 3).reshape(n, 3) * 1000 + 1
    dropouts = Dropouts.at(stage, [1, 4, 6, 8])
    result = secure_aggregate(values, 20, dropouts=dropouts, seed=3)
    assert result.params.threshold == 5
    in_sum = stage == "unmasking"                   # dropped after sending the masked input
    assert result.included == tuple(range(n)) if in_sum else tuple(u for u in range(n) if u not in {1, 4, 6, 8})
    np.testing.assert_array_equal(result.sum, plain(values, 20, result.included))


@pytest.mark.parametrize("stage,did", [("advertise_keys", "advertised keys"), ("share_keys", "shared their keys"),
                                       ("masked_input", "sent their masked input"),
                                       ("unmasking", "sent unmasking shares")])
def test_one_dropout_too_many_raises_with_the_counts(stage, did):
    n = 9
    values = np.ones((n, 3), np.int64)
    with pytest.raises(SecAggError) as info:
        secure_aggregate(values, 16, dropouts=Dropouts.at(stage, [0, 2, 3, 5, 7]), seed=1)
    error = info.value
    assert (error.stage, error.survived, error.threshold) == (stage, 4, 5)
    assert f"only 4 of 9 clients {did}, below the threshold t=5" in str(error)
    assert "no result" in str(error)


@settings(max_examples=25)
@given(st.integers(2, 10), st.data())
def test_more_dropouts_than_the_threshold_allows_always_raise(n, data):
    t = data.draw(st.integers(1, n))
    dropped = data.draw(st.lists(st.integers(0, n - 1), unique=True, min_size=n - t + 1, max_size=n))
    stages = {s: [] for s in STAGES}
    for c in dropped:
        stages[data.draw(st.sampled_from(STAGES))].append(c)
    with pytest.raises(SecAggError, match=r"below the threshold t=\d+; the server cannot unmask"):
        secure_sum(np.ones((n, 2), np.int64), 8, threshold=t, dropouts=Dropouts(**stages), seed=0)


def test_secagg_plus_neighbourhood_below_threshold_raises_naming_the_client():
    # every other client drops after sharing keys: each survivor keeps itself and 3 of its 6
    # neighbours at best, below t = 5 for some neighbourhood
    values = np.ones((40, 2), np.int64)
    with pytest.raises(SecAggError, match=r"client \d+'s neighbourhood \(the client and its 6 neighbours\) "
                                          r"has only \d clients that sent their masked input") as info:
        secure_sum(values, 8, neighbours=6, threshold=5, dropouts=Dropouts.at("masked_input", range(0, 40, 2)),
                   seed=0)
    assert info.value.client is not None and info.value.survived < 5


def test_secagg_plus_masks_with_k_neighbours_only():
    values = np.random.default_rng(1).integers(0, 2**31, (60, 20))
    full = secure_aggregate(values, 32, seed=0)
    sparse = secure_aggregate(values, 32, seed=0, neighbours=8)
    np.testing.assert_array_equal(full.sum, sparse.sum)
    assert sparse.params.threshold == 5 and full.params.threshold == 31
    # round 1: one ciphertext per neighbour, so traffic grows with k, not with n
    assert sparse.traffic.bytes["share_keys"] * 5 < full.traffic.bytes["share_keys"]


def test_chunked_session_equals_one_shot():
    values = np.random.default_rng(2).integers(-2**31, 2**31, (23, 17))
    dropouts = Dropouts(share_keys={3}, masked_input={10}, unmasking={20})
    session = SecureSumSession(23, 17, 32, dropouts=dropouts, seed=9)
    for start in range(0, 23, 5):
        session.submit(values[start:start + 5], start=start)
    result = session.finish()
    np.testing.assert_array_equal(result.sum, secure_sum(values, 32, dropouts=dropouts, seed=9))
    np.testing.assert_array_equal(result.sum, plain(values, 32, result.included))
    with pytest.raises(RuntimeError, match="finished already"):
        session.finish()


def test_session_refuses_to_finish_without_every_value():
    session = SecureSumSession(4, 2, 8, seed=0)
    session.submit(np.ones((2, 2), np.int64), start=0)
    with pytest.raises(ValueError, match=r"clients \[2, 3\] were never submitted"):
        session.finish()


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="both at share_keys and at unmasking"):
        Dropouts(share_keys={1}, unmasking={1})
    with pytest.raises(ValueError, match="outside 0..3"):
        secure_sum(np.ones((4, 1), np.int64), 8, dropouts=Dropouts(unmasking={7}))
    with pytest.raises(ValueError, match="threshold must be between 1 and 4"):
        secure_sum(np.ones((4, 1), np.int64), 8, threshold=5)
    with pytest.raises(ValueError, match="bitwidth must be between 1 and 62"):
        secure_sum(np.ones((4, 1), np.int64), 63)
    with pytest.raises(ValueError, match="even"):
        secure_sum(np.ones((10, 1), np.int64), 8, neighbours=3)
    with pytest.raises(ValueError, match="unknown stage"):
        Dropouts.at("round 3", [1])


def test_sampled_dropouts_are_reproducible_and_cover_the_stages():
    a, b = Dropouts.sample(400, 0.2, seed=4), Dropouts.sample(400, 0.2, seed=4)
    assert a == b and 50 < len(a.all()) < 110
    assert all(getattr(a, s) for s in STAGES)


# ---- what the server sees --------------------------------------------------------------------------

def message_blobs(message) -> list[bytes]:
    """Every byte string and array a message carries, as bytes."""
    out = []
    for value in vars(message).values():
        items = value.values() if isinstance(value, dict) else [value]
        for item in items:
            if isinstance(item, (bytes, bytearray)):
                out.append(bytes(item))
            elif isinstance(item, np.ndarray):
                out.append(item.tobytes())
    return out


def test_the_server_only_sees_masked_values():
    n, d, bitwidth = 8, 64, 32
    rng = np.random.default_rng(11)
    values = rng.integers(0, 2**32, (n, d)).astype(np.int64)      # distinctive 32-bit patterns
    values[0] = np.arange(d) * 1000                                 # and a structured one
    seen: list[tuple[str, object]] = []
    dropouts = Dropouts(share_keys={6}, masked_input={5}, unmasking={7})
    session = SecureSumSession(n, d, bitwidth, dropouts=dropouts, seed=1, observer=lambda s, m: seen.append((s, m)))
    session.submit(values)
    result = session.finish()
    np.testing.assert_array_equal(result.sum, plain(values, bitwidth, result.included))

    # every message the server received, in protocol order, and only messages
    kinds = {"advertise_keys": AdvertiseKeys, "share_keys": ShareKeys, "masked_input": MaskedInput,
             "unmasking": UnmaskingShares}
    assert [s for s, _ in seen] == sorted((s for s, _ in seen), key=STAGES.index)
    assert all(isinstance(m, kinds[s]) for s, m in seen)
    counts = {s: sum(1 for t, _ in seen if t == s) for s in STAGES}
    assert counts == {"advertise_keys": 8, "share_keys": 7, "masked_input": 6, "unmasking": 5}

    blobs = [b for _, m in seen for b in message_blobs(m)]
    for u in range(n):
        pattern = (values[u] % 2**bitwidth).astype("<u4").tobytes()
        for width in (d, 4):                                        # the vector, or 4 values in a row
            for start in range(0, d - width + 1, width):
                assert not any(pattern[4 * start:4 * (start + width)] in b for b in blobs)
    masked = {m.sender: m.y for s, m in seen if s == "masked_input"}
    for u, y in masked.items():
        assert np.count_nonzero(y.astype(np.int64) == values[u] % 2**bitwidth) <= 1

    # the server object holds no plain vector and no client object
    server = session.server
    assert not any(isinstance(v, SecAggClient) for v in vars(server).values())
    held = [v for v in vars(server).values() if isinstance(v, np.ndarray)]
    for u in range(n):
        assert not any(np.array_equal(h.astype(np.int64), values[u]) for h in held)

    # a client's self-mask seed and its mask key are never both revealed
    seeds = {v for s, m in seen if s == "unmasking" for v in m.seed_shares}
    keys = {v for s, m in seen if s == "unmasking" for v in m.key_shares}
    assert seeds == set(result.included) and keys == {5} and not seeds & keys


@pytest.mark.parametrize("bitwidth", [8, 16])
def test_a_masked_input_is_uniform(bitwidth):
    """Chi-square goodness of fit of one client's masked input (its values mod 2^bitwidth) to the
    uniform distribution, at significance ALPHA with a fixed seed; the client's own values are a
    constant, the least uniform input there is. The plain values fail the same test."""
    d = 256 * 100 if bitwidth == 8 else 65536 * 16
    values = np.full((4, d), 7, np.int64)
    seen = []
    secure_sum(values, bitwidth, seed=2024, observer=lambda s, m: seen.append(m) if s == "masked_input" else None)
    bins = 1 << bitwidth
    critical = chi_square_critical(bins - 1)
    for message in seen:
        assert chi_square(message.y, bins) < critical
    assert chi_square(values[0], bins) > critical


def test_masked_input_bytes_are_uniform():
    """The same on the bytes of 32-bit masked inputs (SecAgg+, a client with two neighbours)."""
    values = np.tile(np.arange(8192, dtype=np.int64), (6, 1))
    seen = []
    secure_sum(values, 32, seed=7, neighbours=2, observer=lambda s, m: seen.append(m) if s == "masked_input" else None)
    critical = chi_square_critical(255)
    for message in seen:
        assert chi_square(np.frombuffer(message.y.tobytes(), np.uint8), 256) < critical
    assert chi_square(np.frombuffer(values[0].astype("<u4").tobytes(), np.uint8), 256) > critical


# ---- tampering is detected, never a wrong sum --------------------------------------------------------

def run_by_hand(n=5, d=4, tamper=None):
    """The protocol driven message by message with the public classes; `tamper(stage, messages)`
    may replace the messages of a stage before they are delivered."""
    tamper = tamper or (lambda stage, messages: messages)
    params = secagg.Params(n, d, 16, secagg.default_threshold(n), None)
    server = SecAggServer(params, secagg.Randomness.derived(0, "server"))
    clients = [SecAggClient(u, params, secagg.Randomness.derived(0, "client", u)) for u in range(n)]
    directory = server.collect_keys(tamper("advertise_keys", [c.advertise_keys() for c in clients]))
    forwarded = server.collect_shares(tamper("share_keys", [c.share_keys(directory) for c in clients]))
    forwarded = tamper("forward", forwarded)
    alive = clients[:-1]                                              # the last one drops
    for c in alive:
        server.collect_masked_input(c.masked_input(forwarded[c.index], np.full(d, c.index + 1)))
    request = server.unmask_request()
    return server.collect_unmasking(tamper("unmasking", [c.unmask(request) for c in alive]))


def test_by_hand_run_is_correct():
    np.testing.assert_array_equal(run_by_hand(), np.full(4, 1 + 2 + 3 + 4))


def test_a_tampered_ciphertext_does_not_authenticate():
    def flip(stage, messages):
        if stage == "forward":
            target = messages[0]
            sender, ciphertext = next(iter(target.ciphertexts.items()))
            broken = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
            messages[0] = secagg.ForwardedShares(0, {**target.ciphertexts, sender: broken})
        return messages
    with pytest.raises(SecAggError, match="do not authenticate"):
        run_by_hand(tamper=flip)


@pytest.mark.parametrize("kind,message", [("seed_shares", "self-mask seed of client .* does not match"),
                                          ("key_shares", "mask key of client 4 does not match")])
def test_a_wrong_share_is_detected(kind, message):
    def corrupt(stage, messages):
        if stage == "unmasking":
            first = messages[0]
            shares = {v: s.copy() for v, s in getattr(first, kind).items()}
            victim = next(iter(shares))
            # limb 1: a change in limb 0 might only touch the bits X25519 clamps away (no harm done)
            shares[victim][1] = (shares[victim][1] + 1) % secagg.PRIME
            fields = {"sender": first.sender, "seed_shares": first.seed_shares, "key_shares": first.key_shares}
            messages[0] = UnmaskingShares(**{**fields, kind: shares})
        return messages
    with pytest.raises(SecAggError, match=message):
        run_by_hand(tamper=corrupt)


# ---- building blocks -------------------------------------------------------------------------------

@given(st.binary(min_size=16, max_size=32), st.integers(1, 9), st.integers(0, 2**32))
def test_shamir_any_t_shares_rebuild_the_secret(secret_bytes, t, seed):
    n = t + 3
    secret = secagg.to_limbs(secret_bytes)
    points = np.arange(1, n + 1)
    shares = secagg.shamir_share(secret, points, t, secagg.Randomness.derived(seed))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, t, replace=False))
    rebuilt = secagg.shamir_reconstruct(points[pick], shares[pick], t)
    assert secagg.from_limbs(rebuilt, len(secret_bytes)) == secret_bytes


def test_prg_is_deterministic_and_in_range():
    a = secagg.prg(b"k" * 16, 1000, 5)
    np.testing.assert_array_equal(a, secagg.prg(b"k" * 16, 1000, 5))
    assert a.dtype == np.uint32 and a.max() < 32 and len(np.unique(a)) == 32
    assert secagg.prg(b"k" * 16, 10, 40).dtype == np.uint64


def test_structs_flatten_and_unflatten_for_the_aggregator():
    """The runtime's stacked struct -> one [clients, D] matrix -> the secure sum -> the struct."""
    rng = np.random.default_rng(3)
    stacked = Struct([rng.integers(-50, 50, (5, 2, 3)).astype(np.int32),
                      Struct([rng.integers(0, 9, (5,)).astype(np.int64)], ["n"])], ["w", "c"])
    flat, layout = flatten_clients(stacked)
    assert flat.shape == (5, 7) and flat.dtype == np.int64
    total = unflatten(secure_sum(flat, 10, seed=0), layout)
    assert total.names == ("w", "c") and total.c.names == ("n",)
    np.testing.assert_array_equal(total.w, np.mod(stacked.w.astype(np.int64).sum(0), 1024))
    np.testing.assert_array_equal(total.c.n, np.mod(stacked.c.n.sum(0), 1024))
    one, layout1 = flatten_clients(np.arange(4, dtype=np.int32).reshape(4, 1)[:, 0])
    assert one.shape == (4, 1) and unflatten(np.array([6]), layout1).shape == ()


# ---- fixed point (stdlib/secure.fed, run by the reference interpreter) --------------------------------

@pytest.fixture(scope="module")
def secure_fed(request):
    return fedlang.load(str(request.config.rootpath / "stdlib" / "secure.fed"))


@settings(max_examples=30)
@given(st.integers(1, 2000), st.sampled_from([16, 24, 31]), st.floats(-100, 100, width=32),
       st.floats(0.0625, 200, width=32), st.integers(0, 2**31))
def test_fixed_point_round_trip_within_half_a_step(secure_fed, clients, bits, lo, width, seed):
    lo, hi = np.float32(lo), np.float32(lo + width)
    scale = float(secure_fed.fixed_scale(lo, hi, bits, clients))
    levels = int(round((float(hi) - float(lo)) * scale))
    if levels < 1:
        return                                       # too many clients for the bits: no resolution left
    assert clients * levels < 2**bits                # fixed_scale never lets the sum wrap
    rng = np.random.default_rng(seed)
    x = rng.uniform(float(lo) - width / 4, float(hi) + width / 4, (min(clients, 12), 8)).astype(np.float32)
    codes = secure_fed.encode_vector(x.ravel(), lo, hi, scale).reshape(x.shape)      # one call for all rows
    assert codes.dtype == np.int32 and codes.min() >= 0 and codes.max() <= levels
    clipped = np.clip(x, lo, hi).astype(np.float64)
    step = 1 / scale
    # each code within half a step of the clipped value (plus float32 rounding of lo and hi)
    slack = 1e-6 * max(abs(float(lo)), abs(float(hi)), 1.0)
    assert np.all(np.abs(codes / scale + float(lo) - clipped) <= 0.5 * step + slack)
    m = len(x)
    total = secure_sum(codes.astype(np.int64), bits, seed=0).astype(np.int32)
    decoded = secure_fed.decode_sum_vector(total, m, lo, scale)
    tolerance = m * (0.5 * step + slack) + 2e-7 * np.abs(clipped.sum(0)) + 1e-30
    assert np.all(np.abs(decoded.astype(np.float64) - clipped.sum(0)) <= tolerance)
    mean = secure_fed.decode_mean_vector(total, m, lo, scale)
    assert np.all(np.abs(mean.astype(np.float64) - clipped.mean(0)) <= 0.5 * step + slack
                  + 2e-7 * np.abs(clipped.mean(0)) + 1e-30)


def test_fixed_point_rounds_half_up_and_clips(secure_fed):
    assert [int(secure_fed.encode(np.float32(x), -2.0, 2.0, 2.0)) for x in (-3.0, -2.0, -1.75, -1.5, 1.25, 9.0)] \
        == [0, 0, 1, 1, 7, 8]                        # (x + 2) * 2 = 0.5 -> 1, 6.5 -> 7
    scalar = [int(secure_fed.encode(np.float32(x), -5.0, 5.0, 1000.0)) for x in (-4.2, 0.0, 3.3)]
    vector = secure_fed.encode_vector(np.array([-4.2, 0.0, 3.3], np.float32), -5.0, 5.0, 1000.0)
    assert scalar == vector.tolist() == [800, 5000, 8300]
    assert float(secure_fed.decode_sum(np.int32(800 + 5000 + 8300), 3, -5.0, 1000.0)) == pytest.approx(-0.9)
    assert float(secure_fed.decode_mean(np.int32(800 + 5000 + 8300), 3, -5.0, 1000.0)) == pytest.approx(-0.3)
    assert float(secure_fed.fixed_scale(0.0, 1.0, 31, 1)) == 2**31 - 1
    assert float(secure_fed.fixed_scale(-1.0, 1.0, 10, 3)) == 341 / 2


# ---- the example -----------------------------------------------------------------------------------

def test_secure_histogram_example(repo_root):
    from fedlang.backends.data import sensor_readings

    prog = fedlang.load("examples/secure_histogram.fed")
    readings = [np.float32(r) for r in sensor_readings(100)]
    result = prog.secure_histogram(readings)
    # readings 20 + (i % 17) / 2: two per bin for bins 0..6 in each cycle of 17, three in bin 7
    assert result.counts.tolist() == [12] * 7 + [16]
    assert int(result.sensors) == 100
    assert float(result.mean) == pytest.approx(float(np.mean(np.asarray(readings, np.float64))), abs=2.5e-4)


@pytest.mark.slow
def test_secure_histogram_runs_with_no_flags(repo_root, capsys, tmp_path):
    from conftest import run_cli

    code, out, _ = run_cli(capsys, "run", "examples/secure_histogram.fed", "--no-progress", "--out", str(tmp_path))
    assert code == 0
    assert "counts=[12 12 12 12 12 12 12 16], sensors=100, mean=23.92" in out
