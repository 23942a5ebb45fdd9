"""Shape and dtype: every implementation maps (B, T, d_in) -> (B, T, d_out) in the input's dtype,
for any batch, token count (1, block edges, odd sizes), head count, head size and GQA layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given

import attention
from attention.suite.support import DEVICE_DTYPES, Config, build_module, configs, grad_context, make_input, sizing

#: The largest drawn problem, always tried: 4 x 300 tokens, 8 heads of 64, 4 KV heads.
LARGEST = Config(batch=4, tokens=300, num_heads=8, num_kv_heads=4, head_dim=64, d_in=96, qkv_bias=True, seed=0)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@given(cfg=configs())
@example(cfg=LARGEST)
def test_output_shape_dtype_and_device(impl_name: str, device: str, dtype: torch.dtype, cfg: Config) -> None:
    impl = attention.get(impl_name)
    cfg = sizing().clamp(cfg)  # LARGEST, within an interpreter's sizing
    module = build_module(impl, cfg, device, dtype)
    x = make_input(cfg, device, dtype)  # (B, T, d_in)
    backward = impl.supports_backward(device)
    x.requires_grad_(backward)

    with grad_context(impl, device):
        y = module(x)  # (B, T, d_out)

    assert y.shape == (cfg.batch, cfg.tokens, cfg.d_out)
    assert y.dtype == dtype
    assert y.device == x.device
    assert torch.isfinite(y).all(), "output has NaN or inf"
    if backward:
        y.backward(torch.ones_like(y))
        assert x.grad is not None
        assert x.grad.shape == x.shape
        assert x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all(), "input gradient has NaN or inf"
        for name, param in module.named_parameters():
            assert param.grad is not None, f"{name} got no gradient"
            assert param.grad.shape == param.shape, name
