"""The TensorFlow lowerings (fedlang.backends.tensorflow.ops) compute what the NumPy impls do.

Every lowered primitive has a case: a Hypothesis strategy for valid inputs (read off
its type rule). The lowering runs inside a tf.function on the inputs as tensors --
traced with their static shapes, or with every dimension None -- and must give the
impl's result: the same dtype and shape, equal values (floats to rounding), leaf-wise
through structs, with weak Python-number operands. Counter-based uniform numbers are
bit-identical.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")

import fedlang.backends.tensorflow.ops as ops  # noqa: E402
from fedlang.ir.primitives import PRIMITIVES, FedlangRuntimeError, counter_uniform  # noqa: E402
from fedlang.ir.values import Struct  # noqa: E402

try:                                      # the vectorizer's internal primitives, where present
    import fedlang.backends.tensorflow.ops_internal  # noqa: F401
except ImportError:
    pass

NOT_OPS = {"param", "capture", "global", "closure", "const", "struct", "select", "call", "cond", "reduce", "map",
           "scan", "count", "num_examples", "zip_seq", "grad", "value_and_grad"}
INTS = ["int8", "int16", "int32", "int64", "uint8"]
FLOATS = ["float16", "float32", "float64"]
NUMS = INTS + FLOATS
ALL = NUMS + ["bool", "string"]
TENSOR_PRIMITIVES = sorted(n for n in PRIMITIVES if n not in NOT_OPS and not n.startswith("federated_"))
TOLERANCE = {"float16": (1e-2, 1e-3), "float32": (1e-5, 1e-6), "float64": (1e-10, 1e-12)}


def test_every_tensor_primitive_is_lowered():
    assert [name for name in TENSOR_PRIMITIVES if PRIMITIVES[name].lowering is None] == []


def test_lowerings_take_the_parameters_by_their_names():
    """The lowering loop passes inputs by parameter name when the node has them."""
    for name in CASES:
        params = inspect.signature(PRIMITIVES[name].lowering).parameters
        assert [p.name for p in PRIMITIVES[name].params] == list(params)[:len(PRIMITIVES[name].params)], name


def test_every_lowering_of_this_module_has_a_case():
    import fedlang.backends.tensorflow.ops_internal as internal
    modules = (ops.__name__, internal.__name__)
    mine = {name for name, p in PRIMITIVES.items() if getattr(p.lowering, "__module__", None) in modules}
    assert mine == set(CASES)


# ---- running a lowering in a tf.function ----------------------------------------------------------

def _flatten(value, leaves: list):
    """A hashable skeleton of `value`: arrays numbered in `leaves`, weak numbers kept."""
    if isinstance(value, Struct):
        return ("struct", value.names, tuple(_flatten(v, leaves) for v in value.values))
    if isinstance(value, list):
        return ("list", tuple(_flatten(v, leaves) for v in value))
    if isinstance(value, np.ndarray):
        leaves.append(value)
        return ("leaf", len(leaves) - 1)
    return ("weak", type(value).__name__, value)


def _build(skeleton, leaves):
    kind = skeleton[0]
    if kind == "struct":
        return Struct((_build(s, leaves) for s in skeleton[2]), skeleton[1])
    if kind == "list":
        return [_build(s, leaves) for s in skeleton[1]]
    return leaves[skeleton[1]] if kind == "leaf" else skeleton[2]


def _tf_dtype(a: np.ndarray):
    return tf.string if a.dtype.kind == "U" else tf.as_dtype(a.dtype)


def _to_numpy(t) -> np.ndarray:
    value = np.asarray(t.numpy())
    if t.dtype == tf.string:
        return np.vectorize(lambda b: b.decode(), otypes=[str])(value) if value.size else value.astype(str)
    return value


_TRACED: dict = {}


def lowered(name: str, args: tuple, attrs: dict, dynamic: bool):
    """Run the lowering of `name` in a tf.function on `args` (arrays become its tensor
    arguments: static shapes, or all dimensions None when `dynamic`). Traced once per signature."""
    leaves: list = []
    skeleton = tuple(_flatten(a, leaves) for a in args)
    key = (name, tuple(sorted(attrs.items())), skeleton, dynamic,
           tuple((a.dtype.str, a.ndim if dynamic else a.shape) for a in leaves))
    if key not in _TRACED:
        result: dict = {}

        def run(*tensors):
            names = [p.name for p in PRIMITIVES[name].params if p.kind == "value"]
            value = PRIMITIVES[name].lowering(**dict(zip(names, (_build(s, tensors) for s in skeleton))), **attrs)
            out: list = []
            result["skeleton"] = _flatten_out(value, out)
            return out

        specs = [tf.TensorSpec([None] * a.ndim if dynamic else a.shape, _tf_dtype(a)) for a in leaves]
        _TRACED[key] = tf.function(run, input_signature=specs, autograph=False), result
    fn, result = _TRACED[key]
    outs = fn(*[tf.constant(a) for a in leaves])
    return _build(result["skeleton"], [_to_numpy(o) for o in outs])


def _flatten_out(value, out: list):
    if isinstance(value, Struct):
        return ("struct", value.names, tuple(_flatten_out(v, out) for v in value.values))
    assert isinstance(value, tf.Tensor), f"a lowering returned {type(value).__name__}"
    out.append(value)
    return ("leaf", len(out) - 1)


def reference(name: str, args: tuple, attrs: dict):
    names = [p.name for p in PRIMITIVES[name].params if p.kind == "value"]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # the mean of nothing is NaN
        return PRIMITIVES[name].impl(**dict(zip(names, args)), **attrs)


def assert_matches(got, want, floats: str = "dtype"):
    """Same structure, shapes, dtypes and values; floats to the rounding of their dtype
    (`floats="float32"`: of float32, where a wider result is computed in float32) or exactly."""
    if isinstance(want, Struct):
        assert isinstance(got, Struct) and got.names == want.names
        for g, w in zip(got.values, want.values):
            assert_matches(g, w, floats)
        return
    want = np.asarray(want)
    assert got.shape == want.shape
    if want.dtype.kind == "U":
        np.testing.assert_array_equal(got.astype(str), want)
        return
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype.kind == "f" and floats != "exact":
        rtol, atol = TOLERANCE["float32" if floats == "float32" else want.dtype.name]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, want)


CASES: dict = {}


def case(*names, floats="dtype"):
    """Register a strategy of (args, attrs) for the primitives `names` (called with the name);
    `floats` says how results compare (assert_matches)."""
    def register(strategy):
        for name in names:
            CASES[name] = (strategy, floats)
        return strategy
    return register


@pytest.mark.parametrize("name", TENSOR_PRIMITIVES)
@settings(max_examples=max(10, settings.default.max_examples // 2))     # a trace per example is slow
@given(data=st.data())
def test_lowering_matches_numpy(name, data):
    if name not in CASES:
        pytest.skip(f"{name} is lowered elsewhere")
    strategy, floats = CASES[name]
    args, attrs = data.draw(strategy(name), label="case")
    dynamic = data.draw(st.booleans(), label="dynamic")
    assert_matches(lowered(name, args, attrs, dynamic), reference(name, args, attrs), floats)


# ---- strategies ---------------------------------------------------------------------------------

_SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf])


def elements(dtype: str, kind: str = "any"):
    """Values of `dtype`: floats in [-8, 8] ("any" adds NaN and infinities; "dyadic": quarters in
    [-4, 4], so that sums are exact in any order; "small": a few, for ties), integers over the
    whole range ("small", "dyadic": [-8, 8])."""
    if dtype == "bool":
        return st.booleans()
    if dtype == "string":
        return st.text("ab", max_size=2)
    if dtype in FLOATS:
        if kind == "dyadic":
            return st.integers(-16, 16).map(lambda k: k / 4)
        if kind == "small":
            return st.sampled_from([-1.0, -0.0, 0.0, 1.0, 2.0, math.nan])
        finite = st.floats(-8, 8, width=int(dtype[5:]), allow_subnormal=False)
        return finite if kind == "finite" else st.one_of(finite, finite, finite, _SPECIAL)
    info = np.iinfo(dtype)
    if kind in ("small", "dyadic"):
        return st.integers(max(info.min, -8), min(info.max, 8))
    return st.integers(int(info.min), int(info.max))


def array(draw, dtype: str, shape, kind: str = "any") -> np.ndarray:
    np_dtype = np.dtype("<U2") if dtype == "string" else np.dtype(dtype)
    return draw(hnp.arrays(np_dtype, tuple(shape), elements=elements(dtype, kind)))


def shapes(min_dims=0, max_dims=3):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=4)


def pair_shapes(draw, max_dims=3):
    return draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=max_dims, min_side=0, max_side=4)).input_shapes


def weak(draw, dtype: str, values=None):
    """A weak literal that fits `dtype` (an int, or for floats an int or a float)."""
    if values is not None:
        return draw(values)
    if dtype in FLOATS:
        return draw(st.one_of(st.integers(-8, 8), st.floats(-8, 8, allow_subnormal=False)))
    info = np.iinfo(dtype)
    return draw(st.integers(int(info.min), int(info.max)))


BINARY = {"add": NUMS, "sub": NUMS, "mul": NUMS, "div": FLOATS, "mod": NUMS, "pow": NUMS, "maximum": NUMS,
          "minimum": NUMS, "eq": ALL, "ne": ALL, "lt": NUMS, "le": NUMS, "gt": NUMS, "ge": NUMS,
          "logical_and": ["bool"], "logical_or": ["bool"]}
COMPARISONS = {"eq", "ne", "lt", "le", "gt", "ge"}


@case(*BINARY)
@st.composite
def binary_case(draw, name):
    """Tensor pairs that broadcast, a weak literal on either side, structs with structs
    (leaf by leaf) or with a tensor or literal."""
    dtype = draw(st.sampled_from(BINARY[name]))
    numeric = dtype in NUMS
    int_power = name == "pow" and dtype in INTS
    y_values = st.integers(0, 6) if int_power else None        # NumPy rejects negative integer powers

    def operands(shape_x, shape_y):
        x = array(draw, dtype, shape_x)
        y = array(draw, dtype, shape_y) if y_values is None else \
            draw(hnp.arrays(np.dtype(dtype), shape_y, elements=y_values))
        return x, y

    forms = ["tensors"] + (["weak_x", "weak_y"] if numeric else []) + \
        ([] if name in COMPARISONS else ["structs", "struct_tensor"])
    form = draw(st.sampled_from(forms))
    x, y = operands(*pair_shapes(draw))
    if form == "weak_x":
        x = weak(draw, dtype)
    elif form == "weak_y":
        y = weak(draw, dtype, y_values)
    elif form == "structs":
        x2, y2 = operands(*pair_shapes(draw))
        x, y = Struct((x, x2), ("a", None)), Struct((y, y2), ("a", None))
    elif form == "struct_tensor":
        x2, _ = operands(draw(shapes()), ())
        other = weak(draw, dtype, y_values) if numeric and draw(st.booleans()) else operands((), ())[1]
        x = Struct((x, x2), ("a", "b"))
        x, y = (x, other) if draw(st.booleans()) or int_power else (other, x)
    return (x, y), {}


UNARY = {"neg": NUMS, "abs": NUMS, "square": NUMS, "relu": NUMS, "sigmoid": FLOATS, "tanh": FLOATS,
         "exp": FLOATS, "log": FLOATS, "sqrt": FLOATS, "logical_not": ["bool"]}


@case(*UNARY)
@st.composite
def unary_case(draw, name):
    dtype = draw(st.sampled_from(UNARY[name]))
    x = array(draw, dtype, draw(shapes()))
    if draw(st.booleans()):
        x = Struct((x, array(draw, dtype, draw(shapes()))), ("w", "b"))
    return (x,), {}


@given(st.data())
def test_weak_literals_fold_in_python(data):
    """Only weak operands: the impl's Python fold (a comparison gives a bool tensor)."""
    numeric = set(BINARY) - {"logical_and", "logical_or"} | set(UNARY) - {"logical_not"}
    name = data.draw(st.sampled_from(sorted(numeric)))
    numbers = st.one_of(st.integers(-8, 8), st.floats(-8, 8, allow_subnormal=False))
    args = tuple(data.draw(numbers) for _ in range(1 if name in UNARY else 2))
    if name == "div" and all(isinstance(a, int) for a in args):
        args = (float(args[0]),) + args[1:]
    try:
        want = reference(name, args, {})
    except (ArithmeticError, ValueError):
        with pytest.raises(FedlangRuntimeError):
            PRIMITIVES[name].lowering(*args)
        return
    got = PRIMITIVES[name].lowering(*args)
    if isinstance(want, (bool, np.bool_)):
        assert isinstance(got, tf.Tensor) and got.dtype == tf.bool and bool(got) == bool(want)
    else:
        want = want.item() if isinstance(want, np.generic) else want
        assert type(got) is type(want) and (got == want or (math.isnan(got) and math.isnan(want)))


