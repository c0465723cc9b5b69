"""Ensemble targets: equilibrium averages over OpenMM's sampled frames, as functions of energies.

A fit's *ensemble* targets are properties of the equilibrium ensemble that the reversible
windows cannot give (their box is fixed, and a fluctuation needs many more frames than a window
holds): the density, the response functions of NPT fluctuations and the static dielectric
constant. Each is computed here from frames that OpenMM sampled at the current parameters
(:class:`EnsembleFrames`) and from the frames' potential energies ``U`` (a differentiable
input), with every average a Boltzmann-reweighted one (weights ``softmax(-β(H - H_ref))``,
``H = U + PV``, ``H_ref = H`` detached: the plain mean). Autograd through ``U`` then gives each
estimator's exact derivative as a function of ensemble averages, whose every average obeys

    d⟨A⟩/dθ = ⟨∂A/∂θ⟩ − β(⟨A ∂U/∂θ⟩ − ⟨A⟩⟨∂U/∂θ⟩),

and :func:`~openmm_reversible.reweighting.through_energies` chains it to the parameters one
frame at a time. ∂A/∂θ is zero except for the dipole moment (trainable charges).

==================  =====================================================  ==============
observable           estimator                                              unit
==================  =====================================================  ==============
density              ⟨ρ⟩                                                    g/cm³
compressibility      κ_T = ⟨δV²⟩ / (k_B T ⟨V⟩)                              1/bar
thermal_expansion    α = ⟨δV δH⟩ / (k_B T² ⟨V⟩)                             1/K
heat_capacity        C_p = ⟨δH²⟩ / (k_B T² N_mol) + n_dof k_B / (2 N_mol)   J/(mol K)
dielectric           ε from ⟨δM²⟩ / (3 ε₀ ⟨V⟩ k_B T) (:mod:`.dielectric`)   1
==================  =====================================================  ==============

H here is U + PV without the kinetic energy: in the classical ensemble K is independent of the
configuration, so it adds nothing to α and exactly ``n_dof k_B / 2`` per box to C_p
(``n_dof`` the System's degrees of freedom, constraints and a centre-of-mass remover
subtracted), which is added as that constant instead of its noisy sample estimate. C_p is the
classical value of the model; quantum corrections of stiff vibrations are not applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import openmm
import torch
from openmm import app

from ..errors import InputError
from ..methods import NONBONDED_METHODS
from ..units import DTYPE, KB
from .density import density
from .dielectric import static_dielectric
from .frames import volumes
from .temperature import degrees_of_freedom
from .thermodynamics import (
    J_PER_KJ,
    boltzmann_log_weights,
    enthalpy,
    heat_capacity,
    isothermal_compressibility,
    thermal_expansion,
)

ENSEMBLE_OBSERVABLES = ("density", "compressibility", "thermal_expansion", "heat_capacity",
                        "dielectric")
"""Observables averaged over OpenMM's sampled frames (:func:`ensemble_average`), with the
fluctuation gradient, instead of through the reversible windows."""

NPT_OBSERVABLES = ("density", "compressibility", "thermal_expansion", "heat_capacity")
"""Ensemble observables that need a fluctuating box (NPT sampling)."""


@dataclass(frozen=True)
class EnsembleFrames:
    """Frames OpenMM sampled at one state point, with what the estimators need, MD units.

    Attributes
    ----------
    positions : torch.Tensor, shape (S, N, 3), nm
    boxes : torch.Tensor, shape (S, 3, 3), nm
    masses : torch.Tensor, shape (N,), amu
    temperature : float, K
    pressure : float, bar, or None
        The barostat's pressure; None for NVT frames (then H = U).
    molecules : list of array-like of int
        Atoms of each molecule (made whole for the dipole moment; N_mol of C_p).
    n_dof : int
        Degrees of freedom of the System (kinetic part of C_p).
    epsilon_rf : float
        Reaction-field dielectric of the electrostatics, ``inf`` for PME/Ewald.
    """

    positions: torch.Tensor
    boxes: torch.Tensor
    masses: torch.Tensor
    temperature: float
    pressure: float | None
    molecules: Sequence
    n_dof: int
    epsilon_rf: float = math.inf

    @classmethod
    def from_system(cls, system: openmm.System, positions, boxes, temperature: float,
                    pressure: float | None, molecules: Sequence, nonbonded_method: str,
                    reaction_field_dielectric: float) -> EnsembleFrames:
        """Frames of an OpenMM System: masses and degrees of freedom read from it.

        Parameters
        ----------
        system : openmm.System
        positions : array-like, shape (S, N, 3), nm
        boxes : array-like, shape (S, 3, 3), nm
        temperature : float, K
        pressure : float, bar, or None
        molecules : list of array-like of int
        nonbonded_method : str
            A name of :data:`~openmm_reversible.methods.NONBONDED_METHODS`; the reaction-field
            methods give ``epsilon_rf = reaction_field_dielectric``, the others ``inf``.
        reaction_field_dielectric : float
        """
        masses = torch.tensor([system.getParticleMass(i).value_in_unit(openmm.unit.dalton)
                               for i in range(system.getNumParticles())], dtype=DTYPE)
        epsilon_rf = (reaction_field_dielectric
                      if NONBONDED_METHODS[nonbonded_method] == app.CutoffPeriodic else math.inf)
        return cls(torch.as_tensor(np.asarray(positions), dtype=DTYPE),
                   torch.as_tensor(np.asarray(boxes), dtype=DTYPE), masses, float(temperature),
                   pressure, molecules, degrees_of_freedom(system), epsilon_rf)

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    def part(self, frames: slice) -> EnsembleFrames:
        """The frames selected by ``frames`` (one block of the standard error)."""
        return EnsembleFrames(self.positions[frames], self.boxes[frames], self.masses,
                              self.temperature, self.pressure, self.molecules, self.n_dof,
                              self.epsilon_rf)


def needs_charges(observable: str) -> bool:
    """Whether :func:`ensemble_average` of ``observable`` takes the particle charges."""
    return observable == "dielectric"


def ensemble_average(observable: str, frames: EnsembleFrames, energies: torch.Tensor,
                     charges: torch.Tensor | None = None,
                     reference_energies: torch.Tensor | None = None) -> torch.Tensor:
    """One ensemble observable on sampled frames, differentiable in ``energies`` (and
    ``charges``).

    Parameters
    ----------
    observable : str
        One of :data:`ENSEMBLE_OBSERVABLES`.
    frames : EnsembleFrames
        Sampled at the current parameters.
    energies : torch.Tensor, shape (S,), kJ/mol
        Potential energy of each frame under the current parameters; autograd through it gives
        the fluctuation gradient of every average.
    charges : torch.Tensor, shape (N,), e, optional
        Particle charges (``dielectric`` only), differentiable in the parameters.
    reference_energies : torch.Tensor, shape (S,), kJ/mol, optional
        Potential energies under the parameters that sampled the frames, to reweight to
        nearby parameters; default ``energies`` detached (frames of the current parameters).

    Returns
    -------
    torch.Tensor, 0-dim
        In the unit of the module's table.
    """
    if observable not in ENSEMBLE_OBSERVABLES:
        raise InputError(f"{observable!r} is not an ensemble observable (choose from "
                         f"{', '.join(ENSEMBLE_OBSERVABLES)})")
    if observable in NPT_OBSERVABLES and frames.pressure is None:
        raise InputError(f"{observable} is an NPT average: sample with a barostat (give the "
                         f"state point a pressure)")
    vol = volumes(frames.boxes)

    def with_pv(u):
        return u if u is None or frames.pressure is None else enthalpy(u, vol, frames.pressure)

    h, ref = with_pv(energies), with_pv(reference_energies)
    temperature = frames.temperature
    if observable == "density":
        weights = boltzmann_log_weights(h, temperature, ref).exp()
        return weights @ density(frames.masses, frames.boxes).to(weights.dtype)
    if observable == "compressibility":
        return isothermal_compressibility(vol, h, temperature, ref)
    if observable == "thermal_expansion":
        return thermal_expansion(vol, h, temperature, ref)
    if observable == "heat_capacity":
        n_mol = len(frames.molecules)
        return (heat_capacity(h, temperature, n_mol, ref)
                + frames.n_dof * KB * J_PER_KJ / (2 * n_mol))
    if charges is None:
        raise InputError("the dielectric constant needs the particle charges")
    return static_dielectric(frames.positions, charges, frames.boxes, temperature,
                             molecules=frames.molecules, epsilon_rf=frames.epsilon_rf,
                             energies=h, reference_energies=ref)


def particle_charges(potential) -> torch.Tensor:
    """Charges of every particle, e, from the NonbondedForce twin of a
    :class:`~openmm_reversible.potential.TorchPotential` (differentiable in its bound
    parameters: trainable charges carry their gradient).

    Raises
    ------
    InputError
        If the System has no NonbondedForce (no charges to form a dipole moment from).
    """
    terms = [t for t in potential.terms if t.openmm_class == "NonbondedForce"]
    if not terms:
        raise InputError("a dielectric target needs charges on a NonbondedForce, but the "
                         "System has none; remove the dielectric target")
    particles, _ = terms[0].current_parameters(potential.sites())
    return particles[:, 0]
