"""Density, and pressure from the strain derivative of the energy (the virial).

The configurational part of the pressure is the derivative of the potential energy with respect
to a homogeneous deformation of the whole periodic system. With positions and box vectors as
rows, the strain ε (3 × 3) maps

    x  →  x + c·ε,      box  →  box·(I + ε),

where ``c`` is the point that moves with the deformation: the atom itself (atomic virial) or
the centre of mass of its molecule (molecular virial: molecules move as rigid bodies). The
virial tensor is ``W = -∂E/∂ε`` at ε = 0, taken by autograd through the potential itself,
so it is exact for any energy that is a function of positions and box: cutoffs, reaction field,
PME, many-body and ML terms alike. The pressure tensor is

    P = (Σ m v ⊗ v + W) / V,        P = tr(P) / 3 = (2 K + tr W) / (3 V),

with atomic masses and velocities for the atomic virial, molecular masses and centre-of-mass
velocities for the molecular one. The two agree on average.

Constrained systems (rigid water, HBonds). The forces that hold the constraints are internal
to each molecule, so the molecular virial has no constraint term at all: it is right for a
constrained system as it stands. The atomic form needs them: ``constraints=`` adds the virial
``Σ_k λ_k r_k ⊗ r_k`` of the instantaneous constraint forces (:func:`constraint_virial`).
For rigid molecules the two forms then agree frame by frame in the trace (the scalar
pressure), not only on average: their difference is half the second time derivative of each
molecule's moment of inertia trace, zero for a rigid body.

What OpenMM reports. ``MonteCarloBarostat.computeCurrentPressure`` (OpenMM 8) is the
molecular form with two choices of its own: the kinetic part from the molecules' centre-of-mass
velocities (as here), and the configurational part by a central difference of the energy
under box scalings ``1 ± 1e-3`` that move each molecule by its *geometric* centre. Passing unit
masses to :func:`virial` gives its configurational number (to the accuracy of its finite
difference, ~1e-4 relative on a switched PME box); the centre-of-mass choice used by
:func:`pressure` differs frame by frame and agrees on average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from openmm import unit

from ..errors import InputError
from ..integrators.constraints import Constraints
from .energy import Potential
from .frames import MoleculeLayout, box_of_frame, check_box, check_frames, volumes

BAR_PER_KJ_MOL_NM3 = (1 * unit.kilojoule_per_mole / unit.nanometer ** 3
                      / unit.AVOGADRO_CONSTANT_NA).value_in_unit(unit.bar)
"""1 kJ/mol/nm³ expressed in bar (≈ 16.6054)."""

G_CM3_PER_AMU_NM3 = (1 * unit.dalton / unit.nanometer ** 3
                     / unit.AVOGADRO_CONSTANT_NA).value_in_unit(unit.gram / unit.centimeter ** 3)
"""1 amu/nm³ expressed in g/cm³ (≈ 1.6605e-3)."""


def density(masses: torch.Tensor, box) -> torch.Tensor:
    """Mass density, g/cm³.

    Parameters
    ----------
    masses : torch.Tensor, shape (n_atoms,), amu
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm

    Returns
    -------
    torch.Tensor, 0-dim for one box or shape (n_frames,), g/cm³
        Differentiable in the box (and the masses).
    """
    masses = torch.as_tensor(masses)
    if masses.ndim != 1 or masses.numel() == 0:
        raise InputError(f"masses must have shape (n_atoms,), got {tuple(masses.shape)}")
    box = torch.as_tensor(box, dtype=masses.dtype)
    if box.shape[-2:] != (3, 3) or box.ndim not in (2, 3):
        raise InputError(f"box must have shape (3, 3) or (n_frames, 3, 3), got "
                         f"{tuple(box.shape)}")
    return masses.sum() / volumes(box) * G_CM3_PER_AMU_NM3


def _layout(molecules: Sequence[Sequence[int]] | None, n_atoms: int) -> MoleculeLayout | None:
    if molecules is None:
        return None
    layout = MoleculeLayout(molecules, n_atoms)
    if not layout.covers(n_atoms):
        raise InputError(f"molecules cover {layout.atoms.numel()} of {n_atoms} atoms; for the "
                         f"molecular virial every atom must belong to one molecule (use "
                         f"openmm_reversible.observables.molecules(topology))")
    return layout


def _strain_points(positions: torch.Tensor, masses: torch.Tensor, box: torch.Tensor | None,
                   layout: MoleculeLayout | None) -> torch.Tensor:
    """The point that carries each atom under strain, shape (S, N, 3), nm."""
    if layout is None:
        return positions
    shift = torch.zeros_like(positions).index_add(
        1, layout.atoms, layout.offsets(positions, masses, box))
    return positions - shift


def virial(potential: Potential, positions: torch.Tensor, box, masses: torch.Tensor | None = None,
           molecules: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Virial tensor ``W = -∂E/∂ε`` of every frame, kJ/mol.

    Parameters
    ----------
    potential : callable
        ``potential(positions (N, 3), box (3, 3)) -> energy``, kJ/mol.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm
    masses : torch.Tensor, shape (n_atoms,), amu, optional
        Needed with ``molecules`` (centres of mass).
    molecules : list of array-like of int, optional
        Atom indices of each molecule, covering every atom; gives the molecular virial.

    Returns
    -------
    torch.Tensor, shape (n_frames, 3, 3), kJ/mol
        For a pair potential with the atomic strain, ``W_ab = Σ_pairs r_a F_b``. Differentiable
        in the frames and the potential's parameters (double backward).
    """
    positions = check_frames(positions)
    n_frames, n_atoms = positions.shape[:2]
    box = check_box(box, n_frames, positions, required=True)
    layout = _layout(molecules, n_atoms)
    if layout is not None and masses is None:
        raise InputError("virial with molecules needs masses (centres of mass)")
    if masses is not None:
        masses = torch.as_tensor(masses, dtype=positions.dtype, device=positions.device)
    points = _strain_points(positions, masses, box, layout)
    result = []
    for s in range(n_frames):
        strain = positions.new_zeros(3, 3, requires_grad=True)
        frame_box = box_of_frame(box, s)
        energy = potential(positions[s] + points[s] @ strain, frame_box + frame_box @ strain)
        (derivative,) = torch.autograd.grad(energy, strain, create_graph=True)
        result.append(-derivative)
    return torch.stack(result)


