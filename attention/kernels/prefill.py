"""FlashAttention-2 forward and backward over a block table (docs/design.md#triton-implementation).

Forward: one program per ``block_m`` query rows of one head walks its row's range of key tiles
in the :class:`~attention.block_table.BlockTable` (first to last visible), with an online softmax
in fp32 (scores in base 2, ``exp2``), and saves the log-sum-exp for the backward. The walk is
three loops: the row's longest run of full tiles in a loop of its own that neither reads the
table nor masks (for causal attention, everything left of the diagonal), and the tiles before
and after it, each looked up and masked (a partial tile loads its stored visibility bits). Tiles
outside the range are never visited. A key/value head serves its whole group of query heads in
place (GQA without repeating K and V).

Backward: ``rowsum(dO * O)`` by a small kernel of its own, ``dQ`` by one program per query tile
(the forward's walk), ``dK``/``dV`` by one program per key tile of one KV head, walking the
columns of a table cut to its own tiles (for 16-bit inputs on a GPU, twice the forward's keys
per program) the same three ways for every query head of its group, so the group's
contributions are summed in registers, without atomics.

With ``Blocks.tma`` every kernel but the row-sum one reads Q, K, V and dO through tensor
descriptors instead of masked pointer loads, over the same walk (docs/design.md#triton-tma-forward).

A query row that sees no key gets a zero output, a log-sum-exp of ``+inf`` (so the backward's
probabilities ``exp2(s - lse)`` are exactly zero there) and zero gradients.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from ..block_table import BlockTable
from .launch import Blocks, Kernel, check_scale, dot_precision, head_dim_args, padded_head_dim, tma_fits
from .tiles import head_dims, load_box, load_columns, load_rows, mask_tile, softmax_step

LOG2E = 1.4426950408889634


def _fwd(
    Q, K, V, Out, LSE,
    KV_RANGE, KV_FULL, TILE_IDS, TILES,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    rb, rh, rq,  # strides of the table's (Bm, Hm, NQ) ranges and full runs; 0 where it ignores b or h
    ib, ih, iq, ik,  # strides of its (Bm, Hm, NQ, NK) tile ids; 0 where it ignores b or h
    H, G, q_len, kv_len, qk_scale,
    head_dim, EVEN_D: tl.constexpr, D_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FULL_RUN: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    # With TMA, Q, K and V are tensor descriptors of (B, H, T, hd) tensors read one
    # [1, 1, rows, BLOCK_D] box at a time, zero past the sequence and the head dim, and their
    # stride arguments are unused. Their programs take the causal triangle's longest rows first, so
    # the short ones fill the last wave (docs/design.md#triton-tma-forward).
    qb = tl.num_programs(0) - 1 - tl.program_id(0) if TMA else tl.program_id(0)
    bh = tl.program_id(1)
    seq = bh // H  # a descriptor's coordinate (int32)
    b = seq.to(tl.int64)  # b * (batch stride) can pass 2**31 elements
    h = bh % H
    hk = h // G
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims, dim_ok = head_dims(head_dim, BLOCK_D, EVEN_D, D_ALIGN)  # (BLOCK_D,) each
    row_ok = rows < q_len
    if TMA:
        q = load_box(Q, seq, h, qb * BLOCK_M, BLOCK_M, BLOCK_D)
    else:
        q = load_rows(Q + b * sqb + h * sqh, rows, row_ok, sqt, dims, dim_ok, sqd)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row = b * rb + h * rh + qb * rq
    lo, hi = tl.load(KV_RANGE + row), tl.load(KV_RANGE + row + 1)
    full_lo, full_hi = tl.load(KV_FULL + row), tl.load(KV_FULL + row + 1)
    ids = TILE_IDS + b * ib + h * ih + qb * iq
    in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (BLOCK_M, BLOCK_N)
    if not TMA:
        k_head, v_head = K + b * skb + hk * skh, V + b * svb + hk * svh
    for part in tl.static_range(3):  # the tiles before the full run, the run, the tiles after it
        if FULL_RUN or part == 0:  # without the run's loop: one masked walk of the whole range
            start = lo if part == 0 else (full_lo if part == 1 else full_hi)
            stop = (full_lo if FULL_RUN else hi) if part == 0 else (full_hi if part == 1 else hi)
            for kb in range(start, stop):
                if TMA:
                    k_t = tl.trans(load_box(K, seq, hk, kb * BLOCK_N, BLOCK_N, BLOCK_D))
                    v = load_box(V, seq, hk, kb * BLOCK_N, BLOCK_N, BLOCK_D)
                else:
                    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
                    col_ok = cols < kv_len
                    k_t = load_columns(k_head, cols, col_ok, skt, dims, dim_ok, skd)  # (BLOCK_D, BLOCK_N)
                    v = load_rows(v_head, cols, col_ok, svt, dims, dim_ok, svd)  # (BLOCK_N, BLOCK_D)
                s = tl.dot(q, k_t, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
                if part != 1:  # the run's tiles are full: no lookup, nothing to hide
                    s = mask_tile(s, TILES, tl.load(ids + kb * ik), in_tile, BLOCK_M * BLOCK_N)
                m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, qk_scale, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]  # (BLOCK_M, BLOCK_D)
    tl.store(
        Out + b * sob + h * soh + rows[:, None] * sot + dims[None, :] * sod,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * q_len + rows, lse, mask=row_ok)


def _bwd_delta(
    Out, DO, DELTA,
    sob, soh, sot, sod, sgb, sgh, sgt, sgd,  # strides of Out and dO
    H, q_len,
    head_dim, EVEN_D: tl.constexpr, D_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # rowsum(dO * O) in fp32 from the 16-bit tensors as they are: in torch it made two fp32 copies
    # of both, which took a tenth of the backward at 4k tokens (docs/design.md#triton-configs).
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # b * (batch stride) can pass 2**31 elements
    h = bh % H
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    dims, dim_ok = head_dims(head_dim, BLOCK_D, EVEN_D, D_ALIGN)  # (BLOCK_D,) each
    row_ok = rows < q_len
    o = load_rows(Out + b * sob + h * soh, rows, row_ok, sot, dims, dim_ok, sod)  # (BLOCK_M, BLOCK_D)
    do = load_rows(DO + b * sgb + h * sgh, rows, row_ok, sgt, dims, dim_ok, sgd)  # (BLOCK_M, BLOCK_D)
    tl.store(DELTA + bh * q_len + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


def _bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    KV_RANGE, KV_FULL, TILE_IDS, TILES,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    sdb, sdh, sdt, sdd,  # strides of DQ
    rb, rh, rq, ib, ih, iq, ik,
    H, G, q_len, kv_len, qk_scale, sm_scale,
    head_dim, EVEN_D: tl.constexpr, D_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, FULL_RUN: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    # so* are dO's strides. With TMA, Q, K, V and DO are tensor descriptors, as in the forward,
    # and the longest rows go first.
    qb = tl.num_programs(0) - 1 - tl.program_id(0) if TMA else tl.program_id(0)
    bh = tl.program_id(1)
    seq = bh // H  # a descriptor's coordinate (int32)
    b = seq.to(tl.int64)  # b * (batch stride) can pass 2**31 elements
    h = bh % H
    hk = h // G
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dims, dim_ok = head_dims(head_dim, BLOCK_D, EVEN_D, D_ALIGN)  # (BLOCK_D,) each
    row_ok = rows < q_len
    q_mask = row_ok[:, None] & dim_ok[None, :]
    if TMA:
        q = load_box(Q, seq, h, qb * BLOCK_M, BLOCK_M, BLOCK_D)
        do = load_box(DO, seq, h, qb * BLOCK_M, BLOCK_M, BLOCK_D)
    else:
        q = load_rows(Q + b * sqb + h * sqh, rows, row_ok, sqt, dims, dim_ok, sqd)  # (BLOCK_M, BLOCK_D)
        do = load_rows(DO + b * sob + h * soh, rows, row_ok, sot, dims, dim_ok, sod)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + bh * q_len + rows, mask=row_ok, other=float("inf"))  # (BLOCK_M,)
    delta = tl.load(DELTA + bh * q_len + rows, mask=row_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    row = b * rb + h * rh + qb * rq
    lo, hi = tl.load(KV_RANGE + row), tl.load(KV_RANGE + row + 1)
    full_lo, full_hi = tl.load(KV_FULL + row), tl.load(KV_FULL + row + 1)
    ids = TILE_IDS + b * ib + h * ih + qb * iq
    in_tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (BLOCK_M, BLOCK_N)
    if not TMA:
        k_head, v_head = K + b * skb + hk * skh, V + b * svb + hk * svh
    for part in tl.static_range(3):  # as the forward walks
        if FULL_RUN or part == 0:
            start = lo if part == 0 else (full_lo if part == 1 else full_hi)
            stop = (full_lo if FULL_RUN else hi) if part == 0 else (full_hi if part == 1 else hi)
            for kb in range(start, stop):
                if TMA:
                    k_t = tl.trans(load_box(K, seq, hk, kb * BLOCK_N, BLOCK_N, BLOCK_D))
                    v_t = tl.trans(load_box(V, seq, hk, kb * BLOCK_N, BLOCK_N, BLOCK_D))
                else:
                    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
                    col_ok = cols < kv_len
                    k_t = load_columns(k_head, cols, col_ok, skt, dims, dim_ok, skd)  # (BLOCK_D, BLOCK_N)
                    v_t = load_columns(v_head, cols, col_ok, svt, dims, dim_ok, svd)  # (BLOCK_D, BLOCK_N)
                s = tl.dot(q, k_t, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
                dp = tl.dot(do, v_t, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
                if part != 1:
                    s = mask_tile(s, TILES, tl.load(ids + kb * ik), in_tile, BLOCK_M * BLOCK_N)
                p = tl.math.exp2(s * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N): exactly 0 where unseen
                ds = p * (dp - delta[:, None])
                dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=PRECISION)  # accumulate in place
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdb + h * sdh + rows[:, None] * sdt + dims[None, :] * sdd, dq.to(DQ.dtype.element_ty), mask=q_mask
    )


def _bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_RANGE, Q_FULL, TILE_IDS, TILES,
    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
    dkb, dkh, dkt, dkd, dvb, dvh, dvt, dvd,  # strides of DK and DV
    rb, rh, rk,  # strides of the table's (Bm, Hm, NK) column ranges and full runs
    ib, ih, iq, ik,
    H, H_KV, G, q_len, kv_len, qk_scale, sm_scale,
    head_dim, EVEN_D: tl.constexpr, D_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, PRECISION: tl.constexpr,
    FULL_RUN: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    # so* are dO's strides. With TMA, Q, K, V and DO are tensor descriptors (Q's and DO's boxes
    # SUB_M rows), as in the forward.
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    seq = bhk // H_KV  # a descriptor's coordinate (int32)
    b = seq.to(tl.int64)  # b * (batch stride) can pass 2**31 elements
    hk = bhk % H_KV
    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    dims, dim_ok = head_dims(head_dim, BLOCK_D, EVEN_D, D_ALIGN)  # (BLOCK_D,) each
    col_ok = cols < kv_len
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    if TMA:
        k = load_box(K, seq, hk, kb * BLOCK_N, BLOCK_N, BLOCK_D)
        v = load_box(V, seq, hk, kb * BLOCK_N, BLOCK_N, BLOCK_D)
    else:
        k = load_rows(K + b * skb + hk * skh, cols, col_ok, skt, dims, dim_ok, skd)  # (BLOCK_N, BLOCK_D)
        v = load_rows(V + b * svb + hk * svh, cols, col_ok, svt, dims, dim_ok, svd)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    sub = tl.arange(0, SUB_M)  # (SUB_M,)
    tile_cols = tl.arange(0, BLOCK_N)
    for g in range(G):
        h = hk * G + g
        column = b * rb + h * rh + kb * rk
        lo, hi = tl.load(Q_RANGE + column), tl.load(Q_RANGE + column + 1)
        full_lo, full_hi = tl.load(Q_FULL + column), tl.load(Q_FULL + column + 1)
        ids = TILE_IDS + b * ib + h * ih + kb * ik
        if not TMA:
            q_head, do_head = Q + b * sqb + h * sqh, DO + b * sob + h * soh
        lse_head, delta_head = LSE + (b * H + h) * q_len, DELTA + (b * H + h) * q_len
        for part in tl.static_range(3):  # the forward's walk, down this tile column
            if FULL_RUN or part == 0:
                start = lo if part == 0 else (full_lo if part == 1 else full_hi)
                stop = (full_lo if FULL_RUN else hi) if part == 0 else (full_hi if part == 1 else hi)
                for qb in range(start, stop):
                    for r0 in range(0, BLOCK_M, SUB_M):
                        rows = qb * BLOCK_M + r0 + sub  # (SUB_M,)
                        row_ok = rows < q_len
                        if TMA:
                            q = load_box(Q, seq, h, qb * BLOCK_M + r0, SUB_M, BLOCK_D)
                            do = load_box(DO, seq, h, qb * BLOCK_M + r0, SUB_M, BLOCK_D)
                        else:
                            q = load_rows(q_head, rows, row_ok, sqt, dims, dim_ok, sqd)  # (SUB_M, BLOCK_D)
                            do = load_rows(do_head, rows, row_ok, sot, dims, dim_ok, sod)  # (SUB_M, BLOCK_D)
                        lse = tl.load(lse_head + rows, mask=row_ok, other=float("inf"))
                        delta = tl.load(delta_head + rows, mask=row_ok, other=0.0)
                        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, SUB_M)
                        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, SUB_M)
                        if part != 1:
                            in_tile = (r0 + sub)[None, :] * BLOCK_N + tile_cols[:, None]  # (BLOCK_N, SUB_M): transposed
                            s_t = mask_tile(s_t, TILES, tl.load(ids + qb * iq), in_tile, BLOCK_M * BLOCK_N)
                        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # exactly 0 where unseen
                        ds_t = p_t * (dp_t - delta[None, :])
                        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)  # accumulate in place
                        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(
        DK + b * dkb + hk * dkh + cols[:, None] * dkt + dims[None, :] * dkd, dk.to(DK.dtype.element_ty), mask=kv_mask
    )
    tl.store(
        DV + b * dvb + hk * dvh + cols[:, None] * dvt + dims[None, :] * dvd, dv.to(DV.dtype.element_ty), mask=kv_mask
    )


FWD = Kernel(_fwd, do_not_specialize=("head_dim",))
BWD_DELTA = Kernel(_bwd_delta, do_not_specialize=("head_dim",))
BWD_DQ = Kernel(_bwd_dq, do_not_specialize=("head_dim",))
BWD_DKDV = Kernel(_bwd_dkdv, do_not_specialize=("head_dim",))


def _table_strides(table: BlockTable, ranges: Tensor) -> tuple[int, ...]:
    """Strides of ``ranges`` over ``(b, h, row)`` and of the tile ids over ``(b, h, q tile, kv tile)``,
    0 along the batch or heads when the pattern ignores them."""
    bm, hm = table.tile_ids.shape[:2]
    r, i = ranges.stride(), table.tile_ids.stride()
    return (
        r[0] if bm > 1 else 0,
        r[1] if hm > 1 else 0,
        r[2],
        i[0] if bm > 1 else 0,
        i[1] if hm > 1 else 0,
        i[2],
        i[3],
    )


def _check_table(table: BlockTable, blocks: Blocks, q: Tensor, k: Tensor, name: str = "block table") -> None:
    """A table cut into other tiles than the kernels', for other lengths, batch or heads, or on
    another device, would be misread; ``name`` says which table in the error."""
    if (table.block_m, table.block_n) != (blocks.block_m, blocks.block_n):
        raise ValueError(
            f"{name} has {table.block_m}x{table.block_n} tiles, the kernels use {blocks.block_m}x{blocks.block_n}"
        )
    if (table.q_len, table.kv_len) != (q.shape[2], k.shape[2]) or table.tile_ids.device != q.device:
        raise ValueError(
            f"{name} is for {table.q_len} queries and {table.kv_len} keys on {table.tile_ids.device}, "
            f"got {q.shape[2]} and {k.shape[2]} on {q.device}"
        )
    bm, hm = table.tile_ids.shape[:2]
    if bm not in (1, q.shape[0]) or hm not in (1, q.shape[1]):
        raise ValueError(f"{name} is for batch {bm} and {hm} heads, got {q.shape[0]} and {q.shape[1]}")


def _common(q: Tensor, blocks: Blocks) -> dict:
    return dict(
        **head_dim_args(q.shape[3]),
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        PRECISION=dot_precision(q.dtype),
        FULL_RUN=blocks.full_run,
        TMA=blocks.tma,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )


def _inputs(blocks: Blocks, *tensors: tuple[Tensor, int]) -> tuple[Tensor | TensorDescriptor, ...]:
    """What a kernel reads each ``(B, H, T, hd)`` tensor through: the tensor itself, or with
    ``blocks.tma`` a tensor descriptor of it read the paired number of positions of one head at a
    time, the head dim padded to the kernels' tile with zeros."""
    if not blocks.tma:
        return tuple(t for t, _ in tensors)
    if not tma_fits(*(t for t, _ in tensors)):
        raise ValueError(
            "blocks ask for tensor-descriptor loads, which need non-empty tensors with a contiguous head dim "
            "of whole 16-byte rows and their start and other strides multiples of 16 bytes; got shapes "
            + ", ".join(f"{tuple(t.shape)} strides {t.stride()}" for t, _ in tensors)
            + f" of {tensors[0][0].dtype}"
        )
    return tuple(
        TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, padded_head_dim(t.shape[3])])
        for t, rows in tensors
    )


