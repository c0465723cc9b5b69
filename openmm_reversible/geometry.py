"""Geometry, used by every room: minimum-image displacements, box widths, neighbour lists.

The list only decides *which pairs are candidates*; energies always mask pairs beyond the
cutoff, so any list that contains every pair within the cutoff gives the same interaction set.
That is what makes forward and reverse dynamics see identical interactions: a rebuild (triggered
when some atom moved more than ``skin / 2`` since the last build) can only add or remove pairs
that contribute exactly zero.

Candidate pairs come from a compiled O(N) cell list (any box shape) that emits the half list
sorted by ``(i, j)`` directly. Displacements are recomputed
in torch at every evaluation with the minimum-image convention for OpenMM's reduced triclinic
boxes, so they are differentiable w.r.t. positions and box vectors and unaffected by wrapping.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch


def box_widths(box: torch.Tensor) -> torch.Tensor:
    """Perpendicular widths of periodic box(es), nm, shape (..., 3): V / |b × c| and cyclic.

    Half the smallest width is the largest distance the minimum-image convention resolves.
    """
    a, b, c = box[..., 0, :], box[..., 1, :], box[..., 2, :]
    faces = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a),
                         torch.linalg.cross(a, b)], dim=-2)
    # (TorchScript-compatible: ml.pairs calls it from scripted models.)
    return torch.linalg.det(box).abs().unsqueeze(-1) / torch.linalg.vector_norm(faces, dim=-1)


def minimum_image(d: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
    """Apply the minimum-image convention to displacement vectors.

    Parameters
    ----------
    d : torch.Tensor, shape (..., 3), nm
        Raw displacements ``x_j - x_i``.
    box : torch.Tensor, shape (3, 3), nm, or None
        Box vectors as rows (a, b, c) in OpenMM's reduced form (a along x, b in the xy plane).
        ``None`` means no periodicity.

    Returns
    -------
    torch.Tensor, shape (..., 3), nm
        Same algorithm as OpenMM: subtract c, then b, then a, each rounded on its own axis.
    """
    if box is None:
        return d
    d = d - torch.round(d[..., 2:3] / box[2, 2]) * box[2]
    d = d - torch.round(d[..., 1:2] / box[1, 1]) * box[1]
    d = d - torch.round(d[..., 0:1] / box[0, 0]) * box[0]
    return d


class NeighborList:
    """Half Verlet list (i < j) of pairs within ``cutoff + skin``, rebuilt only when needed.

    Parameters
    ----------
    cutoff : float, nm
        Interaction cutoff.
    skin : float, nm
        Extra margin; the list stays valid until an atom moves more than ``skin / 2``.
    exclusions : (n, 2) int array, optional
        Pairs never to return (OpenMM exclusions are handled by the caller; this only saves work).

    Notes
    -----
    Without a box (non-periodic) the cell list still works on the bounding box of the atoms.
    Call :meth:`pairs` with the current positions; it returns ``(i, j)`` long tensors.
    """

    def __init__(self, cutoff: float, skin: float = 0.1):
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self._ref_positions: np.ndarray | None = None
        self._ref_box: np.ndarray | None = None
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_builds = 0

    def _needs_rebuild(self, x: np.ndarray, box: np.ndarray | None) -> bool:
        if self._pairs is None or self._ref_positions is None:
            return True
        if x.shape != self._ref_positions.shape:
            return True
        if (box is None) != (self._ref_box is None):
            return True
        if box is not None and not np.array_equal(box, self._ref_box):
            # Box changed (barostat / strain): be safe, rebuild.
            return True
        d = x - self._ref_positions
        if box is not None:
            d = minimum_image(torch.from_numpy(d), torch.from_numpy(box)).numpy()
        return float(np.max(np.einsum("ij,ij->i", d, d))) > (0.5 * self.skin) ** 2

    def pairs(self, positions: torch.Tensor, box: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate pairs ``(i, j)`` with i < j, as long tensors on ``positions.device``."""
        x = positions.detach().to("cpu", torch.float64).numpy()
        b = None if box is None else box.detach().to("cpu", torch.float64).numpy()
        if self._needs_rebuild(x, b):
            self._build(x, b, positions.device)
        return self._pairs

    def _build(self, x: np.ndarray, box: np.ndarray | None, device) -> None:
        if x.shape[0] < 2:
            i = j = np.zeros(0, dtype=np.int64)
        else:
            i, j = _cell_list_pairs(np.ascontiguousarray(x, dtype=np.float64),
                                    np.zeros((3, 3)) if box is None else box, box is not None,
                                    self.cutoff + self.skin)
        self._pairs = (torch.from_numpy(i).to(device), torch.from_numpy(j).to(device))
        self._ref_positions = x.copy()
        self._ref_box = None if box is None else box.copy()
        self.n_builds += 1


