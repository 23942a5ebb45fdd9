"""Split-KV decoding: a few new query tokens against a long KV cache (docs/design.md#triton-decode).

Decoding reads the whole cache to produce a handful of rows, so its speed is how fast the cache
streams from memory. One program takes one KV head of one sequence and one slice ("split") of the
keys: every query head of the GQA group and every query token is a row of one tile, so each key
and value byte is read once for the whole group. The splits fill the GPU with one wave of
programs, each streaming a long slice in large steps; a second small kernel merges the splits'
partial sums, rescaled by their running maxima. Where one split covers the keys (short caches,
many sequences, the CPU interpreter) it normalises and writes the output itself: one launch.

Lengths and offsets are not specialised on, so a growing cache never recompiles.

On NVIDIA Hopper and later both kernels are launched as programmatic dependents: each may start while
the kernel ahead of it in the stream (the split before its merge, a layer's merge before the next
layer's split) is finishing, waits for it before reading anything, and at once lets the kernel
after it start the same way, so a decode step's launch gaps overlap the work around them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import checks
from ..device_info import multiprocessors, shared_bytes_per_sm, supports_programmatic_launch
from .launch import Kernel, check_scale, dot_precision, head_dim_args
from .prefill import LOG2E
from .tiles import head_dims, load_columns, load_rows, programmatic_handoff, softmax_step

#: Visibility inside the kernel: every cached key, causal (query ``t`` sees keys up to
#: ``q_offset + t``), or a dense ``(B|1, H|1, Tq, Tk)`` bool mask.
ALL, CAUSAL, DENSE = 0, 1, 2
#: The fewest keys a split is given (shorter splits cost more to merge than they gain).
MIN_SPLIT_KEYS = 256
#: The most split programs counted per SM: shared memory is what :func:`tiles` measures, and
#: at small head dims registers run out first (64K per SM; a 4-warp program of up to 128 per
#: thread takes 16K).
MAX_PROGRAMS_PER_SM = 4
#: Splits the merge reads per step.
MERGE_SPLITS = 16


@dataclass(frozen=True)
class Tiles:
    """Keys per inner step, K/V tiles in flight, and the programs of that size one SM holds."""

    block_n: int
    num_stages: int
    per_sm: int


def _split(
    Q, K, V, PART_O, PART_M, PART_L, MASK, Out,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
    smb, smh, smt, smk,  # the dense mask's strides, 0 along dims it ignores
    sob, soh, sot, sod,
    H_KV, G, q_len, kv_len, q_offset, split_len, n_splits, qk_scale,
    head_dim, EVEN_D: tl.constexpr, D_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VISIBLE: tl.constexpr, PRECISION: tl.constexpr, FINAL: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    programmatic_handoff(PDL)
    bhk = tl.program_id(0)
    split = tl.program_id(1)
    b = (bhk // H_KV).to(tl.int64)  # b * (batch stride) can pass 2**31 elements
    hk = bhk % H_KV
    r = tl.arange(0, BLOCK_M)  # rows: query head g of the group, token t
    g = r // q_len
    t = r % q_len
    h = hk * G + g  # (BLOCK_M,)
    row_ok = r < G * q_len
    dims, dim_ok = head_dims(head_dim, BLOCK_D, EVEN_D, D_ALIGN)  # (BLOCK_D,) each
    q = tl.load(
        Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + dims[None, :] * sqd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < end
        k_t = load_columns(K + b * skb + hk * skh, cols, col_ok, skt, dims, dim_ok, skd)  # (BLOCK_D, BLOCK_N)
        v = load_rows(V + b * svb + hk * svh, cols, col_ok, svt, dims, dim_ok, svd)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, k_t, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        seen = col_ok[None, :] & row_ok[:, None]  # (BLOCK_M, BLOCK_N)
        if VISIBLE == 1:
            seen = seen & (cols[None, :] <= (q_offset + t)[:, None])
        if VISIBLE == 2:
            bits = tl.load(
                MASK + b * smb + h[:, None] * smh + t[:, None] * smt + cols[None, :] * smk, mask=seen, other=0
            )
            seen = seen & (bits != 0)
        s = tl.where(seen, s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, qk_scale, PRECISION)
    if FINAL:  # the only split: normalise here, no merge launch (a row that saw nothing is zero)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # (BLOCK_M, BLOCK_D)
        o_ptr = Out + b * sob + h[:, None] * soh + t[:, None] * sot + dims[None, :] * sod
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        # The split's unnormalised sum, running max and denominator: the merge rescales them by
        # exp2(max - overall max), the way one pass over all keys would, with no log2/exp2 round
        # trip of a log-sum-exp (its approximate log2 cost fp32 outputs several ulps).
        part = ((b * H_KV + hk) * G * q_len + r) * n_splits + split  # rows (b, h, t) in order, then splits
        tl.store(PART_O + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(PART_M + part, m_i, mask=row_ok)  # -inf: the split saw no key, weight 0 in the merge
        tl.store(PART_L + part, l_i, mask=row_ok)


def _merge(
    PART_O, PART_M, PART_L, Out,
    sob, soh, sot, sod,
    H, q_len, n_splits,
    head_dim, EVEN_D: tl.constexpr, D_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # Splits are read BLOCK_S at a time with a running max, so the split count is a runtime value
    # (no recompile as a cache grows) and a long cache's hundreds of splits never make one tile.
    programmatic_handoff(PDL)
    row = tl.program_id(0)  # (b, h, t) flattened
    b = row // (H * q_len)
    h = (row // q_len) % H
    t = row % q_len
    dims, dim_ok = head_dims(head_dim, BLOCK_D, EVEN_D, D_ALIGN)  # (BLOCK_D,) each
    m_run = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), 0)
    l_run = tl.sum(tl.zeros((BLOCK_S,), tl.float32), 0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        split_ok = splits < n_splits
        m = tl.load(PART_M + row * n_splits + splits, mask=split_ok, other=float("-inf"))  # (BLOCK_S,)
        l_s = tl.load(PART_L + row * n_splits + splits, mask=split_ok, other=0.0)  # (BLOCK_S,)
        part = tl.load(
            PART_O + (row * n_splits + splits[:, None]) * BLOCK_D + dims[None, :], mask=split_ok[:, None], other=0.0
        )  # (BLOCK_S, BLOCK_D)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split seen so far saw a key
        w = tl.math.exp2(m - m_use)  # (BLOCK_S,): 0 for a split that saw nothing
        rescale = tl.math.exp2(m_run - m_use)
        l_run = l_run * rescale + tl.sum(w * l_s, 0)
        acc = acc * rescale + tl.sum(part * w[:, None], 0)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)  # (BLOCK_D,): a row that saw nothing is zero
    tl.store(Out + b * sob + h * soh + t * sot + dims * sod, out.to(Out.dtype.element_ty), mask=dim_ok)


SPLIT = Kernel(_split, do_not_specialize=("q_len", "kv_len", "q_offset", "split_len", "n_splits", "head_dim"))
MERGE = Kernel(_merge, do_not_specialize=("q_len", "n_splits", "head_dim"))


def _shape(mask: Tensor | None) -> object:
    return None if mask is None else tuple(mask.shape)


def tiles(dtype: torch.dtype, block_m: int, block_d: int, shared_bytes_per_sm: int | None) -> Tiles:
    """The split kernel's steps (docs/design.md#triton-decode). Up to 16 tile rows of 16-bit
    inputs: 128 keys a step, 3 in flight (196 KB of shared memory with the queries at head dim
    128: one program per SM, with 128 KB of loads in flight); more rows: 64 keys (a 128-key score
    tile would spill registers); fp32: 64 keys, 2 in flight (its tiles are twice the bytes).
    ``per_sm``: the programs whose tiles fit the SM's shared memory, at most
    :data:`MAX_PROGRAMS_PER_SM`; 1 where the device does not say."""
    elt = dtype.itemsize
    block_n, stages = (128, 3) if elt == 2 and block_m <= 16 else (64, 3 if elt == 2 else 2)
    shared = (stages * 2 * block_n + block_m) * block_d * elt  # K and V tiles in flight, the queries
    return Tiles(block_n, stages, min(MAX_PROGRAMS_PER_SM, max(1, (shared_bytes_per_sm or 0) // shared)))


#: Interpreted (CPU): short steps, so a small cache spans several steps and splits (each step
#: costs the interpreter about the same at any size: docs/design.md#triton-configs).
INTERPRETED_TILES = Tiles(16, 1, 1)


def step_tiles(dtype: torch.dtype, block_m: int, block_d: int, device: torch.device) -> Tiles:
    """The split kernel's steps on ``device``: :func:`tiles` for its SMs' shared memory on CUDA,
    :data:`INTERPRETED_TILES` interpreted (each step costs the interpreter the same at any size)."""
    if device.type != "cuda":
        return INTERPRETED_TILES
    return tiles(dtype, block_m, block_d, shared_bytes_per_sm(device))


def block_rows(group: int, q_len: int) -> int:
    """Tile rows of a split program: every query head of a KV head's group times the query
    tokens, padded to a power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(group * q_len))


