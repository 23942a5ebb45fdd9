"""Attention through FlexAttention: ``flex_attention`` with a ``create_block_mask`` BlockMask.

Three costs shape this module (docs/design.md#recompile-limit, docs/design.md#flex-on-cpu):

* A BlockMask is costly to build, so it is built once per (batch, lengths, offset, device) and reused
  until ``mask_mod`` or ``score_mod`` is reassigned.
* One compiled ``flex_attention`` reused across shapes, dtypes and grad modes hits dynamo's
  recompile limit (8 per code object) and silently falls back to the unfused path, 50x slower.
  Dynamo keeps its cache on the *code object*, so wrapping the same function twice does not
  help; :func:`compiled_flex_attention` gives each signature a code object of its own, and every
  call runs with ``fail_on_recompile_limit_hit`` so a fallback is an error, never a slowdown.
* Off CUDA, ``flex_attention`` computes torch's dense reference (scores, ``score_mod``, mask,
  softmax), but first traces it with dynamo, again for each new shape and pattern: 0.2-0.5 s of
  tracing for a 3 ms call. On CPU :func:`untraced_flex` runs the same reference untraced.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.attention.flex_attention as torch_flex
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .base import AttentionBase
from .device_info import multiprocessors
from .kv_cache import KVCache
from .masks import dense_mask, offset_mask
from .score_mods import ScoreMod, offset_score_mod

_compiled: dict[tuple, Callable[..., Tensor]] = {}
#: One-token decode splits the cached keys into this many chunks or more (``SPLIT_KV``). torch's
#: default, 2 x SMs // (batch x KV heads), gives 2 splits for 8 sequences of 16 KV heads on an
#: H100: too few CTAs in flight to saturate HBM. Measured there (bf16, D=128, B=8, CUDA graphs):
#: 16 splits read the cache at 0.81 / 0.97 of copy bandwidth at 4k / 16k tokens (default 0.74 /
#: 0.83), GQA-4 0.55 / 0.83 (default 0.39 / 0.66); 8 and 32 splits were slower than 16.
MIN_DECODE_SPLIT_KV = 16


def decode_split_kv(batch: int, kv_heads: int, multiprocessors: int) -> int:
    """KV splits for a one-token decode step: torch's default, raised to :data:`MIN_DECODE_SPLIT_KV`.

    It depends on the batch and head layout only, never on the cache length, so a growing cache
    does not change the kernel options (which would recompile every step).
    """
    torch_default = max(1, multiprocessors // max(1, batch * kv_heads) * 2)
    return max(MIN_DECODE_SPLIT_KV, torch_default)


def _flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: BlockMask,
    scale: float,
    enable_gqa: bool,
    kernel_options: dict[str, Any] | None,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    return flex_attention(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=enable_gqa,
        # Passed through as the user gave them: torch's TypedDict names only the keys it documents.
        kernel_options=kernel_options,  # type: ignore[arg-type]
    )


#: torch's switch that runs eager ``flex_attention`` untraced (see :func:`untraced_flex`).
_UNTRACED_SWITCH = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"
_untraced_lock = threading.Lock()
_untraced_depth = 0  # calls inside untraced_flex() now, all threads
_untraced_saved: bool | None = None  # the switch's value before the first of them


@contextlib.contextmanager
def untraced_flex() -> Iterator[None]:
    """``flex_attention`` calls inside run torch's dense reference directly, not traced by dynamo.

    Outside ``torch.compile``, torch wraps that reference in a dynamo trace (eager backend) whose
    guards fail on every new shape, ``mask_mod`` closure or cache offset: each retrace costs
    0.2-0.5 s on a CPU and computes nothing more. torch's own switch (:data:`_UNTRACED_SWITCH`)
    calls the reference untraced; it is set for the calls inside only (nested and concurrent ones
    counted, the old value restored by the last out) and left alone where a torch lacks it. The
    switch is torch's, one per process: while a call is inside, another thread's eager
    ``flex_attention`` runs untraced too, forward and backward, and torch warns that its backward
    may then be wrong; a user's own change of the switch meanwhile is undone by the last call out.
    Ours enter it on CPU only, where flex has no backward (docs/design.md#flex-on-cpu).
    """
    global _untraced_depth, _untraced_saved
    with _untraced_lock:
        if _untraced_depth == 0:
            _untraced_saved = getattr(torch_flex, _UNTRACED_SWITCH, None)
        _untraced_depth += 1
        if _untraced_saved is not None:
            setattr(torch_flex, _UNTRACED_SWITCH, True)
    try:
        yield
    finally:
        with _untraced_lock:
            _untraced_depth -= 1
            if _untraced_depth == 0 and _untraced_saved is not None:
                setattr(torch_flex, _UNTRACED_SWITCH, _untraced_saved)


def pattern_key(mask_mod: Callable[..., Tensor] | None) -> object:
    """What dynamo guards on in a ``mask_mod`` (or a ``score_mod``, ``None`` for none): its code
    and its closure's constants, recursively.

    A callable object (the built-in patterns and score mods, ``per_document``) counts by its type
    and its attributes, so two ``sliding_window(4)`` share compiled code and ``sliding_window(8)``
    gets its own. Tensors in a closure or an object (document ids) count by type only: dynamo
    guards on their metadata, which the call's shapes already key on.
    """
    return _closure_key(mask_mod, depth=0)


def _closure_key(value: object, depth: int) -> object:
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if depth > 8:  # a self-referencing closure: stop, its code was already counted
        return type(value)
    if isinstance(value, (tuple, list)):  # and_masks / or_masks hold their parts in a tuple
        return tuple(_closure_key(v, depth + 1) for v in value)
    code = getattr(value, "__code__", None)
    if code is not None:
        closure = getattr(value, "__closure__", None) or ()
        return (code, *(_closure_key(cell.cell_contents, depth + 1) for cell in closure))
    if isinstance(value, functools.partial):  # its parameters live in slots, not in __dict__
        keywords = tuple((k, _closure_key(v, depth + 1)) for k, v in sorted(value.keywords.items()))
        return (functools.partial, _closure_key(value.func, depth + 1), _closure_key(value.args, depth + 1), keywords)
    params = getattr(value, "__dict__", None)
    if callable(value) and params:  # a callable object: its type and (public) parameters
        public = sorted((k, v) for k, v in params.items() if not k.startswith("_"))
        return (type(value), *((k, _closure_key(v, depth + 1)) for k, v in public))
    if callable(value):
        return (type(value), id(value))  # no parameters to compare, so itself
    return type(value)


def compiled_flex_attention(q: Tensor, k: Tensor, pattern: tuple = ()) -> Callable[..., Tensor]:
    """The compiled ``flex_attention`` for this call's signature, compiled on first use.

    Prefill and training calls (``Tq > 1``) are compiled for their exact shapes, so kernels are
    specialised and each code object compiles once. One-token decode steps, whose key length
    grows every step, share one code object per batch and head layout: dynamo's automatic
    dynamic shapes make the key length symbolic at the second length seen, and the BlockMask's
    block count when the cache passes one block (dynamo specialises a size of 1), so decoding
    compiles three times, not once per step; marking the key length dynamic up front does not
    help, the BlockMask's lengths are Python ints. Batch and heads stay static, which the
    flex-decoding kernel needs (with them symbolic it falls back to the main kernel, 10x slower
    for GQA).
    ``pattern`` (:func:`pattern_key` of the mask) keys them too: dynamo guards on the mask's code
    and constants, so nine patterns sharing one code object would hit the recompile limit.
    """
    shapes: tuple[object, ...]
    if q.shape[2] == 1:
        shapes = (tuple(q.shape), k.shape[0], k.shape[1], k.shape[3])
    else:
        shapes = (tuple(q.shape), tuple(k.shape))
    key = (q.device, q.dtype, torch.is_grad_enabled() and q.requires_grad, shapes, pattern)
    fn = _compiled.get(key)
    if fn is None:
        code = _flex_attention.__code__.replace(co_name=f"flex_attention_{len(_compiled)}")
        fresh = types.FunctionType(code, _flex_attention.__globals__, code.co_name)
        fn = torch.compile(fresh, dynamic=None if q.shape[2] == 1 else False, fullgraph=True)
        _compiled[key] = fn
    return fn


class MHAPyTorchFlexAttention(AttentionBase):
    """Causal MHA on FlexAttention; any ``mask_mod`` pattern, block-sparse on CUDA.

    Compiled on CUDA (fused Triton kernels), eager on CPU (unfused but correct: compiling on a
    CPU costs tens of seconds per shape). ``kernel_options`` passes through to
    ``flex_attention`` (block sizes, ``num_warps``...), over our defaults: the main kernel for
    multi-token chunks, at least :data:`MIN_DECODE_SPLIT_KV` KV splits for one-token decode.
    flex_attention has no dropout, so ``dropout > 0`` is rejected at construction, and no
    backward on CPU, so gradients there raise a clear error.
    """

    @classmethod
    def supports_dropout(cls) -> bool:
        return False  # flex_attention has no dropout

    @classmethod
    def supports_backward(cls, device: torch.device | str) -> bool:
        # torch's flex_attention refuses backward on CPU, eager and compiled alike.
        return torch.device(device).type != "cpu"

    @classmethod
    def supports_score_mod(cls, score_mod: ScoreMod) -> bool:
        return True  # flex_attention takes score_mod natively

    @classmethod
    def compiles_per_shape(cls, device: torch.device | str) -> bool:
        return torch.device(device).type == "cuda"  # prefill shapes are static: compiled once each

    @classmethod
    def context_parallel_unsupported(cls) -> str | None:
        return (
            "torch's context_parallel() rewrites SDPA calls only; its FlexAttention path (the experimental "
            "_ContextParallel module wrapper) needs flex_attention called through a wrapped module with a "
            "BlockMask built for the local query shard (_context_parallel_shard), and this implementation "
            "calls its own compiled flex_attention with BlockMasks built for the whole sequence"
        )

    @classmethod
    def min_head_dim(cls, device: torch.device | str) -> int:
        # The compiled Triton kernels need head_dim >= 16 (seen on an H100, torch 2.11).
        return 16 if torch.device(device).type == "cuda" else 1

    def __init__(self, *args, kernel_options: dict[str, Any] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kernel_options is not None and not isinstance(kernel_options, dict):
            raise TypeError(f"kernel_options must be a dict, got {type(kernel_options).__name__}")
        self.kernel_options = kernel_options

    # BlockMasks are a cache, and compile keys hold code objects, which cannot be pickled.
    _pattern_caches = ("_block_masks", "_pattern_keys")

    def _patterns_changed(self) -> None:
        # BlockMasks and compile keys are built from mask_mod and score_mod: a module given new
        # ones must not attend with the old (so they are rebuilt here, on every assignment).
        self._block_masks: dict[tuple, BlockMask] = {}
        # What dynamo guards on in this module's patterns, worked out once, not on every call.
        self._pattern_keys = (pattern_key(self.mask_mod), pattern_key(self.score_mod))

    def block_mask(self, q: Tensor, k: Tensor, q_offset: int = 0, document_ids: Tensor | None = None) -> BlockMask:
        """The BlockMask for these queries and keys, cached unless ``document_ids`` vary per call."""
        batch, heads, q_len, kv_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        key = (batch, q_len, kv_len, q_offset, q.device)  # batch: a mask that reads b is built per batch

        def build() -> BlockMask:
            pattern = offset_mask(self._pattern(document_ids), q_offset)
            # A tiny probe says whether the pattern reads b or h; if not, one mask serves all.
            probe = dense_mask(pattern, batch, heads, 1, 1, q.device).shape  # (B or 1, H or 1, 1, 1)
            return create_block_mask(
                pattern,
                B=batch if probe[0] > 1 else None,
                H=heads if probe[1] > 1 else None,
                Q_LEN=q_len,
                KV_LEN=kv_len,
                device=q.device,
            )

        return self._per_shape(self._block_masks, key, document_ids, build)

    def _check_input(self, x: Tensor, kv_cache: KVCache | None, document_ids: Tensor | None) -> None:
        super()._check_input(x, kv_cache, document_ids)  # gradients on CPU refused there
        self._check_head_dim(x.device)

    def _no_backward_reason(self, device: torch.device) -> str:
        return "torch's flex_attention has no backward there (it has on CUDA)"

    def _check_head_dim(self, device: torch.device) -> None:
        if self.head_dim < self.min_head_dim(device):
            raise ValueError(
                f"{type(self).__name__} needs head_dim (d_out // num_heads) >= {self.min_head_dim(device)} "
                f"on {device.type}, got {self.head_dim}"
            )

    @staticmethod
    def _default_kernel_options(q: Tensor, k: Tensor) -> dict[str, Any]:
        """Our defaults under the user's ``kernel_options`` (theirs win, key by key)."""
        if q.shape[2] > 1:
            # Inductor picks its decoding kernel for any query shorter than 128, and that kernel
            # has no valid config for many chunk shapes (seen: 100 queries, GQA, fp32, H100).
            # Multi-token chunks take the main kernel; only one-token decode takes decoding.
            return {"FORCE_USE_FLEX_ATTENTION": True}
        if q.device.type != "cuda":
            return {}
        return {"SPLIT_KV": decode_split_kv(k.shape[0], k.shape[1], multiprocessors(q.device))}

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int, document_ids: Tensor | None) -> Tensor:
        self._refuse_gradients(q.device, q)
        self._check_head_dim(q.device)
        block_mask = self.block_mask(q, k, q_offset, document_ids)
        kernel_options = {**self._default_kernel_options(q, k), **(self.kernel_options or {})}
        score_mod = None if self.score_mod is None else offset_score_mod(self.score_mod, q_offset)
        args = (q, k, v, block_mask, self.scale, self.num_kv_heads != self.num_heads, kernel_options, score_mod)
        if q.device.type != "cuda":
            # Untraced on CPU only (where flex has no backward), and never inside a torch.compile of
            # the caller's: dynamo compiles flex there itself and cannot trace the switch's lock.
            untraced = q.device.type == "cpu" and not torch.compiler.is_compiling()
            with untraced_flex() if untraced else contextlib.nullcontext():
                return _flex_attention(*args)  # (B, H, Tq, hd)
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            # Dynamo guards on the kernel options' values too: modules with different options
            # must not share (and recompile) one code object.
            pattern = (*self._pattern_keys, document_ids is not None, tuple(sorted(kernel_options.items())))
            return compiled_flex_attention(q, k, pattern)(*args)  # (B, H, Tq, hd)
