"""TensorFlow lowerings of the tensor-level primitives (fedlang.ir.primitives).

Each lowering computes what the primitive's NumPy `impl` computes, called the same
way (fedlang.backends.tensorflow.registry): tensors are tf.Tensors of the exact
dtype, weak literals Python numbers that take the other operand's dtype (NEP 50),
structs `Struct`s of TF values (leaf-wise exactly where the impl is leaf-wise).
Every lowering is pure TF on tensor values, so it traces into a tf.function, and
reads dimensions with tf.shape where the type may leave them unknown. The
structural, sequence and federated nodes belong to the lowering loop
(fedlang.backends.tensorflow.lower).

Where the result may differ from the reference interpreter:

  * floats: equal up to rounding (transcendental functions and the order of
    summation differ by ulps). float16 sums and means accumulate in float32,
    as NumPy's do (TF's own float16 sum overflows). TF flushes float32 and
    float64 subnormals to zero on CPU; NumPy keeps them. The counter-based random
    numbers are bit-identical to NumPy's before Box-Muller (uint32 murmur3).
  * runtime errors: where the impl raises FedlangRuntimeError (an index out of
    range in index, index_along, scatter_row, scatter_along or a label in
    sparse_softmax_cross_entropy; max, min, argmax, softmax over an empty axis),
    the graph holds a tf.debugging.Assert that raises
    tf.errors.InvalidArgumentError with a message saying the same (XLA drops
    asserts). Integer `**` with a negative exponent raises InvalidArgumentError
    from TF's own kernel; a weak integer literal out of its dtype's range raises
    FedlangRuntimeError while tracing.
  * float -> int casts of NaN or out-of-range values are platform-defined in
    both (on x86 both give the same bits).
  * strings: eq, ne, where, cast, zeros, ones, zeros_like, ones_like and the
    shape-only ops (reshape, index, broadcast_to, expand_dims, squeeze, ...)
    work on tf.string; unbroadcast, scatter_along and one_hot_like raise
    FedlangRuntimeError ("... is not supported on the TensorFlow backend") on
    strings.
  * a weak literal where the type rule makes it strong (broadcast_to,
    reshape, ...) becomes float32 or int32 as the type rule says; NumPy's impl
    would make it float64 or int64.
  * broadcast_leading takes a size from a tensor, a Struct, a Python list, or
    a sequence of the lowering loop (anything with `length` and `element(i)`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from fedlang.backends.tensorflow.registry import lowering
from fedlang.ir.primitives import PRIMITIVES, FedlangRuntimeError
from fedlang.ir.values import Struct, leafwise

_MASK32 = 0xFFFFFFFF


# ---- helpers -----------------------------------------------------------------------------------

def _weak(v) -> bool:
    return isinstance(v, (int, float))


def _tf_dtype(name: str) -> tf.DType:
    return tf.string if name == "string" else tf.as_dtype(name)


def _const(v, dtype: tf.DType) -> tf.Tensor:
    """A weak literal in `dtype`; NumPy raises on an integer its dtype cannot hold."""
    if dtype.is_integer and not dtype.min <= v <= dtype.max:
        raise FedlangRuntimeError(f"Python integer {v} is out of bounds for {dtype.name}")
    return tf.constant(v, dtype)


def _strong(v):
    """A weak literal as the type rules' `strong` makes it: float32, int32 (bool stays bool)."""
    if not _weak(v):
        return v
    return tf.constant(v, tf.bool if isinstance(v, bool) else tf.float32 if isinstance(v, float) else tf.int32)


def _unify(x, y):
    if _weak(x):
        return _const(x, y.dtype), y
    if _weak(y):
        return x, _const(y, x.dtype)
    return x, y


def _fold(name: str, *args):
    """Weak operands only: fold in Python through the impl, as the interpreter does. A bool
    (a comparison) is a strong tensor; a number stays a weak literal."""
    try:
        with np.errstate(all="ignore"):
            out = PRIMITIVES[name].impl(*args)
    except (ArithmeticError, ValueError) as error:
        raise FedlangRuntimeError(f"{name} failed: {error}") from None
    if isinstance(out, (bool, np.bool_)):
        return tf.constant(bool(out))
    return out.item() if isinstance(out, np.generic) else out


