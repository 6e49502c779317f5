"""Secure aggregation behind `federated_secure_sum(x, bitwidth)`: the pairwise-masking protocol of
Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017),
semi-honest version, optionally on the sparse neighbourhood graph of SecAgg+ (Bell et al., CCS 2020).

Clients and the server are objects that talk only through the messages defined below; a
`SecureSumSession` carries the messages between them (it is the network). The server object only
ever holds what it receives: public keys, encrypted shares, masked inputs and the shares clients
reveal in the unmasking round (plus what it reconstructs from them: the self-mask seeds of the
clients that sent a masked input and the mask keys of those that dropped after sharing keys).

  round 0  AdvertiseKeys        client -> server  (c_pk, s_pk): two fresh X25519 public keys
           KeyDirectory         server -> clients  everyone's public keys and the neighbour graph
  round 1  ShareKeys            client -> server  Shamir shares of b_u and s_u^SK for each
                                                  neighbour v, AES-GCM encrypted under a key agreed
                                                  from c_u^SK and c_v^PK; SHA-256(b_u)
           ForwardedShares      server -> client   the ciphertexts addressed to it
  round 2  MaskedInput          client -> server  y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^bitwidth
  round 4  UnmaskRequest        server -> clients  who sent a masked input (U3)
           UnmaskingShares      client -> server  for each neighbour v in U3 its share of b_v, for
                                                  each neighbour v that dropped its share of s_v^SK
  (round 3, ConsistencyCheck, belongs to the malicious-server version and is not run.)

Numbers: values live in Z_{2^bitwidth} (the result is the sum modulo 2^bitwidth: the reference
interpreter's meaning). Masks are expanded by AES-128-CTR (zero IV) keyed by HKDF-SHA256 of the
X25519 shared secret (pairwise) or by the 16-byte seed b_u (self mask). Secrets are Shamir-shared
over GF(2^31 - 1), cut into 30-bit limbs, so sharing and reconstruction are exact in uint64 NumPy.
docs/secure_aggregation.md describes all of it: thresholds, dropouts, costs.

Entry points: `secure_sum(values, bitwidth, ...)` (one shot), `SecureSumSession` (values submitted
chunk by chunk, as the runtime's aggregations receive them), `flatten_clients` / `unflatten` (a
struct of stacked integer tensors <-> one [clients, D] matrix).
"""

from __future__ import annotations

import hashlib
import secrets
import struct as _struct
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlang.ir.values import Struct

