"""Unit handling at the public boundary.

Inside the library everything is in OpenMM's MD units (nm, ps, kJ/mol, amu, e, K, rad) and
plain numbers/tensors. ``openmm.unit`` Quantities are accepted at the public boundary and
stripped here, in one place.
"""

from __future__ import annotations

import numpy as np
import torch
from openmm import unit

DTYPE = torch.float64
"""Default floating-point type for state and potential."""

KB = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)
"""Boltzmann constant times Avogadro's number, kJ/mol/K."""

ONE_4PI_EPS0 = 1.0 / (4.0 * np.pi * (1e-6 * 8.8541878128e-12
                                     / (1.602176634e-19 ** 2 * 6.02214076e23)))
"""Coulomb constant 1/(4πε₀), kJ·nm/(mol·e²), with the CODATA 2018 values OpenMM uses."""


def strip(value, md_unit):
    """Return ``value`` as a plain number/array in ``md_unit`` if it is a Quantity.

    Parameters
    ----------
    value : float, array-like or openmm.unit.Quantity
        The value to convert. Plain numbers are assumed to be in MD units already.
    md_unit : openmm.unit.Unit
        The MD unit to express a Quantity in (e.g. ``unit.nanometer``).
    """
    if unit.is_quantity(value):
        value = value.value_in_unit(md_unit)
        if isinstance(value, list | tuple):
            value = np.asarray([v.value_in_unit(md_unit) if unit.is_quantity(v) else v
                                for v in value], dtype=float)
    return value


def scalar(value, md_unit) -> float:
    """``value`` (a number or a scalar Quantity) as a float in ``md_unit``."""
    return float(strip(value, md_unit))


def positions_tensor(positions, dtype=DTYPE, device=None) -> torch.Tensor:
    """Positions (Quantity, list of Vec3, array) → tensor of shape (n_atoms, 3) in nm."""
    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.nanometer)
    arr = np.asarray([[p[0], p[1], p[2]] for p in positions], dtype=float) \
        if not isinstance(positions, np.ndarray | torch.Tensor) else positions
    return torch.as_tensor(arr, dtype=dtype, device=device).reshape(-1, 3)


def velocities_tensor(velocities, dtype=DTYPE, device=None) -> torch.Tensor:
    """Velocities (Quantity, list of Vec3, array) → tensor of shape (n_atoms, 3) in nm/ps.

    A Quantity in any velocity unit is converted (e.g. OpenMM's
    ``state.getVelocities()``, nm/ps); plain numbers are taken as nm/ps.
    """
    return positions_tensor(strip(velocities, unit.nanometer / unit.picosecond), dtype=dtype,
                            device=device)


def box_tensor(box, dtype=DTYPE, device=None) -> torch.Tensor | None:
    """Periodic box vectors (Quantity, 3 Vec3, (3,3) array) → (3, 3) tensor in nm, rows a, b, c.

    ``None`` stays ``None`` (non-periodic).
    """
    if box is None:
        return None
    if unit.is_quantity(box):
        box = box.value_in_unit(unit.nanometer)
    arr = np.asarray([[v[0], v[1], v[2]] for v in box], dtype=float) \
        if not isinstance(box, np.ndarray | torch.Tensor) else box
    return torch.as_tensor(arr, dtype=dtype, device=device).reshape(3, 3)
