"""The same-run A/B gate, measured on this GPU: its false alarms and its power to catch a known
slowdown, per case and per kind of case (docs/design.md#gate-calibration).

Everything here works on recorded samples (a calibration run's JSON), so it runs, and is tested,
without a GPU. :func:`.runner.run_calibration_case` times the variants, :mod:`.spin` injects the
work, ``python -m attention.bench.perf calibrate`` (:mod:`.calibrate`) runs it all.

Method:

* Per case, in one process, rounds rotated: A, the working tree's build (the gate's head); A', a
  second build of the same case (the A/A twin, where the A/B has its base revision); A'+x for each
  x in :data:`LEVELS`: A' followed by a spin of x times the case's own time, inside the timed
  region. Each variant gets ``depth`` times the rounds the A/B would take for this case.
* Gate-sized pairs: the rounds are cut into ``depth`` consecutive runs of the gate's own round
  count, every variant's j-th run covering the same stretch of time, as one A/B's rounds do. Each
  run gives two A/A tests (A' as head over A, and A as head over A': the gate flags at most one of
  the two, so each orientation is a test of its own) and one pair A'+x over A per level.
* Every pair goes through the gate's own code: the paired-ratio interval of :mod:`.stats` at the
  gate's level (round i of one variant paired with round i of the other, as the A/B pairs base and
  head), judged by :func:`.ab.regressed` (the rule :func:`.ab.judge` applies) at the case's
  minimum effect from ``min_effects.json`` and at others. No copy of the rule lives here.
* A false alarm is an A/A test flagged as regressed; the power at x is the share of A'+x pairs
  flagged. The share reported is the one measured, the median over all the case's rounds of
  (A'+x) / A' in the round, minus 1, never the nominal x; a share below what the spin can add to a short case (its
  floor, :mod:`.spin`) is not injected, and is listed.
* Kinds: graph-timed or eager, times fwd, fwd+bwd or decode (:func:`kind_of`). A kind pools its
  cases' pairs; the plugin gives each case the depth that brings every kind of the selection to
  at least ``pairs`` A/A tests (:func:`depth_for`), up to a cap.
* The minimum effect this GPU supports at false-alarm rate ``alpha``, per kind: the smallest
  minimum effect, in steps of 0.1%, at which at most floor(alpha * n) of the kind's n A/A tests
  would be flagged (:func:`supported_min_effect`), with a one-sided 95% Clopper-Pearson bound on
  the rate there (:func:`rate_upper_bound`). Power is reported there and at the cases' configured
  minimum effects.

What it does not see: the twin shares the head's compiled kernels, so offsets between two
compilations of one kernel (docs/design.md#between-compile-offsets) are not among its false
alarms; the per-pattern minimum effects that cover them stay in force.
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomically
from . import ab
from .results import Record, Run, graph_timed
from .runner import CAPTURE_FAILED, MIN_ROUNDS, TOO_LARGE_TO_CAPTURE, captures
from .stats import DEFAULT_LEVEL, RatioInterval, paired_ratio, ratio_interval

#: Injected slowdowns, as shares of each case's own time.
LEVELS = (0.01, 0.02, 0.03, 0.05)
DEFAULT_ALPHA = 0.01
#: A/A tests per kind of case the plugin plans for (two per gate-sized run).
DEFAULT_PAIRS = 100
#: The most gate-sized runs one case is timed for, however few cases its kind has.
DEFAULT_MAX_DEPTH = 8
TARGET_POWER = 0.90
#: What the calibration checks: (injected share, which kinds must catch it with TARGET_POWER).
POWER_TARGETS = ((0.02, "graph"), (0.03, "every"))
#: Minimum effects are reported in steps of this size.
STEP = 0.001
CONFIDENCE = 0.95
KIND_ORDER = ("graph fwd", "graph decode", "graph fwd+bwd", "eager fwd", "eager decode", "eager fwd+bwd")
FILES = ("calibration.json", "calibration.md", "calibration.png")


def kind_label(*, graph: bool, decode: bool, backward: bool) -> str:
    what = "decode" if decode else "fwd+bwd" if backward else "fwd"
    return f"{'graph' if graph else 'eager'} {what}"


def predicted_kind(*, decode: bool, backward: bool, graphs: str, cuda: bool) -> str:
    """The kind a case will be timed as, before it runs: the graph policy (``--perf-graphs``) on CUDA.
    A capture that fails, or a case too large to capture, is timed eagerly: :func:`kind_of` then
    files it by what happened."""
    graph = cuda and captures(graphs, backward)
    return kind_label(graph=graph, decode=decode, backward=backward)


def kind_of(info: dict) -> str:
    """The kind a case was timed as, from its ``extra_info``."""
    return kind_label(
        graph=graph_timed(info),
        decode=info.get("kind") == "decode",
        backward=info.get("direction") == "fwd+bwd",
    )


def depth_for(cases_of_kind: int, pairs: int, max_depth: int) -> int:
    """Gate-sized runs per case so that a kind of ``cases_of_kind`` cases reaches ``pairs`` A/A tests
    (two a run), at least 1, at most ``max_depth``."""
    return max(1, min(max_depth, math.ceil(pairs / (2 * max(cases_of_kind, 1)))))


def supported_min_effect(excess: Sequence[float], alpha: float, step: float = STEP) -> float | None:
    """The smallest minimum effect (a multiple of ``step``) at which at most ``floor(alpha * n)`` of
    ``n`` A/A tests are flagged; ``excess`` holds each test's interval low minus 1 (flagged at
    minimum effect m when above m). ``None`` without tests."""
    n = len(excess)
    if n == 0:
        return None
    allowed = math.floor(alpha * n + 1e-9)
    if allowed >= n:
        return 0.0
    worst = sorted(excess, reverse=True)[allowed]  # flagging it too would be one alarm too many
    return max(0.0, math.ceil(round(worst / step, 6)) * step)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def log_term(i: int) -> float:
        return log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q

    return min(1.0, sum(math.exp(log_term(i)) for i in range(k + 1)))


def rate_upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float | None:
    """One-sided Clopper-Pearson upper bound on a rate seen ``k`` times in ``n`` trials: the rate at
    which ``k`` or fewer would be seen with probability ``1 - confidence``. ``None`` for ``n = 0``."""
    if n == 0:
        return None
    if k >= n:
        return 1.0
    low, high = k / n, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if _binomial_cdf(k, n, mid) > 1 - confidence:
            low = mid
        else:
            high = mid
    return high


def _share(k: int, n: int) -> float | None:
    return k / n if n else None


@dataclass
class Injection:
    """One injected share of one case: what was asked, what the spin was expected to add, what was
    measured, and the gate-sized pairs A'+x over A."""

    level: float
    target_s: float | None = None
    expected_s: float | None = None
    achieved: float | None = None  # median over every round of (A'+x) / A', minus 1
    pairs: list[RatioInterval] = field(default_factory=list)
    reason: str = ""  # why it was not injected

    @property
    def injected(self) -> bool:
        return not self.reason


