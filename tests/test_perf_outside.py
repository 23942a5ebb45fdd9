"""The perf machinery on a user's own package, outside this checkout: ``--impl``, and an A/B whose
base side is another commit of the user's repository, imported under an alias (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attention import registry
from attention.bench.perf import base_revision, launcher, revision
from attention.bench.perf.base_revision import BaseRevision

from .perf_support import GIT_ENV, ROOT, needs_git, subprocess_env

PKG = "perf_outside_pkg"  # a name no other test imports
# The implementation imports its own package by absolute name: at the base commit it must get the
# base's helpers, not the head's already imported ones.
ATTN = f"""import time

import torch.nn.functional as F

from {PKG}.helpers import DELAY, VERSION


def attn(q, k, v):  # q (B, H, Tq, D), k/v (B, H, Tk, D)
    if DELAY:
        time.sleep(DELAY)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, Tq, D)
"""
BROKEN = "def broken_attn(q, k, v):\n    raise RuntimeError('broken on purpose')\n"


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, **GIT_ENV)
    return subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def user_repo(tmp_path: Path) -> Path:
    """A git repository of the user's package: commit 1 (VERSION 1, fast), commit 2 (VERSION 2, 100 ms slower:
    plain to see on a busy CPU)."""
    repo = tmp_path / "user_repo"
    pkg = repo / PKG
    pkg.mkdir(parents=True)
    _git(repo, "init", "-q")
    (pkg / "__init__.py").write_text("")
    (pkg / "attn.py").write_text(ATTN)
    (pkg / "broken.py").write_text(BROKEN)
    (pkg / "helpers.py").write_text("VERSION = 1\nDELAY = 0.0\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "fast")
    (pkg / "helpers.py").write_text("VERSION = 2\nDELAY = 0.1\n")
    _git(repo, "commit", "-q", "-am", "slower")
    return repo


@pytest.fixture
def imported(user_repo: Path, monkeypatch):
    """The user's package importable from its checkout; the registry and sys.modules as they were afterwards."""
    monkeypatch.syspath_prepend(str(user_repo))
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_sources", dict(registry._sources))
    yield user_repo
    for key in [k for k in sys.modules if k.startswith(PKG)]:
        del sys.modules[key]


@needs_git
def test_the_base_side_is_the_first_commit_imported_under_an_alias(imported: Path):
    name = registry.resolve(f"{PKG}.attn:attn")
    head_helpers = sys.modules[f"{PKG}.helpers"]
    assert head_helpers.VERSION == 2
    with BaseRevision("HEAD~1", [name], cwd=imported) as base:
        sha = revision.resolve("HEAD~1", imported)
        alias = f"{PKG}_base_{sha[:12]}"
        # The base's modules, filed under the alias, and its absolute self-import got the base's helpers.
        assert sys.modules[f"{alias}.helpers"].VERSION == 1 and sys.modules[f"{alias}.attn"].VERSION == 1
        assert sys.modules[f"{alias}.attn"].__file__.startswith(str(base.trees[imported]))
        # The head's modules are back where they were.
        assert sys.modules[f"{PKG}.helpers"] is head_helpers and sys.modules[f"{PKG}.attn"].VERSION == 2
        assert base.implementations[name] is not registry.get(name) and base.not_compared == {}
        assert base.label.startswith("HEAD~1 = ") and "(fast)" in base.label
        assert base.head_label.startswith("working tree (") and "(slower)" in base.head_label
        tree = base.trees[imported]
    assert not tree.exists() and not any(key.startswith(alias) for key in sys.modules)
    assert "base-" not in _git(imported, "worktree", "list")


@needs_git
def test_an_implementation_the_base_commit_lacks_is_absent_not_an_error(imported: Path):
    (imported / PKG / "newer.py").write_text("from .attn import attn as newer_attn\n")
    _git(imported, "add", ".")
    _git(imported, "commit", "-q", "-m", "a new implementation")
    name = registry.resolve(f"{PKG}.newer:newer_attn")
    with BaseRevision("HEAD~1", [name], cwd=imported) as base:
        assert name not in base.implementations and base.not_compared == {}


@needs_git
def test_builtins_outside_this_checkout_and_uncheckable_packages_are_not_compared(imported: Path, tmp_path: Path):
    loose = tmp_path / "loose"  # a package in no git repository: an installed copy, say
    (loose / "loose_pkg").mkdir(parents=True)
    (loose / "loose_pkg" / "__init__.py").write_text(BROKEN)
    sys.path.insert(0, str(loose))
    try:
        loose_name = registry.resolve("loose_pkg:broken_attn")
        plan = base_revision.plan("HEAD~1", ["sdpa", loose_name, registry.resolve(f"{PKG}.attn:attn")], imported)
    finally:
        sys.path.remove(str(loose))
        sys.modules.pop("loose_pkg", None)
    assert list(plan.shas) == [imported] and plan.builtins == []
    assert "not inside that git checkout: the same code on both sides" in plan.not_compared["sdpa"]
    assert "which no git checkout tracks" in plan.not_compared[loose_name]
    with pytest.raises(revision.RevisionError, match="nothing to compare: sdpa: a built-in"):
        base_revision.plan("HEAD~1", ["sdpa"], imported)
    with pytest.raises(revision.RevisionError, match="unknown git revision 'nope'"):
        base_revision.plan("nope", ["attn"], imported)


