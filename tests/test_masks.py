"""Attention patterns: one ``mask_mod`` definition, the same answer from every implementation.

* Each pattern (and combination) matches the float64 oracle by the ratio rule in every
  implementation, at lengths on and off the 128-wide block grid.
* Each pattern's own law holds at module level: perturbing a token changes only the rows that
  may see it (nothing leaks out of a window, across a document boundary, or between sequences
  of a batch), and prefix tokens see each other both ways.
* Rows with no visible key give zeros (the module output is then ``proj.bias``), never NaN.
* ``dense_mask`` has the documented shapes and the literal definitions of docs/design.md#mask-definitions; the factories
  validate their arguments.
* A ``mask_mod`` assigned to a module that has already run is the one its next call uses.
* ``per_document`` gives every packed document the pattern on its own positions (each its own
  prefix), as running each document alone does; ``sliding_window``'s count is stated against
  attention-gym's and FlashAttention's.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import or_masks

import attention
from attention import masks
from attention.masks import and_masks, dense_mask

from .support import (
    CUDA,
    DEVICE_DTYPES,
    DEVICES,
    IMPL_NAMES,
    assert_module_matches_oracle,
    grad_context,
    mask_for,
    random_document_ids,
)

PATTERNS = [
    "causal",
    "sliding_window",
    "prefix_lm",
    "document",
    "document+sliding_window",
    "document+prefix_lm",
    "sliding_window|sinks",  # a window plus the first keys always visible (attention sinks)
]


def sinks(count: int) -> masks.MaskMod:
    """The first ``count`` keys, visible to every later query."""

    def sinks_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx < count) & (kv_idx <= q_idx)

    return sinks_mask


def pattern_parts(kind: str, window: int, prefix_len: int) -> tuple[masks.MaskMod, bool]:
    """The module's ``mask_mod`` for ``kind`` and whether document ids go with it."""
    base = kind.removeprefix("document+")
    if base == "sliding_window|sinks":
        mask_mod = or_masks(masks.sliding_window(window), sinks(prefix_len))
    else:
        mask_mod = mask_for(base, window, prefix_len)
    return mask_mod, kind.startswith("document")


@st.composite
def cases(draw: st.DrawFn, device: str, kinds: list[str] = PATTERNS) -> dict:
    """A pattern and a problem around it; on CUDA sizes come from a short menu so compiled flex
    kernels are reused across examples, on CPU they are drawn freely (block edges favoured)."""
    kind = draw(st.sampled_from(kinds))
    if device == "cuda":
        batch, num_heads, head_dim, d_in = 2, 4, 16, 24
        length = draw(st.sampled_from([1, 77, 129, 259]))
        num_kv_heads = draw(st.sampled_from([4, 1]))
        window = draw(st.sampled_from([1, 64]))
        prefix_len = draw(st.sampled_from([0, 100]))
    else:
        batch = draw(st.integers(1, 3))
        num_heads = draw(st.sampled_from([1, 2, 4]))
        num_kv_heads = draw(st.sampled_from([n for n in (1, 2, 4) if num_heads % n == 0]))
        head_dim = draw(st.sampled_from([8, 16]))
        d_in = draw(st.integers(4, 32))
        length = draw(st.one_of(st.sampled_from([1, 127, 129, 200]), st.integers(1, 160)))
        window = draw(st.integers(1, length + 1))
        prefix_len = draw(st.integers(0, length + 1))
    return dict(
        kind=kind,
        batch=batch,
        length=length,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        d_in=d_in,
        window=window,
        prefix_len=prefix_len,
        seed=draw(st.integers(0, 2**16)),
    )


def build(impl_name: str, case: dict, device: str, dtype: torch.dtype, mask_mod: masks.MaskMod):
    """The module for ``case`` (seeded weights) and its input ``(B, T, d_in)`` from ``torch.randn``."""
    torch.manual_seed(case["seed"])
    module = attention.get(impl_name)(
        case["d_in"],
        case["num_heads"] * case["head_dim"],
        case["num_heads"],
        case["length"],
        num_kv_heads=case["num_kv_heads"],
        mask_mod=mask_mod,
    )
    module = module.to(device=device, dtype=dtype).eval()
    x = torch.randn(case["batch"], case["length"], case["d_in"]).to(device, dtype)  # (B, T, d_in)
    return module, x


