"""Equivalence: every implementation against the float64 oracle, by the ratio rule.

The oracle is :func:`attention.reference_mha` in float64 on the module's own (already rounded)
weights; the baseline is the same function run in the test dtype. An implementation's error
against the oracle may be at most ``OUTPUT_FACTOR`` (outputs) or ``GRAD_FACTOR`` (gradients; times
the allowance an implementation declares for a less precise backward, :func:`grad_factor`) times
the baseline's, plus a floor of a few ulps (see :mod:`attention.accuracy`).
"""

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
    grad_factor,
    make_input,
    reference_with_leaves,
    seeded_randn,
)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@given(cfg=configs())
def test_output_and_gradients_match_float64_oracle(
    impl_name: str, device: str, dtype: torch.dtype, cfg: Config
) -> None:
    impl = attention.get(impl_name)
    backward = impl.supports_backward(device)  # flex on CPU: outputs only
    module = build_module(impl, cfg, device, dtype)
    x = make_input(cfg, device, dtype).requires_grad_(backward)  # (B, T, d_in)

    with torch.set_grad_enabled(backward):
        y = module(x)  # (B, T, d_out)
    oracle, oracle_leaves = reference_with_leaves(module, x, torch.float64)  # (B, T, d_out) float64
    baseline, baseline_leaves = reference_with_leaves(module, x, dtype)  # (B, T, d_out)
    assert_matches_oracle(y, oracle, baseline, what=f"{impl_name} output")

    if not backward:
        return
    upstream = seeded_randn(*y.shape, seed=cfg.seed + 2, device=device, dtype=dtype)  # (B, T, d_out)
    names = ["x", *(name for name, _ in module.named_parameters())]
    grads = torch.autograd.grad(y, [x, *module.parameters()], upstream)
    factor = grad_factor(impl, device)
    oracle_grads = torch.autograd.grad(oracle, oracle_leaves, upstream.double())
    baseline_grads = torch.autograd.grad(baseline, baseline_leaves, upstream)
    for name, grad, oracle_grad, baseline_grad in zip(names, grads, oracle_grads, baseline_grads, strict=True):
        assert_matches_oracle(grad, oracle_grad, baseline_grad, factor=factor, what=f"{impl_name} gradient of {name}")
