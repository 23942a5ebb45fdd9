"""The statistics of both perf gates: the Mann-Whitney U p-value of the committed-baseline gate and
the paired-ratio interval of the same-run A/B.

The baseline gate (:mod:`.compare`) compares one run's rounds with another run's, unpaired: it asks
for a one-sided Mann-Whitney p-value before it calls a slower median a regression. It needs at
least :data:`MIN_SAMPLES` samples per side: below five a side, the exact test's smallest attainable
p-value is 1/C(8, 4) = 0.014 or more, so it could never pass the gate's 1% level, and a gate testing
on fewer samples would call every slowdown noise, however large.

The same-run A/B (:mod:`.ab`) times both sides in every round, back to back, so its samples come in
pairs: it gates on the interval of the median per-round ratio (:func:`ratio_interval`) and reports
the sign test's p-value beside it. Numpy alone; scipy (the ``perf`` extra) only for the baseline
gate's test. docs/design.md#paired-rounds says why the A/B pairs its rounds.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 5
DEFAULT_LEVEL = 0.99
#: Peak memory's default limit in both gates: more than 10% and 16 MiB above the base.
MEMORY_FACTOR = 0.10
MEMORY_SLACK_MIB = 16.0
ALTERNATIVES = ("less", "greater", "two-sided")
SCIPY_MISSING = (
    "scipy is not installed: no Mann-Whitney p-values, so medians are compared without a rank test "
    '(pip install "attention-suite[perf]")'
)


def _mannwhitneyu() -> Callable | None:
    """scipy's test, or ``None`` where scipy is not installed or does not import."""
    if importlib.util.find_spec("scipy") is None:
        return None
    try:
        from scipy.stats import mannwhitneyu
    except ImportError:
        return None
    return mannwhitneyu


def scipy_warning() -> str | None:
    """:data:`SCIPY_MISSING` where p-values cannot be computed, so an absent p is not read as p=1."""
    return SCIPY_MISSING if _mannwhitneyu() is None else None


def memory_change(
    base_mib: float | None, head_mib: float | None, factor: float = MEMORY_FACTOR, slack_mib: float = MEMORY_SLACK_MIB
) -> str:
    """Peak memory from base to head: "regressed" past ``base * (1 + factor) + slack_mib``,
    "improved" by the same margin the other way, else "unchanged"; "unknown" without both peaks.
    Peaks are one measurement each, with no rounds to test: the slack keeps allocator rounding
    on small cases from counting."""
    if base_mib is None or head_mib is None:
        return "unknown"
    if head_mib > base_mib * (1 + factor) + slack_mib:
        return "regressed"
    if base_mib > head_mib * (1 + factor) + slack_mib:
        return "improved"
    return "unchanged"


def mann_whitney_p(base: Sequence[float], head: Sequence[float], alternative: str) -> float | None:
    """Mann-Whitney U p-value of ``head`` against ``base``; ``alternative`` is what the test looks
    for in ``head``: "greater" (larger: slower, for times), "less" or "two-sided".

    ``None`` with fewer than :data:`MIN_SAMPLES` on a side, without scipy, or when scipy gives
    no finite p-value (every sample tied, in some versions)."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if len(base) < MIN_SAMPLES or len(head) < MIN_SAMPLES:
        return None
    if (mwu := _mannwhitneyu()) is None:
        return None
    p = float(mwu(head, base, alternative=alternative).pvalue)
    return p if math.isfinite(p) else None


@dataclass(frozen=True)
class RatioInterval:
    ratio: float  # the median over rounds of head_i / base_i
    low: float
    high: float
    level: float  # the interval's coverage is at least this
    n_base: int
    n_head: int
    p_value: float | None  # two-sided exact sign test of the per-round ratios against 1 (ties left out)
    method: str

    @property
    def detectable(self) -> float:
        """The smallest relative change this run could have flagged: a change inside the
        interval's half-width is indistinguishable from noise here."""
        return max(self.high - self.ratio, self.ratio - self.low)


