"""Attention patterns: one ``mask_mod`` definition, the same answer from every implementation.

* Each pattern (and combination) matches the float64 oracle by the ratio rule in every
  implementation, at lengths on and off the 128-wide block grid.
* Each pattern's own law holds at module level: perturbing a token changes only the rows that
  may see it (nothing leaks out of a window, across a document boundary, or between sequences
  of a batch), and prefix tokens see each other both ways.
* Rows with no visible key give zeros (the module output is then ``proj.bias``), never NaN.
* A ``mask_mod`` assigned to a module that has already run is the one its next call uses.
* ``per_document`` gives every packed document the pattern on its own positions (each its own
  prefix), as running each document alone does.

Every test here builds a module with a pattern other than plain causal, or passes document ids,
so each needs the ``masks`` capability (plain causal is what test_equivalence and
test_causality check). The mask functions themselves are tested in the repository's
tests/test_masks.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import or_masks

import attention
from attention import masks
from attention.masks import dense_mask
from attention.suite.support import (
    DEVICE_DTYPES,
    DEVICES,
    assert_module_matches_oracle,
    grad_context,
    mask_for,
    random_document_ids,
    sizing,
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
    else:  # narrowed to the running implementation's sizing (an interpreter's: a few tiles)
        size = sizing()
        batch = draw(st.integers(1, min(3, size.batch)))
        num_heads = draw(st.sampled_from([n for n in (1, 2, 4) if size.heads[0] <= n <= size.heads[1]]))
        num_kv_heads = draw(st.sampled_from([n for n in (1, 2, 4) if num_heads % n == 0]))
        head_dim = draw(st.sampled_from([8, 16]))
        d_in = draw(st.integers(4, 32))
        low, high = max(1, size.tokens[0]), min(160, size.tokens[1])
        edges = [t for t in (1, 127, 129, 200) if low <= t <= high]
        length = draw(st.one_of(st.sampled_from(edges), st.integers(low, high)) if edges else st.integers(low, high))
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


@pytest.mark.attention_needs("masks")
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


@pytest.mark.attention_needs("masks")
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


@pytest.mark.attention_needs("masks")
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


@pytest.mark.attention_needs("masks")
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
        perturbed[0, j] += 3 * torch.randn(8, generator=torch.Generator().manual_seed(seed)).to(device)  # (d_in,)
        with torch.no_grad():
            out = module(x)  # (1, T, d_out)
            change = (module(perturbed) - out).abs().amax(dim=-1)[0]  # (T,)
        # Row i sees key j when j is in the prefix (both ways) or at or before i (causal).
        expected = torch.tensor([i == j or j < prefix_len or j <= i for i in range(length)])
        moved = change.cpu() > unchanged_tolerance(out)
        assert torch.equal(moved, expected), (
            f"prefix_lm({prefix_len}), T={length}, perturbed token {j}: rows moved {moved.nonzero().flatten().tolist()}"
        )


@pytest.mark.attention_needs("masks")
@pytest.mark.parametrize("device", DEVICES)
@given(length=st.integers(3, 40), window=st.integers(1, 40), token=st.integers(0, 39), seed=st.integers(0, 2**16))
def test_a_window_shows_exactly_its_keys(length, window, token, seed, device, impl_name):
    """Sliding window, worked out from positions: perturbing token ``j`` moves exactly rows
    ``j .. j + window - 1`` (the oldest key row ``i`` sees is ``i - window + 1``), so a window one
    key too wide or too narrow on either side is caught, whatever the mask code says."""
    j = token % length
    case = dict(batch=1, length=length, num_heads=2, num_kv_heads=2, head_dim=16, d_in=8, seed=seed)
    module, x = build(impl_name, case, device, torch.float32, masks.sliding_window(window))
    perturbed = x.clone()
    perturbed[0, j] += 3 * torch.randn(8, generator=torch.Generator().manual_seed(seed)).to(device)  # (d_in,)
    with torch.no_grad():
        out = module(x)  # (1, T, d_out)
        change = (module(perturbed) - out).abs().amax(dim=-1)[0]  # (T,)
    expected = torch.tensor([j <= i < j + window for i in range(length)])
    moved = change.cpu() > unchanged_tolerance(out)
    assert torch.equal(moved, expected), (
        f"sliding_window({window}), T={length}, perturbed token {j}: rows moved {moved.nonzero().flatten().tolist()}, "
        f"expected {expected.nonzero().flatten().tolist()}"
    )


# -- no query sees the future: worked out from positions and ids, never from the mask code ----------

#: The patterns above (their call-time document ids may give one id to separate runs, which
#: ``document`` joins into one document) and ``per_document`` ones (one run per id).
FUTURE_KINDS = [*PATTERNS, "per_document", "per_document+sliding_window", "per_document+prefix_lm"]


def scattered_document_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    """``(B, T)`` ids in runs of 1 to 6 tokens, each run's id drawn from 0..2: one id often
    labels several separate runs."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < length:
            row += [int(torch.randint(0, 3, (), generator=gen))] * int(torch.randint(1, 7, (), generator=gen))
        rows.append(row[:length])
    return torch.tensor(rows)  # (B, T)


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """For each position of one row, ``(start, end)`` of the run of equal ids it sits in."""
    bounds, start = [], 0
    for pos in range(1, len(ids) + 1):
        if pos == len(ids) or ids[pos] != ids[start]:
            bounds += [(start, pos)] * (pos - start)
            start = pos
    return bounds


