"""The tables a perf run prints: a compact matrix per group, the targets (docs/design.md#perf-targets), the anchors.

Everything reads a :class:`~attention.bench.perf.results.Run`, so the same tables come out of a live run
and out of a JSON fetched from a GPU machine (``python -m attention.bench.perf table RUN.json``).
"""

from __future__ import annotations

from collections import defaultdict

from ..cost import dtype_name
from ..report import fmt_tokens
from . import guards, machine
from .results import Run, graph_timed


def _value(info: dict) -> str:
    if info.get("kind") == "decode":
        frac = info.get("copy_fraction")
        return f"{info.get('gbps', 0):.0f}" + (f"/{frac:.2f}" if frac else "")
    tflops = info.get("tflops")
    return f"{tflops:.3g}" if tflops is not None else "-"


def _flag(info: dict) -> str:
    mark = "" if graph_timed(info) else "*"
    backend = info.get("sdpa_backend")
    if backend and backend not in ("cudnn", "none"):
        mark += f"[{backend}]"
    if info.get("flex_path") not in (None, "fused", "eager"):
        mark += f"[{info['flex_path']}]"
    if info.get("guard_failures"):
        mark += "!"
    return mark


def matrix(run: Run) -> str:
    """Per group: implementation x length -> TFLOP/s (decode: GB/s / fraction of copy bandwidth)."""
    groups: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for rec in run.records.values():
        info = rec.info
        groups[rec.group or "?"][info.get("impl", rec.key)][info.get("seq_len", 0)] = info
    m = run.machine
    matmul = dtype_name(machine.matmul_dtype(m.get("device") or "cpu"))
    lines = [
        f"{m.get('gpu_name') or m.get('device')} | torch {m.get('torch')} | CUDA {m.get('cuda')} | "
        f"cuDNN {m.get('cudnn')} | triton {m.get('triton')} | copy {m.get('copy_gbps') or 0:.0f} GB/s | "
        f"{matmul} matmul {m.get('matmul_tflops') or 0:.3g} TFLOP/s",
        "TFLOP/s (decode: GB/s of KV read / fraction of copy bandwidth); * = eager, includes dispatch; "
        "[x] = SDPA backend other than cuDNN or flex not fused; ! = guard failed",
    ]
    for name in sorted(groups):
        rows = groups[name]
        lens = sorted({n for per in rows.values() for n in per})
        lines.append(f"-- {name}")
        lines.append(f"   {'T =':<18}" + " ".join(f"{fmt_tokens(n):>12}" for n in lens))
        for impl in sorted(rows):
            cells = []
            for n in lens:
                info = rows[impl].get(n)
                cells.append(f"{(_value(info) + _flag(info)) if info else '':>12}")
            lines.append(f"   {impl:<18}" + " ".join(cells))
    return "\n".join(lines)


def cases_table(run: Run) -> str:
    """Every case on one line: the long form (written to a file; too long for a terminal tail)."""
    header = (
        f"{'case':<64} {'median ms':>10} {'TFLOP/s':>8} {'GB/s':>7} {'peak MiB':>9} {'backend':>10} {'rounds':>6} mode"
    )
    lines = [header]
    for key in sorted(run.records):
        rec = run.records[key]
        i = rec.info
        backend = i.get("sdpa_backend") or i.get("flex_path") or ""
        peak = i.get("peak_mem_mib")
        lines.append(
            f"{key:<64} {rec.median * 1e3:>10.4f} {i.get('tflops') or 0:>8.1f} {i.get('gbps') or 0:>7.0f} "
            f"{peak if peak is not None else float('nan'):>9.1f} {backend:>10} {i.get('rounds', 0):>6} "
            f"{i.get('timing_mode', '')}"
        )
    return "\n".join(lines)