@case("matmul", floats="exact")
@st.composite
def matmul_case(draw, name):
    """Shapes as np.matmul's signature allows (vectors, broadcast batch axes); quarter
    floats and small integers keep the result exact whatever the order of summation."""
    dtype = draw(st.sampled_from(NUMS))
    shape_a, shape_b = draw(hnp.mutually_broadcastable_shapes(signature=np.matmul.signature, max_dims=3,
                                                              min_side=0, max_side=4)).input_shapes
    return (array(draw, dtype, shape_a, "dyadic"), array(draw, dtype, shape_b, "dyadic")), {}


def axis_of(draw, rank: int, optional: bool):
    """An axis (negative too) of a tensor of `rank`, or None when `optional`."""
    choices = st.integers(-rank, rank - 1) if rank else st.nothing()
    return draw(st.one_of(st.none(), choices) if optional else choices)


def nonempty_along(shape, axis) -> tuple:
    """`shape` with the reduced axis (every axis for None) of size 1 or more."""
    shape = list(shape)
    for i in range(len(shape)) if axis is None else [axis]:
        shape[i] = max(shape[i], 1)
    return tuple(shape)


@case("sum", "mean", "max", "min", "argmax")
@st.composite
def reduction_case(draw, name):
    """sum and mean of quarters (exact in any order); max, min and argmax with NaN,
    infinities and ties, over a non-empty axis (NumPy raises on an empty one)."""
    dtype = draw(st.sampled_from(FLOATS if name == "mean" else NUMS))
    shape = draw(shapes(min_dims=1 if name == "argmax" else 0))
    axis = axis_of(draw, len(shape), optional=name != "argmax")
    kind = "dyadic" if name in ("sum", "mean") else draw(st.sampled_from(["any", "small"]))
    if name in ("max", "min", "argmax"):
        shape = nonempty_along(shape, axis)
    attrs = {"axis": axis} if axis is not None or draw(st.booleans()) else {}
    return (array(draw, dtype, shape, kind),), attrs


