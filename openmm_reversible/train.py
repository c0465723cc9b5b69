"""The training loop: epochs of OpenMM sampling and reversible windows, an optimiser step each.

A fit has one :class:`Leg` per system and state point (:meth:`FitConfig.state_points`; one
for a config without ``[[systems]]``), each with its own OpenMM simulation and state. Before
the first epoch, with ``[equilibration] max_steps`` > 0, each leg is equilibrated until its
density (NPT) or energy (NVT) stops drifting (:meth:`Sampler.equilibrate`). One epoch
(:meth:`Trainer.run_epoch`):

1. for each leg: push the current parameter values into its OpenMM System
   (``updateParametersInContext``) and restart its simulation from the state its previous
   epoch ended in, with noise seeded by ``(leg seed, epoch, attempt)``;
2. equilibrate in OpenMM (NPT with a MonteCarloBarostat when the state point has a pressure);
3. for each window: sample ``bulk_steps`` in OpenMM (one chain per leg, so the windows' start
   states are collected first, and the NPT frames of ensemble targets with them); then run
   every leg's windows as independent pieces (:func:`compute_window`: a torch
   :class:`~openmm_reversible.integrators.ReversibleSimulation` from its start state, its loss
   back-propagated), in this process or on Dask workers (``[parallel]``,
   :mod:`~openmm_reversible.parallel`), and sum the gradients, each weighted 1/windows, in
   piece order, then each leg's ensemble terms (:func:`ensemble_terms`: the density by the
   fluctuation estimator), so that the result is the same bit for bit with any number of
   workers; each observable gets a standard error from blocks of the window's snapshots
   (:func:`block_observables`, :func:`pooled_stderr`); with ``schedule.replicas = R`` > 1,
   steps 1 to 3 run for R independent chains per leg, each from the state it ended the
   previous epoch in (all from the leg's start state in the first epoch; the checkpoint
   keeps every chain's state) with its own seeds, each chain's OpenMM sampling a piece of
   the engine (:func:`sample_replica`), and a leg's gradient is the mean over all its
   R × windows windows (replica 1 has the seeds, hence the windows, of a fit without
   replicas, and its frames are the epoch's trajectory; the ensemble targets pool the
   frames of all replicas);
4. the priors of ``[[parameters]]`` (:mod:`~openmm_reversible.priors`) add their penalty
   and its gradient, frozen parameters lose theirs; each gradient entry is clamped to
   ``±schedule.gradient_clamp`` when one is given; one optimiser step on the *scaled*
   parameters (value / start value, as in the reversible simulation paper), then clip them so
   that σ, ε, force constants and lengths stay positive, and project them into their bounds.

After every epoch the output directory receives the epoch's trajectory (written first, on its
own: a kill before the checkpoint reruns its epoch and replaces it) and then, all together and
atomically (temporary files, renamed only when every one is complete): the trained ForceField
XML (the user's file with only the tagged values changed),
``checkpoint.pt`` (parameters, optimiser state, simulation state, history), ``log.jsonl`` (one
JSON object per epoch: each loss term, observables, parameters, gradients, the OpenMM state,
timings), ``state_data.csv`` (the same per epoch in OpenMM's StateDataReporter layout),
``trajectory/epoch_NNNN.dcd`` (frames of the epoch's OpenMM sampling, see
:mod:`openmm_reversible.outputs`) and ``training.png`` (loss and each observable against its
target). A run killed at any moment loses at most the epoch in progress, and ``resume=True``
continues from the checkpoint: same parameters, optimiser state, simulation state and seeds.

What repeats. With ``simulation.deterministic = true`` (OpenMM on one CPU thread with
deterministic forces, or the Reference platform) a fit is bit-for-bit repeatable: two runs of
one config give identical losses, gradients, parameters, files and trajectory frames (timings
aside), and a fit killed at any point and resumed equals the uninterrupted run. By default
OpenMM samples on its fastest platform with all CPU threads (or a GPU), where the same state
and seed give a different trajectory on every run (measured: the CPU platform repeats only with
one thread *and* deterministic forces, :func:`~openmm_reversible.sampler.platform_properties`);
the sampled states, hence losses, gradients and parameters, then differ from run to run by
sampling noise, and a resumed fit is a statistically equivalent continuation, not the same
numbers. What holds in both modes: the reversible windows are torch float64 code that gives
the same loss and gradient for the same starting state and seed, the epoch seeds depend only on
``(seed, epoch, attempt)``, and a resume starts from exactly the checkpoint's parameters,
optimiser state and simulation state.

A simulation that produces NaN or runs away stops the epoch with a message naming the step and
the parameter values; the last good parameters and optimiser state are restored, and the epoch
is retried with new noise (and, with ``failure.action = "shrink_lr"``, a smaller learning rate)
up to ``failure.max_retries`` times before :class:`TrainingFailed` is raised. A finite window
with a NaN or infinite parameter gradient is not retried (the same expressions would give it
again): :class:`NonFiniteGradient` stops the fit before any optimiser step, naming the
parameters and the forces whose derivatives are not finite (:func:`nonfinite_gradient_terms`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openmm
import torch
from tqdm.auto import tqdm

from .config import SCALAR_UNITS, FitConfig, GasSystemConfig, StatePoint, to_dict, with_defaults
from .errors import InputError, structure_errors
from .export import xml_writes
from .files import atomic_write_all, text_writer
from .gas import GasEstimate, GasPhase, first_molecule, pdb_molecule
from .geometry import box_widths
from .integrators import Constraints, LangevinMiddleIntegrator, ReversibleSimulation
from .integrators.noise import counter_seed
from .losses import Loss, Target
from .observables.blocking import block_average, block_slices
from .observables.density import pressure
from .observables.diffusion import (
    M2_PER_S_PER_NM2_PER_PS,
    mean_squared_displacement,
    self_diffusion_coefficient,
    time_between_frames,
    yeh_hummer_correction,
)
from .observables.energy import energy_per_molecule, enthalpy_of_vaporization
from .observables.ensemble import (
    ENSEMBLE_OBSERVABLES,
    EnsembleFrames,
    ensemble_average,
    needs_charges,
    particle_charges,
)
from .observables.rdf import rdf
from .observables.selection import molecules, pair_indices
from .outputs import (
    STATE_DATA,
    state_data_csv,
    state_values,
    trajectory_path,
    write_topology,
    write_trajectory,
)
from .parallel import Engine, PieceFailed, PieceProgress, by_worker, open_engine
from .parameters import ParameterSet
from .potential import TorchPotential
from .priors import Regularization
from .reweighting import through_energies
from .sampler import (
    SampledState,
    Sampler,
    SimulationExploded,
    build_structure,
    configure_system,
    create_system_kwargs,
)
from .trajectory import Trajectory
from .units import DTYPE, KB

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
PLOT = "training.png"
CHECKPOINT_VERSION = 1

POSITIVE_ATTRIBUTES = frozenset({"sigma", "epsilon", "k", "length", "radius", "scale"})
"""XML attributes that must stay > 0 (σ, ε, force constants, equilibrium lengths)."""
MIN_SCALE = 1e-3
"""Smallest scaled value (value / start value) of a positive parameter after a step."""


class TrainingFailed(RuntimeError):
    """An epoch failed more often than ``failure.max_retries`` allows."""


class NonFiniteGradient(TrainingFailed):
    """A window gave a NaN or infinite parameter gradient: the fit stops before any optimiser
    step (the same expression would give it again; new noise does not help)."""


class _WindowFailed(RuntimeError):
    """A reversible window produced a non-finite loss, gradient or state."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _jsonable(value):
    """Replace non-finite floats (not valid JSON) by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def read_log(path: str | os.PathLike) -> list[dict]:
    """The epoch records of a ``log.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


_CHECKPOINT_ENTRIES = ("version", "epoch", "sites", "scaled", "optimizer", "records", "state",
                       "config")
"""The entries :meth:`Trainer._checkpoint` writes."""


def _read_checkpoint(path: str | os.PathLike, entries: Sequence[str] = _CHECKPOINT_ENTRIES
                     ) -> dict:
    """A ``checkpoint.pt`` written by :class:`Trainer`, checked for its format.

    Parameters
    ----------
    path : path
        The checkpoint file.
    entries : sequence of str
        The entries it must hold (those the trainer of the fit writes).

    Returns
    -------
    dict
        The checkpoint's entries. The format is the trainer's own: other modules read the
        trained values with :func:`trained_parameters`.

    Raises
    ------
    InputError
        If the file is missing, unreadable (truncated, not a torch file), of another format
        version or without the entries the trainer writes.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}; pass the output directory of "
                         "`openmm-reversible fit`")
    try:
        checkpoint = torch.load(path, weights_only=True)
    except Exception as exc:  # torch reports a truncated or foreign file in many ways
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise InputError(f"{path}: not a readable checkpoint ({reason}); the file is truncated "
                         "or was not written by `openmm-reversible fit`: restore it or start a "
                         "new fit") from None
    missing = ([] if not isinstance(checkpoint, dict) else
               [k for k in entries if k not in checkpoint])
    if not isinstance(checkpoint, dict) or "version" in missing:
        raise InputError(f"{path}: not a checkpoint of `openmm-reversible fit` (no format "
                         "version); pass the output directory of a fit")
    if checkpoint["version"] != CHECKPOINT_VERSION:
        raise InputError(f"{path} has format version {checkpoint['version']}, this version "
                         f"reads {CHECKPOINT_VERSION}; start a new fit")
    if missing:
        raise InputError(f"{path}: checkpoint lacks {', '.join(missing)}; it was not written by "
                         "`openmm-reversible fit`: restore it or start a new fit")
    return checkpoint


def _restore_parameters(parameters: ParameterSet, checkpoint: dict,
                        path: str | os.PathLike) -> None:
    """Set ``parameters`` to the checkpoint's trained values (same sites required)."""
    if checkpoint["sites"] != parameters.names:
        raise InputError(f"{path} holds parameters {checkpoint['sites']} but the config's force "
                         f"field has {parameters.names}; pass the config the fit used, or "
                         "start a new fit")
    scaled = checkpoint["scaled"]
    if not isinstance(scaled, torch.Tensor) or scaled.shape != parameters.scaled.shape:
        raise InputError(f"{path}: its trained values do not fit the "
                         f"{parameters.scaled.numel()} trainable parameters of the force field; "
                         "the checkpoint is damaged: restore it or start a new fit")
    with torch.no_grad():
        parameters.scaled.copy_(scaled)