def wall_time(run: Run) -> str:
    """Where the run's wall time went: seconds per phase (warmup holds compilation), per family."""
    per_family: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for rec in run.records.values():
        for phase, seconds in (rec.info.get("wall_s") or {}).items():
            per_family[rec.info.get("family", "?")][phase] += seconds
    if not per_family:
        return "Wall time: not recorded in this run"
    phases = list(dict.fromkeys(p for per in per_family.values() for p in per))
    lines = [
        f"Wall time of the cases, seconds ({len(run.records)} cases; warmup holds compilation):",
        f"   {'family':<14}" + "".join(f"{p:>14}" for p in phases) + f"{'total':>10}",
    ]
    for fam in sorted(per_family):
        per = per_family[fam]
        lines.append(
            f"   {fam:<14}" + "".join(f"{per.get(p, 0.0):>14.1f}" for p in phases) + f"{sum(per.values()):>10.1f}"
        )
    totals = [sum(per.get(p, 0.0) for per in per_family.values()) for p in phases]
    lines.append(f"   {'all':<14}" + "".join(f"{t:>14.1f}" for t in totals) + f"{sum(totals):>10.1f}")
    return "\n".join(lines)


def _find(run: Run, **want) -> dict | None:
    for rec in run.records.values():
        if all(rec.info.get(k) == v for k, v in want.items()):
            return dict(rec.info, median=rec.median)
    return None


def targets(run: Run) -> str:
    """The targets of docs/design.md#perf-targets, from this run's numbers."""
    if run.machine.get("device") != "cuda":
        return "Targets (docs/design.md#perf-targets) are GPU figures: a CPU run is not judged against them."
    lines = ["Targets (sdpa/best raw <= 1.03, module/(gemms+core) <= 1.10, flex/cuDNN fwd >= 0.8 from 4k):"]
    shapes = sorted(
        {
            (
                r.info["direction"],
                r.info["head_dim"],
                r.info["seq_len"],
                r.info["dtype"],
                r.info["batch"],
                r.info["num_heads"],
            )
            for r in run.records.values()
            if r.info.get("kind") == "prefill" and r.info.get("level") == "core" and r.info.get("impl") == "sdpa"
        },
        key=lambda t: (str(t[0]), str(t[3]), t[1] or 0, t[2] or 0, t[4] or 0),
    )
    for direction, d, t, dtype, b, h in shapes:
        shape = dict(kind="prefill", direction=direction, head_dim=d, seq_len=t, dtype=dtype, batch=b, num_heads=h)
        core = _find(run, impl="sdpa", level="core", **shape)
        raws = [
            _find(run, impl=impl, level="core", **shape) for impl in ("raw_sdpa", "raw_sdpa_flash", "raw_sdpa_cudnn")
        ]
        raws = [r for r in raws if r]
        parts = [f"  {dtype} {direction:<7} D{d:<3} T{fmt_tokens(t):>4}:"]
        if core and raws:
            best = min(raws, key=lambda r: r["median"])
            ratio = core["median"] / best["median"]
            parts.append(f"sdpa/best raw ({best['impl']}) {ratio:.3f} {'ok' if ratio <= 1.03 else 'MISS'}")
        module = _find(run, impl="sdpa", level="module", **shape)
        gemms = (
            _find(run, impl="gemms", level="module", direction=direction, dtype=dtype, d_in=module["d_in"])
            if module
            else None
        )
        if module and gemms and core:
            ratio = module["median"] / (gemms["median"] + core["median"])
            parts.append(f"| module/(gemms+core) {ratio:.3f} {'ok' if ratio <= 1.10 else 'MISS'}")
        flex = _find(run, impl="flex", level="core", **shape)
        cudnn = next((r for r in raws if r.get("sdpa_backend") == "cudnn"), None)
        if flex and cudnn and direction == "fwd" and t >= 4096:
            ratio = cudnn["median"] / flex["median"]
            parts.append(f"| flex/cuDNN {ratio:.2f} {'ok' if ratio >= 0.8 else 'MISS'}")
        if len(parts) > 1:
            lines.append(" ".join(parts))
    lines += _anchor_lines(run) + _decode_lines(run) + _mask_lines(run)
    if len(lines) == 1:
        lines.append("  (none of the target cases ran)")
    return "\n".join(lines)


