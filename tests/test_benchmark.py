"""The benchmark report on CPU: a tiny sweep end to end, its CLI errors, and rendering cells
that did not run (skipped, out of memory, failed)."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch

import attention
from attention.bench import report, sweep, timing
from attention.bench.memory import peak_memory


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """parse_args creates --out (default ./benchmark-out): keep that out of the checkout."""
    monkeypatch.chdir(tmp_path)


TINY = ["--device", "cpu", "--seq-lens", "32", "64", "--hidden", "64", "--head-dim", "32", "--cell-seconds", "0.01"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert sweep.main([*TINY, "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_tiny_sweep_reports_every_cell(tiny_report):
    _, result = tiny_report
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["dtype"] == "fp32" and meta["torch"] == torch.__version__
    assert meta["seq_lens"] == [32, 64] and meta["num_heads"] == 2
    assert meta["cpu_threads"] == 1 and meta["complete"] is True
    assert {(c["impl"], c["seq_len"]) for c in result["cells"]} == {
        (impl, t)
        for impl in ("from_scratch", "flex", "sdpa")
        for t in (32, 64)  # triton: interpreted on CPU
    }
    for cell in result["cells"]:
        for direction in ("fwd", "fwd_bwd"):
            measured = cell[direction]
            if cell["impl"] == "flex" and direction == "fwd_bwd":  # no backward on CPU: said, not crashed
                assert measured["status"] == "skipped" and "backward" in measured["reason"]
                continue
            assert measured["status"] == "ok", measured
            figures = measured["figures"]
            assert 0 < figures["min_s"] <= figures["time_s"] <= figures["max_s"] < 10
            assert figures["tflops"] > 0 and figures["flops"] > 0 and figures["peak_bytes"] > 0
            assert figures["rounds"] >= 3
        accuracy = cell["accuracy"]
        assert accuracy["status"] == "ok", accuracy
        errors = accuracy["figures"]["fp32"]
        assert math.isfinite(errors["max_error"]) and 0 <= errors["mean_error"] <= errors["max_error"] < 1e-4
        assert errors["passes"]


def test_tiny_sweep_writes_plots_and_table(tiny_report):
    out, _ = tiny_report
    for name in ("time.png", "throughput.png", "memory.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = (out / "table.txt").read_text()
    assert "from_scratch" in table and "flex has no backward on cpu" in table
    assert table.splitlines()[0].startswith("attention benchmark: CPU: ")
    assert ", 1 thread, torch " in table.splitlines()[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.png",
        "memory.png",
        "report.json",
        "table.txt",
        "throughput.png",
        "time.png",
    ]  # no write probe or half-written report.json left behind
    assert sorted(report.OUTPUTS) == sorted(p.name for p in out.iterdir())  # what the next run clears first


def test_from_scratch_memory_grows_faster_than_sdpa(tiny_report):
    _, result = tiny_report
    peak = {(c["impl"], c["seq_len"]): c["fwd"]["figures"]["peak_bytes"] for c in result["cells"]}
    assert peak["from_scratch", 64] / peak["from_scratch", 32] > peak["sdpa", 64] / peak["sdpa", 32]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seq-lens", "0"], "positive integer"),
        (["--seq-lens", "abc"], "positive integer"),
        (["--seq-lens"], "expected at least one"),
        (["--impl", "nope"], "registered: from_scratch, flex, sdpa"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--device", "tpu"], "not a torch device"),
        (["--head-dim", "48"], "must divide --hidden"),
        (["--cell-seconds", "-1"], "positive number"),
        (["--threads", "0"], "argument --threads: expected a positive integer, got 0"),
        (["--threads", "two"], "argument --threads: expected a positive integer, got 'two'"),
        (["--threads", "1.5"], "argument --threads: expected a positive integer, got '1.5'"),
    ],
)
def test_bad_flags_give_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--device", "cpu", *args] if "--device" not in args else args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        sweep.parse_args(["--device", "cpu", "--out", str(tmp_path / "file")])
    assert "is not a folder" in capsys.readouterr().err


def test_out_that_cannot_be_created_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "report"
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--device", "cpu", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m attention.bench" in err
    assert f"error: --out {out}: cannot create the folder: Not a directory" in err


def test_out_that_cannot_be_written_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """A folder that exists but refuses files (read-only mount, no permission): probed up front.
    (Simulated: this suite may run as root, for whom permission bits do not stop a write.)"""

    def refuse(self, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"error: --out {tmp_path}: cannot write files in it: Permission denied" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_out_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(SystemExit):
            sweep.parse_args(["--device", "cpu", "--out", str(out)])
    finally:
        out.chmod(0o700)
    assert f"--out {out}: cannot write files in it: Permission denied" in capsys.readouterr().err


def test_bad_out_stops_main_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the sweep started despite an unusable --out")

    monkeypatch.setattr(sweep, "run_sweep", no_work)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--device", "cpu", "--out", str(tmp_path / "file" / "x")])
    assert exit_info.value.code == 2 and "cannot create the folder" in capsys.readouterr().err


def test_out_is_created_and_left_clean(tmp_path):
    out = tmp_path / "new" / "report"
    assert sweep.parse_args(["--device", "cpu", "--out", str(out)]).out == out
    assert out.is_dir() and list(out.iterdir()) == []


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in [
        "--device",
        "--dtype",
        "--seq-lens",
        "--head-dim",
        "--impl",
        "--out",
        "--batch",
        "--hidden",
        "--threads",
    ]:
        assert flag in text


def test_cpu_defaults_fit_the_machine():
    config = sweep.parse_args(["--device", "cpu"])
    assert config.dtype == torch.float32 and config.impls == ("from_scratch", "flex", "sdpa")  # not triton:
    assert attention.get("triton").runs_interpreted("cpu")  # interpreted on CPU, its times would be the interpreter's
    assert max(config.seq_lens) <= 2048
    assert config.threads == 1  # thread-pool wake-ups would swamp small cases (timing.cpu_threads)


def test_threads_flag_sets_the_cpu_thread_count(monkeypatch):
    monkeypatch.setattr(timing, "usable_cpus", lambda: 4)  # --threads is capped at the CPUs the process may use
    assert sweep.parse_args(["--device", "cpu", "--threads", "3"]).threads == 3


@pytest.mark.parametrize(
    ("per_call", "rounds"),
    [(0.01, 20), (0.0105, 20), (0.05, 4), (1.0, 3), (1e-6, 50), (0.0, 50)],
)
def test_rounds_fill_the_budget_within_their_bounds(per_call, rounds):
    # 0.2 s a case, 3 to 50 rounds: a round more rather than a budget short; a call too short to
    # time gets the most.
    assert timing.rounds_for(per_call, 0.2, 3, 50) == rounds
    assert timing.rounds_for(per_call, 0.2, 60, 50) == 60  # a floor above the cap (--benchmark-min-rounds=60)


class _Exploding:
    """A workload whose build runs out of memory, as a too-large CUDA case would."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def skip_reason(self):
        return None

    def build(self):
        raise self.error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "oom"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory"), "oom"),
        (ValueError("bad shape"), "error"),
    ],
)
def test_a_failing_case_is_recorded_not_raised(error, status):
    config = sweep.parse_args(TINY)
    cell = sweep.time_cell(config, _Exploding(error))
    assert cell.status == status and type(error).__name__ in cell.reason


