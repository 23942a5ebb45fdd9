"""Causal multi-head attention implementations and the suite that keeps them honest and fast."""

from . import masks, score_mods
from .base import AttentionBase
from .capabilities import Capabilities
from .flex import MHAPyTorchFlexAttention
from .from_scratch import MultiHeadAttentionCombinedQKV
from .function import from_function
from .kv_cache import KVCache
from .reference import reference_forward, reference_mha
from .registry import get, implementations, register, resolve
from .sdpa import MHAPyTorchScaledDotProduct
from .triton_attention import MHATritonAttention

__all__ = [
    "AttentionBase",
    "Capabilities",
    "KVCache",
    "MHAPyTorchFlexAttention",
    "MHAPyTorchScaledDotProduct",
    "MHATritonAttention",
    "MultiHeadAttentionCombinedQKV",
    "from_function",
    "get",
    "implementations",
    "masks",
    "reference_forward",
    "reference_mha",
    "register",
    "resolve",
    "score_mods",
]
