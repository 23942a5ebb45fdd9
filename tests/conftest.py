"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default ``dev``).

* ``ci``: deterministic (derandomized, no example database), example counts sized so the whole
  suite runs in a few minutes on a 2-core CPU.
* ``dev``: random examples, remembered failures, a little more search than ``ci``.
* ``cuda-quick``: deterministic and few examples, for a GPU run on a time budget: flex
  compiles once per shape, dtype and grad mode (seconds each), so example counts set its cost.
* ``thorough``: many examples, for a GPU box or a nightly run.
"""

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=10, derandomize=True, database=None, print_blob=True, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("cuda-quick", max_examples=3, derandomize=True, database=None, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
