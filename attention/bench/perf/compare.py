"""Regression verdicts: a baseline run, a current run, thresholds -> what got slower, faster, bigger.

Threshold policy (perf/README.md has the why):

* Time: a case regressed when its median is more than ``time`` (a fraction) above the baseline's
  AND the shift is significant (one-sided Mann-Whitney U on the saved per-round samples,
  ``p < ALPHA``, :func:`.stats.mann_whitney_p`) where both runs kept enough samples and scipy
  is installed. The ratio threshold carries the run-to-run noise (measured by
  :func:`thresholds_from_spread`); the test keeps a noisy case's unlucky run from being called a
  regression. Faster by the same margin: an improvement, reported so the baseline can be refreshed.
* Memory: peak memory is nearly deterministic, so more than ``memory`` (fraction) plus
  ``memory_slack_mib`` above the baseline is a regression, no test needed.
* Thresholds resolve per case: ``cases[key]``, else the first matching ``patterns`` entry
  (:mod:`.case_patterns`), else ``default``; never below ``floor``.
* Thresholds from spread (:func:`thresholds_from_spread`) are per case, with a floor per *kind*
  of case (:func:`case_kind`: family, dtype, direction, graph-timed or eager): k x the median
  spread of the kind's measured cases. A case's own spread is the worst of a few runs, a noisy
  figure; the cases of one kind share their sources of noise (CPU dispatch for eager ones, the
  compilation for compiled ones, the clocks of the machine), so a case that happened to look
  steady is not held tighter than its kind typically strays. The median, not the worst, so one
  dispatch-bound outlier does not loosen its siblings (docs/design.md#committed-baselines-across-machines).

A run's flagged time regressions are confirmed in fresh processes before they fail the
committed-baseline gate (:mod:`.confirm`); this module judges one run at a time.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...checks import is_finite
from . import guards
from .case_patterns import check_patterns, first_match
from .results import BadResultFile, Run, graph_timed, read_json
from .stats import MEMORY_FACTOR, MEMORY_SLACK_MIB, mann_whitney_p, memory_change, scipy_warning

ALPHA = 0.01
DEFAULT_THRESHOLDS = {
    "version": 1,
    "floor": 0.05,
    "default": {"time": 0.10, "memory": MEMORY_FACTOR, "memory_slack_mib": MEMORY_SLACK_MIB},
    "patterns": [],
    "cases": {},
}
THRESHOLDS_HINT = (
    "It is not a thresholds file; fix it, or write one from repeated runs "
    "(`python -m attention.bench.perf spread RUN RUN... --write FILE`)."
)
#: What a thresholds entry (default, pattern or case) may set.
THRESHOLD_FIELDS = ("time", "memory", "memory_slack_mib")
#: thresholds_from_spread: threshold = max(floor, SPREAD_K x worst relative deviation of a run's
#: median, the kind's floor, the case's A/B minimum effect).
SPREAD_K = 3.0
#: A kind of case gets a floor of its own from this many measured cases; fewer say too little.
MIN_KIND_CASES = 3


@dataclass
class Verdict:
    key: str
    # "slower", "slower_not_significant", "faster", "memory_up", "memory_down", "timing_mode_changed", "guard"
    kind: str
    message: str


@dataclass
class Comparison:
    regressions: list[Verdict] = field(default_factory=list)
    improvements: list[Verdict] = field(default_factory=list)
    notes: list[Verdict] = field(default_factory=list)
    guard_failures: list[Verdict] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the baseline, not in this run
    new: list[str] = field(default_factory=list)  # in this run, not in the baseline
    warnings: list[str] = field(default_factory=list)
    compared: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.guard_failures)


def load_thresholds(path: str | Path | None) -> dict:
    """The thresholds file, or the defaults if there is none; :class:`BadResultFile` if unreadable."""
    if path is None or not Path(path).exists():
        return json.loads(json.dumps(DEFAULT_THRESHOLDS))
    loaded = read_json(path, THRESHOLDS_HINT)
    if not isinstance(loaded, dict) or not isinstance(loaded.get("default", {}), dict):
        raise BadResultFile(f"{path}: thresholds must be an object with a 'default' object")
    merged = json.loads(json.dumps(DEFAULT_THRESHOLDS))
    merged.update({k: v for k, v in loaded.items() if k != "default"})
    merged["default"].update(loaded.get("default", {}))
    _check_thresholds(merged, path)
    return merged


def _check_thresholds(thresholds: dict, path: str | Path) -> None:
    """Every threshold a finite number >= 0: a NaN would disable the gate, a negative one fail
    an unchanged run, a string crash the comparison."""

    def number(value: object, where: str) -> None:
        ok = is_finite(value)
        if not ok or value < 0:
            raise BadResultFile(f"{path}: {where} is {value!r}, not a finite number >= 0")

    number(thresholds.get("floor"), "floor")
    entries = [("default", thresholds["default"])]
    try:
        patterns = check_patterns(thresholds.get("patterns", []), str(path), THRESHOLD_FIELDS)
    except ValueError as exc:
        raise BadResultFile(str(exc)) from None
    cases = thresholds.get("cases", {})
    if not isinstance(cases, dict):
        raise BadResultFile(f"{path}: 'cases' must be an object")
    entries += [(f"patterns[{i}]", entry) for i, (_, entry) in enumerate(patterns)]
    entries += [(f"cases[{key!r}]", entry) for key, entry in cases.items()]
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise BadResultFile(f"{path}: {where} is a {type(entry).__name__}, not an object")
        for name in THRESHOLD_FIELDS:
            if name in entry:
                number(entry[name], f"{where}.{name}")


def with_time_threshold(thresholds: dict, time: float) -> dict:
    """``thresholds`` with every case's time threshold set to ``time`` (floor included), as
    ``--benchmark-compare-fail=median:X%`` asks; memory thresholds stay."""
    fixed = json.loads(json.dumps(thresholds))
    fixed["floor"] = time
    fixed["default"]["time"] = time
    for entry in [*fixed.get("patterns", []), *fixed.get("cases", {}).values()]:
        entry.pop("time", None)
    return fixed


def threshold_for(thresholds: dict, key: str) -> dict:
    """``{"time", "memory", "memory_slack_mib"}`` for case ``key`` (case > pattern > default, >= floor)."""
    resolved = dict(thresholds["default"])
    patterns = [(entry["match"], entry) for entry in thresholds.get("patterns", [])]
    resolved.update({k: v for k, v in first_match(key, patterns, {}).items() if k != "match"})
    resolved.update(thresholds.get("cases", {}).get(key, {}))
    resolved["time"] = max(float(resolved["time"]), float(thresholds.get("floor", 0.0)))
    return resolved


def compare(baseline: Run, current: Run, thresholds: dict | None = None) -> Comparison:
    """Every verdict for ``current`` against ``baseline`` (comparability is the caller's check)."""
    thresholds = thresholds or load_thresholds(None)
    result = Comparison()
    if (missing := scipy_warning()) is not None:
        result.warnings.append(missing)
    result.missing = sorted(set(baseline.records) - set(current.records))
    result.new = sorted(set(current.records) - set(baseline.records))
    for key, rec in current.records.items():
        # Re-read from the recorded numbers rather than trusted from the run, so a guard fixed
        # since the run applies to it.
        for problem in guards.check(rec.info, current.machine):
            result.guard_failures.append(Verdict(key, "guard", problem))
    for key in sorted(set(baseline.records) & set(current.records)):
        base, cur = baseline.records[key], current.records[key]
        limit = threshold_for(thresholds, key)
        result.compared += 1
        if base.info.get("timing_mode") != cur.info.get("timing_mode"):
            result.notes.append(
                Verdict(
                    key,
                    "timing_mode_changed",
                    f"timed as {cur.info.get('timing_mode')!r}, baseline as {base.info.get('timing_mode')!r}: "
                    "not compared (refresh the baseline)",
                )
            )
            continue
        _compare_time(key, base, cur, limit, result)
        _compare_memory(key, base, cur, limit, result)
    return result


def _compare_time(key, base, cur, limit, result: Comparison) -> None:
    if base.median <= 0:
        return
    ratio = cur.median / base.median
    tol = limit["time"]
    if ratio > 1 + tol:
        p = mann_whitney_p(base.data, cur.data, "greater")
        if p is None or p < ALPHA:
            result.regressions.append(
                Verdict(
                    key,
                    "slower",
                    f"{ms(base.median)} -> {ms(cur.median)} ms ({ratio:.2f}x, limit {1 + tol:.2f}x{_p(p)})",
                )
            )
        else:
            result.notes.append(Verdict(key, "slower_not_significant", f"{ratio:.2f}x but p={p:.3f}: noise"))
    elif ratio < 1 / (1 + tol):
        p = mann_whitney_p(base.data, cur.data, "less")
        if p is None or p < ALPHA:
            result.improvements.append(
                Verdict(key, "faster", f"{ms(base.median)} -> {ms(cur.median)} ms ({ratio:.2f}x{_p(p)})")
            )


def _compare_memory(key, base, cur, limit, result: Comparison) -> None:
    b, c = base.peak_mib, cur.peak_mib
    slack = float(limit["memory_slack_mib"])
    change = memory_change(b, c, limit["memory"], slack)
    if change == "regressed":
        result.regressions.append(
            Verdict(
                key,
                "memory_up",
                f"peak {b:.0f} -> {c:.0f} MiB ({c / max(b, 1e-9):.2f}x, limit +{limit['memory']:.0%} +{slack:g} MiB)",
            )
        )
    elif change == "improved":
        result.improvements.append(Verdict(key, "memory_down", f"peak {b:.0f} -> {c:.0f} MiB"))


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds to four figures, "-" for none."""
    return "-" if seconds is None else f"{seconds * 1e3:.4g}"


def _p(p: float | None) -> str:
    return f", p={p:.1e}" if p is not None else ""


def flagged_slower(result: Comparison, confirming: int) -> list[Verdict]:
    """The slower cases that re-timings will judge (none when ``confirming`` is 0: they fail now);
    the rest of ``result.regressions`` fails as it stands."""
    return [v for v in result.regressions if confirming and v.kind == "slower"]


def format_comparison(result: Comparison, baseline: Run, current: Run, *, confirming: int = 0) -> str:
    """The verdicts as text. ``confirming``: the re-timings that will judge the slower cases
    (:mod:`.confirm`), which are then listed as flagged, not as regressions."""
    lines = [f"Compared {result.compared} cases of {current.path} against {baseline.path} ({current.gpu})."]
    lines += [f"  warning: {w}" for w in result.warnings]
    flagged = flagged_slower(result, confirming)
    regressions = [v for v in result.regressions if v not in flagged]
    for title, items in (
        ("GUARD FAILURES (silent fallback or broken harness)", result.guard_failures),
        ("REGRESSIONS", regressions),
        (f"Flagged slower, to be confirmed in up to {confirming} fresh processes", flagged),
        ("Improvements beyond threshold (refresh the baseline: nox -s perf -- --record)", result.improvements),
        ("Notes", result.notes),
    ):
        if items:
            lines.append(f"{title}: {len(items)}")
            lines += [f"  {v.key}: {v.message}" for v in items]
    if result.missing:
        causes = "skipped, failed, filtered or cut by the time budget"
        lines.append(f"In the baseline but not run ({causes}): {len(result.missing)}")
        lines += [f"  {k}" for k in result.missing[:20]] + (["  ..."] if len(result.missing) > 20 else [])
    if result.new:
        lines.append(f"New cases, not in the baseline: {len(result.new)}")
    verdict = "FAIL" if regressions or result.guard_failures else "FLAGGED" if flagged else "PASS"
    lines.append(
        f"{verdict}: {len(regressions)} regression(s), {len(result.guard_failures)} guard failure(s), "
        + (f"{len(flagged)} flagged to confirm, " if flagged else "")
        + f"{len(result.improvements)} improvement(s)"
    )
    return "\n".join(lines)


def spread(runs: list[Run]) -> dict[str, dict]:
    """Per case present in at least two runs (a run cut short by its time limit still counts for
    the cases it finished): run-to-run deviation of the median and within-run IQR."""
    if len(runs) < 2:
        raise ValueError("measuring spread takes at least two runs")
    keys = {key for run in runs for key in run.records}
    out = {}
    for key in sorted(keys):
        present = [r for r in runs if key in r.records]
        if len(present) < 2:
            continue
        medians = [r.records[key].median for r in present]
        center = statistics.median(medians)
        if center <= 0:
            continue
        iqrs = []
        for r in present:
            data = r.records[key].data
            if len(data) >= 4:
                q = statistics.quantiles(data, n=4)
                iqrs.append((q[2] - q[0]) / center)
        peaks = [r.records[key].peak_mib for r in present if r.records[key].peak_mib is not None]
        out[key] = {
            "runs": len(present),
            "medians_ms": [m * 1e3 for m in medians],
            "max_rel_dev": max(abs(m / center - 1) for m in medians),
            "rel_iqr": statistics.median(iqrs) if iqrs else None,
            "peak_mib_range": [min(peaks), max(peaks)] if peaks else None,
        }
    return out


def case_kind(info: dict) -> str:
    """The kind of a case, as its noise goes: ``"family dtype direction graph|eager"``, e.g.
    ``"sdpa bf16 fwd+bwd eager"`` or ``"flex fp32 fwd graph"`` (from its ``extra_info``)."""
    timing = "graph" if graph_timed(info) else "eager"
    return f"{info.get('family', '?')} {info.get('dtype', '?')} {info.get('direction', '?')} {timing}"


def kind_floors(per_case: dict[str, dict], kinds: dict[str, str], k: float = SPREAD_K) -> dict[str, dict]:
    """Per kind with at least :data:`MIN_KIND_CASES` measured cases (``per_case``: :func:`spread`'s
    output; ``kinds``: case key -> :func:`case_kind`): ``{"time": k x median max_rel_dev, "cases",
    "median_dev"}``."""
    devs: dict[str, list[float]] = {}
    for key, s in per_case.items():
        if key in kinds:
            devs.setdefault(kinds[key], []).append(s["max_rel_dev"])
    out = {}
    for kind, values in sorted(devs.items()):
        if len(values) >= MIN_KIND_CASES:
            median = statistics.median(values)
            out[kind] = {"time": round(k * median, 4), "cases": len(values), "median_dev": round(median, 5)}
    return out


def thresholds_from_spread(
    runs: list[Run],
    *,
    k: float = SPREAD_K,
    floor: float | None = None,
    min_effect: Callable[[str], float] | None = None,
) -> dict:
    """Per-case time thresholds from measured run-to-run spread: ``max(floor, k x max deviation,
    kind floor)`` (:func:`kind_floors`), and never below the case's ``min_effect`` (the A/B's
    minimum effects, the packaged min_effects.json): a case whose speed varies between
    compilations (docs/design.md#between-compile-offsets) can look steady over a few runs and
    still move that much in the next process.

    Cases measured here get their own entry; the default for cases not measured is the 90th
    percentile of the measured ones (never below the floor), so a new case is not held to a
    tighter limit than its neighbours.
    """
    per_case = spread(runs)
    kinds = {key: case_kind(rec.info) for run in runs for key, rec in run.records.items()}
    thresholds = derive_thresholds(per_case, kinds, k=k, floor=floor, min_effect=min_effect)
    thresholds["measured"] = {
        "runs": len(runs),
        "k": k,
        "gpu": runs[0].gpu,
        "torch": runs[0].machine.get("torch"),
        "files": [r.path for r in runs],
        "spread": per_case,
        **thresholds["measured"],  # the kinds' floors
    }
    return thresholds


def derive_thresholds(
    per_case: dict[str, dict],
    kinds: dict[str, str],
    *,
    k: float = SPREAD_K,
    floor: float | None = None,
    min_effect: Callable[[str], float] | None = None,
) -> dict:
    """:func:`thresholds_from_spread`'s rule on a spread already measured (``per_case``, as
    :func:`spread` gives it, e.g. a thresholds file's ``measured.spread``; ``kinds``: case key ->
    :func:`case_kind`). ``measured`` holds only the kinds' floors."""
    floor = DEFAULT_THRESHOLDS["floor"] if floor is None else floor
    least = min_effect or (lambda key: 0.0)
    by_kind = kind_floors(per_case, kinds, k)

    def time(key: str, s: dict) -> float:
        kind_floor = by_kind.get(kinds.get(key, ""), {}).get("time", 0.0)
        return round(max(floor, k * s["max_rel_dev"], least(key), kind_floor), 4)

    cases = {key: {"time": time(key, s)} for key, s in per_case.items()}
    times = sorted(c["time"] for c in cases.values())
    default_time = times[int(0.9 * (len(times) - 1))] if times else DEFAULT_THRESHOLDS["default"]["time"]
    thresholds = json.loads(json.dumps(DEFAULT_THRESHOLDS))
    thresholds["floor"] = floor
    thresholds["default"]["time"] = max(floor, default_time)
    thresholds["cases"] = cases
    thresholds["measured"] = {"kinds": by_kind}
    return thresholds


