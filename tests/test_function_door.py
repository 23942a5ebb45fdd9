"""The function door: a plain attn(q, k, v) as a module, doing what it declares and refusing the rest by name."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
import torch.nn.functional as F

import attention
from attention import from_function, masks
from attention.accuracy import check_module


def plain_causal(q, k, v):  # (B, H, T, D) -> (B, H, T, D)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _grid(n: int, dim: int) -> torch.Tensor:
    return torch.arange(n).view(*[n if d == dim else 1 for d in range(4)])


def dense_mask_mod(q, k, v, mask_mod):  # (B, H, Tq, D), (B, H, Tk, D) x2 -> (B, H, Tq, D)
    b, h, tq, tk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    visible = mask_mod(_grid(b, 0), _grid(h, 1), _grid(tq, 2), _grid(tk, 3))  # broadcasts to (B, H, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


def native_gqa(q, k, v):  # (B, H, T, D), (B, H_kv, T, D) x2 -> (B, H, T, D)
    assert k.shape[1] < q.shape[1], "a native-GQA function gets H_kv heads"
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize(("fn", "declared"), [(plain_causal, {}), (native_gqa, {"gqa": "native"})])
def test_a_declared_function_matches_the_oracle_with_grouped_heads(fn, declared) -> None:
    module = from_function(fn, **declared)(12, 16, 4, 32, num_kv_heads=2)
    assert check_module(module, torch.randn(2, 9, 12)).passes


def test_undeclared_capabilities_are_refused_by_name() -> None:
    cls = from_function(plain_causal)
    with pytest.raises(ValueError, match=r"plain_causal does not declare the capability 'masks' .* mask_mod=sliding"):
        cls(8, 8, 2, 16, mask_mod=masks.sliding_window(4))
    module = cls(8, 8, 2, 16)
    with pytest.raises(ValueError, match="'kv_cache'"):
        module(torch.randn(1, 4, 8), kv_cache=module.make_kv_cache(1, 16))
    with pytest.raises(ValueError, match=r"'masks' .* a call with document_ids"):
        module(torch.randn(1, 4, 8), document_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="does not support dropout"):
        cls(8, 8, 2, 16, dropout=0.1)
    narrow = from_function(plain_causal, dtypes=[torch.float64])(8, 8, 2, 16)
    with pytest.raises(TypeError, match=r"declares dtypes torch.float64 only, not torch.float32"):
        narrow.float()(torch.randn(1, 4, 8))
    cuda_only = from_function(plain_causal, devices=["cuda"])(8, 8, 2, 16)
    with pytest.raises(ValueError, match=r"declares devices cuda only, not cpu"):
        cuda_only(torch.randn(1, 4, 8))


def test_a_mask_mod_function_gets_the_pattern_shifted_by_the_cache() -> None:
    module = from_function(dense_mask_mod, masks=True, kv_cache=True)(8, 8, 2, 16, mask_mod=masks.sliding_window(3))
    x = torch.randn(2, 10, 8)  # (B, T, d_in)
    cache = module.make_kv_cache(2, 16)
    with torch.no_grad():
        chunked = torch.cat([module(x[:, :4], kv_cache=cache), module(x[:, 4:], kv_cache=cache)], dim=1)
    assert check_module(module, x, chunked).passes


def test_a_pattern_that_misbehaves_inside_the_function_is_named() -> None:
    module = from_function(dense_mask_mod, masks=True)(4, 8, 2, 16)
    module.mask_mod = lambda b, h, q, kv: (q >= kv).float() if q.numel() > 4 else q >= kv
    with pytest.raises(TypeError, match=r"mask_mod must return a bool tensor, got torch\.float32"):
        module(torch.randn(1, 6, 4))
    module.mask_mod = lambda b, h, q, kv: (q >= kv).unsqueeze(0) if q.numel() > 4 else q >= kv
    with pytest.raises(ValueError, match=r"broadcastable to \(1, 2, 6, 6\), got shape \(1, 1, 1, 6, 6\)"):
        module(torch.randn(1, 6, 4))


def test_a_wrong_result_is_refused_naming_the_function() -> None:
    def drops_a_row(q, k, v):
        return plain_causal(q, k, v)[:, :, 1:]

    with pytest.raises(
        ValueError, match=r"drops_a_row\(\) \(from_function\) returned shape \(1, 2, 3, 4\); expected q's shape"
    ):
        from_function(drops_a_row)(8, 8, 2, 16)(torch.randn(1, 4, 8))


def test_a_result_on_another_device_is_refused_naming_the_function() -> None:
    def elsewhere(q, k, v):
        return torch.empty_like(q, device="meta")

    with pytest.raises(
        ValueError, match=r"elsewhere\(\) \(from_function\) returned a tensor on meta for queries on cpu"
    ):
        from_function(elsewhere)(8, 8, 2, 16)(torch.randn(1, 4, 8))


def test_the_class_is_cached_and_modules_pickle() -> None:
    cls = from_function(plain_causal)
    assert from_function(plain_causal) is cls
    module = cls(8, 8, 2, 16)
    x = torch.randn(1, 5, 8)
    loaded = pickle.loads(pickle.dumps(module))
    assert type(loaded) is cls
    assert torch.equal(loaded(x), module(x))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"masks": 1}, TypeError, "masks must be a bool"),
        ({"gqa": "grouped"}, ValueError, "gqa must be one of"),
        ({"empty_rows": "nan"}, ValueError, "empty_rows must be one of"),
        ({"empty_rows": ["zeros"]}, TypeError, r"empty_rows must be one of \('zeros', 'any'\), got list"),
        ({"empty_rows": None}, TypeError, "empty_rows must be one of .* got NoneType"),
        ({"dtypes": [[torch.float32]]}, TypeError, r"dtypes must be a collection such as .* got \[\[torch.float32\]\]"),
        ({"dtypes": [torch.int32]}, TypeError, "dtypes must be floating torch dtypes"),
        ({"dtypes": torch.float16}, TypeError, r"dtypes must be a collection such as \(torch.bfloat16,\)"),
        ({"devices": ["cuda:0"]}, TypeError, "devices must be device types"),
        ({"devices": "cpu"}, TypeError, r"devices must be a collection such as \('cuda',\), got 'cpu'"),
        ({"devices": ["gpu"]}, TypeError, r"devices must be device types .* got \['gpu'\]"),
        ({"devices": ["CPU"]}, TypeError, r"devices must be device types .* got \['CPU'\]"),
        ({"compiled_on": ["gpu"]}, TypeError, "compiled_on must be device types such as"),
        ({"compiled_on": "cuda"}, TypeError, "compiled_on must be a collection such as"),
        ({"compiled_on": ["cuda:0"]}, TypeError, "compiled_on must be device types such as"),
        ({"compiled_on": [None]}, TypeError, "compiled_on must be device types such as"),
    ],
)
def test_bad_declarations_are_refused(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        from_function(plain_causal, **kwargs)


def test_a_function_that_cannot_take_its_declared_call_is_refused_at_once() -> None:
    def two_args(q, k):
        return q

    # Python's bind error said "too many positional arguments" of a function taking too few.
    with pytest.raises(TypeError, match=r"^function must take \(q, k, v\) as declared; two_args\(q, k\) cannot \("):
        from_function(two_args)
    with pytest.raises(TypeError, match=r"mask_mod=...\) as declared; plain_causal\(q, k, v\) cannot \(.*'mask_mod'"):
        from_function(plain_causal, masks=True)
    with pytest.raises(TypeError, match=r"must take \(q, k, v, q_offset=..., dropout_p=...\)"):
        from_function(plain_causal, kv_cache=True, dropout=True)
    from_function(lambda q, k, v, **kwargs: plain_causal(q, k, v), masks=True, dropout=True)


def test_a_function_compiled_per_shape_gets_the_suites_menu_of_shapes_there_only() -> None:
    from attention.suite import support

    cls = from_function(plain_causal, compiled_on=["cuda"])
    assert cls.compiles_per_shape("cuda") and not cls.compiles_per_shape("cpu")
    assert support.sizing_for(cls, "cuda") is support.COMPILED
    assert support.sizing_for(cls, "cpu") is support.FULL
    assert not from_function(plain_causal).compiles_per_shape("cuda")
    loaded = pickle.loads(pickle.dumps(cls(8, 8, 2, 16)))
    assert type(loaded) is cls


def test_a_class_is_not_a_function() -> None:
    with pytest.raises(TypeError, match="plain callable"):
        from_function(attention.MHAPyTorchScaledDotProduct)


def test_a_function_declared_without_backward_refuses_gradients_by_name() -> None:
    module = from_function(plain_causal, backward=False)(8, 8, 2, 16)
    x = torch.randn(1, 5, 8)  # (B, T, d_in)
    with pytest.raises(
        NotImplementedError, match=r"plain_causal cannot compute gradients on cpu: it declares no backward"
    ):
        module(x)
    with torch.no_grad():
        assert module(x).shape == (1, 5, 8)


def test_a_decorator_that_takes_the_declared_keyword_is_accepted() -> None:
    """``inspect.signature`` follows ``__wrapped__`` to the inner function; the wrapper's own
    signature, which takes ``dropout_p``, is the call the module makes."""

    @functools.wraps(plain_causal)
    def with_dropout(q, k, v, *, dropout_p=0.0):
        return plain_causal(q, k, v)

    module = from_function(with_dropout, dropout=True)(8, 8, 2, 16)
    assert module(torch.randn(1, 5, 8)).shape == (1, 5, 8)


def test_gradients_that_skip_attention_are_not_refused() -> None:
    """Only what q, k and v are made from needs attention's backward: training the output
    projection alone of a backward-less module is allowed."""
    module = from_function(plain_causal, backward=False)(8, 8, 2, 16)
    module.qkv.requires_grad_(False)
    module(torch.randn(1, 5, 8)).sum().backward()
    assert module.proj.weight.grad is not None


def forward_only(q, k, v):  # (B, H, T, D) -> (B, H, T, D), outside autograd
    with torch.no_grad():
        return plain_causal(q, k, v)


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):  # (B, H, T, D) -> (B, H, T, D)
        return plain_causal(q, k, v)


def no_backward(q, k, v):  # (B, H, T, D) -> (B, H, T, D), an autograd.Function without a backward
    return NoBackward.apply(q, k, v)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (forward_only, r"forward_only\(\) \(from_function\) returned a tensor outside autograd \(no grad_fn\)"),
        (
            no_backward,
            r"no_backward\(\) \(from_function\) returned the output of NoBackward, a torch.autograd.Function "
            r"with no backward",
        ),
    ],
)
def test_a_function_with_no_backward_declared_with_one_is_refused_at_the_forward(fn, match) -> None:
    """A forward-only kernel under the default ``backward=True`` would fail later, at ``backward()``,
    as a bare autograd error (or not at all, its weights never learning); the forward names the
    declaration that fixes it, and without gradients the function runs."""
    module = from_function(fn)(8, 8, 2, 16)
    x = torch.randn(1, 5, 8)  # (B, T, d_in)
    with pytest.raises(TypeError, match=match) as refused:
        module(x)
    assert "from_function(..., backward=False)" in str(refused.value)
    same = from_function(plain_causal)(8, 8, 2, 16)
    same.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(module(x), same(x), rtol=0, atol=0)


def test_a_subclass_with_no_backward_is_told_how_to_declare_it() -> None:
    class Detached(attention.AttentionBase):
        def _attend(self, q, k, v, *, q_offset, document_ids):  # (B, H, T, hd) -> (B, H, T, hd)
            return plain_causal(q, k, v).detach()

    with pytest.raises(
        TypeError, match=r"Detached._attend returned a tensor outside autograd .*\(override supports_backward\(\)"
    ):
        Detached(8, 8, 2, 16)(torch.randn(1, 5, 8))
