"""Sampling in plain OpenMM: the fast part of every epoch.

Training alternates two kinds of dynamics. Most steps — equilibration after a parameter update
and the bulk sampling between loss windows — need no gradient and run in OpenMM on its fastest
platform (CUDA when present, else CPU). Only the short reversible windows run in torch, starting
from states that OpenMM hands over (:meth:`Sampler.state`).

Both must simulate the *same* force field. After each optimiser step the current values are
written into the force-field text, OpenMM builds a System from it exactly as it would from the
exported file (:meth:`ParameterSet.create_system`), and the per-item parameters of that System
are copied into the sampling System's forces and pushed with ``updateParametersInContext``
(:func:`copy_parameters`). The Context — and with it the barostat, the neighbour lists and the
random-number stream — survives parameter updates. The sampling System differs from the
exported one in one way that changes no result: pairs that a zero parameter switches off in
a CustomNonbondedForce (water hydrogens in the paper's custom forms) are left out by an
interaction group (:func:`skip_switched_off_pairs`), which OpenMM would otherwise evaluate
for nothing. Each epoch starts with
:meth:`Sampler.restart` from a saved state and a seed derived from the epoch, so a resumed
training run samples the same ensemble as an uninterrupted one, and the same trajectory bit for
bit when the sampling is deterministic (``simulation.deterministic = true``: one CPU thread with
deterministic forces, or Reference; OpenMM's multi-threaded CPU platform differs run to run).

A simulation that blows up (NaN coordinates, or a kinetic temperature far above the bath) raises
:class:`SimulationExploded` with the step at which it was detected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import openmm
from openmm import app, unit

from .config import FitConfig
from .errors import InputError
from .files import read_structure
from .methods import CONSTRAINTS, NONBONDED_METHODS
from .observables.blocking import drifting
from .observables.density import G_CM3_PER_AMU_NM3
from .observables.selection import molecules
from .observables.temperature import degrees_of_freedom
from .parameters import residue_tag_error
from .units import KB

# Per-item parameters of each force class: (count, getter, setter, packed). ``packed`` setters
# take the parameters as one sequence (CustomNonbondedForce.setParticleParameters(i, params)),
# the others take the getter's values spread out (setBondParameters(i, p1, p2, length, k)).
_ITEM_ACCESSORS: dict[str, list[tuple[str, str, str, bool]]] = {
    "NonbondedForce": [("getNumParticles", "getParticleParameters", "setParticleParameters",
                        False),
                       ("getNumExceptions", "getExceptionParameters", "setExceptionParameters",
                        False)],
    "HarmonicBondForce": [("getNumBonds", "getBondParameters", "setBondParameters", False)],
    "HarmonicAngleForce": [("getNumAngles", "getAngleParameters", "setAngleParameters", False)],
    "PeriodicTorsionForce": [("getNumTorsions", "getTorsionParameters", "setTorsionParameters",
                              False)],
    "RBTorsionForce": [("getNumTorsions", "getTorsionParameters", "setTorsionParameters",
                        False)],
    "CustomBondForce": [("getNumBonds", "getBondParameters", "setBondParameters", False)],
    "CustomAngleForce": [("getNumAngles", "getAngleParameters", "setAngleParameters", False)],
    "CustomTorsionForce": [("getNumTorsions", "getTorsionParameters", "setTorsionParameters",
                            False)],
    "CustomNonbondedForce": [("getNumParticles", "getParticleParameters",
                              "setParticleParameters", True)],
    "CustomExternalForce": [("getNumParticles", "getParticleParameters",
                             "setParticleParameters", False)],
    "GBSAOBCForce": [("getNumParticles", "getParticleParameters", "setParticleParameters",
                      False)],
}
_NO_PARAMETERS = ("CMMotionRemover", "MonteCarloBarostat", "MonteCarloAnisotropicBarostat",
                  "MonteCarloFlexibleBarostat", "MonteCarloMembraneBarostat")


_PLATFORM_PROPERTIES = {
    "CPU": {"DeterministicForces": "true"},
    "CUDA": {"Precision": "double", "DeterministicForces": "true"},
    "OpenCL": {"Precision": "double"},
    "HIP": {"Precision": "double", "DeterministicForces": "true"},
}
"""Default Context properties: double precision on GPUs, forces summed in a fixed order where
the platform offers it. This does *not* make the CPU platform repeatable: with several threads
(its default, one per core) the same state and seed give a different trajectory on every run,
so sampled observables, losses and gradients vary run to run by sampling noise."""
_DETERMINISTIC_PROPERTIES = {
    "CPU": {"Threads": "1", "DeterministicForces": "true"},
    "Reference": {},
}
"""Context properties of ``simulation.deterministic = true``: one CPU thread and deterministic
forces (both needed: measured with OpenMM 8.6.1 on a 774-atom water box, 300 steps, three runs
each, only this combination repeated bit for bit), or the Reference platform."""


def platform_properties(platform: str, deterministic: bool = False) -> dict[str, str]:
    """Context properties the sampler uses on ``platform`` (a resolved platform name).

    Raises
    ------
    InputError
        If ``deterministic`` is asked for on a platform where it is not established.
    """
    if not deterministic:
        return dict(_PLATFORM_PROPERTIES.get(platform, {}))
    if platform not in _DETERMINISTIC_PROPERTIES:
        raise InputError(f"simulation.deterministic = true is available on the "
                         f"{' and '.join(_DETERMINISTIC_PROPERTIES)} platforms, not {platform}; "
                         f"set simulation.platform = \"CPU\"")
    return dict(_DETERMINISTIC_PROPERTIES[platform])


class SimulationExploded(RuntimeError):
    """The OpenMM simulation produced NaN or ran away; ``step`` is where it was detected."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"simulation exploded at OpenMM step {step}: {reason}")
        self.step = step
        self.reason = reason

    def __reduce__(self):  # pickled with its own arguments (it crosses to and from workers)
        return type(self), (self.step, self.reason)