def constraint_virial(constraints: Constraints, potential: Potential, positions: torch.Tensor,
                      velocities: torch.Tensor, box, masses: torch.Tensor) -> torch.Tensor:
    """Virial ``Σ_k λ_k r_k ⊗ r_k`` of the instantaneous constraint forces, every frame, kJ/mol.

    The multipliers ``λ`` are those that keep the constrained distances fixed in continuous
    time at each frame's positions and velocities
    (:meth:`~openmm_reversible.integrators.constraints.Constraints.force_multipliers`). Added
    to the atomic :func:`virial` it gives the full atomic virial of a constrained system.

    Parameters
    ----------
    constraints : Constraints
        The System's constraints (``Constraints.from_system(system)``).
    potential, positions, box
        As for :func:`virial`.
    velocities : torch.Tensor, shape (n_frames, n_atoms, 3), nm/ps
    masses : torch.Tensor, shape (n_atoms,), amu

    Returns
    -------
    torch.Tensor, shape (n_frames, 3, 3), kJ/mol
        Symmetric; differentiable in the frames and the potential's parameters.
    """
    positions = check_frames(positions)
    velocities = check_frames(velocities, "velocities")
    box = check_box(box, positions.shape[0], positions, required=True)
    if constraints.n_particles != positions.shape[1]:
        raise InputError(f"constraints are for {constraints.n_particles} particles but the "
                         f"frames have {positions.shape[1]} atoms; build them from the same "
                         "System")
    inv_masses = 1.0 / torch.as_tensor(masses, dtype=positions.dtype, device=positions.device)
    result = []
    for s in range(positions.shape[0]):
        x = positions[s]
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(potential(x, box_of_frame(box, s)), x,
                                              create_graph=True)
        lam = constraints.force_multipliers(x, velocities[s], -gradient, inv_masses)
        r = constraints.bonds(x)
        result.append(torch.einsum("k,ka,kb->ab", lam, r, r))
    return torch.stack(result)


