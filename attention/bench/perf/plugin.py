"""The perf grid's pytest plugin: options, the case parametrisation, the GPU timer on every case,
machine info, guards, pytest-benchmark's flags and the same-run A/B.

``python -m attention.bench.perf run`` loads it with ``-p attention.bench.perf.plugin`` on the
case modules of :mod:`attention.bench.perf.cases`, from any directory; in this checkout
``perf/conftest.py`` names it, so ``pytest perf`` works too. Options (all optional):

* ``--perf-grid full|quick|tiny``: default ``full`` on CUDA, ``tiny`` on CPU (:mod:`.grid`).
* ``--perf-impl NAME|module:attr`` (repeatable): time only these implementations, besides the
  references every grid has (``raw_sdpa``, ``gemms``); default every registered one.
* ``--perf-device``: default ``cuda`` when present.
* ``--perf-graphs all|fwd|none``: which cases are timed as CUDA-graph replays: every case that
  captures (default), forward cases only, or none. Eager forward+backward cases include the CPU's
  dispatch: a small training step could detect ±11% in an A/A eagerly, ±1% captured
  (docs/design.md#graph-timed-training-steps).
* ``--perf-budget SECONDS``: timed seconds per case (rounds follow, 30..100).
* ``--perf-cases FILE``: only the case ids listed (one per line), in that order: one GPU's shard
  of a ``--gpus`` run (:mod:`.shard`); ``--perf-list-cases FILE`` writes the selected ones
  (``--gpus`` collects with it).
* ``--perf-log FILE``: one JSON line per case as it finishes, so a crash loses nothing already run.
* ``--perf-compare-rev REV``: the same-run A/B: each case is also timed as git revision ``REV``
  of its implementation's repository builds it (:mod:`.base_revision`), rounds interleaved, and
  the run fails on a regression beyond the case's minimum effect (``--perf-min-effects FILE``,
  default the packaged ``min_effects.json``); ``summary.md``, ``ab.json`` and ``ab.png`` go to
  ``--perf-ab-out`` (default ``.benchmarks/attention-perf``).
* ``--perf-calibrate``: the gate's calibration (:mod:`.calibration`): each case is timed with an
  A/A twin and the twin with injected work of 1-5% of its time, rounds rotated, for as many
  gate-sized runs as bring every kind of case to ``--perf-calibrate-pairs`` A/A tests (at most
  ``--perf-calibrate-max-depth`` a case); the samples go to ``extra_info["calibration"]``, for
  ``python -m attention.bench.perf calibrate`` to judge.

pytest-benchmark's own ``--benchmark-*`` flags work, are applied the suite's way
(``--benchmark-min-rounds``, ``--benchmark-max-time``, ``--benchmark-warmup-iterations``) or
are refused at once with the reason (:mod:`.flags`).
"""

from __future__ import annotations

import importlib
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from ... import flex, registry
from ..memory import end_case, end_cases, free_cached_memory, quiet_profiler_logs
from ..timing import clock_for
from . import ab, calibration, guards, machine, runner, spin, stats
from . import grid as perf_grid
from .base_revision import BaseRevision
from .revision import RevisionError
from .state import PerfState, kernel_options, run_options

_STATE = pytest.StashKey[PerfState]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attention-perf")
    group.addoption("--perf-grid", choices=perf_grid.GRIDS, default=None, help="which cases (default: full on CUDA)")
    group.addoption(
        "--perf-impl", action="append", default=[], metavar="NAME|module:attr",
        help="time this implementation (repeatable; default: every registered one); references always run",
    )  # fmt: skip
    group.addoption("--perf-device", default=None, help="cuda or cpu (default: cuda when present)")
    group.addoption(
        "--perf-graphs", choices=runner.GRAPH_POLICIES, default="all", help="cases timed as CUDA-graph replays"
    )
    group.addoption("--perf-budget", type=float, default=runner.DEFAULT_BUDGET_S, help="timed seconds per case")
    group.addoption("--perf-log", default=None, help="append one JSON line per finished case to this file")
    group.addoption("--perf-run-label", default="run", help="label of this run in the --perf-log file")
    group.addoption("--perf-compare-rev", default=None, metavar="REV", help="A/B: also time git revision REV")
    group.addoption("--perf-min-effects", default=None, metavar="FILE", help="A/B minimum effects per case")
    group.addoption("--perf-min-effect", type=float, default=None, help="A/B minimum effect for every case")
    group.addoption("--perf-ab-out", default=None, metavar="DIR", help="where the A/B summary, JSON and plot go")
    group.addoption("--perf-cases", default=None, metavar="FILE", help="run only these case ids, in this order")
    group.addoption("--perf-calibrate", action="store_true", help="time A/A twins and injected slowdowns")
    group.addoption(
        "--perf-calibrate-pairs", type=int, default=calibration.DEFAULT_PAIRS, help="A/A tests per kind of case"
    )
    group.addoption(
        "--perf-calibrate-max-depth", type=int, default=calibration.DEFAULT_MAX_DEPTH,
        help="the most gate-sized runs one case is timed for",
    )  # fmt: skip
    group.addoption("--perf-list-cases", default=None, metavar="FILE", help="write the selected case ids here")
    group.addoption(
        "--perf-flex-kernel-options",
        default=None,
        metavar="JSON",
        help='kernel_options for flex prefill cases, e.g. \'{"BLOCK_M": 128, "BLOCK_N": 64}\' (a tuning lever)',
    )