def trained_parameters(config: FitConfig, output: str | os.PathLike) -> ParameterSet:
    """The config's force-field parameters set to the values of the fit in ``output``.

    Parameters
    ----------
    config : FitConfig
        The config the fit ran with.
    output : path
        The fit's output directory (its ``checkpoint.pt`` holds the values).

    Returns
    -------
    ParameterSet
        Built from the config's original files, holding the trained values (write them with
        :func:`~openmm_reversible.export.write_xml`).

    Raises
    ------
    InputError
        If the checkpoint is missing or damaged, or belongs to a different force field.
    """
    path = Path(output) / CHECKPOINT
    checkpoint = _read_checkpoint(path)
    config = config.state_points()[0].config  # every system holds the same parameters
    with structure_errors(config.structure.source, config.forcefield.files):
        topology, _ = build_structure(config)
        parameters = ParameterSet.from_forcefield(config.forcefield.files, topology,
                                                  **create_system_kwargs(config))
    _restore_parameters(parameters, checkpoint, path)
    return parameters


# ---------------------------------------------------------------------------------------------
# The objective: the config's targets as one loss function of a window's snapshots
# ---------------------------------------------------------------------------------------------


def atoms_named(topology, name: str) -> np.ndarray:
    """Indices of the atoms whose name or element symbol is ``name`` (``"H"`` finds H1, H2)."""
    found = [a.index for a in topology.atoms()
             if a.name == name or (a.element is not None and a.element.symbol == name)]
    if not found:
        names = sorted({a.name for a in topology.atoms()})
        raise InputError(f"no atom is named {name!r} (nor has that element); atom names in "
                         f"the structure: {', '.join(names[:20])}")
    return np.asarray(found, dtype=np.int64)


def rdf_pairs(topology, atoms: list[str], system: openmm.System | None = None) -> np.ndarray:
    """Intermolecular atom pairs for an RDF between two atom names (or element symbols).

    A virtual site (TIP4P-Ew's M: no element, no mass) enters only when named. With the
    OpenMM ``system`` the molecules include their sites (:func:`molecules`), so a named
    site's pairs with its own molecule are excluded as well.
    """
    return pair_indices(atoms_named(topology, atoms[0]), atoms_named(topology, atoms[1]),
                        exclude=molecules(topology, system))


def harmonic_gas_energy(topology, temperature: float, rigid: bool,
                        system: openmm.System | None = None) -> float:
    """Classical mean potential energy of one isolated molecule, kJ/mol: k_B T / 2 per
    internal mode (3n - 6, or 1 for a 2-atom molecule, n its atoms), 0 when rigid.

    With the OpenMM ``system`` the count is that of its first molecule (its virtual sites
    joined to it): n its particles with mass (a site has no modes of its own) and one mode
    fewer per constraint inside it (a rigid water has none left, an HBonds water with a
    flexible angle one).
    """
    groups = molecules(topology, system)
    sizes = {len(m) for m in groups}
    if len(sizes) != 1:
        raise InputError("enthalpy_of_vaporization needs a pure liquid (molecules of one "
                         f"size), but the structure has molecules of {sorted(sizes)} atoms")
    n, constrained = sizes.pop(), 0
    if system is not None:
        first = {int(i) for i in groups[0]}
        n = sum(1 for i in first
                if system.getParticleMass(i).value_in_unit(openmm.unit.dalton) > 0)
        constrained = sum(1 for k in range(system.getNumConstraints())
                          if system.getConstraintParameters(k)[0] in first)
    modes = 0 if rigid or n == 1 else max((1 if n == 2 else 3 * n - 6) - constrained, 0)
    return 0.5 * modes * KB * temperature


