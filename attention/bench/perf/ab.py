"""Same-run A/B verdicts: two revisions' timing samples of one case -> regressed, improved or unchanged.

Method:

* Both revisions ("base" and "head") are timed in one process on one GPU, both in every round,
  back to back, in alternating order (base-head, head-base, ...): clock boosts, thermal drift and
  neighbours on the machine then hit both sides alike, so the comparison carries no run-to-run
  noise and needs no stored baseline or hand-tuned threshold per GPU.
* The effect is the median over rounds of the per-round ratio ``head[i] / base[i]``. Pairing
  the rounds cancels drift that moves both sides of a round (a long training step's clocks
  wander by several percent over its rounds, its two sides within a round by a fraction of one:
  docs/design.md#paired-rounds); the median shrugs off the occasional slow round (a preemption,
  a late clock ramp) that would drag a mean.
* Its uncertainty is the distribution-free interval of a median (:func:`.stats.ratio_interval`):
  two order statistics of the ratios, chosen from the binomial distribution so that the interval
  covers the true median ratio at least ``level`` of the time for independent rounds. No
  distributional assumption, no resampling; the same samples always give the same interval.
* A case regressed when the whole interval lies above ``1 + min_effect``: significance alone would
  flag a real but negligible 0.3% change in a quiet run; ``min_effect`` is the smallest change
  worth a red gate. Improvements mirror this below ``1 - min_effect``.
* ``detectable`` (the interval's larger half-width around the ratio) is the run's resolution:
  a case with ``detectable = 0.04`` could not have shown a 2% regression, however real. The
  report lists these blind spots rather than letting a noisy case pass silently.
* The sign test's two-sided p-value (how lopsided the split of ratios above and below 1 is) is
  reported alongside, never gated on.
"""

from __future__ import annotations

import json
import os
import statistics
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ...checks import is_finite
from ..files import write_atomically
from .case_patterns import check_patterns, first_match
from .results import GRAPH
from .stats import DEFAULT_LEVEL, RatioInterval, memory_change, ratio_interval

DEFAULT_MIN_EFFECT = 0.02
STATUSES = ("regressed", "improved", "unchanged", "error", "base_only", "head_only")
#: The minimum effect per case pattern, shipped beside this module: read by the A/B (unless
#: ``--perf-min-effects FILE`` names another) and, as floors, by baseline thresholds.
MIN_EFFECTS_FILE = Path(__file__).with_name("min_effects.json")
#: The refusal of a gate that compared nothing (every selected case skipped, failed or not reached).
NOTHING_COMPARED = ("all cases", "nothing was compared: every selected case was skipped, failed or not reached")


@dataclass(frozen=True)
class CaseVerdict:
    key: str
    status: str  # one of STATUSES
    interval: RatioInterval | None
    min_effect: float
    base_peak_mib: float | None = None
    head_peak_mib: float | None = None
    memory_status: str = "unchanged"  # "regressed" / "improved" / "unchanged" / "unknown"
    message: str = ""
    timing_mode: str | None = None  # GRAPH or "eager: ..." as the run timed it

    @property
    def failed(self) -> bool:
        """Memory counts on its own: a kernel that got no slower but doubled its workspace still
        fails the gate."""
        return self.status in ("regressed", "error") or self.memory_status == "regressed"


def _pct(x: float) -> str:
    return f"{x:.1%}" if abs(x) >= 0.01 else f"{x:.2%}"


def _interval_text(iv: RatioInterval) -> str:
    p = "" if iv.p_value is None else f", p={iv.p_value:.2g}"
    return f"{iv.ratio:.3f}x [{iv.low:.3f}, {iv.high:.3f}] {iv.level:.0%}{p}, could detect ±{_pct(iv.detectable)}"


def regressed(iv: RatioInterval, min_effect: float) -> bool:
    """The gate's rule: the whole interval of the median ratio head / base lies above ``1 + min_effect``
    (the calibration, :mod:`.calibration`, applies it at other minimum effects too)."""
    return iv.low > 1 + min_effect


