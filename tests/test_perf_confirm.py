"""The committed-baseline gate confirms a flagged case in fresh processes before failing it (CPU).

Synthetic runs with every sample drawn from a seed fixed per test, so no draw can turn CI red;
the fresh processes are faked at the launcher (``launcher.pytest_run``, ``launcher.start``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attention.bench.perf import cli, confirm, launcher
from attention.bench.perf import compare as cmp
from attention.bench.perf.results import write_run

from .perf_support import H100, make_run, on_gpu, samples

FLEX = "core-flex-fp32-fwd-B16-T1024-H32-D64"
SDPA = "core-sdpa-bf16-fwd-B4-T4096-H32-D64"
MEDIANS = {FLEX: 7.5e-3, SDPA: 1.0e-3}
FLEX_INFO = {"family": "flex", "impl": "flex", "dtype": "fp32", "flex_path": "fused", "sdpa_backend": None}


def grid(seed: int, slower: dict[str, float] | None = None, keys=None, path: str = "run.json"):
    """A run of ``keys`` (default both cases) at the baseline's medians times ``slower[key]``,
    30 rounds each spread +-0.5%, drawn from ``seed``."""
    cases = {}
    for i, key in enumerate(keys or MEDIANS):
        median = MEDIANS[key] * (slower or {}).get(key, 1.0)
        info = FLEX_INFO if key == FLEX else {}
        cases[key] = {"median": median, "data": samples(median, seed=seed * 100 + i), **info}
    return make_run(cases, path=path)


def flagged_by(first, baseline, thresholds, planned=3):
    return confirm.flags([(first, cmp.compare(baseline, first, thresholds))], baseline, planned)


def retimer(runs: list):
    """``retime(label, keys)`` handing out ``runs`` in turn (each narrowed to ``keys``); the calls
    are recorded in ``retimer.calls``."""
    queue = list(runs)
    calls = []

    def retime(label, keys):
        calls.append((label, list(keys)))
        run = queue.pop(0)
        if run is not None:
            run.records = {k: r for k, r in run.records.items() if k in keys}
        return run

    retime.calls = calls
    return retime


THRESHOLDS = {**cmp.load_thresholds(None), "cases": {FLEX: {"time": 0.10}, SDPA: {"time": 0.05}}}


def test_a_slow_draw_the_fresh_processes_do_not_repeat_is_reported_not_failed():
    baseline = grid(1)
    first = grid(2, {FLEX: 1.33})  # flex fp32's slow compilation: 7.5 -> 10 ms
    found = flagged_by(first, baseline, THRESHOLDS)
    assert list(found) == [FLEX] and found[FLEX].first[0].verdict == "slower"
    retime = retimer([grid(3, {FLEX: 0.99}), grid(4, {FLEX: 0.99}), grid(5)])
    confirm.confirm(found, baseline, THRESHOLDS, retime)
    assert retime.calls == [("confirm-1", [FLEX]), ("confirm-2", [FLEX])]  # two clean of three decide it
    flag = found[FLEX]
    assert flag.cleared and not flag.confirmed and [t.verdict for t in flag.retimes] == ["clean", "clean"]
    text = confirm.report(found, 3)
    assert f"{FLEX}: flagged once, not confirmed in 2 fresh processes: medians 7.4" in text
    assert "0 confirmed, 1 not" in text and "REGRESSIONS" not in text


def test_a_real_ten_percent_slowdown_in_every_process_is_confirmed():
    baseline = grid(11)
    first = grid(12, {SDPA: 1.10})
    found = flagged_by(first, baseline, THRESHOLDS)
    assert list(found) == [SDPA]
    retime = retimer([grid(13 + i, {SDPA: 1.10}) for i in range(3)])
    confirm.confirm(found, baseline, THRESHOLDS, retime)
    flag = found[SDPA]
    assert flag.confirmed and [t.verdict for t in flag.retimes] == ["slower", "slower"]
    assert len(retime.calls) == 2  # no third process can clear it any more
    assert "REGRESSIONS (confirmed): 1" in confirm.report(found, 3)


@pytest.mark.parametrize(
    ("draws", "confirmed", "processes"),
    [
        ((1.10, 1.0, 1.10), True, 3),  # a split: two of three flag it
        ((1.10, 1.0, 1.0), False, 3),  # two of three clean clear it
        ((None, 1.0, 1.0), False, 3),  # a process that timed nothing is no evidence either way
        ((None, None), True, 2),  # nothing re-timed: the flag stands
    ],
)
def test_a_flag_is_cleared_by_a_majority_of_clean_re_timings_only(draws, confirmed, processes):
    baseline = grid(21)
    found = flagged_by(grid(22, {SDPA: 1.10}), baseline, THRESHOLDS)
    runs = [None if d is None else grid(23 + i, {SDPA: d}) for i, d in enumerate(draws)]
    retime = retimer(runs)
    confirm.confirm(found, baseline, THRESHOLDS, retime)
    assert found[SDPA].confirmed is confirmed and len(retime.calls) == processes
    if None in draws:
        assert found[SDPA].retimes[0].verdict == "not timed"


def test_clean_needed_is_a_strict_majority():
    assert [confirm.clean_needed(k) for k in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


def test_memory_regressions_and_guard_failures_fail_without_re_timing():
    baseline = grid(31)
    first = grid(32)
    first.records[SDPA].info["peak_mem_mib"] = 128.0
    first.records[FLEX].info["flex_path"] = "unfused"
    result = cmp.compare(baseline, first, THRESHOLDS)
    assert confirm.flags([(first, result)], baseline, 3) == {}
    assert confirm.unconfirmed_failures(result) == 2


# -- through the CLI, pytest replaced ------------------------------------------------------------


def gpu_cli(monkeypatch, tmp_path, runs: dict[str, object]):
    """cmd_run as on a GPU machine with a committed baseline (seed 41); ``runs``: label -> the run
    pytest_run hands back (re-timings narrowed to the cases they were asked for). Returns the
    recorded calls: (label, extra, env)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu(monkeypatch, dict(H100))
    write_run(grid(41), tmp_path / "b" / H100["slug"] / "baseline.json")
    (tmp_path / "b" / H100["slug"] / "thresholds.json").write_text(json.dumps(THRESHOLDS))
    calls = []

    def fake(label, args, extra, out, cpu, limit, env=None):
        calls.append((label, extra, env))
        run = runs[label]
        if "--perf-cases" in extra:
            keys = Path(extra[extra.index("--perf-cases") + 1]).read_text().split()
            run.records = {k: r for k, r in run.records.items() if k in keys}
        path = write_run(run, out / f"{label}.json")
        return 0, cli.load_run(path)

    monkeypatch.setattr(launcher, "pytest_run", fake)
    return calls