def image_shifts(raw: torch.Tensor, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Integer shifts n (as floats, shape (..., 3)) with ``image = raw - n @ box``."""
    return torch.round((raw - image) @ torch.linalg.inv(box))


class CutoffPairs:
    """The pairs of a pair-energy term within its cutoff, and their minimum-image shifts.

    Candidates come from a :class:`NeighborList` minus the term's excluded pairs. For periodic
    boxes the image shift of every candidate is computed once per list build, at the
    positions of that moment; afterwards an evaluation only needs ``x[j] - x[i] - n @ box``
    (atoms wrapped into the box since the build move by whole box vectors, which are added
    to ``n``). Whatever the history, a pair is returned exactly when its minimum-image
    distance is below the cutoff, with its minimum-image shift: a displacement shorter than
    half the box width w is the minimum image, and a pair whose cached image is longer than
    ``w - cutoff`` (the only kind whose minimum image may have moved inside the cutoff) is
    checked with the full minimum-image convention.

    Parameters
    ----------
    cutoff, skin : float, nm
    n_particles : int
    excluded_keys : torch.Tensor, long, sorted
        ``i * n_particles + j`` (i < j) of every pair the term leaves out.
    """

    def __init__(self, cutoff: float, skin: float, n_particles: int,
                 excluded_keys: torch.Tensor):
        self.cutoff = float(cutoff)
        self.n_particles = int(n_particles)
        self.excluded_keys = excluded_keys
        self.neighbors = NeighborList(cutoff, skin)
        self._cache: tuple | None = None  # (list pairs, i, j, reference positions, shifts)

    def __getstate__(self) -> dict:
        # A copy rebuilds its own cache on first use.
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def _candidates(self, positions: torch.Tensor, box: torch.Tensor | None) -> tuple:
        listed = self.neighbors.pairs(positions, box)
        if self._cache is None or self._cache[0] is not listed:
            i, j = listed
            x = positions.detach().to("cpu", torch.float64).numpy()
            b = np.zeros((3, 3)) if box is None else box.detach().to("cpu", torch.float64).numpy()
            keep, shifts = _kept_pairs_and_shifts(
                i.cpu().numpy(), j.cpu().numpy(), self.n_particles,
                self.excluded_keys.cpu().numpy(), x, b, box is not None)
            keep = torch.from_numpy(keep).to(i.device)
            i, j = i[keep], j[keep]
            x_ref = None
            if box is None:
                shifts = None
            else:
                x_ref = positions.detach().clone()
                shifts = torch.from_numpy(shifts).to(positions.device, positions.dtype)
            self._cache = (listed, i, j, x_ref, shifts)
        return self._cache[1:]

    def candidates(self, positions: torch.Tensor, box: torch.Tensor | None) -> tuple:
        """The candidate pairs as they stand, for a kernel that selects the pairs itself.

        Returns ``(i, j, shifts, wraps, suspect)``: the candidates ``i < j`` (the same objects
        until the list is rebuilt, so derived data can be cached on them), their image shifts
        at the last build (``None`` without a box), the whole box vectors each atom has moved
        by since (``None`` without a box), and the squared distance (nm²) above which a
        displacement ``x[j] - x[i] - (shifts + wraps[j] - wraps[i]) @ box`` must be replaced by
        the full minimum image. A pair interacts when that distance is below the cutoff:
        exactly the pairs and shifts :meth:`__call__` returns.
        """
        i, j, x_ref, shifts = self._candidates(positions, box)
        if box is None:
            return i, j, None, None, math.inf
        with torch.no_grad():
            wraps = torch.round((positions.detach() - x_ref) @ torch.linalg.inv(box))
            width = float(box_widths(box).min())
        return i, j, shifts, wraps, (width - self.cutoff) ** 2

    def __call__(self, positions: torch.Tensor, box: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Pairs ``i < j`` within the cutoff and, for a periodic ``box``, integer shifts ``n``
        (float tensor (n_pairs, 3)) such that ``x[j] - x[i] - n @ box`` is the minimum-image
        displacement: differentiable w.r.t. positions and box when applied by the caller.
        No autograd is involved here."""
        i, j, x_ref, shifts = self._candidates(positions, box)
        with torch.no_grad():
            x = positions.detach()
            raw = x[j] - x[i]
            if box is None:
                within = torch.nonzero((raw * raw).sum(-1) < self.cutoff ** 2).squeeze(1)
                return i[within], j[within], None
            wraps = torch.round((x - x_ref) @ torch.linalg.inv(box))
            if bool(wraps.any()):
                shifts = shifts + wraps[j] - wraps[i]
            d = raw - shifts @ box
            d2 = (d * d).sum(-1)
            width = float(box_widths(box).min())
            suspect = torch.nonzero(d2 > (width - self.cutoff) ** 2).squeeze(1)
            if suspect.numel():
                true = minimum_image(raw[suspect], box)
                shifts = shifts.clone()
                shifts[suspect] = image_shifts(raw[suspect], true, box)
                d2 = d2.clone()
                d2[suspect] = (true * true).sum(-1)
            within = torch.nonzero(d2 < self.cutoff ** 2).squeeze(1)
        return i[within], j[within], shifts[within]


# ------------------------------------------------------------------------------- cell list


@numba.njit(cache=True)
def _first_after(members: np.ndarray, lo: int, hi: int, i: int) -> int:  # pragma: no cover
    """First position in ``members[lo:hi]`` (increasing) whose atom is above ``i``."""
    while lo < hi:
        mid = (lo + hi) // 2
        if members[mid] <= i:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True)
