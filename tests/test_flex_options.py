"""Flex's kernel options: our defaults, the user's on top, and the decode split policy (CPU)."""

from __future__ import annotations

import pytest
import torch

from attention import MHAPyTorchFlexAttention, flex


@pytest.mark.parametrize(
    ("batch", "kv_heads", "sms", "expected"),
    [
        (8, 16, 132, 16),  # torch's default would be 2: raised to the floor
        (8, 4, 132, 16),  # GQA-4: torch's 8, raised
        (1, 1, 132, 264),  # one sequence, one KV head: torch's own (larger) choice stands
        (64, 32, 132, 16),  # more sequences x heads than SMs: torch's 1, raised
    ],
)
def test_decode_split_kv(batch, kv_heads, sms, expected):
    assert flex.decode_split_kv(batch, kv_heads, sms) == expected


def test_user_kernel_options_win_key_by_key(monkeypatch):
    seen = []

    def spy(q, k, v, *, kernel_options, **kwargs):
        seen.append(kernel_options)
        return torch.zeros_like(q)  # (B, H, Tq, hd)

    monkeypatch.setattr(flex, "flex_attention", spy)
    x = torch.randn(2, 5, 8)  # (B, T, d_in)
    with torch.no_grad():  # flex has no CPU backward
        MHAPyTorchFlexAttention(8, 8, 2, 5)(x)
        MHAPyTorchFlexAttention(8, 8, 2, 5, kernel_options={"BLOCK_M": 16, "FORCE_USE_FLEX_ATTENTION": False})(x)
    assert seen[0] == {"FORCE_USE_FLEX_ATTENTION": True}  # multi-token chunks take the main kernel
    assert seen[1] == {"FORCE_USE_FLEX_ATTENTION": False, "BLOCK_M": 16}


def test_one_token_decode_on_cpu_gets_no_split_option():
    q = torch.randn(2, 4, 1, 16)  # (B, H, 1, hd)
    k = torch.randn(2, 2, 32, 16)  # (B, H_kv, N, hd)
    assert MHAPyTorchFlexAttention._default_kernel_options(q, k) == {}  # SPLIT_KV is for the CUDA kernel
