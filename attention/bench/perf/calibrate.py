"""``python -m attention.bench.perf calibrate``: measure the same-run A/B gate on this GPU.

One pytest run of the grid (:mod:`.launcher`, the perf plugin with ``--perf-calibrate``) times
each case's working-tree build, an A/A twin and the twin with injected work of 1, 2, 3 and 5% of
the case's time, rounds rotated (:func:`.runner.run_calibration_case`); :mod:`.calibration` cuts
gate-sized A/B pairs out of those rounds and judges them with the gate's own rule. It prints the
kinds and power tables, then which targets were met and what minimum effect this GPU supports at
``--alpha``, and writes to ``--out``: ``calibration.json`` (every pair), ``calibration.md`` (the
tables, every case), ``calibration.png`` (power against injected slowdown), and the run itself
(``calibration-run.json``, pytest-benchmark's format, samples under each case's
``extra_info.calibration``; ``cases.jsonl`` as it ran).

``calibrate --from OUT/calibration-run.json [--alpha A]`` judges a saved run again, at another
false-alarm rate or minimum-effects file, anywhere (no GPU).

Exit status: 0 calibrated (whether or not the targets were met: it is a measurement, not a gate);
1 some cases failed (the others are calibrated); 2 refused (no CUDA GPU, bad arguments, nothing
calibrated).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..arguments import positive_float
from . import calibration, cli, flags, launcher
from .launcher import say
from .previous_run import PreviousRun
from .results import PerfError, load_run, not_timed

RUN_LABEL = "calibration-run"
NO_CUDA = (
    "calibrate measures the A/B gate on a CUDA GPU and needs one; none here. "
    "A saved calibration run can be judged anywhere: calibrate --from OUT/calibration-run.json"
)
#: What a calibrate run cannot take: it times no second revision and compares with nothing.
REFUSED_PREFIXES = ("--benchmark-compare", "--perf-compare-rev", "--perf-calibrate", "--gpus", "--record")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attention.bench.perf calibrate",
        description="Measure the same-run A/B gate on this GPU: false alarms from A/A pairs, power from "
        "injected slowdowns of 1-5%, and the minimum effect this GPU supports. Arguments it does not know "
        "go to pytest (-k, --perf-graphs, --perf-budget).",
        allow_abbrev=False,
    )
    p.add_argument(
        "--alpha", type=float, default=calibration.DEFAULT_ALPHA,
        help="the false-alarm rate per case to find the minimum effect for (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--out",
        default=None,
        help=(
            "where JSON, tables and plot go (default: $PERF_OUT or .benchmarks/attention-perf/, as for run; "
            "with --from, the run's folder)"
        ),
    )
    p.add_argument("--grid", choices=("full", "quick", "tiny"), default=None, help="default: full on CUDA")
    p.add_argument("--impl", action="append", default=[], metavar="NAME|module:attr", help="as for run")
    p.add_argument(
        "--pairs", type=int, default=calibration.DEFAULT_PAIRS,
        help="A/A tests wanted per kind of case (default %(default)s); kinds with few cases get more runs each",
    )  # fmt: skip
    p.add_argument(
        "--max-depth", type=int, default=calibration.DEFAULT_MAX_DEPTH,
        help="the most gate-sized runs one case is timed for (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--min-effects", default=None, metavar="FILE", help="minimum effects (default: the packaged file)")
    p.add_argument("--from", dest="source", default=None, metavar="RUN.json", help="judge a saved calibration run")
    p.add_argument("--quiet-pytest", action="store_true", help="pytest output to OUT/pytest.log")
    p.add_argument(
        "--time-budget", type=positive_float, default=None, metavar="SECONDS", help="interrupt pytest after this"
    )
    return p


def report(run, args: argparse.Namespace, out: Path, skipped: list[tuple[str, str]]) -> int:
    """Judge ``run``, print the tables and verdicts, write the files; 2, writing nothing, if no case
    was calibrated (a run not made by calibrate holds no calibration samples)."""
    effects = cli.min_effects(args.min_effects)
    cal = calibration.analyze(run, alpha=args.alpha, min_effects=effects, not_calibrated=skipped)
    if not cal.cases:
        first = "; ".join(f"{key}: {why}" for key, why in cal.not_calibrated[:1])
        more = f" (and {len(cal.not_calibrated) - 1} more)" if len(cal.not_calibrated) > 1 else ""
        say(f"ERROR: no case was calibrated in {run.path}: {first or 'it holds no cases'}{more}")
        return 2
    written = calibration.write_outputs(cal, out)
    say(f"calibration: {', '.join(str(p) for p in written)}")
    calibration.print_tables(cal)  # the verdicts last: what a terminal and a CI log show
    return 0


def main(argv: list[str]) -> int:
    args, extra = parser().parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if not 0 < args.alpha < 0.5:
        raise PerfError(f"--alpha must be in (0, 0.5), got {args.alpha}")
    args.grid, extra = flags.take_grid(args.grid, extra)
    if args.pairs < 1 or args.max_depth < 1:
        raise PerfError(f"--pairs and --max-depth must be >= 1, got {args.pairs} and {args.max_depth}")
    cli.min_effects(args.min_effects)  # a bad file is refused before anything runs
    if args.source is not None:
        run = load_run(args.source)
        return report(run, args, Path(args.out) if args.out else Path(args.source).parent, [])
    if refused := [a for a in extra if a.startswith(REFUSED_PREFIXES)]:
        raise flags.FlagRefused(f"{refused[0]}: calibrate measures the A/B gate itself and compares nothing")
    flags.check_native(extra)
    cli._require_runner()
    import torch

    if not torch.cuda.is_available():
        raise PerfError(NO_CUDA)
    if launcher.lists_only(extra):  # the cases it would calibrate; nothing timed, --out untouched
        return launcher.list_cases(args, extra, False)
    out = cli._writable(Path(args.out or cli._default_out()))
    # A previous run's files must not pass for this one's; a run pytest refuses leaves them as they were.
    extra = [
        *extra,
        *launcher.impl_args(args),
        "--perf-calibrate",
        f"--perf-calibrate-pairs={args.pairs}",
        f"--perf-calibrate-max-depth={args.max_depth}",
    ]
    started = time.time()
    with PreviousRun(out, [*calibration.FILES, "cases.jsonl", "pytest.log", f"{RUN_LABEL}.json"]):
        rc, run = launcher.pytest_run(RUN_LABEL, args, extra, out, False, args.time_budget)
        launcher.refuse_usage_error(rc, RUN_LABEL, args, out, extra)
    say(f"calibrate: pytest exit {rc}, {time.time() - started:.0f} s wall")
    if run is None:
        raise PerfError("the calibration run produced no results: see the pytest output above")
    status = report(run, args, out, not_timed(out / "cases.jsonl", RUN_LABEL))
    if rc != 0:  # the calibration above covers the cases that ran; the command still fails, and says why
        say(f"FAIL: {launcher.why_failed(RUN_LABEL, rc, args.time_budget, run, launcher.output_of(args, out))}")
    return status or (1 if rc != 0 else 0)
