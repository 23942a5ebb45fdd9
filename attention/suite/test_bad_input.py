"""Bad input fails fast with a clear error: the right exception type, and a message that names
the argument and the offending value. Every implementation shares the checks, so every one is
tested. A check that a call reaches only past a capability check (bad document ids need a call
that may pass them) needs that capability."""

from __future__ import annotations

import re

import pytest
import torch

import attention
from attention.suite.support import CUDA, grad_context

SIZES = ("d_in", "d_out", "num_heads", "context_length")
#: A valid construction: d_in=6, d_out=8, num_heads=2, context_length=16.
GOOD = dict(d_in=6, d_out=8, num_heads=2, context_length=16)

#: For an input of 1 sequence x 3 tokens and an empty cache.
DOCUMENT_SHAPE = "document_ids must have shape (batch, cached + tokens) = (1, 3)"

needs_cuda = pytest.mark.skipif(not CUDA, reason="a device mismatch needs a CUDA GPU")


def _build(impl_name: str, **overrides) -> attention.AttentionBase:
    kwargs = {**GOOD, **overrides}
    sizes = [kwargs.pop(name) for name in SIZES]
    return attention.get(impl_name)(*sizes, **kwargs)


def _x(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=device)


# -- construction ---------------------------------------------------------------------------


def test_d_out_not_divisible_by_num_heads(impl_name: str) -> None:
    with pytest.raises(ValueError, match=re.escape("d_out (10) must be divisible by num_heads (3)")):
        _build(impl_name, d_out=10, num_heads=3)


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("name", SIZES)
def test_non_positive_size(impl_name: str, name: str, value: int) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{name} must be >= 1, got {value}")):
        _build(impl_name, **{name: value})


@pytest.mark.parametrize("value", [8.0, "8", None, True])
@pytest.mark.parametrize("name", SIZES)
def test_non_int_size(impl_name: str, name: str, value: object) -> None:
    with pytest.raises(TypeError, match=re.escape(f"{name} must be an int, got {type(value).__name__} ({value!r})")):
        _build(impl_name, **{name: value})


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_outside_unit_interval(impl_name: str, dropout: float) -> None:
    with pytest.raises(ValueError, match=re.escape(f"dropout must be in [0, 1), got {dropout}")):
        _build(impl_name, dropout=dropout)


@pytest.mark.parametrize("dropout", ["0.1", None, True])
def test_dropout_not_a_number(impl_name: str, dropout: object) -> None:
    with pytest.raises(TypeError, match=re.escape(f"dropout must be a float, got {type(dropout).__name__}")):
        _build(impl_name, dropout=dropout)


def test_dropout_is_rejected_where_unsupported_and_kept_elsewhere(impl_name: str) -> None:
    impl = attention.get(impl_name)
    if impl.supports_dropout():
        assert _build(impl_name, dropout=0.25).dropout == 0.25
    else:
        with pytest.raises(ValueError, match=re.escape(f"{impl.__name__} does not support dropout; got dropout=0.25")):
            _build(impl_name, dropout=0.25)


def test_qkv_bias_not_a_bool(impl_name: str) -> None:
    with pytest.raises(TypeError, match="qkv_bias must be a bool, got int"):
        _build(impl_name, qkv_bias=1)


def test_num_kv_heads_not_dividing_num_heads(impl_name: str) -> None:
    with pytest.raises(ValueError, match=re.escape("num_kv_heads (3) must divide num_heads (4)")):
        _build(impl_name, d_out=8, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "num_kv_heads must be >= 1, got 0"),
        (2.0, TypeError, "num_kv_heads must be an int, got float (2.0)"),
    ],
)
def test_num_kv_heads_bad_value(impl_name: str, value: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        _build(impl_name, num_kv_heads=value)


def test_mask_mod_not_callable(impl_name: str) -> None:
    with pytest.raises(TypeError, match=re.escape("mask_mod must be callable(b, h, q_idx, kv_idx), got str")):
        _build(impl_name, mask_mod="causal")


# -- forward --------------------------------------------------------------------------------


def _forward(module: attention.AttentionBase, x: object, **kwargs) -> torch.Tensor:
    """``module(x)``, without gradients where the implementation has none on the CPU (flex)."""
    with grad_context(type(module), "cpu"):
        return module(x, **kwargs)


def test_input_not_a_tensor(impl_name: str) -> None:
    with pytest.raises(TypeError, match=re.escape("x must be a torch.Tensor, got list")):
        _forward(_build(impl_name), [[[0.5] * 6]])


@pytest.mark.parametrize("shape", [(4, 6), (1, 2, 4, 6)])
def test_input_not_3d(impl_name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"x must be 3-D (batch, tokens, d_in), got shape {shape}")):
        _forward(_build(impl_name), _x(*shape))


