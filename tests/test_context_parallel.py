"""Context parallel: torch's ring attention over 2+ GPUs against the float64 oracle, by the ratio rule.

The GPU test spawns one process per GPU (``attention.context_parallel.launch``), so torch's
patched SDPA never exists in the pytest process; each worker also checks that SDPA and torch's
options are restored after every run. Everything else (capabilities, the length rule, argument
checks, the skip reason) runs on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attention
from attention import context_parallel as cp
from attention.accuracy import GRAD_FACTOR, ratio_rule_violation
from attention.suite.support import CUDA, Config, build_module, make_input, reference_with_leaves, seeded_randn

IMPL_NAMES = list(attention.implementations())
CP_IMPLS = [name for name in IMPL_NAMES if attention.get(name).context_parallel_unsupported() is None]
DECLINING_IMPLS = [name for name in IMPL_NAMES if name not in CP_IMPLS]
GPUS = torch.cuda.device_count() if CUDA else 0
NEEDS_GPUS = pytest.mark.skipif(cp.gpus_problem(GPUS) is not None, reason=cp.gpus_problem(GPUS) or "")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _module(impl_name: str = "sdpa", **kwargs) -> attention.AttentionBase:
    return attention.get(impl_name)(16, 16, 2, 64, **kwargs)


class _StubMesh:
    """A 1-D mesh of ``ranks`` that fails the test if anything communicates through it."""

    ndim = 1

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks

    def size(self) -> int:
        return self.ranks

    def get_group(self):
        raise AssertionError("communicated before the arguments were checked")


# -- CPU: what each implementation declares --------------------------------------------------


def test_sdpa_supports_context_parallel() -> None:
    assert "sdpa" in CP_IMPLS


@pytest.mark.parametrize("impl_name", DECLINING_IMPLS)
def test_declining_implementations_give_their_reason(impl_name: str) -> None:
    reason = attention.get(impl_name).context_parallel_unsupported()
    assert isinstance(reason, str) and len(reason) > 20
    module = attention.get(impl_name)(16, 16, 2, 64)
    with pytest.raises(ValueError, match="cannot run under context parallel") as raised:
        cp.check_supported(module)
    assert reason in str(raised.value)


def test_an_unknown_subclass_declines_by_default() -> None:
    class Mine(attention.AttentionBase):
        pass

    assert "rewrites only F.scaled_dot_product_attention" in Mine.context_parallel_unsupported()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_mod": attention.masks.sliding_window(8)}, "mask_mod=sliding_window.*plain causal"),
        ({"mask_mod": attention.masks.prefix_lm(4)}, "mask_mod=prefix_lm.*plain causal"),
        ({"score_mod": attention.score_mods.generate_alibi(2)}, "score_mod"),
        ({"dropout": 0.1}, "dropout=0.1 in training"),
    ],
    ids=["sliding_window", "prefix_lm", "alibi", "dropout"],
)
def test_what_ring_attention_cannot_run_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cp.check_supported(_module(**kwargs))


def test_dropout_in_eval_mode_is_accepted() -> None:
    cp.check_supported(_module(dropout=0.1).eval())


def test_a_non_module_is_refused() -> None:
    with pytest.raises(TypeError, match=r"attention\.AttentionBase"):
        cp.check_supported(torch.nn.Linear(2, 2))


# -- CPU: the length rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seq_len", "world_size", "load_balance", "match"),
    [
        (256, 2, True, None),
        (148, 2, True, None),
        (150, 2, False, None),
        (150, 2, True, r"not a multiple of 2 x world_size = 4"),
        (257, 2, False, r"not a multiple of world_size = 2"),
        (96, 3, True, None),
        (99, 3, False, None),
        (99, 3, True, r"multiple of 2 x world_size = 6"),
        (4, 4, False, r"leaves 1 token per rank"),
        (8, 4, True, None),
    ],
)
def test_length_rule(seq_len: int, world_size: int, load_balance: bool, match: str | None) -> None:
    assert cp.shard_multiple(world_size, load_balance) == (2 * world_size if load_balance else world_size)
    if match is None:
        cp.check_length(seq_len, world_size, load_balance=load_balance)
    else:
        with pytest.raises(ValueError, match=match):
            cp.check_length(seq_len, world_size, load_balance=load_balance)


@pytest.mark.parametrize(
    ("seq_len", "load_balance", "chunk"),
    [(256, True, 64), (148, True, 37), (148, False, 74), (384, True, 96), (150, False, 75)],
)
def test_fp32_query_chunks_must_be_whole_multiples_of_the_efficient_kernels_padding(
    seq_len: int, load_balance: bool, chunk: int
) -> None:
    assert cp.query_chunk(seq_len, 2, load_balance) == chunk
    cp.check_length(seq_len, 2, load_balance=load_balance, dtype=torch.bfloat16)  # flash pads nothing
    if chunk % cp.EFFICIENT_LSE_ROWS == 0:
        cp.check_length(seq_len, 2, load_balance=load_balance, dtype=torch.float32)
    else:
        with pytest.raises(ValueError, match=f"calls of {chunk} query rows; use a multiple of"):
            cp.check_length(seq_len, 2, load_balance=load_balance, dtype=torch.float32)


def test_fp32_grouped_query_attention_is_refused() -> None:
    gqa = attention.get("sdpa")(16, 16, 4, 64, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"num_kv_heads=2 < num_heads=4 in fp32: SDPA runs grouped-query"):
        cp.check_supported(gqa, torch.float32)
    cp.check_supported(gqa, torch.bfloat16)
    cp.check_supported(_module(), torch.float32)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_length_rule_checks_its_arguments(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="seq_len"):
        cp.check_length(bad, 2, load_balance=True)


# -- CPU: the runner refuses before any communication ----------------------------------------


def test_cpu_tensors_are_refused_before_communication() -> None:
    with pytest.raises(ValueError, match="runs on CUDA"):
        cp.run_context_parallel(_module(), torch.zeros(1, 8, 16), _StubMesh(2))


def test_a_non_divisible_length_is_refused_before_communication(monkeypatch: pytest.MonkeyPatch) -> None:
    # The device check is the only one that needs CUDA: let CPU tensors through it here.
    monkeypatch.setattr(cp, "_check_tensors", lambda tensors, seq_dims: tensors[0].shape[seq_dims[0]])
    with pytest.raises(ValueError, match="sequence length 10 is not a multiple of 2 x world_size = 4"):
        cp.run_context_parallel(_module(), torch.zeros(1, 10, 16), _StubMesh(2))
    with pytest.raises(ValueError, match="sequence length 9 is not a multiple of world_size = 2"):
        cp.run_context_parallel(_module(), torch.zeros(1, 9, 16), _StubMesh(2), load_balance=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rotate_method": "ring"}, ValueError, "rotate_method must be one of allgather, alltoall"),
        ({"load_balance": 1}, TypeError, "load_balance must be a bool"),
        ({"grad_out": torch.zeros(1, 8, 15)}, ValueError, r"grad_out must have the output's shape \(1, 8, 16\)"),
    ],
    ids=["rotate_method", "load_balance", "grad_out"],
)
def test_bad_arguments_are_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cp.run_context_parallel(_module(), torch.zeros(1, 8, 16), _StubMesh(2), **kwargs)


def test_bad_input_is_refused_by_the_module_checks() -> None:
    with pytest.raises(ValueError, match="d_in=16"):
        cp.run_context_parallel(_module(), torch.zeros(1, 8, 15), _StubMesh(2))
    with pytest.raises(ValueError, match="exceed context_length=64"):
        cp.run_context_parallel(_module(), torch.zeros(1, 128, 16), _StubMesh(2))


def test_a_declining_implementation_is_refused_by_the_runner() -> None:
    with pytest.raises(ValueError, match="MultiHeadAttentionCombinedQKV cannot run under context parallel"):
        cp.run_context_parallel(_module("from_scratch"), torch.zeros(1, 8, 16), _StubMesh(2))


def test_a_two_dimensional_mesh_is_refused() -> None:
    mesh = _StubMesh(2)
    mesh.ndim = 2
    with pytest.raises(TypeError, match="1-D DeviceMesh"):
        cp.context_parallel_shards(mesh, [torch.zeros(1, 8, 16)], [1]).__enter__()


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_follow_torchs_layout_and_own_their_memory(world_size: int) -> None:
    tokens = torch.arange(8 * world_size).repeat(2, 1)  # (B, T): each token its position
    balanced = [cp.shard_sequence(tokens, 1, r, world_size, load_balance=True) for r in range(world_size)]
    plain = [cp.shard_sequence(tokens, 1, r, world_size, load_balance=False) for r in range(world_size)]
    assert balanced[0][0].tolist() == [0, 1, 2, 3, *range(8 * world_size - 4, 8 * world_size)]  # head and tail
    assert torch.cat(plain, 1).equal(tokens)
    for shard in balanced + plain:
        assert shard.shape == (2, 8) and shard.untyped_storage().nbytes() == shard.numel() * shard.element_size()
    # torch's own head-tail balancer, where this torch has it, orders the tokens the same way
    balancer = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._load_balancer")
    indices = balancer._HeadTailLoadBalancer(8 * world_size, world_size, "cpu")._generate_indices()  # (1, T)
    assert torch.cat(balanced, 1)[0].equal(indices[0])


# -- CPU: the skip path ------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [0, 1])
def test_fewer_than_two_gpus_skip_with_the_count(gpus: int) -> None:
    assert cp.gpus_problem(gpus) == f"context parallel needs 2+ CUDA GPUs, found {gpus}"


def test_two_gpus_are_enough() -> None:
    assert cp.gpus_problem(2) is None and cp.gpus_problem(8) is None


def test_the_gpu_test_skips_here_with_that_reason() -> None:
    skip = NEEDS_GPUS.mark
    assert skip.args == (GPUS < 2,)
    assert skip.kwargs["reason"] == (cp.gpus_problem(GPUS) or "")


def test_launch_without_enough_gpus_is_refused() -> None:
    with pytest.raises(ValueError, match=f"world_size={GPUS + 1} needs {GPUS + 1} CUDA GPUs, found {GPUS}"):
        cp.launch(print, world_size=GPUS + 1)


# -- GPU: every supporting implementation against the oracle ---------------------------------


def cp_lengths(world_size: int) -> list[int]:
    """Lengths for ``world_size`` ranks: three that shard under either setting (one off the
    128-token block grid, whose query chunks fp32 refuses), one only without the load balancer,
    one under neither."""
    return [2 * world_size * 64, 2 * world_size * 96, 2 * world_size * 37, world_size * 75, 2 * world_size * 64 + 1]


def expected_refusal(record: dict, world_size: int) -> str | None:
    """What the runner must refuse ``record``'s case with (a part of the message), or ``None``."""
    fp32 = record["dtype"] == "fp32"
    if fp32 and record["kv_heads"] < record["heads"]:
        return "SDPA runs grouped-query attention in fp32 on its math path"
    if record["tokens"] % cp.shard_multiple(world_size, record["load_balance"]):
        return "is not a multiple of"
    if fp32 and cp.query_chunk(record["tokens"], world_size, record["load_balance"]) % cp.EFFICIENT_LSE_ROWS:
        return "pads its log-sum-exp"
    return None


