"""Device functions the kernels share: masked tile loads and the online-softmax step.

``@triton.jit`` helpers are inlined into each kernel when it compiles; on CPU tensors the
interpreter runs them (see :mod:`.launch`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..block_table import EMPTY_TILE


@triton.jit
def head_dims(head_dim, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, D_ALIGN: tl.constexpr):
    """The tile's head-dim indices ``(BLOCK_D,)`` and which of them are real: every one when the
    head dim fills the tile (``EVEN_D``: a constant mask, which the compiler drops), else those
    below ``head_dim``. ``D_ALIGN`` divides the head dim, so ``head_dim // D_ALIGN * D_ALIGN`` is
    the head dim itself, written so the compiler knows the mask is constant over runs of
    ``D_ALIGN`` and loads them as wide vectors (a bare runtime bound made every load 2 bytes wide
    and dropped the K/V pipeline at head dims 80 and 96)."""
    dims = tl.arange(0, BLOCK_D)
    bound = head_dim // D_ALIGN * D_ALIGN
    if EVEN_D:
        bound = BLOCK_D
    return dims, dims < bound


@triton.jit
def load_rows(base, idx, idx_ok, stride_idx, dims, dim_ok, stride_d):
    """A ``(len(idx), BLOCK_D)`` tile: row ``i`` at ``base + idx[i] * stride_idx``, zeros out of bounds."""
    return tl.load(
        base + idx[:, None] * stride_idx + dims[None, :] * stride_d, mask=idx_ok[:, None] & dim_ok[None, :], other=0.0
    )


@triton.jit
def load_columns(base, idx, idx_ok, stride_idx, dims, dim_ok, stride_d):
    """The same rows laid out as columns, ``(BLOCK_D, len(idx))``: the right operand of ``q @ kᵀ``."""
    return tl.load(
        base + idx[None, :] * stride_idx + dims[:, None] * stride_d, mask=idx_ok[None, :] & dim_ok[:, None], other=0.0
    )


@triton.jit
def load_box(desc, seq, head, start, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``start .. start + ROWS`` of one head of one sequence, ``(ROWS, BLOCK_D)``, through the
    tensor descriptor ``desc`` of a ``(B, H, T, hd)`` tensor: zeros past the sequence and the head dim."""
    return desc.load([seq, head, start, 0]).reshape(ROWS, BLOCK_D)


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """Fold one tile of raw scores ``s`` (rows x keys, ``-inf`` where unseen) and its values into
    the running max ``m_i`` (base-2 units: ``s * qk_scale``), denominator ``l_i`` and
    unnormalised sum ``acc``. The scale rides in the exponent's fused multiply-add, not in a
    pass of its own over the tile (a positive scale keeps the max where it was)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
    p = tl.math.exp2(s * qk_scale - m_use[:, None])  # (rows, keys)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    # The rescaled sum is the dot's accumulator, not added after it: a separate add writes the
    # accumulator's registers between tensor-core steps, which ptxas then serializes (C7515).
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def programmatic_handoff(PDL: tl.constexpr):
    """For a kernel launched as a programmatic dependent (``launch_pdl``, when ``PDL``): wait until
    the kernel ahead of it in the stream has finished and its writes are visible, then release the
    next kernel to start launching. Called first, before any load: nothing is read early."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


EMPTY = tl.constexpr(EMPTY_TILE)  # a global a kernel reads must be a constexpr


@triton.jit
def mask_tile(s, TILES, tile, offsets, TILE_SIZE: tl.constexpr):
    """Scores ``s`` of block-table tile ``tile``, ``-inf`` where the pattern hides the key: a
    partial tile's stored bits, everything for an empty one, nothing for a full one. ``offsets``
    (shaped like ``s``): each score's place among the tile's ``TILE_SIZE`` stored bits."""
    tile_block = offsets * 0 + tile  # a block: the interpreter mistypes scalars
    bits = tl.load(TILES + tile * TILE_SIZE + offsets, mask=tile_block >= 0, other=1)
    return tl.where((bits != 0) & (tile_block != EMPTY), s, float("-inf"))
