"""pytest-benchmark's own flags under the perf suite, and what ``--benchmark-compare[=X]`` means.

Every ``--benchmark-*`` flag either works, is applied the perf suite's way, or is refused at once
with the reason: never silently ignored, never a crash after the grid ran.

``--benchmark-compare[=X]`` resolves in this order (perf/README.md, "Two gates"):

1. no value: this GPU's committed baseline (``perf/baselines/<gpu>/``), recorded with this torch
   minor version; without one, refuse before any case runs and name both ways on;
2. a saved-run number or id in pytest-benchmark's storage (``--benchmark-save`` made it): that
   run, compared by pytest-benchmark itself, as pytest-benchmark means the flag;
3. a path to a JSON file: a run or baseline to compare with, as a committed baseline;
4. otherwise a git revision (``main``, ``origin/main``, ``HEAD~1``, a SHA): the same-run A/B of
   that revision against the working tree, on this GPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ... import checks
from .results import BASELINE_FILE, NoBaseline, PerfError, Refused, load_run

#: Flags perf applies its own way: each maps to the runner option it sets.
APPLIED = {
    "--benchmark-min-rounds": "min_rounds",  # rounds per case at least this many
    "--benchmark-max-time": "budget_s",  # timed seconds per case
    "--benchmark-warmup-iterations": "warmup",  # untimed calls before timing (compilation)
}
#: Flags that cannot mean anything here, with why.
REFUSED = {
    "--benchmark-timer": (
        "perf times CUDA work with CUDA events; a host timer reads the launch, not the kernel "
        "(docs/design.md#wall-clock-timer)"
    ),
    "--benchmark-min-time": "perf sets each case's rounds from --benchmark-max-time (or --perf-budget)",
    "--benchmark-calibration-precision": "perf times one call per round; there is no loop to calibrate",
    "--benchmark-cprofile": "the timed work runs on the GPU; perf records each case's kernels already (torch.profiler)",
}
#: Flags that are accepted but change nothing, with why (printed, so never silent).
NOTED = {
    "--benchmark-warmup": "perf always warms every case up (compiles) before timing it",
}
HISTOGRAM = "--benchmark-histogram"
COMPARE = "--benchmark-compare"
COMPARE_FAIL = "--benchmark-compare-fail"
GRID = "--perf-grid"


class FlagRefused(PerfError):
    pass


def given(args: Sequence[str], flag: str) -> list[str | None]:
    """Values ``flag`` was given in ``args`` (``None`` for a bare ``--flag``), in order.

    Only the ``--flag=value`` form carries a value: in ``--flag value`` the next word may as well
    be a test path, so it is read as bare (pytest-benchmark's own flags that take values are all
    passed with ``=`` in our docs and CLI)."""
    values: list[str | None] = []
    for arg in args:
        if arg == flag:
            values.append(None)
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def take_grid(grid: str | None, extra: Sequence[str]) -> tuple[str | None, list[str]]:
    """``grid`` (``--grid``) with pytest's ``--perf-grid=NAME`` among ``extra`` folded into it, and
    ``extra`` without it. The launcher plans, shards and sizes a run by the grid it is told, so a
    grid named to pytest only would run cases the plan never saw (the CPU machinery grid would
    silently become a GPU-sized one). Named twice, differently: refused."""
    from .grid import GRIDS

    values = given(extra, GRID)
    if None in values:
        raise FlagRefused(f"{GRID} takes its value after '=': {GRID}=quick (or --grid quick)")
    if bad := [v for v in values if v not in GRIDS]:
        raise FlagRefused(f"{GRID}={bad[0]}: choose one of {', '.join(GRIDS)}")
    if len(named := set(values) | ({grid} if grid else set())) > 1:
        raise FlagRefused(f"two grids named ({', '.join(sorted(named))}): give one, with --grid")
    rest = [a for a in extra if not a.startswith(GRID + "=")]
    return (next(iter(named)) if named else None), rest


def check_native(args: Sequence[str]) -> list[str]:
    """Refuse (:class:`FlagRefused`) what cannot work; return notes for what is accepted as is."""
    for flag, why in REFUSED.items():
        if any(a == flag or a.startswith(flag + "=") or a.startswith(flag + "-") for a in args):
            raise FlagRefused(f"{flag} is not supported by the perf suite: {why}")
    if given(args, HISTOGRAM):
        try:
            import pygal  # noqa: F401
            import pygaljs  # noqa: F401
        except ImportError:
            raise FlagRefused(
                f"{HISTOGRAM} needs pytest-benchmark's histogram extra: pip install 'pytest-benchmark[histogram]'"
            ) from None
    return [f"{flag}: {why}" for flag, why in NOTED.items() if given(args, flag)]


def check_native_compare_fail(exprs: Sequence[str]) -> None:
    """pytest-benchmark's own ``--benchmark-compare-fail`` syntax, checked before the grid runs
    (pytest-benchmark itself only complains after it)."""
    for expr in exprs:
        if not re.fullmatch(r"(min|max|mean|median|stddev|iqr):\d+(\.\d+)?%?", expr or "", re.ASCII):
            raise FlagRefused(f"{COMPARE_FAIL}={expr}: pytest-benchmark expects STAT:NUM or STAT:NUM%, e.g. mean:5%")


def compare_fail_fraction(exprs: Sequence[str]) -> float | None:
    """``--benchmark-compare-fail=median:5%`` -> 0.05, the change that fails a case; ``None`` if
    not given. The perf gates judge medians, relative to the other side: any other statistic or an
    absolute threshold is refused."""
    fractions = []
    for expr in exprs:
        match = re.fullmatch(r"median:(\d+(?:\.\d+)?)%", expr or "", re.ASCII)  # not '٥' read as 5
        if not match:
            raise FlagRefused(
                f"{COMPARE_FAIL}={expr}: the perf gates judge medians against the other side; "
                "give it as median:<percent>%, e.g. median:5%"
            )
        fractions.append(float(match.group(1)) / 100)
    return min(fractions) if fractions else None


@dataclass(frozen=True)
class CompareTarget:
    """What ``--benchmark-compare[=X]`` resolved to: ``kind`` is ``"baseline"`` (``path`` is the
    baseline JSON), ``"saved"`` (``value`` goes to pytest-benchmark), ``"file"`` (``path``) or
    ``"revision"`` (``value`` is the revision as given)."""

    kind: str
    value: str | None = None
    path: Path | None = None


def saved_run(value: str, storage: Path) -> Path | None:
    """The pytest-benchmark saved run that ``value`` (``7``, ``0007`` or ``0007_<id prefix>``) names."""
    prefix = f"{int(value):04d}" if checks.is_ascii_number(value) else value
    if not re.fullmatch(r"\d{4}(_[\w.-]*)?", prefix, re.ASCII) or not storage.is_dir():
        return None
    matches = sorted(p for p in storage.glob("*/*.json") if p.name.startswith(prefix))
    return matches[-1] if matches else None


def resolve_compare(
    value: str | None,
    *,
    baselines: Path,
    storage: Path,
    machine: dict | None,
) -> CompareTarget:
    """Resolve ``--benchmark-compare[=value]`` (see the module docstring) without running anything.

    ``machine``: :func:`.machine.machine_info` of this device (``None`` without CUDA). Raises
    :class:`NoBaseline`/:class:`Refused` for a bare flag this GPU and torch have no baseline for.
    Revisions are checked by the caller (git), which knows the repository."""
    if value is None:
        return CompareTarget("baseline", path=_own_baseline(baselines, machine))
    if (saved := saved_run(value, storage)) is not None:
        # pytest-benchmark looks a number up in its own machine folder only; the file is unambiguous.
        return CompareTarget("saved", value=str(saved))
    path = Path(value)
    if value.endswith(".json") or path.is_file():
        if not path.is_file():
            raise PerfError(f"{COMPARE}={value}: no such file")
        return CompareTarget("file", path=path)
    return CompareTarget("revision", value=value)


def _own_baseline(baselines: Path, machine: dict | None) -> Path:
    ways = (
        "Either record a baseline for it (`nox -s perf -- --repeat 3 --record`, then commit "
        f"{baselines}/<gpu>/), or compare two revisions on this GPU now, no baseline needed: "
        "`nox -s perf -- --benchmark-compare=main` (any git revision)."
    )
    if machine is None or machine.get("device") != "cuda":
        raise NoBaseline(f"{COMPARE} needs a CUDA GPU: baselines are per GPU model. {ways}")
    path = Path(baselines) / machine["slug"] / BASELINE_FILE
    if not path.is_file():
        raise NoBaseline(f"no committed baseline for {machine['gpu_name']} ({path} does not exist). {ways}")
    recorded = load_run(path).machine
    if recorded.get("torch_minor") != machine["torch_minor"]:
        raise Refused(
            f"the {machine['gpu_name']} baseline ({path}) was recorded with torch {recorded.get('torch')}; "
            f"this is torch {machine['torch']}, whose kernels may differ. {ways}"
        )
    return path
