"""FlashAttention-2 forward and backward over a block table (docs/design.md#triton-implementation).

Forward: one program per ``block_m`` query rows of one head walks the visible key tiles of its
row in the :class:`~attention.block_table.BlockTable`, with an online softmax in fp32 (scores in
base 2, ``exp2``), and saves the log-sum-exp for the backward. Partial tiles load their stored
visibility bits; full tiles need none; empty tiles are never visited. A key/value head serves
its whole group of query heads in place (GQA without repeating K and V).

Backward: ``dQ`` by one program per query tile (the forward's walk), ``dK``/``dV`` by one program
per key tile of one KV head, walking the table's columns for every query head of its group, so
the group's contributions are summed in registers, without atomics.

A query row that sees no key gets a zero output, a log-sum-exp of ``+inf`` (so the backward's
probabilities ``exp2(s - lse)`` are exactly zero there) and zero gradients.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from ..block_table import BlockTable
from .launch import Blocks, Kernel, dot_precision, padded_head_dim

LOG2E = 1.4426950408889634


def _fwd(
    Q, K, V, Out, LSE,
    KV_COUNT, KV_BLOCKS, KV_TILES, TILES,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    tb_b, tb_h, tb_q,  # strides of the table's (Bm, Hm, NQ) counts; 0 where it ignores b or h
    H, G, q_len, kv_len, qk_scale,
    NK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < q_len
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    entry = b * tb_b + h * tb_h + qb * tb_q
    count = tl.load(KV_COUNT + entry)
    tile_rows = tl.arange(0, BLOCK_M)
    tile_cols = tl.arange(0, BLOCK_N)
    for i in range(count):
        kb = tl.load(KV_BLOCKS + entry * NK + i)
        tile = tl.load(KV_TILES + entry * NK + i)
        cols = kb * BLOCK_N + tile_cols  # (BLOCK_N,)
        col_ok = cols < kv_len
        k_t = tl.load(
            K + b * skb + hk * skh + cols[None, :] * skt + dims[:, None] * skd,
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        v = tl.load(
            V + b * svb + hk * svh + cols[:, None] * svt + dims[None, :] * svd,
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 units
        seen = tl.load(
            TILES + tile * (BLOCK_M * BLOCK_N) + tile_rows[:, None] * BLOCK_N + tile_cols[None, :],
            mask=tl.full((BLOCK_M, BLOCK_N), 0, tl.int32) + tile >= 0,  # a block: the interpreter mistypes scalars
            other=1,
        )  # (BLOCK_M, BLOCK_N): the partial tile's bits, all ones for a full tile
        s = tl.where(seen != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        p = tl.math.exp2(s - m_use[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]  # (BLOCK_M, BLOCK_D)
    tl.store(
        Out + b * sob + h * soh + rows[:, None] * sot + dims[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * q_len + rows, lse, mask=row_ok)


def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    KV_COUNT, KV_BLOCKS, KV_TILES, TILES,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    sdb, sdh, sdt, sdd,  # strides of DQ
    tb_b, tb_h, tb_q,
    H, G, q_len, kv_len, qk_scale, sm_scale,
    NK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # so* are dO's strides.
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * sob + h * soh + rows[:, None] * sot + dims[None, :] * sod, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * q_len + rows, mask=row_ok, other=float("inf"))  # (BLOCK_M,)
    delta = tl.load(DELTA + bh * q_len + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    entry = b * tb_b + h * tb_h + qb * tb_q
    count = tl.load(KV_COUNT + entry)
    tile_rows = tl.arange(0, BLOCK_M)
    tile_cols = tl.arange(0, BLOCK_N)
    for i in range(count):
        kb = tl.load(KV_BLOCKS + entry * NK + i)
        tile = tl.load(KV_TILES + entry * NK + i)
        cols = kb * BLOCK_N + tile_cols
        col_ok = cols < kv_len
        k_t = tl.load(
            K + b * skb + hk * skh + cols[None, :] * skt + dims[:, None] * skd,
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        v_t = tl.load(
            V + b * svb + hk * svh + cols[None, :] * svt + dims[:, None] * svd,
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
        dp = tl.dot(do, v_t, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        seen = tl.load(
            TILES + tile * (BLOCK_M * BLOCK_N) + tile_rows[:, None] * BLOCK_N + tile_cols[None, :],
            mask=tl.full((BLOCK_M, BLOCK_N), 0, tl.int32) + tile >= 0,  # a block: the interpreter mistypes scalars
            other=1,
        )
        s = tl.where(seen != 0, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N): exactly 0 where unseen
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdb + h * sdh + rows[:, None] * sdt + dims[None, :] * sdd, dq.to(DQ.dtype.element_ty), mask=q_mask
    )


def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_COUNT, Q_BLOCKS, Q_TILES, TILES,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    dkb, dkh, dkt, dkd, dvb, dvh, dvt, dvd,  # strides of DK and DV
    tb_b, tb_h, tb_k,  # strides of the table's (Bm, Hm, NK) counts
    H, H_KV, G, q_len, kv_len, qk_scale, sm_scale,
    NQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # so* are dO's strides.
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk % H_KV
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < kv_len
    dim_ok = dims < HEAD_DIM
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skt + dims[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svt + dims[None, :] * svd, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    sub = tl.arange(0, SUB_M)  # (SUB_M,)
    tile_cols = tl.arange(0, BLOCK_N)
    for g in range(G):
        h = hk * G + g
        entry = b * tb_b + h * tb_h + kb * tb_k
        count = tl.load(Q_COUNT + entry)
        for i in range(count):
            qb = tl.load(Q_BLOCKS + entry * NQ + i)
            tile = tl.load(Q_TILES + entry * NQ + i)
            for r0 in range(0, BLOCK_M, SUB_M):
                rows = qb * BLOCK_M + r0 + sub  # (SUB_M,)
                row_ok = rows < q_len
                q_mask = row_ok[:, None] & dim_ok[None, :]
                q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd, mask=q_mask, other=0.0)
                do = tl.load(
                    DO + b * sob + h * soh + rows[:, None] * sot + dims[None, :] * sod, mask=q_mask, other=0.0
                )  # (SUB_M, BLOCK_D)
                lse = tl.load(LSE + (b * H + h) * q_len + rows, mask=row_ok, other=float("inf"))
                delta = tl.load(DELTA + (b * H + h) * q_len + rows, mask=row_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, SUB_M)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, SUB_M)
                seen = tl.load(
                    TILES + tile * (BLOCK_M * BLOCK_N) + (r0 + sub)[None, :] * BLOCK_N + tile_cols[:, None],
                    mask=tl.full((BLOCK_N, SUB_M), 0, tl.int32) + tile >= 0,
                    other=1,
                )  # (BLOCK_N, SUB_M)
                s_t = tl.where(seen != 0, s_t, float("-inf"))
                p_t = tl.math.exp2(s_t - lse[None, :])  # exactly 0 where unseen
                ds_t = p_t * (dp_t - delta[None, :])
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(
        DK + b * dkb + hk * dkh + cols[:, None] * dkt + dims[None, :] * dkd, dk.to(DK.dtype.element_ty), mask=kv_mask
    )
    tl.store(
        DV + b * dvb + hk * dvh + cols[:, None] * dvt + dims[None, :] * dvd, dv.to(DV.dtype.element_ty), mask=kv_mask
    )


FWD = Kernel(_fwd)
BWD_DQ = Kernel(_bwd_dq)
BWD_DKDV = Kernel(_bwd_dkdv)


def _table_strides(counts: Tensor) -> tuple[int, int, int]:
    """Strides of a ``(Bm, Hm, N)`` count tensor over ``(b, h, n)``, 0 where it has one entry."""
    bm, hm, _ = counts.shape
    s = counts.stride()
    return (s[0] if bm > 1 else 0, s[1] if hm > 1 else 0, s[2])


def _common(q: Tensor, k: Tensor, v: Tensor, blocks: Blocks) -> dict:
    return dict(
        HEAD_DIM=q.shape[3],
        BLOCK_D=padded_head_dim(q.shape[3]),
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        PRECISION=dot_precision(q.dtype),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )


def forward(q: Tensor, k: Tensor, v: Tensor, table: BlockTable, scale: float, blocks: Blocks) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: ``q`` ``(B, H, Tq, hd)``, ``k, v`` ``(B, H_kv, Tk, hd)`` -> ``(B, H, Tq, hd)``
    and the base-2 log-sum-exp ``(B, H, Tq)`` fp32."""
    b, h, tq, _ = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)  # (B, H, Tq, hd)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)  # (B, H, Tq)
    grid = (table.kv_count.shape[2], b * h)
    FWD.on(q.device)[grid](
        q, k, v, out, lse,
        table.kv_count, table.kv_blocks, table.kv_tiles, table.tiles,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_table_strides(table.kv_count),
        h, h // h_kv, tq, tk, scale * LOG2E,
        NK=table.kv_blocks.shape[3],
        **_common(q, k, v, blocks),
    )  # fmt: skip
    return out, lse


def backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    table: BlockTable,
    scale: float,
    blocks: Blocks,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` shaped like ``q, k, v``."""
    b, h, tq, _ = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    delta = (out.float() * grad_out.float()).sum(-1)  # (B, H, Tq): rowsum(dO * O)
    dq = torch.empty_like(q)  # (B, H, Tq, hd)
    dk = torch.empty_like(k)  # (B, H_kv, Tk, hd)
    dv = torch.empty_like(v)  # (B, H_kv, Tk, hd)
    common = _common(q, k, v, blocks)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    BWD_DQ.on(q.device)[(table.kv_count.shape[2], b * h)](
        q, k, v, grad_out, lse, delta, dq,
        table.kv_count, table.kv_blocks, table.kv_tiles, table.tiles,
        *strides, *dq.stride(), *_table_strides(table.kv_count),
        h, h // h_kv, tq, tk, scale * LOG2E, scale,
        NK=table.kv_blocks.shape[3], **common,
    )  # fmt: skip
    BWD_DKDV.on(q.device)[(table.q_count.shape[2], b * h_kv)](
        q, k, v, grad_out, lse, delta, dk, dv,
        table.q_count, table.q_blocks, table.q_tiles, table.tiles,
        *strides, *dk.stride(), *dv.stride(), *_table_strides(table.q_count),
        h, h_kv, h // h_kv, tq, tk, scale * LOG2E, scale,
        NQ=table.q_blocks.shape[3], SUB_M=blocks.sub_m, **common,
    )  # fmt: skip
    return dq, dk, dv


class PrefillAttention(torch.autograd.Function):
    """Differentiable block-sparse attention: ``apply(q, k, v, table, scale, blocks)``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, table: BlockTable, scale: float, blocks: Blocks) -> Tensor:
        out, lse = forward(q, k, v, table, scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.table, ctx.scale, ctx.blocks = table, scale, blocks
        return out  # (B, H, Tq, hd)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, ctx.table, ctx.scale, ctx.blocks)
        return dq, dk, dv, None, None, None


def attend(q: Tensor, k: Tensor, v: Tensor, table: BlockTable, scale: float, blocks: Blocks) -> Tensor:
    """Block-sparse attention, differentiable when any input requires grad."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return PrefillAttention.apply(q, k, v, table, scale, blocks)
    return forward(q, k, v, table, scale, blocks)[0]
