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
    "grad_context",
]
