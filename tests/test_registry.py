"""The registry: the one list of implementations that the suite, perf and the benchmark iterate
over; its validation; and the claim that a user's own implementation, once registered (in code
or through an entry point), runs through the whole property suite unchanged."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType

import pytest

import attention
import attention.registry as registry
from tests.support import IMPL_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]

#: A user's implementation, as it would live in their own package: a subclass of AttentionBase
#: that overrides only ``_attend`` with its own math (grouped einsums, a hand-written softmax)
#: and shares no attention code with the seed three.
PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A user's own causal attention, written out by tests/test_registry.py."""

    import torch

    import attention


    class EinsumAttention(attention.AttentionBase):
        @classmethod
        def supports_dropout(cls):
            return False  # keeps the example short; the base class rejects dropout > 0

        def _attend(self, q, k, v, *, q_offset, document_ids):
            b, h, t_q, _ = q.shape
            t_k = k.shape[2]
            groups = h // self.num_kv_heads
            q = q.unflatten(1, (self.num_kv_heads, groups))  # (B, H_kv, G, Tq, hd)
            scores = torch.einsum("bkgqd,bksd->bkgqs", q, k) * self.scale  # (B, H_kv, G, Tq, Tk)
            visible = self._dense_mask(q.flatten(1, 2), k, q_offset, document_ids)
            visible = visible.expand(b, h, t_q, t_k).unflatten(1, (self.num_kv_heads, groups))
            scores = scores.masked_fill(~visible, float("-inf"))
            # Softmax by hand; a row that sees no key gets a finite peak, so its weights are 0.
            peak = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min).detach()
            numerator = torch.exp(scores - peak)  # (B, H_kv, G, Tq, Tk)
            total = numerator.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
            context = torch.einsum("bkgqs,bksd->bkgqd", numerator / total, v)  # (B, H_kv, G, Tq, hd)
            return context.flatten(1, 2)  # (B, H, Tq, hd)
    '''
)

#: What a user puts where pytest loads it first (a conftest.py or a ``-p`` plugin).
REGISTER_SOURCE = textwrap.dedent(
    """
    import attention
    from user_attention import EinsumAttention

    attention.register("einsum_plugin", EinsumAttention)
    """
)


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register implementations without leaking them into other tests."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The user's module, importable as ``user_attention`` for the duration of the test."""
    path = tmp_path / "user_attention.py"
    path.write_text(PLUGIN_SOURCE)
    spec = importlib.util.spec_from_file_location("user_attention", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "user_attention", module)
    spec.loader.exec_module(module)
    return module


def test_suite_parametrizes_over_the_registry() -> None:
    assert list(attention.implementations()) == IMPL_NAMES
    seeds = {
        "from_scratch": attention.MultiHeadAttentionCombinedQKV,
        "flex": attention.MHAPyTorchFlexAttention,
        "sdpa": attention.MHAPyTorchScaledDotProduct,
    }
    assert {name: attention.get(name) for name in seeds} == seeds


def test_implementations_returns_a_copy() -> None:
    listed = attention.implementations()
    listed.clear()
    assert list(attention.implementations()) == IMPL_NAMES


def test_get_unknown_name_lists_the_registered_ones() -> None:
    known = ", ".join(attention.implementations())
    with pytest.raises(ValueError, match=re.escape(f"unknown implementation 'flash4'; registered: {known}")):
        attention.get("flash4")


@pytest.mark.parametrize("name", ["has space", "", "3d", 7, None])
def test_register_rejects_a_bad_name(isolated_registry: None, plugin: ModuleType, name: object) -> None:
    message = f"implementation name must be an identifier-like string, got {name!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        attention.register(name, plugin.EinsumAttention)


@pytest.mark.parametrize("cls", [int, "EinsumAttention", None, attention.AttentionBase.__init__])
def test_register_rejects_a_non_subclass(isolated_registry: None, cls: object) -> None:
    with pytest.raises(TypeError, match=re.escape(f"{cls!r} is not a subclass of attention.AttentionBase")):
        attention.register("mine", cls)


def test_register_rejects_an_instance(isolated_registry: None, plugin: ModuleType) -> None:
    with pytest.raises(TypeError, match=re.escape("is not a subclass of attention.AttentionBase")):
        attention.register("mine", plugin.EinsumAttention(4, 4, 1, 8))


def test_register_refuses_to_replace_a_name(isolated_registry: None, plugin: ModuleType) -> None:
    message = "an implementation named 'sdpa' is already registered (MHAPyTorchScaledDotProduct)"
    with pytest.raises(ValueError, match=re.escape(message)):
        attention.register("sdpa", plugin.EinsumAttention)
    assert attention.get("sdpa") is attention.MHAPyTorchScaledDotProduct


def test_register_adds_after_the_builtins_and_is_idempotent(isolated_registry: None, plugin: ModuleType) -> None:
    assert attention.register("mine", plugin.EinsumAttention) is plugin.EinsumAttention
    assert attention.register("mine", plugin.EinsumAttention) is plugin.EinsumAttention  # same pair again: fine
    assert list(attention.implementations()) == [*IMPL_NAMES, "mine"]
    assert attention.get("mine") is plugin.EinsumAttention


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, *points: EntryPoint) -> None:
    """Stand in for installed distributions that declare ``points``; reload them on next read."""

    def entry_points(*, group: str) -> list[EntryPoint]:
        return [ep for ep in points if ep.group == group]

    monkeypatch.setattr(registry, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)


def test_entry_point_plugin_joins_the_registry(
    isolated_registry: None, plugin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_entry_points(
        monkeypatch,
        EntryPoint("einsum_ep", "user_attention:EinsumAttention", registry.ENTRY_POINT_GROUP),
        EntryPoint("elsewhere", "user_attention:EinsumAttention", "some.other.group"),
    )
    assert list(attention.implementations()) == [*IMPL_NAMES, "einsum_ep"]
    assert attention.get("einsum_ep") is plugin.EinsumAttention


def test_entry_point_to_a_non_implementation_is_rejected(
    isolated_registry: None, plugin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_entry_points(monkeypatch, EntryPoint("broken", "user_attention:torch", registry.ENTRY_POINT_GROUP))
    with pytest.raises(TypeError, match=re.escape("is not a subclass of attention.AttentionBase")):
        attention.implementations()


def test_whole_suite_runs_unchanged_on_a_registered_plugin(tmp_path: Path) -> None:
    """Register a user's implementation the way the README says, then run every other test file
    selecting only the cases the registry generated for it: they must exist and pass."""
    (tmp_path / "user_attention.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "register_user_attention.py").write_text(REGISTER_SOURCE)
    test_files = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_*.py"))
    test_files.remove("tests/test_registry.py")
    python_path = [str(tmp_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}
    command = [sys.executable, "-m", "pytest", "-p", "register_user_attention", "-p", "no:cacheprovider"]
    command += ["-q", "-k", "einsum_plugin", "-W", "ignore::UserWarning", *test_files]

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)

    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"plugin run failed ({summary}):\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= len(test_files), f"too few plugin cases ran: {summary}"
    assert "failed" not in summary and "error" not in summary, summary