@dataclass(frozen=True)
class SampledState:
    """A state handed from OpenMM to the reversible windows, MD units.

    Attributes
    ----------
    positions : ndarray, shape (N, 3), nm
        Not wrapped into the box.
    velocities : ndarray, shape (N, 3), nm/ps
    box : ndarray, shape (3, 3), nm, or None when not periodic
    step : int
        OpenMM's step counter.
    """

    positions: np.ndarray
    velocities: np.ndarray
    box: np.ndarray | None
    step: int


def select_platform(name: str = "auto", deterministic: bool = False) -> openmm.Platform:
    """The OpenMM platform ``name``; ``"auto"`` is CUDA when present, else CPU (always CPU when
    ``deterministic``).

    Raises
    ------
    InputError
        If the platform is not available in this OpenMM installation.
    """
    available = [openmm.Platform.getPlatform(i).getName()
                 for i in range(openmm.Platform.getNumPlatforms())]
    if name == "auto":
        name = ("CUDA" if "CUDA" in available and not deterministic
                else "CPU" if "CPU" in available else "Reference")
    if name not in available:
        raise InputError(f"simulation.platform: OpenMM platform {name!r} is not available "
                         f"here (available: {', '.join(available)})")
    return openmm.Platform.getPlatformByName(name)


def create_system_kwargs(config: FitConfig) -> dict:
    """Keyword arguments of ``ForceField.createSystem`` for the config's ``[system]`` table."""
    s = config.system
    kwargs = {"nonbondedMethod": NONBONDED_METHODS[s.nonbonded_method],
              "constraints": CONSTRAINTS[s.constraints], "rigidWater": s.rigid_water,
              "removeCMMotion": s.remove_cm_motion}
    if s.nonbonded_method != "NoCutoff":
        kwargs["nonbondedCutoff"] = s.cutoff * unit.nanometer
    if s.nonbonded_method in ("Ewald", "PME"):
        kwargs["ewaldErrorTolerance"] = s.ewald_error_tolerance
    return kwargs


