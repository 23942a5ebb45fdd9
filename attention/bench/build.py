"""Build what a case times: modules, ``torch.randn`` inputs and the timed callable.

:meth:`Workload.build <attention.bench.workload.Workload.build>` lands here. Inputs come from a
seeded generator (never zeros: kernels may shortcut zeros), weights from ``torch.manual_seed(0)``,
so two builds of one case, from two revisions of the library, see identical numbers.
``impls`` (name -> class) says whose implementations to build: the registry by default, another
revision's registry for an A/B comparison.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import masks, registry
from ..base import AttentionBase
from ..sdpa import MHAPyTorchScaledDotProduct

if TYPE_CHECKING:
    from .workload import DecodeWorkload, Workload

Built = tuple[Callable[[], object], Callable[[], None]]

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


def _module(
    cls: type[AttentionBase],
    w: Workload | DecodeWorkload,
    d_in: int,
    context_length: int,
    mask_mod: masks.MaskMod | None,
) -> AttentionBase:
    """``cls`` with the case's sizes; ``mask_mod=None`` keeps the class's own default (causal).

    Causal must come from ``cls``'s own package: implementations take their fast path when the
    mask *is* their ``causal``, and another revision's classes (an A/B) would not recognise ours.
    """
    extra = {} if mask_mod is None else {"mask_mod": mask_mod}
    if getattr(w, "kernel_options", None) and "kernel_options" in inspect.signature(cls).parameters:
        extra["kernel_options"] = dict(w.kernel_options)
    torch.manual_seed(0)  # module weights: identical for every build of the case
    with torch.device(w.device):  # weights initialised where they run: no host-side init and copy
        module = cls(
            d_in,
            w.num_heads * w.head_dim,
            w.num_heads,
            context_length,
            num_kv_heads=w.kv_heads,
            **extra,
        )
    return module.to(dtype=w.dtype).eval()  # eval: no dropout kernels


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


def _check_result(module: AttentionBase, attend: Callable[[], object], q: Tensor) -> None:
    """Core cases call ``_attend`` directly, past the module's check of its result (a wrong shape
    or dtype would be timed as if right): one call here, untimed and in the timed call's own grad
    mode, so nothing compiles twice. Classes of revisions older than that check are not held to it."""
    check = getattr(module, "_check_context", None)
    if check is not None:
        check(attend(), q)


def prefill(w: Workload, cls: type[AttentionBase]) -> Built:
    g = torch.Generator(device=w.device).manual_seed(w.seed)
    pattern = masks.from_spec(w.mask, batch=w.batch, tokens=w.seq_len, device=w.device)
    module = _module(cls, w, w.hidden, w.seq_len, None if w.mask == "causal" else pattern.visible)
    x = _randn((w.batch, w.seq_len, w.hidden), w, g, grad=w.backward and w.level == "module")  # (B, T, d_in)
    grad_out = _randn((w.batch, w.seq_len, w.d_out), w, g)  # (B, T, d_out)
    if w.level == "module":
        return _module_level(w, module, x, grad_out, g)

    with torch.no_grad():  # the very tensors (and strides) the module would attend over
        q, k, v, _ = module._project(x, None, None)  # (B, H, T, hd), (B, H_kv, T, hd) x2
    q, k, v = (t.detach().requires_grad_(w.backward) for t in (q, k, v))
    grad_core = grad_out.view(w.batch, w.seq_len, w.num_heads, w.head_dim).transpose(1, 2)  # (B, H, T, hd)
    if w.impl in RAW_SDPA_BACKENDS:
        # A masked case gets its dense mask prebuilt: the floor for SDPA with that mask, beside
        # the SDPA module, which builds it in every call.
        attn_mask = (
            None
            if w.mask == "causal"
            else masks.dense_mask(pattern.visible, w.batch, 1, w.seq_len, w.seq_len, w.device)  # (B|1, 1, T, T)
        )
        sdpa = raw_sdpa(RAW_SDPA_BACKENDS[w.impl], module.scale, w.kv_heads != w.num_heads, attn_mask=attn_mask)

        def attend() -> Tensor:
            return sdpa(q, k, v)  # (B, H, T, hd)

    else:

        def attend() -> Tensor:
            return module._attend(q, k, v, q_offset=0, document_ids=None)  # (B, H, T, hd)

        _check_result(module, attend if w.backward else _inference(attend), q)

    def setup() -> None:
        q.grad = k.grad = v.grad = None

    if not w.backward:
        return _tag(_inference(attend), module=module, q=q, k=k, v=v), setup

    def forward_backward() -> None:
        attend().backward(grad_core)

    return _tag(forward_backward, module=module, q=q, k=k, v=v), setup


def _module_level(w: Workload, module: AttentionBase, x: Tensor, grad_out: Tensor, g: torch.Generator) -> Built:
    if w.impl in MODULE_REFERENCES:  # the two projections, no attention between them
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


def decode(w: DecodeWorkload, cls: type[AttentionBase]) -> Built:
    g = torch.Generator(device=w.device).manual_seed(w.seed)
    module = _module(cls, w, w.num_heads * w.head_dim, w.context, None)
    shape = (w.batch, w.num_kv_heads, w.context, w.head_dim)
    layers = []  # per layer: its query and full KV cache, so no layer reads another's from L2
    for _ in range(w.layers):
        cache = module.make_kv_cache(w.batch, w.context)
        k, v = cache.update(_randn(shape, w, g), _randn(shape, w, g))  # (B, H_kv, N, hd) each
        q = _randn((w.batch, w.num_heads, 1, w.head_dim), w, g)  # (B, H, 1, hd): the newest token
        layers.append((q, k, v))
    offset = w.context - 1  # the new token is the last cached position and sees every key

    if w.impl in RAW_SDPA_BACKENDS:
        attend = raw_sdpa(RAW_SDPA_BACKENDS[w.impl], module.scale, w.num_kv_heads != w.num_heads, causal=False)
    else:

        def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return module._attend(q, k, v, q_offset=offset, document_ids=None)  # (B, H, 1, hd)

        _check_result(module, _inference(lambda: attend(*layers[0])), layers[0][0])

    def step() -> list[Tensor]:
        return [attend(q, k, v) for q, k, v in layers]  # layers x (B, H, 1, hd)

    def setup() -> None:
        return None

    q, k, v = layers[0]
    return _tag(_inference(step), module=module, q=q, k=k, v=v, layers=layers), setup


def implementation(w: Workload | DecodeWorkload, impls: Mapping[str, type[AttentionBase]] | None = None) -> type:
    """The class a case builds: the SDPA module for the references (their inputs are its
    projections), else ``impls[w.impl]`` (default: the registry); ``None`` if ``impls`` lacks it."""
    if w.impl in CORE_REFERENCES or w.impl in MODULE_REFERENCES:
        return MHAPyTorchScaledDotProduct
    return (registry.implementations() if impls is None else impls).get(w.impl)
