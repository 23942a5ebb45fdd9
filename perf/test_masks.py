"""Sliding-window and document masks: flex's block sparsity against SDPA's dense mask (issue 5)."""

KIND = "mask"


def test_mask(benchmark, case, run_case):
    run_case(benchmark, case)
