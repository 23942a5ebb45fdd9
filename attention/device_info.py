"""What the kernels size their launches by: a device's SM count and shared memory, looked up once."""

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
