"""``pytest perf`` in this checkout: the grid's test modules ship in the package (attention/bench/perf/cases/)."""

from attention.bench.perf.cases.test_decode import test_decode
from attention.bench.perf.cases.test_masks import test_mask
from attention.bench.perf.cases.test_prefill import test_prefill

__all__ = ["test_decode", "test_mask", "test_prefill"]
