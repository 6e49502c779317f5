"""fedlang: a typed language and compiler for federated computations.

`fedlang.check(path)` checks a program; `fedlang.types.parse` reads type
notation. Heavy parts (TensorFlow) are never imported by the front end.
"""

import os as _os

__version__ = "0.1.0"

# In a source checkout run without installing (the repo root on sys.path),
# ir/, backends/, grammar/ and stdlib/ sit beside this package, not inside it;
# an installed fedlang has them inside as fedlang.ir, fedlang.backends, ...
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "ir", "checker.py")) and \
        _os.path.isfile(_os.path.join(_root, "pyproject.toml")):
    __path__.append(_root)

from fedlang import types  # noqa: E402
from fedlang.api import CheckResult, check, check_source, load  # noqa: E402

__all__ = ["__version__", "check", "check_source", "load", "CheckResult", "types"]