@case("row_mask", floats="exact")
@st.composite
def row_mask_case(draw, name):
    """The vectorizer's mask of padded rows (lowered in ops_internal.py): counts over the
    first k axes of `like`, the padded axis after them."""
    import fedlang.backends.tensorflow.ops_internal  # noqa: F401  (registers the lowering)
    shape = draw(st.lists(st.integers(0, 4), min_size=2, max_size=4).map(tuple))
    k = draw(st.integers(1, len(shape) - 1))
    axis = draw(st.integers(k, len(shape) - 1))
    counts = np.asarray(draw(hnp.arrays(np.int32, shape[:k], elements=st.integers(0, shape[axis] + 1))))
    return (counts, np.zeros(shape, np.float32)), {"axis": axis}


@case("softmax", "log_softmax")
@st.composite
def softmax_case(draw, name):
    shape = draw(shapes(min_dims=1))
    axis = axis_of(draw, len(shape), optional=False)
    attrs = {"axis": axis} if axis != -1 or draw(st.booleans()) else {}
    return (array(draw, draw(st.sampled_from(FLOATS)), nonempty_along(shape, axis), "finite"),), attrs


@case("sparse_softmax_cross_entropy")
@st.composite
def xent_case(draw, name):
    """Labels in [-n, n): a negative label counts from the end, as in np.take_along_axis."""
    label_dtype = draw(st.sampled_from(INTS))
    lead = draw(shapes(max_dims=2))
    n = draw(st.integers(1, 4))
    low = 0 if label_dtype == "uint8" else -n
    labels = draw(hnp.arrays(np.dtype(label_dtype), lead, elements=st.integers(low, n - 1)))
    return (labels, array(draw, draw(st.sampled_from(FLOATS)), lead + (n,), "finite")), {}


