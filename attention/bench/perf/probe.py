"""What actually ran: the SDPA backend, and whether flex ran its fused kernel.

One profiled call per case, outside the timed region. The profiler's CPU events name the aten op
SDPA dispatched to (``aten::_scaled_dot_product_cudnn_attention`` and friends), which is more
robust than kernel names; CUDA kernel names are the fallback and the evidence for flex (a fused
flex call launches a Triton template kernel and no ``bmm``/``softmax``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

#: aten op (without ``aten::`` and a ``_backward`` suffix) -> backend name.
SDPA_OPS = {
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_attention_math": "math",
    "_scaled_dot_product_attention_math_for_mps": "math",
    "_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
#: Substrings of CUDA kernel names, checked in order, when no op name says it.
SDPA_KERNELS = (
    ("cudnn", "cudnn"),
    ("fmha_cutlass", "efficient"),
    ("attention_kernel_batched", "efficient"),
    ("mem_efficient", "efficient"),
    ("flash_fwd", "flash"),
    ("flash_bwd", "flash"),
    ("pytorch_flash", "flash"),
)
#: Ops only an unfused attention runs: a softmax over a materialised score matrix. (Matmuls are
#: no evidence: a module's projections run them either way.)
UNFUSED_OPS = {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "logsumexp"}


@dataclass
class Probe:
    ops: list[str] = field(default_factory=list)  # aten op names, "aten::" stripped, in order
    kernels: list[str] = field(default_factory=list)  # CUDA kernel names, in order
    error: str | None = None  # why profiling failed, if it did


def _op_name(name: str) -> str:
    return name.removeprefix("aten::")


def profile_call(fn: Callable[[], object], device: torch.device | str) -> Probe:
    """Run ``fn`` once under ``torch.profiler``; never raises (a failed probe says why)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        ops, kernels = [], []
        for event in prof.events():
            on_gpu = str(getattr(event, "device_type", "")).endswith("CUDA")
            (kernels if on_gpu else ops).append(event.name if on_gpu else _op_name(event.name))
        return Probe(ops=ops, kernels=kernels)
    except Exception as exc:  # the probe informs guards; it must not take the case down
        return Probe(error=f"{type(exc).__name__}: {exc}")


def classify_sdpa(ops: Iterable[str], kernels: Iterable[str] = ()) -> str:
    """The SDPA backend(s) seen: ``"cudnn"``, ``"flash"``, ``"efficient"``, ``"math"``, ... joined by
    ``+`` if several ran; ``"none"`` if no SDPA ran."""
    found = []
    for op in ops:
        backend = SDPA_OPS.get(_op_name(op).removesuffix("_backward"))
        if backend and backend not in found:
            found.append(backend)
    if not found:
        for kernel in kernels:
            lowered = kernel.lower()
            for needle, backend in SDPA_KERNELS:
                if needle in lowered and backend not in found:
                    found.append(backend)
                    break
    return "+".join(found) if found else "none"


def classify_flex(ops: Iterable[str], kernels: Iterable[str], device_type: str) -> str:
    """``"fused"`` (Triton kernels and no separate softmax), ``"unfused"`` (a softmax op ran),
    or ``"eager"`` off CUDA, where flex is never compiled."""
    if device_type != "cuda":
        return "eager"
    ops = {_op_name(op) for op in ops}
    triton = any(k.startswith("triton") for k in kernels)
    if ops & UNFUSED_OPS:
        return "unfused"
    return "fused" if triton else "unknown"
