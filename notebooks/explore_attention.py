"""Look inside the attention implementations: weights, masks, BlockMasks, errors, ops.

Open it with ``marimo edit notebooks/explore_attention.py``; ``nox -s notebook`` runs it headless and
exports HTML. Works on CPU (flex runs eager there, without gradients).
"""

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import warnings

    import marimo as mo
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.colors import ListedColormap, PowerNorm
    from torch.nn.attention.flex_attention import create_block_mask

    import attention
    from attention.bench import inspection

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Eager flex on CPU is the point here (see what it runs), not a mistake to warn about.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    return ListedColormap, PowerNorm, attention, create_block_mask, device, inspection, mo, plt, torch


@app.cell
def _(device, mo, torch):
    mo.md(
        f"""
        # Inside the attention implementations

        Every implementation in the registry computes the same causal multi-head attention. Pick
        sizes and a mask below; the notebook shows the attention weights the from-scratch path
        computes, the dense mask and flex's block-sparse **BlockMask**, every implementation's
        error against the float64 oracle, and the ops each one actually runs.

        Running on **{device}**, torch {torch.__version__}.
        """
    )
    return


@app.cell
def _(attention, device, inspection, mo):
    # Those that can run here (triton needs the triton package): the rest are named in a note below.
    runnable = [name for name, cls in attention.implementations().items() if cls.unavailable(device) is None]
    # Those that run here only through an interpreter (triton on CPU): exact, but seconds per
    # forward at the larger sizes below, so they can be switched off while sliders move.
    interpreted = [name for name in runnable if attention.implementations()[name].runs_interpreted(device)]
    run_interpreted = mo.ui.checkbox(
        value=True, label=f"run {', '.join(interpreted)} (interpreted on {device}: slow at large sizes)"
    )
    impl = mo.ui.dropdown(runnable, value="flex", label="implementation")
    pattern_kind = mo.ui.dropdown(list(attention.masks.SPEC_KINDS), value="document", label="mask")
    seq_len = mo.ui.slider(16, 512, step=16, value=128, show_value=True, label="tokens T")
    batch = mo.ui.slider(1, 4, value=1, show_value=True, label="batch")
    num_heads = mo.ui.slider(1, 8, value=4, show_value=True, label="heads")
    head_dim = mo.ui.dropdown(["8", "16", "32", "64"], value="16", label="head dim")
    dtype_name = mo.ui.dropdown(["float32", "bfloat16"], value="float32", label="dtype")
    window = mo.ui.slider(1, 256, value=24, show_value=True, label="sliding window")
    prefix_len = mo.ui.slider(0, 256, value=32, show_value=True, label="prefix length")
    num_docs = mo.ui.slider(1, 8, value=3, show_value=True, label="documents")
    block_size = mo.ui.dropdown(["8", "16", "32", "64", "128"], value="16", label="BlockMask block")
    mo.vstack(
        [
            mo.hstack([impl, pattern_kind, dtype_name, head_dim, block_size], justify="start"),
            mo.hstack([seq_len, batch, num_heads], justify="start"),
            mo.hstack([window, prefix_len, num_docs], justify="start"),
            *([run_interpreted] if interpreted else []),
        ]
    )
    return (
        batch,
        block_size,
        dtype_name,
        head_dim,
        impl,
        interpreted,
        num_docs,
        num_heads,
        pattern_kind,
        prefix_len,
        run_interpreted,
        runnable,
        seq_len,
        window,
    )