def argv(tmp_path, *more):
    return ["--benchmark-compare", "--out", str(tmp_path / "out"), "--baselines", str(tmp_path / "b"), *more]


def test_cli_passes_a_flag_the_fresh_processes_do_not_confirm_and_says_so(tmp_path, monkeypatch, capsys):
    runs = {"run-1": grid(42, {FLEX: 1.33}), "confirm-1": grid(43), "confirm-2": grid(44)}
    calls = gpu_cli(monkeypatch, tmp_path, runs)
    assert cli.main(argv(tmp_path, "-k", "fp32 or sdpa")) == 0
    out = capsys.readouterr().out
    assert "Flagged slower, to be confirmed in up to 3 fresh processes: 1" in out
    # The run's verdict line counts as the comparison does: the flag apart, not as a regression.
    assert ": FLAGGED (0 regressions, 1 flagged slower to confirm, 0 guard failures, 0 improvements)" in out
    assert f"{FLEX}: flagged once, not confirmed in 2 fresh processes: medians 7.5" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS")
    # Each re-timing: a fresh pytest process of the run's own arguments, only the flagged case,
    # caches of its own.
    assert [label for label, *_ in calls] == ["run-1", "confirm-1", "confirm-2"]
    for _, extra, env in calls[1:]:
        assert extra[:2] == ["-k", "fp32 or sdpa"] and extra[-2] == "--perf-cases"
        assert Path(extra[-1]).read_text().split() == [FLEX]
        assert Path(env["TRITON_CACHE_DIR"]).parent == Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent
    assert calls[1][2]["TORCHINDUCTOR_CACHE_DIR"] != calls[2][2]["TORCHINDUCTOR_CACHE_DIR"]
    doc = json.loads((tmp_path / "out" / confirm.FILE).read_text())
    assert doc["confirmed"] == [] and doc["not_confirmed"] == [FLEX] and doc["retimes"] == 3
    (case,) = doc["cases"]
    assert case["first"][0]["run"] == "run-1" and case["first"][0]["median_s"] == pytest.approx(7.5e-3 * 1.33)
    assert [t["run"] for t in case["retimes"]] == ["confirm-1", "confirm-2"]
    assert all(len(t["data_s"]) == 30 and t["verdict"] == "clean" for t in case["retimes"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "run-1.json vs" in summary and "FLAGGED" in summary and "not confirmed in 2 fresh processes" in summary


def test_cli_fails_a_real_slowdown_every_fresh_process_repeats(tmp_path, monkeypatch, capsys):
    runs = {label: grid(50 + i, {SDPA: 1.10}) for i, label in enumerate(("run-1", "confirm-1", "confirm-2"))}
    gpu_cli(monkeypatch, tmp_path, runs)
    assert cli.main(argv(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "REGRESSIONS (confirmed): 1" in out and f"{SDPA}: CONFIRMED in fresh processes: medians 1.1" in out
    doc = json.loads((tmp_path / "out" / confirm.FILE).read_text())
    assert doc["confirmed"] == [SDPA] and [t["verdict"] for t in doc["cases"][0]["retimes"]] == ["slower"] * 2


def test_cli_with_repeat_re_times_a_case_flagged_in_several_runs_once(tmp_path, monkeypatch, capsys):
    runs = {"run-1": grid(91, {FLEX: 1.33}), "run-2": grid(92, {FLEX: 1.30}), "confirm-1": grid(93)}
    runs["confirm-2"] = grid(94)
    calls = gpu_cli(monkeypatch, tmp_path, runs)
    assert cli.main(argv(tmp_path, "--repeat", "2")) == 0
    assert [label for label, *_ in calls] == ["run-1", "run-2", "confirm-1", "confirm-2"]
    assert f"{FLEX}: flagged in 2 runs, not confirmed in 2 fresh processes" in capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / confirm.FILE).read_text())
    assert [t["run"] for t in doc["cases"][0]["first"]] == ["run-1", "run-2"] and len(doc["runs"]) == 2


def test_cli_confirm_zero_fails_every_flag_without_re_timing(tmp_path, monkeypatch, capsys):
    calls = gpu_cli(monkeypatch, tmp_path, {"run-1": grid(61, {FLEX: 1.33})})
    assert cli.main(argv(tmp_path, "--confirm", "0")) == 1
    out = capsys.readouterr().out
    assert [label for label, *_ in calls] == ["run-1"] and "confirmation off" in out
    assert ": FAIL (1 regressions, 0 guard failures, 0 improvements)" in out
    doc = json.loads((tmp_path / "out" / confirm.FILE).read_text())
    assert doc["retimes"] == 0 and doc["confirmed"] == [FLEX] and doc["cases"][0]["retimes"] == []


def test_cli_with_nothing_flagged_re_times_nothing(tmp_path, monkeypatch, capsys):
    calls = gpu_cli(monkeypatch, tmp_path, {"run-1": grid(71)})
    assert cli.main(argv(tmp_path)) == 0
    assert len(calls) == 1 and "nothing to confirm" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / confirm.FILE).read_text())["cases"] == []


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--confirm", "2"], "--confirm needs --benchmark-compare"),
        (["--benchmark-compare=HEAD", "--confirm", "2"], "--confirm re-times what a compare with a baseline flags"),
    ],
)
def test_cli_refuses_confirm_where_no_baseline_gate_reads_it(more, message, tmp_path, monkeypatch, capsys):
    gpu_cli(monkeypatch, tmp_path, {})
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    assert cli.main([*more, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().out


def test_retime_runs_one_fresh_process_on_the_flagged_cases_with_empty_caches(tmp_path, monkeypatch):
    seen = {}

    def fake_start(cmd, stdout=None, env=None):
        seen.update(cmd=cmd, env=env, caches=[Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent])
        assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).parent.is_dir()  # there while the process runs
        write_run(grid(81), tmp_path / "confirm-1.json")

    monkeypatch.setattr(launcher, "start", fake_start)
    monkeypatch.setattr(launcher, "wait", lambda procs, limit: [0])
    args, extra = cli.run_parser().parse_known_args(["--out", str(tmp_path), "-k", "flex"])
    rc, run = launcher.retime("confirm-1", args, extra, tmp_path, [FLEX, SDPA], limit=90.0)
    assert rc == 0 and set(run.records) == {FLEX, SDPA}
    cmd = seen["cmd"]
    assert cmd[cmd.index("--perf-cases") + 1] == str(tmp_path / "confirm-1-cases.txt")
    assert (tmp_path / "confirm-1-cases.txt").read_text().split() == [FLEX, SDPA]
    assert f"--benchmark-json={tmp_path / 'confirm-1.json'}" in cmd and "--perf-run-label=confirm-1" in cmd
    assert cmd[cmd.index("-k") + 1] == "flex"
    assert not seen["caches"][0].exists()  # removed once the process is done
