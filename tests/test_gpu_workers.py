"""Which GPU each xdist worker takes and how many CPU threads (and compile processes) it gives torch:
the logic, on any machine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from attention.suite import plugin
from attention.suite.plugin import gpu_for_worker, threads_for_worker


def test_workers_take_gpus_round_robin() -> None:
    assert [gpu_for_worker(f"gw{i}", 2) for i in range(5)] == [0, 1, 0, 1, 0]
    assert [gpu_for_worker(f"gw{i}", 3) for i in range(4)] == [0, 1, 2, 0]


@pytest.mark.parametrize(("worker", "gpus"), [(None, 4), ("gw3", 1), ("gw0", 0)])
def test_nothing_to_choose_without_xdist_or_a_second_gpu(worker: str | None, gpus: int) -> None:
    assert gpu_for_worker(worker, gpus) is None


def test_an_unknown_worker_id_is_refused() -> None:
    with pytest.raises(ValueError, match="worker id 'master'"):
        gpu_for_worker("master", 2)


def test_each_xdist_worker_gets_its_share_of_the_cpus():
    assert threads_for_worker(2, 2) == 1  # one worker per core: no oversubscription
    assert threads_for_worker(16, 4) == 4
    assert threads_for_worker(16, 14) == 1
    assert threads_for_worker(2, 8) == 1  # more workers than CPUs: still one thread each
    assert threads_for_worker(8, 0) == 8


@pytest.fixture
def two_workers_on_8_cpus(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """This process as one of 2 xdist workers on 8 CPUs, with no compile-thread setting of the
    user's; torch's thread count and the environment are put back afterwards."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # restored after
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    threads = torch.get_num_threads()
    try:
        yield monkeypatch
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("user_value", [None, "6"])
def test_a_worker_compiles_with_its_share_unless_the_user_said(
    two_workers_on_8_cpus: pytest.MonkeyPatch, user_value: str | None
) -> None:
    """torch's default compile pool is one process per CPU in every worker; the share replaces it."""
    if user_value is not None:
        two_workers_on_8_cpus.setenv("TORCHINDUCTOR_COMPILE_THREADS", user_value)
    plugin._share_cpus()
    assert os.environ["OMP_NUM_THREADS"] == "4"
    assert os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == (user_value or "4")


def test_an_inductor_config_imported_before_the_plugin_gets_the_share_too(
    two_workers_on_8_cpus: pytest.MonkeyPatch,
) -> None:
    """The variable is read when torch._inductor.config is imported: one imported earlier (by a
    conftest, say) would keep its pool of a process per CPU."""
    inductor_config = pytest.importorskip("torch._inductor.config")
    two_workers_on_8_cpus.setattr(inductor_config, "compile_threads", 8)
    plugin._share_cpus()
    assert inductor_config.compile_threads == 4
