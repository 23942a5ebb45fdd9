"""What the suite's test modules share: the devices and dtypes to sweep, drawn configurations,
module builders and the oracle check. The implementations come from the plugin
(:mod:`attention.suite.plugin`): a test takes ``impl_name`` and runs for each selected one.

Importing it loads the suite's Hypothesis profile (:mod:`attention.suite.profiles`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from hypothesis import reject
from hypothesis import strategies as st

import attention
from attention.accuracy import GRAD_FACTOR, OUTPUT_FACTOR, assert_matches_oracle, check_module, grad_factor
from attention.reference import module_params
from attention.suite import profiles

profiles.load()

CUDA = torch.cuda.is_available()

#: (device, dtype) pairs: fp32 on CPU; fp32, bf16 and fp16 on CUDA (skipped with a reason on CPU).
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    *(
        pytest.param(
            "cuda",
            dtype,
            id=f"cuda-{name}",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")],
        )
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
    ),
]

#: Every dtype some test runs in, per device: the sweep's, and fp16 on CPU too (the fp16 score-mod
#: checks), so an implementation declaring none of them there has nothing to be tested by.
TESTED_DTYPES = {"cpu": (torch.float32, torch.float16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")]
    ),
]


def mask_kinds(*kinds: str) -> list:
    """Pattern names as parameters; every one but ``causal`` marked as needing the ``masks``
    capability, so an implementation of plain causal attention runs the causal case only."""
    needs_masks = pytest.mark.attention_needs("masks")
    return [pytest.param(kind, marks=() if kind == "causal" else needs_masks) for kind in kinds]


def random_document_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    """``(B, T)`` ids of packed documents with random boundaries, about one document per four
    tokens (at least one), each row its own split."""
    gen = torch.Generator().manual_seed(seed)
    docs = int(torch.randint(1, max(1, length // 4) + 1, (), generator=gen))
    return attention.masks.packed_document_ids(batch, length, docs, generator=gen)  # (B, T)


def mask_for(kind: str, window: int, prefix_len: int) -> attention.masks.MaskMod:
    """The module ``mask_mod`` a test's pattern name stands for, with its drawn parameter
    ("document" is causal within documents: its ids go with the call)."""
    params = {"sliding_window": window, "prefix_lm": prefix_len}
    spec = f"{kind}:{params[kind]}" if kind in params else "causal"
    return attention.masks.from_spec(spec).mask_mod


def grad_context(impl: type[attention.AttentionBase], device: str):
    """``torch.no_grad()`` where the implementation has no backward on ``device`` (flex on CPU)."""
    return torch.enable_grad() if impl.supports_backward(device) else torch.no_grad()


__all__ = [
    "CUDA",
    "DEVICES",
    "DEVICE_DTYPES",
    "GRAD_FACTOR",
    "OUTPUT_FACTOR",
    "assert_matches_oracle",
    "assert_module_matches_oracle",
    "grad_context",
    "grad_factor",
    "mask_for",
    "mask_kinds",
    "random_document_ids",
]


def assert_module_matches_oracle(
    module: attention.AttentionBase,
    x: torch.Tensor,
    actual: torch.Tensor,
    *,
    document_ids: torch.Tensor | None = None,
    what: str = "output",
) -> None:
    """``actual`` (what ``module`` gave for the whole of ``x``) against the float64 oracle, by the
    ratio rule; the baseline is the same reference math run in ``x``'s dtype."""
    problem = check_module(module, x, actual, document_ids=document_ids, what=what).problem
    if problem is not None:
        raise AssertionError(problem)


# -- drawn configurations (shapes and seeds; tensor values come from seeded generators) -----

#: Token counts worth hitting on purpose: one token, and either side of the 128-wide blocks
#: that fused kernels and flex's BlockMask tile by.
EDGE_TOKENS = (1, 127, 128, 129, 255, 257, 300)


