"""NumPy, imported on first use.

The checker shares the primitive table with the interpreter, but only the
interpreter computes; `fedlang check` never touches NumPy and starts about
0.15 s faster for it. After the first access the proxy holds NumPy's names
itself, so later lookups cost what a module attribute does.
"""

from __future__ import annotations

import importlib


class _LazyNumPy:
    def __getattr__(self, name: str):
        module = importlib.import_module("numpy")
        self.__dict__.update(vars(module))
        return getattr(module, name)


np = _LazyNumPy()
