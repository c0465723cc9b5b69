"""The benchmark system: a box of TIP3P water with reaction-field electrostatics.

OpenMM builds it (:func:`openmm_reversible.systems.water_box` with the bundled ``tip3p.xml``,
flexible bonds and angles or rigid molecules, ``CutoffPeriodic`` = reaction field, ε_rf 78.3); the
Lennard-Jones σ and ε of oxygen are the trainable parameters (a
:class:`~openmm_reversible.parameters.ParameterSet` selection), so a gradient reaches the
force field exactly as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openmm
import openmm.app as app
import torch
from openmm import unit

from ..errors import InputError, check_at_least, check_positive
from ..integrators import LangevinMiddleIntegrator, ReversibleSimulation
from ..integrators.constraints import Constraints
from ..trajectory import Trajectory
from ..units import box_tensor, positions_tensor

TEMPERATURE = 295.15  # K
FRICTION = 1.0  # 1/ps
TIMESTEP = 0.001  # ps


@dataclass
class WaterBox:
    """A ready-to-run water benchmark: potential, initial state and integrator."""

    potential: torch.nn.Module
    positions: torch.Tensor
    velocities: torch.Tensor
    box: torch.Tensor
    integrator: LangevinMiddleIntegrator
    constraints: Constraints | None = None

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    def simulation(self, n_steps: int, snapshot_every: int, mode: str = "reversible"
                   ) -> ReversibleSimulation:
        """A window of ``n_steps`` with the mean-potential-energy loss."""
        return ReversibleSimulation(self.potential, self.integrator, n_steps,
                                    min(snapshot_every, n_steps), mean_energy, mode=mode,
                                    constraints=self.constraints)


def mean_energy(traj: Trajectory, potential) -> torch.Tensor:
    """Mean potential energy of the snapshots, kJ/mol."""
    return torch.stack([potential(x, traj.box) for x in traj.positions]).mean()


def flexible_water(n_waters: int = 216, cutoff: float = 0.9, seed: int = 0) -> WaterBox:
    """Build the flexible water box (arguments of :func:`water`)."""
    return water(n_waters, cutoff, seed, rigid=False)


def rigid_water(n_waters: int = 216, cutoff: float = 0.9, seed: int = 0) -> WaterBox:
    """Build the rigid water box (arguments of :func:`water`), with its constraints."""
    return water(n_waters, cutoff, seed, rigid=True)


def water(n_waters: int = 216, cutoff: float = 0.9, seed: int = 0, rigid: bool = False
          ) -> WaterBox:
    """Build the water box.

    Parameters
    ----------
    n_waters : int
        Number of water molecules (216 gives a 1.95 nm box).
    cutoff : float, nm
        Reaction-field cutoff; must be below half the box width.
    seed : int
        Noise stream and initial velocities (Maxwell-Boltzmann at 295.15 K).
    rigid : bool
        Rigid molecules (three distance constraints each, :class:`Constraints`; the minimised
        positions are put on the constraints to round-off) or flexible bonds and angles.

    The pre-equilibrated box is a rigid-water configuration; its flexible-water energy is relaxed by
    OpenMM's energy minimiser before the velocities are drawn, so the dynamics start near
    equilibrium instead of heating up from overlaps.
    """
    from ..parameters import ParameterSet
    from ..potential import TorchPotential
    from ..systems import water_box

    check_at_least(1, waters=n_waters)
    check_positive(cutoff=cutoff)
    box = water_box(n_waters, forcefield=("tip3p.xml",), nonbonded="RF", cutoff=cutoff,
                    rigid=rigid, removeCMMotion=False)
    check_cutoff(box.box, cutoff)
    parameters = ParameterSet.select(
        "tip3p.xml", box.topology, select=[("NonbondedForce/Atom", "tip3p-O",
                                              ("sigma", "epsilon"))],
        nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=cutoff * unit.nanometer,
        constraints=None, rigidWater=rigid, removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters)
    integrator = LangevinMiddleIntegrator(TIMESTEP, FRICTION, TEMPERATURE, seed)
    positions = _minimized(parameters.system, box.positions)
    constraints = None
    if rigid:
        constraints = Constraints.from_system(parameters.system)
        positions = constraints.project_positions(positions, positions,
                                                  1.0 / potential.masses)[0]
    return WaterBox(potential=potential, positions=positions,
                    velocities=integrator.noise(0, potential.masses),
                    box=box_tensor(box.box), integrator=integrator, constraints=constraints)


def check_cutoff(box: np.ndarray, cutoff: float) -> None:
    """Raise :class:`InputError` unless ``cutoff`` (nm) is below half the width of ``box`` (rows:
    box vectors, nm), as OpenMM's periodic cutoffs require."""
    half = 0.5 * float(np.min(np.diag(box)))
    if cutoff >= half:
        raise InputError(f"--cutoff {cutoff} nm: not below half the box width ({half:.3g} nm); "
                         "lower the cutoff or make the box larger")


def _minimized(system: openmm.System, positions) -> torch.Tensor:
    """Positions after OpenMM's local energy minimisation (nm)."""
    context = openmm.Context(system, openmm.VerletIntegrator(TIMESTEP))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 1000)
    return positions_tensor(context.getState(getPositions=True).getPositions(asNumpy=True))