class Shape(NamedTuple):
    """The sizes of a drawn problem that compiled code is specialised on."""

    batch: int
    tokens: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Config:
    """One drawn attention problem: sizes, layout options and the seed for weights and inputs."""

    batch: int
    tokens: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_in: int
    qkv_bias: bool
    seed: int

    @property
    def d_out(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def shape(self) -> Shape:
        return Shape(self.batch, self.tokens, self.num_heads, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True)
class Sizing:
    """The shapes a drawn case may take for one implementation on one device, and how many
    examples a property draws for it (``None``: the Hypothesis profile's count). ``shapes``, when
    given, is the whole menu :func:`configs` draws from (tokens clamped to a test's own range)."""

    batch: int = 4
    heads: tuple[int, int] = (1, 8)
    head_dim: int = 64
    tokens: tuple[int, int] = (1, 300)
    decode_steps: int = 8  # tokens a generation or decoding case draws one at a time
    chunks: int | None = None  # the most pieces a cached sequence is fed in (None: any)
    max_examples: int | None = None
    shapes: tuple[Shape, ...] = ()

    def clamp(self, cfg: Config) -> Config:
        """``cfg`` within this sizing (an explicit example drawn for the full range, say); a KV
        head count that no longer divides the heads becomes 1. With a menu of ``shapes``, a shape
        on the menu stays as it is and any other becomes the menu's largest."""
        if self.shapes:
            if cfg.shape in self.shapes:
                return cfg
            largest = max(self.shapes, key=lambda s: s.batch * s.tokens * s.num_heads * s.head_dim)
            return dataclasses.replace(cfg, **largest._asdict())
        heads = min(max(cfg.num_heads, self.heads[0]), self.heads[1])
        kv_heads = cfg.num_kv_heads if cfg.num_kv_heads <= heads and heads % cfg.num_kv_heads == 0 else 1
        return dataclasses.replace(
            cfg,
            batch=min(cfg.batch, self.batch),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=min(cfg.head_dim, self.head_dim),
            tokens=min(max(cfg.tokens, self.tokens[0]), self.tokens[1]),
        )


#: Compiled kernels and PyTorch's own paths: the full range.
FULL = Sizing()
#: Kernels run by Triton's interpreter (on CPU): each launch walks every program's tile steps in
#: Python, about 0.1 s a step, so cases are the smallest that reach every branch on the
#: interpreter's 32 x 32 tiles: two query tiles with a partial one (33..48 tokens, full tiles
#: below the diagonal), GQA (2 heads, 1 KV head drawn), a batch of two; a cached sequence in a
#: prefill and two chunks (docs/design.md#triton-configs).
INTERPRETED = Sizing(batch=2, heads=(2, 2), head_dim=32, tokens=(33, 48), decode_steps=3, chunks=3, max_examples=3)

#: Code compiled per input shape (flex on CUDA: seconds a shape, for each dtype, grad mode and
#: pattern; Triton on CUDA: per head-dim tile and 16-alignment of every stride): a menu of shapes
#: that together reach the kernels' branches, shared by every property, so each is compiled once and reused
#: across examples and tests (and, through the compile caches on disk, across xdist workers): one
#: token, head dim 24 (8-aligned, under its 32-wide tile); one partial block of 128 tokens at the
#: smallest head dim flex compiles (16); a full block and one more token, GQA, an odd head dim
#: (unaligned strides, masked head dim); two whole blocks (lengths that divide flex's 128-token
#: blocks and Triton's 16-alignment: their unmasked paths), multi-query, head dim 64
#: (docs/design.md#suite-sizing).
COMPILED = Sizing(
    shapes=(
        Shape(batch=1, tokens=1, num_heads=2, num_kv_heads=1, head_dim=24),
        Shape(batch=2, tokens=77, num_heads=4, num_kv_heads=4, head_dim=16),
        Shape(batch=1, tokens=129, num_heads=4, num_kv_heads=2, head_dim=33),
        Shape(batch=2, tokens=256, num_heads=4, num_kv_heads=1, head_dim=64),
    )
)

_SIZING: contextvars.ContextVar[Sizing] = contextvars.ContextVar("attention_suite_sizing", default=FULL)


def sizing_for(impl: type[attention.AttentionBase], device: str) -> Sizing:
    """:data:`INTERPRETED` where ``impl`` runs interpreted on ``device``, :data:`COMPILED` where it
    compiles per shape there, else :data:`FULL`."""
    if impl.runs_interpreted(device):
        return INTERPRETED
    return COMPILED if impl.compiles_per_shape(device) else FULL


def sizing() -> Sizing:
    """The sizing of the test now running (the plugin sets it per implementation and device)."""
    return _SIZING.get()


def use_sizing(value: Sizing) -> contextvars.Token:
    """Make ``value`` the sizing of the test about to run; :func:`reset_sizing` undoes it."""
    return _SIZING.set(value)


def reset_sizing(token: contextvars.Token) -> None:
    _SIZING.reset(token)


@st.composite
def configs(draw: st.DrawFn, *, min_tokens: int = 1, max_tokens: int = 300, gqa: bool = True) -> Config:
    """Batch 1..4, ``min_tokens..max_tokens`` tokens (block edges favoured), 1..8 heads, head_dim
    8..64, ``d_in != d_out``, a KV head count dividing the heads (when ``gqa``), bias or not;
    each range narrowed to the running test's :func:`sizing`, or from its menu of shapes."""
    size = sizing()
    if size.shapes:
        menu = [s for s in size.shapes if gqa or s.num_kv_heads == s.num_heads]
        menu = [s for s in menu if min_tokens <= s.tokens <= max_tokens] or menu  # else clamped below
        shape = draw(st.sampled_from(menu))
        d_out = shape.num_heads * shape.head_dim
        return Config(
            **{**shape._asdict(), "tokens": min(max(shape.tokens, min_tokens), max_tokens)},
            d_in=draw(st.integers(1, 96).filter(lambda d: d != d_out)),
            qkv_bias=draw(st.booleans()),
            seed=draw(st.integers(0, 2**32 - 1)),
        )
    num_heads = draw(st.integers(*size.heads))
    divisors = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
    head_dim = draw(st.integers(8, size.head_dim))
    d_out = num_heads * head_dim
    low, high = max(min_tokens, size.tokens[0]), min(max_tokens, size.tokens[1])
    if low > high:  # a test's own range outside the sizing's: the test's wins
        low, high = min_tokens, max_tokens
    min_tokens, max_tokens = low, high
    edges = [t for t in EDGE_TOKENS if min_tokens <= t <= max_tokens]
    return Config(
        batch=draw(st.integers(1, size.batch)),
        tokens=draw(
            st.one_of(st.sampled_from(edges), st.integers(min_tokens, max_tokens))
            if edges
            else st.integers(min_tokens, max_tokens)
        ),
        num_heads=num_heads,
        num_kv_heads=draw(st.sampled_from(divisors[::-1])) if gqa else num_heads,  # plain MHA first
        head_dim=head_dim,
        d_in=draw(st.integers(1, 96).filter(lambda d: d != d_out)),
        qkv_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build_module(
    impl: type[attention.AttentionBase],
    cfg: Config,
    device: str,
    dtype: torch.dtype,
    *,
    seed: int | None = None,
    **kwargs,
) -> attention.AttentionBase:
    """``impl`` for ``cfg`` with weights drawn from ``seed`` (default ``cfg.seed``), then moved.

    Weights are N(0, 1/fan_in), so queries and keys are O(1) and softmax is neither flat nor
    one-hot; they are drawn in float32 on the CPU, so every device and dtype sees the same ones.
    """
    # Flex's CUDA kernels need head_dim >= 16 (it raises a clear error, tested in test_errors).
    # reject() only when it applies: build_module also serves tests that draw no examples.
    if cfg.head_dim < impl.min_head_dim(device):
        reject()
    module = impl(
        cfg.d_in,
        cfg.d_out,
        cfg.num_heads,
        kwargs.pop("context_length", cfg.tokens),
        qkv_bias=cfg.qkv_bias,
        num_kv_heads=cfg.num_kv_heads,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    with torch.no_grad():
        for linear in (module.qkv, module.proj):
            std = 1.0 / math.sqrt(linear.in_features)
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * std)
            if linear.bias is not None:
                linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen) * std)
    return module.to(device=device, dtype=dtype)


