"""attention.bench.perf.compare: regression, improvement and memory verdicts; thresholds from spread (CPU)."""

from __future__ import annotations

import json

import pytest

from attention.bench.perf import ab
from attention.bench.perf import compare as cmp
from attention.bench.perf.results import merge_runs

from .perf_support import ROOT, case_info, make_run, samples

EAGER = "eager: includes dispatch"

A, B, C = "core-sdpa-bf16-fwd-B4-T4096-H32-D64", "core-flex-bf16-fwd-B4-T4096-H32-D64", "decode-sdpa-bf16-B8-N4096"


def base_cases(**overrides):
    cases = {
        A: {"median": 1.0e-3},
        B: {"median": 2.0e-3, "family": "flex", "impl": "flex", "flex_path": "fused", "sdpa_backend": None},
        C: {"median": 1.0e-4, "kind": "decode"},
    }
    for key, change in overrides.items():
        cases[key] = dict(cases[key], **change)
    return cases


def test_identical_runs_pass():
    result = cmp.compare(make_run(base_cases()), make_run(base_cases()))
    assert not result.failed and result.compared == 3 and not result.improvements


def test_planted_slowdown_is_flagged_by_name():
    slow = base_cases(**{B: {"median": 2.36e-3, "data": samples(2.36e-3, seed=5)}})  # +18%
    result = cmp.compare(make_run(base_cases()), make_run(slow))
    assert result.failed
    assert [v.key for v in result.regressions] == [B] and result.regressions[0].kind == "slower"
    assert "1.18x" in result.regressions[0].message


def test_slowdown_within_threshold_passes():
    result = cmp.compare(make_run(base_cases()), make_run(base_cases(**{A: {"median": 1.07e-3}})))
    assert not result.failed


def test_large_but_insignificant_shift_is_noise():
    pytest.importorskip("scipy")
    noisy_base = base_cases(**{A: {"median": 1.0e-3, "data": samples(1.0e-3, noise=0.9, n=5, seed=1)}})
    noisy_now = base_cases(**{A: {"median": 1.2e-3, "data": samples(1.0e-3, noise=0.9, n=5, seed=2)}})
    result = cmp.compare(make_run(noisy_base), make_run(noisy_now))
    assert not result.regressions
    assert any(v.kind == "slower_not_significant" for v in result.notes)


def test_improvement_is_reported_not_failed():
    result = cmp.compare(make_run(base_cases()), make_run(base_cases(**{A: {"median": 0.7e-3}})))
    assert not result.failed and [v.key for v in result.improvements] == [A]
    assert "refresh the baseline" in cmp.format_comparison(result, make_run(base_cases()), make_run(base_cases()))


def test_memory_doubling_is_a_regression_and_small_noise_is_not():
    doubled = cmp.compare(make_run(base_cases()), make_run(base_cases(**{A: {"peak_mem_mib": 128.0}})))
    assert [(v.key, v.kind) for v in doubled.regressions] == [(A, "memory_up")]
    jitter = cmp.compare(make_run(base_cases()), make_run(base_cases(**{A: {"peak_mem_mib": 70.0}})))
    assert not jitter.failed


def test_timing_mode_change_is_not_compared():
    changed = base_cases(**{A: {"timing_mode": "eager: includes dispatch", "median": 5e-3}})
    result = cmp.compare(make_run(base_cases()), make_run(changed))
    assert not result.regressions and [v.kind for v in result.notes] == ["timing_mode_changed"]


def test_missing_and_new_cases_are_listed():
    current = base_cases()
    del current[C]
    current["new-case"] = {"median": 1e-3}
    result = cmp.compare(make_run(base_cases()), make_run(current))
    assert result.missing == [C] and result.new == ["new-case"] and not result.failed


def test_guard_failures_in_the_run_fail_the_comparison():
    broken = base_cases(**{A: {"sdpa_backend": "math"}})
    result = cmp.compare(make_run(base_cases()), make_run(broken))
    assert result.failed and result.guard_failures[0].key == A and "math" in result.guard_failures[0].message


