"""The benchmark report: time, throughput, peak memory and accuracy against sequence length.

    python -m attention.bench                       # every implementation, defaults for this machine
    python -m attention.bench --impl sdpa flex --seq-lens 1024 4096 --out report/

For every registered implementation that runs natively here (or those ``--impl`` names) and
every length it measures the attention core forward and forward+backward (median time, TFLOP/s,
peak memory), and the attention core's error against the float64 oracle (through the module with
identity projections) in float32 and in the chosen dtype. Cases come from
:class:`attention.bench.workload.Workload` (FLOPs, memory estimates, skip decisions) and are timed by
:func:`attention.bench.timing.measure`, the timer perf/ uses. A case that cannot run (no backward on
this device, not enough memory) is reported with the reason instead of stopping the sweep.

Writes ``report.json`` (every figure), ``table.txt`` and PNG plots to ``--out``. ``report.json`` is
rewritten after every (implementation, length), so Ctrl-C stops at once and leaves the finished
rows there (exit status 130).

CPU cases run on one thread unless ``--threads`` says otherwise, as ``torch.utils.benchmark.Timer``
does: see :func:`attention.bench.timing.cpu_threads`.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import registry
from ..accuracy import check_module
from .arguments import dtype_by_name, positive_float, positive_int
from .cost import DTYPES, dtype_name
from .files import unwritable
from .inspection import core_module
from .memory import end_case, end_cases, method_for, peak_memory, quiet_profiler_logs
from .timing import check_threads, clock_for, cpu_threads, measure, rounds_for, usable_cpus
from .workload import Workload

#: Defaults per device: the CPU sweep fits in well under two minutes on 2 cores (flex runs
#: eager there, and materialises scores); on CUDA the full sweep, as in docs/design.md#method.
DEFAULTS = {
    "cpu": {"dtype": "fp32", "seq_lens": (128, 256, 512, 1024, 2048), "batch": 1, "hidden": 256, "cell_seconds": 0.5},
    "cuda": {
        "dtype": "bf16",
        "seq_lens": (512, 1024, 2048, 4096, 8192, 16384),
        "batch": 1,
        "hidden": 2048,
        "cell_seconds": 1.0,
    },
}
DIRECTIONS = {"fwd": False, "fwd_bwd": True}
#: Accuracy runs on one sequence with this many heads: errors do not depend on the head count,
#: and the float64 oracle materialises T x T scores per head.
ACCURACY_HEADS = 2


@dataclass(frozen=True)
class Config:
    device: str
    dtype: torch.dtype
    seq_lens: tuple[int, ...]
    head_dim: int
    impls: tuple[str, ...]
    out: Path
    batch: int
    hidden: int
    cell_seconds: float = 1.0  # timing budget per case; the round count adapts to it
    min_rounds: int = 3
    max_rounds: int = 20
    warmup: int = 2  # untimed calls first: compilation, autotuning, BlockMask building
    accuracy: bool = True
    plots: bool = True
    #: torch intra-op threads during the sweep; None leaves torch's setting (the default on CUDA).
    threads: int | None = None
    #: Whether ``impls`` were named (``--impl``) rather than the default set: a named one must
    #: measure something, while the default set may hold one that cannot run here.
    named: bool = False

    @property
    def num_heads(self) -> int:
        return self.hidden // self.head_dim

    def workload(self, impl: str, seq_len: int, backward: bool) -> Workload:
        return Workload(
            impl, self.batch, seq_len, self.num_heads, self.head_dim, self.dtype, self.device, backward=backward
        )


@dataclass
class Cell:
    """One measurement: ``status`` is ok, skipped (with the reason), oom or error."""

    status: str
    reason: str | None = None
    figures: dict[str, object] = field(default_factory=dict)


# -- command line ------------------------------------------------------------------------------


def _threads(text: str) -> int:
    """A thread count this machine can run (:func:`attention.bench.timing.check_threads`)."""
    try:
        return check_threads(positive_int(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"--device {text}: no CUDA GPU is available to this torch build")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) present")
    return str(device)


def _per_device(on_cuda: object, on_cpu: object) -> str:
    """A default for the help text: one value, or each device's."""
    return f"{on_cuda}" if on_cuda == on_cpu else f"{on_cuda} on CUDA, {on_cpu} on CPU"


