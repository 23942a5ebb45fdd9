"""One-token decode against a KV cache, MHA and GQA: latency and GB/s of KV read (docs/design.md#decode-case)."""

KIND = "decode"


def test_decode(benchmark, case, run_case):
    run_case(benchmark, case)