def _shape(v) -> tf.Tensor:
    return tf.shape(v) if not _weak(v) else tf.constant([], tf.int32)


def _rank(v) -> int:
    return 0 if _weak(v) else v.shape.rank


def _static_shape(shape) -> tf.Tensor:
    return tf.constant(shape, tf.int32, [len(shape)])


def _leaves(v) -> list:
    return [leaf for x in v.values for leaf in _leaves(x)] if isinstance(v, Struct) else [v]


def _checked(value, ok, *message):
    """`value`, once `ok` holds: where the impl raises FedlangRuntimeError."""
    with tf.control_dependencies([tf.debugging.Assert(ok, list(message), summarize=16)]):
        return tf.identity(value)


def _nonempty(x, axis, what: str):
    """`x`, once the reduced axis is known non-empty: NumPy's max has no identity."""
    dims = x.shape if axis is None else tf.TensorShape([x.shape[axis]])
    if dims.is_fully_defined() and dims.num_elements() > 0:
        return x
    size = tf.size(x) if axis is None else tf.shape(x)[axis]
    return _checked(x, size > 0, f"{what} over an empty axis (NumPy: zero-size array to reduction "
                                 "operation which has no identity)")


def _unsupported(what: str, dtype: tf.DType, bad=(tf.string,)) -> None:
    if dtype in bad:
        raise FedlangRuntimeError(f"{what} on {dtype.name} is not supported on the TensorFlow backend")


def _in_float32(reduce, x, *args):
    """A reduction of float16 accumulated in float32, as NumPy's pairwise sum does."""
    if x.dtype != tf.float16:
        return reduce(x, *args)
    return tf.cast(reduce(tf.cast(x, tf.float32), *args), tf.float16)


def _sum(x, axis=None, keepdims=False):
    if x.dtype == tf.bool:                    # NumPy adds bools with `or`
        return tf.reduce_any(x, axis, keepdims)
    return _in_float32(tf.reduce_sum, x, axis, keepdims)


# ---- elementwise: one table ---------------------------------------------------------------------

def _mod(x, y):
    """NumPy's `%`: floor mod (the divisor's sign); integer x % 0 is 0. TF fails on a zero
    divisor and on MIN % -1, so those divide by 1 (x % 1 == 0 too)."""
    if x.dtype.is_integer:
        trivial = tf.equal(y, 0) if x.dtype.is_unsigned else tf.equal(y, 0) | tf.equal(y, -1)
        y = tf.where(trivial, tf.ones_like(y), y)
    return tf.math.floormod(x, y)


def _sub(x, y):
    """uint8 in int32 (grappler turns 0 - x into a negation, which TF lacks for uint8)."""
    if x.dtype == tf.uint8:
        return tf.cast(tf.cast(x, tf.int32) - tf.cast(y, tf.int32), tf.uint8)
    return tf.subtract(x, y)


def _pow(x, y):
    """TF has no uint8 pow; int32 arithmetic wraps to the same low 8 bits."""
    if x.dtype == tf.uint8:
        return tf.cast(tf.pow(tf.cast(x, tf.int32), tf.cast(y, tf.int32)), tf.uint8)
    return tf.pow(x, y)


def _neg(x):
    """TF has no uint8 negation: int32 wraps to the same low bits."""
    return tf.cast(-tf.cast(x, tf.int32), tf.uint8) if x.dtype == tf.uint8 else tf.negative(x)


def _abs(x):
    return x if x.dtype.is_unsigned else tf.abs(x)


def _relu(x):
    return tf.maximum(x, tf.zeros([], x.dtype))   # NaN propagates, as with np.maximum