def seeded_randn(*shape: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``torch.randn(shape)`` from ``seed``, drawn in float32 on the CPU so every device agrees."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def make_input(cfg: Config, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The input ``(B, T, d_in)`` for ``cfg``, from a seed distinct from the weights'."""
    return seeded_randn(cfg.batch, cfg.tokens, cfg.d_in, seed=cfg.seed + 1, device=device, dtype=dtype)


def reference_with_leaves(
    module: attention.AttentionBase,
    x: torch.Tensor,
    dtype: torch.dtype,
    mask_mod: attention.masks.MaskMod = attention.masks.causal,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference output of ``module`` for ``x`` in ``dtype`` and the leaves it was computed
    from: ``x``, then the parameters in ``module.named_parameters()`` order (for gradients)."""
    x_leaf = x.detach().to(dtype).requires_grad_()  # (B, T, d_in)
    params = module_params(module, dtype, requires_grad=True)
    y = attention.reference_mha(
        x_leaf,
        params,
        num_heads=module.num_heads,
        num_kv_heads=module.num_kv_heads,
        mask_mod=mask_mod,
        document_ids=document_ids,
    )
    return y, [x_leaf, *params.values()]  # y: (B, T, d_out)


def oracle_and_baseline_grads(module, x, upstream, mask_mod, document_ids):
    """Gradients of ``(reference(x) * upstream).sum()`` for ``x`` and every parameter, in float64
    (oracle) and in ``x``'s dtype (baseline), on the whole sequence in one uncached call."""
    result = []
    for dtype in (torch.float64, x.dtype):
        y, leaves = reference_with_leaves(module, x, dtype, mask_mod, document_ids)  # y: (B, T, d_out)
        result.append(torch.autograd.grad(y, leaves, upstream.to(dtype)))
    return result


__all__ += [
    "COMPILED",
    "EDGE_TOKENS",
    "FULL",
    "INTERPRETED",
    "Config",
    "Shape",
    "Sizing",
    "build_module",
    "configs",
    "make_input",
    "oracle_and_baseline_grads",
    "reference_with_leaves",
    "reset_sizing",
    "seeded_randn",
    "sizing",
    "sizing_for",
    "use_sizing",
]
