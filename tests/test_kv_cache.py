"""The static KV cache itself, and built-ins' own behaviour with one.

The laws every implementation must keep with a cache (chunked decoding equals one forward,
misuse leaves the cache as it was) are in the property suite, attention/suite/test_kv_cache.py.
"""

from __future__ import annotations

import re

import pytest
import torch

import attention
from attention.suite.support import DEVICES, assert_module_matches_oracle


def test_flex_without_backward_leaves_cache_unchanged():
    """flex has no backward on CPU: asking for one fails before the cache is written."""
    module = attention.get("flex")(8, 32, 4, 16).eval()
    cache = module.make_kv_cache(1, 8)
    with torch.no_grad():
        module(torch.randn(1, 3, 8), kv_cache=cache)
    pos, keys, values = cache.pos, cache.k_cache.clone(), cache.v_cache.clone()
    with pytest.raises(NotImplementedError, match=r"no_grad"):
        module(torch.randn(1, 2, 8), kv_cache=cache)  # grad mode on, weights require grad
    assert cache.pos == pos, f"cache position moved from {pos} to {cache.pos} on a failed call"
    assert torch.equal(cache.k_cache, keys) and torch.equal(cache.v_cache, values), "cache changed on a failed call"


@pytest.mark.parametrize("device", DEVICES)
def test_cache_layout(device):
    """The cache stores only the KV heads, in the weights' dtype and device by default."""
    module = attention.get("sdpa")(8, 32, 4, 16, num_kv_heads=2).to(device)
    cache = module.make_kv_cache(3, 10)
    assert cache.k_cache.shape == cache.v_cache.shape == (3, 2, 10, 8)
    assert cache.k_cache.dtype == torch.float32 and cache.k_cache.device.type == device
    assert cache.batch_size == 3 and cache.max_tokens == 10 and cache.pos == 0
    wide = module.make_kv_cache(1, 4, dtype=torch.float64)
    assert wide.k_cache.dtype == torch.float64


@pytest.mark.parametrize(
    ("dtype", "error", "message"),
    [
        ("float32", TypeError, r"dtype must be a torch\.dtype such as torch\.float32, got str \('float32'\)"),
        (torch.int64, ValueError, r"dtype must be a floating-point dtype, got torch\.int64"),
        (torch.bool, ValueError, r"dtype must be a floating-point dtype, got torch\.bool"),
    ],
    ids=["str", "int64", "bool"],
)
def test_cache_dtype_is_checked_when_made(dtype, error, message):
    """A cache no forward could write (integer keys, a dtype's name) is refused where it is made,
    not at every later call."""
    module = attention.get("sdpa")(8, 32, 4, 16)
    with pytest.raises(error, match=message):
        module.make_kv_cache(1, 4, dtype=dtype)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", "device must be a torch device such as 'cpu' or 'cuda', got 'bogus'"),
        ("meta", "make_kv_cache(device='meta'): the module's weights are on cpu"),
    ],
)
def test_cache_device_is_checked_when_made(device, message):
    """A cache on a device the module does not run on is refused where it is made (a device
    without a GPU build raised torch's AssertionError, "meta" passed until the first call)."""
    module = attention.get("sdpa")(8, 32, 4, 16)
    with pytest.raises(ValueError, match=re.escape(message)):
        module.make_kv_cache(1, 4, device=device)
    for same in ("cpu", "cpu:0", torch.device("cpu", 0)):
        assert module.make_kv_cache(1, 4, device=same).k_cache.device == torch.device("cpu")


def test_truncate_validates():
    module = attention.get("sdpa")(8, 32, 4, 16).eval()
    cache = module.make_kv_cache(1, 8)
    with torch.no_grad():
        module(torch.randn(1, 3, 8), kv_cache=cache)
    with pytest.raises(ValueError, match=r"cannot truncate kv_cache to 4 positions: only 3 are filled"):
        cache.truncate(4)
    with pytest.raises(ValueError, match=r"pos must be >= 0, got -1"):
        cache.truncate(-1)
    with pytest.raises(TypeError, match=r"pos must be an int, got float"):
        cache.truncate(1.0)
    assert cache.pos == 3
    cache.truncate(3)
    assert cache.pos == 3


def test_compiled_decoding_with_a_pattern_of_the_users_own():
    """The earlier-chunk check is data-dependent: under torch.compile(fullgraph=True) it is left
    out (a data-dependent branch cannot be traced), and the owner check still refuses another
    module's cache."""

    def gym_causal(b, h, q_idx, kv_idx):  # causal, written as attention-gym writes it
        return q_idx >= kv_idx

    torch._dynamo.reset()
    module = attention.get("sdpa")(16, 16, 2, 64, mask_mod=gym_causal).eval()
    x = torch.randn(1, 6, 16)  # (B, T, d_in)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    with torch.no_grad():
        cache = module.make_kv_cache(1, 8)
        chunked = torch.cat([compiled(x[:, :4], kv_cache=cache), compiled(x[:, 4:], kv_cache=cache)], dim=1)
    assert_module_matches_oracle(module, x, chunked, what="compiled cached output")
    with torch.no_grad():
        other = attention.get("sdpa")(16, 16, 2, 64, mask_mod=gym_causal).eval()
        # fullgraph=True: dynamo reports the ValueError as its own "Observed exception", quoting it.
        with pytest.raises(Exception, match="kv_cache was made by another module"):
            torch.compile(other, fullgraph=True, backend="eager")(x[:, :2], kv_cache=module.make_kv_cache(1, 8))


def test_a_pattern_of_the_users_own_is_cleared_once_for_the_whole_cache():
    """A causal pattern written as a lambda is evaluated once over the cache's length, not at every
    decode step; a bidirectional one is checked at each cached call and refused where it must be."""
    calls = []

    def counted_causal(b, h, q_idx, kv_idx):
        calls.append(tuple(kv_idx.shape))
        return q_idx >= kv_idx

    module = attention.get("sdpa")(16, 16, 2, 64, mask_mod=counted_causal).eval()
    x = torch.randn(1, 12, 16)  # (B, T, d_in)
    cache = module.make_kv_cache(1, 12)
    with torch.no_grad():
        module(x[:, :4], kv_cache=cache)
        module(x[:, 4:5], kv_cache=cache)
        cleared = len(calls)
        steps = torch.cat([module(x[:, t : t + 1], kv_cache=cache) for t in range(5, 12)], dim=1)  # (B, 7, d_out)
    evaluated_per_step = (len(calls) - cleared) / 7
    # Once a step is the module's own mask (SDPA builds it per call); the check would add two more.
    assert evaluated_per_step <= 1, f"the pattern was evaluated {evaluated_per_step} times a step after clearing"
    assert_module_matches_oracle(module, x, torch.cat([module(x)[:, :5], steps], dim=1), what="cleared decoding")
