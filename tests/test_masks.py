"""The mask functions themselves, and built-ins' own behaviour with them.

* ``dense_mask`` has the documented shapes and the literal definitions of
  docs/design.md#mask-definitions; the factories validate their arguments.
* ``per_document`` gives every packed document the pattern on its own positions (each its own
  prefix); ``sliding_window``'s count is stated against attention-gym's and FlashAttention's.

What every implementation must do with a pattern is in the property suite,
attention/suite/test_masks.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attention
from attention import masks
from attention.masks import and_masks, dense_mask
from attention.suite.support import CUDA, mask_for, random_document_ids

# -- dense_mask: shapes and the literal definitions ---------------------------------------------


def literal(kind: str, q: int, kv: int, window: int, prefix_len: int) -> bool:
    """docs/design.md#mask-definitions, one pair at a time."""
    if kind == "causal":
        return kv <= q
    if kind == "sliding_window":
        return 0 <= q - kv < window
    return kv < prefix_len or kv <= q  # prefix_lm


@given(
    kind=st.sampled_from(["causal", "sliding_window", "prefix_lm"]),
    q_len=st.integers(1, 20),
    extra_keys=st.integers(0, 20),
    window=st.integers(1, 25),
    prefix_len=st.integers(0, 25),
)
def test_dense_mask_matches_literal_definition(kind, q_len, extra_keys, window, prefix_len):
    """A query chunk at absolute offset ``kv_len - q_len`` (continuing a cache) is masked by its
    absolute position; patterns reading neither b nor h come out ``(1, 1, Tq, Tk)``."""
    mask_mod = mask_for(kind, window, prefix_len)
    kv_len = q_len + extra_keys
    mask = dense_mask(mask_mod, 3, 4, q_len, kv_len, "cpu", q_offset=extra_keys)
    assert mask.shape == (1, 1, q_len, kv_len) and mask.dtype == torch.bool
    want = torch.tensor(
        [[literal(kind, extra_keys + i, j, window, prefix_len) for j in range(kv_len)] for i in range(q_len)]
    )  # (Tq, Tk)
    assert torch.equal(mask[0, 0], want)


def test_dense_mask_shapes_follow_what_the_pattern_reads():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])  # (B=2, T=5)

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (h == 0)

    assert dense_mask(masks.causal, 2, 3, 4, 5, "cpu", q_offset=1).shape == (1, 1, 4, 5)
    assert dense_mask(masks.document(ids), 2, 3, 5, 5, "cpu").shape == (2, 1, 5, 5)
    assert dense_mask(per_head, 2, 3, 4, 4, "cpu").shape == (1, 3, 4, 4)
    both = dense_mask(and_masks(per_head, masks.document(ids)), 2, 3, 5, 5, "cpu")
    assert both.shape == (2, 3, 5, 5)
    # document: same id only, both ways (causality is the other mask's job)
    assert torch.equal(dense_mask(masks.document(ids), 2, 1, 5, 5, "cpu")[:, 0], ids[:, :, None] == ids[:, None, :])
    # a chunk continuing a cache reads the ids of its absolute positions
    tail = dense_mask(masks.document(ids), 2, 1, 2, 5, "cpu", q_offset=3)  # (B, 1, 2, 5)
    assert torch.equal(tail[:, 0], ids[:, 3:, None] == ids[:, None, :])


def test_degenerate_parameters_reduce_to_causal():
    causal = dense_mask(masks.causal, 1, 1, 9, 9, "cpu")
    assert torch.equal(dense_mask(masks.sliding_window(9), 1, 1, 9, 9, "cpu"), causal)
    assert torch.equal(dense_mask(masks.sliding_window(100), 1, 1, 9, 9, "cpu"), causal)
    assert torch.equal(dense_mask(masks.prefix_lm(0), 1, 1, 9, 9, "cpu"), causal)
    assert torch.equal(dense_mask(masks.prefix_lm(1), 1, 1, 9, 9, "cpu"), causal)
    assert dense_mask(masks.prefix_lm(9), 1, 1, 9, 9, "cpu").all()
    assert torch.equal(dense_mask(masks.sliding_window(1), 1, 1, 9, 9, "cpu")[0, 0], torch.eye(9, dtype=torch.bool))


