"""``python -m attention.bench.perf``: run the perf grid and gate on it; record, compare and inspect runs.

``nox -s perf -- ARGS`` runs ``python -m attention.bench.perf run ARGS`` (``run`` is the default).

* ``run``: the perf grid under pytest (the package's case modules with its plugin,
  :mod:`.launcher`; from any directory), JSON and tables to ``--out``. ``--impl NAME|module:attr``
  (repeatable) times those implementations beside the references instead of every registered one.
  Gates:

  - ``--benchmark-compare=REV`` (any git revision of the repository holding the implementation
    under test, :mod:`.base_revision`): the same-run A/B. REV's implementations and
    the working tree's are timed on this GPU in one process, rounds interleaved; a case fails
    when the 99% interval of its median ratio lies above 1 + its minimum effect. Works on any
    CUDA GPU and torch; writes ``summary.md``, ``ab.json``, ``ab.png``.
  - bare ``--benchmark-compare``: this GPU's committed baseline (``perf/baselines/<gpu>/`` of the
    current directory, or ``--baselines``;
    thresholds from its recorded spread); refused at once where there is none for this GPU and
    torch minor version. A case flagged slower fails only once confirmed: re-timed in up to
    ``--confirm N`` (default 3, 0: off) fresh processes, it fails unless a majority of them are
    clean (:mod:`.confirm`); ``confirm.json`` and ``summary.md`` say what each process timed.
  - ``--benchmark-compare=NUM`` (a pytest-benchmark saved run) or ``=FILE.json``: see
    :mod:`.flags` for the whole resolution order.

  ``--record`` writes the run(s) as this GPU's baseline; ``--repeat N`` runs the grid N times and
  derives per-case thresholds from the spread. ``--gpus N|all`` spreads the cases over several
  GPUs of the host (:mod:`.shard`): one pytest process per GPU, one merged run; an A/B still
  times both revisions of a case on the same GPU. Other arguments go to pytest (``-k flex``,
  ``--perf-graphs=fwd``, pytest-benchmark's own flags); ``--grid NAME`` (or pytest's
  ``--perf-grid=NAME``) picks the grid. No CUDA GPU: the tiny CPU grid runs to show the machinery
  working (a GPU-sized grid is refused), nothing is compared or recorded, and the exit status is
  pytest's. Arguments pytest refuses (exit 4) are a usage error here too (exit 2).
* ``calibrate``: measure the A/B gate itself on this GPU (false alarms, power against injected
  slowdowns, the minimum effect it supports at ``--alpha``): :mod:`.calibrate`.
* ``compare RUN``, ``record RUN...``, ``spread RUN...``, ``table RUN``: the same steps on JSON
  files already made (no GPU needed); ``salvage LOG -o RUN`` rebuilds a run's JSON from its
  per-case log if the run died before writing it.

Exit status: 0 pass; 1 regressions, guard failures or failed cases; 2 the comparison was
refused or impossible (no baseline for this GPU or torch, unknown revision, the base revision
cannot build a case, no CUDA for an A/B, an unreadable file, a refused flag).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from ... import registry
from ..arguments import positive_float
from ..files import unwritable, unwritable_file
from . import ab, base_revision, confirm, flags, guards, launcher, machine, report, revision, shard
from . import compare as cmp
from .launcher import say as _say
from .previous_run import GRID_FILES, GRID_PATTERNS, PreviousRun
from .results import (
    BASELINE_FILE,
    THRESHOLDS_FILE,
    NoBaseline,
    PerfError,
    Run,
    baseline_dir,
    check_comparable,
    find_baseline,
    load_run,
    load_runs,
    merge_runs,
    not_timed,
    parse_run,
    require_gpu_run,
    salvage,
    write_json,
    write_run,
)

DEFAULT_BASELINES = Path("perf") / "baselines"
NO_CUDA = (
    "No CUDA GPU here: running the tiny CPU grid so the perf machinery can be seen working. "
    "CPU numbers are not baselines: nothing is compared or recorded."
)


def _default_out() -> Path:
    return Path(os.environ.get("PERF_OUT") or Path(".benchmarks") / "attention-perf")


def min_effects(path: str | None = None) -> ab.MinEffects:
    """The A/B's per-case minimum effects: ``path`` (a ``--min-effects`` file) or the packaged
    min_effects.json; the baseline commands take them as floors for their thresholds."""
    try:
        return ab.load_min_effects(path or ab.MIN_EFFECTS_FILE)
    except (OSError, ValueError) as exc:
        raise PerfError(f"--min-effects: {exc}" if path else str(exc)) from None


def _thresholds_path(explicit: str | None, baseline: Path) -> Path:
    """``--thresholds`` as given, which must exist (a typo must not pass as the defaults), else the
    file beside the baseline, whose absence means the defaults."""
    if explicit is None:
        return baseline.parent / THRESHOLDS_FILE
    if not Path(explicit).is_file():
        raise PerfError(
            f"--thresholds {explicit}: no such file (without --thresholds, {THRESHOLDS_FILE} beside "
            "the baseline applies, or the defaults where there is none)"
        )
    return Path(explicit)


def _load_thresholds(path: Path | None, time_threshold: float | None) -> dict:
    """The thresholds file (or the defaults); ``time_threshold`` (``--benchmark-compare-fail``)
    replaces every case's time threshold."""
    thresholds = cmp.load_thresholds(path)
    return thresholds if time_threshold is None else cmp.with_time_threshold(thresholds, time_threshold)


