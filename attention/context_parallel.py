"""Run a module under torch's context parallel: the sequence sharded over GPUs, ring attention.

torch's ``context_parallel`` (docs/design.md#context-parallel) shards buffers along their
sequence dimension, one shard per rank of a 1-D device mesh, and while it is open replaces
``F.scaled_dot_product_attention`` with ring attention: each rank keeps its queries and sees every
rank's keys and values through NCCL collectives, merging the partial results by their
log-sum-exp. Only SDPA calls are rewritten, so only implementations that attend through SDPA's
fused CUDA kernels can run here (:meth:`attention.AttentionBase.context_parallel_unsupported`).

* :func:`run_context_parallel`: one forward (and backward) of a module over a whole input; every
  rank gets the whole output and the whole gradients back.
* :func:`context_parallel_shards`: the open context itself, for timing many calls.
* :func:`launch`: one process per GPU with the NCCL process group set up (no torchrun needed).

Everything is checked before the first collective, the same way on every rank, so a refused call
raises on all ranks and none waits for the others.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from . import checks
from .base import AttentionBase
from .masks import causal

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

#: How torch rotates the keys and values around the ring: "allgather" gathers them once,
#: "alltoall" passes each shard on to the next rank at every step.
ROTATE_METHODS = ("allgather", "alltoall")


def gpus_problem(gpus: int) -> str | None:
    """Why context parallel cannot run with ``gpus`` CUDA GPUs, or ``None`` when it can."""
    return None if gpus >= 2 else f"context parallel needs 2+ CUDA GPUs, found {gpus}"


def shard_multiple(world_size: int, load_balance: bool) -> int:
    """What the sequence length must be a multiple of for ``world_size`` ranks.

    With the load balancer on, torch's head-tail balancer cuts the sequence into ``2 *
    world_size`` equal chunks and gives rank ``r`` chunks ``r`` and ``2 * world_size - 1 - r``;
    on any other length torch silently turns it off. Without it, each rank takes one contiguous
    ``T / world_size`` slice; unequal slices would break the ring, whose key/value buffers have
    the shape of the local ones.
    """
    return 2 * world_size if load_balance else world_size


#: SDPA's memory-efficient kernel, the one SDPA runs for fp32 on CUDA, pads its log-sum-exp to a
#: multiple of this many query rows; torch's ring attention merges that log-sum-exp with the
#: unpadded output and fails on any other query count ("size of tensor a (96) must match ... (74)").
EFFICIENT_LSE_ROWS = 32


def query_chunk(seq_len: int, world_size: int, load_balance: bool) -> int:
    """The query rows of one of SDPA's calls inside the ring: a rank's whole shard without the
    load balancer; with it, half of one (the ring attends with the shard's second chunk alone
    where the first chunk sees none of the other rank's keys)."""
    return seq_len // shard_multiple(world_size, load_balance)


def check_length(seq_len: int, world_size: int, *, load_balance: bool, dtype: torch.dtype | None = None) -> None:
    """Refuse a sequence length that torch's context parallel cannot shard evenly, or (``dtype``
    fp32) one whose query chunks SDPA's memory-efficient kernel would pad."""
    checks.integer("seq_len", seq_len)
    checks.integer("world_size", world_size)
    checks.boolean("load_balance", load_balance)
    multiple = shard_multiple(world_size, load_balance)
    if seq_len % multiple:
        rule = (
            f"2 x world_size = {multiple} (the load balancer cuts it into {multiple} equal chunks)"
            if load_balance
            else f"world_size = {multiple} (one equal slice per rank)"
        )
        raise ValueError(f"sequence length {seq_len} is not a multiple of {rule}; pad the sequence or change it")
    if seq_len // world_size < 2:
        # The SDPA module runs a one-token call as a decode step that sees every key it is given,
        # so a one-token shard would see the keys after it.
        raise ValueError(
            f"sequence length {seq_len} over {world_size} ranks leaves {seq_len // world_size} token per rank; "
            "context parallel needs at least 2"
        )
    chunk = query_chunk(seq_len, world_size, load_balance)
    if dtype == torch.float32 and chunk % EFFICIENT_LSE_ROWS:
        raise ValueError(
            f"fp32 under context parallel runs SDPA's memory-efficient kernel, which pads its log-sum-exp to "
            f"{EFFICIENT_LSE_ROWS} query rows, and torch's ring attention cannot merge a padded one: sequence "
            f"length {seq_len} over {world_size} ranks ({'with' if load_balance else 'without'} the load balancer) "
            f"gives calls of {chunk} query rows; use a multiple of {EFFICIENT_LSE_ROWS * multiple}, or bf16/fp16"
        )


def check_supported(module: AttentionBase, dtype: torch.dtype | None = None) -> None:
    """Refuse a module that torch's context parallel would compute wrongly or not at all (on
    inputs of ``dtype``, where given)."""
    if not isinstance(module, AttentionBase):
        raise TypeError(f"module must be an attention.AttentionBase, got {type(module).__name__}")
    name = type(module).__name__
    reason = module.context_parallel_unsupported()
    if reason is not None:
        raise ValueError(f"{name} cannot run under context parallel: {reason}")
    if dtype == torch.float32 and module.num_kv_heads != module.num_heads:
        raise ValueError(
            f"{name} has num_kv_heads={module.num_kv_heads} < num_heads={module.num_heads} in fp32: SDPA runs "
            "grouped-query attention in fp32 on its math path, which torch's ring attention cannot shard "
            "(it mixes DTensors and plain tensors); use bf16/fp16 or num_kv_heads = num_heads"
        )
    if module.mask_mod is not causal:
        raise ValueError(
            f"{name} has mask_mod={getattr(module.mask_mod, '__name__', type(module.mask_mod).__name__)}; "
            "context parallel runs plain causal attention only (SDPA's is_causal=True: torch's ring "
            "attention takes no attention mask)"
        )
    if module.score_mod is not None:
        raise ValueError(f"{name} has a score_mod; context parallel takes no attention bias")
    if module.training and module.dropout > 0:
        # torch's ring backward replays every block with the dropout seed of the forward's last block.
        raise ValueError(
            f"{name} has dropout={module.dropout} in training; context parallel's backward would not "
            "replay the forward's dropout masks: call module.eval() or use dropout=0"
        )


def _torch_cp() -> tuple:
    """torch's context parallel entry points, or a clear error naming what this torch lacks."""
    if not dist.is_available():
        raise RuntimeError(f"this torch build ({torch.__version__}) has no torch.distributed")
    try:
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import (
            _cp_options,
            context_parallel_unshard,
            set_rotate_method,
        )
    except ImportError as error:
        raise RuntimeError(
            f"torch {torch.__version__} lacks the context parallel API this needs "
            "(torch.distributed.tensor.experimental.context_parallel, and context_parallel_unshard, "
            f"_cp_options and set_rotate_method in its _attention module): {error}"
        ) from error
    if not hasattr(_cp_options, "enable_load_balance") or not hasattr(_cp_options, "rotate_method"):
        raise RuntimeError(
            f"torch {torch.__version__}'s context parallel options have no enable_load_balance or rotate_method"
        )
    return context_parallel, context_parallel_unshard, _cp_options, set_rotate_method


def _mesh_size(mesh: object) -> int:
    size = getattr(mesh, "size", None)
    if not callable(size) or getattr(mesh, "ndim", 1) != 1:
        raise TypeError(f"mesh must be a 1-D DeviceMesh (init_device_mesh('cuda', (world_size,))), got {mesh!r}")
    return size()


def _check_tensors(tensors: Sequence[Tensor], seq_dims: Sequence[int]) -> int:
    """The common sequence length of ``tensors`` along ``seq_dims``."""
    if not tensors or len(tensors) != len(seq_dims):
        raise ValueError(f"give one seq_dim per tensor, got {len(tensors)} tensors and {len(seq_dims)} seq_dims")
    lengths = set()
    for i, (tensor, dim) in enumerate(zip(tensors, seq_dims, strict=True)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensor {i} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cuda":
            raise ValueError(
                f"tensor {i} is on {tensor.device}; context parallel runs on CUDA (torch's ring attention "
                "rewrites the CUDA SDPA kernels)"
            )
        if not 0 < dim < tensor.dim():
            raise ValueError(f"seq_dim {dim} of tensor {i} (shape {tuple(tensor.shape)}) must be a dim after the batch")
        lengths.add(tensor.shape[dim])
    if len(lengths) != 1:
        raise ValueError(f"the tensors' sequence lengths differ: {sorted(lengths)}")
    return lengths.pop()


def shard_sequence(tensor: Tensor, seq_dim: int, rank: int, world_size: int, *, load_balance: bool) -> Tensor:
    """Rank ``rank``'s part of ``tensor`` along ``seq_dim``, as torch's context parallel lays the
    sequence out: with the load balancer, chunks ``rank`` and ``2 * world_size - 1 - rank`` of
    ``2 * world_size`` (torch's head-tail balancer); without it, chunk ``rank`` of ``world_size``.
    A compact copy: it shares no storage with ``tensor``."""
    if load_balance:
        chunks = tensor.detach().chunk(2 * world_size, seq_dim)
        return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], seq_dim)
    return tensor.detach().chunk(world_size, seq_dim)[rank].clone()


