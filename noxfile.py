"""Sessions for a laptop, CPU CI and GPU runners alike.

Every session that needs torch runs in one shared environment, ``.nox/env``: torch is installed
once, not once per session, and pip runs only when that environment lacks an extra or a
dependency group a session needs or ``pyproject.toml`` changed since it last ran. Where a system
(not virtualenv) Python already has torch (a GPU box with a CUDA build, a conda env), the
environment is made on top of it (``--system-site-packages``): that torch is used, nothing is
downloaded, and the rest installs into ``.nox/env``. Torch in a virtualenv of yours: ``nox --no-venv -s NAME`` runs a
session in the interpreter running nox, with the checkout importable, and installs nothing.
``lint`` installs its dependency group alone, beside; ``typecheck`` adds its own to ``.nox/env``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2024.10"
nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
# nox logs "uv binary not found." each time it looks for uv, which no session here uses.
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")

PYPROJECT = nox.project.load_toml("pyproject.toml")
HERE = Path(__file__).resolve().parent
#: pytest's workers: one per core; a worker left with nothing takes half of another's queue
#: (worksteal), so a few long cases queued on one worker do not make the run's tail
#: (docs/design.md#suite-sizing).
PARALLEL = ["-n", "auto", "--dist", "worksteal"]
#: The one environment of every session that needs torch.
ENV = HERE / ".nox" / "env"
STAMP = ENV / "attention-installed.json"


def _python_with_torch() -> str | None:
    """A base interpreter (not itself a virtualenv, whose packages --system-site-packages would
    not see) that already imports torch: the one running nox, else the ``python3`` on PATH."""
    probe = "import sys, torch; sys.exit(sys.prefix != sys.base_prefix)"
    for python in (sys.executable, shutil.which("python3")):
        if python and subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
            return python
    return None


def _bin(name: str) -> str:
    return str(ENV / "bin" / name)


def _shared_env(session: nox.Session, extras: set[str], groups: set[str]) -> dict[str, str]:
    """Make or top up ``.nox/env`` with the package, ``extras`` and dependency ``groups``; the
    variables that run in it."""
    digest = hashlib.sha256((HERE / "pyproject.toml").read_bytes()).hexdigest()
    installed = json.loads(STAMP.read_text()) if STAMP.exists() else {}
    if not (ENV / "bin" / "python").exists():
        base = _python_with_torch()
        if base:
            session.log(f"using the torch of {base} (--system-site-packages)")
            session.run(base, "-m", "venv", "--system-site-packages", str(ENV), external=True)
        else:
            session.run(sys.executable, "-m", "venv", str(ENV), external=True)
        installed = {}
    if installed.get("pyproject") != digest:
        installed = {}
    have, have_groups = set(installed.get("extras", [])), set(installed.get("groups", []))
    if not (extras <= have and groups <= have_groups):
        wanted, wanted_groups = sorted(extras | have), sorted(groups | have_groups)
        requirements = nox.project.dependency_groups(PYPROJECT, *wanted_groups)
        package = f".[{','.join(wanted)}]"
        session.run(_bin("python"), "-m", "pip", "install", "-q", "-e", package, *requirements, external=True)
        STAMP.write_text(json.dumps({"pyproject": digest, "extras": wanted, "groups": wanted_groups}))
    return {"VIRTUAL_ENV": str(ENV), "PATH": os.pathsep.join([str(ENV / "bin"), os.environ.get("PATH", "")])}


def _runner(session: nox.Session, extras: set[str], groups: set[str] | None = None) -> tuple[str, dict[str, str]]:
    """The Python a session runs and its variables: the shared environment, or under ``--no-venv``
    the interpreter running nox, as it is, with the checkout importable."""
    # nox has no public flag for --no-venv once a session's own backend is "none".
    if session._runner.global_config.no_venv:
        return sys.executable, {"PYTHONPATH": str(HERE)}
    return _bin("python"), _shared_env(session, extras, groups or set())


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """All tests: CPU, and CUDA where present; deterministic (Hypothesis profile ``quick``).

    One worker per core. Args go to pytest (``-n 0`` runs them in one process)."""
    python, env = _runner(session, {"test", "perf", "notebook"})  # tests/ also covers perf and the notebook
    session.run(python, "-m", "pytest", *PARALLEL, "--slowest-files=10", *session.posargs, env=env, external=True)


@nox.session(venv_backend="none")
def no_triton(session: nox.Session) -> None:
    """The triton tests with triton hidden, as where it is absent: each skips with why or passes.

    Where triton is not installed, or not on this platform, every test whose id names triton must
    skip with the reason or pass, and ``unavailable()`` say so.
    A sitecustomize puts ``None`` in ``sys.modules["triton"]``, which ``import triton`` and
    ``importlib.util.find_spec`` both read as absent, in pytest and its subprocesses alike."""
    python, env = _runner(session, {"test", "perf", "notebook"})
    blocker = HERE / ".nox" / "no_triton"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "sitecustomize.py").write_text('import sys\n\nsys.modules["triton"] = None\n')
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))}
    check = "import attention; r = attention.get('triton').unavailable('cpu'); assert 'not installed' in str(r), r"
    session.run(python, "-c", check, env=env, external=True)
    session.run(
        python, "-m", "pytest", "attention/suite", "tests", "-k", "triton", *session.posargs, env=env, external=True
    )


@nox.session(default=False)
def lowest_torch(session: nox.Session) -> None:
    """The property suite on the oldest torch ``pyproject.toml`` admits, in its own environment.

    Its ``torch>=X.Y``: the newest X.Y.* CPU wheel, for the library's own implementations on
    CPU; the triton tests are deselected (each torch brings its own triton). Args go to pytest
    (docs/design.md#torch-floor)."""
    floor = next(dep.split(">=")[1] for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("torch>="))
    env = {"PIP_CONSTRAINT": ""}  # .ci/run's pin is for the newest torch
    cpu = "https://download.pytorch.org/whl/cpu"
    session.install(f"torch=={floor}.*", "--extra-index-url", cpu, env=env)
    session.install("-e", ".[test]", env=env)
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    session.run("pytest", *PARALLEL, "attention/suite", "-k", "not triton", *session.posargs)


@nox.session(venv_backend="none")
def explore(session: nox.Session) -> None:
    """The property suite with fresh random draws and deep search: the nightly run.

    Hypothesis profile ``thorough``, failures remembered in .hypothesis/; yours after a change too.
    Args go to pytest."""
    python, env = _runner(session, {"test", "perf", "notebook"})
    env = {**env, "HYPOTHESIS_PROFILE": os.environ.get("HYPOTHESIS_PROFILE", "thorough")}
    session.run(python, "-m", "pytest", *PARALLEL, "attention/suite", *session.posargs, env=env, external=True)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check; zizmor on the workflows (offline: no GitHub API calls)."""
    if session.venv_backend != "none":
        session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("zizmor", "--offline", ".github/workflows")


@nox.session(venv_backend="none")
def typecheck(session: nox.Session) -> None:
    """mypy on the library (``[tool.mypy]`` in pyproject.toml).

    In the shared environment, with the
    ``typecheck`` group there, not beside like ``lint``: mypy reads torch's types from the torch the
    code runs on. Args go to mypy."""
    python, env = _runner(session, {"test", "perf", "notebook"}, {"typecheck"})  # the tests' extras: one pip run
    session.run(python, "-m", "mypy", *session.posargs, env=env, external=True)


@nox.session(default=False)
def actionlint(session: nox.Session) -> None:
    """actionlint on the workflows (not part of ``lint``: it downloads a binary).

    Its package downloads the actionlint binary from GitHub while
    it installs, so this is not part of ``lint``: the lint workflow job runs both."""
    if session.venv_backend != "none":
        session.install(*nox.project.dependency_groups(PYPROJECT, "actionlint"))
    session.run("actionlint")


@nox.session(venv_backend="none")
def benchmark(session: nox.Session) -> None:
    """The benchmark report (time, memory, accuracy vs sequence length). Args go to it: -- --help."""
    python, env = _runner(session, {"bench"})
    session.run(python, "-m", "attention.bench", *session.posargs, env=env, external=True)


@nox.session(venv_backend="none")
def notebook(session: nox.Session) -> None:
    """Run notebooks/explore_attention.py headless and export it to HTML; any cell error fails the session.

    Arg: the output file (default out/notebook.html).
    """
    python, env = _runner(session, {"bench", "notebook"})
    out = session.posargs[0] if session.posargs else "out/notebook.html"
    # marimo puts the notebook's folder on sys.path, not the repo root: under --no-venv nothing
    # is installed, so point Python at the checkout.
    env = {**env, "PYTHONPATH": str(HERE)}
    session.run(
        python,
        "-m",
        "marimo",
        "export",
        "html",
        "notebooks/explore_attention.py",
        "-o",
        out,
        "-f",
        env=env,
        external=True,
    )


@nox.session(venv_backend="none", default=False)
def perf(session: nox.Session) -> None:
    """GPU perf grid (pytest-benchmark), JSON under .benchmarks/attention-perf/ (or --out DIR).

    -- --benchmark-compare: compare with perf/baselines/<this GPU>/ and fail on regressions.
    -- --record: make this run the baseline for this GPU (commit perf/baselines/<gpu>/).
    -- --repeat 3: run three times and derive per-case thresholds from the spread.
    -- --benchmark-compare=main: same-run A/B of main against the working tree.
    -- --impl NAME|module:attr: time only that implementation (and the references).
    --grid quick: under half of the grid (D=128, three lengths, fewer decode contexts, one mask).
    Other args go to pytest (-k flex, --perf-graphs=fwd). Without CUDA it runs a tiny CPU grid to
    show the machinery working and compares nothing. See perf/README.md.
    """
    python, env = _runner(session, {"perf"})
    env = {**env, "PYTHONPATH": str(HERE)}
    session.run(python, "-m", "attention.bench.perf", "run", *session.posargs, env=env, external=True)