def test_input_last_dim_not_d_in(impl_name: str) -> None:
    with pytest.raises(ValueError, match=re.escape("x has last dim 5, expected d_in=6")):
        _forward(_build(impl_name), _x(2, 3, 5))


@pytest.mark.parametrize("shape", [(2, 0, 6), (0, 3, 6)])
def test_input_without_tokens_or_sequences(impl_name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"at least one sequence and one token, got shape {shape}")):
        _forward(_build(impl_name), torch.empty(shape))


def test_more_tokens_than_context_length(impl_name: str) -> None:
    with pytest.raises(ValueError, match=re.escape("17 positions (0 cached + 17 new) exceed context_length=16")):
        _forward(_build(impl_name), _x(1, 17, 6))


# Named x_dtype, not dtype: the module computes in fp32 here, and a "dtype" parameter is the one
# the plugin checks against what an implementation computes (it would skip this test where the
# refusal matters most).
@pytest.mark.parametrize("x_dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_input_dtype_differs_from_weights(impl_name: str, x_dtype: torch.dtype) -> None:
    x = torch.ones(1, 3, 6, dtype=x_dtype)
    with pytest.raises(TypeError, match=re.escape(f"x is {x_dtype} but the weights are torch.float32")):
        _forward(_build(impl_name), x)


@needs_cuda
@pytest.mark.cuda
def test_input_device_differs_from_weights(impl_name: str) -> None:
    module = _build(impl_name).to("cuda")
    with pytest.raises(ValueError, match=r"x is on cpu but the weights are on cuda"):
        module(_x(1, 3, 6))


@pytest.mark.parametrize(
    ("mask_mod", "shown"),
    [
        (lambda b, h, q_idx: q_idx >= 0, "<lambda>(b, h, q_idx)"),
        (lambda b, h, q_idx, kv_idx, extra: q_idx >= kv_idx, "<lambda>(b, h, q_idx, kv_idx, extra)"),
        (lambda score, b, h, q_idx, kv_idx: score, "<lambda>(score, b, h, q_idx, kv_idx)"),  # a score_mod
    ],
    ids=["three-args", "five-args", "a-score-mod"],
)
def test_mask_mod_with_wrong_arity(impl_name: str, mask_mod, shown: str) -> None:
    # Refused at construction, naming what it got, not at the first forward deep in torch.
    message = f"mask_mod must be callable(b, h, q_idx, kv_idx), got {shown}"
    with pytest.raises(TypeError, match=re.escape(message)):
        _build(impl_name, mask_mod=mask_mod)


@pytest.mark.parametrize(
    ("mask_mod", "got"),
    [
        (lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx).float(), "torch.float32"),
        (lambda b, h, q_idx, kv_idx: True, "bool"),
        (lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs(), "torch.int64"),
    ],
    ids=["float-tensor", "python-bool", "int-tensor"],
)
def test_mask_mod_not_returning_a_bool_tensor(impl_name: str, mask_mod, got: str) -> None:
    # A float 0/1 "mask" would be read by SDPA as an additive bias, silently attending everywhere.
    with pytest.raises(TypeError, match=re.escape(f"mask_mod must return a bool tensor, got {got}")):
        _build(impl_name, mask_mod=mask_mod)


