"""attention.bench.perf.revision: REV checked out beside the user's tree and removed again, imported under another name.

Every git test runs on a throwaway repository and checks that the user's side (HEAD, index,
working tree, branches, worktree list) is exactly as before, also after an exception, SIGINT
or SIGTERM inside the block. CPU only, no torch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from attention.bench.perf import revision
from attention.bench.perf.revision import (
    RevisionError,
    describe,
    is_dirty,
    load_package,
    repo_root,
    resolve,
    worktree,
)

from .perf_support import GIT_ENV, needs_git

MODULE = Path(__file__).resolve().parents[1] / "attention" / "bench" / "perf" / "revision.py"
LONG_SUBJECT = "second: the value is new now, and this subject line is much longer than fifty characters"


@pytest.fixture(autouse=True)
def isolated_git(monkeypatch, tmp_path):
    """Keep the user's git config and any enclosing repository out of these tests."""
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(key, raising=False)


def git(repo: Path, *args: str) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("GIT_INDEX_FILE", "GIT_DIR")}
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, env=env).stdout


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def repo(tmp_path) -> Path:
    """Three commits: pkg/ with VALUE = "old", then "new" (long subject), then an unrelated README edit.

    ``old`` is a branch at the first commit and ``v1`` an annotated tag on it.
    """
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    write(root / "pkg" / "__init__.py", "from .value import VALUE\n")
    write(root / "pkg" / "value.py", 'VALUE = "old"\n')
    write(root / "README", "first\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first: old value")
    git(root, "branch", "old")
    git(root, "tag", "-a", "v1", "-m", "version 1")
    write(root / "pkg" / "value.py", 'VALUE = "new"\n')
    git(root, "commit", "-q", "-am", LONG_SUBJECT)
    write(root / "README", "third\n")
    git(root, "commit", "-q", "-am", "third: readme")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """What the user would notice changing: HEAD, branch, refs, index, working tree, worktrees."""
    return {
        "head": git(root, "rev-parse", "HEAD"),
        "symbolic": git(root, "symbolic-ref", "-q", "HEAD"),
        "refs": git(root, "for-each-ref"),
        "branches": git(root, "branch", "--list"),
        "index": git(root, "ls-files", "--stage"),
        "status": git(root, "status", "--porcelain", "--untracked-files=all"),
        "worktrees": git(root, "worktree", "list", "--porcelain"),
        "files": "\n".join(f"{p}: {p.read_text()}" for p in sorted((root / "pkg").glob("*.py"))),
    }


@pytest.fixture
def module_names():
    """Names handed to load_package, dropped from sys.modules (with submodules) afterwards."""
    names: list[str] = []

    def make(stem: str) -> str:
        name = f"_perf_revision_test_{stem}_{len(names)}"
        names.append(name)
        return name

    yield make
    for name in names:
        for key in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
            del sys.modules[key]


# -- repo_root / resolve / describe / is_dirty ------------------------------------------------------


@needs_git
def test_repo_root_from_a_subdirectory(repo):
    assert repo_root(repo / "pkg") == repo.resolve()


@needs_git
def test_repo_root_outside_a_repository(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(RevisionError, match="not inside a git repository") as info:
        repo_root(plain)
    assert str(plain) in str(info.value)


def test_no_git_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RevisionError, match="git is not installed"):
        repo_root(tmp_path)


@needs_git
def test_resolve_gives_the_full_sha(repo):
    head, parent, first = git(repo, "rev-list", "HEAD").split()
    assert resolve("HEAD", repo) == head
    assert resolve("HEAD~1", repo) == parent
    assert resolve("old", repo) == first  # branch
    assert resolve("v1", repo) == first  # annotated tag, peeled to its commit
    assert resolve(first[:8], repo) == first  # short SHA
    assert resolve(head, repo) == head
    assert resolve("HEAD", repo / "pkg") == head  # from a subdirectory


@needs_git
def test_resolve_unknown_revision_names_it_and_hints_fetch(repo):
    with pytest.raises(RevisionError, match=r"unknown git revision 'origin/main'.*fetch") as info:
        resolve("origin/main", repo)
    assert str(repo.resolve()) in str(info.value)
    with pytest.raises(RevisionError, match="unknown git revision 'HEAD~9'"):
        resolve("HEAD~9", repo)
    with pytest.raises(RevisionError, match="unknown git revision"):
        resolve("HEAD^{tree}", repo)  # names an object, but not a commit


