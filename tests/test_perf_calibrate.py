"""attention.bench.perf calibrate: gate-sized pairs, false alarms, power, the supported minimum effect,
the spin fit, the rotated timing of a case's variants, the plugin and the CLI (CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from attention.bench.perf import calibrate, calibration, cli, launcher, results, runner, spin
from attention.bench.perf.results import Record, load_run, parse_run, write_json
from attention.bench.workload import Workload

from .perf_support import H100, ROOT, PedanticBenchmark, make_raw, subprocess_env

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def variants(
    rng: np.random.Generator,
    *,
    rounds: int = 40,
    depth: int = 2,
    seconds: float = 1e-3,
    noise: float = 0.003,
    drift: float = 0.002,
    twin_offset: float = 0.0,
    levels: tuple[float, ...] = calibration.LEVELS,
    floor_s: float = 0.0,
) -> tuple[list[float], dict]:
    """A case's head samples and ``calibration`` block as :func:`.runner.run_calibration_case` records
    them: lognormal jitter per call, a drift shared by the round (rounds are interleaved), the
    twin ``twin_offset`` slower, each injected variant exactly its share slower."""
    n = rounds * depth
    shared = seconds * rng.lognormal(0.0, drift, n)

    def side(extra: float) -> list[float]:
        return (shared * (1 + extra) * rng.lognormal(0.0, noise, n)).tolist()

    injected = {}
    for lv in levels:
        target = lv * seconds
        entry = {"level": lv, "target_s": target, "cycles": None if target < floor_s else 1}
        if entry["cycles"] is not None:
            entry["data"] = side(twin_offset + lv)
        injected[f"{lv:g}"] = entry
    cal = {
        "gate_rounds": rounds,
        "depth": depth,
        "per_call_s": seconds,
        "twin": {"data": side(twin_offset), "timing_mode": results.GRAPH},
        "injected": injected,
    }
    return side(0.0), cal


def record(key: str, head: list[float], cal: dict, **info) -> Record:
    info = {"timing_mode": results.GRAPH, "kind": "prefill", "direction": "fwd", **info, "calibration": cal}
    return Record(key, float(np.median(head)), head, info)


def grid_of(rng, n: int, prefix: str = "core-sdpa-bf16-fwd", **kwargs) -> list[Record]:
    return [record(f"{prefix}-{i}", *variants(rng, **kwargs)) for i in range(n)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20250101)


# -- pairs, false alarms and power on synthetic samples --------------------------------------


def test_a_clear_injected_slowdown_is_always_caught_and_a_a_pairs_stay_under_alpha(rng):
    cal = calibration.analyze_records(grid_of(rng, 60), gpu="synthetic", alpha=0.01)
    (graph,) = cal.kinds.values()
    assert graph.kind == "graph fwd" and graph.cases == 60 and graph.aa_tests == 60 * 2 * 2
    # A/A: at the gate's own 2% nothing; at any minimum effect at most what a 1% rate allows,
    # within the binomial's 99.9% bound for 240 tests (seeded: the same draw every run).
    assert graph.flagged_configured == 0
    assert sum(c.aa_flagged(0.0) for c in cal.cases) <= 8
    assert graph.supported is not None and graph.flagged_supported <= math.floor(0.01 * graph.aa_tests)
    five = graph.levels[0.05]
    assert five.pairs == 120 and five.power_configured == 1.0 and five.power_supported == 1.0
    assert five.achieved_median == pytest.approx(0.05, abs=0.002)  # the measured share, not the nominal
    # 1% with 0.3% noise: invisible at the 2% minimum effect, caught at the supported one.
    one = graph.levels[0.01]
    assert one.power_configured == 0.0 and one.power_supported >= 0.9
    assert {t.ok for t in cal.targets()} == {True}


def test_power_grows_with_the_injected_share_and_noise_costs_power(rng):
    """Noise widens the intervals and costs power; it raises no false alarms (the interval's
    coverage holds whatever the noise), so the supported minimum effect stays where offsets put it."""
    quiet = calibration.analyze_records(grid_of(rng, 20, noise=0.002), gpu="g").overall
    noisy = calibration.analyze_records(grid_of(rng, 20, noise=0.03), gpu="g").overall
    powers = [noisy.levels[lv].power_supported for lv in calibration.LEVELS]
    assert powers == sorted(powers) and powers[0] < 0.5
    assert quiet.levels[0.01].power_supported > noisy.levels[0.01].power_supported
    assert noisy.predicted > 5 * quiet.predicted
    assert noisy.flagged_configured == 0 and noisy.supported <= 0.002


def test_a_twin_offset_is_a_false_alarm_and_raises_the_supported_min_effect(rng):
    cal = calibration.analyze_records(grid_of(rng, 30, twin_offset=0.03), gpu="g", alpha=0.01)
    s = cal.overall
    assert s.flagged_configured == 30 * 2  # one orientation of every run: A' over A
    assert s.supported == pytest.approx(0.03, abs=0.006) and s.no_alarm >= s.supported
    assert any("expect false alarms there" in w for w in cal.warnings)
    assert [t.ok for t in cal.targets() if t.what.startswith("false alarms")] == [False]


def test_pairs_are_consecutive_gate_sized_runs_in_both_orientations(rng):
    head, cal = variants(rng, rounds=20, depth=3, noise=0.001, drift=0.0)
    twin = np.asarray(cal["twin"]["data"])
    twin[20:40] *= 1.05  # the second run only: its A'/A test flags, A/A' does not
    cal["twin"]["data"] = twin.tolist()
    case = calibration.analyze_case("k", head, record("k", head, cal).info, min_effect=0.02)
    assert case.gate_rounds == 20 and case.depth == 3 and len(case.aa) == 6
    assert [iv.low > 1.02 for iv in case.aa] == [False, False, True, False, False, False]
    assert case.aa[0].level == 0.99 and "paired ratios" in case.aa[0].method  # the gate's own interval
    assert all(len(inj.pairs) == 3 for inj in case.injections.values())


def test_a_variant_cut_short_loses_its_incomplete_run_not_the_case(rng):
    """A run stopped mid-round has timed some variants once more than others: the case keeps every
    complete gate-sized run of each, and the achieved share pairs the rounds both have."""
    head, cal = variants(rng, rounds=20, depth=3, noise=0.001, drift=0.0)
    short = cal["injected"]["0.05"]
    short["data"] = short["data"][:45]  # two full runs and part of a third
    case = calibration.analyze_case("k", head, record("k", head, cal).info, min_effect=0.02)
    assert case.depth == 3 and len(case.aa) == 6
    assert len(case.injections[0.05].pairs) == 2 and len(case.injections[0.01].pairs) == 3
    assert case.injections[0.05].achieved == pytest.approx(0.05, abs=0.002)


def test_runs_shorter_than_the_gates_round_floor_are_noted(rng):
    """A run timed with fewer rounds a gate-sized run than the A/B gives every case (one recorded
    before the floor was raised, or with --benchmark-min-rounds below it) is judged, and says so."""
    short = calibration.analyze_records([record("short", *variants(rng, rounds=runner.MIN_ROUNDS - 1))], gpu="g")
    full = calibration.analyze_records([record("full", *variants(rng, rounds=runner.MIN_ROUNDS))], gpu="g")
    assert len(short.cases) == 1 and short.cases[0].depth == 2
    assert [w for w in short.warnings if "floor" in w] == [
        f"short: gate-sized runs of {runner.MIN_ROUNDS - 1} rounds, fewer than the A/B's floor of "
        f"{runner.MIN_ROUNDS}: its intervals are wider than the gate's (re-time it with calibrate)"
    ]
    assert not [w for w in full.warnings if "floor" in w]


def test_levels_below_the_spin_floor_are_listed_not_timed(rng):
    records = grid_of(rng, 4, seconds=50e-6, floor_s=2e-6, prefix="decode")  # 1% and 2% of 50 us: below
    cal = calibration.analyze_records(records, gpu="g", pairs_wanted=16)
    s = cal.overall
    assert s.levels[0.01].not_injected == 4 and s.levels[0.01].pairs == 0 and s.levels[0.05].pairs == 8
    assert "below the spin's floor" in cal.cases[0].injections[0.02].reason
    _, rows = calibration.power_rows(cal)
    assert "too short (4)" in rows[0][1] and "n=8" in rows[0][4]
    assert calibration.to_json(cal)["cases"][0]["injected"]["0.01"]["pairs"] == []


def test_kinds_pool_by_how_cases_were_timed_and_records_without_samples_are_listed(rng):
    records = grid_of(rng, 3)
    records += [record(f"decode-{i}", *variants(rng), kind="decode") for i in range(2)]
    records += [record(f"bwd-{i}", *variants(rng), direction="fwd+bwd", timing_mode=runner.EAGER) for i in range(2)]
    records.append(Record("plain", 1e-3, [1e-3] * 10, {"timing_mode": results.GRAPH}))
    cal = calibration.analyze_records(records, gpu="g", not_calibrated=[("gone", "skipped: too big")])
    assert list(cal.kinds) == ["graph fwd", "graph decode", "eager fwd+bwd"]
    assert [s.cases for s in cal.kinds.values()] == [3, 2, 2] and cal.overall.cases == 7
    assert dict(cal.not_calibrated) == {"gone": "skipped: too big", "plain": "no calibration samples (not timed by "
                                                                            "a calibrate run)"}  # fmt: skip
    fewer = [w for w in cal.warnings if "fewer than 100" in w]
    assert len(fewer) == 3 and all(t.ok is None for t in cal.targets() if t.what.startswith("false alarms"))


def test_a_kind_short_of_tests_is_told_how_to_get_more_and_fallbacks_are_named(rng):
    """Depths are planned for the kind a case is timed as if it captures: cases that fell back to eager
    ran at that depth, so --max-depth is no advice for them; selecting them alone is."""
    records = [record("fell-back", *variants(rng), timing_mode=runner.TOO_LARGE_TO_CAPTURE)]
    records.append(record("plain-eager", *variants(rng), direction="fwd+bwd", timing_mode=runner.EAGER))
    cal = calibration.analyze_records(records, gpu="g")
    fewer = {w.split(":")[0]: w for w in cal.warnings if "fewer than 100" in w}
    assert "1 of its cases fell back from graph capture" in fewer["eager fwd"] and "fell-back" in fewer["eager fwd"]
    assert "--max-depth" not in fewer["eager fwd"]
    assert "raise --max-depth" in fewer["eager fwd+bwd"]


def test_min_effects_per_case_come_from_the_patterns(rng):
    from attention.bench.perf import ab

    effects = ab.MinEffects(0.02, (("*-flex-fp32-*", 0.10),))
    records = grid_of(rng, 2, prefix="core-flex-fp32-fwd") + grid_of(rng, 2, prefix="core-sdpa-fp32-fwd")
    cal = calibration.analyze_records(records, gpu="g", min_effects=effects)
    assert sorted(c.min_effect for c in cal.cases) == [0.02, 0.02, 0.10, 0.10]
    assert {c.key: c.caught(0.05) for c in cal.cases if "flex" in c.key} == dict.fromkeys(
        ("core-flex-fp32-fwd-0", "core-flex-fp32-fwd-1"), 0
    )


def test_supported_min_effect_allows_floor_alpha_n_alarms():
    assert calibration.supported_min_effect([], 0.01) is None
    assert calibration.supported_min_effect([-0.01] * 100, 0.01) == 0.0
    excess = [0.0123, 0.0031, 0.0004] + [-0.002] * 97
    assert calibration.supported_min_effect(excess, 0.01) == pytest.approx(0.004)  # one alarm of 100 allowed
    assert calibration.supported_min_effect(excess, 0.02) == pytest.approx(0.001)
    assert calibration.supported_min_effect(excess, 0.0) == pytest.approx(0.013)
    assert calibration.supported_min_effect([0.003], 0.01) == pytest.approx(0.003)  # on the step: not flagged


def test_rate_upper_bound_is_clopper_pearson():
    assert calibration.rate_upper_bound(0, 0) is None and calibration.rate_upper_bound(5, 5) == 1.0
    assert calibration.rate_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in ((1, 100), (3, 250), (10, 40)):
        assert calibration.rate_upper_bound(k, n) == pytest.approx(scipy_stats.beta.ppf(0.95, k + 1, n - k), rel=1e-7)


def test_depth_brings_every_kind_to_the_pairs_wanted():
    assert calibration.depth_for(111, 100, 8) == 1
    assert calibration.depth_for(40, 100, 8) == 2
    assert calibration.depth_for(3, 100, 8) == 8 and calibration.depth_for(0, 100, 8) == 8
    kind = calibration.predicted_kind
    assert kind(decode=False, backward=False, graphs="fwd", cuda=True) == "graph fwd"
    assert kind(decode=False, backward=True, graphs="fwd", cuda=True) == "eager fwd+bwd"
    assert kind(decode=False, backward=True, graphs="all", cuda=True) == "graph fwd+bwd"
    assert kind(decode=True, backward=False, graphs="fwd", cuda=False) == "eager decode"
    assert calibration.kind_of({"timing_mode": runner.CAPTURE_FAILED, "kind": "mask"}) == "eager fwd"


def test_outputs_json_markdown_plot_and_last_lines(tmp_path, rng, capsys):
    cal = calibration.analyze_records(grid_of(rng, 8), gpu="NVIDIA H100 80GB HBM3", pairs_wanted=20)
    written = calibration.write_outputs(cal, tmp_path)
    assert sorted(p.name for p in written) == sorted(calibration.FILES)
    assert (tmp_path / "calibration.png").read_bytes()[:8] == PNG_SIGNATURE
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert doc["alpha"] == 0.01 and doc["levels"] == list(calibration.LEVELS) and len(doc["cases"]) == 8
    kind = doc["kinds"]["graph fwd"]
    assert kind["aa_tests"] == 32 and set(kind["power"]) == {"0.01", "0.02", "0.03", "0.05"}
    assert kind["power"]["0.05"]["power_at_configured"] == 1.0 and kind["false_alarm_upper_bound_95"] > 0
    assert len(doc["cases"][0]["aa"][0]) == 3 and doc["cases"][0]["injected"]["0.05"]["achieved"] > 0.04
    md = (tmp_path / "calibration.md").read_text()
    assert md.startswith("### A/B gate calibration on NVIDIA H100") and "| graph fwd |" in md and "<details>" in md
    calibration.print_tables(cal)
    out = capsys.readouterr().out
    assert "graph fwd" in out and out.rstrip().splitlines()[-1].startswith(
        "NVIDIA H100 80GB HBM3: the A/B gate supports a minimum effect of"
    )


# -- the spin ------------------------------------------------------------------------------------


def test_spin_fit_recovers_floor_and_rate_and_refuses_a_dead_clock():
    truth = spin.SpinFit("cuda", floor_s=1.5e-6, s_per_cycle=5e-10)
    overhead = 4e-6  # the region's own cost: cancels between spin counts
    measured = [(c, n, overhead + n * truth.seconds(c)) for c in spin.FIT_CYCLES for n in spin.FIT_COUNTS]
    fitted = spin.fit(measured, "cuda")
    assert fitted.floor_s == pytest.approx(1.5e-6, rel=1e-6) and fitted.s_per_cycle == pytest.approx(5e-10)
    assert fitted.cycles(1e-6) is None and fitted.cycles(1.5e-6) == 0
    assert fitted.seconds(fitted.cycles(20e-6)) == pytest.approx(20e-6, rel=1e-4)
    with pytest.raises(ValueError, match="did not tick"):
        spin.fit([(c, n, overhead) for c in spin.FIT_CYCLES for n in spin.FIT_COUNTS], "cuda")
    with pytest.raises(ValueError, match="one spin count"):
        spin.fit([(0, 1, 1e-6), (10, 1, 2e-6)], "cuda")


def test_cpu_spin_adds_at_least_its_nanoseconds():
    import time

    work = spin.work(spin.CPU_FIT, spin.CPU_FIT.cycles(2e-3))
    start = time.perf_counter()
    work()
    assert time.perf_counter() - start >= 2e-3
    assert spin.for_device("cpu") is spin.CPU_FIT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA spin fit needs a CUDA GPU")
def test_cuda_spin_fit_on_this_gpu():
    fitted = spin.measure_cuda("cuda")
    assert 0 <= fitted.floor_s < 50e-6 and 1e-10 < fitted.s_per_cycle < 1e-8


# -- the rotated timing of one case's variants -----------------------------------------------


def test_calibration_case_rotates_head_twin_and_injected_variants(monkeypatch):
    order: list[str] = []
    tags = iter(["twin", "head"])  # prepared in this order

    def prepare(fn, setup, w, opts, wall, *, sides=1, probe_into=None):
        tag = next(tags)
        return runner.Prepared(lambda: order.append(tag), lambda: None, results.GRAPH, 1.0)

    monkeypatch.setattr(runner, "_prepare", prepare)
    monkeypatch.setattr(runner, "_per_call", lambda *a: 1e-3)
    monkeypatch.setattr(runner, "_rounds_for", lambda per_call, opts: 3)
    fit = spin.SpinFit("cpu", floor_s=15e-6, s_per_cycle=1e-9)  # 1% of 1 ms is below the floor
    monkeypatch.setattr(spin, "work", lambda f, cycles: lambda: order.append(f"spin{cycles}"))
    case = Workload("sdpa", 1, 16, 2, 8, torch.float32, "cpu")
    info = runner.run_calibration_case(
        PedanticBenchmark(), case, runner.RunOptions("cpu"), depth=2, spin_fit=fit, levels=(0.01, 0.02)
    )
    cal = info["calibration"]
    assert cal["gate_rounds"] == 3 and cal["depth"] == 2 and len(cal["twin"]["data"]) == 6
    assert cal["injected"]["0.01"]["cycles"] is None and "data" not in cal["injected"]["0.01"]
    assert cal["injected"]["0.02"]["cycles"] == 5000 and len(cal["injected"]["0.02"]["data"]) == 6
    assert cal["injected"]["0.02"]["expected_s"] == pytest.approx(20e-6)
    # warm-up: twin and injected untimed, then head; then rounds of [twin, +2%, head] rotated
    assert order[:4] == ["twin", "twin", "spin5000", "head"]
    rotated = [["twin", "twin", "spin5000", "head"], ["twin", "spin5000", "head", "twin"]]
    rotated.append(["head", "twin", "twin", "spin5000"])
    assert order[4:] == [tag for r in rotated * 2 for tag in r]


# -- the plugin and the CLI ------------------------------------------------------------------


@pytest.mark.attention_costly  # pytest and CLI processes of its own, seconds each: started first under -n
def test_pytest_perf_calibrates_on_cpu_and_the_cli_judges_the_run(tmp_path):
    run_json = tmp_path / "calibration-run.json"
    cmd = [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "-q", "--perf-device=cpu"]
    cmd += ["--perf-grid=tiny", "-k", "core-sdpa-fp32-fwd-B4-T64 or decode-sdpa", "--perf-budget=0.002"]
    cmd += [
        "--perf-calibrate",
        "--perf-calibrate-pairs=8",
        "--perf-calibrate-max-depth=3",
    ]  # 1 case a kind: 4 runs, capped
    cmd += [f"--benchmark-json={run_json}"]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = load_run(run_json)
    assert run.machine["calibration"]["spin"]["device"] == "cpu" and run.machine["calibration"]["pairs"] == 8
    for rec in run.records.values():
        cal = rec.info["calibration"]
        assert cal["depth"] == 3 and len(rec.data) == 3 * cal["gate_rounds"] == len(cal["twin"]["data"])
        assert all(len(e["data"]) == len(rec.data) for e in cal["injected"].values())
    done = subprocess.run(
        [sys.executable, "-m", "attention.bench.perf", "calibrate", "--from", str(run_json), "--alpha", "0.05"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} >= set(calibration.FILES)
    assert json.loads((tmp_path / "calibration.json").read_text())["alpha"] == 0.05
    assert "supports a minimum effect of" in done.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--benchmark-disable", "--perf-calibrate times each case's variants side by side; --benchmark-disable"),
        ("--benchmark-min-rounds=5", "--benchmark-min-rounds=5: --perf-calibrate pairs the rounds of its sides"),
    ],
)
def test_pytest_refuses_a_calibration_that_would_time_nothing_or_too_little(flag, message):
    cmd = [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "-q", "--perf-device=cpu"]
    cmd += ["--perf-grid=tiny", "--perf-calibrate", flag]
    done = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 4 and message in done.stderr, done.stderr[-2000:]


def test_calibrate_without_cuda_is_exit_2_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    assert cli.main(["calibrate", "--out", str(tmp_path), "-k", "sdpa"]) == 2
    assert "calibrate measures the A/B gate on a CUDA GPU and needs one; none here" in capsys.readouterr().out


def test_calibrate_from_a_run_that_is_no_calibration_is_refused_writing_nothing(tmp_path, capsys):
    plain = tmp_path / "run-1.json"
    write_json(make_raw({"core-sdpa-bf16-fwd-B1-T1024-H16-D64": {"median": 1e-3}}), plain)
    assert cli.main(["calibrate", "--from", str(plain)]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"ERROR: no case was calibrated in {plain}: core-sdpa-bf16-fwd-"), out
    assert out.rstrip().endswith(": no calibration samples (not timed by a calibrate run)"), out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-1.json"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alpha", "0.7"], "--alpha must be in (0, 0.5)"),
        (["--pairs", "0"], "--pairs and --max-depth must be >= 1"),
        (["--benchmark-compare=main"], "calibrate measures the A/B gate itself and compares nothing"),
        (["--gpus", "2"], "calibrate measures the A/B gate itself"),
        (["--benchmark-timer=x"], "--benchmark-timer is not supported"),
        (["--min-effects", "missing.json"], "--min-effects"),
    ],
)
def test_calibrate_refuses_before_running_anything(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launcher, "pytest_run", lambda *a, **k: pytest.fail("a case ran"))
    assert cli.main(["calibrate", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().out


def test_calibrate_runs_pytest_with_the_calibration_and_reports(tmp_path, monkeypatch, capsys, rng):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    def fake_pytest(label, args, extra, out, cpu, limit):
        seen.update(label=label, extra=extra, cpu=cpu, limit=limit)
        raw = make_raw({}, dict(H100, calibration={"pairs": 8}))
        for rec in grid_of(rng, 3):
            raw["benchmarks"].append(
                {
                    "name": rec.key,
                    "group": "g",
                    "extra_info": rec.info,
                    "stats": {"median": rec.median, "data": rec.data},
                }
            )
        write_json(raw, out / f"{label}.json")
        (out / "cases.jsonl").write_text(
            json.dumps({"run": label, "case": "big", "status": "skipped", "reason": "needs ~90 GiB"}) + "\n"
        )
        return 1, parse_run(raw, out / f"{label}.json")

    monkeypatch.setattr(launcher, "pytest_run", fake_pytest)
    (tmp_path / "calibration.json").write_text("stale")
    argv = ["calibrate", "--out", str(tmp_path), "--pairs", "8", "--time-budget", "600", "-k", "sdpa", "--impl", "sdpa"]
    assert cli.main(argv) == 1  # a case failed in pytest: the others are still calibrated
    assert seen["label"] == calibrate.RUN_LABEL and not seen["cpu"] and seen["limit"] == 600
    assert seen["extra"][:2] == ["-k", "sdpa"] and "--perf-impl=sdpa" in seen["extra"]
    assert {"--perf-calibrate", "--perf-calibrate-pairs=8", "--perf-calibrate-max-depth=8"} <= set(seen["extra"])
    doc = json.loads((tmp_path / "calibration.json").read_text())
    assert doc["gpu"] == H100["gpu_name"] and doc["not_calibrated"] == [
        {"key": "big", "reason": "skipped: needs ~90 GiB"}
    ]
    out = capsys.readouterr().out
    assert "NOT CALIBRATED: big: skipped: needs ~90 GiB" in out
    *_, supported, why = out.rstrip().splitlines()
    assert supported.startswith(f"{H100['gpu_name']}: the A/B gate supports a minimum effect")
    assert why == f"FAIL: {calibrate.RUN_LABEL}: a case failed (pytest exit 1); its error is in the pytest output above"


def test_calibrate_refused_by_pytest_keeps_the_last_calibration(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    last = {name: f"the last calibration's {name}\n" for name in ("calibration.json", "cases.jsonl", "pytest.log")}
    for name, text in last.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(launcher, "pytest_run", lambda *_: (launcher.USAGE_ERROR, None))
    assert cli.main(["calibrate", "--out", str(tmp_path), "--no-such-flag"]) == 2
    assert "pytest refused its arguments (exit 4, a usage error)" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == last


def test_calibrate_reads_pytests_grid_as_its_own_and_refuses_two(capsys):
    assert cli.main(["calibrate", "--grid", "tiny", "--perf-grid=quick"]) == 2
    assert "two grids named (quick, tiny): give one, with --grid" in capsys.readouterr().out
