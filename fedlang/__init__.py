"""fedlang: a typed language and compiler for federated computations.

`fedlang.check(path)` checks a program; `fedlang.types.parse` reads type
notation. Heavy parts (TensorFlow) are never imported by the front end.
"""

__version__ = "0.1.0"

from fedlang.api import CheckResult, check, check_source  # noqa: E402

__all__ = ["__version__", "check", "check_source", "CheckResult"]
