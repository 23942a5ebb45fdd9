"""Dropout on the attention weights: off in eval mode, where a module built with it gives the
oracle's output as one built without it does; on in training mode, where it changes the output
from call to call. Only for implementations that declare dropout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

import attention
from attention.suite.support import (
    DEVICE_DTYPES,
    Config,
    assert_matches_oracle,
    build_module,
    configs,
    make_input,
    reference_with_leaves,
)

#: Enough attention weights (2 x 2 heads x 24 x 24 / 2) that two draws of the dropout mask at
#: p = 0.5 match with a chance under 2**-500: a test that two calls differ cannot fail by luck.
TRAINING = Config(batch=2, tokens=24, num_heads=2, num_kv_heads=2, head_dim=16, d_in=24, qkv_bias=False, seed=0)


@pytest.mark.attention_needs("dropout")
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@given(cfg=configs())
def test_eval_mode_drops_nothing(impl_name: str, device: str, dtype: torch.dtype, cfg: Config) -> None:
    module = build_module(attention.get(impl_name), cfg, device, dtype, dropout=0.5).eval()
    x = make_input(cfg, device, dtype)  # (B, T, d_in)
    with torch.no_grad():
        y = module(x)  # (B, T, d_out)
    oracle, _ = reference_with_leaves(module, x, torch.float64)  # (B, T, d_out): no dropout
    baseline, _ = reference_with_leaves(module, x, dtype)  # (B, T, d_out)
    assert_matches_oracle(y, oracle, baseline, what=f"{impl_name} output in eval mode with dropout=0.5")


@pytest.mark.attention_needs("dropout")
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
def test_training_mode_drops_weights(impl_name: str, device: str, dtype: torch.dtype) -> None:
    module = build_module(attention.get(impl_name), TRAINING, device, dtype, dropout=0.5).train()
    x = make_input(TRAINING, device, dtype)  # (B, T, d_in)
    with torch.random.fork_rng(devices=[torch.device(device)] if device == "cuda" else []), torch.no_grad():
        torch.manual_seed(0)  # dropout draws from torch's generator: the same masks on every run
        first, second = module(x), module(x)  # (B, T, d_out) each
        kept = module.eval()(x)  # (B, T, d_out)
    assert torch.isfinite(first).all() and torch.isfinite(second).all(), "training-mode output is not finite"
    assert not torch.equal(first, second), "two training-mode calls gave the same output: no dropout was applied"
    assert not torch.equal(first, kept), "the training-mode output is the eval-mode one: no dropout was applied"