def problem(impl_name: str, case: dict, device: str, dtype: torch.dtype):
    mask_mod, with_documents = pattern_parts(case["kind"], case["window"], case["prefix_len"])
    module, x = build(impl_name, case, device, dtype, mask_mod)
    ids = random_document_ids(case["batch"], case["length"], case["seed"]).to(device) if with_documents else None
    return module, x, ids


# -- every pattern, every implementation, against the oracle ----------------------------------


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@given(data=st.data())
def test_pattern_matches_oracle(data, device, dtype, impl_name):
    case = data.draw(cases(device), label="case")
    module, x, ids = problem(impl_name, case, device, dtype)
    with torch.no_grad():
        out = module(x, document_ids=ids)  # (B, T, d_out)
    assert_module_matches_oracle(module, x, out, document_ids=ids, what=f"{case['kind']} output")


# -- each pattern's own law --------------------------------------------------------------------


def unchanged_tolerance(out: torch.Tensor) -> float:
    """Masked keys contribute exact zeros; allow a few ulps for kernels that reorder sums."""
    return 8 * torch.finfo(out.dtype).eps * out.abs().max().item()


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_perturbing_a_hidden_token_changes_nothing(data, device, impl_name):
    """Perturb token ``j``: every other row that cannot see key ``j`` stays as it was (nothing
    outside a window, across a document boundary or in another sequence of the batch leaks),
    and the rows that can see it do change (the pattern is not vacuous)."""
    case = data.draw(cases(device), label="case")
    module, x, ids = problem(impl_name, case, device, torch.float32)
    b = data.draw(st.integers(0, case["batch"] - 1), label="perturbed sequence")
    j = data.draw(st.integers(0, case["length"] - 1), label="perturbed token")
    perturbed = x.clone()
    perturbed[b, j] += torch.randn(case["d_in"]).to(device)  # (d_in,)
    with torch.no_grad():
        out = module(x, document_ids=ids)  # (B, T, d_out)
        out2 = module(perturbed, document_ids=ids)  # (B, T, d_out)

    pattern = module._pattern(ids)
    visible = dense_mask(pattern, case["batch"], case["num_heads"], case["length"], case["length"], device)
    sees_j = torch.zeros(case["batch"], case["length"], dtype=torch.bool, device=device)  # (B, T)
    sees_j[b] = visible[min(b, visible.shape[0] - 1), :, :, j].any(dim=0)  # any head of row i sees key j
    sees_j[b, j] = True  # row j's own query moved too
    change = (out2 - out).abs().amax(dim=-1)  # (B, T)
    tol = unchanged_tolerance(out)
    leaked = (change > tol) & ~sees_j
    assert not leaked.any(), (
        f"{case['kind']}: perturbing token {j} of sequence {b} changed rows that cannot see it: "
        f"{leaked.nonzero().tolist()[:8]} (max change {change[leaked].max().item():.3e} > {tol:.3e})"
    )
    others = sees_j.clone()
    others[b, j] = False
    if others.any():
        assert change[others].max() > 10 * tol, (
            f"{case['kind']}: no row that sees token {j} changed when it was perturbed"
        )


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_documents_never_see_each_other(data, device, impl_name):
    """Perturb every token of one document: rows of every other document are unchanged."""
    kinds = ["document", "document+sliding_window", "document+prefix_lm"]
    case = data.draw(cases(device, kinds), label="case")
    module, x, ids = problem(impl_name, case, device, torch.float32)
    b = data.draw(st.integers(0, case["batch"] - 1), label="sequence")
    doc = ids[b, data.draw(st.integers(0, case["length"] - 1), label="a token of the document")]
    inside = ids == doc  # (B, T)
    inside[:b] = False
    inside[b + 1 :] = False
    perturbed = x + inside.unsqueeze(-1) * torch.randn_like(x)  # (B, T, d_in)
    with torch.no_grad():
        out = module(x, document_ids=ids)  # (B, T, d_out)
        out2 = module(perturbed, document_ids=ids)  # (B, T, d_out)
    change = (out2 - out).abs().amax(dim=-1)  # (B, T)
    tol = unchanged_tolerance(out)
    leaked = (change > tol) & ~inside
    assert not leaked.any(), (
        f"{case['kind']}: document {doc} of sequence {b} leaked into rows {leaked.nonzero().tolist()[:8]}"
    )


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize("device", DEVICES)
@given(length=st.integers(3, 40), prefix_len=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_prefix_tokens_see_each_other(length, prefix_len, seed, device, impl_name):
    """Bidirectional prefix: perturbing the last prefix token moves every earlier prefix row;
    after the prefix, the pattern is causal (a later token never moves an earlier row)."""
    prefix_len = min(prefix_len, length)
    case = dict(batch=1, length=length, num_heads=2, num_kv_heads=2, head_dim=16, d_in=8, seed=seed)
    module, x = build(impl_name, case, device, torch.float32, masks.prefix_lm(prefix_len))
    for j in (prefix_len - 1, length - 1):  # the last prefix token; the last token
        perturbed = x.clone()
        perturbed[0, j] += 3 * torch.randn(8).to(device)  # (d_in,)
        with torch.no_grad():
            out = module(x)  # (1, T, d_out)
            change = (module(perturbed) - out).abs().amax(dim=-1)[0]  # (T,)
        # Row i sees key j when j is in the prefix (both ways) or at or before i (causal).
        expected = torch.tensor([i == j or j < prefix_len or j <= i for i in range(length)])
        moved = change.cpu() > unchanged_tolerance(out)
        assert torch.equal(moved, expected), (
            f"prefix_lm({prefix_len}), T={length}, perturbed token {j}: rows moved {moved.nonzero().flatten().tolist()}"
        )


# -- rows with no visible key ------------------------------------------------------------------


def hide_rows(hidden: int, every: int) -> masks.MaskMod:
    """Causal, except that the first ``hidden`` rows and every ``every``-th row see nothing."""

    def hide_rows_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (q_idx >= hidden) & (q_idx % every != every - 1)

    return hide_rows_mask


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_rows_with_no_visible_key_are_zero(data, device, dtype, impl_name):
    if device == "cuda":  # a short menu: each new pattern is a new compile of flex's kernels
        length, hidden, every = data.draw(st.sampled_from([5, 130])), 3, 4
    else:
        length = data.draw(st.sampled_from([1, 5, 33, 130]), label="length")
        hidden = data.draw(st.integers(0, 4), label="hidden first rows")
        every = data.draw(st.integers(2, 7), label="period of hidden rows")
    documents = data.draw(st.booleans(), label="documents")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    impl = attention.get(impl_name)
    case = dict(batch=2, length=length, num_heads=4, num_kv_heads=2, head_dim=16, d_in=8, seed=seed)
    module, x = build(impl_name, case, device, dtype, hide_rows(hidden, every))
    ids = random_document_ids(2, length, seed).to(device) if documents else None
    x.requires_grad_(impl.supports_backward(device))
    with grad_context(impl, device):
        out = module(x, document_ids=ids)  # (B, T, d_out)
        if out.requires_grad:
            out.sum().backward()

    rows = torch.arange(length)
    empty = (rows < hidden) | (rows % every == every - 1)  # (T,)
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    bias = module.proj.bias.detach().expand(2, int(empty.sum()), -1)  # (B, empty rows, d_out)
    assert torch.equal(out.detach()[:, empty.to(device)], bias), "a row with no visible key is not zero context"
    assert_module_matches_oracle(module, x.detach(), out.detach(), document_ids=ids)
    if x.grad is not None:
        assert torch.isfinite(x.grad).all(), "NaN or inf in the input gradient"
        assert all(torch.isfinite(p.grad).all() for p in module.parameters()), "NaN or inf in a weight gradient"

    # The same rows, decoded one token at a time through the cache.
    cache = module.make_kv_cache(2, length)
    with torch.no_grad():
        steps = [
            module(x[:, i : i + 1].detach(), kv_cache=cache, document_ids=None if ids is None else ids[:, : i + 1])
            for i in range(min(length, 6))
        ]  # each (B, 1, d_out)
    decoded = torch.cat(steps, dim=1)  # (B, min(T, 6), d_out)
    assert torch.isfinite(decoded).all(), "NaN or inf in a decoded row"
    assert torch.equal(decoded[:, empty[: decoded.shape[1]].to(device)], bias[:, : int(empty[:6].sum())])


# -- dense_mask: shapes and the literal definitions ---------------------------------------------


def literal(kind: str, q: int, kv: int, window: int, prefix_len: int) -> bool:
    """docs/design.md#mask-definitions, one pair at a time."""
    if kind == "causal":
        return kv <= q
    if kind == "sliding_window":
        return 0 <= q - kv < window
    return kv < prefix_len or kv <= q  # prefix_lm


@given(
    kind=st.sampled_from(["causal", "sliding_window", "prefix_lm"]),
    q_len=st.integers(1, 20),
    extra_keys=st.integers(0, 20),
    window=st.integers(1, 25),
    prefix_len=st.integers(0, 25),
)
def test_dense_mask_matches_literal_definition(kind, q_len, extra_keys, window, prefix_len):
    """A query chunk at absolute offset ``kv_len - q_len`` (continuing a cache) is masked by its
    absolute position; patterns reading neither b nor h come out ``(1, 1, Tq, Tk)``."""
    mask_mod, _ = pattern_parts(kind, window, prefix_len)
    kv_len = q_len + extra_keys
    mask = dense_mask(mask_mod, 3, 4, q_len, kv_len, "cpu", q_offset=extra_keys)
    assert mask.shape == (1, 1, q_len, kv_len) and mask.dtype == torch.bool
    want = torch.tensor(
        [[literal(kind, extra_keys + i, j, window, prefix_len) for j in range(kv_len)] for i in range(q_len)]
    )  # (Tq, Tk)
    assert torch.equal(mask[0, 0], want)


def test_dense_mask_shapes_follow_what_the_pattern_reads():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])  # (B=2, T=5)

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (h == 0)

    assert dense_mask(masks.causal, 2, 3, 4, 5, "cpu", q_offset=1).shape == (1, 1, 4, 5)
    assert dense_mask(masks.document(ids), 2, 3, 5, 5, "cpu").shape == (2, 1, 5, 5)
    assert dense_mask(per_head, 2, 3, 4, 4, "cpu").shape == (1, 3, 4, 4)
    both = dense_mask(and_masks(per_head, masks.document(ids)), 2, 3, 5, 5, "cpu")
    assert both.shape == (2, 3, 5, 5)
    # document: same id only, both ways (causality is the other mask's job)
    assert torch.equal(dense_mask(masks.document(ids), 2, 1, 5, 5, "cpu")[:, 0], ids[:, :, None] == ids[:, None, :])
    # a chunk continuing a cache reads the ids of its absolute positions
    tail = dense_mask(masks.document(ids), 2, 1, 2, 5, "cpu", q_offset=3)  # (B, 1, 2, 5)
    assert torch.equal(tail[:, 0], ids[:, 3:, None] == ids[:, None, :])