class Objective:
    """Weighted sum of the config's target terms, as a ``loss_fn(trajectory, potential)``.

    - ``rdf``: ``weight · mean_r (g(r) - g_target(r))²`` on the fit's bins (the target file's
      own, or the file's g interpolated onto uniform bins: :meth:`TargetConfig.rdf_grid`), g
      from the smooth histogram of the window's snapshots (intermolecular pairs); with
      ``loss = "l1"``, ``weight · mean_r |g(r) - g_target(r)|``;
    - scalar targets (``enthalpy_of_vaporization``, ``pressure``): ``weight · ((x - value) /
      tolerance)²`` with x averaged over the window's snapshots;
    - ``diffusion``: the same scalar term, x the self-diffusion coefficient (nm²/ps) from the
      slope of the molecules' mean squared displacement over the window's snapshots (every
      snapshot a time origin, lags in the target's ``lag_range``), plus the Yeh–Hummer
      finite-size correction when the target gives the model's ``viscosity``: a
      time-dependent observable, differentiated through the reversible window;
    - ensemble targets (``density``, ``compressibility``, ``thermal_expansion``,
      ``heat_capacity``, ``dielectric``: :data:`ENSEMBLE_OBSERVABLES`): the same scalar term,
      but not in the windows (their box is fixed, and a fluctuation needs more frames than a
      window has): x is the estimator of
      :func:`~openmm_reversible.observables.ensemble.ensemble_average` over the OpenMM frames
      of the epoch's bulk sampling and its gradient the fluctuation estimator
      (:func:`ensemble_terms`); they are in :attr:`ensemble_targets`, not :attr:`targets`.

    After each call, :attr:`last_terms` holds each weighted term and :attr:`last_observables`
    each observable (a float, or g(r) as a list) for logs and plots. With the OpenMM
    ``system`` its molecules include their virtual sites and the gas-phase energy of ΔHvap
    counts its constraints (:func:`harmonic_gas_energy`).
    """

    def __init__(self, config: FitConfig, topology, system: openmm.System | None = None):
        self.config = config
        self.targets = [t for t in config.targets if t.observable not in ENSEMBLE_OBSERVABLES]
        self.ensemble_targets = [t for t in config.targets
                                 if t.observable in ENSEMBLE_OBSERVABLES]
        self.rdf_setup: dict[str, dict] = {}
        self._molecules = molecules(topology, system)
        # Without the System the config's flags say whether the molecules are rigid.
        rigid = system is None and (config.system.rigid_water
                                    or config.system.constraints != "none")
        for t in self.targets:
            if t.observable == "rdf":
                grid = t.rdf_grid()
                self.rdf_setup[t.label] = {
                    "pairs": rdf_pairs(topology, t.atoms, system), "r": grid.r,
                    "target": torch.as_tensor(grid.g, dtype=DTYPE), "r_range": grid.r_range,
                    "n_bins": len(grid.r), "sigma": t.bandwidth or grid.width,
                    "note": grid.note}
        self.gas_energy = {t.label: (t.gas_energy if t.gas_energy is not None else
                                     harmonic_gas_energy(topology, config.simulation.temperature,
                                                         rigid, system))
                           for t in self.targets if t.observable == "enthalpy_of_vaporization"}
        self.loss = Loss([self._target(t) for t in self.targets]) if self.targets else None
        self.ensemble_loss = Loss([
            Target(t.label, t.value, weight=t.weight / t.scale ** 2, kind="l2", name=t.label)
            for t in self.ensemble_targets]) if self.ensemble_targets else None
        self.last_terms: dict[str, float] = {}
        self.last_observables: dict[str, object] = {}

    @property
    def molecule_groups(self) -> list:
        """Atom indices of each molecule (virtual sites joined to theirs)."""
        return self._molecules

    @property
    def simulated_gas(self) -> list:
        """The ΔHvap targets whose gas phase is simulated (``gas = "simulate"``, or a gas
        system's name)."""
        return [t for t in self.targets
                if t.observable == "enthalpy_of_vaporization" and t.gas is not None]

    def set_gas_energies(self, energies: dict[str, float]) -> None:
        """Set the simulated ⟨E_gas⟩ (kJ/mol) of :attr:`simulated_gas` targets, by label."""
        for label, value in energies.items():
            self.gas_energy[label] = float(value)

    def gas_sensitivities(self) -> dict[str, float]:
        """d(last loss)/d⟨E_gas⟩ of each simulated gas energy, by label (the loss's units per
        kJ/mol): ΔHvap is ⟨E_gas⟩ plus terms without it, so this is the derivative of its term
        at the last ΔHvap (:attr:`last_observables`)."""
        found = {}
        for target in self.loss.targets if self.loss is not None else ():
            if target.name in {t.label for t in self.simulated_gas}:
                x = torch.tensor(self.last_observables[target.name], dtype=DTYPE,
                                 requires_grad=True)
                (d,) = torch.autograd.grad(target.weight * target.discrepancy(x), [x])
                found[target.name] = float(d)
        return found

    @property
    def rdf_notes(self) -> dict[str, str]:
        """For each rdf target, the range of its file used and how (its bins, interpolation)."""
        return {label: s["note"] for label, s in self.rdf_setup.items()}

    def observable(self, target, traj: Trajectory, potential) -> torch.Tensor:
        """The target's observable over the window's snapshots (differentiable)."""
        if target.observable == "rdf":
            s = self.rdf_setup[target.label]
            half_box = (math.inf if traj.box is None
                        else 0.5 * float(box_widths(traj.box.detach()).min()))
            if s["r_range"][1] > half_box:
                raise InputError(
                    f"targets: the {target.label} range reaches {s['r_range'][1]:.4g} nm, but "
                    f"the box has shrunk to a half-width of {half_box:.4g} nm; set "
                    f"r_max = {np.floor(0.95 * half_box * 100) / 100:.2f} (nm) in that target")
            return rdf(traj.positions, traj.box, pairs=s["pairs"], r_range=s["r_range"],
                       n_bins=s["n_bins"], sigma=s["sigma"])[1]
        if target.observable == "enthalpy_of_vaporization":
            liquid = energy_per_molecule(potential, traj.positions, traj.box,
                                         len(self._molecules))
            return enthalpy_of_vaporization(liquid, self.gas_energy[target.label],
                                            traj.temperature)
        if target.observable == "diffusion":
            return self._diffusion(target, traj)
        return pressure(potential, traj.positions, traj.velocities, traj.box, traj.masses,
                        molecules=self._molecules).mean()

    def _diffusion(self, target, traj: Trajectory) -> torch.Tensor:
        """Self-diffusion coefficient of the molecules over the window's snapshots, nm²/ps."""
        interval = time_between_frames(traj.steps, traj.timestep)
        lags, msd = mean_squared_displacement(traj.positions, traj.masses, self._molecules,
                                              interval)
        d = self_diffusion_coefficient(lags, msd, tuple(target.lag_range) or None)
        if target.viscosity is not None:
            d = yeh_hummer_correction(d, traj.temperature, target.viscosity, traj.box)
        return d / M2_PER_S_PER_NM2_PER_PS

    def _target(self, target) -> Target:
        """The config target as a :class:`~openmm_reversible.losses.Target` on (traj, potential).

        A scalar's ``((x - value) / scale)²`` is an ``l2`` term with weight ``weight / scale²``.
        """
        kind = "l2"
        if target.observable == "rdf":
            reference, weight = self.rdf_setup[target.label]["target"], target.weight
            kind = target.loss
        else:
            reference, weight = target.value, target.weight / target.scale ** 2

        def observable(source, target=target):
            return self.observable(target, *source)

        return Target(observable, reference, weight=weight, kind=kind, name=target.label)

    def __call__(self, traj: Trajectory, potential) -> torch.Tensor:
        total, report = self.loss.evaluate((traj, potential))
        self.last_terms = {name: r.contribution for name, r in report.items()}
        self.last_observables = {name: r.value.tolist() if r.value.ndim else float(r.value)
                                 for name, r in report.items()}
        return total


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes
    ----------
    records : list of dict
        One record per epoch (as in ``log.jsonl``).
    parameters : dict of str to float
        Final values of every parameter site, MD units.
    files : dict of str to pathlib.Path
        ``forcefield`` (list of trained XML files), ``log``, ``state_data``, ``checkpoint``,
        ``plot``.
    """

    records: list[dict]
    parameters: dict[str, float]
    files: dict[str, object] = field(default_factory=dict)


def nonfinite_gradient_terms(potential: TorchPotential, positions: torch.Tensor,
                             box: torch.Tensor | None) -> list[str]:
    """The terms whose energy or forces have a non-finite parameter gradient at one state.

    Both derivatives the reversible step takes are checked: ``dE/dθ`` and the parameter VJP
    of the forces ``d(Σ F)/dθ`` (double backward).

    Parameters
    ----------
    potential : TorchPotential
        With a ParameterSet bound.
    positions : torch.Tensor, shape (N, 3), nm
    box : torch.Tensor, shape (3, 3), nm, or None

    Returns
    -------
    list of str
        ``"CustomNonbondedForce (force 3): Atom/epsilon/w-O"``: each such term and the
        parameters affected, in force order.
    """
    parameters = potential.parameters_set
    keys = parameters.trainable_keys
    x = positions.detach().clone().requires_grad_(True)
    found = []
    for term in potential.terms:
        energy = term(x, box, parameters())
        (force,) = torch.autograd.grad(energy, x, create_graph=True, allow_unused=True)
        bad = torch.zeros(len(keys), dtype=torch.bool)
        for total in (energy, None if force is None else force.sum()):
            if total is None or not total.requires_grad:
                continue
            (grad,) = torch.autograd.grad(total, parameters.scaled, retain_graph=True,
                                          allow_unused=True)
            if grad is not None:
                bad |= ~torch.isfinite(grad)
        if bool(bad.any()):
            names = ", ".join(k for k, b in zip(keys, bad.tolist(), strict=True) if b)
            found.append(f"{term.name} (force {term.force_index}): {names}")
    return found


# ---------------------------------------------------------------------------------------------
# One reversible window as an independent piece (run here or on a worker)
# ---------------------------------------------------------------------------------------------


@dataclass
class WindowModel:
    """What a window needs, built from the config once per process (:func:`window_model`).

    Attributes
    ----------
    config : FitConfig
    topology : openmm.app.Topology
    positions : numpy.ndarray, shape (N, 3), nm
        The config's starting structure.
    parameters : ParameterSet
    potential : TorchPotential
        Bound to ``parameters``.
    objective : Objective
    constraints : Constraints, optional
        The System's distance constraints (rigid water, HBonds), integrated in the windows.
    """

    config: FitConfig
    topology: object
    positions: np.ndarray
    parameters: ParameterSet
    potential: TorchPotential
    objective: Objective
    constraints: Constraints | None = None


def window_model(config: FitConfig) -> WindowModel:
    """Build the structure, parameters, torch potential, objective and constraints of a
    config."""
    with structure_errors(config.structure.source, config.forcefield.files):
        topology, positions = build_structure(config)
        parameters = ParameterSet.from_forcefield(config.forcefield.files, topology,
                                                  **create_system_kwargs(config))
    configure_system(parameters.system, config)
    potential = TorchPotential(parameters.system, parameters=parameters,
                               fused=config.simulation.fused)
    constraints = Constraints.from_system(parameters.system)
    return WindowModel(config, topology, positions, parameters, potential,
                       Objective(config, topology, parameters.system),
                       constraints if len(constraints) else None)


@dataclass(frozen=True)
class WindowPiece:
    """The inputs of one reversible window: with the config, all its result depends on.

    Attributes
    ----------
    epoch : int
        1-based, for messages.
    index : int
        0-based window index in the epoch.
    windows : int
        Windows in the epoch, of all its replicas (the gradient is that of loss / windows).
    scaled : torch.Tensor, shape (P,)
        Scaled trainable parameter values (value / start value).
    state : SampledState
        Start state (nm, nm/ps) from OpenMM.
    seed : int
        Seed of the window's Langevin noise.
    output : str
        The fit's output directory, named in messages.
    replica : int
        0-based replica whose sampling gave ``state`` (``schedule.replicas``).
    state_point : int
        Which (system, state point) of the config (its position in
        :meth:`~openmm_reversible.config.FitConfig.state_points`) the window simulates.
    gas : tuple of (str, float)
        The epoch's simulated ⟨E_gas⟩ (kJ/mol) of each ``gas = "simulate"`` target, by label.
    """

    epoch: int
    index: int
    windows: int
    scaled: torch.Tensor
    state: SampledState
    seed: int
    output: str
    replica: int = 0
    state_point: int = 0
    gas: tuple = ()


@dataclass(frozen=True)
class WindowResult:
    """What one window gives.

    Attributes
    ----------
    loss : float
        The window's loss (unweighted).
    gradient : torch.Tensor, shape (P,)
        d(loss / windows) / d(scaled parameters).
    terms : dict of str to float
        Each weighted loss term.
    observables : dict of str to float or list
        Each observable over the window.
    info : dict of str to float
        ``forward_s``, ``backward_s`` (s) and ``reconstruction_error`` (nm).
    blocks : dict of str to list
        Each observable on contiguous blocks of the window's snapshots
        (:func:`block_observables`), for its standard error.
    gas_sensitivity : dict of str to float
        d(loss / windows)/d⟨E_gas⟩ of each ``gas = "simulate"`` target, by label.
    """

    loss: float
    gradient: torch.Tensor
    terms: dict
    observables: dict
    info: dict
    blocks: dict = field(default_factory=dict)
    gas_sensitivity: dict = field(default_factory=dict)


def compute_window(model: WindowModel, piece: WindowPiece) -> WindowResult:
    """Run one reversible window and back-propagate its loss (a pure function of its inputs).

    The parameter values of ``piece`` are set into ``model.parameters`` first.

    Raises
    ------
    _WindowFailed
        Non-finite positions or loss, or no gradient (the epoch is retried with new noise).
    NonFiniteGradient
        A NaN or infinite parameter gradient (the fit stops), naming the parameters and forces.
    """
    sched, sim_cfg = model.config.schedule, model.config.simulation
    parameters, state, index = model.parameters, piece.state, piece.index
    with torch.no_grad():
        parameters.scaled.copy_(piece.scaled)
    parameters.scaled.grad = None
    model.objective.set_gas_energies(dict(piece.gas))
    integrator = LangevinMiddleIntegrator(sim_cfg.timestep, sim_cfg.friction,
                                          sim_cfg.temperature, seed=piece.seed)
    simulation = ReversibleSimulation(
        model.potential, integrator, sched.window_steps, sched.snapshot_every,
        model.objective, truncation=sched.truncation, resync_every=sched.resync_every,
        constraints=model.constraints)
    positions = torch.as_tensor(state.positions, dtype=DTYPE)
    velocities = torch.as_tensor(state.velocities, dtype=DTYPE)
    if model.constraints is not None:
        # OpenMM holds constraints to its tolerance (1e-5 by default); the window starts on
        # them to round-off.
        positions, velocities = model.constraints.constrain_state(positions, velocities,
                                                                  simulation.masses)
    box = None if state.box is None else torch.as_tensor(state.box, dtype=DTYPE)
    loss = simulation(positions, velocities, box)
    frames = simulation.trajectory.positions
    finite = torch.isfinite(frames).reshape(frames.shape[0], -1).all(dim=1)
    if not bool(finite.all()) or not bool(torch.isfinite(loss)):
        bad = int(torch.nonzero(~finite)[0, 0]) if not bool(finite.all()) else -1
        step = int(simulation.trajectory.steps[bad]) if bad >= 0 else sched.window_steps
        raise _WindowFailed(f"reversible window {index + 1} became non-finite by window "
                            f"step {step} (started at OpenMM step {state.step})")
    (loss / piece.windows).backward()
    grad = parameters.scaled.grad
    if grad is None:
        raise _WindowFailed(f"reversible window {index + 1} (started at OpenMM step "
                            f"{state.step}) gave no gradient")
    if not bool(torch.isfinite(grad).all()):
        keys = parameters.trainable_keys
        bad = [f"{k} ({g})" for k, g in zip(keys, grad.tolist(), strict=True)
               if not math.isfinite(g)]
        terms = nonfinite_gradient_terms(model.potential, positions, box)
        source = (f"at the window's first state it comes from {'; '.join(terms)}" if terms
                  else "no force has a non-finite parameter gradient at the window's first "
                  "state, so it arises later in the window or in the loss")
        raise NonFiniteGradient(
            f"epoch {piece.epoch}: reversible window {index + 1} (started at OpenMM step "
            f"{state.step}) gave a non-finite gradient for {', '.join(bad)}; {source}. The "
            "fit stops before any optimiser step; the last good parameters are kept in "
            f"{piece.output}. Look for 0*inf in that force's expression (an infinite "
            "intermediate such as r/rm with rm = 0, multiplied by a parameter) and give the "
            "parameters involved nonzero values")
    info = {key: float(simulation.info.get(key, 0.0))
            for key in ("forward_s", "backward_s", "reconstruction_error")}
    terms, observables = dict(model.objective.last_terms), dict(model.objective.last_observables)
    return WindowResult(float(loss.detach()), grad.detach().clone(), terms, observables, info,
                        block_observables(model.objective, simulation.trajectory,
                                          model.potential),
                        {label: d / piece.windows
                         for label, d in model.objective.gas_sensitivities().items()})


def ensemble_frames(model: WindowModel, frames: Sequence[SampledState]) -> EnsembleFrames:
    """OpenMM's sampled frames of a state point with what its ensemble estimators need."""
    config = model.config
    return EnsembleFrames.from_system(
        model.parameters.system, np.stack([f.positions for f in frames]),
        np.stack([f.box for f in frames]), config.simulation.temperature,
        config.simulation.pressure, model.objective.molecule_groups,
        config.system.nonbonded_method, config.system.reaction_field_dielectric)


