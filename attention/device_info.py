"""What the kernels size and launch by: a device's SM count, shared memory and launch features, looked up once."""

from __future__ import annotations

from functools import cache

import torch


@cache
def _properties(device: torch.device) -> torch._C._CudaDeviceProperties:
    return torch.cuda.get_device_properties(device)


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere (an interpreter runs programs one after another)."""
    return _properties(device).multi_processor_count if device.type == "cuda" else 1


def shared_bytes_per_sm(device: torch.device) -> int | None:
    """Shared memory per SM of a CUDA device, where this torch reports it; ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    return getattr(_properties(device), "shared_memory_per_multiprocessor", None)


def _nvidia_major(device: torch.device) -> int | None:
    """The compute capability's major version of an NVIDIA GPU, ``None`` for anything else (ROCm's
    MI200/MI300 also report major version 9)."""
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return None
    return _properties(device).major


def _nvidia_hopper_on(device: torch.device) -> bool:
    """Whether ``device`` is an NVIDIA GPU of compute capability 9.0 or later."""
    major = _nvidia_major(device)
    return major is not None and major >= 9


@cache
def is_hopper(device: torch.device) -> bool:
    """Whether ``device`` is an NVIDIA Hopper GPU (compute capability 9.x): where a kernel choice
    measured on an H100 or H200 is taken by default."""
    return _nvidia_major(device) == 9


@cache
def supports_programmatic_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` may be launched as programmatic dependents (NVIDIA Hopper on):
    a kernel so launched can start before the one ahead of it in the stream finishes, and waits for
    it (``griddepcontrol.wait``) before reading what it wrote (docs/design.md#triton-decode).
    Looked up once per device: every decode call asks."""
    return _nvidia_hopper_on(device)


@cache
def supports_tma(device: torch.device) -> bool:
    """Whether kernels on ``device`` can load tiles through tensor descriptors (TMA: NVIDIA Hopper
    on; docs/design.md#triton-tma-forward). Looked up once per device: every prefill call asks."""
    return _nvidia_hopper_on(device)
