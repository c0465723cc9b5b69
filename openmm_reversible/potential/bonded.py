"""Bonded terms: bonds, angles, torsions and CMAP, the torch twins of OpenMM's bonded forces.

Every bonded interaction is a short *chain* of atoms ``a0 - a1 - ... - ak``. A term stores the
chain atoms of all its items as a long buffer of shape (n_items, k + 1), forms the chain vectors
``x[a(i+1)] - x[ai]`` (minimum image when the OpenMM force uses periodic boundary conditions,
plain differences otherwise), turns them into an internal coordinate (length, angle, dihedral)
and feeds it to a scalar energy law with the item's parameters from its
:class:`~openmm_reversible.potential.base.ParameterTable`:

============================  ========== ==========================  =========================
OpenMM force                  table      columns                     energy
============================  ========== ==========================  =========================
``HarmonicBondForce``         bonds      length (nm), k              k/2 (r - r0)^2
``HarmonicAngleForce``        angles     angle (rad), k              k/2 (theta - theta0)^2
``PeriodicTorsionForce``      torsions   phase (rad), k              k (1 + cos(n phi - phase))
``RBTorsionForce``            torsions   c0 ... c5 (kJ/mol)          sum_n c_n cos^n(phi - pi)
``CMAPTorsionForce``          maps       energy (kJ/mol)             bicubic patch of a grid
============================  ========== ==========================  =========================

Geometry uses ``atan2`` forms only (no ``acos``), so first *and* second derivatives are finite
for every non-degenerate geometry: the library needs Hessian-vector products and parameter
VJPs through forces, i.e. double backward through these functions.

CMAP follows OpenMM exactly: a map of size ``s`` holds energies on the grid
``(i h, j h)``, ``h = 2 pi / s``, at ``energy[i + s j]`` (first torsion ``i``, second ``j``);
derivatives at the grid points come from periodic cubic splines along each axis (the cross
derivative from a spline of the second-angle derivative along the first axis); each grid cell
is a bicubic patch matching values and derivatives at its four corners. Since all of that is
linear in the grid energies, the map energies are an ordinary differentiable table here.
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import torch
from openmm import unit
from torch import nn

from ..errors import InputError
from ..geometry import minimum_image
from ..units import DTYPE, scalar, strip
from . import fused, lawmath, register
from .base import ParameterTable, Term

# ---------------------------------------------------------------------------------------------
# Geometry


def bond_length(b: torch.Tensor) -> torch.Tensor:
    """Length of bond vectors.

    Parameters
    ----------
    b : torch.Tensor, shape (..., 3), nm

    Returns
    -------
    torch.Tensor, shape (...), nm
    """
    return lawmath.norm(b)


def bond_angle(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Angle at the middle atom of the chain ``a0 - a1 - a2``.

    Parameters
    ----------
    b1, b2 : torch.Tensor, shape (..., 3), nm
        Chain vectors ``x[a1] - x[a0]`` and ``x[a2] - x[a1]``.

    Returns
    -------
    torch.Tensor, shape (...), rad
        Angle in [0, pi] between ``x[a0] - x[a1]`` and ``x[a2] - x[a1]``, computed as
        ``atan2(|u x v|, u . v)`` (well conditioned near 0 and pi, unlike ``acos``).
    """
    u = -b1
    sine = lawmath.norm(lawmath.cross(u, b2))
    cosine = lawmath.dot(u, b2)
    return lawmath.atan2(sine, cosine)


