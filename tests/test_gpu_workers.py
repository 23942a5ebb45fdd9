"""Which GPU each xdist worker takes and how many CPU threads it gives torch: the logic, on any machine."""

from __future__ import annotations

import pytest

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
