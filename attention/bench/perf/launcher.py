"""How ``python -m attention.bench.perf run`` launches pytest: the command, time limits, salvage, and several GPUs.

Every run is a pytest process on the case modules that ship in the package
(:mod:`attention.bench.perf.cases`) with the perf plugin loaded by name
(``-p attention.bench.perf.plugin``), so it needs no checkout and runs from any directory.
``--gpus`` deals the selected cases over one process per GPU (:func:`gpu_plan`,
:func:`sharded_run`); what it must know of the GPUs is read by a child process
(:mod:`.facts`), so this one never holds a CUDA context. :func:`retime` times the cases the
committed-baseline gate flagged again, one fresh process each time (:mod:`.confirm`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ... import registry
from ..files import write_atomically
from . import ab, flags, machine, shard
from .cases import __file__ as _cases_init
from .results import BASELINE_FILE, PerfError, Run, baseline_dir, load_run, salvage, write_json

#: The grid's test modules and the plugin that parametrises them.
CASES = str(Path(_cases_init).parent)
PLUGIN = "attention.bench.perf.plugin"
#: Plugins a timing run has no use for, blocked by name: each process of a run would import them
#: (Hypothesis's alone takes about a second), and a run starts several processes.
_UNUSED_PLUGINS = ("cacheprovider", "hypothesispytest", "anyio", "attention.suite.plugin")
#: Every pytest process of the grid starts so: the shipped case modules, the plugin by name.
_PYTEST = (sys.executable, "-m", "pytest", CASES, "-p", PLUGIN, *(f"-pno:{name}" for name in _UNUSED_PLUGINS))
#: pytest's exit status when a case failed.
CASE_FAILED = 1
#: pytest's exit status when its session was interrupted (by the time limit's SIGINT, or Ctrl-C).
INTERRUPTED = 2
#: pytest's exit status for arguments it refuses (an unknown flag, a path that does not exist).
USAGE_ERROR = 4
#: pytest's exit status when the selection (``-k``, ``-m``, ``--impl``) leaves no case to run.
NO_CASES = 5


def say(msg: str = "") -> None:
    print(msg, flush=True)


def pytest_cmd(label: str, args: argparse.Namespace, extra: list[str], out: Path, cpu: bool) -> list[str]:
    json_path = out / f"{label}.json"
    json_path.unlink(missing_ok=True)
    cmd = [
        *_PYTEST,
        f"--benchmark-json={json_path}",
        f"--perf-log={out / 'cases.jsonl'}",
        f"--perf-run-label={label}",
        "--benchmark-columns=median,iqr,rounds",
        "--benchmark-sort=name",
        "--benchmark-group-by=group",
    ]
    return cmd + _grid_args(args, cpu) + extra


def _grid_args(args: argparse.Namespace, cpu: bool) -> list[str]:
    """Which grid a pytest run of the suite collects: the tiny CPU grid, or ``--grid``'s."""
    if cpu:
        return ["--perf-device=cpu", "--perf-grid=tiny"]
    return [f"--perf-grid={args.grid}"] if args.grid else []


def pytest_run(
    label: str,
    args: argparse.Namespace,
    extra: list[str],
    out: Path,
    cpu: bool,
    limit: float | None,
    env: dict | None = None,
) -> tuple[int, Run | None]:
    cmd = pytest_cmd(label, args, extra, out, cpu)
    say(f"== {label}: {' '.join(cmd[1:])}")
    began = time.time()
    if args.quiet_pytest:
        with (out / "pytest.log").open("a") as log:
            log.write(f"\n== {label}: {' '.join(cmd)}\n")
            log.flush()
            rc = wait([start(cmd, log, env)], limit)[0]
        tail = (out / "pytest.log").read_text().splitlines()[-6:]
        say("\n".join(f"   {line}" for line in tail))
    else:
        rc = wait([start(cmd, env=env)], limit)[0]
    say(f"== {label}: pytest exit {rc}, {time.time() - began:.0f} s wall")
    return rc, None if rc in (USAGE_ERROR, NO_CASES) or times_nothing(extra) else load_or_salvage(label, out)


