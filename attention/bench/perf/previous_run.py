"""The last run's result files in ``--out``, set aside while a new run starts.

A new run must not leave an earlier run's verdicts or cases beside its own, but a run that pytest
refuses before it runs anything (a mistyped flag, a ``-k`` that selects no case) must not cost
the earlier run's results either. So they are moved into a folder of their own, put back if the
run is refused, and dropped once its first pytest run has started timing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import confirm

#: What one run writes in ``--out`` besides its ``run-N.json``.
RESULT_FILES = ("summary.txt", "summary.md", "ab.json", "ab.png", "cases.jsonl", "pytest.log", confirm.FILE)
RESULT_PATTERNS = ("confirm-*.json", "confirm-*-cases.txt")
#: The folder inside ``--out`` that holds them meanwhile.
ASIDE = ".previous-run"


class PreviousRun:
    def __init__(self, out: Path, repeat: int) -> None:
        """Move the result files of a run of ``repeat`` rounds into ``out``'s :data:`ASIDE` folder."""
        self.out = out
        self.aside = out / ASIDE
        shutil.rmtree(self.aside, ignore_errors=True)  # left by a run that was killed before it dropped them
        self.aside.mkdir()
        names = [*RESULT_FILES, *(f"run-{i}.json" for i in range(1, repeat + 1))]
        found = [out / name for name in names] + [p for pattern in RESULT_PATTERNS for p in out.glob(pattern)]
        for path in found:
            if path.is_file():
                path.replace(self.aside / path.name)

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