_BINARY = {
    "add": tf.math.add, "sub": _sub, "mul": tf.math.multiply, "div": tf.math.truediv,
    "mod": _mod, "pow": _pow, "eq": tf.math.equal, "ne": tf.math.not_equal, "lt": tf.math.less,
    "le": tf.math.less_equal, "gt": tf.math.greater, "ge": tf.math.greater_equal,
    "logical_and": tf.math.logical_and, "logical_or": tf.math.logical_or,
    "maximum": tf.math.maximum, "minimum": tf.math.minimum,
}
_UNARY = {
    "neg": _neg, "logical_not": tf.math.logical_not, "relu": _relu, "sigmoid": tf.math.sigmoid,
    "tanh": tf.math.tanh, "exp": tf.math.exp, "log": tf.math.log, "sqrt": tf.math.sqrt, "abs": _abs,
    "square": tf.math.square,
}


def _binary(name: str, fn):
    def lower(x, y):
        if _weak(x) and _weak(y):
            return _fold(name, x, y)
        return leafwise(lambda a, b: fn(*_unify(a, b)), x, y)
    return lower


def _unary(name: str, fn):
    def lower(x):
        return _fold(name, x) if _weak(x) else leafwise(fn, x)
    return lower


for _name, _fn in _BINARY.items():
    lowering(_name)(_binary(_name, _fn))
for _name, _fn in _UNARY.items():
    lowering(_name)(_unary(_name, _fn))


# ---- linear algebra, softmax, reductions --------------------------------------------------------

@lowering("matmul")
def _matmul(a, b):
    """np.matmul: a vector operand gets a unit axis, removed again; batch axes broadcast.
    TF has no small-integer matmul: int32 wraps to the same low bits."""
    if a.dtype in (tf.int8, tf.int16, tf.uint8):
        return tf.cast(_matmul(tf.cast(a, tf.int32), tf.cast(b, tf.int32)), a.dtype)
    ra, rb = a.shape.rank, b.shape.rank
    out = tf.linalg.matmul(a[None, :] if ra == 1 else a, b[:, None] if rb == 1 else b)
    if ra == 1:
        out = tf.squeeze(out, -2)
    return tf.squeeze(out, -1) if rb == 1 else out


@lowering("softmax")
def _softmax(x, axis=-1):
    return tf.nn.softmax(_nonempty(x, axis, "softmax"), axis)


@lowering("log_softmax")
def _log_softmax(x, axis=-1):
    return tf.nn.log_softmax(_nonempty(x, axis, "log_softmax"), axis)


@lowering("sparse_softmax_cross_entropy")
def _sparse_xent(labels, logits):
    """-log_softmax(logits)[label]; a label in [-n, 0) counts from the end, as in
    np.take_along_axis (TF's fused op rejects it)."""
    labels = _strong(labels)
    logp = tf.nn.log_softmax(_nonempty(logits, -1, "sparse_softmax_cross_entropy"))
    n = tf.shape(logits, out_type=tf.int64)[-1]
    k = tf.cast(labels, tf.int64)
    k = _checked(k, tf.reduce_all((k >= -n) & (k < n)),
                 "sparse_softmax_cross_entropy: a label is out of range for", n, "classes")
    k = tf.where(k < 0, k + n, k)
    return -tf.gather(logp, k[..., None], batch_dims=labels.shape.rank, axis=-1)[..., 0]


@lowering("sum")
def _sum_lowering(x, axis=None):
    return _sum(x, axis)


@lowering("mean")
def _mean(x, axis=None):
    return _in_float32(tf.reduce_mean, x, axis)


@lowering("max")
def _max(x, axis=None):
    return tf.reduce_max(_nonempty(x, axis, "max"), axis)


@lowering("min")
def _min(x, axis=None):
    return tf.reduce_min(_nonempty(x, axis, "min"), axis)


@lowering("argmax")
def _argmax(x, axis):
    """The first index of the maximum, or of the first NaN (NumPy's rule; tf.argmax skips
    NaNs and does not promise the first of ties)."""
    x = _nonempty(x, axis, "argmax")
    axis %= x.shape.rank
    best = tf.reduce_max(x, axis, keepdims=True)            # NaN if the row has one
    hit = tf.equal(x, best)
    if x.dtype.is_floating:
        hit |= tf.math.is_nan(x)
    n = tf.shape(x)[axis]
    positions = tf.reshape(tf.range(n), [-1] + [1] * (x.shape.rank - axis - 1))
    return tf.reduce_min(tf.where(hit, positions, n), axis)