def configure_system(system: openmm.System, config: FitConfig) -> openmm.System:
    """Apply the ``[system]`` settings that ``createSystem`` does not take (in place).

    The reaction-field dielectric is a property of the NonbondedForce, not an argument of
    ``ForceField.createSystem``; every System the fit builds passes through here.
    """
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setReactionFieldDielectric(config.system.reaction_field_dielectric)
    return system


def build_structure(config: FitConfig, forcefield_files: list[str] | None = None
                    ) -> tuple[app.Topology, np.ndarray]:
    """Topology and starting positions (nm) of the config's ``[structure]``.

    A ``water_box`` is filled by OpenMM's Modeller from its pre-equilibrated water; a ``pdb``
    is read as is, or surrounded by ``padding`` nm of water.

    Parameters
    ----------
    config : FitConfig
    forcefield_files : list of str, optional
        Files whose templates Modeller uses (default: the config's force field).
    """
    s = config.structure
    files = forcefield_files or config.forcefield.files
    try:
        forcefield = app.ForceField(*files)
    except Exception as exc:
        raise residue_tag_error(files) or InputError(
            f"forcefield.files: OpenMM cannot load {files} ({exc}); fix the file") from None
    if s.water_box is not None:
        modeller = app.Modeller(app.Topology(), [])
        modeller.addSolvent(forcefield, model=s.model, numAdded=s.water_box)
    else:
        pdb = read_structure(s.pdb)
        modeller = app.Modeller(pdb.topology, pdb.positions)
        if s.padding is not None:
            modeller.addSolvent(forcefield, model=s.model, padding=s.padding * unit.nanometer)
    positions = np.asarray(modeller.positions.value_in_unit(unit.nanometer), dtype=float)
    if s.density is not None:
        positions = scale_to_density(modeller.topology, positions, s.density)
    return modeller.topology, positions


def scale_to_density(topology: app.Topology, positions: np.ndarray, density: float
                     ) -> np.ndarray:
    """Scale a periodic structure to a mass density, in place for the topology's box.

    The box is scaled isotropically and each molecule is moved rigidly with its centre of mass
    (the move a MonteCarloBarostat makes), so bonds and angles are unchanged.

    Parameters
    ----------
    topology : openmm.app.Topology
        Its periodic box vectors are replaced by the scaled ones.
    positions : ndarray, shape (N, 3), nm
    density : float, g/cm^3

    Returns
    -------
    ndarray, shape (N, 3), nm
        The moved positions.

    Raises
    ------
    InputError
        If the structure has no periodic box.
    """
    vectors = topology.getPeriodicBoxVectors()
    if vectors is None:
        raise InputError("structure.density: the structure has no periodic box to scale; give "
                         "the PDB a CRYST1 record or remove structure.density")
    box = np.asarray(vectors.value_in_unit(unit.nanometer), dtype=float)
    masses = np.array([0.0 if a.element is None else a.element.mass.value_in_unit(unit.dalton)
                       for a in topology.atoms()])
    current = masses.sum() / abs(np.linalg.det(box)) * G_CM3_PER_AMU_NM3
    factor = (current / density) ** (1.0 / 3.0)
    moved = np.array(positions, dtype=float)
    for group in molecules(topology):
        weights = masses[group]
        centre = (weights[:, None] * moved[group]).sum(0) / max(weights.sum(), 1e-300)
        moved[group] += (factor - 1.0) * centre
    topology.setPeriodicBoxVectors(unit.Quantity([openmm.Vec3(*row) for row in box * factor],
                                                 unit.nanometer))
    return moved


