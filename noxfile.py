"""Sessions for a laptop, CPU CI and GPU runners alike.

By default each session builds its own virtualenv and installs the package (torch included)
with the extras it needs from ``pyproject.toml`` (``lint`` installs its dependency group alone).
On a machine that already has torch (a GPU runner with a CUDA build preinstalled, maybe without
network) run ``nox --no-venv -s NAME``: the session then uses the current interpreter and
installs nothing.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2024.10"
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
HERE = Path(__file__).resolve().parent


def install(session: nox.Session, extras: str = "", *, group: str | None = None) -> None:
    """Install the package with ``extras`` (e.g. ``"[test]"``), or only the dependency ``group``;
    nothing when the session reuses the interpreter."""
    if session.venv_backend == "none":
        return
    if group is not None:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))
    else:
        session.install("-e", f".{extras}")


@nox.session
def tests(session: nox.Session) -> None:
    """Property tests on CPU, and on CUDA where present, one worker per core. Args go to pytest
    (``-n 0`` runs them in one process)."""
    install(session, "[test,perf]")  # tests/ also covers the perf gate's machinery
    session.run("pytest", "-n", "auto", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    install(session, group="lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def benchmark(session: nox.Session) -> None:
    """The benchmark report (time, memory, accuracy vs sequence length). Args go to it: -- --help."""
    install(session, "[bench]")
    session.run("python", "-m", "attention.bench", *session.posargs)


@nox.session
def notebook(session: nox.Session) -> None:
    """Run notebooks/explore_attention.py headless and export it to HTML; any cell error fails the session.

    Arg: the output file (default out/notebook.html).
    """
    install(session, "[bench,notebook]")
    out = session.posargs[0] if session.posargs else "out/notebook.html"
    # marimo puts the notebook's folder on sys.path, not the repo root: under --no-venv nothing
    # is installed, so point Python at the checkout.
    session.run(
        "marimo", "export", "html", "notebooks/explore_attention.py", "-o", out, "-f", env={"PYTHONPATH": str(HERE)}
    )


@nox.session(default=False)
def perf(session: nox.Session) -> None:
    """GPU perf grid (pytest-benchmark), JSON under .benchmarks/attention-perf/ (or --out DIR).

    -- --benchmark-compare: compare with perf/baselines/<this GPU>/ and fail on regressions.
    -- --record: make this run the baseline for this GPU (commit perf/baselines/<gpu>/).
    -- --repeat 3: run three times and derive per-case thresholds from the spread.
    -- --benchmark-compare=main: same-run A/B of main against the working tree.
    -- --impl NAME|module:attr: time only that implementation (and the references).
    Other args go to pytest (-k flex, --perf-grid=quick, --perf-graphs=all). Without CUDA it runs
    a tiny CPU grid to show the machinery working and compares nothing. See perf/README.md.
    """
    import sys

    install(session, "[perf]")
    # Under --no-venv nothing is installed: the checkout must be importable as is, and the
    # interpreter running nox (the one with torch) runs the grid.
    python = sys.executable if session.venv_backend == "none" else "python"
    session.run(python, "-m", "attention.bench.perf", "run", *session.posargs, env={"PYTHONPATH": str(HERE)})
