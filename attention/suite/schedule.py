"""The order an xdist worker's collection takes, so long cases do not make a run's tail.

Under ``pytest -n N`` the suite's time is a few hundred cases of seconds each (an implementation
compiling per shape, or running in an interpreter) among many of milliseconds. pytest-xdist hands
each worker a contiguous slice of the collection (``--dist worksteal``: N equal slices; an idle
worker then takes the tail of another's queue), so long cases that sit next to each other in
collection order run one after another on one worker while the others finish early
(docs/design.md#suite-sizing). Every worker computes the same order from the same collection, as
xdist requires; a run without xdist keeps pytest's order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

#: A test the suite starts first under xdist: it runs for many seconds on its own.
COSTLY_MARKER = "attention_costly"


def rank(item: pytest.Item, costly: bool) -> int:
    """0: marked :data:`COSTLY_MARKER`; 1: a ``costly`` case (see :class:`WorkerSchedule`); 2:
    the rest; 3: skipped already (a ``skip`` mark, or a ``skipif`` whose condition is ``True``)."""
    if item.get_closest_marker("skip") or any(_skips(mark) for mark in item.iter_markers("skipif")):
        return 3
    if item.get_closest_marker(COSTLY_MARKER):
        return 0
    return 1 if costly else 2


def _skips(mark: pytest.Mark) -> bool:
    conditions = [*mark.args, *([mark.kwargs["condition"]] if "condition" in mark.kwargs else [])]
    return any(condition is True for condition in conditions)  # a string condition: not evaluated here


def deal(items: list[T], ranks: list[int], workers: int) -> list[T]:
    """``items`` sorted by rank (collection order within a rank), then dealt like cards into
    ``workers`` contiguous runs, one per worker's initial share, each starting with its part of the
    long cases. xdist's worksteal gives the first workers ``len // workers`` items and the last
    ``len % workers`` one more; the runs dealt one card fewer come first to match."""
    ordered = [item for _, _, item in sorted(zip(ranks, range(len(items)), items, strict=True))]
    return [item for first in reversed(range(workers)) for item in ordered[first::workers]]


class WorkerSchedule:
    """A pytest plugin object for an xdist worker: orders the collection that remains after
    deselection (``-m``, ``-k``) by :func:`rank` and :func:`deal`. ``costly`` says whether an item
    is one of the suite's long cases."""

    def __init__(self, workers: int, costly: Callable[[pytest.Item], bool]) -> None:
        self.workers = workers
        self.costly = costly

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        ranks = [rank(item, self.costly(item)) for item in items]
        items[:] = deal(items, ranks, self.workers)
