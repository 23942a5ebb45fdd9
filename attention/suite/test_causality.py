"""Causality: the output at position t depends on inputs at positions <= t only.

Both checks are exact, not approximate. With the shapes unchanged every kernel runs the same
schedule, and a masked key enters as exp(-inf) = 0 in the softmax sum and as a zero weight in
the weighted sum of values, so the visible outputs come out bit for bit the same; in the
backward pass every term reaching a later input carries a factor of zero (a zero attention
weight, or a zero upstream gradient), so those gradients are exactly zero.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attention
from attention.suite.support import DEVICE_DTYPES, Config, build_module, configs, make_input, seeded_randn


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@given(cfg=configs(min_tokens=2), data=st.data())
def test_replacing_later_tokens_leaves_earlier_outputs_unchanged(
    impl_name: str, device: str, dtype: torch.dtype, cfg: Config, data: st.DataObject
) -> None:
    t = data.draw(st.integers(0, cfg.tokens - 2), label="t")  # last position kept
    module = build_module(attention.get(impl_name), cfg, device, dtype)
    x = make_input(cfg, device, dtype)  # (B, T, d_in)
    replaced = x.clone()
    later = replaced[:, t + 1 :]  # (B, T - t - 1, d_in)
    later.copy_(seeded_randn(*later.shape, seed=cfg.seed + 2, device=device, dtype=dtype))

    with torch.no_grad():
        y = module(x)  # (B, T, d_out)
        y_replaced = module(replaced)  # (B, T, d_out)

    assert_finite(y, f"{impl_name}'s outputs")
    # Bare booleans: pytest would print every tensor of an inline torch.equal under the message.
    earlier_unchanged = torch.equal(y[:, : t + 1], y_replaced[:, : t + 1])
    last_changed = not torch.equal(y[:, -1], y_replaced[:, -1])
    assert earlier_unchanged, (
        f"outputs up to position {t} changed when only later tokens were replaced: max difference "
        f"{(y[:, : t + 1] - y_replaced[:, : t + 1]).abs().max().item():.3e}"
    )
    # The replacement did reach the module: the last position sees its own (new) token.
    assert last_changed, "the last output did not change when its own token was replaced: it ignores its own position"


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@given(cfg=configs(min_tokens=2), data=st.data())
def test_gradient_of_early_outputs_wrt_later_inputs_is_zero(
    impl_name: str, device: str, dtype: torch.dtype, cfg: Config, data: st.DataObject
) -> None:
    impl = attention.get(impl_name)
    if not impl.supports_backward(device):
        pytest.skip(f"{impl_name} has no backward on {device}")
    t = data.draw(st.integers(0, cfg.tokens - 2), label="t")
    module = build_module(impl, cfg, device, dtype)
    x = make_input(cfg, device, dtype).requires_grad_()  # (B, T, d_in)

    y = module(x)  # (B, T, d_out)
    upstream = seeded_randn(cfg.batch, t + 1, cfg.d_out, seed=cfg.seed + 2, device=device, dtype=dtype)
    (grad,) = torch.autograd.grad(y[:, : t + 1], x, grad_outputs=upstream)  # (B, T, d_in)

    assert_finite(grad, f"{impl_name}'s input gradients")
    later = grad[:, t + 1 :]
    later_zero = torch.equal(later, torch.zeros_like(later))  # a bare boolean, as above
    assert later_zero, (
        f"outputs up to position {t} have gradient w.r.t. later inputs: max |grad| {later.abs().max().item():.3e}"
    )
    # Non-vacuous: the output at t does depend on the input at t.
    reached = bool(grad[:, t].abs().max() > 0)  # a bare boolean, as above
    assert reached, f"no gradient reached the input at position {t} from the outputs up to it: row {t} sees no key?"


def assert_finite(values: torch.Tensor, what: str) -> None:
    """NaN compares unequal to itself: said as what it is, not as a leak from later tokens."""
    bad = int((~torch.isfinite(values)).sum())
    assert bad == 0, f"{what} hold {bad} NaN or inf values (of {values.numel()}): causality cannot be judged"