@dataclass
class CaseResult:
    key: str
    kind: str
    timing_mode: str
    min_effect: float  # the case's configured minimum effect
    median_s: float
    gate_rounds: int
    depth: int
    aa: list[RatioInterval]
    injections: dict[float, Injection]
    notes: list[str] = field(default_factory=list)

    def aa_flagged(self, min_effect: float | None = None) -> int:
        m = self.min_effect if min_effect is None else min_effect
        return sum(ab.regressed(iv, m) for iv in self.aa)

    def caught(self, level: float, min_effect: float | None = None) -> int:
        m = self.min_effect if min_effect is None else min_effect
        inj = self.injections.get(level)
        return sum(ab.regressed(iv, m) for iv in inj.pairs) if inj else 0


@dataclass
class LevelPower:
    level: float
    cases: int = 0  # cases injected at this level
    pairs: int = 0
    flagged_supported: int = 0
    flagged_configured: int = 0
    achieved: list[float] = field(default_factory=list)
    not_injected: int = 0

    @property
    def power_supported(self) -> float | None:
        return _share(self.flagged_supported, self.pairs)

    @property
    def power_configured(self) -> float | None:
        return _share(self.flagged_configured, self.pairs)

    @property
    def achieved_median(self) -> float | None:
        return statistics.median(self.achieved) if self.achieved else None