def _thresholds_name(path: Path | None) -> str:
    return str(path) if path and path.exists() else "defaults"


def compare_one(
    run: Run,
    baseline_path: Path,
    thresholds_path: Path | None,
    *,
    time_threshold: float | None = None,
    confirming: int = 0,
) -> cmp.Comparison:
    """``run`` against a baseline; ``time_threshold`` (``--benchmark-compare-fail``) replaces every
    case's time threshold; ``confirming``: the re-timings slower cases will get (:mod:`.confirm`)."""
    baseline = load_run(baseline_path)
    warnings = check_comparable(baseline, run)
    result = cmp.compare(baseline, run, _load_thresholds(thresholds_path, time_threshold))
    result.warnings += warnings
    _say(f"Thresholds: {_thresholds_name(thresholds_path)}")
    _say(cmp.format_comparison(result, baseline, run, confirming=confirming))
    return result


def record(runs: list[Run], baselines: Path, *, with_thresholds: bool) -> Path:
    merged = merge_runs(runs) if len(runs) > 1 else runs[0]
    if merged.machine.get("device") != "cuda":
        raise PerfError("refusing to record a CPU run as a baseline: baselines are per GPU")
    # Guards are re-read from the recorded numbers, so a guard fixed since the run applies to it.
    failures = [k for k, r in merged.records.items() if guards.check(r.info, merged.machine)]
    if failures:
        raise PerfError(
            f"refusing to record a baseline with guard failures ({', '.join(failures[:5])}): fix them first"
        )
    target = baseline_dir(baselines, merged.machine)
    if problem := unwritable(target):
        raise PerfError(f"--baselines {baselines}: {problem}")
    write_run(merged, target / BASELINE_FILE)
    _say(f"Recorded {len(merged.records)} cases from {len(runs)} run(s) as {target / BASELINE_FILE}")
    if with_thresholds:
        thresholds = cmp.thresholds_from_spread(runs, min_effect=min_effects().for_case)
        write_json(thresholds, target / THRESHOLDS_FILE)
        _say(f"Wrote thresholds from the spread of {len(runs)} runs: {target / THRESHOLDS_FILE}")
    elif not (target / THRESHOLDS_FILE).exists():
        _say(f"No {THRESHOLDS_FILE} yet: defaults apply until `--repeat 3 --record` measures the spread.")
    _say(f"Commit {target}/ to make it the baseline for {merged.gpu}.")
    return target