def _impls(specs: list[str]) -> list[str] | None:
    """The registered names of ``--perf-impl``'s specs (``module:attr`` ones get registered)."""
    names = []
    for spec in specs:
        try:
            names.append(registry.resolve(spec))
        except (ValueError, TypeError) as exc:
            raise pytest.UsageError(f"--perf-impl: {exc}") from None  # the registry's errors name the spec
    return list(dict.fromkeys(names)) or None


def pytest_configure(config: pytest.Config) -> None:
    quiet_profiler_logs()  # the backend probe profiles every case
    device = config.getoption("--perf-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--perf-device=cuda but this machine has no CUDA GPU")
    opts, notes = run_options(config, device)
    log = config.getoption("--perf-log")
    state = PerfState(
        device=device,
        grid=config.getoption("--perf-grid") or ("full" if torch.device(device).type == "cuda" else "tiny"),
        opts=opts,
        clock=clock_for(device),
        log=Path(log) if log else None,
        label=config.getoption("--perf-run-label"),
        machine=machine.machine_info(device),
        impls=_impls(config.getoption("--perf-impl")),
        flex_kernel_options=kernel_options(config.getoption("--perf-flex-kernel-options")),
        notes=notes,
    )
    state.gpu_start = machine.gpu_state(device)
    if state.log:
        state.log.parent.mkdir(parents=True, exist_ok=True)
    rev = config.getoption("--perf-compare-rev")
    if rev is not None:
        _open_base(config, state, rev)
    if config.getoption("--perf-calibrate"):
        _open_calibration(config, state)
    state.write({"machine_info": {machine.KEY: state.machine}})
    config.stash[_STATE] = state


def _check_side_by_side(config: pytest.Config, state: PerfState, option: str, what: str) -> None:
    """Refuse what would time one side of ``option``'s comparison differently, or not at all, or
    in too few rounds for the gate's interval; note fewer rounds than the runner's own minimum."""
    rounds = state.opts.min_rounds
    if rounds < (fewest := stats.min_rounds()):
        raise pytest.UsageError(
            f"--benchmark-min-rounds={rounds}: {option} pairs the rounds of its sides, and the gate's "
            f"{stats.DEFAULT_LEVEL:.0%} interval needs at least {fewest} pairs"
        )
    if rounds < runner.MIN_ROUNDS:
        state.notes.append(
            f"--benchmark-min-rounds={rounds}: long cases get fewer than {runner.MIN_ROUNDS} rounds, and a stray "
            "round can then set the edge of their interval (docs/design.md#paired-rounds)"
        )
    for name, flag in (("benchmark_disable", "--benchmark-disable"), ("benchmark_skip", "--benchmark-skip")):
        if config.getoption(name, False):
            raise pytest.UsageError(f"{option} times {what}; {flag} times nothing")
    if config.getoption("benchmark_disable_gc", False):
        raise pytest.UsageError(f"--benchmark-disable-gc applies to the head side only: {option} would be lopsided")
    if getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput"):
        # pytest-benchmark disables itself under xdist: nothing would be timed, and both sides of a
        # case must share one process and one GPU.
        raise pytest.UsageError(f"{option} cannot run under pytest-xdist (-n): run it in one process")


