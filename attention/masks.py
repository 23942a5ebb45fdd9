"""Attention patterns, each defined once as a flex-style ``mask_mod``.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` says whether query ``q_idx`` may attend to
key ``kv_idx`` (absolute positions, so a query chunk that continues a KV cache is masked right).
FlexAttention consumes these natively; the from-scratch and SDPA paths evaluate the same
function on broadcast index grids (:func:`dense_mask`), so every implementation runs one
definition. Mask mods must therefore be elementwise tensor expressions (no Python ``if`` on
tensor values), the same rule flex's ``vmap`` imposes. Parameterised patterns come from
``generate_*``-style factories, as in attention-gym.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "MaskMod",
    "and_masks",
    "causal",
    "dense_mask",
    "document",
    "offset_mask",
    "prefix_lm",
    "sliding_window",
]


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Each query sees itself and every earlier key."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """Causal with exactly ``window`` keys visible, the query's own included."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    sliding_window_mask.__name__ = f"sliding_window_{window}"
    return sliding_window_mask


def prefix_lm(prefix_len: int) -> MaskMod:
    """Keys before ``prefix_len`` are visible to every query; causal after them."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len must be an int, got {type(prefix_len).__name__}")
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")

    def prefix_lm_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)

    prefix_lm_mask.__name__ = f"prefix_lm_{prefix_len}"
    prefix_lm_mask.prefix_len = prefix_len  # read by the KV cache: the first chunk must hold the prefix
    return prefix_lm_mask


def document(document_ids: Tensor) -> MaskMod:
    """Packed sequences: a query sees only keys of its own document.

    ``document_ids`` is ``(batch, tokens)`` of integer ids, one per position from the first
    cached key to the last query. Combine with a pattern through :func:`and_masks`.
    """

    def document_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return document_mask


def offset_mask(mask_mod: MaskMod, q_offset: int) -> MaskMod:
    """``mask_mod`` for a query chunk whose first row sits at absolute position ``q_offset``."""
    if q_offset == 0:
        return mask_mod

    def shifted(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(b, h, q_idx + q_offset, kv_idx)

    return shifted


def dense_mask(
    mask_mod: MaskMod,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    device: torch.device | str,
    q_offset: int = 0,
) -> Tensor:
    """Evaluate ``mask_mod`` on index grids: a bool mask broadcastable to ``(B, H, Tq, Tk)``.

    Dimensions the pattern ignores stay of size 1 (a causal mask is ``(1, 1, Tq, Tk)``), so the
    dense mask costs no more memory than the pattern needs.
    """
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)  # (1, H, 1, 1)
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device).view(1, 1, -1, 1)  # (1, 1, Tq, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)  # (1, 1, 1, Tk)
    mask = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        # SDPA would read a float 0/1 mask as an additive bias and silently attend everywhere.
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask_mod must return a bool tensor, got {got}")
    return torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, (1, 1, q_len, kv_len)))
