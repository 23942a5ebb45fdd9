"""Causal multi-head attention implementations and the suite that keeps them honest and fast."""

from . import masks, score_mods
from .base import AttentionBase
from .flex import MHAPyTorchFlexAttention
from .from_scratch import MultiHeadAttentionCombinedQKV
from .kv_cache import KVCache
from .reference import reference_forward, reference_mha
from .registry import get, implementations, register
from .sdpa import MHAPyTorchScaledDotProduct
from .triton_attention import MHATritonAttention

__all__ = [
    "AttentionBase",
    "KVCache",
    "MHAPyTorchFlexAttention",
    "MHAPyTorchScaledDotProduct",
    "MHATritonAttention",
    "MultiHeadAttentionCombinedQKV",
    "get",
    "implementations",
    "masks",
    "reference_forward",
    "reference_mha",
    "register",
    "score_mods",
]