@contextmanager
def context_parallel_shards(
    mesh: DeviceMesh,
    tensors: Sequence[Tensor],
    seq_dims: Sequence[int],
    *,
    load_balance: bool = True,
    rotate_method: str = "allgather",
) -> Iterator[list[Tensor]]:
    """Open torch's context parallel on ``mesh``: yields this rank's shards of ``tensors`` (compact
    copies; the caller's tensors are left whole and no reference to them is kept, so a caller that
    drops them holds ``1 / world_size`` of them), while SDPA runs as ring attention.

    Attention (forward and backward) must run inside the block: torch restores SDPA on exit.
    Sequence-sharded results go back to whole tensors with :func:`unshard`, also inside the block
    (it undoes the load balancer's reordering). torch's options are restored on exit.
    """
    checks.boolean("load_balance", load_balance)
    if rotate_method not in ROTATE_METHODS:
        raise ValueError(f"rotate_method must be one of {', '.join(ROTATE_METHODS)}, got {rotate_method!r}")
    world_size = _mesh_size(mesh)
    seq_len = _check_tensors(tensors, seq_dims)
    for dtype in {t.dtype for t in tensors}:
        check_length(seq_len, world_size, load_balance=load_balance, dtype=dtype)
    context_parallel, _, options, set_rotate_method = _torch_cp()

    # torch's context_parallel shards the buffers it is given in place, and keeps the
    # load-balanced whole-length copies its shards are views of alive while it is open: every
    # rank would hold each tensor whole, twice. It gets a one-byte-per-token marker instead,
    # which sets its load balancer up for this length; the tensors are sharded here, its way.
    rank = mesh.get_local_rank()
    shards = [
        shard_sequence(t, dim, rank, world_size, load_balance=load_balance)
        for t, dim in zip(tensors, seq_dims, strict=True)
    ]
    del tensors
    marker = torch.empty(1, seq_len, dtype=torch.uint8, device=shards[0].device)  # (1, T)
    previous = (options.enable_load_balance, options.rotate_method)
    options.enable_load_balance = load_balance
    set_rotate_method(rotate_method)
    try:
        with context_parallel(mesh, buffers=[marker], buffer_seq_dims=[1], no_restore_buffers={marker}):
            if options.enable_load_balance != load_balance:
                state = "on" if load_balance else "off"
                raise RuntimeError(
                    f"torch {torch.__version__} did not keep the load balancer {state} for {seq_len} tokens over "
                    f"{world_size} ranks; the shards here are laid out with it {state}"
                )
            yield shards
    finally:
        options.enable_load_balance, options.rotate_method = previous


