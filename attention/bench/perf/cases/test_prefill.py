"""Prefill and training: attention core and whole module, forward and forward+backward (docs/design.md#prefill-grid)."""

KIND = "prefill"


def test_prefill(benchmark, case, run_case):
    run_case(benchmark, case)
