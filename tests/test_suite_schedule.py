"""Under ``pytest -n``, each worker's share of the collection starts with its part of the long cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from attention.suite.schedule import deal

from .test_suite_plugin import PLAIN

THEIRS = """
import pytest


def test_quick():
    pass


@pytest.mark.attention_costly
def test_long():
    pass


@pytest.mark.skipif(True, reason="skipped here")
def test_never():
    pass
"""

CONFTEST = """
import json, pathlib
import attention, theirs

attention.register("compiled", attention.from_function(theirs.plain_causal, compiled_on=("cpu", "cuda")))
attention.register("plain", theirs.plain_causal)


def pytest_collection_finish(session):
    name = getattr(session.config, "workerinput", {}).get("workerid", "main")
    ids = [f"{item.module.__name__}::{item.name}" for item in session.items]
    (pathlib.Path(__file__).parent / f"order-{name}.json").write_text(json.dumps(ids))
"""


def test_deal_sorts_by_rank_and_gives_each_worker_share_its_part_of_each_rank() -> None:
    items = [f"t{i}" for i in range(11)]
    ranks = [2, 1, 3, 1, 2, 0, 1, 2, 3, 1, 2]
    dealt = deal(items, ranks, 3)
    assert sorted(dealt) == sorted(items)
    # worksteal's initial shares of 11 items over 3 workers: 3, 4, 4 items
    shares = [dealt[:3], dealt[3:7], dealt[7:]]
    ordered = ["t5", "t1", "t3", "t6", "t9", "t0", "t4", "t7", "t10", "t2", "t8"]  # by rank, then collection
    assert shares == [ordered[2::3], ordered[1::3], ordered[0::3]]
    assert [s[0] for s in shares] == ["t3", "t1", "t5"]  # every share starts with a long case
    assert deal(items, ranks, 1) == ordered


#: Theirs, the causality properties, and the chunked-decoding property (which needs a KV cache):
#: ranks 0 to 3, each known from the test's name alone.
KEEP = "(test_theirs or causality or chunked_decoding) and not fp16 and not bf16"


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST")}  # ours, if any
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    modules = ["attention.suite.test_causality", "attention.suite.test_kv_cache"]
    selection = ["--attention-impl", "compiled", "--attention-impl", "plain", "-k", KEEP]
    cmd = [sys.executable, "-m", "pytest", "-p", "attention.suite.plugin", "-p", "no:cacheprovider", "-q"]
    cmd += [".", "--pyargs", *modules, *selection, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def _expected_rank(test: str) -> int:
    """The schedule's rank, worked out from the module and test name alone."""
    name, _, params = test.partition("[")
    if params.startswith(("compiled-cuda", "plain-cuda")) and not torch.cuda.is_available():
        return 3  # skipif(no CUDA)
    if name.startswith("attention.suite.test_kv_cache::") or name == "test_theirs::test_never":
        return 3  # skipped by the plugin (neither declares a KV cache) or by a true skipif
    if name == "test_theirs::test_long":
        return 0
    return 1 if params.startswith("compiled-") and name.startswith("attention.suite.test_causality::") else 2


def test_xdist_workers_start_with_the_long_cases_and_a_plain_run_keeps_pytests_order(tmp_path: Path) -> None:
    (tmp_path / "theirs.py").write_text(PLAIN)
    (tmp_path / "test_theirs.py").write_text(THEIRS)
    (tmp_path / "conftest.py").write_text(CONFTEST)

    plain = _pytest(tmp_path, "--collect-only")  # the order it would run in
    assert plain.returncode == 0, plain.stdout + plain.stderr
    collected = json.loads((tmp_path / "order-main.json").read_text())
    assert collected.index("test_theirs::test_quick") < collected.index("test_theirs::test_long")

    spread = _pytest(tmp_path, "-n", "2", "--dist", "worksteal")
    assert spread.returncode == 0, spread.stdout + spread.stderr
    orders = [json.loads((tmp_path / f"order-gw{i}.json").read_text()) for i in range(2)]
    assert orders[0] == orders[1]  # xdist needs one collection
    expected = deal(collected, [_expected_rank(i) for i in collected], 2)
    assert orders[0] == expected
    first, second = expected[: len(expected) // 2], expected[len(expected) // 2 :]  # the workers' shares
    assert "test_theirs::test_long" in (first[0], second[0])  # what it means: each share starts long
    assert _expected_rank(first[0]) <= 1 and _expected_rank(second[0]) <= 1
