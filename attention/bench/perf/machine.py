"""Which machine a perf run is on, the key its baseline is stored under, and its ceilings.

Baselines are only comparable on the same GPU model and torch minor version, so the run's
JSON carries both (``machine_info["attention_perf"]``), and the baseline directory is named after
the GPU (:func:`slugify`). Ceilings (device copy bandwidth, matmul throughput: bf16 on a GPU) are
measured in the same run, so GB/s and TFLOP/s can be read as fractions of what this device does.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess

import torch

from ..timing import measure

#: The key under which our fields sit in pytest-benchmark's ``machine_info``.
KEY = "attention_perf"


def slugify(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: the baseline directory name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a directory name out of {name!r}")
    return slug


def torch_minor(version: str) -> str:
    """``"2.11.0+cu130"`` -> ``"2.11"``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"not a torch version: {version!r}")
    return f"{match.group(1)}.{match.group(2)}"


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or broken: either way no version to record
        return None
    return getattr(triton, "__version__", None)


def machine_info(device: torch.device | str) -> dict:
    """What a baseline must match (GPU, torch minor) and what it should mention (CUDA, cuDNN, triton)."""
    device = torch.device(device)
    info: dict = {
        "device": device.type,
        "torch": torch.__version__,
        "torch_minor": torch_minor(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _triton_version(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 1024**3, 1),
            gpu_count=torch.cuda.device_count(),
            slug=slugify(props.name),
        )
    else:
        info.update(gpu_name=None, cpu=platform.processor() or platform.machine(), slug="cpu")
    return info


def _median_seconds(fn, device: torch.device, rounds: int) -> float:
    return statistics.median(measure(fn, device=device, rounds=rounds, warmup=1))


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int | None = None, rounds: int = 10) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written (the decode ceiling)."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, rounds)
    return 2 * nbytes / seconds / 1e9


def matmul_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of the compute ceiling: bf16 on CUDA, fp32 on the CPU (whose bf16 matmul is slow)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def matmul_tflops(device: torch.device | str, n: int | None = None, rounds: int = 10) -> float:
    """Square matmul throughput in :func:`matmul_dtype`: the compute ceiling for TFLOP/s."""
    device = torch.device(device)
    dtype = matmul_dtype(device)
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)  # (n, n)
    b = torch.randn(n, n, device=device, dtype=dtype)  # (n, n)
    seconds = _median_seconds(lambda: a @ b, device, rounds)
    return 2 * n**3 / seconds / 1e12


#: nvidia-smi fields recorded at the start and end of a run: what the driver says about clocks,
#: heat and throttling while the numbers were taken.
GPU_STATE_FIELDS = (
    "driver_version",
    "clocks.sm",
    "clocks.max.sm",
    "clocks.applications.graphics",
    "temperature.gpu",
    "power.draw",
    "utilization.gpu",
    "clocks_event_reasons.active",
)
#: Bits of ``clocks_event_reasons.active`` (NVML's clocks event reasons) that slow the clock down.
_THROTTLE_BITS = {
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "power brake",
}
_CLOCKS_SET_BIT = 0x2  # clocks held by an applications-clocks or locked-clocks setting


def _nvidia_smi(*args: str) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _smi_id(index: int) -> str:
    """How nvidia-smi names CUDA device ``index``: by UUID, since nvidia-smi numbers the host's GPUs
    and ignores CUDA_VISIBLE_DEVICES (a process pinned to GPU 3 sees it as device 0)."""
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "") or "")
    if not uuid:
        return str(index)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def gpu_state(device: torch.device | str) -> dict | None:
    """Driver, clocks, temperature, power, utilisation and throttle reasons of ``device`` right
    now, and how many other processes compute on it; ``None`` where nvidia-smi is unavailable."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = _smi_id(device.index if device.index is not None else torch.cuda.current_device())
    fields = list(GPU_STATE_FIELDS)
    out = _nvidia_smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", index)
    if out is None:  # drivers before 535 call the reasons "clocks_throttle_reasons"
        fields[-1] = "clocks_throttle_reasons.active"
        out = _nvidia_smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", index)
    if out is None:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    state: dict = dict(zip(GPU_STATE_FIELDS, values, strict=False))
    reasons = state.pop("clocks_event_reasons.active", "")
    try:
        bits = int(reasons, 16)
    except ValueError:
        bits = None
    state["throttle_reasons"] = None if bits is None else [name for bit, name in _THROTTLE_BITS.items() if bits & bit]
    state["clocks_locked"] = None if bits is None else bool(bits & _CLOCKS_SET_BIT)
    uuid = _nvidia_smi("--query-gpu=uuid", "--format=csv,noheader", "-i", index)
    apps = _nvidia_smi("--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader") or ""
    pids = {line.split(",")[1].strip() for line in apps.splitlines() if uuid and line.startswith(uuid)}
    state["other_processes"] = len(pids - {str(os.getpid())})
    return state


def noise_warnings(start: dict | None, end: dict | None) -> list[str]:
    """What in the GPU's state at the start and end of a run makes its timings less trustworthy."""
    warnings = []
    for when, state in (("at the start", start), ("at the end", end)):
        if not state:
            continue
        if state.get("throttle_reasons"):
            warnings.append(f"GPU throttling {when}: {', '.join(state['throttle_reasons'])}")
        if state.get("other_processes"):
            warnings.append(f"{state['other_processes']} other process(es) computing on this GPU {when}")
    if start and start.get("utilization.gpu") not in (None, "", "0", "[N/A]"):
        warnings.append(f"GPU {start['utilization.gpu']}% busy before the run started")
    return warnings


#: What must match for two runs to be comparable at all; everything else in machine info is
#: per-run (wall time, measured ceilings, clocks) and differs every time.
STABLE_KEYS = ("gpu_name", "torch_minor")
