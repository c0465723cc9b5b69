"""Target curves read from data files as they come, and put on the fit's bins.

An RDF file is a table of numbers, one row per r, columns separated by whitespace or commas:
``r, g`` (what ``examples/water/make_targets.py`` writes) or the layout experimental files use,
``r, g, error, g2, error2, ...`` (e.g. Soper 2013's water RDFs: r in Å, then g_OO, its error,
g_OH, its error, g_HH, its error). Lines starting with ``#`` and blank lines are skipped; the
last ``#`` line (or a first non-numeric line) with one name per column names the columns.

- **column**: the g(r) column, a number counted from 1 with r as column 1 (``column = 4`` is
  g_OH in Soper's layout) or a name from the header (case-insensitive). Default: 2.
- **unit of r**: nm unless the target says ``r_unit = "angstrom"``. Nothing is guessed: a file
  whose r reaches beyond :data:`IMPLAUSIBLE_NM` without an explicit ``r_unit`` is refused,
  with the fix named (real simulation RDFs end at half a box, a few nm at most).
- **grid**: any strictly increasing r. A uniform grid (bin centres) is used as is; any other
  grid is interpolated linearly onto uniform bins (width ``bin_width``, default the file's
  median spacing) covering the file's r, within ``r_min``/``r_max`` when given. The range used
  is stated in :attr:`RdfGrid.note`, which the fit prints.

Error columns are read past, not used (the loss weighs every bin alike).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .errors import InputError

R_UNITS = {"nm": 1.0, "angstrom": 0.1}
"""Accepted units of an RDF file's r column and their length in nm."""
IMPLAUSIBLE_NM = 5.0
"""An r beyond this many nm, with no ``r_unit`` given, is taken for a unit mistake."""
_UNIFORM = 1e-6
"""Relative spread of the spacings below which a grid counts as uniform (bin centres)."""


@dataclass(frozen=True)
class Table:
    """A numeric table: ``data`` (rows, columns) and the header's column ``names`` (or None)."""

    data: np.ndarray
    names: list[str] | None


def _fields(line: str) -> list[str]:
    return [f.strip("\"'") for f in re.split(r"[,\s]+", line.strip()) if f.strip("\"'")]


def read_table(path: str | os.PathLike) -> Table:
    """Read a whitespace- or comma-separated numeric table with optional header.

    Raises
    ------
    InputError
        If a data line holds a non-number or the rows differ in length (the line is named).
    """
    rows, headers = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            if text.startswith("#"):
                if not rows:
                    headers.append(_fields(text.lstrip("#")))
                continue
            fields = _fields(text)
            try:
                values = [float(f) for f in fields]
            except ValueError:
                if not rows:
                    headers.append(fields)
                    continue
                raise InputError(f"{path}, line {number}: not a number in {text!r}") from None
            if rows and len(values) != len(rows[0]):
                raise InputError(f"{path}, line {number}: {len(values)} columns, the rows above "
                                 f"have {len(rows[0])}")
            rows.append(values)
    if not rows:
        raise InputError(f"{path}: no numeric rows")
    n = len(rows[0])
    names = next((h for h in reversed(headers) if len(h) == n), None)
    return Table(np.asarray(rows, dtype=float), names)


