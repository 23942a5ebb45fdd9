"""The CUDA builds of the Triton kernels, made on a machine without a GPU (docs/design.md#kernel-builds).

CI has no GPU, and Triton's interpreter runs the kernels' source without compiling it: a kernel
that no longer compiles for CUDA, or tiles that no longer fit the register file, would first
show on a GPU. Here Triton compiles each configuration the kernels pick on an Ampere (sm_80) and
a Hopper (sm_90a) GPU, through the launch code the module runs, with a stand-in driver that names
the target instead of asking a device, and nothing is launched. Each build's registers and local
memory (where spilled registers go) are read from its cubin with Triton's own ``cuobjdump``."""

from __future__ import annotations

import itertools
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton package is not installed")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from attention import masks  # noqa: E402
from attention.block_table import build_block_table  # noqa: E402
from attention.kernels import decode, launch, prefill  # noqa: E402

CUDA = torch.device("cuda")  # what the tile choices are asked for; no tensor goes there
AMPERE, HOPPER = 80, 90
#: Tokens of a prefill build: within ``SHORT_KEYS``, so head dim 128 also builds its short-forward tiles.
PREFILL_TOKENS = 512
DECODE_KEYS = 4096
#: Shared memory an SM, as an H100 has (an A100 164 KB): the decode steps are the same for both.
SHARED = 228 * 1024


_TARGETS = itertools.count()


class _Target:
    """The part of Triton's driver that compiling asks for: the target, and a device key of its
    own, so these builds never share Triton's in-process kernel cache with a real GPU's or with
    another test's (each compiles, or reads Triton's disk cache)."""

    def __init__(self, capability: int) -> None:
        self.target = GPUTarget("cuda", capability, 32)
        self.key = f"build-only sm_{capability} #{next(_TARGETS)}"

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> str:
        return self.key

    def get_current_stream(self, device: object = None) -> int:
        return 0


