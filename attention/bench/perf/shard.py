"""A perf run over several GPUs of one host (docs/design.md#multi-gpu-grid).

One pytest worker process per GPU, pinned to it with ``CUDA_VISIBLE_DEVICES``, runs a shard of
the cases; :func:`lpt_shards` cuts the shards longest case first onto the least-loaded GPU
(LPT), so a long case never starts last. A case's cost is what it took in an earlier run of this
GPU model (the committed baseline's per-case wall time) where there is one, else
:func:`model_seconds`, scaled to the history's pace. :func:`merge_shards` joins the workers' runs
into one run JSON whose cases record the GPU that ran them. An A/B times both revisions of a case
in the same worker, so on the same GPU.
"""

from __future__ import annotations

import heapq
import statistics
from collections.abc import Mapping, Sequence

from ..timing import rounds_for
from .machine import KEY
from .results import PerfError, Run
from .runner import MAX_ROUNDS, MIN_ROUNDS

#: Seconds of compilation and warm-up a case of each implementation pays before timing: flex
#: compiles a kernel per shape (inductor), triton per tile config, the rest runs torch's kernels.
FIXED_S = {"flex": 6.0, "triton": 2.0}
DEFAULT_FIXED_S = 0.5
#: Sustained FLOP/s and bytes/s the cost model assumes for the timed calls (rough, GPU-sized).
FLOPS_PER_S = {"from_scratch": 20e12}
DEFAULT_FLOPS_PER_S = 300e12
BYTES_PER_S = 2e12
#: Calls of a case outside its timed rounds (warm-up, memory probe, profiler probe, capture).
UNTIMED_CALLS = 8


def parse_gpus(spec: str, available: int) -> list[int]:
    """The GPU indices ``--gpus`` names: ``all`` or a count ``N`` (the first N)."""
    if available < 1:
        raise PerfError("--gpus needs CUDA GPUs; none here")
    if spec == "all":
        return list(range(available))
    try:
        count = int(spec)
    except ValueError:
        raise PerfError(f"--gpus takes 'all' or a number of GPUs, got {spec!r}") from None
    if not 1 <= count <= available:
        raise PerfError(f"--gpus {count}: this host has {available} CUDA GPU(s)")
    return list(range(count))


def model_seconds(info: Mapping[str, object], budget_s: float, min_rounds: int = MIN_ROUNDS) -> float:
    """A case's wall time from its description (:func:`attention.bench.perf.runner.describe`):
    fixed cost per implementation, then its calls at an assumed pace: forward+backward counted
    in its FLOPs, decode by the bytes it must read; timed for the rounds the runner gives it."""
    impl = str(info.get("impl"))
    # By name first: a plugin or the triton implementation is family "other".
    fixed = FIXED_S.get(impl, FIXED_S.get(str(info.get("family", impl)), DEFAULT_FIXED_S))
    per_call = max(
        float(info.get("flops") or 0.0) / FLOPS_PER_S.get(impl, DEFAULT_FLOPS_PER_S),
        float(info.get("min_bytes") or 0.0) / BYTES_PER_S,
    )
    rounds = rounds_for(per_call, budget_s, min_rounds, MAX_ROUNDS)  # as the runner times it
    return fixed + (UNTIMED_CALLS + rounds) * per_call


def history_seconds(run: Run | None) -> dict[str, float]:
    """Each case's wall time in an earlier run (build, warm-up, probes, capture, timing)."""
    if run is None:
        return {}
    seconds = {}
    for key, record in run.records.items():
        wall = record.info.get("wall_s")
        if isinstance(wall, Mapping) and wall:
            seconds[key] = float(sum(v for v in wall.values() if isinstance(v, (int, float))))
    return seconds


def case_costs(
    infos: Mapping[str, Mapping[str, object]],
    history: Mapping[str, float],
    budget_s: float,
    min_rounds: int = MIN_ROUNDS,
) -> dict[str, float]:
    """Seconds per case: the history's where it has the case, else the model's, scaled by the
    median history/model ratio of the cases both know (the model only has to rank them)."""
    model = {key: model_seconds(info, budget_s, min_rounds) for key, info in infos.items()}
    known = [history[k] / model[k] for k in infos if k in history and model[k] > 0]
    pace = statistics.median(known) if known else 1.0
    return {key: history.get(key, model[key] * pace) for key in infos}


def lpt_shards(costs: Mapping[str, float], workers: int) -> list[list[str]]:
    """Cases cut into ``workers`` shards, longest first onto the least-loaded shard (ties: the
    lower index), each shard in the order its cases were dealt: deterministic for given costs."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    shards: list[list[str]] = [[] for _ in range(workers)]
    loads = [(0.0, i) for i in range(workers)]
    for key in sorted(costs, key=lambda k: (-costs[k], k)):
        load, i = heapq.heappop(loads)
        shards[i].append(key)
        heapq.heappush(loads, (load + costs[key], i))
    return shards


def merge_shards(parts: Sequence[tuple[int, Run]], wall_s: float, *, host_gpus: int) -> dict:
    """One run document from the workers' runs ``(gpu index, run)``: every case once, stamped
    with its GPU; machine info of the first worker (with the host's ``host_gpus``, where a pinned
    worker saw one) plus each worker's GPU and ceilings. Refuses GPUs of different models (a
    baseline is per model) and a case run twice."""
    if not parts:
        raise PerfError("no worker produced a run")
    models = {run.machine.get("gpu_name") for _, run in parts}
    if len(models) > 1:
        raise PerfError(f"--gpus mixes GPU models ({', '.join(sorted(map(str, models)))}): a run is per model")
    benches, seen = [], {}
    for gpu, run in parts:
        for bench in run.raw["benchmarks"]:
            key = bench.get("extra_info", {}).get("case") or bench["name"]
            if key in seen:
                raise PerfError(f"case {key} ran on GPU {seen[key]} and GPU {gpu}: shards must not overlap")
            seen[key] = gpu
            benches.append(dict(bench, extra_info=dict(bench.get("extra_info", {}), gpu=gpu)))
    first = parts[0][1]
    machine = dict(first.machine, wall_s=round(wall_s, 1), gpu_count=host_gpus)
    machine["gpus"] = [
        {
            "index": gpu,
            "cases": sum(1 for g in seen.values() if g == gpu),
            **{k: run.machine.get(k) for k in ("gpu_name", "copy_gbps", "matmul_tflops", "wall_s", "gpu_state")},
        }
        for gpu, run in parts
    ]
    raw = dict(first.raw, benchmarks=benches)
    raw["machine_info"] = dict(first.raw["machine_info"], **{KEY: machine})
    return raw
