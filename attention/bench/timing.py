"""The one timer: perf/ hands it to pytest-benchmark, the benchmark report calls :func:`measure`.

CUDA work is asynchronous, so a wall clock around a call times the launch, not the kernel
(docs/design.md#wall-clock-timer: 0.020 ms read for a 0.528 ms call). :class:`CudaEventClock` reads time off the GPU
instead, from CUDA events recorded around the call. Its readings are plain seconds, so it slots
in where pytest-benchmark expects a ``time.perf_counter``-style ``timer``.

Between timed rounds :class:`L2Flusher` overwrites a buffer twice the L2 size, so every round
starts with a cold cache, as triton's ``do_bench`` does and as the anchors of docs/design.md#method were taken.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

#: GPU cycles of spin after each flush: about 0.5 ms at H100 clocks, more than one module call
#: takes to launch, so the timed work is queued before the GPU reaches it.
_HEAD_START_CYCLES = 1_000_000


class CudaEventClock:
    """``clock() -> seconds`` read off CUDA events, in (start, end) pairs.

    Readings come in pairs, as pytest-benchmark's pedantic runner and :func:`measure` take them.
    A start reading records an event and returns at once, so the CPU goes on to launch the timed
    work while the GPU is still busy with the round's setup (:meth:`L2Flusher.flush` ends with a
    short spin for this): launch overhead stays hidden, as in triton's ``do_bench``. The end
    reading records a second event, waits for it, and returns the previous value plus the GPU time
    between the two events; time between pairs is not counted.
    """

    name = "cuda-event"

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cuda")
        self.__name__ = type(self).__name__  # how pytest-benchmark names a timer in its JSON
        self._total_s = 0.0
        self._start: torch.cuda.Event | None = None

    def __repr__(self) -> str:
        return f"CudaEventClock({self.device})"

    def reset(self) -> None:
        """Forget a start reading left unpaired (a timed call raised): the next reading starts a pair."""
        self._start = None

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        if self._start is None:
            self._start = event
            return self._total_s
        event.synchronize()
        self._total_s += self._start.elapsed_time(event) / 1e3
        self._start = None
        return self._total_s


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(count: int) -> int:
    """``count`` if this machine can give it; else :class:`ValueError` saying what it allows.

    More threads than CPUs time the scheduler, not the attention (see :func:`cpu_threads`), and
    far more make torch's OpenMP pool fail to start them: a segfault or an abort, not an error.
    """
    cpus = usable_cpus()
    if not 1 <= count <= cpus:
        raise ValueError(
            f"{count} threads: this process may run on {cpus} CPU{'s' if cpus != 1 else ''}; "
            f"give 1 to {cpus} (more threads than CPUs would time the scheduler, not the attention)"
        )
    return count


@contextmanager
def cpu_threads(count: int | None) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(count)`` (``None``: leave it), restoring the previous
    count after; yields the count in effect.

    CPU cases are best timed on one thread, as ``torch.utils.benchmark.Timer`` does by default: on
    a small machine waking the intra-op pool costs more than a short op (SDPA at T=64 on 2 cores:
    8.0 ms with 2 threads, 0.062 ms with one), so multi-threaded timings come out as multiples of
    the scheduler's tick instead of the attention's cost.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(check_threads(count))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def perf_counter_clock() -> float:
    return time.perf_counter()


perf_counter_clock.name = "perf-counter"  # type: ignore[attr-defined]


def clock_for(device: torch.device | str) -> Callable[[], float]:
    """The clock to time work on ``device``: GPU events on CUDA, ``perf_counter`` on CPU."""
    if torch.device(device).type == "cuda":
        return CudaEventClock(device)
    return perf_counter_clock


class L2Flusher:
    """``flush()`` evicts the GPU's L2 cache by writing a buffer twice its size, then spins the GPU
    briefly so the next timed call is launched before the GPU gets to it; no-op on CPU."""

    def __init__(self, device: torch.device | str) -> None:
        device = torch.device(device)
        self._buffer = None
        if device.type == "cuda":
            l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
            self._buffer = torch.empty(2 * l2_bytes, dtype=torch.int8, device=device)

    def flush(self) -> None:
        if self._buffer is not None:
            self._buffer.zero_()
            torch.cuda._sleep(_HEAD_START_CYCLES)


def cuda_graph(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    warmup: int = 2,
    setup: Callable[[], object] | None = None,
) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph; the returned callable replays it.

    Replaying launches the whole call at once, so the GPU time measured around it is the
    kernels' time, not the CPU's launch and dispatch overhead, which dominates small cases
    (docs/design.md#module-level: a 67% spread at the LLMs-from-scratch size without graphs). Inputs must stay
    the same tensors between replays; ``setup`` (clearing grads) runs before each warm-up call
    and before the capture. Raises whatever capture raises when ``fn`` cannot be captured (a
    host sync inside it, a non-capturable kernel); callers fall back to eager.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up on a side stream, as torch.cuda.graph's docs require
        for _ in range(warmup):
            if setup is not None:
                setup()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # the graph's private pool cannot reuse blocks the warm-up cached
    if setup is not None:
        setup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)

    def replay() -> None:
        graph.replay()

    replay.graph = graph  # type: ignore[attr-defined]  # keeps the graph (and its memory pool) alive
    return replay


def rounds_for(per_call: float, budget_s: float, fewest: int, most: int) -> int:
    """Rounds of ``per_call`` seconds that fill ``budget_s``: at least ``fewest``, at most ``most``
    unless ``fewest`` is more (``most`` for a call too short to measure)."""
    if per_call <= 0:
        return max(fewest, most)
    return max(fewest, min(most, math.ceil(budget_s / per_call)))


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str,
    rounds: int = 20,
    warmup: int = 3,
    setup: Callable[[], object] | None = None,
) -> list[float]:
    """Seconds per call of ``fn`` over ``rounds`` timed calls, after ``warmup`` untimed ones
    (which absorb compilation, autotuning and mask building). ``setup`` and the L2 flush run
    before each call, outside the timed region."""
    clock = clock_for(device)
    flusher = L2Flusher(device)
    times = []
    for i in range(warmup + rounds):
        if setup is not None:
            setup()
        flusher.flush()
        start = clock()
        fn()
        end = clock()
        if i >= warmup:
            times.append(end - start)
    return times
