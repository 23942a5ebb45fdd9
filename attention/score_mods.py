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
from .masks import Parameterised, index_grids

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
