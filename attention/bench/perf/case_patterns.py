"""Per-case settings by case-key pattern, as both perf gates' files give them.

A thresholds file (:mod:`.compare`) and a minimum-effects file (:mod:`.ab`) each hold a
``patterns`` list of ``{"match": GLOB, ...settings}`` objects; the settings differ (``time``,
``memory``, ``memory_slack_mib`` there, ``min_effect`` here), so the files keep their own formats
and share the list's rules: one validator, and one lookup where the first matching pattern wins
(specific patterns go before broad ones). Matching is :func:`fnmatch.fnmatchcase` on the case
key: case-sensitive on every platform, so a file means the same on Windows and Linux.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable
from typing import TypeVar

V = TypeVar("V")


def first_match(key: str, patterns: Iterable[tuple[str, V]], default: V) -> V:
    """The value of the first ``(glob, value)`` pair whose glob matches ``key``, else ``default``."""
    for pattern, value in patterns:
        if fnmatch.fnmatchcase(key, pattern):
            return value
    return default


def check_patterns(entries: object, where: str, fields: Collection[str]) -> list[tuple[str, dict]]:
    """``(glob, settings)`` for each entry of a ``patterns`` list, in order; ``ValueError`` naming
    ``where`` (the file), the entry and the field for anything but objects with a non-empty
    ``match`` string and no field outside ``fields``: strict, since a typo in a gate's file must
    not silently loosen it. The settings' values are the caller's to check."""
    if not isinstance(entries, list):
        raise ValueError(f"{where}: field 'patterns': expected a list, got {type(entries).__name__}")
    checked = []
    for i, entry in enumerate(entries):
        at = f"{where}: patterns[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{at}: expected an object, got {type(entry).__name__}")
        if unknown := sorted(set(entry) - {"match", *fields}):
            raise ValueError(f"{at}: unknown field(s) {unknown}")
        match = entry.get("match")
        if not isinstance(match, str) or not match:
            raise ValueError(f"{at}: field 'match': expected a non-empty string, got {match!r}")
        checked.append((match, {k: v for k, v in entry.items() if k != "match"}))
    return checked
