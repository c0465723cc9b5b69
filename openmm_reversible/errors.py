"""Exceptions whose text is part of the API: each names the problem and the fix."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence


class InputError(ValueError):
    """Bad user input (file, option, tag, selection). The CLI prints it on one line, exit 2."""


_NO_TEMPLATE = re.compile(r"No template found for residue (\d+) \(([^)]*)\)\.\s*(.*?)\s*"
                          r"(For more information.*)?$", re.DOTALL)


@contextlib.contextmanager
def structure_errors(structure: str, forcefield: Sequence[str]) -> Iterator[None]:
    """Turn OpenMM's failures to build a System of ``structure`` into :class:`InputError`.

    ``ForceField.createSystem`` rejects a structure that the force field does not describe with
    an exception that names neither file. Inside this block, those errors become InputErrors
    that name the structure, the force-field files and the likely fix; any other exception
    passes through unchanged.

    Parameters
    ----------
    structure : str
        What the topology was read from (a PDB path, or a description such as "the
        216-molecule tip3p water box").
    forcefield : sequence of str
        The ForceField XML files, in load order.
    """
    files = ", ".join(str(f) for f in forcefield)
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # OpenMM raises both ValueError and bare Exception here
        message = " ".join(str(exc).split())
        match = _NO_TEMPLATE.match(message)
        if match:
            index, name, detail = match.group(1), match.group(2), match.group(3).strip()
            raise InputError(
                f"{structure}: residue {index} ({name}) matches no residue template of {files}"
                + (f" ({detail})" if detail else "")
                + "; load the force-field file that defines it (e.g. amber14-all.xml for "
                  "proteins, the water model's file for water), or complete the structure "
                  "(missing atoms or hydrogens: Modeller.addHydrogens or pdbfixer)") from None
        if message.startswith("Requested periodic boundary conditions for a Topology"):
            raise InputError(f"{structure} has no periodic box (no CRYST1 record) but the "
                             "nonbonded method is periodic; add the box to the structure or use "
                             "NoCutoff or CutoffNonPeriodic") from None
        if message.startswith(("Found multiple", "Multiple")):
            raise InputError(f"{structure}: {message} (force field: {files}); remove the "
                             "duplicate definitions from the force-field files") from None
        raise


def check_at_least(minimum: int, **values: int) -> None:
    """Raise :class:`InputError` for the first option ``--name`` whose value is below ``minimum``
    (keyword names map to options: ``snapshot_every`` is ``--snapshot-every``)."""
    for name, value in values.items():
        if not value >= minimum:
            raise InputError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def check_positive(**values: float) -> None:
    """Raise :class:`InputError` for the first option ``--name`` whose value is not > 0 (NaN
    included)."""
    for name, value in values.items():
        if not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {value}")
