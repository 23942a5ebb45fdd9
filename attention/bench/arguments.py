"""Command-line value types the benchmark CLIs share: argparse refuses anything else with a usage
error naming the option."""

from __future__ import annotations

import argparse
import math

import torch

from .. import checks
from .cost import DTYPES


def positive_int(text: str) -> int:
    """A whole number of at least 1, in ASCII digits (``int`` would also read '٣' as 3)."""
    if not checks.is_ascii_number(text.strip()):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0, in ASCII (``float`` also reads 'inf', 'nan' and '٣.5')."""
    if not text.strip().isascii():
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return value


def dtype_by_name(text: str) -> torch.dtype:
    """A dtype by its short name (bf16, fp16, fp32) or torch's (bfloat16, float16, float32)."""
    aliases = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if text not in aliases:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(aliases)}")
    return aliases[text]