def _env(*paths: Path) -> dict:
    return {**subprocess_env(*paths), **GIT_ENV}


@pytest.mark.attention_costly  # pytest and CLI processes of its own, seconds each: started first under -n
@needs_git
def test_an_ab_from_the_users_repository_flags_the_slower_commit(user_repo: Path, tmp_path: Path):
    out = tmp_path / "ab"
    cmd = [sys.executable, "-m", "pytest", launcher.CASES, "-p", launcher.PLUGIN, "-p", "no:cacheprovider", "-q"]
    cmd += ["--perf-device=cpu", "--perf-grid=tiny", f"--perf-impl={PKG}.attn:attn", "--perf-budget=0.05"]
    cmd += ["-k", "core-attn-fp32-fwd-B4-T64 or core-raw_sdpa-fp32-fwd-B4-T64"]
    cmd += ["--perf-compare-rev=HEAD~1", f"--perf-ab-out={out}", "--perf-min-effect=0.5"]
    done = subprocess.run(cmd, cwd=user_repo, env=_env(user_repo), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = {v["key"]: v["status"] for v in json.loads((out / "ab.json").read_text())["verdicts"]}
    assert verdicts["core-attn-fp32-fwd-B4-T64-H4-D16"] == "regressed"
    assert "core-raw_sdpa-fp32-fwd-B4-T64-H4-D16" in verdicts  # the reference: the same code on both sides
    assert (out / "summary.md").read_text().startswith("### Same-run A/B `HEAD~1 = ")
    assert "base-" not in _git(user_repo, "worktree", "list")


@pytest.mark.attention_costly  # pytest and CLI processes of its own, seconds each: started first under -n
@needs_git
def test_the_cli_runs_a_users_implementation_from_its_repository_and_fails_a_broken_one(user_repo: Path, tmp_path):
    base = [sys.executable, "-m", "attention.bench.perf", "run", "--quiet-pytest", "--perf-budget=0.02"]
    selection = ["-k", "fwd-B4-T64 or decode or gemms and fwd"]
    cmd = [*base, "--out", str(tmp_path / "ok"), "--impl", f"{PKG}.attn:attn", *selection]
    done = subprocess.run(cmd, cwd=user_repo, env=_env(user_repo), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    run = json.loads((tmp_path / "ok" / "run-1.json").read_text())
    impls = {b["extra_info"]["impl"] for b in run["benchmarks"]}
    assert impls == {"attn", "raw_sdpa", "gemms"} and run["machine_info"]["attention_perf"]["impls"] == ["attn"]
    # A failing case (here: an implementation that raises) fails the run: exit 1, for CI.
    cmd = [*base, "--out", str(tmp_path / "bad"), "--impl", f"{PKG}.broken:broken_attn", "-k", "core-broken_attn"]
    done = subprocess.run(cmd, cwd=user_repo, env=_env(user_repo), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:]
    log = (tmp_path / "bad" / "cases.jsonl").read_text()
    assert "broken on purpose" in log and '"status": "failed"' in log


def test_an_impl_naming_a_missing_attribute_is_a_usage_error_naming_the_spec_once(imported: Path, tmp_path, capfd):
    from attention.bench.perf import cli

    assert cli.main(["--out", str(tmp_path / "none"), "--impl", f"{PKG}.attn:no_such_thing"]) == 2
    told = "--impl: perf_outside_pkg.attn:no_such_thing: perf_outside_pkg.attn has no attribute no_such_thing"
    assert told in capfd.readouterr().out


def test_pytest_perf_in_this_checkout_loads_the_plugin_once_also_when_named_twice():
    cmd = [sys.executable, "-m", "pytest", "perf", "-p", "no:cacheprovider", "--collect-only", "-q"]
    cmd += ["--perf-device=cpu", "--perf-grid=tiny", "-p", launcher.PLUGIN, "--perf-impl=sdpa"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert ids and all(line.startswith("perf/test_grid.py::") for line in ids)
    assert not [line for line in ids if any(f"-{other}-" in line for other in ("flex", "from_scratch", "triton"))]


def test_a_project_the_package_sits_under_does_not_configure_the_grids_pytest(tmp_path: Path):
    """Installed in a project's own venv, the case modules lie below that project's pyproject.toml:
    its addopts (here an option no plugin of the grid's knows) must not reach the grid's pytest."""
    import shutil

    site = tmp_path / "venv-site"
    shutil.copytree(ROOT / "attention", site / "attention", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = ["--no-such-option-here"]\n')
    cmd = [sys.executable, "-m", "attention.bench.perf", "run", "--collect-only", "-q", "-k", "fwd-B4-T64"]
    env = {**subprocess_env(), "PYTHONPATH": str(site)}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "test_prefill.py::test_prefill[core-sdpa-fp32-fwd-B4-T64" in done.stdout
