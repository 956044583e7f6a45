"""Writing files so that a crash never leaves a half-written file under its real name.

A bottom-layer helper: it imports nothing from the package, so the checkpoint module, the
tokenizer module and the data layer can all use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` through a temporary file in the same folder, then rename it into place.

    Args:
        path: the file to (re)write; its folder must exist.
        write: called with the temporary file's path (a ``str``); it must write the whole
            contents there.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    The temporary file is flushed to disk before ``os.replace`` swaps it in, so readers see
    either the old file or the complete new one; on any error it is removed and the old file, if
    there was one, is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