@lowering("global_norm")
def _global_norm(x):
    """sqrt of the leaves' sums of squares, each in the leaves' dtype (as the impl)."""
    return tf.sqrt(sum(_sum(tf.square(leaf)) for leaf in _leaves(x)))


# ---- shapes, dtypes, fills ----------------------------------------------------------------------

def _one_hot(i, depth, dtype):
    """(i[..., None] == range(depth)) in `dtype`, as the impl: an index out of range is a zero row."""
    _unsupported("one_hot_like", dtype)
    hit = tf.equal(tf.cast(i, tf.int64)[..., None], tf.range(tf.cast(depth, tf.int64)))
    return tf.cast(hit, dtype)


@lowering("one_hot")
def _one_hot_lowering(i, depth):
    return _one_hot(i, depth, tf.float32)


@lowering("one_hot_like")
def _one_hot_like(i, like):
    return _one_hot(i, tf.shape(like)[-1], like.dtype)


@lowering("cast")
def _cast(x, dtype):
    return leafwise(lambda a: tf.cast(_strong(a), _tf_dtype(dtype)), x)


@lowering("reshape")
def _reshape(x, shape):
    return tf.reshape(_strong(x), list(shape))


def _like(string_value, tf_like):
    """zeros_like / ones_like, leaf-wise; strings get NumPy's '' and '1'."""
    def on(a):
        a = _strong(a)
        return tf.fill(tf.shape(a), string_value) if a.dtype == tf.string else tf_like(a)
    return lambda x: leafwise(on, x)


lowering("zeros_like")(_like("", tf.zeros_like))
lowering("ones_like")(_like("1", tf.ones_like))


def _filled(string_value, tf_fill):
    """zeros / ones of a static shape; strings are np.full's '0' and '1'."""
    def lower(shape, dtype="float32"):
        dims = _static_shape(shape)
        return tf.fill(dims, string_value) if dtype == "string" else tf_fill(dims, _tf_dtype(dtype))
    return lower


lowering("zeros")(_filled("0", tf.zeros))
lowering("ones")(_filled("1", tf.ones))


@lowering("where")
def _where(c, a, b):
    """np.where; two literals give float32 if either is a float, else int32."""
    if _weak(a) and _weak(b):
        dtype = tf.float32 if isinstance(a, float) or isinstance(b, float) else tf.int32
        a, b = _const(a, dtype), _const(b, dtype)
    else:
        a, b = _unify(a, b)
    return tf.where(c, a, b)


@lowering("clip")
def _clip(x, lo, hi):
    """np.clip is minimum(maximum(x, lo), hi) (so hi wins when lo > hi), leaf-wise on x."""
    def on(a):
        if _weak(a):                      # a literal takes the dtype of a tensor bound
            strong = next((v for v in (lo, hi) if not _weak(v)), None)
            if strong is None:
                return min(max(a, lo), hi)
            a = _const(a, strong.dtype)
        a, low = _unify(a, lo)
        a, high = _unify(a, hi)
        return tf.minimum(tf.maximum(a, low), high)
    return leafwise(on, x)


@lowering("size")
def _size(x):
    return tf.size(_strong(x), out_type=tf.int32)


@lowering("shape_size")
def _shape_size(x, start=0, stop=None):
    return tf.reduce_prod(_shape(x)[start:stop])


@lowering("index")
def _index(x, i):
    n = tf.shape(x, out_type=tf.int64)[0]
    k = tf.cast(i, tf.int64)
    k = _checked(k, (k >= 0) & (k < n), "index", k, "is out of range for a first axis of size", n)
    return tf.gather(x, k, axis=0)


@lowering("broadcast_to")
def _broadcast_to(x, like):
    return tf.broadcast_to(_strong(x), _shape(like))