PRIME = 2**31 - 1                 # Shamir field GF(p): products of two elements fit in uint64
LIMB_BITS = 30                    # a secret is cut into 30-bit limbs, one field element each
SEED_BYTES = 16                   # b_u: an AES-128 key
KEY_BYTES = 32                    # an X25519 private key
SEED_LIMBS = -(-SEED_BYTES * 8 // LIMB_BITS)     # 5
KEY_LIMBS = -(-KEY_BYTES * 8 // LIMB_BITS)       # 9
STAGES = ("advertise_keys", "share_keys", "masked_input", "unmasking")
_NONCE = 12
_ZERO_IV = bytes(16)
_DOMAIN = b"fedlang-secagg-v1"


class SecAggError(Exception):
    """Secure aggregation cannot produce the sum (too few clients left to unmask, or a protocol
    violation). There is never a partial or wrong result."""

    def __init__(self, message: str, stage: str | None = None, survived: int | None = None,
                 threshold: int | None = None, client: int | None = None):
        super().__init__(message)
        self.stage, self.survived, self.threshold, self.client = stage, survived, threshold, client


# ---- dropouts -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dropouts:
    """Which clients (indices into the rows of the values) stop responding, named by the first
    message they fail to send:

      advertise_keys  never start (not in U1; not in the sum)
      share_keys      after advertising their keys (in U1, not U2; not in the sum)
      masked_input    after sharing keys (in U2, not U3; not in the sum: the server reconstructs
                      their mask key s_u^SK to remove the pairwise masks the others added)
      unmasking       after sending the masked input, before sending unmasking shares (in U3 but
                      not U5: their value IS in the sum; others' shares of b_u unmask it)
    """

    advertise_keys: frozenset[int] = frozenset()
    share_keys: frozenset[int] = frozenset()
    masked_input: frozenset[int] = frozenset()
    unmasking: frozenset[int] = frozenset()

    def __post_init__(self):
        seen: dict[int, str] = {}
        for stage in STAGES:
            members = frozenset(int(c) for c in getattr(self, stage))
            object.__setattr__(self, stage, members)
            for c in members:
                if c in seen:
                    raise ValueError(f"client {c} cannot drop both at {seen[c]} and at {stage}")
                seen[c] = stage

    @classmethod
    def at(cls, stage: str, clients: Iterable[int]) -> "Dropouts":
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
        return cls(**{stage: frozenset(clients)})

    @classmethod
    def sample(cls, num_clients: int, probability: float, seed: int = 0) -> "Dropouts":
        """Each client drops with `probability`, at a stage drawn uniformly from STAGES."""
        rng = np.random.default_rng([seed, 0x5ECA66])
        drops = rng.random(num_clients) < probability
        stages = rng.integers(0, len(STAGES), num_clients)
        return cls(**{s: frozenset(int(c) for c in np.flatnonzero(drops & (stages == k)))
                      for k, s in enumerate(STAGES)})

    def stage_of(self, client: int) -> str | None:
        return next((s for s in STAGES if client in getattr(self, s)), None)

    def all(self) -> frozenset[int]:
        return self.advertise_keys | self.share_keys | self.masked_input | self.unmasking


# ---- primitives ---------------------------------------------------------------------------------

class Randomness:
    """A client's (or the server's) private random bytes: AES-256-CTR over zeros, a standard
    deterministic generator. `fresh()` keys it from the OS; `derived(seed, ...)` from a seed, so a
    simulation is reproducible (a real client would never derive its keys from a shared seed)."""

    def __init__(self, key: bytes):
        self._stream = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()

    @classmethod
    def fresh(cls) -> "Randomness":
        return cls(secrets.token_bytes(32))

    @classmethod
    def derived(cls, seed: int, *label: Any) -> "Randomness":
        return cls(hashlib.sha256(_DOMAIN + b"|randomness|" + repr((int(seed),) + label).encode()).digest())

    def bytes(self, n: int) -> bytes:
        return self._stream.update(bytes(n))

    def field(self, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform elements of GF(p) (64 random bits mod p: a bias below 2^-32)."""
        count = int(np.prod(shape, dtype=np.int64))
        raw = np.frombuffer(self.bytes(8 * count), "<u8").astype(np.uint64)
        return (raw % np.uint64(PRIME)).reshape(shape)


def _randomness(seed: int | None, *label: Any) -> Randomness:
    return Randomness.fresh() if seed is None else Randomness.derived(seed, *label)


def _kdf(shared_secret: bytes, purpose: bytes) -> bytes:
    """HKDF-SHA256 of an X25519 shared secret: a 16-byte key for one purpose."""
    return HKDF(hashes.SHA256(), 16, salt=None, info=_DOMAIN + b"|" + purpose).derive(shared_secret)


def word_dtype(bitwidth: int) -> np.dtype:
    """The unsigned word that arithmetic mod 2^bitwidth runs in (2^bitwidth divides 2^w)."""
    return np.dtype("<u4") if bitwidth <= 32 else np.dtype("<u8")


def prg(key: bytes, length: int, bitwidth: int) -> np.ndarray:
    """`length` uniform elements of Z_{2^bitwidth} in the session's word dtype (low bits of the
    AES-128-CTR keystream under `key`, zero IV; exactly uniform since 2^bitwidth divides 2^w)."""
    dtype = word_dtype(bitwidth)
    stream = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor().update(bytes(length * dtype.itemsize))
    words = np.frombuffer(stream, dtype)
    return words & dtype.type((1 << bitwidth) - 1)


def to_limbs(data: bytes) -> np.ndarray:
    value = int.from_bytes(data, "little")
    count = -(-len(data) * 8 // LIMB_BITS)
    mask = (1 << LIMB_BITS) - 1
    return np.array([(value >> (LIMB_BITS * k)) & mask for k in range(count)], np.uint64)


def from_limbs(limbs: np.ndarray, nbytes: int) -> bytes:
    if np.any(limbs >= (1 << LIMB_BITS)):
        raise SecAggError("reconstructed shares are inconsistent (a limb is out of range): "
                          "a client sent a wrong share; no result", stage="unmasking")
    value = sum(int(l) << (LIMB_BITS * k) for k, l in enumerate(limbs))
    if value >> (8 * nbytes):
        raise SecAggError("reconstructed shares are inconsistent (the secret is too long): "
                          "a client sent a wrong share; no result", stage="unmasking")
    return value.to_bytes(nbytes, "little")


def shamir_share(secret: np.ndarray, points: np.ndarray, threshold: int, randomness: Randomness) -> np.ndarray:
    """Shares [len(points), L] of the L field elements `secret`: P(x) = secret + a_1 x + ... +
    a_{t-1} x^{t-1} with uniform a_k, one polynomial per limb, evaluated at `points` (distinct,
    nonzero) by Horner's rule. Every product is below p^2 < 2^62, so uint64 is exact."""
    p = np.uint64(PRIME)
    xs = np.asarray(points, np.uint64)[:, None]
    coefficients = randomness.field((threshold - 1, len(secret)))
    acc = np.zeros((len(xs), len(secret)), np.uint64)
    for a in coefficients[::-1]:
        acc = (acc * xs + a) % p
    return (acc * xs + np.asarray(secret, np.uint64)) % p


@lru_cache(maxsize=4096)
def _lagrange_at_zero(points: tuple[int, ...]) -> np.ndarray:
    """lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p: P(0) = sum_i lambda_i P(x_i)."""
    out = []
    for i, xi in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return np.array(out, np.uint64)


def shamir_reconstruct(points: Iterable[int], shares: np.ndarray, threshold: int) -> np.ndarray:
    """The secret from `threshold` shares (rows of `shares` at `points`; extra ones are unused)."""
    points = tuple(int(x) for x in points)[:threshold]
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares, {threshold} needed")
    lam = _lagrange_at_zero(points)
    rows = np.asarray(shares, np.uint64)[:threshold]
    return ((lam[:, None] * rows) % np.uint64(PRIME)).sum(axis=0, dtype=np.uint64) % np.uint64(PRIME)


def default_threshold(holders: int) -> int:
    """The smallest strict majority of the `holders` of a client's shares."""
    return holders // 2 + 1


def suggested_neighbours(num_clients: int, full_up_to: int = 200) -> int | None:
    """None (full SecAgg, every pair masks) up to `full_up_to` clients, above that SecAgg+ with
    2 * ceil(log2 n) neighbours (even, as the Harary graph needs). A cost choice, not a security
    analysis: Bell et al. derive k from the tolerated dropout and corruption rates."""
    if num_clients <= full_up_to:
        return None
    return 2 * int(np.ceil(np.log2(num_clients)))


def harary_neighbours(members: list[int], k: int | None, rng: np.random.Generator) -> dict[int, tuple[int, ...]]:
    """SecAgg+'s graph: the Harary graph H(k, m) (node i joined to i +- 1 .. i +- k/2 around a ring)
    over a random permutation of the members. None, or k >= m - 1: the complete graph."""
    m = len(members)
    if k is None or k >= m - 1:
        return {u: tuple(v for v in members if v != u) for u in members}
    order = [members[i] for i in rng.permutation(m)]
    out = {}
    for i, u in enumerate(order):
        out[u] = tuple(sorted({order[(i + j) % m] for j in range(1, k // 2 + 1)} |
                              {order[(i - j) % m] for j in range(1, k // 2 + 1)}))
    return out


# ---- messages -----------------------------------------------------------------------------------

def _frozen_array(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class AdvertiseKeys:                       # round 0, client -> server
    sender: int
    c_pk: bytes                            # X25519 public key for agreeing share-encryption keys
    s_pk: bytes                            # X25519 public key for agreeing pairwise mask seeds

    @property
    def nbytes(self) -> int:
        return 4 + len(self.c_pk) + len(self.s_pk)


@dataclass(frozen=True)
class KeyDirectory:                        # round 0, server -> clients (public)
    keys: Mapping[int, tuple[bytes, bytes]]
    neighbours: Mapping[int, tuple[int, ...]]


@dataclass(frozen=True)
class ShareKeys:                           # round 1, client -> server
    sender: int
    ciphertexts: Mapping[int, bytes]       # recipient -> nonce || AES-GCM(u, v, share of b_u, share of s_u^SK)
    seed_commitment: bytes                 # SHA-256 of b_u (lets the server check the b_u it rebuilds)

    @property
    def nbytes(self) -> int:
        return 4 + len(self.seed_commitment) + sum(4 + len(c) for c in self.ciphertexts.values())


@dataclass(frozen=True)
class ForwardedShares:                     # round 1, server -> one client
    recipient: int
    ciphertexts: Mapping[int, bytes]       # sender -> ciphertext


@dataclass(frozen=True)
class MaskedInput:                         # round 2, client -> server
    sender: int
    y: np.ndarray                          # [d] words, values in [0, 2^bitwidth)
    bitwidth: int

    @property
    def nbytes(self) -> int:
        return 4 + -(-self.y.size * self.bitwidth // 8)       # packed to bitwidth bits on a wire


@dataclass(frozen=True)
class UnmaskRequest:                       # round 4, server -> clients
    survivors: tuple[int, ...]             # U3: the clients whose masked input arrived

    @cached_property
    def members(self) -> frozenset[int]:
        return frozenset(self.survivors)


@dataclass(frozen=True)
class UnmaskingShares:                     # round 4, client -> server
    sender: int
    seed_shares: Mapping[int, np.ndarray]  # v in U3 -> the sender's share of b_v   [SEED_LIMBS]
    key_shares: Mapping[int, np.ndarray]   # v dropped -> the sender's share of s_v^SK  [KEY_LIMBS]

    @property
    def nbytes(self) -> int:
        return 4 + sum(4 + 4 * len(s) for s in self.seed_shares.values()) + \
            sum(4 + 4 * len(s) for s in self.key_shares.values())


Observer = Callable[[str, Any], None]


@dataclass(frozen=True)
class Params:
    """The public parameters of one run of the protocol."""
    num_clients: int
    dim: int
    bitwidth: int
    threshold: int
    neighbours: int | None                 # None: full SecAgg (complete graph)

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bitwidth) - 1


def _point(client: int) -> int:
    """A client's Shamir evaluation point."""
    return client + 1


def _share_plaintext(sender: int, recipient: int, share: np.ndarray) -> bytes:
    return _struct.pack("<II", sender, recipient) + np.asarray(share, "<u4").tobytes()


def seed_commitment(client: int, seed: bytes) -> bytes:
    """SHA-256 over b_u (a uniform 128-bit seed, so the hash hides it): not in Bonawitz et al.;
    it lets the server detect a wrongly reconstructed b_u instead of returning a wrong sum."""
    return hashlib.sha256(_DOMAIN + b"|seed|" + _struct.pack("<I", client) + seed).digest()


def _aad(sender: int, recipient: int) -> bytes:
    return _DOMAIN + b"|share|" + _struct.pack("<II", sender, recipient)


# ---- a client -----------------------------------------------------------------------------------

class SecAggClient:
    """One client: its secrets never leave this object except as encrypted shares, its masked
    input, and the shares the protocol tells it to reveal."""

    def __init__(self, index: int, params: Params, randomness: Randomness):
        self.index, self.params = index, params
        self._random = randomness
        self._c_sk = X25519PrivateKey.from_private_bytes(randomness.bytes(KEY_BYTES))
        self._s_sk_bytes = randomness.bytes(KEY_BYTES)
        self._s_sk = X25519PrivateKey.from_private_bytes(self._s_sk_bytes)
        self._b = randomness.bytes(SEED_BYTES)
        self._neighbours: tuple[int, ...] = ()
        self._public: dict[int, tuple[bytes, bytes]] = {}
        self._share_keys: dict[int, bytes] = {}
        self._own_share: np.ndarray | None = None
        self._received: dict[int, bytes] = {}

    # round 0
    def advertise_keys(self) -> AdvertiseKeys:
        return AdvertiseKeys(self.index, self._c_sk.public_key().public_bytes_raw(),
                             self._s_sk.public_key().public_bytes_raw())

    # round 1
    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        t = self.params.threshold
        self._neighbours = tuple(directory.neighbours[self.index])
        if len(self._neighbours) + 1 < t:
            raise SecAggError(f"client {self.index}: {len(self._neighbours) + 1} holders for its shares, "
                              f"fewer than the threshold {t}", stage="share_keys", client=self.index)
        self._public = {v: directory.keys[v] for v in self._neighbours}
        holders = [self.index, *self._neighbours]
        secret = np.concatenate([to_limbs(self._b), to_limbs(self._s_sk_bytes)])
        shares = shamir_share(secret, np.array([_point(h) for h in holders]), t, self._random)
        self._own_share = shares[0]
        ciphertexts = {}
        for v, share in zip(self._neighbours, shares[1:]):
            key = self._share_key(v)
            nonce = self._random.bytes(_NONCE)
            ciphertexts[v] = nonce + AESGCM(key).encrypt(nonce, _share_plaintext(self.index, v, share),
                                                        _aad(self.index, v))
        return ShareKeys(self.index, ciphertexts, seed_commitment(self.index, self._b))

    def _share_key(self, v: int) -> bytes:
        key = self._share_keys.get(v)
        if key is None:
            shared = self._c_sk.exchange(X25519PublicKey.from_public_bytes(self._public[v][0]))
            key = self._share_keys[v] = _kdf(shared, b"share-encryption")
        return key

    # round 2
    def masked_input(self, forwarded: ForwardedShares, value: np.ndarray) -> MaskedInput:
        params, t = self.params, self.params.threshold
        if forwarded.recipient != self.index:
            raise SecAggError(f"client {self.index} received the shares of client {forwarded.recipient}",
                              stage="masked_input", client=self.index)
        unknown = set(forwarded.ciphertexts) - set(self._neighbours)
        if unknown:
            raise SecAggError(f"client {self.index} received shares from non-neighbours {sorted(unknown)}",
                              stage="masked_input", client=self.index)
        if len(forwarded.ciphertexts) + 1 < t:
            raise SecAggError(f"client {self.index}: only {len(forwarded.ciphertexts) + 1} holders of its "
                              f"shares are left, fewer than the threshold {t}", stage="masked_input",
                              survived=len(forwarded.ciphertexts) + 1, threshold=t, client=self.index)
        self._received = dict(forwarded.ciphertexts)
        value = np.asarray(value)
        if value.shape != (params.dim,) or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"client {self.index}: expected an integer vector of {params.dim} values, "
                             f"found {value.dtype}{list(value.shape)}")
        dtype = word_dtype(params.bitwidth)
        # x mod 2^bitwidth: the low bits of the two's complement (negative values work)
        y = (value.astype(np.int64) & np.int64(params.modulus_mask)).astype(dtype)
        y += prg(self._b, params.dim, params.bitwidth)
        for v in sorted(self._received):        # U2 as this client sees it
            mask = prg(self._mask_key(v), params.dim, params.bitwidth)
            if self.index > v:
                y += mask
            else:
                y -= mask
        y &= dtype.type(params.modulus_mask)
        return MaskedInput(self.index, _frozen_array(y), params.bitwidth)

    def _mask_key(self, v: int) -> bytes:
        shared = self._s_sk.exchange(X25519PublicKey.from_public_bytes(self._public[v][1]))
        return _kdf(shared, b"pairwise-mask")

    # round 4
    def unmask(self, request: UnmaskRequest) -> UnmaskingShares:
        t = self.params.threshold
        survivors = request.members
        if self.index not in survivors:
            raise SecAggError(f"client {self.index} was asked to unmask but its input is not counted",
                              stage="unmasking", client=self.index)
        alive = 1 + sum(1 for v in self._received if v in survivors)
        if alive < t:
            raise SecAggError(f"client {self.index}: only {alive} of its share holders sent a masked input, "
                              f"fewer than the threshold {t}", stage="unmasking", client=self.index)
        seed_shares = {self.index: self._own_share[:SEED_LIMBS].copy()}
        key_shares = {}
        for v, ciphertext in self._received.items():
            share = self._decrypt(v, ciphertext)
            # never both for one client: b_v if v's input counts, s_v^SK if v dropped
            if v in survivors:
                seed_shares[v] = share[:SEED_LIMBS]
            else:
                key_shares[v] = share[SEED_LIMBS:]
        return UnmaskingShares(self.index, seed_shares, key_shares)

    def _decrypt(self, v: int, ciphertext: bytes) -> np.ndarray:
        try:
            plain = AESGCM(self._share_key(v)).decrypt(ciphertext[:_NONCE], ciphertext[_NONCE:], _aad(v, self.index))
        except InvalidTag:
            raise SecAggError(f"client {self.index}: the shares from client {v} do not authenticate",
                              stage="unmasking", client=self.index) from None
        sender, recipient = _struct.unpack("<II", plain[:8])
        if (sender, recipient) != (v, self.index):
            raise SecAggError(f"client {self.index}: a share addressed {sender}->{recipient} arrived as {v}->"
                              f"{self.index}", stage="unmasking", client=self.index)
        return np.frombuffer(plain[8:], "<u4").astype(np.uint64)


# ---- the server ---------------------------------------------------------------------------------

@dataclass
class Traffic:
    """What the server received, per stage: message count and bytes (masked inputs counted packed
    to bitwidth bits, as on a wire)."""
    messages: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    bytes: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})


class SecAggServer:
    """The server: holds public keys, ciphertexts it forwards, the running sum of masked inputs and
    the unmasking shares. Every message it receives is first shown to `observer(stage, message)`."""

    def __init__(self, params: Params, randomness: Randomness, observer: Observer | None = None):
        self.params = params
        self._rng = np.random.default_rng(np.frombuffer(randomness.bytes(16), "<u8").tolist())
        self.observer = observer
        self.traffic = Traffic()
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.neighbours: dict[int, tuple[int, ...]] = {}
        self.shared: set[int] = set()                   # U2
        self.commitments: dict[int, bytes] = {}
        self.masked_sum = np.zeros(params.dim, word_dtype(params.bitwidth))
        self.masked_from: set[int] = set()              # U3
        self.unmasking: dict[int, UnmaskingShares] = {}  # U5

    def _receive(self, stage: str, message: Any) -> None:
        if self.observer is not None:
            self.observer(stage, message)
        self.traffic.messages[stage] += 1
        self.traffic.bytes[stage] += message.nbytes

    def _fail(self, stage: str, alive: int, total: int, did: str, client: int | None = None, k: int = 0) -> None:
        t = self.params.threshold
        if client is None:
            where = f"only {alive} of {total} clients {did}"
        else:
            where = (f"client {client}'s neighbourhood (the client and its {k} neighbours) has only {alive} "
                     f"clients that {did}")
        raise SecAggError(f"secure aggregation failed at stage {stage}: {where}, below the threshold "
                          f"t={t}; the server cannot unmask the sum, so there is no result",
                          stage=stage, survived=alive, threshold=t, client=client)

    def _check(self, stage: str, alive: set[int], who: Iterable[int], did: str, total: int,
               include_self: bool = True) -> None:
        """Every client in `who` has at least t share holders in `alive` (and so does everyone)."""
        t = self.params.threshold
        if len(alive) < t:
            self._fail(stage, len(alive), total, did)
        if self.params.neighbours is None:
            return
        for u in who:
            holders = sum(1 for v in self.neighbours[u] if v in alive) + (include_self and u in alive)
            if holders < t:
                self._fail(stage, holders, total, did, client=u, k=len(self.neighbours[u]))

    # round 0
    def collect_keys(self, messages: Iterable[AdvertiseKeys]) -> KeyDirectory:
        for m in messages:
            self._receive("advertise_keys", m)
            if m.sender in self.keys or not 0 <= m.sender < self.params.num_clients:
                raise SecAggError(f"unexpected keys from client {m.sender}", stage="advertise_keys")
            self.keys[m.sender] = (m.c_pk, m.s_pk)
        members = sorted(self.keys)
        self.neighbours = harary_neighbours(members, self.params.neighbours, self._rng)
        self._check("advertise_keys", set(members), members, "advertised keys", self.params.num_clients)
        return KeyDirectory(dict(self.keys), dict(self.neighbours))

    # round 1
    def collect_shares(self, messages: Iterable[ShareKeys]) -> dict[int, ForwardedShares]:
        inbox: dict[int, dict[int, bytes]] = {}
        for m in messages:
            self._receive("share_keys", m)
            if m.sender not in self.keys or m.sender in self.shared:
                raise SecAggError(f"unexpected shares from client {m.sender}", stage="share_keys")
            if set(m.ciphertexts) != set(self.neighbours[m.sender]):
                raise SecAggError(f"client {m.sender} did not send one share to each neighbour",
                                  stage="share_keys")
            self.shared.add(m.sender)
            self.commitments[m.sender] = m.seed_commitment
            for v, c in m.ciphertexts.items():
                inbox.setdefault(v, {})[m.sender] = c
        self._check("share_keys", self.shared, self.shared, "shared their keys", self.params.num_clients)
        return {v: ForwardedShares(v, {u: c for u, c in inbox.get(v, {}).items()}) for v in sorted(self.shared)}

    # round 2
    def collect_masked_input(self, message: MaskedInput) -> None:
        self._receive("masked_input", message)
        if message.sender not in self.shared or message.sender in self.masked_from:
            raise SecAggError(f"unexpected masked input from client {message.sender}", stage="masked_input")
        if message.y.shape != (self.params.dim,) or message.y.dtype != self.masked_sum.dtype:
            raise SecAggError(f"client {message.sender}'s masked input has the wrong shape", stage="masked_input")
        self.masked_from.add(message.sender)
        self.masked_sum += message.y                     # wraps mod 2^w; reduced mod 2^bitwidth at the end

    def unmask_request(self) -> UnmaskRequest:
        survivors = self.masked_from
        self._check("masked_input", survivors, survivors, "sent their masked input", self.params.num_clients)
        for v in self._dropped_to_unmask():
            self._require_holders("masked_input", v, survivors, "sent their masked input")
        return UnmaskRequest(tuple(sorted(survivors)))

    def _dropped_to_unmask(self) -> list[int]:
        """Clients that shared keys but sent no masked input while a neighbour that did masked with them."""
        return [v for v in sorted(self.shared - self.masked_from)
                if any(u in self.masked_from for u in self.neighbours[v])]

    def _require_holders(self, stage: str, v: int, alive: set[int], did: str) -> None:
        """Enough of a dropped client's neighbours (it is gone itself) to rebuild s_v^SK."""
        holders = sum(1 for u in self.neighbours[v] if u in alive)
        if holders < self.params.threshold:
            if self.params.neighbours is None:
                self._fail(stage, holders, self.params.num_clients, did)
            self._fail(stage, holders, self.params.num_clients, did, client=v, k=len(self.neighbours[v]))

    # round 4
    def collect_unmasking(self, messages: Iterable[UnmaskingShares]) -> np.ndarray:
        survivors = self.masked_from
        for m in messages:
            self._receive("unmasking", m)
            if m.sender not in survivors or m.sender in self.unmasking:
                raise SecAggError(f"unexpected unmasking shares from client {m.sender}", stage="unmasking")
            if set(m.seed_shares) & set(m.key_shares):
                raise SecAggError(f"client {m.sender} revealed both secrets of one client", stage="unmasking")
            self.unmasking[m.sender] = m
        answered = set(self.unmasking)
        self._check("unmasking", answered, survivors, "sent unmasking shares", self.params.num_clients)
        dropped = self._dropped_to_unmask()
        for v in dropped:
            self._require_holders("unmasking", v, answered, "sent unmasking shares")
        return self._unmask(survivors, dropped)

    def _shares_by_owner(self, kind: str) -> dict[int, tuple[list[int], list[np.ndarray]]]:
        """The revealed shares of `kind`, grouped by whose secret they are: owner -> (points, shares)."""
        out: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        for w in sorted(self.unmasking):
            for owner, share in getattr(self.unmasking[w], kind).items():
                points, shares = out.setdefault(owner, ([], []))
                points.append(_point(w))
                shares.append(share)
        return out

    def _collect(self, by_owner: dict, secret_of: int) -> tuple[list[int], list[np.ndarray]]:
        points, shares = by_owner.get(secret_of, ([], []))
        if len(points) < self.params.threshold:
            raise SecAggError(f"secure aggregation failed at stage unmasking: only {len(points)} shares of "
                              f"client {secret_of}'s secret arrived, below the threshold "
                              f"t={self.params.threshold}; no result", stage="unmasking",
                              survived=len(points), threshold=self.params.threshold, client=secret_of)
        return points, shares

    def _unmask(self, survivors: set[int], dropped: list[int]) -> np.ndarray:
        params, t = self.params, self.params.threshold
        total = self.masked_sum.copy()
        seed_shares = self._shares_by_owner("seed_shares")
        for u in sorted(survivors):                      # remove the self masks PRG(b_u)
            points, shares = self._collect(seed_shares, u)
            b_u = from_limbs(shamir_reconstruct(points, np.stack(shares), t), SEED_BYTES)
            if seed_commitment(u, b_u) != self.commitments[u]:
                raise SecAggError(f"the reconstructed self-mask seed of client {u} does not match its "
                                  f"commitment: inconsistent shares; no result", stage="unmasking", client=u)
            total -= prg(b_u, params.dim, params.bitwidth)
        key_shares = self._shares_by_owner("key_shares")
        for v in dropped:                                # remove the masks survivors added for dropped v
            points, shares = self._collect(key_shares, v)
            s_sk = X25519PrivateKey.from_private_bytes(
                from_limbs(shamir_reconstruct(points, np.stack(shares), t), KEY_BYTES))
            if s_sk.public_key().public_bytes_raw() != self.keys[v][1]:
                raise SecAggError(f"the reconstructed mask key of client {v} does not match its public key: "
                                  f"inconsistent shares; no result", stage="unmasking", client=v)
            for u in self.neighbours[v]:
                if u in survivors:
                    shared = s_sk.exchange(X25519PublicKey.from_public_bytes(self.keys[u][1]))
                    mask = prg(_kdf(shared, b"pairwise-mask"), params.dim, params.bitwidth)
                    if u > v:                            # u added +mask, so take it off
                        total -= mask
                    else:
                        total += mask
        total &= total.dtype.type(params.modulus_mask)
        return total.astype(np.int64)


# ---- a run of the protocol ----------------------------------------------------------------------

@dataclass
class SecAggResult:
    sum: np.ndarray                     # int64 [d], in [0, 2^bitwidth): sum of the included clients' values
    included: tuple[int, ...]           # U3: the clients whose values are in the sum
    params: Params
    traffic: Traffic
    client_seconds: float               # time spent in client code, all clients together
    server_seconds: float               # time spent in server code


class SecureSumSession:
    """One secure sum over `num_clients` clients (rows) of `dim`-vectors. The constructor runs
    rounds 0 and 1 (keys and shares: no values needed); `submit` hands clients their values, and
    they send masked inputs (round 2), in chunks of consecutive rows; `finish` runs the unmasking.

    `threshold`: t, the number of share holders needed to reconstruct a client's secrets; default
    the smallest strict majority of the holders (n // 2 + 1, or (k + 1) // 2 + 1 with `neighbours`).
    `neighbours`: None for full SecAgg (every pair of clients masks), or an even k for SecAgg+
    (each client masks with and shares with k neighbours on a random Harary graph).
    `seed`: None draws every key from the OS; an int derives all randomness from it (reproducible
    simulations). `observer(stage, message)` sees every message the server receives."""

    def __init__(self, num_clients: int, dim: int, bitwidth: int, *, threshold: int | None = None,
                 dropouts: Dropouts | None = None, seed: int | None = None, neighbours: int | None = None,
                 observer: Observer | None = None):
        if not 1 <= int(bitwidth) <= 62:
            raise ValueError(f"bitwidth must be between 1 and 62, found {bitwidth}")
        if num_clients < 1:
            raise ValueError("secure aggregation needs at least one client")
        if neighbours is not None:
            if neighbours < 2 or neighbours % 2:
                raise ValueError(f"neighbours must be an even number >= 2 (Harary graph), found {neighbours}")
            if neighbours >= num_clients - 1:
                neighbours = None                        # the complete graph: full SecAgg
        holders = num_clients if neighbours is None else neighbours + 1
        t = default_threshold(holders) if threshold is None else int(threshold)
        if not 1 <= t <= holders:
            raise ValueError(f"threshold must be between 1 and {holders} (the holders of each client's "
                             f"shares), found {t}")
        self.dropouts = dropouts or Dropouts()
        bad = [c for c in self.dropouts.all() if not 0 <= c < num_clients]
        if bad:
            raise ValueError(f"dropouts name clients {sorted(bad)} outside 0..{num_clients - 1}")
        self.params = Params(int(num_clients), int(dim), int(bitwidth), t, neighbours)
        self.client_seconds = self.server_seconds = 0.0
        self.server = SecAggServer(self.params, _randomness(seed, "server"), observer)
        clock = time.perf_counter()
        self.clients = {u: SecAggClient(u, self.params, _randomness(seed, "client", u))
                        for u in range(num_clients) if u not in self.dropouts.advertise_keys}
        advertised = [c.advertise_keys() for c in self.clients.values()]
        self._client_time(clock)
        directory = self._server(self.server.collect_keys, advertised)
        clock = time.perf_counter()
        shared = [c.share_keys(directory) for u, c in self.clients.items() if u not in self.dropouts.share_keys]
        self._client_time(clock)
        self._forwarded = self._server(self.server.collect_shares, shared)
        self._expected = {u for u in self._forwarded if u not in self.dropouts.masked_input}
        self._finished = False

    def _client_time(self, since: float) -> None:
        self.client_seconds += time.perf_counter() - since

    def _server(self, fn: Callable, *args: Any) -> Any:
        clock = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.server_seconds += time.perf_counter() - clock

    def submit(self, values: np.ndarray, start: int = 0) -> None:
        """Values of clients start .. start + len(values) - 1 (int [rows, dim]); each client that is
        still in the protocol masks its row and sends it. Rows of clients that dropped are unused."""
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != self.params.dim:
            raise ValueError(f"expected values [clients, {self.params.dim}], found {list(values.shape)}")
        if start < 0 or start + len(values) > self.params.num_clients:
            raise ValueError(f"rows {start}..{start + len(values) - 1} are outside the "
                             f"{self.params.num_clients} clients")
        for row, u in enumerate(range(start, start + len(values))):
            if u in self._expected:
                clock = time.perf_counter()
                message = self.clients[u].masked_input(self._forwarded.pop(u), values[row])
                self._client_time(clock)
                self._server(self.server.collect_masked_input, message)
                self._expected.discard(u)

    def finish(self) -> SecAggResult:
        if self._finished:
            raise RuntimeError("this secure sum has finished already")
        if self._expected:
            missing = sorted(self._expected)
            raise ValueError(f"the values of clients {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                             f"were never submitted")
        self._finished = True
        request = self._server(self.server.unmask_request)
        clock = time.perf_counter()
        answers = [self.clients[u].unmask(request) for u in request.survivors if u not in self.dropouts.unmasking]
        self._client_time(clock)
        total = self._server(self.server.collect_unmasking, answers)
        return SecAggResult(total, request.survivors, self.params, self.server.traffic,
                            self.client_seconds, self.server_seconds)


def secure_aggregate(values: np.ndarray, bitwidth: int, threshold: int | None = None,
                     dropouts: Dropouts | None = None, seed: int | None = None,
                     neighbours: int | None = None, observer: Observer | None = None) -> SecAggResult:
    """Run the protocol over the rows of `values` (int [clients, d]); see SecureSumSession."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be [clients, d], found shape {list(values.shape)}")
    session = SecureSumSession(len(values), values.shape[1], bitwidth, threshold=threshold, dropouts=dropouts,
                               seed=seed, neighbours=neighbours, observer=observer)
    session.submit(values)
    return session.finish()


def secure_sum(values: np.ndarray, bitwidth: int, threshold: int | None = None,
               dropouts: Dropouts | None = None, seed: int | None = None,
               neighbours: int | None = None, observer: Observer | None = None) -> np.ndarray:
    """The sum modulo 2^bitwidth (int64 [d], in [0, 2^bitwidth)) of the rows of `values` whose
    clients sent a masked input, computed by the secure aggregation protocol. Raises SecAggError
    when too many clients drop out for the server to unmask."""
    return secure_aggregate(values, bitwidth, threshold, dropouts, seed, neighbours, observer).sum


# ---- structs of stacked tensors <-> one matrix --------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    shape: tuple[int, ...]              # the member's shape (without the client axis)
    dtype: np.dtype


def flatten_clients(stacked: Any) -> tuple[np.ndarray, Any]:
    """A tensor [clients, ...] or a Struct of them -> (int64 [clients, D], layout): each leaf's
    member values flattened in row-major order, leaves concatenated in field order."""
    leaves: list[np.ndarray] = []

    def layout_of(v: Any) -> Any:
        if isinstance(v, Struct):
            return Struct((layout_of(x) for x in v.values), v.names)
        a = np.asarray(v)
        leaves.append(a)
        return Leaf(a.shape[1:], a.dtype)

    layout = layout_of(stacked)
    clients = leaves[0].shape[0] if leaves else 0
    columns = [a.reshape(clients, -1).astype(np.int64) for a in leaves]
    flat = np.concatenate(columns, axis=1) if columns else np.zeros((clients, 0), np.int64)
    return flat, layout


def unflatten(flat: np.ndarray, layout: Any) -> Any:
    """The inverse for one vector (the sum, int64 [D]): each leaf reshaped to its member shape,
    still int64 (cast to the member dtype after reducing mod 2^bitwidth)."""
    offset = 0

    def build(node: Any) -> Any:
        nonlocal offset
        if isinstance(node, Struct):
            return Struct((build(x) for x in node.values), node.names)
        size = int(np.prod(node.shape, dtype=np.int64))
        out = np.asarray(flat[offset:offset + size]).reshape(node.shape)
        offset += size
        return out

    out = build(layout)
    if offset != len(flat):
        raise ValueError(f"the layout holds {offset} values, the vector {len(flat)}")
    return out
