"""The shared skeleton of every causal multi-head attention implementation.

:class:`AttentionBase` owns what all implementations share: argument validation, the one
parameter layout (``qkv`` and ``proj``), the head split and merge, grouped-query heads and the
KV cache. A subclass overrides one small method, :meth:`AttentionBase._attend`, which maps
per-head queries, keys and values to per-head context vectors; that is the part that differs.

Shapes in comments: ``B`` batch, ``T`` new tokens, ``Tq``/``Tk`` query and key lengths (``Tk``
includes cached keys), ``H`` query heads, ``H_kv`` key/value heads, ``hd`` head dim,
``d_in``/``d_out`` features per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn

from . import checks
from .capabilities import MEANING, Capabilities
from .kv_cache import KVCache
from .masks import (
    MaskMod,
    PerDocument,
    and_masks,
    causal,
    check_document_ids,
    check_mask_mod,
    dense_mask,
    document,
    held_document_ids,
    later_key_seen,
    never_shows_later_key,
    prefix_length,
)
from .score_mods import ScoreMod, check_score_mod

#: The pattern attributes that are checked properties (see AttentionBase.__setattr__).
_PATTERN_ATTRS = ("mask_mod", "score_mod")
#: Shapes a module keeps what it built from its patterns for; the oldest goes first (decoding
#: adds one per step).
MAX_CACHED_SHAPES = 64
_Built = TypeVar("_Built")


def _declares(capability: object) -> bool:
    """A capability's answer: the class method's, or a plain bool class attribute (how plugins
    written before capabilities became class methods declare ``supports_dropout = False``)."""
    return bool(capability()) if callable(capability) else bool(capability)


def _autocast_dtype(device: str) -> torch.dtype | None:
    """``torch.autocast``'s dtype where it is on for device type ``device``; ``None`` where it is
    off, or where autocast does not exist (``meta``, for one)."""
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (where a sync fails)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype the projections hand to attention for input ``x``: autocast's where it is on for
    ``x``'s device (it casts the ``qkv`` matmul of any floating input but float64)."""
    cast = _autocast_dtype(x.device.type)
    return cast if cast is not None and x.dtype != torch.float64 else x.dtype