def _resolve(args: argparse.Namespace, extra: list[str], cuda: bool) -> flags.CompareTarget | None:
    """What ``--benchmark-compare`` means here, decided before any case runs (refusals are fast)."""
    flags.check_native(extra)
    for spec in args.impl:  # an unknown name or a module:attr that does not import: refused here
        try:
            registry.resolve(spec)
        except (ValueError, TypeError) as exc:
            raise PerfError(f"--impl: {exc}") from None  # the registry's errors name the spec
    if args.benchmark_disable and (args.benchmark_compare is not None or args.record):
        raise flags.FlagRefused("--benchmark-disable times nothing: nothing to compare or record")
    if args.record and not cuda:
        raise PerfError(
            "--record needs a CUDA GPU: baselines are per GPU, and CPU numbers are never baselined; none here. "
            "Without it the tiny CPU grid runs to show the machinery."
        )
    if args.benchmark_compare is None:
        given = {
            "--benchmark-compare-fail": bool(args.benchmark_compare_fail),
            "--thresholds": bool(args.thresholds),
            "--confirm": args.confirm is not None,
        }
        if flag := next((name for name, set_ in given.items() if set_), None):
            raise flags.FlagRefused(f"{flag} needs --benchmark-compare")
        return None
    value = None if args.benchmark_compare is True else args.benchmark_compare
    if not cuda:
        what = f"={value}" if value else ""
        raise PerfError(
            f"--benchmark-compare{what} needs a CUDA GPU: perf numbers are compared on GPUs only; none here. "
            "Without it the tiny CPU grid runs to show the machinery."
        )
    info = launcher.gpu_facts([0])["machine"]  # read in a child process, as gpu_plan does
    storage = Path(_storage(extra))
    target = flags.resolve_compare(value, baselines=Path(args.baselines), storage=storage, machine=info)
    if args.confirm is not None and target.kind not in ("baseline", "file"):
        raise flags.FlagRefused("--confirm re-times what a compare with a baseline flags; this run's gate does not")
    if target.kind == "saved":
        flags.check_native_compare_fail(args.benchmark_compare_fail)
    else:
        flags.compare_fail_fraction(args.benchmark_compare_fail)  # refuse what the perf gates cannot judge
    if target.kind == "revision":
        if args.record or args.repeat > 1:
            raise PerfError("--benchmark-compare=REV times two revisions: run it again for another A/B, record apart")
        names = [registry.resolve(spec) for spec in args.impl] or list(registry.implementations())
        plan = base_revision.plan(value, names)  # REV in each repository the A/B checks out
        for root, sha in plan.shas.items():
            _say(f"A/B: {value} = {sha[:12]} of {root} against its working tree, on {info['gpu_name']}")
        for name, why in plan.not_compared.items():
            _say(f"A/B: {name} is not compared: {why}")
    elif target.kind == "baseline":
        _say(f"Comparing with {target.path}")
    _check_thresholds_flag(args.thresholds, target)
    return target


def _check_thresholds_flag(explicit: str | None, target: flags.CompareTarget) -> None:
    """``--thresholds`` read before any case runs: a missing or bad file, or one no gate of this
    run reads, is refused now, not after the grid."""
    if explicit is None:
        return
    if target.kind not in ("baseline", "file"):
        raise flags.FlagRefused("--thresholds applies to a compare with a baseline; this run's gate does not read it")
    cmp.load_thresholds(_thresholds_path(explicit, target.path))


def _storage(extra: list[str]) -> str:
    given = flags.given(extra, "--benchmark-storage")
    value = given[-1] if given and given[-1] else "file://./.benchmarks"
    return value.removeprefix("file://")


def _pytest_args(args: argparse.Namespace, target: flags.CompareTarget | None, out: Path) -> list[str]:
    """What the CLI adds to the pytest command for the chosen gate."""
    if target is None:
        return []
    fail = flags.compare_fail_fraction(args.benchmark_compare_fail)
    if target.kind == "saved":  # pytest-benchmark's own comparison, as it means the flags
        return [
            f"--benchmark-compare={target.value}",
            *(f"--benchmark-compare-fail={e}" for e in args.benchmark_compare_fail),
        ]
    if target.kind == "revision":
        extra = [f"--perf-compare-rev={target.value}", f"--perf-ab-out={out}"]
        return extra + ([f"--perf-min-effect={fail}"] if fail is not None else [])
    return []


