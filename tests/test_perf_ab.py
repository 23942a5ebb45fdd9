"""attention.bench.perf.ab: same-run A/B intervals, verdicts, min-effect files and reports (CPU)."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest

from attention.bench.perf import ab

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OK = {"match": "a*", "min_effect": 0.01}


def timings(rng: np.random.Generator, n: int = 60, scale: float = 1.0, sigma: float = 0.005) -> list[float]:
    """Kernel-like round times: lognormal jitter around ``scale`` ms, 5% of rounds a few % slow."""
    x = scale * 1e-3 * rng.lognormal(0.0, sigma, n)
    slow = rng.random(n) < 0.05
    x[slow] *= 1 + rng.exponential(0.05, slow.sum())
    return x.tolist()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_slowdown_is_regressed(rng):
    v = ab.judge("case", timings(rng), timings(rng, scale=1.03))
    iv = v.interval
    assert v.status == "regressed" and v.failed
    assert iv.low <= iv.ratio <= iv.high and iv.low <= 1.03 <= iv.high
    assert iv.ratio == pytest.approx(1.03, abs=0.005)
    assert iv.level == ab.DEFAULT_LEVEL and (iv.n_base, iv.n_head) == (60, 60)
    assert "paired ratios" in iv.method and "1.03" in v.message and "could detect ±" in v.message


def test_speedup_is_improved(rng):
    v = ab.judge("case", timings(rng), timings(rng, scale=0.97))
    assert v.status == "improved" and not v.failed
    assert v.interval.high < 1 - ab.DEFAULT_MIN_EFFECT
    assert v.interval.ratio == pytest.approx(0.97, abs=0.005)


def test_a_a_pairs_are_never_flagged(rng):
    verdicts = [ab.judge(f"aa-{i}", timings(rng), timings(rng)) for i in range(200)]
    assert [v.key for v in verdicts if v.status != "unchanged"] == []
    # The interval itself is calibrated: at 99% about 2 of 200 A/A intervals miss 1 (min_effect aside).
    misses = sum(not v.interval.low <= 1 <= v.interval.high for v in verdicts)
    assert misses <= 8


def test_interval_narrows_with_samples_and_detectable_is_its_half_width(rng):
    few = ab.ratio_interval(timings(rng, 15), timings(rng, 15))
    many = ab.ratio_interval(timings(rng, 240), timings(rng, 240))
    assert many.high - many.low < (few.high - few.low) / 2
    for iv in (few, many):
        assert 0 < (iv.high - iv.low) / 2 <= iv.detectable <= iv.high - iv.low
    assert many.detectable < 0.005  # 0.5% noise, 240 rounds: sub-0.5% resolution


def test_interval_is_deterministic_and_pairs_the_rounds(rng):
    """Round i of base goes with round i of head: under a clock that moves both (a 4% ramp over
    the run), the pairs give a narrow interval; the same rounds paired at random a wide one."""
    ramp = np.linspace(0.96, 1.04, 60)  # (rounds,)
    base = (np.array(timings(rng)) * ramp).tolist()
    head = (np.array(timings(rng)) * ramp).tolist()
    iv = ab.ratio_interval(base, head)
    assert ab.ratio_interval(base, head) == iv
    order = rng.permutation(len(base))
    together = ab.ratio_interval([base[i] for i in order], [head[i] for i in order])
    assert (together.ratio, together.low, together.high) == pytest.approx((iv.ratio, iv.low, iv.high))
    apart = ab.ratio_interval(base, [head[i] for i in order])
    assert apart.detectable > 2 * iv.detectable


def test_memory_regression_fails_an_unchanged_case(rng):
    base, head = timings(rng), timings(rng)
    v = ab.judge("case", base, head, base_peak_mib=64.0, head_peak_mib=128.0)
    assert v.status == "unchanged" and v.memory_status == "regressed" and v.failed
    assert "peak 64 -> 128 MiB" in v.message
    assert ab.judge("c", base, head, base_peak_mib=64.0, head_peak_mib=80.0).memory_status == "unchanged"  # slack
    assert ab.judge("c", base, head, base_peak_mib=128.0, head_peak_mib=64.0).memory_status == "improved"
    assert ab.judge("c", base, head, base_peak_mib=None, head_peak_mib=64.0).memory_status == "unknown"


def test_one_sided_cases_are_listed_not_failed(rng):
    assert ab.judge("gone", timings(rng), None).status == "base_only"
    new = ab.judge("new", None, timings(rng))
    assert new.status == "head_only" and new.interval is None and not new.failed
    with pytest.raises(ValueError, match="either side"):
        ab.judge("none", None, None)


@pytest.mark.parametrize(
    ("base", "head", "match"),
    [
        ([1.0] * 4, [1.0] * 10, r"base has 4 samples and head 10"),
        ([1.0] * 10, [1.0] * 9 + [float("nan")], r"head sample 9 is nan"),
        ([1.0] * 10, [0.0] + [1.0] * 9, r"head sample 0 is 0\.0"),
        ([1.0, -2.0] + [1.0] * 8, [1.0] * 10, r"base sample 1 is -2\.0"),
        ([1.0] * 9 + [float("inf")], [1.0] * 10, r"base sample 9 is inf"),
    ],
)
def test_bad_samples_name_the_side(base, head, match):
    with pytest.raises(ValueError, match=match):
        ab.ratio_interval(base, head)
    v = ab.judge("case", base, head)  # one broken case does not abort the report
    assert v.status == "error" and v.failed and v.interval is None
    assert "base" in v.message or "head" in v.message


def write(tmp_path, doc) -> str:
    path = tmp_path / "min_effects.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_min_effects_first_pattern_wins_else_default(tmp_path):
    doc = {
        "version": 1,
        "default": 0.025,
        "patterns": [{"match": "decode-*-B1-*", "min_effect": 0.05}, {"match": "decode-*", "min_effect": 0.03}],
    }
    effects = ab.load_min_effects(write(tmp_path, doc))
    assert effects.for_case("decode-sdpa-B1-T128") == 0.05
    assert effects.for_case("decode-sdpa-B8-T128") == 0.03
    assert effects.for_case("prefill-sdpa") == 0.025
    assert ab.load_min_effects(write(tmp_path, {"version": 1})).for_case("x") == ab.DEFAULT_MIN_EFFECT


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"version": 1, "default": 1.0}, r"field 'default'.*\[0, 1\)"),
        ({"version": 1, "default": "0.02"}, r"field 'default'"),
        ({"version": 1, "patterns": [OK, {"match": "b*", "min_effect": -0.1}]}, r"patterns\[1\]: field 'min_effect'"),
        ('{"version": 1, "patterns": [{"match": "a*", "min_effect": NaN}]}', r"patterns\[0\]: field 'min_effect'"),
        ({"version": 1, "patterns": [{"match": "a*", "min_effect": True}]}, r"patterns\[0\]: field 'min_effect'"),
        ({"version": 1, "patterns": [{"min_effect": 0.03}]}, r"patterns\[0\]: field 'match'"),
        ({"version": 1, "patterns": [{"match": "a*", "min_efect": 0.03}]}, r"patterns\[0\]: unknown field"),
        ({"version": 2}, r"field 'version'"),
        ('{"version": 1,', r"not valid JSON"),
    ],
)
def test_min_effects_bad_input_names_file_entry_and_field(tmp_path, doc, match):
    path = write(tmp_path, doc)
    with pytest.raises(ValueError, match=match) as info:
        ab.load_min_effects(path)
    assert path in str(info.value)


def test_min_effects_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ab.load_min_effects(tmp_path / "absent.json")


@pytest.fixture
def report(rng) -> ab.ABReport:
    base = timings(rng)
    verdicts = [
        ab.judge("b-same", base, timings(rng)),
        ab.judge("a-slower", base, timings(rng, scale=1.05), base_peak_mib=64.0, head_peak_mib=64.0),
        ab.judge("c-faster", base, timings(rng, scale=0.95)),
        ab.judge("d-fatter", base, timings(rng), base_peak_mib=64.0, head_peak_mib=128.0),
        ab.judge("e-broken", base, [1.0, 2.0]),
        ab.judge("f-removed", base, None),
        ab.judge("g-added", None, base),
    ]
    return ab.ABReport("abc123", "def456", "NVIDIA H100", ab.DEFAULT_LEVEL, verdicts, ["GPU busy: 3 other processes"])


def test_report_counts_and_failure(report):
    assert report.failed
    assert report.counts() == {
        "regressed": 1,
        "improved": 1,
        "unchanged": 2,
        "error": 1,
        "base_only": 1,
        "head_only": 1,
        "memory_regressed": 1,
        "memory_improved": 0,
    }
    assert not ab.ABReport("a", "b", "gpu", 0.99, [v for v in report.verdicts if not v.failed]).failed


def test_summary_markdown_puts_changes_before_the_full_list(report):
    md = ab.summary_markdown(report)
    title = md.splitlines()[0]
    assert "`abc123` → `def456`" in title and "NVIDIA H100" in title and "regressions" in title
    assert "1 regressed · 1 improved · 2 unchanged · 1 error · 1 base-only · 1 head-only" in md
    changes, details = md.index("Regressions and improvements"), md.index("<details>")
    assert changes < details < md.index("</details>")
    notable = md[changes:details]
    for key in ("a-slower", "c-faster", "d-fatter", "e-broken"):
        assert key in notable
    assert "b-same" not in notable and "b-same" in md[details:]
    assert notable.index("a-slower") < notable.index("c-faster")  # failures first
    assert "64 → 128 (+100%)" in notable
    assert "Base-only (listed, not failed): `f-removed`" in md
    assert "Head-only (listed, not failed): `g-added`" in md
    assert "Blind spots:" in md
    assert "- GPU busy: 3 other processes" in md


def test_detectable_summary(report):
    median, worst = ab.detectable_summary(report.verdicts)
    assert 0 < median <= worst < 0.01
    only = ab.detectable_summary(report.verdicts, predicate=lambda v: v.key == "a-slower")
    assert only == (report.verdicts[1].interval.detectable,) * 2
    assert ab.detectable_summary([]) is None


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_plot_ratios_writes_a_png_that_grows_with_the_cases(report, rng, tmp_path):
    pytest.importorskip("matplotlib", reason="plot_ratios needs matplotlib (the 'bench' extra)")
    path = ab.plot_ratios(report, tmp_path / "plots" / "ratios.png")
    assert path.stat().st_size > 1000
    many = [ab.judge(f"case-{i:02d}", timings(rng, 10), timings(rng, 10)) for i in range(30)]
    tall = ab.plot_ratios(ab.ABReport("a", "b", "gpu", 0.99, many), tmp_path / "tall.png")
    assert png_size(tall)[1] > png_size(path)[1]
    empty = ab.plot_ratios(ab.ABReport("a", "b", "gpu", 0.99, []), tmp_path / "empty.png")
    assert png_size(empty)[1] > 0


def test_the_p_value_needs_no_scipy(rng, monkeypatch):
    """The A/B reports the sign test of its paired rounds: numpy only, no scipy."""
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy...` raise ImportError
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    v = ab.judge("case", timings(rng), timings(rng, scale=1.03))
    assert v.status == "regressed" and v.interval.p_value < 1e-6 and "p=" in v.message
