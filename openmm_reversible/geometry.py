"""Geometry, used by every room: minimum-image displacements, box widths, neighbour lists.

The list only decides *which pairs are candidates*; energies always mask pairs beyond the
cutoff, so any list that contains every pair within the cutoff gives the same interaction set.
That is what makes forward and reverse dynamics see identical interactions: a rebuild (triggered
when some atom moved more than ``skin / 2`` since the last build) can only add or remove pairs
that contribute exactly zero.

Candidate pairs come from vesin's O(N) cell list (any box shape). Displacements are recomputed
in torch at every evaluation with the minimum-image convention for OpenMM's reduced triclinic
boxes, so they are differentiable w.r.t. positions and box vectors and unaffected by wrapping.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import vesin


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
        self._calc: vesin.NeighborList | None = None  # native handle, made on first build
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

    def __getstate__(self) -> dict:
        # The native cell-list handle can be neither copied nor pickled; a copy makes its own.
        state = self.__dict__.copy()
        state["_calc"] = None
        return state

    def _build(self, x: np.ndarray, box: np.ndarray | None, device) -> None:
        if self._calc is None:
            self._calc = vesin.NeighborList(cutoff=self.cutoff + self.skin, full_list=False)
        if box is None:
            i, j = self._calc.compute(points=x, box=np.zeros((3, 3)), periodic=False,
                                      quantities="ij")
        else:
            # vesin wants all atoms inside the cell for its cell assignment: wrap a copy.
            frac = x @ np.linalg.inv(box)
            xw = (frac - np.floor(frac)) @ box
            i, j = self._calc.compute(points=xw, box=box, periodic=True, quantities="ij")
        i = np.asarray(i, dtype=np.int64)
        j = np.asarray(j, dtype=np.int64)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = lo != hi
        # One entry per unordered pair (a small box can produce the same pair via two images;
        # minimum image picks one), in a deterministic order.
        key = np.sort(lo[keep] * x.shape[0] + hi[keep])
        key = key[np.concatenate(([True], key[1:] != key[:-1]))[:key.size]]  # unique, fast
        self._pairs = (torch.from_numpy(key // x.shape[0]).to(device),
                       torch.from_numpy(key % x.shape[0]).to(device))
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
            excluded = self.excluded_keys.to(i.device)
            if excluded.numel():
                # Sorted keys: a binary search finds each pair's would-be slot.
                key = i * self.n_particles + j
                slot = torch.searchsorted(excluded, key).clamp(max=excluded.numel() - 1)
                keep = excluded[slot] != key
                i, j = i[keep], j[keep]
            x = shifts = None
            if box is not None:
                with torch.no_grad():
                    x = positions.detach().clone()
                    raw = x[j] - x[i]
                    shifts = image_shifts(raw, minimum_image(raw, box), box)
            self._cache = (listed, i, j, x, shifts)
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