@pytest.mark.parametrize(
    ("mask_mod", "shape"),
    [
        (lambda b, h, q_idx, kv_idx: torch.ones(3, dtype=torch.bool), "(3,)"),
        (lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx).flatten(), "(4,)"),
        (lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx)[None], "(1, 1, 1, 2, 2)"),
        (lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx).expand(1, 1, 2, 2).repeat(1, 3, 1, 1), "(1, 3, 2, 2)"),
    ],
    ids=["unrelated", "flattened", "five-d", "made-up-heads"],
)
def test_mask_mod_returning_a_wrong_shape(impl_name: str, mask_mod, shape: str) -> None:
    message = (
        "mask_mod must return a bool tensor broadcastable to the grid of its indices, (1, 1, 2, 2) for "
        f"q_idx (1, 1, 2, 1) and kv_idx (1, 1, 1, 2); <lambda> returned shape {shape}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        _build(impl_name, mask_mod=mask_mod)


def _normalised(score, b, h, q_idx, kv_idx):
    return score - score.max()  # depends on every score: flex, one score at a time, would give 0


def _four_args(score, b, h, q_idx):
    return score


@pytest.mark.parametrize(
    ("score_mod", "error", "message"),
    [
        (
            _four_args,
            TypeError,
            "score_mod must be callable(score, b, h, q_idx, kv_idx), got _four_args(score, b, h, q_idx)",
        ),
        (
            lambda s, b, h, q, k: None,
            TypeError,
            "must return a floating tensor shaped like score, <lambda> returned NoneType",
        ),
        (
            lambda s, b, h, q, k: s > 0,
            TypeError,
            "must return a floating tensor shaped like score, <lambda> returned torch.bool",
        ),
        (lambda s, b, h, q, k: s.sum(), ValueError, "shaped like score, (1, 1, 2, 3) here; <lambda> returned ()"),
        (_normalised, ValueError, "score_mod _normalised is not elementwise: score (0, 0) of a (1, 1, 2, 3) grid"),
    ],
    ids=["arity", "none", "bool", "reduces", "not-elementwise"],
)
def test_score_mod_that_cannot_work_is_refused_at_construction(impl_name, score_mod, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        _build(impl_name, score_mod=score_mod)


def test_reassigned_mask_mod_is_checked_too(impl_name: str) -> None:
    module = _build(impl_name)
    with pytest.raises(TypeError, match=re.escape("mask_mod must be callable(b, h, q_idx, kv_idx), got int (3)")):
        module.mask_mod = 3
    with pytest.raises(ValueError, match=r"mask_mod must return a bool tensor broadcastable.*shape \(3,\)"):
        module.mask_mod = lambda b, h, q_idx, kv_idx: torch.ones(3, dtype=torch.bool)
    assert module.mask_mod is attention.masks.causal  # a refused assignment changes nothing
    with pytest.raises(TypeError, match=r"score_mod must be callable.*got str"):
        module.score_mod = "alibi"
    assert module.score_mod is None


@pytest.mark.parametrize(
    ("document_ids", "error", "message"),
    [
        ([[0, 0, 1]], TypeError, "document_ids must be a torch.Tensor, got list"),
        (torch.tensor([[0.0, 0.0, 1.0]]), TypeError, "document_ids must hold integers, got torch.float32"),
        (torch.tensor([[True, True, False]]), TypeError, "document_ids must hold integers, got torch.bool"),
        (torch.tensor([[0, 0]]), ValueError, f"{DOCUMENT_SHAPE}, got (1, 2)"),
        (torch.tensor([0, 0, 1]), ValueError, f"{DOCUMENT_SHAPE}, got (3,)"),
    ],
    ids=["list", "float", "bool", "short", "1-D"],
)
@pytest.mark.attention_needs("masks")  # else the call is refused for passing document_ids at all
def test_bad_document_ids(impl_name: str, document_ids: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        _forward(_build(impl_name), _x(1, 3, 6), document_ids=document_ids)


@pytest.mark.attention_needs("masks")
def test_a_document_mask_made_for_other_ids_is_refused(impl_name: str) -> None:
    # masks.document(ids) as the module's pattern holds its ids: a call they do not cover would
    # index past them deep inside the pattern.
    module = _build(impl_name, mask_mod=attention.masks.document(torch.tensor([[0, 0, 1]])))
    with pytest.raises(ValueError, match=re.escape("holds document_ids of shape (1, 3); this call needs") + ".*(2, 5)"):
        _forward(module, _x(2, 5, 6))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.attention_needs("masks")
def test_document_ids_on_another_device(impl_name: str) -> None:
    module = _build(impl_name).to("cuda")
    with pytest.raises(ValueError, match=r"document_ids is on cpu, x is on cuda"):
        module(_x(1, 3, 6, device="cuda"), document_ids=torch.zeros(1, 3, dtype=torch.long))


def test_gradient_where_the_backend_has_no_backward(impl_name: str) -> None:
    impl = attention.get(impl_name)
    if impl.supports_backward("cpu"):
        pytest.skip(f"{impl_name} has a backward on cpu: nothing to refuse")
    module = _build(impl_name)
    with pytest.raises(NotImplementedError, match=rf"{impl.__name__} cannot compute gradients on cpu.*torch.no_grad"):
        module(_x(1, 3, 6))
    with torch.no_grad():  # the advertised way out works
        assert module(_x(1, 3, 6)).shape == (1, 3, 8)