def judge(
    key: str,
    base: Sequence[float] | None,
    head: Sequence[float] | None,
    *,
    min_effect: float = DEFAULT_MIN_EFFECT,
    level: float = DEFAULT_LEVEL,
    base_peak_mib: float | None = None,
    head_peak_mib: float | None = None,
) -> CaseVerdict:
    """One case's verdict. ``None`` samples mean the case exists on one side only (listed, not
    failed); unusable samples give an "error" verdict rather than an exception, so one broken case
    does not hide the others.

    Improvement uses ``1 - min_effect`` rather than ``1 / (1 + min_effect)``: slightly stricter,
    so a claimed speed-up is never weaker than the regression bar mirrored."""
    if base is None and head is None:
        raise ValueError(f"{key}: no samples on either side")
    mem = memory_change(base_peak_mib, head_peak_mib)
    peaks = dict(base_peak_mib=base_peak_mib, head_peak_mib=head_peak_mib, memory_status=mem)
    if base is None or head is None:
        status = "head_only" if base is None else "base_only"
        return CaseVerdict(key, status, None, min_effect, **peaks, message=f"only in {status.split('_')[0]}")
    try:
        iv = ratio_interval(base, head, level=level)
    except ValueError as exc:
        return CaseVerdict(key, "error", None, min_effect, **peaks, message=str(exc))
    if regressed(iv, min_effect):
        status = "regressed"
    elif iv.high < 1 - min_effect:
        status = "improved"
    else:
        status = "unchanged"
    message = _interval_text(iv)
    if base_peak_mib is not None and head_peak_mib is not None:
        message += f"; peak {base_peak_mib:.0f} -> {head_peak_mib:.0f} MiB"
        message += f" (memory {mem})" if mem != "unchanged" else ""
    return CaseVerdict(key, status, iv, min_effect, **peaks, message=message)


@dataclass(frozen=True)
class MinEffects:
    default: float = DEFAULT_MIN_EFFECT
    patterns: tuple[tuple[str, float], ...] = ()

    def for_case(self, key: str) -> float:
        """First matching pattern wins, so specific patterns go before broad ones in the file."""
        return first_match(key, self.patterns, self.default)


def _fraction(value: object, where: str) -> float:
    ok = is_finite(value)
    if not ok or not 0 <= value < 1:
        raise ValueError(f"{where}: must be a number in [0, 1), got {value!r}")
    return float(value)


def load_min_effects(path: str | Path) -> MinEffects:
    """Per-case minimum effects; strict, since a typo in a gate's config must not silently loosen it."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    if unknown := sorted(set(doc) - {"version", "default", "patterns"}):
        raise ValueError(f"{path}: unknown field(s) {unknown}")
    if doc.get("version") != 1:
        raise ValueError(f"{path}: field 'version': expected 1, got {doc.get('version')!r}")
    default = _fraction(doc.get("default", DEFAULT_MIN_EFFECT), f"{path}: field 'default'")
    patterns = [
        (match, _fraction(entry.get("min_effect"), f"{path}: patterns[{i}]: field 'min_effect'"))
        for i, (match, entry) in enumerate(check_patterns(doc.get("patterns", []), str(path), ("min_effect",)))
    ]
    return MinEffects(default, tuple(patterns))


@dataclass
class ABReport:
    base_rev: str
    head_rev: str
    gpu: str
    level: float
    verdicts: list[CaseVerdict]
    warnings: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # cases the base revision could not build

    @property
    def failed(self) -> bool:
        return bool(self.refused) or any(v.failed for v in self.verdicts)

    def counts(self) -> dict[str, int]:
        """Every time status (zeros included, so tables line up), plus memory regressions and improvements."""
        counts = dict.fromkeys(STATUSES, 0)
        for v in self.verdicts:
            counts[v.status] += 1
        counts["memory_regressed"] = sum(v.memory_status == "regressed" for v in self.verdicts)
        counts["memory_improved"] = sum(v.memory_status == "improved" for v in self.verdicts)
        return counts


def detectable_summary(
    verdicts: Iterable[CaseVerdict], *, predicate: Callable[[CaseVerdict], bool] | None = None
) -> tuple[float, float] | None:
    """(median, worst) ``detectable`` over the compared cases: the gate's resolution in this run."""
    values = [v.interval.detectable for v in verdicts if v.interval and (predicate is None or predicate(v))]
    return (statistics.median(values), max(values)) if values else None


