"""The property suite as a pytest plugin (entry point ``pytest11``: active wherever the package is installed).

Run the suite on any registered implementation, or on one named by where it lives, from any
directory::

    pytest --pyargs attention.suite --attention-impl my_package.attn:my_attention

What it adds to pytest:

* ``--attention-impl NAME`` (repeatable): a registered name or ``module:attr`` (an
  :class:`attention.AttentionBase` subclass or a plain ``attn(q, k, v)`` function); default:
  every registered implementation (read at collection). ``register()`` calls in a ``conftest.py``
  of a path given to pytest count: pytest imports those before the plugin resolves names. One
  named here that is declared only for devices this machine lacks is a usage error, not a run of
  skips that exits 0.
* Any test taking an ``impl_name`` argument runs once per selected implementation; one taking
  ``source_name`` and ``target_name`` once per ordered pair (each selected implementation with
  every selected one and the ``from_scratch`` reference), so a failing implementation fails its
  own tests and its pairs, never another's.
* Skips with a reason: an implementation that cannot run here (``unavailable()``), a device or
  dtype it does not declare, and tests marked ``attention_needs(capability, ...)`` for a
  capability it does not declare (:mod:`attention.capabilities`).
* Under ``pytest -n N`` on several GPUs, each xdist worker runs its CUDA cases on one GPU,
  round-robin by worker number (``gw0`` on GPU 0, ``gw1`` on GPU 1, ...).
* Under ``pytest -n N``, long cases first: tests marked ``attention_costly``, then the cases of
  implementations that compile per shape or run interpreted on their device, each worker's share
  starting with its part of them (:mod:`attention.suite.schedule`); without xdist, pytest's order.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import pytest

from .schedule import COSTLY_MARKER, WorkerSchedule
from .timing import SlowestFiles

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

    from .support import Sizing

#: The implementation every pairwise test also pairs with: the readable from-scratch path.
REFERENCE = "from_scratch"

_SELECTED = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attention-suite", "attention property suite")
    group.addoption(
        "--attention-impl",
        action="append",
        default=None,
        metavar="NAME",
        help="implementation to test: a registered name or module:attr (repeatable; default: all registered)",
    )
    group.addoption(
        "--slowest-files",
        type=int,
        default=0,
        metavar="N",
        help="at the end, list the N test files that took longest (summed over xdist workers)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped with a reason when none is present)")
    config.addinivalue_line(
        "markers", "attention_needs(*capabilities): skip for implementations that do not declare these capabilities"
    )
    config.addinivalue_line(
        "markers", f"{COSTLY_MARKER}: runs for many seconds; under pytest -n the suite starts it first"
    )
    _pin_worker_gpu()
    _share_cpus()
    if workerinput := getattr(config, "workerinput", None):  # an xdist worker
        config.pluginmanager.register(WorkerSchedule(workerinput["workercount"], is_costly), "attention-schedule")
    if (count := config.getoption("--slowest-files")) > 0 and not hasattr(config, "workerinput"):
        config.pluginmanager.register(SlowestFiles(count), "attention-slowest-files")
    # Resolved now, so a typo is one usage error; conftest files of the paths given to pytest
    # (where a register() call may live) are imported before this hook runs.
    if specs := config.getoption("--attention-impl"):
        config.stash[_SELECTED] = names = list(dict.fromkeys(_resolve(spec) for spec in specs))
        for name in names:
            if (why := untestable_here(name)) is not None:
                raise pytest.UsageError(
                    f"implementation {name}: every test would skip on this machine, and a run that "
                    f"tests nothing proves nothing: {why}"
                )


def _resolve(spec: str) -> str:
    import attention

    try:
        return attention.resolve(spec)
    except (TypeError, ValueError) as error:
        raise pytest.UsageError(f"cannot test: {error}") from None  # whichever flag named it


def gpu_for_worker(worker: str | None, gpus: int) -> int | None:
    """The GPU index xdist worker ``worker`` (``"gw3"``) takes among ``gpus``, or ``None`` when
    there is nothing to choose (not under xdist, or fewer than two GPUs)."""
    if worker is None or gpus < 2:
        return None
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        raise ValueError(f"unexpected xdist worker id {worker!r} (expected gw<N>)")
    return int(worker[2:]) % gpus


def threads_for_worker(cpus: int, workers: int) -> int:
    """CPU threads each of ``workers`` xdist workers gives torch on ``cpus`` CPUs: its share, at
    least one. torch's default (every CPU, in every worker) oversubscribes the machine, and its
    OpenMP threads then spin waiting for each other: small ops took 100x longer on 2 cores with
    2 workers (docs/design.md#cpu-threads-under-xdist)."""
    return max(1, cpus // max(1, workers))


def _share_cpus() -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None or not workers.isdigit():
        return
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads_for_worker(cpus, int(workers))
    torch.set_num_threads(threads)
    # And for the processes a test starts (a pytest run, a sweep): torch reads it when it loads.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # Inductor compiles in a pool of up to 32 processes, one per CPU, each importing torch, in
    # every worker (docs/design.md#suite-sizing): the worker's share instead (with one, it
    # compiles in the worker itself). torch reads the variable when torch._inductor.config is
    # first imported; where something imported it already, its setting is changed too. A value
    # the user set wins.
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
        inductor_config: Any = sys.modules.get("torch._inductor.config")  # a config module: no stubs
        if inductor_config is not None:
            inductor_config.compile_threads = threads


def _pin_worker_gpu() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return  # torch is imported only where there is a choice to make
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = gpu_for_worker(worker, gpus)
    if index is not None:
        torch.cuda.set_device(index)  # "cuda" in every test of this worker now means this GPU


def selected(config: pytest.Config) -> list[str]:
    """The registered names of the implementations under test."""
    if _SELECTED not in config.stash:
        import attention

        config.stash[_SELECTED] = list(attention.implementations())
    return config.stash[_SELECTED]


def _parametrized(metafunc: pytest.Metafunc) -> set[str]:
    """Argument names the test parametrizes itself (those stay as it wrote them)."""
    names: set[str] = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs["argnames"]
        names.update(n.strip() for n in argnames.split(",")) if isinstance(argnames, str) else names.update(argnames)
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    fixtures, own = set(metafunc.fixturenames), _parametrized(metafunc)
    if "impl_name" in fixtures and "impl_name" not in own:
        metafunc.parametrize("impl_name", selected(metafunc.config))
    if {"source_name", "target_name"} <= fixtures and not {"source_name", "target_name"} & own:
        names = selected(metafunc.config)
        pool = list(dict.fromkeys([*names, REFERENCE]))
        pairs = [(s, t) for s in pool for t in pool if s in names or t in names]
        metafunc.parametrize(("source_name", "target_name"), pairs, ids=[f"{s}->{t}" for s, t in pairs])


def skip_reason(impl_name: str, device: str, dtype: torch.dtype | None, needs: tuple[str, ...]) -> str | None:
    """Why a test of ``impl_name`` on ``device`` in ``dtype`` needing ``needs`` cannot run, or ``None``."""
    import attention
    from attention.capabilities import MEANING

    impl = attention.get(impl_name)
    reason = impl.unavailable(device)
    if reason is not None:
        return reason
    declared = impl.capabilities()
    if (refused := declared.device_refused(device)) is not None:
        return refused
    if dtype is not None and (problem := impl.dtype_unsupported(dtype, device)) is not None:
        return problem
    for capability in needs:
        has = {
            "masks": declared.masks,
            "kv_cache": declared.kv_cache,
            "zero_empty_rows": declared.zero_empty_rows,
            "dropout": impl.supports_dropout(),
            "backward": impl.supports_backward(device),
        }[capability]
        if not has:
            return f"does not declare the capability {capability!r} ({MEANING[capability]})"
    return None


def untestable_here(impl_name: str) -> str | None:
    """Why no device the suite runs on this machine can test ``impl_name`` (each one's reason),
    or ``None`` when at least one can: a device it does not declare, or none of the dtypes the
    suite's tests run there (:data:`attention.suite.support.TESTED_DTYPES`)."""
    from attention.suite import support

    devices = ["cpu", "cuda"] if support.CUDA else ["cpu"]
    reasons = {device: _untestable_on(impl_name, device, support.TESTED_DTYPES[device]) for device in devices}
    if any(reason is None for reason in reasons.values()):
        return None
    return "; ".join(f"{device}: {reason}" for device, reason in reasons.items())


def _untestable_on(impl_name: str, device: str, tested: Iterable[torch.dtype]) -> str | None:
    if (reason := skip_reason(impl_name, device, None, ())) is not None:
        return reason
    import attention

    impl = attention.get(impl_name)
    declared = impl.capabilities()
    if declared.dtypes is not None and not any(declared.allows_dtype(dtype) for dtype in tested):
        return f"declares dtypes {_names(declared.dtypes)} only, and the tests here run {_names(tested)}"
    problems = [impl.dtype_unsupported(dtype, device) for dtype in tested]
    if all(problems):  # a kernel's own limit (dtype_unsupported overridden), not a declaration
        return f"computes none of the dtypes the tests here run: {'; '.join(map(str, problems))}"
    return None


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(sorted(map(str, dtypes)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    # A test without a dtype parameter builds its modules in fp32, so that is the dtype a
    # declaration is checked against (a bf16-only function skips there, not fails).
    unparametrized = torch.float32
    for item in items:
        params = _params(item)
        names = _implementations(params)
        if not names:
            continue
        needs = tuple(cap for mark in item.iter_markers("attention_needs") for cap in mark.args)
        for name in dict.fromkeys(names):
            reason = skip_reason(name, params.get("device", "cpu"), params.get("dtype", unparametrized), needs)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"{name}: {reason}"))
                break


def _params(node: pytest.Item | pytest.Collector) -> dict[str, Any]:
    return getattr(getattr(node, "callspec", None), "params", {})


def _implementations(params: dict[str, Any]) -> list[str]:
    """The implementations a test item runs: its ``impl_name``, or its source and target."""
    return [params[key] for key in ("impl_name", "source_name", "target_name") if key in params]


def _case_sizing(params: dict[str, Any]) -> Sizing:
    """How a case of these parameters is sized (:func:`attention.suite.support.sizing_for` of its
    implementations on its device). The costlier one sizes a pair: an interpreter's few tiles,
    then a compiler's menu of shapes."""
    import attention
    from attention.suite import support

    device = params.get("device", "cpu")
    sizes = [support.sizing_for(attention.get(name), device) for name in _implementations(params)]
    return next((s for s in (support.INTERPRETED, support.COMPILED) if s in sizes), support.FULL)


def is_costly(item: pytest.Item) -> bool:
    """Whether ``item`` is one of the suite's long cases: it runs on a device it names (not a
    one-call check of bad input) an implementation that compiles per shape or runs interpreted
    there, which the suite sizes down: seconds, not milliseconds."""
    from attention.suite import support

    params = _params(item)
    return "device" in params and _case_sizing(params) is not support.FULL


@pytest.fixture(autouse=True)
def _attention_sizing(request: pytest.FixtureRequest):
    """Size the running test's drawn cases for its implementation(s) on its device
    (:func:`attention.suite.support.sizing_for`): shapes through the sizing the strategies read,
    and the example count of its Hypothesis test, both put back afterwards."""
    params = _params(request.node)
    if not _implementations(params):
        yield
        return
    from attention.suite import support

    size = _case_sizing(params)
    token = support.use_sizing(size)
    test: Any = getattr(request.node, "obj", None)  # the test function, with Hypothesis's attribute
    # Hypothesis reads a test's settings from this attribute each time it runs the test.
    settings = getattr(test, "_hypothesis_internal_use_settings", None)
    if settings is not None and size.max_examples is not None and settings.max_examples > size.max_examples:
        from hypothesis import settings as Settings

        test._hypothesis_internal_use_settings = Settings(settings, max_examples=size.max_examples)
    try:
        yield
    finally:
        if settings is not None:
            test._hypothesis_internal_use_settings = settings
        support.reset_sizing(token)
