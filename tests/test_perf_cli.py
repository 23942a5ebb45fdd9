"""python -m attention.bench.perf: exit codes and messages of compare/record/spread/table, and a CPU run (CPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention.bench.perf import cli, flags, launcher
from attention.bench.perf.previous_run import ASIDE, GRID_FILES, GRID_PATTERNS, PreviousRun
from attention.bench.perf.results import write_run

from .perf_support import H100, ROOT, make_run, on_gpu, samples, subprocess_env, with_machine

KEY = "core-sdpa-bf16-fwd-B4-T4096-H32-D64"


def write(tmp_path: Path, name: str, median: float = 1e-3, machine: dict | None = None, **info) -> str:
    run = make_run({KEY: {"median": median, "data": samples(median), **info}}, machine, path=name)
    return str(write_run(run, tmp_path / name))


def test_compare_exit_codes(tmp_path, capsys):
    base = write(tmp_path, "base.json")
    assert cli.main(["compare", write(tmp_path, "same.json"), "--baseline", base]) == 0
    assert "PASS" in capsys.readouterr().out
    assert cli.main(["compare", write(tmp_path, "slow.json", 1.2e-3), "--baseline", base]) == 1
    out = capsys.readouterr().out
    assert "REGRESSIONS: 1" in out and KEY in out and "FAIL" in out
    a100 = with_machine(gpu_name="NVIDIA A100-SXM4-80GB", slug="nvidia-a100-sxm4-80gb")
    assert cli.main(["compare", write(tmp_path, "a100.json", machine=a100), "--baseline", base]) == 2
    out = capsys.readouterr().out
    assert "refusing to compare" in out and "REGRESSION" not in out


def test_an_implementation_asked_for_but_never_timed_fails_the_run_with_why(tmp_path):
    run = make_run({KEY: {"median": 1e-3, "impl": "sdpa"}})
    log = tmp_path / "cases.jsonl"
    skipped = {
        "case": "core-flex-bf16-fwd-B1-T1024-H16-D128",
        "impl": "flex",
        "status": "skipped",
        "reason": "flex: no GPU",
    }
    log.write_text(json.dumps({"run": "run-1"}) + "\n" + json.dumps(skipped) + "\n")
    assert cli._untimed(["sdpa"], run, log) == []
    with log.open("a") as cut:  # a run stopped mid-write leaves half a line
        cut.write('{"case": "core-flex-bf16-fwd-B1-T4096')
    assert cli._untimed(["flex", "sdpa", "flex"], run, log) == ["flex: no case timed (skipped: flex: no GPU)"]
    assert cli._untimed(["triton"], run, tmp_path / "absent.jsonl") == [
        "triton: no case timed (none ran: -k selected none, or the run stopped first)"
    ]


def test_cpu_runs_are_not_compared_even_against_a_named_baseline(tmp_path, capsys):
    cpu = with_machine(device="cpu")
    base, slow = write(tmp_path, "base.json", machine=cpu), write(tmp_path, "slow.json", 1.5e-3, machine=cpu)
    assert cli.main(["compare", slow, "--baseline", base]) == 2
    out = capsys.readouterr().out
    assert "not a CUDA GPU: CPU numbers are never baselined or compared" in out and "REGRESSION" not in out


def test_compare_finds_the_baseline_by_gpu_and_explains_a_missing_one(tmp_path, capsys):
    run = write(tmp_path, "run.json")
    assert cli.main(["compare", run, "--baselines", str(tmp_path / "baselines")]) == 2
    assert "no baseline for NVIDIA H100" in capsys.readouterr().out
    write_run(make_run({KEY: {"median": 1e-3}}), tmp_path / "baselines" / H100["slug"] / "baseline.json")
    assert cli.main(["compare", run, "--baselines", str(tmp_path / "baselines")]) == 0


def test_baseline_without_a_gpu_says_so_and_lists_the_committed_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    write_run(make_run({KEY: {"median": 1e-3}}), tmp_path / "b" / H100["slug"] / "baseline.json")
    assert cli.main(["baseline", "--baselines", str(tmp_path / "b")]) == 2
    out = capsys.readouterr().out
    assert "no CUDA GPU here, and baselines are per GPU model" in out
    assert f"Committed in {tmp_path / 'b'}: {H100['slug']}" in out and "--benchmark-compare" not in out


def test_corrupt_baseline_is_exit_2_with_the_file_named(tmp_path, capsys):
    bad = tmp_path / "baseline.json"
    bad.write_text('{"machine_info": {"attention_perf": {"torch"')
    assert cli.main(["compare", write(tmp_path, "run.json"), "--baseline", str(bad)]) == 2
    out = capsys.readouterr().out
    assert str(bad) in out and "truncated" in out


def test_record_merges_runs_and_writes_thresholds(tmp_path, capsys):
    runs = [write(tmp_path, f"run-{i}.json", m) for i, m in enumerate((1.0e-3, 1.02e-3, 0.99e-3))]
    assert cli.main(["record", *runs, "--baselines", str(tmp_path / "b")]) == 0
    target = tmp_path / "b" / H100["slug"]
    assert json.loads((target / "baseline.json").read_text())["benchmarks"][0]["stats"]["median"] == 1.0e-3
    assert KEY in json.loads((target / "thresholds.json").read_text())["cases"]
    assert "Commit" in capsys.readouterr().out
    assert cli.main(["compare", runs[1], "--baselines", str(tmp_path / "b")]) == 0


def test_record_and_spread_refuse_runs_timed_under_different_graph_policies(tmp_path, capsys):
    """A case's middle run, or its spread, must not mix eager and graph-replayed timings."""
    runs = [write(tmp_path, f"{p}.json", 1e-3, machine=with_machine(graphs=p)) for p in ("fwd", "all")]
    assert cli.main(["record", *runs, "--baselines", str(tmp_path / "b")]) == 2
    assert "different --perf-graphs policies" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()
    assert cli.main(["spread", *runs]) == 2


