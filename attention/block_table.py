"""Which tiles of the score matrix a pattern shows: the block-sparse table the Triton kernels walk.

The score matrix of ``Tq`` queries and ``Tk`` keys is cut into ``block_m x block_n`` tiles. A
tile is *empty* (no query sees any of its keys: skipped), *full* (every query sees every key: no
mask work) or *partial* (its ``block_m x block_n`` visibility bits are stored and loaded by the
kernel). Tiles that overhang the matrix's edge are partial, their overhang invisible. This is
flex's BlockMask idea, with the partial tiles' bits stored instead of a ``mask_mod`` compiled
into the kernel, so any Python ``mask_mod`` works unchanged; the stored bits are the diagonal
band of a causal or sliding-window pattern and the boundaries of packed documents, so memory
stays linear in ``T`` for those.

The table is built from :func:`attention.masks.dense_mask` one band of query rows at a time, so
building it never holds the whole ``Tq x Tk`` mask either. It is keyed by batch and head only
when the pattern reads them (document ids read the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import MaskMod, dense_mask

#: Mask elements evaluated at once while building a table (one band of query rows).
BAND_ELEMENTS = 1 << 26

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass(frozen=True)
class BlockTable:
    """The visible tiles of one pattern at one ``(Tq, Tk, q_offset)``.

    ``Bm``/``Hm`` are the batch and heads the pattern reads (1 where it reads neither), ``NQ`` and
    ``NK`` the tile rows and columns. Lists are padded with unused entries past their counts.
    """

    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    kv_count: Tensor  # (Bm, Hm, NQ) int32: visible tiles in each tile row
    kv_blocks: Tensor  # (Bm, Hm, NQ, NK) int32: their column indices, ascending
    kv_tiles: Tensor  # (Bm, Hm, NQ, NK) int32: the partial tile each one loads, -1 if full
    q_count: Tensor  # (Bm, Hm, NK) int32: visible tiles in each tile column
    q_blocks: Tensor  # (Bm, Hm, NK, NQ) int32: their row indices, ascending
    q_tiles: Tensor  # (Bm, Hm, NK, NQ) int32: the partial tile each one loads, -1 if full
    tiles: Tensor  # (P, block_m, block_n) int8: 1 where the query sees the key (P >= 1)

    @property
    def reads_batch(self) -> bool:
        return self.kv_count.shape[0] > 1

    @property
    def reads_heads(self) -> bool:
        return self.kv_count.shape[1] > 1

    def density(self) -> float:
        """The fraction of tiles that are visible (full or partial)."""
        return float(self.kv_count.sum()) / self.kv_blocks.numel()


def build_block_table(
    mask_mod: MaskMod,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    block_m: int,
    block_n: int,
    device: torch.device | str,
    q_offset: int = 0,
) -> BlockTable:
    """The :class:`BlockTable` of ``mask_mod`` for queries at ``q_offset .. q_offset + q_len - 1``
    and keys ``0 .. kv_len - 1``."""
    probe = dense_mask(mask_mod, batch, heads, 1, 1, device, q_offset).shape  # (B or 1, H or 1, 1, 1)
    bm, hm = probe[0], probe[1]
    nk = -(-kv_len // block_n)
    band = max(1, BAND_ELEMENTS // (bm * hm * nk * block_n * block_m)) * block_m  # query rows per band
    states, tile_ids, tiles, stored = [], [], [], 0
    for row0 in range(0, q_len, band):
        rows = min(band, q_len - row0)
        visible = dense_mask(
            mask_mod, bm, hm, rows, kv_len, device, q_offset + row0
        )  # broadcasts to (bm, hm, rows, Tk)
        padded = torch.zeros(bm, hm, -(-rows // block_m) * block_m, nk * block_n, dtype=torch.bool, device=device)
        padded[:, :, :rows, :kv_len] = visible
        blocks = padded.view(bm, hm, -1, block_m, nk, block_n).transpose(3, 4)  # (bm, hm, nq', NK, block_m, block_n)
        seen = blocks.any(dim=(-2, -1))  # (bm, hm, nq', NK)
        whole = blocks.all(dim=(-2, -1))  # (bm, hm, nq', NK)
        state = seen.to(torch.int8) + whole.to(torch.int8)  # EMPTY, PARTIAL or FULL
        partial = state == PARTIAL
        ids = stored + torch.cumsum(partial.flatten(), 0).view(state.shape).to(torch.int32) - 1  # in tiles' order
        states.append(state)
        tile_ids.append(torch.where(partial, ids, -1))  # (bm, hm, nq', NK)
        tiles.append(blocks[partial].to(torch.int8))  # (p, block_m, block_n)
        stored += len(tiles[-1])
    state = torch.cat(states, dim=2)  # (bm, hm, NQ, NK)
    tile_ids = torch.cat(tile_ids, dim=2)  # (bm, hm, NQ, NK): -1 where no bits are stored
    kv_count, kv_blocks, kv_tiles = _visible_lists(state, tile_ids)
    q_count, q_blocks, q_tiles = _visible_lists(state.transpose(2, 3), tile_ids.transpose(2, 3))
    all_tiles = torch.cat(tiles) if stored else torch.zeros(1, block_m, block_n, dtype=torch.int8)
    return BlockTable(
        block_m,
        block_n,
        q_len,
        kv_len,
        kv_count,
        kv_blocks,
        kv_tiles,
        q_count,
        q_blocks,
        q_tiles,
        all_tiles.to(device).contiguous(),
    )


def _visible_lists(state: Tensor, tile_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``state`` ``(bm, hm, R, C)``: how many columns are visible, their indices in
    ascending order (padded), and the tile id of each."""
    visible = state != EMPTY  # (bm, hm, R, C)
    columns = torch.arange(state.shape[-1], device=state.device)  # (C,)
    order = torch.argsort(torch.where(visible, columns, columns + state.shape[-1]), dim=-1)  # visible first
    count = visible.sum(dim=-1, dtype=torch.int32)  # (bm, hm, R)
    return count.contiguous(), order.to(torch.int32).contiguous(), tile_ids.gather(-1, order).contiguous()
