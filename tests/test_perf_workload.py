"""attention.bench.workload and the perf grid: FLOP and byte counts, memory-based skips, builds (CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attention import AttentionBase, from_function, masks, registry
from attention.bench import cost, workload
from attention.bench.cost import attention_flops, visible_counts
from attention.bench.perf import grid as perf_grid
from attention.bench.workload import DecodeWorkload, Workload, decode
from attention.sdpa import MHAPyTorchScaledDotProduct


def test_flops_follow_flashattention_convention():
    assert attention_flops(2, 3, 8, 8, 4, causal=False) == 4 * 2 * 3 * 8 * 8 * 4
    assert attention_flops(2, 3, 8, 8, 4) == 4 * 2 * 3 * 8 * 8 * 4 / 2
    assert attention_flops(2, 3, 8, 8, 4, backward=True) == 3.5 * attention_flops(2, 3, 8, 8, 4)


def test_workload_flops_core_and_module():
    core = Workload("sdpa", 4, 4096, 32, 64, torch.bfloat16, "cpu")
    assert core.flops() == attention_flops(4, 32, 4096, 4096, 64)
    both = Workload("sdpa", 4, 4096, 32, 64, torch.bfloat16, "cpu", backward=True)
    assert both.flops() == 3.5 * core.flops()
    module = Workload("sdpa", 4, 4096, 32, 64, torch.bfloat16, "cpu", level="module")
    tokens, d = 4 * 4096, 2048
    assert module.flops() == core.flops() + 2 * tokens * d * 3 * d + 2 * tokens * d * d
    gemms = Workload("gemms", 4, 4096, 32, 64, torch.bfloat16, "cpu", level="module")
    assert gemms.flops() == module.flops() - core.flops()


@pytest.mark.parametrize("t,w", [(64, 16), (100, 7), (128, 128)])
def test_visible_counts_sliding_window_exact(t, w):
    pairs, block_pairs = visible_counts(f"sliding_window:{w}", 1, t, block=16)
    assert pairs == sum(min(i + 1, w) for i in range(t))
    assert pairs <= block_pairs <= t * t


def test_visible_counts_causal_and_documents():
    assert visible_counts("causal", 2, 50)[0] == 2 * 50 * 51 // 2
    lengths = torch.bincount(masks.packed_document_ids(1, 300, 4)[0]).tolist()
    assert sum(lengths) == 300 and min(lengths) > 0 and lengths == [27, 81, 136, 56]  # weights 1:3:5:2
    assert visible_counts("document:4", 1, 300)[0] == sum(n * (n + 1) // 2 for n in lengths)


def test_mask_workload_counts_visible_blocks_only():
    dense = Workload("flex", 1, 1024, 2, 16, torch.float32, "cpu")
    window = Workload("flex", 1, 1024, 2, 16, torch.float32, "cpu", mask="sliding_window:128")
    assert window.flops() < dense.flops() / 2
    assert window.visible_block_fraction() == pytest.approx(visible_counts("sliding_window:128", 1, 1024)[1] / 1024**2)


def test_decode_bytes_are_the_kv_read():
    mha, gqa = decode("sdpa", 4096, device="cpu"), decode("sdpa", 4096, gqa=True, device="cpu")
    assert mha.kv_bytes() == 2 * 8 * 16 * 4096 * 128 * 2
    assert gqa.kv_bytes() == mha.kv_bytes() // 4
    assert mha.min_bytes() > mha.kv_bytes() and mha.flops() == 4 * 8 * 16 * 4096 * 128


@pytest.mark.parametrize("impl", ["sdpa", "raw_sdpa"])
def test_a_decode_step_runs_every_layer_on_a_cache_of_its_own(impl):
    one = DecodeWorkload(impl, 48, batch=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    step = dataclasses.replace(one, layers=3)
    assert step.case_id == one.case_id + "-L3"
    assert step.kv_bytes() == 3 * one.kv_bytes() and step.min_bytes() == 3 * one.min_bytes()
    assert step.flops() == 3 * one.flops()
    fn, _ = step.build()
    layers = fn.inputs["layers"]
    assert len(layers) == 3 and len({k.data_ptr() for _, k, _ in layers}) == 3  # no cache shared
    outs = fn()  # 3 x (B, H, 1, hd)
    scale = fn.inputs["module"].scale
    for (q, k, v), out in zip(layers, outs, strict=True):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
        torch.testing.assert_close(out, expected)  # each layer: attention over its own cache


def test_skip_is_decided_by_memory_not_by_name(monkeypatch):
    monkeypatch.setattr(workload, "free_memory_bytes", lambda device: 40 * 2**30)
    big = dict(batch=1, seq_len=16384, num_heads=32, head_dim=64, dtype=torch.bfloat16, device="cpu")
    reason = Workload("from_scratch", **big).skip_reason()
    assert reason and "GiB" in reason and "O(T^2)" in reason
    assert Workload("sdpa", **big).skip_reason() is None
    small = dict(big, seq_len=1024, batch=16)
    assert Workload("from_scratch", **small).skip_reason() is None


def test_unknown_plugin_is_assumed_quadratic_until_it_registers_a_model(monkeypatch):
    monkeypatch.setattr(workload, "free_memory_bytes", lambda device: 40 * 2**30)
    monkeypatch.setattr(cost, "_SCORE_COPIES", dict(cost._SCORE_COPIES))

    class Mine(AttentionBase):
        def _attend(self, q, k, v, *, q_offset, document_ids):
            return q

    monkeypatch.setitem(registry._registry, "mine_perf_test", Mine)
    case = Workload("mine_perf_test", 1, 16384, 32, 64, torch.bfloat16, "cpu")
    assert "no memory model registered" in case.skip_reason()
    cost.register_memory_model(Mine, 0, 0)
    assert case.skip_reason() is None


def test_other_skip_reasons():
    assert "no backward" in Workload("flex", 1, 64, 2, 16, torch.float32, "cpu", backward=True).skip_reason()
    assert "module-level" in Workload("gemms", 1, 64, 2, 16, torch.float32, "cpu").skip_reason()
    assert "core-level" in Workload("raw_sdpa", 1, 64, 2, 16, torch.float32, "cpu", level="module").skip_reason()
    assert "CUDA" in Workload("raw_sdpa_flash", 1, 64, 2, 16, torch.float32, "cpu").skip_reason()
    if not torch.cuda.is_available():
        assert "no CUDA" in Workload("sdpa", 1, 64, 2, 16, torch.float32, "cuda").skip_reason()


def test_cases_needing_an_undeclared_capability_skip_naming_it(monkeypatch):
    def plain_causal(q, k, v):  # (B, H, T, D) -> (B, H, T, D)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    monkeypatch.setitem(registry._registry, "plain_perf_test", from_function(plain_causal, dtypes=[torch.float32]))
    window = Workload("plain_perf_test", 1, 256, 4, 16, torch.float32, "cpu", mask="sliding_window:64")
    assert "does not declare the capability 'masks'" in window.skip_reason()
    step = decode("plain_perf_test", 256, device="cpu", dtype=torch.float32)
    assert "does not declare the capability 'kv_cache'" in step.skip_reason()
    assert (
        "does not declare dtype torch.bfloat16"
        in Workload("plain_perf_test", 1, 256, 4, 16, torch.bfloat16, "cpu").skip_reason()
    )
    assert Workload("plain_perf_test", 1, 256, 4, 16, torch.float32, "cpu").skip_reason() is None


@pytest.mark.parametrize("level", ["core", "module"])
def test_build_backward_clears_grads_and_uses_random_inputs(level):
    fn, setup = Workload("sdpa", 2, 32, 2, 8, torch.float32, "cpu", backward=True, level=level).build()
    leaf = fn.inputs["q"] if level == "core" else fn.inputs["module"].qkv.weight
    setup()
    fn()
    first = leaf.grad.clone()
    setup()
    fn()
    assert torch.equal(leaf.grad, first)  # cleared between calls, not accumulated
    inputs = fn.inputs["q"] if level == "core" else fn.inputs["x"]
    assert (inputs != 0).float().mean() > 0.99  # torch.randn, never zeros


@pytest.mark.parametrize("impl", ["from_scratch", "flex", "sdpa", "raw_sdpa"])
def test_every_kind_builds_and_runs_on_cpu(impl):
    for case in [
        Workload(impl, 2, 32, 2, 8, torch.float32, "cpu"),
        Workload(impl, 1, 64, 2, 8, torch.float32, "cpu", mask="document:3"),
        DecodeWorkload(impl, 48, batch=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu"),
    ]:
        if case.skip_reason():
            continue
        fn, setup = case.build()
        setup()
        out = fn()
        assert all(torch.isfinite(o).all() for o in (out if isinstance(out, list) else [out]))


def test_flex_kernel_options_reach_prefill_modules_through_the_grid_not_the_environment():
    options = {"BLOCK_M": 64}
    cases = perf_grid.grid("tiny", "cpu", flex_kernel_options=options)
    assert all(c.kernel_options == options for c in cases if isinstance(c, Workload))
    assert not any(getattr(c, "kernel_options", None) for c in perf_grid.grid("tiny", "cpu"))
    flex_case = next(c for c in cases if isinstance(c, Workload) and c.impl == "flex" and c.level == "core")
    fn, _ = flex_case.build()
    assert fn.inputs["module"].kernel_options == options
    sdpa_case = next(c for c in cases if isinstance(c, Workload) and c.impl == "sdpa")
    assert not hasattr(sdpa_case.build()[0].inputs["module"], "kernel_options")
    with pytest.raises(TypeError, match="kernel_options must be a mapping"):
        Workload("flex", 1, 64, 2, 16, torch.float32, "cpu", kernel_options=[("BLOCK_M", 64)])


@pytest.mark.parametrize("name", perf_grid.GRIDS)
def test_grids_have_unique_ids_and_cover_every_kind(name):
    cases = perf_grid.grid(name, "cuda")
    ids = [c.case_id for c in cases]
    assert len(ids) == len(set(ids))
    assert {perf_grid.kind(c) for c in cases} == {"prefill", "decode", "mask"}
    assert set(registry.implementations()) <= {c.impl for c in cases}


def test_full_grid_holds_the_design_shapes():
    cases = perf_grid.grid("full", "cuda")
    prefill = [c for c in cases if perf_grid.kind(c) == "prefill" and c.d_in is None]
    assert {c.seq_len for c in prefill} >= {512, 1024, 4096, 16384}
    assert all(c.batch * c.seq_len == 16384 and c.num_heads * c.head_dim == 2048 for c in prefill)
    llm = [c for c in cases if isinstance(c, Workload) and c.d_in == 768]
    assert {(c.batch, c.seq_len, c.num_heads, c.dtype) for c in llm} == {
        (8, 1024, 12, torch.float32),
        (8, 1024, 12, torch.bfloat16),
    }
    contexts = {c.context for c in cases if isinstance(c, DecodeWorkload)}
    assert min(contexts) == 1024 and max(contexts) == 32768
    steps = {(c.context, c.num_kv_heads, c.layers) for c in cases if isinstance(c, DecodeWorkload) and c.layers > 1}
    assert steps == {(n, kv, 8) for n in (1024, 4096, 16384) for kv in (4, 16)}  # a model's step, GQA-4 and MHA
    assert any(
        issubclass(registry.get(c.impl), MHAPyTorchScaledDotProduct) for c in llm if c.impl in registry._registry
    )


def test_an_ab_needs_room_for_both_builds(monkeypatch):
    case = Workload("sdpa", 1, 1024, 4, 64, torch.float32, "cpu")
    monkeypatch.setattr(workload, "free_memory_bytes", lambda device: 1.5 * case.estimated_peak_bytes())
    assert case.skip_reason() is None
    assert "2 copies at once" in case.skip_reason(copies=2)


def _short_by_one(q, k, v):  # (B, H, T, D) -> (B, H, T - 1, D): one row short
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, :-1]


@pytest.mark.parametrize("backward", [False, True])
def test_a_core_case_holds_attend_to_the_modules_contract_before_timing(backward, monkeypatch):
    """Core cases call _attend past the module's check of its result: the build checks it once."""
    monkeypatch.setitem(registry._registry, "short_by_one", from_function(_short_by_one))
    prefill = Workload("short_by_one", 1, 32, 2, 8, torch.float32, "cpu", backward=backward)
    with pytest.raises(ValueError, match=r"_short_by_one\(\) \(from_function\) returned shape \(1, 2, 31, 8\)"):
        prefill.build()
    step = DecodeWorkload(
        "short_by_one", 16, batch=1, num_heads=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, device="cpu"
    )
    with pytest.raises(ValueError, match=r"returned shape \(1, 2, 0, 8\); expected q's shape \(1, 2, 1, 8\)"):
        step.build()
