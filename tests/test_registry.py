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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType

import pytest
import torch

import attention
import attention.registry as registry

REPO_ROOT = Path(__file__).resolve().parents[1]
#: What the registry lists before a test adds to it (built-ins and installed plugins).
IMPL_NAMES = list(attention.implementations())

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
            # Scores in fp32: fp16 can overflow q·k, and rounding q * scale to fp16 costs small scores accuracy.
            scores = torch.einsum("bkgqd,bksd->bkgqs", q.float(), k.float()) * self.scale  # (B, H_kv, G, Tq, Tk)
            visible = self._dense_mask(q.flatten(1, 2), k, q_offset, document_ids)
            visible = visible.expand(b, h, t_q, t_k).unflatten(1, (self.num_kv_heads, groups))
            scores = scores.masked_fill(~visible, float("-inf"))
            # Softmax by hand; a row that sees no key gets a finite peak, so its weights are 0.
            peak = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).min).detach()
            numerator = torch.exp(scores - peak)  # (B, H_kv, G, Tq, Tk)
            total = numerator.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
            context = torch.einsum("bkgqs,bksd->bkgqd", numerator / total, v.float())  # (B, H_kv, G, Tq, hd)
            return context.flatten(1, 2).to(v.dtype)  # (B, H, Tq, hd)
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


@pytest.mark.parametrize("name", [["sdpa"], None])
def test_get_refuses_a_name_that_is_no_string(name: object) -> None:
    message = f"implementation name must be a str, got {type(name).__name__} ({name!r})"
    with pytest.raises(TypeError, match=re.escape(message)):
        attention.get(name)


def test_get_unknown_name_lists_the_registered_ones() -> None:
    known = ", ".join(attention.implementations())
    with pytest.raises(ValueError, match=re.escape(f"unknown implementation 'flash4'; registered: {known}")):
        attention.get("flash4")


@pytest.mark.parametrize("name", ["has space", "", "3d"])
def test_register_rejects_a_bad_name(isolated_registry: None, plugin: ModuleType, name: object) -> None:
    message = f"implementation name must be an identifier-like string, got {name!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        attention.register(name, plugin.EinsumAttention)


@pytest.mark.parametrize("name", [7, None])
def test_register_rejects_a_name_that_is_no_string(isolated_registry: None, plugin: ModuleType, name: object) -> None:
    message = f"implementation name must be a str, got {type(name).__name__} ({name!r})"
    with pytest.raises(TypeError, match=re.escape(message)):
        attention.register(name, plugin.EinsumAttention)


def test_register_rejects_a_class_that_is_no_attention(isolated_registry: None) -> None:
    with pytest.raises(TypeError, match=re.escape("builtins.int is not a subclass of attention.AttentionBase")):
        attention.register("mine", int)


@pytest.mark.parametrize("obj", ["EinsumAttention", None, 3])
def test_register_rejects_what_is_neither_class_nor_function(isolated_registry: None, obj: object) -> None:
    message = f"{obj!r} is neither an AttentionBase subclass nor a plain attn(q, k, v) function"
    with pytest.raises(TypeError, match=re.escape(message)):
        attention.register("mine", obj)


def test_register_rejects_a_subclass_that_does_not_attend(isolated_registry: None) -> None:
    class Silent(attention.AttentionBase):
        pass

    with pytest.raises(TypeError, match=r"Silent does not override _attend\(q, k, v, \*, q_offset, document_ids\)"):
        attention.register("mine", Silent)


def test_register_rejects_a_subclass_whose_attend_cannot_take_the_call(isolated_registry: None) -> None:
    """A wrong ``_attend`` signature is refused by name when registered (and so when ``--impl``
    resolves it), not as a bare ``TypeError`` from inside every test and benchmark."""

    class Unkeyed(attention.AttentionBase):
        def _attend(self, q, k, v):  # (B, H, T, hd) each -> (B, H, T, hd)
            return q

    with pytest.raises(
        TypeError,
        match=r"Unkeyed._attend\(self, q, k, v\) cannot take the call every forward makes, "
        r"_attend\(q, k, v, \*, q_offset, document_ids\) \(got an unexpected keyword argument 'q_offset'\)",
    ):
        attention.register("unkeyed", Unkeyed)


def test_register_rejects_an_instance(isolated_registry: None, plugin: ModuleType) -> None:
    with pytest.raises(TypeError, match=re.escape("is a module instance: register its class, user_attention.Einsum")):
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


def _fake_entry_points(monkeypatch: pytest.MonkeyPatch, *points: object) -> None:
    """Stand in for installed distributions that declare ``points``; reload them on next read."""

    def entry_points(*, group: str) -> list[object]:
        return [ep for ep in points if getattr(ep, "group", registry.ENTRY_POINT_GROUP) == group]

    monkeypatch.setattr(registry, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "_entry_points_tried", set())


@dataclass(frozen=True)
class FakeDistribution:
    name: str
    version: str = "1.0"