@case("one_hot")
@st.composite
def one_hot_case(draw, name):
    dtype = draw(st.sampled_from(INTS))
    depth = draw(st.integers(1, 5))
    low = 0 if dtype == "uint8" else -2
    i = draw(hnp.arrays(np.dtype(dtype), draw(shapes(max_dims=2)), elements=st.integers(low, depth + 1)))
    return (i,), {"depth": depth}


@case("one_hot_like")
@st.composite
def one_hot_like_case(draw, name):
    (i,), attrs = draw(one_hot_case(name))
    like = np.zeros(i.shape + (attrs["depth"],), draw(st.sampled_from(NUMS + ["bool"])))
    return (i, like), {}


CAST_SAFE = {"int8": (-100, 100), "int16": (-100, 100), "int32": (-100, 100), "int64": (-100, 100),
             "uint8": (0, 200)}


@case("cast")
@st.composite
def cast_case(draw, name):
    """Every pair of dtypes (strings only to strings); floats cast to integers stay in range
    (NaN and overflow are platform-defined in both)."""
    source = draw(st.sampled_from(ALL))
    target = "string" if source == "string" else draw(st.sampled_from(NUMS + ["bool"]))
    shape = draw(shapes())
    if source in FLOATS and target in INTS:
        low, high = CAST_SAFE[target]
        x = draw(hnp.arrays(np.dtype(source), shape,
                            elements=st.floats(low, high, width=int(source[5:]), allow_subnormal=False)))
    else:
        x = array(draw, source, shape)
    if draw(st.booleans()):
        x = Struct((x, array(draw, source, draw(shapes())) if source not in FLOATS or target not in INTS
                    else x), ("x", None))
    return (x,), {"dtype": target}


