"""The git half of ``--benchmark-compare=REV``: check REV out beside the working tree, import it under another name.

A same-run A/B comparison times both revisions in one process, on one warmed-up GPU, so clock
and thermal drift between two separate runs cannot pass for a regression. To get the base
revision without touching the user's checkout, REV goes into a temporary *detached* git worktree
(no branch is created; HEAD, the index and the working tree stay as they are), which is removed
afterwards, also on Ctrl-C, SIGTERM or an exception; one a SIGKILL left behind (a CI timeout)
is removed by the next A/B (:func:`remove_stale_worktrees`). :func:`load_package` then imports that
revision's ``attention`` package as ``attention_base``, which works because the package only
uses relative imports; :func:`load_module_at` does the same for a user's package, which may
import itself by absolute name.

Standard library only, so it is importable (and tested) without torch or a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Variables that make git ignore ``cwd`` for the repository or index. Set while running from a
#: git hook (a pre-commit hook sets GIT_INDEX_FILE), they would aim the temporary checkout at the
#: user's own index, so every git call here drops them.
_REPO_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_PREFIX")

#: A full object name: SHA-1, or SHA-256 in a repository that uses it.
_FULL_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")

#: The longest commit subject :func:`describe` shows, so labels fit in a table header.
SUBJECT_MAX = 50

_FETCH_HINT = "fetch it (CI: actions/checkout with fetch-depth: 0)"
_NO_COMMITS_HINT = "the repository has no commits yet: commit the code to compare against first"

#: Each A/B's temporary folder: ``<parent>/attention-compare-XXXX/`` holding the worktree
#: ``base-<sha12>/`` and the owner file, written before the worktree is added.
_PREFIX = "attention-compare-"
_OWNER = "owner.json"


class RevisionError(Exception):
    """REV cannot be used (no git, not a repo, unknown revision, worktree failure); the CLI maps it to exit status 2."""


def _git(repo: Path | str, *args: str, detach: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``git ARGS`` in ``repo``; ``detach`` puts git in its own session so a second Ctrl-C spares the cleanup."""
    env = {key: value for key, value in os.environ.items() if key not in _REPO_ENV}
    try:
        return subprocess.run(
            ["git", *args],
            cwd=repo,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            check=False,
            env=env,
            start_new_session=detach,
        )
    except FileNotFoundError as exc:
        if not Path(repo).is_dir():
            raise RevisionError(f"{repo} is not a directory") from exc
        raise RevisionError("git is not installed (or not on PATH); --benchmark-compare needs it") from exc


