"""The context parallel benchmark: one GPU against several, SDPA under torch's ring attention.

    python -m attention.bench.context_parallel                      # 1 GPU and every GPU, default lengths
    python -m attention.bench.context_parallel --seq-lens 8192 131072 --gpus 1 2 --out cp/

For each GPU count it spawns one process per GPU (:func:`attention.context_parallel.launch`) and
times, at every length, the SDPA attention core (``scaled_dot_product_attention(is_causal=True)``
on ``(B, H, T, D)`` tensors) and the whole ``MHAPyTorchScaledDotProduct`` module, forward and
forward+backward, with the sequence sharded by :func:`attention.context_parallel.context_parallel_shards`
(one GPU: no context parallel at all). A round's time is its slowest rank's (CUDA events, the
timer of :mod:`.timing`); the figure is the median over rounds after warm-up. Then speed-up,
efficiency ``t1 / (n * tn)``, the crossover length below which one GPU is faster, and the load
balancer's effect (off against on) at ``--lb-length``: see :mod:`.context_parallel_report`.
Lengths that do not shard evenly or do not fit in memory are reported as skipped, with the reason.

Writes ``context_parallel.json`` and ``context_parallel.png`` to ``--out``, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import context_parallel as cp
from ..sdpa import MHAPyTorchScaledDotProduct
from .arguments import dtype_by_name, positive_float, positive_int
from .cost import DTYPES, dtype_name, fmt_gib
from .files import unwritable
from .memory import free_memory_bytes, method_for, peak_memory
from .sweep import device_name
from .timing import measure, rounds_for
from .workload import Workload

DEFAULT_SEQ_LENS = (4096, 8192, 16384, 32768, 131072, 524288)
DEFAULT_LB_LENGTH = 131072


@dataclass(frozen=True)
class BenchConfig:
    seq_lens: tuple[int, ...]
    gpu_counts: tuple[int, ...]
    batch: int = 1
    num_heads: int = 16
    head_dim: int = 128
    dtype_name: str = "bf16"
    backward: bool = True
    lb_length: int | None = DEFAULT_LB_LENGTH
    rotate_method: str = "allgather"
    cell_seconds: float = 1.0  # timing budget per cell; rounds adapt to it
    min_rounds: int = 3
    max_rounds: int = 20
    warmup: int = 2

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def directions(self) -> tuple[str, ...]:
        return ("fwd", "fwd_bwd") if self.backward else ("fwd",)


# -- one rank's measurements -------------------------------------------------------------------


def _agreed(world_size: int, value: object) -> list[object]:
    """``value`` from every rank (each rank's skip decision and timings must be the same on all)."""
    if world_size == 1:
        return [value]
    values: list[object] = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def ring_bytes(workload: Workload, world_size: int, rotate_method: str) -> int:
    """What torch's ring attention holds on one rank beyond a one-GPU run of the rank's shard,
    from its buffers as docs/design.md#context-parallel breaks them down (with the shard's own
    estimate, above every per-rank peak measured there, 2 to 8 ranks).

    Forward: the keys and values in flight (``allgather``: the whole sequence's, plus the rank's
    own concatenated to be gathered; ``alltoall``: the rank's concatenated to be sent on, the
    received shard and, beyond two ranks, the one received before) and torch's fp32 merge (the
    running output, each block's output made fp32, two temporaries of the update). Backward:
    the keys and values in flight again, fp32 gradients of q, k and v accumulated over the ring,
    and the fp32 dK, dV passed on and received.
    """
    if world_size == 1:
        return 0
    b, t, d = workload.batch, workload.seq_len, workload.head_dim
    shard_kv = 2 * b * workload.kv_heads * (t // world_size) * d * workload.elt  # K and V of one shard
    shard_out32 = b * workload.num_heads * (t // world_size) * d * 4  # a query shard's output in fp32
    if rotate_method == "allgather":
        in_flight = world_size * shard_kv + shard_kv
    else:
        in_flight = shard_kv * (2 if world_size == 2 else 3)
    forward = in_flight + 4 * shard_out32
    if not workload.backward:
        return forward
    shard_kv32 = shard_kv * 4 // workload.elt  # dK and dV of one shard in fp32
    # dq, dk, dv accumulated in fp32; dK, dV sent on and received
    return max(forward, in_flight + shard_out32 + shard_kv32 + 2 * shard_kv32)


def rank_peak_bytes(workload: Workload, world_size: int, rotate_method: str) -> int:
    """Estimated peak memory of one rank running ``workload`` sharded over ``world_size`` ranks:
    its shard's own estimate plus :func:`ring_bytes`."""
    shard = replace(workload, seq_len=workload.seq_len // world_size)
    return shard.estimated_peak_bytes() + ring_bytes(workload, world_size, rotate_method)


def _skip_reason(config: BenchConfig, workload: Workload, world_size: int, load_balance: bool) -> str | None:
    if world_size > 1:
        try:
            cp.check_length(workload.seq_len, world_size, load_balance=load_balance, dtype=config.dtype)
        except ValueError as error:
            return str(error)
    need = rank_peak_bytes(workload, world_size, config.rotate_method)
    free = free_memory_bytes(workload.device)
    if free is not None and need > 0.92 * free:
        return f"needs ~{fmt_gib(need)} per GPU; {fmt_gib(free)} free"
    return None


def _case(config: BenchConfig, level: str, backward: bool, tensors: list[torch.Tensor], device: torch.device):
    """``fn`` timing one call on this rank's ``tensors``: ``[q, k, v, grad_out]`` (core) or
    ``[x, grad_out]`` (module)."""
    if level == "core":
        q, k, v, grad_out = tensors  # (B, H, T / n, D) each
        inputs = [q, k, v]

        def forward() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T / n, D)

    else:
        x, grad_out = tensors  # (B, T / n, d)
        d = config.num_heads * config.head_dim
        torch.manual_seed(0)  # the same weights on every rank
        module = MHAPyTorchScaledDotProduct(d, d, config.num_heads, max(config.seq_lens))
        module = module.to(device=device, dtype=config.dtype).eval()
        inputs = [x, *module.parameters()]

        def forward() -> torch.Tensor:
            return module(x)  # (B, T / n, d)

    if not backward:
        return torch.no_grad()(forward)
    for t in inputs[: 3 if level == "core" else 1]:
        t.requires_grad_()

    def forward_backward() -> None:
        torch.autograd.grad(forward(), inputs, grad_out)

    return forward_backward


def _inputs(
    config: BenchConfig, level: str, seq_len: int, device: torch.device
) -> tuple[list[torch.Tensor], list[int]]:
    g = torch.Generator(device=device).manual_seed(0)  # the same inputs on every rank
    b, h, d = config.batch, config.num_heads, config.head_dim
    shape = (b, h, seq_len, d) if level == "core" else (b, seq_len, h * d)
    count = 4 if level == "core" else 2
    tensors = [torch.randn(shape, generator=g, device=device, dtype=config.dtype) for _ in range(count)]
    return tensors, [2 if level == "core" else 1] * count


def _time(config: BenchConfig, fn: Callable[[], object], device: torch.device, world_size: int) -> dict:
    probe = max(_agreed(world_size, measure(fn, device=device, rounds=1, warmup=config.warmup)[0]))
    rounds = rounds_for(probe, config.cell_seconds, config.min_rounds, config.max_rounds)
    per_rank = _agreed(world_size, measure(fn, device=device, rounds=rounds, warmup=0))
    slowest = sorted(max(times) for times in zip(*per_rank, strict=True))  # each round: its slowest rank
    peak = peak_memory(fn, device=device)
    peaks = _agreed(world_size, (peak.bytes, peak.total_bytes))
    return {
        "time_s": statistics.median(slowest),
        "min_s": slowest[0],
        "max_s": slowest[-1],
        "rounds": rounds,
        "peak_bytes": max(p[0] for p in peaks),
        "peak_total_bytes": max(p[1] for p in peaks),
    }


def _cell(
    config: BenchConfig, mesh: object, world_size: int, seq_len: int, level: str, direction: str, load_balance: bool
) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    backward = direction == "fwd_bwd"
    workload = Workload(
        "sdpa",
        config.batch,
        seq_len,
        config.num_heads,
        config.head_dim,
        config.dtype,
        str(device),
        backward=backward,
        level=level,
    )
    cell = {
        "gpus": world_size,
        "seq_len": seq_len,
        "level": level,
        "direction": direction,
        "load_balance": load_balance,
        "status": "ok",
        "reason": None,
        "figures": {},
    }
    reasons = [r for r in _agreed(world_size, _skip_reason(config, workload, world_size, load_balance)) if r]
    if reasons:
        return {**cell, "status": "skipped", "reason": reasons[0]}
    tensors, seq_dims = _inputs(config, level, seq_len, device)
    if world_size == 1:
        figures = _time(config, _case(config, level, backward, tensors, device), device, world_size)
    else:
        with cp.context_parallel_shards(
            mesh, tensors, seq_dims, load_balance=load_balance, rotate_method=config.rotate_method
        ) as shards:
            del tensors  # each rank holds its shards alone, as a real run would
            figures = _time(config, _case(config, level, backward, shards, device), device, world_size)
    flops = workload.flops()
    figures.update(flops=flops, tflops_per_gpu=flops / figures["time_s"] / world_size / 1e12)
    torch.cuda.empty_cache()
    return {**cell, "figures": figures}


def _bench_worker(rank: int, world_size: int, config: BenchConfig, out: str) -> None:
    """One rank of one GPU count: every cell; rank 0 rewrites ``out`` after each, so a run that
    dies (out of memory at the longest length, say) still leaves what it measured."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world_size,)) if world_size > 1 else None
    plan = [(t, lv, d, True) for t in config.seq_lens for lv in ("core", "module") for d in config.directions]
    if world_size > 1 and config.lb_length is not None:
        plan += [(config.lb_length, lv, d, False) for lv in ("core", "module") for d in config.directions]
    cells = []
    for seq_len, level, direction, load_balance in plan:
        cells.append(_cell(config, mesh, world_size, seq_len, level, direction, load_balance))
        if rank == 0:
            Path(out).write_text(json.dumps(cells))


# -- the whole run -----------------------------------------------------------------------------


def metadata(config: BenchConfig) -> dict[str, object]:
    return {
        "device_name": device_name("cuda"),
        "gpus_present": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else None,
        "python": platform.python_version(),
        **{k: v for k, v in asdict(config).items() if k not in ("seq_lens", "gpu_counts")},
        "dtype": dtype_name(config.dtype),
        "seq_lens": list(config.seq_lens),
        "gpu_counts": list(config.gpu_counts),
        "timer": "CUDA events, L2 flushed before each round",
        "memory_method": method_for("cuda"),
        "flops": "4*B*H*T^2*D/2 forward (causal), x3.5 forward+backward; module adds its projections",
        "module_backward": "gradients of x and the weights; the weights' all-reduce is not timed",
    }


def run(config: BenchConfig, progress: Callable[[str], None] = print) -> dict[str, object]:
    """Every GPU count in turn; a count whose processes fail keeps the cells it finished and the
    error is recorded."""
    result: dict[str, object] = {"schema": 1, "meta": metadata(config), "cells": [], "errors": []}
    with tempfile.TemporaryDirectory() as folder:
        for gpus in config.gpu_counts:
            progress(f"measuring on {gpus} GPU{'s' if gpus > 1 else ''}")
            partial = Path(folder) / f"{gpus}.json"
            try:
                cp.launch(_bench_worker, config, str(partial), world_size=gpus)
            except Exception as error:  # a rank died: keep what it measured, say why
                message = str(error).strip().splitlines()
                result["errors"].append(f"{gpus} GPUs: {type(error).__name__}: {message[-1] if message else ''}")
            if partial.exists():
                result["cells"].extend(json.loads(partial.read_text()))
    return result


def default_gpu_counts(gpus: int) -> tuple[int, ...]:
    """1, the powers of two below ``gpus``, and ``gpus``."""
    counts = {1, gpus}
    counts.update(2**i for i in range(1, gpus.bit_length()) if 2**i < gpus)
    return tuple(sorted(c for c in counts if c >= 1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m attention.bench.context_parallel",
        description="Time SDPA attention (core and module) on one GPU and under torch's context parallel on "
        "several: time, TFLOP/s per GPU, peak memory per GPU, speed-up, efficiency, crossover length, and "
        "the load balancer's effect. Prints tables; writes context_parallel.json and context_parallel.png.",
    )
    parser.add_argument(
        "--seq-lens",
        type=positive_int,
        nargs="+",
        metavar="T",
        default=list(DEFAULT_SEQ_LENS),
        help="sequence lengths (default: 4k 8k 16k 32k 128k 512k)",
    )
    parser.add_argument(
        "--gpus",
        type=positive_int,
        nargs="+",
        metavar="N",
        default=None,
        help="GPU counts to run (default: 1, powers of two, and every visible GPU)",
    )
    parser.add_argument("--batch", type=positive_int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--heads", type=positive_int, default=16, help="attention heads (default 16)")
    parser.add_argument("--head-dim", type=positive_int, default=128, help="elements per head (default 128)")
    parser.add_argument("--dtype", type=dtype_by_name, default=torch.bfloat16, help="bf16 (default), fp16 or fp32")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument(
        "--lb-length",
        type=positive_int,
        default=None,
        help="one of --seq-lens at which the load balancer is also measured off "
        f"(default: {DEFAULT_LB_LENGTH} if swept, else the longest)",
    )
    parser.add_argument(
        "--rotate",
        choices=cp.ROTATE_METHODS,
        default="allgather",
        help="how torch passes keys and values around the ring (default: allgather)",
    )
    parser.add_argument(
        "--cell-seconds",
        type=positive_float,
        default=1.0,
        help="timing budget per cell; rounds adapt to it, 3 to 20 (default: 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("cp-benchmark-out"), help="output folder")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON only")
    return parser


def parse_args(argv: Sequence[str] | None, gpus: int) -> tuple[BenchConfig, Path, bool]:
    parser = build_parser()
    return _config(parser, parser.parse_args(argv), gpus)


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace, gpus: int) -> tuple[BenchConfig, Path, bool]:
    """The run ``args`` ask for on ``gpus`` GPUs; a usage error (exit 2) where they cannot have it."""
    counts = tuple(sorted(set(args.gpus))) if args.gpus else default_gpu_counts(max(gpus, 1))
    if counts[-1] > gpus:
        parser.error(f"--gpus {counts[-1]}: only {gpus} GPU(s) present")
    seq_lens = tuple(sorted(set(args.seq_lens)))
    lb_length = args.lb_length or (DEFAULT_LB_LENGTH if DEFAULT_LB_LENGTH in seq_lens else seq_lens[-1])
    if lb_length not in seq_lens:
        parser.error(f"--lb-length {lb_length} must be one of --seq-lens (its load-balanced time is the reference)")
    problem = unwritable(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    config = BenchConfig(
        seq_lens=seq_lens,
        gpu_counts=counts,
        batch=args.batch,
        num_heads=args.heads,
        head_dim=args.head_dim,
        dtype_name=dtype_name(args.dtype),
        backward=not args.no_backward,
        lb_length=lb_length if counts[-1] > 1 else None,
        rotate_method=args.rotate,
        cell_seconds=args.cell_seconds,
    )
    return config, args.out, not args.no_plots


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help and usage errors first: they need no GPU
    if not torch.cuda.is_available():
        print("the context parallel benchmark needs CUDA GPUs; this machine has none", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    config, out, plots = _config(parser, args, gpus)
    from rich.console import Console

    from . import context_parallel_report as report

    result = run(config, progress=lambda text: Console(stderr=True).print(text))
    paths = report.write(result, out, plots=plots)
    console = Console(record=True, width=max(Console().width, 160))
    report.print_table(result, console)
    console.save_text(str(out / "table.txt"))
    for error in result["errors"]:
        console.print(f"error: {error}", highlight=False, markup=False)
    Console(stderr=True).print("wrote " + ", ".join(str(p) for p in [*paths, out / "table.txt"]))
    problem = cp.gpus_problem(gpus)
    if problem:
        print(f"{problem}: measured the 1-GPU column only", file=sys.stderr)
        return 1
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
