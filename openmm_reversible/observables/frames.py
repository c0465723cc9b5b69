"""Shared geometry of trajectory frames: input checks, boxes, displacements, molecules.

Every observable takes plain tensors: ``positions`` (S, N, 3) nm, a box that is either one
(3, 3) matrix shared by all frames (NVT) or one per frame (S, 3, 3) (NPT), masses (N,) amu.
The helpers here validate those inputs once, with messages that name the argument, and provide
the differentiable pieces the observables share: minimum-image displacements frame by frame,
box volumes and perpendicular widths, and molecules made whole and reduced to their centres
of mass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import InputError
from ..geometry import minimum_image


def check_frames(positions: torch.Tensor, name: str = "positions") -> torch.Tensor:
    """Return ``positions`` after checking it is a floating tensor of shape (S, N, 3)."""
    if not isinstance(positions, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of shape (n_frames, n_atoms, 3) in nm, "
                         f"got {type(positions).__name__}; convert with torch.as_tensor")
    if positions.ndim != 3 or positions.shape[-1] != 3:
        raise InputError(f"{name} must have shape (n_frames, n_atoms, 3), got "
                         f"{tuple(positions.shape)}; add a frame axis with {name}[None] "
                         f"for a single frame")
    if not positions.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {positions.dtype}")
    if positions.shape[0] == 0:
        raise InputError(f"{name} has no frames")
    return positions


def check_box(box, n_frames: int, like: torch.Tensor, required: bool = False,
              name: str = "box") -> torch.Tensor | None:
    """Box vectors as a (3, 3) or (n_frames, 3, 3) tensor with the dtype/device of ``like``.

    ``None`` is returned unchanged unless ``required``, which raises an InputError that
    explains why the observable needs a box.
    """
    if box is None:
        if required:
            raise InputError(f"{name} is None but this observable needs the periodic box "
                             f"(its volume); pass the (3, 3) box vectors in nm")
        return None
    box = torch.as_tensor(box, dtype=like.dtype, device=like.device)
    if box.shape != (3, 3) and box.shape != (n_frames, 3, 3):
        raise InputError(f"{name} must have shape (3, 3) or (n_frames={n_frames}, 3, 3), "
                         f"got {tuple(box.shape)}")
    return box


def box_of_frame(box: torch.Tensor | None, frame: int) -> torch.Tensor | None:
    """The box of one frame from a shared (3, 3) box or per-frame (S, 3, 3) boxes."""
    if box is None or box.ndim == 2:
        return box
    return box[frame]


def volumes(box: torch.Tensor) -> torch.Tensor:
    """Box volume(s), nm³: a 0-dim tensor for a (3, 3) box, shape (S,) for (S, 3, 3)."""
    return torch.linalg.det(box).abs()


def displacements(positions: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                  box: torch.Tensor | None, periodic: bool = True) -> torch.Tensor:
    """Displacements ``x[second] - x[first]`` in every frame, shape (S, P, 3), nm.

    With ``periodic`` and a box, the minimum-image convention is applied frame by frame
    (OpenMM's algorithm for reduced triclinic boxes, exact for rectangular ones).
    """
    d = positions[:, second] - positions[:, first]
    return minimum_image_frames(d, box) if periodic else d


def minimum_image_frames(d: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
    """Minimum-image convention for vectors ``d`` (S, ..., 3) with a shared (3, 3) box or one
    (S, 3, 3) box per frame; ``None`` leaves ``d`` unchanged."""
    if box is None:
        return d
    if box.ndim == 2:
        return minimum_image(d, box)
    return torch.stack([minimum_image(d[s], box[s]) for s in range(d.shape[0])])


def as_index(indices, n_atoms: int, name: str) -> torch.Tensor:
    """1-D long tensor of atom indices, checked to be non-empty and within ``[0, n_atoms)``."""
    idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
    if idx.numel() == 0:
        raise InputError(f"{name} is empty: the selection matched no atoms; check the atom "
                         f"names/elements it was built from")
    if int(idx.min()) < 0 or int(idx.max()) >= n_atoms:
        raise InputError(f"{name} has atom indices outside [0, {n_atoms}) "
                         f"(min {int(idx.min())}, max {int(idx.max())})")
    return idx


class MoleculeLayout:
    """Flat, tensor form of a list of molecules (each a sequence of atom indices).

    Attributes
    ----------
    atoms : torch.Tensor, shape (A,), long
        Atom indices of all molecules, concatenated.
    owner : torch.Tensor, shape (A,), long
        Molecule index of each entry of ``atoms``.
    anchor : torch.Tensor, shape (A,), long
        First atom of the owning molecule, the reference for making molecules whole.
    n_molecules : int
    """

    def __init__(self, molecules: Sequence[Sequence[int]], n_atoms: int,
                 name: str = "molecules"):
        if len(molecules) == 0:
            raise InputError(f"{name} is empty; pass a list of atom-index arrays, e.g. "
                             f"openmm_reversible.observables.molecules(topology)")
        parts = [as_index(m, n_atoms, f"{name}[{k}]") for k, m in enumerate(molecules)]
        self.atoms = torch.cat(parts)
        if torch.unique(self.atoms).numel() != self.atoms.numel():
            raise InputError(f"{name} lists some atoms in more than one molecule")
        sizes = torch.tensor([p.numel() for p in parts])
        self.n_molecules = len(parts)
        self.owner = torch.repeat_interleave(torch.arange(self.n_molecules), sizes)
        self.anchor = torch.repeat_interleave(torch.stack([p[0] for p in parts]), sizes)

    def covers(self, n_atoms: int) -> bool:
        """True if every atom ``0 .. n_atoms-1`` belongs to one of the molecules."""
        return self.atoms.numel() == n_atoms

    def whole(self, positions: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        """Positions of ``atoms`` with each molecule made whole, shape (S, A, 3), nm.

        Every atom is placed at the minimum image of its molecule's first atom, so molecules
        split by wrapping are reassembled (molecules must be smaller than half the box).
        """
        local = displacements(positions, self.anchor, self.atoms, box)
        return positions[:, self.anchor] + local

    def centres(self, positions: torch.Tensor, masses: torch.Tensor,
                box: torch.Tensor | None = None) -> torch.Tensor:
        """Centres of mass of the molecules, shape (S, M, 3), nm."""
        return self._mass_average(self.whole(positions, box), masses)

    def offsets(self, positions: torch.Tensor, masses: torch.Tensor,
                box: torch.Tensor | None) -> torch.Tensor:
        """Position of each of ``atoms`` relative to its molecule's centre of mass, (S, A, 3).

        Subtracting these from the atoms' positions gives each atom the centre of mass of its
        molecule *in that atom's own periodic image*.
        """
        whole = self.whole(positions, box)
        return whole - self._mass_average(whole, masses)[:, self.owner]

    def _mass_average(self, values: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
        weighted = values * masses[self.atoms, None]
        sums = values.new_zeros(values.shape[0], self.n_molecules, 3
                                ).index_add(1, self.owner, weighted)
        return sums / self.total_masses(masses)[:, None]

    def velocities(self, velocities: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
        """Centre-of-mass velocities of the molecules, shape (S, M, 3), nm/ps."""
        return self.centres(velocities, masses)

    def total_masses(self, masses: torch.Tensor) -> torch.Tensor:
        """Mass of each molecule, shape (M,), amu."""
        return torch.zeros(self.n_molecules, dtype=masses.dtype, device=masses.device
                           ).index_add(0, self.owner, masses[self.atoms])