@case("zeros_like", "ones_like")
@st.composite
def like_case(draw, name):
    dtype = draw(st.sampled_from(ALL))
    x = array(draw, dtype, draw(shapes()))
    if draw(st.booleans()):
        x = Struct((x, array(draw, draw(st.sampled_from(ALL)), draw(shapes()))), ("a", "b"))
    return (x,), {}


@case("zeros", "ones")
@st.composite
def filled_case(draw, name):
    attrs = {"shape": draw(shapes())}
    if draw(st.booleans()):
        attrs["dtype"] = draw(st.sampled_from(ALL))
    return (), attrs


@case("where")
@st.composite
def where_case(draw, name):
    """a and b of one dtype (strings too), a weak literal on either side or both."""
    dtype = draw(st.sampled_from(ALL))
    c_shape, a_shape, b_shape = draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, min_side=0,
                                                                       max_side=4)).input_shapes
    c = array(draw, "bool", c_shape)
    a, b = array(draw, dtype, a_shape), array(draw, dtype, b_shape)
    if dtype in NUMS:
        form = draw(st.sampled_from(["tensors", "weak_a", "weak_b", "weak_both"]))
        if form in ("weak_a", "weak_both"):
            a = weak(draw, dtype if form == "weak_a" else "float32")
        if form in ("weak_b", "weak_both"):
            b = weak(draw, dtype if form == "weak_b" else "float32")
    return (c, a, b), {}


@case("clip")
@st.composite
def clip_case(draw, name):
    """Scalar bounds (tensors or literals, lo > hi too), leaf-wise over a struct x."""
    dtype = draw(st.sampled_from(NUMS))
    x = array(draw, dtype, draw(shapes()))
    if draw(st.booleans()):
        x = Struct((x, array(draw, dtype, draw(shapes()))), ("a", "b"))
    lo, hi = (weak(draw, dtype) if draw(st.booleans()) else array(draw, dtype, ()) for _ in range(2))
    return (x, lo, hi), {}


