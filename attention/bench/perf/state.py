"""One perf run's state under pytest (:mod:`.plugin`): its options, what it has timed, the A/B's two sides."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import ab, flags, runner, spin
from .base_revision import BaseRevision


@dataclass
class PerfState:
    device: str
    grid: str
    opts: runner.RunOptions
    clock: object
    log: Path | None
    label: str
    machine: dict
    impls: list[str] | None = None  # --perf-impl: the implementations under test (None: every registered one)
    flex_kernel_options: dict | None = None
    ceilings: dict = field(default_factory=dict)
    cases: dict = field(default_factory=dict)  # case_id -> Workload | DecodeWorkload
    started: float = field(default_factory=time.time)
    gpu_start: dict | None = None  # nvidia-smi's view of the GPU when the run began
    notes: list[str] = field(default_factory=list)
    base: BaseRevision | None = None  # the A/B's other side
    min_effects: ab.MinEffects | None = None
    ab_out: Path | None = None
    ab_cases: list = field(default_factory=list)  # (case, head samples, extra_info) per timed case
    ab_refused: list = field(default_factory=list)  # (case, why) the base revision could not build
    ab_report: ab.ABReport | None = None
    ab_not_compared: list = field(default_factory=list)  # (case, why) selected but not compared
    previous_sigterm: object = None
    calibrate: dict | None = None  # --perf-calibrate: {"pairs": ..., "max_depth": ..., "levels": [...]}
    spin_fit: spin.SpinFit | None = None  # the calibration's injected work, fitted once per session
    calibration_depth: dict = field(default_factory=dict)  # case_id -> gate-sized runs (calibration.depth_for)

    def write(self, entry: dict) -> None:
        if self.log is None:
            return
        with self.log.open("a") as f:  # one line per case, flushed as it finishes
            f.write(json.dumps(dict(entry, run=self.label), default=str) + "\n")


def kernel_options(text: str | None) -> dict | None:
    """``--perf-flex-kernel-options``: a JSON object, or ``None`` when not given."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise pytest.UsageError(f"--perf-flex-kernel-options is not JSON ({exc}): {text!r}") from None
    if not isinstance(options, dict):
        raise pytest.UsageError(f"--perf-flex-kernel-options must be a JSON object, got {text!r}")
    return options


def run_options(config: pytest.Config, device: str) -> tuple[runner.RunOptions, list[str]]:
    """The runner's options, with pytest-benchmark's own flags applied the perf suite's way, and
    notes saying which were applied."""
    args = [str(a) for a in config.invocation_params.args]
    try:
        notes = flags.check_native(args)
    except flags.FlagRefused as exc:
        raise pytest.UsageError(str(exc)) from None
    opts = runner.RunOptions(
        device, graphs=config.getoption("--perf-graphs"), budget_s=config.getoption("--perf-budget")
    )
    for flag, field_name in flags.APPLIED.items():
        if flags.given(args, flag):
            value = config.getoption(flag.removeprefix("--").replace("-", "_"))
            setattr(opts, field_name, type(getattr(opts, field_name))(value))
            notes.append(f"{flag}={value} sets the perf runner's {field_name}")
    return opts, notes