# -- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "value", "error", "message"),
    [
        (masks.sliding_window, 0, ValueError, r"window must be >= 1, got 0"),
        (masks.sliding_window, -3, ValueError, r"window must be >= 1, got -3"),
        (masks.sliding_window, 2.0, TypeError, r"window must be an int, got float"),
        (masks.sliding_window, True, TypeError, r"window must be an int, got bool"),
        (masks.sliding_window, "4", TypeError, r"window must be an int, got str"),
        (masks.prefix_lm, -1, ValueError, r"prefix_len must be >= 0, got -1"),
        (masks.prefix_lm, 1.5, TypeError, r"prefix_len must be an int, got float"),
        (masks.prefix_lm, None, TypeError, r"prefix_len must be an int, got NoneType"),
        (masks.prefix_lm, False, TypeError, r"prefix_len must be an int, got bool"),
    ],
)
def test_factories_validate_arguments(factory, value, error, message):
    with pytest.raises(error, match=message):
        factory(value)


def test_a_users_mask_with_its_own_document_ids_attribute_is_not_read_as_ours():
    class SharedIds:  # attention-gym style: 1-D ids shared by every sequence of the batch
        def __init__(self, ids):
            self.document_ids = ids

        def __call__(self, b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (self.document_ids[q_idx] == self.document_ids[kv_idx])

    module = attention.get("sdpa")(8, 8, 2, 16, mask_mod=SharedIds(torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])))
    with torch.no_grad():
        assert module(torch.randn(2, 8, 8)).shape == (2, 8, 8)


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.zeros(2, 5), TypeError, "document_ids must hold integers, got torch.float32"),
        (torch.zeros(5, dtype=torch.long), ValueError, "document_ids must have shape (batch, tokens), got (5,)"),
        ([[0, 1]], TypeError, "document_ids must be a torch.Tensor, got list"),
    ],
)
def test_document_refuses_ids_a_module_call_would_refuse(ids, error, message):
    with pytest.raises(error, match=re.escape(message)):
        masks.document(ids)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
def test_document_ids_on_another_device_rejected():
    module = attention.get("sdpa")(8, 16, 2, 8)
    with pytest.raises(ValueError, match=r"document_ids is on cuda.*x is on cpu"), torch.no_grad():
        module(torch.randn(1, 4, 8), document_ids=torch.zeros(1, 4, dtype=torch.long, device="cuda"))


# -- per_document: a pattern on document-local positions ----------------------------------------


def literal_per_document(kind: str, ids: torch.Tensor, window: int, prefix_len: int) -> torch.Tensor:
    """``(B, T, T)``: the pattern applied to each document alone, pair by pair, in Python."""
    batch, length = ids.shape
    want = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        row = ids[b].tolist()
        for q in range(length):
            for kv in range(length):
                if row[q] != row[kv]:
                    continue
                start = row.index(row[q])  # where this document begins
                want[b, q, kv] = literal(kind, q - start, kv - start, window, prefix_len)
    return want


@given(
    kind=st.sampled_from(["causal", "sliding_window", "prefix_lm"]),
    batch=st.integers(1, 3),
    length=st.integers(1, 24),
    window=st.integers(1, 6),
    prefix_len=st.integers(0, 6),
    seed=st.integers(0, 2**16),
    q_offset=st.integers(0, 23),
)
def test_per_document_matches_literal_loop(kind, batch, length, window, prefix_len, seed, q_offset):
    """Every document gets the pattern on its own positions (its own prefix, its own window), and
    no query sees another document; a chunk at an offset is masked by its absolute rows."""
    q_offset = min(q_offset, length - 1)
    ids = random_document_ids(batch, length, seed)  # (B, T)
    mask_mod = mask_for(kind, window, prefix_len)
    got = dense_mask(masks.per_document(mask_mod, ids), batch, 2, length - q_offset, length, "cpu", q_offset=q_offset)
    want = literal_per_document(kind, ids, window, prefix_len)[:, q_offset:]  # (B, Tq, T)
    assert got.shape == (batch, 1, length - q_offset, length)
    assert torch.equal(got[:, 0], want)