@case("global_norm")
@st.composite
def global_norm_case(draw, name):
    dtype = draw(st.sampled_from(FLOATS))
    leaves = [array(draw, dtype, draw(shapes()), "dyadic") for _ in range(draw(st.integers(1, 3)))]
    return (Struct(leaves) if len(leaves) > 1 or draw(st.booleans()) else leaves[0],), {}


@case("size")
@st.composite
def size_case(draw, name):
    return (array(draw, draw(st.sampled_from(ALL)), draw(shapes())),), {}


@case("shape_size")
@st.composite
def shape_size_case(draw, name):
    shape = draw(shapes())
    start = draw(st.integers(0, len(shape)))
    stop = draw(st.one_of(st.none(), st.integers(start, len(shape))))
    return (np.zeros(shape, np.float32),), {"start": start, "stop": stop}


@case("reshape")
@st.composite
def reshape_case(draw, name):
    x = array(draw, draw(st.sampled_from(ALL)), draw(shapes()))
    return (x,), {"shape": draw(same_size(x.shape))}


def same_size(shape, infer: bool = True):
    """Shapes of as many elements as `shape` (with `infer`, maybe one -1 where the size is non-zero)."""
    size = int(np.prod(shape, dtype=np.int64))
    options = [tuple(reversed(shape)), (size,), (1, size), tuple(shape) + (1,)]
    return st.sampled_from(options + ([(-1,), (-1, 1), (1, -1)] if infer and size else []))


@case("reshape_keep")
@st.composite
def reshape_keep_case(draw, name):
    x = array(draw, draw(st.sampled_from(NUMS)), draw(shapes()))
    keep = draw(st.integers(0, x.ndim))
    return (x,), {"shape": draw(same_size(x.shape[keep:])), "keep": keep}


@case("reshape_like")
@st.composite
def reshape_like_case(draw, name):
    x = array(draw, draw(st.sampled_from(ALL)), draw(shapes()))
    return (x, np.zeros(draw(same_size(x.shape, infer=False)), np.float32)), {}


@case("broadcast_to")
@st.composite
def broadcast_to_case(draw, name):
    """x: a suffix of like's shape, some of its dimensions 1."""
    target = draw(shapes())
    suffix = target[len(target) - draw(st.integers(0, len(target))):]
    shape = tuple(1 if draw(st.booleans()) else d for d in suffix)
    like = np.zeros(target, draw(st.sampled_from(["float32", "int8"])))
    return (array(draw, draw(st.sampled_from(ALL)), shape), like), {}


@case("unbroadcast", floats="exact")
@st.composite
def unbroadcast_case(draw, name):
    """x: like's shape broadcast (size-1 axes grown, leading axes added); quarters sum exactly."""
    target = draw(shapes())
    grown = tuple(draw(st.integers(0, 4)) if d == 1 else d for d in target)
    extra = draw(shapes(max_dims=2))
    dtype = draw(st.sampled_from(NUMS))
    return (array(draw, dtype, extra + grown, "dyadic"), np.zeros(target, dtype)), {}


@case("expand_dims")
@st.composite
def expand_dims_case(draw, name):
    x = array(draw, draw(st.sampled_from(ALL)), draw(shapes()))
    return (x,), {"axis": draw(st.integers(-x.ndim - 1, x.ndim))}


@case("matrix_transpose")
@st.composite
def matrix_transpose_case(draw, name):
    return (array(draw, draw(st.sampled_from(ALL)), draw(shapes(min_dims=2))),), {}