def test_report_renders_cells_that_did_not_run(tiny_report, tmp_path):
    from rich.console import Console

    _, result = tiny_report
    result = copy.deepcopy(result)
    result["cells"][0]["fwd_bwd"] = {"status": "oom", "reason": "OutOfMemoryError: CUDA out of memory", "figures": {}}
    result["cells"][1]["fwd"] = {"status": "skipped", "reason": "needs ~90.0 GiB; 79.0 GiB free", "figures": {}}
    result["cells"][2]["accuracy"] = {"status": "error", "reason": "RuntimeError: boom", "figures": {}}
    console = Console(record=True, width=250)
    report.print_table(result, console)
    text = console.export_text()
    assert "OOM [" in text and "ERROR [" in text and "needs ~90.0 GiB" in text
    paths = report.write(result, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths)


def test_peak_memory_on_cpu_sees_a_temporary():
    def allocate_and_free():
        torch.empty(8 * 1024**2, dtype=torch.uint8).fill_(1)  # 8 MiB, freed before returning

    peak = peak_memory(allocate_and_free, device="cpu")
    assert 8 * 1024**2 <= peak.bytes < 9 * 1024**2
    assert peak.total_bytes is None and "profiler" in peak.method


def test_an_accuracy_cell_skipped_for_the_implementation_gives_its_reason_once():
    """The report's note reads "<impl> accuracy: <reason>"; the reason itself already names the
    implementation, so the cell's must not name it again (only the oracle's skips are labelled)."""
    if (missing := attention.get("triton").unavailable("cpu")) is not None:
        pytest.skip(missing)
    config = sweep.parse_args(["--device", "cpu", "--impl", "triton", "--seq-lens", "64"])
    cell = sweep.accuracy_cell(config, "triton", 64)
    assert cell.status == "skipped"
    assert cell.reason == "triton runs interpreted on cpu: its timings would measure the interpreter"