def _open_base(config: pytest.Config, state: PerfState, rev: str) -> None:
    _check_side_by_side(config, state, "--perf-compare-rev", "both revisions")
    effects = config.getoption("--perf-min-effects") or ab.MIN_EFFECTS_FILE
    try:
        state.min_effects = ab.load_min_effects(effects)
    except (OSError, ValueError) as exc:
        raise pytest.UsageError(f"--perf-min-effects: {exc}") from None
    if (override := config.getoption("--perf-min-effect")) is not None:
        if not 0 <= override < 1:
            raise pytest.UsageError(f"--perf-min-effect must be in [0, 1), got {override}")
        state.min_effects = ab.MinEffects(override)
    state.ab_out = Path(config.getoption("--perf-ab-out") or Path(".benchmarks") / "attention-perf")
    try:
        state.base = BaseRevision(rev, state.impls or list(registry.implementations()))
    except RevisionError as exc:
        raise pytest.UsageError(f"--perf-compare-rev: {exc}") from None
    config.stash[_STATE] = state  # from here on pytest_unconfigure removes the worktrees
    state.previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    state.machine["ab_base"] = state.base.label
    state.machine["ab_head"] = state.base.head_label
    state.notes += [f"A/B: {name} is not compared: {why}" for name, why in state.base.not_compared.items()]


def _open_calibration(config: pytest.Config, state: PerfState) -> None:
    if state.base is not None:
        raise pytest.UsageError("--perf-calibrate measures the A/B gate itself: run it without --perf-compare-rev")
    _check_side_by_side(config, state, "--perf-calibrate", "each case's variants side by side")
    pairs, depth = config.getoption("--perf-calibrate-pairs"), config.getoption("--perf-calibrate-max-depth")
    if pairs < 1 or depth < 1:
        raise pytest.UsageError(f"--perf-calibrate-pairs and -max-depth must be >= 1, got {pairs} and {depth}")
    state.calibrate = {"pairs": pairs, "max_depth": depth, "levels": list(calibration.LEVELS)}
    state.machine["calibration"] = dict(state.calibrate)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    pytest.exit("terminated (SIGTERM): the A/B stops here", returncode=128 + signum)


def pytest_unconfigure(config: pytest.Config) -> None:
    end_cases()
    state = config.stash.get(_STATE, None)
    if state is not None and state.base is not None:
        state.base.close()  # the worktrees go, on success, failure, Ctrl-C and SIGTERM alike
        signal.signal(signal.SIGTERM, state.previous_sigterm)


def pytest_report_header(config: pytest.Config) -> str:
    s = config.stash[_STATE]
    m = s.machine
    device = m.get("gpu_name") or s.device
    lines = [f"attention perf: grid={s.grid} device={device} torch={m['torch']} graphs={s.opts.graphs}"]
    if s.impls:
        lines.append(f"implementations: {', '.join(s.impls)} (and the references)")
    if s.base is not None:
        lines.append(f"A/B: base {s.base.label} vs head {m['ab_head']}, rounds interleaved")
    if s.calibrate is not None:
        levels = ", ".join(f"{lv:.0%}" for lv in s.calibrate["levels"])
        lines.append(f"calibration: head, A/A twin and the twin + {levels} of its time, rounds rotated")
    lines += [f"note: {n}" for n in s.notes]
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash[_STATE]
    # The module that defines the test (perf/test_grid.py re-exports the package's): its KIND.
    kind = getattr(importlib.import_module(metafunc.function.__module__), "KIND", None)
    every = perf_grid.grid(state.grid, state.device, impls=state.impls, flex_kernel_options=state.flex_kernel_options)
    cases = {c.case_id: c for c in every if perf_grid.kind(c) == kind}
    state.cases.update(cases)
    # Parametrised by id (plain strings in the JSON); the ``case`` fixture turns it into the workload.
    metafunc.parametrize("case", list(cases), ids=list(cases), indirect=True)


_KIND_ORDER = {"prefill": 0, "decode": 1, "mask": 2}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[_STATE]

    def order(item: pytest.Item) -> tuple:
        case = state.cases.get(_case_of(item))
        if case is None:
            return (9, False)
        # Prefill first and the slow from-scratch cases last: a run cut short by its time limit
        # keeps the cases that matter most.
        return (_KIND_ORDER[perf_grid.kind(case)], case.impl == "from_scratch")

    items.sort(key=order)  # stable: grid order within each kind
    if shard := config.getoption("--perf-cases"):
        items[:] = _shard_items(config, items, Path(shard))
    for item in items:
        case_id = _case_of(item)
        if case_id in state.cases:  # the GPU clock for every case: pytest-benchmark's default is a wall clock
            item.add_marker(pytest.mark.benchmark(timer=state.clock, group=perf_grid.group(state.cases[case_id])))