@lowering("unbroadcast")
def _unbroadcast(x, like):
    """Sum `x` down to like's shape: its extra leading axes, then every axis where like has
    size 1 (found at run time: the dimension may be unknown while tracing)."""
    x = _strong(x)
    _unsupported("unbroadcast", x.dtype)
    shape = _shape(like)
    extra = x.shape.rank - _rank(like)
    if extra > 0:
        x = _sum(x, list(range(extra)))
    x = _sum(x, tf.reshape(tf.where(tf.equal(shape, 1)), [-1]), keepdims=True)
    return tf.broadcast_to(x, shape)


@lowering("reshape_like")
def _reshape_like(x, like):
    return tf.reshape(_strong(x), _shape(like))


@lowering("expand_dims")
def _expand_dims(x, axis):
    return tf.expand_dims(_strong(x), axis)


@lowering("matrix_transpose")
def _matrix_transpose(x):
    return tf.linalg.matrix_transpose(x)


@lowering("squeeze")
def _squeeze(x, axis):
    return tf.squeeze(x, [axis])


@lowering("scatter_row")
def _scatter_row(x, like, i):
    """Zeros shaped like `like` with row i = x; i in [-n, 0) counts from the end (NumPy)."""
    x = _strong(x)
    shape = _shape(like)
    n = tf.cast(shape[0], tf.int64)
    k = tf.cast(i, tf.int64)
    k = _checked(k, (k >= -n) & (k < n), "scatter_row: index", k, "is out of range for a first axis of size", n)
    k = tf.where(k < 0, k + n, k)
    rows = tf.reshape(tf.equal(tf.range(n), k), [-1] + [1] * (_rank(like) - 1))
    return tf.where(rows, x, tf.zeros(shape, x.dtype))


@lowering("broadcast_leading")
def _broadcast_leading(x, like, axis=0, like_axis=0):
    x = _strong(x)
    size = tf.shape(_first_leaf(like))[like_axis]
    shape = tf.shape(x)
    return tf.broadcast_to(tf.expand_dims(x, axis), tf.concat([shape[:axis], [size], shape[axis:]], 0))


_EMPTY_SEQUENCE = ("cannot tell the number of clients from an empty sequence "
                   "(vectorize with ragged=True: per-client lengths carry it)")


def _first_leaf(value):
    """The first tensor of a value: itself, a struct's first leaf, a sequence's first element's."""
    if isinstance(value, Struct):
        return _first_leaf(value.values[0])
    if isinstance(value, (list, tuple)):
        if not value:
            raise FedlangRuntimeError(_EMPTY_SEQUENCE)
        return _first_leaf(value[0])
    if hasattr(value, "element"):             # a sequence of the lowering loop (TFSeq)
        return _checked(_first_leaf(value.element(0)), value.length > 0, _EMPTY_SEQUENCE)
    return value


@lowering("reshape_keep")
def _reshape_keep(x, shape, keep):
    """The first `keep` axes stay; a -1 in `shape` is size // (the other sizes), 0 if they are 0."""
    x = _strong(x)
    lead, rest = tf.shape(x)[:keep], tf.shape(x)[keep:]
    if -1 in shape:
        fixed = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        inferred = tf.reduce_prod(rest) // fixed if fixed else tf.constant(0)
        dims = tf.stack([inferred if d == -1 else tf.constant(d) for d in shape])
    else:
        dims = _static_shape(shape)
    return tf.reshape(x, tf.concat([lead, dims], 0))


# ---- gathers and scatters along an axis ---------------------------------------------------------

def _along(shape, i, keep: int, what: str):
    """i, checked, broadcast to the batch shape: shape[:keep] with i's shape (right-aligned)."""
    n = tf.cast(shape[keep], tf.int64)
    k = tf.cast(i, tf.int64)
    k = _checked(k, tf.reduce_all((k >= 0) & (k < n)),
                 f"{what}: an index is out of range for a first axis of size", n)
    batch = tf.broadcast_dynamic_shape(shape[:keep], tf.shape(k))
    return tf.broadcast_to(k, batch), batch


@lowering("index_along")
def _index_along(x, i, keep):
    """x[b.., i[b..]]: x broadcast to the batch, then a batched gather (gather_nd fails on
    empty rows)."""
    shape = tf.shape(x)
    k, batch = _along(shape, i, keep, "index_along")
    x = tf.broadcast_to(x, tf.concat([batch, shape[keep:]], 0))
    return tf.gather(x, k, batch_dims=k.shape.rank, axis=k.shape.rank)


