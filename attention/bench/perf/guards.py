"""Guards: a silent fallback or an impossible number fails the case instead of hiding in a table.

Every check reads one case's ``extra_info`` (plus the run's machine info), so the same code runs
inside the benchmark (the case fails at once) and in :mod:`.compare` over a saved JSON (CPU-tested
with synthetic records).
"""

from __future__ import annotations

#: docs/design.md#h100-anchors: one H100 80GB HBM3, torch 2.11, bf16, causal core, 16k tokens, hidden 2048.
#: (row, direction, head_dim) -> {seq_len: TFLOP/s}
H100_ANCHORS: dict[tuple[str, str, int], dict[int, float]] = {
    ("sdpa_cudnn", "fwd", 64): {1024: 332, 4096: 414, 16384: 445},
    ("sdpa_cudnn", "fwd", 128): {1024: 425, 4096: 527, 16384: 569},
    ("sdpa_flash", "fwd", 64): {1024: 214, 4096: 282, 16384: 304},
    ("sdpa_flash", "fwd", 128): {1024: 244, 4096: 305, 16384: 321},
    ("sdpa_efficient", "fwd", 64): {1024: 112, 4096: 126, 16384: 133},
    ("sdpa_efficient", "fwd", 128): {1024: 140, 4096: 161, 16384: 172},
    ("flex", "fwd", 64): {1024: 250, 4096: 347, 16384: 375},
    ("flex", "fwd", 128): {1024: 260, 4096: 366, 16384: 413},
    ("naive", "fwd", 64): {1024: 8.6, 4096: 8.1},
    ("naive", "fwd", 128): {1024: 17, 4096: 16},
    ("sdpa_math", "fwd", 64): {1024: 6.0, 4096: 5.8},
    ("sdpa_math", "fwd", 128): {1024: 9.4, 4096: 9.6},
    ("sdpa_cudnn", "fwd+bwd", 64): {1024: 210, 4096: 357, 16384: 434},
    ("sdpa_cudnn", "fwd+bwd", 128): {1024: 252, 4096: 427, 16384: 533},
    ("sdpa_flash", "fwd+bwd", 64): {1024: 142, 4096: 231, 16384: 279},
    ("sdpa_flash", "fwd+bwd", 128): {1024: 156, 4096: 250, 16384: 307},
    ("flex", "fwd+bwd", 64): {1024: 174, 4096: 273, 16384: 317},
    ("flex", "fwd+bwd", 128): {1024: 207, 4096: 330, 16384: 390},
}
H100_CEILINGS = {"matmul_tflops": 797.0, "copy_gbps": 3001.0}

#: "Far outside" the anchors: this much faster than the best anchor means the timer is not
#: timing the GPU; this much slower than the worst means a fallback or a broken harness.
ANCHOR_TOO_FAST = 1.5
ANCHOR_TOO_SLOW = 4.0
#: Above the ceilings by this margin: physically impossible. (A pure read can beat a copy's
#: read+write rate a little, so bandwidth gets more room.)
CEILING_MARGIN = 1.10
CEILING_MARGIN_GBPS = 1.15
#: Fused kernels never hold a (B, H, T, T) score matrix; from this length on it dwarfs the rest.
QUADRATIC_CHECK_MIN_T = 1024

SDPA_FAMILY = "sdpa"
FLEX_FAMILY = "flex"


def is_h100(machine: dict) -> bool:
    return "H100" in (machine.get("gpu_name") or "")


def anchor_row(info: dict) -> str | None:
    """Which docs/design.md#h100-anchors row a case is comparable with, if any (core level, bf16, causal)."""
    if info.get("kind") != "prefill" or info.get("level") != "core":
        return None
    if info.get("dtype") != "bf16" or info.get("mask", "causal") != "causal":
        return None
    family, backend = info.get("family"), info.get("sdpa_backend") or ""
    if family == SDPA_FAMILY and backend in ("cudnn", "flash", "efficient", "math"):
        return f"sdpa_{backend}"
    if family == FLEX_FAMILY and info.get("flex_path") == "fused":
        return "flex"
    if family == "from_scratch" and info.get("direction") == "fwd":
        return "naive"
    return None


def anchor_for(info: dict, machine: dict) -> float | None:
    """The docs/design.md#h100-anchors TFLOP/s anchor at exactly this case's shape, if there is one."""
    row = anchor_row(info)
    if row is None or not is_h100(machine):
        return None
    return H100_ANCHORS.get((row, info.get("direction"), info.get("head_dim")), {}).get(info.get("seq_len"))


def check(info: dict, machine: dict) -> list[str]:
    """Every problem with one case; an empty list means it passed. Ceilings the case recorded
    (measured on its own GPU, in a ``--gpus`` run) count over the run's."""
    machine = {**machine, **{k: info[k] for k in ("copy_gbps", "matmul_tflops") if info.get(k)}}
    problems: list[str] = []
    for guard in (_timer, _sdpa_math, _flex_unfused, _quadratic_memory, _recompiled, _ceilings, _anchors):
        message = guard(info, machine)
        if message:
            problems.append(f"{guard.__name__.lstrip('_')}: {message}")
    return problems