def _folder(text: str) -> Path:
    if not text.strip():  # Path("") is the current folder: the report would land wherever one stands
        raise argparse.ArgumentTypeError("needs a folder name, got an empty string")
    return Path(text)


def _impl(text: str) -> str:
    """A registered name, or ``module:attr`` imported and registered (:func:`attention.registry.resolve`)."""
    try:
        return registry.resolve(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    names = _per_device(", ".join(_native_implementations("cuda")), ", ".join(_native_implementations("cpu")))
    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]
    parser = argparse.ArgumentParser(
        prog="python -m attention.bench",
        description=(
            "Sweep sequence lengths over attention implementations: forward and forward+backward "
            "time, TFLOP/s and peak memory of the attention core, and its error against "
            "the float64 oracle. Prints a table; writes report.json, table.txt and PNG plots. Cases "
            "that cannot run (no backward on the device, not enough memory) are reported, not fatal."
        ),
        epilog=(
            "examples: python -m attention.bench --device cuda --out report/ | "
            "python -m attention.bench --impl sdpa flex --seq-lens 1024 4096 --dtype fp16"
        ),
    )
    parser.add_argument(
        "--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        type=dtype_by_name,
        default=None,
        help=f"compute dtype: fp32, bf16 or fp16 (default: {_per_device(cuda['dtype'], cpu['dtype'])})",
    )
    parser.add_argument(
        "--seq-lens",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="T",
        help=f"sequence lengths to sweep (default: {' '.join(map(str, cuda['seq_lens']))} on CUDA, "
        f"{' '.join(map(str, cpu['seq_lens']))} on CPU)",
    )
    parser.add_argument(
        "--head-dim", type=positive_int, default=64, help="features per head; must divide --hidden (default: 64)"
    )
    parser.add_argument(
        "--impl",
        type=_impl,
        nargs="+",
        action="extend",
        default=None,
        metavar="NAME",
        help=f"registry names or [NAME=]module:attr of your own AttentionBase subclass or attn(q, k, v) "
        f"function, several after one --impl or --impl repeated "
        f"(default: all registered that run natively on the device, not in an interpreter: {names})",
    )
    parser.add_argument(
        "--out",
        type=_folder,
        default=Path("benchmark-out"),
        help="folder for report.json, table.txt and the PNGs, created if missing (default: benchmark-out)",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=None,
        help=f"sequences per batch, the same at every length, so score memory shows as T^2 "
        f"(default: {_per_device(cuda['batch'], cpu['batch'])})",
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=None,
        help=f"model width; heads = hidden / head-dim (default: {_per_device(cuda['hidden'], cpu['hidden'])})",
    )
    parser.add_argument(
        "--cell-seconds",
        type=positive_float,
        default=None,
        help="timing budget per case in seconds; rounds adapt to it, at least 3, at most 20 "
        f"(default: {_per_device(format(cuda['cell_seconds'], 'g'), format(cpu['cell_seconds'], 'g'))})",
    )
    parser.add_argument(
        "--threads",
        type=_threads,
        default=None,
        metavar="N",
        help="torch CPU threads during the sweep (default: 1 on CPU, as torch.utils.benchmark.Timer: "
        "waking a thread pool costs more than a small case; unchanged on CUDA); at most the CPUs this "
        "process may run on",
    )
    parser.add_argument("--no-accuracy", action="store_true", help="skip the comparison with the float64 oracle")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and table only")
    return parser


