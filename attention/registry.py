"""The single list of attention implementations: tests, perf and the benchmark iterate over it.

Add your own implementation (a subclass of :class:`attention.AttentionBase` with the seed
constructor, or a plain ``attn(q, k, v)`` function, which :func:`attention.from_function` wraps)
either in code::

    from attention import register
    register("mine", MyAttention)

or, from an installed package, through the ``attention.implementations`` entry-point group::

    [project.entry-points."attention.implementations"]
    mine = "my_package.module:MyAttention"

or by where it lives, ``resolve("my_package.module:MyAttention")``, which is what the suite's
``--attention-impl`` and the tools' ``--impl`` accept besides registered names.

Entry points are loaded once, the first time the registry is read. One that cannot be
registered (its import raises, it is not an AttentionBase subclass, its name is not an
identifier or is already taken) is skipped with a :class:`PluginWarning` naming the entry point,
its distribution and the reason; the built-ins and every other plugin stay registered, and later
reads return the same registry without warning again.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import traceback
import warnings
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeGuard

from .base import AttentionBase
from .flex import MHAPyTorchFlexAttention
from .from_scratch import MultiHeadAttentionCombinedQKV
from .function import from_function
from .sdpa import MHAPyTorchScaledDotProduct
from .triton_attention import MHATritonAttention

if TYPE_CHECKING:
    from torch import Tensor

ENTRY_POINT_GROUP = "attention.implementations"
_PACKAGE = Path(__file__).resolve().parent  # the attention package's folder

_BUILTINS: dict[str, type[AttentionBase]] = {
    "from_scratch": MultiHeadAttentionCombinedQKV,
    "flex": MHAPyTorchFlexAttention,
    "sdpa": MHAPyTorchScaledDotProduct,
    "triton": MHATritonAttention,
}
_registry: dict[str, type[AttentionBase]] = dict(_BUILTINS)
#: Where each implementation that is not a built-in was loaded from, ``"module:attr"``.
_sources: dict[str, str] = {}
#: True once every entry point of the group has been tried (registered or skipped with a warning).
_entry_points_loaded = False
#: Entry points already tried, so each is loaded (and warned about) once, even when a plugin's
#: own import reads the registry while the outer load is still going.
_entry_points_tried: set[tuple[str, str, str | None]] = set()


class PluginWarning(UserWarning):
    """An ``attention.implementations`` entry point could not be registered and was skipped."""


def builtin_implementations() -> dict[str, type[AttentionBase]]:
    """The implementations this package ships, without plugins."""
    return dict(_BUILTINS)


def register(name: str, impl: type[AttentionBase] | Callable[..., Tensor]) -> type[AttentionBase]:
    """Add ``impl`` under ``name`` and return its class: an AttentionBase subclass as it is, a
    plain function through :func:`attention.from_function` with its defaults (plain causal only;
    call ``from_function`` yourself to declare more)."""
    if not isinstance(name, str):
        raise TypeError(f"implementation name must be a str, got {type(name).__name__} ({name!r})")
    if not name.isidentifier():
        raise ValueError(f"implementation name must be an identifier-like string, got {name!r}")
    problem = _class_problem(impl)
    if problem is not None:
        raise TypeError(problem)
    cls = _as_class(impl)
    if _registry.get(name, cls) is not cls:
        raise ValueError(f"an implementation named {name!r} is already registered ({_registry[name].__name__})")
    _registry[name] = cls
    if name not in _BUILTINS:
        _sources.setdefault(name, f"{getattr(impl, '__module__', '?')}:{getattr(impl, '__qualname__', name)}")
    return cls


def _as_class(impl: type[AttentionBase] | Callable[..., Tensor]) -> type[AttentionBase]:
    return impl if isinstance(impl, type) else from_function(impl)


def _class_problem(impl: object) -> str | None:
    """Why ``impl`` cannot be an implementation, or ``None``: the subclass door's contract is
    checked here (``_attend`` overridden), the function door's when the function is called."""
    if isinstance(impl, type):
        if not issubclass(impl, AttentionBase):
            return f"{_describe(impl)} is not a subclass of attention.AttentionBase (or a plain attn(q, k, v) function)"
        if impl._attend is AttentionBase._attend:
            return f"{_describe(impl)} does not override _attend(q, k, v, *, q_offset, document_ids): it cannot attend"
        return _attend_problem(impl)
    if isinstance(impl, AttentionBase):
        return f"{_describe(impl)} is a module instance: register its class, {_describe(type(impl))}"
    if not callable(impl):
        return f"{_describe(impl)} is neither an AttentionBase subclass nor a plain attn(q, k, v) function"
    return None


