"""TensorFlow lowerings of vectorization-internal primitives that ops.py does not cover.

Called like the NumPy `impl` (fedlang.backends.tensorflow.registry): tensors are
tf.Tensors, static attributes keyword arguments.
"""

from __future__ import annotations

import tensorflow as tf

from fedlang.backends.tensorflow.registry import lowering


@lowering("row_mask")
def _row_mask(counts, like, axis):
    """The valid rows of a padded batch: iota along `axis` < counts (see _np_row_mask).
    Ranks are static; the padded size is read at run time."""
    counts = tf.convert_to_tensor(counts)
    like = tf.convert_to_tensor(like)
    k, rank = counts.shape.rank, like.shape.rank
    size = tf.shape(like)[axis]
    iota = tf.range(size, dtype=counts.dtype)
    iota = tf.reshape(iota, tf.stack([1] * k + [size if i == axis else 1 for i in range(k, rank)]))
    ones = tf.ones([rank - k], tf.int32)
    return tf.less(iota, tf.reshape(counts, tf.concat([tf.shape(counts), ones], 0)))
