"""state_dict interchange: one parameter layout for every implementation, so weights saved from
any of them load (strictly) into every other and compute the same function."""

from __future__ import annotations

import io

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
)


def _save_and_load(module: torch.nn.Module, device: str) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` through ``torch.save`` / ``torch.load``, as a checkpoint would go."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location=device, weights_only=True)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@given(cfg=configs())
def test_state_dict_from_one_implementation_loads_into_another(
    source_name: str, target_name: str, device: str, dtype: torch.dtype, cfg: Config
) -> None:
    """One pair per test (the plugin pairs the implementations), so a broken one fails its pairs only."""
    source = build_module(attention.get(source_name), cfg, device, dtype)
    saved = _save_and_load(source, device)
    x = make_input(cfg, device, dtype)  # (B, T, d_in)
    oracle = attention.reference_forward(source, x)  # (B, T, d_out) float64, the source's weights
    baseline = attention.reference_forward(source, x, dtype=dtype)  # (B, T, d_out)
    target = build_module(attention.get(target_name), cfg, device, dtype, seed=cfg.seed + 3)
    assert not torch.equal(target.qkv.weight, source.qkv.weight), "target must start from other weights"

    target.load_state_dict(saved, strict=True)

    loaded = target.state_dict()
    assert loaded.keys() == saved.keys(), f"{source_name} -> {target_name}: layouts differ"
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), f"{source_name} -> {target_name}: {key} not loaded"
    with torch.no_grad():
        y = target(x)  # (B, T, d_out)
    assert_matches_oracle(y, oracle, baseline, what=f"{target_name} with weights from {source_name}")


def test_state_dict_holds_exactly_the_shared_layout(impl_name: str) -> None:
    module = attention.get(impl_name)(6, 8, 2, 16, qkv_bias=True, num_kv_heads=1)
    shapes = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    # qkv stacks q (d_out = 8) and one KV head's k and v (head_dim = 4 each): 8 + 4 + 4 rows.
    assert shapes == {"qkv.weight": (16, 6), "qkv.bias": (16,), "proj.weight": (8, 8), "proj.bias": (8,)}


def test_strict_load_rejects_a_different_layout(impl_name: str) -> None:
    impl = attention.get(impl_name)
    with_bias = impl(6, 8, 2, 16, qkv_bias=True).state_dict()
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"qkv.bias\""):
        impl(6, 8, 2, 16, qkv_bias=False).load_state_dict(with_bias, strict=True)
