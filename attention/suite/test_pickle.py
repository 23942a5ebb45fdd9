"""Whole modules through ``torch.save`` / ``torch.load`` and ``pickle``: every implementation, with
every built-in pattern and score mod it accepts, saves and loads alike and computes the same
function after, in one call and through a KV cache.

The built-in patterns and score mods are small callable objects (not closures, which pickle
refuses); how they compare and key compiled code is tested in the repository's tests/test_pickle.py.
"""

from __future__ import annotations

import inspect
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention
from attention import masks, score_mods
from attention.function import FunctionAttention
from attention.suite.support import assert_module_matches_oracle, mask_kinds, random_document_ids

NUM_HEADS = 4
MASKS = mask_kinds("causal", "sliding_window", "prefix_lm", "document", "per_document")
SCORES = ["none", "alibi", "softcap"]


def round_trip_or_fail(round_trip, module: torch.nn.Module, impl_name: str) -> torch.nn.Module:
    """``round_trip(module)``, or a failure that says why the module does not pickle."""
    try:
        return round_trip(module)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        why = f"{type(exc).__name__}: {exc}"
    hint = ""
    if isinstance(module, FunctionAttention) and inspect.isfunction(module.function):  # pickled by name
        hint = "; from_function's function must be importable by name (a def at a module's top level, not a lambda)"
    pytest.fail(f"{impl_name} modules do not survive {round_trip.__name__}: {why}{hint}", pytrace=False)


def assert_same_class(loaded: torch.nn.Module, module: torch.nn.Module) -> None:
    """The loaded module is of the saved one's class. A :func:`attention.from_function` class
    around a callable object is the exception: pickle copies the object, so the class is rebuilt
    around the copy: the same declaration around an object of the same type."""
    cls, saved = type(loaded), type(module)
    if not issubclass(saved, FunctionAttention) or inspect.isfunction(saved.function):
        assert cls is saved  # a function pickles by name: the cached class comes back
        return
    assert issubclass(cls, FunctionAttention) and cls.declaration == saved.declaration, (cls, saved)
    assert type(cls.function) is type(saved.function), (cls.function, saved.function)


def torch_round_trip(module: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def pickle_round_trip(module: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(module))


def saved_module(data: st.DataObject, impl_name: str, mask_kind: str, score_name: str) -> dict:
    """A module of ``impl_name`` with the pattern and score mod named, called once (flex has then
    cached a BlockMask), with its input ``(B, T, d_in)`` and the call's document ids."""
    impl = attention.get(impl_name)
    score_mod = {
        "alibi": score_mods.generate_alibi(NUM_HEADS),
        "softcap": score_mods.generate_tanh_softcap(2.0),
    }.get(score_name)
    if score_mod is not None and not impl.supports_score_mod(score_mod):
        pytest.skip(f"{impl_name} refuses score_mod={score_mod.__name__} at construction: nothing to save")
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
    torch.manual_seed(seed)
    module = impl(8, 8 * NUM_HEADS, NUM_HEADS, length, num_kv_heads=2, mask_mod=mask_mod, score_mod=score_mod)
    module = module.eval()
    x = torch.randn(batch, length, 8)  # (B, T, d_in)
    call_ids = ids if mask_kind == "document" else None  # the document pattern comes at call time
    with torch.no_grad():
        before = module(x, document_ids=call_ids)  # (B, T, d_out)
    # A prefill that holds any prefix whole, for decoding after the round trip.
    prefill = length if mask_kind == "per_document" else param
    return dict(module=module, x=x, ids=ids, call_ids=call_ids, before=before, prefill=prefill)


@pytest.mark.parametrize("score_name", SCORES)
@pytest.mark.parametrize("mask_kind", MASKS)
@settings(max_examples=max(2, settings.default.max_examples // 5))
@given(data=st.data())
def test_module_round_trip_computes_the_same(data, impl_name, mask_kind, score_name):
    case = saved_module(data, impl_name, mask_kind, score_name)
    module, x, call_ids = case["module"], case["x"], case["call_ids"]
    for round_trip in (torch_round_trip, pickle_round_trip):
        loaded = round_trip_or_fail(round_trip, module, impl_name)

        assert_same_class(loaded, module)
        assert repr(loaded) == repr(module)
        if mask_kind == "per_document":
            assert torch.equal(loaded.mask_mod.document_ids, case["ids"])
        else:
            assert loaded.mask_mod == module.mask_mod
        assert loaded.score_mod == module.score_mod
        for key, value in module.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        with torch.no_grad():
            after = loaded(x, document_ids=call_ids)  # (B, T, d_out)
        assert torch.equal(after, case["before"]), f"{impl_name} computes another function after {round_trip.__name__}"
        assert_module_matches_oracle(loaded, x, after, document_ids=call_ids, what="loaded module's output")


@pytest.mark.attention_needs("kv_cache")
@pytest.mark.parametrize("score_name", SCORES)
@pytest.mark.parametrize("mask_kind", MASKS)
@settings(max_examples=max(2, settings.default.max_examples // 5))
@given(data=st.data())
def test_loaded_module_decodes_through_a_cache(data, impl_name, mask_kind, score_name):
    """The loaded module decodes too: a prefill holding any prefix whole, then the rest."""
    case = saved_module(data, impl_name, mask_kind, score_name)
    module, x, ids, call_ids, prefill = case["module"], case["x"], case["ids"], case["call_ids"], case["prefill"]
    batch, length, _ = x.shape
    for round_trip in (torch_round_trip, pickle_round_trip):
        loaded = round_trip_or_fail(round_trip, module, impl_name)
        cache = loaded.make_kv_cache(batch, length)
        with torch.no_grad():
            cached = torch.cat(
                [
                    loaded(x[:, :prefill], kv_cache=cache, document_ids=None if call_ids is None else ids[:, :prefill]),
                    *([loaded(x[:, prefill:], kv_cache=cache, document_ids=call_ids)] if prefill < length else []),
                ],
                dim=1,
            )  # (B, T, d_out)
        what = f"loaded module's cached output after {round_trip.__name__}"
        assert_module_matches_oracle(loaded, x, cached, document_ids=call_ids, what=what)