def _graph_policy(extra: list[str], target: flags.CompareTarget | None) -> list[str]:
    """A compare with a baseline or a saved run times each case as that run was timed (its
    ``--perf-graphs``) unless the command names a policy: a case timed eagerly on one side and
    replayed from a CUDA graph on the other measures dispatch on one side only (our compare
    refuses such a pair, ``timing_mode_changed``)."""
    from .runner import GRAPH_POLICIES

    if target is None or target.kind == "revision" or flags.given(extra, "--perf-graphs"):
        return []
    recorded = target.path or Path(str(target.value))  # a saved run: the file pytest-benchmark reads
    try:
        policy = load_run(recorded).machine.get("graphs")
    except PerfError:  # a saved run of another suite says nothing of ours: pytest-benchmark compares it
        return []
    if policy not in GRAPH_POLICIES:
        return []
    _say(f"Timing cases as {recorded} was timed: --perf-graphs={policy}")
    return [f"--perf-graphs={policy}"]


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and args.grid not in (None, "tiny"):  # refused before --out is touched
        raise PerfError(
            f"--grid {args.grid}: no CUDA GPU here, where only the tiny grid runs (the machinery); "
            f"the {args.grid} grid is sized for GPUs"
        )
    gpus = shard.parse_gpus(args.gpus, torch.cuda.device_count() if cuda else 0) if args.gpus else []
    target = _resolve(args, extra, cuda)
    if len(gpus) > 1 and target is not None and target.kind == "saved":
        raise flags.FlagRefused(
            "--gpus with a pytest-benchmark saved run: pytest-benchmark compares inside one process, and each "
            "GPU's process would see only its shard; compare without --gpus"
        )
    if launcher.lists_only(extra):  # before --out is touched: a listing leaves the last run's files
        return launcher.list_cases(args, extra, not cuda)
    out = _writable(Path(args.out or _default_out()))
    _check_outputs(args, cuda)
    # A previous run's verdicts must not pass for this one's, nor its cases join this one's log;
    # but a run refused before it times anything leaves them as they were.
    run_files = (f"run-{i}.json" for i in range(1, args.repeat + 1))
    with PreviousRun(out, [*GRID_FILES, *run_files], GRID_PATTERNS) as previous:
        return _run_grid(args, extra, cuda, target, gpus, out, previous)


