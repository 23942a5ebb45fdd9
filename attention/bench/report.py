"""Turn a benchmark result (the dict :func:`attention.bench.sweep.run_sweep` returns, also saved
as ``report.json``) into a terminal table and PNG plots. Pure functions of that dict, so a
report from a GPU can be re-rendered anywhere: ``python -m attention.bench.report report.json``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .cost import GiB, MiB
from .files import write_atomically

DIRECTION_LABELS = {"fwd": "forward", "fwd_bwd": "forward+backward"}


def title(result: dict) -> str:
    meta = result["meta"]
    threads = meta.get("cpu_threads")  # absent from reports written before it was recorded
    on_cpu = threads is not None and str(meta.get("device", "")).startswith("cpu")
    return (
        f"attention benchmark: {meta['device_name']}"
        + (f", {threads} thread{'s' if threads != 1 else ''}" if on_cpu else "")
        + f", torch {meta['torch']}, {meta['dtype']}, "
        f"B={meta['batch']}, H={meta['num_heads']}, D={meta['head_dim']}, causal"
    )


def _figure(cell: dict, key: str) -> float | None:
    return cell.get("figures", {}).get(key) if cell.get("status") == "ok" else None


def _series(result: dict, impl: str, direction: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in result["cells"]:
        value = _figure(row[direction], key) if row["impl"] == impl else None
        if value is not None and value > 0:
            xs.append(row["seq_len"])
            ys.append(value)
    return xs, ys


def _style(i: int) -> dict[str, object]:
    """Distinct markers, shrinking, so implementations with equal figures stay visible."""
    return {"marker": "osD^v<>p"[i % 8], "markersize": max(3.0, 8.0 - 1.5 * i), "lw": max(1.0, 2.2 - 0.4 * i)}


def _impls(result: dict) -> list[str]:
    return list(dict.fromkeys(row["impl"] for row in result["cells"]))


# -- table -------------------------------------------------------------------------------------


def fmt_tokens(n: int) -> str:
    """A sequence length for tables: whole multiples of 1024 as "4k", others as they are."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def fmt_bytes(n: float | None) -> str:
    """``n`` bytes in GiB from 1 GiB up, else MiB; ``n/a`` for ``None``."""
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def print_table(result: dict, console) -> None:
    """A rich table: one row per (implementation, length); cells that did not run show a
    numbered note saying why."""
    from rich.table import Table

    meta = result["meta"]
    dtype = meta["dtype"]
    table = Table(title=title(result), title_justify="left")
    for name in ("impl", "T", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s", "peak fwd", "peak fwd+bwd"):
        table.add_column(name, justify="left" if name == "impl" else "right")
    error_dtypes = list(dict.fromkeys(["fp32", dtype]))
    for d in error_dtypes:
        table.add_column(f"max err {d}", justify="right")
        table.add_column(f"mean err {d}", justify="right")
    notes: dict[str, int] = {}

    def note(cell: dict, what: str) -> str:
        label = {"skipped": "n/a", "oom": "OOM", "error": "ERROR"}.get(cell["status"], cell["status"])
        text = f"{what}: {cell['reason']}"
        return f"{label} [{notes.setdefault(text, len(notes) + 1)}]"

    for row in result["cells"]:
        cols = [row["impl"], str(row["seq_len"])]
        for direction in ("fwd", "fwd_bwd"):
            cell = row[direction]
            if cell["status"] == "ok":
                cols += [f"{cell['figures']['time_s'] * 1e3:.3f}", f"{cell['figures']['tflops']:.3g}"]
            else:
                cols += [note(cell, f"{row['impl']} {direction.replace('_', '+')}"), ""]
        for direction in ("fwd", "fwd_bwd"):
            cols.append(fmt_bytes(_figure(row[direction], "peak_bytes")))
        accuracy = row.get("accuracy")
        for d in error_dtypes:
            if accuracy is None:
                cols += ["-", "-"]
            elif accuracy["status"] != "ok":
                cols += [note(accuracy, f"{row['impl']} accuracy"), ""]
            else:
                errors = accuracy["figures"][d]
                flag = "" if errors["passes"] else " FAIL"
                cols += [f"{errors['max_error']:.2e}{flag}", f"{errors['mean_error']:.2e}"]
        table.add_row(*cols)
    console.print(table)
    for text, number in notes.items():
        console.print(f"[{number}] {text}", highlight=False, markup=False)
    console.print(
        f"time: median, {meta['timer']} timer; TFLOP/s: {meta['flops']}; peak: memory the call allocates "
        f"above its inputs ({meta['memory_method']}); errors: {meta['accuracy']}, FAIL = outside the "
        f"tolerance rule. Sweep took {meta['wall_s']:.1f} s"
        + ("." if meta.get("complete", True) else ", and was cut short: lengths or implementations are missing."),
        highlight=False,
        markup=False,
    )


def save_table(console, out: Path) -> Path:
    path = Path(out) / "table.txt"
    console.save_text(str(path))
    return path


# -- plots -------------------------------------------------------------------------------------


def _loglog_panels(result: dict, key: str, ylabel: str, scale: float, fig_title: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, direction in zip(axes, ("fwd", "fwd_bwd"), strict=True):
        missing = []
        for i, impl in enumerate(_impls(result)):
            xs, ys = _series(result, impl, direction, key)
            if xs:  # one colour per implementation in every panel and plot
                ax.plot(xs, [y * scale for y in ys], color=f"C{i}", label=impl, **_style(i))
            not_run = [r["seq_len"] for r in result["cells"] if r["impl"] == impl and r[direction]["status"] != "ok"]
            if not_run:
                missing.append(f"{impl}: not run at T={', '.join(map(str, not_run))}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_title(DIRECTION_LABELS[direction])
        ax.grid(True, which="both", alpha=0.3)
        if missing:
            ax.text(0.02, 0.98, "\n".join(missing), transform=ax.transAxes, va="top", fontsize=7, color="dimgray")
        if ax.get_lines():
            ax.legend(loc="best")
    axes[0].set_ylabel(ylabel)
    fig.suptitle(f"{fig_title}\n{title(result)}", fontsize=10)
    fig.tight_layout()
    return fig, axes


def _guides(ax, result: dict, key: str, direction: str, scale: float) -> None:
    """Dashed lines growing as T and as T^2 through the first measured point, to read slopes by."""
    for impl in _impls(result):
        xs, ys = _series(result, impl, direction, key)
        if len(xs) >= 2:
            x0, y0 = xs[0], ys[0] * scale
            lo, hi = min(r["seq_len"] for r in result["cells"]), max(r["seq_len"] for r in result["cells"])
            for power, label in ((1, "∝ T"), (2, "∝ T²")):
                ax.plot(
                    [lo, hi],
                    [y0 * (lo / x0) ** power, y0 * (hi / x0) ** power],
                    ls=":",
                    color="gray",
                    lw=0.8,
                )
                ax.annotate(label, (hi, y0 * (hi / x0) ** power), fontsize=7, color="gray", ha="right", va="bottom")
            return


def plot_time(result: dict, path: Path) -> Path:
    fig, _ = _loglog_panels(result, "time_s", "median time (ms)", 1e3, "time vs sequence length")
    return save_figure(fig, path)


def plot_throughput(result: dict, path: Path) -> Path:
    fig, _ = _loglog_panels(result, "tflops", "TFLOP/s", 1.0, "throughput vs sequence length")
    return save_figure(fig, path)


def plot_memory(result: dict, path: Path) -> Path:
    fig, axes = _loglog_panels(
        result, "peak_bytes", "peak memory above inputs (MiB)", 1 / MiB, "peak memory vs sequence length"
    )
    for ax, direction in zip(axes, ("fwd", "fwd_bwd"), strict=True):
        _guides(ax, result, "peak_bytes", direction, 1 / MiB)
    return save_figure(fig, path)


def plot_accuracy(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    meta = result["meta"]
    dtypes = list(dict.fromkeys(["fp32", meta["dtype"]]))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(max(9, 6 * len(dtypes)), 4.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        for i, impl in enumerate(_impls(result)):
            xs, maxes, means = [], [], []
            for row in result["cells"]:
                acc = row.get("accuracy")
                if row["impl"] == impl and acc and acc["status"] == "ok":
                    errors = acc["figures"][dtype]
                    if errors["max_error"] > 0 and math.isfinite(errors["max_error"]):
                        xs.append(row["seq_len"])
                        maxes.append(errors["max_error"])
                        means.append(errors["mean_error"])
            if xs:
                color = f"C{i}"
                ax.plot(xs, maxes, color=color, label=f"{impl} max", **_style(i))
                ax.plot(xs, means, ls="--", color=color, label=f"{impl} mean", **_style(i))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("|output - float64 oracle|")
        ax.set_title(f"error in {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(f"accuracy vs sequence length ({meta['accuracy']})\n{title(result)}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Every file a report writes into its folder.
OUTPUTS = ("report.json", "table.txt", "time.png", "throughput.png", "memory.png", "accuracy.png")


def clear(out: Path) -> None:
    """Remove a previous report's files from ``out``, so none of them passes for this run's (a
    run without plots, or without accuracy, or cut short, would leave the last run's beside it)."""
    for name in OUTPUTS:
        (Path(out) / name).unlink(missing_ok=True)


def write(result: dict, out: Path, *, plots: bool = True) -> list[Path]:
    """Write ``report.json`` and (with ``plots``) time, throughput, memory and accuracy PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json"]
    # Whole or not at all: a sweep rewrites it after every row and may be interrupted mid-write.
    write_atomically(paths[0], json.dumps(result, indent=1, allow_nan=True) + "\n")
    if plots:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        paths.append(plot_time(result, out / "time.png"))
        paths.append(plot_throughput(result, out / "throughput.png"))
        paths.append(plot_memory(result, out / "memory.png"))
        if any(row.get("accuracy") for row in result["cells"]):
            paths.append(plot_accuracy(result, out / "accuracy.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Re-render a saved report: ``python -m attention.bench.report report.json [out_folder]``."""
    from rich.console import Console

    parser = argparse.ArgumentParser(
        prog="python -m attention.bench.report",
        description="Re-render the plots and table of a report.json written by python -m attention.bench.",
    )
    parser.add_argument("report", type=Path, help="the report.json")
    parser.add_argument("out", type=Path, nargs="?", help="where the plots go (default: the report's folder)")
    args = parser.parse_args(argv)  # usage errors: exit 2, as below
    from .perf.results import PerfError, read_json

    hint = "give the report.json that python -m attention.bench wrote"
    try:
        result = read_json(args.report, hint)
    except PerfError as exc:  # missing, a folder, not UTF-8, not JSON: one line, no traceback
        print(exc, file=sys.stderr)
        return 2
    if not (isinstance(result, dict) and isinstance(result.get("cells"), list)):
        print(f"{args.report}: not a benchmark report (no list of cells). {hint}", file=sys.stderr)
        return 2
    out = args.out or args.report.parent
    write(result, out)
    console = Console(record=True, width=max(Console().width, 180))
    print_table(result, console)
    save_table(console, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