class AttentionBase(nn.Module):
    """Causal multi-head attention: ``(batch, tokens, d_in) -> (batch, tokens, d_out)``.

    Args:
        d_in: input features per token.
        d_out: output features per token; split evenly across ``num_heads``.
        num_heads: query heads.
        context_length: the most positions one sequence may hold (cache included).
        dropout: probability of dropping attention weights in training, in ``[0, 1)``.
        qkv_bias: give the ``qkv`` projection a bias.
        num_kv_heads: key/value heads for grouped-query attention; must divide ``num_heads``
            (default ``num_heads``: plain MHA; ``1``: multi-query).
        mask_mod: the attention pattern, a ``mask_mod(b, h, q_idx, kv_idx)`` from
            :mod:`attention.masks` or your own (default :func:`attention.masks.causal`).
        score_mod: an optional ``score_mod(score, b, h, q_idx, kv_idx)`` from
            :mod:`attention.score_mods` (ALiBi, soft-capping), applied to the scaled scores
            before masking; an implementation that cannot express it rejects it here.

    ``mask_mod`` and ``score_mod`` may be reassigned later (checked the same way); the next call
    attends with the new ones. A call that raises, whatever the reason, leaves its ``kv_cache``
    at the position it had before the call.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_heads: int,
        context_length: int,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        *,
        num_kv_heads: int | None = None,
        mask_mod: MaskMod = causal,
        score_mod: ScoreMod | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self._check_config(d_in, d_out, num_heads, context_length, dropout, qkv_bias, num_kv_heads, mask_mod, score_mod)
        self.d_in = d_in
        self.d_out = d_out
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_out // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.context_length = context_length
        self.dropout = float(dropout)
        self._store("mask_mod", mask_mod)  # checked above; the properties check later reassignments
        self._store("score_mod", score_mod)
        self._patterns_changed()
        self.qkv = nn.Linear(d_in, d_out + 2 * self.kv_dim, bias=qkv_bias)  # q, k, v stacked
        self.proj = nn.Linear(d_out, d_out)

    # -- the hot path: forward -> projections -> _attend -> merge ---------------------------

    def forward(
        self,
        x: Tensor,
        *,
        kv_cache: KVCache | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Attend over ``x`` ``(B, T, d_in)``; with ``kv_cache``, ``x`` continues the cached
        sequence. ``document_ids`` ``(B, cached + T)`` confines attention to each document."""
        # Transactional: the cache is written before attention runs, so a call that fails later
        # (a mask_mod that raises, a transient error) would leave keys the caller never got output
        # for, and every later chunk would sit one chunk too far. Roll the position back instead.
        start = kv_cache.pos if isinstance(kv_cache, KVCache) else 0
        try:
            q, k, v, q_offset = self._project(x, kv_cache, document_ids)
            context = self._attend(q, k, v, q_offset=q_offset, document_ids=document_ids)  # (B, H, T, hd)
            self._check_context(context, q)
            return self._merge(context)  # (B, T, d_out)
        except BaseException:
            if isinstance(kv_cache, KVCache):
                kv_cache.truncate(start)
            raise

    def _project(
        self, x: Tensor, kv_cache: KVCache | None, document_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Validate, project and split heads; append to ``kv_cache``. Returns ``q, k, v, q_offset``."""
        self._check_input(x, kv_cache, document_ids)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.d_out, self.kv_dim, self.kv_dim], dim=-1)  # (B, T, d_out | kv_dim)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        q_offset = 0
        if kv_cache is not None:
            q_offset = kv_cache.pos
            k, v = kv_cache.update(k, v)  # (B, H_kv, q_offset + T, hd) each
        return q, k, v, q_offset

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int, document_ids: Tensor | None) -> Tensor:
        """Per-head attention: ``q`` ``(B, H, Tq, hd)``, ``k, v`` ``(B, H_kv, Tk, hd)`` ->
        ``(B, H, Tq, hd)``. Query row ``i`` sits at absolute position ``q_offset + i``; keys at
        ``0 .. Tk-1``. Rows with no visible key must come out as zeros."""
        raise NotImplementedError

    def _attends(self) -> str:
        """What computes the attention, for messages about its result."""
        return f"{type(self).__name__}._attend"

    def _check_context(self, context: object, q: Tensor) -> None:
        """``_attend``'s result, checked before the merge: a wrong shape would be reshaped into a
        wrong answer or fail deep inside the projection, naming nobody."""
        name = self._attends()
        if not isinstance(context, Tensor):
            raise TypeError(f"{name} must return a torch.Tensor, returned {type(context).__name__}")
        if context.shape != q.shape:
            raise ValueError(f"{name} returned shape {tuple(context.shape)}; expected q's shape {tuple(q.shape)}")
        if context.dtype != q.dtype:
            raise TypeError(f"{name} returned {context.dtype} for {q.dtype} queries; return the queries' dtype")
        if context.device != q.device:
            raise ValueError(f"{name} returned a tensor on {context.device} for queries on {q.device}")
        if torch.is_grad_enabled() and q.requires_grad and self.supports_backward(q.device):
            self._check_differentiable(context, name)

    def _check_differentiable(self, context: Tensor, name: str) -> None:
        """A result that gradients cannot flow back through, from an implementation that declares
        a backward: refused at the forward, not as a bare autograd error at ``backward()`` (or no
        error at all, with weights that silently never learn)."""
        node = context.grad_fn
        function = getattr(node, "_forward_cls", None)  # the torch.autograd.Function that made it, if one did
        if node is None:
            why = (
                f"{name} returned a tensor outside autograd (no grad_fn) for queries that need gradients: "
                "it ran under torch.no_grad(), detached its result or called a kernel with no backward; "
                "give it a backward (a torch.autograd.Function)"
            )
        elif (
            function is not None
            and function.backward is torch.autograd.Function.backward
            and function.vjp is torch.autograd.Function.vjp
        ):
            why = (
                f"{name} returned the output of {function.__name__}, a torch.autograd.Function with no "
                "backward; write its backward,"
            )
        else:
            return
        raise TypeError(f"{why} or declare that it has none ({self.no_backward_declaration})")

    def _merge(self, context: Tensor) -> Tensor:
        b, _, t, _ = context.shape
        context = context.transpose(1, 2).reshape(b, t, self.d_out)  # (B, T, d_out)
        return self.proj(context)  # (B, T, d_out)

    # -- what an implementation can do: class methods it overrides --------------------------

    @classmethod
    def capabilities(cls) -> Capabilities:
        """What this implementation declares (docs/design.md#capabilities): a subclass that
        overrides ``_attend`` takes on the whole contract, so the default declares everything."""
        return Capabilities()

    @classmethod
    def supports_dropout(cls) -> bool:
        """Whether ``dropout > 0`` is honoured; one that is not is rejected at construction."""
        return True

    @classmethod
    def supports_backward(cls, device: torch.device | str) -> bool:
        """Whether gradients flow through this implementation on ``device``."""
        return True

    @classmethod
    def grad_error_allowance(cls, device: torch.device | str) -> float:
        """A multiplier of the accuracy rule's gradient factor (``attention.accuracy.grad_factor``)
        for a backward known to be less precise than a plain one on ``device``, with the reason
        in docs/design.md#correctness; 1.0 (none) by default."""
        return 1.0

    @classmethod
    def supports_score_mod(cls, score_mod: ScoreMod) -> bool:
        """Whether this implementation can apply ``score_mod`` (default: no, so a subclass that
        attends its own way never silently ignores one)."""
        return False

    #: How this kind of implementation declares that it has no backward, for the error message.
    no_backward_declaration: str = "override supports_backward() to return False"

    #: Why :meth:`supports_score_mod` said no, for the error message.
    score_mod_limits: str = "it does not apply score mods (override supports_score_mod once it does)"

    @classmethod
    def unavailable(cls, device: torch.device | str) -> str | None:
        """Why this implementation cannot run on ``device`` here (a missing package, an
        unsupported device type), or ``None`` when it can."""
        return None

    @classmethod
    def dtype_unsupported(cls, dtype: torch.dtype, device: torch.device | str) -> str | None:
        """Why this implementation does not compute ``dtype`` on ``device`` (its declared dtypes,
        or a kernel's limit there), or ``None`` when it does."""
        return cls.capabilities().dtype_refused(dtype)

    def _check_dtype(self, dtype: torch.dtype, device: torch.device) -> None:
        """Refuse to attend in ``dtype`` on ``device`` where :meth:`dtype_unsupported` says why."""
        problem = self.dtype_unsupported(dtype, device)
        if problem is None:
            return
        autocast = f" ({dtype} is torch.autocast's dtype)" if _autocast_dtype(device.type) is not None else ""
        raise TypeError(f"{type(self).__name__} {problem}{autocast}")

    @classmethod
    def runs_interpreted(cls, device: torch.device | str) -> bool:
        """Whether it runs on ``device`` only through an interpreter (correct, but its timings
        would measure the interpreter: benchmarks skip it there)."""
        return False

    @classmethod
    def compiles_per_shape(cls, device: torch.device | str) -> bool:
        """Whether new input shapes on ``device`` mostly cost a compilation (seconds, not
        microseconds): the property suite then draws its shapes from a short menu that reaches the
        kernels' branches, so compiled code is reused across examples (docs/design.md#suite-sizing)."""
        return False

    @classmethod
    def kernel_config(
        cls,
        dtype: torch.dtype,
        head_dim: int,
        q_len: int,
        *,
        grad: bool,
        device: torch.device | str,
        group: int = 1,
    ) -> dict[str, object] | None:
        """Which kernels and tiles a call of this shape runs (``group``: query heads per KV head),
        for an implementation with kernels of its own (perf results record it); ``None`` for one
        that calls torch's."""
        return None

    @classmethod
    def context_parallel_unsupported(cls) -> str | None:
        """Why torch's context parallel cannot shard this implementation's attention, or ``None``
        when it can (docs/design.md#context-parallel). torch rewrites only
        ``F.scaled_dot_product_attention`` calls into ring attention, so the default is no: an
        implementation that attends its own way would silently attend within each rank's shard."""
        return (
            "torch's context parallel rewrites only F.scaled_dot_product_attention calls, and this "
            "implementation attends its own way (override context_parallel_unsupported once it is verified)"
        )

    @classmethod
    def min_head_dim(cls, device: torch.device | str) -> int:
        """The smallest ``d_out // num_heads`` this implementation runs on ``device``."""
        return 1

    # -- the rest of the public surface ----------------------------------------------------

    @property
    def mask_mod(self) -> MaskMod:
        """The attention pattern; assigning a new one checks it and drops what was built from the old."""
        return cast(MaskMod, self._load("mask_mod"))  # stored once checked

    @mask_mod.setter
    def mask_mod(self, mask_mod: MaskMod) -> None:
        check_mask_mod(mask_mod)
        self._check_declared_mask(mask_mod)
        self._store("mask_mod", mask_mod)
        self._patterns_changed()

    @property
    def score_mod(self) -> ScoreMod | None:
        """The score modifier or ``None``; assigning a new one checks it as the constructor does."""
        return cast("ScoreMod | None", self._load("score_mod"))  # stored once checked

    @score_mod.setter
    def score_mod(self, score_mod: ScoreMod | None) -> None:
        self._check_score_mod(score_mod, self.num_heads)
        self._store("score_mod", score_mod)
        self._patterns_changed()

    def __setattr__(self, name: str, value: object) -> None:
        # nn.Module.__setattr__ takes any Module value for itself (registers a child) and would
        # never reach the checking properties: a learned score mod would be silently ignored.
        if name in _PATTERN_ATTRS:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)  # type: ignore[arg-type]  # torch's stub: Tensor | Module only

    def _store(self, name: str, value: object) -> None:
        """A pattern that is a Module (a learned bias) is a child under its own name, so its
        parameters train, save as ``score_mod.*`` and move with ``.to()``; anything else is a
        plain attribute ``_<name>``."""
        self._modules.pop(name, None)
        self.__dict__.pop(f"_{name}", None)
        if isinstance(value, nn.Module):
            self._modules[name] = value
        else:
            self.__dict__[f"_{name}"] = value

    def _load(self, name: str) -> object:
        return self._modules[name] if name in self._modules else self.__dict__[f"_{name}"]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in self._pattern_caches:  # rebuilt on load, by _patterns_changed
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        # Modules pickled before mask_mod and score_mod became checked properties held them as
        # plain attributes under their own names.
        for name in _PATTERN_ATTRS:
            if name in state:
                state[f"_{name}"] = state.pop(name)
        super().__setstate__(state)
        self._patterns_changed()  # caches built from the patterns are left out of a pickle

    #: The attributes an implementation derives from its patterns (set in ``_patterns_changed``),
    #: left out of a pickle: caches, and what cannot be pickled.
    _pattern_caches: tuple[str, ...] = ()

    def _patterns_changed(self) -> None:
        """Called whenever ``mask_mod`` or ``score_mod`` is set, and on unpickling: an
        implementation that caches anything built from them (flex: BlockMasks, compile keys;
        triton: block tables) drops it here."""

    @staticmethod
    def _per_shape(
        cache: dict[tuple, _Built], key: tuple, document_ids: Tensor | None, build: Callable[[], _Built]
    ) -> _Built:
        """What ``build`` makes from the patterns for one shape (``key``), kept in ``cache``; built
        afresh, and not kept, for a call's own ``document_ids``."""
        if document_ids is not None:
            return build()
        if key not in cache:
            if len(cache) >= MAX_CACHED_SHAPES:
                del cache[next(iter(cache))]
            cache[key] = build()
        return cache[key]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def extra_repr(self) -> str:
        text = (
            f"d_in={self.d_in}, d_out={self.d_out}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, context_length={self.context_length}, "
            f"dropout={self.dropout}, mask_mod={checks.name_of(self.mask_mod)}"
        )
        if self.score_mod is not None:
            text += f", score_mod={checks.name_of(self.score_mod)}"
        return text

    def make_kv_cache(
        self,
        batch_size: int,
        max_tokens: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """A cache for ``batch_size`` sequences of up to ``max_tokens`` positions, on the weights'
        device (``device``, if given, must be it) in ``dtype`` (default: the weights')."""
        checks.integer("max_tokens", max_tokens)
        if max_tokens > self.context_length:
            raise ValueError(f"max_tokens ({max_tokens}) exceeds context_length ({self.context_length})")
        weight = self.qkv.weight
        if device is not None:
            try:
                asked = torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
            if asked.type != weight.device.type or asked.index not in (None, weight.device.index or 0):
                raise ValueError(
                    f"make_kv_cache(device={device!r}): the module's weights are on {weight.device}, and a call "
                    "attends where its input and weights are; move the module, then make its cache"
                )
        cache = KVCache(
            batch_size,
            self.num_kv_heads,
            max_tokens,
            self.head_dim,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device,  # the one asked for, checked above
        )
        cache.claim(self)
        return cache

    # -- helpers the implementations share -------------------------------------------------

    def _pattern(self, document_ids: Tensor | None) -> MaskMod:
        """The module's ``mask_mod``, restricted to each document when ids are given."""
        if document_ids is None:
            return self.mask_mod
        return and_masks(self.mask_mod, document(document_ids))

    def _is_plain_causal(self, document_ids: Tensor | None) -> bool:
        return self.mask_mod is causal and document_ids is None and self.score_mod is None

    def _dense_mask(self, q: Tensor, k: Tensor, q_offset: int, document_ids: Tensor | None) -> Tensor:
        """Bool mask broadcastable to ``(B, H, Tq, Tk)``: True where a query sees a key."""
        return dense_mask(
            self._pattern(document_ids),
            q.shape[0],
            q.shape[1],
            q.shape[2],
            k.shape[2],
            q.device,
            q_offset=q_offset,
        )

    # -- validation: everything is refused here, before any work or cache write ------------

    def _check_config(
        self,
        d_in: int,
        d_out: int,
        num_heads: int,
        context_length: int,
        dropout: float,
        qkv_bias: bool,
        num_kv_heads: int,
        mask_mod: MaskMod,
        score_mod: ScoreMod | None,
    ) -> None:
        checks.integer("d_in", d_in)
        checks.heads(d_out, num_heads, num_kv_heads)
        checks.integer("context_length", context_length)
        checks.real("dropout", dropout, lambda p: 0.0 <= p < 1.0, "in [0, 1)")
        if dropout > 0 and not _declares(self.supports_dropout):
            raise ValueError(f"{type(self).__name__} does not support dropout; got dropout={dropout}")
        checks.boolean("qkv_bias", qkv_bias)
        check_mask_mod(mask_mod)
        self._check_declared_mask(mask_mod)
        self._check_score_mod(score_mod, num_heads)

    def _undeclared(self, capability: str, asked: str) -> ValueError:
        """The error for a call that needs a capability this implementation does not declare."""
        return ValueError(
            f"{type(self).__name__} does not declare the capability {capability!r} "
            f"({MEANING[capability]}), which {asked} needs"
        )

    def _check_declared_mask(self, mask_mod: MaskMod) -> None:
        if mask_mod is not causal and not self.capabilities().masks:
            raise self._undeclared("masks", f"mask_mod={checks.name_of(mask_mod)}")

    def _check_score_mod(self, score_mod: ScoreMod | None, num_heads: int) -> None:
        if score_mod is None:
            return
        check_score_mod(score_mod)
        name = checks.name_of(score_mod)
        if not self.supports_score_mod(score_mod):
            raise ValueError(f"{type(self).__name__} cannot express score_mod={name}: {self.score_mod_limits}")
        heads = getattr(score_mod, "num_heads", num_heads)
        if heads != num_heads:
            raise ValueError(f"score_mod={name} was made for num_heads={heads}, this module has {num_heads}")

    def _refuse_gradients(self, device: torch.device, *sources: Tensor) -> None:
        """``NotImplementedError`` for a call whose ``sources`` (what q, k and v are made from) may
        need gradients where there is no backward."""
        if self.supports_backward(device) or not torch.is_grad_enabled():
            return
        if any(t.requires_grad for t in sources):
            raise NotImplementedError(
                f"{type(self).__name__} cannot compute gradients on {device.type}: "
                f"{self._no_backward_reason(device)}. Run it under torch.no_grad()."
            )

    def _no_backward_reason(self, device: torch.device) -> str:
        """Why :meth:`supports_backward` is false on ``device``, for the refusal."""
        return "it declares no backward"

    def _check_input(self, x: Tensor, kv_cache: KVCache | None, document_ids: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D (batch, tokens, d_in), got shape {tuple(x.shape)}")
        b, t, d = x.shape
        if d != self.d_in:
            raise ValueError(f"x has last dim {d}, expected d_in={self.d_in}")
        if b < 1 or t < 1:
            raise ValueError(f"x must have at least one sequence and one token, got shape {tuple(x.shape)}")
        weight = self.qkv.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"x is {x.dtype} but the weights are {weight.dtype}; cast one to match")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the weights are on {weight.device}")
        self._check_dtype(_attention_dtype(x), x.device)
        declared = self.capabilities()
        if (refused := declared.device_refused(x.device)) is not None:
            raise ValueError(f"{type(self).__name__} {refused}")
        if kv_cache is not None and not declared.kv_cache:
            raise self._undeclared("kv_cache", "a call with kv_cache")
        if document_ids is not None and not declared.masks:
            raise self._undeclared("masks", "a call with document_ids")
        past = 0 if kv_cache is None else self._check_cache(kv_cache, x)
        if past + t > self.context_length:
            raise ValueError(
                f"{past + t} positions ({past} cached + {t} new) exceed context_length={self.context_length}"
            )
        if document_ids is not None:
            self._check_document_ids(document_ids, x, (b, past + t))
        if (ids := held_document_ids(self.mask_mod)) is not None:
            held = tuple(ids.shape)
            if held[0] != b or held[1] < past + t:
                raise ValueError(
                    f"mask_mod {checks.name_of(self.mask_mod)} holds document_ids of shape {held}; this call needs "
                    f"(batch, cached + tokens) = {(b, past + t)} at least: assign a mask made for these ids"
                )
            if ids.device != x.device:
                raise ValueError(
                    f"mask_mod {checks.name_of(self.mask_mod)} holds document_ids on {ids.device}, x is on {x.device}"
                )
        if kv_cache is not None:
            self._check_cached_pattern(document_ids, b, past, past + t, kv_cache.max_tokens, x.device)
        # Last, and before the cache is written, so a refused call leaves it as it was. Only what
        # q, k and v are made from: the output projection's gradients need no attention backward.
        self._refuse_gradients(x.device, x, *self.qkv.parameters())

    def _check_cache(self, kv_cache: KVCache, x: Tensor) -> int:
        """Refuse a cache this call cannot extend; returns the positions already cached."""
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache from make_kv_cache(), got {type(kv_cache).__name__}")
        if (kv_cache.num_kv_heads, kv_cache.head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"kv_cache holds {kv_cache.num_kv_heads} heads of dim {kv_cache.head_dim}, "
                f"this module has {self.num_kv_heads} KV heads of dim {self.head_dim}"
            )
        kv_cache.check_compatible(x, x.shape[1])
        owner = kv_cache.owner
        if owner is not None and owner is not self:
            raise ValueError(
                f"kv_cache was made by another module ({type(owner).__name__} at {id(owner):#x}) and holds its "
                "keys and values: make one cache per module (layer) with its make_kv_cache()"
            )
        past = kv_cache.pos
        # A bidirectional prefix lets early queries see later prefix keys; the queries already
        # run could not, so continuing a cache that ends inside the prefix would silently differ
        # from one call on the whole sequence.
        prefix_len = prefix_length(self.mask_mod)
        if 0 < past < prefix_len:
            raise ValueError(
                f"mask_mod {checks.name_of(self.mask_mod)} shows keys before prefix_len={prefix_len} "
                f"to every query, but the cache ends at {past}: put the whole prefix in the first chunk"
            )
        if isinstance(self.mask_mod, PerDocument) and self.mask_mod.prefix_split_at(past):
            raise ValueError(
                f"mask_mod {checks.name_of(self.mask_mod)} shows each document's first "
                f"{prefix_length(self.mask_mod.mask_mod)} keys to all its queries, but the cache ends at {past}, "
                "inside a document's prefix: end each chunk outside every prefix"
            )
        return past

    def _check_cached_pattern(
        self, document_ids: Tensor | None, batch: int, past: int, end: int, capacity: int, device: torch.device
    ) -> None:
        """Refuse a chunk whose keys the pattern shows to queries of an earlier chunk, which ran
        without them: the cache would silently differ from one call on the whole sequence. A pattern
        that shows no query a later key over the cache's whole length (the built-in ones; any other
        is evaluated once) needs nothing more; under ``torch.compile`` or a CUDA graph capture it is
        not checked (a data-dependent branch, a sync: docs/design.md#kv-cache-writes)."""
        if past == 0 or torch.compiler.is_compiling() or _capturing(device):
            return
        # Call-time document ids only hide keys: the module's own pattern decides for all calls.
        if never_shows_later_key(self.mask_mod, batch, self.num_heads, capacity, device):
            return
        pattern = self._pattern(document_ids)  # the call's ids cover positions 0 .. end
        seen = later_key_seen(pattern, batch, self.num_heads, range(past), range(past, end), device)
        if seen is not None:
            query, key = seen
            raise ValueError(
                f"mask_mod {checks.name_of(self.mask_mod)} shows query {query} the key at {key}, which this chunk "
                f"brings (positions {past}..{end - 1}): query {query} ran in an earlier chunk without it, so "
                "cached calls would differ from one call on the whole sequence. With a KV cache a query may "
                "see no later key, but for a prefix declared as prefix_len (masks.prefix_lm), held by the "
                "first chunk: run such a pattern in one call"
            )

    @staticmethod
    def _check_document_ids(document_ids: Tensor, x: Tensor, shape: tuple[int, int]) -> None:
        check_document_ids(document_ids, shape)
        if document_ids.device != x.device:
            raise ValueError(f"document_ids is on {document_ids.device}, x is on {x.device}")