def dihedral_angle(b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """Dihedral angle of the chain ``a0 - a1 - a2 - a3`` with OpenMM's (IUPAC) sign convention.

    Parameters
    ----------
    b1, b2, b3 : torch.Tensor, shape (..., 3), nm
        Chain vectors ``x[a1] - x[a0]``, ``x[a2] - x[a1]``, ``x[a3] - x[a2]``.

    Returns
    -------
    torch.Tensor, shape (...), rad
        Angle in (-pi, pi] between the planes (a0, a1, a2) and (a1, a2, a3); 0 for cis,
        pi for trans, positive when ``b1 . (b2 x b3) > 0``. Computed as
        ``atan2(|b2| b1 . (b2 x b3), (b1 x b2) . (b2 x b3))``.
    """
    n1 = lawmath.cross(b1, b2)
    n2 = lawmath.cross(b2, b3)
    y = lawmath.norm(b2) * lawmath.dot(b1, n2)
    x = lawmath.dot(n1, n2)
    return lawmath.atan2(y, x)


# ---------------------------------------------------------------------------------------------
# Energy laws (scalar functions, broadcast over items)


def harmonic_energy(x: torch.Tensor, x0: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``k/2 (x - x0)^2`` (bond lengths in nm or angles in rad; k in kJ/mol per unit^2)."""
    return 0.5 * k * (x - x0) ** 2


def periodic_torsion_energy(phi: torch.Tensor, periodicity: torch.Tensor, phase: torch.Tensor,
                            k: torch.Tensor) -> torch.Tensor:
    """``k (1 + cos(n phi - phase))``, kJ/mol (phi, phase in rad; n an integer)."""
    return k * (1.0 + lawmath.cos(periodicity * phi - phase))


def rb_torsion_energy(phi: torch.Tensor, coefficients) -> torch.Tensor:
    """Ryckaert-Bellemans ``sum_n c_n cos^n(psi)`` with ``psi = phi - pi``, kJ/mol (Horner's
    rule).

    Parameters
    ----------
    phi : torch.Tensor, shape (n,), rad
        Dihedral angles (IUPAC convention, trans = pi).
    coefficients : sequence of torch.Tensor, each shape (n,), kJ/mol
        ``c0 ... c5`` (e.g. the columns of the parameter table, ``table.unbind(1)``).
    """
    cos_psi = -lawmath.cos(phi)
    energy = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        energy = energy * cos_psi + c
    return energy


def periodic_spline_derivative_matrix(size: int) -> np.ndarray:
    """Matrix mapping periodic grid values to their periodic cubic spline derivatives.

    Parameters
    ----------
    size : int
        Number of grid points on [0, 2 pi), spacing ``h = 2 pi / size`` (at least 2).

    Returns
    -------
    numpy.ndarray, shape (size, size), 1/rad
        ``D`` with ``(D @ y)[j]`` the slope at ``x_j = j h`` of the periodic cubic spline
        through ``y`` (the spline OpenMM fits for CMAP). The spline's second derivatives ``m``
        solve ``m[j-1] + 4 m[j] + m[j+1] = 6 (y[j+1] - 2 y[j] + y[j-1]) / h^2`` (indices modulo
        ``size``); the slope at the left end of cell j is
        ``(y[j+1] - y[j]) / h - h (2 m[j] + m[j+1]) / 6``.
    """
    h = 2.0 * math.pi / size
    eye = np.eye(size)
    shift = np.roll(eye, 1, axis=1)  # (shift @ y)[j] = y[j + 1]
    curvature = 6.0 / h**2 * np.linalg.solve(4.0 * eye + shift + shift.T,
                                            shift + shift.T - 2.0 * eye)
    return (shift - eye) / h - h / 6.0 * (2.0 * eye + shift) @ curvature


def _bicubic_coefficient_matrix() -> np.ndarray:
    """Matrix taking corner data of a unit cell to bicubic coefficients.

    The 16 corner data, corners ordered (0,0), (1,0), (1,1), (0,1), are the values, then the
    x-derivatives, then the y-derivatives, then the cross derivatives. The result ``c`` gives
    ``p(x, y) = sum_{p,q} c[4 p + q] x^p y^q``.
    """
    corners = ((0, 0), (1, 0), (1, 1), (0, 1))
    powers = [(p, q) for p in range(4) for q in range(4)]

    def monomial(n: int, order: int, t: float) -> float:
        # d^order/dt^order of t^n at t.
        if n < order:
            return 0.0
        return math.prod(range(n - order + 1, n + 1)) * t ** (n - order)

    orders = ((0, 0), (1, 0), (0, 1), (1, 1))
    rows = [[monomial(p, ox, x) * monomial(q, oy, y) for p, q in powers]
            for ox, oy in orders for x, y in corners]
    return np.linalg.inv(np.asarray(rows, dtype=float))


# ---------------------------------------------------------------------------------------------
# The same laws as functions of the chain vectors, for the fused kernels (:mod:`.fused`)


def _bond_law(vectors, p, c):
    return harmonic_energy(bond_length(vectors[0]), p[0], p[1])


def _angle_law(vectors, p, c):
    return harmonic_energy(bond_angle(vectors[0], vectors[1]), p[0], p[1])


def _torsion_law(vectors, p, c):
    """Rows (periodicity, phase, k): the integer periodicity rides along as a float column."""
    return periodic_torsion_energy(dihedral_angle(*vectors), p[0], p[1], p[2])


def _rb_torsion_law(vectors, p, c):
    """Rows (c0 ... c5)."""
    return rb_torsion_energy(dihedral_angle(*vectors), p)


# ---------------------------------------------------------------------------------------------
# Terms


class BondedTerm(Term):
    """Common machinery of the bonded terms: chain atoms, one parameter table, periodicity.

    Subclasses set ``openmm_class``, ``table_name``, ``columns`` (the table's column names),
    ``chain_width`` (atoms per item) and ``_read`` (the constructor arguments read from an
    OpenMM force), and implement ``forward``.

    Parameters
    ----------
    atoms : array-like of int, shape (n_items, chain_width)
        Atom indices of each item's chain (2 for bonds, 3 for angles, 4 for torsions;
        CMAP stores two chains of 4 side by side).
    params : array-like, shape (n_rows, len(columns))
        Base values of the parameter table, MD units (one row per item, except for CMAP).
    periodic : bool
        Whether the OpenMM force uses periodic boundary conditions (minimum image on every
        chain vector).
    force_index : int
        Index of the twin force in its System.
    """

    table_name: str = ""
    columns: tuple[str, ...] = ()
    chain_width: int = 0

    def __init__(self, atoms, params, periodic: bool = False, force_index: int = -1):
        super().__init__(force_index)
        atoms = np.asarray(atoms, dtype=np.int64)
        params = np.asarray(params, dtype=float)
        if atoms.size == 0:
            atoms = atoms.reshape(0, self.chain_width)
        if params.size == 0:
            params = params.reshape(0, len(self.columns))
        if atoms.ndim != 2 or atoms.shape[1] != self.chain_width:
            raise InputError(f"{self.name} needs atoms of shape (n, {self.chain_width}), "
                             f"got {atoms.shape}")
        if params.ndim != 2 or params.shape[1] != len(self.columns):
            raise InputError(f"{self.name} needs parameters of shape (n, {len(self.columns)}) "
                             f"with columns {list(self.columns)}, got {params.shape}")
        self.register_buffer("atoms", torch.as_tensor(atoms))
        self.periodic = bool(periodic)
        self.tables[self.table_name] = ParameterTable(params, self.columns)

    @property
    def n_items(self) -> int:
        """Number of interactions (bonds, angles, torsions or CMAP torsion pairs)."""
        return int(self.atoms.shape[0])

    @classmethod
    def _read(cls, force: openmm.Force) -> tuple:
        """Constructor arguments before ``periodic``, read from an OpenMM force."""
        raise NotImplementedError

    @classmethod
    def from_force(cls, force: openmm.Force, index: int = -1,
                   system: openmm.System | None = None) -> BondedTerm:
        """The twin of an OpenMM force (the factory registered for its class).

        Parameters
        ----------
        force : openmm.Force
            Force of class ``cls.openmm_class``.
        index : int
            Index of the force in its System.
        system : openmm.System, optional
            Unused: bonded terms need nothing from the System (factory signature).
        """
        return cls(*cls._read(force), periodic=force.usesPeriodicBoundaryConditions(),
                   force_index=index)

    def chain_vectors(self, positions: torch.Tensor, box: torch.Tensor | None,
                      atoms: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Vectors ``x[a(i+1)] - x[ai]`` along each chain, each of shape (n_items, 3), nm.

        Parameters
        ----------
        positions : torch.Tensor, shape (n_atoms, 3), nm
        box : torch.Tensor, shape (3, 3), nm, or None
            Required when the force is periodic, ignored otherwise.
        atoms : torch.Tensor, shape (n_items, n_chain), optional
            Chains to use instead of ``self.atoms``.
        """
        atoms = self.atoms if atoms is None else atoms
        if self.periodic and box is None:
            raise InputError(
                f"{self.name} (force {self.force_index}) uses periodic boundary conditions but "
                "no box was given; pass the periodic box vectors (3, 3) in nm")
        x = positions[atoms]
        d = x[:, 1:] - x[:, :-1]
        if self.periodic:
            d = minimum_image(d, box)
        return list(d.unbind(1))

    def parameters_now(self, sites: torch.Tensor | None) -> torch.Tensor:
        """The current parameter table, shape (n_rows, len(columns))."""
        return self.tables[self.table_name](sites)

    fused_law: fused.ChainLaw | None = None
    """The term's law for the fused chain kernel (subclasses that have one)."""

    @property
    def has_fused(self) -> bool:
        return self.fused_law is not None

    def fused_rows(self, sites: torch.Tensor | None) -> torch.Tensor:
        """Parameter rows of :attr:`fused_law`, one per item (default: the table)."""
        return self.parameters_now(sites)

    def fused_energy(self, positions, box, sites=None):
        if not self.has_fused:
            return super().fused_energy(positions, box, sites)
        if self.periodic and box is None:
            self.chain_vectors(positions, box)  # raises the missing-box error
        return fused.chain_energy(self.fused_law, positions, box, self.atoms,
                                  self.fused_rows(sites), periodic=self.periodic)


class HarmonicBondTerm(BondedTerm):
    """``HarmonicBondForce``: ``E = sum k/2 (r - r0)^2``; table ``bonds`` (length nm, k
    kJ/mol/nm^2)."""

    openmm_class = "HarmonicBondForce"
    table_name, columns, chain_width = "bonds", ("length", "k"), 2
    fused_law = fused.ChainLaw("harmonic_bond", _bond_law, width=2, n_params=2, n_consts=0,
                               sources=(harmonic_energy,))

    def forward(self, positions, box, sites=None):
        params = self.parameters_now(sites)
        (b,) = self.chain_vectors(positions, box)
        return harmonic_energy(bond_length(b), params[:, 0], params[:, 1]).sum()

    @classmethod
    def _read(cls, force: openmm.HarmonicBondForce) -> tuple:
        atoms, params = [], []
        for i in range(force.getNumBonds()):
            p1, p2, length, k = force.getBondParameters(i)
            atoms.append((p1, p2))
            params.append((scalar(length, unit.nanometer),
                           scalar(k, unit.kilojoule_per_mole / unit.nanometer**2)))
        return atoms, params


class HarmonicAngleTerm(BondedTerm):
    """``HarmonicAngleForce``: ``E = sum k/2 (theta - theta0)^2``; table ``angles`` (angle rad,
    k kJ/mol/rad^2)."""

    openmm_class = "HarmonicAngleForce"
    table_name, columns, chain_width = "angles", ("angle", "k"), 3
    fused_law = fused.ChainLaw("harmonic_angle", _angle_law, width=3, n_params=2, n_consts=0,
                               sources=(harmonic_energy,))

    def forward(self, positions, box, sites=None):
        params = self.parameters_now(sites)
        b1, b2 = self.chain_vectors(positions, box)
        return harmonic_energy(bond_angle(b1, b2), params[:, 0], params[:, 1]).sum()

    @classmethod
    def _read(cls, force: openmm.HarmonicAngleForce) -> tuple:
        atoms, params = [], []
        for i in range(force.getNumAngles()):
            p1, p2, p3, angle, k = force.getAngleParameters(i)
            atoms.append((p1, p2, p3))
            params.append((scalar(angle, unit.radian),
                           scalar(k, unit.kilojoule_per_mole / unit.radian**2)))
        return atoms, params


class PeriodicTorsionTerm(BondedTerm):
    """``PeriodicTorsionForce``: ``E = sum k (1 + cos(n phi - phase))``; table ``torsions``
    (phase rad, k kJ/mol).

    Parameters
    ----------
    atoms : array-like of int, shape (n_torsions, 4)
    periodicity : array-like of int, shape (n_torsions,)
        The integer ``n`` of each torsion; a buffer, not a trainable column.
    params : array-like, shape (n_torsions, 2)
        Phase (rad) and k (kJ/mol).
    periodic, force_index
        As for :class:`BondedTerm`.
    """

    openmm_class = "PeriodicTorsionForce"
    table_name, columns, chain_width = "torsions", ("phase", "k"), 4
    fused_law = fused.ChainLaw("periodic_torsion", _torsion_law, width=4, n_params=3,
                               n_consts=0, sources=(periodic_torsion_energy,))

    def __init__(self, atoms, periodicity, params, periodic: bool = False,
                 force_index: int = -1):
        super().__init__(atoms, params, periodic, force_index)
        periodicity = np.asarray(periodicity, dtype=np.int64).reshape(-1)
        if periodicity.shape[0] != self.n_items:
            raise InputError(f"{self.name} has {self.n_items} torsions but "
                             f"{periodicity.shape[0]} periodicities")
        self.register_buffer("periodicity", torch.as_tensor(periodicity))

    def forward(self, positions, box, sites=None):
        params = self.parameters_now(sites)
        phi = dihedral_angle(*self.chain_vectors(positions, box))
        return periodic_torsion_energy(phi, self.periodicity, params[:, 0], params[:, 1]).sum()

    def fused_rows(self, sites: torch.Tensor | None) -> torch.Tensor:
        params = self.parameters_now(sites)
        return torch.cat([self.periodicity.to(params.dtype)[:, None], params], 1)

    @classmethod
    def _read(cls, force: openmm.PeriodicTorsionForce) -> tuple:
        atoms, periodicity, params = [], [], []
        for i in range(force.getNumTorsions()):
            p1, p2, p3, p4, n, phase, k = force.getTorsionParameters(i)
            atoms.append((p1, p2, p3, p4))
            periodicity.append(n)
            params.append((scalar(phase, unit.radian), scalar(k, unit.kilojoule_per_mole)))
        return atoms, periodicity, params


class RBTorsionTerm(BondedTerm):
    """``RBTorsionForce``: ``E = sum_n c_n cos^n(phi - pi)``; table ``torsions`` (c0 ... c5,
    kJ/mol)."""

    openmm_class = "RBTorsionForce"
    table_name, columns, chain_width = "torsions", ("c0", "c1", "c2", "c3", "c4", "c5"), 4
    fused_law = fused.ChainLaw("rb_torsion", _rb_torsion_law, width=4, n_params=6, n_consts=0,
                               sources=(rb_torsion_energy,))

    def forward(self, positions, box, sites=None):
        params = self.parameters_now(sites)
        phi = dihedral_angle(*self.chain_vectors(positions, box))
        return rb_torsion_energy(phi, params.unbind(1)).sum()

    @classmethod
    def _read(cls, force: openmm.RBTorsionForce) -> tuple:
        atoms, params = [], []
        for i in range(force.getNumTorsions()):
            p1, p2, p3, p4, *coefficients = force.getTorsionParameters(i)
            atoms.append((p1, p2, p3, p4))
            params.append([scalar(c, unit.kilojoule_per_mole) for c in coefficients])
        return atoms, params


class _CMAPGrids(nn.Module):
    """All maps of one grid size and the torsion pairs that use them.

    Parameters
    ----------
    size : int
        Grid points per axis.
    rows : array-like of int, shape (n_maps, size * size)
        Rows of the term's ``maps`` table holding each map, in OpenMM's order.
    pairs : array-like of int, shape (n_pairs,)
        Indices (into the term's torsion pairs) of the pairs using these maps.
    local_map : array-like of int, shape (n_pairs,)
        Map of each pair, as an index into ``rows``.
    """

    def __init__(self, size: int, rows, pairs, local_map):
        super().__init__()
        self.size = int(size)
        self.register_buffer("derivative", torch.as_tensor(
            periodic_spline_derivative_matrix(self.size), dtype=DTYPE))
        self.register_buffer("bicubic", torch.as_tensor(_bicubic_coefficient_matrix(),
                                                        dtype=DTYPE))
        self.register_buffer("rows", torch.as_tensor(np.asarray(rows, dtype=np.int64)))
        self.register_buffer("pairs", torch.as_tensor(np.asarray(pairs, dtype=np.int64)))
        self.register_buffer("local_map", torch.as_tensor(np.asarray(local_map,
                                                                     dtype=np.int64)))

    def energy(self, grid_values: torch.Tensor, phi: torch.Tensor,
               psi: torch.Tensor) -> torch.Tensor:
        """Energies (kJ/mol) of the pairs, given the full ``maps`` column and their angles.

        Parameters
        ----------
        grid_values : torch.Tensor, shape (n_rows,), kJ/mol
            The term's ``maps`` table column.
        phi, psi : torch.Tensor, shape (n_pairs,), rad
            First and second dihedral angle of each pair using these maps.
        """
        size, h = self.size, 2.0 * math.pi / self.size
        d = self.derivative.to(grid_values.dtype)
        # grid[m, i, j]: energy at first angle i h, second angle j h (OpenMM: energy[i + s j]).
        grid = grid_values[self.rows].reshape(-1, size, size).transpose(1, 2)
        d_first = d @ grid
        d_second = grid @ d.T
        d_cross = d @ d_second
        a = torch.remainder(phi, 2.0 * math.pi) / h
        b = torch.remainder(psi, 2.0 * math.pi) / h
        s = a.detach().floor().long().clamp(max=size - 1)
        t = b.detach().floor().long().clamp(max=size - 1)
        da, db = a - s, b - t
        s1, t1 = (s + 1) % size, (t + 1) % size
        m = self.local_map

        def corners(values: torch.Tensor) -> torch.Tensor:
            return torch.stack([values[m, s, t], values[m, s1, t], values[m, s1, t1],
                                values[m, s, t1]], dim=-1)

        data = torch.cat([corners(grid), corners(d_first) * h, corners(d_second) * h,
                          corners(d_cross) * h * h], dim=-1)
        coefficients = (data @ self.bicubic.to(data.dtype).T).reshape(-1, 4, 4)
        powers_a = torch.stack([torch.ones_like(da), da, da**2, da**3], dim=-1)
        powers_b = torch.stack([torch.ones_like(db), db, db**2, db**3], dim=-1)
        return torch.einsum("npq,np,nq->n", coefficients, powers_a, powers_b)


class CMAPTorsionTerm(BondedTerm):
    """``CMAPTorsionForce``: bicubic interpolation of energy maps over pairs of dihedrals.

    Table ``maps`` has one row per grid point of every map (column ``energy``, kJ/mol): map
    ``m`` of size ``s`` occupies rows ``offset[m] ... offset[m] + s*s - 1`` in OpenMM's order
    (row ``offset[m] + i + s j`` is the energy at first angle ``i 2pi/s`` and second angle
    ``j 2pi/s``), with maps in OpenMM's order.

    Parameters
    ----------
    atoms : array-like of int, shape (n_pairs, 8)
        The two 4-atom chains of each torsion pair side by side.
    torsion_maps : array-like of int, shape (n_pairs,)
        Map used by each pair.
    maps : sequence of (int, array-like)
        ``(size, energies)`` of each map, energies (kJ/mol) of length ``size**2``.
    periodic, force_index
        As for :class:`BondedTerm`.
    """

    openmm_class = "CMAPTorsionForce"
    table_name, columns, chain_width = "maps", ("energy",), 8

    def __init__(self, atoms, torsion_maps, maps, periodic: bool = False,
                 force_index: int = -1):
        sizes = [int(size) for size, _ in maps]
        grids = [np.asarray(energies, dtype=float).reshape(-1) for _, energies in maps]
        for m, (size, energies) in enumerate(zip(sizes, grids, strict=True)):
            if size < 2 or energies.shape[0] != size * size:
                raise InputError(f"CMAP map {m} of size {size} needs {size * size} energies "
                                 f"(size at least 2), got {energies.shape[0]}")
        super().__init__(atoms, np.concatenate([np.zeros(0), *grids])[:, None], periodic,
                         force_index)
        torsion_maps = np.asarray(torsion_maps, dtype=np.int64).reshape(-1)
        if torsion_maps.shape[0] != self.n_items:
            raise InputError(f"{self.name} has {self.n_items} torsion pairs but "
                             f"{torsion_maps.shape[0]} map indices")
        if torsion_maps.size and (torsion_maps.min() < 0 or torsion_maps.max() >= len(maps)):
            raise InputError(f"{self.name}: map indices must lie in [0, {len(maps)}); "
                             f"got {torsion_maps.min()} ... {torsion_maps.max()}")
        offsets = np.concatenate([[0], np.cumsum(np.square(sizes))]).astype(np.int64)
        groups = []
        for size in sorted(set(sizes)):
            same = [m for m, s in enumerate(sizes) if s == size]
            pairs = np.flatnonzero(np.isin(torsion_maps, same))
            if len(pairs) == 0:
                continue
            rows = [np.arange(offsets[m], offsets[m] + size * size) for m in same]
            groups.append(_CMAPGrids(size, rows, pairs, np.searchsorted(same,
                                                                        torsion_maps[pairs])))
        self.grids = nn.ModuleList(groups)

    def forward(self, positions, box, sites=None):
        values = self.parameters_now(sites)[:, 0]
        phi = dihedral_angle(*self.chain_vectors(positions, box, self.atoms[:, :4]))
        psi = dihedral_angle(*self.chain_vectors(positions, box, self.atoms[:, 4:]))
        energy = positions.new_zeros(())
        for grids in self.grids:
            energy = energy + grids.energy(values, phi[grids.pairs], psi[grids.pairs]).sum()
        return energy

    @classmethod
    def _read(cls, force: openmm.CMAPTorsionForce) -> tuple:
        maps = []
        for m in range(force.getNumMaps()):
            size, energies = force.getMapParameters(m)
            maps.append((size, strip(energies, unit.kilojoule_per_mole)))
        atoms, torsion_maps = [], []
        for i in range(force.getNumTorsions()):
            map_index, *chain = force.getTorsionParameters(i)
            atoms.append(chain)
            torsion_maps.append(map_index)
        return atoms, torsion_maps, maps


for _term in (HarmonicBondTerm, HarmonicAngleTerm, PeriodicTorsionTerm, RBTorsionTerm,
              CMAPTorsionTerm):
    register(_term.openmm_class)(_term.from_force)

__all__ = ["BondedTerm", "HarmonicBondTerm", "HarmonicAngleTerm", "PeriodicTorsionTerm",
           "RBTorsionTerm", "CMAPTorsionTerm", "bond_length", "bond_angle", "dihedral_angle",
           "harmonic_energy", "periodic_torsion_energy", "rb_torsion_energy",
           "periodic_spline_derivative_matrix"]