def _on_cuda(info: dict) -> bool:
    return info.get("device") == "cuda"


def _timer(info: dict, machine: dict) -> str | None:
    if _on_cuda(info) and info.get("timer") != "cuda-event":
        return (
            f"timed with {info.get('timer')!r} on CUDA: a wall clock around an asynchronous call times "
            "the launch, not the kernel (docs/design.md#wall-clock-timer: 26x too fast). "
            "Use attention.bench.timing.clock_for(device)."
        )
    return None


def _sdpa_math(info: dict, machine: dict) -> str | None:
    if not _on_cuda(info) or info.get("family") != SDPA_FAMILY or info.get("mask", "causal") != "causal":
        return None
    if "math" in (info.get("sdpa_backend") or "").split("+"):
        fused = "efficient" if info.get("dtype") == "fp32" else "flash/cuDNN"
        return f"SDPA ran the math backend on CUDA where {fused} applies: a silent fallback, ~50x slower, O(T^2) memory"
    return None


def _flex_unfused(info: dict, machine: dict) -> str | None:
    if _on_cuda(info) and info.get("family") == FLEX_FAMILY and info.get("flex_path") == "unfused":
        return "compiled flex_attention ran unfused (a separate softmax over materialised scores): fallback path"
    return None


def _quadratic_memory(info: dict, machine: dict) -> str | None:
    family = info.get("family")
    if not _on_cuda(info) or info.get("kind") != "prefill" or family not in (SDPA_FAMILY, FLEX_FAMILY):
        return None
    if info.get("level") != "core":
        # A whole module also holds its projections' activations and gradients (H100: 586 MiB
        # for a healthy fused fwd+bwd at B=16, T=1k, d=2048 beside a 512 MiB score matrix), so
        # only the attention core is judged; a module fallback shows in its core case too.
        return None
    if family == SDPA_FAMILY and info.get("mask", "causal") != "causal":
        return None  # SDPA with a pattern takes a dense (T, T) mask by design
    peak, scores = info.get("peak_mem_mib"), info.get("scores_mib")
    if peak is None or scores is None or info.get("seq_len", 0) < QUADRATIC_CHECK_MIN_T:
        return None
    if peak >= scores:
        return (
            f"peak memory {peak:.0f} MiB >= one (B, H, T, T) score matrix ({scores:.0f} MiB): a fused kernel "
            "never holds one, so this ran an unfused fallback (or its memory grew by about a score matrix)"
        )
    return None


def _recompiled(info: dict, machine: dict) -> str | None:
    if info.get("compiles_while_timing"):
        return f"{info['compiles_while_timing']} compilation(s) inside the timed rounds: timings include compiling"
    return None


def _ceilings(info: dict, machine: dict) -> str | None:
    tflops, gbps = info.get("tflops"), info.get("gbps")
    # The larger of the measured and the docs/design.md#h100-anchors ceiling: a badly measured ceiling must not
    # turn good numbers into "harness broken".
    known = H100_CEILINGS if is_h100(machine) else {}
    matmul = max(machine.get("matmul_tflops") or 0, known.get("matmul_tflops", 0)) or None
    copy = max(machine.get("copy_gbps") or 0, known.get("copy_gbps", 0)) or None
    if not _on_cuda(info):
        return None
    if tflops and matmul and tflops > CEILING_MARGIN * matmul:
        return (
            f"{tflops:.0f} TFLOP/s is above this GPU's bf16 matmul ceiling ({matmul:.0f}): the harness is broken "
            "(the timer is not timing the GPU work, or the FLOP count is wrong)"
        )
    if gbps and copy and gbps > CEILING_MARGIN_GBPS * copy:
        return (
            f"{gbps:.0f} GB/s is above this GPU's copy bandwidth ({copy:.0f}): the harness is broken "
            "(the timer misses the work, or data stayed in L2)"
        )
    return None


def _anchors(info: dict, machine: dict) -> str | None:
    row = anchor_row(info)
    if row is None or not _on_cuda(info) or not is_h100(machine) or not info.get("tflops"):
        return None
    by_len = H100_ANCHORS.get((row, info.get("direction"), info.get("head_dim")))
    if not by_len:
        return None
    low, high, tflops = min(by_len.values()), max(by_len.values()), info["tflops"]
    where = f"docs/design.md#h100-anchors for {row} {info.get('direction')} D={info.get('head_dim')}: {low:g}-{high:g}"
    if tflops > ANCHOR_TOO_FAST * high:
        return f"{tflops:.1f} TFLOP/s is far above the {where}: the harness is broken (timer or FLOP count)"
    if tflops < low / ANCHOR_TOO_SLOW:
        return f"{tflops:.1f} TFLOP/s is far below the {where}: a fallback path, or the harness is broken"
    return None
