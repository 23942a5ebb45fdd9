"""One benchmark case, described once: what runs, how much work it is, how much memory it needs.

perf/ and the benchmark report both build their cases from :class:`Workload` (prefill and
training: attention core or whole module, forward or forward+backward, any mask spec) and
:class:`DecodeWorkload` (one query token against a KV cache of ``context`` tokens), so FLOPs,
bytes and skip decisions are computed in one place: counts in :mod:`.cost`, the timed callable
in :mod:`.build`.

* ``min_bytes`` is the compulsory traffic (inputs read once, outputs written once): the
  denominator for GB/s, which matters for decode where the KV read is the whole cost.
* ``estimated_peak_bytes`` is what the case allocates at its peak; implementations that
  materialise the ``(B, H, T, T)`` score matrix are O(T^2). ``skip_reason`` compares it with the
  memory the device has free, so a case an implementation cannot run skips with a reason in GiB
  instead of dying of out-of-memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .. import checks, masks, registry
from ..base import AttentionBase
from ..capabilities import MEANING, Capabilities
from . import build as builders
from .build import CORE_REFERENCES, MODULE_REFERENCES, RAW_SDPA_BACKENDS
from .cost import ESTIMATE_MARGIN, ESTIMATE_SLACK, attention_flops, dtype_name, fmt_gib, score_copies, visible_counts
from .memory import free_memory_bytes

REFERENCES = CORE_REFERENCES + MODULE_REFERENCES
Impls = Mapping[str, type[AttentionBase]]


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
    mask: str = "causal"  # a mask spec, see attention.masks.parse_spec
    seed: int = 0  # of the inputs; weights always come from torch.manual_seed(0)
    #: flex ``kernel_options`` (block sizes, warps): a tuning lever for flex prefill cases.
    kernel_options: Mapping[str, object] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.level not in ("core", "module"):
            raise ValueError(f"level must be 'core' or 'module', got {self.level!r}")
        for name in ("batch", "seq_len", "num_heads", "head_dim"):
            checks.integer(name, getattr(self, name))
        if self.num_heads % self.kv_heads != 0:
            raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_heads ({self.num_heads})")
        masks.parse_spec(self.mask)
        if self.kernel_options is not None and not isinstance(self.kernel_options, Mapping):
            raise TypeError(f"kernel_options must be a mapping, got {type(self.kernel_options).__name__}")

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
            copies, _ = score_copies(self.impl, self.backward, REFERENCES, self.device)
            scores = self.batch * self.num_heads * self.seq_len * self.seq_len * elt
            total += int(copies * scores)
            if self.mask != "causal" or copies:
                # A dense bool mask (SDPA and from-scratch evaluate it per call); SDPA adds an
                # additive float copy of it for its kernel.
                mask_batch = self.batch if masks.parse_spec(self.mask)[0] == "document" else 1
                total += mask_batch * self.seq_len * self.seq_len * (1 + elt)
        return int(total * ESTIMATE_MARGIN) + ESTIMATE_SLACK

    def skip_reason(self, copies: int = 1) -> str | None:
        """``None`` if the case can run here, else a reason (memory is decided by
        :meth:`estimated_peak_bytes` against the device's free memory, not by name). ``copies``:
        how many builds of the case live at once (2 in an A/B: both revisions')."""
        return _common_skip_reason(self, copies)

    def build(self, impls: Impls | None = None) -> builders.Built:
        """``(fn, setup)``: ``fn()`` is the timed call; ``setup()`` runs before each call,
        outside the timing (clears gradients so backward never accumulates). ``impls``: whose
        implementations to build (default: the registry's)."""
        return builders.prefill(self, _implementation(self, impls))


@dataclass(frozen=True)
class DecodeWorkload:
    """One decode step: one query token per sequence against ``context`` cached tokens (core level).

    The cost is reading the KV cache, so ``min_bytes`` (the KV read) over the time is the figure
    of merit, to be compared with the device's copy bandwidth. ``layers > 1`` is a model's step:
    that many layers, each with a KV cache and query of its own, called one after the other in
    one timed call (one CUDA graph), so launch and merge costs are paid as a model pays them
    (docs/design.md#decode-case).
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
    seed: int = 0
    layers: int = 1

    def __post_init__(self) -> None:
        for name in ("context", "batch", "num_heads", "num_kv_heads", "head_dim", "layers"):
            checks.integer(name, getattr(self, name))
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
        layers = f"-L{self.layers}" if self.layers > 1 else ""
        return (
            f"decode-{self.impl}-{dtype_name(self.dtype)}-B{self.batch}-N{self.context}-"
            f"H{self.num_heads}-KV{self.num_kv_heads}-D{self.head_dim}-{kind}{layers}"
        )

    def layer_kv_bytes(self) -> int:
        """One layer's KV cache."""
        return 2 * self.batch * self.num_kv_heads * self.context * self.head_dim * self.elt

    def kv_bytes(self) -> int:
        return self.layers * self.layer_kv_bytes()

    def flops(self) -> float:
        per_layer = attention_flops(self.batch, self.num_heads, 1, self.context, self.head_dim, causal=False)
        return self.layers * per_layer

    def min_bytes(self) -> int:
        q_and_out = 2 * self.batch * self.num_heads * self.head_dim * self.elt
        return self.layers * (self.layer_kv_bytes() + q_and_out)

    def estimated_peak_bytes(self) -> int:
        total = self.kv_bytes()
        if self.impl not in CORE_REFERENCES:
            copies, _ = score_copies(self.impl, False, REFERENCES, self.device)
            if copies:  # materialises scores, and repeats KV heads for grouped queries
                groups = self.num_heads // self.num_kv_heads
                total += self.layer_kv_bytes() * groups if groups > 1 else 0  # one layer at a time
                total += int(copies * self.batch * self.num_heads * self.context * self.elt)
        return int(total * ESTIMATE_MARGIN) + ESTIMATE_SLACK

    def skip_reason(self, copies: int = 1) -> str | None:
        return _common_skip_reason(self, copies)

    def build(self, impls: Impls | None = None) -> builders.Built:
        return builders.decode(self, _implementation(self, impls))


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
    layers: int = 1,
) -> DecodeWorkload:
    """The decode case of docs/design.md#decode-case: B=8, bf16, D=128, 16 query heads; ``gqa``
    gives 4 KV heads; ``layers`` layers in one step."""
    return DecodeWorkload(
        impl,
        context,
        batch=batch,
        num_heads=num_heads,
        num_kv_heads=num_heads // 4 if gqa else num_heads,
        head_dim=head_dim,
        dtype=dtype,
        device=device,
        layers=layers,
    )


# -- shared ---------------------------------------------------------------------------------


def _undeclared(w: Workload | DecodeWorkload, declared: Capabilities) -> str | None:
    """What the case needs that the implementation does not declare (docs/design.md#capabilities)."""
    if getattr(w, "mask", "causal") != "causal" and not declared.masks:
        return f"the capability 'masks' ({MEANING['masks']})"
    if isinstance(w, DecodeWorkload) and not declared.kv_cache:
        return f"the capability 'kv_cache' ({MEANING['kv_cache']})"
    if not declared.allows_dtype(w.dtype):
        return f"dtype {w.dtype}"
    if not declared.allows_device(w.device):
        return f"device {torch.device(w.device).type}"
    return None


def _common_skip_reason(w: Workload | DecodeWorkload, copies: int) -> str | None:
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
    cls = None if is_reference else registry.get(w.impl)
    reason = None if cls is None else cls.unavailable(device)
    if reason is not None:
        return f"{w.impl}: {reason}"
    if cls is not None and cls.runs_interpreted(device):
        return f"{w.impl} runs interpreted on {device.type}: its timings would measure the interpreter"
    if w.backward and cls is not None and not cls.supports_backward(device):
        return f"{w.impl} has no backward on {device.type}"
    if cls is not None and (undeclared := _undeclared(w, cls.capabilities())):
        return f"{w.impl} does not declare {undeclared}: the case would time something else"
    need = copies * w.estimated_peak_bytes()
    free = free_memory_bytes(device)
    if free is not None and need > 0.92 * free:
        _, why = score_copies(w.impl, w.backward, REFERENCES, w.device)
        held = f", {copies} copies at once" if copies > 1 else ""
        return f"needs ~{fmt_gib(need)} ({why}{held}); {device.type} has {fmt_gib(free)} free"
    return None


def _implementation(w: Workload | DecodeWorkload, impls: Impls | None) -> type[AttentionBase]:
    cls = builders.implementation(w, impls)
    if cls is None:
        raise KeyError(f"{w.impl!r} is not among the implementations to build: {', '.join(impls or ())}")
    return cls


__all__ = [
    "CORE_REFERENCES",
    "MODULE_REFERENCES",
    "RAW_SDPA_BACKENDS",
    "REFERENCES",
    "DecodeWorkload",
    "Workload",
    "attention_flops",
    "decode",
    "visible_counts",
]