def test_per_document_differs_from_absolute_prefix():
    """The documented difference: ``and_masks(prefix_lm(p), document(ids))`` gives a bidirectional
    prefix to the first document only; ``per_document(prefix_lm(p), ids)`` to every document."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])  # (1, 7): documents at 0 and 3
    absolute = dense_mask(and_masks(masks.prefix_lm(2), masks.document(ids)), 1, 1, 7, 7, "cpu")[0, 0]
    local = dense_mask(masks.per_document(masks.prefix_lm(2), ids), 1, 1, 7, 7, "cpu")[0, 0]
    assert absolute[0, 1] and local[0, 1]  # document 0: query 0 sees prefix key 1 in both
    assert not absolute[3, 4] and local[3, 4]  # document 1: only per_document shows key 4 to query 3
    # causal and sliding windows depend on q - kv alone: there the two agree
    for mask_mod in (masks.causal, masks.sliding_window(2)):
        per_doc = dense_mask(masks.per_document(mask_mod, ids), 1, 1, 7, 7, "cpu")
        assert torch.equal(per_doc, dense_mask(and_masks(mask_mod, masks.document(ids)), 1, 1, 7, 7, "cpu"))


def test_per_document_validates_arguments():
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"mask_mod must be callable.*got int"):
        masks.per_document(3, ids)
    with pytest.raises(TypeError, match=r"document_ids must be a torch.Tensor, got list"):
        masks.per_document(masks.causal, [[0, 0]])
    with pytest.raises(TypeError, match=r"document_ids must hold integers, got torch.float32"):
        masks.per_document(masks.causal, ids.float())
    with pytest.raises(ValueError, match=r"document_ids must have shape \(batch, tokens\), got \(4,\)"):
        masks.per_document(masks.causal, ids[0])


def test_per_document_refuses_a_document_in_two_runs():
    """An id given to two separate runs would let a query see the later run's keys as its own
    past (docs/design.md#per-document-ids): refused, naming the row, the id and both starts."""
    ids = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, 4, 4], [1, 1, 0, 0, 2, 2, 0, 0, 1, 1]])  # (2, 10): row 1 splits
    with pytest.raises(ValueError, match=r"row 1 gives id 0 to two separate runs, starting at positions 2 and 6"):
        masks.per_document(masks.causal, ids)
    with pytest.raises(ValueError, match=r"row 0 gives id 5 to two separate runs, starting at positions 0 and 3"):
        masks.per_document(masks.prefix_lm(2), torch.tensor([[5, 5, 7, 5]]))
    masks.per_document(masks.causal, ids[:1])  # one run per id: accepted
    masks.per_document(masks.causal, torch.tensor([[3, 3, 1, 1, 2]]))  # ids need not be sorted


@pytest.mark.parametrize(
    ("result", "shape"),
    [
        (lambda visible: visible[..., :2, :], "(1, 1, 2, 7)"),  # rows dropped
        (lambda visible: visible.expand(1, 3, 5, 7), "(1, 3, 5, 7)"),  # heads made up
        (lambda visible: visible[None], "(1, 1, 1, 5, 7)"),  # a fifth dimension
    ],
    ids=["rows", "heads", "five-d"],
)
def test_dense_mask_refuses_a_wrong_shape_on_a_real_grid(result, shape):
    """A pattern may pass the construction probe (a 2 x 2 grid) and misbehave on a real grid; the
    dense paths (from-scratch, SDPA, flex's probe) then raise naming mask_mod and the shapes,
    instead of failing in torch or broadcasting into another mask."""

    def misbehaving(b, h, q_idx, kv_idx):
        return result(q_idx >= kv_idx)

    with pytest.raises(ValueError, match=re.escape(f"broadcastable to (2, 2, 5, 7), got shape {shape}")):
        dense_mask(misbehaving, 2, 2, 5, 7, "cpu", q_offset=2)


