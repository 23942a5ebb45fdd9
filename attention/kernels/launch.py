"""Kernels compiled for CUDA tensors, interpreted for CPU tensors, and the block sizes they use."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .. import checks
from ..device_info import is_hopper, supports_tma


class Kernel:
    """One ``@triton.jit`` kernel, launched as ``kernel[grid](*args)`` on CUDA tensors (compiled)
    and on CPU tensors (Triton's interpreter runs the same source with NumPy: slow, exact, and what
    lets a machine without a GPU test the kernel code itself).

    """

    def __init__(self, fn: Callable, *, do_not_specialize: tuple[str, ...] = ()) -> None:
        # Lengths and offsets that change every decode step are not specialised on (Triton would
        # compile again whenever one crosses a multiple of 16), so a growing cache never recompiles.
        self.compiled = triton.jit(fn, do_not_specialize=list(do_not_specialize))
        self.interpreted = InterpretedFunction(fn)

    def on(self, device: torch.device) -> Launcher:
        """The launchable kernel for tensors on ``device``: ``kernel.on(device)[grid](*args)``."""
        if device.type == "cuda":
            return _OnDevice(self.compiled, device)
        if device.type == "cpu":
            return _Interpreted(self.interpreted)
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU, interpreted), got {device.type}")


class Launcher(Protocol):
    """A kernel ready for tensors on one device: ``launcher[grid](*args)`` launches it."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]: ...


class _OnDevice:
    """``compiled[grid](*args)`` launched on ``device`` and its current stream: Triton launches on
    the current CUDA device, which need not be the one the tensors are on."""

    def __init__(self, fn: JITFunction, device: torch.device) -> None:
        self.fn, self.device = fn, device

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            with torch.cuda.device(self.device):
                self.fn[grid](*args, **kwargs)

        return launch


class _Interpreted:
    """``interpreted[grid](*args)``, with Triton's library functions interpreted too."""

    def __init__(self, fn: InterpretedFunction) -> None:
        self.fn = fn

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            with _INTERPRETING, _library_interpreted():  # one interpreted launch at a time
                self.fn[grid](*args, **kwargs)

        return launch


_interpreted_library: dict[Callable, InterpretedFunction] = {}
#: The routing below swaps a class attribute for the whole process: launches from two threads
#: must not interleave (the first to finish would restore it under the second).
_INTERPRETING = threading.Lock()


@contextlib.contextmanager
def _library_interpreted() -> Iterator[None]:
    """Triton's own ``tl.max``, ``tl.sum``, ``tl.zeros``... are ``@triton.jit`` functions, which its
    interpreter runs only in a process started with ``TRITON_INTERPRET=1`` (then nothing compiles
    for CUDA). For the length of one interpreted launch, calls to them go through the interpreter,
    as in that mode, so one process can run the kernels compiled on CUDA and interpreted on CPU."""
    compiled_call = JITFunction.__call__

    def interpreted_call(self: JITFunction, *args: object, **kwargs: object) -> object:
        fn = _interpreted_library.get(self.fn)
        if fn is None:
            fn = _interpreted_library[self.fn] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    JITFunction.__call__ = interpreted_call
    try:
        with _language_restored():
            yield
    finally:
        JITFunction.__call__ = compiled_call


_ABSENT = object()


@contextlib.contextmanager
def _language_restored() -> Iterator[None]:
    """Put back every attribute of ``triton.language`` the interpreter swaps during one launch.

    The interpreter runs a kernel with the language's builtins replaced by NumPy ones, and puts
    back those it replaced for the kernel's own module. A ``@triton.jit`` function the kernel calls
    (ours in ``tiles.py``, Triton's ``tl.max``) is patched again through its own globals, which
    reach ``triton.language.core`` as well, and those are never put back (Triton 3.6 and 3.9): the
    next compile for CUDA in the process then builds with NumPy builtins and fails ("'value' object
    has no attribute 'dtype'"). Each swap goes through ``_LangPatchScope.set_attr``; the value
    before the first swap of each attribute is kept here and restored at the end."""
    scope = getattr(interpreter, "_LangPatchScope", None)
    if scope is None:  # a Triton that swaps the language some other way: nothing to hook
        yield
        return
    swap = scope.set_attr
    before: dict[tuple[int, str], tuple[object, str, object]] = {}

    def recorded(self: object, obj: object, name: str, value: object) -> None:
        before.setdefault((id(obj), name), (obj, name, getattr(obj, name, _ABSENT)))
        swap(self, obj, name, value)

    scope.set_attr = recorded
    try:
        yield
    finally:
        scope.set_attr = swap
        for obj, name, value in before.values():
            if value is _ABSENT:
                if hasattr(obj, name):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)


