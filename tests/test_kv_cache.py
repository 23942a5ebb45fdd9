"""The static KV cache: chunked decoding equals one uncached forward, and misuse fails loudly.

The law: split a sequence into a prefill and chunks of one or more tokens, feed them in order
with one cache, and the concatenated outputs are what the float64 oracle gives for the whole
sequence (ratio rule), for every implementation, plain MHA, GQA and MQA, and every pattern.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attention
from attention import masks

from .support import CUDA, DEVICE_DTYPES, DEVICES, IMPL_NAMES, assert_module_matches_oracle, random_document_ids

NUM_HEADS = 4
#: num_kv_heads for plain MHA, grouped-query (a proper divisor) and multi-query attention.
KV_HEADS = [pytest.param(NUM_HEADS, id="mha"), pytest.param(2, id="gqa"), pytest.param(1, id="mqa")]
MASK_KINDS = ["causal", "sliding_window", "prefix_lm", "document"]

#: On CUDA, flex compiles once per chunk shape and pattern, so CUDA cases use one fixed split
#: (a prefill, one-token steps and a multi-token chunk) and fixed pattern parameters, and skip
#: fp16 (bf16 covers half precision): about a hundred compiles in all. On CPU all is drawn freely.
CUDA_SPLITS = (9, 1, 1, 6, 1, 1, 1, 1, 1, 1, 1)  # 24 tokens
CACHE_DEVICE_DTYPES = [p for p in DEVICE_DTYPES if p.id != "cuda-fp16"]


def make_mask(kind: str, window: int, prefix_len: int) -> masks.MaskMod:
    if kind == "sliding_window":
        return masks.sliding_window(window)
    if kind == "prefix_lm":
        return masks.prefix_lm(prefix_len)
    return masks.causal  # "causal"; "document" is causal within each document


@st.composite
def cache_cases(draw: st.DrawFn, device: str, mask_kind: str) -> dict:
    """Shapes, mask parameters and a split of the sequence into a prefill and chunks."""
    if device == "cuda":
        batch, head_dim, d_in = 2, 16, 16
        splits, window, prefix_len = list(CUDA_SPLITS), 3, 7
    else:
        batch = draw(st.integers(1, 3))
        head_dim = draw(st.sampled_from([8, 16]))
        d_in = draw(st.integers(4, 24))
        length = draw(st.integers(1, 20))
        window = draw(st.integers(1, length + 2))
        prefix_len = draw(st.integers(0, length + 2))
        # A bidirectional prefix sees keys that come later, so the prefill must hold all of it.
        first = min(prefix_len, length) if mask_kind == "prefix_lm" else 1
        splits = [draw(st.integers(max(first, 1), length))]
        while sum(splits) < length:
            remaining = length - sum(splits)
            splits.append(draw(st.one_of(st.just(1), st.integers(1, min(remaining, 8)))))
    length = sum(splits)
    context_length = draw(st.integers(length, length + 8))
    max_tokens = draw(st.integers(length, context_length))
    seed = draw(st.integers(0, 2**16))
    return dict(
        batch=batch,
        head_dim=head_dim,
        d_in=d_in,
        splits=splits,
        window=window,
        prefix_len=prefix_len,
        context_length=context_length,
        max_tokens=max_tokens,
        seed=seed,
    )


def build(impl_name: str, device: str, dtype: torch.dtype, *, seed: int, **kwargs) -> attention.AttentionBase:
    """A seeded module of ``impl_name`` in ``dtype`` on ``device`` (weights drawn in fp32 on CPU)."""
    torch.manual_seed(seed)
    module = attention.get(impl_name)(**kwargs)
    return module.to(device=device, dtype=dtype).eval()


def run_chunks(
    module: attention.AttentionBase,
    x: torch.Tensor,
    splits: list[int],
    cache: attention.KVCache,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``x`` ``(B, T, d_in)`` chunk by chunk through ``cache``; the outputs concatenated."""
    outputs, start = [], 0
    with torch.no_grad():
        for size in splits:
            end = start + size
            ids = None if document_ids is None else document_ids[:, :end]  # (B, cached + size)
            outputs.append(module(x[:, start:end], kv_cache=cache, document_ids=ids))  # (B, size, d_out)
            start = end
    return torch.cat(outputs, dim=1)  # (B, T, d_out)


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize(("device", "dtype"), CACHE_DEVICE_DTYPES)
@settings(max_examples=max(2, settings.default.max_examples // 3))  # 36 cases per device already
@given(data=st.data())
def test_chunked_decoding_matches_one_forward(data, device, dtype, impl_name, num_kv_heads, mask_kind):
    case = data.draw(cache_cases(device, mask_kind), label="case")
    splits, length = case["splits"], sum(case["splits"])
    module = build(
        impl_name,
        device,
        dtype,
        seed=case["seed"],
        d_in=case["d_in"],
        d_out=NUM_HEADS * case["head_dim"],
        num_heads=NUM_HEADS,
        context_length=case["context_length"],
        num_kv_heads=num_kv_heads,
        mask_mod=make_mask(mask_kind, case["window"], case["prefix_len"]),
    )
    generator = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["batch"], length, case["d_in"], generator=generator).to(device, dtype)  # (B, T, d_in)
    document_ids = None
    if mask_kind == "document":
        document_ids = random_document_ids(case["batch"], length, case["seed"]).to(device)  # (B, T)
    cache = module.make_kv_cache(case["batch"], case["max_tokens"])

    cached = run_chunks(module, x, splits, cache, document_ids)  # (B, T, d_out)

    assert cache.pos == length
    assert cached.dtype == dtype and cached.device.type == device
    assert_module_matches_oracle(module, x, cached, document_ids=document_ids, what=f"cached output, splits {splits}")


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
def test_reset_starts_a_new_sequence(device, dtype, impl_name):
    module = build(impl_name, device, dtype, seed=1, d_in=12, d_out=32, num_heads=2, context_length=16)
    first = torch.randn(2, 9, 12).to(device, dtype)  # (B, T, d_in)
    second = torch.randn(2, 11, 12).to(device, dtype)  # (B, T, d_in)
    cache = module.make_kv_cache(2, 16)
    run_chunks(module, first, [5, 1, 3], cache)

    cache.reset()
    assert cache.pos == 0
    out = run_chunks(module, second, [4, 1, 1, 5], cache)  # (B, T, d_out)

    assert cache.pos == 11
    assert_module_matches_oracle(module, second, out, what="output after reset()")


# -- misuse: clear errors, and a cache left exactly as it was ---------------------------------


def snapshot(cache: attention.KVCache) -> tuple[int, torch.Tensor, torch.Tensor]:
    return cache.pos, cache.k_cache.clone(), cache.v_cache.clone()


def assert_unchanged(cache: attention.KVCache, before: tuple[int, torch.Tensor, torch.Tensor]) -> None:
    pos, k, v = before
    assert cache.pos == pos, f"cache position moved from {pos} to {cache.pos} on a failed call"
    assert torch.equal(cache.k_cache, k), "cached keys changed on a failed call"
    assert torch.equal(cache.v_cache, v), "cached values changed on a failed call"


def cpu_module(impl_name: str, **kwargs) -> attention.AttentionBase:
    args = dict(d_in=8, d_out=32, num_heads=4, context_length=16) | kwargs
    return build(impl_name, "cpu", torch.float32, seed=0, **args)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_overflow_raises_and_leaves_cache_unchanged(impl_name):
    module = cpu_module(impl_name)
    x = torch.randn(2, 10, 8)  # (B, T, d_in)
    cache = module.make_kv_cache(2, 8)
    first = run_chunks(module, x[:, :6], [6], cache)  # (B, 6, d_out)
    before = snapshot(cache)

    with pytest.raises(ValueError, match=r"overflow.*6 positions filled \+ 3 new.*max_tokens=8"), torch.no_grad():
        module(x[:, 6:9], kv_cache=cache)
    assert_unchanged(cache, before)

    # The cache still works: the chunks that fit give the right answer.
    more = run_chunks(module, x[:, 6:8], [1, 1], cache)  # (B, 2, d_out)
    assert cache.pos == 8
    assert_module_matches_oracle(module, x[:, :8], torch.cat([first, more], dim=1), what="output after overflow")


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_wrong_batch_size_rejected(impl_name):
    module = cpu_module(impl_name)
    cache = module.make_kv_cache(2, 8)
    run_chunks(module, torch.randn(2, 3, 8), [3], cache)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"batch_size=2.*batch 3"), torch.no_grad():
        module(torch.randn(3, 1, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_wrong_dtype_rejected(impl_name):
    module = cpu_module(impl_name)
    cache = module.make_kv_cache(1, 8, dtype=torch.float64)
    before = snapshot(cache)
    with pytest.raises(TypeError, match=r"float64.*float32"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_wrong_device_rejected(impl_name):
    module = cpu_module(impl_name)
    cache = module.make_kv_cache(1, 8, device="cuda")
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"kv_cache is on cuda"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize(
    ("other", "what"),
    [
        pytest.param(dict(num_kv_heads=2), "2 heads of dim 8", id="kv-heads"),
        pytest.param(dict(d_out=64, num_heads=4), "4 heads of dim 16", id="head-dim"),
    ],
)
def test_cache_of_other_head_config_rejected(impl_name, other, what):
    module = cpu_module(impl_name)  # 4 KV heads of dim 8
    cache = cpu_module(impl_name, **other).make_kv_cache(1, 8)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=rf"kv_cache holds {what}.*4 KV heads of dim 8"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_bad_document_ids_leave_cache_unchanged(impl_name):
    module = cpu_module(impl_name)
    cache = module.make_kv_cache(1, 8)
    run_chunks(module, torch.randn(1, 3, 8), [3], cache, document_ids=torch.zeros(1, 3, dtype=torch.long))
    before = snapshot(cache)
    # ids must cover the cached positions too: (1, 3 + 2), not (1, 2)
    with pytest.raises(ValueError, match=r"document_ids must have shape.*\(1, 5\).*\(1, 2\)"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache, document_ids=torch.zeros(1, 2, dtype=torch.long))
    assert_unchanged(cache, before)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_prefix_split_across_chunks_rejected(impl_name):
    """Prefix queries see later prefix keys: a cache continued inside the prefix would differ
    from one call, so it is refused; the prefix whole in the first chunk is fine."""
    module = cpu_module(impl_name, mask_mod=masks.prefix_lm(5))
    x = torch.randn(1, 8, 8)  # (B, T, d_in)
    cache = module.make_kv_cache(1, 8)
    run_chunks(module, x[:, :3], [3], cache)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"prefix_len=5.*cache ends at 3.*whole prefix in the first chunk"):
        run_chunks(module, x[:, 3:4], [1], cache)
    assert_unchanged(cache, before)
    cache.reset()
    out = run_chunks(module, x, [5, 1, 2], cache)  # (B, T, d_out)
    assert_module_matches_oracle(module, x, out, what="prefix_lm output, prefix in the prefill")


def test_flex_without_backward_leaves_cache_unchanged():
    """flex has no backward on CPU: asking for one fails before the cache is written."""
    module = cpu_module("flex")
    cache = module.make_kv_cache(1, 8)
    run_chunks(module, torch.randn(1, 3, 8), [3], cache)
    before = snapshot(cache)
    with pytest.raises(NotImplementedError, match=r"no_grad"):
        module(torch.randn(1, 2, 8), kv_cache=cache)  # grad mode on, weights require grad
    assert_unchanged(cache, before)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_make_kv_cache_validates(impl_name):
    module = cpu_module(impl_name)  # context_length 16
    with pytest.raises(ValueError, match=r"max_tokens \(17\) exceeds context_length \(16\)"):
        module.make_kv_cache(1, 17)
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1, got 0"):
        module.make_kv_cache(1, 0)
    with pytest.raises(TypeError, match=r"max_tokens must be an int, got float"):
        module.make_kv_cache(1, 8.0)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        module.make_kv_cache(0, 8)
    with pytest.raises(TypeError, match=r"kv_cache must be a KVCache"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache={"k": None})


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
