"""The cases a perf run times, by grid name.

* ``full``: the grid of docs/design.md#prefill-grid on a GPU: core and module, forward and
  forward+backward, bf16, head dim 64 and 128, 512..16k tokens per sequence with batch x tokens
  = 16k and hidden 2048 (heads = 2048 / D), raw-SDPA references, a few fp32 cases, the
  LLMs-from-scratch module configuration, decode against 1k..32k-token caches
  (docs/design.md#decode-case) and masked cases (docs/design.md#mask-cases).
* ``quick``: the same kinds at fewer shapes, for iterating on one lever.
* ``tiny``: CPU-sized shapes of every kind, so the machinery can be seen working without a GPU.

Every registered implementation is included, plugins too, unless ``impls`` names the ones to
time (``--perf-impl``); the references (``raw_sdpa``, ``gemms``) are in every grid. Cases an
implementation cannot run skip themselves (:meth:`attention.bench.workload.Workload.skip_reason`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from ... import registry
from ..cost import dtype_name
from ..workload import DecodeWorkload, Workload, decode

Case = Workload | DecodeWorkload
GRIDS = ("full", "quick", "tiny")

TOKENS = 16384
HIDDEN = 2048
LLM = dict(batch=8, seq_len=1024, d_in=768, num_heads=12, head_dim=64)  # LLMs-from-scratch bonus config
#: Layers in the decode cases that time a model's step as one call (docs/design.md#decode-case).
STEP_LAYERS = 8


def _prefill(
    impls: Iterable[str],
    levels: Iterable[str],
    seq_lens: Iterable[int],
    head_dims: Iterable[int],
    backward: Iterable[bool],
    *,
    dtype: torch.dtype,
    device: str,
    tokens: int = TOKENS,
    hidden: int = HIDDEN,
) -> list[Workload]:
    return [
        Workload(impl, tokens // t, t, hidden // d, d, dtype, device, backward=bwd, level=level)
        for level in levels
        for d in head_dims
        for bwd in backward
        for t in seq_lens
        for impl in impls
    ]


def grid(
    name: str,
    device: str,
    *,
    impls: Iterable[str] | None = None,
    flex_kernel_options: Mapping[str, object] | None = None,
) -> list[Case]:
    """The cases of grid ``name`` on ``device``, in run order (unique ``case_id``).

    ``impls``: the registered implementations to time (default every one), beside the references.
    ``flex_kernel_options`` go to every prefill case (flex modules take them; decode keeps
    flex's own split-KV choice).
    """
    cases = _cases(name, device, list(registry.implementations()) if impls is None else list(impls))
    if flex_kernel_options:
        cases = [
            dataclasses.replace(c, kernel_options=dict(flex_kernel_options)) if isinstance(c, Workload) else c
            for c in cases
        ]
    return cases


def _cases(name: str, device: str, impls: list[str]) -> list[Case]:
    if name not in GRIDS:
        raise ValueError(f"unknown perf grid {name!r}; choose one of {', '.join(GRIDS)}")
    raw = ["raw_sdpa", "raw_sdpa_flash"]
    both = (False, True)
    bf16 = torch.bfloat16
    if name == "tiny":
        return _tiny(impls, device)
    if name == "full":
        lens, dims, contexts, masks = (512, 1024, 4096, 16384), (64, 128), (1024, 4096, 16384, 32768), None
        step_contexts: tuple[int, ...] = (1024, 4096, 16384)
    else:
        lens, dims, contexts, masks = (1024, 4096, 16384), (128,), (4096, 16384), ("sliding_window:4096",)
        step_contexts = (4096,)
    cases: list[Case] = []
    cases += _prefill(impls + raw, ["core"], lens, dims, both, dtype=bf16, device=device)
    cases += _prefill(impls, ["module"], lens, dims, both, dtype=bf16, device=device)
    # The projections alone: the same GEMM shapes at every length (B x T = 16k tokens, hidden 2048).
    cases += _prefill(["gemms"], ["module"], [4096], [128], both, dtype=bf16, device=device)
    if name == "full":
        cases += _prefill(
            [*impls, "raw_sdpa"], ["core"], (1024, 4096), (64,), [False], dtype=torch.float32, device=device
        )
    for dtype in (torch.float32, bf16):
        for bwd in both:
            for impl in [*impls, "gemms"]:
                cases.append(Workload(impl, dtype=dtype, device=device, backward=bwd, level="module", **LLM))
    for gqa in (False, True):
        for n in contexts:
            for impl in [*impls, "raw_sdpa"]:
                cases.append(decode(impl, n, gqa=gqa, device=device))
    # A model's decode step: 8 layers in one graph, where launch and merge costs count as they do
    # in a model (docs/design.md#decode-case).
    for gqa in (False, True):
        for n in step_contexts:
            for impl in [*impls, "raw_sdpa"]:
                cases.append(decode(impl, n, gqa=gqa, device=device, layers=STEP_LAYERS))
    for mask in masks or ("sliding_window:4096", "document:8"):
        for impl in [*impls, "raw_sdpa"]:  # raw_sdpa: SDPA on a dense mask built outside the timing
            cases.append(Workload(impl, 1, TOKENS, HIDDEN // 128, 128, bf16, device, mask=mask))
    return cases


def _tiny(impls: list[str], device: str) -> list[Case]:
    f32 = torch.float32
    cases: list[Case] = []
    cases += _prefill(
        [*impls, "raw_sdpa"], ["core"], (64, 128), (16,), (False, True), dtype=f32, device=device, tokens=256, hidden=64
    )
    cases += _prefill(
        [*impls, "gemms"], ["module"], (128,), (16,), (False, True), dtype=f32, device=device, tokens=256, hidden=64
    )
    for impl in [*impls, "raw_sdpa"]:
        cases.append(decode(impl, 256, gqa=True, batch=2, num_heads=4, head_dim=16, dtype=f32, device=device))
    small_step = dict(gqa=True, batch=2, num_heads=4, head_dim=16, dtype=f32, device=device, layers=2)
    cases.append(decode("raw_sdpa", 256, **small_step))  # the model-step path, once
    for mask in ("sliding_window:64", "document:3"):
        for impl in [*impls, "raw_sdpa"]:
            cases.append(Workload(impl, 1, 256, 4, 16, f32, device, mask=mask))
    return cases


def kind(case: Case) -> str:
    """``"decode"``, ``"mask"`` or ``"prefill"``: which perf test module times it."""
    if isinstance(case, DecodeWorkload):
        return "decode"
    return "prefill" if case.mask == "causal" else "mask"


def group(case: Case) -> str:
    """The table group: rows that differ only in implementation and length sit together."""
    if isinstance(case, DecodeWorkload):
        attn = "MHA" if case.num_kv_heads == case.num_heads else f"GQA{case.num_heads // case.num_kv_heads}"
        layers = f", {case.layers} layers a step" if case.layers > 1 else ""
        return f"decode {dtype_name(case.dtype)} {attn} D{case.head_dim}{layers}"
    if case.mask != "causal":
        return f"mask {case.mask} {case.level} {dtype_name(case.dtype)} {case.direction}"
    llm = " llms-from-scratch" if case.d_in == LLM["d_in"] else ""
    return f"{case.level}{llm} {dtype_name(case.dtype)} {case.direction} D{case.head_dim}"
