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

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import and_masks as _torch_and_masks

from . import checks

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "SPEC_KINDS",
    "MaskMod",
    "Pattern",
    "PerDocument",
    "PrefixLM",
    "SlidingWindow",
    "and_masks",
    "causal",
    "check_mask_mod",
    "checked",
    "dense_mask",
    "document",
    "document_starts",
    "from_spec",
    "offset_mask",
    "packed_document_ids",
    "parse_spec",
    "per_document",
    "prefix_length",
    "prefix_lm",
    "sliding_window",
]


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Each query sees itself and every earlier key."""
    return q_idx >= kv_idx


class Parameterised:
    """A built-in pattern (or score mod) with parameters: a small callable object instead of a
    closure, so a module holding one pickles (``torch.save(module)``), two made alike compare
    equal, and flex keys compiled code on its type and parameters (``attention.flex.pattern_key``).
    A subclass sets ``_kind`` and its parameters in ``__init__`` (through ``_set``) and lists
    them in ``_params``."""

    _kind = ""

    def _params(self) -> tuple:
        raise NotImplementedError

    def _set(self, **params: object) -> None:
        for name, value in params.items():
            object.__setattr__(self, name, value)

    @property
    def __name__(self) -> str:  # as a function's, for messages and repr
        return "_".join([self._kind, *(str(p) for p in self._params())])

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._params() == self._params()

    def __hash__(self) -> int:
        return hash((type(self), self._params()))

    def __repr__(self) -> str:
        args = ", ".join(repr(p) for p in self._params())
        return f"{self._kind}({args})"

    def __setattr__(self, name: str, value: object) -> None:
        # Frozen: flex keys cached BlockMasks and compiled code on these parameters.
        raise AttributeError(f"{type(self).__name__} is immutable; make a new one")

    def __reduce__(self):
        return type(self), self._params()


class SlidingWindow(Parameterised):
    """What :func:`sliding_window` returns: ``window`` keys visible, the query's own included."""

    _kind = "sliding_window"
    window: int

    def __init__(self, window: int) -> None:
        self._set(window=checks.integer("window", window))

    def _params(self) -> tuple:
        return (self.window,)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < self.window)


class PrefixLM(Parameterised):
    """What :func:`prefix_lm` returns: keys before ``prefix_len`` visible to every query."""

    _kind = "prefix_lm"
    prefix_len: int

    def __init__(self, prefix_len: int) -> None:
        self._set(prefix_len=checks.integer("prefix_len", prefix_len, minimum=0))

    def _params(self) -> tuple:
        return (self.prefix_len,)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < self.prefix_len) | (q_idx >= kv_idx)


def sliding_window(window: int) -> MaskMod:
    """Causal with exactly ``window`` keys visible, the query's own included: ``0 <= q - kv < window``.

    Conventions differ by one. Here ``window`` counts the query's own key, so ``sliding_window(1)``
    is the diagonal. attention-gym's ``generate_sliding_window(window_size)`` (``q - kv <=
    window_size``) and FlashAttention's ``window_size=(left, 0)`` count only the keys *left* of
    the query, showing ``window_size + 1`` keys: ``sliding_window(w)`` is their ``w - 1``.
    """
    return SlidingWindow(window)


def prefix_lm(prefix_len: int) -> MaskMod:
    """Keys before ``prefix_len`` are visible to every query; causal after them.

    Positions are absolute: combined with :func:`document` through :func:`and_masks`, only the
    document that starts at position 0 gets a bidirectional prefix. For packed prefix-LM
    training, where every document has its own prefix of its first ``prefix_len`` tokens, use
    ``per_document(prefix_lm(prefix_len), document_ids)`` (:func:`per_document`).
    """
    return PrefixLM(prefix_len)


