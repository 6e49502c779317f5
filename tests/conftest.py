"""Hypothesis profiles: `ci` (derandomized, so a landing never hangs on luck),
`dev` (the default locally) and `deep` (many more examples, for bug hunting:
`pytest --hypothesis-profile deep`). CI selects `ci` through the environment
variable FEDLANG_HYPOTHESIS_PROFILE or `--hypothesis-profile ci`."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=60, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("FEDLANG_HYPOTHESIS_PROFILE", "dev"))
