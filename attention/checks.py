"""Argument checks with one wording and one exception type per kind of mistake.

The wrong *type* raises ``TypeError`` ("``name`` must be an int, got float (2.0)"); the right type
with a wrong *value* raises ``ValueError`` ("``name`` must be >= 1, got 0"). ``bool`` is refused
where a number is expected: ``True`` is an ``int`` to Python, never what the caller meant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real

import torch


def _got(value: object) -> str:
    return f"{type(value).__name__} ({value!r})"


def is_finite(value: object) -> bool:
    """A finite real number (not a bool): what a figure read from a file must be."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def is_ascii_number(text: str) -> bool:
    """Digits 0-9 only: ``str.isdigit`` (and ``\\d``) also take superscripts ('²', which ``int``
    refuses) and other scripts' digits ('٣', which ``int`` reads as 3), so a number read from a
    file or a command line would fail deep in ``int`` or quietly mean one nobody typed."""
    return text.isascii() and text.isdigit()


def integer(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_got(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def heads(d_out: object, num_heads: object, num_kv_heads: object) -> tuple[int, int, int]:
    """``d_out`` features split evenly into ``num_heads`` query heads, which ``num_kv_heads``
    key/value heads divide (grouped-query attention): the three as ints."""
    d_out, num_heads, num_kv_heads = (
        integer(name, value)
        for name, value in (("d_out", d_out), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads))
    )
    if d_out % num_heads != 0:
        raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    return d_out, num_heads, num_kv_heads


def real(name: str, value: object, allowed: Callable[[float], bool], rule: str) -> float:
    """``value`` as a ``float`` for which ``allowed`` holds; ``rule`` says which in the message."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {_got(value)}")
    value = float(value)
    if not allowed(value):
        raise ValueError(f"{name} must be {rule}, got {value}")
    return value


def floating_dtype(name: str, value: object) -> torch.dtype:
    """``value`` as a floating-point ``torch.dtype``, the kind activations and caches hold."""
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype such as torch.float32, got {_got(value)}")
    if not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point dtype, got {value}")
    return value


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_got(value)}")
    return value


def name_of(fn: object) -> str:
    """A function's name for messages: its ``__name__``, else its type's (a callable object)."""
    return getattr(fn, "__name__", type(fn).__name__)


def function(name: str, value: object, signature: str) -> Callable[..., object]:
    """``value`` as a callable; it must be callable as ``signature`` (named in the message)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable{signature}, got {_got(value)}")
    return value
