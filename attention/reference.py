"""The test oracle: causal MHA written for clarity, run in any dtype (float64 for the oracle).

Functional on purpose: it takes the parameters as tensors, so a test can hand it float64
leaves and get float64 gradients to compare against, and it shares no code path with the
implementations it judges except the mask definitions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .base import AttentionBase
from .masks import MaskMod, and_masks, causal, dense_mask, document
from .score_mods import ScoreMod, apply_dense


def reference_mha(
    x: Tensor,
    params: Mapping[str, Tensor],
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    mask_mod: MaskMod = causal,
    document_ids: Tensor | None = None,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    """``(B, T, d_in) -> (B, T, d_out)`` with the shared layout's ``params`` (state_dict keys:
    ``qkv.weight``, optional ``qkv.bias``, ``proj.weight``, ``proj.bias``)."""
    num_kv_heads = num_kv_heads or num_heads
    b, t, _ = x.shape
    d_out = params["proj.weight"].shape[0]
    head_dim = d_out // num_heads
    kv_dim = num_kv_heads * head_dim

    qkv = x @ params["qkv.weight"].T  # (B, T, d_out + 2 * kv_dim)
    if params.get("qkv.bias") is not None:
        qkv = qkv + params["qkv.bias"]
    q, k, v = qkv.split([d_out, kv_dim, kv_dim], dim=-1)
    q = q.reshape(b, t, num_heads, head_dim).permute(0, 2, 1, 3)  # (B, H, T, hd)
    k = k.reshape(b, t, num_kv_heads, head_dim).permute(0, 2, 1, 3)  # (B, H_kv, T, hd)
    v = v.reshape(b, t, num_kv_heads, head_dim).permute(0, 2, 1, 3)  # (B, H_kv, T, hd)
    pattern = mask_mod if document_ids is None else and_masks(mask_mod, document(document_ids))
    visible = dense_mask(pattern, b, num_heads, t, t, x.device)  # broadcasts to (B, H, T, T)
    context = reference_attention(q, k, v, visible, score_mod=score_mod)  # (B, H, T, hd)
    context = context.permute(0, 2, 1, 3).reshape(b, t, d_out)  # (B, T, d_out)
    return context @ params["proj.weight"].T + params["proj.bias"]  # (B, T, d_out)


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, visible: Tensor, *, score_mod: ScoreMod | None = None
) -> Tensor:
    """The attention core: ``q`` ``(B, H, Tq, hd)``, ``k, v`` ``(B, H_kv, Tk, hd)`` and a bool
    ``visible`` broadcastable to ``(B, H, Tq, Tk)`` -> ``(B, H, Tq, hd)``; a row with no visible
    key is zeros."""
    # Query head h reads KV head h // (H // H_kv).
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, hd)
    v = v.repeat_interleave(group, dim=1)  # (B, H, Tk, hd)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if score_mod is not None:
        scores = apply_dense(score_mod, scores)  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key -> zeros
    return weights @ v  # (B, H, Tq, hd)


def module_params(module: AttentionBase, dtype: torch.dtype, requires_grad: bool = False) -> dict[str, Tensor]:
    """Copies of ``module``'s parameters in ``dtype``, as fresh leaves."""
    return {name: p.detach().to(dtype).requires_grad_(requires_grad) for name, p in module.named_parameters()}


def reference_forward(
    module: AttentionBase, x: Tensor, *, dtype: torch.dtype = torch.float64, document_ids: Tensor | None = None
) -> Tensor:
    """What ``module(x)`` should return, computed by :func:`reference_mha` in ``dtype``."""
    return reference_mha(
        x.detach().to(dtype),
        module_params(module, dtype),
        num_heads=module.num_heads,
        num_kv_heads=module.num_kv_heads,
        mask_mod=module.mask_mod,
        document_ids=document_ids,
        score_mod=getattr(module, "score_mod", None),
    )