@dataclass(frozen=True)
class Built:
    """One compiled kernel: its name, the constexprs and launch options it was built with, its cubin."""

    name: str
    options: dict
    cubin: bytes

    def resources(self) -> dict[str, int]:
        """``REG``, ``STACK``, ``LOCAL``, ``SHARED``... of the kernel, as ``cuobjdump`` reads them."""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(self.cubin)
            f.flush()
            text = subprocess.run(
                [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        line = text.split(f"Function {self.name}:", 1)[1].splitlines()[1]
        return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


class _CompileOnly:
    """``Kernel.on(device)`` while building: ``[grid](*args)`` compiles for the stand-in target and
    keeps the build, launching nothing."""

    def __init__(self, fn, built: list[Built]) -> None:
        self.fn, self.built = fn, built

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def build(*args: object, **kwargs: object) -> None:
            kernel = self.fn.warmup(*args, grid=grid, **kwargs)
            options = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
            self.built.append(Built(self.fn.fn.__name__, options, kernel.asm["cubin"]))

        return build


@contextmanager
def _building_for(capability: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Built]]:
    built: list[Built] = []
    monkeypatch.setattr(launch.Kernel, "on", lambda self, device: _CompileOnly(self.compiled, built))
    # The driver in place before (None until a process first asks: on a machine without a GPU
    # asking would fail), put back as it was.
    before = driver._active
    driver.set_active(_Target(capability))
    try:
        yield built
    finally:
        driver._active = before


def _prefill(dtype: torch.dtype, head_dim: int, *, tma: bool, grad: bool) -> None:
    """The forward, and with ``grad`` the backward's kernels, at the tiles picked on CUDA."""
    q, k, v = (torch.randn(1, 2, PREFILL_TOKENS, head_dim, dtype=dtype) for _ in range(3))  # (B, H, T, hd) each
    scale = head_dim**-0.5
    blocks = launch.prefill_blocks(dtype, head_dim, CUDA, kv_len=PREFILL_TOKENS, grad=grad, tma=tma)
    table = build_block_table(masks.causal, 1, 1, PREFILL_TOKENS, PREFILL_TOKENS, blocks.block_m, blocks.block_n, "cpu")
    out, lse = prefill.forward(q, k, v, table, scale, blocks)
    if grad:
        key_blocks = launch.dkdv_blocks(dtype, head_dim, CUDA, tma=tma)
        key_table = build_block_table(
            masks.causal, 1, 1, PREFILL_TOKENS, PREFILL_TOKENS, key_blocks.block_m, key_blocks.block_n, "cpu"
        )
        prefill.backward(torch.randn_like(out), q, k, v, out, lse, table, scale, blocks, key_table, key_blocks)


def _decode(dtype: torch.dtype, *, group: int, tokens: int, splits: int, pdl: bool, monkeypatch) -> None:
    """The split kernel (and with ``splits > 1`` the merge) at the steps picked on CUDA."""
    monkeypatch.setattr(decode, "supports_programmatic_launch", lambda device: pdl)
    monkeypatch.setattr(decode, "step_tiles", lambda dtype, rows, dims, device: decode.tiles(dtype, rows, dims, SHARED))
    q = torch.randn(2, 2 * group, tokens, 128, dtype=dtype)  # (B, H, Tq, hd)
    k, v = (torch.randn(2, 2, DECODE_KEYS, 128, dtype=dtype) for _ in range(2))  # (B, H_kv, Tk, hd) each
    decode.attend(q, k, v, 128**-0.5, q_offset=DECODE_KEYS - tokens, visible=decode.CAUSAL, splits=splits)


#: What each build case compiles, and the kernels whose builds must use no local memory (spilled
#: registers): the forward and decode kernels the perf targets time, on the GPU they were tuned
#: for. The backward's kernels sit at the register limit, where ptxas versions differ (dK/dV at
#: head dim 128: Triton 3.6 208 bytes of local memory, 3.9 16: docs/design.md#kernel-builds).
PREFILL_KERNELS = {"_fwd", "_bwd_delta", "_bwd_dq", "_bwd_dkdv"}
DECODE_KERNELS = {"_split", "_merge"}
BUILDS = {
    # Hopper's default at head dim 128: tensor-descriptor loads; short and long forward tiles.
    "sm90a-bf16-D128-tma": (HOPPER, lambda mp: _prefill_both(torch.bfloat16, 128, tma=True), PREFILL_KERNELS),
    "sm90a-bf16-D64": (HOPPER, lambda mp: _prefill_both(torch.bfloat16, 64, tma=False), PREFILL_KERNELS),
    # One token per head (split + merge, programmatic launch) and a 64-row GQA tile written at once.
    "sm90a-decode": (HOPPER, lambda mp: _decodes(mp, pdl=True), DECODE_KERNELS),
    "sm80-decode": (AMPERE, lambda mp: _decodes(mp, pdl=False), DECODE_KERNELS),
}
NO_LOCAL_MEMORY = {HOPPER: {"_fwd", "_split", "_merge", "_bwd_delta"}, AMPERE: set()}


def _prefill_both(dtype: torch.dtype, head_dim: int, *, tma: bool) -> None:
    _prefill(dtype, head_dim, tma=tma, grad=False)
    _prefill(dtype, head_dim, tma=tma, grad=True)


def _decodes(monkeypatch: pytest.MonkeyPatch, *, pdl: bool) -> None:
    _decode(torch.bfloat16, group=1, tokens=1, splits=4, pdl=pdl, monkeypatch=monkeypatch)
    _decode(torch.bfloat16, group=4, tokens=16, splits=1, pdl=pdl, monkeypatch=monkeypatch)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")  # Triton 3.9 on its own default
@pytest.mark.parametrize("case", list(BUILDS))
def test_kernels_build_for_cuda(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kernel the case launches compiles for its GPU; on Hopper the forward and decode
    kernels keep every value in registers."""
    if not hasattr(driver, "_active") or not hasattr(triton.knobs, "nvidia"):
        pytest.skip(f"triton {triton.__version__}'s driver or tools are not where this test looks for them")
    capability, launch_all, kernels = BUILDS[case]
    with _building_for(capability, monkeypatch) as built:
        launch_all(monkeypatch)
    assert {kernel.name for kernel in built} == kernels
    spilled = {}
    for kernel in built:
        assert kernel.cubin, f"{kernel.name} {kernel.options}: no cubin"
        used = kernel.resources()
        if kernel.name in NO_LOCAL_MEMORY[capability] and used["STACK"] + used["LOCAL"]:
            spilled[kernel.name] = (kernel.options, used)
    assert not spilled, f"{case}: kernels that spill registers to local memory: {spilled}"


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
def test_a_compile_after_an_interpreted_launch_builds(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The interpreter swaps triton.language's builtins during a launch and left some swapped (the
    ones a called @triton.jit function reaches through triton.language.core): a later compile in
    the process failed. One process may interpret for CPU tensors and compile for CUDA ones."""
    if (problem := launch.interpreter_problem()) is not None:
        pytest.skip(problem)
    q = torch.randn(1, 2, 1, 16)  # (B, H, Tq, hd)
    k, v = (torch.randn(1, 2, 40, 16) for _ in range(2))  # (B, H_kv, Tk, hd) each
    decode.attend(q, k, v, 0.25, q_offset=39, visible=decode.CAUSAL)  # interpreted: calls tiles.py's helpers
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # nothing cached: this compiles
    with _building_for(AMPERE, monkeypatch) as built:
        _decode(torch.bfloat16, group=1, tokens=1, splits=4, pdl=False, monkeypatch=monkeypatch)
    assert {kernel.name for kernel in built} == DECODE_KERNELS
