"""What an implementation declares it can do, so the suite tests exactly that.

Every :class:`attention.AttentionBase` subclass answers :meth:`~attention.AttentionBase.capabilities`.
A subclass that overrides ``_attend`` takes on the whole contract (any ``mask_mod``, packed
documents, a KV cache, zero rows where no key is visible), so the default declares everything;
an implementation built from a plain function with :func:`attention.from_function` declares what
that function does. The property suite skips what is not declared, naming the capability, and
the module refuses it with a ``ValueError`` naming it: nothing is ever run through a fallback
while reported as the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: How a row with no visible key comes out: ``"zeros"`` (the convention every built-in follows,
#: FlashAttention's and flex's) or ``"any"`` (the implementation promises nothing there: an
#: additive ``finfo.min`` mask gives a uniform average, a plain softmax NaN).
EMPTY_ROWS = ("zeros", "any")

#: What each capability means, for skip reasons and error messages.
MEANING = {
    "masks": "any mask_mod (sliding windows, prefixes, packed documents), not only plain causal",
    "kv_cache": "query rows that continue a KV cache (a query offset)",
    "dropout": "dropout on the attention weights",
    "backward": "gradients",
    "zero_empty_rows": "zeros for a row with no visible key",
}


def is_device_type(name: object) -> bool:
    """Whether ``name`` is a torch device type (``"cpu"``, ``"cuda"``), not a device (``"cuda:0"``)
    or a name torch does not know (``"gpu"``, ``"CPU"``)."""
    if not isinstance(name, str) or ":" in name:
        return False
    try:
        return torch.device(name).type == name
    except RuntimeError:
        return False


def check_empty_rows(value: object) -> str:
    """``value`` if it is one of :data:`EMPTY_ROWS`; a ``TypeError`` for a non-string, a
    ``ValueError`` for another string."""
    if not isinstance(value, str):
        raise TypeError(f"empty_rows must be one of {EMPTY_ROWS}, got {type(value).__name__} {value!r}")
    if value not in EMPTY_ROWS:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROWS}, got {value!r}")
    return value


@dataclass(frozen=True)
class Capabilities:
    """An implementation's declared abilities; the defaults are a full ``_attend`` subclass's.

    ``dtypes`` and ``devices`` (device types such as ``"cpu"``, ``"cuda"``) are ``None`` for any.
    """

    masks: bool = True
    kv_cache: bool = True
    empty_rows: str = "zeros"
    dtypes: frozenset[torch.dtype] | None = None
    devices: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in ("masks", "kv_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_empty_rows(self.empty_rows)
        if self.dtypes is not None:
            bad = [d for d in self.dtypes if not (isinstance(d, torch.dtype) and d.is_floating_point)]
            if bad or not self.dtypes:
                raise TypeError(f"dtypes must be floating torch dtypes (or None for any), got {sorted(map(str, bad))}")
        if self.devices is not None:
            bad_devices = sorted((d for d in self.devices if not is_device_type(d)), key=repr)
            if bad_devices or not self.devices:
                raise TypeError(f"devices must be device types such as 'cpu' or 'cuda' (or None), got {bad_devices}")

    def allows_dtype(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes

    def allows_device(self, device: torch.device | str) -> bool:
        return self.devices is None or torch.device(device).type in self.devices

    def dtype_refused(self, dtype: torch.dtype) -> str | None:
        """Why the declaration refuses ``dtype`` ("declares dtypes ... only, not ..."), or ``None``."""
        if self.dtypes is None or self.allows_dtype(dtype):
            return None
        return f"declares dtypes {', '.join(sorted(map(str, self.dtypes)))} only, not {dtype}"

    def device_refused(self, device: torch.device | str) -> str | None:
        """Why the declaration refuses ``device`` ("declares devices ... only, not ..."), or ``None``."""
        if self.devices is None or self.allows_device(device):
            return None
        return f"declares devices {', '.join(sorted(self.devices))} only, not {torch.device(device).type}"

    @property
    def zero_empty_rows(self) -> bool:
        return self.empty_rows == "zeros"