def _stderr(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join(proc.stderr.split()) or f"git exited with status {proc.returncode}"


def repo_root(start: Path | str = ".") -> Path:
    """The top of the git working tree holding ``start``: REV is looked up there, not in the installed package."""
    start = Path(start)
    if not start.is_dir():
        raise RevisionError(f"{start} is not a directory")
    proc = _git(start, "rev-parse", "--show-toplevel")
    top = proc.stdout.strip()
    if proc.returncode != 0 or not top:
        raise RevisionError(f"{start.resolve()} is not inside a git repository's working tree ({_stderr(proc)})")
    return Path(top).resolve()


def _reject_option(rev: str) -> None:
    # "--output=FILE" and friends would reach git as options, not revisions.
    if not rev or rev.startswith("-"):
        raise RevisionError(f"invalid git revision {rev!r}: it must name a commit and not start with '-'")


def _is_shallow(repo: Path) -> bool:
    proc = _git(repo, "rev-parse", "--is-shallow-repository")
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def resolve(rev: str, repo: Path) -> str:
    """The full SHA of the commit ``rev`` names, so labels and the worktree stay fixed even if the ref moves."""
    _reject_option(rev)
    root = repo_root(repo)
    proc = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    sha = proc.stdout.strip()
    if proc.returncode != 0 or not _FULL_SHA.fullmatch(sha):
        if not _has_commits(root):
            raise RevisionError(f"unknown git revision {rev!r} in {root}: {_NO_COMMITS_HINT}")
        shallow = " (this clone is shallow)" if _is_shallow(root) else ""
        raise RevisionError(f"unknown git revision {rev!r} in {root}{shallow}: {_FETCH_HINT}")
    return sha


def _has_commits(repo: Path) -> bool:
    """Whether any ref reaches a commit: in a fresh ``git init`` nothing can be fetched deeper."""
    proc = _git(repo, "rev-list", "-n", "1", "--all")
    return proc.returncode != 0 or bool(proc.stdout.strip())


def describe(sha: str, repo: Path) -> str:
    """``"a1b2c3d (subject line)"``: a label a reader recognises, where a bare SHA says nothing."""
    _reject_option(sha)
    # log.showSignature would mix gpg output into stdout.
    proc = _git(repo, "-c", "log.showSignature=false", "log", "-1", "--format=%h%x1f%s", sha, "--")
    short, sep, subject = proc.stdout.strip().partition("\x1f")
    if proc.returncode != 0 or not sep:
        raise RevisionError(f"cannot describe git revision {sha!r} in {repo}: {_stderr(proc)}")
    subject = subject.strip()
    if len(subject) > SUBJECT_MAX:
        subject = subject[: SUBJECT_MAX - 1] + "…"
    return f"{short} ({subject})" if subject else short


def is_dirty(repo: Path) -> bool:
    """Whether tracked files differ from HEAD (staged or not), so the head side is labelled "working tree (dirty)"."""
    # --no-optional-locks: a status refresh must not rewrite the user's index.
    proc = _git(repo, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    if proc.returncode != 0:
        raise RevisionError(f"git status failed in {repo}: {_stderr(proc)}")
    return bool(proc.stdout.strip())


class _Unwind:
    """A signal handler that raises, so a ``finally`` (the worktree cleanup) runs on SIGINT/SIGTERM.

    While held (during the cleanup itself) a signal is remembered, not raised, so a second
    Ctrl-C cannot cut the cleanup short; :meth:`release` raises it once the cleanup is done.
    """

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.held = False
        self.pending: int | None = None

    def __call__(self, signum: int, frame: types.FrameType | None) -> None:
        if self.held:
            self.pending = signum
            return
        raise _signal_exception(signum)

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        pending, self.pending = self.pending, None
        if pending is not None:
            raise _signal_exception(pending)


def _signal_exception(signum: int) -> BaseException:
    # What the default handlers amount to: Ctrl-C -> KeyboardInterrupt; SIGTERM -> exit status 128+N.
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


@contextmanager
def _unwinding_signals(install: bool = True) -> Iterator[_Unwind]:
    """Install :class:`_Unwind` for SIGINT and SIGTERM for the block; restore the previous handlers
    afterwards. ``install=False``: the caller handles signals itself (the cleanup still holds none)."""
    unwind = _Unwind()
    try:
        # Python only lets the main thread set handlers; elsewhere the cleanup covers exceptions only.
        if install and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.getsignal(signum)
                # Ignored on purpose (nohup, a background job) or set outside Python (cannot be restored): leave it.
                if previous is None or previous == signal.SIG_IGN:
                    continue
                try:
                    unwind.previous[signum] = signal.signal(signum, unwind)
                except ValueError:  # not the main interpreter
                    break
        yield unwind
    finally:
        for signum, previous in unwind.previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]


def _remove_worktree(repo: Path, path: Path, tmp: Path) -> None:
    """Undo ``git worktree add``, also a half-done one (killed mid-checkout, still locked as "initializing")."""
    _git(repo, "worktree", "unlock", str(path), detach=True)
    _git(repo, "worktree", "remove", "--force", str(path), detach=True)
    shutil.rmtree(path, ignore_errors=True)  # the owner file goes last: a cleanup cut short is found again
    shutil.rmtree(tmp, ignore_errors=True)
    _git(repo, "worktree", "prune", detach=True)  # after the rmtree, so an entry whose directory is gone goes too
    if tmp.exists():
        warnings.warn(f"could not remove the temporary worktree {tmp}; delete it by hand", RuntimeWarning, stacklevel=3)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks since boot), so a reused pid is told apart; else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, counted after the command name