def prefix_length(mask_mod: MaskMod) -> int:
    """How many leading keys ``mask_mod`` shows to *every* query, later ones included.

    A pattern with such a bidirectional prefix declares it as a ``prefix_len`` attribute (as
    :func:`prefix_lm` does): a KV cache must then receive the whole prefix in its first chunk,
    since queries already run could not see prefix keys that came after them. 0 for the rest.
    """
    return getattr(mask_mod, "prefix_len", 0)


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """Every one of ``mask_mods`` holds (flex's ``and_masks``), keeping the longest bidirectional
    prefix among them (:func:`prefix_length`), so a KV cache still refuses to split it."""
    combined = _torch_and_masks(*mask_mods)
    prefix = max((prefix_length(m) for m in mask_mods), default=0)
    if prefix:
        combined.prefix_len = prefix  # type: ignore[attr-defined]  # an attribute on a function
    return combined


def document(document_ids: Tensor) -> MaskMod:
    """Packed sequences: a query sees only keys of its own document.

    ``document_ids`` is ``(batch, tokens)`` of integer ids, one per position from the first
    cached key to the last query. Combine with a pattern through :func:`and_masks`; the pattern
    then sees absolute positions (see :func:`per_document` for document-local ones). The function
    keeps the ids (:func:`held_document_ids`), so a module given it as its ``mask_mod`` checks them
    against each call's batch and positions.
    """
    check_document_ids(document_ids)

    def document_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    document_mask._held_document_ids = document_ids  # type: ignore[attr-defined]  # read by held_document_ids
    return document_mask


def check_document_ids(document_ids: object, call: tuple[int, int] | None = None) -> None:
    """Refuse ids that are not a ``(batch, tokens)`` tensor of integers: for a module's call,
    exactly ``call`` (its batch and cached + new positions)."""
    if not isinstance(document_ids, Tensor):
        raise TypeError(f"document_ids must be a torch.Tensor, got {type(document_ids).__name__}")
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise TypeError(f"document_ids must hold integers, got {document_ids.dtype}")
    shape = tuple(document_ids.shape)
    if call is not None and shape != call:
        raise ValueError(f"document_ids must have shape (batch, cached + tokens) = {call}, got {shape}")
    if document_ids.dim() != 2 or document_ids.shape[1] < 1:
        raise ValueError(f"document_ids must have shape (batch, tokens), got {shape}")


def held_document_ids(mask_mod: MaskMod) -> Tensor | None:
    """The ``(batch, tokens)`` ids a pattern made by :func:`document` or :func:`per_document`
    holds, or ``None`` (for any other pattern, whatever its attributes: one of the user's own may
    hold ids of another layout under the same name)."""
    if isinstance(mask_mod, PerDocument):
        return mask_mod.document_ids
    return getattr(mask_mod, "_held_document_ids", None)