def _scan_cells(i: int, geometry: tuple, out: np.ndarray, m: int, write: bool
                ) -> int:  # pragma: no cover (compiled)
    """Scan the cells within reach of atom ``i`` for its partners ``j > i``.

    With ``write``, each ``j`` within the radius (through the image of the scanned cell) is
    stored at ``out[m]`` onwards and the next free position returned; without, ``m`` plus
    the number of atoms ``j > i`` in those cells (the bound of what writing stores).
    """
    u, reach, n_cells, periodic, start, members, xw, box, rad2 = geometry
    for da in range(-reach[0], reach[0] + 1):
        ca = int(u[i, 0]) + da
        if not periodic and (ca < 0 or ca >= n_cells[0]):
            continue
        for db in range(-reach[1], reach[1] + 1):
            cb = int(u[i, 1]) + db
            if not periodic and (cb < 0 or cb >= n_cells[1]):
                continue
            for dc in range(-reach[2], reach[2] + 1):
                cc = int(u[i, 2]) + dc
                if not periodic and (cc < 0 or cc >= n_cells[2]):
                    continue
                k = ((ca % n_cells[0]) * n_cells[1] + cb % n_cells[1]) * n_cells[2] \
                    + cc % n_cells[2]
                first, hi = _first_after(members, start[k], start[k + 1], i), start[k + 1]
                if not write:
                    m += hi - first
                    continue
                # the cell's image: (ca, cb, cc) is (ca mod n, ...) moved by whole boxes
                sa, sb, sc = ca // n_cells[0], cb // n_cells[1], cc // n_cells[2]
                ox = xw[i, 0] - sa * box[0, 0] - sb * box[1, 0] - sc * box[2, 0]
                oy = xw[i, 1] - sa * box[0, 1] - sb * box[1, 1] - sc * box[2, 1]
                oz = xw[i, 2] - sa * box[0, 2] - sb * box[1, 2] - sc * box[2, 2]
                for s in range(first, hi):
                    j = members[s]
                    dx = xw[j, 0] - ox
                    dy = xw[j, 1] - oy
                    dz = xw[j, 2] - oz
                    if dx * dx + dy * dy + dz * dz < rad2:
                        out[m] = j
                        m += 1
    return m


