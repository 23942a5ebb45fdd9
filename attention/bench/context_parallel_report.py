"""The context parallel benchmark's figures, tables and plot: pure functions of its result dict
(what :mod:`attention.bench.context_parallel` writes as ``context_parallel.json``), so they can be
tested on CPU and a result re-rendered anywhere.

A result's ``cells`` each hold one measurement: ``gpus``, ``seq_len``, ``level`` (core or module),
``direction`` (fwd or fwd_bwd), ``load_balance``, ``status`` (ok or skipped, with a ``reason``) and
``figures`` (``time_s``, ``tflops_per_gpu``, ``peak_total_bytes``: the largest rank's allocated memory
during one call, its inputs included; ``peak_bytes``: the part above them...).
"""

from __future__ import annotations

import json
from pathlib import Path

from .cost import GiB
from .files import write_atomically
from .report import fmt_bytes, fmt_tokens, save_figure

LEVELS = ("core", "module")
DIRECTIONS = {"fwd": "forward", "fwd_bwd": "forward+backward"}


def _ok(result: dict, *, gpus: int, level: str, direction: str, load_balance: bool = True) -> dict[int, dict]:
    """``seq_len -> figures`` of the cells that ran for this GPU count, level and direction."""
    return {
        c["seq_len"]: c["figures"]
        for c in result["cells"]
        if c["status"] == "ok"
        and (c["gpus"], c["level"], c["direction"], c["load_balance"]) == (gpus, level, direction, load_balance)
    }


def gpu_counts(result: dict) -> list[int]:
    return sorted({c["gpus"] for c in result["cells"]})


def scaling(t1: float, tn: float, gpus: int) -> tuple[float, float]:
    """``(speed-up, efficiency)`` of ``gpus`` GPUs taking ``tn`` against one taking ``t1``:
    ``t1 / tn`` and ``t1 / (gpus * tn)`` (1.0 = perfect linear scaling)."""
    if not (t1 > 0 and tn > 0) or gpus < 1:
        raise ValueError(f"scaling needs positive times and GPU count, got t1={t1}, tn={tn}, gpus={gpus}")
    return t1 / tn, t1 / (gpus * tn)


def crossover(one_gpu: dict[int, float], n_gpus: dict[int, float]) -> dict[str, int | None]:
    """Where ``n_gpus`` (``seq_len -> time``) starts to beat ``one_gpu``, over lengths both measured.

    ``n_gpus_faster_from``: the shortest length from which ``n_gpus`` is faster at every longer
    measured length (``None``: not faster at the longest); ``one_gpu_faster_up_to``: the measured
    length just below it (``None``: ``n_gpus`` was faster already at the shortest).
    """
    lengths = sorted(set(one_gpu) & set(n_gpus))
    faster_from = None
    for length in reversed(lengths):
        if n_gpus[length] >= one_gpu[length]:
            break
        faster_from = length
    if faster_from is None:  # one GPU at least as fast at the longest length (or nothing measured)
        up_to = lengths[-1] if lengths else None
    else:
        below = [t for t in lengths if t < faster_from]
        up_to = below[-1] if below else None
    return {"one_gpu_faster_up_to": up_to, "n_gpus_faster_from": faster_from}


def summary(result: dict) -> list[dict]:
    """One row per (level, direction, GPU count > 1): speed-up, efficiency and peak memory per GPU
    over one GPU's (``memory_ratio``; ``1 / gpus`` would be perfect) per length, and the crossover
    against one GPU."""
    rows = []
    for level in LEVELS:
        for direction in DIRECTIONS:
            one_figures = _ok(result, gpus=1, level=level, direction=direction)
            one = {t: f["time_s"] for t, f in one_figures.items()}
            for gpus in gpu_counts(result):
                if gpus == 1:
                    continue
                many_figures = _ok(result, gpus=gpus, level=level, direction=direction)
                many = {t: f["time_s"] for t, f in many_figures.items()}
                both = sorted(set(one) & set(many))
                if not both:
                    continue
                per_length = []
                for t in both:
                    speed_up, efficiency = scaling(one[t], many[t], gpus)
                    memory = many_figures[t]["peak_total_bytes"] / one_figures[t]["peak_total_bytes"]
                    per_length.append(
                        {"seq_len": t, "speed_up": speed_up, "efficiency": efficiency, "memory_ratio": memory}
                    )
                rows.append(
                    {
                        "level": level,
                        "direction": direction,
                        "gpus": gpus,
                        "by_length": per_length,
                        **crossover(one, many),
                    }
                )
    return rows


def load_balance_effect(result: dict) -> list[dict]:
    """Time with the load balancer off over time with it on, where both were measured."""
    rows = []
    for level in LEVELS:
        for direction in DIRECTIONS:
            for gpus in gpu_counts(result):
                on = _ok(result, gpus=gpus, level=level, direction=direction, load_balance=True)
                off = _ok(result, gpus=gpus, level=level, direction=direction, load_balance=False)
                for t in sorted(set(on) & set(off)):
                    rows.append(
                        {
                            "level": level,
                            "direction": direction,
                            "gpus": gpus,
                            "seq_len": t,
                            "on_s": on[t]["time_s"],
                            "off_s": off[t]["time_s"],
                            "off_over_on": off[t]["time_s"] / on[t]["time_s"],
                        }
                    )
    return rows


def title(result: dict) -> str:
    meta = result["meta"]
    return (
        f"context parallel: {meta['device_name']}, torch {meta['torch']}, {meta['dtype']}, "
        f"B={meta['batch']}, H={meta['num_heads']}, D={meta['head_dim']}, causal, rotate={meta['rotate_method']}"
    )


