"""Property-testing support for fedlang: Hypothesis strategies that generate
random types, random well-typed programs (with the types the checker must
infer) and placement-breaking mutations of them (with the diagnostic the
checker must give). The test suite uses them; so can anyone extending the
language, to test a new rule against every program shape at once.

    from fedlang.testing import strategies as fst
    @given(fst.programs())
    def test_checks(program): assert fedlang.check_source(program.source).ok
"""

try:
    import hypothesis  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("fedlang.testing needs hypothesis: pip install 'fedlang[test]'") from error

from fedlang.testing.strategies import (GeneratedProgram, IllPlaced, ill_placed, names, programs, subtypes,
                                        supertypes, types)

__all__ = ["GeneratedProgram", "IllPlaced", "ill_placed", "names", "programs", "subtypes", "supertypes", "types"]
