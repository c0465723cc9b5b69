"""Diamond-structure crystals: positions, box and an OpenMM Topology.

The conventional cubic cell of diamond holds 8 atoms (an fcc lattice plus the same lattice
shifted by a/4 along the body diagonal). ``n_cells`` cells per side give ``8·n³`` atoms in a
cubic box of side ``n·a``: 2 → 64 atoms (CPU tests), 5 → 1000 atoms (GPU training).
"""

from __future__ import annotations

import numpy as np
import openmm
from openmm import app

DIAMOND_LATTICE_CONSTANT = 0.3567
"""Lattice constant of diamond at room temperature, nm."""

_BASIS = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0],
                   [0.25, 0.25, 0.25], [0.25, 0.75, 0.75], [0.75, 0.25, 0.75],
                   [0.75, 0.75, 0.25]])


def diamond_lattice(n_cells: int, lattice_constant: float = DIAMOND_LATTICE_CONSTANT
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Perfect diamond crystal.

    Parameters
    ----------
    n_cells : int
        Conventional cells along each axis.
    lattice_constant : float, nm

    Returns
    -------
    positions : ndarray, shape (8·n_cells³, 3), nm
    box : ndarray, shape (3, 3), nm
        Cubic box vectors as rows.
    """
    if int(n_cells) < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    n = int(n_cells)
    cells = np.stack(np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij"),
                     axis=-1).reshape(-1, 1, 3)
    positions = ((cells + _BASIS[None]) * lattice_constant).reshape(-1, 3)
    return positions, np.eye(3) * n * lattice_constant


def diamond_topology(n_atoms: int, box: np.ndarray, element: str = "C") -> app.Topology:
    """Topology with one single-atom residue (name = element symbol) per atom, no bonds."""
    topology = app.Topology()
    chain = topology.addChain()
    elem = app.Element.getBySymbol(element)
    for _ in range(n_atoms):
        residue = topology.addResidue(element, chain)
        topology.addAtom(element, elem, residue)
    topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in np.asarray(box)])
    return topology