@app.cell
def _(
    attention,
    batch,
    device,
    dtype_name,
    head_dim,
    inspection,
    interpreted,
    num_docs,
    num_heads,
    pattern_kind,
    prefix_len,
    run_interpreted,
    runnable,
    seq_len,
    torch,
    window,
):
    # One set of parameters loaded into every implementation, so they compute the same function.
    T, H, B = seq_len.value, num_heads.value, batch.value
    d_model = H * int(head_dim.value)
    dtype = getattr(torch, dtype_name.value)
    pattern = inspection.make_pattern(
        pattern_kind.value, T, batch=B, window=window.value, prefix_len=prefix_len.value, num_docs=num_docs.value
    )
    doc_ids = None if pattern.document_ids is None else pattern.document_ids.to(device)  # (B, T)
    torch.manual_seed(0)
    shared = attention.get("from_scratch")(d_model, d_model, H, T).state_dict()
    # Why each implementation left out is not run: unavailable here, switched off above, or not
    # computing this dtype here (triton's interpreter refuses bfloat16).
    not_run = {}
    for _name, _cls in attention.implementations().items():
        if _name not in runnable:
            not_run[_name] = _cls.unavailable(device)
        elif _name in interpreted and not run_interpreted.value:
            not_run[_name] = "switched off above"
        elif (_problem := _cls.dtype_unsupported(dtype, device)) is not None:
            not_run[_name] = _problem
    modules = {
        name: inspection.build(name, shared, d_model=d_model, num_heads=H, seq_len=T, mask_mod=pattern.mask_mod).to(
            device=device, dtype=dtype
        )
        for name in runnable
        if name not in not_run
    }
    x = torch.randn(B, T, d_model, device=device, dtype=dtype)  # (B, T, d_model)
    return B, H, T, d_model, doc_ids, modules, not_run, pattern, x


