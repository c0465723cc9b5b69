"""Observables: differentiable functions of trajectory frames.

Every observable is a plain torch function of tensors in MD units: ``positions``
(n_frames, n_atoms, 3) nm, ``velocities`` (n_frames, n_atoms, 3) nm/ps, ``box`` (3, 3) nm
(shared by all frames) or (n_frames, 3, 3), ``masses`` (n_atoms,) amu, ``charges`` (n_atoms,)
e, and, for energy-based observables, a ``potential(positions (N, 3), box) -> energy kJ/mol``
such as :class:`~openmm_reversible.potential.TorchPotential`. Gradients flow into every frame
that enters an observable (and into the potential's parameters), which is all a reversible
simulation needs: it asks for ∂loss/∂frames and propagates them back through the dynamics.

=====================================  ====================================================
family                                  functions
=====================================  ====================================================
structure (:mod:`.rdf`)                 :func:`rdf` (smooth, mdtraj-normalised g(r))
energy (:mod:`.energy`)                 :func:`frame_energies`, :func:`energy_per_molecule`,
                                        :func:`enthalpy_of_vaporization`
temperature (:mod:`.temperature`)       :func:`temperature`, :func:`degrees_of_freedom`
                                        (constraints and CM removal counted as OpenMM does)
density, pressure (:mod:`.density`)     :func:`density`, :func:`virial`, :func:`kinetic_tensor`,
                                        :func:`pressure_tensor`, :func:`pressure`,
                                        :func:`constraint_virial` (constrained systems)
transport (:mod:`.diffusion`)           :func:`mean_squared_displacement`,
                                        :func:`self_diffusion_coefficient`, :func:`unwrap`,
                                        :func:`time_between_frames`,
                                        :func:`yeh_hummer_correction` (finite-size D)
dielectric (:mod:`.dielectric`)         :func:`dipole_moment`, :func:`static_dielectric`
solids (:mod:`.elastic`)                :func:`stress_tensor`, :func:`born_terms`,
                                        :func:`elastic_constants`,
                                        :func:`relaxed_elastic_constants`,
                                        :func:`cubic_elastic_observables` (mean stress,
                                        C11, C12, C44 of a window: the crystal targets)
selections (:mod:`.selection`)          :func:`atom_indices`, :func:`pair_indices`,
                                        :func:`molecules`
NPT response (:mod:`.thermodynamics`)   :func:`isothermal_compressibility`,
                                        :func:`thermal_expansion`, :func:`heat_capacity`,
                                        :func:`enthalpy` (NPT fluctuations, differentiable
                                        by reweighting), :func:`uncertainty`
ensemble targets (:mod:`.ensemble`)     :func:`ensemble_average` (density, κ_T, α, C_p, ε
                                        of sampled frames as functions of their energies,
                                        for the fluctuation gradient), :class:`EnsembleFrames`
uncertainty (:mod:`.blocking`)          :func:`block_average`, :func:`block_slices`,
                                        :func:`statistical_inefficiency` (NumPy, for reports:
                                        standard errors of correlated series)
=====================================  ====================================================

With a :class:`~openmm_reversible.trajectory.Trajectory` ``traj``::

    O = atom_indices(topology, element="O")
    r, g = rdf(traj.positions, traj.box, selections=(O, O), r_range=(0.2, 0.9))
    hvap = enthalpy_of_vaporization(
        energy_per_molecule(potential, traj.positions, traj.box, n_molecules=216),
        gas_energy_per_molecule=0.0, temperature=traj.temperature)
    p = pressure(potential, traj.positions, traj.velocities, traj.box, traj.masses,
                 molecules(topology)).mean()

User-defined observables
------------------------
Any torch function of the same inputs is an observable; nothing needs registering. Write it
with differentiable torch operations (no ``.item()``, ``.numpy()`` or in-place edits of its
inputs), in float64, returning a tensor, e.g. the mean O–H bond length of water::

    def mean_oh_length(positions, box, o, h):
        d = positions[:, h] - positions[:, o]            # (S, n_bonds, 3), nm
        return d.norm(dim=-1).mean()

    target = Target(lambda traj: mean_oh_length(traj.positions, traj.box, o, h),
                    reference=0.09572, units="nm", name="r_OH")

Gradients with respect to the frames (and to parameters the function reads, e.g. through a
potential) then reach the training loop exactly as for the built-in observables. Check a new
observable with ``torch.autograd.gradcheck`` on a few float64 frames. Per-frame observables
(one value per frame) can also be differentiated without a reversible run by ensemble
reweighting, :mod:`openmm_reversible.reweighting`.
"""

from .blocking import block_average, block_slices, statistical_inefficiency
from .density import (
    constraint_virial,
    density,
    kinetic_tensor,
    pressure,
    pressure_tensor,
    virial,
)
from .dielectric import dipole_moment, static_dielectric
from .diffusion import (
    mean_squared_displacement,
    self_diffusion_coefficient,
    time_between_frames,
    unwrap,
    yeh_hummer_correction,
)
from .elastic import (
    born_terms,
    cubic_elastic_observables,
    elastic_constants,
    relaxed_elastic_constants,
    stress_tensor,
)
from .energy import energy_per_molecule, enthalpy_of_vaporization, frame_energies
from .ensemble import EnsembleFrames, ensemble_average
from .rdf import rdf
from .selection import atom_indices, molecules, pair_indices
from .temperature import degrees_of_freedom, temperature
from .thermodynamics import (
    Estimate,
    enthalpy,
    heat_capacity,
    isothermal_compressibility,
    thermal_expansion,
    uncertainty,
)

__all__ = [
    "EnsembleFrames", "Estimate", "atom_indices", "block_average", "block_slices", "born_terms",
    "constraint_virial", "cubic_elastic_observables", "degrees_of_freedom", "density",
    "dipole_moment", "elastic_constants", "energy_per_molecule", "ensemble_average", "enthalpy",
    "enthalpy_of_vaporization", "frame_energies",
    "heat_capacity", "isothermal_compressibility", "kinetic_tensor",
    "mean_squared_displacement", "molecules", "pair_indices", "pressure", "pressure_tensor",
    "rdf", "relaxed_elastic_constants", "self_diffusion_coefficient", "static_dielectric",
    "statistical_inefficiency", "stress_tensor", "temperature", "thermal_expansion",
    "time_between_frames", "uncertainty", "unwrap", "virial", "yeh_hummer_correction",
]