def _case_of(item: pytest.Item) -> str | None:
    return getattr(item, "callspec", None) and item.callspec.params.get("case")


def _shard_items(config: pytest.Config, items: list[pytest.Item], path: Path) -> list[pytest.Item]:
    """The items of the cases listed in ``path``, in its order (a shard of a multi-GPU run:
    longest first); the others are deselected."""
    try:
        wanted = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise pytest.UsageError(f"--perf-cases {path}: {exc.strerror or exc}") from None
    position = {key: i for i, key in enumerate(wanted)}
    if unknown := sorted(set(position) - {_case_of(item) for item in items}):
        raise pytest.UsageError(
            f"--perf-cases {path}: {len(unknown)} case(s) not in this grid: {', '.join(unknown[:3])}"
        )
    keep = [item for item in items if _case_of(item) in position]
    if dropped := [item for item in items if _case_of(item) not in position]:
        config.hook.pytest_deselected(items=dropped)
    return sorted(keep, key=lambda item: position[_case_of(item)])


def pytest_collection_finish(session: pytest.Session) -> None:
    """``--perf-list-cases FILE``: the case ids left after every selection (``-k``, ``-m``,
    ``--perf-cases``), one per line, for ``--gpus`` to shard."""
    if path := session.config.getoption("--perf-list-cases"):
        Path(path).write_text("".join(f"{case}\n" for item in session.items if (case := _case_of(item))))
    state = session.config.stash[_STATE]
    if state.calibrate is not None:
        state.calibration_depth = _calibration_depths(state, [c for item in session.items if (c := _case_of(item))])


def _calibration_depths(state: PerfState, selected: list[str]) -> dict[str, int]:
    """Each selected case's gate-sized runs: enough for its kind to reach the A/A tests asked for."""
    cuda = torch.device(state.device).type == "cuda"

    def kind(case_id: str) -> str:
        case = state.cases[case_id]
        backward = bool(getattr(case, "backward", False))
        graphs = state.opts.graphs
        return calibration.predicted_kind(
            decode=perf_grid.kind(case) == "decode", backward=backward, graphs=graphs, cuda=cuda
        )

    kinds = {case_id: kind(case_id) for case_id in selected if case_id in state.cases}
    counts = Counter(kinds.values())
    pairs, cap = state.calibrate["pairs"], state.calibrate["max_depth"]
    return {case_id: calibration.depth_for(counts[k], pairs, cap) for case_id, k in kinds.items()}


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    state = config.stash[_STATE]
    info = dict(state.machine, **state.ceilings, grid=state.grid, graphs=state.opts.graphs)
    info["wall_s"] = round(time.time() - state.started, 1)
    info["impls"] = state.impls
    info["flex_kernel_options"] = state.flex_kernel_options
    info["flex_compiled_signatures"] = len(flex._compiled)  # one per shape/dtype/grad: no recompiles
    info["gpu_state"] = {"start": state.gpu_start, "end": machine.gpu_state(state.device)}
    machine_info[machine.KEY] = info
    machine_info["gpu"] = info.get("gpu_name")


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark) -> None:
    """Saved runs compare only where GPU model and torch minor match: per-run figures (wall time,
    ceilings, clocks) differ on every run and say nothing about comparability."""
    ours = machine_info.get(machine.KEY, {})
    theirs = compared_benchmark.get("machine_info", {}).get(machine.KEY, {})
    for key in machine.STABLE_KEYS:
        if ours.get(key) != theirs.get(key):
            benchmarksession.logger.warning(
                f"comparing runs of different {key}: {theirs.get(key)!r} (saved) vs {ours.get(key)!r} (this run)"
            )


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None or state.base is None:
        return
    warnings = machine.noise_warnings(state.gpu_start, machine.gpu_state(state.device))
    seen = {key for key, *_ in (*state.ab_cases, *state.ab_not_compared, *state.ab_refused)}
    selected = [key for item in session.items if (key := _case_of(item))]
    missing = [(key, "never reached (the run was interrupted or stopped)") for key in selected if key not in seen]
    refused = list(state.ab_refused)
    if not state.ab_cases:  # a gate that compared nothing must not pass
        refused.append(ab.NOTHING_COMPARED)
    report = ab.report_from_cases(
        state.ab_cases,
        base_rev=state.base.label,
        head_rev=state.machine["ab_head"],
        gpu=state.machine.get("gpu_name") or state.device,
        min_effects=state.min_effects,
        base_only=state.base.only_in_base(),
        refused=refused,
        not_compared=[*state.ab_not_compared, *missing],
        warnings=warnings,
    )
    ab.write_outputs(report, state.ab_out)
    state.ab_report = report
    if report.failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or state.ab_report is None:
        return
    terminalreporter.section("same-run A/B")
    for line in ab.verdict_lines(state.ab_report):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"summary: {state.ab_out / 'summary.md'}")


