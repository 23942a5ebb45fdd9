"""The base side of a same-run A/B: another git revision's implementations, importable beside ours.

:class:`BaseRevision` checks the revision out into a temporary worktree (:mod:`.revision`),
imports its ``attention`` package under another name and hands out its built-in
implementations. The working tree's harness (grid, builders, timer) times both sides, so a
change to the harness never shows up as a change in speed: the A/B measures the library.
Plugins (entry points, ``register()`` calls) are the same code on both sides, so both sides
build them from the working tree's registry.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from ... import registry
from . import revision


class BaseRevision:
    """``rev``, checked out and imported until :meth:`close` (also a context manager)."""

    def __init__(self, rev: str, repo: Path | str = ".") -> None:
        self.repo = revision.repo_root(repo)
        self.sha = revision.resolve(rev, self.repo)
        self.rev = rev
        self.label = f"{rev} = {revision.describe(self.sha, self.repo)}"
        self._stack = ExitStack()
        try:
            # Held for a whole pytest session, which handles SIGINT itself; perf/conftest.py turns
            # SIGTERM into a clean pytest exit, so close() runs then too.
            tree = self._stack.enter_context(revision.worktree(self.sha, self.repo, signals=False))
            package = revision.load_package(tree / "attention", f"attention_base_{self.sha[:12]}")
            self._stack.callback(revision.forget_package, package.__name__)
            builtins = _builtins_of(package)
        except BaseException:
            self._stack.close()
            raise
        ours = registry.builtin_implementations()
        plugins = {name: cls for name, cls in registry.implementations().items() if name not in ours}
        self.implementations = {**builtins, **plugins}
        self.tree = tree

    def only_in_base(self) -> list[str]:
        """Implementations the base has and the working tree does not."""
        return sorted(set(self.implementations) - set(registry.implementations()))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> BaseRevision:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
