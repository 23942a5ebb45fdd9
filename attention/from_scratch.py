"""Attention written out by hand: scores, mask, softmax, weighted sum. The readable reference."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import AttentionBase
from .score_mods import ScoreMod, apply_dense


class MultiHeadAttentionCombinedQKV(AttentionBase):
    """From scratch, with one combined QKV projection.

    Materialises the ``(B, H, T, T)`` score matrix, so memory grows as ``T**2``; its value is
    that every step is visible, and :meth:`attention_weights` returns the softmax weights.
    """

    @classmethod
    def supports_score_mod(cls, score_mod: ScoreMod) -> bool:
        return True  # any elementwise function of the dense scores

    @classmethod
    def context_parallel_unsupported(cls) -> str | None:
        return (
            "it computes the (T, T) score matrix with its own matmuls, mask and softmax, which torch's "
            "context parallel cannot shard (it rewrites only F.scaled_dot_product_attention calls)"
        )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn_dropout = nn.Dropout(self.dropout)

    def _weights(self, q: Tensor, k: Tensor, q_offset: int, document_ids: Tensor | None) -> Tensor:
        """Softmax attention weights ``(B, H, Tq, Tk)``; rows with no visible key are zeros."""
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, hd)
        # Scaled inside the matrix product (alpha), in its fp32 accumulator: in fp16 q·k can
        # overflow (inf, then NaN) where the scaled logits fit, and scaling q first rounds it,
        # which costs small logits of long vectors their accuracy (docs/design.md#fp16-logits).
        scores = torch.baddbmm(
            q.new_empty(1, 1, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(-2, -1), beta=0, alpha=self.scale
        ).unflatten(0, q.shape[:2])  # (B, H, Tq, Tk)
        if self.score_mod is not None:
            scores = apply_dense(self.score_mod, scores, q_offset)  # (B, H, Tq, Tk)
        visible = self._dense_mask(q, k, q_offset, document_ids)  # broadcasts to (B, H, Tq, Tk)
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
        # A row with every key masked is softmax(-inf, ...) = NaN; define it as attending to nothing.
        return weights.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int, document_ids: Tensor | None) -> Tensor:
        weights = self.attn_dropout(self._weights(q, k, q_offset, document_ids))  # (B, H, Tq, Tk)
        v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # (B, H, Tk, hd)
        return weights @ v  # (B, H, Tq, hd)

    @torch.no_grad()
    def attention_weights(self, x: Tensor, *, document_ids: Tensor | None = None) -> Tensor:
        """The softmax weights ``(B, H, T, T)`` this module applies to ``x`` (no dropout)."""
        q, k, _, q_offset = self._project(x, None, document_ids)
        return self._weights(q, k, q_offset, document_ids)