def _native_implementations(device: str) -> list[str]:
    """Registered implementations that run on ``device`` without an interpreter (the default set:
    an interpreted one is correct but its times would measure the interpreter)."""
    return [name for name, cls in registry.implementations().items() if not cls.runs_interpreted(device)]


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = DEFAULTS[torch.device(device).type]
    hidden = args.hidden or defaults["hidden"]
    if hidden % args.head_dim:
        parser.error(f"--head-dim {args.head_dim} must divide --hidden {hidden} (heads = hidden / head-dim)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    problem = unwritable(args.out)
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    return Config(
        device=device,
        dtype=args.dtype or DTYPES[defaults["dtype"]],
        seq_lens=tuple(sorted(set(args.seq_lens or defaults["seq_lens"]))),
        head_dim=args.head_dim,
        impls=tuple(dict.fromkeys(args.impl or _native_implementations(device))),
        out=args.out,
        batch=args.batch or defaults["batch"],
        hidden=hidden,
        cell_seconds=args.cell_seconds or defaults["cell_seconds"],
        accuracy=not args.no_accuracy,
        plots=not args.no_plots,
        threads=args.threads or (1 if torch.device(device).type == "cpu" else None),
        named=bool(args.impl),
    )


# -- measuring ---------------------------------------------------------------------------------


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _guarded(device: str, body: Callable[[], Cell]) -> Cell:
    """``body()``, with running out of memory (or any other failure) recorded, not raised.
    Ctrl-C passes straight through (no clean-up on the way out: the sweep is stopping)."""
    try:
        cell = body()
    except Exception as error:
        status = "oom" if _is_oom(error) else "error"
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        cell = Cell(status, f"{type(error).__name__}: {message}"[:300])
    end_case(device)
    return cell


def time_cell(config: Config, workload: Workload) -> Cell:
    """Median time, TFLOP/s and peak memory of one case, or why it did not run."""
    reason = workload.skip_reason()
    if reason is not None:
        return Cell("skipped", reason)

    def body() -> Cell:
        fn, setup = workload.build()
        probe = measure(fn, device=config.device, rounds=1, warmup=config.warmup, setup=setup)
        rounds = rounds_for(probe[0], config.cell_seconds, config.min_rounds, config.max_rounds)
        times = sorted(measure(fn, device=config.device, rounds=rounds, warmup=0, setup=setup))
        median = statistics.median(times)
        peak = peak_memory(fn, device=config.device, setup=setup)
        flops = workload.flops()
        return Cell(
            "ok",
            figures={
                "time_s": median,
                "min_s": times[0],
                "max_s": times[-1],
                "rounds": rounds,
                "flops": flops,
                "tflops": flops / median / 1e12,
                "peak_bytes": peak.bytes,
                "peak_total_bytes": peak.total_bytes,
                "estimated_peak_bytes": workload.estimated_peak_bytes(),
            },
        )

    return _guarded(config.device, body)


def accuracy_cell(config: Config, impl: str, seq_len: int) -> Cell:
    """Max and mean |attention - float64 oracle| on one sequence, in float32 and in ``config.dtype``.

    The module is :func:`inspection.core_module`'s (identity projections, ``x = [q | k | v]``), so
    :func:`attention.reference_forward` is the float64 oracle of the attention core alone.
    """
    heads = min(ACCURACY_HEADS, config.num_heads)
    d_model = heads * config.head_dim
    dtypes = list(dict.fromkeys([torch.float32, config.dtype]))
    # The oracle materialises scores like the from-scratch path, in float64: same memory model.
    for name, dtype in [("from_scratch", torch.float64), *((impl, d) for d in dtypes)]:
        sizing = Workload(
            name, 1, seq_len, heads, config.head_dim, dtype, config.device, level="module", d_in=3 * d_model
        )
        reason = sizing.skip_reason()
        if reason is not None:
            # The note reads "<impl> accuracy: <reason>": only the oracle's own reason needs naming.
            return Cell("skipped", f"float64 oracle: {reason}" if dtype == torch.float64 else reason)

    def body() -> Cell:
        module = core_module(impl, num_heads=heads, head_dim=config.head_dim, seq_len=seq_len).to(config.device)
        # Seeded by the length: with one seed, each length's input was a prefix of the next one's,
        # so every length's max error was the same early row's and the column read flat.
        gen = torch.Generator(device=config.device).manual_seed(seq_len)
        x = torch.randn(1, seq_len, 3 * d_model, generator=gen, device=config.device)  # (1, T, [q | k | v])
        figures: dict[str, object] = {"batch": 1, "num_heads": heads}
        for dtype in dtypes:
            check = check_module(module.to(dtype), x.to(dtype))
            figures[dtype_name(dtype)] = {
                "max_error": check.max_error,
                "mean_error": check.mean_error,
                "baseline_max_error": check.baseline_max_error,
                "passes": check.passes,
            }
        return Cell("ok", figures=figures)

    return _guarded(config.device, body)


# -- the sweep ---------------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model and how many CPUs this process may run on (the threads
    the sweep used are ``cpu_threads`` in the metadata)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    cpus = usable_cpus()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model} ({cpus} CPUs)"