@case("squeeze")
@st.composite
def squeeze_case(draw, name):
    shape = list(draw(shapes(min_dims=1)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    shape[axis] = 1
    return (array(draw, draw(st.sampled_from(ALL)), shape),), {"axis": axis}


@case("index")
@st.composite
def index_case(draw, name):
    shape = nonempty_along(draw(shapes(min_dims=1)), 0)
    i = draw(st.integers(0, shape[0] - 1))
    i = i if draw(st.booleans()) else np.asarray(i, draw(st.sampled_from(INTS)))
    return (array(draw, draw(st.sampled_from(ALL)), shape), i), {}


@case("scatter_row")
@st.composite
def scatter_row_case(draw, name):
    """Row i (from the end when negative) of zeros shaped like `like` is x (broadcast to a row)."""
    shape = nonempty_along(draw(shapes(min_dims=1)), 0)
    row = shape[1:]
    x_shape = tuple(1 if draw(st.booleans()) else d for d in row[len(row) - draw(st.integers(0, len(row))):])
    dtype = draw(st.sampled_from(NUMS))
    i = draw(st.integers(-shape[0], shape[0] - 1))
    i = i if draw(st.booleans()) else np.asarray(i, draw(st.sampled_from(["int8", "int32", "int64"])))
    return (array(draw, dtype, x_shape), np.zeros(shape, np.float32), i), {}


@case("broadcast_leading")
@st.composite
def broadcast_leading_case(draw, name):
    """like: a tensor, a struct (its first leaf) or a list (its first element's first leaf)."""
    x = array(draw, draw(st.sampled_from(NUMS)), draw(shapes()))
    like_shape = draw(shapes(min_dims=1))
    like = np.zeros(like_shape, np.float32)
    wrap = draw(st.sampled_from(["tensor", "struct", "list"]))
    if wrap == "struct":
        like = Struct((like, np.zeros((2,), np.int32)), ("a", "b"))
    elif wrap == "list":
        like = [Struct((like,)), Struct((like,))]
    attrs = {"axis": draw(st.integers(0, x.ndim)), "like_axis": draw(st.integers(0, len(like_shape) - 1))}
    return (x, like), attrs


@st.composite
def along(draw):
    """x[B.., n, R..] and i[I..] with B and I broadcasting, i in [0, n)."""
    lead, i_shape = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, min_side=0,
                                                           max_side=3)).input_shapes
    n = draw(st.integers(1, 3))
    rest = draw(shapes(max_dims=1))
    i = draw(hnp.arrays(np.dtype(draw(st.sampled_from(INTS))), i_shape, elements=st.integers(0, n - 1)))
    return lead + (n,) + rest, i, len(lead), np.broadcast_shapes(lead, i_shape) + rest


@case("index_along")
@st.composite
def index_along_case(draw, name):
    shape, i, keep, _ = draw(along())
    return (array(draw, draw(st.sampled_from(ALL)), shape), i), {"keep": keep}


@case("scatter_along", floats="exact")
@st.composite
def scatter_along_case(draw, name):
    """Rows picked twice add up (quarters: exact in any order; bools with `or`)."""
    shape, i, keep, x_shape = draw(along())
    dtype = draw(st.sampled_from(NUMS + ["bool"]))
    return (array(draw, dtype, x_shape, "dyadic"), np.zeros(shape, np.float32), i), {"keep": keep}


def seed_of(draw, shape=()):
    """A seed: a weak int (any size, negative too) or a tensor of any integer dtype."""
    if shape == () and draw(st.booleans()):
        return draw(st.integers(-2 ** 40, 2 ** 40))
    return array(draw, draw(st.sampled_from(INTS)), shape)


def float_scalar(draw):
    return draw(st.floats(0, 4, allow_subnormal=False)) if draw(st.booleans()) else \
        array(draw, draw(st.sampled_from(FLOATS)), (), "finite")


@case("random_normal")
@st.composite
def random_normal_case(draw, name):
    return (float_scalar(draw), seed_of(draw)), {"shape": draw(shapes())}


@case("random_uniform", floats="exact")
@st.composite
def random_uniform_case(draw, name):
    """Exact: the same bits, and lo + (hi - lo) * u in float32 on both sides."""
    return (float_scalar(draw), float_scalar(draw), seed_of(draw)), {"shape": draw(shapes())}


@case("random_normal_like", floats="float32")
@st.composite
def random_normal_like_case(draw, name):
    """Leaf k of a struct draws with seed * 1000003 + k."""
    dtype = draw(st.sampled_from(FLOATS))
    x = array(draw, dtype, draw(shapes()), "finite")
    if draw(st.booleans()):
        x = Struct((x, Struct((array(draw, dtype, draw(shapes()), "finite"),))), ("w", "inner"))
    return (x, float_scalar(draw), seed_of(draw)), {}


