"""What the notebook shows, as plain functions: mask patterns, BlockMask layouts, outputs
against the oracle and the ops each implementation runs. Kept out of the notebook so they are
tested on CPU like the rest of the package and usable from any script."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .. import masks
from ..base import AttentionBase
from ..registry import get
from .memory import quiet_profiler_logs


def make_pattern(
    kind: str, seq_len: int, *, batch: int = 1, window: int = 16, prefix_len: int = 16, num_docs: int = 3
) -> masks.Pattern:
    """The notebook's widgets as a mask spec: ``kind`` (one of :data:`attention.masks.SPEC_KINDS`)
    with its parameter, for ``batch`` sequences of ``seq_len`` tokens; documents get random
    (seeded) boundaries, different in each row."""
    params = {"causal": None, "sliding_window": window, "prefix_lm": prefix_len, "document": num_docs}
    if kind not in params:
        raise ValueError(f"unknown pattern {kind!r}; choose one of {', '.join(params)}")
    spec = kind if params[kind] is None else f"{kind}:{params[kind]}"
    return masks.from_spec(spec, batch=batch, tokens=seq_len, generator=torch.Generator().manual_seed(0))


def block_layout(block_mask: BlockMask, batch: int = 0, head: int = 0) -> Tensor:
    """``(Q blocks, KV blocks)`` int8 grid of one (batch, head): 0 = skipped, 1 = partial (the
    kernel evaluates ``mask_mod`` inside it), 2 = full (no mask needed)."""
    kv_num = block_mask.kv_num_blocks  # (B or 1, H or 1, Q blocks)
    b, h = min(batch, kv_num.shape[0] - 1), min(head, kv_num.shape[1] - 1)
    num_q, num_kv = block_mask.kv_indices.shape[-2:]
    layout = torch.zeros(num_q, num_kv, dtype=torch.int8)
    kinds = [(1, block_mask.kv_num_blocks, block_mask.kv_indices)]
    if block_mask.full_kv_num_blocks is not None:
        kinds.append((2, block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    for value, counts, indices in kinds:
        counts, indices = counts[b, h].cpu(), indices[b, h].cpu().long()  # (Q blocks,), (Q blocks, KV blocks)
        used = torch.arange(num_kv)[None, :] < counts[:, None]  # (Q blocks, KV blocks)
        layout.scatter_reduce_(1, indices, (used * value).to(torch.int8), reduce="amax")
    return layout


def build(
    name: str, state_dict: dict[str, Tensor] | None, *, d_model: int, num_heads: int, seq_len: int, **kwargs
) -> AttentionBase:
    """Implementation ``name`` in eval mode, with the shared parameters ``state_dict`` if given."""
    module = get(name)(d_model, d_model, num_heads, seq_len, **kwargs)
    if state_dict is not None:
        module.load_state_dict(state_dict)
    return module.eval()


def core_module(name: str, *, num_heads: int, head_dim: int, seq_len: int, **kwargs) -> AttentionBase:
    """Implementation ``name`` in eval mode with identity projections, taking ``x = [q | k | v]``
    (width ``3 * num_heads * head_dim``): ``module(x)`` is exactly the attention core over ``q, k, v``,
    so its error against the oracle is the attention's, not hidden under the projections' rounding."""
    d_model = num_heads * head_dim
    module = get(name)(3 * d_model, d_model, num_heads, seq_len, **kwargs)
    with torch.no_grad():
        module.qkv.weight.copy_(torch.eye(3 * d_model))  # (3 d_model, 3 d_model): q, k, v = x
        module.proj.weight.copy_(torch.eye(d_model))  # (d_model, d_model)
        module.proj.bias.zero_()
    return module.eval()


@dataclass(frozen=True)
class OpRow:
    """One op in a profile: what ran, how often and how long, summed over calls."""

    name: str
    calls: int
    self_us: float


def profile_ops(fn, *, device: torch.device | str, top: int = 8, repeat: int = 3) -> list[OpRow]:
    """The ``top`` ops by self time (device time on CUDA) while ``fn()`` runs ``repeat`` times,
    after one unprofiled call (compilation, mask building)."""
    from torch.profiler import ProfilerActivity, profile

    quiet_profiler_logs()
    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    fn()
    with profile(activities=activities) as prof:
        for _ in range(repeat):
            fn()
        if on_cuda:
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if self_us > 0:
            rows.append(OpRow(event.key, event.count // repeat, self_us / repeat))
    return sorted(rows, key=lambda row: row.self_us, reverse=True)[:top]