def _violations(module, x, upstream, output, grads, what: str) -> list[str]:
    """Ratio-rule violations of ``output`` and ``grads`` (of x, then the parameters)."""
    oracle, oracle_leaves = reference_with_leaves(module, x, torch.float64)  # (B, T, d_out)
    baseline, baseline_leaves = reference_with_leaves(module, x, x.dtype)  # (B, T, d_out)
    problems = [ratio_rule_violation(output, oracle, baseline, what=f"{what} output")]
    names = ["x", *(name for name, _ in module.named_parameters())]
    oracle_grads = torch.autograd.grad(oracle, oracle_leaves, upstream.double())
    baseline_grads = torch.autograd.grad(baseline, baseline_leaves, upstream)
    for name, grad, oracle_grad, baseline_grad in zip(names, grads, oracle_grads, baseline_grads, strict=True):
        problems.append(
            ratio_rule_violation(grad, oracle_grad, baseline_grad, factor=GRAD_FACTOR, what=f"{what} grad of {name}")
        )
    return [p for p in problems if p is not None]


def _cases(world_size: int) -> list[dict]:
    cases = [
        {"heads": heads, "kv_heads": kv_heads, "load_balance": lb, "tokens": t, "rotate": "allgather"}
        for heads, kv_heads in ((4, 4), (4, 2))
        for lb in (True, False)
        for t in cp_lengths(world_size)
    ]
    cases += [
        {"heads": 4, "kv_heads": 4, "load_balance": lb, "tokens": 2 * world_size * 64, "rotate": "alltoall"}
        for lb in (True, False)
    ]
    return cases


