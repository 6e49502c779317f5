"""The TensorFlow backend: every primitive's lowering, phases as tf.functions, plans."""

import os
import sys


def import_quietly() -> None:
    """Import TensorFlow without its start-up chatter (oneDNN and CUDA probing lines that its
    C++ side writes straight to file descriptor 2): those are not for users. oneDNN's
    reordering optimizations stay off, so a run gives the same bits every time."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if "tensorflow" in sys.modules or os.environ.get("FEDLANG_DEBUG"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