def times_nothing(extra: Sequence[str]) -> bool:
    """Whether pytest runs each case once untimed (``--benchmark-disable``): no JSON to read."""
    return "--benchmark-disable" in extra


def lists_only(extra: Sequence[str]) -> bool:
    """Whether pytest is asked to list the cases (``--collect-only``), timing nothing."""
    return bool({"--collect-only", "--collectonly", "--co"} & set(extra))


def impl_args(args: argparse.Namespace) -> list[str]:
    """The plugin's ``--perf-impl`` for each ``--impl`` the CLI was given."""
    return [f"--perf-impl={spec}" for spec in args.impl]


def list_cases(args: argparse.Namespace, extra: list[str], cpu: bool) -> int:
    """pytest's listing of the cases ``extra`` and ``args.impl`` select, to the terminal: it times
    nothing and writes nothing, so the last run's files in ``--out`` stay as they were."""
    extra = [*extra, *impl_args(args)]
    rc = subprocess.run([*_PYTEST, *_grid_args(args, cpu), *extra]).returncode
    if rc == NO_CASES:
        raise PerfError(no_cases(extra))
    if rc == USAGE_ERROR:
        raise PerfError(f"pytest refused its arguments (exit {rc}, a usage error): its message is above")
    return rc


def output_of(args: argparse.Namespace, out: Path, sharded: bool = False) -> str:
    """Where a run's pytest output is, for a message that points to a failed case's error."""
    if sharded:
        return f"{out}/gpuN/pytest.log"
    return f"{out}/pytest.log" if args.quiet_pytest else "the pytest output above"


def why_failed(label: str, rc: int, limit: float | None, run: Run | None, log: str) -> str:
    """Why run ``label``, whose pytest exited ``rc`` (not 0), fails the command whatever its
    comparisons said: cut by its share of the time budget (the cases it had not reached were
    neither timed nor compared), a failed case, or pytest's own trouble. ``log``: where its
    output is."""
    timed = f"after timing {len(run.records) if run is not None else 0} case(s)"
    if rc == INTERRUPTED and limit is not None:
        return (
            f"{label} reached its time limit ({limit:.0f} s, from --time-budget) and was stopped {timed}; the cases it "
            "had not reached were neither timed nor compared (raise --time-budget, or narrow the run with -k)"
        )
    if rc == INTERRUPTED:
        return f"{label} was interrupted {timed}"
    if rc == CASE_FAILED:
        return f"{label}: a case failed (pytest exit {rc}); its error is in {log}"
    if rc < 0:
        return f"{label}: pytest was killed by signal {-rc} {timed}"
    return f"{label}: pytest exit {rc}; see {log}"


def refuse_usage_error(rc: int, label: str, args: argparse.Namespace, out: Path, extra: Sequence[str]) -> None:
    """A first run that pytest refused outright (exit 4: an unknown flag, a path that does not
    exist) is the user's usage error, in pytest's words, and so is one whose selection left no
    case (exit 5): nothing ran, so there is no run to salvage nor a failing case to report.
    Later runs and re-timings take the same arguments, so only a first run is asked."""
    if rc == NO_CASES:
        raise PerfError(no_cases(extra))
    if rc != USAGE_ERROR:
        return
    why = "its message is above"
    if args.quiet_pytest:  # pytest's own words, from this run's part of the log
        this_run = (out / "pytest.log").read_text().rsplit(f"\n== {label}: ", 1)[-1].splitlines()
        why = next((ln.strip() for ln in reversed(this_run) if "error:" in ln.lower()), "see pytest.log")
    raise PerfError(f"pytest refused its arguments (exit {rc}, a usage error): {why}")


def no_cases(extra: Sequence[str]) -> str:
    """Why a run timed nothing when its selection (pytest's exit 5) left no case, and how to look."""
    said = " ".join(_selection(extra)) or "the arguments given"
    return (
        f"no case selected: {said} matched none of this grid's cases (list the grid's cases with: "
        "python -m attention.bench.perf run --collect-only -q, plus your --grid and --impl)"
    )


