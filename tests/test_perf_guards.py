"""attention.bench.perf.probe and guards: backend detection and the fallback detectors (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention.bench.perf import guards, probe

from .perf_support import H100, case_info


@pytest.mark.parametrize(
    "ops,kernels,expected",
    [
        (["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_cudnn_attention"], [], "cudnn"),
        (["_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"], [], "flash"),
        (["aten::_scaled_dot_product_efficient_attention"], [], "efficient"),
        (["aten::_scaled_dot_product_attention_math", "aten::bmm"], [], "math"),
        ([], ["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16"], "cudnn"),
        ([], ["void pytorch_flash::flash_fwd_kernel<...>"], "flash"),
        ([], ["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"], "efficient"),
        (["aten::addmm"], ["ampere_bf16_gemm"], "none"),
        (["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"], [], "cudnn+math"),
    ],
)
def test_classify_sdpa(ops, kernels, expected):
    assert probe.classify_sdpa(ops, kernels) == expected


def test_classify_flex():
    fused = ["triton_tem_fused_0", "triton_poi_fused_1"]
    assert probe.classify_flex(["aten::empty", "aten::addmm", "aten::matmul"], fused, "cuda") == "fused"
    assert probe.classify_flex(["aten::bmm", "aten::_safe_softmax", "aten::logsumexp"], ["gemm"], "cuda") == "unfused"
    assert probe.classify_flex([], [], "cuda") == "unknown"
    assert probe.classify_flex([], [], "cpu") == "eager"


def test_the_profiler_probe_sees_the_backend_that_ran():
    q = torch.randn(1, 2, 32, 8)  # (B, H, T, hd)
    seen = probe.profile_call(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), "cpu")
    assert seen.error is None and probe.classify_sdpa(seen.ops, seen.kernels) == "flash_cpu"
    with sdpa_kernel([SDPBackend.MATH]):
        seen = probe.profile_call(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), "cpu")
    assert probe.classify_sdpa(seen.ops, seen.kernels) == "math"


def test_a_failing_probe_reports_instead_of_raising():
    def boom():
        raise RuntimeError("no")

    assert "RuntimeError" in probe.profile_call(boom, "cpu").error


def problems(**changes):
    return guards.check(case_info("k", **changes), H100)


def test_a_healthy_case_passes():
    assert problems() == []


def test_sdpa_math_on_cuda_is_a_failure_unless_a_mask_forces_it():
    assert any("math backend" in p for p in problems(sdpa_backend="math"))
    assert problems(sdpa_backend="math", mask="sliding_window:4096", tflops=None) == []
    assert problems(sdpa_backend="math", device="cpu") == []


def test_flex_unfused_and_quadratic_memory_are_failures():
    flex = dict(family="flex", impl="flex", sdpa_backend=None, flex_path="fused")
    assert problems(**flex) == []
    assert any("unfused" in p for p in problems(**dict(flex, flex_path="unfused")))
    quadratic = problems(**dict(flex, peak_mem_mib=5000.0, scores_mib=4096.0))
    assert any("score matrix" in p for p in quadratic)
    assert problems(**dict(flex, peak_mem_mib=5000.0, scores_mib=4096.0, seq_len=512)) == []
    # A module's peak includes its projections: judged on the core case only.
    assert problems(**dict(flex, peak_mem_mib=586.0, scores_mib=512.0, level="module")) == []


def test_impossible_numbers_say_the_harness_is_broken():
    assert any("harness is broken" in p for p in problems(tflops=900.0))
    assert any("copy bandwidth" in p for p in problems(kind="decode", tflops=1.0, gbps=4000.0))
    assert any("timer" in p for p in problems(timer="perf-counter"))
    assert any("compilation" in p for p in problems(compiles_while_timing=2))


def test_anchor_range():
    assert guards.anchor_for(case_info("k"), H100) == 414
    assert any("far below" in p for p in problems(tflops=50.0))
    assert any("far above" in p for p in problems(tflops=750.0, head_dim=64))
    assert problems(tflops=300.0) == []
    other_gpu = dict(H100, gpu_name="NVIDIA A100-SXM4-80GB", matmul_tflops=None)
    assert guards.check(case_info("k", tflops=50.0), other_gpu) == []  # no anchors for that GPU
