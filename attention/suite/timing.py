"""Where a test run's time went: the slowest test files, summed over workers, at the end.

A report, not an assertion: the next slowdown shows in every run's last lines
(``--slowest-files N``; ``nox -s tests`` asks for it).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest


class SlowestFiles:
    """A pytest plugin object: sums each report's duration (setup, call, teardown) by file. Under
    xdist the controller receives every worker's reports, so the sums cover the whole run."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.tests: Counter[str] = Counter()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        path = report.nodeid.split("::")[0]
        self.seconds[path] += report.duration
        if report.when == "call" or (report.when == "setup" and report.skipped):
            self.tests[path] += 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        total = sum(self.seconds.values())
        slowest = sorted(self.seconds.items(), key=lambda item: -item[1])[: self.count]
        terminalreporter.write_sep("=", f"slowest {len(slowest)} test files (test time summed over workers)")
        for path, seconds in slowest:
            share = seconds / total if total else 0.0
            terminalreporter.write_line(f"{seconds:8.1f} s {share:5.0%}  {self.tests[path]:5d} tests  {path}")
        terminalreporter.write_line(f"{total:8.1f} s  100%  {sum(self.tests.values()):5d} tests  all files")