def _count_to(N, Out):
    n = tl.load(N)
    total = n * 0
    for _ in range(n):  # a loop bound loaded from memory, as the kernels' walks have
        total += 1
    tl.store(Out, total)


_COUNT_TO = Kernel(_count_to)


def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernels on CPU tensors, or ``None``.

    Some releases (3.6, for one) turn a loop bound loaded from memory into a Python int with
    ``int(array)``, which NumPy 2 refuses for the one-element arrays the interpreter holds.

    The answer is the interpreter's, so it is worked out once per process, on plain tensors even
    when asked under a ``torch.func`` transform: there the probe's tensors would be functorch
    wrappers without storage, and a failure cached from them would refuse every later call."""
    with torch._C._DisableFuncTorch():  # tensors made inside are plain
        return _probe_interpreter()


@functools.cache
def _probe_interpreter() -> str | None:
    bound, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    try:
        _COUNT_TO.on(torch.device("cpu"))[(1,)](bound, out)
    except Exception as error:  # the interpreter's own failure, whatever its type
        return f"triton {triton.__version__}'s interpreter fails on a loop bound read from memory ({error})"
    if int(out) != 3:
        return f"triton {triton.__version__}'s interpreter ran a 3-step loop {int(out)} times"
    return None


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch settings of one kernel configuration."""

    block_m: int  # query rows per program (and per block-table tile)
    block_n: int  # keys per inner step (and per block-table tile)
    num_warps: int
    num_stages: int
    sub_m: int  # query rows per inner step of the dK/dV kernel (divides block_m)
    full_run: bool  # walk each row's run of full tiles in a loop of its own (docs/design.md#triton-configs)
    tma: bool = False  # load tiles through tensor descriptors (docs/design.md#triton-tma-forward)

    def as_dict(self) -> dict[str, int]:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "SUB_M": self.sub_m,
            "FULL_RUN": int(self.full_run),
            "TMA": int(self.tma),
        }


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: full fp32 for fp32 inputs (the float32 oracle test holds them
    to fp32 rounding, and TF32 keeps 10 mantissa bits); 16-bit inputs multiply exactly anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_scale(scale: float) -> None:
    """The kernels scale scores inside exp2's argument after taking the row maximum of the raw
    scores, which holds for a positive finite scale only."""
    checks.real("scale", scale, lambda s: 0 < s < math.inf, "a positive finite number")


