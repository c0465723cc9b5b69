"""Crash-safe file output: every file the library writes appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Create or replace ``path`` atomically: ``write(temporary_path)``, then rename.

    The temporary file lives in the same directory (so the rename is atomic); a reader, or a
    run killed midway, sees either the old file or the complete new one. An existing file keeps
    its permission bits; a new one gets the usual ``0o666 & ~umask``.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(temporary)
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, line endings untouched) to ``path`` atomically."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    atomic_write(path, write)