def ensemble_terms(model: WindowModel, frames: Sequence[SampledState], n_blocks: int = 5
                   ) -> WindowResult:
    """The ensemble targets of a state point on OpenMM's frames, with their gradient.

    Each target's estimator (:func:`~openmm_reversible.observables.ensemble.ensemble_average`:
    ⟨ρ⟩, κ_T, α, C_p or ε) is a function of Boltzmann-reweighted averages over the frames and
    of the frames' energies under the current parameters; the loss of
    :attr:`Objective.ensemble_loss` over them is differentiated by
    :func:`~openmm_reversible.reweighting.through_energies`, which gives every average its
    fluctuation derivative d⟨A⟩/dθ = ⟨∂A/∂θ⟩ − β(⟨A ∂U/∂θ⟩ − ⟨A⟩⟨∂U/∂θ⟩) (the pV term of the
    NPT weight does not depend on θ; ∂A/∂θ is the charges' part of the dipole moment), chained
    through the estimators and the loss.

    Parameters
    ----------
    model : WindowModel
        With its parameters at the values the frames were sampled with.
    frames : sequence of SampledState
        Frames of the sampling (positions nm, box nm), in time order; NPT for the
        box-fluctuation targets.
    n_blocks : int
        Blocks of the standard error: each estimator on each of ``n_blocks`` contiguous blocks
        of the frames (:func:`pooled_stderr`; fewer blocks with fewer frames).

    Returns
    -------
    WindowResult
        ``loss``, ``gradient`` (d loss / d scaled parameters), ``terms``, ``observables``;
        ``blocks`` holds each observable's block estimates.
    """
    objective, parameters = model.objective, model.parameters
    sampled = ensemble_frames(model, frames)
    targets = objective.ensemble_targets
    t0 = time.perf_counter()
    charges = (particle_charges(model.potential)
               if any(needs_charges(t.observable) for t in targets) else None)
    report: dict = {}

    def loss(energies: torch.Tensor) -> torch.Tensor:
        report["energies"] = energies.detach()
        values = {t.label: ensemble_average(t.observable, sampled, energies, charges)
                  for t in targets}
        total, report["terms"] = objective.ensemble_loss.evaluate(values)
        return total

    if any(t.weight > 0 for t in targets):
        total, (gradient,) = through_energies(loss, model.potential, sampled.positions,
                                              sampled.boxes, [parameters.scaled])
    else:  # reported only: the energies' values, no gradient
        with torch.no_grad():
            energies = torch.stack([model.potential(x, box) for x, box in
                                    zip(sampled.positions, sampled.boxes, strict=True)])
            total, gradient = loss(energies), torch.zeros_like(parameters.scaled)
    terms, energies = report["terms"], report["energies"]
    # Each estimator on each block (a fluctuation needs two frames a block at least); the
    # whole as the one block with fewer frames (no standard error then).
    n = min(n_blocks, sampled.n_frames // 2)
    blocks = {t.label: [float(terms[t.label].value)] for t in targets}
    if n >= 2:
        q = None if charges is None else charges.detach()
        with torch.no_grad():
            for t in targets:
                blocks[t.label] = [float(ensemble_average(t.observable, sampled.part(b),
                                                          energies[b], q))
                                   for b in block_slices(sampled.n_frames, n)]
    return WindowResult(float(total.detach()), gradient.detach().clone(),
                        {k: r.contribution for k, r in terms.items()},
                        {k: float(r.value) for k, r in terms.items()},
                        {"forward_s": time.perf_counter() - t0, "backward_s": 0.0,
                         "reconstruction_error": 0.0}, blocks)


TIME_DEPENDENT = ("diffusion",)
"""Window observables of the whole window's dynamics (one block per window)."""

BLOCKS_PER_WINDOW = 5
"""Contiguous blocks of a window's snapshots on which each observable is evaluated for its
standard error (fewer when the window has fewer snapshots)."""


def block_observables(objective: Objective, traj: Trajectory, potential,
                      n_blocks: int = BLOCKS_PER_WINDOW) -> dict[str, list]:
    """Each target's observable on contiguous blocks of a window's snapshots.

    Parameters
    ----------
    objective : Objective
    traj : Trajectory
        The window's S snapshots.
    potential : TorchPotential
    n_blocks : int
        Blocks (``min(n_blocks, S)``; the whole window is one block when S = 1).

    Returns
    -------
    dict of str to list
        For each target label, one value per block (a float, or g(r) as a list), in the
        observable's units; numbers for reports, not differentiable. A time-dependent
        observable (``diffusion``: its lags span the window) has one value per window, the
        whole window's.
    """
    n = min(n_blocks, traj.n_frames)
    whole = [slice(0, traj.n_frames)]
    parts = whole if n < 2 else block_slices(traj.n_frames, n)
    values: dict[str, list] = {t.label: [] for t in objective.targets}
    for t in objective.targets:
        for part in whole if t.observable in TIME_DEPENDENT else parts:
            frames = dataclasses.replace(traj, positions=traj.positions[part].detach(),
                                         velocities=traj.velocities[part].detach(),
                                         steps=traj.steps[part])
            value = objective.observable(t, frames, potential).detach()
            values[t.label].append(value.tolist() if value.ndim else float(value))
    return values


def pooled_stderr(blocks: Sequence) -> float | list | None:
    """Standard error of an observable from its block values pooled over an epoch's windows
    (:func:`~openmm_reversible.observables.blocking.block_average` with one block per value),
    or None with fewer than two blocks."""
    if len(blocks) < 2:
        return None
    stderr = block_average(np.asarray(blocks, dtype=float), n_blocks=len(blocks))[1]
    return stderr.tolist() if stderr.ndim else float(stderr)


@dataclass(frozen=True)
class ReplicaPiece:
    """The inputs of one replica's OpenMM sampling of one state point in an epoch
    (``schedule.replicas``).

    Attributes
    ----------
    epoch : int
        1-based, for messages.
    index : int
        0-based replica index.
    scaled : torch.Tensor, shape (P,)
        Scaled trainable parameter values (value / start value).
    state : SampledState
        Where the sampling starts: the state this replica of this state point ended the
        previous epoch in (the state point's start state in the first epoch).
    seed : int
        Seed of the replica's OpenMM noise.
    frames_at : tuple of int
        OpenMM steps at which a trajectory frame is kept (replica 1 only).
    state_point : int
        Which (system, state point) of the config (its position in
        :meth:`~openmm_reversible.config.FitConfig.state_points`) is sampled.
    """

    epoch: int
    index: int
    scaled: torch.Tensor
    state: SampledState
    seed: int
    frames_at: tuple[int, ...] = ()
    state_point: int = 0


@dataclass(frozen=True)
class SampledReplica:
    """What a replica's OpenMM sampling gives.

    Attributes
    ----------
    starts : list of SampledState
        The start state of each window, in window order.
    frames : list of SampledState
        The trajectory frames asked for by ``frames_at``.
    ensemble : list of SampledState
        The frames of the ensemble targets (every ``schedule.ensemble_every`` steps of the
        bulk sampling and each window's start; empty when the state point has none).
    end : SampledState
        The state the sampling ended in.
    state : dict of str to float
        That state as StateDataReporter values (:func:`~openmm_reversible.outputs.state_values`).
    timings : dict of str to float
        ``push_s``, ``equilibrate_s`` and ``bulk_s`` (s).
    """

    starts: list
    frames: list
    ensemble: list
    end: SampledState
    state: dict
    timings: dict


def sample_replica(model: WindowModel, sampler: Sampler, piece: ReplicaPiece) -> SampledReplica:
    """Push the piece's parameter values into ``sampler``, restart it from the piece's state
    with its seed, equilibrate, then sample ``bulk_steps`` before each window, keeping each
    window's start state and the frames of the ensemble targets (OpenMM steps of
    ``model.config.schedule``).

    Raises
    ------
    SimulationExploded
        NaN or runaway temperature in OpenMM (the epoch is retried with new noise).
    """
    sched = model.config.schedule
    frames_at = set(piece.frames_at)
    ensemble_targets = bool(model.objective.ensemble_targets)
    t = time.perf_counter()
    with torch.no_grad():
        model.parameters.scaled.copy_(piece.scaled)
    sampler.update_parameters(model.parameters.create_system())
    sampler.restart(piece.state, piece.seed)
    timings = {"push_s": time.perf_counter() - t}
    t = time.perf_counter()
    frames = sampler.step(sched.equilibration_steps, frames_at)
    timings["equilibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    starts, ensemble = [], []
    for _ in range(sched.windows):
        start = sampler.current_step()
        every = (set(range(start + sched.ensemble_every, start + sched.bulk_steps,
                           sched.ensemble_every)) if ensemble_targets else set())
        sampled = sampler.step(sched.bulk_steps, frames_at | every)
        frames += [f for f in sampled if f.step in frames_at]
        starts.append(sampler.state())
        if ensemble_targets:
            ensemble += [f for f in sampled if f.step in every] + [starts[-1]]
    timings["bulk_s"] = time.perf_counter() - t
    return SampledReplica(starts, frames, ensemble, sampler.state(), state_values(sampler),
                          timings)


_MODELS: dict[str, WindowModel] = {}
"""This process's window models, keyed by their config (a worker builds each once)."""
_SAMPLERS: dict[str, Sampler] = {}
"""This process's OpenMM samplers for replica pieces, keyed like :data:`_MODELS`."""


def _model_of(config: FitConfig, state_point: int = 0) -> tuple[str, WindowModel]:
    """This process's model of the state point of ``config`` (built on first use), and its
    cache key."""
    config = config.state_points()[state_point].config
    key = json.dumps(_comparable(to_dict(config)), sort_keys=True, default=str)
    if key not in _MODELS:
        _MODELS[key] = window_model(config)
    return key, _MODELS[key]


def remote_window(config: FitConfig, piece: WindowPiece) -> WindowResult:
    """:func:`compute_window` with this process's model of the piece's state point of
    ``config`` (built on first use)."""
    return compute_window(_model_of(config, piece.state_point)[1], piece)


def remote_replica(config: FitConfig, piece: ReplicaPiece) -> SampledReplica:
    """:func:`sample_replica` with this process's model and OpenMM sampler of the piece's
    state point of ``config`` (built on first use)."""
    key, model = _model_of(config, piece.state_point)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = Sampler.from_config(model.config, model.parameters.system,
                                             model.positions, model.topology)
    return sample_replica(model, _SAMPLERS[key], piece)


def _window_of(legs: Sequence[Leg], piece: WindowPiece) -> WindowResult:
    """:func:`compute_window` with the model of the piece's state point."""
    return compute_window(legs[piece.state_point].model, piece)


def _replica_of(legs: Sequence[Leg], piece: ReplicaPiece) -> SampledReplica:
    """:func:`sample_replica` with the model and OpenMM sampler of the piece's state point."""
    leg = legs[piece.state_point]
    return sample_replica(leg.model, leg.sampler, piece)



GAS_STREAM = 7
"""Seed stream of the simulated gas phases (after the epoch and attempt; a gas system's state
points: before their position)."""
GAS_ENERGY = "Gas energy (kJ/mole)"
GAS_STDERR = "Gas energy stderr (kJ/mole)"
"""``state_data.csv`` columns of a gas system's rows: ⟨E_gas⟩ and its standard error."""


def _stream(seed: int, *stream: int) -> int:
    """``seed`` followed down the counter streams ``stream`` (:func:`counter_seed`)."""
    for s in stream:
        seed = counter_seed(seed, s)
    return seed


@dataclass
class GasPoint:
    """One state point of a gas system (``[[systems]]`` of ``kind = "gas"``): its molecule in
    OpenMM, sampled once per epoch for the ΔHvap targets that name the system.

    Attributes
    ----------
    system : GasSystemConfig
    temperature : float, K
    seed : int
        Its seed stream; an epoch's sampling takes ``(seed, epoch, attempt)``.
    phase : GasPhase
    state : SampledState
        Where the next epoch's sampling starts (every attempt of it: a failed attempt leaves
        the molecule where it failed).
    """

    system: GasSystemConfig
    temperature: float
    seed: int
    phase: GasPhase
    state: SampledState

    @property
    def label(self) -> str:
        """``"vapour 298.15 K"``, as a liquid's state point is labelled."""
        return f"{self.system.name} {self.temperature:g} K"


@dataclass
class Leg:
    """One (system, state point) of a fit: its model, its OpenMM sampler, and the state its
    sampling continues from.

    Attributes
    ----------
    point : StatePoint
        The system and state point, with its single-system config.
    model : WindowModel
        Structure, parameters, potential and objective built from ``point.config``.
    sampler : Sampler
        OpenMM at the state point (NPT where it has a pressure).
    state : SampledState or None
        Where the next epoch's sampling of replica 1 starts (None before the start state is
        made).
    replica_states : list of SampledState
        Where the next epoch's sampling of replicas 2, 3, ... starts (``schedule.replicas``
        > 1): the states they ended the last epoch in; empty before the first epoch, when
        every replica starts from ``state``.
    equilibration : dict or None
        How the equilibration before the first epoch went
        (:meth:`~openmm_reversible.sampler.Sampler.equilibrate`); None until it ran.
    """

    point: StatePoint
    model: WindowModel
    sampler: Sampler
    state: SampledState | None = None
    replica_states: list[SampledState] = field(default_factory=list)
    equilibration: dict | None = None

    def start(self, replica: int) -> SampledState:
        """Where the next epoch's sampling of ``replica`` (0-based) starts."""
        return self.replica_states[replica - 1] if replica and self.replica_states \
            else self.state

    @property
    def directory(self) -> str:
        """Subdirectory of ``trajectory/`` for this state point's frames ("" for a config
        without ``[[systems]]``)."""
        return self.point.label.replace(" ", "_")


@contextlib.contextmanager
def _naming(point: StatePoint):
    """Prefix the state point's label to an InputError raised inside (configs with
    ``[[systems]]``; a config without them has one state point, named nowhere)."""
    try:
        yield
    except InputError as exc:
        if not point.label:
            raise
        raise InputError(f"{point.label}: {exc}") from None


class Trainer:
    """Fit the tagged parameters of a force field to targets (see the module docstring).

    Every (system, state point) of the config (:meth:`FitConfig.state_points`) is a
    :class:`Leg`, sampled in OpenMM on its own; an epoch runs the windows of every leg and
    takes one optimiser step on the sum of their losses. The attributes ``model``,
    ``parameters``, ``potential``, ``objective``, ``topology``, ``sampler`` and ``state`` are
    those of the first leg (the only one of a config without ``[[systems]]``); ``parameters``
    is the one set the optimiser moves.

    Parameters
    ----------
    config : FitConfig
        A validated configuration (:func:`~openmm_reversible.config.load_config`).
    output : path
        Output directory; created if missing.
    resume : bool
        Continue from ``output/checkpoint.pt``. Without it, an output directory that already
        holds a checkpoint is refused (so a finished run is never silently overwritten).
    progress : bool
        Show progress bars (epochs and windows).
    engine : Engine, optional
        Where the windows run; by default the one ``config.parallel`` asks for
        (:func:`~openmm_reversible.parallel.open_engine`), opened at the first epoch and
        closed when :meth:`run` returns. An engine given here is left open.

    Notes
    -----
    :meth:`run` and :meth:`run_epoch` (epochs, retries, optimiser step, checkpoint, log and
    plot) are shared with the trainer of crystal systems,
    :class:`~openmm_reversible.crystal.CrystalTrainer`, which overrides the hooks they call
    (``_attempt``, ``_equilibrate``, ``_parameter_state``, ``_constrain_parameters``,
    ``_checkpoint``, ``_save``, ``panels``, ``_result``, ...).
    """

    def __init__(self, config: FitConfig, output: str | os.PathLike, resume: bool = False,
                 progress: bool = True, engine: Engine | None = None):
        self.config = config
        self.engine = engine
        self._owns_engine = engine is None
        self.output = Path(output)
        self.progress = progress
        if config.crystals:
            raise InputError("the config's systems are crystals (kind = \"crystal\"): train it "
                             "with openmm_reversible.crystal.CrystalTrainer (the fit command "
                             "does)")
        checkpoint = self._open_checkpoint(resume)
        self._gas_phases: dict[tuple[int, str], GasPhase] = {}
        self._gas_starts: dict[tuple[int, str], SampledState] = {}

        self.legs = [self._leg(point) for point in config.state_points()]
        first = self.legs[0]
        self.model = first.model
        self.topology = first.model.topology
        self._start_positions = first.model.positions
        self.parameters = first.model.parameters
        for leg in self.legs[1:]:
            names = leg.model.parameters.trainable_keys
            if names != self.parameters.trainable_keys:
                raise InputError(
                    f"{leg.point.label}: the force field gives it the trainable parameters "
                    f"{', '.join(names)}, but {first.point.label} "
                    f"{', '.join(self.parameters.trainable_keys)}; the systems of one fit "
                    "must share one set of tagged parameters (fit them separately)")
        self.regularization = Regularization(self.parameters, config.parameters)
        self.gas_points = [self._gas_point(gas, temperature, len(self.legs) + j)
                           for j, (gas, temperature) in enumerate(
                               (g, t) for g in config.gases for t in g.temperature)]
        self.potential = first.model.potential
        self.objective = first.model.objective
        self.sampler = first.sampler
        sched = config.schedule
        optimizer_cls = torch.optim.Adam if sched.optimizer == "adam" else torch.optim.SGD
        self.optimizer = optimizer_cls([self.parameters.scaled], lr=sched.learning_rate)
        self._positive = torch.tensor(
            [s.attribute in POSITIVE_ATTRIBUTES and s.start > 0
             for s in self.parameters.sites if s.trainable], dtype=torch.bool)

        self._begin(checkpoint)

    def _begin(self, checkpoint: dict | None) -> None:
        """Epoch 0 with every leg at its initial state, or where ``checkpoint`` left off."""
        if checkpoint is None:
            self.epoch = 0
            self.records: list[dict] = []
            for leg in self.legs:
                leg.state = self._initial_state(leg)
        else:
            self._load_checkpoint(checkpoint)

    @property
    def state(self) -> SampledState:
        """The state the first leg's next epoch starts from."""
        return self.legs[0].state

    @property
    def molecule_groups(self) -> list:
        """Atom indices of each molecule (virtual sites joined to theirs)."""
        return self._molecules

    @property
    def rdf_notes(self) -> dict[str, str]:
        """For each rdf target of every leg (keyed as in the log), how its file is used."""
        return {leg.point.key(label): note for leg in self.legs
                for label, note in leg.model.objective.rdf_notes.items()}

    @property
    def _several(self) -> bool:
        """Whether the config has ``[[systems]]`` (its records, CSV rows, trajectories and
        checkpoint are then per state point, even for one)."""
        return bool(self.config.systems)

    # -- setup and checkpoints ------------------------------------------------------------------

    gas_points: Sequence[GasPoint] = ()
    """Each state point of the config's gas systems (``[[systems]]`` of ``kind = "gas"``),
    systems in order, then their temperatures."""

    CHECKPOINT_ENTRIES: tuple[str, ...] = _CHECKPOINT_ENTRIES
    """The entries :meth:`_checkpoint` writes (a trainer of other legs writes others)."""

    def _open_checkpoint(self, resume: bool) -> dict | None:
        """The checkpoint to resume from (checked against the config), or None for a new fit.

        Raises
        ------
        InputError
            ``resume`` without a checkpoint, a checkpoint of another config, or a new fit
            into a directory that already holds one.
        """
        path = self.output / CHECKPOINT
        if resume:
            if not path.is_file():
                raise InputError(f"--resume: no checkpoint in {self.output}; run without "
                                 f"--resume to start a new fit")
            checkpoint = _read_checkpoint(path, self.CHECKPOINT_ENTRIES)
            self._check_checkpoint(checkpoint)
            return checkpoint
        if path.exists():
            raise InputError(f"{self.output} already holds a fit ({CHECKPOINT}); pass --resume "
                             f"to continue it or choose another --output directory")
        return None

    @staticmethod
    def _leg(point: StatePoint) -> Leg:
        with _naming(point):
            model = window_model(point.config)
            sampler = Sampler.from_config(point.config, model.parameters.system,
                                          model.positions, model.topology)
        return Leg(point, model, sampler)

    def _gas_point(self, gas: GasSystemConfig, temperature: float, index: int) -> GasPoint:
        """State point ``temperature`` of a gas system, its molecule built, minimised and
        given velocities (``index``: its position after the legs, for its seed).

        Raises
        ------
        InputError
            A ``structure.pdb`` that is not one molecule, or a molecule without the
            liquid's trainable sites, named by the gas system.
        """
        config, sim = self.config, self.config.simulation
        where = f"{gas.name} (kind = \"gas\")"
        try:
            with structure_errors(gas.structure.source, config.forcefield.files):
                if gas.structure.molecule_of is not None:
                    model = next(leg.model for leg in self.legs
                                 if leg.point.system == gas.structure.molecule_of)
                    topology, positions = first_molecule(model.topology, model.positions,
                                                         model.parameters.system)
                    kwargs = model.parameters.create_system_kwargs
                else:
                    topology, positions = pdb_molecule(gas.structure.pdb)
                    kwargs = create_system_kwargs(dataclasses.replace(config, system=gas.system))
                phase = GasPhase(config.forcefield.files, topology, positions, kwargs,
                                 self.parameters.trainable_keys, temperature, sim.friction,
                                 sim.timestep, sim.platform, deterministic=sim.deterministic,
                                 molecule=f"the gas molecule ({gas.structure.source})")
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        count = len(molecules(topology, phase.parameters.system))
        if count != 1:
            raise InputError(f"{where}: structure.pdb {gas.structure.pdb} holds {count} "
                             "molecules; a gas system is one molecule: give a PDB file of one, "
                             "or structure.molecule_of = \"<liquid system>\" for the first "
                             "molecule of a liquid")
        return GasPoint(gas, temperature, _stream(sim.seed, GAS_STREAM, index), phase,
                        phase.state)

    @staticmethod
    def _initial_state(leg: Leg) -> SampledState:
        """Minimised start with Maxwell–Boltzmann velocities."""
        leg.sampler.minimize()
        leg.sampler.set_velocities(leg.point.config.simulation.seed)
        return leg.sampler.state()

    def _equilibrate(self) -> dict[str, dict]:
        """Before the first epoch (``[equilibration] max_steps`` > 0): run each leg at its
        state point until its density (NPT) or energy (NVT) stops drifting; what each took,
        keyed by the state point's label ("system" without ``[[systems]]``).

        Raises
        ------
        TrainingFailed
            If a simulation blows up (nothing has been written yet).
        """
        eq = self.config.equilibration
        report = {}
        for leg in self.legs:
            name = leg.point.label or "system"
            if not eq.max_steps or leg.equilibration is not None:
                continue
            leg.sampler.restart(leg.state, self._seed(leg, 0))
            try:
                info = leg.sampler.equilibrate(eq.max_steps, eq.block_steps, eq.sample_every,
                                               eq.min_blocks, eq.threshold)
            except SimulationExploded as exc:
                raise TrainingFailed(f"{name}: equilibration before the first epoch: {exc}; "
                                     "nothing was written") from None
            leg.equilibration = info
            leg.state = leg.sampler.state()
            report[name] = info
            if self.progress:
                verdict = ("stopped drifting" if info["converged"] else
                           f"still drifting at equilibration.max_steps = {eq.max_steps}")
                slope = ("" if info["slope_per_block"] is None else
                         f" (slope {info['slope_per_block']:.3g} ± {info['slope_stderr']:.2g} "
                         f"{info['unit']} per block)")
                tqdm.write(f"{name}: {info['observable']} {verdict} after {info['steps']} "
                           f"steps, {info['seconds']:.1f} s{slope}")
        return report

    def _check_checkpoint(self, checkpoint: dict) -> None:
        saved = _comparable(with_defaults(checkpoint["config"]))
        current = _comparable(to_dict(self.config))
        changed = sorted(_changed_keys(saved, current))
        # Only the number of epochs and the output settings may change between runs.
        changed = [k for k in changed if k != "schedule.epochs" and not k.startswith("output")]
        if changed:
            raise InputError(f"the config differs from the checkpoint's in {', '.join(changed)}; "
                             f"resume with the original config (only schedule.epochs and "
                             f"[output] may change) or start a new fit in another directory")

    def _load_checkpoint(self, checkpoint: dict) -> None:
        path = self.output / CHECKPOINT
        _restore_parameters(self.parameters, checkpoint, path)
        states = checkpoint["state"] if isinstance(checkpoint["state"], list) \
            else [checkpoint["state"]]
        if len(states) != len(self.legs):
            raise InputError(f"{path} holds {len(states)} state points but the config has "
                             f"{len(self.legs)}; pass the config the fit used, or start a new "
                             "fit")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch = int(checkpoint["epoch"])
        self.records = list(checkpoint["records"])
        # Checkpoints written before replicas kept their own chains have no replica_states:
        # their replicas 2, 3, ... then start from replica 1's state, as they did then.
        others = checkpoint.get("replica_states", [[] for _ in self.legs])
        for leg, s, own in zip(self.legs, states, others, strict=True):
            leg.state = _state_from(s)
            leg.replica_states = [_state_from(r) for r in own]
        # The simulated gas molecules continue where they were (absent before they existed).
        self._gas_starts = {(int(k), label): _state_from(entry)
                            for (k, label), entry in checkpoint.get("gas_states", [])}
        saved = dict(checkpoint.get("gas_system_states", []))
        for point in self.gas_points:
            if point.label not in saved:
                raise InputError(f"{path} holds no state of the gas system's {point.label}; "
                                 "pass the config the fit used, or start a new fit")
            point.state = _state_from(saved[point.label])

    def _checkpoint(self) -> dict:
        """The checkpoint's entries; ``state`` is one state (a dict) for a config without
        ``[[systems]]``, else a list with one per state point; ``replica_states``, with
        ``schedule.replicas`` > 1, holds the end states of replicas 2, 3, ... of each state
        point (a list per state point); ``gas_states``, with ``gas = "simulate"`` targets,
        ``((state point, label), state)`` of each simulated gas molecule;
        ``gas_system_states``, with gas systems, ``(label, state)`` of each of their state
        points."""
        states = [_state_entry(leg.state) for leg in self.legs]
        replicas = ({"replica_states": [[_state_entry(r) for r in leg.replica_states]
                                        for leg in self.legs]}
                    if self.config.schedule.replicas > 1 else {})
        if self._gas_phases:
            replicas["gas_states"] = [(key, _state_entry(phase.state))
                                      for key, phase in self._gas_phases.items()]
        if self.gas_points:
            replicas["gas_system_states"] = [(point.label, _state_entry(point.state))
                                             for point in self.gas_points]
        return {
            "version": CHECKPOINT_VERSION, "epoch": self.epoch,
            "sites": self.parameters.names,
            "scaled": self.parameters.scaled.detach().clone(),
            "optimizer": self.optimizer.state_dict(),
            "records": self.records,
            "state": states if self._several else states[0],
            "config": self._saved_config(),
            **replicas,
        }

    def _saved_config(self) -> dict:
        """The config as the checkpoint stores it (:meth:`_check_checkpoint` compares it)."""
        return _comparable(to_dict(self.config))

    # -- one epoch ------------------------------------------------------------------------------

    @staticmethod
    def _seed(leg: Leg, *stream: int) -> int:
        return _stream(leg.point.config.simulation.seed, *stream)

    def _replica_seed(self, leg: Leg, epoch: int, attempt: int, replica: int, *stream: int
                      ) -> int:
        """Seeds of ``replica`` (0-based) of ``leg``; replica 0 keeps the streams of a fit
        without replicas, so that its windows are those of ``replicas = 1``."""
        return self._seed(leg, epoch, attempt, *(() if replica == 0 else (0, replica)),
                          *stream)

    def _frame_steps(self, leg: Leg) -> set[int]:
        """OpenMM steps of the current epoch at which a trajectory frame of ``leg`` is saved:
        the configured number, evenly spaced over the epoch's sampling, the last at its end."""
        sched, out = self.config.schedule, self.config.output
        steps = sched.equilibration_steps + sched.windows * sched.bulk_steps
        if out.trajectory == "none" or steps == 0:
            return set()
        start = leg.state.step
        n = out.frames_per_epoch
        return {start + round(k * steps / n) for k in range(1, n + 1)} - {start}

    def _attempt(self, attempt: int) -> dict:
        """:meth:`_run_attempt` under one progress bar for all the epoch's pieces (the
        replicas' sampling when ``schedule.replicas`` > 1, then the windows)."""
        sched = self.config.schedule
        legs = sum(1 for leg in self.legs if leg.model.objective.targets)
        total = (len(self.legs) if sched.replicas > 1 else 0) * sched.replicas \
            + legs * sched.replicas * sched.windows
        with PieceProgress(f"epoch {self.epoch + 1}", total, self.progress) as self._bar:
            return self._run_attempt(attempt)

    def _run_attempt(self, attempt: int) -> dict:
        """Sampling, windows and gradient of the current epoch; returns the epoch's record."""
        sched = self.config.schedule
        epoch = self.epoch + 1
        if self.engine is None:  # first, so that a bad scheduler address fails before sampling
            self.engine = open_engine(self.config.parallel)
        scaled = self.parameters.scaled.detach().clone()
        replicas = [ReplicaPiece(epoch, r, scaled, leg.start(r),
                                 self._replica_seed(leg, epoch, attempt, r),
                                 tuple(sorted(self._frame_steps(leg))) if r == 0 else (), k)
                    for k, leg in enumerate(self.legs) for r in range(sched.replicas)]
        timings = {}
        t = time.perf_counter()
        if sched.replicas == 1:  # sampled here: one chain per leg, in leg order
            sampled = [_replica_of(self.legs, piece) for piece in replicas]
        else:  # each replica's sampling is a piece of the engine
            ran = self._run_pieces(
                replicas, functools.partial(_replica_of, self.legs),
                functools.partial(remote_replica, self.config), "replica",
                lambda piece: f"OpenMM sampling of replica {piece.index + 1}"
                              f"{self._of(piece.state_point)}")
            sampled = [done.value for done in ran]
            timings["replicas"] = [{"replica": piece.index + 1, "worker": done.where,
                                    "seconds": done.seconds, **self._label(piece.state_point)}
                                   for piece, done in zip(replicas, ran, strict=True)]
        timings["sampling_s"] = time.perf_counter() - t
        for key in ("push_s", "equilibrate_s", "bulk_s"):
            timings[key] = sum(replica.timings[key] for replica in sampled)
        timings.update(forward_s=0.0, backward_s=0.0)
        t = time.perf_counter()
        gas, gas_systems = self._sample_gas(scaled, epoch, attempt)
        timings["gas_s"] = time.perf_counter() - t
        gas_values = [tuple((label, e.energy) for label, e in g.items()) for g in gas]
        count = sched.windows * sched.replicas
        pieces = [WindowPiece(epoch, w, count, scaled, start,
                              self._replica_seed(self.legs[piece.state_point], epoch, attempt,
                                                 piece.index, w + 1),
                              str(self.output), piece.index, piece.state_point,
                              gas_values[piece.state_point])
                  for piece, replica in zip(replicas, sampled, strict=True)
                  if self.legs[piece.state_point].model.objective.targets
                  for w, start in enumerate(replica.starts)]
        first = [replica for piece, replica in zip(replicas, sampled, strict=True)
                 if piece.index == 0]  # replica 1 of each leg, in leg order
        ensembles = [[] for _ in self.legs]
        for piece, replica in zip(replicas, sampled, strict=True):
            ensembles[piece.state_point] += replica.ensemble
        t = time.perf_counter()
        ran = self._run_windows(pieces) if pieces else []
        timings["windows_s"] = time.perf_counter() - t
        legs = [{"loss": 0.0, "terms": {}, "observables": {}, "blocks": {},
                 "reconstruction_error": 0.0} for _ in self.legs]
        replica_losses = [0.0] * sched.replicas
        grad = torch.zeros_like(self.parameters.scaled)
        timings["windows"] = []
        for piece, done in zip(pieces, ran, strict=True):
            result: WindowResult = done.value
            totals = legs[piece.state_point]
            # The piece order fixes the summation order: the same sums with any layout.
            grad = grad + result.gradient
            for label, sensitivity in result.gas_sensitivity.items():
                # The gas phase's part of the ΔHvap term: d loss/d⟨E_gas⟩ · d⟨E_gas⟩/dθ.
                grad = grad + sensitivity * gas[piece.state_point][label].gradient
            totals["loss"] += result.loss / piece.windows
            replica_losses[piece.replica] += result.loss / sched.windows
            for name, value in result.terms.items():
                totals["terms"][name] = totals["terms"].get(name, 0.0) + value / piece.windows
            for name, value in result.observables.items():
                acc = totals["observables"].get(name)
                part = np.asarray(value, dtype=float) / piece.windows
                totals["observables"][name] = part if acc is None else acc + part
            for name, values in result.blocks.items():
                totals["blocks"].setdefault(name, []).extend(values)
            for key in ("forward_s", "backward_s"):
                timings[key] += result.info[key]
            totals["reconstruction_error"] = max(totals["reconstruction_error"],
                                                 result.info["reconstruction_error"])
            timings["windows"].append({"window": piece.index + 1, "worker": done.where,
                                       "seconds": done.seconds,
                                       **({"replica": piece.replica + 1} if sched.replicas > 1
                                          else {}),
                                       **self._label(piece.state_point)})
        timings["workers"] = by_worker(dict(enumerate(ran)))
        t = time.perf_counter()
        for leg, totals, ensemble in zip(self.legs, legs, ensembles, strict=True):
            if ensemble:  # after the windows, in leg order: a fixed summation order
                with torch.no_grad():
                    leg.model.parameters.scaled.copy_(scaled)
                result = ensemble_terms(leg.model, ensemble)
                grad = grad + result.gradient
                totals["loss"] += result.loss
                totals["terms"].update(result.terms)
                totals["observables"].update(
                    {n: np.asarray(v) for n, v in result.observables.items()})
                totals["blocks"].update(result.blocks)
        timings["ensemble_s"] = time.perf_counter() - t
        self.parameters.scaled.grad = grad
        prior = self.regularization.penalty()
        if prior.requires_grad:
            prior.backward()
        self.regularization.mask(self.parameters.scaled.grad)
        grad = self.parameters.scaled.grad.detach().clone()
        keys = self.parameters.trainable_keys
        record = {
            "epoch": epoch, "loss": sum(t["loss"] for t in legs) + float(prior.detach()),
            "prior_penalty": float(prior.detach()),
            "terms": {leg.point.key(n): v for leg, t in zip(self.legs, legs, strict=True)
                      for n, v in t["terms"].items()},
            "observables": {leg.point.key(n): v.tolist()
                            for leg, t in zip(self.legs, legs, strict=True)
                            for n, v in t["observables"].items()},
            "stderr": {leg.point.key(n): pooled_stderr(b)
                       for leg, t in zip(self.legs, legs, strict=True)
                       for n, b in t["blocks"].items()},
            "parameters": self.parameters.values(),
            "gradient": dict(zip(keys, grad.tolist(), strict=True)),
            "gradient_norm": float(grad.norm()),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "attempts": attempt + 1,
            "reconstruction_error": max(t["reconstruction_error"] for t in legs),
            "rdf_bins": self.rdf_notes,
        }
        if any(gas):
            # Each ΔHvap target's ⟨E_gas⟩ and d⟨E_gas⟩/d(scaled parameters).
            record["gas"] = {leg.point.key(label): {"energy": e.energy, "stderr": e.stderr,
                                                    "frames": e.frames,
                                                    "gradient": dict(zip(
                                                        keys, e.gradient.tolist(),
                                                        strict=True))}
                             for leg, g in zip(self.legs, gas, strict=True)
                             for label, e in g.items()}
        if self._several:
            record["state_points"] = {
                leg.point.label: {"system": leg.point.system,
                                  "temperature": leg.point.temperature,
                                  "pressure": leg.point.pressure, "loss": t["loss"],
                                  "reconstruction_error": t["reconstruction_error"],
                                  "state": replica.state}
                for leg, t, replica in zip(self.legs, legs, first, strict=True)}
            record["state_points"].update({
                point.label: {"system": point.system.name, "kind": "gas",
                              "temperature": point.temperature, "pressure": None,
                              "gas_energy": e.energy, "gas_energy_stderr": e.stderr,
                              "frames": e.frames, "state": state_values(point.phase.sampler)}
                for point, e in zip(self.gas_points, gas_systems, strict=True)})
        else:
            record["state"] = first[0].state
        if sched.replicas > 1:
            record["replica_losses"] = replica_losses
        if sched.gradient_clamp is not None:
            # As in the reversible simulation paper: a rare huge gradient (a close contact in
            # one window) moves each scaled parameter by at most what Adam makes of the clamp.
            limit = sched.gradient_clamp
            record["gradient_clamped"] = [k for k, g in zip(keys, grad.tolist(), strict=True)
                                          if abs(g) > limit]
            self.parameters.scaled.grad.clamp_(-limit, limit)
        ends = [[] for _ in self.legs]  # per leg, its replicas' end states in replica order
        for piece, replica in zip(replicas, sampled, strict=True):
            ends[piece.state_point].append(replica.end)
        if self.gas_points:
            record["gas_end_states"] = [point.phase.state for point in self.gas_points]
        record.update(end_states=ends,
                      frames=[replica.frames for replica in first], timings=timings)
        return record

    def _sample_gas(self, scaled: torch.Tensor, epoch: int, attempt: int
                    ) -> tuple[list[dict[str, GasEstimate]], list[GasEstimate]]:
        """The simulated gas phases sampled by OpenMM at the scaled values ``scaled``, each
        ⟨E_gas⟩ with its standard error and gradient: per leg, by target label, those its
        ΔHvap targets use; and each gas system's state point (:attr:`gas_points`, sampled
        first, once each, whichever targets name it). Each gas molecule continues from its
        last sampling; that of a ``gas = "simulate"`` target is built
        (:func:`~openmm_reversible.gas.first_molecule` of the leg's structure) on first
        use."""
        systems = []
        for point in self.gas_points:
            point.phase.sampler.restart(point.state, 1)  # sample() reseeds it
            systems.append(estimate := point.phase.sample(
                scaled, point.system.frames, point.system.every,
                _stream(point.seed, epoch, attempt)))
            tqdm.write(f"epoch {epoch} of {point.label}: gas energy {estimate.energy:.3f} ± "
                       f"{estimate.stderr:.3f} kJ/mol ({estimate.frames} frames)")
        estimates = []
        for k, leg in enumerate(self.legs):
            found = {}
            sim = leg.point.config.simulation
            for t in leg.model.objective.simulated_gas:
                if t.gas != "simulate":  # a gas system's, at the leg's temperature
                    (found[t.label],) = [
                        e for point, e in zip(self.gas_points, systems, strict=True)
                        if point.system.name == t.gas
                        and math.isclose(point.temperature, sim.temperature)]
                    continue
                phase = self._gas_phases.get((k, t.label))
                if phase is None:
                    model = leg.model
                    topology, positions = first_molecule(model.topology, model.positions,
                                                         model.parameters.system)
                    phase = GasPhase(leg.point.config.forcefield.files, topology, positions,
                                     model.parameters.create_system_kwargs,
                                     model.parameters.trainable_keys, sim.temperature,
                                     sim.friction, sim.timestep, sim.platform,
                                     self._gas_starts.get((k, t.label)),
                                     deterministic=sim.deterministic)
                    self._gas_phases[(k, t.label)] = phase
                found[t.label] = estimate = phase.sample(
                    scaled, t.gas_frames, t.gas_every,
                    self._seed(leg, epoch, attempt, GAS_STREAM))
                tqdm.write(f"epoch {epoch}{self._of(k)}: {t.label} gas energy "
                           f"{estimate.energy:.3f} ± {estimate.stderr:.3f} kJ/mol "
                           f"({estimate.frames} frames)")
            estimates.append(found)
        return estimates, systems

    def _label(self, state_point: int) -> dict:
        """``{"state_point": label}`` for the timings of a config with ``[[systems]]``."""
        return {"state_point": self.legs[state_point].point.label} if self._several else {}

    def _of(self, state_point: int) -> str:
        """`` of <label>`` for messages of a config with ``[[systems]]``, else ""."""
        label = self.legs[state_point].point.label
        return f" of {label}" if label else ""

    def _run_windows(self, pieces: list[WindowPiece]) -> list:
        """Each piece through :func:`compute_window`, here or on the engine's workers; the
        results (:class:`~openmm_reversible.parallel.Ran`) in piece order."""
        several = self.config.schedule.replicas > 1

        def name(piece: WindowPiece) -> str:
            return (f"reversible window {piece.index + 1}"
                    f"{f' of replica {piece.replica + 1}' if several else ''}"
                    f"{self._of(piece.state_point)} (started at OpenMM step {piece.state.step})")

        return self._run_pieces(pieces, functools.partial(_window_of, self.legs),
                                functools.partial(remote_window, self.config), "window", name)

    def _run_pieces(self, pieces: list, local: Callable, remote: Callable, unit: str,
                    name: Callable[[object], str]) -> list:
        """The pieces through ``local`` (on this process's objects) for an in-process engine,
        else ``remote``; the results (:class:`~openmm_reversible.parallel.Ran`) in piece
        order. A piece that fails on every run the engine allows stops the fit with
        :class:`TrainingFailed`, named by ``name(piece)``."""
        function = local if self.engine.local else remote
        started, done = self._bar.phase([f"{unit} {i + 1}" for i in range(len(pieces))])
        try:
            return self.engine.map(
                function, pieces, done=done, started=started,
                passthrough=(_WindowFailed, NonFiniteGradient, SimulationExploded))
        except PieceFailed as exc:
            raise TrainingFailed(
                f"epoch {pieces[exc.index].epoch}: {name(pieces[exc.index])}: {exc}. The "
                f"fit stops; the last good parameters are kept in {self.output}") from exc

    def close(self) -> None:
        """Close the engine the trainer opened (its worker processes); a later epoch opens it
        again."""
        if self._owns_engine and self.engine is not None:
            self.engine.close()
            self.engine = None

    def _describe_parameters(self) -> str:
        return ", ".join(f"{k} = {v:.6g}" for k, v in self.parameters.values().items())

    def run_epoch(self) -> dict:
        """Run one epoch (with retries on failure), step the optimiser and save everything.

        Returns
        -------
        dict
            The epoch's record (also appended to ``log.jsonl``). ``parameters`` are the values
            the epoch was sampled with; ``parameters_after`` those after the optimiser step.
            ``terms``, ``observables`` and ``stderr`` (the standard error of each observable,
            :func:`pooled_stderr`; None with fewer than two blocks) are keyed by target label,
            prefixed by the state point's label (``"liquid 298.15 K 1 bar/density"``) in a
            config with ``[[systems]]``; such a record also has ``state_points`` (each one's
            loss and OpenMM state) instead of ``state``.

        Raises
        ------
        TrainingFailed
            When every allowed attempt failed; the last good parameters stay in place (and in
            the files written by the previous epoch).
        """
        failure = self.config.failure
        start = time.perf_counter()
        equilibration = self._equilibrate() if self.epoch == 0 else {}
        good_parameters = self._parameter_state()
        good_optimizer = copy.deepcopy(self.optimizer.state_dict())
        messages = []
        record = None
        for attempt in range(failure.max_retries + 1):
            try:
                record = self._attempt(attempt)
                break
            except (SimulationExploded, _WindowFailed) as exc:
                message = (f"epoch {self.epoch + 1}, attempt {attempt + 1}: {exc}; parameters: "
                           f"{self._describe_parameters()}")
                messages.append(message)
                tqdm.write(message)
                self._set_parameter_state(good_parameters)
                lr = [g["lr"] for g in self.optimizer.param_groups]
                self.optimizer.load_state_dict(copy.deepcopy(good_optimizer))
                for group, rate in zip(self.optimizer.param_groups, lr, strict=True):
                    group["lr"] = rate * (failure.lr_factor if failure.action == "shrink_lr"
                                          else 1.0)
                if failure.action == "stop":
                    break
        if record is None:
            raise TrainingFailed("; ".join(messages) + ". The last good parameters are kept"
                                 f" in {self.output}.")
        self.optimizer.step()
        for group in self.optimizer.param_groups:
            group["lr"] *= self.config.schedule.lr_decay
        self._constrain_parameters()
        for leg, (state, *others) in zip(self.legs, record.pop("end_states"), strict=True):
            leg.state, leg.replica_states = state, others
        for point, state in zip(self.gas_points, record.pop("gas_end_states", []), strict=True):
            point.state = state
        frames = record.pop("frames")
        if equilibration:
            record["equilibration"] = equilibration
        record["parameters_after"] = self._parameter_values()
        record["failures"] = messages
        record["timings"]["total_s"] = time.perf_counter() - start
        self.epoch += 1
        self.records.append(_jsonable(record))
        self._save(frames)
        return self.records[-1]

    def _parameter_values(self) -> dict[str, float]:
        """The trained values by name, for the records."""
        return self.parameters.values()

    def _parameter_state(self) -> torch.Tensor:
        """A copy of the trained values, to restore after a failed attempt."""
        return self.parameters.scaled.detach().clone()

    def _set_parameter_state(self, state: torch.Tensor) -> None:
        """Restore the values of :meth:`_parameter_state`."""
        with torch.no_grad():
            self.parameters.scaled.copy_(state)

    def _constrain_parameters(self) -> None:
        """After an optimiser step: positive parameters stay positive, bounds hold."""
        with torch.no_grad():
            scaled = self.parameters.scaled
            scaled.copy_(torch.where(self._positive, scaled.clamp(min=MIN_SCALE), scaled))
        self.regularization.project()

    # -- outputs --------------------------------------------------------------------------------

    def _save(self, frames: list[list[SampledState]]) -> None:
        """The epoch's trajectories (on their own, first), then trained XML, checkpoint, log,
        CSV and plot: all of these written, or none."""
        self.output.mkdir(parents=True, exist_ok=True)
        fmt = self.config.output.trajectory
        for leg, leg_frames in zip(self.legs, frames, strict=True):
            if leg_frames:
                write_topology(self.output, leg.model.topology, leg.model.positions,
                               leg.directory)
                write_trajectory(trajectory_path(self.output, self.epoch, fmt, leg.directory),
                                 leg_frames, leg.model.topology, fmt,
                                 self.config.simulation.timestep)
        atomic_write_all([
            *xml_writes(self.parameters, self.output),
            (self.output / CHECKPOINT, lambda tmp: torch.save(self._checkpoint(), tmp)),
            (self.output / LOG, text_writer("".join(json.dumps(r) + "\n"
                                                    for r in self.records))),
            (self.output / STATE_DATA, text_writer(self._state_data())),
            (self.output / PLOT, lambda tmp: plot_training(self.records, self.panels(), tmp))])

    def _state_data(self) -> str:
        """``state_data.csv``: one row per epoch, or per epoch and state point with
        ``[[systems]]`` (:func:`~openmm_reversible.outputs.state_data_csv`)."""
        if not self._several:
            return state_data_csv(self.records, self.config.targets)
        rows, targets = [], {}
        for leg in self.legs:
            for t in leg.point.config.targets:
                targets.setdefault(t.label, t)
        for record in self.records:
            for leg in self.legs:
                label = leg.point.label
                part = record["state_points"][label]
                prefix = f"{label}/"
                rows.append({"epoch": record["epoch"], "state_point": label,
                             "loss": part["loss"], "state": part["state"],
                             **{key: {k[len(prefix):]: v for k, v in record[key].items()
                                      if k.startswith(prefix)}
                                for key in ("terms", "observables")}})
            for point in self.gas_points:  # no loss of their own: their energy and its error
                part = record["state_points"][point.label]
                rows.append({"epoch": record["epoch"], "state_point": point.label,
                             "loss": None, "state": part["state"], "terms": {},
                             "observables": {}, "columns": {
                                 GAS_ENERGY: part["gas_energy"],
                                 GAS_STDERR: part["gas_energy_stderr"]}})
        extra = (GAS_ENERGY, GAS_STDERR) if self.gas_points else ()
        return state_data_csv(rows, list(targets.values()), state_points=True, extra=extra)

    def panels(self) -> list[Panel]:
        """What :func:`plot_training` draws: each target of each leg, keyed as in the log."""
        return [Panel(leg.point.key(t.label), t, leg.model.objective.rdf_setup.get(t.label))
                for leg in self.legs
                for t in leg.model.objective.targets + leg.model.objective.ensemble_targets]

    def run(self) -> TrainResult:
        """Run the remaining epochs of the schedule.

        Returns
        -------
        TrainResult
        """
        total = self.config.schedule.epochs
        bar = tqdm(total=total, initial=self.epoch, desc="epochs", unit="epoch",
                   disable=not self.progress or None)
        try:
            with bar:
                while self.epoch < total:
                    record = self.run_epoch()
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                    bar.update(1)
        finally:
            self.close()
        return self._result()

    def _result(self) -> TrainResult:
        """What :meth:`run` returns."""
        return TrainResult(records=self.records, parameters=self.parameters.values(),
                           files={"forcefield": [self.output / Path(f).name for f in
                                                 (self.parameters.files[i] for i in
                                                  self.parameters.site_files())],
                                  "log": self.output / LOG,
                                  "state_data": self.output / STATE_DATA,
                                  "checkpoint": self.output / CHECKPOINT,
                                  "plot": self.output / PLOT})


def _state_entry(state: SampledState) -> dict:
    """A sampled state as checkpoint entries (tensors)."""
    return {"positions": torch.from_numpy(state.positions),
            "velocities": torch.from_numpy(state.velocities),
            "box": None if state.box is None else torch.from_numpy(state.box),
            "step": state.step}


def _state_from(entry: dict) -> SampledState:
    """The sampled state of a checkpoint entry (:func:`_state_entry`)."""
    return SampledState(positions=entry["positions"].numpy(),
                        velocities=entry["velocities"].numpy(),
                        box=None if entry["box"] is None else entry["box"].numpy(),
                        step=int(entry["step"]))


def _comparable(config: dict) -> dict:
    """The config as checkpoint-storable plain data, without its source path and where the
    windows run (neither changes the results)."""
    return {k: v for k, v in config.items() if k not in ("path", "parallel")}


def _changed_keys(old, new, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        out: set[str] = set()
        for k in keys:
            out |= _changed_keys(old.get(k), new.get(k), f"{prefix}{k}." if prefix or k
                                 else "")
        return out
    return set() if old == new else {prefix.rstrip(".")}


def fit(config: FitConfig, output: str | os.PathLike, resume: bool = False,
        progress: bool = True, engine: Engine | None = None) -> TrainResult:
    """Run a whole fit: :class:`Trainer` ``(config, output, resume, progress, engine).run()``."""
    return Trainer(config, output, resume=resume, progress=progress, engine=engine).run()


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One target's panel of :func:`plot_training`.

    Attributes
    ----------
    key : str
        Its key in the records (the target label, prefixed by the state point's with
        ``[[systems]]``).
    target : TargetConfig
    rdf : dict or None
        For an rdf target, its :attr:`Objective.rdf_setup` entry (bins ``r`` and ``target``).
    """

    key: str
    target: object
    rdf: dict | None = None


def _errors(records: list[dict], key: str, size: int | None = None) -> np.ndarray:
    """The standard error of ``key`` in each record (NaN where none was estimated); with
    ``size``, shape (records, size) for an observable of ``size`` components."""
    values = [np.nan if r.get("stderr", {}).get(key) is None else r["stderr"][key]
              for r in records]
    if size is None:
        return np.array(values, dtype=float)
    return np.array([np.broadcast_to(np.asarray(v, dtype=float), (size,)) for v in values])


def plot_training(records: list[dict], panels: Sequence[Panel], path: str | os.PathLike
                  ) -> None:
    """Loss per epoch and each observable against its target, as one PNG.

    RDF targets are overlaid (target, first epoch, last epoch with a band of ± its standard
    error); scalar observables are drawn per epoch with error bars of ± their standard error
    and the target as a horizontal line.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 1 + len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    axes = axes.ravel()
    epochs = [r["epoch"] for r in records]
    ax = axes[0]
    ax.plot(epochs, [r["loss"] for r in records], "k-o", ms=3, label="total")
    for panel in panels:
        if panel.target.weight > 0:
            ax.plot(epochs, [r["terms"].get(panel.key) for r in records], "-", lw=1,
                    label=panel.key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if all(r["loss"] and r["loss"] > 0 for r in records):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    for ax, panel in zip(axes[1:], panels, strict=False):
        t = panel.target
        values = [r["observables"].get(panel.key) for r in records]
        if t.observable == "rdf":
            errors = _errors(records, panel.key)
            setup = panel.rdf
            ax.plot(setup["r"], setup["target"].numpy(), "k-", lw=1.5, label="target")
            ax.plot(setup["r"], values[0], "C0--", lw=1, label=f"epoch {epochs[0]}")
            last = np.asarray(values[-1], dtype=float)
            if len(values) > 1:
                ax.plot(setup["r"], last, "C3-", lw=1, label=f"epoch {epochs[-1]}")
            band = np.broadcast_to(errors[-1], last.shape)
            ax.fill_between(setup["r"], last - band, last + band, color="C3", alpha=0.3, lw=0,
                            label="± stderr")
            ax.set_xlabel("r (nm)")
            ax.set_ylabel(f"g(r) {'–'.join(t.atoms)}")
        else:
            values = np.asarray(values, dtype=float)
            columns = values.reshape(len(values), -1).T
            spreads = np.broadcast_to(_errors(records, panel.key, columns.shape[0]).T,
                                      columns.shape)
            for k, (column, spread) in enumerate(zip(columns, spreads, strict=True)):
                ax.errorbar(epochs, column, yerr=spread, fmt=f"C{k}-o", ms=3, capsize=3,
                            label="simulated ± stderr" if len(columns) == 1 else
                            f"component {k + 1}")
            ax.axhline(t.value, color="k", lw=1, label="target")
            ax.set_xlabel("epoch")
            units = getattr(t, "units", None) or SCALAR_UNITS[t.observable]
            ax.set_ylabel(f"{t.observable} ({units})")
        ax.set_title(panel.key, fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
