"""attention.bench.perf.stats: the baseline gate's Mann-Whitney p-value and the A/B's paired-ratio interval (CPU)."""

from __future__ import annotations

import math
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
    assert stats.ratio_interval(times(rng), times(rng)).p_value is not None  # the A/B needs numpy only


def test_an_unknown_alternative_is_refused(rng):
    with pytest.raises(ValueError, match="alternative must be one of"):
        stats.mann_whitney_p(times(rng), times(rng), "larger")


def drifting_pair(rng: np.random.Generator, n: int) -> tuple[list[float], list[float]]:
    """Base and head of ``n`` paired rounds of one kernel: a clock drifting over the run (a random
    walk both sides share) times 0.3% noise of each call's own."""
    drift = np.exp(np.cumsum(rng.normal(0.0, 0.01, n)))  # (n,)
    base = 1e-3 * drift * rng.lognormal(0.0, 0.003, n)
    head = 1e-3 * drift * rng.lognormal(0.0, 0.003, n)
    return base.tolist(), head.tolist()


def test_pairing_rounds_cancels_drift_both_sides_share(rng):
    """A clock that moves by 8% over the run, and both sides of each round with it, leaves the
    paired interval as narrow as the calls' own 0.3% noise; the same rounds paired at random
    carry the drift."""
    n = 30
    ramp = np.linspace(0.96, 1.04, n)  # (rounds,)
    base = 1e-3 * ramp * rng.lognormal(0.0, 0.003, n)
    head = 1.03e-3 * ramp * rng.lognormal(0.0, 0.003, n)
    iv = stats.ratio_interval(base, head)
    assert iv.low < 1.03 < iv.high and iv.detectable < 0.008
    assert iv.ratio == pytest.approx(1.03, abs=0.004)
    assert iv.p_value == pytest.approx(2 * 0.5**n)  # every round slower: the sign test's floor
    assert stats.ratio_interval(base, rng.permutation(head)).detectable > 3 * iv.detectable
    assert stats.paired_ratio(base, head) == iv.ratio


def test_the_interval_covers_the_median_ratio_at_its_level(rng):
    """Independent rounds, no effect: a 99% interval misses 1 in about 0.5% of A/A pairs (its
    coverage at 30 rounds is 99.48%); 2000 pairs, so more than 25 misses would be a broken rule."""
    misses = 0
    for _ in range(2000):
        base, head = drifting_pair(rng, 30)
        iv = stats.ratio_interval(base, head)
        misses += not iv.low <= 1 <= iv.high
    assert misses <= 25


def test_the_order_statistics_are_the_widest_that_keep_the_level():
    """[x_(k), x_(n+1-k)] misses the median when k or more of n draws fall on one side of it:
    probability 2 P(Binomial(n, 1/2) <= k - 1), within 1 - level at k and not at k + 1 (unless
    k + 1 would pass the middle)."""
    for level in (0.5, 0.9, 0.95, 0.99, 0.999):
        for n in range(stats.min_rounds(level), 301):
            k = stats._order_statistic(n, level)
            miss = 2 * sum(math.comb(n, i) for i in range(k)) / 2**n
            assert miss <= 1 - level, (level, n, k)
            assert k == n // 2 or 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n > 1 - level, (level, n, k)
        assert 2 * 0.5 ** (stats.min_rounds(level) - 1) > 1 - level  # one round fewer could not reach it


@pytest.mark.parametrize(("n", "k"), [(8, 1), (10, 1), (20, 4), (30, 8), (31, 8), (50, 16), (100, 37)])
def test_the_interval_is_bounded_by_those_order_statistics(n, k):
    assert stats._order_statistic(n, 0.99) == k
    logs = np.arange(n, dtype=float) / 1000  # ratios exp(0), exp(0.001), ...: the bounds are readable
    iv = stats.ratio_interval(np.ones(n), np.exp(logs))
    assert (iv.low, iv.high) == (pytest.approx(math.exp(logs[k - 1])), pytest.approx(math.exp(logs[n - k])))
    assert f"order statistics {k} and {n + 1 - k} of {n}" in iv.method


def test_too_few_or_unpaired_rounds_are_refused(rng):
    assert stats.min_rounds(0.99) == 8 and stats.min_rounds(0.95) == 6
    with pytest.raises(ValueError, match=r"7 paired rounds; a 99% interval needs at least 8"):
        stats.ratio_interval(times(rng, 7), times(rng, 7))
    with pytest.raises(ValueError, match=r"base has 30 samples and head 29: the interval pairs round i"):
        stats.ratio_interval(times(rng, 30), times(rng, 29))
    with pytest.raises(ValueError, match="level must be in"):
        stats.ratio_interval(times(rng), times(rng), level=1.0)


def test_the_sign_test_counts_rounds_above_and_below():
    assert stats.sign_test_p(np.array([0.0, 0.0])) == 1.0  # no round differs
    assert stats.sign_test_p(np.array([0.0] * 5 + [0.1] * 10)) == pytest.approx(2 / 1024)  # ties left out
    assert stats.sign_test_p(np.array([0.1] * 10)) == pytest.approx(2 / 1024)
    assert stats.sign_test_p(np.array([0.1] * 5 + [-0.1] * 5)) == 1.0
    assert stats.sign_test_p(np.array([-0.1] * 9 + [0.1])) == pytest.approx(2 * 11 / 1024)


@pytest.mark.parametrize(
    ("base", "head", "change"),
    [
        (100.0, 126.5, "regressed"),  # past 100 x 1.1 + 16
        (100.0, 125.5, "unchanged"),
        (100.0, 74.0, "improved"),  # 100 > 74 x 1.1 + 16
        (100.0, 77.0, "unchanged"),
        (1.0, 17.5, "regressed"),  # the slack dominates small peaks
        (None, 500.0, "unknown"),
        (500.0, None, "unknown"),
    ],
)
def test_peak_memory_changes_past_the_factor_and_the_slack(base, head, change):
    assert stats.memory_change(base, head) == change
