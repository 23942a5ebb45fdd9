"""Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default ``dev``).

* ``ci``: deterministic (derandomized, no example database), example counts sized so the whole
  suite runs in a few minutes on a 2-core CPU.
* ``dev``: random examples, remembered failures, a little more search than ``ci``.
* ``cuda-quick``: deterministic and few examples, for a GPU run on a time budget: flex
  compiles once per shape, dtype and grad mode (seconds each), so example counts set its cost.
* ``thorough``: many examples, for a GPU box or a nightly run.

Under ``pytest -n N`` on a machine with several GPUs, each xdist worker runs its CUDA cases on
one GPU, round-robin by worker number (``gw0`` on GPU 0, ``gw1`` on GPU 1, ...).
"""

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=10, derandomize=True, database=None, print_blob=True, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("cuda-quick", max_examples=3, derandomize=True, database=None, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items) -> None:
    """A test of an implementation that cannot run here (the triton one without the triton
    package) is skipped with the implementation's own reason, on the device the test uses."""
    import attention

    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "impl_name" not in params or params["impl_name"] not in attention.implementations():
            continue
        reason = attention.get(params["impl_name"]).unavailable(params.get("device", "cpu"))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"{params['impl_name']}: {reason}"))


def gpu_for_worker(worker: str | None, gpus: int) -> int | None:
    """The GPU index xdist worker ``worker`` (``"gw3"``) takes among ``gpus``, or ``None`` when
    there is nothing to choose (not under xdist, or fewer than two GPUs)."""
    if worker is None or gpus < 2:
        return None
    if not (worker.startswith("gw") and worker[2:].isdigit()):
        raise ValueError(f"unexpected xdist worker id {worker!r} (expected gw<N>)")
    return int(worker[2:]) % gpus


def pytest_configure(config) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = gpu_for_worker(os.environ.get("PYTEST_XDIST_WORKER"), gpus)
    if index is not None:
        torch.cuda.set_device(index)  # "cuda" in every test of this worker now means this GPU