@lowering("scatter_along")
def _scatter_along(x, like, i, keep):
    """Zeros shaped like `like`, x's rows added at the picked rows (repeats add up): x put at
    its row of a one-hot axis, then summed down to like's shape (TF's scatter_nd fails on
    empty tensors)."""
    _unsupported("scatter_along", x.dtype)
    shape = tf.shape(like)
    k, batch = _along(shape, i, keep, "scatter_along")
    rest = like.shape.rank - keep - 1
    hit = tf.equal(k[..., None], tf.range(tf.cast(shape[keep], tf.int64)))
    hit = tf.reshape(hit, tf.concat([tf.shape(hit), tf.ones([rest], tf.int32)], 0))
    rows = tf.expand_dims(tf.broadcast_to(x, tf.concat([batch, shape[keep + 1:]], 0)), k.shape.rank)
    return _unbroadcast(tf.where(hit, rows, tf.zeros([], x.dtype)), like)


# ---- counter-based random numbers (bit-identical to NumPy's counter_uniform) ------------------

def _u32(v: int) -> tf.Tensor:
    return tf.constant(v & _MASK32, tf.uint32)


def _hash32(x):
    """murmur3's finalizer in uint32 arithmetic (wrapping), as primitives._hash32."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(0x85EBCA6B)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(13)))
    x = x * _u32(0xC2B2AE35)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def _uniform(seed, shape, stream: int, salt: int | None = None):
    """counter_uniform(shape, s, stream) for every seed s of `seed` (its shape in front); with
    `salt` k the seed is s * 1000003 + k. Seeds enter modulo 2**32."""
    s = _u32(int(seed)) if _weak(seed) else tf.cast(seed, tf.uint32)
    if salt is not None:
        s = s * _u32(1000003) + _u32(salt)
    key = _hash32(s * _u32(0x9E3779B1) + _u32(stream * 0x632BE5AB))
    counters = tf.cast(tf.range(tf.reduce_prod(tf.cast(shape, tf.int64))), tf.uint32)
    bits = _hash32(counters + key[..., None])
    u = tf.cast(tf.bitwise.right_shift(bits, _u32(8)), tf.float32) * tf.constant(2.0 ** -24, tf.float32)
    return tf.reshape(u, tf.concat([tf.shape(s), tf.cast(shape, tf.int32)], 0))


def _normal(seed, shape, salt: int | None = None):
    """Box-Muller over streams 1 and 2, in float32 (counter_normal)."""
    u1, u2 = _uniform(seed, shape, 1, salt), _uniform(seed, shape, 2, salt)
    radius = tf.sqrt(tf.constant(-2.0, tf.float32) * tf.math.log(tf.constant(1.0, tf.float32) - u1))
    return radius * tf.cos(tf.constant(2.0 * np.pi, tf.float32) * u2)


def _f32(v):
    return tf.constant(v, tf.float32) if _weak(v) else tf.cast(v, tf.float32)


@lowering("random_normal")
def _random_normal(shape, stddev, seed):
    return _normal(seed, _static_shape(shape)) * _f32(stddev)


@lowering("random_uniform")
def _random_uniform(shape, lo, hi, seed):
    lo, hi = _f32(lo), _f32(hi)
    return lo + (hi - lo) * _uniform(seed, _static_shape(shape), 0)


@lowering("random_normal_like")
def _random_normal_like(x, stddev, seed):
    """Leaf k (depth first) draws with seed `seed * 1000003 + k`."""
    counter = iter(range(10 ** 9))
    return leafwise(lambda a: tf.cast(_normal(seed, tf.shape(a), next(counter)) * _f32(stddev), a.dtype), x)


@lowering("counter_noise")
def _counter_noise(seed, like, kind, salt=None, keep=0):
    shape = _shape(like)[keep:]
    if kind == "uniform":
        return _uniform(seed, shape, 0, salt)
    return _normal(seed, shape, salt)