def print_table(result: dict, console) -> None:
    """Rich tables: every cell; then speed-up, efficiency and crossover; then the load balancer."""
    from rich.table import Table

    table = Table(title=title(result), title_justify="left")
    columns = ("level", "direction", "T", "GPUs", "ms", "TFLOP/s per GPU", "peak per GPU", "memory vs 1 GPU")
    for name in (*columns, "speed-up", "efficiency"):
        table.add_column(name, justify="left" if name in ("level", "direction") else "right")
    speed = {
        (row["level"], row["direction"], row["gpus"], figures["seq_len"]): figures
        for row in summary(result)
        for figures in row["by_length"]
    }
    notes: dict[str, int] = {}
    for c in sorted(result["cells"], key=lambda c: (LEVELS.index(c["level"]), c["direction"], c["seq_len"], c["gpus"])):
        if not c["load_balance"]:
            continue
        cols = [c["level"], c["direction"].replace("_", "+"), fmt_tokens(c["seq_len"]), str(c["gpus"])]
        if c["status"] != "ok":
            number = notes.setdefault(c["reason"], len(notes) + 1)
            table.add_row(*cols, f"{c['status']} [{number}]", "", "", "", "", "")
            continue
        f = c["figures"]
        s = speed.get((c["level"], c["direction"], c["gpus"], c["seq_len"]))
        table.add_row(
            *cols,
            f"{f['time_s'] * 1e3:.2f}",
            f"{f['tflops_per_gpu']:.0f}",
            fmt_bytes(f["peak_total_bytes"]),
            f"{s['memory_ratio']:.2f}" if s else "",
            f"{s['speed_up']:.2f}x" if s else "",
            f"{s['efficiency']:.2f}" if s else "",
        )
    console.print(table)
    for reason, number in notes.items():
        console.print(f"[{number}] {reason}", highlight=False, markup=False)

    cross = Table(title="crossover: the length from which n GPUs beat one", title_justify="left")
    for name in ("level", "direction", "GPUs", "one GPU faster up to", "n GPUs faster from"):
        cross.add_column(name)
    for row in summary(result):
        up_to, start = row["one_gpu_faster_up_to"], row["n_gpus_faster_from"]
        cross.add_row(
            row["level"],
            row["direction"].replace("_", "+"),
            str(row["gpus"]),
            "-" if up_to is None else fmt_tokens(up_to),
            "never (measured)" if start is None else fmt_tokens(start),
        )
    console.print(cross)
    balance = load_balance_effect(result)
    if balance:
        lb = Table(title="load balancer: time with it off / on", title_justify="left")
        for name in ("level", "direction", "GPUs", "T", "on ms", "off ms", "off / on"):
            lb.add_column(name)
        for row in balance:
            lb.add_row(
                row["level"],
                row["direction"].replace("_", "+"),
                str(row["gpus"]),
                fmt_tokens(row["seq_len"]),
                f"{row['on_s'] * 1e3:.2f}",
                f"{row['off_s'] * 1e3:.2f}",
                f"{row['off_over_on']:.2f}",
            )
        console.print(lb)
    meta = result["meta"]
    console.print(
        f"time: median over rounds of the slowest rank, {meta['timer']}; TFLOP/s per GPU: {meta['flops']} / GPUs; "
        f"peak: the largest rank's allocated memory during one call, its inputs (its shards) included; "
        f"efficiency = t1 / (GPUs x tn).",
        highlight=False,
        markup=False,
    )


def plot(result: dict, path: Path) -> Path:
    """Time and peak memory per GPU against length, one line per GPU count; one row of panels per
    (level, direction) measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = gpu_counts(result)
    panels = [
        (lv, d) for lv in LEVELS for d in DIRECTIONS if any(_ok(result, gpus=g, level=lv, direction=d) for g in counts)
    ]
    fig, axes = plt.subplots(max(1, len(panels)), 2, figsize=(12, 3.6 * max(1, len(panels))), squeeze=False)
    for row, (level, direction) in enumerate(panels):
        for col, (key, label, scale) in enumerate(
            (("time_s", "median time (ms)", 1e3), ("peak_total_bytes", "peak memory per GPU (GiB)", 1 / GiB))
        ):
            ax = axes[row][col]
            for i, gpus in enumerate(counts):
                figures = _ok(result, gpus=gpus, level=level, direction=direction)
                xs = sorted(t for t, f in figures.items() if f[key] > 0)
                if xs:
                    ax.plot(
                        xs,
                        [figures[t][key] * scale for t in xs],
                        marker="osD^v<>p"[i % 8],
                        color=f"C{i}",
                        label=f"{gpus} GPU{'s' if gpus > 1 else ''}",
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.set_title(f"{level} {DIRECTIONS[direction]}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():
                ax.legend(loc="best", fontsize=8)
    fig.suptitle(title(result), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write(result: dict, out: Path, *, plots: bool = True) -> list[Path]:
    """``context_parallel.json`` (cells, with the summary and load-balancer rows added) and the PNG."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = {**result, "summary": summary(result), "load_balance": load_balance_effect(result)}
    paths = [out / "context_parallel.json"]
    write_atomically(paths[0], json.dumps(full, indent=1, allow_nan=True) + "\n")
    if plots and any(c["status"] == "ok" for c in result["cells"]):
        paths.append(plot(result, out / "context_parallel.png"))
    return paths