@numba.njit(cache=True, parallel=True)
def _cell_list_pairs(x: np.ndarray, box: np.ndarray, periodic: bool, radius: float
                     ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """Every pair ``i < j`` with some periodic image (the nearest only without ``periodic``)
    closer than ``radius`` (nm), sorted by ``(i, j)``, each pair once.

    Cells are at least ``radius / 2`` wide (in fractional coordinates for a periodic box, whose
    perpendicular widths bound a sphere's fractional extent); each atom scans the cells
    within ``radius`` of its own, through as many images as the box needs, keeps the ``j > i``
    it finds within ``radius`` in its own slot of a buffer, and rewrites them there in order
    without repeats (one pair reached through two images) by marking them in a byte map.
    Atoms are independent and laid out by a prefix sum, so the result does not depend on the
    thread count.
    """
    n = x.shape[0]
    rad2 = radius * radius
    # Cell coordinates u (in cells) and the width of a cell (nm) along each axis.
    u = np.empty((n, 3))
    n_cells = np.ones(3, dtype=np.int64)
    reach = np.zeros(3, dtype=np.int64)
    if periodic:
        inv = np.linalg.inv(box)
        frac = x @ inv
        frac -= np.floor(frac)
        xw = frac @ box
        vol = abs(np.linalg.det(box))
        widths = np.empty(3)
        for a in range(3):
            b, c = box[(a + 1) % 3], box[(a + 2) % 3]
            cross = np.array([b[1] * c[2] - b[2] * c[1], b[2] * c[0] - b[0] * c[2],
                              b[0] * c[1] - b[1] * c[0]])
            widths[a] = vol / np.sqrt(np.sum(cross * cross))
    else:
        low = np.empty(3)
        widths = np.empty(3)
        for a in range(3):
            low[a] = x[:, a].min()
            widths[a] = x[:, a].max() - low[a]
        xw = x.copy()
        frac = np.empty((n, 3))
        for a in range(3):
            w = widths[a] if widths[a] > 0.0 else 1.0
            frac[:, a] = (x[:, a] - low[a]) / w
    for a in range(3):
        n_cells[a] = max(1, int(2.0 * widths[a] / radius))
    # No more cells than about two per atom (a large, sparse box).
    while n_cells[0] * n_cells[1] * n_cells[2] > max(8, 2 * n):
        for a in range(3):
            n_cells[a] = max(1, n_cells[a] // 2)
    for a in range(3):
        if widths[a] > 0.0:
            reach[a] = int(np.ceil(radius * n_cells[a] / widths[a]))
        else:
            reach[a] = 0
        if not periodic:
            reach[a] = min(reach[a], n_cells[a] - 1)
    cell = np.empty(n, dtype=np.int64)
    for t in range(n):
        k = 0
        for a in range(3):
            ca = min(int(frac[t, a] * n_cells[a]), n_cells[a] - 1)
            u[t, a] = ca
            k = k * n_cells[a] + ca
        cell[t] = k
    # Atoms by cell, each cell's atoms in index order (a stable counting sort).
    total = n_cells[0] * n_cells[1] * n_cells[2]
    start = np.zeros(total + 1, dtype=np.int64)
    for t in range(n):
        start[cell[t] + 1] += 1
    for k in range(total):
        start[k + 1] += start[k]
    fill = start[:-1].copy()
    members = np.empty(n, dtype=np.int64)
    for t in range(n):
        members[fill[cell[t]]] = t
        fill[cell[t]] += 1
    # Upper bound of each atom's partners j > i: the later atoms of the cells it scans.
    geometry = (u, reach, n_cells, periodic, start, members, xw, box, rad2)
    bound = np.zeros(n + 1, dtype=np.int64)
    for i in numba.prange(n):
        bound[i + 1] = _scan_cells(i, geometry, bound, 0, False)
    for i in range(n):
        bound[i + 1] += bound[i]
    buffer = np.empty(bound[n], dtype=np.int64)
    found = np.zeros(n + 1, dtype=np.int64)
    for i in numba.prange(n):
        m = _scan_cells(i, geometry, buffer, bound[i], True)
        # Sorted and without repeats in one pass: mark the partners found, read the marks in
        # order (cheaper than sorting the row when an atom has hundreds of partners).
        mark = np.zeros(n - i, dtype=np.uint8)
        for s in range(bound[i], m):
            mark[buffer[s] - i] = 1
        kept = 0
        for t in range(1, n - i):
            if mark[t]:
                buffer[bound[i] + kept] = i + t
                kept += 1
        found[i + 1] = kept
    for i in range(n):
        found[i + 1] += found[i]
    pi = np.empty(found[n], dtype=np.int64)
    pj = np.empty(found[n], dtype=np.int64)
    for i in numba.prange(n):
        for s in range(found[i + 1] - found[i]):
            pi[found[i] + s] = i
            pj[found[i] + s] = buffer[bound[i] + s]
    return pi, pj


@numba.njit(cache=True)
def _kept_pairs_and_shifts(i: np.ndarray, j: np.ndarray, n_particles: int, excluded: np.ndarray,
                           x: np.ndarray, box: np.ndarray, periodic: bool
                           ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """The positions of the listed pairs that are not excluded, and their image shifts.

    ``(i, j)`` are sorted by ``i * n_particles + j`` as the excluded keys are, so one merge
    pass finds the excluded ones. The shift ``n`` of a kept pair is that of
    :func:`minimum_image` on ``x[j] - x[i]`` (its roundings on c, then b, then a), as
    floats; shape (n_kept, 3), or (0, 3) without ``periodic``.
    """
    keep = np.empty(i.shape[0], dtype=np.int64)
    kept = 0
    e = 0
    for t in range(i.shape[0]):
        key = i[t] * n_particles + j[t]
        while e < excluded.shape[0] and excluded[e] < key:
            e += 1
        if e == excluded.shape[0] or excluded[e] != key:
            keep[kept] = t
            kept += 1
    keep = keep[:kept]
    shifts = np.zeros((kept if periodic else 0, 3))
    if periodic:
        for t in range(kept):
            a, b = i[keep[t]], j[keep[t]]
            dx, dy, dz = x[b, 0] - x[a, 0], x[b, 1] - x[a, 1], x[b, 2] - x[a, 2]
            nc = np.rint(dz / box[2, 2])
            dx, dy, dz = dx - nc * box[2, 0], dy - nc * box[2, 1], dz - nc * box[2, 2]
            nb = np.rint(dy / box[1, 1])
            dx = dx - nb * box[1, 0]
            shifts[t, 0], shifts[t, 1], shifts[t, 2] = np.rint(dx / box[0, 0]), nb, nc
    return keep, shifts
