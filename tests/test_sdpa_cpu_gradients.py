"""SDPA's gradients on CPU: the allowance it declares, and why (docs/design.md#sdpa-on-cpu-gradients)."""

from __future__ import annotations

import math

import torch

import attention
from attention.accuracy import GRAD_FACTOR, grad_factor, max_error, ratio_rule_violation
from attention.suite.support import Config, build_module, make_input, reference_with_leaves, seeded_randn

#: The draw that first failed the plain 3x rule: low-rank projections (d_in 4), one KV head.
FIRST_FAILED = Config(
    batch=2, tokens=127, num_heads=5, num_kv_heads=1, head_dim=57, d_in=4, qkv_bias=False, seed=131072
)


def test_flash_style_backwards_declare_their_allowances():
    """SDPA on CPU (docs/design.md#sdpa-on-cpu-gradients) and triton everywhere
    (docs/design.md#flash-backward-gradients); the plain backwards none."""
    sdpa, triton = attention.get("sdpa"), attention.get("triton")
    assert grad_factor(sdpa, "cpu") == 3 * GRAD_FACTOR
    assert grad_factor(sdpa, "cuda") == GRAD_FACTOR
    assert grad_factor(triton, "cpu") == grad_factor(triton, "cuda") == 5 * GRAD_FACTOR
    assert all(grad_factor(attention.get(name), "cpu") == GRAD_FACTOR for name in ("from_scratch", "flex"))


def test_the_first_failed_draw_passes_under_the_allowance():
    cfg = FIRST_FAILED
    module = build_module(attention.get("sdpa"), cfg, "cpu", torch.float32)
    x = make_input(cfg, "cpu", torch.float32).requires_grad_()  # (B, T, d_in)
    y = module(x)  # (B, T, d_out)
    upstream = seeded_randn(*y.shape, seed=cfg.seed + 2, device="cpu", dtype=torch.float32)  # (B, T, d_out)
    oracle, oracle_leaves = reference_with_leaves(module, x, torch.float64)
    baseline, baseline_leaves = reference_with_leaves(module, x, torch.float32)
    grads = torch.autograd.grad(y, [x, *module.parameters()], upstream)
    oracle_grads = torch.autograd.grad(oracle, oracle_leaves, upstream.double())
    baseline_grads = torch.autograd.grad(baseline, baseline_leaves, upstream)
    names = ["x", *(name for name, _ in module.named_parameters())]
    factor = grad_factor(type(module), "cpu")
    problems = [
        ratio_rule_violation(*triple, factor=factor, what=f"gradient of {name}")
        for name, *triple in zip(names, grads, oracle_grads, baseline_grads, strict=True)
    ]
    assert problems == [None] * len(names), problems


def test_the_excess_is_the_kernels_along_the_mean_key_not_the_math():
    """The aten backward against the same math in exact arithmetic from its own saved output and
    logsumexp: the latter is within the plain rule, and what the kernel adds lies along the
    attention-weighted mean key (a per-row offset in dS)."""
    cfg = FIRST_FAILED
    b, t, h, d = cfg.batch, cfg.tokens, cfg.num_heads, cfg.head_dim
    module = build_module(attention.get("sdpa"), cfg, "cpu", torch.float32)
    with torch.no_grad():
        q, k, v = module.qkv(make_input(cfg, "cpu", torch.float32)).split([h * d, d, d], dim=-1)  # (B, T, ...)
    q = q.reshape(b, t, h, d).transpose(1, 2).contiguous()  # (B, H, T, hd)
    k = k.reshape(b, t, 1, d).transpose(1, 2).expand(b, h, t, d).contiguous()  # (B, H, T, hd)
    v = v.reshape(b, t, 1, d).transpose(1, 2).expand(b, h, t, d).contiguous()  # (B, H, T, hd)
    d_out = seeded_randn(b, h, t, d, seed=7, device="cpu", dtype=torch.float32)  # (B, H, T, hd)
    visible = torch.ones(t, t, dtype=torch.bool).tril()  # (T, T)
    scale = 1 / math.sqrt(d)

    def plain_dq(dtype: torch.dtype) -> torch.Tensor:
        leaf = q.to(dtype).requires_grad_()
        scores = (leaf @ k.to(dtype).transpose(-2, -1) * scale).masked_fill(~visible, -math.inf)  # (B, H, T, T)
        out = torch.softmax(scores, dim=-1) @ v.to(dtype)  # (B, H, T, hd)
        return torch.autograd.grad(out, leaf, d_out.to(dtype))[0]  # (B, H, T, hd)

    oracle, baseline = plain_dq(torch.float64), plain_dq(torch.float32)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
    dq = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(d_out, q, k, v, out, lse, 0.0, True)[0]
    assert dq.shape == q.shape and torch.isfinite(dq).all()

    qd, kd, vd, dod = q.double(), k.double(), v.double(), d_out.double()
    probs = torch.exp((qd @ kd.transpose(-2, -1) * scale).masked_fill(~visible, -math.inf) - lse.double()[..., None])
    row_term = (dod * out.double()).sum(-1, keepdim=True)  # (B, H, T, 1)
    exact_dq = probs * (dod @ vd.transpose(-2, -1) - row_term) @ kd * scale  # (B, H, T, hd)
    assert ratio_rule_violation(exact_dq, oracle, baseline, factor=GRAD_FACTOR) is None

    mean_key = probs @ kd * scale  # (B, H, T, hd)
    excess = dq.double() - oracle
    along = (excess * mean_key).sum(-1, keepdim=True) / (mean_key * mean_key).sum(-1, keepdim=True)
    rest = excess - along * mean_key  # (B, H, T, hd)
    assert rest.abs().max().item() <= GRAD_FACTOR * max_error(baseline, oracle), "an excess not along the mean key"
