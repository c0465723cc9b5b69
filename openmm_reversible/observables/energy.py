"""Potential energy of frames, per molecule, and the enthalpy of vaporisation.

A *potential* is any callable ``potential(positions, box) -> energy`` taking one frame,
positions (N, 3) nm and box (3, 3) nm or ``None``, and returning a 0-dim tensor in kJ/mol
(a :class:`~openmm_reversible.potential.TorchPotential`, or any torch function). Energies are
differentiable in the frames and in the potential's parameters.

The enthalpy of vaporisation of a pure liquid of N molecules,

    ΔH_vap = ⟨E_gas⟩ - ⟨E_liquid⟩ / N + RT,

takes the ideal-gas pV = RT per mole of vapour and neglects the liquid's pV (≈ 2e-3 kJ/mol for
water at 1 bar). ``⟨E_gas⟩`` is the average potential energy of one isolated molecule: a value
from the literature, or :func:`energy_per_molecule` over frames of a single-molecule simulation
(``box=None``); for rigid water it is 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from ..units import KB
from .frames import box_of_frame, check_box, check_frames

Potential = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``potential(positions (N, 3) nm, box (3, 3) nm or None) -> energy (0-dim) kJ/mol``."""


def frame_energies(potential: Potential, positions: torch.Tensor, box=None) -> torch.Tensor:
    """Potential energy of every frame.

    Parameters
    ----------
    potential : callable
        ``potential(positions (N, 3), box (3, 3) or None) -> energy``, kJ/mol.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm, optional
        ``None`` for a non-periodic system.

    Returns
    -------
    torch.Tensor, shape (n_frames,), kJ/mol
        Differentiable in the frames and the potential's parameters.
    """
    positions = check_frames(positions)
    box = check_box(box, positions.shape[0], positions)
    energies = [potential(positions[s], box_of_frame(box, s)) for s in range(positions.shape[0])]
    for s, e in enumerate(energies):
        if not isinstance(e, torch.Tensor) or e.numel() != 1:
            raise InputError(f"potential returned {type(e).__name__} "
                             f"{tuple(getattr(e, 'shape', ()))} for frame {s}; it must return "
                             f"a scalar tensor (energy in kJ/mol)")
    return torch.stack([e.reshape(()) for e in energies])


def energy_per_molecule(potential: Potential, positions: torch.Tensor, box,
                        n_molecules: int) -> torch.Tensor:
    """Potential energy per molecule in every frame, kJ/mol, shape (n_frames,).

    Parameters
    ----------
    potential : callable
        ``potential(positions (N, 3), box) -> energy``, kJ/mol.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm, or None
    n_molecules : int
        Number of molecules in the frames (1 for a gas-phase reference).
    """
    if int(n_molecules) != n_molecules or n_molecules < 1:
        raise InputError(f"n_molecules must be a positive integer, got {n_molecules!r}")
    return frame_energies(potential, positions, box) / int(n_molecules)


def enthalpy_of_vaporization(liquid_energy_per_molecule, gas_energy_per_molecule,
                             temperature: float) -> torch.Tensor:
    """ΔH_vap = ⟨E_gas⟩ - ⟨E_liquid⟩/N + RT, kJ/mol.

    Parameters
    ----------
    liquid_energy_per_molecule : torch.Tensor, shape (n_frames,) or scalar, kJ/mol
        Liquid potential energy per molecule (e.g. from :func:`energy_per_molecule`); averaged
        over frames here.
    gas_energy_per_molecule : float or torch.Tensor, shape (n_frames,) or scalar, kJ/mol
        Potential energy of one isolated molecule; averaged over frames here.
    temperature : float, K

    Returns
    -------
    torch.Tensor, 0-dim, kJ/mol
    """
    if not temperature > 0:
        raise InputError(f"temperature must be positive (K), got {temperature!r}")
    liquid = torch.as_tensor(liquid_energy_per_molecule)
    gas = torch.as_tensor(gas_energy_per_molecule, dtype=liquid.dtype, device=liquid.device)
    for name, value in (("liquid_energy_per_molecule", liquid),
                        ("gas_energy_per_molecule", gas)):
        if value.ndim > 1 or value.numel() == 0:
            raise InputError(f"{name} must be a scalar or one value per frame, got shape "
                             f"{tuple(value.shape)}")
    return gas.mean() - liquid.mean() + KB * float(temperature)