def metadata(config: Config) -> dict[str, object]:
    return {
        "device": config.device,
        "device_name": device_name(config.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": dtype_name(config.dtype),
        "seq_lens": list(config.seq_lens),
        "impls": list(config.impls),
        "batch": config.batch,
        "cpu_threads": torch.get_num_threads(),
        "hidden": config.hidden,
        "num_heads": config.num_heads,
        "head_dim": config.head_dim,
        "level": "core (time, memory); core through the module, identity projections (accuracy)",
        "mask": "causal",
        "timer": getattr(clock_for(config.device), "name", "clock"),
        "memory_method": method_for(config.device),
        "flops": "4*B*H*T^2*D/2 forward (causal), x3.5 forward+backward",
        "accuracy": f"attention core (identity projections), batch 1, {min(ACCURACY_HEADS, config.num_heads)} "
        "heads, vs float64 oracle",
    }


def run_sweep(
    config: Config,
    progress: Callable[[str], None] | None = None,
    partial: Callable[[dict[str, object]], None] | None = None,
) -> dict[str, object]:
    """Measure every (implementation, length), shortest lengths first, with ``config.threads``
    torch threads (restored after). ``progress(label)`` is called before each step,
    ``partial(result_so_far)`` before the first (implementation, length) and after each."""
    try:
        with cpu_threads(config.threads):
            return _sweep(config, progress, partial)
    finally:
        end_cases()


def _sweep(
    config: Config,
    progress: Callable[[str], None] | None,
    partial: Callable[[dict[str, object]], None] | None,
) -> dict[str, object]:
    started = time.perf_counter()
    meta = metadata(config)
    cells: list[dict[str, object]] = []

    def result(complete: bool) -> dict[str, object]:
        wall = time.perf_counter() - started
        return {"schema": 1, "meta": {**meta, "wall_s": wall, "complete": complete}, "cells": list(cells)}

    if partial:  # replaces a report a previous run left in the folder
        partial(result(complete=False))
    for seq_len in config.seq_lens:
        for impl in config.impls:
            row: dict[str, object] = {"impl": impl, "seq_len": seq_len, "batch": config.batch}
            for key, backward in DIRECTIONS.items():
                if progress:
                    progress(f"{impl} T={seq_len} {key.replace('_', '+')}")
                row[key] = asdict(time_cell(config, config.workload(impl, seq_len, backward)))
            if config.accuracy:
                if progress:
                    progress(f"{impl} T={seq_len} accuracy")
                row["accuracy"] = asdict(accuracy_cell(config, impl, seq_len))
            cells.append(row)
            if partial:
                partial(result(complete=False))
    return result(complete=True)


def steps(config: Config) -> int:
    return len(config.seq_lens) * len(config.impls) * (len(DIRECTIONS) + int(config.accuracy))


def accuracy_failures(result: dict[str, object]) -> dict[str, dict[str, object]]:
    """Implementations with a case outside the accuracy rule (the table's FAIL), each with its
    worst case: ``{"max_error", "baseline_max_error", "dtype", "seq_len"}``."""
    worst: dict[str, dict[str, object]] = {}
    for row in result["cells"]:
        accuracy = row.get("accuracy") or {}
        if accuracy.get("status") != "ok":
            continue
        for dtype, errors in accuracy["figures"].items():
            if not isinstance(errors, dict) or errors["passes"]:
                continue
            previous = worst.get(row["impl"])
            if previous is None or _severity(errors["max_error"]) > _severity(previous["max_error"]):
                worst[row["impl"]] = {
                    "max_error": errors["max_error"],
                    "baseline_max_error": errors["baseline_max_error"],
                    "dtype": dtype,
                    "seq_len": row["seq_len"],
                }
    return worst


def _severity(max_error: float) -> float:
    """Orders errors; NaN (which never passes) above every number."""
    return math.inf if math.isnan(max_error) else max_error


def failure_line(failed: dict[str, dict[str, object]]) -> str:
    """The last line of a run where an implementation failed the accuracy rule (exit status 1)."""
    parts = [
        f"{impl} (worst max error {case['max_error']:.3g} in {case['dtype']} at T={case['seq_len']}; "
        f"a plain {case['dtype']} implementation: {case['baseline_max_error']:.3g})"
        for impl, case in failed.items()
    ]
    return "FAIL: outside the accuracy rule (attention/accuracy.py): " + ", ".join(parts)


def errored_cells(result: dict[str, object]) -> str:
    """A ``FAIL:`` line naming each implementation with a cell that raised (the table's ERROR),
    with its first error; empty when none did. Out of memory is a limit, not an error."""
    first: dict[str, str] = {}
    for row in result["cells"]:
        for key in ("fwd", "fwd_bwd", "accuracy"):
            cell = row.get(key) or {}
            if cell.get("status") == "error":
                first.setdefault(row["impl"], f"{key.replace('_', '+')} at T={row['seq_len']}: {cell['reason']}")
    if not first:
        return ""
    return "FAIL: raised an error: " + "; ".join(f"{impl} ({what})" for impl, what in first.items())


def unmeasured(result: dict[str, object]) -> str:
    """A ``FAIL:`` line naming each implementation none of whose cells measured anything (every
    one skipped), with its first reason; empty when each measured something."""
    measured: set[str] = set()
    why: dict[str, str] = {}
    for row in result["cells"]:
        for key in ("fwd", "fwd_bwd", "accuracy"):
            cell = row.get(key) or {}
            if cell.get("status") not in (None, "skipped"):
                measured.add(row["impl"])
            elif cell.get("reason"):
                why.setdefault(row["impl"], cell["reason"])
    missing = [impl for impl in dict.fromkeys(row["impl"] for row in result["cells"]) if impl not in measured]
    if not missing:
        return ""
    return "FAIL: nothing measured: " + "; ".join(f"{impl} ({why.get(impl, 'every cell skipped')})" for impl in missing)


#: Exit status after Ctrl-C, as a shell reports a process killed by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    quiet_profiler_logs()  # before the first profiled call (CPU peak memory)
    config = parse_args(argv)
    # flex runs eager off CUDA on purpose (compiling per shape on a CPU costs more than the sweep).
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from . import report

    report.clear(config.out)
    report_json = config.out / "report.json"
    total = len(config.seq_lens) * len(config.impls)
    written = 0  # cells in report.json as it stands on disk

    def save_partial(result: dict[str, object]) -> None:
        # report.json after every row: a run cut short still leaves its figures, and
        # `python -m attention.bench.report report.json` renders them.
        nonlocal written
        report.write(result, config.out, plots=False)
        written = len(result["cells"])

    columns = [TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("starting", total=steps(config))
            done = 0

            def advance(label: str) -> None:
                nonlocal done
                bar.update(task, completed=done, description=label)
                done += 1

            try:
                result = run_sweep(config, advance, partial=save_partial)
            except KeyboardInterrupt:
                bar.update(task, description="interrupted")  # the bar stops where it was
                raise
            bar.update(task, completed=done, description="done")
        paths = report.write(result, config.out, plots=config.plots)
        console = Console(record=True, width=max(Console().width, 180))
        report.print_table(result, console)
        paths.append(report.save_table(console, config.out))
    except KeyboardInterrupt:
        # Nothing slow after Ctrl-C (no plots, no table): the finished rows are on disk already.
        print(
            f"interrupted: partial report ({written} of {total} cells) in {report_json}; "
            f"render it with: python -m attention.bench.report {report_json}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    Console(stderr=True).print("wrote " + ", ".join(str(p) for p in paths))
    failed = accuracy_failures(result)
    errored = errored_cells(result)
    empty = unmeasured(result) if config.named else ""
    # Plain lines (no rich wrapping), last on screen: what a CI log shows.
    for line in (empty, errored):
        if line:
            print(line, file=sys.stderr, flush=True)
    if failed:
        print(failure_line(failed), file=sys.stderr, flush=True)
    return 1 if failed or errored or empty else 0


if __name__ == "__main__":
    sys.exit(main())
