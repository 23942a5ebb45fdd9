"""The context parallel benchmark's logic on CPU: scaling math, crossover, the plan's skip
decisions, and the tables, JSON and plot built from synthetic results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from attention.bench import context_parallel as bench
from attention.bench import context_parallel_report as report


def _cell(gpus: int, seq_len: int, time_s: float | None, *, level="core", direction="fwd", load_balance=True) -> dict:
    if time_s is None:
        return {
            "gpus": gpus, "seq_len": seq_len, "level": level, "direction": direction, "load_balance": load_balance,
            "status": "skipped", "reason": "needs ~200.0 GiB per GPU; 130.0 GiB free", "figures": {},
        }  # fmt: skip
    # Inputs of 4 KiB a token, split over the GPUs; each GPU also holds 2 KiB a token of keys and values.
    peak_total = seq_len * 4096 // gpus + (seq_len * 2048 if gpus > 1 else 0)
    figures = {
        "time_s": time_s, "tflops_per_gpu": 1e-12 / time_s / gpus,
        "peak_bytes": seq_len * 1024 // gpus, "peak_total_bytes": peak_total,
    }  # fmt: skip
    return {
        "gpus": gpus, "seq_len": seq_len, "level": level, "direction": direction, "load_balance": load_balance,
        "status": "ok", "reason": None, "figures": figures,
    }  # fmt: skip


def _result() -> dict:
    """One GPU: 1, 2, 4, 8 ms; two GPUs: slower at 4k and 8k, faster from 16k; 512k too big for one."""
    one = {4096: 1.0, 8192: 2.0, 16384: 4.0, 32768: 8.0, 524288: None}
    two = {4096: 2.4, 8192: 2.5, 16384: 3.0, 32768: 4.5, 524288: 700.0}
    cells = [_cell(1, t, None if v is None else v / 1e3) for t, v in one.items()]
    cells += [_cell(2, t, v / 1e3) for t, v in two.items()]
    cells.append(_cell(2, 32768, 5.4e-3, load_balance=False))
    cells.append(_cell(2, 8192, 2.0e-3, level="module", direction="fwd_bwd"))
    cells.append(_cell(1, 8192, 3.0e-3, level="module", direction="fwd_bwd"))
    meta = {
        "device_name": "NVIDIA H200", "torch": "2.11.0", "dtype": "bf16", "batch": 1, "num_heads": 16,
        "head_dim": 128, "rotate_method": "allgather", "timer": "CUDA events", "flops": "4*B*H*T^2*D/2",
    }  # fmt: skip
    return {"schema": 1, "meta": meta, "cells": cells, "errors": []}


def test_scaling_is_speed_up_and_efficiency() -> None:
    assert report.scaling(10.0, 6.0, 2) == pytest.approx((10 / 6, 10 / 12))
    assert report.scaling(8.0, 2.0, 4) == pytest.approx((4.0, 1.0))  # perfect scaling
    with pytest.raises(ValueError, match="positive"):
        report.scaling(0.0, 1.0, 2)


@pytest.mark.parametrize(
    ("many", "expected"),
    [
        ({1: 2.0, 2: 2.5, 4: 3.0, 8: 4.5}, (2, 4)),  # one GPU faster up to 2, two from 4
        ({1: 0.5, 2: 1.0, 4: 2.0, 8: 4.0}, (None, 1)),  # faster everywhere
        ({1: 2.0, 2: 3.0, 4: 5.0, 8: 9.0}, (8, None)),  # never faster
        ({1: 2.0, 2: 1.5, 4: 4.5, 8: 4.0}, (4, 8)),  # a lucky 2 does not count: slower again at 4
        ({1: 2.0, 2: 2.0, 4: 3.0, 8: 4.0}, (2, 4)),  # a tie counts for one GPU
    ],
)
def test_crossover(many: dict[int, float], expected: tuple) -> None:
    one = {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0}
    cross = report.crossover(one, many)
    assert (cross["one_gpu_faster_up_to"], cross["n_gpus_faster_from"]) == expected


def test_crossover_uses_lengths_both_measured() -> None:
    assert report.crossover({1: 1.0, 2: 2.0}, {2: 1.0, 4: 1.0}) == {
        "one_gpu_faster_up_to": None,
        "n_gpus_faster_from": 2,
    }
    assert report.crossover({}, {2: 1.0}) == {"one_gpu_faster_up_to": None, "n_gpus_faster_from": None}


def test_summary_rows() -> None:
    rows = report.summary(_result())
    core = next(r for r in rows if (r["level"], r["direction"]) == ("core", "fwd"))
    assert (core["gpus"], core["one_gpu_faster_up_to"], core["n_gpus_faster_from"]) == (2, 8192, 16384)
    assert [f["seq_len"] for f in core["by_length"]] == [4096, 8192, 16384, 32768]  # 512k: one GPU skipped
    assert core["by_length"][-1]["speed_up"] == pytest.approx(8 / 4.5)
    assert core["by_length"][-1]["efficiency"] == pytest.approx(8 / 9)
    assert core["by_length"][-1]["memory_ratio"] == pytest.approx((2048 + 2048) / 4096)
    module = next(r for r in rows if r["level"] == "module")
    assert module["n_gpus_faster_from"] == 8192


def test_load_balance_effect() -> None:
    (row,) = report.load_balance_effect(_result())
    assert (row["gpus"], row["seq_len"]) == (2, 32768)
    assert row["off_over_on"] == pytest.approx(5.4 / 4.5)


def test_table_json_and_plot(tmp_path: Path) -> None:
    result = _result()
    paths = report.write(result, tmp_path)
    assert [p.name for p in paths] == ["context_parallel.json", "context_parallel.png"]
    written = json.loads(paths[0].read_text())
    assert written["cells"] == result["cells"]
    assert written["summary"] == report.summary(result) and len(written["load_balance"]) == 1
    assert paths[1].stat().st_size > 10_000
    console = Console(record=True, width=200)
    report.print_table(result, console)
    text = console.export_text()
    assert "0.89" in text and "1.78x" in text  # 32k, two GPUs: efficiency and speed-up
    assert "memory vs 1 GPU" in text and "1.00" in text and "128.0 MiB" in text  # 32k, two GPUs: no less memory
    assert "skipped [1]" in text and "[1] needs ~200.0 GiB per GPU" in text
    assert "16k" in text and "off / on" in text


def test_no_plot_without_a_measurement(tmp_path: Path) -> None:
    result = {**_result(), "cells": [_cell(1, 4096, None)]}
    assert [p.name for p in report.write(result, tmp_path)] == ["context_parallel.json"]


@pytest.mark.parametrize(
    ("gpus", "counts"), [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8))]
)
def test_default_gpu_counts(gpus: int, counts: tuple[int, ...]) -> None:
    assert bench.default_gpu_counts(gpus) == counts


def test_lengths_that_do_not_shard_are_skipped_with_the_rule() -> None:
    config = bench.BenchConfig(seq_lens=(4098,), gpu_counts=(1, 2))
    workload = bench.Workload("sdpa", 1, 4098, 16, 128, torch.bfloat16, "cuda")
    assert "not a multiple of 2 x world_size = 4" in bench._skip_reason(config, workload, 2, load_balance=True)
    assert bench._skip_reason(config, workload, 2, load_balance=False) is None  # no free-memory figure on CPU


def test_fp32_lengths_the_efficient_kernel_would_pad_are_skipped() -> None:
    config = bench.BenchConfig(seq_lens=(4160,), gpu_counts=(1, 2), dtype_name="fp32")
    workload = bench.Workload("sdpa", 1, 4160, 16, 128, torch.float32, "cuda")
    # 4160 / 4 = 1040 = 32 x 32.5 with the load balancer; 4160 / 2 = 2080 = 32 x 65 without
    assert "calls of 1040 query rows" in bench._skip_reason(config, workload, 2, load_balance=True)
    assert bench._skip_reason(config, workload, 2, load_balance=False) is None


def test_run_keeps_what_a_failed_gpu_count_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_launch(worker, config, out, *, world_size):
        Path(out).write_text(json.dumps([_cell(world_size, 4096, 1e-3)]))
        if world_size == 2:
            raise RuntimeError("process 1 terminated\nCUDA out of memory")

    monkeypatch.setattr(bench.cp, "launch", fake_launch)
    config = bench.BenchConfig(seq_lens=(4096,), gpu_counts=(1, 2))
    monkeypatch.setattr(bench, "metadata", lambda config: {})
    result = bench.run(config, progress=lambda text: None)
    assert [c["gpus"] for c in result["cells"]] == [1, 2]
    assert result["errors"] == ["2 GPUs: RuntimeError: CUDA out of memory"]


def test_on_cpu_it_says_it_needs_cuda(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "needs CUDA GPUs" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_without_cuda(capsys: pytest.CaptureFixture, monkeypatch, flag: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("usage: python -m attention.bench.context_parallel") and "--seq-lens" in captured.out
    assert "needs CUDA" not in captured.err


def test_a_usage_error_is_named_before_the_missing_gpus(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rotate", "sideways"])
    assert exit_info.value.code == 2
    assert "argument --rotate: invalid choice: 'sideways'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "3"], "--gpus 3: only 2 GPU(s) present"),
        (["--seq-lens", "4096", "8192", "--lb-length", "2048"], "--lb-length 2048 must be one of --seq-lens"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--out", str(tmp_path)], gpus=2)
    assert message in capsys.readouterr().err


def test_load_balancer_length_defaults(tmp_path: Path) -> None:
    config, _, _ = bench.parse_args(["--seq-lens", "4096", "131072", "524288", "--out", str(tmp_path)], gpus=2)
    assert (config.lb_length, config.gpu_counts) == (131072, (1, 2))
    config, _, _ = bench.parse_args(["--seq-lens", "4096", "8192", "--out", str(tmp_path)], gpus=2)
    assert config.lb_length == 8192
    config, _, _ = bench.parse_args(["--out", str(tmp_path)], gpus=1)
    assert (config.lb_length, config.gpu_counts) == (None, (1,))


# Per-rank peaks (GiB) measured on an H200 at 128k tokens, B=1, 16 heads, D=128, bf16, load
# balancer on (docs/design.md#context-parallel): (ranks, rotation, level, direction) -> GiB.
MEASURED_PEAKS = {
    (2, "allgather", "core", "fwd"): 4.29,
    (2, "alltoall", "core", "fwd"): 3.83, (2, "alltoall", "core", "fwd_bwd"): 7.57,
    (2, "alltoall", "module", "fwd"): 4.11, (2, "alltoall", "module", "fwd_bwd"): 8.36,
    (4, "alltoall", "core", "fwd"): 2.44, (4, "alltoall", "core", "fwd_bwd"): 4.07,
    (4, "alltoall", "module", "fwd"): 2.60, (4, "alltoall", "module", "fwd_bwd"): 4.48,
    (8, "alltoall", "core", "fwd"): 1.25, (8, "alltoall", "core", "fwd_bwd"): 2.07,
    (8, "alltoall", "module", "fwd"): 1.35, (8, "alltoall", "module", "fwd_bwd"): 2.29,
}  # fmt: skip


@pytest.mark.parametrize(("ranks", "rotate", "level", "direction"), sorted(MEASURED_PEAKS))
def test_memory_guard_stays_above_measured_ring_peaks(ranks: int, rotate: str, level: str, direction: str) -> None:
    whole = bench.Workload(
        "sdpa", 1, 131072, 16, 128, torch.bfloat16, "cuda", backward=direction == "fwd_bwd", level=level
    )
    estimate = bench.rank_peak_bytes(whole, ranks, rotate) / 2**30
    measured = MEASURED_PEAKS[ranks, rotate, level, direction]
    # Never below what ran (the guard would let an out-of-memory through); above it by no more
    # than the one-GPU estimate's own margin and slack put it above one GPU's peaks (1.3-1.9x).
    assert measured <= estimate <= 1.5 * measured


def test_ring_memory_falls_with_ranks_only_under_alltoall() -> None:
    whole = bench.Workload("sdpa", 1, 131072, 16, 128, torch.bfloat16, "cuda")
    kv = 2 * 16 * 131072 * 128 * 2  # the whole sequence's K and V, bf16
    assert bench.ring_bytes(whole, 1, "allgather") == bench.ring_bytes(whole, 1, "alltoall") == 0
    alltoall = [bench.ring_bytes(whole, n, "alltoall") for n in (2, 4, 8)]
    assert alltoall[0] > alltoall[1] > alltoall[2]
    assert all(bench.ring_bytes(whole, n, "allgather") > kv for n in (2, 4, 8))  # all of K and V, at any count
