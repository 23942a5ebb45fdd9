"""Deliberately wrong: the causal mask is off by one, so each query also sees the next key.

It runs, its shapes are right and its outputs look plausible; attention-suite's causality test
catches it (an output that changes when a later token changes).
"""

import torch
from torch import Tensor
from torch.nn import functional as F


def off_by_one(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v (B, H, T, D) -> (B, H, T, D), with one key too many visible per query."""
    seen = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=1)  # (Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=seen)  # (B, H, T, D)