def read_rdf(path: str | os.PathLike, column: int | str = 2,
             r_unit: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """r (nm) and g(r) from one column of an RDF file (see the module docstring).

    Parameters
    ----------
    path : path
    column : int or str
        The g column, counted from 1 (r is column 1), or its header name.
    r_unit : {"nm", "angstrom"}, optional
        Unit of the r column; None means nm, with the plausibility check.

    Raises
    ------
    InputError
        Naming the file and the problem: unknown column, too few rows, non-finite values, r not
        strictly increasing, or r implausibly large for nm.
    """
    table = read_table(path)
    data, names = table.data, table.names
    n_rows, n_cols = data.shape
    if isinstance(column, str):
        lowered = [n.lower() for n in names or []]
        if column.lower() not in lowered:
            known = ", ".join(names) if names else "none (the file has no header line)"
            raise InputError(f"{path}: no column named {column!r} (columns: {known}); give "
                             f"column as a number counted from 1 (r is column 1)")
        index = lowered.index(column.lower())
    else:
        index = column - 1
    if not 1 <= index < n_cols:
        raise InputError(f"{path}: column {column} is not a g column; the file has {n_cols} "
                         f"columns (r is column 1, g columns are 2 to {n_cols})")
    if r_unit is not None and r_unit not in R_UNITS:
        raise InputError(f"r_unit = {r_unit!r}: must be one of {', '.join(R_UNITS)}")
    r, g = data[:, 0], data[:, index]
    if n_rows < 3:
        raise InputError(f"{path}: needs >= 3 rows of r, g; has {n_rows}")
    bad = ~(np.isfinite(r) & np.isfinite(g))
    if bad.any():
        raise InputError(f"{path}: non-finite r or g in data row {int(np.argmax(bad)) + 1}")
    steps = np.diff(r)
    if np.any(steps <= 0):
        k = int(np.argmax(steps <= 0))
        raise InputError(f"{path}: r (column 1) must increase strictly, but data row {k + 2} "
                         f"has r = {r[k + 1]:g} after {r[k]:g}")
    if r[0] < 0:
        raise InputError(f"{path}: r (column 1) starts at {r[0]:g} < 0")
    if np.any(g < 0):
        raise InputError(f"{path} has a negative g in data row {int(np.argmax(g < 0)) + 1}; "
                         "g(r) is >= 0: fix the file")
    if r_unit is None and r[-1] > IMPLAUSIBLE_NM:
        raise InputError(f"{path}: r reaches {r[-1]:g}, implausible for an RDF in nm (the "
                         f"default unit); if r is in Å set r_unit = \"angstrom\", if it really "
                         f"is in nm set r_unit = \"nm\"")
    return r * R_UNITS[r_unit or "nm"], g


@dataclass(frozen=True)
class RdfGrid:
    """A target RDF on the fit's bins.

    Attributes
    ----------
    r : ndarray, nm
        Bin centres.
    g : ndarray
        Target g at the centres.
    r_range : tuple of float, nm
        Lower edge of the first bin, upper edge of the last.
    width : float, nm
        Bin width.
    interpolated : bool
        Whether g was interpolated from the file's grid (False: the file's own points).
    note : str
        One line saying which r range of the file is used and how.
    """

    r: np.ndarray
    g: np.ndarray
    r_range: tuple[float, float]
    width: float
    interpolated: bool
    note: str


def rdf_bins(r: np.ndarray, g: np.ndarray, r_min: float | None = None,
             r_max: float | None = None, bin_width: float | None = None) -> RdfGrid:
    """Put a target RDF (r in nm, strictly increasing) on uniform bins.

    A uniform r without ``bin_width`` is taken as bin centres and kept, the bins whose edges lie
    within ``[r_min, r_max]``. Otherwise bins of ``bin_width`` (default: the median spacing of
    r) fill ``[max(r_min, r[0]), min(r_max, r[-1])]`` from its lower end and g is interpolated
    linearly at their centres (never extrapolated).

    Raises
    ------
    InputError
        If no bin fits in the range.
    """
    steps = np.diff(r)
    uniform = float(np.ptp(steps)) <= _UNIFORM * float(steps.mean()) + 1e-12
    file_range = f"the file's r {r[0]:.5g}-{r[-1]:.5g} nm"
    if uniform and bin_width is None:
        width = float(r[1] - r[0])
        keep = ((r + 0.5 * width <= (math.inf if r_max is None else r_max) + 1e-12)
                & (r - 0.5 * width >= (-math.inf if r_min is None else r_min) - 1e-12))
        if not keep.any():
            raise InputError(f"no bin of {file_range} lies within r_min = {r_min}, "
                             f"r_max = {r_max} nm")
        centres, values = r[keep], g[keep]
        lo, hi = float(centres[0] - 0.5 * width), float(centres[-1] + 0.5 * width)
        note = (f"{len(centres)} bins of {width:.5g} nm over {lo:.5g}-{hi:.5g} nm, the file's "
                f"own bin centres ({file_range})")
        return RdfGrid(centres, values, (lo, hi), width, False, note)
    width = float(np.median(steps)) if bin_width is None else float(bin_width)
    lo = float(r[0]) if r_min is None else float(r_min)
    hi = float(r[-1]) if r_max is None else min(float(r_max), float(r[-1]))
    if lo < r[0] - 1e-12:
        raise InputError(f"r_min = {r_min} nm is below {file_range}; raise r_min or remove it")
    n_bins = int(math.floor((hi - lo) / width + 1e-9))
    if n_bins < 1:
        raise InputError(f"no bin of {width:.5g} nm fits between {lo:.5g} and {hi:.5g} nm "
                         f"({file_range}); check r_min, r_max and bin_width")
    centres = lo + (np.arange(n_bins) + 0.5) * width
    values = np.interp(centres, r, g)
    how = "uniform" if uniform else "non-uniform"
    note = (f"{n_bins} bins of {width:.5g} nm over {lo:.5g}-{lo + n_bins * width:.5g} nm, "
            f"g interpolated linearly from {file_range} ({how} grid, {len(r)} points)")
    return RdfGrid(centres, values, (lo, lo + n_bins * width), width, True, note)
