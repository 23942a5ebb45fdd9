"""The static KV cache: chunked decoding equals one uncached forward, and misuse fails loudly.

The law: split a sequence into a prefill and chunks of one or more tokens, feed them in order
with one cache, and the concatenated outputs are what the float64 oracle gives for the whole
sequence (ratio rule), for every implementation, plain MHA, GQA and MQA, and every pattern; so
are the gradients, where the implementation has a backward. A call that fails, before or after
writing the cache, leaves the cache as it was.

Every test here runs chunks through a cache, so each needs the ``kv_cache`` capability; patterns
other than plain causal, and packed documents, need ``masks`` too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import attention
from attention import masks
from attention.suite.support import (
    CUDA,
    DEVICE_DTYPES,
    assert_matches_oracle,
    assert_module_matches_oracle,
    grad_factor,
    mask_for,
    mask_kinds,
    oracle_and_baseline_grads,
    random_document_ids,
    sizing,
)

NUM_HEADS = 4
#: num_kv_heads for plain MHA, grouped-query (a proper divisor) and multi-query attention.
KV_HEADS = [pytest.param(NUM_HEADS, id="mha"), pytest.param(2, id="gqa"), pytest.param(1, id="mqa")]
MASK_KINDS = mask_kinds("causal", "sliding_window", "prefix_lm", "document")

#: On CUDA, flex compiles once per chunk shape and pattern, so CUDA cases use one fixed split
#: (a prefill, one-token steps and a multi-token chunk), fixed pattern parameters and one cache
#: size (the cached keys are views of the cache, whose strides follow its size: a new size is a
#: new compile of every chunk shape), and skip fp16 (bf16 covers half precision): about a hundred
#: compiles in all. On CPU all is drawn freely.
CUDA_SPLITS = (9, 1, 1, 6, 1, 1, 1, 1, 1, 1, 1)  # 24 tokens
#: A cache the sequence does not fill, in a longer context (a full cache: the CPU cases draw it).
CUDA_MAX_TOKENS = sum(CUDA_SPLITS) + 3
CUDA_CONTEXT_LENGTH = CUDA_MAX_TOKENS + 3
CACHE_DEVICE_DTYPES = [p for p in DEVICE_DTYPES if p.id != "cuda-fp16"]


def draw_splits(
    draw: st.DrawFn,
    length: int,
    prefill: st.SearchStrategy[int],
    chunk: Callable[[int], st.SearchStrategy[int]] = lambda remaining: st.integers(1, remaining),
) -> list[int]:
    """``length`` tokens cut into a prefill and then chunks drawn by ``chunk(tokens remaining)``;
    where the sizing caps the pieces (an interpreted kernel: each is a launch), the last takes the rest."""
    splits = [draw(prefill)]
    most = sizing().chunks
    while (remaining := length - sum(splits)) > 0:
        last = most is not None and len(splits) == most - 1
        splits.append(remaining if last else draw(chunk(remaining)))
    return splits


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
        chunk = lambda remaining: st.one_of(st.just(1), st.integers(1, min(remaining, 8)))  # noqa: E731
        splits = draw_splits(draw, length, st.integers(max(first, 1), length), chunk)
    length = sum(splits)
    if device == "cuda":
        context_length, max_tokens = CUDA_CONTEXT_LENGTH, CUDA_MAX_TOKENS
    else:
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


@pytest.mark.attention_needs("kv_cache")
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
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
        mask_mod=mask_for(mask_kind, case["window"], case["prefix_len"]),
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


@pytest.mark.attention_needs("kv_cache")
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
@pytest.mark.parametrize(("device", "dtype"), CACHE_DEVICE_DTYPES)
def test_chunks_after_a_cached_prefill_see_every_cached_key(device, dtype, impl_name, num_kv_heads):
    """Always one case where chunks continue a cache (the drawn splits may be one chunk): on CPU a
    prefill of 3, a chunk of 2, one token. A mask drawn top-left (SDPA's ``is_causal=True`` with fewer
    queries than keys) or a wrong query offset fails here, named as such."""
    # On CUDA the main test's own split and shapes (a chunk of 6 after a prefill of 9): nothing new compiles.
    splits = list(CUDA_SPLITS) if device == "cuda" else [3, 2, 1]
    context = CUDA_CONTEXT_LENGTH if device == "cuda" else 8
    module = build(impl_name, device, dtype, seed=11, d_in=16, d_out=NUM_HEADS * 16, num_heads=NUM_HEADS,
                   context_length=context, num_kv_heads=num_kv_heads)  # fmt: skip
    x = torch.randn(2, sum(splits), 16, generator=torch.Generator().manual_seed(11)).to(device, dtype)  # (B, T, d_in)
    cache = module.make_kv_cache(2, CUDA_MAX_TOKENS if device == "cuda" else 8)
    cached = run_chunks(module, x, splits, cache, None)  # (B, T, d_out)
    assert_module_matches_oracle(
        module, x, cached,
        what=f"output of chunks continuing a cache (splits {splits}): row i of a chunk is position q_offset + i "
        "and must see keys 0 .. q_offset + i (a causal mask drawn top-left, or a wrong q_offset?)",
    )  # fmt: skip


@pytest.mark.attention_needs("kv_cache")
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


@pytest.mark.attention_needs("kv_cache")
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


@pytest.mark.attention_needs("kv_cache")
def test_wrong_batch_size_rejected(impl_name):
    module = cpu_module(impl_name)
    cache = module.make_kv_cache(2, 8)
    run_chunks(module, torch.randn(2, 3, 8), [3], cache)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"batch_size=2.*batch 3"), torch.no_grad():
        module(torch.randn(3, 1, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.attention_needs("kv_cache")
def test_wrong_dtype_rejected(impl_name):
    module = cpu_module(impl_name)
    cache = module.make_kv_cache(1, 8, dtype=torch.float64)
    before = snapshot(cache)
    with pytest.raises(TypeError, match=r"float64.*float32"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.attention_needs("kv_cache")
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
def test_wrong_device_rejected(impl_name):
    module = cpu_module(impl_name)
    with pytest.raises(ValueError, match=r"make_kv_cache\(device='cuda'\): the module's weights are on cpu"):
        module.make_kv_cache(1, 8, device="cuda")
    cache = attention.KVCache(1, module.num_kv_heads, 8, module.head_dim, dtype=torch.float32, device="cuda")
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"kv_cache is on cuda"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.attention_needs("kv_cache")
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


@pytest.mark.attention_needs("kv_cache")
def test_cache_of_another_module_rejected(impl_name):
    # Two layers of one shape: each cache holds its own layer's keys and values.
    module, other = cpu_module(impl_name), cpu_module(impl_name)
    cache = other.make_kv_cache(1, 8)
    run_chunks(other, torch.randn(1, 3, 8), [3], cache)
    before = snapshot(cache)
    with (
        pytest.raises(ValueError, match=r"kv_cache was made by another module .* one cache per module"),
        torch.no_grad(),
    ):
        module(torch.randn(1, 2, 8), kv_cache=cache)
    assert_unchanged(cache, before)


def _first_key_seen_by_all(b, h, q_idx, kv_idx):
    """Bidirectional at key 4 (every query sees it), causal elsewhere, with no ``prefix_len`` declared."""
    return (kv_idx == 4) | (q_idx >= kv_idx)


@pytest.mark.attention_needs("kv_cache", "masks")
def test_a_pattern_showing_an_earlier_chunk_a_later_key_is_refused(impl_name):
    module = cpu_module(impl_name, mask_mod=_first_key_seen_by_all)
    cache = module.make_kv_cache(1, 8)
    run_chunks(module, torch.randn(1, 3, 8), [3], cache)
    before = snapshot(cache)
    # Queries 0..2 ran without key 4, which the pattern shows them: the chunk bringing it is refused.
    refused = r"_first_key_seen_by_all shows query 0 the key at 4, which this chunk"
    with pytest.raises(ValueError, match=refused), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
    assert_unchanged(cache, before)


@pytest.mark.attention_needs("kv_cache", "masks")  # document_ids
def test_bad_document_ids_leave_cache_unchanged(impl_name):
    module = cpu_module(impl_name)
    cache = module.make_kv_cache(1, 8)
    run_chunks(module, torch.randn(1, 3, 8), [3], cache, document_ids=torch.zeros(1, 3, dtype=torch.long))
    before = snapshot(cache)
    # ids must cover the cached positions too: (1, 3 + 2), not (1, 2)
    with pytest.raises(ValueError, match=r"document_ids must have shape.*\(1, 5\).*\(1, 2\)"), torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache, document_ids=torch.zeros(1, 2, dtype=torch.long))
    assert_unchanged(cache, before)


@pytest.mark.attention_needs("kv_cache", "masks")  # prefix_lm
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


@pytest.mark.attention_needs("kv_cache")  # else the capability is what is refused
def test_a_cache_that_is_not_a_kv_cache_rejected(impl_name):
    with pytest.raises(TypeError, match=r"kv_cache must be a KVCache"), torch.no_grad():
        cpu_module(impl_name)(torch.randn(1, 2, 8), kv_cache={"k": None})


@pytest.mark.attention_needs("kv_cache", "backward")
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_cached_call_is_refused_when_replayed(impl_name, reentrant):
    """``torch.utils.checkpoint`` replays the forward in the backward, which would write the chunk
    into the cache a second time and attend from the wrong position (docs/design.md#kv-cache-writes):
    the replay raises, naming the cache, and the cache keeps what the forward wrote."""
    module = cpu_module(impl_name)
    x = torch.randn(2, 6, 8).requires_grad_()  # (B, T, d_in)
    cache = module.make_kv_cache(2, 12)
    out = checkpoint(lambda chunk: module(chunk, kv_cache=cache), x, use_reentrant=reentrant)  # (B, T, d_out)
    assert cache.pos == 6
    before = snapshot(cache)
    with pytest.raises(RuntimeError, match=r"kv_cache cannot be written during a backward pass.*checkpoint"):
        out.backward(torch.randn_like(out))
    assert_unchanged(cache, before)


@pytest.mark.attention_needs("kv_cache")
def test_cache_made_under_inference_mode_is_refused_outside_it(impl_name):
    """Its buffers are inference tensors, which only inference mode may write in place: outside
    it, an error naming the cache (not torch's in-place error), the cache as it was, and inside
    it decoding goes on right (docs/design.md#kv-cache-writes)."""
    module = cpu_module(impl_name)
    x = torch.randn(2, 5, 8)  # (B, T, d_in)
    with torch.inference_mode():
        cache = module.make_kv_cache(2, 8)
        first = module(x[:, :3], kv_cache=cache)  # (B, 3, d_out)
    before = snapshot(cache)
    for mode in (torch.no_grad, torch.enable_grad):
        with pytest.raises(ValueError, match=r"kv_cache was made under torch.inference_mode\(\)"), mode():
            module(x[:, 3:4], kv_cache=cache)
        assert_unchanged(cache, before)
    with torch.inference_mode():
        rest = module(x[:, 3:], kv_cache=cache)  # (B, 2, d_out)
    assert_module_matches_oracle(module, x, torch.cat([first, rest], dim=1), what="output after the refused call")


# -- a call that fails after validation: the cache rolls back ---------------------------------


class Flaky:
    """A pattern (``causal``) that fails on demand: ``"raise"`` raises, ``"dtype"`` returns a
    float mask, ``"shape"`` one of the wrong shape. It only reads its mode, never mutates
    anything while called, as flex (which traces mask mods with dynamo) requires."""

    def __init__(self) -> None:
        self.mode: str | None = None

    def __call__(self, b, h, q_idx, kv_idx):
        if self.mode == "raise":
            raise RuntimeError("transient failure")
        visible = masks.causal(b, h, q_idx, kv_idx)
        if self.mode == "dtype":
            return visible.float()
        if self.mode == "shape":
            return visible.unsqueeze(0)
        return visible


def make_attend_flaky(module: attention.AttentionBase) -> Flaky:
    """Wrap ``module._attend`` so that it raises while the returned switch's mode is ``"raise"``."""
    switch, attend = Flaky(), module._attend

    def flaky_attend(*args, **kwargs):
        if switch.mode == "raise":
            raise RuntimeError("transient failure")
        return attend(*args, **kwargs)

    module._attend = flaky_attend
    return switch


FAILURES = {
    "mask-raises": (RuntimeError, "transient failure"),
    "mask-wrong-dtype": (TypeError, "mask_mod must return a bool tensor, got torch.float32"),
    "mask-wrong-shape": (ValueError, "mask_mod must return a bool tensor broadcastable to"),
    "attend-raises": (RuntimeError, "transient failure"),
}
#: A failing pattern needs a module built with one (``masks``); a failing ``_attend`` runs plain causal.
FAILURE_PARAMS = [
    pytest.param(failure, marks=() if failure == "attend-raises" else pytest.mark.attention_needs("masks"))
    for failure in FAILURES
]


@pytest.mark.attention_needs("kv_cache")
@pytest.mark.parametrize("failure", FAILURE_PARAMS)
@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_failed_call_leaves_cache_as_it_was(data, impl_name, failure):
    """A chunk whose forward fails after validation (its keys already written) leaves the cache's
    position and filled keys as they were; retrying it gives what one call on the whole sequence
    gives (oracle), as if the failure had never happened."""
    batch = data.draw(st.integers(1, 3), label="batch")
    length = data.draw(st.integers(2, 16), label="length")
    splits = draw_splits(data.draw, length, st.integers(1, length - 1))
    failing = data.draw(st.integers(0, len(splits) - 1), label="failing chunk")
    attempts = data.draw(st.integers(1, 3), label="failed attempts before the retry")
    num_kv_heads = data.draw(st.sampled_from([4, 2, 1]), label="num_kv_heads")
    seed = data.draw(st.integers(0, 2**16), label="seed")

    flaky_mask = Flaky()
    attend_fails = failure == "attend-raises"
    module = build(
        impl_name,
        "cpu",
        torch.float32,
        seed=seed,
        d_in=8,
        d_out=32,
        num_heads=4,
        context_length=length,
        num_kv_heads=num_kv_heads,
        mask_mod=masks.causal if attend_fails else flaky_mask,
    )
    target = make_attend_flaky(module) if attend_fails else flaky_mask
    mode = {"mask-wrong-dtype": "dtype", "mask-wrong-shape": "shape"}.get(failure, "raise")
    error, message = FAILURES[failure]
    x = seeded_x(batch, length, 8, seed)  # (B, T, d_in)
    cache = module.make_kv_cache(batch, length)

    outputs, start = [], 0
    with torch.no_grad():
        for i, size in enumerate(splits):
            chunk = x[:, start : start + size]  # (B, size, d_in)
            if i == failing:
                before = snapshot(cache)
                target.mode = mode
                for _ in range(attempts):
                    with pytest.raises(error, match=message):
                        module(chunk, kv_cache=cache)
                    assert cache.pos == before[0], f"cache position moved from {before[0]} to {cache.pos}"
                    filled = before[0]
                    assert torch.equal(cache.k_cache[:, :, :filled], before[1][:, :, :filled]), "cached keys changed"
                    assert torch.equal(cache.v_cache[:, :, :filled], before[2][:, :, :filled]), "cached values changed"
                target.mode = None
            outputs.append(module(chunk, kv_cache=cache))  # (B, size, d_out)
            start += size

    assert cache.pos == length
    out = torch.cat(outputs, dim=1)  # (B, T, d_out)
    assert_module_matches_oracle(module, x, out, what=f"output after {failure} in chunk {failing} of {splits}")


def seeded_x(batch: int, length: int, d_in: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, length, d_in, generator=generator)  # (B, T, d_in)


@pytest.mark.attention_needs("kv_cache")
@given(
    prefill=st.integers(1, 8),
    rejected=st.integers(1, 4),
    accepted=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_truncate_then_continue(impl_name, prefill, rejected, accepted, seed):
    """Speculative decoding's move: write draft tokens, truncate back to the prefill, write others.
    The stale keys past the position are never read: the output is the oracle's for the kept ones."""
    length = prefill + max(rejected, accepted)
    module = cpu_module(impl_name, context_length=length)
    x = seeded_x(2, prefill + accepted, 8, seed)  # (B, T, d_in), the sequence kept
    draft = seeded_x(2, rejected, 8, seed + 7)  # (B, rejected, d_in), tokens thrown away
    cache = module.make_kv_cache(2, length)
    with torch.no_grad():
        first = module(x[:, :prefill], kv_cache=cache)  # (B, prefill, d_out)
        module(draft, kv_cache=cache)
        assert cache.pos == prefill + rejected
        cache.truncate(prefill)
        assert cache.pos == prefill
        rest = module(x[:, prefill:], kv_cache=cache)  # (B, accepted, d_out)
    assert cache.pos == prefill + accepted
    assert_module_matches_oracle(module, x, torch.cat([first, rest], dim=1), what="output after truncate")


# -- gradients through the cache --------------------------------------------------------------


@pytest.mark.attention_needs("kv_cache", "backward")
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_gradients_through_cached_chunks_match_oracle(data, impl_name, mask_kind):
    """Backward through a prefill and later chunks of one cache: each chunk's queries reach the
    earlier chunks' keys and values through the cache, and the gradients of the input and every
    weight are the oracle's for one call on the whole sequence (ratio rule)."""
    batch = data.draw(st.integers(1, 3), label="batch")
    head_dim = data.draw(st.sampled_from([8, 16]), label="head_dim")
    d_in = data.draw(st.integers(4, 24), label="d_in")
    length = data.draw(st.integers(2, 20), label="length")
    window = data.draw(st.integers(1, length + 2), label="window")
    prefix_len = data.draw(st.integers(0, length - 1), label="prefix_len")
    # At least two chunks, so the cache carries keys from one to the next; a bidirectional prefix
    # must lie whole in the first.
    first = min(max(prefix_len, 1), length - 1) if mask_kind == "prefix_lm" else 1
    splits = draw_splits(data.draw, length, st.integers(first, length - 1))
    num_kv_heads = data.draw(st.sampled_from([NUM_HEADS, 2, 1]), label="num_kv_heads")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    mask_mod = mask_for(mask_kind, window, prefix_len)
    module = build(
        impl_name,
        "cpu",
        torch.float32,
        seed=seed,
        d_in=d_in,
        d_out=NUM_HEADS * head_dim,
        num_heads=NUM_HEADS,
        context_length=length,
        num_kv_heads=num_kv_heads,
        mask_mod=mask_mod,
    )
    x = seeded_x(batch, length, d_in, seed).requires_grad_()  # (B, T, d_in)
    ids = random_document_ids(batch, length, seed) if mask_kind == "document" else None
    upstream = seeded_x(batch, length, module.d_out, seed + 5)  # (B, T, d_out)
    cache = module.make_kv_cache(batch, length)
    oracle, baseline = oracle_and_baseline_grads(module, x, upstream, mask_mod, ids)
    names = ["x", *(name for name, _ in module.named_parameters())]
    factor = grad_factor(type(module), x.device)

    for sequence in range(2):  # the second reuses the cache after reset(), as a training loop does
        outputs, start = [], 0
        for size in splits:
            end = start + size
            doc = None if ids is None else ids[:, :end]  # (B, cached + size)
            outputs.append(module(x[:, start:end], kv_cache=cache, document_ids=doc))  # (B, size, d_out)
            start = end
        out = torch.cat(outputs, dim=1)  # (B, T, d_out)
        grads = torch.autograd.grad(out, [x, *module.parameters()], upstream)
        cache.reset()
        what = f"sequence {sequence}, splits {splits}"
        assert_module_matches_oracle(module, x.detach(), out.detach(), document_ids=ids, what=f"output, {what}")
        for name, grad, oracle_grad, baseline_grad in zip(names, grads, oracle, baseline, strict=True):
            assert_matches_oracle(grad, oracle_grad, baseline_grad, factor=factor, what=f"gradient of {name}, {what}")