def _anchor_lines(run: Run) -> list[str]:
    out = []
    for rec in sorted(run.records.values(), key=lambda r: r.key):
        anchor = guards.anchor_for(rec.info, run.machine)
        if anchor and rec.info.get("tflops") and rec.info.get("impl") in ("sdpa", "flex"):
            out.append(
                f"  {rec.key}: {rec.info['tflops']:.0f} TFLOP/s = {rec.info['tflops'] / anchor:.2f}x anchor {anchor:g}"
            )
    return (["H100 anchors, docs/design.md#h100-anchors (same shapes, ours / anchor):", *out]) if out else []


#: A model's decode step (8 layers in one graph), fraction of copy bandwidth our kernels aim at:
#: (query heads per KV head, context) -> goal (docs/design.md#decode-case).
STEP_GOALS = {(4, 1024): 0.6, (4, 4096): 0.85, (1, 1024): 0.85}


def _decode_lines(run: Run) -> list[str]:
    layer, step = [], []
    for rec in sorted(run.records.values(), key=lambda r: r.key):
        i = rec.info
        if i.get("kind") != "decode":
            continue
        if i.get("layers", 1) == 1 and i.get("impl") in ("sdpa", "flex") and i.get("context") in (4096, 16384):
            layer.append(_decode_line(rec.key, i, 0.85 if i["context"] == 4096 else 0.9, "token"))
        elif i.get("layers", 1) > 1 and i.get("impl") in ("sdpa", "flex", "triton"):
            goal = STEP_GOALS.get((i["num_heads"] // i["num_kv_heads"], i["context"]))
            step.append(_decode_line(rec.key, i, goal, "step"))
    lines = ["Decode (docs/design.md#decode-case):", *layer] if layer else []
    return lines + (["Decode, a model's step (all layers in one graph):", *step] if step else [])


def _decode_line(key: str, info: dict, goal: float | None, per: str) -> str:
    frac = info.get("copy_fraction")
    line = f"  {key}: {info.get('latency_us', 0):.1f} us/{per}, {info.get('gbps', 0):.0f} GB/s"
    if frac is None:
        return line
    verdict = "" if goal is None else f" {'ok' if frac >= goal else 'MISS'} (>={goal})"
    return line + f" = {frac:.2f} of copy{verdict}"


def _mib(info: dict) -> str:
    """A case's peak memory for a line of text; a run that measured none (CPU) says so."""
    peak = info.get("peak_mem_mib")
    return "peak memory not measured" if peak is None else f"{peak:.0f} MiB"


def _mask_lines(run: Run) -> list[str]:
    out = []
    masks = sorted({r.info.get("mask") for r in run.records.values() if r.info.get("kind") == "mask"})
    for mask in masks:
        flex = _find(run, kind="mask", mask=mask, impl="flex")
        sdpa = _find(run, kind="mask", mask=mask, impl="sdpa")
        raw = _find(run, kind="mask", mask=mask, impl="raw_sdpa")
        if flex and sdpa:
            line = (
                f"  {mask}: flex {flex['median'] * 1e3:.3f} ms ({_mib(flex)}) vs SDPA module, "
                f"dense mask built per call, {sdpa['median'] * 1e3:.3f} ms ({_mib(sdpa)}): "
                f"SDPA/flex time {sdpa['median'] / flex['median']:.2f}x"
            )
            if raw:
                line += (
                    f"; raw SDPA on a prebuilt mask {raw['median'] * 1e3:.3f} ms ({_mib(raw)}), "
                    f"{raw['median'] / flex['median']:.2f}x"
                )
            out.append(line)
    return (["Masks (docs/design.md#mask-cases), TFLOP/s on visible blocks:", *out]) if out else []