def document_starts(document_ids: Tensor) -> Tensor:
    """``(batch, tokens)``: for each position, where its document begins (each document is one
    contiguous run of equal ids, as packing makes them)."""
    positions = torch.arange(document_ids.shape[1], device=document_ids.device).expand(document_ids.shape)  # (B, T)
    begins = torch.ones(document_ids.shape, dtype=torch.bool, device=document_ids.device)  # (B, T)
    begins[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(begins, positions, 0).cummax(dim=1).values  # (B, T)


def _check_one_run_each(document_ids: Tensor) -> None:
    """Refuse an id that labels two separate runs (``[1, 1, 0, 0, 2, 2, 0, 0]``): the pattern is
    evaluated on positions counted from each run's start, so two runs of one id would each count
    from their own start while matching each other's keys, and a query would see the later run's
    keys as if they were its own past (docs/design.md#per-document-ids)."""
    begins = torch.ones(document_ids.shape, dtype=torch.bool, device=document_ids.device)  # (B, T)
    begins[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    ordered = document_ids.sort(dim=1).values  # (B, T)
    distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1  # (B,)
    split = (begins.sum(dim=1) != distinct).nonzero().flatten()  # (rows,)
    if split.numel():
        row = int(split[0])
        doc, first, second = _second_run(document_ids[row].tolist())
        raise ValueError(
            f"document_ids row {row} gives id {doc} to two separate runs, starting at positions {first} and "
            f"{second}: per_document needs each document to be one contiguous run (its pattern counts positions "
            "from the document's start); give each run its own id"
        )


def _second_run(ids: list[int]) -> tuple[int, int, int]:
    """The first id in ``ids`` that starts a second run: ``(id, first run's start, second's)``."""
    seen: dict[int, int] = {}
    for pos, doc in enumerate(ids):
        if pos and doc == ids[pos - 1]:
            continue
        if doc in seen:
            return doc, seen[doc], pos
        seen[doc] = pos
    raise AssertionError("unreachable: the caller counted more runs than distinct ids")


class PerDocument:
    """What :func:`per_document` returns; pickles with its ids, equal only to itself (its ids
    are a tensor, compared by identity, as flex's caches need)."""

    mask_mod: MaskMod
    document_ids: Tensor  # (B, T)
    starts: Tensor  # (B, T)
    _split_forbidden: list[bool]

    def __init__(self, mask_mod: MaskMod, document_ids: Tensor) -> None:
        checks.function("mask_mod", mask_mod, "(b, h, q_idx, kv_idx)")
        check_document_ids(document_ids)
        # Frozen, and the ids copied: flex caches BlockMasks per module, so ids changed in place
        # or a swapped pattern would keep attending with the old ones.
        document_ids = document_ids.clone()  # (B, T)
        _check_one_run_each(document_ids)
        starts = document_starts(document_ids)  # (B, T)
        object.__setattr__(self, "mask_mod", mask_mod)
        object.__setattr__(self, "document_ids", document_ids)
        object.__setattr__(self, "starts", starts)
        # Positions where a KV cache may not end (some document's prefix continues past them),
        # worked out once here so a cached call does not sync the GPU to ask.
        local = torch.arange(document_ids.shape[1], device=document_ids.device) - starts  # (B, T)
        inside = ((local > 0) & (local < prefix_length(mask_mod))).any(dim=0)  # (T,)
        object.__setattr__(self, "_split_forbidden", inside.cpu().tolist())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("per_document patterns are frozen; make a new one with per_document(mask_mod, ids)")

    @property
    def __name__(self) -> str:
        return f"per_document_{getattr(self.mask_mod, '__name__', type(self.mask_mod).__name__)}"

    def __repr__(self) -> str:
        return f"per_document({self.mask_mod!r}, document_ids of shape {tuple(self.document_ids.shape)})"

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ids, starts = self.document_ids, self.starts
        same = ids[b, q_idx] == ids[b, kv_idx]
        return same & self.mask_mod(b, h, q_idx - starts[b, q_idx], kv_idx - starts[b, kv_idx])

    def prefix_split_at(self, pos: int) -> bool:
        """Whether a KV cache ending at ``pos`` cuts some document inside its bidirectional prefix
        (see :func:`prefix_length`): a query before ``pos`` would have missed a prefix key after it."""
        return 0 < pos < len(self._split_forbidden) and self._split_forbidden[pos]


def per_document(mask_mod: MaskMod, document_ids: Tensor) -> MaskMod:
    """Packed sequences, each document on its own positions: ``mask_mod`` evaluated on
    document-local indices, and only within a document (attention-gym's document wrapper).

    ``document_ids`` is ``(batch, tokens)``, one id per position from the first cached key to the
    last query, each document one contiguous run (an id given to two separate runs is refused with
    a ``ValueError``: docs/design.md#per-document-ids). Query ``q`` sees key ``kv`` when both are in one
    document and ``mask_mod(b, h, q - start, kv - start)`` holds, ``start`` being where that
    document begins. So ``per_document(prefix_lm(p), ids)`` gives *every* document a bidirectional
    prefix of its first ``p`` tokens, as packed prefix-LM training needs, whereas
    ``and_masks(prefix_lm(p), document(ids))`` (a module's ``mask_mod`` with ``document_ids`` at
    call time) keeps absolute positions: only the document at position 0 gets a prefix. For
    causal and sliding windows, which depend on ``q - kv`` alone, the two agree. Use it as a
    module's ``mask_mod`` (assign a new one for each batch of ids); with a KV cache, no chunk may
    end inside a document's prefix.
    """
    return PerDocument(mask_mod, document_ids)


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
    mask = mask_mod(*index_grids(batch, heads, q_len, kv_len, device, q_offset))
    _check_result(mask, (batch, heads, q_len, kv_len))
    return torch.broadcast_to(mask, torch.broadcast_shapes(mask.shape, (1, 1, q_len, kv_len)))


#: Mask elements evaluated at once when an earlier chunk's queries are checked against a new
#: chunk's keys (:func:`later_key_seen`), in bands of query rows.
CHECK_ELEMENTS = 1 << 24


def shows_no_later_key(mask_mod: MaskMod) -> bool:
    """Whether ``mask_mod`` is known never to show a query a key after it, but in a prefix declared
    as ``prefix_len`` (whose split a KV cache refuses on its own, :func:`prefix_length`): causal,
    sliding windows, ``prefix_lm`` and ``per_document`` of those. Restricting one to documents
    (call-time ``document_ids``) only hides keys, so it keeps the answer."""
    if isinstance(mask_mod, PerDocument):
        mask_mod = mask_mod.mask_mod
    return mask_mod is causal or isinstance(mask_mod, (SlidingWindow, PrefixLM))


def later_key_seen(
    mask_mod: MaskMod, batch: int, heads: int, queries: range, keys: range, device: torch.device | str
) -> tuple[int, int] | None:
    """The first ``(query, key)``, ``query`` in ``queries`` and ``key`` in ``keys`` after it, that
    ``mask_mod`` shows; ``None`` when there is none.

    A KV cache runs queries in chunks: one that ran before a chunk never saw the keys it brings, so
    a pattern that shows it one gives cached outputs that differ from one call on the whole
    sequence. The pattern is evaluated in bands of query rows, each at most :data:`CHECK_ELEMENTS`
    mask elements (a device sync each on a GPU)."""
    bm, hm = dense_mask(mask_mod, batch, heads, 1, 1, device).shape[:2]  # 1 where it ignores b or h
    band = max(1, CHECK_ELEMENTS // (max(1, len(keys)) * bm * hm))  # query rows a step
    for row0 in range(queries.start, queries.stop, band):
        rows = min(band, queries.stop - row0)
        first = max(keys.start, row0 + 1)  # no key at or before the band's first query
        if first >= keys.stop:
            break
        b, h, q_idx, kv_idx = index_grids(batch, heads, rows, keys.stop - first, device, row0)
        kv_idx = kv_idx + first
        seen = mask_mod(b, h, q_idx, kv_idx)
        _check_result(seen, (batch, heads, rows, keys.stop - first))
        later = seen & (kv_idx > q_idx)  # broadcasts to (B|1, H|1, rows, keys)
        found = later.any(dim=(0, 1)).nonzero()  # (n, 2): (row, key) pairs, row-major
        if len(found):
            return row0 + int(found[0, 0]), first + int(found[0, 1])
    return None


#: The most query-key pairs evaluated once to clear a pattern for a cache's whole length (about
#: 46k positions); a longer cache checks each cached call alone.
VERDICT_ELEMENTS = 1 << 30
#: What was found out about a pattern or score mod, kept while it lives: that its probe passed
#: (:func:`check_mask_mod`, ``check_score_mod``), whether it shows a later key for a cache's size.
_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def facts(fn: object) -> dict | None:
    """What is known about ``fn`` (:data:`_FACTS`; empty at first), to add to; ``None`` for one that
    cannot be weakly referenced or hashed, whose facts are worked out at every call."""
    try:
        return _FACTS.setdefault(fn, {})
    except TypeError:
        return None


def probed_once(fn: object, probe: Callable[[], None]) -> None:
    """Run ``probe`` (which raises for a bad ``fn``) unless it passed for ``fn`` before: modules and
    the oracle both check the patterns they are given, and a pattern is the same function each time."""
    known = facts(fn)
    if known is not None and known.get("probed"):
        return
    probe()
    if known is not None:
        known["probed"] = True


def never_shows_later_key(mask_mod: MaskMod, batch: int, heads: int, length: int, device: torch.device) -> bool:
    """Whether ``mask_mod`` shows no query of positions ``0 .. length - 1`` a key after it: true for
    the built-in patterns (:func:`shows_no_later_key`), else evaluated once over ``length`` squared
    positions and remembered for the pattern. ``False`` where that cannot be worked out: a pattern
    defined only over the positions its own tensors cover (it raises past them), or one that cannot
    be remembered (not weakly referable or hashable); each cached call is then checked alone."""
    if shows_no_later_key(mask_mod):
        return True
    if length * (length - 1) // 2 > VERDICT_ELEMENTS:
        return False
    key = ("no later key", batch, heads, length, torch.device(device))
    known = facts(mask_mod)
    if known is None:
        return False
    if key not in known:
        try:
            known[key] = later_key_seen(mask_mod, batch, heads, range(length), range(length), device) is None
        except (IndexError, RuntimeError, ValueError, TypeError):  # evaluated past the positions it covers
            known[key] = False
    return known[key]


def index_grids(
    batch: int, heads: int, q_len: int, kv_len: int, device: torch.device | str, q_offset: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``b, h, q_idx, kv_idx`` broadcasting to ``(B, H, Tq, Tk)``, the queries from ``q_offset``:
    what a ``mask_mod`` or ``score_mod`` is evaluated on densely."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)  # (1, H, 1, 1)
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device).view(1, 1, -1, 1)  # (1, 1, Tq, 1)
    kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)  # (1, 1, 1, Tk)
    return b, h, q_idx, kv_idx


def _check_result(mask: object, grid: tuple[int, ...]) -> None:
    """A pattern's result on index tensors spanning ``grid``: a bool tensor broadcastable to it.

    Checked at construction on a tiny grid (check_mask_mod); a pattern may still misbehave on a
    real one, and a wrong shape would otherwise fail deep in torch or broadcast into nonsense.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        # SDPA would read a float 0/1 mask as an additive bias and silently attend everywhere.
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask_mod must return a bool tensor, got {got}")
    shape = (*(1,) * (len(grid) - mask.dim()), *mask.shape)  # right-aligned, as broadcasting reads it
    if len(shape) != len(grid) or any(n not in (1, full) for n, full in zip(shape, grid, strict=True)):
        raise ValueError(f"mask_mod must return a bool tensor broadcastable to {grid}, got shape {tuple(mask.shape)}")


def checked(mask_mod: MaskMod) -> MaskMod:
    """``mask_mod`` with each result checked as :func:`dense_mask` checks it, for code that
    evaluates the pattern itself (a function behind :func:`attention.from_function`): a pattern
    that misbehaves on a real grid fails here, by name, not inside the caller's kernel."""

    def checked_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        mask = mask_mod(b, h, q_idx, kv_idx)
        _check_result(mask, tuple(torch.broadcast_shapes(b.shape, h.shape, q_idx.shape, kv_idx.shape)))
        return mask

    return checked_mask


def held_tensor_device(fn: object, depth: int = 0) -> torch.device:
    """Where the tensors a pattern (or score mod) holds live (document ids on a GPU, a learned
    bias), so a probe's index tensors meet them there; the CPU if it holds none. It looks in
    closures, attributes, a module's parameters and buffers, a bound method's object, containers
    and the globals the function's code names."""
    if isinstance(fn, Tensor):
        return fn.device
    if depth > 8:
        return torch.device("cpu")
    parts: list[object]
    if isinstance(fn, torch.nn.Module):
        parts = [*fn.parameters(), *fn.buffers()]
    elif isinstance(fn, (tuple, list)):
        parts = list(fn)
    elif isinstance(fn, dict):
        parts = list(fn.values())
    else:
        parts = [cell.cell_contents for cell in getattr(fn, "__closure__", None) or ()]
        parts += list(getattr(fn, "__dict__", {}).values())
        if (owner := getattr(fn, "__self__", None)) is not None:
            parts.append(owner)
        code, names = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
        parts += [names[name] for name in getattr(code, "co_names", ()) if isinstance(names.get(name), Tensor)]
    for part in parts:
        device = held_tensor_device(part, depth + 1)
        if device.type != "cpu":
            return device
    return torch.device("cpu")


def callable_as(name: str, fn: object, signature: str) -> Callable:
    """``fn``, if it can be called with the arguments ``signature`` names (``"(b, h, q_idx,
    kv_idx)"``); a ``TypeError`` naming ``name`` and both signatures otherwise. A callable without
    a readable signature (some builtins) passes: its probe call tells."""
    fn = checks.function(name, fn, signature)
    try:
        params = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    try:
        params.bind(*range(signature.count(",") + 1))
    except TypeError:
        raise TypeError(f"{name} must be callable{signature}, got {checks.name_of(fn)}{params}") from None
    return fn


def check_mask_mod(mask_mod: object, name: str = "mask_mod") -> None:
    """Refuse, before any work, a ``mask_mod`` that cannot be called as ``(b, h, q_idx, kv_idx)``
    (``TypeError``) or whose result is no bool tensor (``TypeError``) broadcastable to the grid of
    its index tensors (``ValueError``); otherwise it would fail deep inside torch at the first
    forward (a broadcast error, or flex's "too many values to unpack").

    It is called once per pattern (:func:`probed_once`) on tiny index tensors, ``q_idx``
    ``(1, 1, 2, 1)`` and ``kv_idx`` ``(1, 1, 1, 2)``, all zeros so that a pattern indexing a tensor
    by position stays in range, on the device of the tensors the pattern holds (document ids),
    else the CPU.
    """
    probed_once(mask_mod, lambda: _probe_mask_mod(mask_mod, name))


def _probe_mask_mod(mask_mod: object, name: str) -> None:
    fn = callable_as(name, mask_mod, "(b, h, q_idx, kv_idx)")
    label = checks.name_of(fn)
    device = held_tensor_device(fn)
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device)  # (1, 1, 1, 1)
    q_idx = torch.zeros((1, 1, 2, 1), dtype=torch.long, device=device)  # (1, 1, 2, 1)
    kv_idx = torch.zeros((1, 1, 1, 2), dtype=torch.long, device=device)  # (1, 1, 1, 2)
    try:
        result = fn(zero, zero, q_idx, kv_idx)
    except Exception as exc:
        raise TypeError(
            f"{name} {label} raised {type(exc).__name__} when called on index tensors on {device}: {exc}"
        ) from exc
    if not isinstance(result, Tensor) or result.dtype != torch.bool:
        got = result.dtype if isinstance(result, Tensor) else type(result).__name__
        raise TypeError(f"{name} must return a bool tensor, got {got}")
    grid = (1, 1, 2, 2)
    try:
        fits = torch.broadcast_shapes(result.shape, grid) == grid
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} must return a bool tensor broadcastable to the grid of its indices, {grid} for "
            f"q_idx (1, 1, 2, 1) and kv_idx (1, 1, 1, 2); {label} returned shape {tuple(result.shape)}"
        )


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
    number = checks.is_ascii_number(arg)
    if kind in SPEC_KINDS and kind != "causal" and number and (int(arg) > 0 or kind == "prefix_lm"):
        return kind, int(arg)
    raise ValueError(
        f"unknown mask {spec!r}: use {', '.join(repr(v) for v in SPEC_KINDS.values())}, N in ASCII digits 0-9"
    )


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
