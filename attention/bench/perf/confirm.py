"""Confirming the committed-baseline gate's time regressions in fresh processes before they fail a run.

Why: a run's rounds are all timed in one process, so the Mann-Whitney test of :mod:`.compare`
sees round-to-round noise only. Some noise is drawn once per process: flex's fp32 kernel runs at
a speed fixed per compilation (docs/design.md#between-compile-offsets), and a process can land on
a slow draw for a case. Such a case is slower in every round of that process, so its p-value is
tiny (a fresh H200 flagged flex fp32 at 1.33x, p=3e-9, where later processes timed it at the
baseline's speed). A p-value over rounds cannot tell that from a regression; another process can.

Rule: each case the baseline compare flags slower (time only: peak memory is nearly
deterministic, and guard failures are not noise) is timed again in fresh pytest processes, each
with an empty compile cache of its own, so the compilation is drawn again too
(:func:`.launcher.retime`). Each re-timing is judged exactly as the first run was (same
baseline, threshold and test). Of ``K`` re-timings, a flag is **cleared** when a strict majority
(``K // 2 + 1``, :func:`clean_needed`) come out clean, and **confirmed** otherwise: a re-timing
that flags it again, fails a guard, is timed differently or does not time it (crashed, skipped,
cut by the time budget) is no evidence of a false alarm. The first run's flag is not a vote: it
is what selected the case, so only the re-timings judge it. Re-timings run one process at a
time, each timing only the cases still undecided, so a clear case costs ``K // 2 + 1`` processes
and only a split one all ``K``. ``--confirm 0`` turns confirmation off: every flag fails.

False-alarm arithmetic, with ``q`` the chance that an unchanged case flags in one process (the
H200 baseline's 192 cases gave one flag per run on two fresh machines: q ~ 1/192 ~ 0.5%) and
``n`` cases, re-timings independent of each other:

* no confirmation: a run fails with 1 - (1 - q)^n ~ 63% at n = 192, what was seen;
* K = 3 (the default): a false flag survives when at least 2 of 3 re-timings flag it too,
  3q^2(1 - q) + q^3 ~ 8e-5, so a case fails falsely with q x 8e-5 ~ 4e-7 and a run of 192
  cases about once in 12,000 runs; K = 1 would be q^2 per case, a run in 200.

A real slowdown that flags a process with probability ``p`` is confirmed with probability
p^3 + 3p^2(1 - p) at K = 3: 0.99 at p = 0.95 (a 10% slowdown on a case with a 5% threshold and
a 1% spread flags every process), 0.90 at p = 0.8, where requiring all three would give 0.86 and
0.51. The independence is between processes on one machine: an offset of the machine itself is
in every re-timing, and the thresholds carry it (the spread across machines, per kind of case:
:func:`.compare.derive_thresholds`).

Outputs (:func:`write_outputs`): ``confirm.json`` with, per flagged case, the baseline's median,
the limit, each flagging run's and each re-timing's median and samples (seconds) and verdict,
and whether it was confirmed; a section of ``summary.md``. docs/design.md#confirming-a-flag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import compare as cmp
from .results import Run, write_json

DEFAULT_RETIMES = 3
CLEAN = "clean"
FILE = "confirm.json"


def clean_needed(retimes: int) -> int:
    """Clean re-timings that clear a flag: a strict majority of ``retimes``."""
    return retimes // 2 + 1


@dataclass
class Timing:
    """One process's timing of a flagged case, judged against the baseline."""

    run: str  # the run's label: run-1, confirm-2
    median: float | None  # seconds; None where the process did not time the case
    data: list[float]
    verdict: str  # CLEAN, "slower", "guard", "not compared" or "not timed"
    message: str = ""

    def to_json(self) -> dict:
        return {
            "run": self.run,
            "median_s": self.median,
            "data_s": self.data,
            "verdict": self.verdict,
            "message": self.message,
        }


@dataclass
class Flag:
    """A case some run flagged slower, and what its re-timings said."""

    key: str
    baseline_median: float
    first: list[Timing]
    retimes: list[Timing] = field(default_factory=list)
    planned: int = 0  # K: re-timings asked for (0: confirmation off)

    @property
    def clean(self) -> int:
        return sum(t.verdict == CLEAN for t in self.retimes)

    @property
    def cleared(self) -> bool:
        return self.planned > 0 and self.clean >= clean_needed(self.planned)

    @property
    def decided(self) -> bool:
        """Cleared, or too few re-timings left to clear it."""
        left = self.planned - len(self.retimes)
        return self.cleared or self.clean + left < clean_needed(self.planned)

    @property
    def confirmed(self) -> bool:
        return not self.cleared

    def to_json(self) -> dict:
        return {
            "case": self.key,
            "baseline_median_s": self.baseline_median,
            "first": [t.to_json() for t in self.first],
            "retimes": [t.to_json() for t in self.retimes],
            "clean": self.clean,
            "confirmed": self.confirmed,
        }


