"""Patterns and score mods as saved objects, and built-ins' own pickling.

Equal parameters make equal patterns, and flex's compile key follows them: two
``sliding_window(4)`` share compiled code, ``sliding_window(8)`` does not; flex leaves its
BlockMask and compile-key caches out of the pickled state and rebuilds them on load. Every
implementation's round trip is in the property suite, attention/suite/test_pickle.py.
"""

from __future__ import annotations

import pickle

import pytest
import torch

import attention
from attention import masks, score_mods
from attention.base import MAX_CACHED_SHAPES, AttentionBase
from attention.flex import pattern_key


def pickle_round_trip(module: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(module))


def test_flex_caches_are_left_out_and_rebuilt():
    module = attention.get("flex")(8, 16, 2, 16, mask_mod=masks.sliding_window(3)).eval()
    with torch.no_grad():
        module(torch.randn(1, 5, 8))
    assert module._block_masks  # a BlockMask was cached by the call
    state = module.__getstate__()
    assert "_block_masks" not in state and "_pattern_keys" not in state
    loaded = pickle_round_trip(module)
    assert loaded._block_masks == {}
    assert loaded._pattern_keys == module._pattern_keys


def test_a_per_shape_cache_keeps_the_newest_shapes_and_nothing_of_a_calls_own_document_ids():
    cache: dict[tuple, int] = {}
    built: list[int] = []

    def get(shape: int, document_ids: torch.Tensor | None = None) -> int:
        return AttentionBase._per_shape(cache, (shape,), document_ids, lambda: built.append(shape) or shape)

    for shape in range(MAX_CACHED_SHAPES + 1):
        assert get(shape) == shape
    assert len(cache) == MAX_CACHED_SHAPES and (0,) not in cache  # the oldest went
    assert get(1) == 1 and built.count(1) == 1  # kept: not built again
    assert get(1, torch.tensor([[0, 0, 1]])) == 1 and built.count(1) == 2  # built for the call
    assert len(cache) == MAX_CACHED_SHAPES


def test_patterns_compare_by_parameters():
    assert masks.sliding_window(4) == masks.sliding_window(4)
    assert hash(masks.sliding_window(4)) == hash(masks.sliding_window(4))
    assert masks.sliding_window(4) != masks.sliding_window(8)
    assert masks.prefix_lm(4) != masks.sliding_window(4)
    assert masks.sliding_window(4).__name__ == "sliding_window_4" and masks.prefix_lm(0).__name__ == "prefix_lm_0"
    assert masks.prefix_length(masks.prefix_lm(5)) == 5
    assert score_mods.generate_alibi(4) == score_mods.generate_alibi(4) != score_mods.generate_alibi(8)
    assert score_mods.generate_tanh_softcap(2) == score_mods.generate_tanh_softcap(2.0)
    assert score_mods.generate_tanh_softcap(2.5).__name__ == "tanh_softcap_2.5"
    assert score_mods.is_additive(score_mods.generate_alibi(4))
    assert not score_mods.is_additive(score_mods.generate_tanh_softcap(2.0))
    with pytest.raises(AttributeError, match=r"immutable"):
        masks.sliding_window(4).window = 8
    ids = torch.zeros(1, 4, dtype=torch.long)
    per_doc = masks.per_document(masks.causal, ids)
    assert per_doc == per_doc and per_doc != masks.per_document(masks.causal, ids)  # ids compare by identity


def test_compile_keys_follow_parameters():
    """Flex keys compiled code on a pattern's type and parameters: equal patterns share a key,
    different parameters or types do not, and tensors count by type only (their metadata is
    keyed by the call's shapes)."""
    assert pattern_key(masks.sliding_window(4)) == pattern_key(masks.sliding_window(4))
    assert pattern_key(masks.sliding_window(4)) != pattern_key(masks.sliding_window(8))
    assert pattern_key(masks.sliding_window(4)) != pattern_key(masks.prefix_lm(4))
    assert pattern_key(score_mods.generate_alibi(4)) == pattern_key(score_mods.generate_alibi(4))
    assert pattern_key(score_mods.generate_alibi(4)) != pattern_key(score_mods.generate_alibi(8))
    ids, other_ids = torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)
    assert pattern_key(masks.per_document(masks.prefix_lm(2), ids)) == pattern_key(
        masks.per_document(masks.prefix_lm(2), other_ids)
    )
    assert pattern_key(masks.per_document(masks.prefix_lm(2), ids)) != pattern_key(
        masks.per_document(masks.prefix_lm(3), ids)
    )
    pickle.dumps(pattern_key(masks.sliding_window(4)))  # no code objects in a built-in's key


def test_a_module_pickled_before_patterns_became_properties_still_loads():
    module = attention.get("sdpa")(8, 8, 2, 8, mask_mod=masks.sliding_window(3)).eval()
    state = module.__getstate__()
    state["mask_mod"] = state.pop("_mask_mod")  # the older layout: plain attributes
    state["score_mod"] = state.pop("_score_mod")
    old = attention.get("sdpa").__new__(attention.get("sdpa"))
    old.__setstate__(state)
    x = torch.randn(1, 5, 8)  # (B, T, d_in)
    with torch.no_grad():
        assert old.mask_mod == masks.sliding_window(3) and torch.equal(old(x), module(x))