@app.cell
def _(H, PowerNorm, doc_ids, mo, modules, pattern, plt, x):
    # attention_weights exists on the from-scratch path only: the others never materialise them.
    weights = modules["from_scratch"].attention_weights(x, document_ids=doc_ids)[0].float().cpu()  # (H, T, T)
    _cols = min(H, 4)
    _rows = -(-H // _cols)
    _fig, _axes = plt.subplots(_rows, _cols, figsize=(3.2 * _cols, 3.2 * _rows), squeeze=False)
    for _h, _ax in enumerate(_axes.flat):
        _ax.axis("off")
        if _h < H:
            _ax.imshow(weights[_h].numpy(), cmap="magma", norm=PowerNorm(0.4, vmin=0, vmax=1), interpolation="nearest")
            _ax.set_title(f"head {_h}")
    _fig.suptitle(f"attention weights, batch 0, mask {pattern.spec} (query rows, key columns)")
    _fig.tight_layout()
    mo.vstack(
        [
            mo.md("## Attention weights per head\nSoftmax weights from the from-scratch path (colour: weight^0.4)."),
            _fig,
        ]
    )
    return


@app.cell
def _(B, H, ListedColormap, T, block_size, create_block_mask, device, inspection, mo, modules, pattern, plt, torch):
    from attention.masks import dense_mask

    _bs = int(block_size.value)
    _per_batch = pattern.document_ids is not None
    dense = dense_mask(pattern.visible, B, H, T, T, device)[0, 0].cpu()  # (T, T)
    block_mask = create_block_mask(
        pattern.visible, B if _per_batch else None, None, T, T, device=device, BLOCK_SIZE=_bs
    )
    layout = inspection.block_layout(block_mask)  # (T / bs, T / bs)
    # What the flex module itself builds (default 128-token blocks) for these sizes.
    _probe = torch.empty(B, H, T, 1, device=device)  # (B, H, T, 1): only the shape matters
    flex_mask = modules["flex"].block_mask(_probe, _probe, 0, pattern.document_ids)

    _fig, (_ax1, _ax2) = plt.subplots(1, 2, figsize=(11, 5))
    _ax1.imshow(dense.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    for _edge in range(_bs, T, _bs):
        _ax1.axhline(_edge - 0.5, color="tab:blue", lw=0.5)
        _ax1.axvline(_edge - 0.5, color="tab:blue", lw=0.5)
    _ax1.set_title(f"dense mask ({T}x{T}; black = visible), {_bs}-token blocks")
    _ax2.imshow(layout.numpy(), cmap=ListedColormap(["white", "tab:orange", "tab:green"]), vmin=0, vmax=2)
    _ax2.set_title(f"BlockMask at {_bs}: white skipped, orange partial, green full")
    for _ax in (_ax1, _ax2):
        _ax.set_xlabel("key")
        _ax.set_ylabel("query")
    _fig.tight_layout()
    _counts = [(layout == _v).sum().item() for _v in range(3)]
    mo.vstack(
        [
            mo.md(
                f"""
                ## Mask and flex's BlockMask
                The dense mask every implementation evaluates from the same `mask_mod`, and the
                block-sparse layout flex runs: **skipped** blocks cost nothing, **full** blocks run
                without the mask, only **partial** blocks evaluate `mask_mod` per element.
                At {_bs}-token blocks: {_counts[0]} skipped, {_counts[1]} partial, {_counts[2]} full
                (sparsity {block_mask.sparsity():.1f}%). The flex module's own mask for these sizes
                uses {flex_mask.BLOCK_SIZE[0]}-token blocks: sparsity {flex_mask.sparsity():.1f}%.
                """
            ),
            _fig,
        ]
    )
    return


@app.cell
def _(B, H, T, d_model, device, doc_ids, inspection, mo, modules, not_run, pattern, torch, x):
    from attention.accuracy import check_module

    # The attention core alone: identity projections and input [q | k | v], so each error is the
    # attention's own (through the shared projections, their rounding set every max error alike).
    core = {
        name: inspection.core_module(name, num_heads=H, head_dim=d_model // H, seq_len=T, mask_mod=pattern.mask_mod).to(
            device=device, dtype=x.dtype
        )
        for name in modules
    }
    qkv = torch.randn(B, T, 3 * d_model, device=device, dtype=x.dtype)  # (B, T, [q | k | v])
    errors = {name: check_module(module, qkv, document_ids=doc_ids) for name, module in core.items()}
    _skipped = "".join(f"\n- `{name}` not run: {reason}" for name, reason in not_run.items())
    _rows = [
        {
            "implementation": name,
            "max |error|": f"{e.max_error:.3e}",
            "mean |error|": f"{e.mean_error:.3e}",
            "same-dtype baseline max": f"{e.baseline_max_error:.3e}",
            "tolerance rule": "pass" if e.passes else e.problem,
        }
        for name, e in errors.items()
    ]
    mo.vstack(
        [
            mo.md(
                f"""
                ## Do the implementations agree?
                Each attention core (identity projections, random q, k and v) against the float64
                oracle, in {x.dtype}. The rule: at most 2x the error of the oracle's own math run in
                the same dtype, plus a few ulps.{_skipped}
                """
            ),
            mo.ui.table(_rows, selection=None, pagination=False),
        ]
    )
    return core, errors, qkv


@app.cell
def _(core, doc_ids, impl, mo, not_run, plt, qkv, torch):
    from attention.reference import reference_forward

    mo.stop(impl.value in not_run, mo.md(f"`{impl.value}` is not run: {not_run.get(impl.value)}."))
    _module = core[impl.value]
    with torch.no_grad():  # flex has no backward on CPU
        _out = _module(qkv, document_ids=doc_ids)  # (B, T, d_model)
    _oracle = reference_forward(_module, qkv, document_ids=doc_ids)  # (B, T, d_model), float64
    _diff = (_out.detach().double() - _oracle).abs()[0].cpu()  # (T, d_model)
    _fig, _ax = plt.subplots(figsize=(10, 3))
    _im = _ax.imshow(_diff.T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    _fig.colorbar(_im, ax=_ax)
    _ax.set_xlabel("token")
    _ax.set_ylabel("feature")
    _ax.set_title(f"{impl.value}: |attention core - float64 oracle|, batch 0")
    _fig.tight_layout()
    mo.vstack([mo.md(f"## Where `{impl.value}` differs from the oracle\nPick another implementation above."), _fig])
    return


@app.cell
def _(device, doc_ids, inspection, mo, modules, torch, x):
    def _run(module):
        def call():
            with torch.no_grad():
                module(x, document_ids=doc_ids)

        return call

    profiles = {name: inspection.profile_ops(_run(m), device=device, top=6) for name, m in modules.items()}
    _rows = [
        {"implementation": name, "op / kernel": op.name, "calls": op.calls, "self µs per forward": round(op.self_us, 1)}
        for name, ops in profiles.items()
        for op in ops
    ]
    _unit = "GPU kernel time" if device == "cuda" else "CPU self time"
    mo.vstack(
        [
            mo.md(
                f"""
                ## What each implementation runs
                The top ops by {_unit} in one forward, from `torch.profiler`. From scratch is
                matmul, mask fill and softmax over the full T x T scores; SDPA is one fused
                kernel; flex is a compiled Triton kernel on CUDA and an unfused, vmapped
                `mask_mod` evaluation on CPU.
                """
            ),
            mo.ui.table(_rows, selection=None, pagination=False),
        ]
    )
    return (profiles,)


if __name__ == "__main__":
    app.run()