@dataclass(frozen=True)
class FakeEntryPoint:
    """What ``importlib.metadata`` hands out: ``name = value`` from ``dist``; ``load()`` imports it."""

    name: str
    value: str
    target: Callable[[], object]
    dist: FakeDistribution | None = FakeDistribution("user-plugins")
    loads: list[str] = field(default_factory=list, compare=False)

    def load(self) -> object:
        self.loads.append(self.name)
        return self.target()


def _raise_import_error() -> object:
    raise ImportError("No module named 'cuda_only_kernels'")


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


def _bad_plugins(plugin: ModuleType) -> dict[str, tuple[FakeEntryPoint, str]]:
    """Broken entry points, each with the reason its warning must give."""
    return {
        "import_error": (
            FakeEntryPoint("cuda_only", "cuda_only_kernels.attn:Fast", _raise_import_error),
            "loading it raised ImportError: No module named 'cuda_only_kernels'",
        ),
        "not_a_class": (
            FakeEntryPoint("factory", "user_attention:make", lambda: 42),
            "42 is neither an AttentionBase subclass nor a plain attn(q, k, v) function",
        ),
        "not_a_subclass": (
            FakeEntryPoint("a_dict", "builtins:dict", lambda: dict),
            "builtins.dict is not a subclass of attention.AttentionBase (or a plain attn(q, k, v) function)",
        ),
        "builtin_name": (
            FakeEntryPoint("sdpa", "user_attention:EinsumAttention", lambda: plugin.EinsumAttention),
            "'sdpa' is the name of a built-in implementation (MHAPyTorchScaledDotProduct)",
        ),
        "bad_name": (
            FakeEntryPoint("my-attention", "user_attention:EinsumAttention", lambda: plugin.EinsumAttention),
            "its name 'my-attention' is not an identifier-like string",
        ),
        "two_argument_function": (
            FakeEntryPoint("qk_only", "user_attention:qk", lambda: lambda q, k: q),
            "function must take (q, k, v) as declared",
        ),
    }


