"""Write trained parameter values back into the user's ForceField XML files.

The export edits the *original text* of each file that holds parameter sites: only the numbers
of the sites change (written with the shortest decimal that reads back as the same float64),
and everything else - comments, element and attribute order, whitespace, the other attributes,
the ``parameterize``/``parameter_eval`` tags themselves - is kept byte for byte. Values are
located by the position of their element's start tag in the text
(:mod:`openmm_reversible.parameters` records it), never by re-serialising an XML tree, so the
exported file differs from the original only where a value moved and can be trained again.

Files are written atomically: each is written to a temporary file in its destination directory,
and only when all are complete are they renamed over their targets with ``os.replace``, so an
interrupted or failed export never leaves a truncated force field, nor some files and not
others. The trained values of a fit come from the trainer
(:func:`openmm_reversible.train.trained_parameters`), which alone reads its checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError
from .files import Writer, atomic_write_all, text_writer
from .parameters import ParameterSet, is_bundled


def write_xml(parameter_set: ParameterSet, path_or_dir: str | os.PathLike | None = None,
              strip_markup: bool = False) -> list[Path]:
    """Write the current parameter values into copies of (or over) the original XML files.

    All files are written, or none (:func:`~openmm_reversible.files.atomic_write_all`).

    Parameters
    ----------
    parameter_set : ParameterSet
        The trained parameters; its current values are written.
    path_or_dir : path, optional
        A directory (one that exists, or a path ending in ``/``, created with its parents if
        missing): each file holding sites is written there under its own name. Another path:
        the single file holding sites is written there (an InputError if the sites span
        several files). None: the original files are overwritten in place (refused for
        OpenMM's bundled files).
    strip_markup : bool
        Also remove the ``parameterize``/``parameter_eval``/``conserve_charge`` attributes.
        Keep them (the default) to train the file again; remove them for a file to load in
        plain OpenMM when a residue template's ``<Atom>`` is tagged (OpenMM reads every
        attribute there as a number, so it rejects the tags; it ignores them elsewhere,
        ``<Residue>`` included).

    Returns
    -------
    list of pathlib.Path
        The files written, in the order the force field loads them.
    """
    writes = xml_writes(parameter_set, path_or_dir, strip_markup)
    for target, _ in writes:
        target.parent.mkdir(parents=True, exist_ok=True)  # a new directory given as 'dir/'
    atomic_write_all(writes)
    return [target for target, _ in writes]


def xml_writes(parameter_set: ParameterSet, path_or_dir: str | os.PathLike | None = None,
               strip_markup: bool = False) -> list[tuple[Path, Writer]]:
    """What :func:`write_xml` writes, without writing it: (target, writer) per file, for
    :func:`~openmm_reversible.files.atomic_write_all` together with other files.

    Raises
    ------
    InputError
        As :func:`write_xml` (bundled file in place, shared names, missing directory).
    """
    texts = parameter_set.texts(strip_markup=strip_markup)
    indices = parameter_set.site_files()
    sources = [parameter_set.files[i] for i in indices]
    if path_or_dir is None:
        bundled = [s.name for s in sources if is_bundled(s)]
        if bundled:
            raise InputError(f"{', '.join(bundled)} is one of OpenMM's bundled files and is "
                             "not overwritten; pass a directory to write the trained copy to")
        targets = sources
    elif Path(path_or_dir).is_dir() or os.fspath(path_or_dir).endswith(("/", os.sep)):
        targets = [Path(path_or_dir) / s.name for s in sources]
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise InputError(f"the files holding parameters share a name ({', '.join(names)}); "
                             "export them one directory each or rename them")
    elif len(sources) == 1:
        targets = [Path(path_or_dir)]
        if not targets[0].parent.is_dir():
            raise InputError(f"directory {str(targets[0].parent)!r} does not exist; "
                             "create it first")
    else:
        raise InputError(f"parameters live in {len(sources)} files "
                         f"({', '.join(s.name for s in sources)}) but {str(path_or_dir)!r} "
                         "is not a directory; pass a directory (an existing one, or a path "
                         "ending in '/')")
    return [(target, text_writer(texts[index]))
            for index, target in zip(indices, targets, strict=True)]


export_forcefield = write_xml
"""Alias of :func:`write_xml`, the name the training loop uses."""

__all__ = ["write_xml", "xml_writes", "export_forcefield"]