def _attend_problem(cls: type[AttentionBase]) -> str | None:
    """Why ``cls._attend`` cannot take the call every forward makes, or ``None``: refused when the
    class is registered, not as a bare ``TypeError`` from inside each test or benchmark."""
    try:  # the method's own signature: a decorator's wrapper is what the forward calls
        signature = inspect.signature(cls._attend, follow_wrapped=False)
    except (TypeError, ValueError):  # no signature to read: the first call will tell
        return None
    try:
        signature.bind(None, None, None, None, q_offset=0, document_ids=None)
    except TypeError as error:
        return (
            f"{_describe(cls)}._attend{signature} cannot take the call every forward makes, "
            f"_attend(q, k, v, *, q_offset, document_ids) ({error})"
        )
    return None


def _is_package_of(name: str | None, module_name: str) -> TypeGuard[str]:
    """Whether ``name`` is ``module_name`` or a package above it: the spec's own module is missing,
    not a module that its code imports."""
    return name is not None and (module_name == name or module_name.startswith(name + "."))


def _as_path(module_name: str) -> str:
    """What to give instead of a file path: the module's import name, counted from the first
    folder up that is not a package (no ``__init__.py``), and that folder on sys.path."""
    path = Path(module_name.replace("\\", "/"))
    parts = [path.name.removesuffix(".py").lstrip(".")]
    folder = path.parent.resolve()
    while (folder / "__init__.py").is_file() and folder != folder.parent:
        parts.insert(0, folder.name)
        folder = folder.parent
    where = (
        "from this folder, on sys.path (python -m puts it there; a bare pytest needs PYTHONPATH=.)"
        if folder == Path.cwd().resolve()
        else f"with its folder on sys.path (PYTHONPATH={folder}, or run python -m from there)"
    )
    return f"{module_name!r} looks like a file path; give the module's import name ({'.'.join(parts)}:...) {where}"


def _not_found(module_name: str, missing: str) -> str:
    """Why the spec's own module was not found, and what to do: a file path given for a module
    name, a package without that submodule, or a folder missing from ``sys.path``."""
    if module_name.endswith(".py"):
        return _as_path(module_name)
    package, _, child = missing.rpartition(".")
    if package:
        return f"no module {missing!r}: package {package} has no module {child}"
    return (
        f"no module {missing!r} on sys.path; add its folder to PYTHONPATH (python -m puts the "
        "current folder on sys.path; a bare pytest does not)"
    )


def resolve(spec: str) -> str:
    """The registered name ``spec`` stands for: a name already registered, or ``"module:attr"``
    (an AttentionBase subclass or a plain function), imported and registered under ``attr``'s
    last part, or ``"NAME=module:attr"``, registered under ``NAME`` (two versions of one function,
    or one named like a built-in). A clear ``ValueError`` says what is wrong with a spec that is neither."""
    if not isinstance(spec, str):
        raise TypeError(f"an implementation spec must be a str, got {type(spec).__name__} ({spec!r})")
    known = implementations()
    if spec in known:
        return spec
    alias, eq, target = spec.partition("=")
    if not eq or ":" in alias:
        alias, target = "", spec
    elif not alias.isidentifier():
        raise ValueError(f"{spec}: the name before '=' must be an identifier, got {alias!r}")
    module_name, sep, attr = target.rpartition(":")  # the last ':': a Windows path keeps its drive
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown implementation {spec!r}; registered: {', '.join(known)} "
            "(or give module:attr, or NAME=module:attr; a register() call in a conftest.py reaches pytest runs only)"
        )
    if module_name.startswith(".") or "/" in module_name or "\\" in module_name:
        raise ValueError(f"{spec}: {_as_path(module_name)}")
    try:
        obj: Any = importlib.import_module(module_name)  # then whatever attr names: checked below
    except Exception as error:  # the user's module: a SyntaxError or whatever its top level raises
        if isinstance(error, ModuleNotFoundError) and _is_package_of(error.name, module_name):
            raise ValueError(f"{spec}: {_not_found(module_name, error.name)}") from None
        raise ValueError(
            f"{spec}: cannot import {module_name} ({type(error).__name__}: {error}){_raised_at(error)}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{spec}: {module_name} has no attribute {attr}") from None
    problem = _class_problem(obj)
    if problem is not None:
        raise ValueError(f"{spec}: {problem}")
    try:
        cls = _as_class(obj)
    except TypeError as error:  # from_function refusing the function's signature
        raise ValueError(f"{spec}: {error}") from None
    for name, registered in known.items():
        if registered is cls and (not alias or name == alias):
            return name
    name = alias or attr.rsplit(".", 1)[-1]
    if name in known:
        raise ValueError(
            f"{spec}: the name {name!r} is taken ({_describe(known[name])}); name this one yourself: {name}_2={target}"
        )
    _sources[name] = target
    register(name, cls)
    return name


def _names_an_implementation(arg: str) -> bool:
    """Whether a command-line word names an implementation (a registered name, ``module:attr``,
    ``NAME=module:attr``) and not a file, a folder or a pytest node id."""
    if "::" in arg or Path(arg).exists():
        return False
    if arg in implementations():
        return True
    alias, eq, target = arg.partition("=")
    module_name, sep, attr = (target if eq and alias.isidentifier() else arg).rpartition(":")
    return bool(sep) and all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()