def _samples(side: str, values: Sequence[float]) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{side} samples must be numbers (seconds): {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{side} samples must be a flat sequence of seconds, got shape {arr.shape}")
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{side} sample {i} is {float(arr[i])!r}; timing samples must be finite and positive")
    return arr


def _half_binomial_cdfs(n: int) -> Iterator[float]:
    """P(X <= 0), P(X <= 1), ... for X ~ Binomial(n, 1/2): one running sum of exact integer
    binomial coefficients, so a long run's n costs no more than its length."""
    total, term, scale = 0, 1, 2**n
    for i in range(n + 1):
        total += term
        yield total / scale
        term = term * (n - i) // (i + 1)


def min_rounds(level: float = DEFAULT_LEVEL) -> int:
    """The fewest paired rounds whose extreme ratios bound the median at ``level``: below it no
    interval can reach the level (each of the ``2^-n`` tails must stay within ``(1 - level) / 2``)."""
    n = 1
    while 2.0 ** (1 - n) > 1 - level:
        n += 1
    return n


@functools.lru_cache(maxsize=1024)
def _order_statistic(n: int, level: float) -> int:
    """The largest ``k`` for which ``[x_(k), x_(n+1-k)]`` (1-based order statistics of ``n``
    independent draws) covers their distribution's median with probability at least ``level``:
    ``2 P(X <= k - 1) <= 1 - level`` for X ~ Binomial(n, 1/2)."""
    k = 1
    for cdf in itertools.islice(_half_binomial_cdfs(n), 1, n // 2):  # P(X <= k), k = 1 .. n // 2 - 1
        if cdf > (1 - level) / 2:
            break
        k += 1
    return k


def sign_test_p(logs: np.ndarray) -> float:
    """Two-sided exact sign test: how likely so lopsided a split of the nonzero values above and
    below 0, were each side equally likely. Zeros (rounds whose sides took exactly as long) are left
    out, as the test does; the interval keeps them, so on a coarse clock the two can disagree a little."""
    above, below = int((logs > 0).sum()), int((logs < 0).sum())
    if above + below == 0:
        return 1.0
    fewer = next(itertools.islice(_half_binomial_cdfs(above + below), min(above, below), None))
    return min(1.0, 2 * fewer)


def _log_ratios(base: Sequence[float], head: Sequence[float]) -> np.ndarray:
    """``log(head[i] / base[i])`` per round, sorted; ``ValueError`` naming the side or the counts."""
    b, h = _samples("base", base), _samples("head", head)
    if b.size != h.size:
        raise ValueError(f"base has {b.size} samples and head {h.size}: the interval pairs round i of each side")
    return np.sort(np.log(h / b))  # (rounds,)


def paired_ratio(base: Sequence[float], head: Sequence[float]) -> float:
    """The median over rounds of ``head[i] / base[i]``: the A/B's effect (:func:`ratio_interval`)."""
    return float(np.exp(np.median(_log_ratios(base, head))))


def ratio_interval(base: Sequence[float], head: Sequence[float], *, level: float = DEFAULT_LEVEL) -> RatioInterval:
    """The same-run A/B's effect and interval, from paired rounds: round ``i`` timed ``base[i]`` and
    ``head[i]`` back to back, so clock and thermal drift, which moves both, cancels in their ratio.

    The effect is the median over rounds of ``head[i] / base[i]``; its interval is the
    distribution-free one for a median, between two order statistics of the ratios chosen from the
    binomial distribution (the inverted sign test): exact for independent rounds whatever the
    ratios' distribution, deterministic, no resampling. Samples must be finite and positive, as
    many on each side, at least :func:`min_rounds` of them; ``ValueError`` naming the side or the
    count otherwise."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    logs = _log_ratios(base, head)  # (rounds,)
    if logs.size < (fewest := min_rounds(level)):
        raise ValueError(f"{logs.size} paired rounds; a {level:.0%} interval needs at least {fewest}")
    k = _order_statistic(logs.size, level)
    return RatioInterval(
        ratio=float(np.exp(np.median(logs))),
        low=float(np.exp(logs[k - 1])),
        high=float(np.exp(logs[logs.size - k])),
        level=level,
        n_base=logs.size,
        n_head=logs.size,
        p_value=sign_test_p(logs),
        method=f"median of paired ratios, order statistics {k} and {logs.size + 1 - k} of {logs.size}",
    )