@dataclass
class KindSummary:
    kind: str
    cases: int
    aa_tests: int
    flagged_configured: int  # A/A tests flagged at the cases' own minimum effects
    supported: float | None  # the smallest minimum effect keeping false alarms at or below alpha
    flagged_supported: int
    predicted: float | None  # median "could detect" of the A/A intervals: the A/B's own prediction
    levels: dict[float, LevelPower]
    no_alarm: float | None = None  # the smallest minimum effect at which no A/A test is flagged

    @property
    def false_alarm_configured(self) -> float | None:
        return _share(self.flagged_configured, self.aa_tests)

    @property
    def false_alarm_supported(self) -> float | None:
        return _share(self.flagged_supported, self.aa_tests)

    @property
    def false_alarm_bound(self) -> float | None:
        return rate_upper_bound(self.flagged_supported, self.aa_tests)


def summarize(kind: str, cases: Sequence[CaseResult], alpha: float) -> KindSummary:
    """One kind's (or, for ``"all"``, every case's) pooled false alarms, supported minimum effect and power."""
    aa = [iv for c in cases for iv in c.aa]
    supported = supported_min_effect([iv.low - 1 for iv in aa], alpha)
    m = supported if supported is not None else 0.0
    levels = {}
    for level in sorted({lv for c in cases for lv in c.injections}):
        power = LevelPower(level)
        for c in cases:
            inj = c.injections.get(level)
            if inj is None:
                continue
            if not inj.injected:
                power.not_injected += 1
                continue
            power.cases += 1
            power.pairs += len(inj.pairs)
            power.flagged_supported += c.caught(level, m)
            power.flagged_configured += c.caught(level)
            if inj.achieved is not None:
                power.achieved.append(inj.achieved)
        levels[level] = power
    return KindSummary(
        kind=kind,
        cases=len(cases),
        aa_tests=len(aa),
        flagged_configured=sum(c.aa_flagged() for c in cases),
        supported=supported,
        flagged_supported=sum(c.aa_flagged(m) for c in cases),
        predicted=statistics.median(iv.detectable for iv in aa) if aa else None,
        levels=levels,
        no_alarm=supported_min_effect([iv.low - 1 for iv in aa], 0.0),
    )


def _slices(samples: Sequence[float], rounds: int, runs: int) -> list[Sequence[float]]:
    return [samples[j * rounds : (j + 1) * rounds] for j in range(runs)]


def analyze_case(
    key: str, head: Sequence[float], info: dict, *, min_effect: float, level: float = DEFAULT_LEVEL
) -> CaseResult:
    """One case's gate-sized pairs from its run record: ``head`` is the benchmark's samples (A), the
    rest is ``info["calibration"]`` (:func:`.runner.run_calibration_case`). ``ValueError`` naming
    what is missing when the record holds no calibration."""
    cal = info.get("calibration")
    if not isinstance(cal, dict):
        raise ValueError("no calibration samples (not timed by a calibrate run)")
    try:
        rounds, depth, twin = int(cal["gate_rounds"]), int(cal["depth"]), list(cal["twin"]["data"])
        injected = cal["injected"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"calibration samples incomplete: {type(exc).__name__}: {exc}") from None
    if rounds < 1:
        raise ValueError(f"calibration gate_rounds is {rounds}")
    runs = min(len(head), len(twin)) // rounds
    if runs < 1:
        raise ValueError(f"{min(len(head), len(twin))} rounds, fewer than one gate-sized run of {rounds}")
    notes = []
    if runs < depth:
        notes.append(f"{runs} of {depth} gate-sized runs complete")
    if rounds < MIN_ROUNDS:  # a run timed before the floor, or with --benchmark-min-rounds below it
        notes.append(
            f"gate-sized runs of {rounds} rounds, fewer than the A/B's floor of {MIN_ROUNDS}: "
            "its intervals are wider than the gate's (re-time it with calibrate)"
        )
    heads, twins = _slices(head, rounds, runs), _slices(twin, rounds, runs)
    aa = []
    for a, t in zip(heads, twins, strict=True):
        aa += [ratio_interval(a, t, level=level), ratio_interval(t, a, level=level)]
    injections = {}
    for entry in injected.values():
        lv = float(entry["level"])
        inj = Injection(lv, target_s=entry.get("target_s"), expected_s=entry.get("expected_s"))
        data = entry.get("data")
        if entry.get("cycles") is None or data is None:
            floor = f"{entry['target_s'] * 1e6:.2f} us" if entry.get("target_s") else "its share"
            inj.reason = f"not injected: {floor} is below the spin's floor"
        else:
            n = min(len(twin), len(data))  # a run cut short may have timed some variants once more
            inj.achieved = paired_ratio(twin[:n], data[:n]) - 1
            inj.pairs = [
                ratio_interval(a, x, level=level)
                for a, x in zip(heads, _slices(data, rounds, runs), strict=True)
                if len(x) == rounds
            ]
        injections[lv] = inj
    twin_mode = cal["twin"].get("timing_mode")
    if twin_mode and twin_mode != info.get("timing_mode"):
        notes.append(f"twin timed as {twin_mode!r}, head as {info.get('timing_mode')!r}")
    return CaseResult(
        key=key,
        kind=kind_of(info),
        timing_mode=str(info.get("timing_mode")),
        min_effect=min_effect,
        median_s=statistics.median(head),
        gate_rounds=rounds,
        depth=runs,
        aa=aa,
        injections=injections,
        notes=notes,
    )