def _owner(repo: Path) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()), "repo": str(repo)}


def _alive(owner: dict) -> bool:
    """Whether the process that wrote ``owner`` may still be running (on another host: assumed so)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    started = owner.get("started")
    return started is None or _process_start(pid) in (None, started)


def _dead_owner(tmp: Path) -> dict | None:
    """The owner record of A/B folder ``tmp`` if its process is gone (SIGKILL, a CI timeout, a
    power cut); ``None`` where it is alive, or the folder has no record or is another user's: not
    provably ours to remove."""
    try:
        if tmp.is_symlink() or tmp.stat().st_uid != os.getuid():
            return None
        owner = json.loads((tmp / _OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and not _alive(owner) else None


def _registered(repo: Path) -> list[Path]:
    """The folders of ``repo``'s worktrees (``git worktree list``)."""
    proc = _git(repo, "worktree", "list", "--porcelain")
    return [Path(line[len("worktree ") :]) for line in proc.stdout.splitlines() if line.startswith("worktree ")]


def remove_stale_worktrees(repo: Path, parent: Path | None = None) -> list[Path]:
    """Remove the A/B folders whose process died without cleaning up, and their worktrees; returns them.

    A SIGKILL leaves no ``finally`` to run, so the next A/B does it: it looks at the A/B folders in
    ``parent`` (default: the temporary folder) and at those ``repo``'s worktrees live in, and
    removes each whose owner file names a process of this host that is gone (pid and start time,
    so a reused pid does not count). A folder without an owner file, or owned by a live process or
    another host, is left alone.
    """
    folders = {p.parent for p in _registered(repo) if p.parent.name.startswith(_PREFIX)}
    scan = Path(parent or tempfile.gettempdir()).resolve()  # its entries unresolved: a symlink is not ours
    folders.update(p for p in scan.glob(f"{_PREFIX}*") if p.is_dir())
    removed = []
    for tmp in sorted(folders):
        owner = _dead_owner(tmp)
        if owner is None:
            continue
        home = Path(str(owner.get("repo")))  # the repository the worktree was added to
        home = home if home.is_absolute() and home.is_dir() else repo
        trees = [path for path in tmp.glob("base-*") if not path.is_symlink()]
        for path in trees or [tmp]:  # none: killed before `git worktree add`
            _remove_worktree(home, path, tmp)
        removed.append(tmp)
    return removed


@contextmanager
def worktree(rev: str, repo: Path, *, parent: Path | None = None, signals: bool = True) -> Iterator[Path]:
    """Yield a temporary detached worktree of ``rev``: the base side of the A/B, without touching the user's checkout.

    ``git worktree add --detach`` creates no branch and leaves HEAD, the index and the working
    tree alone; on exit the worktree is removed (``git worktree remove --force``, the temporary
    directory, ``git worktree prune``), also on SIGINT/SIGTERM, which raise KeyboardInterrupt /
    SystemExit(128+signum) for the duration so this ``finally`` runs. Hooks are off for the
    checkout, so a user's post-checkout hook does not run against a throwaway tree.
    ``signals=False`` leaves signal handling to the caller: one that holds the worktree for a long
    run (a pytest session) must not have SIGTERM raised inside whatever it is doing.
    """
    root = repo_root(repo)
    sha = resolve(rev, root)
    with _unwinding_signals(signals) as unwind:
        tmp: Path | None = None
        path = Path()
        try:
            remove_stale_worktrees(root, parent)
            try:
                tmp = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent)).resolve()
                (tmp / _OWNER).write_text(json.dumps(_owner(root)), encoding="utf-8")
            except OSError as exc:
                raise RevisionError(f"cannot create a temporary directory for the worktree of {rev!r}: {exc}") from exc
            path = tmp / f"base-{sha[:12]}"
            proc = _git(root, "-c", "core.hooksPath=/dev/null", "worktree", "add", "--detach", str(path), sha)
            if proc.returncode != 0:
                raise RevisionError(f"cannot check out {rev!r} ({sha[:12]}) into a worktree: {_stderr(proc)}")
            yield path
        finally:
            if tmp is not None:
                unwind.hold()
                try:
                    _remove_worktree(root, path, tmp)
                finally:
                    unwind.release()


