"""The one tolerance rule, after FlashAttention's and PyTorch's own attention tests.

An implementation's error against the float64 oracle may be at most ``factor`` times the
error of a plain same-precision PyTorch implementation (the *baseline*) against that oracle,
plus a floor of a few units in the last place of the output's magnitude. A fixed atol would
be either too loose for float32 or too tight for bfloat16; this rule scales with the dtype
and with the problem. NaN never passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import AttentionBase
from .reference import reference_forward

#: Output errors may be this many times the baseline's; gradients (longer chains) a bit more.
OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0
#: The floor, in units of the dtype's epsilon times the oracle's largest magnitude.
FLOOR_ULPS = 4.0


def grad_factor(impl: type[AttentionBase], device: torch.device | str) -> float:
    """The gradient factor for ``impl`` on ``device``: :data:`GRAD_FACTOR` times the allowance the
    implementation declares for a backward known to be less precise (docs/design.md#correctness)."""
    return GRAD_FACTOR * impl.grad_error_allowance(device)


def max_error(actual: Tensor, oracle: Tensor) -> float:
    """Largest absolute difference, computed in float64; NaN anywhere gives NaN."""
    return (actual.detach().double() - oracle.detach().double()).abs().max().item()


def mean_error(actual: Tensor, oracle: Tensor) -> float:
    """Mean absolute difference, computed in float64; NaN anywhere gives NaN."""
    return (actual.detach().double() - oracle.detach().double()).abs().mean().item()


def ratio_rule_violation(
    actual: Tensor, oracle: Tensor, baseline: Tensor, *, factor: float = OUTPUT_FACTOR, what: str = "output"
) -> str | None:
    """``None`` if ``actual`` passes the rule, else a message saying by how much it fails."""
    if actual.shape != oracle.shape:
        return f"{what}: shape {tuple(actual.shape)} != oracle shape {tuple(oracle.shape)}"
    if not torch.isfinite(actual).all():
        return f"{what}: contains NaN or inf"
    err = max_error(actual, oracle)
    base_err = max_error(baseline, oracle)
    floor = FLOOR_ULPS * torch.finfo(actual.dtype).eps * oracle.detach().abs().max().item()
    bound = factor * base_err + floor
    if err <= bound:
        return None
    return (
        f"{what} ({actual.dtype}): max error {err:.3e} vs float64 oracle > bound {bound:.3e} "
        f"= {factor} x baseline error {base_err:.3e} + floor {floor:.3e}"
    )


def assert_matches_oracle(
    actual: Tensor, oracle: Tensor, baseline: Tensor, *, factor: float = OUTPUT_FACTOR, what: str = "output"
) -> None:
    """Raise ``AssertionError`` (for test suites) when :func:`ratio_rule_violation` finds one."""
    problem = ratio_rule_violation(actual, oracle, baseline, factor=factor, what=what)
    if problem is not None:
        raise AssertionError(problem)


@dataclass(frozen=True)
class OracleCheck:
    """A module's output against the float64 oracle: errors, the baseline's error (the oracle's
    math run in the input's dtype) and the rule's verdict (``problem`` is ``None`` when it passes)."""

    max_error: float
    mean_error: float
    baseline_max_error: float
    problem: str | None

    @property
    def passes(self) -> bool:
        return self.problem is None


def check_module(
    module: AttentionBase,
    x: Tensor,
    actual: Tensor | None = None,
    *,
    document_ids: Tensor | None = None,
    what: str = "output",
) -> OracleCheck:
    """``actual`` (default: ``module(x)`` without grad) against the float64 oracle, by the ratio rule.

    The one comparison the tests, the benchmark report and the notebook all make.
    """
    if actual is None:
        with torch.no_grad():
            actual = module(x, document_ids=document_ids)  # (B, T, d_out)
    oracle = reference_forward(module, x, document_ids=document_ids)  # (B, T, d_out), float64
    baseline = reference_forward(module, x, dtype=x.dtype, document_ids=document_ids)  # (B, T, d_out)
    return OracleCheck(
        max_error=max_error(actual, oracle),
        mean_error=mean_error(actual, oracle),
        baseline_max_error=max_error(baseline, oracle),
        problem=ratio_rule_violation(actual, oracle, baseline, what=what),
    )
