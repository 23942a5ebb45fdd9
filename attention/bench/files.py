"""Writing the tooling's outputs: folders checked before any work, files written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created if missing), or ``None``.

    Checked before a run starts, so a bad ``--out`` is a usage error, not a traceback after
    minutes of measuring.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            where = f" ({blocker} is a file)"
        else:
            where = f" ({error.filename})" if error.filename and Path(error.filename) != folder else ""
        return f"cannot create the folder: {error.strerror or error}{where}"
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return f"cannot write files in it: {error.strerror or error}"
    return None


def unwritable_file(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file (its folder created if missing), or ``None``."""
    if path.is_dir():
        return "a folder, not a file: name the file to write"
    problem = unwritable(path.parent)
    return f"{path.parent}: {problem}" if problem else None


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: an
    interrupted run, a crash or a full disk never leaves ``path`` half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