def kinetic_tensor(velocities: torch.Tensor, masses: torch.Tensor,
                   molecules: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Twice the kinetic-energy tensor, ``Σ m v ⊗ v``, of every frame, kJ/mol.

    Parameters
    ----------
    velocities : torch.Tensor, shape (n_frames, n_atoms, 3), nm/ps
    masses : torch.Tensor, shape (n_atoms,), amu
    molecules : list of array-like of int, optional
        Use molecular masses and centre-of-mass velocities instead of atoms.

    Returns
    -------
    torch.Tensor, shape (n_frames, 3, 3), kJ/mol (amu nm²/ps²)
    """
    velocities = check_frames(velocities, "velocities")
    masses = torch.as_tensor(masses, dtype=velocities.dtype, device=velocities.device)
    if masses.shape != velocities.shape[1:2]:
        raise InputError(f"masses must have shape ({velocities.shape[1]},), got "
                         f"{tuple(masses.shape)}")
    layout = _layout(molecules, velocities.shape[1])
    if layout is not None:
        velocities = layout.velocities(velocities, masses)
        masses = layout.total_masses(masses)
    return torch.einsum("n,sna,snb->sab", masses, velocities, velocities)


def pressure_tensor(potential: Potential, positions: torch.Tensor, velocities: torch.Tensor,
                    box, masses: torch.Tensor,
                    molecules: Sequence[Sequence[int]] | None = None,
                    constraints: Constraints | None = None) -> torch.Tensor:
    """Instantaneous pressure tensor ``(Σ m v ⊗ v + W) / V`` of every frame, bar.

    Parameters
    ----------
    potential, positions, box, masses
        As for :func:`virial` (``masses`` required here).
    velocities : torch.Tensor, shape (n_frames, n_atoms, 3), nm/ps
    molecules : list of array-like of int, optional
        Molecular virial and centre-of-mass kinetic term (right for constrained systems as
        it is: constraint forces are internal to molecules).
    constraints : Constraints, optional
        With the atomic form (no ``molecules``): add the virial of the constraint forces
        (:func:`constraint_virial`), needed for a System with constraints.

    Returns
    -------
    torch.Tensor, shape (n_frames, 3, 3), bar
        The negative of the stress tensor. Symmetric with the atomic virial (for
        rotation-invariant potentials); the molecular one is symmetric only on average.
    """
    positions = check_frames(positions)
    if velocities.shape != positions.shape:
        raise InputError(f"velocities {tuple(velocities.shape)} and positions "
                         f"{tuple(positions.shape)} must have the same shape")
    box = check_box(box, positions.shape[0], positions, required=True)
    if constraints is not None and molecules is not None:
        raise InputError("constraints are for the atomic virial; the molecular virial "
                         "(molecules=...) has no constraint term: give one of the two")
    total = kinetic_tensor(velocities, masses, molecules) + virial(
        potential, positions, box, masses, molecules)
    if constraints is not None and len(constraints):
        total = total + constraint_virial(constraints, potential, positions, velocities, box,
                                          masses)
    volume = volumes(box)
    volume = volume[:, None, None] if volume.ndim == 1 else volume
    return total / volume * BAR_PER_KJ_MOL_NM3


def pressure(potential: Potential, positions: torch.Tensor, velocities: torch.Tensor, box,
             masses: torch.Tensor, molecules: Sequence[Sequence[int]] | None = None,
             constraints: Constraints | None = None) -> torch.Tensor:
    """Instantaneous pressure ``(2K + tr W) / (3V)`` of every frame, bar, shape (n_frames,).

    Same arguments as :func:`pressure_tensor`, of which this is one third of the trace.
    """
    return pressure_tensor(potential, positions, velocities, box, masses, molecules,
                           constraints).diagonal(dim1=-2, dim2=-1).mean(-1)