@pytest.fixture(scope="session")
def perf_state(request: pytest.FixtureRequest) -> PerfState:
    state = request.config.stash[_STATE]
    if not state.ceilings:  # measured once per session, in the same conditions as the cases
        state.ceilings = {
            "copy_gbps": round(machine.copy_bandwidth_gbps(state.device), 1),
            "matmul_tflops": float(f"{machine.matmul_tflops(state.device):.4g}"),
        }
        state.opts.copy_gbps = state.ceilings["copy_gbps"]
        state.opts.matmul_tflops = state.ceilings["matmul_tflops"]
        state.machine.update(state.ceilings)
        if state.calibrate is not None:
            state.spin_fit = spin.for_device(state.device)
            state.machine["calibration"]["spin"] = state.spin_fit.as_json()
        state.write({"machine_info": {machine.KEY: state.machine}})
        free_cached_memory(state.device)
    return state


@pytest.fixture
def case(request: pytest.FixtureRequest):
    return request.config.stash[_STATE].cases[request.param]


@pytest.fixture
def run_case(perf_state: PerfState):
    """``run_case(benchmark, case)``: skip (with the memory reason) or time ``case``, then guard it."""
    state = perf_state

    def run(benchmark, case) -> dict:
        entry = {"case": case.case_id, "impl": case.impl, "group": perf_grid.group(case)}
        # Not compared in an A/B: the same code on both sides (an installed package, not a checkout).
        alone = None if state.base is None else state.base.not_compared.get(case.impl)
        ab_run = state.base is not None and alone is None
        # An A/B holds both revisions' builds, a calibration the head's and its twin's.
        reason = case.skip_reason(copies=2 if ab_run or state.calibrate is not None else 1)
        if reason:
            state.write(dict(entry, status="skipped", reason=reason))
            state.ab_not_compared.append((case.case_id, f"skipped: {reason}"))
            pytest.skip(reason)
        try:
            if state.calibrate is not None:
                depth = state.calibration_depth.get(case.case_id, 1)
                levels = state.calibrate["levels"]
                info = runner.run_calibration_case(
                    benchmark, case, state.opts, depth=depth, spin_fit=state.spin_fit, levels=levels
                )
            elif ab_run:
                info = runner.run_ab_case(benchmark, case, state.base.implementations, state.opts)
            else:
                info = runner.run_case(benchmark, case, state.opts)
        except runner.BaseCannotBuild as exc:
            state.ab_refused.append((case.case_id, f"the base revision cannot build it: {exc}"))
            state.write(dict(entry, status="refused", reason=str(exc)))
            pytest.fail(f"the base revision cannot build this case: {exc}", pytrace=False)
        except torch.cuda.OutOfMemoryError as exc:
            est = case.estimated_peak_bytes() / 2**30
            state.write(dict(entry, status="failed", reason=f"out of memory: {exc}"))
            state.ab_not_compared.append((case.case_id, f"failed: out of memory: {exc}"))
            pytest.fail(f"out of memory although ~{est:.1f} GiB was estimated to fit (fix the estimate): {exc}")
        except Exception as exc:
            state.write(dict(entry, status="failed", reason=f"{type(exc).__name__}: {exc}"))
            state.ab_not_compared.append((case.case_id, f"failed: {type(exc).__name__}: {exc}"))
            raise
        if alone is not None:
            state.ab_not_compared.append((case.case_id, f"not compared: {alone}"))
        problems = guards.check(info, state.machine)
        info["guard_failures"] = problems
        benchmark.extra_info["guard_failures"] = problems
        data = list(benchmark.stats.stats.data) if benchmark.stats else []
        state.write(dict(entry, status="passed", extra_info=info, data=data))
        if ab_run and data:
            state.ab_cases.append((case.case_id, data, info))
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
        return info

    yield run
    end_case(state.device)
