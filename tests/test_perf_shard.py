"""A perf run over several GPUs: GPU selection, longest-first sharding, merging runs and A/B
reports, the per-GPU case lists, and a two-process run of the tiny grid (CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attention.bench.perf import ab, cli, launcher, runner, shard
from attention.bench.perf.results import PerfError, load_run, parse_run

from .perf_support import H100, ROOT, make_raw, make_run, on_gpu, samples, subprocess_env, with_machine


def test_gpus_are_all_or_a_count_of_those_present():
    assert shard.parse_gpus("all", 4) == [0, 1, 2, 3]
    assert shard.parse_gpus("2", 4) == [0, 1]
    with pytest.raises(PerfError, match="this host has 2 CUDA GPU"):
        shard.parse_gpus("3", 2)
    with pytest.raises(PerfError, match="'all' or a number of GPUs, got 'two'"):
        shard.parse_gpus("two", 2)
    with pytest.raises(PerfError, match="needs CUDA GPUs; none here"):
        shard.parse_gpus("all", 0)
    with pytest.raises(PerfError, match="this host has 2"):
        shard.parse_gpus("0", 2)


def test_longest_cases_go_first_to_the_least_loaded_gpu():
    costs = {"a": 10.0, "b": 9.0, "c": 5.0, "d": 4.0, "e": 2.0}
    assert shard.lpt_shards(costs, 2) == [["a", "d", "e"], ["b", "c"]]  # loads 16 and 14
    assert shard.lpt_shards(costs, 1) == [["a", "b", "c", "d", "e"]]
    assert shard.lpt_shards({"a": 1.0}, 3) == [["a"], [], []]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        shard.lpt_shards(costs, 0)


@given(
    costs=st.dictionaries(st.text(min_size=1, max_size=6), st.floats(0.0, 1e3), min_size=1, max_size=40),
    workers=st.integers(1, 8),
)
def test_shards_cover_every_case_once_within_the_lpt_bound(costs, workers):
    shards = shard.lpt_shards(costs, workers)
    dealt = [key for s in shards for key in s]
    assert sorted(dealt) == sorted(costs) and len(shards) == workers
    loads = [sum(costs[k] for k in s) for s in shards]
    # Greedy list scheduling: no GPU ends later than the average load plus the longest case.
    assert max(loads) <= sum(costs.values()) / workers + max(costs.values()) + 1e-6
    for s in shards:  # each GPU runs its longest cases first
        assert [costs[k] for k in s] == sorted((costs[k] for k in s), reverse=True)


def test_costs_come_from_history_and_the_model_fills_in_at_historys_pace():
    infos = {
        "flex": {"impl": "flex", "family": "flex", "flops": 3e12},
        "sdpa": {"impl": "sdpa", "family": "sdpa", "flops": 3e12},
        "decode": {"impl": "sdpa", "family": "sdpa", "flops": 1e6, "min_bytes": 2e9},
    }
    model = {k: shard.model_seconds(info, 0.2) for k, info in infos.items()}
    assert model["flex"] > model["sdpa"]  # compilation
    triton = {"impl": "triton", "family": "other", "flops": 3e12}  # its family says nothing of it
    compile_s = shard.model_seconds(triton, 0.2) - model["sdpa"]
    assert compile_s == pytest.approx(shard.FIXED_S["triton"] - shard.DEFAULT_FIXED_S)
    assert model["decode"] > shard.model_seconds(dict(infos["decode"], min_bytes=0), 0.2)  # bytes count
    second = {"impl": "sdpa", "family": "sdpa", "flops": shard.DEFAULT_FLOPS_PER_S}  # a second a call
    calls = shard.UNTIMED_CALLS + runner.MIN_ROUNDS  # a long case is timed for the runner's fewest rounds
    assert shard.model_seconds(second, 0.2) == pytest.approx(shard.DEFAULT_FIXED_S + calls)
    more = shard.UNTIMED_CALLS + 50  # --benchmark-min-rounds=50 raises the floor
    assert shard.model_seconds(second, 0.2, min_rounds=50) == pytest.approx(shard.DEFAULT_FIXED_S + more)
    costs = shard.case_costs(infos, {"sdpa": 2 * model["sdpa"]}, 0.2)
    assert costs["sdpa"] == 2 * model["sdpa"]  # what it took before
    assert costs["flex"] == pytest.approx(2 * model["flex"])  # the model, at history's pace
    history = make_run({"x": {"median": 1e-3, "wall_s": {"warmup": 1.5, "timing": 0.5}}})
    assert shard.history_seconds(history) == {"x": 2.0}
    assert shard.history_seconds(None) == {}


@pytest.mark.parametrize(
    ("extra", "timing"),
    [
        ([], (runner.DEFAULT_BUDGET_S, runner.MIN_ROUNDS)),
        (["--perf-budget=0.5", "--benchmark-min-rounds=40"], (0.5, 40)),
        (["--perf-budget=0.5", "--benchmark-max-time=0.1"], (0.1, runner.MIN_ROUNDS)),  # as the plugin applies it
    ],
)
def test_the_shard_model_times_cases_as_the_workers_flags_say(extra, timing):
    assert launcher._timing(extra) == timing


def test_a_bad_timing_flag_is_refused_before_the_cases_are_dealt():
    with pytest.raises(PerfError, match="--benchmark-min-rounds must be a whole number, got 'many'"):
        launcher._timing(["--benchmark-min-rounds=many"])


def _part(keys, **machine):
    return parse_run(make_raw({k: {"median": 1e-3} for k in keys}, with_machine(**machine)), "w.json")


def test_merged_run_has_every_case_once_with_its_gpu():
    merged = shard.merge_shards(
        [(0, _part(["a", "b"], copy_gbps=3000.0)), (1, _part(["c"], copy_gbps=2990.0))], 12.3, host_gpus=2
    )
    run = parse_run(merged, "merged.json")
    assert sorted(run.records) == ["a", "b", "c"]
    assert {k: r.info["gpu"] for k, r in run.records.items()} == {"a": 0, "b": 0, "c": 1}
    gpus = run.machine["gpus"]
    assert [(g["index"], g["cases"], g["copy_gbps"]) for g in gpus] == [(0, 2, 3000.0), (1, 1, 2990.0)]
    assert run.machine["wall_s"] == 12.3 and run.gpu == H100["gpu_name"]
    assert run.machine["gpu_count"] == 2  # the host's, where each pinned worker saw one


def test_merging_refuses_overlapping_shards_and_mixed_gpu_models():
    with pytest.raises(PerfError, match="case a ran on GPU 0 and GPU 1"):
        shard.merge_shards([(0, _part(["a"])), (1, _part(["a"]))], 1.0, host_gpus=2)
    with pytest.raises(PerfError, match="mixes GPU models"):
        shard.merge_shards(
            [(0, _part(["a"])), (1, _part(["b"], gpu_name="NVIDIA A100", slug="nvidia-a100"))], 1.0, host_gpus=2
        )
    with pytest.raises(PerfError, match="no worker produced a run"):
        shard.merge_shards([], 1.0, host_gpus=2)


def _report(key: str, shift: float, tmp_path: Path) -> ab.ABReport:
    base = samples(1e-3, n=20, seed=1)
    head = [x * shift for x in samples(1e-3, n=20, seed=2)]
    info = {"ab": {"base": "timed", "data": base, "peak_mem_mib": 64.0}, "peak_mem_mib": 64.0}
    report = ab.report_from_cases([(key, head, info)], base_rev="main", head_rev="tree", gpu="GPU")
    ab.write_outputs(report, tmp_path / key)
    return ab.report_from_json(json.loads((tmp_path / key / "ab.json").read_text()))


def test_ab_reports_round_trip_and_merge(tmp_path):
    slow, same = _report("slow", 1.05, tmp_path), _report("same", 1.0, tmp_path)
    assert slow.verdicts[0].status == "regressed" and slow.verdicts[0].interval.ratio > 1.04
    merged = ab.merge_reports([slow, same])
    assert [v.key for v in merged.verdicts] == ["slow", "same"] and merged.failed
    assert merged.counts()["regressed"] == 1 and merged.counts()["unchanged"] == 1


def test_merged_reports_list_base_only_cases_once_and_take_extra_refusals(tmp_path):
    only = ab.CaseVerdict("decode-old-impl", "base_only", None, 0.02, message="only in base")
    a, b = _report("same", 1.0, tmp_path), _report("other", 1.0, tmp_path)
    a.verdicts.append(only)
    b.verdicts.append(only)  # every shard names what only the base has
    merged = ab.merge_reports([a, b], refused=["lost-case: GPU 1's pytest process ended (exit -9)"])
    assert [v.key for v in merged.verdicts].count("decode-old-impl") == 1
    assert merged.failed and merged.refused == ["lost-case: GPU 1's pytest process ended (exit -9)"]


def test_nothing_compared_on_one_gpu_is_not_a_refusal_of_the_whole_run(tmp_path):
    nothing = ": ".join(ab.NOTHING_COMPARED)
    idle = ab.ABReport("main", "tree", "GPU", 0.99, [], refused=[nothing])
    merged = ab.merge_reports([idle, _report("same", 1.0, tmp_path)])
    assert merged.refused == [] and not merged.failed
    assert ab.merge_reports([idle, idle]).refused == [nothing]


def test_nvidia_smi_is_asked_by_uuid_not_by_the_pinned_index(monkeypatch):
    from types import SimpleNamespace

    from attention.bench.perf import machine

    for uuid, expected in (("5ac74363-4ef4", "GPU-5ac74363-4ef4"), ("GPU-1a2b", "GPU-1a2b"), ("", "0")):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i, u=uuid: SimpleNamespace(uuid=u))
        assert machine._smi_id(0) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="collects the tiny CPU grid")
@pytest.mark.parametrize("verbosity", [["-v"], ["-qq"]])  # the two ends: -qq prints no node ids at all
def test_selection_does_not_depend_on_pytest_verbosity(tmp_path, monkeypatch, verbosity):
    monkeypatch.chdir(ROOT)
    for key in [k for k in os.environ if k.startswith("PYTEST_")]:
        monkeypatch.delenv(key)
    args, _ = cli.run_parser().parse_known_args([])
    ids = launcher.selected_cases(args, ["-k", "core-sdpa-fp32", *verbosity], True, tmp_path)
    assert ids and all(i.startswith("core-sdpa-fp32") for i in ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="collects the tiny CPU grid")
def test_a_worker_that_dies_fails_the_run_and_its_cases_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for key in [k for k in os.environ if k.startswith("PYTEST_")]:
        monkeypatch.delenv(key)

    def worker(cmd, stdout=None, env=None):  # GPU 0 judges its shard; GPU 1 is killed first
        where = tmp_path / "gpu0"
        if env["CUDA_VISIBLE_DEVICES"] == "0":
            keys = (where / "cases.txt").read_text().split()
            head = samples(1e-3, n=20, seed=2)
            info = {"ab": {"base": "timed", "data": samples(1e-3, n=20, seed=1)}}
            report = ab.report_from_cases([(k, head, info) for k in keys], base_rev="b", head_rev="h", gpu="G")
            ab.write_outputs(report, where)

    monkeypatch.setattr(launcher, "start", worker)
    monkeypatch.setattr(launcher, "wait", lambda procs, limit: [0, -9])
    args, extra = cli.run_parser().parse_known_args(["-k", "core-sdpa-fp32 or decode-sdpa"])
    extra.append("--perf-compare-rev=HEAD")
    plan = launcher.gpu_plan(args, extra, tmp_path, [0, 1], cpu=True)
    rc, run = launcher.sharded_run("run-1", args, extra, tmp_path, None, plan, cpu=True)
    assert rc == 1 and run is None  # -9 is no pass; neither worker left a run
    doc = json.loads((tmp_path / "ab.json").read_text())
    lost = (tmp_path / "gpu1" / "cases.txt").read_text().split()
    assert doc["failed"] and len(doc["refused"]) == len(lost)
    assert all("GPU 1's pytest process ended (exit -9)" in r for r in doc["refused"])


def test_a_gpu_plan_reads_cuda_facts_in_a_child_and_refuses_mixed_models(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: pytest.fail("CUDA opened in the parent"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: pytest.fail("CUDA opened in the parent"))
    on_gpu(monkeypatch, dict(H100))
    facts = launcher.gpu_facts([0, 1], "full")
    monkeypatch.setattr(
        launcher, "gpu_facts", lambda gpus, grid_name="", impls=(): {**facts, "names": ["NVIDIA H100", "A100"]}
    )
    args, extra = cli.run_parser().parse_known_args([])
    with pytest.raises(PerfError, match="--gpus mixes GPU models"):
        launcher.gpu_plan(args, extra, tmp_path, [0, 1])


def test_the_gpu_facts_child_is_a_module_that_prints_one_json_line(monkeypatch, capsys):
    from attention.bench.perf import facts, machine

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda g: f"GPU{g}")
    monkeypatch.setattr(machine, "machine_info", lambda device: dict(H100, device=device))
    cpu_grid = facts.grid
    monkeypatch.setattr(facts, "grid", lambda name, device, impls: cpu_grid(name, "cpu", impls=impls))
    facts.main(["--grid=tiny", "--impl=sdpa", "0", "1"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["names"] == ["GPU0", "GPU1"] and doc["machine"]["device"] == "cuda:0"
    assert {info["impl"] for info in doc["cases"].values()} == {"sdpa", "raw_sdpa", "gemms"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpus_on_a_machine_without_them_is_refused_at_once(tmp_path, capsys):
    assert cli.main(["--gpus", "2", "--out", str(tmp_path)]) == 2
    assert "--gpus needs CUDA GPUs; none here" in capsys.readouterr().out
    assert not (tmp_path / "run-1.json").exists()


@pytest.mark.attention_costly  # pytest and CLI processes of its own, seconds each: started first under -n
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the tiny CPU grid")
def test_a_listed_shard_runs_only_its_cases_in_its_order(tmp_path):
    import subprocess
    import sys

    cases = ["decode-sdpa-fp32-B2-N256-H4-KV1-D16-GQA4", "core-sdpa-fp32-fwd-B4-T64-H4-D16"]
    listed = tmp_path / "cases.txt"
    listed.write_text("\n".join(cases) + "\n")
    cmd = [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "--perf-device=cpu", "--perf-grid=tiny"]
    cmd += ["--perf-budget=0.02", f"--perf-cases={listed}", f"--perf-log={tmp_path / 'log.jsonl'}", "-q"]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["case"] for e in log if "case" in e] == cases
    listed.write_text("no-such-case\n")
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 4 and "1 case(s) not in this grid: no-such-case" in done.stderr


@pytest.mark.attention_costly  # pytest and CLI processes of its own, seconds each: started first under -n
@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the tiny CPU grid")
def test_two_workers_run_disjoint_shards_merged_into_one_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for key in [k for k in os.environ if k.startswith("PYTEST_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # worker i gets the i-th visible GPU
    pinned, start = [], launcher.start

    def spy(cmd, stdout=None, env=None):
        pinned.append(env["CUDA_VISIBLE_DEVICES"])
        return start(cmd, stdout, env)

    monkeypatch.setattr(launcher, "start", spy)
    args, extra = cli.run_parser().parse_known_args(["--out", str(tmp_path), "-k", "core-sdpa-fp32 or decode-sdpa"])
    extra.append("--perf-budget=0.02")
    plan = launcher.gpu_plan(args, extra, tmp_path, [0, 1], cpu=True)
    rc, run = launcher.sharded_run("run-1", args, extra, tmp_path, None, plan, cpu=True)
    assert rc == 0
    shards = [(tmp_path / f"gpu{i}" / "cases.txt").read_text().split() for i in (0, 1)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    assert sorted(run.records) == sorted(shards[0] + shards[1])
    assert {k: r.info["gpu"] for k, r in run.records.items()} == {k: i for i in (0, 1) for k in shards[i]}
    assert [g["index"] for g in run.machine["gpus"]] == [0, 1]
    reloaded = load_run(tmp_path / "run-1.json")  # the merged JSON on disk, as the gates read it
    assert sorted(reloaded.records) == sorted(run.records)
    assert pinned == ["5", "7"]


def test_gpus_with_a_saved_run_compare_is_refused_before_any_case(tmp_path, monkeypatch, capsys):
    from attention.bench.perf import flags

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cli, "_resolve", lambda args, extra, cuda: flags.CompareTarget("saved", "0001"))
    monkeypatch.setattr(launcher, "sharded_run", lambda *a, **k: pytest.fail("a case ran"))
    assert cli.main(["--gpus", "all", "--benchmark-compare=0001", "--out", str(tmp_path)]) == 2
    assert "pytest-benchmark compares inside one process" in capsys.readouterr().out


def test_gpus_with_a_selection_that_leaves_no_case_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """Each repeat said "no case selected" and the run ended "FAIL: no run produced results", exit 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(launcher, "gpu_plan", lambda *a, **k: [])
    monkeypatch.setattr(launcher, "sharded_run", lambda *a, **k: pytest.fail("a case ran"))
    assert cli.main(["--gpus", "all", "-k", "no_such_case", "--out", str(tmp_path)]) == 2
    assert "no case selected: -k no_such_case matched none" in capsys.readouterr().out
