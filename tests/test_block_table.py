"""The block table the Triton kernels walk: exactly the pattern, linear memory for banded patterns."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attention import block_table, masks
from attention.block_table import FULL, build_block_table
from tests.support import random_document_ids


def _rebuild(table: block_table.BlockTable, batch: int, heads: int) -> torch.Tensor:
    """The dense ``(B, H, Tq, Tk)`` mask the table describes, from its row lists."""
    bm, bn = table.block_m, table.block_n
    nq, nk = table.kv_blocks.shape[2], table.kv_blocks.shape[3]
    dense = torch.zeros(batch, heads, nq * bm, nk * bn, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            tb, th = (b if table.reads_batch else 0), (h if table.reads_heads else 0)
            for qb in range(nq):
                for i in range(int(table.kv_count[tb, th, qb])):
                    kb, tile = int(table.kv_blocks[tb, th, qb, i]), int(table.kv_tiles[tb, th, qb, i])
                    bits = torch.ones(bm, bn, dtype=torch.bool) if tile < 0 else table.tiles[tile].bool()
                    dense[b, h, qb * bm : (qb + 1) * bm, kb * bn : (kb + 1) * bn] = bits
    return dense[:, :, : table.q_len, : table.kv_len]


def _pairs(count: torch.Tensor, blocks: torch.Tensor, tiles: torch.Tensor, transpose: bool) -> set:
    out = set()
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in count.shape)).view(-1, 3).tolist():
        b, h, r = idx
        for i in range(int(count[b, h, r])):
            c = int(blocks[b, h, r, i])
            out.add((b, h, *((c, r) if transpose else (r, c)), int(tiles[b, h, r, i])))
    return out


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
    assert torch.equal(_rebuild(table, batch, heads), expected.expand(batch, heads, q_len, kv_len))
    # The column lists (the backward's walk) hold the same tiles as the row lists.
    assert _pairs(table.kv_count, table.kv_blocks, table.kv_tiles, False) == _pairs(
        table.q_count, table.q_blocks, table.q_tiles, True
    )
    assert table.reads_batch == (kind == "document") and table.reads_heads == (kind == "per_head")


def test_lists_are_ascending_and_full_tiles_need_no_bits() -> None:
    table = build_block_table(masks.causal, 1, 1, 64, 64, 16, 16, "cpu")
    for qb in range(4):
        listed = table.kv_blocks[0, 0, qb, : int(table.kv_count[0, 0, qb])].tolist()
        assert listed == list(range(qb + 1))  # causal: the tiles left of and on the diagonal
        tiles = table.kv_tiles[0, 0, qb, : qb + 1].tolist()
        assert tiles[:-1] == [-1] * qb and tiles[-1] >= 0  # only the diagonal tile stores bits
    assert table.tiles.shape == (4, 16, 16)
    assert table.density() == pytest.approx(10 / 16)


@pytest.mark.parametrize("spec", ["causal", "sliding_window:256"])
def test_stored_bits_grow_linearly_with_length(spec: str) -> None:
    pattern = masks.from_spec(spec).mask_mod
    sizes = [build_block_table(pattern, 1, 1, t, t, 128, 64, "cpu").tiles.numel() for t in (1024, 2048, 4096)]
    assert sizes[2] - sizes[1] == 2 * (sizes[1] - sizes[0]) > 0, sizes  # a band along the diagonal
    full = build_block_table(pattern, 1, 1, 4096, 4096, 128, 64, "cpu")
    assert int((full.kv_tiles == -1).sum()) > 0 and full.kv_count.dtype == torch.int32


def test_building_in_bands_gives_the_same_table(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = random_document_ids(2, 200, seed=3)
    pattern = masks.and_masks(masks.sliding_window(50), masks.document(ids))
    whole = build_block_table(pattern, 2, 4, 200, 200, 32, 16, "cpu")
    monkeypatch.setattr(block_table, "BAND_ELEMENTS", 1)  # one tile row per band
    banded = build_block_table(pattern, 2, 4, 200, 200, 32, 16, "cpu")
    for name in ("kv_count", "kv_blocks", "q_count", "q_blocks"):
        assert torch.equal(getattr(whole, name), getattr(banded, name)), name
    assert torch.equal(_rebuild(banded, 2, 4), _rebuild(whole, 2, 4))  # tiles are stored band by band


def test_a_pattern_that_shows_nothing_has_no_tiles() -> None:
    table = build_block_table(lambda b, h, q, k: k > q + 1000, 1, 1, 40, 40, 16, 16, "cpu")
    assert int(table.kv_count.sum()) == 0 and int(table.q_count.sum()) == 0
    assert table.tiles.shape == (1, 16, 16)  # one unused tile: kernels always get a valid pointer
    assert not bool((table.kv_tiles >= 0).any()) and FULL == 2
