"""Synthetic perf runs for the CPU tests of attention.bench.perf (pytest-benchmark-shaped JSON
documents), and what the tests that start the perf suite or git as subprocesses share."""

from __future__ import annotations

import copy
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from attention.bench.perf import launcher
from attention.bench.perf.machine import KEY
from attention.bench.perf.results import GRAPH, parse_run

ROOT = Path(__file__).resolve().parents[1]
#: Commits, tags and `git status` alike, whatever the user's global git config says.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Perf Test",
    "GIT_AUTHOR_EMAIL": "perf@example.com",
    "GIT_COMMITTER_NAME": "Perf Test",
    "GIT_COMMITTER_EMAIL": "perf@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not on PATH")


def subprocess_env(*paths: Path) -> dict:
    """A Python subprocess's environment: the checkout and ``paths`` importable, and not the xdist
    worker's ``PYTEST_`` variables (pytest-benchmark would think the inner run is distributed too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (ROOT, *paths))
    return env


H100 = {
    "device": "cuda",
    "gpu_name": "NVIDIA H100 80GB HBM3",
    "slug": "nvidia-h100-80gb-hbm3",
    "torch": "2.11.0+cu130",
    "torch_minor": "2.11",
    "cuda": "13.0",
    "cudnn": 91300,
    "triton": "3.6.0",
    "gpu_count": 1,
    "copy_gbps": 3000.0,
    "matmul_tflops": 790.0,
}


def case_info(key: str, **extra) -> dict:
    info = {
        "case": key,
        "kind": "prefill",
        "level": "core",
        "impl": "sdpa",
        "family": "sdpa",
        "device": "cuda",
        "dtype": "bf16",
        "direction": "fwd",
        "batch": 4,
        "num_heads": 32,
        "head_dim": 64,
        "seq_len": 4096,
        "mask": "causal",
        "timer": "cuda-event",
        "timing_mode": GRAPH,
        "sdpa_backend": "cudnn",
        "tflops": 400.0,
        "peak_mem_mib": 64.0,
        "scores_mib": 4096.0,
        "compiles_while_timing": 0,
    }
    info.update(extra)
    return info


def samples(median: float, noise: float = 0.005, n: int = 30, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [median * (1 + rng.uniform(-noise, noise)) for _ in range(n)]


def make_raw(cases: dict[str, dict], machine: dict | None = None) -> dict:
    """``cases``: key -> {"median": s, "data": [...], **extra_info fields}."""
    benches = []
    for key, spec in cases.items():
        spec = dict(spec)
        median = spec.pop("median")
        data = spec.pop("data", None) or samples(median, seed=hash(key) % 1000)
        benches.append(
            {
                "group": "g",
                "name": f"test_prefill[{key}]",
                "fullname": f"perf/test_grid.py::test_prefill[{key}]",
                "extra_info": case_info(key, **spec),
                "stats": {"median": median, "data": data, "rounds": len(data)},
            }
        )
    return {"machine_info": {"node": "x", KEY: dict(machine or H100)}, "benchmarks": benches, "version": "5.2.3"}


def make_run(cases: dict[str, dict], machine: dict | None = None, path: str = "run.json"):
    return parse_run(make_raw(cases, machine), path)


def with_machine(**changes) -> dict:
    m = copy.deepcopy(H100)
    m.update(changes)
    return m


def on_gpu(monkeypatch, info: dict) -> None:
    """The CLI as on a GPU machine whose child-process facts report ``info`` (``launcher.gpu_facts``)."""
    monkeypatch.setattr(
        launcher, "gpu_facts", lambda gpus, grid_name="", impls=(): {"names": [info["gpu_name"]], "machine": info}
    )


class PedanticBenchmark:
    """pytest-benchmark's pedantic contract: warm-up rounds, then per round setup, target, teardown."""

    disabled = False
    _timer = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.extra_info: dict = {}
        self.stats = None

    def pedantic(self, target, setup=None, teardown=None, rounds=1, warmup_rounds=0, iterations=1):
        data = []
        for i in range(warmup_rounds + rounds):
            if setup:
                setup()
            start = time.perf_counter()
            target()
            if i >= warmup_rounds:
                data.append(time.perf_counter() - start)
            if teardown:
                teardown()
        stats = type("Stats", (), {"median": sorted(data)[len(data) // 2], "data": data})
        self.stats = type("Metadata", (), {"stats": stats})
