"""Score modifiers (ALiBi, tanh soft-capping): one ``score_mod`` definition wherever it can run.

Every implementation that accepts a score mod matches the float64 oracle (which applies the
same function to the dense scores) by the ratio rule, in one call and through the KV cache, with
any pattern; one that cannot express it refuses it at construction, or when assigned later.
Scores that overflow fp16 before scaling, though the scaled ones fit, stay finite and right in
every implementation. The score mod functions themselves are tested in the repository's
tests/test_score_mods.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attention
from attention import score_mods
from attention.suite.support import (
    DEVICE_DTYPES,
    assert_matches_oracle,
    assert_module_matches_oracle,
    mask_for,
    random_document_ids,
)


def position_bias(score, b, h, q_idx, kv_idx):
    """An additive bias on absolute positions, not on ``kv - q`` alone: evaluated at the wrong query
    position (a KV cache's offset left out) it gives other weights, where ALiBi's error would be
    the same for every key of a row, and cancel in the softmax."""
    return score + 0.5 * ((q_idx + 2 * kv_idx) % 3 == 0).to(score.dtype)


position_bias.additive = True  # type: ignore[attr-defined]  # score_mods.is_additive reads it

NUM_HEADS = 4
SCORE_MODS = {
    "alibi": lambda: score_mods.generate_alibi(NUM_HEADS),
    "softcap": lambda: score_mods.generate_tanh_softcap(2.0),  # small enough to bind: scores reach ~±4
    "position": lambda: position_bias,
}
PATTERNS = ["causal", "sliding_window", "prefix_lm", "document"]
#: fp16 skipped on CUDA (bf16 covers half precision): each pattern is several flex compiles there.
SCORE_DEVICE_DTYPES = [p for p in DEVICE_DTYPES if p.id != "cuda-fp16"]


@pytest.mark.attention_needs("masks", "kv_cache")  # every pattern, in one call and through a cache
@pytest.mark.parametrize("score_name", list(SCORE_MODS))
@pytest.mark.parametrize(("device", "dtype"), SCORE_DEVICE_DTYPES)
@settings(max_examples=max(2, settings.default.max_examples // 3))
@given(data=st.data())
def test_score_mod_matches_oracle_with_and_without_cache(data, device, dtype, impl_name, score_name):
    impl, score_mod = attention.get(impl_name), SCORE_MODS[score_name]()
    kind = data.draw(st.sampled_from(PATTERNS), label="pattern")
    if device == "cuda":  # a short menu: each new shape or pattern is a new flex compile
        batch, length, num_kv_heads, head_dim, window, prefix_len, prefill = 2, 40, 2, 16, 7, 5, 9
    else:
        batch = data.draw(st.integers(1, 3), label="batch")
        length = data.draw(st.integers(2, 40), label="length")
        num_kv_heads = data.draw(st.sampled_from([NUM_HEADS, 2, 1]), label="num_kv_heads")
        head_dim = data.draw(st.sampled_from([8, 16]), label="head_dim")
        window = data.draw(st.integers(1, length), label="window")
        prefix_len = data.draw(st.integers(0, length), label="prefix_len")
        prefill = data.draw(st.integers(max(prefix_len, 1), length), label="prefill")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    mask_mod = mask_for(kind, window, prefix_len)
    args = (12, NUM_HEADS * head_dim, NUM_HEADS, length)
    if not impl.supports_score_mod(score_mod):
        with pytest.raises(ValueError, match=rf"cannot express score_mod={score_mod.__name__}"):
            impl(*args, num_kv_heads=num_kv_heads, mask_mod=mask_mod, score_mod=score_mod)
        return

    torch.manual_seed(seed)
    module = impl(*args, num_kv_heads=num_kv_heads, mask_mod=mask_mod, score_mod=score_mod)
    module = module.to(device=device, dtype=dtype).eval()
    x = (2 * torch.randn(batch, length, 12)).to(device, dtype)  # (B, T, d_in); scaled up so the cap binds
    ids = None
    if kind == "document":
        ids = random_document_ids(batch, length, seed).to(device)  # (B, T)
    with torch.no_grad():
        out = module(x, document_ids=ids)  # (B, T, d_out)
        cache = module.make_kv_cache(batch, length)
        chunks = [(0, prefill), *((t, t + 1) for t in range(prefill, min(prefill + 3, length)))]
        if chunks[-1][1] < length:
            chunks.append((chunks[-1][1], length))
        cached = torch.cat(
            [module(x[:, a:b], kv_cache=cache, document_ids=None if ids is None else ids[:, :b]) for a, b in chunks],
            dim=1,
        )  # (B, T, d_out)
    assert_module_matches_oracle(module, x, out, document_ids=ids, what=f"{score_name} + {kind} output")
    assert_module_matches_oracle(module, x, cached, document_ids=ids, what=f"{score_name} + {kind} cached output")


@pytest.mark.attention_needs("masks", "zero_empty_rows")
def test_fully_masked_rows_stay_zero_with_score_mods(impl_name):
    def hide_first_two(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx >= 2)

    impl = attention.get(impl_name)
    score_mod = score_mods.generate_alibi(NUM_HEADS)
    if not impl.supports_score_mod(score_mod):
        pytest.skip(f"{impl_name} does not apply score mods such as {score_mod.__name__}")
    module = impl(8, 32, NUM_HEADS, 9, mask_mod=hide_first_two, score_mod=score_mod).eval()
    with torch.no_grad():
        out = module(torch.randn(2, 9, 8))  # (B, T, d_out)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :2], module.proj.bias.detach().expand(2, 2, -1))


# -- argument validation ---------------------------------------------------------------------


def test_modules_validate_score_mod(impl_name):
    impl = attention.get(impl_name)
    with pytest.raises(TypeError, match=r"score_mod must be callable.*got int"):
        impl(8, 32, NUM_HEADS, 8, score_mod=3)
    if impl.supports_score_mod(score_mods.generate_alibi(8)):
        with pytest.raises(ValueError, match=r"score_mod=alibi_8 was made for num_heads=8, this module has 4"):
            impl(8, 32, NUM_HEADS, 8, score_mod=score_mods.generate_alibi(8))
        module = impl(8, 32, NUM_HEADS, 8, score_mod=score_mods.generate_alibi(NUM_HEADS))
        assert "score_mod=alibi_4" in repr(module)


@given(data=st.data())
def test_reassigned_score_mod_is_used(data, impl_name):
    """Assign ``module.score_mod`` after a call: the next call applies the new one (flex keys its
    compiled code on it), ``None`` included; one the implementation cannot express is refused
    and leaves the old one in place."""
    impl = attention.get(impl_name)
    choices = [None, *SCORE_MODS]
    order = data.draw(st.lists(st.sampled_from(choices), min_size=2, max_size=4), label="score mods in turn")
    length = data.draw(st.integers(1, 30), label="length")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    module = impl(12, 32, NUM_HEADS, length, num_kv_heads=2).eval()
    x = 2 * torch.randn(2, length, 12)  # (B, T, d_in); scaled up so the cap binds
    for i, name in enumerate(order):
        score_mod = None if name is None else SCORE_MODS[name]()
        if score_mod is not None and not impl.supports_score_mod(score_mod):
            kept = module.score_mod
            with pytest.raises(ValueError, match=r"cannot express score_mod"):
                module.score_mod = score_mod
            assert module.score_mod is kept
            continue
        module.score_mod = score_mod
        with torch.no_grad():
            out = module(x)  # (B, T, d_out)
        set_before = f", after setting {order[:i]} in turn" if i else ""
        assert_module_matches_oracle(module, x, out, what=f"output with score_mod={name} (call {i}{set_before})")


# -- large scores in half precision ------------------------------------------------------------


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _cpu_supports(torch.float16), reason="this torch build has no fp16 matmul on CPU")
# A parameter, so that an implementation declaring dtypes without fp16 is skipped by name.
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16")])
@settings(max_examples=max(4, settings.default.max_examples))
@given(data=st.data())
def test_fp16_scores_that_overflow_before_scaling(data, impl_name, dtype):
    """In fp16, ``q·k`` can exceed 65504 while the scaled score ``q·k / sqrt(hd)`` fits: an
    implementation that scales after the product gets inf, then NaN. Every implementation must
    stay finite and match the float64 oracle by the ratio rule, against the project's baseline
    and against PyTorch's own math attention on the fp16 inputs (which scales first and reduces
    in fp32, so stays accurate where the project's baseline overflows); from-scratch
    ``attention_weights`` match float64 weights.

    Scores this large are rounded by whole units in fp16, so nearly tied keys would make every
    implementation's softmax a coin toss. The tokens are therefore one random direction at
    distinct magnitudes (levels 5% apart, in random order): each head then favours the largest or
    the smallest magnitude by a margin far above rounding. A head whose q and k projections of
    that direction nearly cancel gets logits of a few units that are differences of large
    products: an implementation must not round them away (the test after this one).
    """
    head_dim = data.draw(st.sampled_from([16, 32, 64]), label="head_dim")
    length = data.draw(st.integers(2, 24), label="length")
    batch = data.draw(st.integers(1, 2), label="batch")
    base = data.draw(st.floats(100.0, 220.0), label="input magnitude")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    # The case this test is for: a visible unscaled product overflows fp16, the scaled ones fit.
    assume(check_fp16_overflow_case(impl_name, dtype, head_dim, length, batch, base, seed))


@pytest.mark.skipif(not _cpu_supports(torch.float16), reason="this torch build has no fp16 matmul on CPU")
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16")])
def test_fp16_small_logits_of_long_vectors_keep_their_accuracy(impl_name, dtype):
    """A case the random profile found: one head's logits are a few units (a margin of 6 between
    its two largest) although its q and k rows are hundreds long, so the logits are differences of
    large products. Rounding ``q * scale`` to fp16 before the product moved them by up to 7 and
    from_scratch's output by 17 (math attention's error: 0.2); scaled inside the product's fp32
    accumulator it keeps the baseline's accuracy (docs/design.md#fp16-logits)."""
    assert check_fp16_overflow_case(impl_name, dtype, head_dim=32, length=19, batch=1, base=149.75, seed=857)


