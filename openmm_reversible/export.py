"""Write trained parameter values back into the user's ForceField XML files.

The export edits the *original text* of each file that holds parameter sites: only the numbers
of the sites change (written with the shortest decimal that reads back as the same float64),
and everything else - comments, element and attribute order, whitespace, the other attributes,
the ``parameterize``/``parameter_eval`` tags themselves - is kept byte for byte. Values are
located by the position of their element's start tag in the text
(:mod:`openmm_reversible.parameters` records it), never by re-serialising an XML tree, so the
exported file differs from the original only where a value moved and can be trained again.

Files are written atomically: a temporary file in the destination directory is renamed over
the target with ``os.replace``, so an interrupted export never leaves a truncated force field.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError
from .files import atomic_write_text
from .parameters import ParameterSet, is_bundled


def write_xml(parameter_set: ParameterSet, path_or_dir: str | os.PathLike | None = None,
              strip_markup: bool = False) -> list[Path]:
    """Write the current parameter values into copies of (or over) the original XML files.

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
        Also remove the ``parameterize``/``parameter_eval`` attributes. Keep them (the default)
        to train the file again; remove them for a file to load in plain OpenMM when a residue
        template's ``<Atom>`` is tagged (OpenMM reads every attribute there as a number, so it
        rejects the tags; it ignores them elsewhere).

    Returns
    -------
    list of pathlib.Path
        The files written, in the order the force field loads them.
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
    for index, target in zip(indices, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)  # a new directory given as 'dir/'
        atomic_write_text(target, texts[index])
    return targets


export_forcefield = write_xml
"""Alias of :func:`write_xml`, the name the training loop uses."""

__all__ = ["write_xml", "export_forcefield"]


def add_arguments(parser) -> None:
    parser.add_argument("config", metavar="CONFIG.toml", help="the fit's TOML config")
    parser.add_argument("--from", dest="fit_dir", required=True, metavar="FIT_DIR",
                        help="output directory of `openmm-reversible fit` (its checkpoint.pt)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="directory to write the trained ForceField XML into")
    parser.add_argument("--plain", action="store_true",
                        help="drop the parameterize/parameter_eval tags (a file that any "
                             "OpenMM loads, but that cannot be trained again)")


def run(args) -> int:
    """CLI: write the values of a fit's checkpoint into copies of the original XML files."""
    import torch

    from .config import load_config
    from .sampler import build_structure, create_system_kwargs

    config = load_config(args.config)
    checkpoint = Path(args.fit_dir) / "checkpoint.pt"
    if not checkpoint.is_file():
        raise InputError(f"--from {args.fit_dir}: no checkpoint.pt there; pass the output "
                         "directory of `openmm-reversible fit`")
    saved = torch.load(checkpoint, weights_only=True)
    topology, _ = build_structure(config)
    parameters = ParameterSet.from_forcefield(config.forcefield.files, topology,
                                              **create_system_kwargs(config))
    if saved["sites"] != parameters.names:
        raise InputError(f"{checkpoint} holds parameters {saved['sites']} but the config's force "
                         f"field has {parameters.names}; pass the config the fit used")
    with torch.no_grad():
        parameters.scaled.copy_(saved["scaled"])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for path in write_xml(parameters, output, strip_markup=args.plain):
        print(path)
    for key, value in parameters.values().items():
        print(f"  {key} = {value!r}")
    return 0