def bare_words(args: list[str]) -> list[str]:
    """The words of a command line that are neither options nor, as far as can be told, an
    option's value: a word right after an option without ``=`` may be its value (``-k sdpa``)."""
    return [
        arg
        for i, arg in enumerate(args)
        if not arg.startswith("-") and not (i and args[i - 1].startswith("-") and "=" not in args[i - 1])
    ]


def misplaced_specs(args: list[str], flag: str) -> str | None:
    """Why words pytest is about to take as test paths are implementations (one given after
    another's ``flag``, or without it), or ``None``."""
    stray = [arg for arg in bare_words(args) if _names_an_implementation(arg)]
    if not stray:
        return None
    each = " ".join(f"{flag} {spec}" for spec in stray)
    return f"{', '.join(stray)}: an implementation, not a test path: name each with its own {flag} ({each})"


def source(name: str) -> str | None:
    """``"module:attr"`` that implementation ``name`` was loaded from (``None`` for a built-in):
    the same-run A/B loads it from there at another revision of its repository."""
    get(name)
    return _sources.get(name)


def _distribution(ep: EntryPoint) -> str | None:
    """``"name version"`` of the distribution that declares ``ep``, if known."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    name = getattr(dist, "name", None)
    if name is None:
        try:
            name = dist.metadata["Name"]
        except Exception:  # a broken METADATA must not hide the plugin's own problem
            name = None
    version = getattr(dist, "version", None)
    return " ".join(str(part) for part in (name, version) if part) or None


def _describe(cls: object) -> str:
    if isinstance(cls, type):
        return f"{cls.__module__}.{cls.__qualname__}"
    return repr(cls)


def _plugin_problem(ep: EntryPoint) -> str | None:
    """Register the implementation ``ep`` points to; ``None`` if that worked, else why not."""
    name = ep.name
    if not name.isidentifier():
        return f"its name {name!r} is not an identifier-like string"
    if name in _BUILTINS:
        return f"{name!r} is the name of a built-in implementation ({_BUILTINS[name].__name__})"
    try:
        impl = ep.load()
    except Exception as error:  # the plugin's own bug: ImportError, SyntaxError, AttributeError...
        return f"loading it raised {type(error).__name__}: {error}"
    problem = _class_problem(impl)
    if problem is not None:
        return problem
    try:
        cls = _as_class(impl)
    except TypeError as error:  # from_function refusing the function's signature, as in resolve()
        return str(error)
    if _registry.get(name, cls) is not cls:
        return f"an implementation named {name!r} is already registered ({_describe(_registry[name])})"
    _registry[name] = cls
    _sources[name] = ep.value
    return None


def _raised_at(error: BaseException) -> str:
    """`` at FILE:LINE``, the user's line that raised ``error`` while their module was imported: the
    deepest frame outside this package (a ``from_function`` refusal is raised in here, and the
    line to fix is the user's call), else the deepest; nothing for a ``SyntaxError``, whose
    message says where."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<frozen")]
    theirs = [f for f in frames if not Path(f.filename).resolve().is_relative_to(_PACKAGE)] or frames
    if isinstance(error, SyntaxError) or not theirs:
        return ""
    return f" at {theirs[-1].filename}:{theirs[-1].lineno}"


def _outside_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning from the caller of this function point at the first
    frame outside this module (whoever read the registry), however deep the call came in."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


def _load_entry_points() -> None:
    global _entry_points_loaded
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = _distribution(ep)
        key = (ep.name, ep.value, dist)
        if key in _entry_points_tried:
            continue
        _entry_points_tried.add(key)
        try:
            problem = _plugin_problem(ep)
        except BaseException:  # Ctrl-C or SystemExit mid-import: try this one again next time
            _entry_points_tried.discard(key)
            raise
        if problem is not None:
            source = f" from distribution {dist}" if dist else ""
            warnings.warn(
                f"skipped the {ENTRY_POINT_GROUP} entry point '{ep.name} = {ep.value}'{source}: {problem}",
                PluginWarning,
                stacklevel=_outside_stacklevel(),
            )
    _entry_points_loaded = True


def implementations() -> dict[str, type[AttentionBase]]:
    """Every registered implementation, name -> class (built-ins first, then plugins)."""
    if not _entry_points_loaded:
        _load_entry_points()
    return dict(_registry)


def get(name: str) -> type[AttentionBase]:
    """The implementation registered as ``name``; a clear error lists the known names."""
    if not isinstance(name, str):
        raise TypeError(f"implementation name must be a str, got {type(name).__name__} ({name!r})")
    known = implementations()
    if name not in known:
        raise ValueError(f"unknown implementation {name!r}; registered: {', '.join(known)}")
    return known[name]
