"""Python's cyclic garbage collector, paused while the compiler works.

Checking, building IR, passes and phase splitting allocate many small objects
(tokens, AST nodes, payloads, the dicts of the graphs) while the whole program
is alive, and each collection would scan all of it again: half the time of a
10,000-line check. Reference counting frees what they drop all the same. When
the pause ends, what was made during it moves to the oldest generation without
a scan (`freeze` then `unfreeze`), so the first collection afterwards does not
pay for it either; it stays collectable.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.unfreeze()
            gc.enable()