@needs_git
@pytest.mark.parametrize("rev", ["-h", "--output=/tmp/x", "--all", ""])
def test_resolve_rejects_options(repo, rev):
    with pytest.raises(RevisionError, match="invalid git revision"):
        resolve(rev, repo)


@needs_git
def test_resolve_outside_a_repository(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(RevisionError, match="not inside a git repository") as info:
        resolve("HEAD", plain)
    assert str(plain) in str(info.value)


@needs_git
def test_describe(repo):
    first = resolve("old", repo)
    assert describe(first, repo) == f"{git(repo, 'rev-parse', '--short', first).strip()} (first: old value)"
    label = describe(resolve("HEAD~1", repo), repo)
    subject = label.split(" ", 1)[1][1:-1]
    assert len(subject) == 50 and subject.endswith("…") and LONG_SUBJECT.startswith(subject[:-1])


@needs_git
def test_is_dirty_tracks_tracked_files_only(repo):
    assert not is_dirty(repo)
    write(repo / "untracked.txt", "x\n")
    assert not is_dirty(repo)
    write(repo / "README", "edited\n")
    assert is_dirty(repo)
    git(repo, "add", "README")
    assert is_dirty(repo)  # staged counts too
    git(repo, "reset", "-q", "--hard")
    assert not is_dirty(repo)


@needs_git
def test_resolve_in_a_repository_with_no_commits_says_so_not_fetch(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(RevisionError, match="has no commits yet") as info:
        resolve("HEAD", empty)
    assert "fetch" not in str(info.value)


# -- worktree ---------------------------------------------------------------------------------------


@needs_git
def test_worktree_holds_the_old_revision_and_leaves_no_trace(repo):
    before = snapshot(repo)
    with worktree("HEAD~2", repo) as path:
        assert (path / "pkg" / "value.py").read_text() == 'VALUE = "old"\n'
        assert (path / "README").read_text() == "first\n"
        assert git(path, "rev-parse", "HEAD").strip() == resolve("old", repo)
        assert str(path) in git(repo, "worktree", "list", "--porcelain")
        assert snapshot(repo)["status"] == before["status"]  # the checkout is invisible to the user's status
    assert not path.exists() and not path.parent.exists()
    assert snapshot(repo) == before


@needs_git
def test_worktree_keeps_a_dirty_tree(repo):
    write(repo / "pkg" / "value.py", 'VALUE = "uncommitted"\n')
    write(repo / "README", "staged\n")
    git(repo, "add", "README")
    write(repo / "scratch.txt", "untracked\n")
    before = snapshot(repo)
    assert is_dirty(repo)
    with worktree("HEAD", repo) as path:
        assert (path / "pkg" / "value.py").read_text() == 'VALUE = "new"\n'  # committed, not the edit
        assert (path / "README").read_text() == "third\n"
        assert not (path / "scratch.txt").exists()
    assert not path.exists()
    assert snapshot(repo) == before
    assert (repo / "pkg" / "value.py").read_text() == 'VALUE = "uncommitted"\n'
    assert (repo / "scratch.txt").read_text() == "untracked\n"


@needs_git
def test_worktree_under_parent_and_from_a_subdirectory(repo, tmp_path):
    parent = tmp_path / "scratch"
    parent.mkdir()
    before = snapshot(repo)
    with worktree("old", repo / "pkg", parent=parent) as path:
        assert path.parent.parent == parent.resolve()
        (path / "pkg" / "__pycache__").mkdir()  # untracked leftovers (bytecode) must not block removal
        write(path / "pkg" / "__pycache__" / "value.pyc", "junk")
        write(path / "pkg" / "value.py", "edited in the worktree\n")
    assert list(parent.iterdir()) == []
    assert snapshot(repo) == before


@needs_git
def test_worktree_cleans_up_after_an_exception(repo):
    before = snapshot(repo)
    with pytest.raises(ValueError, match="boom"), worktree("HEAD~1", repo) as path:
        assert path.is_dir()
        raise ValueError("boom")
    assert not path.exists()
    assert snapshot(repo) == before


@needs_git
def test_worktree_ignores_a_hooks_index_file(repo, monkeypatch):
    """Run from a git hook, GIT_INDEX_FILE points at the user's index: the checkout must not write there."""
    before = snapshot(repo)
    monkeypatch.setenv("GIT_INDEX_FILE", str(repo / ".git" / "index"))
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
    with worktree("old", repo) as path:
        assert (path / "pkg" / "value.py").read_text() == 'VALUE = "old"\n'
    assert snapshot(repo) == before


@needs_git
def test_worktree_bad_revision_or_parent_leaves_nothing(repo, tmp_path):
    before = snapshot(repo)
    with pytest.raises(RevisionError, match="unknown git revision 'nope'"), worktree("nope", repo):
        pytest.fail("entered the block")
    with pytest.raises(RevisionError, match="temporary directory"), worktree("HEAD", repo, parent=tmp_path / "no"):
        pytest.fail("entered the block")
    assert snapshot(repo) == before


@needs_git
def test_worktree_restores_signal_handlers(repo):
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with worktree("HEAD~1", repo):
        assert signal.getsignal(signal.SIGTERM) is not sigterm
        with pytest.raises(SystemExit) as info:
            signal.raise_signal(signal.SIGTERM)
        assert info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is sigint
    assert signal.getsignal(signal.SIGTERM) is sigterm


@needs_git
def test_worktree_in_a_thread_installs_no_handlers(repo):
    """Only the main thread may set handlers; elsewhere the worktree still works, cleaned up on exceptions."""
    before = snapshot(repo)
    seen: dict[str, object] = {}

    def body() -> None:
        try:
            with worktree("old", repo) as path:
                seen["value"] = (path / "pkg" / "value.py").read_text()
                seen["path"] = path
        except BaseException as exc:  # surfaced by the assertion below
            seen["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert "error" not in seen, seen.get("error")
    assert seen["value"] == 'VALUE = "old"\n'
    assert not Path(seen["path"]).exists()
    assert snapshot(repo) == before


SIGNAL_SCRIPT = """
import importlib.util, os, signal, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("revision", {module!r})
revision = importlib.util.module_from_spec(spec)
spec.loader.exec_module(revision)
# A process started in the background inherits SIGINT ignored, which worktree() respects.
signal.signal(signal.SIGINT, signal.default_int_handler)
with revision.worktree("HEAD~1", Path({repo!r})) as path:
    print(path, flush=True)
    os.kill(os.getpid(), signal.{signame})
    time.sleep(30)
print("NOT INTERRUPTED", flush=True)
"""


@needs_git
@pytest.mark.parametrize(
    ("signame", "codes"),
    [("SIGINT", {-signal.SIGINT, 128 + signal.SIGINT, 1}), ("SIGTERM", {-signal.SIGTERM, 128 + signal.SIGTERM})],
)
def test_worktree_cleans_up_on_a_signal(repo, signame, codes):
    """The module is loaded by file path: stdlib only, so the subprocess skips importing torch."""
    before = snapshot(repo)
    script = textwrap.dedent(SIGNAL_SCRIPT).format(module=str(MODULE), repo=str(repo), signame=signame)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert "NOT INTERRUPTED" not in proc.stdout
    assert proc.returncode in codes, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.name.startswith("base-"), proc.stdout + proc.stderr
    assert not path.exists() and not path.parent.exists()
    assert snapshot(repo) == before


KILL_SCRIPT = """
import importlib.util, os, signal, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("revision", {module!r})
revision = importlib.util.module_from_spec(spec)
spec.loader.exec_module(revision)
# A process started in the background inherits SIGINT ignored, which worktree() respects.
signal.signal(signal.SIGINT, signal.default_int_handler)
with revision.worktree("HEAD~1", Path({repo!r}), parent=Path({parent!r})) as path:
    print(path, flush=True)
    if {kill}:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def leave_worktree(repo: Path, parent: Path, *, kill: bool) -> tuple[subprocess.Popen, Path]:
    """A process holding an A/B worktree of ``repo`` in ``parent``: SIGKILLed at once (a CI timeout), or alive."""
    script = textwrap.dedent(KILL_SCRIPT).format(module=str(MODULE), repo=str(repo), parent=str(parent), kill=kill)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    path = Path(proc.stdout.readline().strip())
    if kill:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        proc.stdout.close()
    assert path.name.startswith("base-") and path.is_dir()
    return proc, path


@needs_git
def test_a_worktree_left_by_a_killed_run_is_removed_by_the_next(repo, tmp_path):
    before = snapshot(repo)
    parent = tmp_path / "tmp"
    parent.mkdir()
    _, left = leave_worktree(repo, parent, kill=True)
    assert str(left) in git(repo, "worktree", "list", "--porcelain")  # the SIGKILL skipped every cleanup
    with worktree("HEAD~2", repo, parent=parent) as path:
        listed = git(repo, "worktree", "list", "--porcelain")
        assert str(path) in listed and str(left) not in listed
        assert not left.parent.exists()
    assert not list(parent.iterdir())
    assert snapshot(repo) == before


@needs_git
def test_stale_worktree_cleanup_leaves_what_it_cannot_prove_dead(repo, tmp_path):
    parent = tmp_path / "tmp"
    parent.mkdir()
    live, held = leave_worktree(repo, parent, kill=False)
    dead = os.getpid() + 1_000_000  # above any pid_max: no such process
    started = revision._process_start(os.getpid())
    folders = {
        "no owner file": None,
        "another host": {"pid": dead, "host": "elsewhere", "started": None},
        "pid reused by a later process": {"pid": os.getpid(), "host": socket.gethostname(), "started": "0"},
        "dead": {"pid": dead, "host": socket.gethostname(), "started": started},
    }
    for name, owner in folders.items():
        folder = parent / f"attention-compare-{name.replace(' ', '-')}"
        folder.mkdir()
        if owner is not None:
            (folder / "owner.json").write_text(json.dumps(owner))
    try:
        removed = revision.remove_stale_worktrees(repo, parent)
        assert sorted(p.name for p in removed) == [
            "attention-compare-dead",
            "attention-compare-pid-reused-by-a-later-process",
        ]
        assert held.is_dir() and str(held) in git(repo, "worktree", "list", "--porcelain")  # alive: kept
        assert (parent / "attention-compare-no-owner-file").is_dir()
        assert (parent / "attention-compare-another-host").is_dir()
    finally:
        live.terminate()
        live.wait(timeout=60)
        live.stdout.close()
    assert not held.exists()  # its owner cleaned up after itself on SIGTERM


# -- load_package -----------------------------------------------------------------------------------


@needs_git
def test_load_package_base_and_head_coexist(repo, module_names):
    base_name, head_name = module_names("base"), module_names("head")
    with worktree("HEAD~2", repo) as path:
        base = load_package(path / "pkg", base_name)
    head = load_package(repo / "pkg", head_name)
    assert base.VALUE == "old" and head.VALUE == "new"
    assert base is not head and base.value is not head.value
    assert sys.modules[base_name] is base and sys.modules[f"{base_name}.value"] is base.value
    assert sys.modules[f"{head_name}.value"].VALUE == "new"
    assert base.__name__ == base_name and base.value.__name__ == f"{base_name}.value"
    assert load_package(repo / "pkg", head_name) is head  # same path again: the loaded module


def test_load_package_name_taken_by_another_path(tmp_path, module_names):
    for side in ("a", "b"):
        write(tmp_path / side / "pkg" / "__init__.py", "from .value import VALUE\n")
        write(tmp_path / side / "pkg" / "value.py", f"VALUE = {side!r}\n")
    name = module_names("taken")
    assert load_package(tmp_path / "a" / "pkg", name).VALUE == "a"
    with pytest.raises(RevisionError, match="already loaded") as info:
        load_package(tmp_path / "b" / "pkg", name)
    assert str(tmp_path / "b" / "pkg") in str(info.value)
    assert sys.modules[name].VALUE == "a"


def test_load_package_without_init(tmp_path, module_names):
    (tmp_path / "old_layout").mkdir()
    with pytest.raises(RevisionError, match=r"no __init__\.py") as info:
        load_package(tmp_path / "old_layout", module_names("missing"))
    assert str(tmp_path / "old_layout") in str(info.value)


def test_load_package_import_error_leaves_nothing(tmp_path, module_names):
    write(tmp_path / "pkg" / "__init__.py", "from .value import VALUE\nfrom .missing import X\n")
    write(tmp_path / "pkg" / "value.py", "VALUE = 1\n")
    name = module_names("broken")
    with pytest.raises(RevisionError, match="cannot import"):
        load_package(tmp_path / "pkg", name)
    assert not [key for key in sys.modules if key == name or key.startswith(name + ".")]


def test_load_package_rejects_a_dotted_name(tmp_path):
    write(tmp_path / "pkg" / "__init__.py", "")
    with pytest.raises(RevisionError, match="not a valid top-level module name"):
        load_package(tmp_path / "pkg", "a.b")
