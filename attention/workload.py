"""One benchmark case, described once: what runs, how much work it is, how much memory it needs.

perf/ and the benchmark report both build their cases from :class:`Workload` (prefill and
training: attention core or whole module, forward or forward+backward) and
:class:`DecodeWorkload` (one query token against a KV cache of ``context`` tokens), so FLOPs,
bytes and skip decisions are computed in one place.

Conventions:

* FLOPs follow FlashAttention's benchmark: ``4 * B * H * Tq * Tk * D`` for the two matmuls, halved
  for causal, x3.5 for forward+backward (backward = 2.5x forward). Masked cases count the
  visible 128x128 blocks, which is the work a block-sparse kernel does. Module level adds the
  qkv and output projections (x3 for forward+backward: dX and dW).
* ``min_bytes`` is the compulsory traffic (inputs read once, outputs written once): the
  denominator for GB/s, which matters for decode where the KV read is the whole cost.
* ``estimated_peak_bytes`` is what the case allocates at its peak; implementations that
  materialise the ``(B, H, T, T)`` score matrix are O(T^2). :meth:`Workload.skip_reason` compares
  it with the memory the device has free, so a case an implementation cannot run skips with a
  reason in GiB instead of dying of out-of-memory.
* Inputs come from ``torch.randn`` (never zeros: kernels may shortcut zeros), seeded.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import masks, registry
from .base import AttentionBase
from .flex import MHAPyTorchFlexAttention
from .from_scratch import MultiHeadAttentionCombinedQKV
from .sdpa import MHAPyTorchScaledDotProduct

GiB = 1024**3
MiB = 1024**2

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: Reference cases that are not registry implementations. ``raw_sdpa*`` call
#: ``F.scaled_dot_product_attention`` directly on the tensors the module would attend over
#: (default backend choice, or one backend forced); ``gemms`` runs the module's two projections
#: with no attention between them. Together they say what "as fast as it can be" is.
RAW_SDPA_BACKENDS = {
    "raw_sdpa": None,
    "raw_sdpa_cudnn": "CUDNN_ATTENTION",
    "raw_sdpa_flash": "FLASH_ATTENTION",
    "raw_sdpa_efficient": "EFFICIENT_ATTENTION",
}
CORE_REFERENCES = tuple(RAW_SDPA_BACKENDS)
MODULE_REFERENCES = ("gemms",)

#: Memory model: how many (B, H, Tq, Tk) score matrices an implementation holds at its peak
#: (forward, forward+backward). Implementations not listed are assumed to materialise scores
#: like the from-scratch one: a conservative guess that can skip a case, never crash it.
#: Register a better model for your own class with :func:`register_memory_model`.
_SCORE_COPIES: dict[type, tuple[float, float]] = {
    MultiHeadAttentionCombinedQKV: (5.0, 8.0),
    MHAPyTorchFlexAttention: (0.0, 0.0),
    MHAPyTorchScaledDotProduct: (0.0, 0.0),
}
_UNKNOWN_SCORE_COPIES = (5.0, 8.0)
#: Allocator fragmentation, cuBLAS workspaces, the CUDA context: a margin on every estimate.
_ESTIMATE_MARGIN = 1.15
_ESTIMATE_SLACK = 512 * MiB
#: Block size used to count the visible work of masked cases (flex's default block).
MASK_BLOCK = 128


def register_memory_model(cls: type[AttentionBase], forward_copies: float, backward_copies: float) -> None:
    """Declare how many ``(B, H, Tq, Tk)`` score matrices ``cls`` holds at peak (0 for fused kernels)."""
    if not (isinstance(cls, type) and issubclass(cls, AttentionBase)):
        raise TypeError(f"{cls!r} is not a subclass of attention.AttentionBase")
    _SCORE_COPIES[cls] = (float(forward_copies), float(backward_copies))


def score_copies(impl: str, backward: bool) -> tuple[float, str]:
    """``(copies, why)``: score matrices ``impl`` holds at peak, and where that number comes from."""
    if impl in CORE_REFERENCES or impl in MODULE_REFERENCES:
        return 0.0, "fused reference"
    cls = registry.get(impl)
    for known in type.mro(cls):
        if known in _SCORE_COPIES:
            copies = _SCORE_COPIES[known][1 if backward else 0]
            return copies, ("O(T^2) scores" if copies else "fused, O(T)")
    return _UNKNOWN_SCORE_COPIES[1 if backward else 0], "no memory model registered: assumed O(T^2) scores"


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


# -- masks -----------------------------------------------------------------------------------


def document_lengths(tokens: int, docs: int) -> list[int]:
    """A fixed, uneven split of ``tokens`` into ``docs`` packed documents (deterministic everywhere)."""
    if docs < 1 or docs > tokens:
        raise ValueError(f"cannot split {tokens} tokens into {docs} documents")
    weights = [(i * 7) % 5 + 1 for i in range(docs)]  # 1, 3, 5, 2, 4, 1, ...
    total = sum(weights)
    lengths = [max(1, tokens * w // total) for w in weights[:-1]]
    lengths.append(tokens - sum(lengths))
    if lengths[-1] < 1:
        raise ValueError(f"cannot split {tokens} tokens into {docs} documents")
    return lengths


def document_ids(batch: int, tokens: int, docs: int, device: torch.device | str = "cpu") -> Tensor:
    """``(batch, tokens)`` integer ids of :func:`document_lengths`, the same split in every row."""
    ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(document_lengths(tokens, docs))])
    return ids.to(device).expand(batch, tokens).contiguous()  # (B, T)


def parse_mask(mask: str) -> tuple[str, int]:
    """``"causal"``, ``"sliding_window:W"`` or ``"document:N"`` -> ``(kind, parameter)``."""
    kind, _, arg = mask.partition(":")
    if kind == "causal" and not arg:
        return kind, 0
    if kind in ("sliding_window", "document") and arg.isdigit() and int(arg) > 0:
        return kind, int(arg)
    raise ValueError(f"unknown mask {mask!r}: use 'causal', 'sliding_window:<window>' or 'document:<docs>'")


def mask_mod_for(mask: str, batch: int, tokens: int, device: torch.device | str) -> masks.MaskMod:
    kind, arg = parse_mask(mask)
    if kind == "causal":
        return masks.causal
    if kind == "sliding_window":
        return masks.sliding_window(arg)
    return masks.and_masks(masks.causal, masks.document(document_ids(batch, tokens, arg, device)))


@functools.cache
def visible_counts(mask: str, batch: int, tokens: int, device: str = "cpu", block: int = MASK_BLOCK) -> tuple[int, int]:
    """``(visible pairs, pairs in visible blocks)`` summed over the batch, for one head.

    A block (``block x block`` queries x keys) is visible if any pair in it is; a block-sparse
    kernel computes whole visible blocks, so that is the work it does. Evaluated on ``device``
    a few block rows at a time (a 16k-token mask on a GPU takes milliseconds).
    """
    mask_mod = mask_mod_for(mask, batch, tokens, device)
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


# -- memory ----------------------------------------------------------------------------------


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes a new case can still allocate on ``device`` (our allocator's cached blocks count as
    free); ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _fmt_gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Prefill/training attention: ``level="core"`` times ``module._attend`` on prepared
    ``q, k, v``; ``level="module"`` times ``module(x)``. ``backward`` adds the backward pass."""

    impl: str
    batch: int
    seq_len: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str
    backward: bool = False
    level: str = "core"
    num_kv_heads: int | None = None
    d_in: int | None = None
    mask: str = "causal"

    def __post_init__(self) -> None:
        if self.level not in ("core", "module"):
            raise ValueError(f"level must be 'core' or 'module', got {self.level!r}")
        for name in ("batch", "seq_len", "num_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.kv_heads != 0:
            raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_heads ({self.num_heads})")
        parse_mask(self.mask)

    # -- derived sizes ------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def d_out(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def hidden(self) -> int:
        return self.d_in or self.d_out

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def direction(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def case_id(self) -> str:
        """A stable, readable key: baselines are matched on it."""
        parts = [self.level, self.impl, dtype_name(self.dtype), self.direction.replace("+", "_")]
        parts += [f"B{self.batch}", f"T{self.seq_len}", f"H{self.num_heads}"]
        if self.kv_heads != self.num_heads:
            parts.append(f"KV{self.kv_heads}")
        parts.append(f"D{self.head_dim}")
        if self.d_in is not None and self.d_in != self.d_out:
            parts.append(f"d{self.d_in}")
        if self.mask != "causal":
            parts.append(self.mask.replace(":", ""))
        return "-".join(parts)

    def visible_block_fraction(self) -> float:
        """Share of the full ``T x T`` square a block-sparse kernel computes (causal: 1/2 by convention)."""
        if self.mask == "causal":
            return 0.5
        _, block_pairs = visible_counts(self.mask, self.batch, self.seq_len, str(torch.device(self.device)))
        return block_pairs / (self.batch * self.seq_len * self.seq_len)

    def gemm_flops(self) -> float:
        tokens = self.batch * self.seq_len
        qkv_out = self.d_out + 2 * self.kv_heads * self.head_dim
        return 2.0 * tokens * self.hidden * qkv_out + 2.0 * tokens * self.d_out * self.d_out

    def flops(self) -> float:
        if self.impl in MODULE_REFERENCES:
            core = 0.0
        else:
            square = attention_flops(
                self.batch,
                self.num_heads,
                self.seq_len,
                self.seq_len,
                self.head_dim,
                causal=False,
                backward=self.backward,
            )
            core = square * self.visible_block_fraction()
        if self.level == "core":
            return core
        return core + self.gemm_flops() * (3.0 if self.backward else 1.0)

    def min_bytes(self) -> int:
        row = self.batch * self.seq_len * self.head_dim * self.elt  # one head's q, k, v or out
        q = row * self.num_heads
        kv = 2 * row * self.kv_heads
        if self.impl in MODULE_REFERENCES:
            core = 0
        else:
            core = q + kv + q  # read q, k, v; write out
            if self.backward:
                core += 3 * q + kv + q + kv  # read q, out, dout, k, v; write dq, dk, dv
        if self.level == "core":
            return core
        tokens = self.batch * self.seq_len
        weights = (self.hidden * (self.d_out + 2 * self.kv_heads * self.head_dim) + self.d_out**2) * self.elt
        acts = tokens * (self.hidden + (self.d_out + 2 * self.kv_heads * self.head_dim) + 2 * self.d_out) * self.elt
        return core + (weights + acts) * (3 if self.backward else 1)

    def estimated_peak_bytes(self) -> int:
        elt = self.elt
        tokens = self.batch * self.seq_len
        qkv = tokens * (self.d_out + 2 * self.kv_heads * self.head_dim) * elt  # prepared q, k, v
        out = tokens * self.d_out * elt
        lse = self.batch * self.num_heads * self.seq_len * 4
        total = qkv + 2 * out + lse  # inputs, output, grad_out held by the case
        if self.backward:
            total += 2 * qkv + 2 * out  # dq, dk, dv and the kernel's scratch
        if self.level == "module":
            weights = (self.hidden * (self.d_out + 2 * self.kv_heads * self.head_dim) + self.d_out**2) * elt
            total += tokens * self.hidden * elt + weights + 2 * out
            if self.backward:
                total += 2 * weights + tokens * self.hidden * elt + qkv + out
        if self.impl not in MODULE_REFERENCES:
            copies, _ = score_copies(self.impl, self.backward)
            scores = self.batch * self.num_heads * self.seq_len * self.seq_len * elt
            total += int(copies * scores)
            if self.mask != "causal" or copies:
                # A dense bool mask (SDPA and from-scratch evaluate it per call); SDPA adds an
                # additive float copy of it for its kernel.
                mask_batch = self.batch if parse_mask(self.mask)[0] == "document" else 1
                total += mask_batch * self.seq_len * self.seq_len * (1 + elt)
        return int(total * _ESTIMATE_MARGIN) + _ESTIMATE_SLACK

    def skip_reason(self) -> str | None:
        """``None`` if the case can run here, else a reason (memory is decided by
        :meth:`estimated_peak_bytes` against the device's free memory, not by name)."""
        return _common_skip_reason(self, self.estimated_peak_bytes)

    def build(self) -> tuple[Callable[[], object], Callable[[], None]]:
        """``(fn, setup)``: ``fn()`` is the timed call; ``setup()`` runs before each call,
        outside the timing (clears gradients so backward never accumulates)."""
        return _build_prefill(self)


@dataclass(frozen=True)
class DecodeWorkload:
    """One decode step: one query token per sequence against ``context`` cached tokens (core level).

    The cost is reading the KV cache, so ``min_bytes`` (the KV read) over the time is the figure
    of merit, to be compared with the device's copy bandwidth.
    """

    impl: str
    context: int
    batch: int = 8
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    backward: bool = False  # decode is inference: always False; here so both kinds read alike
    level: str = "core"

    def __post_init__(self) -> None:
        for name in ("context", "batch", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.impl in MODULE_REFERENCES:
            raise ValueError(f"{self.impl!r} is a module-level reference; decode is core level")

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def seq_len(self) -> int:
        return self.context

    @property
    def direction(self) -> str:
        return "decode"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads

    @property
    def case_id(self) -> str:
        kind = "MHA" if self.num_kv_heads == self.num_heads else f"GQA{self.num_heads // self.num_kv_heads}"
        return (
            f"decode-{self.impl}-{dtype_name(self.dtype)}-B{self.batch}-N{self.context}-"
            f"H{self.num_heads}-KV{self.num_kv_heads}-D{self.head_dim}-{kind}"
        )

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.num_kv_heads * self.context * self.head_dim * self.elt

    def flops(self) -> float:
        return attention_flops(self.batch, self.num_heads, 1, self.context, self.head_dim, causal=False)

    def min_bytes(self) -> int:
        q_and_out = 2 * self.batch * self.num_heads * self.head_dim * self.elt
        return self.kv_bytes() + q_and_out

    def estimated_peak_bytes(self) -> int:
        total = self.kv_bytes()
        if self.impl not in CORE_REFERENCES:
            copies, _ = score_copies(self.impl, False)
            if copies:  # materialises scores, and repeats KV heads for grouped queries
                groups = self.num_heads // self.num_kv_heads
                total += self.kv_bytes() * groups if groups > 1 else 0
                total += int(copies * self.batch * self.num_heads * self.context * self.elt)
        return int(total * _ESTIMATE_MARGIN) + _ESTIMATE_SLACK

    def skip_reason(self) -> str | None:
        return _common_skip_reason(self, self.estimated_peak_bytes)

    def build(self) -> tuple[Callable[[], object], Callable[[], None]]:
        return _build_decode(self)


def decode(
    impl: str,
    context: int,
    *,
    gqa: bool = False,
    batch: int = 8,
    num_heads: int = 16,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
) -> DecodeWorkload:
    """The issue-4 decode case: B=8, bf16, D=128, 16 query heads; ``gqa`` gives 4 KV heads."""
    return DecodeWorkload(
        impl,
        context,
        batch=batch,
        num_heads=num_heads,
        num_kv_heads=num_heads // 4 if gqa else num_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
    )


# -- shared ---------------------------------------------------------------------------------


def _common_skip_reason(w: Workload | DecodeWorkload, peak: Callable[[], int]) -> str | None:
    device = torch.device(w.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    is_reference = w.impl in CORE_REFERENCES or w.impl in MODULE_REFERENCES
    if not is_reference and w.impl not in registry.implementations():
        return f"unknown implementation {w.impl!r}"
    if w.impl in CORE_REFERENCES and w.level != "core":
        return f"{w.impl} is a core-level reference (raw scaled_dot_product_attention)"
    if w.impl in MODULE_REFERENCES and w.level != "module":
        return f"{w.impl} is a module-level reference (the two projections)"
    backend = RAW_SDPA_BACKENDS.get(w.impl)
    if backend and getattr(w, "mask", "causal") != "causal":
        return f"{w.impl} is a plain-causal reference (raw_sdpa takes a prebuilt dense mask)"
    if backend and device.type != "cuda":
        return f"{w.impl} forces a CUDA backend"
    if backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION") and w.dtype == torch.float32:
        return f"{w.impl}: the {backend.lower()} backend has no float32 kernel"
    if w.backward and not is_reference and not registry.get(w.impl).supports_backward(device):
        return f"{w.impl} has no backward on {device.type}"
    need = peak()
    free = free_memory_bytes(device)
    if free is not None and need > 0.92 * free:
        _, why = score_copies(w.impl, w.backward)
        return f"needs ~{_fmt_gib(need)} ({why}); {device.type} has {_fmt_gib(free)} free"
    return None


#: JSON ``kernel_options`` for flex prefill cases (block sizes, num_warps...): the tuning lever
#: of issue 3 point 9, set by ``pytest perf --perf-flex-kernel-options``. Decode keeps flex's own.
FLEX_KERNEL_OPTIONS_ENV = "ATTENTION_FLEX_KERNEL_OPTIONS"


def flex_kernel_options() -> dict | None:
    raw = os.environ.get(FLEX_KERNEL_OPTIONS_ENV, "").strip()
    if not raw:
        return None
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{FLEX_KERNEL_OPTIONS_ENV} is not JSON ({exc}): {raw!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{FLEX_KERNEL_OPTIONS_ENV} must be a JSON object, got {raw!r}")
    return options


def _module(
    impl: str, w: Workload | DecodeWorkload, d_in: int, context_length: int, mask_mod: masks.MaskMod
) -> AttentionBase:
    cls = MHAPyTorchScaledDotProduct if impl in CORE_REFERENCES or impl in MODULE_REFERENCES else registry.get(impl)
    extra = {}
    options = flex_kernel_options()
    if options and issubclass(cls, MHAPyTorchFlexAttention) and isinstance(w, Workload):
        extra["kernel_options"] = options
    with torch.device(w.device):  # weights initialised where they run: no host-side init and copy
        module = cls(
            d_in,
            w.num_heads * w.head_dim,
            w.num_heads,
            context_length,
            num_kv_heads=w.kv_heads,
            mask_mod=mask_mod,
            **extra,
        )
    return module.to(dtype=w.dtype).eval()  # eval: no dropout kernels


def raw_sdpa(
    backend: str | None, scale: float, gqa: bool, causal: bool = True, attn_mask: Tensor | None = None
) -> Callable[..., Tensor]:
    """``F.scaled_dot_product_attention`` with the default backend choice or one forced; with
    ``attn_mask`` (a dense mask built once, outside the timed call) instead of ``is_causal``."""
    causal = causal and attn_mask is None

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel([getattr(SDPBackend, backend)]) if backend else nullcontext():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=gqa
            )  # (B, H, Tq, hd)

    return attend


def _seeded(device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(os.environ.get("ATTENTION_PERF_SEED", "0")))
    return g


def _randn(shape: tuple[int, ...], w: Workload | DecodeWorkload, g: torch.Generator, grad: bool = False) -> Tensor:
    t = torch.randn(shape, generator=g, device=w.device, dtype=torch.float32).to(w.dtype)
    return t.requires_grad_(grad)


def _tag(fn: Callable[[], object], **tensors: object) -> Callable[[], object]:
    """Expose what ``fn`` runs on as ``fn.inputs`` (for tests and the benchmark report)."""
    fn.inputs = tensors  # type: ignore[attr-defined]
    return fn


def _inference(fn: Callable[[], object]) -> Callable[[], object]:
    """Forward-only cases time inference: no autograd graph is recorded."""

    def run() -> object:
        with torch.no_grad():
            return fn()

    return run


def _build_prefill(w: Workload) -> tuple[Callable[[], object], Callable[[], None]]:
    g = _seeded(w.device)
    torch.manual_seed(0)  # module weights
    mask_mod = mask_mod_for(w.mask, w.batch, w.seq_len, w.device)
    module = _module(w.impl, w, w.hidden, w.seq_len, mask_mod)
    x = _randn((w.batch, w.seq_len, w.hidden), w, g, grad=w.backward and w.level == "module")  # (B, T, d_in)
    grad_out = _randn((w.batch, w.seq_len, w.d_out), w, g)  # (B, T, d_out)
    if w.level == "module":
        return _build_module_level(w, module, x, grad_out)

    with torch.no_grad():  # the very tensors (and strides) the module would attend over
        q, k, v, _ = module._project(x, None, None)  # (B, H, T, hd), (B, H_kv, T, hd) x2
    q, k, v = (t.detach().requires_grad_(w.backward) for t in (q, k, v))
    grad_core = grad_out.view(w.batch, w.seq_len, w.num_heads, w.head_dim).transpose(1, 2)  # (B, H, T, hd)
    if w.impl in CORE_REFERENCES:
        # A masked case gets its dense mask prebuilt: the floor for SDPA with that mask, beside
        # the SDPA module, which builds it in every call.
        attn_mask = (
            None if w.mask == "causal" else masks.dense_mask(mask_mod, w.batch, 1, w.seq_len, w.seq_len, w.device)
        )
        sdpa = raw_sdpa(RAW_SDPA_BACKENDS[w.impl], module.scale, w.kv_heads != w.num_heads, attn_mask=attn_mask)

        def attend() -> Tensor:
            return sdpa(q, k, v)  # (B, H, T, hd)

    else:

        def attend() -> Tensor:
            return module._attend(q, k, v, q_offset=0, document_ids=None)  # (B, H, T, hd)

    def setup() -> None:
        q.grad = k.grad = v.grad = None

    if not w.backward:
        return _tag(_inference(attend), module=module, q=q, k=k, v=v), setup

    def forward_backward() -> None:
        attend().backward(grad_core)

    return _tag(forward_backward, module=module, q=q, k=k, v=v), setup


def _build_module_level(
    w: Workload, module: AttentionBase, x: Tensor, grad_out: Tensor
) -> tuple[Callable[[], object], Callable[[], None]]:
    if w.impl in MODULE_REFERENCES:  # the two projections, no attention between them
        g = _seeded(w.device)
        context = _randn((w.batch, w.seq_len, w.d_out), w, g, grad=w.backward)  # (B, T, d_out)
        grad_qkv = _randn((w.batch, w.seq_len, module.qkv.out_features), w, g)  # (B, T, d_out + 2 kv_dim)

        def forward() -> tuple[Tensor, Tensor]:
            return module.qkv(x), module.proj(context)  # (B, T, d_out + 2 kv_dim), (B, T, d_out)

        def forward_backward() -> None:
            torch.autograd.backward(list(forward()), [grad_qkv, grad_out])

        def setup() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = context.grad = None

    else:

        def forward() -> Tensor:
            return module(x)  # (B, T, d_out)

        def forward_backward() -> None:
            module(x).backward(grad_out)

        def setup() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None

    return _tag(forward_backward if w.backward else _inference(forward), module=module, x=x), setup


def _build_decode(w: DecodeWorkload) -> tuple[Callable[[], object], Callable[[], None]]:
    g = _seeded(w.device)
    torch.manual_seed(0)
    module = _module(w.impl, w, w.num_heads * w.head_dim, w.context, masks.causal)
    cache = module.make_kv_cache(w.batch, w.context)
    with torch.no_grad():
        cache.k_cache.copy_(_randn(tuple(cache.k_cache.shape), w, g))  # (B, H_kv, N, hd)
        cache.v_cache.copy_(_randn(tuple(cache.v_cache.shape), w, g))  # (B, H_kv, N, hd)
    cache.pos = w.context
    k, v = cache.k_cache[:, :, : w.context], cache.v_cache[:, :, : w.context]  # (B, H_kv, N, hd) each
    q = _randn((w.batch, w.num_heads, 1, w.head_dim), w, g)  # (B, H, 1, hd): the newest token
    offset = w.context - 1  # the new token is the last cached position and sees every key

    if w.impl in CORE_REFERENCES:
        sdpa = raw_sdpa(RAW_SDPA_BACKENDS[w.impl], module.scale, w.num_kv_heads != w.num_heads, causal=False)

        def step() -> Tensor:
            return sdpa(q, k, v)  # (B, H, 1, hd)

    else:

        def step() -> Tensor:
            return module._attend(q, k, v, q_offset=offset, document_ids=None)  # (B, H, 1, hd)

    def setup() -> None:
        return None

    return _tag(_inference(step), module=module, q=q, k=k, v=v), setup


__all__ = [
    "CORE_REFERENCES",
    "DTYPES",
    "MODULE_REFERENCES",
    "RAW_SDPA_BACKENDS",
    "DecodeWorkload",
    "Workload",
    "attention_flops",
    "decode",
    "document_ids",
    "document_lengths",
    "dtype_name",
    "free_memory_bytes",
    "register_memory_model",
    "score_copies",
    "visible_counts",
]
