"""Three attention implementations over (B, H, T, D), as a kernel author writes them.

- :func:`my_attention.sdpa.causal_sdpa`: torch's fused kernel, plain causal only.
- :class:`my_attention.eager.EagerAttention`: an additive-mask "eager" path, any mask, KV cache.
- :func:`my_attention.off_by_one.off_by_one`: deliberately wrong, to see a failure.
"""
