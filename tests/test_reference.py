"""The float64 oracle refuses arguments a module would refuse: judged against a quietly different
computation (0 KV heads read as "as many as query heads", float document ids), a wrong
implementation could pass."""

from __future__ import annotations

import re

import pytest
import torch

import attention
from attention import reference_forward, reference_mha

MODULE = attention.get("sdpa")(16, 16, 2, 64)
PARAMS = {name: p.detach() for name, p in MODULE.named_parameters()}
X = torch.randn(2, 5, 16)  # (B, T, d_in)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(num_heads=2, num_kv_heads=0), ValueError, "num_kv_heads must be >= 1, got 0"),
        (dict(num_heads=True), TypeError, "num_heads must be an int, got bool (True)"),
        (dict(num_heads=3), ValueError, "d_out (16) must be divisible by num_heads (3)"),
        (dict(num_heads=2, document_ids=torch.zeros(2, 5)), TypeError, "document_ids must hold integers"),
        (
            dict(num_heads=2, document_ids=torch.zeros(2, 3, dtype=torch.long)),
            ValueError,
            "document_ids must have shape (batch, cached + tokens) = (2, 5), got (2, 3)",
        ),
        (dict(num_heads=2, mask_mod=None), TypeError, "mask_mod must be callable(b, h, q_idx, kv_idx)"),
        (dict(num_heads=2, score_mod=lambda s, b, h, q, k: s.sum()), ValueError, "shaped like score"),
        (dict(num_heads=2, x=torch.randn(2, 5, 8)), ValueError, "params['qkv.weight'] has shape (48, 16)"),
        (dict(num_heads=2, x=torch.randn(5, 16)), ValueError, "x must be 3-D (batch, tokens, d_in)"),
        (dict(num_heads=2, x=torch.ones(2, 5, 16, dtype=torch.long)), TypeError, "x must be a floating-point"),
        (dict(num_heads=2, params={"qkv.weight": PARAMS["qkv.weight"]}), ValueError, "params lacks proj.weight"),
    ],
)
def test_reference_mha_refuses_what_a_module_refuses(kwargs, error, message):
    kwargs = {"x": X, "params": PARAMS, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        reference_mha(kwargs.pop("x"), kwargs.pop("params"), **kwargs)


@pytest.mark.parametrize(
    ("module", "x", "kwargs", "error", "message"),
    [
        ("sdpa", X, {}, TypeError, "module must be an attention.AttentionBase, got str"),
        (MODULE, torch.randint(0, 3, (2, 5, 16)), {}, TypeError, "x must be a floating-point tensor, got torch.int64"),
        (MODULE, X, {"dtype": torch.int64}, ValueError, "dtype must be a floating-point dtype"),
    ],
)
def test_reference_forward_refuses_what_it_would_cast_away(module, x, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        reference_forward(module, x, **kwargs)