def test_degenerate_parameters_reduce_to_causal():
    causal = dense_mask(masks.causal, 1, 1, 9, 9, "cpu")
    assert torch.equal(dense_mask(masks.sliding_window(9), 1, 1, 9, 9, "cpu"), causal)
    assert torch.equal(dense_mask(masks.sliding_window(100), 1, 1, 9, 9, "cpu"), causal)
    assert torch.equal(dense_mask(masks.prefix_lm(0), 1, 1, 9, 9, "cpu"), causal)
    assert torch.equal(dense_mask(masks.prefix_lm(1), 1, 1, 9, 9, "cpu"), causal)
    assert dense_mask(masks.prefix_lm(9), 1, 1, 9, 9, "cpu").all()
    assert torch.equal(dense_mask(masks.sliding_window(1), 1, 1, 9, 9, "cpu")[0, 0], torch.eye(9, dtype=torch.bool))


# -- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "value", "error", "message"),
    [
        (masks.sliding_window, 0, ValueError, r"window must be >= 1, got 0"),
        (masks.sliding_window, -3, ValueError, r"window must be >= 1, got -3"),
        (masks.sliding_window, 2.0, TypeError, r"window must be an int, got float"),
        (masks.sliding_window, True, TypeError, r"window must be an int, got bool"),
        (masks.sliding_window, "4", TypeError, r"window must be an int, got str"),
        (masks.prefix_lm, -1, ValueError, r"prefix_len must be >= 0, got -1"),
        (masks.prefix_lm, 1.5, TypeError, r"prefix_len must be an int, got float"),
        (masks.prefix_lm, None, TypeError, r"prefix_len must be an int, got NoneType"),
        (masks.prefix_lm, False, TypeError, r"prefix_len must be an int, got bool"),
    ],
)
def test_factories_validate_arguments(factory, value, error, message):
    with pytest.raises(error, match=message):
        factory(value)


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_bad_mask_mod_and_document_ids_rejected(impl_name):
    impl = attention.get(impl_name)
    with pytest.raises(TypeError, match=r"mask_mod must be callable.*got int"):
        impl(8, 16, 2, 8, mask_mod=3)
    module = impl(8, 16, 2, 8)
    x = torch.randn(2, 5, 8)  # (B, T, d_in)
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"document_ids must hold integers, got torch.float32"):
            module(x, document_ids=torch.zeros(2, 5))
        with pytest.raises(TypeError, match=r"document_ids must hold integers, got torch.bool"):
            module(x, document_ids=torch.zeros(2, 5, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"document_ids must have shape .*\(2, 5\), got \(2, 4\)"):
            module(x, document_ids=torch.zeros(2, 4, dtype=torch.long))
        with pytest.raises(TypeError, match=r"document_ids must be a torch.Tensor, got list"):
            module(x, document_ids=[[0] * 5] * 2)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
def test_document_ids_on_another_device_rejected():
    module = attention.get("sdpa")(8, 16, 2, 8)
    with pytest.raises(ValueError, match=r"document_ids is on cuda.*x is on cpu"), torch.no_grad():
        module(torch.randn(1, 4, 8), document_ids=torch.zeros(1, 4, dtype=torch.long, device="cuda"))


# -- one module, calls that differ: cached masks must not go stale ---------------------------------


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@pytest.mark.parametrize("device", DEVICES)
def test_one_module_many_calls(device, impl_name):
    """New document ids, a new batch size, a new length: each call is masked afresh (flex caches
    BlockMasks; a mask built for another call must never be reused)."""

    def odd_sequences_see_one_key_less(b, h, q_idx, kv_idx):  # reads b: built per batch
        return (q_idx >= kv_idx) & ((b % 2 == 0) | (kv_idx > 0) | (q_idx == 0))

    for mask_mod in (masks.causal, odd_sequences_see_one_key_less):
        case = dict(batch=2, length=12, num_heads=2, num_kv_heads=1, head_dim=16, d_in=8, seed=7)
        module, _ = build(impl_name, case, device, torch.float32, mask_mod)
        for batch, length, ids_seed in ((2, 12, 0), (2, 12, 1), (3, 12, None), (1, 12, None), (3, 7, 2)):
            x = torch.randn(batch, length, 8).to(device)  # (B, T, d_in)
            ids = None if ids_seed is None else random_document_ids(batch, length, ids_seed).to(device)
            with torch.no_grad():
                out = module(x, document_ids=ids)  # (B, T, d_out)
            assert_module_matches_oracle(module, x, out, document_ids=ids, what=f"call B={batch} T={length}")


# -- a new mask_mod on a module that has already run: the next call uses it ----------------------


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@given(data=st.data())
def test_reassigned_mask_mod_is_used(data, impl_name):
    """Assign ``module.mask_mod`` after calls with another pattern: every call matches the oracle
    for the pattern assigned at that moment (flex caches BlockMasks and compile keys per pattern;
    none may outlive the assignment), switching back included."""
    kinds = ["causal", "sliding_window", "prefix_lm", "sliding_window|sinks"]
    case = data.draw(cases("cpu", kinds), label="case")
    order = data.draw(st.lists(st.sampled_from(kinds), min_size=2, max_size=4), label="patterns in turn")
    windows = data.draw(st.lists(st.integers(1, case["length"] + 1), min_size=4, max_size=4), label="windows")
    module, x = build(impl_name, case, "cpu", torch.float32, masks.causal)
    for i, kind in enumerate(order):
        module.mask_mod, _ = pattern_parts(kind, windows[i], case["prefix_len"])
        with torch.no_grad():
            out = module(x)  # (B, T, d_out)
        assert_module_matches_oracle(module, x, out, what=f"call {i} with {kind} after {order[:i]}")


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_reassigned_mask_mod_changes_the_output(impl_name):
    """Not vacuous: the same input gives a different answer once the pattern is changed."""
    case = dict(batch=2, length=20, num_heads=2, num_kv_heads=2, head_dim=8, d_in=8, seed=3)
    module, x = build(impl_name, case, "cpu", torch.float32, masks.causal)
    with torch.no_grad():
        before = module(x)  # (B, T, d_out)
        module.mask_mod = masks.sliding_window(2)
        after = module(x)  # (B, T, d_out)
    assert (after[:, 2:] - before[:, 2:]).abs().amax() > 1e-3  # rows that see more than 2 keys moved
    assert torch.equal(after[:, :2], before[:, :2])  # rows with at most 2 keys did not


# -- per_document: a pattern on document-local positions ----------------------------------------


def literal_per_document(kind: str, ids: torch.Tensor, window: int, prefix_len: int) -> torch.Tensor:
    """``(B, T, T)``: the pattern applied to each document alone, pair by pair, in Python."""
    batch, length = ids.shape
    want = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        row = ids[b].tolist()
        for q in range(length):
            for kv in range(length):
                if row[q] != row[kv]:
                    continue
                start = row.index(row[q])  # where this document begins
                want[b, q, kv] = literal(kind, q - start, kv - start, window, prefix_len)
    return want


@given(
    kind=st.sampled_from(["causal", "sliding_window", "prefix_lm"]),
    batch=st.integers(1, 3),
    length=st.integers(1, 24),
    window=st.integers(1, 6),
    prefix_len=st.integers(0, 6),
    seed=st.integers(0, 2**16),
    q_offset=st.integers(0, 23),
)
def test_per_document_matches_literal_loop(kind, batch, length, window, prefix_len, seed, q_offset):
    """Every document gets the pattern on its own positions (its own prefix, its own window), and
    no query sees another document; a chunk at an offset is masked by its absolute rows."""
    q_offset = min(q_offset, length - 1)
    ids = random_document_ids(batch, length, seed)  # (B, T)
    mask_mod, _ = pattern_parts(kind, window, prefix_len)
    got = dense_mask(masks.per_document(mask_mod, ids), batch, 2, length - q_offset, length, "cpu", q_offset=q_offset)
    want = literal_per_document(kind, ids, window, prefix_len)[:, q_offset:]  # (B, Tq, T)
    assert got.shape == (batch, 1, length - q_offset, length)
    assert torch.equal(got[:, 0], want)


def test_per_document_differs_from_absolute_prefix():
    """The documented difference: ``and_masks(prefix_lm(p), document(ids))`` gives a bidirectional
    prefix to the first document only; ``per_document(prefix_lm(p), ids)`` to every document."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])  # (1, 7): documents at 0 and 3
    absolute = dense_mask(and_masks(masks.prefix_lm(2), masks.document(ids)), 1, 1, 7, 7, "cpu")[0, 0]
    local = dense_mask(masks.per_document(masks.prefix_lm(2), ids), 1, 1, 7, 7, "cpu")[0, 0]
    assert absolute[0, 1] and local[0, 1]  # document 0: query 0 sees prefix key 1 in both
    assert not absolute[3, 4] and local[3, 4]  # document 1: only per_document shows key 4 to query 3
    # causal and sliding windows depend on q - kv alone: there the two agree
    for mask_mod in (masks.causal, masks.sliding_window(2)):
        per_doc = dense_mask(masks.per_document(mask_mod, ids), 1, 1, 7, 7, "cpu")
        assert torch.equal(per_doc, dense_mask(and_masks(mask_mod, masks.document(ids)), 1, 1, 7, 7, "cpu"))


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_per_document_module_equals_each_document_alone(data, impl_name):
    """Packed prefix-LM: a module with ``per_document(prefix_lm(p), ids)`` gives each document's
    rows what the module gives that document run alone with ``prefix_lm(p)`` (ratio rule against
    the oracle of the lone run), in one call and through the KV cache with chunk ends outside
    every prefix."""
    batch = data.draw(st.integers(1, 2), label="batch")
    length = data.draw(st.integers(2, 40), label="length")
    prefix_len = data.draw(st.integers(0, 6), label="prefix_len")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    ids = random_document_ids(batch, length, seed)  # (B, T)
    case = dict(batch=batch, length=length, num_heads=2, num_kv_heads=1, head_dim=8, d_in=6, seed=seed)
    module, x = build(impl_name, case, "cpu", torch.float32, masks.per_document(masks.prefix_lm(prefix_len), ids))
    alone, _ = build(impl_name, case, "cpu", torch.float32, masks.prefix_lm(prefix_len))
    alone.load_state_dict(module.state_dict())

    # A chunk may end where no document is inside its prefix: a document start, or past the prefix.
    starts = masks.document_starts(ids)  # (B, T)
    local = torch.arange(length) - starts  # (B, T)
    cuts = [t for t in range(1, length) if not ((local[:, t] > 0) & (local[:, t] < prefix_len)).any()]
    cut = data.draw(st.sampled_from(cuts), label="chunk end") if cuts else length
    cache = module.make_kv_cache(batch, length)
    with torch.no_grad():
        out = module(x)  # (B, T, d_out)
        cached = torch.cat([module(x[:, :cut], kv_cache=cache), module(x[:, cut:], kv_cache=cache)], dim=1)
    assert_module_matches_oracle(module, x, out, what="per-document prefix_lm output")
    assert_module_matches_oracle(module, x, cached, what=f"per-document prefix_lm output cached at {cut}")
    for b in range(batch):
        for doc in ids[b].unique().tolist():
            rows = (ids[b] == doc).nonzero().flatten()  # (T_doc,) contiguous
            piece = x[b : b + 1, rows]  # (1, T_doc, d_in)
            for got in (out, cached):
                assert_module_matches_oracle(alone, piece, got[b : b + 1, rows], what=f"document {doc} of row {b}")


@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def test_per_document_cache_refuses_a_split_prefix_and_short_ids(impl_name):
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])  # (1, 8): the second document starts at 3
    case = dict(batch=1, length=8, num_heads=2, num_kv_heads=2, head_dim=8, d_in=6, seed=0)
    module, x = build(impl_name, case, "cpu", torch.float32, masks.per_document(masks.prefix_lm(3), ids))
    cache = module.make_kv_cache(1, 8)
    with torch.no_grad():
        module(x[:, :4], kv_cache=cache)  # ends at 4, inside document 1's prefix (3, 4, 5)
        with pytest.raises(ValueError, match=r"cache ends at 4, inside a document's prefix"):
            module(x[:, 4:], kv_cache=cache)
        assert cache.pos == 4
        with pytest.raises(ValueError, match=r"holds document_ids of shape \(1, 8\).*\(2, 8\)"):
            module(torch.randn(2, 8, 6))


def test_per_document_validates_arguments():
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=r"mask_mod must be callable.*got int"):
        masks.per_document(3, ids)
    with pytest.raises(TypeError, match=r"document_ids must be a torch.Tensor, got list"):
        masks.per_document(masks.causal, [[0, 0]])
    with pytest.raises(TypeError, match=r"document_ids must hold integers, got torch.float32"):
        masks.per_document(masks.causal, ids.float())
    with pytest.raises(ValueError, match=r"document_ids must have shape \(batch, tokens\), got \(4,\)"):
        masks.per_document(masks.causal, ids[0])


@pytest.mark.parametrize(
    ("result", "shape"),
    [
        (lambda visible: visible[..., :2, :], "(1, 1, 2, 7)"),  # rows dropped
        (lambda visible: visible.expand(1, 3, 5, 7), "(1, 3, 5, 7)"),  # heads made up
        (lambda visible: visible[None], "(1, 1, 1, 5, 7)"),  # a fifth dimension
    ],
    ids=["rows", "heads", "five-d"],
)
def test_dense_mask_refuses_a_wrong_shape_on_a_real_grid(result, shape):
    """A pattern may pass the construction probe (a 2 x 2 grid) and misbehave on a real grid; the
    dense paths (from-scratch, SDPA, flex's probe) then raise naming mask_mod and the shapes,
    instead of failing in torch or broadcasting into another mask."""

    def misbehaving(b, h, q_idx, kv_idx):
        return result(q_idx >= kv_idx)

    with pytest.raises(ValueError, match=re.escape(f"broadcastable to (2, 2, 5, 7), got shape {shape}")):
        dense_mask(misbehaving, 2, 2, 5, 7, "cpu", q_offset=2)


def test_sliding_window_convention():
    """``sliding_window(w)`` counts the query's own key: ``w`` keys, which attention-gym's
    ``generate_sliding_window(w - 1)`` and FlashAttention's ``window_size=(w - 1, 0)`` also show."""
    for w in range(1, 6):
        mask = dense_mask(masks.sliding_window(w), 1, 1, 12, 12, "cpu")[0, 0]  # (T, T)
        assert mask.sum(dim=-1)[w:].eq(w).all()  # rows with a full window see exactly w keys
        q, kv = torch.arange(12).view(-1, 1), torch.arange(12).view(1, -1)
        attention_gym = (q >= kv) & (q - kv <= w - 1)  # generate_sliding_window(w - 1)
        assert torch.equal(mask, attention_gym)


# -- patterns that hold tensors, combine, or come from functools.partial ------------------------


def test_per_document_is_frozen_and_keeps_its_own_ids():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    pattern = masks.per_document(masks.prefix_lm(2), ids)
    before = dense_mask(pattern, 1, 1, 6, 6, "cpu").clone()  # (1, 1, 6, 6)
    ids.fill_(0)  # the caller reuses its buffer for the next batch
    assert torch.equal(dense_mask(pattern, 1, 1, 6, 6, "cpu"), before)
    with pytest.raises(AttributeError, match="frozen"):
        pattern.document_ids = ids


def test_and_masks_keeps_the_bidirectional_prefix_so_a_cache_cannot_split_it():
    ids = torch.zeros(1, 8, dtype=torch.long)  # (1, 8)
    combined = masks.and_masks(masks.prefix_lm(4), masks.document(ids))
    assert masks.prefix_length(combined) == 4 and masks.prefix_length(masks.and_masks(masks.causal)) == 0
    module = attention.get("sdpa")(8, 8, 2, 8, mask_mod=combined).eval()
    cache = module.make_kv_cache(1, 8)
    with torch.no_grad():
        module(torch.randn(1, 2, 8), kv_cache=cache)
        with pytest.raises(ValueError, match="prefix_len=4"):
            module(torch.randn(1, 2, 8), kv_cache=cache)


def test_the_construction_probe_runs_where_the_pattern_s_tensors_live():
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")  # stands in for ids on a GPU
    masks.check_mask_mod(masks.and_masks(masks.causal, masks.document(ids)))  # no device mismatch
    masks.check_mask_mod(masks.per_document(masks.causal, torch.zeros(2, 5, dtype=torch.long)))


def test_a_pattern_that_raises_when_probed_is_a_type_error_naming_it():
    def broken(b, h, q_idx, kv_idx):
        raise IndexError("index 7 is out of bounds")

    with pytest.raises(TypeError, match=r"mask_mod broken raised IndexError when called on index tensors"):
        masks.check_mask_mod(broken)


def test_partials_of_one_function_get_their_own_compile_keys():
    import functools

    from attention.flex import pattern_key

    def band(b, h, q_idx, kv_idx, w):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < w)

    keys = {pattern_key(functools.partial(band, w=w)) for w in (2, 3, 4)}
    assert len(keys) == 3 and pattern_key(functools.partial(band, w=2)) == pattern_key(functools.partial(band, w=2))
