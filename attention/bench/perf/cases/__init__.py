"""The perf grid's test modules, one per kind of case, parametrised by :mod:`attention.bench.perf.plugin`.

They ship in the package so the grid runs from any directory:
``pytest --pyargs attention.bench.perf.cases -p attention.bench.perf.plugin`` (what
``python -m attention.bench.perf run`` launches).
"""
