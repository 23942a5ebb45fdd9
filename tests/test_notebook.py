"""The notebook's helpers (attention.bench.inspection) on CPU, and the notebook itself where marimo is."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

import attention
from attention import masks
from attention.accuracy import check_module
from attention.bench import inspection

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_attention.py"


def test_block_layout_of_causal_mask_has_full_below_and_partial_on_the_diagonal():
    block_mask = create_block_mask(masks.causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    layout = inspection.block_layout(block_mask)  # (4, 4)
    expected = torch.tensor([[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]], dtype=torch.int8)
    assert torch.equal(layout, expected)


def test_block_layout_matches_the_dense_mask_for_every_pattern():
    for kind in masks.SPEC_KINDS:
        pattern = inspection.make_pattern(kind, 48, batch=2, window=10, prefix_len=12, num_docs=3)
        block_mask = create_block_mask(pattern.visible, 2, None, 48, 48, device="cpu", BLOCK_SIZE=8)
        dense = masks.dense_mask(pattern.visible, 2, 1, 48, 48, "cpu")[0, 0]  # (48, 48)
        blocks = dense.reshape(6, 8, 6, 8).permute(0, 2, 1, 3).reshape(6, 6, 64)  # (Q blocks, KV blocks, 64)
        expected = torch.where(blocks.all(-1), 2, torch.where(blocks.any(-1), 1, 0)).to(torch.int8)
        assert torch.equal(inspection.block_layout(block_mask), expected), kind


def test_document_pattern_packs_the_requested_number_of_documents():
    pattern = inspection.make_pattern("document", 40, batch=3, num_docs=4)
    assert pattern.document_ids.shape == (3, 40)
    assert pattern.document_ids[0].unique().tolist() == [0, 1, 2, 3]
    assert (pattern.document_ids.diff(dim=-1) >= 0).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kind": "diagonal"}, "unknown pattern"), ({"kind": "document", "num_docs": 0}, "unknown mask 'document:0'")],
)
def test_make_pattern_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        inspection.make_pattern(seq_len=16, **kwargs)


def test_every_implementation_passes_the_oracle_and_reports_ops():
    pattern = inspection.make_pattern("sliding_window", 32, window=5)
    torch.manual_seed(0)
    shared = inspection.build("from_scratch", None, d_model=32, num_heads=4, seq_len=32).state_dict()
    x = torch.randn(2, 32, 32)  # (B, T, d_model)
    for name in ("from_scratch", "sdpa", "flex"):
        module = inspection.build(name, shared, d_model=32, num_heads=4, seq_len=32, mask_mod=pattern.mask_mod)
        check = check_module(module, x)
        assert check.passes, check.problem
        assert 0 <= check.mean_error <= check.max_error < 1e-5
        with torch.no_grad():
            ops = inspection.profile_ops(lambda m=module: m(x), device="cpu", top=3)
        assert 1 <= len(ops) <= 3
        assert all(op.calls >= 1 and math.isfinite(op.self_us) for op in ops)


#: Every name the notebook's controls cell defines: an override of one replaces the whole cell.
_CONTROLS = (
    "batch",
    "block_size",
    "dtype_name",
    "head_dim",
    "impl",
    "interpreted",
    "num_docs",
    "num_heads",
    "pattern_kind",
    "prefix_len",
    "run_interpreted",
    "runnable",
    "seq_len",
    "window",
)


@pytest.mark.parametrize("name", ["from_scratch", "sdpa", "flex"])
def test_core_module_is_the_attention_core_over_its_input(name):
    """Identity projections: the module's output is causal attention over x = [q | k | v] itself."""
    module = inspection.core_module(name, num_heads=2, head_dim=8, seq_len=16)
    x = torch.randn(3, 16, 48)  # (B, T, [q | k | v])
    q, k, v = (part.unflatten(-1, (2, 8)).transpose(1, 2) for part in x.split(16, dim=-1))  # 3 x (B, H, T, hd)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
    with torch.no_grad():
        actual = module(x)  # (B, T, 16)
    torch.testing.assert_close(actual, expected.transpose(1, 2).flatten(2))
    assert not module.training


@pytest.fixture(scope="module")
def notebook():
    """The notebook's app and the definitions of one run with its default controls (each run
    takes seconds: the tests below rerun it only with the controls they change)."""
    pytest.importorskip("marimo")
    spec = importlib.util.spec_from_file_location("attention_notebook", NOTEBOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, defs = module.app.run()
    return module.app, defs


def test_notebook_runs_every_cell(notebook):
    _, defs = notebook
    runnable = {name for name, cls in attention.implementations().items() if cls.unavailable("cpu") is None}
    assert set(defs["errors"]) == runnable >= {"from_scratch", "flex", "sdpa"}  # and triton, where installed
    assert all(e.passes for e in defs["errors"].values())
    interpreted = {name for name in runnable if attention.implementations()[name].runs_interpreted("cpu")}
    assert set(defs["interpreted"]) == interpreted
    assert defs["weights"].shape == (4, 128, 128)


def test_notebook_leaves_interpreted_implementations_out_when_switched_off(notebook):
    app, defs = notebook
    if not defs["interpreted"]:
        pytest.skip("no implementation runs interpreted here (triton is not installed or its interpreter fails)")
    chosen = defs["interpreted"][0]
    overrides = {name: defs[name] for name in _CONTROLS}
    overrides |= {"run_interpreted": SimpleNamespace(value=False), "impl": SimpleNamespace(value=chosen)}

    outputs, off = app.run(defs=overrides)
    assert set(off["errors"]) == set(defs["runnable"]) - set(defs["interpreted"])
    assert all(e.passes for e in off["errors"].values())
    shown = " ".join(str(getattr(output, "text", output)) for output in outputs)  # the cells' HTML
    assert f"<code>{chosen}</code> not run: switched off above" in shown  # the accuracy table's note
    assert f"<code>{chosen}</code> is not run: switched off above" in shown  # the error map, stopped


def test_notebook_leaves_out_what_cannot_compute_the_chosen_dtype(notebook):
    """bfloat16 on CPU: triton's interpreter refuses it, so the notebook names why and runs the
    rest, instead of failing three cells."""
    app, defs = notebook
    refusing = [n for n in defs["runnable"] if attention.get(n).dtype_unsupported(torch.bfloat16, "cpu") is not None]
    if not refusing:
        pytest.skip("every implementation that runs here computes bfloat16 on CPU")
    overrides = {name: defs[name] for name in _CONTROLS}
    overrides |= {"dtype_name": SimpleNamespace(value="bfloat16"), "impl": SimpleNamespace(value=refusing[0])}

    outputs, bf16 = app.run(defs=overrides)
    assert set(bf16["errors"]) == set(defs["runnable"]) - set(refusing)
    assert all(e.passes for e in bf16["errors"].values())
    shown = " ".join(str(getattr(output, "text", output)) for output in outputs)
    assert f"<code>{refusing[0]}</code> not run: runs fp16 or fp32 on CPU (interpreted), not torch.bfloat16" in shown
    assert f"<code>{refusing[0]}</code> is not run: runs fp16 or fp32" in shown  # the error map, stopped
