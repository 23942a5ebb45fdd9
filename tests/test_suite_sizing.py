"""How the property suite sizes drawn cases per implementation and device: checked on any machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

import attention
from attention.suite import support
from attention.suite.support import COMPILED, FULL, INTERPRETED, Config, configs


def test_each_implementation_gets_the_sizing_of_how_it_runs() -> None:
    assert support.sizing_for(attention.get("flex"), "cuda") is COMPILED  # a compile per shape
    assert support.sizing_for(attention.get("flex"), "cpu") is FULL  # torch's dense reference, untraced
    assert support.sizing_for(attention.get("triton"), "cpu") is INTERPRETED
    assert support.sizing_for(attention.get("triton"), "cuda") is COMPILED  # per tile and stride alignment
    assert support.sizing_for(attention.get("sdpa"), "cuda") is FULL


def test_the_menu_reaches_every_branch_compiled_kernels_take() -> None:
    shapes = COMPILED.shapes
    assert {s.tokens for s in shapes} >= {1}, "a single token"
    assert any(s.tokens < 128 and s.tokens > 1 for s in shapes), "one partial block"
    assert any(s.tokens > 128 and s.tokens % 128 for s in shapes), "a full block and a partial one"
    assert any(s.tokens > 128 and s.tokens % 128 == 0 for s in shapes), "whole blocks: the unmasked paths"
    assert {s.num_heads // s.num_kv_heads for s in shapes if s.num_heads > 1} >= {1, 2, 4}, "MHA, GQA and MQA"
    assert any(s.head_dim & (s.head_dim - 1) for s in shapes), "a head dim that is not a power of two"
    assert any(s.head_dim % 2 for s in shapes), "an odd head dim: strides with no alignment at all"
    assert min(s.head_dim for s in shapes) == attention.get("flex").min_head_dim("cuda")
    assert any(s.batch > 1 for s in shapes)


def _draws(size: support.Sizing, **kwargs) -> list[Config]:
    seen: list[Config] = []

    @settings(max_examples=40, derandomize=True, database=None)
    @given(cfg=configs(**kwargs))
    def collect(cfg: Config) -> None:
        seen.append(cfg)

    token = support.use_sizing(size)
    try:
        collect()
    finally:
        support.reset_sizing(token)
    return seen


def test_under_a_menu_every_drawn_shape_is_on_it() -> None:
    drawn = _draws(COMPILED)
    assert {c.shape for c in drawn} == set(COMPILED.shapes)
    assert len({(c.d_in, c.qkv_bias, c.seed) for c in drawn}) > len(COMPILED.shapes), "the rest is still drawn"
    assert all(c.d_in != c.d_out for c in drawn)


@pytest.mark.parametrize(("low", "high", "expected"), [(2, 300, {77, 129, 256}), (200, 250, {200, 250})])
def test_a_tests_own_token_range_picks_from_the_menu_or_clamps_it(low: int, high: int, expected: set[int]) -> None:
    assert {c.tokens for c in _draws(COMPILED, min_tokens=low, max_tokens=high)} <= expected
    assert all(low <= c.tokens <= high for c in _draws(COMPILED, min_tokens=low, max_tokens=high))


def test_without_gqa_the_menu_keeps_its_plain_shapes() -> None:
    assert all(c.num_kv_heads == c.num_heads for c in _draws(COMPILED, gqa=False))


def test_the_largest_example_becomes_the_menus_largest_shape() -> None:
    big = Config(batch=4, tokens=300, num_heads=8, num_kv_heads=4, head_dim=64, d_in=96, qkv_bias=True, seed=0)
    clamped = COMPILED.clamp(big)
    assert clamped.shape == (2, 256, 4, 1, 64)
    assert (clamped.d_in, clamped.qkv_bias, clamped.seed) == (96, True, 0)


def test_a_drawn_shape_on_the_menu_is_left_as_it_is() -> None:
    """test_shapes clamps every drawn case: a menu shape must stay, or it would test one shape only."""
    drawn = _draws(COMPILED)
    assert [COMPILED.clamp(c) for c in drawn] == drawn


def test_without_a_menu_shapes_are_drawn_freely() -> None:
    assert len({c.tokens for c in _draws(FULL)}) > len(COMPILED.shapes)
