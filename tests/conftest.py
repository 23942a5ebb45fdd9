"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default ``dev``).

* ``ci``: deterministic (derandomized, no example database), example counts sized so the whole
  suite runs in a few minutes on a 2-core CPU.
* ``dev``: random examples, remembered failures, a little more search than ``ci``.
* ``cuda-quick``: deterministic and few examples, for a GPU run on a time budget: flex
  compiles once per shape, dtype and grad mode (seconds each), so example counts set its cost.
* ``thorough``: many examples, for a GPU box or a nightly run.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=10, derandomize=True, database=None, print_blob=True, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("cuda-quick", max_examples=3, derandomize=True, database=None, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items) -> None:
    """A test of an implementation that cannot run here (the triton one without the triton
    package) is skipped with the implementation's own reason, on the device the test uses."""
    import attention

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "impl_name" not in params or params["impl_name"] not in attention.implementations():
            continue
        reason = attention.get(params["impl_name"]).unavailable(params.get("device", "cpu"))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"{params['impl_name']}: {reason}"))
