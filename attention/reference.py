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

from . import checks
from .base import AttentionBase
from .masks import MaskMod, and_masks, causal, check_document_ids, check_mask_mod, dense_mask, document
from .score_mods import ScoreMod, apply_dense, check_score_mod


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
    ``qkv.weight``, optional ``qkv.bias``, ``proj.weight``, ``proj.bias``). Arguments are checked
    as a module's are: the oracle must not quietly judge against a different computation."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _check_params(x, params, num_heads, num_kv_heads)
    check_mask_mod(mask_mod)
    if score_mod is not None:
        check_score_mod(score_mod)
    b, t, _ = x.shape
    if document_ids is not None:
        check_document_ids(document_ids, (b, t))
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


def _check_params(x: object, params: object, num_heads: object, num_kv_heads: object) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (batch, tokens, d_in), got shape {tuple(x.shape)}")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of state_dict names to tensors, got {type(params).__name__}")
    if missing := [name for name in ("qkv.weight", "proj.weight", "proj.bias") if name not in params]:
        raise ValueError(f"params lacks {', '.join(missing)} (the shared layout's state_dict keys)")
    d_out, num_heads, num_kv_heads = checks.heads(params["proj.weight"].shape[0], num_heads, num_kv_heads)
    qkv_rows = d_out + 2 * num_kv_heads * (d_out // num_heads)
    if tuple(params["qkv.weight"].shape) != (qkv_rows, x.shape[-1]):
        raise ValueError(
            f"params['qkv.weight'] has shape {tuple(params['qkv.weight'].shape)}; {num_heads} heads and "
            f"{num_kv_heads} KV heads of d_out={d_out} over d_in={x.shape[-1]} need {(qkv_rows, x.shape[-1])}"
        )


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
    if not isinstance(module, AttentionBase):
        raise TypeError(f"module must be an attention.AttentionBase, got {type(module).__name__}")
    checks.floating_dtype("dtype", dtype)
    if isinstance(x, Tensor) and not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")  # before the cast hides it
    return reference_mha(
        x.detach().to(dtype),
        module_params(module, dtype),
        num_heads=module.num_heads,
        num_kv_heads=module.num_kv_heads,
        mask_mod=module.mask_mod,
        document_ids=document_ids,
        score_mod=getattr(module, "score_mod", None),
    )