def test_threshold_resolution_case_pattern_default_and_floor():
    t = cmp.load_thresholds(None)
    t["patterns"] = [{"match": "decode-*", "time": 0.2}]
    t["cases"] = {A: {"time": 0.01}}
    assert cmp.threshold_for(t, C)["time"] == 0.2
    assert cmp.threshold_for(t, A)["time"] == t["floor"]  # never below the floor
    assert cmp.threshold_for(t, B)["time"] == t["default"]["time"]


def test_thresholds_file_errors_are_clear(tmp_path):
    bad = tmp_path / "thresholds.json"
    bad.write_text("{not json")
    with pytest.raises(cmp.BadResultFile, match="thresholds"):
        cmp.load_thresholds(bad)
    assert cmp.load_thresholds(tmp_path / "absent.json")["default"]["time"] == 0.10


def test_thresholds_from_spread():
    runs = [make_run(base_cases(**{A: {"median": m}, B: {"median": 2e-3}})) for m in (1.0e-3, 1.03e-3, 0.99e-3)]
    t = cmp.thresholds_from_spread(runs, k=3.0, floor=0.05)
    assert t["cases"][A]["time"] == pytest.approx(3 * 0.03, abs=1e-3)  # worst run 3% off the middle
    assert t["cases"][B]["time"] == 0.05
    assert t["measured"]["runs"] == 3 and t["default"]["time"] >= 0.05
    assert "too noisy" in cmp.format_spread(t)
    with pytest.raises(ValueError):
        cmp.spread(runs[:1])


def test_thresholds_from_spread_never_go_below_a_cases_min_effect():
    # A case steady over these runs but known to move between compilations keeps its floor.
    runs = [make_run(base_cases(**{A: {"median": m}, B: {"median": 2e-3}})) for m in (1.0e-3, 1.03e-3, 0.99e-3)]
    floors = ab.MinEffects(0.02, ((B, 0.12),))
    t = cmp.thresholds_from_spread(runs, k=3.0, floor=0.05, min_effect=floors.for_case)
    assert t["cases"][B]["time"] == 0.12  # its spread alone gives the 5% floor
    assert t["cases"][A]["time"] == pytest.approx(3 * 0.03, abs=1e-3)  # the spread already exceeds 2%


def test_case_kind_parts_eager_from_graph_timed_and_direction_from_direction():
    assert cmp.case_kind(case_info(A)) == "sdpa bf16 fwd graph"
    assert cmp.case_kind(case_info(A, direction="fwd+bwd", timing_mode=EAGER)) == "sdpa bf16 fwd+bwd eager"
    failed = case_info(B, family="flex", dtype="fp32", timing_mode=f"{EAGER} (graph capture failed)")
    assert cmp.case_kind(failed) == "flex fp32 fwd eager"


def spread_runs(devs: dict[str, tuple[float, dict]]) -> list:
    """Three runs in which case ``key`` sits at 1 ms, 1 ms x (1 - dev) and 1 ms x (1 + dev): its
    max deviation from the middle run is ``dev`` exactly."""
    return [
        make_run({key: {"median": 1e-3 * (1 + sign * dev), **info} for key, (dev, info) in devs.items()}, path=f"r{i}")
        for i, sign in enumerate((0, -1, 1))
    ]


def test_a_steady_case_gets_its_kinds_floor_and_a_graph_timed_case_never_an_eager_one():
    eager = {"direction": "fwd+bwd", "timing_mode": EAGER}
    runs = spread_runs(
        {
            "bwd-T1k": (0.005, eager),  # steady in these runs, its kind is not
            "bwd-T4k": (0.03, eager),
            "bwd-T16k": (0.04, eager),
            "fwd-T1k": (0.005, {}),
            "fwd-T4k": (0.008, {}),
            "fwd-T16k": (0.01, {}),
        }
    )
    t = cmp.thresholds_from_spread(runs, k=3.0, floor=0.05)
    assert t["measured"]["kinds"] == {
        "sdpa bf16 fwd graph": {"time": 0.024, "cases": 3, "median_dev": 0.008},
        "sdpa bf16 fwd+bwd eager": {"time": 0.09, "cases": 3, "median_dev": 0.03},
    }
    assert t["cases"]["bwd-T1k"]["time"] == 0.09  # 3 x its kind's median spread, not the 5% floor
    assert t["cases"]["bwd-T16k"]["time"] == pytest.approx(0.12)  # its own spread is larger
    assert {t["cases"][f"fwd-T{n}"]["time"] for n in ("1k", "4k", "16k")} == {0.05}
    assert "Kind floors (3.0 x the median deviation" in cmp.format_spread(t)


