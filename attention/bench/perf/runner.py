"""Time one case under pytest-benchmark and describe it in ``extra_info``.

Order of events for one case, all outside the timed rounds except the timed call itself:

1. build (modules, ``torch.randn`` inputs), then ``warmup`` calls: compilation, autotuning and
   BlockMask creation happen here;
2. one call from a peak-memory reset: ``peak_mem_mib`` is what the call adds on top of its inputs;
3. one profiled call: the SDPA backend, whether flex ran fused (:mod:`.probe`);
4. the case is captured in a CUDA graph (every case by default, forward+backward included;
   ``--perf-graphs=fwd`` forward cases only), so launch overhead, which dominates small cases,
   is not timed; where capture fails or the case is too large to hold twice, or by the policy,
   it runs eagerly and says ``"eager: includes dispatch"``;
5. ``benchmark.pedantic`` with the CUDA-event clock: before every round the grads are cleared and
   the L2 cache flushed (cold-cache numbers, as docs/design.md#method).

``extra_info["wall_s"]`` says how many wall seconds each of these phases took (``build``,
``warmup``, ``memory_probe``, ``capture``, ``timing``), so a slow grid shows whether
compilation, probing or timing is to blame.

:func:`run_ab_case` does the same for two revisions of a case, their rounds interleaved;
:func:`run_calibration_case` for the variants the gate's calibration times (:mod:`.calibration`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ... import registry
from ...flex import MHAPyTorchFlexAttention
from ...from_scratch import MultiHeadAttentionCombinedQKV
from ...sdpa import MHAPyTorchScaledDotProduct
from ..build import implementation
from ..cost import MiB, dtype_name
from ..memory import free_cached_memory, free_memory_bytes, peak_memory
from ..timing import CudaEventClock, L2Flusher, clock_for, cuda_graph, rounds_for
from ..workload import CORE_REFERENCES, MODULE_REFERENCES, DecodeWorkload, Workload
from . import probe, spin
from .results import GRAPH

GRAPH_POLICIES = ("all", "fwd", "none")
EAGER = "eager: includes dispatch"
#: A case the policy would capture, timed eagerly instead (stable texts: baselines compare on them).
TOO_LARGE_TO_CAPTURE = f"{EAGER} (too large to capture)"
CAPTURE_FAILED = f"{EAGER} (graph capture failed)"
#: Untimed pedantic rounds before the timed ones (after the warm-up calls that compile).
WARMUP_ROUNDS = 1
#: Capture only cases whose estimated peak fits this share of free memory (see run_case).
GRAPH_MEMORY_SHARE = 0.4


#: Timed seconds per case unless ``--perf-budget`` says otherwise.
DEFAULT_BUDGET_S = 0.2
#: Rounds per case at least, however long a call: the A/B's 99% interval of its median ratio is
#: then bounded by the 8th smallest and 8th largest of the rounds' ratios, so one or two stray
#: rounds cannot widen it (at 10 rounds it would span the two extremes: docs/design.md#paired-rounds).
MIN_ROUNDS = 30
#: Rounds per case at most, however short a call.
MAX_ROUNDS = 100


def captures(graphs: str, backward: bool) -> bool:
    """Whether the graph policy (``--perf-graphs``) times a case in a CUDA graph: every case
    ("all"), the forward ones ("fwd") or none."""
    return graphs == "all" or (graphs == "fwd" and not backward)


@dataclass
class RunOptions:
    device: str
    graphs: str = "all"  # capture every case ("all"), forward cases ("fwd") or none
    budget_s: float = DEFAULT_BUDGET_S  # timed seconds per case; rounds follow from it
    min_rounds: int = MIN_ROUNDS
    max_rounds: int = MAX_ROUNDS
    warmup: int = 3
    copy_gbps: float | None = None  # measured once per session (machine.copy_bandwidth_gbps)
    matmul_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.graphs not in GRAPH_POLICIES:
            raise ValueError(f"graphs must be one of {GRAPH_POLICIES}, got {self.graphs!r}")


def family(impl: str) -> str:
    """``"sdpa"``, ``"flex"``, ``"from_scratch"``, ``"reference"`` (projections only) or ``"other"``."""
    if impl in CORE_REFERENCES:
        return "sdpa"
    if impl in MODULE_REFERENCES:
        return "reference"
    cls = registry.get(impl)
    for base, name in (
        (MHAPyTorchScaledDotProduct, "sdpa"),
        (MHAPyTorchFlexAttention, "flex"),
        (MultiHeadAttentionCombinedQKV, "from_scratch"),
    ):
        if issubclass(cls, base):
            return name
    return "other"


def describe(w: Workload | DecodeWorkload) -> dict:
    """The case's static description (everything but measurements)."""
    info = {
        "case": w.case_id,
        "impl": w.impl,
        "family": family(w.impl),
        "device": torch.device(w.device).type,
        "dtype": dtype_name(w.dtype),
        "direction": w.direction,
        "level": w.level,
        "batch": w.batch,
        "num_heads": w.num_heads,
        "num_kv_heads": w.kv_heads,
        "head_dim": w.head_dim,
        "flops": w.flops(),
        "min_bytes": w.min_bytes(),
        "estimated_peak_mib": round(w.estimated_peak_bytes() / MiB, 1),
    }
    cls = None if w.impl in CORE_REFERENCES or w.impl in MODULE_REFERENCES else registry.get(w.impl)
    if cls is not None and cls.unavailable(w.device) is None:
        q_len = 1 if isinstance(w, DecodeWorkload) else w.seq_len
        group = w.num_heads // w.kv_heads
        config = cls.kernel_config(w.dtype, w.head_dim, q_len, grad=w.backward, device=w.device, group=group)
        if config is not None:
            info["kernel_config"] = config
    if isinstance(w, DecodeWorkload):
        info.update(kind="decode", context=w.context, seq_len=w.context, kv_bytes=w.kv_bytes(), layers=w.layers)
    else:
        scores = w.batch * w.num_heads * w.seq_len * w.seq_len * w.elt
        info.update(
            kind="prefill" if w.mask == "causal" else "mask",
            seq_len=w.seq_len,
            d_in=w.hidden,
            mask=w.mask,
            visible_block_fraction=w.visible_block_fraction(),
            scores_mib=round(scores / MiB, 1),
        )
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compile_count() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["frames"]["total"])
    except Exception:  # private API: losing this check must not lose the case
        return 0