def copy_parameters(source: openmm.System, target: openmm.System,
                    context: openmm.Context | None = None) -> None:
    """Copy every per-item parameter of ``source``'s forces into ``target``'s.

    The two Systems must have the same forces in the same order with the same items (as two
    Systems built from one topology by one force field are). With a ``context`` built from
    ``target``, the new values are pushed into it with ``updateParametersInContext`` and the
    global parameters of Custom forces with ``setParameter``.

    Raises
    ------
    InputError
        If the Systems differ in structure, or a force has no known parameter accessors.
    """
    src_forces = [f for f in source.getForces() if type(f).__name__ not in _NO_PARAMETERS]
    dst_forces = [f for f in target.getForces() if type(f).__name__ not in _NO_PARAMETERS]
    if [type(f) for f in src_forces] != [type(f) for f in dst_forces]:
        raise InputError("cannot copy parameters between Systems with different forces: "
                         f"{[type(f).__name__ for f in src_forces]} vs "
                         f"{[type(f).__name__ for f in dst_forces]}")
    for src, dst in zip(src_forces, dst_forces, strict=True):
        name = type(src).__name__
        if name not in _ITEM_ACCESSORS:
            raise InputError(f"cannot update {name} in a running simulation (supported: "
                             f"{', '.join(sorted(_ITEM_ACCESSORS))})")
        for count, getter, setter, packed in _ITEM_ACCESSORS[name]:
            n = getattr(src, count)()
            if n != getattr(dst, count)():
                raise InputError(f"{name}: {count[6:]} differ ({n} vs {getattr(dst, count)()})")
            get, put = getattr(src, getter), getattr(dst, setter)
            for i in range(n):
                if packed:
                    put(i, get(i))
                else:
                    put(i, *get(i))
        if hasattr(src, "getNumGlobalParameters"):
            for k in range(src.getNumGlobalParameters()):
                dst.setGlobalParameterDefaultValue(k, src.getGlobalParameterDefaultValue(k))
                if context is not None:
                    context.setParameter(src.getGlobalParameterName(k),
                                         src.getGlobalParameterDefaultValue(k))
        if context is not None:
            dst.updateParametersInContext(context)


def _switched_off(force: openmm.CustomNonbondedForce) -> np.ndarray | None:
    """Which particles of ``force`` a zero parameter switches off, or None when unknown.

    A particle is switched off when it has a zero in a column that, zero in either particle
    of a pair, makes the energy and its first two derivatives vanish identically
    (:func:`.potential.symbolic.inert_columns`: water hydrogens with W = 0 or A = B = C = 0 in
    the paper's custom forms). None (nothing known, every pair kept) for a force with
    tabulated functions, computed values or a long-range correction (whose pair counts an
    interaction group would change), and for an energy without a symbolic form. Interaction
    groups are the caller's to check.
    """
    from .potential import symbolic

    if (force.getNumTabulatedFunctions() or force.getNumComputedValues()
            or force.getUseLongRangeCorrection() or force.getNumParticles() == 0):
        return None
    columns = tuple(force.getPerParticleParameterName(k)
                    for k in range(force.getNumPerParticleParameters()))
    global_names = tuple(force.getGlobalParameterName(k)
                         for k in range(force.getNumGlobalParameters()))
    try:
        law = symbolic.custom_pair_law(force.getEnergyFunction(), columns, global_names,
                                       None, None)
    except ValueError:
        return None
    first, second = symbolic.inert_columns(law, ())
    inert = sorted(set(first) & set(second) & set(range(len(columns))))
    if not inert:
        return None
    n = force.getNumParticles()
    values = np.array([force.getParticleParameters(i) for i in range(n)],
                      dtype=float).reshape(n, len(columns))
    return (values[:, inert] == 0.0).any(axis=1)


def skip_switched_off_pairs(system: openmm.System) -> dict[int, np.ndarray]:
    """Restrict each CustomNonbondedForce of ``system`` to the pairs that can contribute.

    Pairs with a particle that a zero parameter switches off (:func:`_switched_off`) add
    nothing to the energy or the forces, but OpenMM evaluates every pair of a
    CustomNonbondedForce within the cutoff. One interaction group of the other particles
    with themselves leaves them out: the same energy and forces to round-off, and 2.5–4×
    faster steps for the paper's water forms on the CPU platform, where the hydrogens make
    eight pairs in nine. Forces that have interaction groups already, or where nothing (or
    everything) is switched off, are left as they are.

    Returns
    -------
    dict of int to ndarray of bool
        Force index → the switched-off mask its group was built from
        (:func:`update_switched_off_pairs` keeps it current as parameters change).
    """
    restricted = {}
    for index, force in enumerate(system.getForces()):
        if not isinstance(force, openmm.CustomNonbondedForce) \
                or force.getNumInteractionGroups():
            continue
        off = _switched_off(force)
        if off is None or not off.any() or off.all():
            continue
        kept = np.flatnonzero(~off).tolist()
        force.addInteractionGroup(kept, kept)
        restricted[index] = off
    return restricted