def timing(key: str, run: Run | None, label: str, result: cmp.Comparison | None) -> Timing:
    """``key`` in ``run`` as ``result`` (its comparison with the baseline) judged it."""
    if run is None or result is None or key not in run.records:
        return Timing(label, None, [], "not timed", "the process did not time it (failed, skipped or cut)")
    record = run.records[key]
    if guards := [v.message for v in result.guard_failures if v.key == key]:
        return Timing(label, record.median, record.data, "guard", "; ".join(guards))
    if slower := [v.message for v in result.regressions if v.key == key and v.kind == "slower"]:
        return Timing(label, record.median, record.data, "slower", slower[0])
    if changed := [v.message for v in result.notes if v.key == key and v.kind == "timing_mode_changed"]:
        return Timing(label, record.median, record.data, "not compared", changed[0])
    return Timing(label, record.median, record.data, CLEAN)


def flags(results: list[tuple[Run, cmp.Comparison]], baseline: Run, planned: int) -> dict[str, Flag]:
    """The cases any run flagged slower, in order of first appearance."""
    found: dict[str, Flag] = {}
    for run, result in results:
        for verdict in result.regressions:
            if verdict.kind != "slower":
                continue
            flag = found.setdefault(
                verdict.key, Flag(verdict.key, baseline.records[verdict.key].median, [], planned=planned)
            )
            flag.first.append(timing(verdict.key, run, _label(run), result))
    return found


def unconfirmed_failures(result: cmp.Comparison) -> int:
    """What fails a run whatever the re-timings say: guard failures and memory regressions."""
    return len(result.guard_failures) + sum(v.kind != "slower" for v in result.regressions)


def confirm(
    found: dict[str, Flag],
    baseline: Run,
    thresholds: dict,
    retime: Callable[[str, list[str]], Run | None],
) -> None:
    """Re-time the undecided flags of ``found`` (``retime(label, case keys)``: one fresh process,
    its run or ``None``), one process at a time, until each is decided or has had its re-timings."""
    planned = max((f.planned for f in found.values()), default=0)
    for i in range(1, planned + 1):
        keys = [key for key, flag in found.items() if not flag.decided]
        if not keys:
            return
        label = f"confirm-{i}"
        run = retime(label, keys)
        result = cmp.compare(baseline, run, thresholds) if run is not None else None
        for key in keys:
            found[key].retimes.append(timing(key, run, label, result))


def _label(run: Run) -> str:
    return Path(run.path).stem


def format_flags(found: dict[str, Flag]) -> list[str]:
    """One line a flagged case: what the first run said, then the re-timings' medians and verdict."""
    lines = []
    for flag in found.values():
        first = "; ".join(f"{t.run} {t.message}" for t in flag.first)
        medians = ", ".join(cmp.ms(t.median) for t in flag.retimes)
        verdicts = ", ".join(t.verdict for t in flag.retimes)
        if flag.planned == 0:
            lines.append(f"  {flag.key}: {first} (confirmation off)")
        elif flag.cleared:
            once = "once" if len(flag.first) == 1 else f"in {len(flag.first)} runs"
            lines.append(
                f"  {flag.key}: flagged {once}, not confirmed in {len(flag.retimes)} fresh processes: "
                f"medians {medians} ms, baseline {cmp.ms(flag.baseline_median)} ms ({verdicts}); first: {first}"
            )
        else:
            lines.append(
                f"  {flag.key}: CONFIRMED in fresh processes: medians {medians} ms, baseline "
                f"{cmp.ms(flag.baseline_median)} ms ({verdicts}); first: {first}"
            )
    return lines


def report(found: dict[str, Flag], planned: int) -> str:
    """The confirmation's verdicts as text (also the body of its ``summary.md`` section)."""
    if not found:
        return "No case flagged slower: nothing to confirm."
    confirmed = {k: f for k, f in found.items() if f.confirmed}
    cleared = {k: f for k, f in found.items() if f.cleared}
    if planned == 0:
        head = f"{len(found)} case(s) flagged slower; confirmation off (--confirm 0): each fails."
    else:
        head = (
            f"{len(found)} case(s) flagged slower, re-timed in up to {planned} fresh processes each; a flag is "
            f"cleared by {clean_needed(planned)} clean re-timings: {len(confirmed)} confirmed, {len(cleared)} not."
        )
    lines = [head]
    if confirmed:
        lines += [f"REGRESSIONS (confirmed): {len(confirmed)}", *format_flags(confirmed)]
    if cleared:
        lines += [f"Flagged, not confirmed (not failed): {len(cleared)}", *format_flags(cleared)]
    return "\n".join(lines)


def to_json(found: dict[str, Flag], planned: int, baseline: str, thresholds: str) -> dict:
    return {
        "retimes": planned,
        "clean_needed": clean_needed(planned) if planned else None,
        "rule": (
            f"a flagged case fails unless {clean_needed(planned)} of {planned} fresh re-timings are clean"
            if planned
            else "confirmation off: every flagged case fails"
        ),
        "baseline": baseline,
        "thresholds": thresholds,
        "confirmed": sorted(k for k, f in found.items() if f.confirmed),
        "not_confirmed": sorted(k for k, f in found.items() if f.cleared),
        "cases": [flag.to_json() for flag in found.values()],
    }


def write_outputs(out: Path, found: dict[str, Flag], planned: int, *, verdicts: list[str], doc: dict) -> None:
    """``confirm.json`` (``doc``) and ``summary.md``: the per-run verdicts, then the confirmation."""
    write_json(doc, out / FILE)
    lines = ["### Perf gate: this GPU's committed baseline", "", *(f"- {v}" for v in verdicts), ""]
    lines += ["```", report(found, planned), "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