def peak_memory_mib(fn, setup, device: torch.device) -> float | None:
    """MiB one call allocates above what was allocated before it (inputs excluded); CUDA only."""
    if device.type != "cuda":
        return None
    return round(peak_memory(fn, device=device, setup=setup).bytes / MiB, 2)


def _probe(fn, w, device: torch.device) -> dict:
    fam = family(w.impl)
    if fam not in ("sdpa", "flex"):
        return {}
    seen = probe.profile_call(fn, device)
    info: dict = {"kernels": _summarise(seen.kernels), "num_kernels": len(seen.kernels)}
    if seen.error:
        info["probe_error"] = seen.error
    if fam == "sdpa":
        info["sdpa_backend"] = probe.classify_sdpa(seen.ops, seen.kernels) if not seen.error else "unknown"
    else:
        info["flex_path"] = probe.classify_flex(seen.ops, seen.kernels, device.type) if not seen.error else "unknown"
    return info


def _summarise(kernels: list[str], top: int = 4, width: int = 60) -> list[str]:
    counts: dict[str, int] = {}
    for k in kernels:
        counts[k] = counts.get(k, 0) + 1
    return [f"{n}x {k[:width]}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]


@contextmanager
def _phase(wall: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        wall[name] = round(time.perf_counter() - start, 3)


class BaseCannotBuild(Exception):
    """The base revision's implementation fails on a case the working tree's runs: the A/B
    cannot compare it (exit status 2, not a regression)."""


@dataclass
class Prepared:
    """One side of a case, ready to time: the callable (a graph replay where captured), the
    setup to run before each round, and how it is timed."""

    timed: Callable[[], object]
    setup: Callable[[], None]
    mode: str
    peak_mem_mib: float | None
    graph_error: str | None = None


def _check_timer(benchmark, device: torch.device):
    timer = getattr(benchmark, "_timer", None)
    if device.type == "cuda" and not isinstance(timer, CudaEventClock):
        raise RuntimeError(
            f"the benchmark fixture times with {timer!r}, not the CUDA event clock; the perf plugin "
            "must mark every case with pytest.mark.benchmark(timer=clock_for(device))"
        )
    if isinstance(timer, CudaEventClock):
        timer.reset()  # a previous case that raised mid-round must not shift this one's pairs
    return timer


def _prepare(
    fn: Callable[[], object],
    setup: Callable[[], None],
    w: Workload | DecodeWorkload,
    opts: RunOptions,
    wall: dict[str, float],
    *,
    sides: int = 1,
    probe_into: dict | None = None,
) -> Prepared:
    """Warm up (compilation happens here), measure peak memory, probe what ran (into
    ``probe_into``), capture a CUDA graph where the policy asks and memory allows. ``sides``:
    how many copies of the case live at once (2 in an A/B run), for the memory check."""
    device = torch.device(opts.device)
    with _phase(wall, "warmup"):
        for _ in range(opts.warmup):
            setup()
            fn()
        _sync(device)
    with _phase(wall, "memory_probe"):
        peak = peak_memory_mib(fn, setup, device)
        if probe_into is not None:
            probe_into.update(_probe(fn, w, device))

    prepared = Prepared(fn, setup, EAGER, peak)
    wants_graph = captures(opts.graphs, w.backward)
    free = free_memory_bytes(device) if device.type == "cuda" else None
    if wants_graph and free is not None and sides * w.estimated_peak_bytes() > GRAPH_MEMORY_SHARE * free:
        # Warm-up and graph pools would hold the case twice; at this size dispatch is noise anyway.
        wants_graph, prepared.mode = False, TOO_LARGE_TO_CAPTURE
    with _phase(wall, "capture"):
        if device.type == "cuda" and wants_graph:
            free_cached_memory(device)  # the graph's private pool cannot reuse eager cached blocks
            try:
                prepared.timed, prepared.mode = cuda_graph(fn, device, setup=setup), GRAPH
            except Exception as exc:  # not capturable: time eagerly and say so
                prepared.mode = CAPTURE_FAILED
                prepared.graph_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                _sync(device)  # a capture that broke the context must fail here, loudly
    return prepared


def _start(benchmark, w: Workload | DecodeWorkload, opts: RunOptions) -> tuple[dict, object, dict[str, float]]:
    """The case's info, the benchmark's timer, and ``info["wall_s"]``: where the case's wall time
    goes (warmup holds compilation)."""
    timer = _check_timer(benchmark, torch.device(opts.device))
    info = describe(w)
    info["timer"] = getattr(timer, "name", getattr(timer, "__name__", repr(timer)))
    info["wall_s"] = wall = {}
    benchmark.extra_info.update(info)
    return info, timer, wall


def _side_info(info: dict, prepared: Prepared) -> None:
    info["peak_mem_mib"] = prepared.peak_mem_mib
    info["timing_mode"] = prepared.mode
    if prepared.graph_error:
        info["graph_error"] = prepared.graph_error


def run_case(benchmark, w: Workload | DecodeWorkload, opts: RunOptions) -> dict:
    """Time ``w`` with the ``benchmark`` fixture; returns (and stores in ``benchmark.extra_info``) its info."""
    info, timer, wall = _start(benchmark, w, opts)
    with _phase(wall, "build"):
        fn, setup = w.build()
        _sync(torch.device(opts.device))
    if benchmark.disabled:
        return _smoke(benchmark, fn, setup, info)
    return _time_alone(benchmark, fn, setup, w, opts, info, timer, wall)


def run_ab_case(
    benchmark, w: Workload | DecodeWorkload, base_impls: Mapping[str, type] | None, opts: RunOptions
) -> dict:
    """Time ``w`` as built by the working tree (head, timed by ``benchmark``) and by the base
    revision's implementations ``base_impls`` in the same process, rounds interleaved
    base-head-head-base (docs/design.md#same-machine-precision): drift in clocks, temperature or
    neighbours hits both sides alike. The base's samples and peak memory go to
    ``extra_info["ab"]``. ``base_impls`` lacking the case's implementation: only head is timed,
    and ``ab`` says so."""
    device = torch.device(opts.device)
    info, timer, wall = _start(benchmark, w, opts)
    with _phase(wall, "build"):
        fn, setup = w.build()
        try:
            base = w.build(base_impls) if implementation(w, base_impls) is not None else None
        except Exception as exc:
            raise BaseCannotBuild(f"{type(exc).__name__}: {exc}") from exc
        _sync(device)
    if benchmark.disabled:
        return _smoke(benchmark, fn, setup, info)
    if base is None:
        info["ab"] = {"base": None, "reason": f"the base revision has no implementation {w.impl!r}"}
        return _time_alone(benchmark, fn, setup, w, opts, info, timer, wall)

    base_wall: dict[str, float] = {}
    try:
        base_side = _prepare(*base, w, opts, base_wall, sides=2)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise BaseCannotBuild(f"{type(exc).__name__}: {exc}") from exc
    head = _prepare(fn, setup, w, opts, wall, sides=2, probe_into=info)
    _side_info(info, head)
    flusher = L2Flusher(device)
    before_round, after_round, (base_samples,) = _interleave(head, [base_side], flusher, clock_for(device))
    _time_rounds(benchmark, head, flusher, timer, opts, wall, info, setup=before_round, teardown=after_round)
    info["ab"] = {
        "base": "timed",
        "data": base_samples,
        "median_ms": statistics.median(base_samples) * 1e3,
        "peak_mem_mib": base_side.peak_mem_mib,
        "timing_mode": base_side.mode,
        "wall_s": base_wall,
        "order": "base-head-head-base",
    }
    return _figures(benchmark, info, opts)


def run_calibration_case(
    benchmark,
    w: Workload | DecodeWorkload,
    opts: RunOptions,
    *,
    depth: int,
    spin_fit: spin.SpinFit,
    levels: Sequence[float],
) -> dict:
    """Time ``w`` as the gate's calibration needs it (:mod:`.calibration`, docs/design.md#gate-calibration):
    the working tree's build (timed by ``benchmark``, as an A/B's head), a second build of the same
    case (its A/A twin, prepared as an A/B's base) and, for each share of ``levels``, the twin followed
    by a spin of that share of the case's time (:mod:`.spin`), inside the timed region. All of them
    are timed in one pedantic loop, rounds rotated (:func:`_interleave`), for ``depth`` times the
    rounds the A/B would give this case, so the calibration can cut gate-sized runs out of them.
    Each variant's samples go to ``extra_info["calibration"]``; a share below the spin's floor on
    this case is listed there, not timed."""
    device = torch.device(opts.device)
    info, timer, wall = _start(benchmark, w, opts)
    with _phase(wall, "build"):
        fn, setup = w.build()
        twin_fn, twin_setup = w.build()
        _sync(device)
    if benchmark.disabled:
        return _smoke(benchmark, fn, setup, info)
    twin_wall: dict[str, float] = {}
    twin = _prepare(twin_fn, twin_setup, w, opts, twin_wall, sides=2)
    head = _prepare(fn, setup, w, opts, wall, sides=2, probe_into=info)
    _side_info(info, head)
    flusher = L2Flusher(device)

    def alone() -> None:
        head.setup()
        flusher.flush()

    with _phase(wall, "probe_rounds"):
        per_call = _per_call(head.timed, alone, timer)
    rounds = _rounds_for(per_call, opts)
    variants, injected = [twin], {}
    for level in levels:
        target = level * per_call if per_call else None
        cycles = spin_fit.cycles(target) if target is not None else None
        injected[f"{level:g}"] = {"level": level, "target_s": target, "cycles": cycles}
        if cycles is not None:
            extra = spin.work(spin_fit, cycles)
            injected[f"{level:g}"]["expected_s"] = spin_fit.seconds(cycles)

            def timed(replay=twin.timed, extra=extra) -> None:
                replay()
                extra()

            variants.append(Prepared(timed, twin.setup, twin.mode, twin.peak_mem_mib))
    before_round, after_round, samples = _interleave(head, variants, flusher, clock_for(device))
    _time_rounds(
        benchmark,
        head,
        flusher,
        timer,
        opts,
        wall,
        info,
        setup=before_round,
        teardown=after_round,
        rounds=depth * rounds,
    )
    timed_levels = iter(samples[1:])
    for entry in injected.values():
        if entry["cycles"] is not None:
            entry["data"] = next(timed_levels)
    info["calibration"] = {
        "gate_rounds": rounds,
        "depth": depth,
        "per_call_s": per_call,
        "order": "rotated: twin, injected levels, head",
        "twin": {"data": samples[0], "timing_mode": twin.mode, "peak_mem_mib": twin.peak_mem_mib, "wall_s": twin_wall},
        "injected": injected,
    }
    return _figures(benchmark, info, opts)


def _time_alone(benchmark, fn, setup, w, opts: RunOptions, info: dict, timer, wall: dict) -> dict:
    """Prepare and time one built side under ``benchmark``."""
    head = _prepare(fn, setup, w, opts, wall, probe_into=info)
    _side_info(info, head)
    _time_rounds(benchmark, head, L2Flusher(torch.device(opts.device)), timer, opts, wall, info)
    return _figures(benchmark, info, opts)


def _time_rounds(
    benchmark,
    side: Prepared,
    flusher: L2Flusher,
    timer,
    opts: RunOptions,
    wall: dict,
    info: dict,
    *,
    setup: Callable[[], None] | None = None,
    teardown: Callable[[], None] | None = None,
    rounds: int | None = None,
) -> None:
    """Rounds from the time budget (unless given), then pytest-benchmark's pedantic loop over
    ``side``; each round starts from ``setup`` (default: the side's setup and an L2 flush)."""

    def alone() -> None:
        side.setup()
        flusher.flush()

    with _phase(wall, "timing"):
        if rounds is None:
            rounds = _rounds(side.timed, alone, timer, opts)
        compiles = _compile_count()
        benchmark.pedantic(
            side.timed, setup=setup or alone, teardown=teardown, rounds=rounds, warmup_rounds=WARMUP_ROUNDS
        )
        info["compiles_while_timing"] = _compile_count() - compiles
    info["rounds"] = rounds


def _smoke(benchmark, fn, setup, info: dict) -> dict:
    """``--benchmark-disable``: each case runs once, as a smoke test; nothing is timed."""
    benchmark.pedantic(fn, setup=setup)
    info["timing_mode"] = "disabled: ran once, not timed"
    benchmark.extra_info.update(info)
    return info


def _figures(benchmark, info: dict, opts: RunOptions) -> dict:
    median = benchmark.stats.stats.median
    info["median_ms"] = median * 1e3
    info["tflops"] = info["flops"] / median / 1e12 if median > 0 else None
    info["gbps"] = info["min_bytes"] / median / 1e9 if median > 0 else None
    if opts.copy_gbps:
        info["copy_gbps"] = opts.copy_gbps
        if info["gbps"]:
            info["copy_fraction"] = info["gbps"] / opts.copy_gbps
    if opts.matmul_tflops:
        info["matmul_tflops"] = opts.matmul_tflops
    if info["kind"] == "decode":
        info["latency_us"] = median * 1e6  # one decode step: one new token for each sequence
    benchmark.extra_info.update(info)
    return info


def _per_call(timed, before_round, timer) -> float | None:
    """Seconds one call takes: the median of three timed probe calls (``None`` without a clock)."""
    clock = timer if callable(timer) else None
    samples = []
    for _ in range(3):
        before_round()
        if clock is None:
            break
        start = clock()
        timed()
        samples.append(clock() - start)
    return statistics.median(samples) if samples else None


def _rounds_for(per_call: float | None, opts: RunOptions) -> int:
    """Rounds of ``per_call`` seconds that fit the per-case time budget."""
    if per_call is None:
        per_call = opts.budget_s / opts.min_rounds
    return rounds_for(per_call, opts.budget_s, opts.min_rounds, opts.max_rounds)


def _rounds(timed, before_round, timer, opts: RunOptions) -> int:
    """Rounds that fit the per-case time budget, from three timed probe calls."""
    return _rounds_for(_per_call(timed, before_round, timer), opts)


def _interleave(
    head: Prepared, others: Sequence[Prepared], flusher: L2Flusher, clock: Callable[[], float]
) -> tuple[Callable[[], None], Callable[[], None], list[list[float]]]:
    """pytest-benchmark's setup and teardown for timing ``others`` beside ``head``'s pedantic rounds,
    and one sample list per other side, filled as the rounds run.

    Timed round ``i`` runs every side once, in the order ``[*others, head]`` rotated by ``i``: the
    sides before the head in its setup, those after it in its teardown, each after its own setup and
    an L2 flush, on ``clock`` (not the benchmark's timer, whose readings pair up). Every side so takes
    every position equally often; with one other side this is base-head-head-base. Warm-up rounds
    run each other side once, untimed."""
    samples: list[list[float]] = [[] for _ in others]
    sides = len(others) + 1
    calls = 0  # setup calls so far: warm-up rounds first, then one per timed round

    def around_head(i: int) -> tuple[list[int], list[int]]:
        order: list[int | None] = [*range(len(others)), None]
        shift = i % sides
        order = order[shift:] + order[:shift]
        at = order.index(None)
        return [j for j in order[:at] if j is not None], [j for j in order[at + 1 :] if j is not None]

    def time_side(j: int) -> None:
        side = others[j]
        side.setup()
        flusher.flush()
        start = clock()
        side.timed()
        samples[j].append(clock() - start)

    def before_round() -> None:
        nonlocal calls
        i, calls = calls - WARMUP_ROUNDS, calls + 1
        if i < 0:
            for side in others:  # warm every other side's round too, untimed
                side.setup()
                side.timed()
        else:
            for j in around_head(i)[0]:
                time_side(j)
        head.setup()
        flusher.flush()

    def after_round() -> None:
        i = calls - 1 - WARMUP_ROUNDS
        if i >= 0:
            for j in around_head(i)[1]:
                time_side(j)

    return before_round, after_round, samples