def test_a_kind_of_too_few_cases_sets_no_floor():
    eager = {"direction": "fwd+bwd", "timing_mode": EAGER}
    runs = spread_runs({"bwd-T1k": (0.005, eager), "bwd-T4k": (0.04, eager)})
    t = cmp.thresholds_from_spread(runs, k=3.0, floor=0.05)
    assert cmp.MIN_KIND_CASES == 3 and t["measured"]["kinds"] == {}
    assert t["cases"]["bwd-T1k"]["time"] == 0.05


@pytest.mark.parametrize("gpu", sorted(p.name for p in (ROOT / "perf" / "baselines").iterdir()))
def test_committed_thresholds_hold_each_case_to_its_kinds_floor_and_min_effect(gpu):
    folder = ROOT / "perf" / "baselines" / gpu
    thresholds = json.loads((folder / "thresholds.json").read_text())
    baseline = json.loads((folder / "baseline.json").read_text())
    kinds = {b["extra_info"]["case"]: cmp.case_kind(b["extra_info"]) for b in baseline["benchmarks"]}
    floors = thresholds["measured"]["kinds"]
    effects = ab.load_min_effects(ab.MIN_EFFECTS_FILE)
    for key, entry in thresholds["cases"].items():
        assert entry["time"] >= floors.get(kinds[key], {}).get("time", 0.0), key
        assert entry["time"] >= effects.for_case(key), key
    derived = cmp.derive_thresholds(thresholds["measured"]["spread"], kinds, k=thresholds["measured"]["k"])
    assert floors == derived["measured"]["kinds"]  # the floors are the rule's, from the recorded spread


def test_merge_takes_the_middle_run_of_each_case():
    runs = [make_run(base_cases(**{A: {"median": m}}), path=f"r{i}") for i, m in enumerate((3e-3, 1e-3, 2e-3))]
    merged = merge_runs(runs)
    assert merged.records[A].median == 2e-3 and merged.machine["merged_from"] == 3
    assert len(merged.raw["benchmarks"]) == 3


def test_spread_counts_cases_a_cut_run_missed():
    full = [make_run(base_cases(**{A: {"median": m}})) for m in (1.0e-3, 1.02e-3)]
    cut = make_run({k: v for k, v in base_cases(**{A: {"median": 0.98e-3}}).items() if k != C})  # stopped before C
    per_case = cmp.spread([cut, *full])
    assert per_case[A]["runs"] == 3 and per_case[C]["runs"] == 2
    only_one = make_run({A: {"median": 1e-3}, "core-new-case": {"median": 1e-3}})
    assert "core-new-case" not in cmp.spread([only_one, full[0]])  # one sample is no spread


def test_a_missing_scipy_is_said_in_the_verdict(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    base = make_run({"core-sdpa-bf16-fwd-B4-T4096-H32-D64": {"median": 1e-3, "data": samples(1e-3)}})
    result = cmp.compare(base, base)
    assert any("scipy is not installed" in w for w in result.warnings)


def test_a_slowdown_with_too_few_samples_to_test_is_judged_on_the_ratio():
    """Four rounds a side cannot reach p < 0.01 (the exact test's floor is 1/70); the ratio decides
    instead of every such slowdown being called noise."""
    pytest.importorskip("scipy")
    base = base_cases(**{A: {"median": 1.0e-3, "data": samples(1.0e-3, n=4, seed=1)}})
    slow = base_cases(**{A: {"median": 2.0e-3, "data": samples(2.0e-3, n=4, seed=2)}})
    result = cmp.compare(make_run(base), make_run(slow))
    assert [(v.key, v.kind) for v in result.regressions] == [(A, "slower")]
    assert "p=" not in result.regressions[0].message
