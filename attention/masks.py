"""Attention patterns, each defined once as a flex-style ``mask_mod``.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` says whether query ``q_idx`` may attend to
key ``kv_idx`` (absolute positions, so a query chunk that continues a KV cache is masked right).
FlexAttention consumes these natively; the from-scratch and SDPA paths evaluate the same
function on broadcast index grids (:func:`dense_mask`), so every implementation runs one
definition. Mask mods must therefore be elementwise tensor expressions (no Python ``if`` on
tensor values), the same rule flex's ``vmap`` imposes. Parameterised patterns come from
``generate_*``-style factories, as in attention-gym.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks

from . import checks

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "SPEC_KINDS",
    "MaskMod",
    "Pattern",
    "and_masks",
    "causal",
    "dense_mask",
    "document",
    "from_spec",
    "offset_mask",
    "packed_document_ids",
    "parse_spec",
    "prefix_length",
    "prefix_lm",
    "sliding_window",
]


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Each query sees itself and every earlier key."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """Causal with exactly ``window`` keys visible, the query's own included."""
    checks.integer("window", window)

    def sliding_window_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    sliding_window_mask.__name__ = f"sliding_window_{window}"
    return sliding_window_mask


def prefix_lm(prefix_len: int) -> MaskMod:
    """Keys before ``prefix_len`` are visible to every query; causal after them."""
    checks.integer("prefix_len", prefix_len, minimum=0)

    def prefix_lm_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)

    prefix_lm_mask.__name__ = f"prefix_lm_{prefix_len}"
    prefix_lm_mask.prefix_len = prefix_len  # see prefix_length
    return prefix_lm_mask


def prefix_length(mask_mod: MaskMod) -> int:
    """How many leading keys ``mask_mod`` shows to *every* query, later ones included.

    A pattern with such a bidirectional prefix declares it as a ``prefix_len`` attribute (as
    :func:`prefix_lm` does): a KV cache must then receive the whole prefix in its first chunk,
    since queries already run could not see prefix keys that came after them. 0 for the rest.
    """
    return getattr(mask_mod, "prefix_len", 0)


def document(document_ids: Tensor) -> MaskMod:
    """Packed sequences: a query sees only keys of its own document.

    ``document_ids`` is ``(batch, tokens)`` of integer ids, one per position from the first
    cached key to the last query. Combine with a pattern through :func:`and_masks`.
    """

    def document_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return document_mask


def offset_mask(mask_mod: MaskMod, q_offset: int) -> MaskMod:
    """``mask_mod`` for a query chunk whose first row sits at absolute position ``q_offset``."""
    if q_offset == 0:
        return mask_mod

    def shifted(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(b, h, q_idx + q_offset, kv_idx)

    return shifted


def dense_mask(
    mask_mod: MaskMod,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    device: torch.device | str,
    q_offset: int = 0,
) -> Tensor:
    """Evaluate ``mask_mod`` on index grids: a bool mask broadcastable to ``(B, H, Tq, Tk)``.

    Dimensions the pattern ignores stay of size 1 (a causal mask is ``(1, 1, Tq, Tk)``), so the
    dense mask costs no more memory than the pattern needs.
    """
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)  # (1, H, 1, 1)
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device).view(1, 1, -1, 1)  # (1, 1, Tq, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)  # (1, 1, 1, Tk)
    mask = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        # SDPA would read a float 0/1 mask as an additive bias and silently attend everywhere.
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask_mod must return a bool tensor, got {got}")
    return torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, (1, 1, q_len, kv_len)))


def packed_document_ids(
    batch: int,
    tokens: int,
    docs: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``(batch, tokens)`` sorted integer ids of ``docs`` documents packed into each row.

    With a ``generator`` each row gets its own random boundaries (property tests); without, every
    row has the same fixed, uneven split (weights 1, 3, 5, 2, 4, ...), so a benchmark does the
    same work on every run and machine.
    """
    checks.integer("batch", batch)
    checks.integer("tokens", tokens)
    checks.integer("docs", docs)
    if docs > tokens:
        raise ValueError(f"cannot pack {docs} documents into {tokens} tokens")
    if generator is None:
        weights = [(i * 7) % 5 + 1 for i in range(docs)]  # 1, 3, 5, 2, 4, 1, ...
        lengths = [max(1, tokens * w // sum(weights)) for w in weights[:-1]]
        if sum(lengths) >= tokens:
            raise ValueError(f"cannot pack {docs} documents into {tokens} tokens")
        cuts = torch.tensor(lengths, dtype=torch.long).cumsum(0).expand(batch, docs - 1)  # (B, docs - 1)
    else:
        order = torch.rand(batch, tokens - 1, generator=generator).argsort(dim=-1)  # (B, T - 1)
        cuts = (order[:, : docs - 1] + 1).sort(dim=-1).values  # (B, docs - 1) distinct starts in [1, T)
    positions = torch.arange(tokens)  # (T,)
    ids = (positions[None, :, None] >= cuts[:, None, :]).sum(-1)  # (B, T)
    return ids.to(device=device, dtype=torch.int32)


#: What :func:`parse_spec` accepts: ``kind`` or ``kind:N``.
SPEC_KINDS = {
    "causal": "causal",
    "sliding_window": "sliding_window:W (W keys visible, the query's own included)",
    "prefix_lm": "prefix_lm:P (the first P keys visible to every query)",
    "document": "document:N (causal within N packed documents)",
}


def parse_spec(spec: str) -> tuple[str, int]:
    """``"causal"``, ``"sliding_window:W"``, ``"prefix_lm:P"`` or ``"document:N"`` -> ``(kind, N)``."""
    if not isinstance(spec, str):
        raise TypeError(f"mask spec must be a str, got {type(spec).__name__} ({spec!r})")
    kind, sep, arg = spec.partition(":")
    if kind == "causal" and not sep:
        return kind, 0
    if kind in SPEC_KINDS and kind != "causal" and arg.isdigit() and (int(arg) > 0 or kind == "prefix_lm"):
        return kind, int(arg)
    raise ValueError(f"unknown mask {spec!r}: use {', '.join(repr(v) for v in SPEC_KINDS.values())}")


@dataclass(frozen=True)
class Pattern:
    """What a spec stands for: the module's ``mask_mod``, the ``document_ids`` its forward
    takes (``None`` unless documents are packed) and :attr:`visible`, both combined."""

    spec: str
    mask_mod: MaskMod
    document_ids: Tensor | None

    @property
    def visible(self) -> MaskMod:
        """Whether a query sees a key, documents included: one ``mask_mod`` for dense masks and
        block counting."""
        if self.document_ids is None:
            return self.mask_mod
        return and_masks(self.mask_mod, document(self.document_ids))


def from_spec(
    spec: str,
    *,
    batch: int = 1,
    tokens: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Pattern:
    """The :class:`Pattern` for ``spec`` (see :func:`parse_spec`) over ``batch`` rows of
    ``tokens`` tokens; documents as in :func:`packed_document_ids`."""
    kind, arg = parse_spec(spec)
    if kind == "sliding_window":
        return Pattern(spec, sliding_window(arg), None)
    if kind == "prefix_lm":
        return Pattern(spec, prefix_lm(arg), None)
    if kind == "document":
        ids = packed_document_ids(batch, tokens, arg, generator=generator, device=device)  # (B, T)
        return Pattern(spec, causal, ids)
    return Pattern(spec, causal, None)
