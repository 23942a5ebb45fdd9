"""Whole modules through ``torch.save`` / ``torch.load`` and ``pickle``: every implementation, with
every built-in pattern and score mod, saves and loads alike and computes the same function after.

The built-in patterns and score mods are small callable objects (not closures, which pickle
refuses), and flex leaves its BlockMask and compile-key caches out of the pickled state and
rebuilds them on load. Equal parameters make equal patterns, and flex's compile key follows
them: two ``sliding_window(4)`` share compiled code, ``sliding_window(8)`` does not.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention
from attention import masks, score_mods
from attention.flex import pattern_key

from .support import IMPL_NAMES, assert_module_matches_oracle, random_document_ids

NUM_HEADS = 4
MASKS = ["causal", "sliding_window", "prefix_lm", "document", "per_document"]
SCORES = ["none", "alibi", "softcap"]


def torch_round_trip(module: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def pickle_round_trip(module: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(module))


@pytest.mark.parametrize("score_name", SCORES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@settings(max_examples=max(2, settings.default.max_examples // 5))
@given(data=st.data())
def test_module_round_trip_computes_the_same(data, impl_name, mask_kind, score_name):
    impl = attention.get(impl_name)
    batch = data.draw(st.integers(1, 3), label="batch")
    length = data.draw(st.integers(2, 30), label="length")
    param = data.draw(st.integers(1, length - 1), label="window or prefix_len")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    ids = random_document_ids(batch, length, seed)  # (B, T)
    mask_mod = {
        "sliding_window": masks.sliding_window(param),
        "prefix_lm": masks.prefix_lm(param),
        "per_document": masks.per_document(masks.prefix_lm(param), ids),
    }.get(mask_kind, masks.causal)
    call_ids = ids if mask_kind == "document" else None  # the document pattern comes at call time
    score_mod = {
        "alibi": score_mods.generate_alibi(NUM_HEADS),
        "softcap": score_mods.generate_tanh_softcap(2.0),
    }.get(score_name)
    if score_mod is not None and not impl.supports_score_mod(score_mod):
        return  # refused at construction (test_score_mods), nothing to save
    torch.manual_seed(seed)
    module = impl(8, 8 * NUM_HEADS, NUM_HEADS, length, num_kv_heads=2, mask_mod=mask_mod, score_mod=score_mod)
    module = module.eval()
    x = torch.randn(batch, length, 8)  # (B, T, d_in)
    with torch.no_grad():
        before = module(x, document_ids=call_ids)  # (B, T, d_out); flex has now cached a BlockMask

    for round_trip in (torch_round_trip, pickle_round_trip):
        loaded = round_trip(module)

        assert type(loaded) is impl
        assert repr(loaded) == repr(module)
        if mask_kind == "per_document":
            assert torch.equal(loaded.mask_mod.document_ids, ids)
        else:
            assert loaded.mask_mod == module.mask_mod
        assert loaded.score_mod == module.score_mod
        for key, value in module.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        # The loaded module decodes too: a prefill holding any prefix whole, then the rest.
        prefill = length if mask_kind == "per_document" else param
        cache = loaded.make_kv_cache(batch, length)
        with torch.no_grad():
            after = loaded(x, document_ids=call_ids)  # (B, T, d_out)
            cached = torch.cat(
                [
                    loaded(x[:, :prefill], kv_cache=cache, document_ids=None if call_ids is None else ids[:, :prefill]),
                    *([loaded(x[:, prefill:], kv_cache=cache, document_ids=call_ids)] if prefill < length else []),
                ],
                dim=1,
            )  # (B, T, d_out)
        assert torch.equal(after, before), f"{impl_name} computes another function after {round_trip.__name__}"
        assert_module_matches_oracle(loaded, x, after, document_ids=call_ids, what="loaded module's output")
        assert_module_matches_oracle(loaded, x, cached, document_ids=call_ids, what="loaded module's cached output")


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
