"""attention.bench.perf.stats: the Mann-Whitney p-value and bootstrap interval both perf gates use (CPU)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from attention.bench.perf import stats


def times(rng: np.random.Generator, n: int = 40, scale: float = 1.0) -> list[float]:
    """Round times around ``scale`` ms with 1% lognormal jitter: positive, no ties."""
    return (scale * 1e-3 * rng.lognormal(0.0, 0.01, n)).tolist()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240607)


@pytest.fixture
def scipy_stats():
    return pytest.importorskip("scipy.stats")


def test_a_clear_slowdown_is_significant_in_its_direction_only(rng, scipy_stats):
    base, head = times(rng), times(rng, scale=1.05)
    assert stats.mann_whitney_p(base, head, "greater") < 1e-6
    assert stats.mann_whitney_p(base, head, "two-sided") < 1e-6
    assert stats.mann_whitney_p(base, head, "less") > 0.99  # head is not faster
    assert stats.mann_whitney_p(head, base, "less") < 1e-6  # the same shift seen from the other side


def test_identical_distributions_are_not_significant(rng, scipy_stats):
    ps = [stats.mann_whitney_p(times(rng), times(rng), "two-sided") for _ in range(50)]
    assert all(p is not None for p in ps)
    assert sum(p < 0.01 for p in ps) <= 3  # about 0.5 expected at the 1% level
    assert np.median(ps) > 0.2


def test_the_minimum_sample_count_can_reach_one_percent(rng, scipy_stats):
    """At MIN_SAMPLES a side, complete separation is significant at the gates' 1% level; one
    fewer on either side gives no p-value rather than one that could never be significant."""
    n = stats.MIN_SAMPLES
    base, head = sorted(times(rng, 2 * n))[:n], sorted(times(rng, 2 * n), reverse=True)[:n]
    assert stats.mann_whitney_p(base, head, "greater") < 0.01
    assert stats.mann_whitney_p(base[1:], head, "greater") is None
    assert stats.mann_whitney_p(base, head[1:], "two-sided") is None


def test_without_scipy_no_p_value_and_one_message(rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy...` raise ImportError
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert stats.mann_whitney_p(times(rng), times(rng, scale=2.0), "greater") is None
    assert stats.scipy_warning() == stats.SCIPY_MISSING
    assert 'pip install "attention-suite[perf]"' in stats.SCIPY_MISSING
    assert stats.ratio_interval(times(rng), times(rng)).p_value is None  # the interval needs numpy only


def test_an_unknown_alternative_is_refused(rng):
    with pytest.raises(ValueError, match="alternative must be one of"):
        stats.mann_whitney_p(times(rng), times(rng), "larger")


def test_the_interval_reports_the_same_p_value(rng, scipy_stats):
    base, head = times(rng), times(rng, scale=1.02)
    iv = stats.ratio_interval(base, head)
    assert iv.p_value == stats.mann_whitney_p(base, head, "two-sided")
    assert iv.low < 1.02 < iv.high and iv.level == stats.DEFAULT_LEVEL
