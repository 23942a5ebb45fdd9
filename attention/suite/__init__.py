"""The property suite, shipped: ``pytest --pyargs attention.suite --attention-impl NAME``.

Hypothesis property tests (shape, causality, equivalence with the float64 oracle, ``state_dict``
interchange, KV-cache decoding, generation, masks, score mods, bad input) over every selected
implementation; :mod:`attention.suite.plugin` selects them and skips what they do not declare.
"""
