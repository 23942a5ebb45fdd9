"""Attention through kernels written in this repo in Triton (:mod:`attention.kernels`).

* Prefill and training (many query tokens, or any call that needs gradients): FlashAttention-2
  forward and backward over a :class:`~attention.block_table.BlockTable` of the module's
  ``mask_mod``, so fully masked tiles are skipped for any pattern. Tables are built once per
  (batch, lengths, offset, device, tiles) and reused until ``mask_mod`` or ``score_mod`` is
  reassigned, as flex's BlockMasks are.
* Decoding (up to :data:`DECODE_MAX_TOKENS` new tokens against a KV cache, no gradients):
  split-KV kernels that read each cached byte once per KV head, for every query head of its group.

Triton is imported on first use, so ``import attention`` needs torch alone. CUDA tensors run the
compiled kernels; CPU tensors run the same kernels in Triton's interpreter (exact, slow: for
tests on machines without a GPU).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from .base import AttentionBase
from .block_table import BlockTable, build_block_table
from .kv_cache import KVCache

#: Query tokens up to which a call without gradients takes the split-KV decode kernels, and the
#: most tile rows (query heads per KV head x tokens) one decode program holds; beyond either,
#: the prefill kernels run (they take any query offset).
DECODE_MAX_TOKENS = 16
DECODE_MAX_ROWS = 128
#: The largest head dim the CUDA tiles are sized for (docs/design.md#triton-configs): wider heads
#: would need smaller tiles to fit shared memory.
MAX_HEAD_DIM = 128
#: The dtypes the kernels compute right, per device type (docs/design.md#triton-dtypes).
DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float16, torch.float32),
}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


#: The backward (FlashAttention-2's: P recomputed from the saved log-sum-exp, the row term
#: rowsum(dO * O) from the rounded output) reached 10x a plain same-precision backward's gradient
#: error in fp32 where a query sees a handful of keys, against the rule's 3x
#: (docs/design.md#flash-backward-gradients): 5x the factor, 15x in all, a 1.5x margin.
FLASH_BACKWARD_GRAD_ALLOWANCE = 5.0


class MHATritonAttention(AttentionBase):
    """Causal MHA on this repo's Triton kernels: any ``mask_mod``, GQA, KV cache, document ids.

    No dropout (rejected at construction) and no score mods. Head dims up to
    :data:`MAX_HEAD_DIM` on CUDA. :meth:`kernel_config` says which kernels and tiles a call of a
    given shape runs.
    """

    @classmethod
    def supports_dropout(cls) -> bool:
        return False  # the kernels draw no random numbers

    @classmethod
    def context_parallel_unsupported(cls) -> str | None:
        return (
            "it attends through this repo's own Triton kernels, which torch's context parallel cannot shard "
            "(it rewrites only F.scaled_dot_product_attention calls into ring attention)"
        )

    @classmethod
    def unavailable(cls, device: torch.device | str) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed (pip install triton; Linux only)"
        kind = torch.device(device).type
        if kind not in ("cuda", "cpu"):
            return f"Triton kernels run on CUDA (or, interpreted, on CPU), not {kind}"
        problem = _import_problem()
        if problem is not None:
            return problem
        if kind == "cpu":
            from .kernels.launch import interpreter_problem

            return interpreter_problem()
        return None

    _pattern_caches = ("_tables",)

    def _patterns_changed(self) -> None:
        # Tables are built from mask_mod: a module given a new one must not attend with the old.
        self._tables: dict[tuple, BlockTable] = {}

    def _check_input(self, x: Tensor, kv_cache: KVCache | None, document_ids: Tensor | None) -> None:
        super()._check_input(x, kv_cache, document_ids)
        # Refused here, before the cache is written, so a refused call leaves the cache as it was.
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(
                f"{type(self).__name__} does not run under torch.func transforms (grad, vmap, jacrev, jvp, ...): "
                "its Triton kernels read raw tensor memory, which functorch's wrapped tensors do not expose "
                "(docs/design.md#triton-and-torchfunc); for gradients use torch.autograd (loss.backward(), "
                "torch.autograd.grad), for many inputs a batch dimension"
            )
        reason = self.unavailable(x.device)
        if reason is not None:
            raise RuntimeError(f"{type(self).__name__} cannot run here: {reason}")
        from .kernels.launch import tma_switch

        tma_switch()  # a wrong ATTENTION_TRITON_TMA is refused before the cache is written
        if x.device.type == "cuda" and self.head_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"{type(self).__name__} supports head_dim (d_out // num_heads) up to {MAX_HEAD_DIM} on CUDA, "
                f"got {self.head_dim}"
            )

    @classmethod
    def dtype_unsupported(cls, dtype: torch.dtype, device: torch.device | str) -> str | None:
        kind = torch.device(device).type
        if kind not in DTYPES or dtype in DTYPES[kind]:
            return super().dtype_unsupported(dtype, device)
        allowed = [_DTYPE_NAMES[d] for d in DTYPES[kind]]
        where = "CUDA" if kind == "cuda" else "CPU (interpreted)"
        return f"runs {', '.join(allowed[:-1])} or {allowed[-1]} on {where}, not {dtype}{_why_not(dtype)}"

    @classmethod
    def grad_error_allowance(cls, device: torch.device | str) -> float:
        return FLASH_BACKWARD_GRAD_ALLOWANCE  # the FlashAttention-2 backward's row term, on every device

    @classmethod
    def runs_interpreted(cls, device: torch.device | str) -> bool:
        return torch.device(device).type == "cpu"

    @classmethod
    def compiles_per_shape(cls, device: torch.device | str) -> bool:
        # Triton specialises each kernel on every stride's and pointer's 16-alignment as well as
        # on the head-dim tile, so nearly every freely drawn shape compiles forward and backward.
        return torch.device(device).type == "cuda"

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
    ) -> dict[str, object]:
        """Which kernels and tiles a call of this shape runs (recorded beside perf results), for a
        prefill from an empty cache (as many keys as queries) or a decode step."""
        from .device_info import supports_programmatic_launch
        from .kernels import decode
        from .kernels.launch import dkdv_blocks, padded_head_dim, prefill_blocks, tma_rows_fit, use_tma

        device = torch.device(device)
        if _decodes(q_len, group, grad):
            step = decode.tiles(dtype, decode.block_rows(group, q_len), padded_head_dim(head_dim), None)
            return {
                "kernel": "decode_split_kv",
                "BLOCK_N": step.block_n,
                "num_stages": step.num_stages,
                "min_split": decode.MIN_SPLIT_KEYS,
                "programmatic_launch": supports_programmatic_launch(device),
            }
        tma = use_tma(device, head_dim) and tma_rows_fit(head_dim, dtype)  # as for contiguous inputs, the perf cases'
        blocks = prefill_blocks(dtype, head_dim, device, kv_len=q_len, grad=grad, tma=tma)
        config: dict[str, object] = {"kernel": "prefill", **blocks.as_dict()}
        if grad:
            config["dkdv"] = dkdv_blocks(dtype, head_dim, device, tma=tma).as_dict()
        return config

    def block_table(
        self, q: Tensor, k: Tensor, q_offset: int, document_ids: Tensor | None, block_m: int, block_n: int
    ) -> BlockTable:
        """The block table for these queries and keys, cached unless ``document_ids`` vary per call."""
        batch, heads, q_len, kv_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        key = (batch, q_len, kv_len, q_offset, q.device, block_m, block_n)
        return self._per_shape(
            self._tables,
            key,
            document_ids,
            lambda: build_block_table(
                self._pattern(document_ids), batch, heads, q_len, kv_len, block_m, block_n, q.device, q_offset
            ),
        )

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int, document_ids: Tensor | None) -> Tensor:
        from .kernels import decode, prefill
        from .kernels.launch import dkdv_blocks, prefill_blocks, tma_fits, use_tma

        k, v = _in_query_dtype(q, k, v)  # (B, H_kv, Tk, hd) each
        self._check_dtype(q.dtype, q.device)  # what the kernels get, whatever changed it since the input
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if _decodes(q.shape[2], q.shape[1] // k.shape[1], wants_grad):
            if not self._is_plain_causal(document_ids):
                mask = self._dense_mask(q, k, q_offset, document_ids)  # broadcasts to (B, H, Tq, Tk)
                return decode.attend(q, k, v, self.scale, q_offset=q_offset, visible=decode.DENSE, mask=mask)
            # One token at the end of the cache sees every key; more see a causal band.
            sees_all = q_offset + q.shape[2] >= k.shape[2] and q.shape[2] == 1
            visible = decode.ALL if sees_all else decode.CAUSAL
            return decode.attend(q, k, v, self.scale, q_offset=q_offset, visible=visible)  # (B, H, Tq, hd)
        tma = use_tma(q.device, self.head_dim) and tma_fits(q, k, v)
        blocks = prefill_blocks(q.dtype, self.head_dim, q.device, kv_len=k.shape[2], grad=wants_grad, tma=tma)
        table = self.block_table(q, k, q_offset, document_ids, blocks.block_m, blocks.block_n)
        if not wants_grad:
            return prefill.attend(q, k, v, table, self.scale, blocks)  # (B, H, Tq, hd)
        key_blocks = dkdv_blocks(q.dtype, self.head_dim, q.device, tma=tma)
        key_tiles = key_blocks.block_m, key_blocks.block_n
        same = key_tiles == (blocks.block_m, blocks.block_n)  # on CPU and for fp32
        key_table = table if same else self.block_table(q, k, q_offset, document_ids, *key_tiles)
        return prefill.attend(q, k, v, table, self.scale, blocks, key_table, key_blocks)  # (B, H, Tq, hd)


def _import_problem() -> str | None:
    """Why the kernels cannot be imported, or ``None``: an installed triton may still fail to
    import (no driver it can load, a build for another Python or CUDA), and a question about
    availability must answer with that reason, never raise it."""
    try:
        importlib.import_module("attention.kernels.decode")  # imports triton, and every kernel module
    except Exception as error:  # whatever triton's own import raised
        return f"the triton package is installed but failed to import ({type(error).__name__}: {error})"
    return None


def _decodes(q_len: int, group: int, grad: bool) -> bool:
    """Whether a call takes the split-KV decode kernels: a few tokens, no gradients, and a tile of
    ``group x q_len`` rows small enough for one program."""
    return q_len <= DECODE_MAX_TOKENS and q_len * group <= DECODE_MAX_ROWS and not grad


def _why_not(dtype: torch.dtype) -> str:
    """Why the kernels would compute ``dtype`` wrong, for the refusal."""
    if dtype == torch.float64:
        return ": the kernels accumulate in fp32, so a float64 result would carry fp32 error"
    if dtype == torch.bfloat16:
        return ": Triton's interpreter holds bfloat16 as raw 16-bit integers, and tl.dot multiplies them as integers"
    return ""


def _in_query_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``k, v`` in ``q``'s dtype. Under ``torch.autocast`` the queries come cast while keys and
    values read back from a KV cache keep the cache's dtype; the kernels take one dtype, so they
    are cast as autocast casts a matmul's inputs in the other implementations."""
    if k.dtype == v.dtype == q.dtype:
        return k, v
    if not torch.is_autocast_enabled(q.device.type):
        raise TypeError(f"MHATritonAttention needs one dtype for q, k and v, got {q.dtype}, {k.dtype} and {v.dtype}")
    return k.to(q.dtype), v.to(q.dtype)  # (B, H_kv, Tk, hd) each
