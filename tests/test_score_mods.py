"""Score modifiers themselves (ALiBi, tanh soft-capping), and built-ins' own behaviour with them.

What every implementation must do with a score mod is in the property suite,
attention/suite/test_score_mods.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import attention
from attention import score_mods
from attention.suite.support import assert_module_matches_oracle

NUM_HEADS = 4
SCORE_MODS = {
    "alibi": lambda: score_mods.generate_alibi(NUM_HEADS),
    "softcap": lambda: score_mods.generate_tanh_softcap(2.0),  # small enough to bind: scores reach ~±4
}


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
