"""Peak memory of one call, measured the same way on CUDA and on CPU.

The figure is what the call allocates at its peak *above* what was allocated before it (its
inputs, the weights): the score matrix of a from-scratch path, a fused kernel's output and
statistics. That is the number that grows with ``T**2`` or with ``T``.

* CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU: torch's CPU allocator reports every allocation and free to the profiler when
  ``profile_memory=True``; replaying those records in time order gives the peak. (Python-level
  tools such as ``tracemalloc`` do not see torch's allocations, and RSS only ever grows.)
  The profiler's kineto backend logs every start and stop (``USDT ... profiler_start``) and, on
  some builds, an ``ERROR ... gpuGetDeviceCount failed`` on machines without a GPU; entry points
  call :func:`quiet_profiler_logs` before the profiler first starts.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated during the call, minus memory allocated before it"
CPU_METHOD = "torch CPU allocator records (torch.profiler, profile_memory=True) replayed in order"
#: kineto's log threshold that hides its USDT start/stop lines and its GPU-probe errors
#: (5 no longer does on torch 2.13 and 2.14: the USDT lines moved up).
KINETO_QUIET_LEVEL = "6"


def quiet_profiler_logs() -> None:
    """Silence kineto's logging unless the user chose a level (``KINETO_LOG_LEVEL``).

    kineto reads the variable once, when the profiler first initialises in the process, so this
    must run before the first :func:`peak_memory` on CPU (or any other torch.profiler use).
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", KINETO_QUIET_LEVEL)


@dataclass(frozen=True)
class PeakMemory:
    """``bytes``: the call's peak allocation above its starting point; ``total_bytes``: the
    device's peak including what was already allocated (CUDA only, else None)."""

    bytes: int
    total_bytes: int | None
    method: str


def method_for(device: torch.device | str) -> str:
    """How :func:`peak_memory` measures on ``device``, in words (for reports)."""
    return CUDA_METHOD if torch.device(device).type == "cuda" else CPU_METHOD


def peak_memory(
    fn: Callable[[], object], *, device: torch.device | str, setup: Callable[[], object] | None = None
) -> PeakMemory:
    """Run ``setup()`` then ``fn()`` once and return the peak memory ``fn`` allocated."""
    device = torch.device(device)
    if setup is not None:
        setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        total = torch.cuda.max_memory_allocated(device)
        return PeakMemory(total - before, total, CUDA_METHOD)
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cuda or cpu, not {device.type}")
    return PeakMemory(_cpu_peak(fn), None, CPU_METHOD)


def _cpu_peak(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Raw allocator records: the per-op view nets allocations and frees inside each op out.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        current += record.nbytes()
        peak = max(peak, current)
    return peak


def free_cached_memory(device: torch.device | str) -> None:
    """Drop unreachable tensors and return the CUDA caching allocator's free blocks, so one
    case's leftovers neither count toward nor crowd out the next case's memory."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def end_case(device: torch.device | str) -> None:
    """Between two cases of a sweep or a grid: :func:`free_cached_memory`, then freeze what
    survives. That lives all session (compiled kernels, dynamo's caches), and freezing it keeps
    every later ``gc.collect()`` from walking it again: about 0.2-0.3 s a collection once torch's
    compilers are loaded, which was most of a tiny CPU sweep and ~80 s of a GPU grid. Call
    :func:`end_cases` when the last case is done."""
    free_cached_memory(device)
    gc.freeze()


def end_cases() -> None:
    """Unfreeze what :func:`end_case` froze, so the interpreter's exit frees it: frozen objects
    outlive it, and native bindings (Triton's) then print a leak report on the way out."""
    gc.unfreeze()


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes a new case can still allocate on ``device`` (our allocator's cached blocks count as
    free); ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
