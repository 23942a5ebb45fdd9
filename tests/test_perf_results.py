"""attention.bench.perf.results and machine: baseline keying, refusals, corrupt files, salvage (CPU)."""

from __future__ import annotations

import json

import pytest

from attention.bench.perf import machine
from attention.bench.perf.results import (
    BadResultFile,
    NoBaseline,
    Refused,
    check_comparable,
    find_baseline,
    load_run,
    salvage,
    write_run,
)

from .perf_support import H100, make_raw, make_run, with_machine

CASES = {"core-sdpa-bf16-fwd-B4-T4096-H32-D64": {"median": 1e-3}}


def test_slug_and_torch_minor():
    assert machine.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert machine.torch_minor("2.11.0+cu130") == "2.11" and machine.torch_minor("2.13.0") == "2.13"
    with pytest.raises(ValueError):
        machine.slugify("!!")


def test_machine_info_on_cpu_has_what_baselines_are_keyed_on():
    info = machine.machine_info("cpu")
    assert info["slug"] == "cpu" and info["device"] == "cpu" and info["torch_minor"]


def test_another_gpu_is_refused_not_a_regression():
    other = make_run(CASES, with_machine(gpu_name="NVIDIA A100-SXM4-80GB", slug="nvidia-a100-sxm4-80gb"))
    with pytest.raises(Refused, match=r"refusing to compare.*H100.*A100"):
        check_comparable(make_run(CASES), other)


def test_another_torch_minor_is_refused_a_patch_release_only_warns():
    with pytest.raises(Refused, match=r"torch 2\.11\.0\+cu130.*2\.12\.0"):
        check_comparable(make_run(CASES), make_run(CASES, with_machine(torch="2.12.0", torch_minor="2.12")))
    warnings = check_comparable(make_run(CASES), make_run(CASES, with_machine(torch="2.11.1+cu130", cudnn=91400)))
    assert any("cudnn" in w for w in warnings) and any("torch" in w for w in warnings)


def test_missing_baseline_says_how_to_record(tmp_path):
    with pytest.raises(NoBaseline, match=r"nvidia-h100-80gb-hbm3.*nox -s perf -- --record"):
        find_baseline(tmp_path, make_run(CASES))
    with pytest.raises(NoBaseline, match="never baselined"):
        find_baseline(tmp_path, make_run(CASES, with_machine(device="cpu", gpu_name=None, slug="cpu")))


def test_baseline_is_found_under_the_gpu_slug(tmp_path):
    path = write_run(make_run(CASES), tmp_path / H100["slug"] / "baseline.json")
    assert find_baseline(tmp_path, make_run(CASES)) == path
    assert load_run(path).records.keys() == CASES.keys()


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "empty"),
        ("   \n", "empty"),
        (json.dumps(make_raw(CASES))[:200], "invalid JSON.*truncated"),
        ("[]", "top level is a list"),
        (json.dumps({"benchmarks": []}), "machine_info"),
        (json.dumps({"machine_info": {"node": "x"}, "benchmarks": []}), "attention_perf"),
        (json.dumps(dict(make_raw(CASES), benchmarks=[{"name": "x"}])), "malformed"),
        (json.dumps(dict(make_raw(CASES), benchmarks={"a": 1})), "benchmarks"),
    ],
)
def test_corrupt_files_give_a_clear_error(tmp_path, content, message):
    path = tmp_path / "baseline.json"
    path.write_text(content)
    with pytest.raises(BadResultFile, match=message) as err:
        load_run(path)
    assert str(path) in str(err.value) and "regenerate" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(BadResultFile, match="no such file"):
        load_run(tmp_path / "nope.json")


def test_salvage_rebuilds_a_run_from_the_case_log(tmp_path):
    log = tmp_path / "cases.jsonl"
    lines = [
        {"run": "run-1", "machine_info": {machine.KEY: H100}},
        {"run": "run-1", "case": "a", "status": "passed", "extra_info": {"case": "a"}, "data": [1.0, 3.0, 2.0]},
        {"run": "run-1", "case": "b", "status": "skipped", "reason": "needs 90 GiB"},
        {"run": "run-2", "case": "c", "status": "passed", "extra_info": {"case": "c"}, "data": [1.0]},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"run": "run-1", "case": "d", "sta')
    raw = salvage(log, "run-1")
    assert [b["name"] for b in raw["benchmarks"]] == ["a"] and raw["benchmarks"][0]["stats"]["median"] == 2.0
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    assert load_run(path).records["a"].median == 2.0