def update_switched_off_pairs(system: openmm.System, restricted: dict[int, np.ndarray]) -> bool:
    """Re-fit the interaction group of each force in ``restricted`` (from
    :func:`skip_switched_off_pairs`; updated in place) to the particles its current
    parameters switch off, e.g. after a trained parameter moved away from zero. Returns
    whether a group changed: the Context must then be reinitialised."""
    changed = False
    for index, before in restricted.items():
        force = system.getForce(index)
        off = _switched_off(force)
        if off is None:
            off = np.zeros_like(before)
        if not np.array_equal(off, before):
            kept = np.flatnonzero(~off).tolist()
            force.setInteractionGroupParameters(0, kept, kept)
            restricted[index] = off
            changed = True
    return changed


def _openmm_seed(seed: int) -> int:
    """A positive 31-bit seed (OpenMM draws a random one for 0)."""
    return int(seed) % 2147483646 + 1


class Sampler:
    """An OpenMM simulation (Langevin-middle, optionally NPT) whose parameters can be updated.

    Parameters
    ----------
    system : openmm.System
        The System to sample; copied, and a MonteCarloBarostat added when ``pressure`` is given.
    positions : ndarray, shape (N, 3), nm
    box : ndarray, shape (3, 3), nm, or None
    temperature : float, K
    friction : float, 1/ps
    timestep : float, ps
    pressure : float, bar, optional
        NPT at this pressure; NVT when None.
    barostat_interval : int
        Steps between Monte Carlo volume moves.
    platform : str
        OpenMM platform name or ``"auto"``.
    seed : int
        Seed of OpenMM's random numbers (integrator noise, barostat, initial velocities).
    deterministic : bool
        Sample so that the same state and seed give the same trajectory bit for bit (one CPU
        thread with deterministic forces, or Reference; see :func:`platform_properties`).
        Without it, the multi-threaded CPU platform varies from run to run.
    max_temperature : float, K, optional
        Kinetic temperature above which the simulation counts as exploded (default
        3 × ``temperature``).
    check_every : int
        Steps between explosion checks.
    """

    def __init__(self, system: openmm.System, positions: np.ndarray, box: np.ndarray | None,
                 temperature: float, friction: float, timestep: float,
                 pressure: float | None = None, barostat_interval: int = 25,
                 platform: str = "auto", seed: int = 1, deterministic: bool = False,
                 max_temperature: float | None = None, check_every: int = 100):
        self.system = openmm.XmlSerializer.clone(system)
        self._restricted = skip_switched_off_pairs(self.system)
        if pressure is not None:
            barostat = openmm.MonteCarloBarostat(pressure * unit.bar, temperature * unit.kelvin,
                                                 barostat_interval)
            barostat.setRandomNumberSeed(seed)
            self.system.addForce(barostat)
        if box is not None:
            self.system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
        self.temperature = float(temperature)
        self.timestep = float(timestep)
        self.max_temperature = float(max_temperature or 3.0 * temperature)
        self.check_every = int(check_every)
        self._dof = degrees_of_freedom(self.system)
        self.integrator = openmm.LangevinMiddleIntegrator(temperature, friction, timestep)
        self.integrator.setRandomNumberSeed(seed)
        self.platform = select_platform(platform, deterministic)
        properties = platform_properties(self.platform.getName(), deterministic)
        try:
            self.context = openmm.Context(self.system, self.integrator, self.platform,
                                          properties)
        except openmm.OpenMMException as exc:
            raise InputError(f"OpenMM cannot create the simulation ({exc}); check "
                             "system.cutoff against the box size and simulation.platform") \
                from None
        if box is not None:
            self.context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
        self.context.setPositions(np.asarray(positions, dtype=float))
        self.seed = int(seed)

    @property
    def platform_name(self) -> str:
        return self.platform.getName()

    def minimize(self, tolerance: float = 10.0, max_iterations: int = 0) -> None:
        """Local energy minimisation (tolerance in kJ/mol/nm)."""
        openmm.LocalEnergyMinimizer.minimize(self.context, tolerance, max_iterations)

    def set_velocities(self, seed: int) -> None:
        """Draw Maxwell–Boltzmann velocities at the bath temperature with ``seed``."""
        self.context.setVelocitiesToTemperature(self.temperature, int(seed))

    def update_parameters(self, system: openmm.System) -> None:
        """Take the per-item parameters of ``system`` (same structure) into the simulation."""
        copy_parameters(system, self.system, self.context)
        if update_switched_off_pairs(self.system, self._restricted):
            self.context.reinitialize(preserveState=True)

    def kinetic_temperature(self) -> float:
        """Instantaneous kinetic temperature, K."""
        ke = self.context.getState(getEnergy=True).getKineticEnergy()
        return 2.0 * ke.value_in_unit(unit.kilojoule_per_mole) / (self._dof * KB)

    def step(self, n_steps: int, frames_at: Collection[int] = ()) -> list[SampledState]:
        """Run ``n_steps`` steps, checking for NaN and runaway temperature every
        ``check_every`` steps.

        Parameters
        ----------
        n_steps : int
        frames_at : collection of int
            OpenMM step numbers (:meth:`current_step`) at which to record the state; those
            outside this call's steps are ignored. Recording does not change the dynamics.

        Returns
        -------
        list of SampledState
            The states at the steps of ``frames_at`` this call passed, in order.

        Raises
        ------
        SimulationExploded
            With the OpenMM step at which the problem was detected.
        """
        start = self.current_step()
        stops = sorted(s - start for s in frames_at if start < s <= start + n_steps)
        frames = []
        done = 0
        while done < n_steps:
            check = min(n_steps, (done // self.check_every + 1) * self.check_every)
            stop = min([check] + [s for s in stops if s > done])
            try:
                self.integrator.step(stop - done)
            except openmm.OpenMMException as exc:
                raise SimulationExploded(self.current_step(), str(exc)) from None
            done = stop
            if done in stops:
                frames.append(self.state())
            if done != check:
                continue
            state = self.context.getState(getPositions=True, getEnergy=True)
            pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if not (np.all(np.isfinite(pos)) and math.isfinite(energy)):
                raise SimulationExploded(self.current_step(), "NaN in positions or energy")
            temperature = 2.0 * state.getKineticEnergy().value_in_unit(
                unit.kilojoule_per_mole) / (self._dof * KB)
            if not temperature < self.max_temperature:
                raise SimulationExploded(
                    self.current_step(), f"kinetic temperature {temperature:.0f} K exceeds "
                                         f"{self.max_temperature:.0f} K")
        return frames

    def equilibrate(self, max_steps: int, block_steps: int = 500, sample_every: int = 10,
                    min_blocks: int = 10, threshold: float = 2.0) -> dict:
        """Run until the density (NPT) or the potential energy (NVT) stops drifting.

        Samples every ``sample_every`` steps are averaged per block of ``block_steps``; from
        ``min_blocks`` blocks on, after every block, the least-squares slope of the last half
        of the block means is compared with its standard error
        (:func:`~openmm_reversible.observables.blocking.drifting`), and the run stops once
        ``|slope| <= threshold · stderr``, or after ``max_steps``.

        Returns
        -------
        dict
            ``observable`` ("density" or "potential_energy"), ``unit`` (g/cm^3 or kJ/mol),
            ``converged`` (False when ``max_steps`` ran out first), ``steps``, ``seconds``,
            ``block_steps``, ``block_means``, ``slope_per_block`` and ``slope_stderr`` (units
            of the observable; None before ``min_blocks`` blocks) and ``threshold``.

        Raises
        ------
        SimulationExploded
        """
        npt = any(isinstance(f, openmm.MonteCarloBarostat) for f in self.system.getForces())
        mass = sum(self.system.getParticleMass(i).value_in_unit(unit.dalton)
                   for i in range(self.system.getNumParticles()))

        def sample() -> float:
            state = self.context.getState(getEnergy=True)
            if npt:
                volume = state.getPeriodicBoxVolume().value_in_unit(unit.nanometer ** 3)
                return mass / volume * G_CM3_PER_AMU_NM3
            return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

        start = time.perf_counter()
        means: list[float] = []
        slope = stderr = None
        converged = False
        done = 0
        while done < max_steps and not converged:
            block = min(block_steps, max_steps - done)
            values = []
            for k in range(0, block, sample_every):
                self.step(min(sample_every, block - k))
                values.append(sample())
            done += block
            means.append(float(np.mean(values)))
            if len(means) >= min_blocks:
                drifts, slope, stderr = drifting(means, threshold)
                converged = not drifts
        return {"observable": "density" if npt else "potential_energy",
                "unit": "g/cm^3" if npt else "kJ/mol", "converged": converged, "steps": done,
                "seconds": time.perf_counter() - start, "block_steps": block_steps,
                "block_means": means, "slope_per_block": slope, "slope_stderr": stderr,
                "threshold": threshold}

    def current_step(self) -> int:
        return int(self.context.getStepCount())

    def state(self) -> SampledState:
        """Positions, velocities and box of the current state (float64 arrays, nm, nm/ps)."""
        state = self.context.getState(getPositions=True, getVelocities=True)
        box = None
        if self.system.usesPeriodicBoundaryConditions():
            box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True)
                             .value_in_unit(unit.nanometer), dtype=float)
        return SampledState(
            positions=np.asarray(state.getPositions(asNumpy=True)
                                 .value_in_unit(unit.nanometer), dtype=float),
            velocities=np.asarray(state.getVelocities(asNumpy=True)
                                  .value_in_unit(unit.nanometer / unit.picosecond), dtype=float),
            box=box, step=self.current_step())

    def restart(self, state: SampledState, seed: int) -> None:
        """Continue from ``state`` with a fresh random-number stream ``seed``.

        The Context is reinitialised, so the integrator noise and the barostat's moves depend
        only on ``(state, seed)`` and the System: a run restarted from a saved state repeats an
        uninterrupted one bit for bit when the Sampler is ``deterministic`` (which OpenMM
        checkpoints alone do not guarantee); otherwise it is the same ensemble, not the same
        trajectory.
        """
        seed = _openmm_seed(seed)
        self.integrator.setRandomNumberSeed(seed)
        for force in self.system.getForces():
            if isinstance(force, openmm.MonteCarloBarostat):
                force.setRandomNumberSeed(seed)
        self.context.reinitialize()
        if state.box is not None:
            self.context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in state.box])
        self.context.setPositions(state.positions)
        self.context.setVelocities(state.velocities)
        self.context.setStepCount(state.step)
        self.context.setTime(state.step * self.timestep)

    @classmethod
    def from_config(cls, config: FitConfig, system: openmm.System, positions: np.ndarray,
                    topology: app.Topology) -> Sampler:
        """A Sampler with the config's ``[simulation]`` and ``[failure]`` settings."""
        sim = config.simulation
        box = None
        if topology.getPeriodicBoxVectors() is not None:
            box = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer),
                             dtype=float)
            half = 0.5 * float(np.min(np.diag(box)))
            if config.system.nonbonded_method not in ("NoCutoff", "CutoffNonPeriodic") \
                    and config.system.cutoff > half:
                raise InputError(f"system.cutoff = {config.system.cutoff} nm: larger than half "
                                 f"the box ({half:.3f} nm); use a smaller cutoff or a bigger "
                                 f"box")
        return cls(system, positions, box, sim.temperature, sim.friction, sim.timestep,
                   pressure=sim.pressure, barostat_interval=sim.barostat_interval,
                   platform=sim.platform, seed=sim.seed, deterministic=sim.deterministic,
                   max_temperature=config.failure.max_temperature)