@dataclass
class Target:
    what: str
    ok: bool | None  # None: not measurable here (too few tests, nothing injected)
    detail: str


@dataclass
class Calibration:
    gpu: str
    alpha: float
    level: float
    pairs_wanted: int
    cases: list[CaseResult]
    kinds: dict[str, KindSummary]
    overall: KindSummary
    spin: dict | None = None
    not_calibrated: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wall_s: float | None = None
    configured_default: float = ab.DEFAULT_MIN_EFFECT  # the minimum effects file's default

    def targets(self) -> list[Target]:
        return targets(self)


def _order(kind: str) -> tuple[int, str]:
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), kind)


def _more_tests(cases: list[CaseResult]) -> str:
    """How a kind short of A/A tests gets more. Depths are planned before anything runs, for the
    kind a case is timed as if it captures: a case that fell back to eager ran at that kind's
    depth, which ``--max-depth`` does not raise; selected alone, its kind is small and gets more."""
    fell_back = [c.key for c in cases if c.timing_mode in (TOO_LARGE_TO_CAPTURE, CAPTURE_FAILED)]
    if not fell_back:
        return "select more cases of this kind, or raise --max-depth"
    return (
        f"{len(fell_back)} of its cases fell back from graph capture and ran at the depth planned for captured "
        f"cases; calibrate them alone (-k) for more, e.g. {fell_back[0]}"
    )


