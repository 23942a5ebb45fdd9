"""Attention through ``torch.nn.functional.scaled_dot_product_attention``.

On CUDA, SDPA picks a fused kernel (cuDNN, FlashAttention-2 or memory-efficient) that never
materialises the score matrix. ``is_causal=True`` is used only where it is right: it aligns the
mask top-left, which is wrong for a query chunk that continues a KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBase
from .score_mods import ScoreMod, dense_bias, is_additive

#: SDPA's gradients on CPU (torch's flash-attention backward) reach 5.9x a plain same-precision
#: backward's error on low-rank inputs, against the rule's 3x (docs/design.md#sdpa-on-cpu-gradients):
#: 3x the factor, 9x in all, keeps a margin over the worst measured without hiding a real bug.
CPU_FLASH_GRAD_ALLOWANCE = 3.0


class MHAPyTorchScaledDotProduct(AttentionBase):
    """Causal MHA on ``F.scaled_dot_product_attention``; dropout only in training.

    A ``score_mod`` runs only if it is additive (ALiBi), as a float ``attn_mask`` bias.
    """

    score_mod_limits = (
        "F.scaled_dot_product_attention takes only an additive bias (score mods marked additive, "
        "such as generate_alibi); use flex or from_scratch for this one"
    )

    @classmethod
    def supports_score_mod(cls, score_mod: ScoreMod) -> bool:
        return is_additive(score_mod)

    @classmethod
    def grad_error_allowance(cls, device: torch.device | str) -> float:
        # On GPUs its backends are within the plain rule; on CPU see CPU_FLASH_GRAD_ALLOWANCE.
        return CPU_FLASH_GRAD_ALLOWANCE if torch.device(device).type == "cpu" else 1.0

    @classmethod
    def context_parallel_unsupported(cls) -> str | None:
        # Plain causal attention calls SDPA with is_causal=True and no mask, which torch's ring
        # attention takes over (flash, efficient and cuDNN kernels); attention.context_parallel
        # refuses the masked and biased calls it cannot (docs/design.md#context-parallel).
        return None

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int, document_ids: Tensor | None) -> Tensor:
        dropout_p = self.dropout if self.training else 0.0
        enable_gqa = self.num_kv_heads != self.num_heads
        if self._is_plain_causal(document_ids) and (q_offset == 0 or q.shape[2] == 1):
            # Fresh sequence: top-left causal is right. One new token: it sees every key.
            is_causal = q_offset == 0 and q.shape[2] > 1
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=self.scale, enable_gqa=enable_gqa
            )  # (B, H, Tq, hd)
        visible = self._dense_mask(q, k, q_offset, document_ids)  # broadcasts to (B, H, Tq, Tk)
        empty = ~visible.any(dim=-1, keepdim=True)  # (B or 1, H or 1, Tq, 1) rows with no visible key
        # SDPA leaves an all-masked row NaN or garbage, per backend, and a NaN there would reach
        # every key's gradient through dK and dV even after the row is zeroed. So such rows attend
        # to everything (finite everywhere) and are zeroed afterwards, which also zeroes their grads.
        attn_mask = visible | empty  # broadcasts to (B, H, Tq, Tk)
        if self.score_mod is not None:
            b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            bias = dense_bias(self.score_mod, b, h, tq, tk, q.device, q_offset)  # broadcasts to (B, H, Tq, Tk)
            attn_mask = torch.where(attn_mask, bias.to(q.dtype), float("-inf"))  # broadcasts to (B, H, Tq, Tk)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale, enable_gqa=enable_gqa
        )  # (B, H, Tq, hd)
        return out.masked_fill(empty, 0.0)  # (B, H, Tq, hd)
