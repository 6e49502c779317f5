"""Property testing for fedlang programs and the rules they rely on (docs/testing.md).

Hypothesis strategies and helpers, the same ones the project's own tests use:

    types(max_depth=3, placed=True, functions=True, max_dim=None)   random fedlang types
    values(t, clients=st.integers(1, 20), ...)                        random values of a type
    arguments(comp, clients=st.integers(1, 20), ...)                  random argument lists of a computation
    programs(max_decls=4, ...) / ill_placed(program)                  random well-typed programs / placement errors
    draw_value(t, rng, clients, unknown) / draw_arguments(comp, rng, clients)   the same generator from NumPy
    is_value_of(value, t) / mismatch(value, t)                        membership of a value in a type
    assert_close(got, expected, rtol=None, atol=None)                 equal up to float rounding, or where not
    assert_backends_agree(comp, args, rtol=None, atol=None)           reference interpreter vs TensorFlow backend
    register_profile(name="fedlang")                                  Hypothesis settings suited to fedlang tests

Example:

    import fedlang
    from hypothesis import given, strategies as st
    from fedlang.testing import arguments, assert_backends_agree

    prog = fedlang.load("examples/mean_temperature.fed")

    @given(st.data())
    def test_backends_agree(data):
        assert_backends_agree(prog.mean_temperature, data.draw(arguments(prog.mean_temperature)))

Needs hypothesis (`pip install 'fedlang[test]'`); `assert_backends_agree` imports
TensorFlow the first time it runs, nothing here imports it before.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("fedlang.testing needs hypothesis: pip install 'fedlang[test]' "
                      "(or pip install hypothesis)") from error

from fedlang.testing.backends import (BackendCannotRun, assert_backends_agree, plan_of, run_interpreter,
                                      run_tensorflow)
from fedlang.testing.compare import DEFAULT_TOLERANCE, assert_close, first_difference
from fedlang.testing.strategies import (GeneratedProgram, IllPlaced, ill_placed, names, programs, subtypes,
                                        supertypes, types)
from fedlang.testing.generate import (SPECIAL_FLOATS, TINY, Arguments, NoValue, arguments, draw_arguments,
                                     draw_value, is_value_of, mismatch, parameter_types, values)


def register_profile(name: str = "fedlang", **overrides) -> None:
    """Register a Hypothesis settings profile for tests of fedlang programs: no deadline (the
    first run of a program compiles it, the first TensorFlow run traces it), no too-slow or
    too-much-data health checks (client data is big), 50 examples; `overrides` change any
    setting. Load it with `hypothesis.settings.load_profile(name)` (in a conftest.py) or
    `pytest --hypothesis-profile fedlang`. Registering never changes the loaded profile."""
    from hypothesis import HealthCheck, settings

    options = {"deadline": None, "max_examples": 50,
               "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
    options.update(overrides)
    settings.register_profile(name, **options)


__all__ = ["Arguments", "BackendCannotRun", "DEFAULT_TOLERANCE", "GeneratedProgram", "IllPlaced", "NoValue",
           "SPECIAL_FLOATS", "TINY", "arguments", "assert_backends_agree", "assert_close", "draw_arguments",
           "draw_value", "first_difference", "ill_placed", "is_value_of", "mismatch", "names", "parameter_types",
           "plan_of", "programs", "register_profile", "run_interpreter", "run_tensorflow", "subtypes", "supertypes",
           "types", "values"]
