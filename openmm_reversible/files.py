"""Files in and out: every file the library writes appears whole or not at all, and every
structure file it reads either parses or raises an :class:`~openmm_reversible.errors.InputError`
that names the file, the problem and the fix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import InputError

Writer = Callable[[str], None]
"""``write(temporary_path)``: writes a file's whole content to the path it is given."""


def _file_mode(path: Path) -> int:
    """Permission bits for ``path``: those of the file it replaces, else ``0o666 & ~umask``."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_all(writes: Sequence[tuple[str | os.PathLike, Writer]]) -> None:
    """Create or replace several files, none of them before all of them are written.

    Each ``write(temporary_path)`` fills a temporary file in its target's directory (so the
    rename is atomic); only when every one succeeded are they renamed over their targets with
    ``os.replace``. If any write fails, every temporary file is removed and no target changes.

    Parameters
    ----------
    writes : sequence of (path, callable)
        Target path and the function that writes its content to a given path.
    """
    temporaries: list[tuple[str, Path]] = []
    try:
        for path, write in writes:
            path = Path(path)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
            os.close(fd)
            temporaries.append((temporary, path))
            write(temporary)
            os.chmod(temporary, _file_mode(path))
        for temporary, path in temporaries:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _ in temporaries:
            if os.path.exists(temporary):
                os.unlink(temporary)
        raise


def atomic_write(path: str | os.PathLike, write: Writer) -> None:
    """Create or replace ``path`` atomically: ``write(temporary_path)``, then rename.

    A reader, or a run killed midway, sees either the old file or the complete new one. An
    existing file keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.
    """
    atomic_write_all([(path, write)])


def text_writer(text: str) -> Writer:
    """A :data:`Writer` of ``text`` (UTF-8, line endings untouched)."""

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return write


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, line endings untouched) to ``path`` atomically."""
    atomic_write(path, text_writer(text))


@contextlib.contextmanager
def output_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Create the directory ``path`` (and missing parents) for the duration of a block.

    If the block raises, the directories this call created are removed again when they are
    empty (they are, when every file was written with :func:`atomic_write_all`), so a failed
    command leaves nothing behind.

    Raises
    ------
    InputError
        If ``path`` or one of its parents exists and is not a directory.
    """
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"output directory {str(path)!r}: {str(existing)!r} is a file, not a "
                         "directory; choose another output path")
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def read_structure(path: str | os.PathLike):
    """Read a PDB (``.pdb``, ``.ent``, anything else) or PDBx/mmCIF (``.cif``, ``.pdbx``) file.

    Parameters
    ----------
    path : path
        The structure file.

    Returns
    -------
    openmm.app.PDBFile or openmm.app.PDBxFile
        Its ``topology`` and ``positions`` (nm), with at least one atom, all coordinates finite.

    Raises
    ------
    InputError
        If the file is missing, does not parse (garbage, truncated records), has no atoms or has
        non-finite coordinates.
    """
    from openmm import app, unit

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such structure file; check the path")
    pdbx = path.suffix.lower() in (".cif", ".pdbx")
    kind = "PDBx/mmCIF" if pdbx else "PDB"
    try:
        structure = (app.PDBxFile if pdbx else app.PDBFile)(str(path))
    except Exception as exc:  # OpenMM's parsers fail with IndexError, AssertionError, ...
        reason = str(exc) or type(exc).__name__
        raise InputError(f"{path}: not a readable {kind} file ({reason}); check that it is "
                         f"complete, with ATOM/HETATM records in the fixed {kind} columns, or "
                         "rewrite it with openmm.app.PDBFile.writeFile") from None
    if structure.topology.getNumAtoms() == 0:
        raise InputError(f"{path}: no atoms (no ATOM/HETATM records); give a {kind} file of "
                         "the structure")
    positions = np.asarray(structure.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        more = f" (and {bad.size - 1} more atoms)" if bad.size > 1 else ""
        raise InputError(f"{path}: atom {bad[0] + 1} has a non-finite coordinate{more}; fix "
                         "the coordinates")
    return structure
