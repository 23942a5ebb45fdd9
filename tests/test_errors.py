"""Built-ins' own error behaviour. Bad input to any implementation is in the property suite,
attention/suite/test_bad_input.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attention


def test_a_plugin_declaring_supports_dropout_as_a_bool_attribute_still_works():
    class Legacy(attention.get("sdpa")):
        supports_dropout = False  # how capabilities were declared before they were class methods

    with pytest.raises(ValueError, match=re.escape("Legacy does not support dropout; got dropout=0.25")):
        Legacy(8, 8, 2, 8, dropout=0.25)
    assert Legacy(8, 8, 2, 8).dropout == 0.0


BROKEN_TRITON_CHECK = """
import torch, attention
triton_impl = attention.get("triton")
for device in ("cpu", "cuda"):
    print(device, triton_impl.unavailable(device))
try:
    triton_impl(8, 16, 2, 8)(torch.randn(1, 3, 8))
except RuntimeError as error:
    print("forward", error)
print("sdpa", tuple(attention.get("sdpa")(8, 16, 2, 8)(torch.randn(1, 3, 8)).shape))
"""


@pytest.mark.parametrize(
    "error",
    [
        "ImportError: libtriton.so: cannot open shared object file: No such file or directory",
        "RuntimeError: 0 active drivers ([]). There should only be one.",
    ],
    ids=["import-error", "runtime-error"],
)
def test_an_installed_triton_that_fails_to_import_is_a_reason_not_a_raise(tmp_path: Path, error: str) -> None:
    """triton's import can fail where it is installed (a library or driver it cannot load):
    ``unavailable()`` answers with that failure for every device (the suite skips, the notebook
    notes it), the forward refuses with it, and the other implementations are untouched."""
    kind, message = error.split(": ", 1)
    fake = tmp_path / "triton" / "__init__.py"
    fake.parent.mkdir()
    fake.write_text(f"raise {kind}({message!r})\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)])}
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(BROKEN_TRITON_CHECK)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    reason = f"the triton package is installed but failed to import ({error})"
    assert run.stdout.splitlines() == [
        f"cpu {reason}",
        f"cuda {reason}",
        f"forward MHATritonAttention cannot run here: {reason}",
        "sdpa (1, 3, 16)",
    ]


@pytest.mark.parametrize("impl_name", ["from_scratch", "sdpa"])
def test_a_module_on_the_meta_device_traces_shapes(impl_name: str) -> None:
    # Shape tracing and deferred initialisation build on meta, where torch.autocast does not exist:
    # asking it whether it is on there raised from deep inside torch.
    with torch.device("meta"):
        module = attention.get(impl_name)(16, 16, 2, 64)
    cache = module.make_kv_cache(2, 8)
    x = torch.randn(2, 5, 16, device="meta")  # (B, T, d_in)
    assert module(x, kv_cache=cache).shape == (2, 5, 16)
    assert module(x[:, :1], kv_cache=cache).shape == (2, 1, 16)
    assert cache.pos == 6
