"""Sliding-window and document masks: flex's block sparsity against SDPA's dense mask (docs/design.md#mask-cases)."""

KIND = "mask"


def test_mask(benchmark, case, run_case):
    run_case(benchmark, case)
