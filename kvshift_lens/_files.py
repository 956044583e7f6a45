"""Writing files so that a crash never leaves a half-written one under its real name.

Every file the toolkit writes for later reading (checkpoints, run.json, metrics rewrites, summaries,
tokenizers) goes through :func:`atomic_write`: the bytes go to a temporary file beside the target,
are flushed to disk, and the temporary file is renamed over the target. A reader sees the old
file or the new one, never a mixture; a failed write leaves the old file and no temporary file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def temp_path_for(path: Path) -> Path:
    """A fresh temporary file name beside ``path`` (``.<name>.<random>.tmp``); the file exists,
    empty, when this returns."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_staged(path: Path, write: Callable[[str], object]) -> Path:
    """Write a temporary sibling of ``path`` with ``write(tmp_name)`` and flush it; returns the
    temporary file (rename it into place with :func:`commit_staged`). On any error the temporary
    file is removed and the error re-raised."""
    tmp = temp_path_for(path)
    try:
        write(str(tmp))
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit_staged(staged: dict[Path, Path]) -> None:
    """Rename each temporary file onto its target (in the order given), then sync the folders."""
    for target, tmp in staged.items():
        os.replace(tmp, target)
    for folder in {t.parent for t in staged}:
        fsync_dir(folder)


def discard_staged(staged: dict[Path, Path]) -> None:
    for tmp in staged.values():
        Path(tmp).unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` through ``write(tmp_name)`` atomically (see the module docstring); its
    folder must exist. Returns ``path``."""
    path = Path(path)
    commit_staged({path: write_staged(path, write)})
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