def padded_head_dim(head_dim: int) -> int:
    """The head dim a kernel tiles by: a power of two, at least 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(head_dim))


#: The widest run of head-dim elements a kernel is told the head dim is a multiple of.
MAX_D_ALIGN = 16


def head_dim_args(head_dim: int) -> dict[str, int | bool]:
    """The kernels' head-dim arguments: the padded tile (``BLOCK_D``), whether the head dim fills
    it (``EVEN_D``: no mask on the head dim at all), the largest power of two up to
    :data:`MAX_D_ALIGN` that divides it (``D_ALIGN``: the mask's runs, so loads stay wide), and the
    head dim itself as a runtime value, so head dims that share all three share one compiled kernel
    (a compile per head dim made the CUDA property suite compile for minutes)."""
    block_d = padded_head_dim(head_dim)
    align = min(MAX_D_ALIGN, head_dim & -head_dim)
    return {"head_dim": head_dim, "EVEN_D": head_dim == block_d, "D_ALIGN": align, "BLOCK_D": block_d}


#: Keys up to which a forward without gradients at head dim 128 runs 64-row tiles in 4 warps.
SHORT_KEYS = 1024


def prefill_blocks(
    dtype: torch.dtype,
    head_dim: int,
    device: torch.device,
    *,
    kv_len: int | None = None,
    grad: bool = True,
    tma: bool = False,
) -> Blocks:
    """Hand-picked prefill tiles (docs/design.md#triton-configs): 128 x 64 for 16-bit inputs, 64 x 32
    for fp32 (twice the bytes per element: the same shared memory), 32 x 32 interpreted (each
    step costs the interpreter about the same at any tile size, so small cases reach several
    tiles, a partial one and the full-tile run cheaply). The full-tile run's own loop pays for
    16-bit inputs (tensor cores: the walk's lookups and masking were most of the cost); fp32,
    whose dots are FMAs, walks one masked loop, since three loops make ptxas spill its registers.

    At head dim 128 a forward without gradients (``grad`` false) over at most :data:`SHORT_KEYS`
    keys (``kv_len``) takes 64 x 64 tiles in 4 warps: its programs are short, and two of them
    share an SM where one 8-warp program had it alone. With gradients the forward keeps the dQ
    kernel's tiles, whose block table it shares.

    ``tma`` (where :func:`use_tma` takes them and the tensors allow it: :func:`tma_fits`)
    turns tensor-descriptor loads on for 16-bit inputs (docs/design.md#triton-tma-forward): a
    forward without gradients in 64 x 64 tiles and 4 warps at every length, since loads that cost
    no registers or address arithmetic make the small tile pay at 4k and 16k too; with gradients
    the tiles above. fp32 keeps its pointer loads. On CPU the flag is kept as given: the
    interpreter runs the descriptor kernels exactly, which is how a machine without a GPU tests them."""
    if device.type != "cuda":
        return Blocks(32, 32, 4, 1, 32, full_run=True, tma=tma)
    if dtype == torch.float32:
        return Blocks(64, 32, 4, 2, 32, full_run=False)
    short_dims = padded_head_dim(head_dim) <= 64
    if tma and not grad:
        return Blocks(64, 64, 4, 2 if short_dims else 3, 64, full_run=True, tma=True)
    if short_dims:
        return Blocks(128, 64, 4, 3, 64, full_run=True, tma=tma)
    if not grad and kv_len is not None and kv_len <= SHORT_KEYS:
        return Blocks(64, 64, 4, 3, 64, full_run=True, tma=tma)
    return Blocks(128, 64, 8, 3, 64, full_run=True, tma=tma)


#: ``0`` turns tensor-descriptor loads off, ``1`` on at every head dim, on GPUs that have them;
#: unset (or empty), they are on where they were measured faster: head dim 128 on Hopper
#: (docs/design.md#triton-tma-forward). Any other value is refused.
TMA_SWITCH = "ATTENTION_TRITON_TMA"


def use_tma(device: torch.device, head_dim: int) -> bool:
    """Whether prefill kernels on ``device`` load their tiles through tensor descriptors: the device
    has them, and :data:`TMA_SWITCH` asks for them or, unset, ``head_dim`` is 128 on a Hopper GPU,
    where they were measured faster (11-15% in the forward, 4-20% in the backward; at head dim 64
    4-6% slower in the backward; padded head dims and later GPUs not measured). Read on every call,
    so a test or a benchmark can set it for one run."""
    asked = tma_switch()
    if not supports_tma(device):
        return False
    if asked is not None:
        return asked
    return head_dim == 128 and is_hopper(device)


def tma_switch() -> bool | None:
    """:data:`TMA_SWITCH` read: ``True`` (1), ``False`` (0) or ``None`` (unset or empty); a
    ``ValueError`` naming it for anything else, which the module raises before a call writes
    its cache."""
    asked = os.environ.get(TMA_SWITCH, "")
    if asked not in ("", "0", "1"):
        raise ValueError(f"{TMA_SWITCH} must be 0 (off), 1 (on) or unset (measured default), got {asked!r}")
    return None if asked == "" else asked == "1"


def tma_rows_fit(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether one head's row of ``head_dim`` elements is whole 16-byte units, what the copy engine
    addresses by: then a contiguous tensor, and a copy of any, fits a descriptor."""
    return head_dim * dtype.itemsize % 16 == 0


def tma_fits(*tensors: torch.Tensor) -> bool:
    """Whether each of these ``(B, H, T, hd)`` tensors can be read through a tensor descriptor as
    it lies in memory: not empty, its rows whole 16-byte units (:func:`tma_rows_fit`), its head
    dim contiguous, its start and every other stride a positive multiple of 16 bytes. Views a
    model makes (heads split from one projection, transposed to ``(B, H, T, hd)``) fit when the
    head dim is a multiple of 8 16-bit elements; a tensor that does not fit takes the pointer loads."""
    for t in tensors:
        if t.numel() == 0 or not tma_rows_fit(t.shape[-1], t.dtype):
            return False
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(stride <= 0 or stride * t.element_size() % 16 for stride in t.stride()[:-1]):
            return False
    return True


def dkdv_blocks(dtype: torch.dtype, head_dim: int, device: torch.device, *, tma: bool = False) -> Blocks:
    """The dK/dV kernel's tiles (docs/design.md#triton-configs), which it walks in a block table of
    its own: for 16-bit inputs 128 keys per program (``block_n``) against 64-row query tiles, in 8
    warps, so each warp group owns 64 keys' rows of dK and dV (the forward's 64 keys per program
    gave each of 8 warps' groups 32, and took 2.3x as long at head dim 128 on an H200). fp32 and
    CPU keep the forward's tiles, and so its table. ``tma``: as for :func:`prefill_blocks`."""
    if device.type != "cuda" or dtype == torch.float32:
        return prefill_blocks(dtype, head_dim, device, tma=tma)
    return Blocks(64, 128, 8, 3, 64, full_run=True, tma=tma)
