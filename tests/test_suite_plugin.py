"""The suite's pytest plugin as a user meets it: selecting implementations, pairs, and usage errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PLAIN = """
import torch.nn.functional as F


def plain_causal(q, k, v):  # (B, H, T, D) -> (B, H, T, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
"""


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest from a folder outside the repository, with ``tmp_path`` importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    cmd = [sys.executable, "-m", "pytest", "-p", "attention.suite.plugin", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_function_named_by_module_attr_runs_alone_and_in_pairs_with_the_reference(tmp_path: Path) -> None:
    """Through ``python -m attention.suite`` from a user's folder, which it leaves without an empty
    ``.benchmarks/`` (the property suite times nothing: pytest-benchmark's plugin is not loaded)."""
    (tmp_path / "theirs.py").write_text(PLAIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    cmd = [sys.executable, "-m", "attention.suite", "--impl", "theirs:plain_causal", "-p", "no:cacheprovider"]
    cmd += ["-k", "test_state_dict", "--co", "-q"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (tmp_path / ".benchmarks").exists()
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    pairs = {line.split("[", 1)[1].rsplit("-cpu", 1)[0] for line in ids if "-cpu-" in line}
    expected = {"plain_causal->plain_causal", "plain_causal->from_scratch", "from_scratch->plain_causal"}
    assert pairs == expected
    assert not [line for line in ids if "[sdpa" in line or "-sdpa" in line], "only the selected implementation runs"


def test_a_register_call_in_a_conftest_of_a_given_path_counts(tmp_path: Path) -> None:
    (tmp_path / "theirs.py").write_text(PLAIN)
    (tmp_path / "conftest.py").write_text("import attention, theirs\nattention.register('mine', theirs.plain_causal)\n")
    done = _pytest(tmp_path, ".", "--pyargs", "attention.suite.test_shapes", "--attention-impl", "mine", "--co", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_output_shape_dtype_and_device[mine-cpu-fp32]" in done.stdout


def test_a_misspelled_implementation_is_one_usage_error(tmp_path: Path) -> None:
    done = _pytest(tmp_path, "--pyargs", "attention.suite", "--attention-impl", "sdpaa")
    assert done.returncode == 4
    assert "ERROR: cannot test: unknown implementation 'sdpaa'; registered: from_scratch" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("argv", "stray"),
    [
        (["my_pkg.attn:attn"], "my_pkg.attn:attn"),  # --impl forgotten
        (["--impl", "my_pkg.attn:attn", "sdpa"], "sdpa"),  # two after one --impl, as the report takes them
        (["--impl", "sdpa", "-k", "from_scratch", "v2=pkg.mod:attn"], "v2=pkg.mod:attn"),
        (["-x", "--impl", "sdpa", "flex"], "flex"),  # after --impl's value, not after -x
    ],
)
def test_an_implementation_given_where_pytest_takes_paths_is_a_usage_error(argv, stray, capsys) -> None:
    from attention.suite.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "-q"])
    assert exit_.value.code == 2
    assert f"{stray}: an implementation, not a test path: name each with its own --impl" in capsys.readouterr().err


def test_option_values_and_test_paths_are_not_taken_for_implementations(tmp_path: Path) -> None:
    from attention import registry

    (tmp_path / "test_x.py").write_text("")
    words = ["-k", "sdpa", "-p", "pkg.mod:attr", f"{tmp_path / 'test_x.py'}::test_one", str(tmp_path), "-x"]
    assert registry.misplaced_specs(words, "--impl") is None


def test_an_implementation_nothing_here_can_test_is_a_usage_error_not_a_green_run(tmp_path: Path) -> None:
    """An implementation declared for devices this machine lacks would skip every test and exit 0."""
    (tmp_path / "theirs.py").write_text(
        PLAIN + "\nfrom attention import from_function\nMetaOnly = from_function(plain_causal, devices=('meta',))\n"
    )
    done = _pytest(tmp_path, "--pyargs", "attention.suite.test_shapes", "--attention-impl", "theirs:MetaOnly")
    assert done.returncode == 4, done.stdout + done.stderr
    assert re.search(
        r"ERROR: implementation MetaOnly: every test would skip on this machine, .*: "
        r"cpu: declares devices meta only",
        done.stderr,
    ), done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_dtype_declaration_refuses_the_run_only_where_no_test_runs_it(tmp_path: Path) -> None:
    """fp16-only on a CPU machine: the fp16 checks still run on CPU, so it is testable; bf16-only
    is not (every CPU test is fp32 or fp16), and its run used to be 1 passed, 241 skipped, exit 0."""
    (tmp_path / "theirs.py").write_text(
        PLAIN
        + "\nimport torch\nfrom attention import from_function\n"
        + "Fp16Only = from_function(plain_causal, dtypes=(torch.float16,))\n"
        + "Bf16Only = from_function(plain_causal, dtypes=(torch.bfloat16,))\n"
    )
    done = _pytest(
        tmp_path, "--pyargs", "attention.suite.test_score_mods", "--attention-impl", "theirs:Fp16Only", "--co", "-q"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if torch.cuda.is_available():
        return  # bf16 runs on CUDA
    done = _pytest(tmp_path, "--pyargs", "attention.suite.test_shapes", "--attention-impl", "theirs:Bf16Only")
    assert done.returncode == 4, done.stdout + done.stderr
    assert (
        "cpu: declares dtypes torch.bfloat16 only, and the tests here run torch.float16, torch.float32" in done.stderr
    )


def test_a_test_without_a_dtype_parameter_is_one_of_fp32_for_a_declaration(tmp_path: Path) -> None:
    """Tests that build fp32 modules without a dtype parameter skip for a function declared
    without fp32 (they failed on its dtype refusal) and run for one declared with it."""
    (tmp_path / "theirs.py").write_text(
        PLAIN
        + "\nimport torch\nfrom attention import from_function\n"
        + "Fp16Only = from_function(plain_causal, dtypes=(torch.float16,))\n"
        + "Fp32Only = from_function(plain_causal, dtypes=(torch.float32,))\n"
    )
    args = ["--pyargs", "attention.suite.test_bad_input", "-k", "more_tokens_than_context_length", "-rs", "-v"]
    done = _pytest(tmp_path, *args, "--attention-impl", "theirs:Fp16Only", "--attention-impl", "theirs:Fp32Only")
    assert done.returncode == 0 and "1 passed, 1 skipped" in done.stdout, done.stdout + done.stderr
    assert "Fp16Only: declares dtypes torch.float16 only, not torch.float32" in done.stdout
    assert re.search(r"test_more_tokens_than_context_length\[Fp32Only\] PASSED", done.stdout), done.stdout


def test_default_profile_is_the_suites_own():
    """Hypothesis registers ``ci`` and ``default`` itself on import: a suite profile of either name
    would never be registered, and the suite would run Hypothesis's 100 examples a property."""
    from hypothesis import settings

    from attention.suite.profiles import PROFILES

    assert not {"ci", "default"} & set(PROFILES)
    for name, options in PROFILES.items():
        profile = settings.get_profile(name)
        assert profile.max_examples == options["max_examples"], name
    if os.environ.get("HYPOTHESIS_PROFILE", "quick") == "quick":
        assert settings.default.max_examples == PROFILES["quick"]["max_examples"]
        assert settings.default.derandomize and settings.default.database is None


def test_workflows_name_only_the_suites_profiles():
    """A workflow that sets ``HYPOTHESIS_PROFILE: ci`` loads Hypothesis's own ``ci`` profile (100
    examples a property, the hour-long CI run): every profile a workflow names must be the suite's."""
    from attention.suite.profiles import PROFILES

    workflows = Path(__file__).resolve().parents[1] / ".github" / "workflows"
    named = {
        (path.name, value.strip("'\""))
        for path in [*workflows.glob("*.yml"), *workflows.glob("*.yaml")]
        for value in re.findall(r"HYPOTHESIS_PROFILE\s*[:=]\s*(\S+)", path.read_text(encoding="utf-8"))
    }
    # A value is a literal name of ours: not Hypothesis's, not quoted into one, not an expression.
    assert {(file, name) for file, name in named if name not in PROFILES} == set()


def test_an_implementation_computing_none_of_the_tested_dtypes_is_untestable_with_its_reasons(monkeypatch) -> None:
    """A kernel's own dtype limit (``dtype_unsupported`` overridden, nothing declared) that rules out
    every dtype the suite runs on a device: one reason for the device, not a skip per test."""
    import attention
    from attention import registry
    from attention.suite import plugin

    class HalfOnlyKernel(attention.get("sdpa")):
        @classmethod
        def dtype_unsupported(cls, dtype, device):
            return None if dtype == torch.bfloat16 else f"its kernel runs bf16 only, not {dtype}"

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_sources", dict(registry._sources))
    attention.register("half_only_kernel", HalfOnlyKernel)
    reason = plugin._untestable_on("half_only_kernel", "cpu", [torch.float32, torch.float16])
    assert reason == (
        "computes none of the dtypes the tests here run: its kernel runs bf16 only, not torch.float32; "
        "its kernel runs bf16 only, not torch.float16"
    )
    assert plugin._untestable_on("half_only_kernel", "cpu", [torch.float32, torch.bfloat16]) is None