def furthest_keys(kind: str, ids: torch.Tensor | None, length: int, prefix_len: int) -> torch.Tensor:
    """``(B or 1, T)``: the furthest key each query may see, from positions and ids alone: its own
    position, or the last key of a bidirectional prefix reaching past it (``prefix_lm``: the first
    ``prefix_len`` keys; ``per_document+prefix_lm``: the first ``prefix_len`` of its run)."""
    own = list(range(length))
    if kind in ("prefix_lm", "document+prefix_lm"):
        return torch.tensor([[max(i, prefix_len - 1) for i in own]])
    if kind == "per_document+prefix_lm":
        rows = [runs(row) for row in ids.tolist()]
        return torch.tensor([[max(i, min(s + prefix_len, e) - 1) for i, (s, e) in enumerate(r)] for r in rows])
    return torch.tensor([own])


def future_problem(impl_name: str, case: dict, device: str):
    """The module for ``case``, its input ``(B, T, d_in)``, the call's document ids (or ``None``)
    and each query's furthest visible key ``(B or 1, T)``."""
    kind, batch, length = case["kind"], case["batch"], case["length"]
    call_ids = None
    if kind.startswith("per_document"):
        ids = random_document_ids(batch, length, case["seed"])  # (B, T), one run per id
        base = mask_for(kind.partition("+")[2] or "causal", case["window"], case["prefix_len"])
        mask_mod = masks.per_document(base, ids.to(device))
    else:
        mask_mod, with_documents = pattern_parts(kind, case["window"], case["prefix_len"])
        ids = scattered_document_ids(batch, length, case["seed"]) if with_documents else None  # (B, T)
        call_ids = None if ids is None else ids.to(device)
    module, x = build(impl_name, case, device, torch.float32, mask_mod)
    return module, x, call_ids, furthest_keys(kind, ids, length, case["prefix_len"]).to(device)


@pytest.mark.attention_needs("masks")
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_no_query_sees_the_future(data, device, impl_name):
    """Replace every token after position ``t``: a row whose furthest visible key is at or before
    ``t`` stays as it was. Which rows those are comes from positions and ids alone, not from the
    mask code, which the float64 oracle shares (docs/design.md#per-document-ids)."""
    case = data.draw(cases(device, FUTURE_KINDS), label="case")
    assume(case["length"] >= 2)
    module, x, ids, furthest = future_problem(impl_name, case, device)
    t = data.draw(st.integers(0, case["length"] - 2), label="last token kept")
    replaced = x.clone()
    replaced[:, t + 1 :] = torch.randn(replaced[:, t + 1 :].shape).to(device)  # (B, T - t - 1, d_in)
    with torch.no_grad():
        out = module(x, document_ids=ids)  # (B, T, d_out)
        out2 = module(replaced, document_ids=ids)  # (B, T, d_out)
    change = (out2 - out).abs().amax(dim=-1)  # (B, T)
    tol = unchanged_tolerance(out)
    leaked = (change > tol) & (furthest <= t)  # (B, T)
    assert not leaked.any(), (
        f"{case['kind']}: replacing the tokens after {t} changed rows that may see no key after {t}: "
        f"{leaked.nonzero().tolist()[:8]} (max change {change[leaked].max().item():.3e} > {tol:.3e})"
    )
    assert (change[:, -1] > tol).all(), "the last row ignored its own replaced token"


# -- rows with no visible key ------------------------------------------------------------------


def hide_rows(hidden: int, every: int) -> masks.MaskMod:
    """Causal, except that the first ``hidden`` rows and every ``every``-th row see nothing."""

    def hide_rows_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx >= kv_idx) & (q_idx >= hidden) & (q_idx % every != every - 1)

    return hide_rows_mask


