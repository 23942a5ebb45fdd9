"""A static, preallocated KV cache in the style of gpt-fast.

Buffers are sized once, so their shapes never change and compiled code keeps holding; the
cache tracks how many positions are filled and hands back views of the filled prefix, so
attention reads exactly the keys written so far and no more. Only the first :attr:`KVCache.pos`
positions mean anything: whatever the buffers hold after them (a rolled-back chunk, an earlier
sequence) is overwritten before it is read.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from . import checks


class KVCache(nn.Module):
    """Keys and values of ``num_kv_heads`` heads for up to ``max_tokens`` positions.

    Made by ``module.make_kv_cache(batch_size, max_tokens)``; pass it as
    ``module(x, kv_cache=cache)`` for each consecutive chunk of a sequence. Gradients flow
    through it, to the keys and values of every earlier chunk of the sequence.
    """

    k_cache: Tensor
    v_cache: Tensor

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_tokens: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("max_tokens", max_tokens),
            ("head_dim", head_dim),
        ):
            checks.integer(name, value)
        checks.floating_dtype("dtype", dtype)
        shape = (batch_size, num_kv_heads, max_tokens, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._pos = 0  # a Python int, so reading it never syncs the GPU
        self._owner: weakref.ref[nn.Module] | None = None

    @property
    def owner(self) -> nn.Module | None:
        """The module whose keys and values this cache holds: the one that made it with
        ``make_kv_cache()`` (``None`` for a cache built directly, or unpickled)."""
        return None if self._owner is None else self._owner()

    def claim(self, module: nn.Module) -> None:
        """Mark the cache as ``module``'s, so another module's call with it is refused."""
        self._owner = weakref.ref(module)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_owner": None}  # a weak reference does not pickle

    @property
    def pos(self) -> int:
        """Positions filled so far; only :meth:`update`, :meth:`truncate` and :meth:`reset` move it."""
        return self._pos

    @property
    def batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[1]

    @property
    def max_tokens(self) -> int:
        return self.k_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[3]

    def reset(self) -> None:
        """Empty the cache; the buffers are kept and overwritten by the next sequence."""
        self.truncate(0)

    def truncate(self, pos: int) -> None:
        """Keep the first ``pos`` positions and forget the rest (``0 <= pos <= self.pos``).

        Only the position moves: the buffers beyond ``pos`` keep stale keys and values, which
        mean nothing and are overwritten by the next :meth:`update`. A module's forward calls
        this to undo its own write when the call fails after writing.
        """
        checks.integer("pos", pos, minimum=0)
        if pos > self._pos:
            raise ValueError(f"cannot truncate kv_cache to {pos} positions: only {self._pos} are filled")
        self._pos = pos
        if pos == 0:
            self._forget_graph()

    def _forget_graph(self) -> None:
        # A write from a grad-requiring chunk puts the buffers in that chunk's autograd graph. A
        # new sequence must not hang on to it (memory), nor reach it when it backpropagates (a
        # graph already freed by backward() would raise).
        if self.k_cache.grad_fn is not None or self.v_cache.grad_fn is not None:
            self.k_cache.detach_()
            self.v_cache.detach_()

    def check_compatible(self, x: Tensor, num_new: int) -> None:
        """Raise before anything is written if ``x`` (the chunk's input) cannot extend the cache."""
        if x.shape[0] != self.batch_size:
            raise ValueError(f"kv_cache was made for batch_size={self.batch_size}, input has batch {x.shape[0]}")
        if x.device != self.k_cache.device:
            raise ValueError(f"kv_cache is on {self.k_cache.device}, input is on {x.device}")
        if x.dtype != self.k_cache.dtype:
            raise TypeError(f"kv_cache holds {self.k_cache.dtype}, input is {x.dtype}")
        self._check_writable()
        self._check_room(num_new)

    def _check_writable(self) -> None:
        """Refuse a write that torch would refuse deep inside, naming nobody, or that would
        silently give a wrong answer (docs/design.md#kv-cache-writes)."""
        if torch.compiler.is_compiling():  # dynamo traces forward only: no replay, no mode switch
            return
        if _in_backward():
            raise RuntimeError(
                "kv_cache cannot be written during a backward pass: torch.utils.checkpoint replays a "
                "checkpointed forward there, which would append its chunk to the cache a second time and "
                "attend from the wrong position; checkpoint only calls without a kv_cache"
            )
        if self.k_cache.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(
                "kv_cache was made under torch.inference_mode(), so its buffers are inference tensors, which "
                "only inference mode may write: extend it inside torch.inference_mode(), or make the cache "
                "outside it (under torch.no_grad() decoding is as fast)"
            )

    def _check_room(self, num_new: int) -> None:
        if self._pos + num_new > self.max_tokens:
            raise ValueError(
                f"kv_cache overflow: {self._pos} positions filled + {num_new} new tokens "
                f"> max_tokens={self.max_tokens}; make a larger cache or reset() it"
            )

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v`` ``(B, H_kv, T_new, D)``; return all filled keys and values ``(B, H_kv, pos, D)``.

        Without grad they are views of the buffers (no copy: decoding reads the cache once). With
        grad they are copies: attention saves its inputs for backward, and the next chunk's write
        into the buffers would change a saved view in place, which autograd refuses.
        """
        self._check_writable()
        self._check_room(k.shape[2])
        start, end = self._pos, self._pos + k.shape[2]
        if start == 0:
            self._forget_graph()
        self.k_cache[:, :, start:end] = k
        self.v_cache[:, :, start:end] = v
        self._pos = end
        keys, values = self.k_cache[:, :, :end], self.v_cache[:, :, :end]  # (B, H_kv, pos, D) each
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            return keys.clone(), values.clone()  # (B, H_kv, pos, D) each
        return keys, values


def _in_backward() -> bool:
    """Whether autograd is running a backward node on this thread: a forward called now is a
    replay (``torch.utils.checkpoint`` recomputing what it did not save)."""
    current_node = getattr(torch._C, "_current_autograd_node", None)  # what torch.autograd.graph asks
    return current_node is not None and current_node() is not None