_SELECTING = ("-k", "-m", "--perf-impl", "--perf-cases")


def _selection(extra: Sequence[str]) -> list[str]:
    """The arguments among ``extra`` that choose cases, each with its value (``-k flex``), as the
    user gave them to the CLI (``--impl X`` for the ``--perf-impl=X`` it passes on)."""
    chosen = []
    for i, arg in enumerate(extra):
        flag = arg.split("=", 1)[0]
        if flag == "--perf-impl" and arg != flag:
            chosen.append(shlex.join(["--impl", arg.split("=", 1)[1]]))
        elif flag in _SELECTING:
            given_apart = arg == flag and i + 1 < len(extra)
            chosen.append(shlex.join([arg, extra[i + 1]]) if given_apart else shlex.quote(arg))
        elif arg.startswith(("-k", "-m")) and len(arg) > 2 and not arg.startswith("--"):  # -kflex
            chosen.append(shlex.quote(arg))
    return chosen


def retime(
    label: str, args: argparse.Namespace, extra: list[str], out: Path, cases: list[str], limit: float | None
) -> tuple[int, Run | None]:
    """``cases`` timed again in one fresh pytest process (the run's own arguments, the selection
    narrowed with ``--perf-cases``), with empty inductor and Triton caches of its own so each
    compiled case is compiled again: a speed drawn once per compilation is drawn anew
    (:mod:`.confirm`). Its JSON is ``OUT/<label>.json``; the caches go afterwards."""
    listed = out / f"{label}-cases.txt"
    listed.write_text("".join(f"{case}\n" for case in cases))
    with tempfile.TemporaryDirectory(prefix="attention-perf-retime-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(cache) / "inductor"))
        env["TRITON_CACHE_DIR"] = str(Path(cache) / "triton")
        return pytest_run(label, args, [*extra, "--perf-cases", str(listed)], out, False, limit, env=env)


def load_or_salvage(label: str, out: Path) -> Run | None:
    """The run's JSON, or one rebuilt from its per-case log if pytest died before writing it."""
    json_path = out / f"{label}.json"
    try:
        return load_run(json_path)
    except PerfError as exc:  # pytest-benchmark creates the file at start: a dead run leaves it empty
        say(f"{label}: {exc}")
    if (out / "cases.jsonl").exists():
        say(f"{label}: rebuilding its JSON from the finished cases in cases.jsonl")
        try:
            write_json(salvage(out / "cases.jsonl", label), json_path)
            return load_run(json_path)
        except PerfError as exc:
            say(f"{label}: nothing to salvage ({exc})")
    return None


def start(cmd: list[str], stdout=None, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT if stdout else None, env=env)


def wait(procs: list[subprocess.Popen], time_limit: float | None) -> list[int]:
    """Exit codes of ``procs``; past ``time_limit`` seconds the ones still running are
    interrupted like Ctrl-C, so pytest still ends its session and pytest-benchmark writes the
    JSON of the cases already timed."""
    deadline = None if time_limit is None else time.time() + time_limit
    for proc in procs:
        try:
            proc.wait(timeout=None if deadline is None else max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            break
    running = [p for p in procs if p.poll() is None]
    if running:
        say(f"time limit ({time_limit:.0f} s) reached: interrupting pytest; finished cases are kept")
        for proc in running:
            proc.send_signal(signal.SIGINT)
        grace = time.time() + 60  # one minute for all of them to write their results, not each
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, grace - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return [p.returncode for p in procs]


def selected_cases(args: argparse.Namespace, extra: list[str], cpu: bool, out: Path) -> list[str]:
    """The case ids this run selects (``-k``, ``-m`` and the grid applied), by pytest's own
    collection (the plugin writes them to a file: no parsing of pytest's output)."""
    listed = out / "selected-cases.txt"
    listed.unlink(missing_ok=True)
    cmd = [*_PYTEST, "--collect-only", "-q"]
    cmd += [*_grid_args(args, cpu), *extra, f"--perf-list-cases={listed}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode not in (0, NO_CASES):
        said = (done.stdout + done.stderr).strip()[-800:]  # a usage error goes to stderr
        raise PerfError(f"collecting the cases failed (pytest exit {done.returncode}): {said}")
    return listed.read_text().split() if listed.is_file() else []


def gpu_facts(gpus: list[int], grid_name: str = "", impls: Sequence[str] = ()) -> dict:
    """``names`` (the models of ``gpus``), ``machine`` (the first one's machine info) and, given a
    grid, ``cases`` (its cases described), read by a child process: a CUDA context in this one
    would sit on a GPU through the whole run, taking memory there and counted by the run's noise
    checks as another process computing on it."""
    cmd = [sys.executable, "-m", "attention.bench.perf.facts", f"--grid={grid_name}", *map(str, gpus)]
    cmd += [f"--impl={spec}" for spec in impls]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise PerfError(f"reading the GPUs' facts failed (exit {done.returncode}): {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gpu_plan(
    args: argparse.Namespace, extra: list[str], out: Path, gpus: list[int], cpu: bool = False
) -> list[tuple[int, list[str], float]]:
    """``(gpu, case ids, estimated seconds)`` per GPU with work: the selected cases dealt longest
    first (:mod:`.shard`), once for all of a run's repeats. ``cpu``: the tiny CPU grid (the
    machinery, tested without GPUs). Opens no CUDA context here (:func:`gpu_facts`)."""
    from .grid import grid
    from .runner import describe

    grid_name = args.grid or ("tiny" if cpu else "full")
    specs = [spec for spec in flags.given(extra, "--perf-impl") if spec]
    if cpu:
        impls = [registry.resolve(spec) for spec in specs] or None
        info = machine.machine_info("cpu")
        cases = {c.case_id: describe(c) for c in grid(grid_name, "cpu", impls=impls)}
    else:
        facts = gpu_facts(gpus, grid_name, specs)
        if len(models := set(facts["names"])) > 1:
            raise PerfError(f"--gpus mixes GPU models ({', '.join(sorted(models))}): a run is per model")
        info, cases = facts["machine"], facts["cases"]
    selection = [a for a in extra if not a.startswith(("--perf-compare-rev", "--perf-ab-out", "--perf-min-effect"))]
    ids = set(selected_cases(args, selection, cpu, out))
    infos = {case: cases[case] for case in ids if case in cases}
    if missing := sorted(ids - set(infos)):
        raise PerfError(f"pytest collected cases the grid does not describe: {', '.join(missing[:3])}")
    history_path = baseline_dir(Path(args.baselines), info) / BASELINE_FILE
    history = shard.history_seconds(load_run(history_path) if not cpu and history_path.is_file() else None)
    costs = shard.case_costs(infos, history, *_timing(extra))
    shards = shard.lpt_shards(costs, len(gpus))
    return [(gpu, dealt, sum(costs[c] for c in dealt)) for gpu, dealt in zip(gpus, shards, strict=True) if dealt]


def sharded_run(
    label: str,
    args: argparse.Namespace,
    extra: list[str],
    out: Path,
    limit: float | None,
    plan: list[tuple[int, list[str], float]],
    cpu: bool = False,
) -> tuple[int, Run | None]:
    """The grid as ``plan`` (:func:`gpu_plan`) deals it: one pytest process per GPU, each pinned with
    CUDA_VISIBLE_DEVICES and given its shard, merged into one run (and one A/B report). ``plan``
    is not empty: an empty selection is refused before any run (:func:`no_cases`)."""
    import torch

    started = time.time()
    ab_run = any(a.startswith("--perf-compare-rev") for a in extra)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",") if visible else None
    procs, dirs, logs = [], [], []
    for gpu, cases, seconds in plan:
        where = out / f"gpu{gpu}"
        where.mkdir(parents=True, exist_ok=True)
        for stale in ("cases.jsonl", "pytest.log", "ab.json", "summary.md", "ab.png"):
            (where / stale).unlink(missing_ok=True)
        (where / "cases.txt").write_text("\n".join(cases) + "\n")
        own = ["--perf-cases", str(where / "cases.txt"), f"--perf-ab-out={where}"]
        cmd = pytest_cmd(label, args, extra + own, where, cpu)
        env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}  # the merged summary only
        env["CUDA_VISIBLE_DEVICES"] = physical[gpu] if physical else str(gpu)
        say(f"== {label} on GPU {gpu}: {len(cases)} cases, ~{seconds:.0f} s estimated; log {where / 'pytest.log'}")
        logs.append((where / "pytest.log").open("a"))
        procs.append(start(cmd, logs[-1], env))
        dirs.append((gpu, where))
    try:
        codes = wait(procs, limit)
    finally:
        for log in logs:
            log.close()
    wall = time.time() - started
    parts, lost = [], []
    for (gpu, where), rc in zip(dirs, codes, strict=True):
        say(f"== {label} on GPU {gpu}: pytest exit {rc}")
        say("\n".join(f"   {line}" for line in (where / "pytest.log").read_text().splitlines()[-3:]))
        run = None if times_nothing(extra) else load_or_salvage(label, where)
        if run is not None:
            parts.append((gpu, run))
        with (out / "cases.jsonl").open("a") as merged_log:
            merged_log.write((where / "cases.jsonl").read_text() if (where / "cases.jsonl").exists() else "")
        if ab_run and not (where / "ab.json").is_file():  # it died before judging its shard
            why = f"GPU {gpu}'s pytest process ended (exit {rc}) before it wrote its A/B report"
            lost += [f"{key}: {why}" for key in (where / "cases.txt").read_text().split()]
    say(f"== {label}: {len(dirs)} GPUs, {wall:.0f} s wall")
    # A worker killed by a signal has a negative code: a failure too, never a pass.
    status = 0 if all(rc == 0 for rc in codes) else max([1, *(rc for rc in codes if rc > 0)])
    if ab_run:
        reports = [
            ab.report_from_json(json.loads((w / "ab.json").read_text())) for _, w in dirs if (w / "ab.json").is_file()
        ]
        if reports:
            ab.write_outputs(ab.merge_reports(reports, refused=lost), out)
    if not parts:
        return status, None
    host_gpus = len(plan) if cpu else torch.cuda.device_count()
    merged = shard.merge_shards(parts, wall, host_gpus=host_gpus)
    write_atomically(out / f"{label}.json", json.dumps(merged, indent=1) + "\n")
    return status, load_run(out / f"{label}.json")


def _timing(extra: list[str]) -> tuple[float, int]:
    """Timed seconds per case and rounds at least, as the workers will take them: ``--perf-budget``
    and the runner's floor, unless pytest-benchmark's ``--benchmark-max-time`` or
    ``--benchmark-min-rounds`` set them (:data:`.flags.APPLIED`)."""
    from .runner import DEFAULT_BUDGET_S, MIN_ROUNDS

    def last(flag: str, kind: type, what: str, default):
        given = flags.given(extra, flag)
        try:
            return kind(given[-1]) if given and given[-1] else default
        except ValueError:
            raise PerfError(f"{flag} must be {what}, got {given[-1]!r}") from None

    seconds = "a number of seconds"
    budget = last("--benchmark-max-time", float, seconds, last("--perf-budget", float, seconds, DEFAULT_BUDGET_S))
    return budget, last("--benchmark-min-rounds", int, "a whole number", MIN_ROUNDS)


def run_time_limit(remaining_s: float, run: int, repeat: int) -> float:
    """Seconds run ``run`` of ``repeat`` may take out of the ``remaining_s`` left of the budget.

    The first run of a process tree compiles every flex kernel (the later ones find them in
    inductor's on-disk cache), so it gets twice a later run's share; never less than 30 s.
    """
    weights = [2.0 if i == 1 else 1.0 for i in range(run, repeat + 1)]
    return max(30.0, remaining_s * weights[0] / sum(weights))
