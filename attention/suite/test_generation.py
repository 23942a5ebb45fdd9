"""Greedy generation from a tiny decoder: the KV cache changes how tokens are computed, never which.

The decoder is built from a registered attention implementation (embedding and learned positions,
two pre-norm blocks, LM head; seeded random weights). Generating with one cache per block must
produce exactly the token ids that re-running the whole sequence at every step produces.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import attention
from attention.suite.support import DEVICES, mask_for, mask_kinds, sizing

VOCAB = 61
D_MODEL = 64
NUM_HEADS = 4  # head_dim 16: the smallest flex compiles for on CUDA
NUM_LAYERS = 2


class Block(nn.Module):
    def __init__(self, attn: attention.AttentionBase) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.attn = attn
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 2 * D_MODEL), nn.GELU(), nn.Linear(2 * D_MODEL, D_MODEL))

    def forward(self, h: Tensor, kv_cache: attention.KVCache | None) -> Tensor:
        h = h + self.attn(self.norm1(h), kv_cache=kv_cache)  # (B, T, D)
        return h + self.mlp(self.norm2(h))  # (B, T, D)


class TinyDecoder(nn.Module):
    """``tokens (B, T) -> logits (B, T, vocab)``; with caches, ``tokens`` continue the cached ones."""

    def __init__(self, impl: type[attention.AttentionBase], context_length: int, **attn_kwargs) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.positions = nn.Embedding(context_length, D_MODEL)
        self.blocks = nn.ModuleList(
            Block(impl(D_MODEL, D_MODEL, NUM_HEADS, context_length, **attn_kwargs)) for _ in range(NUM_LAYERS)
        )
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def make_caches(self, batch_size: int, max_tokens: int) -> list[attention.KVCache]:
        return [block.attn.make_kv_cache(batch_size, max_tokens) for block in self.blocks]

    def forward(self, tokens: Tensor, caches: list[attention.KVCache] | None = None) -> Tensor:
        start = caches[0].pos if caches else 0
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)  # (T,)
        h = self.embed(tokens) + self.positions(positions)  # (B, T, D)
        for i, block in enumerate(self.blocks):
            h = block(h, caches[i] if caches else None)  # (B, T, D)
        return self.head(self.norm(h))  # (B, T, vocab)


def generate_uncached(model: TinyDecoder, prompt: Tensor, new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy: the whole sequence through the model at every step. Returns ids and each step's logits."""
    tokens, step_logits = prompt, []
    for _ in range(new_tokens):
        logits = model(tokens)[:, -1]  # (B, vocab)
        step_logits.append(logits)
        tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)  # (B, T + 1)
    return tokens[:, prompt.shape[1] :], step_logits


def generate_cached(model: TinyDecoder, prompt: Tensor, new_tokens: int) -> Tensor:
    """Greedy with a KV cache per block: the prompt once, then one token per step."""
    caches = model.make_caches(prompt.shape[0], prompt.shape[1] + new_tokens)
    logits = model(prompt, caches)[:, -1]  # (B, vocab)
    generated = [logits.argmax(dim=-1, keepdim=True)]  # each (B, 1)
    for _ in range(new_tokens - 1):
        logits = model(generated[-1], caches)[:, -1]  # (B, vocab)
        generated.append(logits.argmax(dim=-1, keepdim=True))
    return torch.cat(generated, dim=1)  # (B, new_tokens)


def top2_gap(logits: Tensor) -> float:
    """The smallest margin between the best and second-best logit over the batch."""
    top = logits.topk(2, dim=-1).values  # (B, 2)
    return (top[:, 0] - top[:, 1]).min().item()


MASK_KINDS = mask_kinds("causal", "sliding_window", "prefix_lm")


@st.composite
def generation_cases(draw: st.DrawFn, device: str) -> dict:
    if device == "cuda":  # fixed shapes and patterns: compiled flex kernels are reused across examples
        batch, prompt_len, new_tokens, num_kv_heads, window, prefix_len = 2, 5, 6, 2, 3, 3
    else:
        size = sizing()
        batch = draw(st.integers(1, min(3, size.batch)))
        prompt_len = draw(st.integers(1, 8))
        new_tokens = draw(st.integers(1, size.decode_steps))
        num_kv_heads = draw(st.sampled_from([NUM_HEADS, 2, 1]))
        window = draw(st.integers(1, 4))
        prefix_len = draw(st.integers(0, prompt_len))  # a bidirectional prefix lies inside the prompt
    return dict(
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        num_kv_heads=num_kv_heads,
        window=window,
        prefix_len=prefix_len,
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.attention_needs("kv_cache")
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=max(2, settings.default.max_examples // 4))
@given(data=st.data())
def test_greedy_generation_same_with_and_without_cache(data, device, impl_name, mask_kind):
    case = data.draw(generation_cases(device), label="case")
    mask_mod = mask_for(mask_kind, case["window"], case["prefix_len"])
    torch.manual_seed(case["seed"])
    context_length = case["prompt_len"] + case["new_tokens"]
    model = TinyDecoder(attention.get(impl_name), context_length, num_kv_heads=case["num_kv_heads"], mask_mod=mask_mod)
    nn.init.normal_(model.head.weight)  # logits O(1) apart: greedy picks are far from ties
    model = model.to(device).eval()
    prompt = torch.randint(0, VOCAB, (case["batch"], case["prompt_len"]), device=device)  # (B, P)

    with torch.no_grad():  # decoding needs no graph; flex has no backward on CPU
        expected, step_logits = generate_uncached(model, prompt, case["new_tokens"])
        got = generate_cached(model, prompt, case["new_tokens"])

    if not torch.equal(got, expected):
        step = int((got != expected).any(dim=0).nonzero()[0])
        pytest.fail(
            f"cached generation diverged at step {step}: {got.tolist()} vs uncached {expected.tolist()} "
            f"(top-2 logit gap there {top2_gap(step_logits[step]):.2e}; near zero would mean a tie)"
        )
