"""Score modifiers (ALiBi, tanh soft-capping): one ``score_mod`` definition wherever it can run.

Every implementation that accepts a score mod matches the float64 oracle (which applies the
same function to the dense scores) by the ratio rule, in one call and through the KV cache, with
any pattern; one that cannot express it (SDPA and soft-capping) refuses it at construction, or
when assigned later. Scores that overflow fp16 before scaling, though the scaled ones fit, stay
finite and right in every implementation.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attention
from attention import score_mods

from .support import (
    DEVICE_DTYPES,
    IMPL_NAMES,
    assert_matches_oracle,
    assert_module_matches_oracle,
    mask_for,
    random_document_ids,
)

NUM_HEADS = 4
SCORE_MODS = {
    "alibi": lambda: score_mods.generate_alibi(NUM_HEADS),
    "softcap": lambda: score_mods.generate_tanh_softcap(2.0),  # small enough to bind: scores reach ~±4
}
PATTERNS = ["causal", "sliding_window", "prefix_lm", "document"]
#: fp16 skipped on CUDA (bf16 covers half precision): each pattern is several flex compiles there.
SCORE_DEVICE_DTYPES = [p for p in DEVICE_DTYPES if p.id != "cuda-fp16"]


@pytest.mark.parametrize("score_name", list(SCORE_MODS))
@pytest.mark.parametrize("impl_name", IMPL_NAMES)
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


def test_score_mods_change_the_output():
    """The oracle is not vacuous: each score mod moves the result away from plain attention."""
    torch.manual_seed(0)
    x = 2 * torch.randn(2, 30, 12)  # (B, T, d_in)
    plain = attention.get("from_scratch")(12, 32, NUM_HEADS, 30)
    for make in SCORE_MODS.values():
        modded = attention.get("from_scratch")(12, 32, NUM_HEADS, 30, score_mod=make())
        modded.load_state_dict(plain.state_dict())
        with torch.no_grad():
            assert (modded(x) - plain(x)).abs().max() > 1e-3


def test_alibi_slopes_and_bias():
    """Slopes 2**(-8(h+1)/H) (1/2 ... 1/256 for 8 heads); bias slope * (kv - q), 0 on the diagonal."""
    bias = score_mods.dense_bias(score_mods.generate_alibi(8), 2, 8, 5, 7, torch.device("cpu"), q_offset=2)
    assert bias.shape == (1, 8, 5, 7)
    slopes = bias[0, :, 0, 2] - bias[0, :, 0, 1]  # one key nearer, per head
    assert torch.allclose(slopes, torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    q_idx = torch.arange(2, 7).view(-1, 1)  # (Tq, 1) absolute positions
    kv_idx = torch.arange(7).view(1, -1)  # (1, Tk)
    assert torch.allclose(bias[0, 2], 2.0**-3 * (kv_idx - q_idx).float())


def test_softcap_bounds_scores():
    cap = 3.0
    scores = torch.linspace(-100, 100, 201, dtype=torch.float64).view(1, 1, 1, -1)  # (1, 1, 1, Tk)
    capped = score_mods.apply_dense(score_mods.generate_tanh_softcap(cap), scores)
    assert capped.abs().max() <= cap and torch.all(capped.diff(dim=-1) >= 0)  # bounded, order kept
    assert torch.allclose(capped, cap * torch.tanh(scores / cap))
    assert math.isclose(capped[0, 0, 0, 100].item(), 0.0, abs_tol=1e-12)


def test_fully_masked_rows_stay_zero_with_score_mods():
    def hide_first_two(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx >= 2)

    for impl_name in IMPL_NAMES:
        impl = attention.get(impl_name)
        score_mod = score_mods.generate_alibi(NUM_HEADS)
        if not impl.supports_score_mod(score_mod):
            continue
        module = impl(8, 32, NUM_HEADS, 9, mask_mod=hide_first_two, score_mod=score_mod).eval()
        with torch.no_grad():
            out = module(torch.randn(2, 9, 8))  # (B, T, d_out)
        assert torch.isfinite(out).all()
        assert torch.equal(out[:, :2], module.proj.bias.detach().expand(2, 2, -1)), impl_name


# -- argument validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "value", "error", "message"),
    [
        (score_mods.generate_alibi, 0, ValueError, r"num_heads must be >= 1, got 0"),
        (score_mods.generate_alibi, 2.0, TypeError, r"num_heads must be an int, got float"),
        (score_mods.generate_alibi, True, TypeError, r"num_heads must be an int, got bool"),
        (score_mods.generate_tanh_softcap, 0, ValueError, r"cap must be a finite number > 0, got 0"),
        (score_mods.generate_tanh_softcap, -1.5, ValueError, r"cap must be a finite number > 0, got -1.5"),
        (score_mods.generate_tanh_softcap, math.inf, ValueError, r"cap must be a finite number > 0, got inf"),
        (score_mods.generate_tanh_softcap, math.nan, ValueError, r"cap must be a finite number > 0, got nan"),
        (score_mods.generate_tanh_softcap, "2", TypeError, r"cap must be a float, got str"),
        (score_mods.generate_tanh_softcap, True, TypeError, r"cap must be a float, got bool"),
    ],
)
def test_factories_validate_arguments(factory, value, error, message):
    with pytest.raises(error, match=message):
        factory(value)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_modules_validate_score_mod(impl_name):
    impl = attention.get(impl_name)
    with pytest.raises(TypeError, match=r"score_mod must be callable.*got int"):
        impl(8, 32, NUM_HEADS, 8, score_mod=3)
    if impl.supports_score_mod(score_mods.generate_alibi(8)):
        with pytest.raises(ValueError, match=r"score_mod=alibi_8 was made for num_heads=8, this module has 4"):
            impl(8, 32, NUM_HEADS, 8, score_mod=score_mods.generate_alibi(8))
        module = impl(8, 32, NUM_HEADS, 8, score_mod=score_mods.generate_alibi(NUM_HEADS))
        assert "score_mod=alibi_4" in repr(module)


def test_sdpa_rejects_softcap_by_name():
    with pytest.raises(
        ValueError, match=r"MHAPyTorchScaledDotProduct cannot express score_mod=tanh_softcap_2.*additive"
    ):
        attention.get("sdpa")(8, 32, NUM_HEADS, 8, score_mod=score_mods.generate_tanh_softcap(2.0))


def test_an_implementation_must_opt_in_to_score_mods():
    """A subclass with its own ``_attend`` has not said it applies score mods: refused, never ignored."""

    class OwnAttention(attention.AttentionBase):
        def _attend(self, q, k, v, *, q_offset, document_ids):
            return q

    with pytest.raises(ValueError, match=r"OwnAttention cannot express score_mod=alibi_4.*does not apply score mods"):
        OwnAttention(8, 32, NUM_HEADS, 8, score_mod=score_mods.generate_alibi(NUM_HEADS))
    OwnAttention(8, 32, NUM_HEADS, 8)  # without one it is fine


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
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
        assert_module_matches_oracle(module, x, out, what=f"call {i} with score_mod {name} after {order[:i]}")


# -- large scores in half precision ------------------------------------------------------------


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _cpu_supports(torch.float16), reason="this torch build has no fp16 matmul on CPU")
@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@settings(max_examples=max(4, settings.default.max_examples))
@given(data=st.data())
def test_fp16_scores_that_overflow_before_scaling(data, impl_name):
    """In fp16, ``q·k`` can exceed 65504 while the scaled score ``q·k / sqrt(hd)`` fits: an
    implementation that scales after the product gets inf, then NaN. Every implementation must
    stay finite and match the float64 oracle by the ratio rule, against the project's baseline
    and against PyTorch's own math attention in fp16 (which scales first, so stays accurate where
    the project's baseline overflows); from-scratch ``attention_weights`` match float64 weights.

    Scores this large are rounded by whole units in fp16, so nearly tied keys would make every
    implementation's softmax a coin toss. The tokens are therefore one random direction at
    distinct magnitudes (levels 5% apart, in random order): each head then favours the largest or
    the smallest magnitude by a margin far above rounding, and every comparison is meaningful.
    """
    head_dim = data.draw(st.sampled_from([16, 32, 64]), label="head_dim")
    length = data.draw(st.integers(2, 24), label="length")
    batch = data.draw(st.integers(1, 2), label="batch")
    base = data.draw(st.floats(100.0, 220.0), label="input magnitude")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(64, generator=gen)  # (d_in,)
    levels = 1.05 ** torch.randperm(length, generator=gen).float()  # (T,)
    noise = 1e-3 * torch.randn(batch, length, 64, generator=gen)  # (B, T, d_in)
    x = (base * levels.view(1, -1, 1) * (direction + noise)).half()  # (B, T, d_in)
    torch.manual_seed(seed)
    module = attention.get(impl_name)(64, 64, 64 // head_dim, length).eval().half()

    with torch.no_grad():
        q, k, v, _ = module._project(x, None, None)  # (B, H, T, hd) each
        raw = q.float() @ k.float().transpose(-2, -1)  # (B, H, T, T) the unscaled product, in fp32
        visible = torch.ones(length, length, dtype=torch.bool).tril()  # (T, T)
        largest = raw[..., visible].abs().max().item()
        # The case this test is for: a visible unscaled product overflows fp16, the scaled ones fit.
        assume(largest > torch.finfo(torch.float16).max > 2 * largest * module.scale)
        out = module(x)  # (B, T, d_out)
        math_context, math_weights = torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, is_causal=True, scale=module.scale
        )  # (B, H, T, hd), (B, H, T, T)
        math_out = module._merge(math_context)  # (B, T, d_out)

    what = f"{impl_name} fp16 output, |q·k| up to {largest:.0f}"
    assert torch.isfinite(out).all(), f"{what}: NaN or inf although the scaled scores fit fp16"
    assert_module_matches_oracle(module, x, out, what=what)
    assert_matches_oracle(out, attention.reference_forward(module, x), math_out, what=f"{what}, vs math attention")
    if hasattr(module, "attention_weights"):
        weights = module.attention_weights(x)  # (B, H, T, T)
        exact = copy.deepcopy(module).double().attention_weights(x.double())  # (B, H, T, T) float64
        assert torch.isfinite(weights).all(), "NaN or inf in attention_weights"
        assert_matches_oracle(weights, exact, math_weights, what="fp16 attention_weights, vs math attention")


class LearnedBias(torch.nn.Module):
    """A score mod with a parameter: a learned slope per head on the query-key distance."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(num_heads))

    def forward(self, score, b, h, q_idx, kv_idx):
        return score + self.bias[h] * (kv_idx - q_idx)


def test_a_module_score_mod_is_used_trained_and_saved_when_assigned():
    torch.manual_seed(0)
    module = attention.get("from_scratch")(8, 8, 2, 6).eval()
    x = torch.randn(1, 6, 8)  # (B, T, d_in)
    plain = module(x)  # (1, 6, 8)
    bias = LearnedBias(2)
    module.score_mod = bias  # nn.Module.__setattr__ alone would register it and never check or use it
    assert module.score_mod is bias and "score_mod.bias" in module.state_dict()
    biased = module(x)
    assert not torch.allclose(biased, plain)
    assert_module_matches_oracle(module, x, biased, what="learned score mod output")
    biased.sum().backward()
    assert bias.bias.grad is not None and torch.isfinite(bias.bias.grad).all()
    module.score_mod = score_mods.generate_tanh_softcap(5.0)  # a function after a Module
    assert "score_mod.bias" not in module.state_dict() and module.score_mod.cap == 5.0
