"""Instantaneous temperature with the degrees of freedom the System really has.

``T = 2 K / (n_dof k_B)`` with ``K = Σ m v² / 2``. A rigid or constrained System has fewer
degrees of freedom than ``3N``: OpenMM (``StateDataReporter``) counts 3 per particle with mass,
minus one per constraint, minus 3 when a ``CMMotionRemover`` removes the centre-of-mass motion.
:func:`degrees_of_freedom` counts them that way, so the temperature of a rigid water box is
not underestimated by a third.
"""

from __future__ import annotations

import openmm
import torch

from ..errors import InputError
from ..units import KB


def degrees_of_freedom(system: openmm.System) -> int:
    """OpenMM's count: 3 per massive particle − constraints − 3 with a CMMotionRemover."""
    n = sum(3 for i in range(system.getNumParticles())
            if system.getParticleMass(i).value_in_unit(openmm.unit.dalton) > 0)
    n -= system.getNumConstraints()
    if any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces()):
        n -= 3
    return n


def temperature(velocities: torch.Tensor, masses: torch.Tensor, n_dof: int) -> torch.Tensor:
    """Instantaneous temperature of every frame, K.

    Parameters
    ----------
    velocities : torch.Tensor, shape (n_frames, n_atoms, 3), nm/ps
    masses : torch.Tensor, shape (n_atoms,), amu
    n_dof : int
        Degrees of freedom (:func:`degrees_of_freedom`; ``3 * n_atoms`` for a flexible System
        without a centre-of-mass remover).

    Returns
    -------
    torch.Tensor, shape (n_frames,), K
    """
    if velocities.ndim != 3 or velocities.shape[-1] != 3:
        raise InputError(f"velocities must have shape (n_frames, n_atoms, 3); got "
                         f"{tuple(velocities.shape)}")
    if masses.shape != velocities.shape[1:2]:
        raise InputError(f"masses has shape {tuple(masses.shape)}; expected "
                         f"({velocities.shape[1]},) to match the velocities")
    if int(n_dof) < 1:
        raise InputError(f"n_dof must be >= 1, got {n_dof}")
    kinetic = 0.5 * (masses.to(velocities.dtype)[None, :, None] * velocities ** 2).sum((1, 2))
    return 2.0 * kinetic / (int(n_dof) * KB)


__all__ = ["degrees_of_freedom", "temperature"]