def num_splits(batch: int, kv_heads: int, kv_len: int, slots: int) -> int:
    """How many slices the keys of each (sequence, KV head) are cut into: as many as run in one
    wave of ``slots`` programs (SMs x programs per SM), at least one, none shorter than
    :data:`MIN_SPLIT_KEYS` keys. On an H200, one wave of long splits beat more and shorter ones
    (a second wave, or a tail of one, cost more than a few idle slots: docs/design.md#triton-decode)."""
    return max(1, min(slots // (batch * kv_heads), -(-kv_len // MIN_SPLIT_KEYS)))


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    *,
    q_offset: int,
    visible: int,
    mask: Tensor | None = None,
    splits: int | None = None,
) -> Tensor:
    """``q`` ``(B, H, Tq, hd)`` against ``k, v`` ``(B, H_kv, Tk, hd)`` -> ``(B, H, Tq, hd)``; no autograd.

    ``visible`` is :data:`ALL`, :data:`CAUSAL` or :data:`DENSE` (then ``mask`` broadcasts to
    ``(B, H, Tq, Tk)``). ``splits``: at most this many slices of the keys per sequence and KV
    head (fewer where whole steps cover the keys sooner), by default :func:`num_splits` for this
    device (one on CPU, where programs run one after another)."""
    check_scale(scale)
    if splits is not None:
        checks.integer("splits", splits)
    if visible == DENSE and (mask is None or mask.dim() != 4):
        raise ValueError(f"visible=DENSE needs a mask broadcastable to (B, H, Tq, Tk), got {_shape(mask)}")
    b, h, tq, hd = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    if tq == 0 or tk == 0:
        raise ValueError(f"decoding needs at least one query and one key, got {tq} and {tk}")
    dim_args = head_dim_args(hd)
    block_d = dim_args["BLOCK_D"]
    block_m = block_rows(h // h_kv, tq)
    step = step_tiles(q.dtype, block_m, block_d, q.device)
    if splits is None:
        splits = num_splits(b, h_kv, tk, multiprocessors(q.device) * step.per_sm)
    split_len = triton.cdiv(triton.cdiv(tk, splits), step.block_n) * step.block_n  # keys per split, whole steps
    splits = triton.cdiv(tk, split_len)
    out = torch.empty_like(q)  # (B, H, Tq, hd)
    final = splits == 1  # one split writes the output itself: one launch, no partial sums
    pdl = supports_programmatic_launch(q.device)
    launch: dict[str, bool] = {"launch_pdl": True} if pdl else {}  # only where supported: the interpreter refuses it
    if final:
        part_o = part_m = part_l = out  # never read or written
    else:
        part_o = torch.empty(b * h * tq * splits, block_d, device=q.device, dtype=torch.float32)  # (rows x splits, hd')
        part_m = torch.empty(b * h * tq * splits, device=q.device, dtype=torch.float32)  # (rows x splits,)
        part_l = torch.empty_like(part_m)  # (rows x splits,)
    mask_strides: tuple[int, ...]
    if mask is None or visible != DENSE:
        mask, mask_strides = q, (0, 0, 0, 0)  # never read
    else:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask_strides = tuple(st if n > 1 else 0 for st, n in zip(mask.stride(), mask.shape, strict=True))
    SPLIT.on(q.device)[(b * h_kv, splits)](
        q, k, v, part_o, part_m, part_l, mask, out,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        h_kv, h // h_kv, tq, tk, q_offset, split_len, splits, scale * LOG2E,
        **dim_args, BLOCK_M=block_m, BLOCK_N=step.block_n,
        VISIBLE=visible, PRECISION=dot_precision(q.dtype), FINAL=final, PDL=pdl,
        num_warps=4, num_stages=step.num_stages, **launch,
    )  # fmt: skip
    if final:
        return out
    MERGE.on(q.device)[(b * h * tq,)](
        part_o, part_m, part_l, out, *out.stride(), h, tq, splits,
        **dim_args, BLOCK_S=MERGE_SPLITS, PDL=pdl, num_warps=4, **launch,
    )  # fmt: skip
    return out
