"""What the test modules share: the devices, dtypes and implementations to sweep, and the
oracle check. Everything iterates over the registry, so a registered plugin is tested too."""

from __future__ import annotations

import pytest
import torch

import attention
from attention.accuracy import GRAD_FACTOR, OUTPUT_FACTOR, assert_matches_oracle

CUDA = torch.cuda.is_available()

#: (device, dtype) pairs: fp32 on CPU; fp32, bf16 and fp16 on CUDA (skipped with a reason on CPU).
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    *(
        pytest.param(
            "cuda",
            dtype,
            id=f"cuda-{name}",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")],
        )
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
    ),
]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")]
    ),
]

IMPL_NAMES = list(attention.implementations())


def grad_context(impl: type[attention.AttentionBase], device: str):
    """``torch.no_grad()`` where the implementation has no backward on ``device`` (flex on CPU)."""
    return torch.enable_grad() if impl.supports_backward(device) else torch.no_grad()


__all__ = [
    "CUDA",
    "DEVICES",
    "DEVICE_DTYPES",
    "GRAD_FACTOR",
    "IMPL_NAMES",
    "OUTPUT_FACTOR",
    "assert_matches_oracle",
    "assert_module_matches_oracle",
    "grad_context",
]


def assert_module_matches_oracle(
    module: attention.AttentionBase,
    x: torch.Tensor,
    actual: torch.Tensor,
    *,
    document_ids: torch.Tensor | None = None,
    what: str = "output",
) -> None:
    """``actual`` (what ``module`` gave for the whole of ``x``) against the float64 oracle, by the
    ratio rule; the baseline is the same reference math run in ``x``'s dtype."""
    oracle = attention.reference_forward(module, x, document_ids=document_ids)  # (B, T, d_out) float64
    baseline = attention.reference_forward(module, x, dtype=x.dtype, document_ids=document_ids)  # (B, T, d_out)
    assert_matches_oracle(actual, oracle, baseline, what=what)