def analyze_records(
    records: Iterable[Record],
    *,
    gpu: str,
    alpha: float = DEFAULT_ALPHA,
    min_effects: ab.MinEffects | None = None,
    pairs_wanted: int = DEFAULT_PAIRS,
    level: float = DEFAULT_LEVEL,
    spin: dict | None = None,
    not_calibrated: Iterable[tuple[str, str]] = (),
    wall_s: float | None = None,
) -> Calibration:
    """The calibration of a run's records (those without calibration samples are listed, not analysed)."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha (the false-alarm rate) must be in (0, 0.5), got {alpha!r}")
    min_effects = min_effects or ab.MinEffects()
    cases, skipped, warnings = [], list(not_calibrated), []
    for rec in records:
        try:
            effect = min_effects.for_case(rec.key)
            cases.append(analyze_case(rec.key, rec.data, rec.info, min_effect=effect, level=level))
        except ValueError as exc:
            skipped.append((rec.key, str(exc)))
    by_kind: dict[str, list[CaseResult]] = {}
    for c in cases:
        by_kind.setdefault(c.kind, []).append(c)
        warnings += [f"{c.key}: {note}" for note in c.notes]
    kinds = {k: summarize(k, by_kind[k], alpha) for k in sorted(by_kind, key=_order)}
    for k, s in kinds.items():
        if s.aa_tests < pairs_wanted:
            warnings.append(
                f"{k}: {s.aa_tests} A/A tests, fewer than {pairs_wanted}: its false-alarm rate and supported "
                f"minimum effect are rough ({_more_tests(by_kind[k])})"
            )
        tightest = min(c.min_effect for c in by_kind[k])
        if s.supported is not None and s.supported > tightest:
            warnings.append(
                f"{k}: false alarms stay at or below {alpha:g} only from a min effect of {_pct(s.supported)}, and "
                f"some of its cases are configured at {_pct(tightest)}: expect false alarms there"
            )
    return Calibration(
        gpu=gpu,
        alpha=alpha,
        level=level,
        pairs_wanted=pairs_wanted,
        cases=cases,
        kinds=kinds,
        overall=summarize("all", cases, alpha),
        spin=spin,
        not_calibrated=skipped,
        warnings=warnings,
        wall_s=wall_s,
        configured_default=min_effects.default,
    )


def analyze(
    run: Run,
    *,
    alpha: float = DEFAULT_ALPHA,
    min_effects: ab.MinEffects | None = None,
    not_calibrated: Iterable[tuple[str, str]] = (),
) -> Calibration:
    """The calibration of a calibrate run (its JSON, :class:`.results.Run`)."""
    settings = run.machine.get("calibration") or {}
    return analyze_records(
        run.records.values(),
        gpu=run.gpu,
        alpha=alpha,
        min_effects=min_effects,
        pairs_wanted=int(settings.get("pairs", DEFAULT_PAIRS)),
        spin=settings.get("spin"),
        not_calibrated=not_calibrated,
        wall_s=run.machine.get("wall_s"),
    )


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x * 100:.{digits}f}%"


def targets(cal: Calibration) -> list[Target]:
    """The calibration's targets per kind: at least ``pairs_wanted`` A/A tests, and false alarms at
    the cases' configured minimum effects at or below alpha (the gate as configured); at the kind's
    supported minimum effect, power at least :data:`TARGET_POWER` at each of :data:`POWER_TARGETS`
    (what the gate catches set as tight as this GPU allows). ``ok`` is ``None`` where the data
    cannot say: too few A/A tests, or nothing injected at that share."""
    out = []
    for k, s in cal.kinds.items():
        what = f"false alarms <= {_pct(cal.alpha)} at the configured min effects: {k}"
        detail = (
            f"{s.flagged_configured}/{s.aa_tests} A/A tests flagged; {s.flagged_supported} at the supported "
            f"{_pct(s.supported)} (95% bound {_pct(s.false_alarm_bound)})"
        )
        if s.aa_tests < cal.pairs_wanted:
            out.append(Target(what, None, f"only {s.aa_tests} A/A tests, {cal.pairs_wanted} wanted: {detail}"))
            continue
        out.append(Target(what, s.flagged_configured <= cal.alpha * s.aa_tests, detail))
    for share, which in POWER_TARGETS:
        for k, s in cal.kinds.items():
            if which == "graph" and not k.startswith("graph"):
                continue
            p = s.levels.get(share)
            what = f"power >= {TARGET_POWER:.0%} at {share:.0%} injected, at the supported min effect: {k}"
            if p is None or not p.pairs:
                reason = f"{p.not_injected} case(s) too short for the spin" if p else "not injected"
                out.append(Target(what, None, f"not measured: {reason}"))
                continue
            detail = (
                f"{p.flagged_supported}/{p.pairs} caught at {_pct(s.supported)}, "
                f"{p.flagged_configured}/{p.pairs} at the configured; achieved {_pct(p.achieved_median, 2)} median"
            )
            if p.not_injected:
                detail += f"; {p.not_injected} case(s) too short for the spin"
            out.append(Target(what, p.power_supported >= TARGET_POWER, detail))
    return out


def _interval_json(iv: RatioInterval) -> list[float]:
    return [round(iv.ratio, 6), round(iv.low, 6), round(iv.high, 6)]


def _level_json(p: LevelPower) -> dict:
    return {
        "cases": p.cases,
        "pairs": p.pairs,
        "not_injected": p.not_injected,
        "achieved_median": p.achieved_median,
        "achieved_range": [min(p.achieved), max(p.achieved)] if p.achieved else None,
        "flagged_at_supported": p.flagged_supported,
        "power_at_supported": p.power_supported,
        "flagged_at_configured": p.flagged_configured,
        "power_at_configured": p.power_configured,
    }


def _kind_json(s: KindSummary) -> dict:
    return {
        "cases": s.cases,
        "aa_tests": s.aa_tests,
        "supported_min_effect": s.supported,
        "no_alarm_min_effect": s.no_alarm,
        "aa_flagged_at_supported": s.flagged_supported,
        "false_alarm_at_supported": s.false_alarm_supported,
        "false_alarm_upper_bound_95": s.false_alarm_bound,
        "aa_flagged_at_configured": s.flagged_configured,
        "false_alarm_at_configured": s.false_alarm_configured,
        "predicted_detectable_median": s.predicted,
        "power": {f"{lv:g}": _level_json(p) for lv, p in s.levels.items()},
    }


def _case_json(c: CaseResult) -> dict:
    return {
        "key": c.key,
        "kind": c.kind,
        "timing_mode": c.timing_mode,
        "min_effect": c.min_effect,
        "median_ms": c.median_s * 1e3,
        "gate_rounds": c.gate_rounds,
        "runs": c.depth,
        "aa": [_interval_json(iv) for iv in c.aa],
        "aa_flagged_at_configured": c.aa_flagged(),
        "injected": {
            f"{lv:g}": {
                "target_s": inj.target_s,
                "expected_s": inj.expected_s,
                "achieved": inj.achieved,
                "pairs": [_interval_json(iv) for iv in inj.pairs],
                "caught_at_configured": c.caught(lv),
                "reason": inj.reason or None,
            }
            for lv, inj in c.injections.items()
        },
        "notes": c.notes,
    }


def to_json(cal: Calibration) -> dict:
    """Everything the calibration measured; intervals as ``[ratio, low, high]`` of the median ratio head / base."""
    return {
        "version": 1,
        "gpu": cal.gpu,
        "alpha": cal.alpha,
        "interval_level": cal.level,
        "levels": list(LEVELS),
        "pairs_wanted": cal.pairs_wanted,
        "supported_min_effect": cal.overall.supported,
        "configured_default_min_effect": cal.configured_default,
        "wall_s": cal.wall_s,
        "spin": cal.spin,
        "kinds": {k: _kind_json(s) for k, s in cal.kinds.items()},
        "all": _kind_json(cal.overall),
        "targets": [{"what": t.what, "ok": t.ok, "detail": t.detail} for t in cal.targets()],
        "cases": [_case_json(c) for c in cal.cases],
        "not_calibrated": [{"key": k, "reason": r} for k, r in cal.not_calibrated],
        "warnings": cal.warnings,
    }


def _power_cell(s: KindSummary, level: float) -> str:
    p = s.levels.get(level)
    if p is None or not p.pairs:
        return "not injected" if p is None or not p.not_injected else f"too short ({p.not_injected})"
    return f"{_pct(p.power_supported, 0)} / {_pct(p.power_configured, 0)} at {_pct(p.achieved_median, 2)} (n={p.pairs})"


KIND_COLUMNS = (
    "kind",
    "cases",
    "A/A tests",
    "flagged at configured",
    "supported min effect",
    "flagged there (95% bound)",
    "predicted ±",
)


def kind_rows(cal: Calibration) -> list[list[str]]:
    """The kinds table: one row per kind, then every case pooled."""
    rows = []
    for s in [*cal.kinds.values(), cal.overall]:
        rows.append(
            [
                s.kind,
                str(s.cases),
                str(s.aa_tests),
                f"{s.flagged_configured} ({_pct(s.false_alarm_configured)})",
                _pct(s.supported),
                f"{s.flagged_supported} ({_pct(s.false_alarm_bound)})",
                _pct(s.predicted, 2),
            ]
        )
    return rows


def power_rows(cal: Calibration) -> tuple[list[str], list[list[str]]]:
    """The power table: per kind and injected share, power at the supported / at the configured
    minimum effect, at the achieved share (median), over n pairs."""
    levels = sorted({lv for s in cal.kinds.values() for lv in s.levels})
    header = ["kind", *(f"+{lv:.0%}" for lv in levels)]
    rows = [[s.kind, *(_power_cell(s, lv) for lv in levels)] for s in [*cal.kinds.values(), cal.overall]]
    return header, rows


def verdict_lines(cal: Calibration) -> list[str]:
    """What a terminal shows last: warnings, the targets, then what minimum effect this GPU supports."""
    lines = [f"WARNING: {w}" for w in cal.warnings]
    lines += [f"NOT CALIBRATED: {key}: {why}" for key, why in cal.not_calibrated]
    for t in cal.targets():
        mark = {True: "MET", False: "MISSED", None: "NOT MEASURED"}[t.ok]
        lines.append(f"{mark}: {t.what}: {t.detail}")
    n = cal.overall.cases
    quiet = ", ".join(f"{k} {_pct(s.no_alarm)}" for k, s in cal.kinds.items())
    lines.append(
        f"alpha is per case: at {cal.alpha:g} an A/B of these {n} cases expects about {cal.alpha * n:.1f} false "
        f"alarm(s) a run. No A/A test at all was flagged from a min effect of {_pct(cal.overall.no_alarm)} up "
        f"({quiet})."
    )
    per_kind = ", ".join(f"{k} {_pct(s.supported)}" for k, s in cal.kinds.items())
    lines.append(
        f"{cal.gpu}: the A/B gate supports a minimum effect of {_pct(cal.overall.supported)} at a false-alarm "
        f"rate of {_pct(cal.alpha)} per case ({per_kind}); the minimum effects file asks for "
        f"{_pct(cal.configured_default)} by default."
    )
    return lines


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(ab.markdown_cell, row)) + " |" for row in rows]
    return out


CASE_COLUMNS = ("case", "kind", "median ms", "rounds", "min effect", "A/A flagged", "predicted ±")


def case_rows(cal: Calibration) -> tuple[list[str], list[list[str]]]:
    """One row per case: its A/A tests and, per level, the achieved share and the pairs caught (at
    the kind's supported minimum effect / at the case's own)."""
    levels = sorted({lv for c in cal.cases for lv in c.injections})
    header = [*CASE_COLUMNS, *(f"+{lv:.0%}" for lv in levels)]
    rows = []
    for c in sorted(cal.cases, key=lambda c: (_order(c.kind), c.key)):
        m = cal.kinds[c.kind].supported or 0.0
        cells = [
            c.key,
            c.kind,
            f"{c.median_s * 1e3:.4g}",
            f"{c.depth}x{c.gate_rounds}",
            _pct(c.min_effect),
            f"{c.aa_flagged(m)}/{len(c.aa)} ({c.aa_flagged()})",
            _pct(statistics.median(iv.detectable for iv in c.aa), 2) if c.aa else "—",
        ]
        for lv in levels:
            inj = c.injections.get(lv)
            if inj is None or not inj.injected:
                cells.append("—")
            else:
                cells.append(f"{_pct(inj.achieved, 2)}: {c.caught(lv, m)}/{len(inj.pairs)} ({c.caught(lv)})")
        rows.append(cells)
    return header, rows


def summary_markdown(cal: Calibration) -> str:
    lines = [f"### A/B gate calibration on {cal.gpu}: alpha = {cal.alpha:g} per case", ""]
    lines += [
        f"{cal.overall.cases} cases; intervals at {cal.level:.0%}; each A/A test is one gate-sized run of the "
        "twin against the head (both orientations), each power pair one of the twin with injected work "
        "against the head.",
        "",
        *_markdown_table(KIND_COLUMNS, kind_rows(cal)),
        "",
        "Power: caught at the kind's supported min effect / at the configured min effects, at the achieved "
        "injected share (median over cases), n pairs.",
        "",
        *_markdown_table(*power_rows(cal)),
        "",
        *(f"- {line}" for line in verdict_lines(cal)),
        "",
        "<details><summary>Every case (A/A: flagged at the supported min effect / tests (at the configured); "
        "+x: achieved share: caught at supported / pairs (at configured))</summary>",
        "",
        *_markdown_table(*case_rows(cal)),
        "",
        "</details>",
    ]
    return "\n".join(lines) + "\n"


_KIND_COLORS = {
    "graph fwd": "tab:blue",
    "graph decode": "tab:green",
    "graph fwd+bwd": "tab:purple",
    "eager fwd": "tab:orange",
    "eager decode": "tab:olive",
    "eager fwd+bwd": "tab:red",
}


def plot_power(cal: Calibration, path: str | Path) -> Path:
    """Power against the achieved injected share, one line per kind: solid at the kind's supported
    minimum effect, dashed at the configured ones; the A/A false-alarm rates as squares at 0. A bare
    Figure: no pyplot, no global backend switch."""
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for k, s in cal.kinds.items():
        color = _KIND_COLORS.get(k, "tab:gray")
        measured = [(p.achieved_median, p) for p in s.levels.values() if p.pairs and p.achieved_median is not None]
        xs = [x * 100 for x, _ in measured]
        label = f"{k}: {s.cases} cases, min effect {_pct(s.supported)}"
        ax.plot(xs, [p.power_supported for _, p in measured], "o-", color=color, label=label)
        ax.plot(xs, [p.power_configured for _, p in measured], "x--", color=color)
        # The A/A false-alarm rates at 0, apart: no line joins them to shares a short kind could not inject.
        ax.plot([0.0, 0.0], [s.false_alarm_supported or 0.0, s.false_alarm_configured or 0.0], "s", color=color)
    ax.axhline(TARGET_POWER, color="black", linestyle=":", linewidth=0.8)
    ax.axhline(cal.alpha, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("injected slowdown, % of the case's time (achieved, median over cases); squares at 0: A/A")
    ax.set_ylabel("share of gate-sized pairs flagged")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    title = (
        f"A/B gate on {cal.gpu}: solid at each kind's supported min effect (alpha {cal.alpha:g}), "
        f"dashed at min_effects.json; dotted: {TARGET_POWER:.0%} and alpha"
    )
    ax.set_title(textwrap.fill(title, 100), fontsize=9, loc="left")
    if not cal.kinds:
        ax.text(0.5, 0.5, "no calibrated cases", transform=ax.transAxes, ha="center", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(cal: Calibration, out: str | Path) -> list[Path]:
    """``calibration.png`` (when matplotlib is installed), ``calibration.md`` and ``calibration.json``
    under ``out``; the plot first, so what it could not draw is in the other two."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        written.append(plot_power(cal, out / FILES[2]))
    except ImportError:
        cal.warnings.append("matplotlib not installed: no calibration.png (pip install 'attention-suite[perf]')")
    except Exception as exc:  # a plot must never cost the measurement
        cal.warnings.append(f"calibration.png not drawn: {type(exc).__name__}: {exc}")
    for name, text in ((FILES[1], summary_markdown(cal)), (FILES[0], json.dumps(to_json(cal), indent=1) + "\n")):
        write_atomically(out / name, text)
        written.append(out / name)
    return written


def print_tables(cal: Calibration, console=None) -> None:
    """The kinds and power tables on the terminal (rich), then the verdict lines, plain (what a CI log keeps)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("\n".join([*_markdown_table(KIND_COLUMNS, kind_rows(cal)), "", *_markdown_table(*power_rows(cal))]))
    else:
        console = console or Console(width=max(Console().width, 150))
        kinds = Table(title=f"A/B gate calibration on {cal.gpu} (alpha {cal.alpha:g} per case)", title_justify="left")
        for name in KIND_COLUMNS:
            kinds.add_column(name, justify="left" if name == "kind" else "right")
        for row in kind_rows(cal):
            kinds.add_row(*row)
        console.print(kinds)
        header, rows = power_rows(cal)
        power = Table(
            title="power: at the supported / at the configured min effect, at the achieved share (n pairs)",
            title_justify="left",
        )
        for name in header:
            power.add_column(name, justify="left" if name == "kind" else "right")
        for row in rows:
            power.add_row(*row)
        console.print(power)
    print("\n".join(verdict_lines(cal)), flush=True)