def test_record_refuses_cpu_runs_and_guard_failures(tmp_path, capsys):
    cpu = with_machine(device="cpu", gpu_name=None, slug="cpu")
    assert cli.main(["record", write(tmp_path, "cpu.json", machine=cpu), "--baselines", str(tmp_path)]) == 2
    broken = write(tmp_path, "broken.json", sdpa_backend="math")
    assert cli.main(["record", broken, "--baselines", str(tmp_path)]) == 2
    assert "guard failures" in capsys.readouterr().out


def test_spread_and_table(tmp_path, capsys):
    runs = [write(tmp_path, f"run-{i}.json", m) for i, m in enumerate((1.0e-3, 1.1e-3))]
    assert cli.main(["spread", *runs, "--write", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())["cases"][KEY]["time"] > 0.1
    assert cli.main(["table", runs[0]]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100" in out and "Targets" in out


def test_run_arguments_pass_through_to_pytest():
    args, extra = cli.run_parser().parse_known_args(["--benchmark-compare", "-k", "flex", "--perf-graphs=all"])
    assert args.benchmark_compare is True and extra == ["-k", "flex", "--perf-graphs=all"]
    args, _ = cli.run_parser().parse_known_args(["--benchmark-compare=perf/x.json", "--repeat", "3"])
    assert args.benchmark_compare == "perf/x.json" and args.repeat == 3
    args, _ = cli.run_parser().parse_known_args(["--benchmark-compare=main", "--benchmark-compare-fail=median:3%"])
    assert args.benchmark_compare == "main" and args.benchmark_compare_fail == ["median:3%"]


def test_a_grid_named_to_pytest_is_the_launchers_grid():
    """The launcher plans, shards and sizes a run by its grid: one named to pytest alone used to
    run cases the plan never saw (on CPU, a GPU-sized grid under the "tiny grid" message)."""
    assert flags.take_grid(None, ["-k", "flex", "--perf-grid=quick"]) == ("quick", ["-k", "flex"])
    assert flags.take_grid("quick", ["--perf-grid=quick"]) == ("quick", [])
    assert flags.take_grid(None, ["-k", "flex"]) == (None, ["-k", "flex"])
    for grid, extra, told in [
        ("tiny", ["--perf-grid=quick"], "two grids named (quick, tiny)"),
        (None, ["--perf-grid", "quick"], "--perf-grid takes its value after '='"),
        (None, ["--perf-grid=huge"], "--perf-grid=huge: choose one of full, quick, tiny"),
    ]:
        with pytest.raises(flags.FlagRefused, match=re.escape(told)):
            flags.take_grid(grid, extra)


def test_a_misspelt_command_is_named_with_the_nearest_one(capsys):
    """It used to reach pytest as a test path: a run of nothing and a table of zeros."""
    assert cli.main(["calibrat"]) == 2
    assert "unknown command 'calibrat': did you mean calibrate?" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_a_node_id_given_first_goes_to_pytest_as_after_run(tmp_path, capsys):
    node = "no/such_cases.py::test_decode"
    assert cli.main([node, "--out", str(tmp_path), "--quiet-pytest"]) == 2
    out = capsys.readouterr().out
    assert "unknown command" not in out and "file or directory not found: no/such_cases.py" in out


#: An earlier run's files in --out, each with text of its own.
LAST_RUN = {name: f"the last run's {name}\n" for name in ("run-1.json", "cases.jsonl", "summary.txt", "pytest.log")}


def _write_last_run(out: Path) -> None:
    for name, text in LAST_RUN.items():
        (out / name).write_text(text)


def _last_run_kept(out: Path) -> bool:
    return {p.name: p.read_text() for p in out.iterdir()} == LAST_RUN


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_arguments_pytest_refuses_are_a_usage_error_in_its_words(tmp_path, capsys):
    """A mistyped flag costs nothing: the last run's files stay as they were."""
    _write_last_run(tmp_path)
    cmd = ["--out", str(tmp_path), "--quiet-pytest", "--perf-graphs=nosuch"]
    assert cli.main(cmd) == 2
    out = capsys.readouterr().out
    assert "pytest refused its arguments (exit 4, a usage error): " in out
    assert "argument --perf-graphs: invalid choice: 'nosuch'" in out and "no run produced results" not in out
    assert _last_run_kept(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_a_selection_that_leaves_no_case_is_a_usage_error_naming_it(tmp_path, capsys):
    """It used to exit 1 after salvaging nothing, with a table of zeros and no word of why; then
    to delete the last run's results on the way."""
    _write_last_run(tmp_path)
    assert cli.main(["--out", str(tmp_path), "--quiet-pytest", "-k", "sdpa and no_such_case"]) == 2
    out = capsys.readouterr().out
    assert "no case selected: -k 'sdpa and no_such_case' matched none of this grid's cases" in out
    assert "--collect-only" in out and "salvage" not in out and "no run produced results" not in out
    assert _last_run_kept(tmp_path)


def test_a_run_that_starts_drops_the_last_runs_files_and_a_refused_one_puts_them_back(tmp_path):
    _write_last_run(tmp_path)
    (tmp_path / "run-3.json").write_text("a third round, of a run with --repeat 3\n")
    (tmp_path / "thresholds.json").write_text("{}\n")  # not a run's result: stays where it is
    started = PreviousRun(tmp_path, [*GRID_FILES, "run-1.json", "run-2.json"], GRID_PATTERNS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ASIDE, "run-3.json", "thresholds.json"]
    (tmp_path / "pytest.log").write_text("the refused run's log\n")
    started.restore()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*LAST_RUN, "run-3.json", "thresholds.json"])
    assert (tmp_path / "pytest.log").read_text() == LAST_RUN["pytest.log"]
    with pytest.raises(RuntimeError), PreviousRun(tmp_path, [*GRID_FILES, "run-1.json"], GRID_PATTERNS) as started:
        started.drop()
        raise RuntimeError("after the run started: its files stand, nothing is put back")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-3.json", "thresholds.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_collect_only_lists_the_selected_cases_and_leaves_the_last_run_alone(tmp_path, capfd):
    """The listing the empty-selection error points to: case ids, no tables of zeros, and the
    last run's files in --out untouched."""
    (tmp_path / "summary.md").write_text("the last run's verdicts\n")
    for flag in ("--collect-only", "--collectonly"):
        argv = [flag, "-q", "-k", "raw_sdpa and fwd-", "--out", str(tmp_path)]
        assert cli.main(argv) == 0
        out = capfd.readouterr().out
        assert "test_prefill[core-raw_sdpa-fp32-fwd-B4-T64-H4-D16]" in out and "fwd_bwd" not in out
        assert "Wall time" not in out and "no such file" not in out
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]
    assert (tmp_path / "summary.md").read_text() == "the last run's verdicts\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_a_smoke_test_runs_each_case_once_and_looks_for_no_timings(tmp_path, capfd):
    argv = ["--benchmark-disable", "--quiet-pytest", "-k", "core-sdpa-fp32-fwd-B4-T64", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capfd.readouterr().out
    assert "every case ran once as a smoke test; nothing was timed. pytest exit 0" in out
    assert "no such file" not in out and "rebuilding" not in out  # no JSON is expected: none is missed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_an_empty_listing_names_the_selection_as_the_user_gave_it(tmp_path, capsys):
    assert cli.main(["--co", "-q", "--impl", "sdpa", "-k", "no_such_case", "--out", str(tmp_path)]) == 2
    assert "no case selected: -k no_such_case --impl sdpa matched none" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "told"),
    [
        (["--impl", "pkg.mod:attn", "sdpa"], "sdpa: an implementation, not a test path: name each with its own --impl"),
        (["--quiet-pytest", "-x", "--impl", "sdpa", "flex"], "flex: an implementation, not a test path"),
        (["--impl", "sdpa", "run"], "'run' is a command: it comes first (python -m attention.bench.perf run ...)"),
    ],
)
def test_words_in_the_wrong_place_are_a_usage_error_before_anything_runs(tmp_path, capsys, argv, told):
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert told in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget", ["-5", "0", "nan", "inf"])
def test_a_time_budget_that_is_no_positive_number_is_a_usage_error(tmp_path, capsys, budget):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--time-budget", budget, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"argument --time-budget: expected a finite positive number, got {budget}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("grid", [["--grid", "quick"], ["--perf-grid=full"]])
def test_a_gpu_sized_grid_without_a_gpu_is_refused_before_anything_runs(tmp_path, capsys, grid):
    (tmp_path / "summary.md").write_text("the last run's verdicts\n")
    assert cli.main([*grid, "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "no CUDA GPU here, where only the tiny grid runs" in out and "sized for GPUs" in out
    assert (tmp_path / "summary.md").read_text() == "the last run's verdicts\n"  # refused before --out is touched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_a_cpu_run_shows_the_machinery_and_compares_nothing(tmp_path):
    env = subprocess_env()
    cmd = [sys.executable, "-m", "attention.bench.perf", "--out", str(tmp_path), "--quiet-pytest"]
    cmd += ["-k", "core-sdpa-fp32-fwd-B4-T64 or decode-sdpa", "--perf-budget=0.02"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No CUDA GPU here" in done.stdout
    raw = json.loads((tmp_path / "run-1.json").read_text())
    assert raw["machine_info"]["attention_perf"]["slug"] == "cpu"
    assert raw["machine_info"]["attention_perf"]["copy_gbps"] > 0
    infos = {b["extra_info"]["case"]: b for b in raw["benchmarks"]}
    assert set(infos) == {"core-sdpa-fp32-fwd-B4-T64-H4-D16", "decode-sdpa-fp32-B2-N256-H4-KV1-D16-GQA4"}
    for bench in infos.values():
        info = bench["extra_info"]
        assert info["tflops"] > 0 and info["gbps"] > 0 and info["timer"] == "perf-counter"
        assert info["sdpa_backend"] == "flash_cpu" and info["guard_failures"] == []
        assert len(bench["stats"]["data"]) == info["rounds"]
    log = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert sum(entry.get("status") == "passed" for entry in log) == 2
    assert (tmp_path / "summary.txt").exists()


def test_targets_report_the_design_ratios():
    from attention.bench.perf import report

    shape = dict(direction="fwd", head_dim=64, seq_len=4096, dtype="bf16", batch=4, num_heads=32)
    cases = {
        "core-sdpa": dict(median=1.01e-3, impl="sdpa", **shape),
        "core-raw": dict(median=1.0e-3, impl="raw_sdpa", **shape),
        "core-raw-flash": dict(median=1.5e-3, impl="raw_sdpa_flash", sdpa_backend="flash", **shape),
        "core-flex": dict(median=1.2e-3, impl="flex", family="flex", flex_path="fused", sdpa_backend=None, **shape),
        "module-sdpa": dict(median=2.5e-3, impl="sdpa", level="module", d_in=2048, **shape),
        "module-gemms": dict(median=1.4e-3, impl="gemms", level="module", d_in=2048, **dict(shape, seq_len=1024)),
        "decode-sdpa": dict(
            median=1e-4, impl="sdpa", kind="decode", context=4096, latency_us=100.0, gbps=2700.0, copy_fraction=0.9
        ),
        "decode-triton-GQA4-L8": dict(
            **dict(median=8e-4, impl="triton", kind="decode", context=4096, layers=8, num_heads=16, num_kv_heads=4),
            **dict(latency_us=800.0, gbps=1500.0, copy_fraction=0.5),
        ),
        "decode-triton-MHA-L8": dict(
            **dict(median=8e-4, impl="triton", kind="decode", context=16384, layers=8, num_heads=16, num_kv_heads=16),
            **dict(latency_us=800.0, gbps=2900.0, copy_fraction=0.97),
        ),
    }
    text = report.targets(make_run(cases))
    step = text.split("Decode, a model's step (all layers in one graph):\n")[1]
    assert "decode-triton-GQA4-L8: 800.0 us/step, 1500 GB/s = 0.50 of copy MISS (>=0.85)" in step
    assert "decode-triton-MHA-L8: 800.0 us/step, 2900 GB/s = 0.97 of copy\n" in step + "\n"  # no goal at 16k
    assert "L8" not in text.split("Decode, a model's step")[0]  # single-layer lines keep their own goals
    assert "sdpa/best raw (raw_sdpa) 1.010 ok" in text
    assert "module/(gemms+core) 1.037 ok" in text
    assert "flex/cuDNN 0.83 ok" in text
    assert "0.90 of copy ok" in text
    assert "x anchor 414" in text
    cpu_run = make_run(cases, with_machine(device="cpu", gpu_name=None, slug="cpu"))
    cpu = report.targets(cpu_run)
    assert "not judged" in cpu and "MISS" not in cpu and "ok" not in cpu
    # The compute ceiling, in the dtype it was measured in: bf16 on a GPU, fp32 on the CPU.
    assert "| bf16 matmul 790 TFLOP/s" in report.matrix(make_run(cases))
    assert "| fp32 matmul" in report.matrix(cpu_run)


def test_mask_lines_say_when_no_peak_memory_was_measured():
    from attention.bench.perf import report

    mask = dict(kind="mask", mask="sliding_window", seq_len=4096)
    cases = {
        "mask-flex": dict(median=1e-3, impl="flex", peak_mem_mib=None, **mask),
        "mask-sdpa": dict(median=2e-3, impl="sdpa", peak_mem_mib=512.4, **mask),
    }
    line = "\n".join(report._mask_lines(make_run(cases)))
    assert "None" not in line and "peak memory not measured" in line and "512 MiB" in line


def test_an_empty_json_from_a_dead_run_is_rebuilt_from_the_case_log(tmp_path, monkeypatch, capsys):
    log = tmp_path / "cases.jsonl"
    log.write_text(
        json.dumps({"run": "run-1", "machine_info": {"attention_perf": H100}})
        + "\n"
        + json.dumps({"run": "run-1", "case": KEY, "status": "passed", "extra_info": {"case": KEY}, "data": [1e-3]})
        + "\n"
    )

    def dead_pytest(cmd, stdout=None, env=None):
        (tmp_path / "run-1.json").write_text("")  # pytest-benchmark opens it at start

    monkeypatch.setattr(launcher, "start", dead_pytest)
    monkeypatch.setattr(launcher, "wait", lambda procs, limit: [2])
    args, extra = cli.run_parser().parse_known_args(["--out", str(tmp_path)])
    rc, run = launcher.pytest_run("run-1", args, extra, tmp_path, cpu=False, limit=None)
    assert rc == 2 and list(run.records) == [KEY]
    assert "rebuilding" in capsys.readouterr().out


def fake_gpu_runs(monkeypatch, tmp_path, medians):
    """cmd_run as on a GPU machine, with pytest replaced by synthetic runs of the given medians."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu(monkeypatch, dict(H100))
    queue = list(medians)

    def fake(label, args, extra, out, cpu, limit, env=None):
        assert not cpu
        path = write(tmp_path, f"{label}.json", queue.pop(0))
        return 0, cli.load_run(path)

    monkeypatch.setattr(launcher, "pytest_run", fake)
    return queue


def test_gpu_run_records_then_compares(tmp_path, monkeypatch, capsys):
    base = ["--out", str(tmp_path), "--baselines", str(tmp_path / "b")]
    fake_gpu_runs(monkeypatch, tmp_path, [1.0e-3, 1.01e-3, 0.99e-3])
    assert cli.main(["--repeat", "3", "--record", *base]) == 0
    out = capsys.readouterr().out
    assert "Recorded 1 cases from 3 run(s)" in out and (tmp_path / "thresholds.json").exists()
    fake_gpu_runs(monkeypatch, tmp_path, [1.0e-3, 1.0e-3])
    assert cli.main(["--repeat", "2", "--benchmark-compare", *base]) == 0
    assert capsys.readouterr().out.count(": PASS (0 regressions") == 2
    left = fake_gpu_runs(monkeypatch, tmp_path, [1.3e-3, 1.3e-3, 1.3e-3, 1.3e-3])
    assert cli.main(["--benchmark-compare", *base]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("FAIL") and KEY in out
    assert "CONFIRMED in fresh processes" in out and left == [1.3e-3]  # two slow re-timings decide it


def test_a_run_cut_by_the_time_budget_fails_and_says_so_though_every_comparison_passed(tmp_path, monkeypatch, capsys):
    base = ["--out", str(tmp_path), "--baselines", str(tmp_path / "b")]
    fake_gpu_runs(monkeypatch, tmp_path, [1.0e-3])
    assert cli.main(["--record", *base]) == 0
    capsys.readouterr()
    fake_gpu_runs(monkeypatch, tmp_path, [1.0e-3])
    finished = launcher.pytest_run

    def cut(*args, **kwargs):
        return launcher.INTERRUPTED, finished(*args, **kwargs)[1]  # the limit's SIGINT: exit 2, finished cases kept

    monkeypatch.setattr(launcher, "pytest_run", cut)
    assert cli.main(["--benchmark-compare", "--time-budget", "100", "--quiet-pytest", *base]) == 1
    out = capsys.readouterr().out
    *_, why, verdict = out.rstrip().splitlines()
    assert "run-1.json vs " in out and ": PASS (0 regressions" in out and verdict.startswith("FAIL: results in")
    assert why == (
        "FAIL: run-1 reached its time limit (100 s, from --time-budget) and was stopped after timing 1 case(s); "
        "the cases it had not reached were neither timed nor compared (raise --time-budget, or narrow the run with -k)"
    )


def test_each_way_a_pytest_run_fails_is_named_with_where_to_look(tmp_path):
    args, _ = cli.run_parser().parse_known_args(["--out", str(tmp_path), "--quiet-pytest"])
    log = launcher.output_of(args, tmp_path)
    assert log == f"{tmp_path}/pytest.log" and launcher.output_of(args, tmp_path, sharded=True).endswith(
        "gpuN/pytest.log"
    )
    run = make_run({KEY: {"median": 1e-3, "data": samples(1e-3)}})
    assert launcher.why_failed("run-2", 2, None, run, log) == "run-2 was interrupted after timing 1 case(s)"
    assert (
        launcher.why_failed("run-1", 1, 60.0, run, log)
        == f"run-1: a case failed (pytest exit 1); its error is in {log}"
    )
    assert (
        launcher.why_failed("run-1", -9, 60.0, None, log)
        == "run-1: pytest was killed by signal 9 after timing 0 case(s)"
    )
    assert launcher.why_failed("run-1", 3, None, run, log) == f"run-1: pytest exit 3; see {log}"


def test_bare_compare_without_a_baseline_is_refused_before_any_case_runs(tmp_path, monkeypatch, capsys):
    queue = fake_gpu_runs(monkeypatch, tmp_path, [1.0e-3])
    assert cli.main(["--benchmark-compare", "--out", str(tmp_path), "--baselines", str(tmp_path / "none")]) == 2
    out = capsys.readouterr().out
    assert "ERROR: no committed baseline for NVIDIA H100" in out
    assert "--repeat 3 --record" in out and "--benchmark-compare=main" in out  # both ways on
    assert queue == [1.0e-3]  # nothing ran


def test_bare_compare_with_another_torch_minor_is_refused_before_any_case_runs(tmp_path, monkeypatch, capsys):
    write_run(make_run({KEY: {"median": 1e-3}}), tmp_path / "b" / H100["slug"] / "baseline.json")
    queue = fake_gpu_runs(monkeypatch, tmp_path, [1.0e-3])
    on_gpu(monkeypatch, dict(H100, torch="2.15.0", torch_minor="2.15"))
    assert cli.main(["--benchmark-compare", "--out", str(tmp_path), "--baselines", str(tmp_path / "b")]) == 2
    out = capsys.readouterr().out
    assert "recorded with torch 2.11" in out and "--benchmark-compare=main" in out and queue == [1.0e-3]


def test_the_first_run_gets_twice_a_later_runs_share_of_the_budget():
    assert launcher.run_time_limit(600, 1, 1) == 600
    assert launcher.run_time_limit(600, 1, 2) == pytest.approx(400)  # it compiles; the second finds the cache
    assert launcher.run_time_limit(200, 2, 2) == pytest.approx(200)
    assert launcher.run_time_limit(600, 1, 3) == pytest.approx(300)
    assert launcher.run_time_limit(300, 2, 3) == pytest.approx(150)
    assert launcher.run_time_limit(10, 3, 3) == 30.0  # never less than 30 s


def test_a_run_without_pytest_benchmark_names_the_extra_before_any_case_runs(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    assert cli.main(["run"]) == 2
    out = capsys.readouterr().out
    assert "pytest-benchmark" in out and 'pip install "attention-suite[perf]"' in out


def test_a_compare_with_a_baseline_times_cases_as_the_baseline_was_timed(tmp_path, monkeypatch, capsys):
    """Forward+backward cases are captured in CUDA graphs by default, but a baseline recorded with
    ``--perf-graphs=fwd`` timed them eagerly: a compare against it times them eagerly too (else
    none would be compared), unless the command names a policy."""
    baselines = tmp_path / "b"
    write_run(make_run({KEY: {"median": 1e-3}}, with_machine(graphs="fwd")), baselines / H100["slug"] / "baseline.json")

    def policies(argv: list[str], medians: list[float]) -> list[list[str]]:
        """The --perf-graphs arguments the CLI gives each pytest process of this command."""
        fake_gpu_runs(monkeypatch, tmp_path, medians)
        fake, seen = launcher.pytest_run, []

        def recording(label, args, extra, *rest, **kwargs):
            seen.append([a for a in extra if a.startswith("--perf-graphs")])
            return fake(label, args, extra, *rest, **kwargs)

        monkeypatch.setattr(launcher, "pytest_run", recording)
        cli.main([*argv, "--out", str(tmp_path), "--baselines", str(baselines)])
        return seen

    assert policies(["--benchmark-compare"], [1e-3]) == [["--perf-graphs=fwd"]]
    assert "Timing cases as" in capsys.readouterr().out
    # A flagged case is re-timed in a fresh process the same way.
    assert policies(["--benchmark-compare", "--confirm", "1"], [1.3e-3, 1.3e-3]) == [["--perf-graphs=fwd"]] * 2
    assert policies(["--benchmark-compare", "--perf-graphs=all"], [1e-3]) == [["--perf-graphs=all"]]  # the user's
    monkeypatch.setattr(cli, "_resolve", lambda args, extra, cuda: None)  # a plain run: the plugin's default
    assert policies([], [1e-3]) == [[]]