def forward(q: Tensor, k: Tensor, v: Tensor, table: BlockTable, scale: float, blocks: Blocks) -> tuple[Tensor, Tensor]:
    """``(out, lse)``: ``q`` ``(B, H, Tq, hd)``, ``k, v`` ``(B, H_kv, Tk, hd)`` -> ``(B, H, Tq, hd)``
    and the base-2 log-sum-exp ``(B, H, Tq)`` fp32. With ``blocks.tma`` the tiles are read
    through tensor descriptors, which ``q``, ``k`` and ``v`` must allow (:func:`.launch.tma_fits`;
    the backward copies an output gradient that does not)."""
    check_scale(scale)
    _check_table(table, blocks, q, k)
    b, h, tq, _ = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)  # (B, H, Tq, hd)
    lse = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)  # (B, H, Tq)
    grid = (table.kv_range.shape[2], b * h)
    FWD.on(q.device)[grid](
        *_inputs(blocks, (q, blocks.block_m), (k, blocks.block_n), (v, blocks.block_n)), out, lse,
        table.kv_range, table.kv_full, table.tile_ids, table.tiles,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_table_strides(table, table.kv_range),
        h, h // h_kv, tq, tk, scale * LOG2E,
        **_common(q, blocks),
    )  # fmt: skip
    return out, lse