def _run_grid(
    args: argparse.Namespace,
    extra: list[str],
    cuda: bool,
    target: flags.CompareTarget | None,
    gpus: list[int],
    out: Path,
    previous: PreviousRun,
) -> int:
    """:func:`cmd_run` once its arguments are checked and the last run's files set aside."""
    if not cuda:
        _say(NO_CUDA)
    extra = [
        *extra,
        *launcher.impl_args(args),
        *_pytest_args(args, target, out),
        *_graph_policy(extra, target),
    ]
    if args.benchmark_disable:
        extra.append("--benchmark-disable")
    status, runs, stops, started = 0, [], [], time.time()
    log = launcher.output_of(args, out, sharded=len(gpus) > 1)
    plan = launcher.gpu_plan(args, extra, out, gpus) if len(gpus) > 1 else None  # dealt once for every repeat
    if plan == []:  # the selection left no case for any GPU
        raise PerfError(launcher.no_cases(extra))
    for i in range(1, args.repeat + 1):
        limit = None
        if args.time_budget:  # what is left, shared by the runs still to go
            limit = launcher.run_time_limit(args.time_budget - (time.time() - started), i, args.repeat)
        if plan is not None:
            rc, run = launcher.sharded_run(f"run-{i}", args, extra, out, limit, plan)
        else:
            rc, run = launcher.pytest_run(f"run-{i}", args, extra, out, not cuda, limit)
            if i == 1:
                launcher.refuse_usage_error(rc, f"run-{i}", args, out, extra)
        if i == 1:  # pytest took the arguments: the last run's files give way to this run's
            previous.drop()
        if rc != 0:
            status = 1
            stops.append(launcher.why_failed(f"run-{i}", rc, limit, run, log))
        if run is not None:
            runs.append(run)
    if args.benchmark_disable:
        _say(f"--benchmark-disable: every case ran once as a smoke test; nothing was timed. pytest exit {status}")
        return status
    if not runs:
        _say_stops(stops)
        _say("FAIL: no run produced results")
        return 1
    if args.benchmark_json:
        write_run(runs[-1], args.benchmark_json)
    summary = [report.matrix(runs[-1]), report.wall_time(runs[-1]), report.targets(runs[-1])]
    summary += [f"warning: {w}" for w in _noise(runs[-1])]
    if len(runs) >= 2:
        thresholds = cmp.thresholds_from_spread(runs, min_effect=min_effects().for_case)
        write_json(thresholds, out / THRESHOLDS_FILE)
        summary.append(cmp.format_spread(thresholds))
    (out / "summary.txt").write_text("\n\n".join([*summary, report.cases_table(runs[-1])]) + "\n")
    _say("\n\n".join(summary))  # the tables first: verdicts, the part to read, come last
    if untimed := _untimed(args.impl, runs[-1], out / "cases.jsonl"):
        _say("\n".join(f"FAIL: {line}" for line in untimed))
        status = max(status, 1)
    try:  # a CPU run was refused every gate and --record before it started
        if target is not None and target.kind in ("baseline", "file"):
            status = max(status, _gate_on_baseline(args, runs, target.path, extra, out, started))
        elif target is not None and target.kind == "revision":
            status = _gate_on_ab(out, status)
        if args.record:
            record(runs, Path(args.baselines), with_thresholds=len(runs) >= 2)
    except PerfError as exc:
        _say(f"ERROR: {exc}")
        return 2
    _say_stops(stops)  # beside the verdict: the comparisons above may all have passed
    _say(f"{'FAIL' if status else 'PASS'}: results in {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return status


def _say_stops(stops: list[str]) -> None:
    """Each run that failed the command by its pytest exit alone, with why (:func:`launcher.why_failed`)."""
    if stops:
        _say("\n".join(f"FAIL: {stop}" for stop in stops))


def _untimed(specs: list[str], run: Run, log: Path) -> list[str]:
    """Each implementation named by ``--impl`` of which ``run`` timed no case, with why (the first
    reason in the cases log): a run that measured nothing of what was asked for must not pass."""
    timed = {rec.info.get("impl") for rec in run.records.values()}
    missing = [name for name in dict.fromkeys(registry.resolve(spec) for spec in specs) if name not in timed]
    if not missing:
        return []
    none_ran = "none ran: -k selected none, or the run stopped first"
    first_reason = {name: next((why for _, why in not_timed(log, impl=name)), none_ran) for name in missing}
    return [f"{name}: no case timed ({why})" for name, why in first_reason.items()]


def _writable(out: Path) -> Path:
    """``out``, created and proven writable before any case runs."""
    if problem := unwritable(out):
        raise PerfError(f"--out {out}: {problem}")
    return out


def _check_outputs(args: argparse.Namespace, cuda: bool) -> None:
    """The files a run writes after its cases, proven writable before the first case runs."""
    if args.benchmark_json and (problem := unwritable_file(Path(args.benchmark_json))):
        raise PerfError(f"--benchmark-json {args.benchmark_json}: {problem}")
    if args.record and cuda and (problem := unwritable(Path(args.baselines))):
        raise PerfError(f"--baselines {args.baselines}: {problem}")


def _noise(run: Run) -> list[str]:
    state = run.machine.get("gpu_state") or {}
    return machine.noise_warnings(state.get("start"), state.get("end"))


def _gate_on_baseline(
    args: argparse.Namespace, runs: list[Run], baseline_path: Path, extra: list[str], out: Path, started: float
) -> int:
    """Each run against the baseline; the cases flagged slower re-timed in fresh processes and
    failed only where confirmed (:mod:`.confirm`). Writes ``confirm.json`` and ``summary.md``."""
    fail = flags.compare_fail_fraction(args.benchmark_compare_fail)
    planned = confirm.DEFAULT_RETIMES if args.confirm is None else args.confirm
    thresholds_path = _thresholds_path(args.thresholds, baseline_path)
    results, verdicts = [], []
    for run in runs:
        result = compare_one(run, baseline_path, thresholds_path, time_threshold=fail, confirming=planned)
        results.append((run, result))
        # Slower cases wait for their re-timings; guard and memory failures fail now.
        if confirm.unconfirmed_failures(result) or (result.regressions and not planned):
            verdict = "FAIL"
        else:
            verdict = "FLAGGED" if result.regressions else "PASS"
        slower = len(cmp.flagged_slower(result, planned))  # apart, as the comparison's summary counts them
        verdicts.append(
            f"{Path(run.path).name} vs {baseline_path}: {verdict} ({len(result.regressions) - slower} regressions, "
            + (f"{slower} flagged slower to confirm, " if slower else "")
            + f"{len(result.guard_failures)} guard failures, {len(result.improvements)} improvements)"
        )
    _say("\n".join(verdicts))
    baseline = load_run(baseline_path)
    found = confirm.flags(results, baseline, planned)
    if found and planned:

        def retime(label: str, keys: list[str]) -> Run | None:
            limit = None
            if args.time_budget:  # whatever is left, but a re-timing always gets a minute
                limit = max(60.0, args.time_budget - (time.time() - started))
            _say(f"Confirming {len(keys)} flagged case(s) in a fresh process ({label}): {', '.join(keys)}")
            return launcher.retime(label, args, extra, out, keys, limit)[1]

        confirm.confirm(found, baseline, _load_thresholds(thresholds_path, fail), retime)
    text = confirm.report(found, planned)
    _say(text)
    doc = confirm.to_json(found, planned, str(baseline_path), _thresholds_name(thresholds_path))
    doc["runs"] = [{"run": Path(run.path).name, "verdict": v} for (run, _), v in zip(results, verdicts, strict=True)]
    confirm.write_outputs(out, found, planned, verdicts=verdicts, doc=doc)
    failed = any(confirm.unconfirmed_failures(result) for _, result in results)
    failed = failed or any(flag.confirmed for flag in found.values())
    return 1 if failed else 0


def _gate_on_ab(out: Path, pytest_status: int) -> int:
    """The A/B verdict pytest wrote (:mod:`.plugin`): 2 where the base could not build a case."""
    path = out / "ab.json"
    if not path.is_file():
        raise PerfError(f"the A/B run wrote no {path}: see the pytest output above")
    doc = json.loads(path.read_text())
    _say((out / "summary.md").read_text() if (out / "summary.md").is_file() else "")
    if doc.get("refused"):
        raise PerfError(
            f"the base revision cannot build {len(doc['refused'])} case(s): {'; '.join(doc['refused'][:3])}"
        )
    _say(f"A/B: {'FAIL' if doc['failed'] else 'PASS'} ({', '.join(f'{n} {k}' for k, n in doc['counts'].items() if n)})")
    return max(pytest_status, 1 if doc["failed"] else 0)


def cmd_compare(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    require_gpu_run(run)
    path = Path(args.baseline) if args.baseline else find_baseline(args.baselines, run)
    result = compare_one(run, path, _thresholds_path(args.thresholds, path))
    return 1 if result.failed else 0


def cmd_record(args: argparse.Namespace) -> int:
    runs = load_runs(args.runs)
    record(runs, Path(args.baselines), with_thresholds=len(runs) >= 2 and not args.no_thresholds)
    return 0


def cmd_spread(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise PerfError("spread needs at least two runs of the same grid: one run has no spread")
    runs = load_runs(args.runs)
    thresholds = cmp.thresholds_from_spread(runs, k=args.k, floor=args.floor, min_effect=min_effects().for_case)
    _say(cmp.format_spread(thresholds))
    if args.write:
        write_json(thresholds, args.write)
        _say(f"wrote {args.write}")
    return 0


def cmd_salvage(args: argparse.Namespace) -> int:
    log, output = Path(args.log), Path(args.output)
    if not log.is_file():
        raise PerfError(f"{log}: no such log (OUT/cases.jsonl of a perf run)")
    if output.resolve() == log.resolve():
        raise PerfError(f"-o {output} is the log itself: write the run somewhere else")
    if not output.parent.exists():
        raise PerfError(f"-o {output}: folder {output.parent} does not exist")
    if problem := unwritable_file(output):
        raise PerfError(f"-o {output}: {problem}")
    doc = salvage(log, args.run)
    # Checked before anything is written: a log without this run must not overwrite a good file.
    if not doc["benchmarks"]:
        raise PerfError(f"{log} holds no finished case of {args.run!r}: {output} left as it was")
    run = parse_run(doc, log)
    write_json(doc, output)
    _say(f"salvaged {len(run.records)} cases of {args.run} into {output}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    """Exit 0 naming this GPU's committed baseline for this torch minor version; else 2 saying why."""
    import torch

    baselines = Path(args.baselines)
    if not torch.cuda.is_available():
        committed = sorted(p.parent.name for p in baselines.glob(f"*/{BASELINE_FILE}"))
        raise NoBaseline(
            "no CUDA GPU here, and baselines are per GPU model: run this on the GPU to compare on. "
            f"Committed in {baselines}: {', '.join(committed) or 'none'}"
        )
    info = machine.machine_info("cuda")
    _say(str(flags.resolve_compare(None, baselines=baselines, storage=Path("."), machine=info).path))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    _say(report.cases_table(run) if args.full else report.matrix(run))
    _say(report.targets(run))
    return 0


def run_parser() -> argparse.ArgumentParser:
    run = argparse.ArgumentParser(
        prog="python -m attention.bench.perf [run]",
        description="Run the perf grid; arguments it does not know go to pytest.",
        allow_abbrev=False,
    )
    run.add_argument(
        "--benchmark-compare", "--compare", nargs="?", const=True, default=None, metavar="REV|NUM|FILE",
        help="gate this run: a git revision (same-run A/B, any GPU), nothing (this GPU's committed baseline), "
        "a pytest-benchmark saved run, or a run/baseline JSON; not pytest-benchmark's flag alone (see perf/README.md)",
    )  # fmt: skip
    run.add_argument(
        "--benchmark-compare-fail", action="append", default=[], metavar="median:X%",
        help="fail a case whose median moved by more than X%% (A/B: its minimum effect; baseline: its threshold)",
    )  # fmt: skip
    run.add_argument(
        "--confirm", type=int, default=None, metavar="N",
        help=f"committed baseline: re-time each case flagged slower in up to N fresh processes (default "
        f"{confirm.DEFAULT_RETIMES}); it fails unless a majority are clean. 0: every flag fails",
    )  # fmt: skip
    run.add_argument("--benchmark-json", default=None, metavar="PATH", help="also write the run's JSON here")
    run.add_argument("--benchmark-disable", action="store_true", help="run each case once, untimed (a smoke test)")
    run.add_argument("--record", action="store_true", help="write the run(s) as this GPU's baseline")
    run.add_argument("--repeat", type=int, default=1, help="run the grid N times; N >= 2 measures spread")
    run.add_argument(
        "--grid", choices=("full", "quick", "tiny"), default=None, help="default: full on CUDA, tiny without a GPU"
    )
    run.add_argument(
        "--impl", action="append", default=[], metavar="NAME|module:attr",
        help="time this implementation (repeatable; default every registered one) beside raw_sdpa and gemms",
    )  # fmt: skip
    run.add_argument(
        "--out", default=None, help="where JSON and tables go (default: $PERF_OUT or .benchmarks/attention-perf/)"
    )
    run.add_argument("--baselines", default=str(DEFAULT_BASELINES), help="baseline root (default ./perf/baselines)")
    run.add_argument("--thresholds", default=None, help="thresholds JSON (default: beside the baseline)")
    run.add_argument("--quiet-pytest", action="store_true", help="pytest output to OUT/pytest.log")
    run.add_argument(
        "--gpus", default=None, metavar="N|all",
        help="spread the cases over the first N GPUs (or all): one pytest process per GPU, longest cases "
        "first, merged into one run; each GPU's log in OUT/gpuI/",
    )  # fmt: skip
    run.add_argument(
        "--time-budget", type=positive_float, default=None, metavar="SECONDS",
        help="wall time for all runs together; a run past its share is interrupted, its finished cases kept",
    )  # fmt: skip
    return run


def tools_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attention.bench.perf", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the perf grid (the default command; see `run --help`)", add_help=False)
    sub.add_parser(
        "calibrate", add_help=False, help="measure the A/B gate on this GPU: false alarms, power, minimum effect"
    )
    c = sub.add_parser("compare", allow_abbrev=False, help="compare a run JSON with the baseline for its GPU")
    c.add_argument("run", help="a run JSON of a CUDA GPU")
    c.add_argument("--baseline", default=None, help="compare with this run or baseline JSON instead of the GPU's own")
    c.add_argument("--baselines", default=str(DEFAULT_BASELINES), help="where the per-GPU baselines live")
    c.add_argument("--thresholds", default=None, help="per-case thresholds JSON (default: beside the baseline)")
    r = sub.add_parser(
        "record", allow_abbrev=False, help="make run JSON(s) the baseline for their GPU (several: merged + thresholds)"
    )
    r.add_argument("runs", nargs="+")
    r.add_argument("--baselines", default=str(DEFAULT_BASELINES))
    r.add_argument("--no-thresholds", action="store_true", help="do not derive thresholds from these runs")
    s = sub.add_parser("spread", allow_abbrev=False, help="per-case run-to-run spread of several runs -> thresholds")
    s.add_argument("runs", nargs="+")
    s.add_argument("--write", default=None, help="write the thresholds JSON here")
    s.add_argument("--k", type=float, default=cmp.SPREAD_K)
    s.add_argument("--floor", type=float, default=None)
    v = sub.add_parser("salvage", allow_abbrev=False, help="rebuild a run JSON from OUT/cases.jsonl after a crash")
    v.add_argument("log")
    v.add_argument("--run", default="run-1", help="run label in the log (run-1, run-2...)")
    v.add_argument("-o", "--output", required=True)
    b = sub.add_parser("baseline", allow_abbrev=False, help="this GPU's committed baseline, or why there is none (2)")
    b.add_argument("--baselines", default=str(DEFAULT_BASELINES))
    t = sub.add_parser("table", allow_abbrev=False, help="print a run's tables")
    t.add_argument("run")
    t.add_argument("--full", action="store_true", help="one line per case")
    return p


TOOLS = {
    "compare": cmd_compare,
    "record": cmd_record,
    "spread": cmd_spread,
    "salvage": cmd_salvage,
    "baseline": cmd_baseline,
    "table": cmd_table,
}


def _require_runner() -> None:
    """The grid runs under pytest with pytest-benchmark and scipy: say what to install, before any case runs."""
    missing = [name for name in ("pytest", "pytest_benchmark", "scipy") if importlib.util.find_spec(name) is None]
    if missing:
        raise PerfError(
            f"the perf grid needs {', '.join(m.replace('_', '-') for m in missing)}, not installed here: "
            'pip install "attention-suite[perf]"'
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["calibrate"]:
            from . import calibrate  # imports this module: loaded on use

            return calibrate.main(argv[1:])
        if argv and argv[0] in TOOLS:
            args = tools_parser().parse_args(argv)
            return TOOLS[args.command](args)
        if argv[:1] in (["-h"], ["--help"]):
            tools_parser().print_help()
            return 0
        commands = ["run", "calibrate", *TOOLS]
        if argv and argv[0].isidentifier() and argv[0] not in commands and not Path(argv[0]).exists():
            near = difflib.get_close_matches(argv[0], commands, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise PerfError(f"unknown command {argv[0]!r}: {hint}commands are {', '.join(commands)}")
        run = run_parser()
        args, extra = run.parse_known_args(argv[1:] if argv[:1] == ["run"] else argv)
        if extra[:1] == ["--"]:
            extra = extra[1:]
        # The whole command line, where each option the CLI took still has its value after it.
        words = argv[1:] if argv[:1] == ["run"] else argv
        if (misplaced := registry.misplaced_specs(words, "--impl")) is not None:
            raise PerfError(misplaced)
        if late := [word for word in registry.bare_words(words) if word in commands and not Path(word).exists()]:
            raise PerfError(f"{late[0]!r} is a command: it comes first (python -m attention.bench.perf {late[0]} ...)")
        if args.repeat < 1:
            run.error("--repeat must be >= 1")
        if args.confirm is not None and args.confirm < 0:
            run.error("--confirm must be >= 0")
        args.grid, extra = flags.take_grid(args.grid, extra)
        _require_runner()
        return cmd_run(args, extra)
    except (PerfError, revision.RevisionError) as exc:
        _say(f"ERROR: {exc}")
        return 2
