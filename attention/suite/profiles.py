"""Hypothesis profiles of the property suite, chosen by ``HYPOTHESIS_PROFILE`` (default ``quick``).

* ``quick`` (the default): deterministic (derandomized, no example database), so a first run can
  never fail on a draw nobody has seen; example counts sized so the whole suite runs in a couple
  of minutes on a 2-core CPU.
* ``dev``: fresh random examples and remembered failures (``.hypothesis/``), a little more
  search than ``quick``: for exploring after a change.
* ``thorough``: fresh random examples, many of them: the nightly run (``nox -s explore``).

A profile of the same name that the user's own code registered first is left as it is. None is
named ``ci`` or ``default``: Hypothesis registers those itself, on import, so a suite profile
of either name would never be registered (its ``ci`` runs 100 examples a property).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import InvalidArgument

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: quick reports the first failing example as drawn: shrinking it, which re-runs the property
#: tens to hundreds of times, made a wrong implementation fail several times slower than a right
#: one passed. Being derandomized, a rerun replays it; ``dev`` shrinks.
_FIRST_FAILURE = [phase for phase in Phase if phase not in (Phase.shrink, Phase.explain)]
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(max_examples=5, derandomize=True, database=None, phases=_FIRST_FAILURE, **_COMMON),
    "dev": dict(max_examples=20, **_COMMON),
    "thorough": dict(max_examples=200, **_COMMON),
}


def _registered(name: str) -> bool:
    try:
        settings.get_profile(name)
    except InvalidArgument:
        return False
    return True


def load() -> str:
    """Register the profiles not registered yet and load ``HYPOTHESIS_PROFILE`` (default ``quick``)."""
    for name, options in PROFILES.items():
        if not _registered(name):
            settings.register_profile(name, **options)
    name = os.environ.get("HYPOTHESIS_PROFILE", "quick")
    settings.load_profile(name)
    return name