#: Rows per program of the ``rowsum(dO * O)`` kernel.
DELTA_ROWS = 64


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
    key_table: BlockTable,
    key_blocks: Blocks,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` shaped like ``q, k, v``: dQ over the forward's ``table`` and ``blocks``,
    dK/dV over ``key_table``, cut to ``key_blocks``' tiles (both checked by :func:`attend`)."""
    b, h, tq, hd = q.shape
    h_kv, tk = k.shape[1], k.shape[2]
    if (blocks.tma or key_blocks.tma) and not tma_fits(grad_out):  # e.g. a broadcast gradient of a sum
        grad_out = grad_out.clone(memory_format=torch.contiguous_format)  # (B, H, Tq, hd)
    delta = torch.empty(b, h, tq, device=q.device, dtype=torch.float32)  # (B, H, Tq): rowsum(dO * O)
    BWD_DELTA.on(q.device)[(-(-tq // DELTA_ROWS), b * h)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, tq,
        **head_dim_args(hd), BLOCK_M=DELTA_ROWS, num_warps=4,
    )  # fmt: skip
    dq = torch.empty_like(q)  # (B, H, Tq, hd)
    dk = torch.empty_like(k)  # (B, H_kv, Tk, hd)
    dv = torch.empty_like(v)  # (B, H_kv, Tk, hd)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    BWD_DQ.on(q.device)[(table.kv_range.shape[2], b * h)](
        *_inputs(blocks, (q, blocks.block_m), (k, blocks.block_n), (v, blocks.block_n), (grad_out, blocks.block_m)),
        lse, delta, dq,
        table.kv_range, table.kv_full, table.tile_ids, table.tiles,
        *strides, *dq.stride(), *_table_strides(table, table.kv_range),
        h, h // h_kv, tq, tk, scale * LOG2E, scale,
        **_common(q, blocks),
    )  # fmt: skip
    sub = key_blocks.sub_m
    BWD_DKDV.on(q.device)[(key_table.q_range.shape[2], b * h_kv)](
        *_inputs(key_blocks, (q, sub), (k, key_blocks.block_n), (v, key_blocks.block_n), (grad_out, sub)),
        lse, delta, dk, dv,
        key_table.q_range, key_table.q_full, key_table.tile_ids, key_table.tiles,
        *strides, *dk.stride(), *dv.stride(), *_table_strides(key_table, key_table.q_range),
        h, h_kv, h // h_kv, tq, tk, scale * LOG2E, scale,
        SUB_M=sub, **_common(q, key_blocks),
    )  # fmt: skip
    return dq, dk, dv


class PrefillAttention(torch.autograd.Function):
    """Differentiable block-sparse attention: ``apply(q, k, v, table, scale, blocks, key_table, key_blocks)``."""

    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        table: BlockTable,
        scale: float,
        blocks: Blocks,
        key_table: BlockTable,
        key_blocks: Blocks,
    ) -> Tensor:
        out, lse = forward(q, k, v, table, scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = table, scale, blocks, key_table, key_blocks
        return out  # (B, H, Tq, hd)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, *ctx.plan)
        return dq, dk, dv, None, None, None, None, None


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    table: BlockTable,
    scale: float,
    blocks: Blocks,
    key_table: BlockTable | None = None,
    key_blocks: Blocks | None = None,
) -> Tensor:
    """Block-sparse attention, differentiable when any input requires grad. dK/dV walk
    ``key_table`` (the same pattern as ``table``, cut to ``key_blocks``' tiles), both given or
    neither (then the forward's)."""
    if (key_table is None) != (key_blocks is None):
        raise ValueError("give key_table and key_blocks together (dK/dV's table and its tiles), or neither")
    if key_table is not None and key_blocks is not None:  # checked now, not when the backward runs
        _check_table(key_table, key_blocks, q, k, "key_table")
        if key_table.q_offset != table.q_offset or key_table.tile_ids.shape[:2] != table.tile_ids.shape[:2]:
            raise ValueError(
                "key_table must be built from the forward table's pattern, query offset, batch and heads: "
                f"offset {key_table.q_offset} vs {table.q_offset}, "
                f"(batch, heads) {tuple(key_table.tile_ids.shape[:2])} vs {tuple(table.tile_ids.shape[:2])}"
            )
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if key_table is None:
            key_table, key_blocks = table, blocks
        return PrefillAttention.apply(q, k, v, table, scale, blocks, key_table, key_blocks)
    return forward(q, k, v, table, scale, blocks)[0]
