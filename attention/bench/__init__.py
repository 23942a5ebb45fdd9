"""The tooling around the library: benchmark report, perf gate, notebook helpers.

Needs ``pip install "attention-suite[bench]"`` (matplotlib, rich); the library itself needs torch alone
and never imports this package.

* :mod:`.workload`: one case (prefill, training or decode), described once: sizes, FLOPs, bytes,
  peak-memory estimate, skip reason.
* :mod:`.cost`: FLOP counts, visible mask blocks, the memory model.
* :mod:`.build`: a case's modules, inputs and timed callable (for any revision's implementations).
* :mod:`.timing`: the one GPU timer (CUDA events, L2 flush, CUDA graphs).
* :mod:`.memory`: peak and free memory, measured alike on CUDA and CPU.
* :mod:`.files`: output folders checked before any work, files written whole or not at all.
* :mod:`.sweep` and :mod:`.report`: ``python -m attention.bench``, the benchmark report.
* :mod:`.inspection`: what the notebook shows, as tested functions.
* :mod:`.perf`: the perf gate's machinery, ``python -m attention.bench.perf``.
"""
