"""pytest-benchmark setup for the perf suite: the cases, the GPU timer, machine info, guards.

Run through ``nox -s perf`` (or ``python -m attention.bench.perf``), which also compares against the
baseline; plain ``pytest perf`` works too. Options (all optional):

* ``--perf-grid full|quick|tiny``: default ``full`` on CUDA, ``tiny`` on CPU (:mod:`attention.bench.perf.grid`).
* ``--perf-device``: default ``cuda`` when present.
* ``--perf-graphs fwd|all|none``: which cases are timed as CUDA-graph replays (default forward only).
* ``--perf-budget SECONDS``: timed seconds per case (rounds follow, 10..100).
* ``--perf-log FILE``: one JSON line per case as it finishes, so a crash loses nothing already run.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from attention import flex
from attention.bench.memory import free_cached_memory
from attention.bench.perf import grid as perf_grid
from attention.bench.perf import guards, machine, runner
from attention.bench.timing import clock_for


@dataclass
class PerfState:
    device: str
    grid: str
    opts: runner.RunOptions
    clock: object
    log: Path | None
    label: str
    machine: dict
    flex_kernel_options: dict | None = None
    ceilings: dict = field(default_factory=dict)
    cases: dict = field(default_factory=dict)  # case_id -> Workload | DecodeWorkload
    started: float = field(default_factory=time.time)

    def write(self, entry: dict) -> None:
        if self.log is None:
            return
        with self.log.open("a") as f:  # one line per case, flushed as it finishes
            f.write(json.dumps(dict(entry, run=self.label), default=str) + "\n")


_STATE = pytest.StashKey[PerfState]()


def _kernel_options(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise pytest.UsageError(f"--perf-flex-kernel-options is not JSON ({exc}): {text!r}") from None
    if not isinstance(options, dict):
        raise pytest.UsageError(f"--perf-flex-kernel-options must be a JSON object, got {text!r}")
    return options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attention-perf")
    group.addoption("--perf-grid", choices=perf_grid.GRIDS, default=None, help="which cases (default: full on CUDA)")
    group.addoption("--perf-device", default=None, help="cuda or cpu (default: cuda when present)")
    group.addoption("--perf-graphs", choices=runner.GRAPH_POLICIES, default="fwd", help="CUDA-graph capture policy")
    group.addoption("--perf-budget", type=float, default=0.2, help="timed seconds per case")
    group.addoption("--perf-log", default=None, help="append one JSON line per finished case to this file")
    group.addoption("--perf-run-label", default="run", help="label of this run in the --perf-log file")
    group.addoption(
        "--perf-flex-kernel-options",
        default=None,
        metavar="JSON",
        help='kernel_options for flex prefill cases, e.g. \'{"BLOCK_M": 128, "BLOCK_N": 64}\' (a tuning lever)',
    )


def pytest_configure(config: pytest.Config) -> None:
    device = config.getoption("--perf-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--perf-device=cuda but this machine has no CUDA GPU")
    log = config.getoption("--perf-log")
    state = PerfState(
        device=device,
        grid=config.getoption("--perf-grid") or ("full" if torch.device(device).type == "cuda" else "tiny"),
        opts=runner.RunOptions(
            device, graphs=config.getoption("--perf-graphs"), budget_s=config.getoption("--perf-budget")
        ),
        clock=clock_for(device),
        log=Path(log) if log else None,
        label=config.getoption("--perf-run-label"),
        machine=machine.machine_info(device),
        flex_kernel_options=_kernel_options(config.getoption("--perf-flex-kernel-options")),
    )
    if state.log:
        state.log.parent.mkdir(parents=True, exist_ok=True)
    state.write({"machine_info": {machine.KEY: state.machine}})
    config.stash[_STATE] = state


def pytest_report_header(config: pytest.Config) -> str:
    s = config.stash[_STATE]
    m = s.machine
    device = m.get("gpu_name") or s.device
    return f"attention perf: grid={s.grid} device={device} torch={m['torch']} graphs={s.opts.graphs}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    state = metafunc.config.stash[_STATE]
    kind = getattr(metafunc.module, "KIND", None)
    every = perf_grid.grid(state.grid, state.device, flex_kernel_options=state.flex_kernel_options)
    cases = {c.case_id: c for c in every if perf_grid.kind(c) == kind}
    state.cases.update(cases)
    # Parametrised by id (plain strings in the JSON); the ``case`` fixture turns it into the workload.
    metafunc.parametrize("case", list(cases), ids=list(cases), indirect=True)


_KIND_ORDER = {"prefill": 0, "decode": 1, "mask": 2}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[_STATE]

    def order(item: pytest.Item) -> tuple:
        case = state.cases.get(getattr(item, "callspec", None) and item.callspec.params.get("case"))
        if case is None:
            return (9, False)
        # Prefill first and the slow from-scratch cases last: a run cut short by its time limit
        # keeps the cases that matter most.
        return (_KIND_ORDER[perf_grid.kind(case)], case.impl == "from_scratch")

    items.sort(key=order)  # stable: grid order within each kind
    for item in items:
        case_id = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case_id in state.cases:  # the GPU clock for every case: pytest-benchmark's default is a wall clock
            item.add_marker(pytest.mark.benchmark(timer=state.clock, group=perf_grid.group(state.cases[case_id])))


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    state = config.stash[_STATE]
    info = dict(state.machine, **state.ceilings, grid=state.grid, graphs=state.opts.graphs)
    info["wall_s"] = round(time.time() - state.started, 1)
    info["flex_kernel_options"] = state.flex_kernel_options
    info["flex_compiled_signatures"] = len(flex._compiled)  # one per shape/dtype/grad: no recompiles
    machine_info[machine.KEY] = info
    machine_info["gpu"] = info.get("gpu_name")


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
        entry = {"case": case.case_id, "group": perf_grid.group(case)}
        reason = case.skip_reason()
        if reason:
            state.write(dict(entry, status="skipped", reason=reason))
            pytest.skip(reason)
        try:
            info = runner.run_case(benchmark, case, state.opts)
        except torch.cuda.OutOfMemoryError as exc:
            est = case.estimated_peak_bytes() / 2**30
            state.write(dict(entry, status="failed", reason=f"out of memory: {exc}"))
            pytest.fail(f"out of memory although ~{est:.1f} GiB was estimated to fit (fix the estimate): {exc}")
        except Exception as exc:
            state.write(dict(entry, status="failed", reason=f"{type(exc).__name__}: {exc}"))
            raise
        problems = guards.check(info, state.machine)
        info["guard_failures"] = problems
        benchmark.extra_info["guard_failures"] = problems
        data = list(benchmark.stats.stats.data) if benchmark.stats else []
        state.write(dict(entry, status="passed", extra_info=info, data=data))
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
        return info

    yield run
    free_cached_memory(state.device)
    # What survives a case lives all session (compiled kernels, dynamo's caches): freezing it keeps
    # the next gc.collect() from walking it again, which took ~0.3 s a case (~80 s a grid).
    gc.freeze()
