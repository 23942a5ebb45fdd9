"""The one timer: perf/ hands it to pytest-benchmark, the benchmark report calls :func:`measure`.

CUDA work is asynchronous, so a wall clock around a call times the launch, not the kernel
(DESIGN.md: 0.020 ms read for a 0.528 ms call). :class:`CudaEventClock` reads time off the GPU
instead: each reading records a CUDA event on the current stream and waits for it, so the
difference of two readings is the GPU time between them. Its readings are plain seconds, so it
slots in wherever a ``time.perf_counter``-style clock is expected (pytest-benchmark's ``timer``).

Between timed rounds :class:`L2Flusher` overwrites a buffer twice the L2 size, so every round
starts with a cold cache, as triton's ``do_bench`` does and as the DESIGN.md anchors were taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

#: Re-anchor the event clock before ``elapsed_time`` (a float32 of milliseconds) loses precision.
_REANCHOR_MS = 10_000.0


class CudaEventClock:
    """``clock() -> seconds`` read from CUDA events; synchronizes on each reading."""

    name = "cuda-event"

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cuda")
        self._anchor = self._record()
        self._anchor_s = 0.0

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        event.synchronize()
        return event

    def __call__(self) -> float:
        event = self._record()
        elapsed_ms = self._anchor.elapsed_time(event)
        if elapsed_ms > _REANCHOR_MS:
            self._anchor, self._anchor_s = event, self._anchor_s + elapsed_ms / 1e3
            return self._anchor_s
        return self._anchor_s + elapsed_ms / 1e3


def perf_counter_clock() -> float:
    return time.perf_counter()


perf_counter_clock.name = "perf-counter"  # type: ignore[attr-defined]


def clock_for(device: torch.device | str) -> Callable[[], float]:
    """The clock to time work on ``device``: GPU events on CUDA, ``perf_counter`` on CPU."""
    if torch.device(device).type == "cuda":
        return CudaEventClock(device)
    return perf_counter_clock


class L2Flusher:
    """``flush()`` evicts the GPU's L2 cache by writing a buffer twice its size; no-op on CPU."""

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        self._buffer = None
        if device.type == "cuda":
            l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
            self._buffer = torch.empty(2 * l2_bytes, dtype=torch.int8, device=device)

    def flush(self) -> None:
        if self._buffer is not None:
            self._buffer.zero_()


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    rounds: int = 20,
    warmup: int = 3,
    setup: Callable[[], object] | None = None,
    flush_l2: bool = True,
) -> list[float]:
    """Seconds per call of ``fn`` over ``rounds`` timed calls, after ``warmup`` untimed ones
    (which absorb compilation, autotuning and mask building). ``setup`` and the L2 flush run
    before each call, outside the timed region."""
    clock = clock_for(device)
    flusher = L2Flusher(device) if flush_l2 else None
    times = []
    for i in range(warmup + rounds):
        if setup is not None:
            setup()
        if flusher is not None:
            flusher.flush()
        start = clock()
        fn()
        end = clock()
        if i >= warmup:
            times.append(end - start)
    return times