def _graph_timed(v: CaseVerdict) -> bool:
    return v.timing_mode == GRAPH


def markdown_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def _verdict_label(v: CaseVerdict) -> str:
    if v.memory_status not in ("regressed", "improved"):
        return v.status.replace("_", "-")
    memory = f"memory {v.memory_status}"
    return memory if v.status == "unchanged" else f"{v.status}, {memory}"


def _table(verdicts: Sequence[CaseVerdict], level: float) -> list[str]:
    rows = [
        f"| case | verdict | ratio | {level:.0%} interval | min effect | detectable | p | peak MiB |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for v in verdicts:
        iv = v.interval
        ratio, interval, detect, p = "—", "—", "—", "—"
        if iv is not None:
            ratio, interval, detect = f"{iv.ratio:.3f}x", f"[{iv.low:.3f}, {iv.high:.3f}]", f"±{_pct(iv.detectable)}"
            p = "—" if iv.p_value is None else f"{iv.p_value:.2g}"
        peak = "—"
        if v.base_peak_mib is not None and v.head_peak_mib is not None:
            peak = f"{v.base_peak_mib:.0f} → {v.head_peak_mib:.0f}"
            if v.base_peak_mib > 0:
                peak += f" ({v.head_peak_mib / v.base_peak_mib - 1:+.0%})"
        label = _verdict_label(v) + (f": {v.message}" if v.status == "error" else "")
        key, label = f"`{markdown_cell(v.key)}`", markdown_cell(label)
        cells = [key, label, ratio, interval, f"±{_pct(v.min_effect)}", detect, p, peak]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def summary_markdown(report: ABReport) -> str:
    """The PR comment: what changed first, everything else folded away, then what the run could not see."""
    counts = report.counts()
    verdicts = sorted(report.verdicts, key=lambda v: v.key)
    notable = [
        v
        for v in verdicts
        if v.status in ("regressed", "improved", "error") or v.memory_status in ("regressed", "improved")
    ]
    notable.sort(key=lambda v: (not v.failed, v.key))  # failures on top
    head = "❌ regressions" if report.failed else "✅ no regressions"
    lines = [f"### Same-run A/B `{report.base_rev}` → `{report.head_rev}` on {report.gpu}: {head}", ""]
    shown = [f"{counts[s]} {s.replace('_', '-')}" for s in STATUSES if counts[s] or s in ("regressed", "unchanged")]
    shown += [f"{counts[m]} {m.replace('_', ' ')}" for m in ("memory_regressed", "memory_improved") if counts[m]]
    lines += [" · ".join(shown) + f" ({report.level:.0%} intervals of the median per-round ratio head / base)", ""]
    if notable:
        lines += ["#### Regressions and improvements", "", *_table(notable, report.level), ""]
    else:
        lines += ["No case changed beyond its minimum effect.", ""]
    compared = [v for v in verdicts if v.status not in ("base_only", "head_only")]
    if compared:
        lines += [f"<details><summary>All {len(compared)} compared cases</summary>", ""]
        lines += [*_table(compared, report.level), "", "</details>", ""]
    for status, label in (("base_only", "Base-only"), ("head_only", "Head-only")):
        if keys := [v.key for v in verdicts if v.status == status]:
            lines += [f"{label} (listed, not failed): " + ", ".join(f"`{k}`" for k in keys), ""]
    if blind := detectable_summary(verdicts):
        worst = max((v for v in verdicts if v.interval), key=lambda v: v.interval.detectable)
        lines += [
            f"Blind spots: changes below ±{_pct(blind[0])} (median case) and ±{_pct(blind[1])} "
            f"(worst, `{worst.key}`) were not detectable in this run.",
            "",
        ]
        for label, graphed in (("graph-timed", True), ("eager", False)):
            if by_mode := detectable_summary(verdicts, predicate=lambda v, g=graphed: _graph_timed(v) == g):
                n = sum(1 for v in verdicts if v.interval and _graph_timed(v) == graphed)
                lines.append(f"- {label} cases ({n}): detectable ±{_pct(by_mode[0])} median, ±{_pct(by_mode[1])} worst")
        lines.append("")
    if report.refused:
        lines += ["**The base revision could not build** (the gate fails):", ""]
        lines += [*(f"- {r}" for r in report.refused), ""]
    if report.warnings:
        lines += ["**Warnings**", "", *(f"- {w}" for w in report.warnings), ""]
    return "\n".join(lines).rstrip() + "\n"


_COLORS = {"regressed": "tab:red", "improved": "tab:green"}


def plot_ratios(report: ABReport, path: str | Path) -> Path:
    """Every case's ratio and interval on one page, so a reviewer sees at a glance which cases moved
    and which were too noisy to judge. Uses a bare Figure: no pyplot, no global backend switch."""
    from matplotlib.figure import Figure

    path = Path(path)
    cases = sorted((v for v in report.verdicts if v.interval is not None), key=lambda v: v.key)
    fig = Figure(figsize=(10, 1.6 + 0.26 * max(len(cases), 1)), layout="constrained")
    ax = fig.add_subplot()
    for y, v in enumerate(cases):
        iv = v.interval
        ax.errorbar(
            iv.ratio,
            y,
            xerr=[[iv.ratio - iv.low], [iv.high - iv.ratio]],
            fmt="o",
            markersize=4,
            capsize=2,
            color=_COLORS.get(v.status, "tab:gray"),
        )
    ax.axvline(1.0, color="black", linewidth=0.8)
    for m in sorted({v.min_effect for v in cases}):
        for x in (1 - m, 1 + m):
            ax.axvline(x, color="gray", linestyle="--", linewidth=0.7)
    labels = [v.key + (" [memory regressed]" if v.memory_status == "regressed" else "") for v in cases]
    ax.set_yticks(range(len(cases)), labels, fontsize=8)
    ax.set_ylim(max(len(cases), 1) - 0.5, -0.5)  # first key at the top
    ax.set_xlabel("median of per-round head / base   (< 1: head faster)")
    ax.grid(axis="x", alpha=0.3)
    title = f"{report.base_rev} → {report.head_rev} on {report.gpu}: {report.level:.0%} intervals, dashed: ±min effect"
    ax.set_title(textwrap.fill(title, 110), fontsize=9, loc="left")
    if not cases:
        ax.text(0.5, 0.5, "no compared cases", transform=ax.transAxes, ha="center", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def report_from_cases(
    cases: Iterable[tuple[str, Sequence[float], dict]],
    *,
    base_rev: str,
    head_rev: str,
    gpu: str,
    min_effects: MinEffects | None = None,
    level: float = DEFAULT_LEVEL,
    base_only: Iterable[str] = (),
    refused: Iterable[tuple[str, str]] = (),
    not_compared: Iterable[tuple[str, str]] = (),
    warnings: Iterable[str] = (),
) -> ABReport:
    """The report of an A/B run: ``cases`` are ``(key, head samples in seconds, extra_info)`` as
    the perf runner records them, the base side under ``extra_info["ab"]``; ``base_only`` names
    what only the base revision has (listed, not failed); ``refused`` the cases the base could not
    build (they fail the gate); ``not_compared`` the selected cases that were skipped, failed or
    never reached, with why."""
    cases = list(cases)
    min_effects = min_effects or MinEffects()
    verdicts = []
    for key, head, info in cases:
        ab = info.get("ab") or {}
        base = ab.get("data") if ab.get("base") == "timed" else None
        verdict = judge(
            key,
            base,
            head,
            min_effect=min_effects.for_case(key),
            level=level,
            base_peak_mib=ab.get("peak_mem_mib"),
            head_peak_mib=info.get("peak_mem_mib"),
        )
        verdicts.append(replace(verdict, timing_mode=info.get("timing_mode")))
    verdicts += [
        CaseVerdict(key, "base_only", None, min_effects.for_case(key), message="only in base") for key in base_only
    ]
    refused = [f"{key}: {why}" for key, why in refused]
    notes = list(warnings)
    notes += [f"not compared: {key}: {why}" for key, why in not_compared]
    for key, _, info in cases:
        base_mode = (info.get("ab") or {}).get("timing_mode")
        if base_mode and base_mode != info.get("timing_mode"):
            notes.append(f"{key}: base timed as {base_mode!r}, head as {info.get('timing_mode')!r}")
    return ABReport(base_rev, head_rev, gpu, level, verdicts, notes, refused)


def report_from_json(doc: dict) -> ABReport:
    """The report :func:`write_outputs` saved as ``ab.json``."""
    verdicts = [
        CaseVerdict(**dict(v, interval=RatioInterval(**v["interval"]) if v.get("interval") else None))
        for v in doc["verdicts"]
    ]
    return ABReport(
        doc["base"], doc["head"], doc["gpu"], doc["level"], verdicts, list(doc["warnings"]), list(doc["refused"])
    )


def merge_reports(reports: Sequence[ABReport], refused: Iterable[str] = ()) -> ABReport:
    """One report from the reports of a run's shards (one per GPU): every verdict once (each
    shard lists the base-only implementations), warnings once, every refusal plus ``refused``;
    "nothing was compared" only if every shard said so."""
    if not reports:
        raise ValueError("no reports to merge")
    first = reports[0]
    verdicts = list({(v.key, v.status): v for r in reports for v in r.verdicts}.values())
    nothing = ": ".join(NOTHING_COMPARED)
    merged_refused = [x for r in reports for x in r.refused if x != nothing] + list(refused)
    if all(nothing in r.refused for r in reports):
        merged_refused.append(nothing)
    warnings = list(dict.fromkeys(w for r in reports for w in r.warnings))
    return ABReport(first.base_rev, first.head_rev, first.gpu, first.level, verdicts, warnings, merged_refused)


def verdict_lines(report: ABReport) -> list[str]:
    """One line per regressed, improved or broken case, then the tally: what a terminal shows last."""
    lines = [
        f"{_verdict_label(v).upper()}: {v.key}: {v.message}"
        for v in sorted(report.verdicts, key=lambda v: (not v.failed, v.key))
        if v.status in ("regressed", "improved", "error") or v.memory_status in ("regressed", "improved")
    ]
    lines += [f"REFUSED: {r}" for r in report.refused]
    lines += [f"WARNING: {w}" for w in report.warnings]
    counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in report.counts().items() if n)
    verdict = "FAIL" if report.failed else "PASS"
    lines.append(f"A/B {report.base_rev} -> {report.head_rev} on {report.gpu}: {verdict} ({counts})")
    return lines


def write_outputs(report: ABReport, out: str | Path) -> list[Path]:
    """``ab.png`` (when matplotlib is installed), ``summary.md`` (also appended to
    ``$GITHUB_STEP_SUMMARY`` when set) and ``ab.json`` (every verdict) under ``out``; the plot
    first, so what it could not draw is in the other two."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        written.append(plot_ratios(report, out / "ab.png"))
    except ImportError:
        report.warnings.append("matplotlib not installed: no ab.png (pip install 'attention-suite[bench]')")
    except Exception as exc:  # a plot must never cost the verdict
        report.warnings.append(f"ab.png not drawn: {type(exc).__name__}: {exc}")
    markdown = summary_markdown(report)
    doc = {
        "base": report.base_rev,
        "head": report.head_rev,
        "gpu": report.gpu,
        "level": report.level,
        "failed": report.failed,
        "counts": report.counts(),
        "warnings": report.warnings,
        "refused": report.refused,
        "verdicts": [asdict(v) for v in report.verdicts],
    }
    for name, text in (("summary.md", markdown), ("ab.json", json.dumps(doc, indent=1) + "\n")):
        write_atomically(out / name, text)
        written.append(out / name)
    if step_summary := os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(step_summary, "a") as f:
            f.write(markdown + "\n")
    return written
