"""OpenMM Reference-platform energies and forces for comparing torch terms against.

Every force term of the torch mirror is tested on its own: the OpenMM force of interest is
copied out of a full System into a System holding only that force (same particles, same
masses, same default box), and evaluated with the double-precision Reference platform.
Results are plain NumPy in OpenMM's MD units (kJ/mol, kJ/mol/nm), so tests compare them with
torch tensors directly.
"""

from __future__ import annotations

import numpy as np
import openmm
from openmm import unit

from openmm_reversible.units import strip


def single_force_system(system: openmm.System, force_index: int) -> openmm.System:
    """Copy of ``system`` that holds only the force at ``force_index``.

    Parameters
    ----------
    system : openmm.System
        Source system; it is not modified.
    force_index : int
        Index of the force to keep, as in ``system.getForce(force_index)``.

    Returns
    -------
    openmm.System
        New system with the same particles (masses in amu), the same default periodic box
        vectors and a deep copy (through ``XmlSerializer``) of the one force, in force group 0.
        Constraints and virtual sites are not copied: the force alone is under test.
    """
    single = openmm.System()
    for i in range(system.getNumParticles()):
        single.addParticle(system.getParticleMass(i))
    single.setDefaultPeriodicBoxVectors(*system.getDefaultPeriodicBoxVectors())
    force = openmm.XmlSerializer.clone(system.getForce(force_index))
    force.setForceGroup(0)
    single.addForce(force)
    return single


def reference_energy_forces(system: openmm.System, positions,
                            box=None) -> tuple[float, np.ndarray]:
    """Potential energy and forces of ``system`` on OpenMM's Reference platform (double).

    Parameters
    ----------
    system : openmm.System
        System to evaluate (all of its forces are summed).
    positions : array_like or openmm.unit.Quantity, shape (n_atoms, 3), nm
        Particle positions.
    box : array_like or openmm.unit.Quantity, shape (3, 3), nm, optional
        Periodic box vectors as rows; default: the system's default box vectors.

    Returns
    -------
    energy : float, kJ/mol
        Total potential energy.
    forces : numpy.ndarray, shape (n_atoms, 3), kJ/mol/nm
        Forces on every particle (float64).
    """
    integrator = openmm.VerletIntegrator(0.001)
    platform = openmm.Platform.getPlatformByName("Reference")
    context = openmm.Context(system, integrator, platform)
    try:
        if box is not None:
            vectors = np.asarray(strip(box, unit.nanometer), dtype=np.float64)
            context.setPeriodicBoxVectors(*(openmm.Vec3(*row) for row in vectors))
        context.setPositions(np.asarray(strip(positions, unit.nanometer), dtype=np.float64))
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        forces = np.asarray(state.getForces(asNumpy=True)
                            .value_in_unit(unit.kilojoule_per_mole / unit.nanometer),
                            dtype=np.float64)
    finally:
        del context, integrator
    return float(energy), forces


def relative_errors(energy: float, forces, reference_energy: float, reference_forces
                    ) -> tuple[float, float]:
    """Relative energy error and relative RMS force error against a reference.

    Parameters
    ----------
    energy : float, kJ/mol
    forces : array_like, shape (n_atoms, 3), kJ/mol/nm
    reference_energy : float, kJ/mol
    reference_forces : array_like, shape (n_atoms, 3), kJ/mol/nm

    Returns
    -------
    (float, float)
        ``|E - E_ref| / |E_ref|`` and ``rms(F - F_ref) / rms(F_ref)``: the quantities bounded by
        the numerical contract (1e-6 and 1e-5 per force).
    """
    forces = np.asarray(forces, dtype=np.float64)
    reference_forces = np.asarray(reference_forces, dtype=np.float64)
    energy_error = abs(energy - reference_energy) / abs(reference_energy)
    force_error = float(np.sqrt(np.mean((forces - reference_forces) ** 2)
                                / np.mean(reference_forces ** 2)))
    return float(energy_error), force_error