def check_fp16_overflow_case(
    impl_name: str, dtype: torch.dtype, head_dim: int, length: int, batch: int, base: float, seed: int
) -> bool:
    """Run the overflow checks on this draw of tokens (see the property above); ``False``, checking
    nothing, where no visible unscaled product overflows fp16 or the scaled ones would not fit."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(64, generator=gen)  # (d_in,)
    levels = 1.05 ** torch.randperm(length, generator=gen).float()  # (T,)
    noise = 1e-3 * torch.randn(batch, length, 64, generator=gen)  # (B, T, d_in)
    x = (base * levels.view(1, -1, 1) * (direction + noise)).to(dtype)  # (B, T, d_in)
    torch.manual_seed(seed)
    module = attention.get(impl_name)(64, 64, 64 // head_dim, length).eval().to(dtype)

    with torch.no_grad():
        q, k, v, _ = module._project(x, None, None)  # (B, H, T, hd) each
        raw = q.float() @ k.float().transpose(-2, -1)  # (B, H, T, T) the unscaled product, in fp32
        visible = torch.ones(length, length, dtype=torch.bool).tril()  # (T, T)
        largest = raw[..., visible].abs().max().item()
        if not largest > torch.finfo(torch.float16).max > 2 * largest * module.scale:
            return False
        out = module(x)  # (B, T, d_out)
        math_context, math_weights = torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, is_causal=True, scale=module.scale
        )  # (B, H, T, hd), (B, H, T, T)
        math_out = module._merge(math_context)  # (B, T, d_out)

    what = f"{impl_name} fp16 output, |q·k| up to {largest:.0f}"
    finite = bool(torch.isfinite(out).all())  # a bare bool: pytest would print the tensor under the message
    assert finite, (
        f"{what}: NaN or inf although the scaled scores fit fp16, so q·k overflowed before it was "
        "scaled: scale inside the product's fp32 accumulation (torch.baddbmm(..., alpha=scale), or "
        "scores computed in fp32), or declare dtypes= without torch.float16 (from_function(..., dtypes=...))"
    )
    assert_module_matches_oracle(module, x, out, what=what)
    assert_matches_oracle(out, attention.reference_forward(module, x), math_out, what=f"{what}, vs math attention")
    if hasattr(module, "attention_weights"):
        weights = module.attention_weights(x)  # (B, H, T, T)
        exact = copy.deepcopy(module).double().attention_weights(x.double())  # (B, H, T, T) float64
        weights_finite = bool(torch.isfinite(weights).all())
        assert weights_finite, "NaN or inf in fp16 attention_weights although the scaled scores fit fp16"
        assert_matches_oracle(weights, exact, math_weights, what="fp16 attention_weights, vs math attention")
    return True
