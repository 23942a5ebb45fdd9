"""``python -m attention.bench.perf``: run the perf grid, compare with the baseline, record, measure spread.

``nox -s perf -- ARGS`` runs ``python -m attention.bench.perf run ARGS``. Subcommands:

* ``run`` (default): the perf grid under pytest (``perf/``), JSON to ``--out``, tables printed;
  ``--benchmark-compare[=BASELINE]`` compares each run with the baseline for this GPU and fails
  on regressions; ``--record`` writes the run(s) as this GPU's baseline; ``--repeat N`` runs the
  grid N times and derives per-case thresholds from the spread. Other arguments go to pytest
  (``-k flex``, ``--perf-graphs=all``...). No CUDA GPU: the tiny CPU grid runs to show the
  machinery working, nothing is compared or recorded, and the exit status is pytest's.
* ``compare RUN``, ``record RUN...``, ``spread RUN...``, ``table RUN``: the same steps on JSON
  files already made, e.g. fetched from a GPU machine (no GPU needed); ``salvage LOG -o RUN``
  rebuilds a run's JSON from its per-case log if the run died before writing it.

Exit status: 0 pass; 1 regressions, guard failures or failed cases; 2 the comparison was
refused or impossible (other GPU or torch minor, no baseline, unreadable file).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import compare as cmp
from . import guards, report
from .results import (
    BASELINE_FILE,
    THRESHOLDS_FILE,
    PerfError,
    Run,
    baseline_dir,
    check_comparable,
    find_baseline,
    load_run,
    merge_runs,
    salvage,
    write_run,
)

SUBCOMMANDS = ("run", "compare", "record", "spread", "salvage", "table")
DEFAULT_BASELINES = Path("perf") / "baselines"
NO_CUDA = (
    "No CUDA GPU here: running the tiny CPU grid so the perf machinery can be seen working. "
    "CPU numbers are not baselines: nothing is compared or recorded."
)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _find_perf_dir() -> Path:
    for root in (Path.cwd(), *Path.cwd().parents):
        if (root / "perf" / "conftest.py").exists():
            return root / "perf"
    raise PerfError("cannot find perf/conftest.py: run from the repository checkout (perf/ holds the benchmarks)")


def _default_out() -> Path:
    return Path(os.environ.get("PERF_OUT") or Path(".benchmarks") / "attention-perf")


def _thresholds_path(explicit: str | None, baseline: Path) -> Path:
    return Path(explicit) if explicit else baseline.parent / THRESHOLDS_FILE


def compare_one(run: Run, baseline_path: Path, thresholds_path: Path | None) -> cmp.Comparison:
    baseline = load_run(baseline_path)
    warnings = check_comparable(baseline, run)
    result = cmp.compare(baseline, run, cmp.load_thresholds(thresholds_path))
    result.warnings += warnings
    where = thresholds_path if thresholds_path and thresholds_path.exists() else "defaults"
    _say(f"Thresholds: {where}")
    _say(cmp.format_comparison(result, baseline, run))
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
    write_run(merged, target / BASELINE_FILE)
    _say(f"Recorded {len(merged.records)} cases from {len(runs)} run(s) as {target / BASELINE_FILE}")
    if with_thresholds:
        thresholds = cmp.thresholds_from_spread(runs)
        (target / THRESHOLDS_FILE).write_text(json.dumps(thresholds, indent=1) + "\n")
        _say(f"Wrote thresholds from the spread of {len(runs)} runs: {target / THRESHOLDS_FILE}")
    elif not (target / THRESHOLDS_FILE).exists():
        _say(f"No {THRESHOLDS_FILE} yet: defaults apply until `--repeat 3 --record` measures the spread.")
    _say(f"Commit {target}/ to make it the baseline for {merged.gpu}.")
    return target


def _pytest_run(
    label: str, args: argparse.Namespace, extra: list[str], out: Path, cpu: bool, limit: float | None
) -> tuple[int, Run | None]:
    json_path = out / f"{label}.json"
    json_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(_find_perf_dir()),
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={json_path}",
        f"--perf-log={out / 'cases.jsonl'}",
        f"--perf-run-label={label}",
        "--benchmark-columns=median,iqr,rounds",
        "--benchmark-sort=name",
        "--benchmark-group-by=group",
    ]
    if cpu:
        cmd += ["--perf-device=cpu", "--perf-grid=tiny"]
    elif args.grid:
        cmd.append(f"--perf-grid={args.grid}")
    cmd += extra
    _say(f"== {label}: {' '.join(cmd[1:])}")
    start = time.time()
    if args.quiet_pytest:
        with (out / "pytest.log").open("a") as log:
            log.write(f"\n== {label}: {' '.join(cmd)}\n")
            log.flush()
            rc = _call(cmd, limit, stdout=log)
        tail = (out / "pytest.log").read_text().splitlines()[-6:]
        _say("\n".join(f"   {line}" for line in tail))
    else:
        rc = _call(cmd, limit)
    _say(f"== {label}: pytest exit {rc}, {time.time() - start:.0f} s wall")
    try:
        return rc, load_run(json_path)
    except PerfError as exc:  # pytest-benchmark creates the file at start: a dead run leaves it empty
        _say(f"{label}: {exc}")
    if (out / "cases.jsonl").exists():
        _say(f"{label}: rebuilding its JSON from the finished cases in cases.jsonl")
        json_path.write_text(json.dumps(salvage(out / "cases.jsonl", label)))
        try:
            return rc, load_run(json_path)
        except PerfError as exc:
            _say(f"{label}: nothing to salvage ({exc})")
    return rc, None


def _call(cmd: list[str], time_limit: float | None, stdout=None) -> int:
    """Run ``cmd``; past ``time_limit`` seconds interrupt it like Ctrl-C, so pytest still ends its
    session and pytest-benchmark writes the JSON of the cases already timed."""
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    try:
        return proc.wait(timeout=time_limit)
    except subprocess.TimeoutExpired:
        _say(f"time limit ({time_limit:.0f} s) reached: interrupting pytest; finished cases are kept")
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def run_time_limit(remaining_s: float, run: int, repeat: int) -> float:
    """Seconds run ``run`` of ``repeat`` may take out of the ``remaining_s`` left of the budget.

    The first run of a process tree compiles every flex kernel (the later ones find them in
    inductor's on-disk cache), so it gets twice a later run's share; never less than 30 s.
    """
    weights = [2.0 if i == 1 else 1.0 for i in range(run, repeat + 1)]
    return max(30.0, remaining_s * weights[0] / sum(weights))


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    cpu = not torch.cuda.is_available()
    out = Path(args.out or _default_out())
    out.mkdir(parents=True, exist_ok=True)
    if cpu:
        _say(NO_CUDA)
    status, runs, started = 0, [], time.time()
    for i in range(1, args.repeat + 1):
        limit = None
        if args.time_budget:  # what is left, shared by the runs still to go
            limit = run_time_limit(args.time_budget - (time.time() - started), i, args.repeat)
        rc, run = _pytest_run(f"run-{i}", args, extra, out, cpu, limit)
        status = max(status, 1 if rc != 0 else 0)
        if run is not None:
            runs.append(run)
    if not runs:
        _say("FAIL: no run produced results")
        return 1
    summary = [report.matrix(runs[-1]), report.wall_time(runs[-1]), report.targets(runs[-1])]
    if len(runs) >= 2:
        thresholds = cmp.thresholds_from_spread(runs)
        (out / THRESHOLDS_FILE).write_text(json.dumps(thresholds, indent=1) + "\n")
        summary.append(cmp.format_spread(thresholds))
    (out / "summary.txt").write_text("\n\n".join([*summary, report.cases_table(runs[-1])]) + "\n")
    _say("\n\n".join(summary))  # the tables first: verdicts, the part to read, come last
    if cpu:
        if args.benchmark_compare or args.record:
            _say("--benchmark-compare / --record skipped: no CUDA GPU (CPU runs are never baselined).")
        return status
    verdicts = []
    try:
        if args.benchmark_compare:
            for run in runs:
                path = Path(args.benchmark_compare) if isinstance(args.benchmark_compare, str) else None
                path = path or find_baseline(args.baselines, run)
                result = compare_one(run, path, _thresholds_path(args.thresholds, path))
                verdicts.append(
                    f"{Path(run.path).name} vs {path}: {'FAIL' if result.failed else 'PASS'} "
                    f"({len(result.regressions)} regressions, {len(result.guard_failures)} guard failures, "
                    f"{len(result.improvements)} improvements)"
                )
                status = max(status, 1 if result.failed else 0)
        if args.record:
            record(runs, Path(args.baselines), with_thresholds=len(runs) >= 2)
    except PerfError as exc:
        _say(f"ERROR: {exc}")
        return 2
    finally:
        if verdicts:
            _say("\n".join(verdicts))
    _say(f"{'FAIL' if status else 'PASS'}: results in {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return status


def cmd_compare(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    path = Path(args.baseline) if args.baseline else find_baseline(args.baselines, run)
    result = compare_one(run, path, _thresholds_path(args.thresholds, path))
    return 1 if result.failed else 0


def cmd_record(args: argparse.Namespace) -> int:
    runs = [load_run(p) for p in args.runs]
    record(runs, Path(args.baselines), with_thresholds=len(runs) >= 2 and not args.no_thresholds)
    return 0


def cmd_spread(args: argparse.Namespace) -> int:
    thresholds = cmp.thresholds_from_spread([load_run(p) for p in args.runs], k=args.k, floor=args.floor)
    _say(cmp.format_spread(thresholds))
    if args.write:
        Path(args.write).write_text(json.dumps(thresholds, indent=1) + "\n")
        _say(f"wrote {args.write}")
    return 0


def cmd_salvage(args: argparse.Namespace) -> int:
    Path(args.output).write_text(json.dumps(salvage(args.log, args.run)))
    run = load_run(args.output)
    _say(f"salvaged {len(run.records)} cases of {args.run} into {args.output}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    _say(report.cases_table(run) if args.full else report.matrix(run))
    _say(report.targets(run))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attention.bench.perf", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser(
        "run", allow_abbrev=False, help="run the perf grid (default command); unknown args go to pytest"
    )
    run.add_argument(
        "--benchmark-compare", "--compare", nargs="?", const=True, default=None, metavar="BASELINE",
        help="compare with the baseline for this GPU (or the given baseline JSON); fail on regressions",
    )  # fmt: skip
    run.add_argument("--record", action="store_true", help="write the run(s) as this GPU's baseline")
    run.add_argument("--repeat", type=int, default=1, help="run the grid N times; N >= 2 measures spread")
    run.add_argument("--grid", choices=("full", "quick", "tiny"), default=None, help="default: full on CUDA")
    run.add_argument("--out", default=None, help="where JSON and tables go (default: $PERF_OUT or .benchmarks/)")
    run.add_argument("--baselines", default=str(DEFAULT_BASELINES), help="baseline root (default perf/baselines)")
    run.add_argument("--thresholds", default=None, help="thresholds JSON (default: beside the baseline)")
    run.add_argument("--quiet-pytest", action="store_true", help="pytest output to OUT/pytest.log")
    run.add_argument(
        "--time-budget", type=float, default=None, metavar="SECONDS",
        help="wall time for all runs together; a run past its share is interrupted, its finished cases kept",
    )  # fmt: skip
    c = sub.add_parser("compare", allow_abbrev=False, help="compare a run JSON with the baseline for its GPU")
    c.add_argument("run")
    c.add_argument("--baseline", default=None)
    c.add_argument("--baselines", default=str(DEFAULT_BASELINES))
    c.add_argument("--thresholds", default=None)
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
    t = sub.add_parser("table", allow_abbrev=False, help="print a run's tables")
    t.add_argument("run")
    t.add_argument("--full", action="store_true", help="one line per case")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv.insert(0, "run")
    p = parser()
    if argv[0] == "run":
        args, extra = p.parse_known_args(argv)
        if extra and extra[0] == "--":
            extra = extra[1:]
    else:
        args, extra = p.parse_args(argv), []
    if args.command == "run" and args.repeat < 1:
        p.error("--repeat must be >= 1")
    try:
        if args.command == "run":
            return cmd_run(args, extra)
        commands = {
            "compare": cmd_compare,
            "record": cmd_record,
            "spread": cmd_spread,
            "salvage": cmd_salvage,
            "table": cmd_table,
        }
        return commands[args.command](args)
    except PerfError as exc:
        _say(f"ERROR: {exc}")
        return 2