def forget_package(name: str) -> None:
    """Drop package ``name`` and its submodules from ``sys.modules`` (after its files are gone)."""
    for key in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
        del sys.modules[key]


def load_package(path: Path, name: str = "attention_base") -> types.ModuleType:
    """Import the package directory ``path`` as top-level module ``name``, so two revisions coexist in one process.

    Submodules resolve from ``path`` (``name.sub``), which holds as long as the package imports
    itself relatively: an absolute ``import attention`` inside it would silently get the head's
    package. Import everything the caller needs before the worktree is removed: a later lazy
    import would find no files. Loading ``name`` again from the same path returns the loaded module.
    """
    path = Path(path).resolve()
    init = path / "__init__.py"
    if not name.isidentifier():
        raise RevisionError(f"{name!r} is not a valid top-level module name")
    if not init.is_file():
        raise RevisionError(
            f"{path} has no __init__.py: the revision must have its package at <repo>/{path.name}/ "
            "(the layout of this tree); an older layout cannot be compared"
        )
    existing = sys.modules.get(name)
    if existing is not None:
        origin = getattr(existing, "__file__", None)
        if origin is not None and Path(origin).resolve() == init:
            return existing
        raise RevisionError(f"module {name!r} is already loaded from {origin}, not from {path}")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
    if spec is None or spec.loader is None:
        raise RevisionError(f"cannot import {path} as {name!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: relative imports and dataclasses look the package up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        forget_package(name)
        raise RevisionError(f"cannot import {path} as {name!r}: {type(exc).__name__}: {exc}") from exc
    except BaseException:
        forget_package(name)
        raise
    return module


def is_tracked(path: Path, root: Path) -> bool:
    """Whether git tracks ``path`` (a file, or a folder with tracked files) in the repository at ``root``."""
    proc = _git(root, "ls-files", "--error-unmatch", "--", str(Path(path).resolve().relative_to(root)))
    return proc.returncode == 0


def module_location(top: str) -> Path:
    """Where top-level module ``top`` is imported from: its package's folder, or its file."""
    module = importlib.import_module(top)
    origin = getattr(module, "__file__", None)
    if origin is None:  # a namespace package: its first folder
        return Path(next(iter(module.__path__))).resolve()
    origin = Path(origin).resolve()
    return origin.parent if origin.name == "__init__.py" else origin


def _take(name: str) -> dict[str, types.ModuleType]:
    """Remove module ``name`` and its submodules from ``sys.modules``, returning them."""
    return {key: sys.modules.pop(key) for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]}


def load_module_at(location: Path, module: str, alias: str) -> types.ModuleType:
    """Import ``module`` from another copy of its top-level package, at ``location`` (that copy's
    folder, or file for a one-file module), and file that copy's modules under ``alias``.

    A package that imports itself by absolute name (``from my_pkg.x import f``) would get the
    already imported copy's modules; so while importing, the imported copy's ``my_pkg*`` entries
    leave ``sys.modules`` (earlier loads of the other copy come back under their own names) and
    ``location``'s folder comes first on ``sys.path``. Afterwards the other copy's modules are
    filed as ``alias``, ``alias.x``, ... and the imported copy's entries are put back, so both
    live side by side. Imports the other copy runs later, inside its functions, find the imported
    copy's modules: import at module level what the implementation needs.
    """
    top = module.partition(".")[0]
    if not alias.isidentifier():
        raise RevisionError(f"{alias!r} is not a valid top-level module name")
    entry = str(Path(location).resolve().parent)
    head = _take(top)
    sys.modules.update({top + key[len(alias) :]: mod for key, mod in _take(alias).items()})
    sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(entry)
        sys.modules.update({alias + key[len(top) :]: mod for key, mod in _take(top).items()})
        sys.modules.update(head)
        importlib.invalidate_caches()