def format_spread(thresholds: dict, planted: float = 0.15) -> str:
    measured = thresholds.get("measured", {})
    per_case = measured.get("spread", {})
    cases = thresholds.get("cases", {})
    lines = [
        f"Run-to-run spread over {measured.get('runs')} runs ({measured.get('gpu')}); threshold = "
        f"max(floor {thresholds['floor']:.0%}, {measured.get('k')} x max deviation of a run's median, "
        "the kind's floor, the case's A/B minimum effect):"
    ]
    worst = sorted(per_case.items(), key=lambda kv: -kv[1]["max_rel_dev"])
    for key, s in worst[:15]:
        lines.append(f"  {s['max_rel_dev']:6.1%} dev  -> {cases[key]['time']:5.1%}  {key}")
    if kinds := measured.get("kinds"):
        lines.append(f"Kind floors ({measured.get('k')} x the median deviation of the kind's cases):")
        lines += [f"  {v['time']:6.1%}  {kind} ({v['cases']} cases)" for kind, v in kinds.items()]
    blind = [k for k, c in cases.items() if c["time"] >= planted]
    lines.append(
        f"{len(cases)} cases; default threshold {thresholds['default']['time']:.1%}; "
        f"{len(blind)} case(s) too noisy to catch a {planted:.0%} slowdown"
        + (": " + ", ".join(blind[:10]) + (" ..." if len(blind) > 10 else "") if blind else "")
    )
    return "\n".join(lines)
