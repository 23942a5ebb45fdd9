"""Score modifiers, each defined once as a flex-style ``score_mod``.

A ``score_mod(score, b, h, q_idx, kv_idx) -> score`` rewrites the scaled score ``q·k * scale``
before masking and softmax; ``h`` is the query head, ``q_idx`` and ``kv_idx`` are absolute
positions. FlexAttention takes these natively; the from-scratch path and the oracle apply the
same function to the dense score matrix (:func:`apply_dense`). SDPA takes only an additive
bias, so it runs the score mods marked ``additive`` (ALiBi) and rejects the others (soft-capping)
at construction. Factories follow attention-gym's ``generate_<name>`` style and return small
callable objects rather than closures, so a module holding one pickles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import checks
from .masks import Parameterised, callable_as, held_tensor_device, index_grids, probed_once

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "Alibi",
    "ScoreMod",
    "TanhSoftcap",
    "apply_dense",
    "dense_bias",
    "generate_alibi",
    "generate_tanh_softcap",
    "is_additive",
    "offset_score_mod",
]


class Alibi(Parameterised):
    """What :func:`generate_alibi` returns (a picklable object, equal to another of its heads)."""

    _kind = "alibi"
    #: score_mod(s, ...) == s + score_mod(0, ...): an SDPA attn_mask can carry it.
    additive = True
    num_heads: int

    def __init__(self, num_heads: int) -> None:
        self._set(num_heads=checks.integer("num_heads", num_heads))  # checked against the module's num_heads

    def _params(self) -> tuple:
        return (self.num_heads,)

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        slope = torch.exp2((h + 1).to(score.dtype) * (-8.0 / self.num_heads))  # in the score's precision
        return score + slope * (kv_idx - q_idx)


class TanhSoftcap(Parameterised):
    """What :func:`generate_tanh_softcap` returns (a picklable object, equal to another of its cap)."""

    _kind = "tanh_softcap"
    cap: float

    def __init__(self, cap: float) -> None:
        self._set(cap=checks.real("cap", cap, lambda c: c > 0 and math.isfinite(c), "a finite number > 0"))

    def _params(self) -> tuple:
        return (self.cap,)

    @property
    def __name__(self) -> str:
        return f"tanh_softcap_{self.cap:g}"

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)


def generate_alibi(num_heads: int) -> ScoreMod:
    """ALiBi (Press et al.): add ``slope_h * (kv_idx - q_idx)``, slopes ``2**(-8 (h+1) / num_heads)``.

    Additive (the bias does not depend on the score), so every implementation can run it;
    ``num_heads`` must be the module's query head count.
    """
    return Alibi(num_heads)


def generate_tanh_softcap(cap: float) -> ScoreMod:
    """Soft-capping (Gemma 2): ``cap * tanh(score / cap)`` keeps every score inside ``(-cap, cap)``."""
    return TanhSoftcap(cap)


def is_additive(score_mod: ScoreMod) -> bool:
    """Whether ``score_mod`` only adds a bias that does not depend on the score."""
    return bool(getattr(score_mod, "additive", False))


def check_score_mod(score_mod: object) -> None:
    """Refuse, before any work, a ``score_mod`` that cannot be called as ``(score, b, h, q_idx,
    kv_idx)`` (``TypeError``), that returns no floating tensor shaped like ``score`` (``TypeError``,
    ``ValueError``), or that is not elementwise (``ValueError``): flex applies it to one score at a
    time and the others to the whole score matrix, so a function of several scores (``score -
    score.max()``) would silently give each implementation another answer.

    It is called on a ``(1, 1, 2, 3)`` grid of scores, and on each score of it alone, with every
    index 0 (so a mod indexing a tensor by position stays in range), on the device of the tensors
    it holds (:func:`~attention.masks.held_tensor_device`), else the CPU; on ``meta`` only the
    result's dtype and shape are checked."""
    probed_once(score_mod, lambda: _probe_score_mod(score_mod))


def _probe_score_mod(score_mod: object) -> None:
    fn = callable_as("score_mod", score_mod, "(score, b, h, q_idx, kv_idx)")
    label = checks.name_of(fn)
    device = held_tensor_device(fn)
    b, h, q_idx, kv_idx = (torch.zeros_like(grid) for grid in index_grids(1, 1, 2, 3, device))
    scores = torch.linspace(-2.0, 3.0, 6, device=device).view(1, 1, 2, 3)  # (1, 1, 2, 3)
    try:
        result = fn(scores, b, h, q_idx, kv_idx)
    except Exception as exc:
        raise TypeError(
            f"score_mod {label} raised {type(exc).__name__} on a (1, 1, 2, 3) grid on {device}: {exc}"
        ) from exc
    if not isinstance(result, Tensor) or not result.dtype.is_floating_point:
        got = result.dtype if isinstance(result, Tensor) else type(result).__name__
        raise TypeError(f"score_mod must return a floating tensor shaped like score, {label} returned {got}")
    if result.shape != scores.shape:
        raise ValueError(
            "score_mod must return a tensor shaped like score, (1, 1, 2, 3) here; "
            f"{label} returned {tuple(result.shape)}"
        )
    if device.type == "meta":  # shapes only: meta tensors hold no values to compare
        return
    for i in range(2):
        for j in range(3):
            alone = fn(scores[..., i : i + 1, j : j + 1], b, h, q_idx[..., i : i + 1, :], kv_idx[..., j : j + 1])
            if not torch.allclose(alone.reshape(()), result[0, 0, i, j], rtol=1e-5, atol=1e-6):
                raise ValueError(
                    f"score_mod {label} is not elementwise: score {i, j} of a (1, 1, 2, 3) grid came out "
                    f"{float(result[0, 0, i, j]):.6g}, and {float(alone.reshape(())):.6g} with that score alone; "
                    "flex applies it to one score at a time, the others to the whole score matrix"
                )


def apply_dense(score_mod: ScoreMod, scores: Tensor, q_offset: int = 0) -> Tensor:
    """``score_mod`` on a dense ``(B, H, Tq, Tk)`` score matrix whose first row sits at ``q_offset``."""
    batch, heads, q_len, kv_len = scores.shape
    grids = index_grids(batch, heads, q_len, kv_len, scores.device, q_offset)
    # At least float32, as flex computes scores: a bias rounded to bf16 would be off by whole units.
    work = scores if scores.dtype == torch.float64 else scores.float()  # (B, H, Tq, Tk)
    return score_mod(work, *grids).to(scores.dtype)  # (B, H, Tq, Tk)


def dense_bias(
    score_mod: ScoreMod, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device, q_offset: int = 0
) -> Tensor:
    """An additive ``score_mod``'s bias in float32, broadcastable to ``(B, H, Tq, Tk)``;
    dimensions it ignores stay of size 1 (ALiBi: ``(1, H, Tq, Tk)``)."""
    zero = torch.zeros((), dtype=torch.float32, device=device)  # the score the bias is added to
    bias = score_mod(zero, *index_grids(batch, heads, q_len, kv_len, device, q_offset))
    return torch.broadcast_to(bias, torch.broadcast_shapes(bias.shape, (1, 1, q_len, kv_len)))


def offset_score_mod(score_mod: ScoreMod, q_offset: int) -> ScoreMod:
    """``score_mod`` for a query chunk whose first row sits at absolute position ``q_offset``."""
    if q_offset == 0:
        return score_mod

    def shifted(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score_mod(score, b, h, q_idx + q_offset, kv_idx)

    return shifted