def unshard(mesh: DeviceMesh, tensor: Tensor, seq_dim: int) -> Tensor:
    """The whole tensor from every rank's shard along ``seq_dim``, in the original token order.
    Call it inside :func:`context_parallel_shards` (it reads the load balancer's setting)."""
    _, context_parallel_unshard, _, _ = _torch_cp()
    (whole,) = context_parallel_unshard(mesh, [tensor.detach()], [seq_dim])
    return whole


@dataclass(frozen=True)
class ContextParallelResult:
    """What :func:`run_context_parallel` returns on every rank, whole (not sharded)."""

    output: Tensor  # (B, T, d_out)
    x_grad: Tensor | None  # (B, T, d_in)
    param_grads: Mapping[str, Tensor] | None  # name -> grad, summed over ranks


def run_context_parallel(
    module: AttentionBase,
    x: Tensor,
    mesh: DeviceMesh,
    *,
    grad_out: Tensor | None = None,
    load_balance: bool = True,
    rotate_method: str = "allgather",
) -> ContextParallelResult:
    """``module(x)`` with ``x`` ``(B, T, d_in)`` sharded along ``T`` over ``mesh``; with
    ``grad_out`` ``(B, T, d_out)`` also the gradients of ``x`` and of every parameter.

    Every rank passes the same ``x``, ``grad_out`` and weights (as with torch's
    ``context_parallel``) and gets the whole output and gradients back. The module's ``.grad``
    fields are not touched. Refused before any communication: an implementation, mask, score mod
    or training dropout that context parallel cannot run, CPU tensors, lengths that do not shard
    evenly (:func:`check_length`), and in fp32 grouped-query attention and query chunks SDPA's
    memory-efficient kernel would pad (:data:`EFFICIENT_LSE_ROWS`).
    """
    check_supported(module, x.dtype if isinstance(x, Tensor) else None)
    with torch.set_grad_enabled(grad_out is not None):  # gradients are asked for only with grad_out
        module._check_input(x, None, None)  # shape, dtype, device and context_length, on the whole sequence
    tensors = [x]
    if grad_out is not None:
        expected = (*x.shape[:2], module.d_out)
        if not isinstance(grad_out, Tensor) or tuple(grad_out.shape) != expected:
            shape = tuple(grad_out.shape) if isinstance(grad_out, Tensor) else type(grad_out).__name__
            raise ValueError(f"grad_out must have the output's shape {expected}, got {shape}")
        tensors.append(grad_out)
    params = dict(module.named_parameters())
    with context_parallel_shards(
        mesh, tensors, [1] * len(tensors), load_balance=load_balance, rotate_method=rotate_method
    ) as shards:
        x_local = shards[0].requires_grad_(grad_out is not None)  # (B, T / world, d_in)
        with torch.set_grad_enabled(grad_out is not None):
            y_local = module(x_local)  # (B, T / world, d_out)
        output = unshard(mesh, y_local, 1)  # (B, T, d_out)
        if grad_out is None:
            return ContextParallelResult(output, None, None)
        # The ring's backward runs the collectives too, so it must run while the context is open.
        grads = torch.autograd.grad(y_local, [x_local, *params.values()], shards[1])
        x_grad = unshard(mesh, grads[0], 1)  # (B, T, d_in)
    group = mesh.get_group()
    param_grads = {}
    for name, grad in zip(params, grads[1:], strict=True):
        dist.all_reduce(grad, group=group)  # each rank holds its tokens' share
        param_grads[name] = grad
    return ContextParallelResult(output, x_grad, param_grads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(
    rank: int, world_size: int, port: int, worker: Callable[..., None], args: tuple, timeout_s: float
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    # device_id binds the group to this GPU at once (NCCL otherwise guesses, and warns).
    dist.init_process_group(
        "nccl", rank=rank, world_size=world_size, device_id=device, timeout=timedelta(seconds=timeout_s)
    )
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(worker: Callable[..., None], *args: object, world_size: int | None = None, timeout_s: float = 600.0) -> None:
    """Run ``worker(rank, world_size, *args)`` in one fresh process per GPU (rank ``r`` on GPU
    ``r``), each with the NCCL process group initialised; ``worker`` must be importable (defined
    at module level). Raises when any rank raises, after stopping the others.

    ``world_size`` defaults to every visible GPU. ``timeout_s`` bounds how long a collective may
    wait for a rank that never comes.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world_size = gpus if world_size is None else checks.integer("world_size", world_size)
    if world_size > gpus:
        raise ValueError(f"world_size={world_size} needs {world_size} CUDA GPUs, found {gpus}")
    if world_size < 1:
        raise ValueError("launch needs a CUDA GPU, found none")
    torch.multiprocessing.spawn(
        _rank_entry, args=(world_size, _free_port(), worker, args, timeout_s), nprocs=world_size, join=True
    )
