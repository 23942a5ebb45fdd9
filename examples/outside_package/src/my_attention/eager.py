"""An "eager" attention in the style of Hugging Face transformers' ``eager_attention_forward``:
an additive mask of the dtype's most negative number, scores scaled after ``q @ kᵀ``, softmax
in fp32.

It declares masks and the KV cache, so attention-suite hands it a ``mask_mod`` and tests it on
sliding windows, prefixes, packed documents and cached decoding. Its one flaw is the additive
mask's: a query that sees no key at all (a window or document that excludes every key) gets a
uniform average of the values, not the zeros the declared convention (``empty_rows="zeros"``,
the default) promises, and the suite's empty-row test says so. Declaring
``empty_rows="any"`` or zeroing such rows (``out.masked_fill(~visible.any(-1, keepdim=True), 0)``)
would make it pass.
"""

import torch
from torch import Tensor

from attention import from_function


def eager_attention(q: Tensor, k: Tensor, v: Tensor, *, mask_mod) -> Tensor:
    """q (B, H, Tq, D), k, v (B, H, Tk, D) -> (B, H, Tq, D).

    ``mask_mod(b, h, q_idx, kv_idx)`` is True where a query sees a key; ``q_idx`` counts rows of
    ``q`` (the KV cache's offset is already applied by attention-suite).
    """
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    scaling = head_dim**-0.5
    b = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=q.device).view(1, heads, 1, 1)
    q_idx = torch.arange(q_len, device=q.device).view(1, 1, q_len, 1)
    kv_idx = torch.arange(kv_len, device=q.device).view(1, 1, 1, kv_len)
    visible = mask_mod(b, h, q_idx, kv_idx)  # broadcasts to (B, H, Tq, Tk)
    causal_mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)  # broadcasts to (B, H, Tq, Tk)
    causal_mask = causal_mask.masked_fill(~visible, torch.finfo(q.dtype).min)

    attn_weights = torch.matmul(q, k.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    attn_weights = attn_weights + causal_mask  # (B, H, Tq, Tk)
    attn_weights = torch.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, Tq, Tk)
    return torch.matmul(attn_weights, v)  # (B, H, Tq, D)


EagerAttention = from_function(eager_attention, masks=True, kv_cache=True)