def empty_rows_case(data: st.DataObject, impl_name: str, device: str, dtype: torch.dtype):
    """A module whose pattern leaves some rows without a visible key, its input ``(B, T, d_in)``,
    document ids (or ``None``) and which rows ``(T,)`` are the empty ones."""
    if device == "cuda":  # a short menu: each new pattern is a new compile of flex's kernels
        length, hidden, every = data.draw(st.sampled_from([5, 130])), 3, 4
    else:
        length = data.draw(st.sampled_from([1, 5, 33, 130]), label="length")
        hidden = data.draw(st.integers(0, 4), label="hidden first rows")
        every = data.draw(st.integers(2, 7), label="period of hidden rows")
    documents = data.draw(st.booleans(), label="documents")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    case = dict(batch=2, length=length, num_heads=4, num_kv_heads=2, head_dim=16, d_in=8, seed=seed)
    module, x = build(impl_name, case, device, dtype, hide_rows(hidden, every))
    ids = random_document_ids(2, length, seed).to(device) if documents else None
    rows = torch.arange(length)
    empty = (rows < hidden) | (rows % every == every - 1)  # (T,)
    return module, x, ids, empty.to(device)


@pytest.mark.attention_needs("masks", "zero_empty_rows")
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_rows_with_no_visible_key_are_zero(data, device, dtype, impl_name):
    impl = attention.get(impl_name)
    module, x, ids, empty = empty_rows_case(data, impl_name, device, dtype)
    x.requires_grad_(impl.supports_backward(device))
    with grad_context(impl, device):
        out = module(x, document_ids=ids)  # (B, T, d_out)
        if out.requires_grad:
            out.sum().backward()

    assert torch.isfinite(out).all(), "NaN or inf in the output"
    bias = module.proj.bias.detach().expand(2, int(empty.sum()), -1)  # (B, empty rows, d_out)
    assert torch.equal(out.detach()[:, empty], bias), "a row with no visible key is not zero context"
    assert_module_matches_oracle(module, x.detach(), out.detach(), document_ids=ids)
    if x.grad is not None:
        assert torch.isfinite(x.grad).all(), "NaN or inf in the input gradient"
        assert all(torch.isfinite(p.grad).all() for p in module.parameters()), "NaN or inf in a weight gradient"


@pytest.mark.attention_needs("masks", "zero_empty_rows", "kv_cache")
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@settings(max_examples=max(2, settings.default.max_examples // 2))
@given(data=st.data())
def test_rows_with_no_visible_key_are_zero_when_decoded(data, device, dtype, impl_name):
    """The same rows, decoded one token at a time through the cache."""
    module, x, ids, empty = empty_rows_case(data, impl_name, device, dtype)
    steps = min(x.shape[1], 6)
    cache = module.make_kv_cache(2, x.shape[1])
    with torch.no_grad():
        decoded = torch.cat(
            [
                module(x[:, i : i + 1], kv_cache=cache, document_ids=None if ids is None else ids[:, : i + 1])
                for i in range(steps)
            ],
            dim=1,
        )  # (B, steps, d_out)
    assert torch.isfinite(decoded).all(), "NaN or inf in a decoded row"
    bias = module.proj.bias.detach().expand(2, int(empty[:steps].sum()), -1)  # (B, empty rows, d_out)
    assert torch.equal(decoded[:, empty[:steps]], bias), "a decoded row with no visible key is not zero context"


@pytest.mark.attention_needs("masks")
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


# -- one module, calls that differ: cached masks must not go stale ---------------------------------


@pytest.mark.attention_needs("masks")
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


@pytest.mark.attention_needs("masks")
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


@pytest.mark.attention_needs("masks")
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


@pytest.mark.attention_needs("masks", "kv_cache")
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
        chunks = [x[:, :cut], x[:, cut:]] if cut < length else [x]  # no cut: the whole sequence at once
        cached = torch.cat([module(chunk, kv_cache=cache) for chunk in chunks], dim=1)  # (B, T, d_out)
    assert_module_matches_oracle(module, x, out, what="per-document prefix_lm output")
    assert_module_matches_oracle(module, x, cached, what=f"per-document prefix_lm output cached at {cut}")
    for b in range(batch):
        for doc in ids[b].unique().tolist():
            rows = (ids[b] == doc).nonzero().flatten()  # (T_doc,) contiguous
            piece = x[b : b + 1, rows]  # (1, T_doc, d_in)
            for got in (out, cached):
                assert_module_matches_oracle(alone, piece, got[b : b + 1, rows], what=f"document {doc} of row {b}")


@pytest.mark.attention_needs("masks", "kv_cache")
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
