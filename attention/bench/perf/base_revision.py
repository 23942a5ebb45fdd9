"""The base side of a same-run A/B: each implementation under test as git revision REV of its own repository builds it.

An implementation that is not a built-in was loaded from ``module:attr``
(:func:`attention.registry.source`). The git repository holding that module's top-level
package (found from the package's ``__file__``) is checked out at REV into a temporary worktree
(:mod:`.revision`), the package imported from there under another name, absolute self-imports
included (:func:`.revision.load_module_at`), and the same attribute resolved: that is the base.

Built-ins come from this library's own checkout at REV when the run is inside that checkout
(imported under another name: the package imports itself relatively). Where ``attention`` is
installed, or the run is in another repository, they are the same code on both sides: they are
timed once and listed as not compared (:attr:`BaseRevision.not_compared`), as is a plugin
installed outside any git checkout.

The working tree's harness (grid, builders, timer) times both sides, so a change to the harness
never shows up as a change in speed: the A/B measures the implementations.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ... import registry
from ...function import from_function
from . import revision

ATTENTION = Path(registry.__file__).resolve().parent


@dataclass
class _Source:
    """One implementation under test that is not a built-in: where it comes from."""

    name: str
    module: str  # "my_pkg.attn"
    attr: str  # "MyAttention"
    location: Path  # the head's copy of the top-level package (folder or file)


@dataclass
class Plan:
    """What an A/B of ``names`` at REV checks out, decided without checking anything out:
    repository root -> its full SHA of REV and the implementations it provides."""

    shas: dict[Path, str] = field(default_factory=dict)
    sources: dict[Path, list[_Source]] = field(default_factory=dict)
    builtins: list[str] = field(default_factory=list)  # compared against this library's checkout at REV
    not_compared: dict[str, str] = field(default_factory=dict)  # name -> why


def own_checkout(cwd: Path | None = None) -> Path | None:
    """The root of the git checkout ``attention`` is imported from, when ``cwd`` is inside it."""
    try:
        root = revision.repo_root(ATTENTION.parent)
        here = revision.repo_root(cwd or Path.cwd())
    except revision.RevisionError:
        return None
    return root if root == here and root / "attention" == ATTENTION else None


def plan(rev: str, names: Iterable[str], cwd: Path | None = None) -> Plan:
    """Where the base side of each of ``names`` comes from; REV resolved in every repository
    (an unknown revision raises :class:`.revision.RevisionError` here, before anything runs)."""
    out = Plan()
    ours = own_checkout(cwd)
    builtins = registry.builtin_implementations()
    for name in names:
        if name in builtins:
            if ours is None:
                out.not_compared[name] = (
                    f"a built-in of attention, imported from {ATTENTION}, and this run is not inside that git "
                    "checkout: the same code on both sides"
                )
                continue
            out.builtins.append(name)
            root = ours
        else:
            module, _, attr = (registry.source(name) or "").partition(":")
            location = revision.module_location(module.partition(".")[0])
            try:
                root = revision.repo_root(location.parent)
            except revision.RevisionError:
                root = None
            if root is None or not revision.is_tracked(location, root):
                out.not_compared[name] = (
                    f"{module} is imported from {location}, which no git checkout tracks: the same code on both sides"
                )
                continue
            out.sources.setdefault(root, []).append(_Source(name, module, attr, location))
        if root not in out.shas:
            out.shas[root] = revision.resolve(rev, root)
    if not out.shas:
        raise revision.RevisionError(
            "nothing to compare: " + "; ".join(f"{name}: {why}" for name, why in out.not_compared.items())
        )
    return out


class BaseRevision:
    """``rev`` of the repositories of the implementations ``names``, checked out and imported
    until :meth:`close` (also a context manager). ``implementations``: name -> the base's class
    (an implementation REV lacks is absent); ``not_compared``: name -> why it has no base side."""

    def __init__(self, rev: str, names: Iterable[str], cwd: Path | None = None) -> None:
        self.rev = rev
        self.plan = plan(rev, list(names), cwd)
        self.not_compared = dict(self.plan.not_compared)
        self.implementations: dict[str, type] = {}
        self.trees: dict[Path, Path] = {}
        self._base_builtins: dict[str, type] = {}
        self._stack = ExitStack()
        try:
            for root, sha in self.plan.shas.items():
                # Held for a whole pytest session, which handles SIGINT itself; the plugin turns
                # SIGTERM into a clean pytest exit, so close() runs then too.
                self.trees[root] = self._stack.enter_context(revision.worktree(sha, root, signals=False))
            if self.plan.builtins:
                self._load_builtins()
            for root, sources in self.plan.sources.items():
                for source in sources:
                    self._load(root, source)
        except BaseException:
            self._stack.close()
            raise
        labels = {root: f"{rev} = {revision.describe(sha, root)}" for root, sha in self.plan.shas.items()}
        self.label = _joined(labels)
        self.head_label = _joined({root: head_label(root) for root in self.plan.shas})

    def _load_builtins(self) -> None:
        root = ATTENTION.parent
        sha = self.plan.shas[root]
        package = revision.load_package(self.trees[root] / "attention", f"attention_base_{sha[:12]}")
        self._stack.callback(revision.forget_package, package.__name__)
        self._base_builtins = _builtins_of(package)
        self.implementations.update({n: self._base_builtins[n] for n in self.plan.builtins if n in self._base_builtins})

    def _load(self, root: Path, source: _Source) -> None:
        """The base's copy of ``source``; absent where REV has no such module or attribute."""
        top = source.module.partition(".")[0]
        sha = self.plan.shas[root]
        location = self.trees[root] / source.location.relative_to(root)
        alias = f"{top}_base_{sha[:12]}"
        self._stack.callback(revision.forget_package, alias)
        if not location.exists():
            return
        try:
            obj = revision.load_module_at(location, source.module, alias)
            for part in source.attr.split("."):
                obj = getattr(obj, part)
        except (ModuleNotFoundError, AttributeError):
            return
        except Exception as exc:
            raise revision.RevisionError(
                f"cannot import {source.module} at {self.rev} ({sha[:12]}): {type(exc).__name__}: {exc}"
            ) from exc
        self.implementations[source.name] = obj if isinstance(obj, type) else from_function(obj)

    def only_in_base(self) -> list[str]:
        """Built-ins the base has and the working tree does not."""
        return sorted(set(self._base_builtins) - set(registry.implementations()))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> BaseRevision:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _joined(labels: dict[Path, str]) -> str:
    """One repository's label as it is; several, each after its folder's name."""
    if len(labels) == 1:
        return next(iter(labels.values()))
    return "; ".join(f"{root.name}: {label}" for root, label in labels.items())


def _builtins_of(package) -> dict[str, type]:
    """The base's own implementations. Its entry points are never loaded: a plugin class
    subclasses our AttentionBase, which the base's register() would refuse."""
    if hasattr(package.registry, "builtin_implementations"):
        return package.registry.builtin_implementations()
    return dict(package.registry._registry)  # revisions before builtin_implementations(): built-ins only until read


def head_label(repo: Path | str = ".") -> str:
    """What the working tree is, for reports: its HEAD commit, marked dirty when edited."""
    root = revision.repo_root(repo)
    sha = revision.resolve("HEAD", root)
    dirty = " + uncommitted changes" if revision.is_dirty(root) else ""
    return f"working tree ({revision.describe(sha, root)}{dirty})"
