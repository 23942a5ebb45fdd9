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

#: ``tile_ids`` of tiles that store no bits: every query sees every key, or none does.
FULL_TILE, EMPTY_TILE = -1, -2


@dataclass(frozen=True)
class BlockTable:
    """The visible tiles of one pattern at one ``(Tq, Tk, q_offset)``.

    A kernel walks, for its tile row (or column, in the backward), the contiguous range of tile
    columns from the first visible one to the last: the K and V addresses then follow the loop
    counter, so Triton's software pipeline prefetches them (a list of visible indices would make
    every load wait for the index before it). ``tile_ids`` says what each tile of the range is.
    Empty tiles inside a range (a pattern with holes) are visited and contribute nothing.

    Inside its range, each row (column) also has its longest run of full tiles, ``kv_full``
    (``q_full``): the kernels walk it in a loop of its own that neither looks tiles up nor masks
    (for a causal pattern: every tile left of the diagonal), and the rest of the range, with
    both, before and after it.

    ``Bm``/``Hm`` are the batch and heads the pattern reads (1 where it reads neither), ``NQ`` and
    ``NK`` the tile rows and columns.
    """

    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    q_offset: int  # the first query's position
    kv_range: Tensor  # (Bm, Hm, NQ, 2) int32: first and one-past-last visible tile column of each row
    q_range: Tensor  # (Bm, Hm, NK, 2) int32: first and one-past-last visible tile row of each column
    kv_full: Tensor  # (Bm, Hm, NQ, 2) int32: each row's longest run of full tiles (hi, hi where none)
    q_full: Tensor  # (Bm, Hm, NK, 2) int32: each column's longest run of full tiles (hi, hi where none)
    tile_ids: Tensor  # (Bm, Hm, NQ, NK) int64: FULL_TILE, EMPTY_TILE or the index of a stored partial tile
    tiles: Tensor  # (P, block_m, block_n) int8: 1 where the query sees the key (P >= 1)


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
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"a block table needs at least one query and one key, got {q_len} and {kv_len}")
    probe = dense_mask(mask_mod, batch, heads, 1, 1, device, q_offset).shape  # (B or 1, H or 1, 1, 1)
    bm, hm = probe[0], probe[1]
    nk = -(-kv_len // block_n)
    band = max(1, BAND_ELEMENTS // (bm * hm * nk * block_n * block_m)) * block_m  # query rows per band
    band_ids: list[Tensor] = []  # (bm, hm, nq', NK) each
    tiles: list[Tensor] = []  # (p, block_m, block_n) each
    stored = 0
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
        partial = seen & ~whole  # (bm, hm, nq', NK)
        ids = stored + torch.cumsum(partial.flatten(), 0).view(partial.shape) - 1  # int64, in the tiles' order
        band_ids.append(torch.where(partial, ids, torch.where(whole, FULL_TILE, EMPTY_TILE)))
        tiles.append(blocks[partial].to(torch.int8))  # (p, block_m, block_n)
        stored += len(tiles[-1])
    tile_ids = torch.cat(band_ids, dim=2).contiguous()  # (bm, hm, NQ, NK)
    visible = tile_ids != EMPTY_TILE  # (bm, hm, NQ, NK)
    full = tile_ids == FULL_TILE  # (bm, hm, NQ, NK)
    all_tiles = torch.cat(tiles) if stored else torch.zeros(1, block_m, block_n, dtype=torch.int8)
    kv_range, q_range = _visible_range(visible), _visible_range(visible.transpose(2, 3))
    return BlockTable(
        block_m,
        block_n,
        q_len,
        kv_len,
        q_offset,
        kv_range,
        q_range,
        _full_run(full, kv_range),
        _full_run(full.transpose(2, 3), q_range),
        tile_ids,
        all_tiles.to(device).contiguous(),
    )


def _visible_range(visible: Tensor) -> Tensor:
    """``(bm, hm, R, 2)``: per row of ``visible`` ``(bm, hm, R, C)``, the first visible column and
    one past the last (``0, 0`` for a row with none)."""
    columns = torch.arange(visible.shape[-1], device=visible.device, dtype=torch.int32)  # (C,)
    first = torch.where(visible, columns, visible.shape[-1]).amin(dim=-1)  # (bm, hm, R)
    last = torch.where(visible, columns + 1, 0).amax(dim=-1)  # (bm, hm, R)
    first = torch.minimum(first, last)  # an empty row: (0, 0)
    return torch.stack([first, last], dim=-1).to(torch.int32).contiguous()


def _full_run(full: Tensor, ranges: Tensor) -> Tensor:
    """``(bm, hm, R, 2)``: per row of ``full`` ``(bm, hm, R, C)``, the first column of a longest
    run of full tiles and one past its last; a row with no full tile gets ``(hi, hi)`` from its
    visible range ``ranges``, so its walk is all masked."""
    columns = torch.arange(full.shape[-1], device=full.device)  # (C,)
    breaks = torch.cummax(torch.where(full, -1, columns), dim=-1).values  # (bm, hm, R, C): last non-full so far
    length = torch.where(full, columns - breaks, 0)  # (bm, hm, R, C): the run ending at each column
    best, end = length.max(dim=-1)  # (bm, hm, R) each: the longest run and where it ends
    hi = ranges[..., 1].long()  # (bm, hm, R)
    stop = torch.where(best > 0, end + 1, hi)  # (bm, hm, R)
    return torch.stack([stop - best, stop], dim=-1).to(torch.int32).contiguous()
