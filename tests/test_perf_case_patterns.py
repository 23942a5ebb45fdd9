"""attention.bench.perf.case_patterns: the per-case pattern lists of both perf gates' files (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attention.bench.perf import ab
from attention.bench.perf import compare as cmp
from attention.bench.perf.case_patterns import check_patterns, first_match

BASELINES = Path(__file__).resolve().parents[1] / "perf" / "baselines"
PATTERNS = [("decode-*-B1-*", "B1"), ("decode-*", "decode"), ("decode-sdpa-B1-*", "never reached")]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("decode-sdpa-B1-T128", "B1"),  # first match wins, though the third is more specific
        ("decode-flex-B8-T128", "decode"),
        ("prefill-sdpa", "default"),
        ("Decode-sdpa-B8-T128", "default"),  # case-sensitive on every platform
    ],
)
def test_first_matching_pattern_wins_else_default(key, value):
    assert first_match(key, PATTERNS, "default") == value


def test_check_patterns_keeps_order_and_drops_match():
    entries = [{"match": "b*", "time": 0.2}, {"match": "a*"}]
    assert check_patterns(entries, "f.json", ("time",)) == [("b*", {"time": 0.2}), ("a*", {})]
    assert check_patterns([], "f.json", ()) == []


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"match": "a*"}, r"f\.json: field 'patterns': expected a list, got dict"),
        ([["a*", 0.1]], r"f\.json: patterns\[0\]: expected an object, got list"),
        ([{"match": "a*"}, {"time": 0.1}], r"f\.json: patterns\[1\]: field 'match'"),
        ([{"match": "", "time": 0.1}], r"patterns\[0\]: field 'match': expected a non-empty string"),
        ([{"match": "a*", "tme": 0.1}], r"patterns\[0\]: unknown field\(s\) \['tme'\]"),
    ],
)
def test_check_patterns_names_file_entry_and_field(entries, match):
    with pytest.raises(ValueError, match=match):
        check_patterns(entries, "f.json", ("time",))


def test_both_gates_files_use_the_shared_rules(tmp_path):
    """A typo in a thresholds pattern is refused as it is in a minimum-effects file, rather than
    leaving the pattern silently unmatched."""
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"patterns": [{"match": "decode-*", "tme": 0.2}]}))
    with pytest.raises(cmp.BadResultFile, match=r"thresholds\.json: patterns\[0\]: unknown field"):
        cmp.load_thresholds(thresholds)
    thresholds.write_text(json.dumps({"patterns": [{"time": 0.2}]}))
    with pytest.raises(cmp.BadResultFile, match=r"patterns\[0\]: field 'match'"):
        cmp.load_thresholds(thresholds)
    thresholds.write_text(json.dumps({"patterns": [{"match": "decode-*", "time": 0.2}, {"match": "*", "time": 0.3}]}))
    assert cmp.threshold_for(cmp.load_thresholds(thresholds), "decode-sdpa")["time"] == 0.2


def test_the_committed_files_load():
    effects = ab.load_min_effects(ab.MIN_EFFECTS_FILE)
    assert effects.for_case("core-flex-fp32-fwd-B16-T1024-H32-D64") == 0.10
    assert effects.for_case("core-sdpa-bf16-fwd-B4-T4096-H32-D64") == effects.default
    committed = sorted(BASELINES.glob("*/thresholds.json"))
    assert committed
    for path in committed:
        assert cmp.load_thresholds(path)["cases"]