def _check_worker(rank: int, world_size: int, impl_name: str, out: str) -> None:
    """One rank: every case in every dtype under context parallel (one launch: process start and
    NCCL set-up are most of the cost); rank 0 checks it and the one-GPU run against the oracle and
    writes the records to ``out``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental._attention import _cp_options

    mesh = init_device_mesh("cuda", (world_size,))
    impl = attention.get(impl_name)
    options_before = (_cp_options.enable_load_balance, _cp_options.rotate_method)
    records = []
    cases = [dict(case, dtype=name) for name in DTYPES for case in _cases(world_size)]
    for i, case in enumerate(cases):
        dtype = DTYPES[case["dtype"]]
        cfg = Config(2, case["tokens"], case["heads"], case["kv_heads"], 32, 48, qkv_bias=True, seed=1000 + i)
        module = build_module(impl, cfg, "cuda", dtype)
        x = make_input(cfg, "cuda", dtype)  # (B, T, d_in)
        upstream = seeded_randn(cfg.batch, cfg.tokens, cfg.d_out, seed=cfg.seed + 2, device="cuda", dtype=dtype)
        record = dict(case)
        try:
            result = cp.run_context_parallel(
                module, x, mesh, grad_out=upstream, load_balance=case["load_balance"], rotate_method=case["rotate"]
            )
        except ValueError as error:  # refused before any collective, alike on every rank
            record["error"] = str(error)
        except Exception as error:
            # Fail at once: a rank that carried on would wait in the next case's collectives for
            # one that failed mid-ring, until NCCL's timeout.
            raise RuntimeError(f"rank {rank}, case {case}: {type(error).__name__}: {error}") from error
        else:
            if rank == 0:
                grads = [result.x_grad, *result.param_grads.values()]
                record["problems"] = _violations(module, x, upstream, result.output, grads, "context parallel")
                x_single = x.detach().clone().requires_grad_()
                y_single = module(x_single)  # (B, T, d_out)
                single_grads = torch.autograd.grad(y_single, [x_single, *module.parameters()], upstream)
                record["problems"] += _violations(module, x, upstream, y_single, single_grads, "one GPU")
                record["max_diff_from_one_gpu"] = (result.output.double() - y_single.double()).abs().max().item()
        record["sdpa_restored"] = F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
        record["options_restored"] = (_cp_options.enable_load_balance, _cp_options.rotate_method) == options_before
        records.append(record)
    if rank == 0:
        Path(out).write_text(json.dumps({"world_size": world_size, "records": records}, indent=1))


@pytest.mark.cuda
@NEEDS_GPUS
@pytest.mark.parametrize("impl_name", CP_IMPLS)
def test_context_parallel_matches_float64_oracle(impl_name: str, tmp_path: Path) -> None:
    out = tmp_path / "records.json"
    cp.launch(_check_worker, impl_name, str(out), timeout_s=120)  # a stuck rank fails, never hangs
    result = json.loads(out.read_text())
    world_size = result["world_size"]
    assert world_size == GPUS
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention  # untouched here
    failures = []
    for record in result["records"]:
        label = (
            f"{record['dtype']} T={record['tokens']} heads={record['heads']}/{record['kv_heads']} "
            f"load_balance={record['load_balance']} rotate={record['rotate']}"
        )
        refusal = expected_refusal(record, world_size)
        if not (record["sdpa_restored"] and record["options_restored"]):
            failures.append(f"{label}: torch's SDPA or context parallel options were left changed")
        if refusal is None and "error" in record:
            failures.append(f"{label}: refused: {record['error']}")
        elif refusal is not None and refusal not in record.get("error", ""):
            failures.append(f"{label}: expected '{refusal}', got {record.get('error', 'no error')}")
        failures += [f"{label}: {problem}" for problem in record.get("problems", [])]
    ran = [r for r in result["records"] if "error" not in r]
    assert {r["dtype"] for r in ran} == set(DTYPES) and any(r["kv_heads"] < r["heads"] for r in ran)
    assert not failures, "\n".join(failures)