@case("counter_noise")
@st.composite
def counter_noise_case(draw, name):
    like = np.zeros(draw(shapes()), np.float32)
    attrs = {"kind": draw(st.sampled_from(["normal", "uniform"])), "keep": draw(st.integers(0, like.ndim))}
    if draw(st.booleans()):
        attrs["salt"] = draw(st.integers(0, 5))
    return (seed_of(draw, draw(shapes(max_dims=2))), like), attrs


@given(shape=shapes(), seed=st.integers(-2 ** 40, 2 ** 40), stream=st.integers(0, 2),
       salt=st.one_of(st.none(), st.integers(0, 5)), dynamic=st.booleans())
def test_counter_uniform_bits_are_numpys(shape, seed, stream, salt, dynamic):
    """The hash, bit for bit: counter_uniform's floats are 24-bit integers times 2**-24."""
    spec = tf.TensorSpec([None] * len(shape) if dynamic else shape, tf.float32)
    fn = tf.function(lambda like: ops._uniform(tf.constant(seed, tf.int64), tf.shape(like), stream, salt),
                     input_signature=[spec], autograph=False)
    got = fn(tf.zeros(shape)).numpy()
    want = counter_uniform(shape, seed if salt is None else seed * 1000003 + salt, stream)
    assert got.dtype == want.dtype and np.array_equal(got, want)


# ---- errors -------------------------------------------------------------------------------------

def _f32(*shape):
    return np.zeros(shape, np.float32)


RUNTIME_ERRORS = [
    ("index", (_f32(3, 2), np.int32(3)), {}, "out of range"),
    ("index", (_f32(3), -1), {}, "out of range"),
    ("index_along", (_f32(2, 3), np.array([0, 3])), {"keep": 1}, "out of range"),
    ("scatter_along", (_f32(2), _f32(2, 3), np.array([0, -1])), {"keep": 1}, "out of range"),
    ("scatter_row", (_f32(2), _f32(3, 2), np.int64(-4)), {}, "out of range"),
    ("sparse_softmax_cross_entropy", (np.array([0, 2]), _f32(2, 2)), {}, "out of range"),
    ("max", (_f32(2, 0),), {"axis": 1}, "empty axis"),
    ("min", (_f32(0),), {}, "empty axis"),
    ("argmax", (_f32(0, 2),), {"axis": 0}, "empty axis"),
    ("softmax", (_f32(2, 0),), {}, "empty axis"),
]


@pytest.mark.parametrize("name, args, attrs, message", RUNTIME_ERRORS)
def test_runtime_errors_become_asserts(name, args, attrs, message):
    """Where the impl fails at run time (the interpreter's FedlangRuntimeError), the graph
    raises InvalidArgumentError when it runs -- with dimensions unknown while tracing."""
    with pytest.raises((FedlangRuntimeError, ValueError, IndexError)):
        reference(name, args, attrs)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        lowered(name, args, attrs, dynamic=True)


def test_integer_power_with_a_negative_exponent_fails():
    x = np.array([2, 3], np.int32)
    with pytest.raises(ValueError):
        reference("pow", (x, -1), {})
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative integer powers"):
        lowered("pow", (x, np.array([1, -1], np.int32)), {}, dynamic=True)


def test_a_weak_integer_out_of_its_dtypes_range_fails_while_tracing():
    x = np.array([1], np.int8)
    with pytest.raises(OverflowError):
        reference("add", (x, 300), {})
    with pytest.raises(FedlangRuntimeError, match="out of bounds for int8"):
        lowered("add", (x, 300), {}, dynamic=False)


@pytest.mark.parametrize("name, args, attrs", [
    ("unbroadcast", (np.array([["a"]]), np.array(["a"])), {}),
    ("scatter_along", (np.array(["a"]), np.array([["a"]]), np.array([0])), {"keep": 1}),
    ("one_hot_like", (np.array([0]), np.array([["a", "b"]])), {}),
])
def test_string_ops_tensorflow_lacks_say_so(name, args, attrs):
    with pytest.raises(FedlangRuntimeError, match="not supported on the TensorFlow backend"):
        lowered(name, args, attrs, dynamic=False)
