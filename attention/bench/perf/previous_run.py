"""The last run's result files in ``--out``, set aside while a new run starts.

A new run must not leave an earlier run's verdicts or cases beside its own, but a run that pytest
refuses before it runs anything (a mistyped flag, a ``-k`` that selects no case) must not cost
the earlier run's results either. So they are moved into a folder of their own, put back if the
run is refused, and dropped once its first pytest run has started timing::

    with PreviousRun(out, names) as previous:  # put back if the block raises before drop()
        ...  # the first pytest run, refused or not
        previous.drop()
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from . import confirm

#: What a grid run writes in ``--out`` besides its ``run-N.json``.
GRID_FILES = ("summary.txt", "summary.md", "ab.json", "ab.png", "cases.jsonl", "pytest.log", confirm.FILE)
GRID_PATTERNS = ("confirm-*.json", "confirm-*-cases.txt")
#: The folder inside ``--out`` that holds them meanwhile.
ASIDE = ".previous-run"


class PreviousRun:
    def __init__(self, out: Path, names: Iterable[str], patterns: Iterable[str] = ()) -> None:
        """Move the files of ``out`` named ``names`` or matching ``patterns`` (globs) into its
        :data:`ASIDE` folder."""
        self.out = out
        self.aside = out / ASIDE
        shutil.rmtree(self.aside, ignore_errors=True)  # left by a run that was killed before it dropped them
        self.aside.mkdir()
        found = [out / name for name in names] + [p for pattern in patterns for p in out.glob(pattern)]
        for path in found:
            if path.is_file():
                path.replace(self.aside / path.name)

    def __enter__(self) -> PreviousRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Put the files back if the block raised before :meth:`drop` (a refused run), else drop them."""
        if exc_type is None:
            self.drop()
        else:
            self.restore()

    def restore(self) -> None:
        """Put them back (the new run was refused before it ran); nothing once dropped."""
        if not self.aside.is_dir():
            return
        for path in self.aside.iterdir():
            path.replace(self.out / path.name)
        self.aside.rmdir()

    def drop(self) -> None:
        """Delete them: the new run has started, and its files replace them."""
        shutil.rmtree(self.aside, ignore_errors=True)