@pytest.mark.parametrize("kind", ["import_error", "not_a_class", "not_a_subclass", "builtin_name", "bad_name"])
def test_a_bad_plugin_is_skipped_with_a_warning_once(
    isolated_registry: None, plugin: ModuleType, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The built-ins and the good plugins beside it stay usable; the warning names the entry point,
    its distribution and the reason; later reads give the same registry without warning again."""
    bad, reason = _bad_plugins(plugin)[kind]
    good_before = FakeEntryPoint("einsum_a", "user_attention:EinsumAttention", lambda: plugin.EinsumAttention)
    good_after = FakeEntryPoint(
        "einsum_b", "other_pkg:EinsumAttention", lambda: plugin.EinsumAttention, dist=FakeDistribution("other", "2.1")
    )
    _fake_entry_points(monkeypatch, good_before, bad, good_after)

    with pytest.warns(registry.PluginWarning) as caught:
        assert attention.get("sdpa") is attention.MHAPyTorchScaledDotProduct
    assert [str(w.message) for w in caught] == [
        f"skipped the attention.implementations entry point '{bad.name} = {bad.value}' "
        f"from distribution user-plugins 1.0: {reason}"
    ]
    assert caught[0].filename == __file__  # points at the caller, not at the registry's insides
    expected = [*IMPL_NAMES, "einsum_a", "einsum_b"]
    assert list(attention.implementations()) == expected
    assert attention.get("einsum_b") is plugin.EinsumAttention

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any second warning fails the test
        for _ in range(3):
            assert list(attention.implementations()) == expected
            assert attention.get("sdpa") is attention.MHAPyTorchScaledDotProduct
    assert len(bad.loads) <= 1 and len(good_before.loads) == len(good_after.loads) == 1  # loaded once


def test_a_plugin_without_distribution_is_still_named(
    isolated_registry: None, plugin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_entry_points(monkeypatch, FakeEntryPoint("broken", "nowhere:X", _raise_import_error, dist=None))
    with pytest.warns(registry.PluginWarning, match=re.escape("entry point 'broken = nowhere:X': loading it raised")):
        assert list(attention.implementations()) == IMPL_NAMES


def test_a_plugin_that_reads_the_registry_while_loading_registers(
    isolated_registry: None, plugin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plugin module may subclass a built-in looked up through the registry at import time."""

    def load() -> type:
        base = attention.get("sdpa")  # re-enters the registry while its entry points are loading
        return type("SdpaVariant", (base,), {})

    _fake_entry_points(monkeypatch, FakeEntryPoint("variant", "user_attention:SdpaVariant", load))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = list(attention.implementations())
    assert names == [*IMPL_NAMES, "variant"]
    assert issubclass(attention.get("variant"), attention.MHAPyTorchScaledDotProduct)


def test_an_interrupted_plugin_load_is_retried(
    isolated_registry: None, plugin: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while a plugin imports stops the read; the next read loads that plugin, it is not lost."""
    interrupts = [KeyboardInterrupt()]

    def load() -> type:
        if interrupts:
            raise interrupts.pop()
        return plugin.EinsumAttention

    _fake_entry_points(monkeypatch, FakeEntryPoint("slow", "user_attention:EinsumAttention", load))
    with pytest.raises(KeyboardInterrupt):
        attention.implementations()
    assert list(attention.implementations()) == [*IMPL_NAMES, "slow"]


def test_bench_help_survives_a_bad_plugin(
    isolated_registry: None, plugin: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from attention.bench import sweep

    bad, _ = _bad_plugins(plugin)["import_error"]
    good = FakeEntryPoint("einsum_ok", "user_attention:EinsumAttention", lambda: plugin.EinsumAttention)
    _fake_entry_points(monkeypatch, bad, good)
    warned = pytest.warns(registry.PluginWarning, match="cuda_only = cuda_only_kernels.attn:Fast")
    with warned, pytest.raises(SystemExit) as exit_info:
        sweep.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "from_scratch, flex, sdpa, triton, einsum_ok" in " ".join(capsys.readouterr().out.split())


def test_whole_suite_runs_unchanged_on_a_registered_plugin(tmp_path: Path) -> None:
    """Register a user's implementation the way the README says, then run the shipped property
    suite selecting it: every suite module must have cases for it, and they must pass."""
    (tmp_path / "user_attention.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "register_user_attention.py").write_text(REGISTER_SOURCE)
    test_files = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "attention" / "suite").glob("test_*.py"))
    python_path = [str(tmp_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path)}
    command = [sys.executable, "-m", "pytest", "-p", "register_user_attention", "-p", "no:cacheprovider"]
    command += ["-q", "--attention-impl", "einsum_plugin", "-W", "ignore::UserWarning", *test_files]

    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)

    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"plugin run failed ({summary}):\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= len(test_files), f"too few plugin cases ran: {summary}"
    assert "failed" not in summary and "error" not in summary, summary


@pytest.mark.parametrize(
    ("result", "error", "expected"),
    [
        (
            lambda q: q[:, :, 1:],
            ValueError,
            r"Short\._attend returned shape \(1, 2, 9, 8\); expected q.s shape",
        ),
        (lambda q: q.double(), TypeError, r"Short\._attend returned torch\.float64 for torch\.float32 queries"),
        (lambda q: q.tolist(), TypeError, r"Short\._attend must return a torch\.Tensor, returned list"),
    ],
)
def test_a_subclass_whose_attend_breaks_the_contract_is_named_at_the_call(result, error, expected) -> None:
    class Short(attention.AttentionBase):
        def _attend(self, q, k, v, *, q_offset, document_ids):  # (B, H, T, hd) -> wrong
            return result(q)

    with pytest.raises(error, match=expected):
        Short(4, 16, 2, 10)(torch.randn(1, 10, 4))  # (B, T, d_in)


def test_two_functions_of_one_name_are_told_apart_by_a_name_given_in_the_spec(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_sources", dict(registry._sources))
    monkeypatch.syspath_prepend(str(tmp_path))
    body = textwrap.dedent("""
        import torch.nn.functional as F

        def attn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        """)
    for module in ("attn_v1", "attn_v2"):
        (tmp_path / f"{module}.py").write_text(body)
    assert registry.resolve("attn_v1:attn") == "attn"
    with pytest.raises(
        ValueError, match=r"attn_v2:attn: the name 'attn' is taken .*; name this one yourself: attn_2=attn_v2:attn"
    ):
        registry.resolve("attn_v2:attn")
    assert registry.resolve("v2=attn_v2:attn") == "v2"
    assert registry.get("v2") is not registry.get("attn") and registry.source("v2") == "attn_v2:attn"
    assert registry.resolve("v2=attn_v2:attn") == "v2"  # the same spec again: the same name
    with pytest.raises(ValueError, match=r"the name 'sdpa' is taken"):
        registry.resolve("sdpa=attn_v2:attn")
    with pytest.raises(ValueError, match=r"the name before '=' must be an identifier, got 'my attn'"):
        registry.resolve("my attn=attn_v2:attn")


def test_a_file_path_in_a_spec_is_answered_with_the_modules_import_name(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_pkg" / "sub").mkdir(parents=True)
    for folder in ("my_pkg", "my_pkg/sub"):
        (tmp_path / folder / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape("import name (my_pkg.sub.attn:...) from this folder")):
        registry.resolve("my_pkg/sub/attn.py:attn")  # a package's module: named from the top package
    with pytest.raises(ValueError, match=re.escape(f"(attn:...) with its folder on sys.path (PYTHONPATH={tmp_path}")):
        registry.resolve("loose/attn.py:attn")  # a plain folder: on sys.path itself
    monkeypatch.chdir(tmp_path / "my_pkg")  # inside a package, up to the first folder that is none
    with pytest.raises(
        ValueError, match=re.escape(f"(my_pkg.attn:...) with its folder on sys.path (PYTHONPATH={tmp_path}")
    ):
        registry.resolve("./attn.py:attn")
