"""The perf suite's machinery, importable (and tested) without a GPU.

* :mod:`.machine`: which GPU and software a run is on, the baseline key, measured ceilings.
* :mod:`.grid`: the cases (:mod:`attention.bench.workload`) a perf run times.
* :mod:`.runner`: time one case under pytest-benchmark and fill its ``extra_info``.
* :mod:`.probe`: which SDPA backend ran, whether flex ran fused.
* :mod:`.guards`: turn silent fallbacks and impossible numbers into failures.
* :mod:`.results`: read run and baseline JSON (clear errors on corrupt files), refuse mismatches.
* :mod:`.compare`: thresholds, regression/improvement verdicts, spread -> thresholds.
* :mod:`.flags`: what ``--benchmark-compare[=X]`` means; pytest-benchmark's flags that work,
  are applied or are refused.
* :mod:`.revision`: a git revision in a temporary worktree, its package imported under another name.
* :mod:`.base_revision`: the A/B's base side: each implementation at REV of its own repository.
* :mod:`.ab`: A/B verdicts (interval of the median per-round ratio), Markdown summary, plot.
* :mod:`.stats`: the statistics of both gates (Mann-Whitney U, the interval of a median paired
  ratio); :mod:`.case_patterns`: their files' per-case pattern lists.
* :mod:`.report`: the tables a run prints.
* :mod:`.plugin`: the pytest plugin (options, cases, timer, guards, the A/B); :mod:`.state`: a run's state.
* :mod:`.cases`: the grid's test modules, run from any directory.
* :mod:`.launcher`: runs pytest (time limits, salvage, ``--gpus``); :mod:`.facts`: GPU facts, in a child.
* :mod:`.cli`: ``python -m attention.bench.perf`` (what ``nox -s perf`` runs); :mod:`.previous_run`: the last run's
  files in ``--out``, set aside while a run starts.
"""
