"""The perf gate's decisions on CPU: what --benchmark-compare resolves to, which pytest-benchmark flags
work, fast refusals, the interleaved A/B timing order, the base revision, and the GPU-state record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attention import registry
from attention.bench.perf import cli, flags, launcher, machine, runner
from attention.bench.perf.base_revision import BaseRevision
from attention.bench.perf.results import NoBaseline, PerfError, Refused, write_run
from attention.bench.workload import Workload

from .perf_support import H100, ROOT, PedanticBenchmark, make_run, on_gpu, subprocess_env

KEY = "core-sdpa-bf16-fwd-B4-T4096-H32-D64"
HAS_GIT_HISTORY = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0
needs_history = pytest.mark.skipif(not HAS_GIT_HISTORY, reason="needs the repository's git history")


# -- what --benchmark-compare[=X] resolves to -------------------------------------------------


def test_compare_resolution_order(tmp_path):
    baselines = tmp_path / "baselines"
    write_run(make_run({KEY: {"median": 1e-3}}), baselines / H100["slug"] / "baseline.json")
    storage = tmp_path / "storage"
    (storage / "Linux-CPython-3.12-64bit").mkdir(parents=True)
    (storage / "Linux-CPython-3.12-64bit" / "0007_abc123_20261128.json").write_text("{}")
    (tmp_path / "run.json").write_text("{}")

    def resolve(value):
        return flags.resolve_compare(value, baselines=baselines, storage=storage, machine=dict(H100))

    assert resolve(None) == flags.CompareTarget("baseline", path=baselines / H100["slug"] / "baseline.json")
    saved = str(storage / "Linux-CPython-3.12-64bit" / "0007_abc123_20261128.json")
    assert resolve("7") == resolve("0007") == resolve("0007_abc") == flags.CompareTarget("saved", value=saved)
    assert resolve(str(tmp_path / "run.json")) == flags.CompareTarget("file", path=tmp_path / "run.json")
    assert resolve("main") == flags.CompareTarget("revision", value="main")
    assert resolve("8").kind == "revision"  # no saved run 0008: a revision (git says whether it exists)
    # Other scripts' digits name no saved run: '²' is no number, '٠٠٠٧' is not 0007.
    assert resolve("²") == flags.CompareTarget("revision", value="²")
    assert resolve("٠٠٠٧").kind == resolve("٧").kind == "revision"
    with pytest.raises(PerfError, match=r"missing\.json: no such file"):
        resolve(str(tmp_path / "missing.json"))


def test_bare_compare_refusals_name_both_ways_on(tmp_path):
    with pytest.raises(NoBaseline, match="no committed baseline for NVIDIA H100") as missing:
        flags.resolve_compare(None, baselines=tmp_path, storage=tmp_path, machine=dict(H100))
    assert "--repeat 3 --record" in str(missing.value) and "--benchmark-compare=main" in str(missing.value)
    write_run(make_run({KEY: {"median": 1e-3}}), tmp_path / H100["slug"] / "baseline.json")
    newer = dict(H100, torch="2.15.0+cu130", torch_minor="2.15")
    with pytest.raises(Refused, match=r"recorded with torch 2\.11\.0\+cu130; this is torch 2\.15\.0") as other:
        flags.resolve_compare(None, baselines=tmp_path, storage=tmp_path, machine=newer)
    assert "--benchmark-compare=main" in str(other.value)
    with pytest.raises(NoBaseline, match="needs a CUDA GPU"):
        flags.resolve_compare(None, baselines=tmp_path, storage=tmp_path, machine=None)


# -- pytest-benchmark's own flags ------------------------------------------------------------


@pytest.mark.parametrize("flag", sorted(flags.REFUSED))
def test_flags_that_cannot_mean_anything_here_are_refused_with_the_reason(flag):
    with pytest.raises(flags.FlagRefused, match=rf"{flag} is not supported by the perf suite: \w+"):
        flags.check_native([f"{flag}=1", "-k", "sdpa"])


def test_accepted_flags_pass_and_noted_ones_say_so(monkeypatch):
    assert flags.check_native(["--benchmark-sort=name", "--benchmark-columns=median", "--benchmark-save=x"]) == []
    assert flags.check_native(["--benchmark-warmup"]) == [f"--benchmark-warmup: {flags.NOTED['--benchmark-warmup']}"]
    monkeypatch.setitem(sys.modules, "pygal", None)  # import fails
    with pytest.raises(flags.FlagRefused, match=r"pytest-benchmark\[histogram\]"):
        flags.check_native(["--benchmark-histogram"])


def test_compare_fail_takes_median_percentages_only():
    assert flags.compare_fail_fraction([]) is None
    assert flags.compare_fail_fraction(["median:5%"]) == pytest.approx(0.05)
    assert flags.compare_fail_fraction(["median:5%", "median:2.5%"]) == pytest.approx(0.025)
    for expr in ("mean:5%", "median:0.001", "min:10%", "median:5", "median:٥%", "median:5²%"):
        with pytest.raises(flags.FlagRefused, match="median:<percent>%"):
            flags.compare_fail_fraction([expr])


def test_native_compare_fail_is_checked_before_the_grid_runs():
    flags.check_native_compare_fail(["mean:5%", "min:0.001", "median:10"])
    for expr in ("average:5%", "mean:٥%"):  # another script's digit is not a number typed here
        with pytest.raises(flags.FlagRefused, match="STAT:NUM"):
            flags.check_native_compare_fail([expr])


def test_compare_fail_replaces_the_baseline_thresholds(tmp_path, capsys):
    base = str(write_run(make_run({KEY: {"median": 1e-3}}, path="b.json"), tmp_path / "b.json"))
    slow = make_run({KEY: {"median": 1.2e-3}}, path="slow.json")
    assert cli.compare_one(slow, Path(base), None).failed
    assert not cli.compare_one(slow, Path(base), None, time_threshold=0.3).failed
    assert "REGRESSIONS" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--benchmark-timer=time.process_time"], "--benchmark-timer is not supported"),
        (["--benchmark-compare-fail=median:5%"], "--benchmark-compare-fail needs --benchmark-compare"),
        (["--benchmark-disable", "--record"], "--benchmark-disable times nothing"),
        (["--benchmark-compare", "--benchmark-compare-fail=mean:5%"], "median:<percent>%"),
    ],
)
def test_cli_refuses_before_running_anything(argv, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu(monkeypatch, dict(H100))
    write_run(make_run({KEY: {"median": 1e-3}}), tmp_path / H100["slug"] / "baseline.json")
    assert cli.main([*argv, "--out", str(tmp_path / "out"), "--baselines", str(tmp_path)]) == 2
    assert message in capsys.readouterr().out


def test_record_without_cuda_is_refused_before_running_anything(monkeypatch, capsys, tmp_path):
    """A CI step that records baselines must not pass, having run the grid, on a runner without a GPU."""
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--repeat", "3", "--record", "--out", str(tmp_path / "out"), "--baselines", str(tmp_path)]) == 2
    assert "--record needs a CUDA GPU: baselines are per GPU" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_an_ab_without_cuda_is_refused_within_seconds(tmp_path):
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "attention.bench.perf", "--benchmark-compare=HEAD", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--benchmark-compare=HEAD needs a CUDA GPU" in done.stdout
    assert time.perf_counter() - start < 30  # torch's import dominates; no case ran
    assert not (tmp_path / "run-1.json").exists()


# -- the A/B through the CLI, with pytest replaced -------------------------------------------


@needs_history
def test_cli_ab_passes_the_revision_to_pytest_and_reads_the_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu(monkeypatch, dict(H100))
    seen = {}

    def fake_pytest(label, args, extra, out, cpu, limit, verdict):
        seen["extra"] = extra
        (out / "ab.json").write_text(json.dumps(verdict))
        (out / "summary.md").write_text("### Same-run A/B\n")
        return 0, make_run({KEY: {"median": 1e-3}})

    for verdict, status in (
        ({"failed": False, "counts": {"unchanged": 1}, "refused": []}, 0),
        ({"failed": True, "counts": {"regressed": 1}, "refused": []}, 1),
        ({"failed": True, "counts": {"error": 1}, "refused": [f"{KEY}: TypeError: x"]}, 2),
    ):
        monkeypatch.setattr(launcher, "pytest_run", lambda *a, v=verdict: fake_pytest(*a, v))
        out = tmp_path / f"out{status}"
        argv = ["--benchmark-compare=HEAD", "--benchmark-compare-fail=median:3%", "--out", str(out)]
        assert cli.main(argv) == status
        assert "--perf-compare-rev=HEAD" in seen["extra"] and f"--perf-ab-out={out}" in seen["extra"]
        assert "--perf-min-effect=0.03" in seen["extra"]
    assert "cannot build 1 case(s)" in capsys.readouterr().out


@needs_history
def test_cli_refuses_an_unknown_revision_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu(monkeypatch, dict(H100))
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    assert cli.main(["--benchmark-compare=no-such-branch-xyz", "--out", str(tmp_path)]) == 2
    assert "unknown git revision 'no-such-branch-xyz'" in capsys.readouterr().out


# -- interleaving ------------------------------------------------------------------------------


def test_ab_rounds_interleave_base_head_head_base(monkeypatch):
    order: list[str] = []
    sides = iter(["base", "head"])

    def prepare(fn, setup, w, opts, wall, *, sides_held=1, probe_into=None, **_):
        tag = next(sides)
        return runner.Prepared(lambda: order.append(tag), lambda: None, runner.EAGER, 1.0)

    monkeypatch.setattr(runner, "_prepare", prepare)
    monkeypatch.setattr(runner, "_rounds", lambda *a: 6)
    case = Workload("sdpa", 1, 16, 2, 8, torch.float32, "cpu")
    info = runner.run_ab_case(PedanticBenchmark(), case, registry.implementations(), runner.RunOptions("cpu"))
    timed = order[2:]  # one warm-up round first: base (untimed) and head
    assert order[:2] == ["base", "head"]
    assert timed == ["base", "head", "head", "base", "base", "head", "head", "base", "base", "head", "head", "base"]
    assert len(info["ab"]["data"]) == 6 and info["ab"]["order"] == "base-head-head-base"


def test_a_case_the_base_lacks_is_timed_on_head_only(monkeypatch):
    monkeypatch.setattr(runner, "_rounds", lambda *a: 5)
    case = Workload("sdpa", 1, 16, 2, 8, torch.float32, "cpu")
    info = runner.run_ab_case(PedanticBenchmark(), case, {}, runner.RunOptions("cpu", warmup=1))
    assert info["ab"] == {"base": None, "reason": "the base revision has no implementation 'sdpa'"}


def test_a_base_that_cannot_build_the_case_is_a_refusal_not_a_regression():
    class Broken(registry.get("sdpa")):
        def __init__(self, *args, **kwargs):
            raise TypeError("an older constructor")

    case = Workload("sdpa", 1, 16, 2, 8, torch.float32, "cpu")
    with pytest.raises(runner.BaseCannotBuild, match="TypeError: an older constructor"):
        runner.run_ab_case(PedanticBenchmark(), case, {"sdpa": Broken}, runner.RunOptions("cpu"))


# -- the base revision, for real ----------------------------------------------------------------


@needs_history
def test_base_revision_imports_another_copy_of_the_library_and_cleans_up():
    before = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    with BaseRevision("HEAD", registry.builtin_implementations(), cwd=ROOT) as base:
        impls = base.implementations
        assert set(registry.builtin_implementations()) <= set(impls) and base.not_compared == {}
        assert impls["sdpa"] is not registry.get("sdpa") and impls["sdpa"].__module__.startswith("attention_base_")
        (tree,) = base.trees.values()
        assert tree.is_dir() and base.label.startswith("HEAD = ") and base.only_in_base() == []
        assert base.head_label.startswith("working tree (")
    assert not tree.exists()
    assert not any(name.startswith("attention_base_") for name in sys.modules)
    after = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert after == before


@needs_history
def test_pytest_perf_gates_an_ab_on_cpu_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "-q", "--perf-device=cpu"]
    cmd += ["--perf-grid=tiny", "-k", "core-sdpa-fp32-fwd-B4-T64", "--perf-budget=0.02"]
    cmd += ["--perf-compare-rev=HEAD", f"--perf-ab-out={tmp_path}", "--perf-min-effect=0.5"]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same-run A/B" in done.stdout and "PASS" in done.stdout
    doc = json.loads((tmp_path / "ab.json").read_text())
    (verdict,) = doc["verdicts"]
    assert verdict["key"] == "core-sdpa-fp32-fwd-B4-T64-H4-D16" and verdict["status"] == "unchanged"
    assert verdict["interval"]["n_base"] >= 10 and verdict["min_effect"] == 0.5
    assert (tmp_path / "summary.md").read_text().startswith("### Same-run A/B `HEAD = ")
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "attention-ab" not in listed and "base-" not in listed


# -- runner noise: the GPU's state ---------------------------------------------------------------


def test_gpu_state_reads_throttle_reasons_and_other_processes(monkeypatch):
    answers = {
        "--query-gpu": "580.159.04, 1980, 1980, 1980, 41, 120.5, 0, 0x0000000000000024",
        "--query-gpu=uuid": "GPU-abc",
        "--query-compute-apps": "GPU-abc, 4242\nGPU-other, 77",
    }

    def smi(*args):
        if args[0] == "--query-gpu=uuid":
            return answers["--query-gpu=uuid"]
        return answers["--query-compute-apps" if args[0].startswith("--query-compute-apps") else "--query-gpu"]

    asked = []
    monkeypatch.setattr(machine, "_nvidia_smi", lambda *args: asked.append(args) or smi(*args))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="abc"))
    state = machine.gpu_state("cuda:0")
    assert asked[0][-2:] == ("-i", "GPU-abc")  # by UUID: nvidia-smi ignores CUDA_VISIBLE_DEVICES
    assert state["driver_version"] == "580.159.04" and state["temperature.gpu"] == "41"
    assert state["throttle_reasons"] == ["software power cap", "software thermal slowdown"]
    assert state["clocks_locked"] is False and state["other_processes"] == 1
    warnings = machine.noise_warnings(state, dict(state, throttle_reasons=[], other_processes=0))
    assert warnings == [
        "GPU throttling at the start: software power cap, software thermal slowdown",
        "1 other process(es) computing on this GPU at the start",
    ]
    assert machine.gpu_state("cpu") is None
    monkeypatch.setattr(machine, "_nvidia_smi", lambda *a: None)
    assert machine.gpu_state("cuda:0") is None


def test_saved_runs_are_compared_on_gpu_and_torch_minor_only(monkeypatch):
    from attention.bench.perf import plugin

    said = []
    session = type("Session", (), {"logger": type("Logger", (), {"warning": staticmethod(said.append)})})

    def compare(ours: dict, theirs: dict) -> list[str]:
        said.clear()
        plugin.pytest_benchmark_compare_machine_info(
            None, session, {machine.KEY: ours}, {"machine_info": {machine.KEY: theirs}}
        )
        return list(said)

    run = dict(H100, wall_s=80.0, copy_gbps=3001.0)
    assert compare(run, dict(run, wall_s=95.0, copy_gbps=2990.0, gpu_state={"start": {}})) == []
    (warning,) = compare(run, dict(run, torch_minor="2.15"))
    assert "torch_minor" in warning and "2.15" in warning


@needs_history
def test_a_base_revision_that_cannot_run_a_case_fails_the_gate_and_says_so(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "checkout", "-q", "-b", "broken"], check=True)
    sdpa = clone / "attention" / "sdpa.py"
    broken = "    def _attend(*args, **kwargs):\n        raise RuntimeError('broken base')\n\n    def _old_attend("
    sdpa.write_text(sdpa.read_text().replace("    def _attend(", broken, 1))
    subprocess.run([*git, "commit", "-q", "-am", "a base that cannot attend"], check=True)
    subprocess.run([*git, "checkout", "-q", "-"], check=True)
    cmd = [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "-q", "--perf-device=cpu"]
    cmd += ["--perf-grid=tiny", "-k", "core-sdpa-fp32-fwd-B4-T64", "--perf-budget=0.02"]
    cmd += ["--perf-compare-rev=broken", f"--perf-ab-out={tmp_path}"]
    env = dict(subprocess_env(), PYTHONPATH=str(clone))
    done = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:]
    doc = json.loads((tmp_path / "ab.json").read_text())
    assert doc["failed"] and any("cannot build it: RuntimeError: broken base" in r for r in doc["refused"])
    summary = (tmp_path / "summary.md").read_text()
    assert "could not build" in summary and "❌" in summary
    assert "REFUSED:" in done.stdout
