"""The single list of attention implementations: tests, perf and the benchmark iterate over it.

Add your own implementation (a subclass of :class:`attention.AttentionBase` with the seed
constructor) either in code::

    from attention import register
    register("mine", MyAttention)

or, from an installed package, through the ``attention.implementations`` entry-point group::

    [project.entry-points."attention.implementations"]
    mine = "my_package.module:MyAttention"

Entry points are loaded the first time the registry is read.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .base import AttentionBase
from .flex import MHAPyTorchFlexAttention
from .from_scratch import MultiHeadAttentionCombinedQKV
from .sdpa import MHAPyTorchScaledDotProduct

ENTRY_POINT_GROUP = "attention.implementations"

_BUILTINS: dict[str, type[AttentionBase]] = {
    "from_scratch": MultiHeadAttentionCombinedQKV,
    "flex": MHAPyTorchFlexAttention,
    "sdpa": MHAPyTorchScaledDotProduct,
}
_registry: dict[str, type[AttentionBase]] = dict(_BUILTINS)
_entry_points_loaded = False


def builtin_implementations() -> dict[str, type[AttentionBase]]:
    """The implementations this package ships, without plugins."""
    return dict(_BUILTINS)


def register(name: str, cls: type[AttentionBase]) -> type[AttentionBase]:
    """Add ``cls`` under ``name``; returns ``cls`` so it also works as ``register(name, cls)`` inline."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"implementation name must be an identifier-like string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, AttentionBase)):
        raise TypeError(f"{cls!r} is not a subclass of attention.AttentionBase")
    if _registry.get(name, cls) is not cls:
        raise ValueError(f"an implementation named {name!r} is already registered ({_registry[name].__name__})")
    _registry[name] = cls
    return cls


def implementations() -> dict[str, type[AttentionBase]]:
    """Every registered implementation, name -> class (built-ins first, then plugins)."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            register(ep.name, ep.load())
    return dict(_registry)


def get(name: str) -> type[AttentionBase]:
    """The implementation registered as ``name``; a clear error lists the known names."""
    known = implementations()
    if name not in known:
        raise ValueError(f"unknown implementation {name!r}; registered: {', '.join(known)}")
    return known[name]
