"""The benchmark system: a box of TIP3P water with reaction-field (or PME) electrostatics.

OpenMM builds it (:func:`openmm_reversible.systems.water_box` with the bundled ``tip3p.xml``,
flexible bonds and angles or rigid molecules, ``CutoffPeriodic`` = reaction field, ε_rf 78.3, or
particle-mesh Ewald); the
Lennard-Jones σ and ε of oxygen are the trainable parameters (a
:class:`~openmm_reversible.parameters.ParameterSet` selection), so a gradient reaches the
force field exactly as in training.
"""

from __future__ import annotations

import time
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

NONBONDED_METHODS = {"RF": app.CutoffPeriodic, "PME": app.PME}
"""Electrostatics of the benchmark boxes: ``--nonbonded`` name -> OpenMM method."""

WATER_MODELS = {"tip3p": ("tip3p.xml", "tip3p-O"), "tip4pew": ("tip4pew.xml", "tip4pew-O")}
"""Water models of the benchmark boxes: ``--model`` name -> (OpenMM's bundled force field,
the oxygen type whose σ and ε are trained). TIP4P-Ew has a massless virtual site (M) a
molecule."""


@dataclass
class WaterBox:
    """A ready-to-run water benchmark: potential, initial state and integrator."""

    potential: torch.nn.Module
    positions: torch.Tensor
    velocities: torch.Tensor
    box: torch.Tensor
    integrator: LangevinMiddleIntegrator
    constraints: Constraints | None = None
    system: openmm.System | None = None
    topology: app.Topology | None = None

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


def flexible_water(n_waters: int = 216, cutoff: float = 0.9, seed: int = 0,
                   nonbonded: str = "RF") -> WaterBox:
    """Build the flexible water box (arguments of :func:`water`)."""
    return water(n_waters, cutoff, seed, rigid=False, nonbonded=nonbonded)


def rigid_water(n_waters: int = 216, cutoff: float = 0.9, seed: int = 0) -> WaterBox:
    """Build the rigid water box (arguments of :func:`water`), with its constraints."""
    return water(n_waters, cutoff, seed, rigid=True)


def water(n_waters: int = 216, cutoff: float = 0.9, seed: int = 0, rigid: bool = False,
          nonbonded: str = "RF", model: str = "tip3p") -> WaterBox:
    """Build the water box.

    Parameters
    ----------
    n_waters : int
        Number of water molecules (216 gives a 1.95 nm box).
    cutoff : float, nm
        Nonbonded cutoff; must be below half the box width.
    seed : int
        Noise stream and initial velocities (Maxwell-Boltzmann at 295.15 K).
    rigid : bool
        Rigid molecules (three distance constraints each, :class:`Constraints`; the minimised
        positions are put on the constraints to round-off and the velocities made tangent to
        them) or flexible bonds and angles.
    nonbonded : {"RF", "PME"}
        Electrostatics (:data:`NONBONDED_METHODS`).
    model : {"tip3p", "tip4pew"}
        Water model (:data:`WATER_MODELS`); the virtual sites of TIP4P-Ew are placed from
        their parents and have zero velocity.

    The pre-equilibrated box is a rigid-water configuration; its flexible-water energy is relaxed by
    OpenMM's energy minimiser before the velocities are drawn, so the dynamics start near
    equilibrium instead of heating up from overlaps.
    """
    from ..parameters import ParameterSet
    from ..potential import TorchPotential
    from ..systems import water_box

    check_at_least(1, waters=n_waters)
    check_positive(cutoff=cutoff)
    check_nonbonded(nonbonded)
    check_model(model)
    forcefield, oxygen = WATER_MODELS[model]
    box = water_box(n_waters, forcefield=(forcefield,), nonbonded=nonbonded, cutoff=cutoff,
                    rigid=rigid, model=model, removeCMMotion=False)
    check_cutoff(box.box, cutoff)
    parameters = ParameterSet.select(
        forcefield, box.topology, select=[("NonbondedForce/Atom", oxygen,
                                             ("sigma", "epsilon"))],
        nonbondedMethod=NONBONDED_METHODS[nonbonded], nonbondedCutoff=cutoff * unit.nanometer,
        constraints=None, rigidWater=rigid, removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters)
    integrator = LangevinMiddleIntegrator(TIMESTEP, FRICTION, TEMPERATURE, seed)
    positions = _minimized(parameters.system, box.positions)
    masses = potential.masses
    velocities = torch.where(masses[:, None] > 0, integrator.noise(0, masses), 0.0)
    constraints = None
    if rigid:
        constraints = Constraints.from_system(parameters.system)
        positions, velocities = constraints.constrain_state(positions, velocities, masses)
    if potential.virtual_sites is not None and potential.virtual_sites.n_sites:
        positions = potential.virtual_sites(positions)
    return WaterBox(potential=potential, positions=positions, velocities=velocities,
                    box=box_tensor(box.box), integrator=integrator, constraints=constraints,
                    system=parameters.system, topology=box.topology)


def check_nonbonded(nonbonded: str) -> None:
    """Raise :class:`InputError` unless ``nonbonded`` names a benchmark electrostatics."""
    if nonbonded not in NONBONDED_METHODS:
        raise InputError(f"--nonbonded {nonbonded}: choose {' or '.join(NONBONDED_METHODS)}")


def check_model(model: str) -> None:
    """Raise :class:`InputError` unless ``model`` names a benchmark water model."""
    if model not in WATER_MODELS:
        raise InputError(f"--model {model}: choose {' or '.join(WATER_MODELS)}")


def openmm_step_ms(system: openmm.System, positions, box, steps: int = 200) -> float:
    """Wall time of one LangevinMiddleIntegrator step (1 fs, 295.15 K, 1/ps) of ``system`` on
    OpenMM's CPU platform, ms (mean over ``steps`` after 20 warm-up steps).

    Parameters
    ----------
    system : openmm.System
    positions : array_like, shape (n_atoms, 3), nm
    box : array_like, shape (3, 3), nm
        Periodic box vectors (rows).
    steps : int
    """
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin,
                                                 FRICTION / unit.picosecond,
                                                 TIMESTEP * unit.picosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPeriodicBoxVectors(*(openmm.Vec3(*map(float, row)) for row in np.asarray(box)))
    context.setPositions(np.asarray(positions, dtype=np.float64))
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 1)
    integrator.step(20)
    context.getState(getEnergy=True)
    t0 = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)  # forces the queued steps to finish
    return 1e3 * (time.perf_counter() - t0) / steps


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
