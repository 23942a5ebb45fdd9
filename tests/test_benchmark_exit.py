"""The report as a CI step: an implementation outside the accuracy rule fails the run (exit status
1) and the last line names it with its worst error; ``--impl`` takes ``module:attr``."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attention import AttentionBase
from attention.bench import sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--seq-lens", "32", "--hidden", "64", "--head-dim", "32", "--cell-seconds", "0.01"]


class OffByOne(AttentionBase):
    """Deliberately wrong: each query also sees the next key (a causal mask off by one)."""

    def _attend(self, q, k, v, *, q_offset, document_ids):
        seen = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(q_offset + 1)  # (Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=self.scale)  # (B, H, Tq, hd)


def test_an_implementation_outside_the_accuracy_rule_fails_the_run(tmp_path):
    """Given by ``module:attr``, as a kernel author would: the wrong one is FAIL in the table, the
    run exits 1 and its last line names it (and only it) with its worst error."""
    command = [sys.executable, "-m", "attention.bench", *TINY, "--no-plots", "--out", str(tmp_path)]
    command += ["--impl", "sdpa", f"{__name__}:OffByOne"]

    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("FAIL: outside the accuracy rule (attention/accuracy.py): OffByOne (worst max error ")
    assert "in fp32 at T=32; a plain fp32 implementation: " in last and "sdpa" not in last
    assert "OffByOne" in (tmp_path / "table.txt").read_text() and " FAIL" in (tmp_path / "table.txt").read_text()
    cells = {
        c["impl"]: c["accuracy"]["figures"]["fp32"] for c in json.loads((tmp_path / "report.json").read_text())["cells"]
    }
    assert cells["sdpa"]["passes"] and not cells["OffByOne"]["passes"]
    assert f"{cells['OffByOne']['max_error']:.3g}" in last


def _row(impl: str, seq_len: int, **errors: tuple[float, bool]) -> dict[str, object]:
    figures = {"batch": 1, "num_heads": 2}
    for dtype, (max_error, passes) in errors.items():
        figures[dtype] = {"max_error": max_error, "mean_error": 0.0, "baseline_max_error": 1e-3, "passes": passes}
    return {"impl": impl, "seq_len": seq_len, "accuracy": {"status": "ok", "reason": None, "figures": figures}}


def test_the_failure_line_names_each_failing_implementation_once_with_its_worst_case():
    result = {
        "cells": [
            _row("good", 32, fp32=(1e-7, True), bf16=(1e-3, True)),
            _row("bad", 32, fp32=(0.5, False), bf16=(0.7, False)),
            _row("bad", 64, fp32=(0.9, False)),
            _row("nan", 32, fp32=(3.0, False)),
            _row("nan", 64, fp32=(math.nan, False)),  # NaN never passes, and is the worst
            {"impl": "skipped", "seq_len": 32, "accuracy": {"status": "skipped", "reason": "r", "figures": {}}},
        ]
    }

    failed = sweep.accuracy_failures(result)

    assert list(failed) == ["bad", "nan"]
    assert failed["bad"] == {"max_error": 0.9, "baseline_max_error": 1e-3, "dtype": "fp32", "seq_len": 64}
    assert math.isnan(failed["nan"]["max_error"])
    line = sweep.failure_line(failed)
    assert "\n" not in line
    assert line == (
        "FAIL: outside the accuracy rule (attention/accuracy.py): "
        "bad (worst max error 0.9 in fp32 at T=64; a plain fp32 implementation: 0.001), "
        "nan (worst max error nan in fp32 at T=64; a plain fp32 implementation: 0.001)"
    )
    assert sweep.accuracy_failures({"cells": result["cells"][:1]}) == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_here:Attn", "no module 'no_such_module_here' on sys.path; add its folder to PYTHONPATH"),
        ("no_such_package_here.attn:Attn", "no module 'no_such_package_here' on sys.path"),
        ("my/attn.py:Attn", "'my/attn.py' looks like a file path; give the module's import name (attn:...)"),
        ("attn.py:Attn", "'attn.py' looks like a file path"),
        (f"{__name__}:Missing", "has no attribute Missing"),
        (f"{__name__}:TINY", "is neither an AttentionBase subclass nor a plain attn(q, k, v) function"),
    ],
)
def test_a_bad_module_attr_is_a_usage_error(spec, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args([*TINY, "--impl", spec, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def attn(q, k, v)\n", r"cannot import broken_\w+ \(SyntaxError: "),
        ("x = 1\nraise RuntimeError('no GPU config')\n", r"\(RuntimeError: no GPU config\) at .*broken_\w+\.py:2"),
        # a module of the user's that is missing a dependency is not told to fix its sys.path
        ("import no_such_dependency\n", r"cannot import broken_\w+ \(ModuleNotFoundError: .*no_such_dependency.*\) "),
        # from_function refuses in this package; the line to fix is the user's call
        (
            "from attention import from_function\ndef f(q, k, v):\n    return q\nattn = from_function(f, masks=True)\n",
            r"\(TypeError: function must take \(q, k, v, mask_mod=\.\.\.\) as declared; .*\) at .*broken_\w+\.py:4",
        ),
    ],
    ids=["syntax", "raises", "imports a missing module", "a declaration refused"],
)
def test_a_module_that_fails_to_import_is_a_usage_error_naming_where(source, message, tmp_path, monkeypatch, capsys):
    name = f"broken_{len(source)}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        sweep.parse_args([*TINY, "--impl", f"{name}:attn", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_an_implementation_that_measured_nothing_is_named_on_a_fail_line():
    def cell(status: str, reason: str | None = None) -> dict[str, object]:
        return {"status": status, "reason": reason, "figures": {}}

    skipped = cell("skipped", "mine: declares devices cuda only, not cpu")
    rows = [
        {"impl": "mine", "seq_len": 64, "fwd": skipped, "fwd_bwd": skipped, "accuracy": skipped},
        {"impl": "flex", "seq_len": 64, "fwd": cell("ok"), "fwd_bwd": cell("skipped", "no backward on cpu")},
        {"impl": "big", "seq_len": 64, "fwd": cell("oom", "OutOfMemoryError: ...")},
    ]
    assert sweep.unmeasured({"cells": rows}) == (
        "FAIL: nothing measured: mine (mine: declares devices cuda only, not cpu)"
    )
    assert sweep.unmeasured({"cells": rows[1:]}) == ""


def test_a_cell_that_raised_is_named_on_a_fail_line_with_its_first_error():
    """ERROR cells (a wrong shape, a crash) fail the run like accuracy does, and say which and why;
    out of memory is a limit of the machine, not a failure of the implementation."""

    def cell(status: str, reason: str | None = None) -> dict[str, object]:
        return {"status": status, "reason": reason, "figures": {}}

    rows = [
        {"impl": "sdpa", "seq_len": 64, "fwd": cell("ok"), "fwd_bwd": cell("oom", "OutOfMemoryError: ...")},
        {"impl": "mine", "seq_len": 64, "fwd": cell("ok"), "accuracy": cell("error", "ValueError: shape (1, 2)")},
        {"impl": "mine", "seq_len": 128, "fwd": cell("error", "RuntimeError: later")},
    ]
    line = sweep.errored_cells({"cells": rows})
    assert line == "FAIL: raised an error: mine (accuracy at T=64: ValueError: shape (1, 2))"
    assert sweep.errored_cells({"cells": rows[:1]}) == ""
