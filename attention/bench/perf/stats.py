"""The statistics both perf gates use: the Mann-Whitney U p-value and the bootstrap interval of a
ratio of medians.

The baseline gate (:mod:`.compare`) asks for a one-sided p-value before it calls a slower median
a regression; the same-run A/B (:mod:`.ab`) gates on the bootstrap interval and reports a
two-sided p-value beside it. One implementation keeps their rules (how many samples a test
needs, what a missing scipy means) from drifting apart.

Both need at least :data:`MIN_SAMPLES` samples per side. Below five a side, the exact test's
smallest attainable p-value is 1/C(8, 4) = 0.014 or more, so it could never pass the gate's 1%
level: a gate testing on fewer samples would call every slowdown noise, however large.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_SAMPLES = 5
DEFAULT_LEVEL = 0.99
ALTERNATIVES = ("less", "greater", "two-sided")
SCIPY_MISSING = (
    "scipy is not installed: no Mann-Whitney p-values, so medians are compared without a rank test "
    '(pip install "attention-suite[perf]")'
)
# Bootstrap work per numpy call (resamples x samples), bounding memory for long sample lists.
_CHUNK = 1 << 22


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
    ratio: float  # median(head) / median(base)
    low: float
    high: float
    level: float
    n_base: int
    n_head: int
    p_value: float | None  # two-sided Mann-Whitney U; None without scipy
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
    if arr.size < MIN_SAMPLES:
        raise ValueError(f"{side} has {arr.size} samples; at least {MIN_SAMPLES} are needed for an interval")
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{side} sample {i} is {float(arr[i])!r}; timing samples must be finite and positive")
    return arr


def _boot_medians(rng: np.random.Generator, arr: np.ndarray, resamples: int) -> np.ndarray:
    n, rows = arr.size, max(1, _CHUNK // arr.size)
    out = []
    for start in range(0, resamples, rows):
        # A full sort beats np.median's partition on short rows, by ~8x at 60 samples.
        s = np.sort(arr[rng.integers(0, n, size=(min(rows, resamples - start), n))], axis=1)
        out.append((s[:, (n - 1) // 2] + s[:, n // 2]) / 2)
    return np.concatenate(out)


def ratio_interval(
    base: Sequence[float],
    head: Sequence[float],
    *,
    level: float = DEFAULT_LEVEL,
    resamples: int = 2000,
    seed: int = 0,
    rank_test: bool = True,
) -> RatioInterval:
    """Bootstrap percentile interval of median(head) / median(base): base and head resampled
    independently with replacement, the ratio of medians recomputed per resample, the central
    ``level`` quantiles kept. No distributional assumption; seeded, so reruns agree. Samples must
    be finite and positive (a ratio), at least :data:`MIN_SAMPLES` a side; ``ValueError`` naming
    the side otherwise. ``rank_test=False`` leaves out the Mann-Whitney p-value (``None``), which
    no gate decides on: the calibration judges thousands of intervals and needs none."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100, got {resamples!r}")
    b, h = _samples("base", base), _samples("head", head)
    rng = np.random.default_rng(seed)
    ratios = _boot_medians(rng, h, resamples) / _boot_medians(rng, b, resamples)
    alpha = (1 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha])
    return RatioInterval(
        ratio=float(np.median(h) / np.median(b)),
        low=float(low),
        high=float(high),
        level=level,
        n_base=b.size,
        n_head=h.size,
        p_value=mann_whitney_p(b, h, "two-sided") if rank_test else None,
        method=f"bootstrap percentile, {resamples} resamples",
    )
