"""Known extra work for the gate's calibration (:mod:`.calibration`): a spin inside the timed region
whose length is a chosen share of a case's own time.

On CUDA the spin is ``torch.cuda._sleep(cycles)``: one single-thread kernel that loops on the SM
clock for ``cycles`` and touches no memory, so it adds time on the case's stream without changing
what the case itself reads, caches or computes. The calibration runs it right after the case's call
(a CUDA-graph replay or the eager call), on the same stream and inside the timed region; the round's
head start (:class:`attention.bench.timing.L2Flusher`) has the CPU queue both before the GPU gets to
them, so the GPU runs them back to back. One launch after the call, not a second capture of the case
with the spin in it: no extra graph per level (capture time, a memory pool each, and the largest
cases would fall back to eager), and graph and eager cases get the same injection.

What ``cycles`` cost is measured once per device (:func:`measure_cuda`): an appended spin takes
``floor_s + cycles * s_per_cycle``; ``floor_s`` (a kernel launch and the spin's own start, a
microsecond or two) is the least any injection adds, so a share of a short case below it cannot be
injected (:meth:`SpinFit.cycles` says ``None``). Cycles count the SM clock: a clock that moves during
the run stretches or shrinks the spin, which is why the calibration reports the share it measured
(the injected variant's median over its twin's), never the one it asked for.

On CPU (the machinery's tests) the spin is a busy-wait on ``time.perf_counter_ns``, one "cycle" a
nanosecond, floor zero: the CPU clock the perf runner times with sees exactly that.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

#: Spin lengths the device fit times (SM cycles; 2M is about 1 ms at 2 GHz).
FIT_CYCLES = (0, 20_000, 200_000, 2_000_000)
#: Spins per region: the cost of one appended spin is the difference of the two, over four.
FIT_COUNTS = (1, 5)


@dataclass(frozen=True)
class SpinFit:
    """What one spin appended to a stream costs: ``floor_s + cycles * s_per_cycle`` seconds."""

    device: str  # "cuda" or "cpu"
    floor_s: float
    s_per_cycle: float
    points: tuple[tuple[int, float], ...] = ()  # (cycles, seconds one appended spin took) as measured

    def cycles(self, seconds: float) -> int | None:
        """Cycles for a spin of ``seconds``; ``None`` below :attr:`floor_s`, which nothing shorter reaches."""
        if not seconds >= self.floor_s:
            return None
        return round((seconds - self.floor_s) / self.s_per_cycle)

    def seconds(self, cycles: int) -> float:
        """What a spin of ``cycles`` is expected to add."""
        return self.floor_s + cycles * self.s_per_cycle

    def as_json(self) -> dict:
        return asdict(self)


CPU_FIT = SpinFit("cpu", floor_s=0.0, s_per_cycle=1e-9)


def fit(measured: Sequence[tuple[int, int, float]], device: str) -> SpinFit:
    """The fit from ``(cycles, spins, seconds)`` timings of regions holding ``spins`` back-to-back spins
    of ``cycles``: per cycle count, one spin's cost is the slope over the spin counts (region
    overheads cancel), then a least-squares line through those costs. ``ValueError`` when the
    timings do not make a line that grows with cycles (a clock that does not tick)."""
    by_cycles: dict[int, dict[int, float]] = {}
    for cycles, spins, seconds in measured:
        by_cycles.setdefault(cycles, {})[spins] = seconds
    points = []
    for cycles, regions in sorted(by_cycles.items()):
        if len(regions) < 2:
            raise ValueError(f"spin fit: {cycles} cycles timed at one spin count only; need two")
        (n0, t0), (n1, t1) = sorted(regions.items())[0], sorted(regions.items())[-1]
        points.append((cycles, (t1 - t0) / (n1 - n0)))
    if len(points) < 2:
        raise ValueError("spin fit: needs at least two cycle counts")
    xs, ys = [float(c) for c, _ in points], [s for _, s in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    if not slope > 0:
        raise ValueError(f"spin fit: a spin's cost does not grow with its cycles ({points}): the clock did not tick")
    floor = max(0.0, my - slope * mx)
    return SpinFit(device, floor_s=floor, s_per_cycle=slope, points=tuple(points))


def measure_cuda(device) -> SpinFit:
    """:func:`fit` from this GPU: regions of 1 and 5 spins of each of :data:`FIT_CYCLES`, timed on
    CUDA events after an L2 flush and head start, as the perf runner times a round; median of 5."""
    import torch

    from ..timing import CudaEventClock, L2Flusher

    clock, flusher = CudaEventClock(device), L2Flusher(device)
    measured = []
    with torch.cuda.device(device):
        for cycles in FIT_CYCLES:
            for spins in FIT_COUNTS:
                times = []
                for _ in range(5):
                    flusher.flush()
                    start = clock()
                    for _ in range(spins):
                        torch.cuda._sleep(cycles)
                    times.append(clock() - start)
                measured.append((cycles, spins, statistics.median(times)))
    return fit(measured, "cuda")


def _busy_wait_ns(ns: int) -> None:
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


def work(spin_fit: SpinFit, cycles: int) -> Callable[[], None]:
    """A call that adds one spin of ``cycles`` on ``spin_fit``'s device (the current CUDA stream)."""
    if spin_fit.device == "cuda":
        import torch

        return functools.partial(torch.cuda._sleep, cycles)
    return functools.partial(_busy_wait_ns, cycles)


def for_device(device) -> SpinFit:
    """The fit for ``device``: measured on CUDA, :data:`CPU_FIT` elsewhere."""
    import torch

    return measure_cuda(device) if torch.device(device).type == "cuda" else CPU_FIT
