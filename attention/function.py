"""The function door: a plain ``attn(q, k, v, ...)`` over ``(B, H, T, D)`` as a full module.

Kernel authors write attention as a function of per-head tensors. :func:`from_function` builds
the module around one (the shared projections, head split and merge, GQA bookkeeping, the KV
cache, validation) and records what the function declares it can do
(:class:`attention.capabilities.Capabilities`), so the property suite tests exactly that and
the module refuses the rest by name instead of computing it some other way::

    import torch.nn.functional as F
    from attention import from_function, register

    def my_attn(q, k, v):  # (B, H, T, D) each -> (B, H, T, D), causal
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    MyAttention = register("mine", from_function(my_attn))
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, SupportsIndex, cast

import torch
from torch import Tensor

from . import checks
from .base import AttentionBase
from .capabilities import Capabilities, check_empty_rows, is_device_type
from .masks import checked, offset_mask

#: How keys and values reach the function: with their own ``H_kv`` heads, or repeated to ``H``.
GQA_MODES = ("repeat", "native")


class FunctionAttention(AttentionBase):
    """The module :func:`from_function` builds; one subclass per function and declaration."""

    #: The wrapped function and what was declared for it (set on each generated subclass).
    function: Callable[..., Tensor]
    declaration: tuple[tuple[str, object], ...] = ()
    _capabilities: Capabilities
    no_backward_declaration = "from_function(..., backward=False)"

    @classmethod
    def capabilities(cls) -> Capabilities:
        return cls._capabilities

    @classmethod
    def supports_dropout(cls) -> bool:
        return cls._declared("dropout")

    @classmethod
    def supports_backward(cls, device: torch.device | str) -> bool:
        return cls._declared("backward")

    @classmethod
    def unavailable(cls, device: torch.device | str) -> str | None:
        return cls.capabilities().device_refused(device)

    @classmethod
    def compiles_per_shape(cls, device: torch.device | str) -> bool:
        compiled_on = dict(cls.declaration).get("compiled_on") or frozenset()
        return torch.device(device).type in cast("frozenset[str]", compiled_on)

    @classmethod
    def _declared(cls, name: str) -> bool:
        return bool(dict(cls.declaration)[name])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int, document_ids: Tensor | None) -> Tensor:
        declared = dict(self.declaration)
        if declared["gqa"] == "repeat" and self.num_kv_heads != self.num_heads:
            groups = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, hd)
            v = v.repeat_interleave(groups, dim=1)  # (B, H, Tk, hd)
        kwargs: dict[str, object] = {}
        if declared["masks"]:
            # Row i of q is query position q_offset + i: the pattern is shifted so the function
            # evaluates it on row indices of q, whatever the cache holds; each result is checked,
            # so a pattern that misbehaves fails by name, not inside the function.
            kwargs["mask_mod"] = checked(offset_mask(self._pattern(document_ids), q_offset))
        elif declared["kv_cache"]:
            kwargs["q_offset"] = q_offset
        if declared["dropout"]:
            kwargs["dropout_p"] = self.dropout if self.training else 0.0
        return self.function(q, k, v, **kwargs)  # (B, H, Tq, hd)

    def _attends(self) -> str:
        return f"{getattr(self.function, '__qualname__', self.function)}() (from_function)"

    def __reduce_ex__(self, protocol: SupportsIndex):
        # The class is made at run time, so pickle cannot find it by name: rebuild it from the
        # function (found by name) and the declaration, then restore the module's state.
        return _rebuild, (self.function, self.declaration), dict(self.__dict__)


def _rebuild(function: Callable[..., Tensor], declaration: tuple[tuple[str, object], ...]) -> FunctionAttention:
    cls = _make_class(function, declaration)
    return cls.__new__(cls)


def from_function(
    function: Callable[..., Tensor],
    *,
    masks: bool = False,
    kv_cache: bool = False,
    gqa: str = "repeat",
    dropout: bool = False,
    backward: bool = True,
    dtypes: Iterable[torch.dtype] | None = None,
    devices: Iterable[str] | None = None,
    empty_rows: str = "zeros",
    compiled_on: Iterable[str] = (),
) -> type[AttentionBase]:
    """An :class:`~attention.AttentionBase` subclass (the seed constructor) around ``function``.

    ``function(q, k, v, **kwargs)`` takes ``q`` ``(B, H, Tq, D)`` and ``k``, ``v`` ``(B, H, Tk, D)``
    (``(B, H_kv, Tk, D)`` with ``gqa="native"``) and returns ``(B, H, Tq, D)`` in ``q``'s dtype,
    scaling scores by ``1/sqrt(D)``. It gets exactly the keywords its declaration asks for:

    * ``masks=False`` (default): plain causal attention only. ``True``: ``mask_mod=`` any
      flex-style ``mask_mod(b, h, q_idx, kv_idx)``, with ``q_idx`` counting rows of ``q`` (the
      KV-cache offset is already applied) and packed documents folded in.
    * ``kv_cache=True``: ``Tq`` may be shorter than ``Tk`` (a chunk continuing a cache); with
      ``masks=False`` it gets ``q_offset=``: row ``i`` is position ``q_offset + i`` and sees keys
      ``0 .. q_offset + i``.
    * ``gqa="repeat"`` (default): keys and values arrive repeated to ``H`` heads; ``"native"``: with
      their own ``H_kv`` heads (``H`` a multiple of ``H_kv``).
    * ``dropout=True``: ``dropout_p=`` (0 in eval mode). ``backward=False``: no gradients.
    * ``dtypes``, ``devices`` (``"cpu"``, ``"cuda"``): where it runs (default: anywhere).
    * ``empty_rows``: ``"zeros"`` (default) if a row with no visible key comes out as zeros;
      ``"any"`` if the function promises nothing there.
    * ``compiled_on``: device types where new input shapes mostly cost a compilation (a function
      under ``torch.compile``, a Triton kernel: ``("cuda",)``); the property suite draws its
      shapes there from a short menu, so each is compiled once (docs/design.md#suite-sizing).

    The result is cached: the same function and declaration give the same class.
    """
    if not callable(function) or isinstance(function, type):
        raise TypeError(f"function must be a plain callable attn(q, k, v, ...), got {function!r}")
    for name, value in (("masks", masks), ("kv_cache", kv_cache), ("dropout", dropout), ("backward", backward)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa must be one of {GQA_MODES}, got {gqa!r}")
    _check_signature(function, masks=masks, kv_cache=kv_cache, dropout=dropout)
    compiled = _several("compiled_on", compiled_on, "('cuda',)")
    if bad := sorted((d for d in compiled if not is_device_type(d)), key=repr):
        raise TypeError(f"compiled_on must be device types such as 'cpu' or 'cuda', got {bad}")
    declaration = (
        ("masks", masks),
        ("kv_cache", kv_cache),
        ("gqa", gqa),
        ("dropout", dropout),
        ("backward", backward),
        ("dtypes", None if dtypes is None else _several("dtypes", dtypes, "(torch.bfloat16,)")),
        ("devices", None if devices is None else _several("devices", devices, "('cuda',)")),
        ("empty_rows", check_empty_rows(empty_rows)),  # checked before the declaration is hashed
        ("compiled_on", compiled),
    )
    return _make_class(function, declaration)


def _check_signature(function: Callable[..., Tensor], *, masks: bool, kv_cache: bool, dropout: bool) -> None:
    """Refuse, now, a function that cannot take the call its declaration implies (a bare arity
    ``TypeError`` at the first forward otherwise); a callable without a readable signature passes."""
    keywords = [
        name
        for name, wanted in (("mask_mod", masks), ("q_offset", kv_cache and not masks), ("dropout_p", dropout))
        if wanted
    ]
    signatures = []
    for follow_wrapped in (True, False):  # a decorator's own signature may be the one that takes them
        try:
            signature = inspect.signature(function, follow_wrapped=follow_wrapped)
        except (TypeError, ValueError):  # no signature to read (a builtin, an extension's callable)
            return
        try:
            signature.bind(None, None, None, **dict.fromkeys(keywords))
            return
        except TypeError as exc:
            signatures.append((signature, exc))
    call = ", ".join(["q", "k", "v", *(f"{k}=..." for k in keywords)])
    name = checks.name_of(function)
    first, why = signatures[0]
    # Python's bind error speaks of the call ("too many positional arguments" where the function
    # takes too few), so the message shows both sides, with its words after.
    raise TypeError(f"function must take ({call}) as declared; {name}{first} cannot ({why})")


def _several(name: str, value: object, example: str) -> frozenset:
    """``value`` as a set; a lone string or dtype is refused (a string would split into letters)."""
    if isinstance(value, (str, torch.dtype)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a collection such as {example}, got {value!r}")
    try:
        return frozenset(value)
    except TypeError:  # an unhashable member: a list of lists, say
        raise TypeError(f"{name} must be a collection such as {example}, got {value!r}") from None


@functools.cache
def _make_class(
    function: Callable[..., Tensor], declaration: tuple[tuple[str, object], ...]
) -> type[FunctionAttention]:
    declared: dict[str, Any] = dict(declaration)  # Capabilities checks each value's type
    capabilities = Capabilities(
        masks=declared["masks"],
        kv_cache=declared["kv_cache"],
        empty_rows=declared["empty_rows"],
        dtypes=declared["dtypes"],
        devices=declared["devices"],
    )
    name = checks.name_of(function)
    namespace = {
        "function": staticmethod(function),
        "declaration": declaration,
        "_capabilities": capabilities,
        "__module__": getattr(function, "__module__", __name__),
        "__doc__": f"Causal MHA around {name}() (attention.from_function): {capabilities}",
    }
    # type() with three arguments makes a subclass of its bases, which its stub cannot say.
    return cast("type[FunctionAttention]", type(name, (FunctionAttention,), namespace))
