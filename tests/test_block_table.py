"""The block table the Triton kernels walk: exactly the pattern, linear memory for banded patterns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attention import block_table, masks
from attention.block_table import EMPTY_TILE, FULL_TILE, build_block_table
from attention.suite.support import random_document_ids


def _rebuild(table: block_table.BlockTable, batch: int, heads: int, *, by_columns: bool = False) -> torch.Tensor:
    """The dense ``(B, H, Tq, Tk)`` mask the table describes, walking its row ranges (as the
    forward and dQ kernels do) or its column ranges (as the dK/dV kernel does): the full run
    without looking its tiles up, the rest of the range by the tile ids."""
    bm, bn = table.block_m, table.block_n
    nq, nk = table.tile_ids.shape[2], table.tile_ids.shape[3]
    dense = torch.zeros(batch, heads, nq * bm, nk * bn, dtype=torch.bool)
    ranges = table.q_range if by_columns else table.kv_range
    runs = table.q_full if by_columns else table.kv_full
    for b in range(batch):
        for h in range(heads):
            tb, th = min(b, table.tile_ids.shape[0] - 1), min(h, table.tile_ids.shape[1] - 1)  # Bm, Hm may be 1
            for outer in range(ranges.shape[2]):
                lo, hi = ranges[tb, th, outer].tolist()
                run_lo, run_hi = runs[tb, th, outer].tolist()
                assert lo <= run_lo <= run_hi <= hi
                for inner in range(lo, hi):
                    qb, kb = (inner, outer) if by_columns else (outer, inner)
                    tile = FULL_TILE if run_lo <= inner < run_hi else int(table.tile_ids[tb, th, qb, kb])
                    bits = table.tiles[tile].bool() if tile >= 0 else torch.full((bm, bn), tile == FULL_TILE)
                    dense[b, h, qb * bm : (qb + 1) * bm, kb * bn : (kb + 1) * bn] = bits
    return dense[:, :, : table.q_len, : table.kv_len]


@given(
    kind=st.sampled_from(["causal", "sliding_window", "prefix_lm", "document", "per_head"]),
    q_len=st.integers(1, 90),
    extra_keys=st.integers(0, 40),
    block_m=st.sampled_from([8, 16, 32]),
    block_n=st.sampled_from([8, 16]),
    window=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_table_describes_the_pattern_exactly(kind, q_len, extra_keys, block_m, block_n, window, seed) -> None:
    batch, heads = 2, 3
    kv_len = q_len + extra_keys  # queries continue a cache of extra_keys positions
    pattern = {
        "causal": masks.causal,
        "sliding_window": masks.sliding_window(window),
        "prefix_lm": masks.prefix_lm(window),
        "document": masks.and_masks(masks.causal, masks.document(random_document_ids(batch, kv_len, seed))),
        "per_head": lambda b, h, q, k: (k <= q) & ((k + h) % 3 != 0),  # reads the head
    }[kind]
    table = build_block_table(pattern, batch, heads, q_len, kv_len, block_m, block_n, "cpu", q_offset=extra_keys)
    expected = masks.dense_mask(pattern, batch, heads, q_len, kv_len, "cpu", q_offset=extra_keys)
    expected = expected.expand(batch, heads, q_len, kv_len)
    assert torch.equal(_rebuild(table, batch, heads), expected)
    assert torch.equal(_rebuild(table, batch, heads, by_columns=True), expected)  # the backward's walk
    # Every visible tile lies inside its row's and its column's range: nothing visible is skipped.
    visible = table.tile_ids != EMPTY_TILE  # (Bm, Hm, NQ, NK)
    cols = torch.arange(visible.shape[3])  # (NK,)
    rows = torch.arange(visible.shape[2])  # (NQ,)
    in_row = (cols >= table.kv_range[..., :1]) & (cols < table.kv_range[..., 1:])  # (Bm, Hm, NQ, NK)
    in_col = (rows >= table.q_range[..., :1]) & (rows < table.q_range[..., 1:])  # (Bm, Hm, NK, NQ)
    assert not (visible & ~in_row).any() and not (visible & ~in_col.transpose(2, 3)).any()
    # One table serves every sequence and head the pattern does not tell apart.
    assert table.tile_ids.shape[:2] == (batch if kind == "document" else 1, heads if kind == "per_head" else 1)


def test_causal_rows_walk_to_the_diagonal_and_only_it_stores_bits() -> None:
    table = build_block_table(masks.causal, 1, 1, 64, 64, 16, 16, "cpu")
    assert table.kv_range[0, 0].tolist() == [[0, 1], [0, 2], [0, 3], [0, 4]]
    assert table.q_range[0, 0].tolist() == [[0, 4], [1, 4], [2, 4], [3, 4]]
    # The run left of the diagonal (below it, by columns) skips the lookup; none in the first row.
    assert table.kv_full[0, 0].tolist() == [[1, 1], [0, 1], [0, 2], [0, 3]]
    assert table.q_full[0, 0].tolist() == [[1, 4], [2, 4], [3, 4], [4, 4]]
    ids = table.tile_ids[0, 0]  # (4, 4)
    below, above = torch.ones(4, 4, dtype=torch.bool).tril(-1), torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert (ids.diagonal() >= 0).all() and (ids[below] == FULL_TILE).all() and (ids[above] == EMPTY_TILE).all()
    assert table.tiles.shape == (4, 16, 16)
    assert int((ids != EMPTY_TILE).sum()) == 10  # of 16 tiles


@pytest.mark.parametrize("spec", ["causal", "sliding_window:256"])
def test_stored_bits_grow_linearly_with_length(spec: str) -> None:
    pattern = masks.from_spec(spec).mask_mod
    sizes = [build_block_table(pattern, 1, 1, t, t, 128, 64, "cpu").tiles.numel() for t in (1024, 2048, 4096)]
    assert sizes[2] - sizes[1] == 2 * (sizes[1] - sizes[0]) > 0, sizes  # a band along the diagonal
    full = build_block_table(pattern, 1, 1, 4096, 4096, 128, 64, "cpu")
    assert int((full.tile_ids == FULL_TILE).sum()) > 0 and full.kv_range.dtype == torch.int32


def test_building_in_bands_gives_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = random_document_ids(2, 200, seed=3)
    pattern = masks.and_masks(masks.sliding_window(50), masks.document(ids))
    whole = build_block_table(pattern, 2, 4, 200, 200, 32, 16, "cpu")
    monkeypatch.setattr(block_table, "BAND_ELEMENTS", 1)  # one tile row per band
    banded = build_block_table(pattern, 2, 4, 200, 200, 32, 16, "cpu")
    for name in ("kv_range", "q_range", "kv_full", "q_full"):
        assert torch.equal(getattr(whole, name), getattr(banded, name)), name
    assert torch.equal(whole.tile_ids < 0, banded.tile_ids < 0)
    assert torch.equal(_rebuild(banded, 2, 4), _rebuild(whole, 2, 4))  # tiles are stored band by band


def test_a_pattern_that_shows_nothing_walks_nothing() -> None:
    table = build_block_table(lambda b, h, q, k: k > q + 1000, 1, 1, 40, 40, 16, 16, "cpu")
    assert not table.kv_range.any() and not table.q_range.any()  # every range is (0, 0)
    assert table.tiles.shape == (1, 16, 16)  # one unused tile: kernels always get a valid pointer
    assert (table.tile_ids == EMPTY_TILE).all()
