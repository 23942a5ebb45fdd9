"""How much work and memory a case is: FLOP counts, visible mask blocks, the peak-memory model.

Conventions (docs/design.md#method uses the same):

* FLOPs follow FlashAttention's benchmark: ``4 * B * H * Tq * Tk * D`` for the two matmuls, halved
  for causal, x3.5 for forward+backward (backward = 2.5x forward). Masked cases count the
  visible 128x128 blocks, which is the work a block-sparse kernel does.
* The memory model says how many ``(B, H, Tq, Tk)`` score matrices an implementation holds at its
  peak; fused kernels hold none, the from-scratch path several. A case whose estimate does not
  fit the free memory skips with a reason instead of dying of out-of-memory.
"""

from __future__ import annotations

import functools

import torch

from .. import masks, registry
from ..base import AttentionBase
from ..flex import MHAPyTorchFlexAttention
from ..from_scratch import MultiHeadAttentionCombinedQKV
from ..sdpa import MHAPyTorchScaledDotProduct
from ..triton_attention import MHATritonAttention

GiB = 1024**3
MiB = 1024**2

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Block size used to count the visible work of masked cases (flex's default block).
MASK_BLOCK = 128

#: (forward, forward+backward) score matrices held at peak. Implementations not listed are
#: assumed to materialise scores like the from-scratch one: a conservative guess that can skip a
#: case, never crash it. Register a better model for your own class with register_memory_model.
_SCORE_COPIES: dict[type, tuple[float, float]] = {
    MultiHeadAttentionCombinedQKV: (5.0, 8.0),
    MHAPyTorchFlexAttention: (0.0, 0.0),
    MHAPyTorchScaledDotProduct: (0.0, 0.0),
    MHATritonAttention: (0.0, 0.0),
}
_UNKNOWN_SCORE_COPIES = (5.0, 8.0)
#: Where a model differs off CUDA: flex runs eagerly there (compiling per shape on a CPU costs more
#: than it saves), and its eager path materialises the scores: 212 MiB peak at T=2048, 4 heads,
#: fp32 on CPU, 3.3 score matrices; 4 counted (no backward off CUDA).
_SCORE_COPIES_OFF_CUDA: dict[type, tuple[float, float]] = {MHAPyTorchFlexAttention: (4.0, 4.0)}
#: Allocator fragmentation, cuBLAS workspaces, the CUDA context: a margin on every estimate.
ESTIMATE_MARGIN = 1.15
ESTIMATE_SLACK = 512 * MiB


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def attention_flops(
    batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, causal: bool = True, backward: bool = False
) -> float:
    """FlashAttention's count: ``4 * B * H * Tq * Tk * D``, halved if causal, x3.5 with backward."""
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal:
        flops /= 2
    return flops * (3.5 if backward else 1.0)


@functools.cache
def visible_counts(mask: str, batch: int, tokens: int, device: str = "cpu", block: int = MASK_BLOCK) -> tuple[int, int]:
    """``(visible pairs, pairs in visible blocks)`` of mask spec ``mask``, summed over the batch.

    A block (``block x block`` queries x keys) is visible if any pair in it is; a block-sparse
    kernel computes whole visible blocks, so that is the work it does. Evaluated on ``device``
    a few block rows at a time (a 16k-token mask on a GPU takes milliseconds).
    """
    mask_mod = masks.from_spec(mask, batch=batch, tokens=tokens, device=device).visible
    n_blocks = -(-tokens // block)
    widths = torch.tensor([min(block, tokens - j * block) for j in range(n_blocks)], device=device)  # (nb,)
    step = block * max(1, (1 << 24) // (block * tokens * batch))  # ~16M mask entries per chunk
    pairs = block_pairs = 0
    for start in range(0, tokens, step):
        rows = min(step, tokens - start)
        dense = masks.dense_mask(mask_mod, batch, 1, rows, tokens, device, q_offset=start)  # (B|1, 1, rows, T)
        dense = dense.expand(batch, 1, rows, tokens).reshape(batch, rows, tokens)  # (B, rows, T)
        pairs += int(dense.sum())
        padded = dense.new_zeros((batch, rows + -rows % block, n_blocks * block))  # (B, rows+, nb * block)
        padded[:, :rows, :tokens] = dense
        blocks = padded.reshape(batch, -1, block, n_blocks, block).any(dim=4).any(dim=2)  # (B, row blocks, nb)
        heights = torch.tensor(
            [min(block, rows - i * block) for i in range(blocks.shape[1])], device=device
        )  # (row blocks,)
        block_pairs += int((blocks * widths * heights[:, None]).sum())
    return pairs, block_pairs


def register_memory_model(cls: type[AttentionBase], forward_copies: float, backward_copies: float) -> None:
    """Declare how many ``(B, H, Tq, Tk)`` score matrices ``cls`` holds at peak (0 for fused kernels)."""
    if not (isinstance(cls, type) and issubclass(cls, AttentionBase)):
        raise TypeError(f"{cls!r} is not a subclass of attention.AttentionBase")
    _SCORE_COPIES[cls] = (float(forward_copies), float(backward_copies))


def score_copies(
    impl: str, backward: bool, references: tuple[str, ...] = (), device: str = "cuda"
) -> tuple[float, str]:
    """``(copies, why)``: score matrices ``impl`` holds at peak on ``device``, and where that
    number comes from. ``references`` are names of fused, non-registry reference cases."""
    if impl in references:
        return 0.0, "fused reference"
    cls = registry.get(impl)
    models = _SCORE_COPIES if torch.device(device).type == "cuda" else {**_SCORE_COPIES, **_SCORE_COPIES_OFF_CUDA}
    for known in type.mro(cls):
        if known in models:
            copies = models[known][1 if backward else 0]
            return copies, ("O(T^2) scores" if copies else "fused, O(T)")
    return _UNKNOWN_SCORE_COPIES[1 if backward else 0], "no memory model registered: assumed O(T^2) scores"


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"
