"""The benchmark CLI as a user meets it: Ctrl-C, the thread count it times with, and a clean
screen (no profiler logging). Measurements are stood in for where only the control flow matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention.bench import report, sweep, timing

REPO_ROOT = Path(__file__).resolve().parents[1]
#: 2 lengths x 3 implementations = 6 rows ("cells" of report.json).
TINY = ["--device", "cpu", "--seq-lens", "32", "64", "--hidden", "64", "--head-dim", "32", "--cell-seconds", "0.01"]


def _stand_in_cells(monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None = None) -> list[tuple]:
    """Replace the measurements with instant ones; Ctrl-C arrives at measurement ``interrupt_at``."""
    calls: list[tuple] = []

    def step(what: tuple) -> sweep.Cell:
        calls.append(what)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return sweep.Cell("skipped", "stand-in")

    monkeypatch.setattr(sweep, "time_cell", lambda config, w: step((w.impl, w.seq_len, w.backward)))
    monkeypatch.setattr(sweep, "accuracy_cell", lambda config, impl, seq_len: step((impl, seq_len, "accuracy")))
    return calls


def _nothing_slow_after_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*args, **kwargs):
        raise AssertionError("plots or table rendered after Ctrl-C")

    for name in ("plot_time", "plot_throughput", "plot_memory", "plot_accuracy", "print_table"):
        monkeypatch.setattr(report, name, slow)


def _main(argv: list[str]) -> int:
    """``sweep.main(argv)``; Ctrl-C escaping it (a traceback for the user) fails the test, not the session."""
    try:
        return sweep.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped sweep.main: the user gets a traceback")


def _interrupted_line(out: Path, done: int) -> str:
    path = out / "report.json"
    return (
        f"interrupted: partial report ({done} of 6 cells) in {path}; "
        f"render it with: python -m attention.bench.report {path}"
    )


def test_ctrl_c_stops_with_one_line_and_keeps_the_finished_rows(tmp_path, monkeypatch, capsys):
    calls = _stand_in_cells(monkeypatch, interrupt_at=4)  # row 1: fwd, fwd+bwd, accuracy; then Ctrl-C
    _nothing_slow_after_ctrl_c(monkeypatch)

    assert _main([*TINY, "--out", str(tmp_path)]) == 130

    assert len(calls) == 4  # stopped at once: no further case was started
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if "interrupted:" in line] == [_interrupted_line(tmp_path, 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["meta"]["complete"] is False
    assert [(c["impl"], c["seq_len"]) for c in result["cells"]] == [("from_scratch", 32)]
    assert result["cells"][0]["fwd"]["reason"] == "stand-in"


def test_ctrl_c_before_the_first_row_replaces_an_old_report(tmp_path, monkeypatch, capsys):
    (tmp_path / "report.json").write_text('{"cells": ["from an earlier run"]}')
    _stand_in_cells(monkeypatch, interrupt_at=1)
    _nothing_slow_after_ctrl_c(monkeypatch)

    assert _main([*TINY, "--out", str(tmp_path)]) == 130

    assert _interrupted_line(tmp_path, 0) in capsys.readouterr().err.splitlines()
    result = json.loads((tmp_path / "report.json").read_text())
    assert result["cells"] == [] and result["meta"]["complete"] is False


def test_a_run_without_plots_leaves_no_plot_of_an_earlier_run_beside_its_report(tmp_path, monkeypatch, capsys):
    for name in report.OUTPUTS:
        (tmp_path / name).write_text("from an earlier run")
    (tmp_path / "notes.txt").write_text("the user's own")
    _stand_in_cells(monkeypatch)

    assert _main([*TINY, "--no-plots", "--no-accuracy", "--out", str(tmp_path)]) == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.json", "table.txt"]
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["complete"] is True


@pytest.mark.parametrize(
    ("flag", "value", "told"),
    [
        ("--cell-seconds", "inf", "expected a finite positive number, got inf"),
        ("--cell-seconds", "nan", "expected a finite positive number, got nan"),
        ("--seq-lens", "\u0663", "expected a positive integer, got '\u0663'"),  # an Arabic-Indic 3, which int() reads
        ("--cell-seconds", "\u0663.5", "expected a positive number, got '\u0663.5'"),  # which float() reads as 3.5
    ],
)
def test_numbers_nobody_meant_are_usage_errors(capsys, flag, value, told):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args([*TINY, flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {told}" in capsys.readouterr().err


def test_an_empty_out_is_a_usage_error_not_the_current_folder(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args([*TINY, "--out", ""])
    assert exit_info.value.code == 2
    assert "argument --out: needs a folder name, got an empty string" in capsys.readouterr().err


def test_ctrl_c_while_drawing_plots_stops_at_once(tmp_path, monkeypatch, capsys):
    _stand_in_cells(monkeypatch)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_time", interrupted)
    monkeypatch.setattr(report, "print_table", lambda *a, **k: pytest.fail("table printed after Ctrl-C"))

    assert _main([*TINY, "--no-accuracy", "--out", str(tmp_path)]) == 130

    assert _interrupted_line(tmp_path, 6) in capsys.readouterr().err.splitlines()
    assert len(json.loads((tmp_path / "report.json").read_text())["cells"]) == 6


@pytest.mark.parametrize(("flag", "expected"), [([], 1), (["--threads", "3"], 3)])
def test_cpu_cases_run_with_the_configured_threads_which_are_restored(tmp_path, monkeypatch, flag, expected):
    seen: list[int] = []

    def time_cell(config, workload):
        seen.append(torch.get_num_threads())
        return sweep.Cell("skipped", "stand-in")

    monkeypatch.setattr(sweep, "time_cell", time_cell)
    monkeypatch.setattr(timing, "usable_cpus", lambda: 4)  # 3 threads: neither the default nor the caller's 2
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        config = sweep.parse_args([*TINY, "--no-accuracy", "--impl", "sdpa", *flag, "--out", str(tmp_path)])
        result = sweep.run_sweep(config)
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(before)
    assert config.threads == expected
    assert seen == [expected] * 4  # 2 lengths x (fwd, fwd+bwd)
    assert result["meta"]["cpu_threads"] == expected


@pytest.mark.parametrize(
    "impl_args",
    [["--impl", "sdpa", "from_scratch"], ["--impl", "sdpa", "--impl", "from_scratch"]],
    ids=["several after one flag", "flag repeated"],
)
def test_both_ways_of_naming_several_implementations_keep_every_one(tmp_path, impl_args):
    """A repeated --impl used to keep only the last one, so two versions put side by side timed one."""
    config = sweep.parse_args([*TINY, *impl_args, "--out", str(tmp_path)])
    assert config.impls == ("sdpa", "from_scratch")


@pytest.mark.parametrize("threads", ["100000", "3"])
def test_more_threads_than_the_process_may_run_on_is_a_usage_error(tmp_path, monkeypatch, capsys, threads):
    """--threads 100000 used to reach torch.set_num_threads and kill the process (OpenMP cannot start them)."""
    monkeypatch.setattr(timing, "usable_cpus", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail(f"set_num_threads({n}) reached"))
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*TINY, "--threads", threads, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--threads: {threads} threads: this process may run on 2 CPUs; give 1 to 2" in err
    assert not (tmp_path / "out").exists()  # refused before the output folder is made
    with pytest.raises(ValueError, match="give 1 to 2"), timing.cpu_threads(int(threads)):
        pytest.fail("the body ran")


def test_cli_screen_has_no_profiler_logging(tmp_path):
    """The CPU peak-memory profiler's kineto logs (USDT profiler_start/stop per call, and on some
    builds ERROR ... gpuGetDeviceCount failed) must not reach the user's terminal."""
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    command = [sys.executable, "-m", "attention.bench", *TINY, "--impl", "sdpa", "from_scratch"]
    command += ["--no-accuracy", "--no-plots", "--out", str(tmp_path)]

    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)

    screen = done.stdout + done.stderr
    assert done.returncode == 0, screen
    for noise in ("USDT", "profiler_start", "gpuGetDeviceCount", "Traceback", "Warning"):
        assert noise not in screen, screen
    result = json.loads((tmp_path / "report.json").read_text())
    peaks = [c[d]["figures"]["peak_bytes"] for c in result["cells"] for d in ("fwd", "fwd_bwd")]
    assert len(peaks) == 8 and all(p > 0 for p in peaks)  # the profiler still measured, quietly
    assert result["meta"]["cpu_threads"] == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"\xff\xfe", "not UTF-8 text"),
        (b"{", "invalid JSON"),
        (b"[]", "not a benchmark report"),
    ],
)
def test_rendering_a_bad_report_file_is_one_line_not_a_traceback(tmp_path, capsys, content, expected):
    path = tmp_path / "report.json"
    if content is not None:
        path.write_bytes(content)
    assert report.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err


def test_rendering_help_prints_the_usage_and_a_missing_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        report.main(["--help"])
    assert done.value.code == 0 and "usage: python -m attention.bench.report" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        report.main([])
    assert done.value.code == 2 and "the following arguments are required: report" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_named_as_given(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--device", "cuda:1"])
    assert exit_info.value.code == 2
    assert "--device cuda:1: no CUDA GPU is available to this torch build" in capsys.readouterr().err
