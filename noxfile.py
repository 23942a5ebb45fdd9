"""Sessions for a laptop, CPU CI and GPU runners alike.

By default each session builds its own virtualenv and installs the package (torch included)
plus its dependency group from ``pyproject.toml``. On a machine that already has torch (a GPU
runner with a CUDA build preinstalled, maybe without network) run ``nox --no-venv -s NAME``:
the session then uses the current interpreter and installs nothing.
"""

from __future__ import annotations

import nox

nox.needs_version = ">=2024.10"
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def install(session: nox.Session, *groups: str, package: bool = True, extras: str = "") -> None:
    """Install the package and dependency ``groups``, unless the session reuses the interpreter."""
    if session.venv_backend == "none":
        return
    if package:
        session.install("-e", f".{extras}")
    for group in groups:
        session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """Property tests on CPU, and on CUDA where present. Args go to pytest."""
    install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    install(session, "lint", package=False)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
