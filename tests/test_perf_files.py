"""The perf CLI under bad files and bad paths: nothing is overwritten with less, nothing escapes the
baselines folder, every number read from a file is checked, and every mistake is exit 2 naming
the file and the field (CPU)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from attention.bench.perf import cli, launcher

from .perf_support import H100, make_raw, on_gpu, with_machine

KEY = "core-sdpa-bf16-fwd-B4-T4096-H32-D64"


def write_raw(path: Path, raw: dict) -> str:
    path.write_text(json.dumps(raw))
    return str(path)


def run_doc(median: float = 1e-3, machine: dict | None = None, **info) -> dict:
    return make_raw({KEY: {"median": median, **info}}, machine)


def log_with(tmp_path: Path, run: str) -> Path:
    log = tmp_path / "cases.jsonl"
    lines = [
        {"run": run, "machine_info": {"attention_perf": H100}},
        {"run": run, "case": KEY, "status": "passed", "extra_info": {"case": KEY}, "data": [1e-3, 1.1e-3]},
    ]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return log


def test_salvage_of_a_run_the_log_lacks_leaves_the_existing_file_alone(tmp_path, capsys):
    log = log_with(tmp_path, "run-1")
    existing = tmp_path / "run-1.json"
    existing.write_text("precious")
    assert cli.main(["salvage", str(log), "--run", "run-2", "-o", str(existing)]) == 2
    assert "holds no finished case of 'run-2'" in capsys.readouterr().out
    assert existing.read_text() == "precious"
    assert cli.main(["salvage", str(log), "--run", "run-1", "-o", str(existing)]) == 0
    assert json.loads(existing.read_text())["benchmarks"][0]["name"] == KEY
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("log", "is the log itself"),
        ("missing_dir", "does not exist"),
        ("missing_log", "no such log"),
        ("a_folder", "a folder, not a file"),
        ("under_a_file", "is a file"),
    ],
)
def test_salvage_refuses_bad_paths(tmp_path, capsys, target, message):
    log = log_with(tmp_path, "run-1")
    before = log.read_text()
    (tmp_path / "folder").mkdir()
    args = {
        "log": [str(log), "-o", str(log)],
        "missing_dir": [str(log), "-o", str(tmp_path / "nope" / "run.json")],
        "missing_log": [str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "run.json")],
        "a_folder": [str(log), "-o", str(tmp_path / "folder")],
        "under_a_file": [str(log), "-o", str(log / "run.json")],
    }[target]
    assert cli.main(["salvage", *args]) == 2
    assert message in capsys.readouterr().out
    assert log.read_text() == before


@pytest.mark.parametrize("slug", ["../../x", "/tmp/abs", "a/b", "", "NVIDIA H100"])
def test_record_never_writes_outside_the_baselines_folder(tmp_path, capsys, slug):
    run = write_raw(tmp_path / "run.json", run_doc(machine=with_machine(slug=slug)))
    baselines = tmp_path / "deep" / "baselines"
    assert cli.main(["record", run, "--baselines", str(baselines)]) == 2
    out = capsys.readouterr().out
    assert "run.json" in out and "slug" in out
    assert not any(p.name == "baseline.json" for p in tmp_path.rglob("*"))


def test_a_slug_that_does_not_match_the_gpu_is_refused(tmp_path, capsys):
    run = write_raw(tmp_path / "run.json", run_doc(machine=with_machine(slug="nvidia-a100")))
    assert cli.main(["record", run, "--baselines", str(tmp_path / "b")]) == 2
    assert "does not match gpu_name" in capsys.readouterr().out


@pytest.mark.parametrize("median", [math.nan, 0.0, -1e-3, "fast", None])
@pytest.mark.parametrize("command", ["compare-run", "compare-baseline", "record", "table"])
def test_bad_medians_are_exit_2_naming_file_case_and_field(tmp_path, capsys, median, command):
    good = write_raw(tmp_path / "good.json", run_doc())
    bad = write_raw(tmp_path / "bad.json", run_doc(median=median, data=[1e-3] * 5))
    argv = {
        "compare-run": ["compare", bad, "--baseline", good],
        "compare-baseline": ["compare", good, "--baseline", bad],
        "record": ["record", bad, "--baselines", str(tmp_path / "b")],
        "table": ["table", bad],
    }[command]
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    assert "bad.json" in out and KEY in out and "stats.median" in out
    assert not (tmp_path / "b").exists()


def test_bad_samples_and_info_numbers_are_refused(tmp_path, capsys):
    bad_data = write_raw(tmp_path / "data.json", run_doc(data=[1e-3, math.nan, 1e-3]))
    assert cli.main(["table", bad_data]) == 2
    assert "stats.data holds nan" in capsys.readouterr().out
    bad_tflops = write_raw(tmp_path / "tflops.json", run_doc(tflops="400"))
    assert cli.main(["table", bad_tflops]) == 2
    assert "extra_info.tflops is '400'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("thresholds", "field"),
    [
        ({"default": {"time": math.nan}}, "default.time"),
        ({"default": {"time": -0.1}}, "default.time"),
        ({"default": {"time": "5%"}}, "default.time"),
        ({"floor": math.nan}, "floor"),
        ({"cases": {KEY: {"time": -1}}}, f"cases['{KEY}'].time"),
        ({"patterns": [{"match": "core-*", "memory": "x"}]}, "patterns[0].memory"),
    ],
)
def test_bad_thresholds_are_exit_2_naming_the_field(tmp_path, capsys, thresholds, field):
    run = write_raw(tmp_path / "run.json", run_doc())
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(thresholds))
    assert cli.main(["compare", run, "--baseline", run, "--thresholds", str(path)]) == 2
    out = capsys.readouterr().out
    assert "thresholds.json" in out and field in out


def test_spread_of_one_run_says_why(tmp_path, capsys):
    run = write_raw(tmp_path / "run.json", run_doc())
    assert cli.main(["spread", run]) == 2
    assert "at least two runs" in capsys.readouterr().out


def test_a_run_without_a_slug_is_refused(tmp_path, capsys):
    machine = dict(H100)
    del machine["slug"]
    run = write_raw(tmp_path / "run.json", run_doc(machine=machine))
    assert cli.main(["record", run, "--baselines", str(tmp_path)]) == 2
    assert "slug is None" in capsys.readouterr().out


def test_an_unwritable_out_is_refused_before_any_case_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["--out", str(blocker / "out")]) == 2
    assert f"--out {blocker / 'out'}: cannot create the folder: Not a directory" in capsys.readouterr().out


def test_a_thresholds_file_that_does_not_exist_is_refused_not_replaced_by_the_defaults(tmp_path, capsys):
    base = write_raw(tmp_path / "base.json", run_doc())
    slow = write_raw(tmp_path / "slow.json", run_doc(median=1.3e-3))
    missing = tmp_path / "no" / "thresholds.json"
    assert cli.main(["compare", slow, "--baseline", base, "--thresholds", str(missing)]) == 2
    out = capsys.readouterr().out
    assert f"--thresholds {missing}: no such file" in out
    assert "Thresholds: defaults" not in out and "REGRESSION" not in out


def test_a_thresholds_flag_is_checked_before_any_case_runs(tmp_path, monkeypatch, capsys):
    baselines = tmp_path / "b"
    (baselines / H100["slug"]).mkdir(parents=True)
    write_raw(baselines / H100["slug"] / "baseline.json", run_doc())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu(monkeypatch, dict(H100))
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    common = ["--out", str(tmp_path / "out"), "--baselines", str(baselines), "--thresholds", str(tmp_path / "typo")]
    assert cli.main(["--benchmark-compare", *common]) == 2
    assert f"--thresholds {tmp_path / 'typo'}: no such file" in capsys.readouterr().out
    assert cli.main(common) == 2  # no gate of this run would read it
    assert "--thresholds needs --benchmark-compare" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["same path", "another spelling", "a copy"])
@pytest.mark.parametrize("command", ["record", "spread"])
def test_one_run_given_twice_is_refused_not_counted_as_two(tmp_path, capsys, command, how):
    run = write_raw(tmp_path / "run.json", run_doc())
    twin = {
        "same path": run,
        "another spelling": str(tmp_path / "." / "run.json"),
        "a copy": write_raw(tmp_path / "copy.json", run_doc()),
    }[how]
    argv = [command, run, twin] + (["--baselines", str(tmp_path / "b")] if command == "record" else [])
    assert cli.main(argv) == 2
    out = capsys.readouterr().out
    expected = "copy.json holds the same timings as" if how == "a copy" else "the same file is given twice"
    assert expected in out and "run.json" in out
    assert "Run-to-run spread" not in out and not (tmp_path / "b").exists()


NOT_UTF8 = b'{"machine_info": "\xff\xfe"}\n'


@pytest.mark.parametrize("command", ["table", "compare-baseline", "thresholds", "salvage"])
def test_a_file_that_is_not_utf8_is_exit_2_naming_it(tmp_path, capsys, command):
    good = write_raw(tmp_path / "good.json", run_doc())
    bad = tmp_path / "latin1.json"
    bad.write_bytes(NOT_UTF8)
    argv = {
        "table": ["table", str(bad)],
        "compare-baseline": ["compare", good, "--baseline", str(bad)],
        "thresholds": ["compare", good, "--baseline", good, "--thresholds", str(bad)],
        "salvage": ["salvage", str(bad), "-o", str(tmp_path / "run.json")],
    }[command]
    assert cli.main(argv) == 2
    assert f"{bad}: not UTF-8 text (byte 0xff at offset 18)" in capsys.readouterr().out
    assert not (tmp_path / "run.json").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"status": "passed", "data": [1e-3]}, "a passed case whose name is None"),
        (
            {"case": KEY, "status": "passed", "data": ["fast", "slow"]},
            "data is ['fast', 'slow'], not a list of seconds",
        ),
        ({"case": KEY, "status": "passed", "data": 0.001}, "data is 0.001, not a list of seconds"),
    ],
)
def test_salvage_of_a_whole_but_malformed_line_is_exit_2_naming_the_line(tmp_path, capsys, line, message):
    log = log_with(tmp_path, "run-1")
    with log.open("a") as f:
        f.write(json.dumps({"run": "run-1", **line}) + "\n")
    assert cli.main(["salvage", str(log), "-o", str(tmp_path / "run.json")]) == 2
    assert f"{log}, line 3: " in (out := capsys.readouterr().out) and message in out
    assert not (tmp_path / "run.json").exists()


def test_record_into_a_baselines_path_that_is_a_file_is_exit_2(tmp_path, capsys):
    run = write_raw(tmp_path / "run.json", run_doc())
    blocker = tmp_path / "file"
    blocker.write_text("")
    for baselines in (blocker, blocker / "deeper"):
        assert cli.main(["record", run, "--baselines", str(baselines)]) == 2
        assert f"--baselines {baselines}: cannot create the folder" in capsys.readouterr().out
    assert blocker.read_text() == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_record_into_a_read_only_baselines_folder_is_exit_2(tmp_path, capsys):
    run = write_raw(tmp_path / "run.json", run_doc())
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert cli.main(["record", run, "--baselines", str(locked)]) == 2
    assert f"--baselines {locked}: cannot create the folder: Permission denied" in capsys.readouterr().out


def test_spread_write_to_an_unwritable_path_is_exit_2(tmp_path, capsys):
    runs = [write_raw(tmp_path / f"run-{i}.json", run_doc(median=m)) for i, m in enumerate((1e-3, 1.01e-3))]
    target = tmp_path / "run-0.json" / "thresholds.json"
    assert cli.main(["spread", *runs, "--write", str(target)]) == 2
    assert f"{target}: {target.parent}: cannot create the folder" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--benchmark-json", "--baselines"])
def test_run_outputs_that_cannot_be_written_are_refused_before_any_case_runs(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu(monkeypatch, dict(H100))
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = blocker / "x"
    assert cli.main(["--out", str(tmp_path / "out"), "--record", flag, str(bad)]) == 2
    assert f"{flag} {bad}: " in capsys.readouterr().out
