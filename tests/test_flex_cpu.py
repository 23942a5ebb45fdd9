"""Flex off CUDA: torch's dense reference, run without dynamo's trace (docs/design.md#flex-on-cpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask

from attention import MHAPyTorchFlexAttention, flex, masks, score_mods

pytestmark = pytest.mark.skipif(
    not hasattr(torch_flex, flex._UNTRACED_SWITCH), reason="this torch has no switch to run flex untraced"
)


def graphs_traced() -> int:
    return counters["stats"]["unique_graphs"]


# torch's eager flex warns that it is not compiled: this test calls it so on purpose, as the reference.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_untraced_calls_compute_what_the_traced_reference_computes():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 16)  # (B, H, T, D)
    k, v = torch.randn(2, 2, 37, 16), torch.randn(2, 2, 37, 16)  # (B, H_kv, T, D): GQA
    block_mask = create_block_mask(masks.sliding_window(9), None, None, 37, 37, device="cpu")
    args = (q, k, v, block_mask, 0.25, True, {}, score_mods.generate_alibi(4))
    torch._dynamo.reset()  # nothing cached from earlier tests: the traced call below must trace
    traced_before = graphs_traced()
    traced = flex._flex_attention(*args)  # (B, H, T, D)
    assert graphs_traced() > traced_before  # torch's eager path traces: the cost avoided below
    before = graphs_traced()
    with flex.untraced_flex():
        untraced = flex._flex_attention(*args)  # (B, H, T, D)
    assert graphs_traced() == before
    assert torch.equal(untraced, traced)


def test_the_module_on_cpu_traces_nothing_for_new_shapes_patterns_and_cache_offsets():
    before = graphs_traced()
    for window in (3, 5):
        module = MHAPyTorchFlexAttention(8, 16, 2, 32, mask_mod=masks.sliding_window(window)).eval()
        x = torch.randn(1, 20, 8)  # (B, T, d_in)
        cache = module.make_kv_cache(1, 20)
        with torch.no_grad():
            module(x)
            module(x[:, :7], kv_cache=cache)
            for t in range(7, 10):
                module(x[:, t : t + 1], kv_cache=cache)
    assert graphs_traced() == before


def test_the_switch_is_restored_after_nested_calls_and_errors():
    saved = getattr(torch_flex, flex._UNTRACED_SWITCH)
    with flex.untraced_flex():
        with flex.untraced_flex():
            assert getattr(torch_flex, flex._UNTRACED_SWITCH) is True
        assert getattr(torch_flex, flex._UNTRACED_SWITCH) is True  # the outer call is still inside
    assert getattr(torch_flex, flex._UNTRACED_SWITCH) == saved

    with pytest.raises(RuntimeError, match="kernel failed"), flex.untraced_flex():
        raise RuntimeError("kernel failed")
    assert getattr(torch_flex, flex._UNTRACED_SWITCH) == saved


def test_a_compiled_caller_compiles_flex_itself_and_computes_the_same():
    torch.manual_seed(0)
    module = MHAPyTorchFlexAttention(8, 16, 2, 24, mask_mod=masks.sliding_window(5)).eval()
    x = torch.randn(2, 24, 8)  # (B, T, d_in)
    with torch.no_grad():
        eager = module(x)  # (B, T, d_out)
        compiled = torch.compile(module, backend="eager", fullgraph=True)(x)  # (B, T, d_out)
    torch.testing.assert_close(compiled, eager)
    assert getattr(torch_flex, flex._UNTRACED_SWITCH) is False