def test_sliding_window_convention():
    """``sliding_window(w)`` counts the query's own key: ``w`` keys, which attention-gym's
    ``generate_sliding_window(w - 1)`` and FlashAttention's ``window_size=(w - 1, 0)`` also show."""
    for w in range(1, 6):
        mask = dense_mask(masks.sliding_window(w), 1, 1, 12, 12, "cpu")[0, 0]  # (T, T)
        assert mask.sum(dim=-1)[w:].eq(w).all()  # rows with a full window see exactly w keys
        q, kv = torch.arange(12).view(-1, 1), torch.arange(12).view(1, -1)
        attention_gym = (q >= kv) & (q - kv <= w - 1)  # generate_sliding_window(w - 1)
        assert torch.equal(mask, attention_gym)


# -- patterns that hold tensors, combine, or come from functools.partial ------------------------


def test_per_document_is_frozen_and_keeps_its_own_ids():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    pattern = masks.per_document(masks.prefix_lm(2), ids)
    before = dense_mask(pattern, 1, 1, 6, 6, "cpu").clone()  # (1, 1, 6, 6)
    ids.fill_(0)  # the caller reuses its buffer for the next batch
    assert torch.equal(dense_mask(pattern, 1, 1, 6, 6, "cpu"), before)
    with pytest.raises(AttributeError, match="frozen"):
        pattern.document_ids = ids


def test_and_masks_keeps_the_bidirectional_prefix_so_a_cache_cannot_split_it():
    ids = torch.zeros(1, 8, dtype=torch.long)  # (1, 8)
    combined = masks.and_masks(masks.prefix_lm(4), masks.document(ids))
    assert masks.prefix_length(combined) == 4 and masks.prefix_length(masks.and_masks(masks.causal)) == 0
    module = attention.get("sdpa")(8, 8, 2, 8, mask_mod=combined).eval()
    cache = module.make_kv_cache(1, 8)
    with torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
        with pytest.raises(ValueError, match="prefix_len=4"):
            module(torch.randn(1, 2, 8), kv_cache=cache)


def test_the_construction_probe_runs_where_the_pattern_s_tensors_live():
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")  # stands in for ids on a GPU
    masks.check_mask_mod(masks.and_masks(masks.causal, masks.document(ids)))  # no device mismatch
    masks.check_mask_mod(masks.per_document(masks.causal, torch.zeros(2, 5, dtype=torch.long)))


def test_a_pattern_that_raises_when_probed_is_a_type_error_naming_it():
    def broken(b, h, q_idx, kv_idx):
        raise IndexError("index 7 is out of bounds")

    with pytest.raises(TypeError, match=r"mask_mod broken raised IndexError when called on index tensors"):
        masks.check_mask_mod(broken)


def test_partials_of_one_function_get_their_own_compile_keys():
    import functools

    from attention.flex import pattern_key

    def band(b, h, q_idx, kv_idx, w):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < w)

    keys = {pattern_key(functools.partial(band, w=w)) for w in (2, 3, 4)}
    assert len(keys) == 3 and pattern_key(functools.partial(band, w=2)) == pattern_key(functools.partial(band, w=2))


# -- mask specs (command lines, perf files) --------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [("causal", ("causal", 0)), ("sliding_window:12", ("sliding_window", 12)), ("prefix_lm:0", ("prefix_lm", 0))],
)
def test_parse_spec_reads_ascii_numbers(spec, parsed):
    assert masks.parse_spec(spec) == parsed


@pytest.mark.parametrize(
    "spec",
    ["sliding_window:²", "sliding_window:٣", "prefix_lm:３", "document:1²", "sliding_window: 3", "sliding_window:+3"],
)
def test_parse_spec_refuses_digits_other_than_ascii(spec):
    """``str.isdigit`` takes superscripts (``int`` then raises its own error) and other scripts'
    digits (``int`` reads '٣' as 3): both must be the spec's own ValueError, naming what it takes."""
    with pytest.raises(ValueError, match=rf"unknown mask {re.escape(repr(spec))}: .*ASCII digits 0-9"):
        masks.parse_spec(spec)
