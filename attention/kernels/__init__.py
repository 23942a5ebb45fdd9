"""Attention kernels written in Triton, for :class:`attention.triton_attention.MHATritonAttention`.

Imported only when that implementation first runs, so ``import attention`` needs torch alone.

* ``launch``: each kernel compiled for CUDA tensors and run by Triton's interpreter for CPU
  tensors (the same kernel code, so CI exercises it without a GPU); the block sizes.
* ``tiles``: the masked tile loads and the online-softmax step the kernels share.
* ``prefill``: FlashAttention-2 forward and backward over a :mod:`attention.block_table`.
* ``decode``: split-KV decoding for a few query tokens against a long KV cache.
"""
