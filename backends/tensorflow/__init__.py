"""The TensorFlow backend: every primitive's lowering, phases as tf.functions, plans."""
