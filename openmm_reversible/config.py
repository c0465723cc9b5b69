"""The fitting configuration: a TOML file read into frozen dataclasses, checked before any work.

A config file has one table per concern::

    [forcefield]   files = ["water.xml"]           ForceField XML, tagged with parameterize
    [structure]    water_box = 216 | pdb = "x.pdb"  what to simulate (Modeller builds boxes)
    [system]       nonbonded_method, cutoff, ...   arguments of ForceField.createSystem
    [simulation]   temperature, friction, timestep, pressure, platform, seed, deterministic
    [schedule]     epochs, equilibration_steps, bulk_steps, windows, window_steps, optimiser
    [equilibration] before the first epoch: max_steps, the drift test's blocks and threshold
    [failure]      what to do when a simulation blows up (retries, new noise, smaller step)
    [output]       trajectory format and frames per epoch (besides XML, log, CSV, checkpoint)
    [parallel]     workers, scheduler, threads_per_worker, cluster (local, slurm, pbs):
                   where the pieces of an epoch run
    [[targets]]    one table per observable with its target and weight
    [[systems]]    instead of [structure], [system] and [[targets]]: several systems, each
                   with name, temperature = [...] and pressure = [...] (its state points),
                   [systems.structure], [systems.system] and [[systems.targets]]
    [[systems]] kind = "crystal": a crystal ([systems.crystal]: lattice, n_cells,
                   lattice_constant, element, mass) and its elastic targets (stress, C11,
                   C12, C44 in [[systems.targets]]), fitted with the machine-learning model
                   of [model] and [prior] instead of a ForceField; [evaluation] is a long
                   plain run of the trained model after the last epoch
    [[systems]] kind = "gas": one molecule in vacuum (NoCutoff, no box, NVT), name,
                   temperature = [...], frames, every and [systems.structure] with pdb (a
                   single molecule) or molecule_of (a liquid system's first molecule); a
                   liquid's enthalpy_of_vaporization target takes its ⟨E_gas⟩ with
                   gas = "<its name>"

Every key is checked: an unknown or misspelled key, a value of the wrong type or an impossible
value (a negative time step, a cutoff larger than half the box, a missing target file) raises
:class:`~openmm_reversible.errors.InputError` naming the key (``schedule.epocs: unknown key; did
you mean 'epochs'?``), so a bad config fails before anything is simulated or written.

Relative paths are resolved against the directory of the config file. Units are OpenMM's MD
units (nm, ps, K, kJ/mol) except where a key says otherwise (pressure in bar, density in
g/cm³, diffusion coefficient in nm²/ps, viscosity in Pa·s, κ_T in 1/bar, α in 1/K, C_p in
J/(mol K): :data:`SCALAR_UNITS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from openmm import app

from .errors import InputError
from .integrators.noise import counter_seed
from .losses import KINDS
from .methods import CONSTRAINTS, NONBONDED_METHODS
from .ml import BehlerParrinello, SchNet, StillingerWeber
from .observables.ensemble import NPT_OBSERVABLES
from .priors import ParameterRule
from .target_files import R_UNITS, RdfGrid, rdf_bins, read_rdf

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PLATFORMS = ("auto", "Reference", "CPU", "CUDA", "OpenCL", "HIP")
DETERMINISTIC_PLATFORMS = ("auto", "CPU", "Reference")
"""Platforms ``simulation.deterministic = true`` accepts (``auto`` then means CPU; the Context
settings and the measurements behind them: :func:`openmm_reversible.sampler.platform_properties`).
GPU platforms are not accepted: their repeatability has not been checked."""
OPTIMIZERS = ("adam", "sgd")
FAILURE_ACTIONS = ("renoise", "shrink_lr", "stop")
TRAJECTORY_FORMATS = ("dcd", "xtc", "none")
OBSERVABLES = ("rdf", "enthalpy_of_vaporization", "density", "pressure", "diffusion",
               "dielectric", "thermal_expansion", "compressibility", "heat_capacity")
SCALAR_UNITS = {"enthalpy_of_vaporization": "kJ/mol", "density": "g/cm^3", "pressure": "bar",
                "diffusion": "nm^2/ps", "dielectric": "1", "thermal_expansion": "1/K",
                "compressibility": "1/bar", "heat_capacity": "J/(mol K)"}
"""Units of the ``value`` of each scalar target."""
DEFAULT_TOLERANCES = {"enthalpy_of_vaporization": 1.0, "density": 0.01, "pressure": 100.0,
                      "diffusion": 1e-4, "dielectric": 2.0, "thermal_expansion": 1e-5,
                      "compressibility": 2e-6, "heat_capacity": 2.0}
"""Error of a scalar target that costs ``weight`` (loss term ``weight·(error/tolerance)²``);
for water at 298 K a few per cent of the value (ε 78, α 2.6e-4 /K, κ_T 4.5e-5 /bar, C_p 75
J/(mol K), D 2.3e-3 nm²/ps)."""
POSITIVE_TARGETS = ("density", "diffusion", "compressibility", "heat_capacity")
"""Scalar targets whose value must be > 0."""


def _positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _one_of(*choices):
    def check(value) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"
    return check


def _spec(default=dataclasses.MISSING, check=None, doc: str = ""):
    """A dataclass field with a value check (returns an error text or None) and a description."""
    kwargs = {"metadata": {"check": check, "doc": doc}}
    if isinstance(default, list | dict):
        kwargs["default_factory"] = lambda: type(default)(default)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass(frozen=True)
class ForceFieldConfig:
    files: list[str] = _spec(doc="ForceField XML files, paths relative to the config or "
                                 "OpenMM's bundled names; at least one tagged with parameterize")


@dataclass(frozen=True)
class StructureConfig:
    pdb: str | None = _spec(None, doc="PDB file with the starting structure")
    water_box: int | None = _spec(None, _positive, "number of water molecules in a cubic box")
    model: str = _spec("tip3p", doc="water model Modeller uses for water_box / padding")
    padding: float | None = _spec(None, _positive, "nm of water added around the PDB solute")
    density: float | None = _spec(None, _positive,
                                  "g/cm^3: scale the periodic box (molecule centres moved "
                                  "with it, molecules kept rigid) to this density before "
                                  "anything is simulated; brings an NVT box to its state "
                                  "point's density")

    @property
    def source(self) -> str:
        """What the structure comes from, for messages: the PDB path or the water box."""
        if self.pdb is None:
            return f"the {self.water_box}-molecule {self.model} water box"
        return self.pdb if self.padding is None else f"{self.pdb} (with {self.padding} nm of water)"


@dataclass(frozen=True)
class SystemConfig:
    nonbonded_method: str = _spec("ReactionField", _one_of(*NONBONDED_METHODS))
    cutoff: float = _spec(1.0, _positive, "nm")
    reaction_field_dielectric: float = _spec(78.3, _positive)
    ewald_error_tolerance: float = _spec(5e-4, _positive)
    rigid_water: bool = _spec(False)
    constraints: str = _spec("none", _one_of(*CONSTRAINTS))
    remove_cm_motion: bool = _spec(False)


@dataclass(frozen=True)
class SimulationConfig:
    temperature: float | None = _spec(None, _positive, "K; required without [[systems]] (each "
                                                       "of those gives its own)")
    friction: float = _spec(1.0, _positive, "1/ps")
    timestep: float = _spec(0.001, _positive, "ps")
    pressure: float | None = _spec(None, _positive, "bar; NPT sampling with a MonteCarloBarostat")
    barostat_interval: int = _spec(25, _positive, "steps between barostat moves")
    platform: str = _spec("auto", _one_of(*PLATFORMS), "auto: CUDA when present, else CPU")
    seed: int = _spec(1, _non_negative)
    deterministic: bool = _spec(False, doc="bit-for-bit repeatable fits and resumes: OpenMM "
                                           "samples on one CPU thread with deterministic "
                                           "forces, or on Reference (DETERMINISTIC_PLATFORMS)")
    fused: bool = _spec(False, doc="reversible windows on the fused CPU kernels (numba) "
                                   "instead of autograd, where a term has one")


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: int = _spec(check=_positive)
    equilibration_steps: int = _spec(1000, _non_negative, "OpenMM steps at the start of an epoch")
    bulk_steps: int = _spec(500, _non_negative, "OpenMM steps before each reversible window")
    windows: int = _spec(1, _positive, "reversible windows per epoch")
    replicas: int = _spec(1, _positive, "independent OpenMM chains per epoch, each with its "
                                        "own seeds and windows; the gradient is the mean "
                                        "over all their windows")
    window_steps: int = _spec(100, _positive, "steps of one reversible window")
    ensemble_every: int = _spec(10, _positive,
                                "steps between the OpenMM frames of the bulk sampling that "
                                "ensemble targets (density) average, besides each window's "
                                "start")
    snapshot_every: int = _spec(10, _positive, "steps between loss snapshots in a window")
    truncation: int | None = _spec(None, _positive, "adjoint truncation, steps")
    resync_every: int | None = _spec(None, _positive, "steps between stored resync states")
    optimizer: str = _spec("adam", _one_of(*OPTIMIZERS))
    learning_rate: float = _spec(0.01, _positive, "step on parameters scaled to their start")
    lr_decay: float = _spec(1.0, lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
                            "learning rate multiplied by this after every epoch")
    gradient_clamp: float | None = _spec(None, _positive,
                                         "each entry of the gradient with respect to the "
                                         "scaled parameters is clamped to [-value, value] "
                                         "before the optimiser step (the log keeps the "
                                         "unclamped gradient); default: no clamp")


@dataclass(frozen=True)
class EquilibrationConfig:
    max_steps: int = _spec(0, _non_negative,
                           "OpenMM steps at most of each system at its state point before the "
                           "first epoch (0: no such stage); it ends earlier, once the density "
                           "(NPT) or potential energy (NVT) has stopped drifting")
    block_steps: int = _spec(500, _positive, "steps of one block of the drift test")
    sample_every: int = _spec(10, _positive, "steps between the samples a block averages")
    min_blocks: int = _spec(10, lambda v: None if v >= 6 else "must be >= 6 (the test fits "
                                                              "the last half, >= 3 blocks)",
                            "blocks before the drift test is first applied (its last half is "
                            "what the test fits)")
    threshold: float = _spec(2.0, _positive,
                             "drifting while |slope| of the last half's block means exceeds "
                             "threshold × its standard error")


@dataclass(frozen=True)
class FailureConfig:
    action: str = _spec("renoise", _one_of(*FAILURE_ACTIONS),
                        "renoise: retry with new noise; shrink_lr: also shrink the step")
    max_retries: int = _spec(2, _non_negative)
    lr_factor: float = _spec(0.5, lambda v: None if 0 < v < 1 else "must be in (0, 1)")
    max_temperature: float | None = _spec(None, _positive,
                                          "K; hotter is an explosion (default 3 × temperature)")


@dataclass(frozen=True)
class OutputConfig:
    trajectory: str = _spec("dcd", _one_of(*TRAJECTORY_FORMATS),
                            "format of the sampled frames, one file per epoch in trajectory/ "
                            "(dcd, xtc, or none)")
    frames_per_epoch: int = _spec(5, _positive, "OpenMM frames saved per epoch, evenly spaced "
                                                "over its equilibration and bulk steps")


def _workers(value) -> str | None:
    if value == "auto":
        return None
    if isinstance(value, str):
        return "must be a number of workers or 'auto'"
    return _positive(value)


CLUSTERS = ("local", "slurm", "pbs")
"""Where ``parallel.workers`` start: this machine, or batch jobs (dask-jobqueue)."""
JOBQUEUE_KEYS = ("queue", "account", "memory", "walltime", "job_extra", "prologue")
"""The ``[parallel]`` keys of a batch-job cluster (``cluster`` = slurm or pbs)."""


@dataclass(frozen=True)
class ParallelConfig:
    workers: int | str | None = _spec(
        None, _workers, "worker processes for the pieces (default: none, they run "
                        "in-process); 'auto': one per CUDA GPU when there are GPUs, else one "
                        "per threads_per_worker cores; with cluster = slurm or pbs, the "
                        "number of worker jobs")
    scheduler: str | None = _spec(None, doc="address of a running Dask scheduler, e.g. "
                                            "tcp://10.0.0.5:8786 (instead of workers)")
    threads_per_worker: int = _spec(1, _positive, "torch threads of each worker (the CPUs "
                                                  "each worker job books)")
    retries: int = _spec(2, _non_negative, "extra runs of a window whose worker died or "
                                           "failed unexpectedly")
    connect_timeout: float = _spec(10.0, _positive, "s to wait for the scheduler (and for "
                                                    "each local worker to start)")
    cluster: str = _spec("local", _one_of(*CLUSTERS),
                         "where the workers start: local processes, or Slurm or PBS jobs "
                         "(dask-jobqueue) with the keys below")
    queue: str | None = _spec(None, doc="slurm/pbs: partition or queue of the worker jobs")
    account: str | None = _spec(None, doc="slurm/pbs: account the worker jobs are billed to")
    memory: str | None = _spec(None, doc="slurm/pbs: memory of each worker job, e.g. '8GB' "
                                         "(required there)")
    walltime: str | None = _spec(None, doc="slurm/pbs: time limit of each worker job, e.g. "
                                           "'04:00:00'")
    job_extra: list[str] = _spec([], doc="slurm/pbs: extra directives of the job script, e.g. "
                                         "['--gres=gpu:1'] (one GPU per worker on Slurm)")
    prologue: list[str] = _spec([], doc="slurm/pbs: shell lines run in each job before its "
                                        "worker, e.g. ['source /path/to/.venv/bin/activate']")


@dataclass(frozen=True)
class TargetConfig:
    observable: str = _spec(check=_one_of(*OBSERVABLES))
    weight: float = _spec(1.0, _non_negative)
    value: float | None = _spec(None, doc="scalar target, units in SCALAR_UNITS")
    file: str | None = _spec(None, doc="rdf: text table, r then g columns (r, g, error, g2, "
                                       "...; see openmm_reversible.target_files)")
    column: int | str = _spec(2, doc="rdf: the g column of file, counted from 1 (r is column "
                                     "1), or its name in the file's header")
    r_unit: str | None = _spec(None, _one_of(*R_UNITS),
                               "rdf: unit of the file's r (nm or angstrom); default nm, and an "
                               "implausibly large r (target_files.IMPLAUSIBLE_NM) is refused "
                               "unless r_unit is given")
    atoms: list[str] = _spec([], doc="rdf: the two atom names of the pair, e.g. ['O', 'H']")
    name: str | None = _spec(None, doc="label in logs and plots")
    r_min: float | None = _spec(None, _non_negative, "rdf: smallest r used, nm")
    r_max: float | None = _spec(None, _positive, "rdf: largest r used, nm")
    bin_width: float | None = _spec(None, _positive,
                                    "rdf: width of the fit's bins, nm (default: the file's own "
                                    "bins if its r is uniform, else its median spacing; g is "
                                    "then interpolated)")
    bandwidth: float | None = _spec(None, _positive,
                                    "rdf: Gaussian smoothing width, nm (default: bin width)")
    loss: str = _spec("l2", _one_of(*KINDS),
                      "rdf: l2 (mean squared difference over the bins) or l1 (mean absolute "
                      "difference, the reversible simulation paper's RDF loss)")
    tolerance: float | None = _spec(None, _positive,
                                    "scalar targets: the error that costs weight × 1 "
                                    "(default DEFAULT_TOLERANCES), units of value")
    gas_energy: float | None = _spec(None, doc="enthalpy_of_vaporization: potential energy "
                                               "of one isolated molecule, kJ/mol (default: "
                                               "k_B T/2 per internal harmonic mode)")
    gas: str | None = _spec(None, doc="enthalpy_of_vaporization: \"simulate\" samples the "
                                      "structure's first molecule alone in vacuum each epoch "
                                      "(plain OpenMM, NoCutoff, NVT at the state point) for "
                                      "⟨E_gas⟩ and its fluctuation gradient, instead of "
                                      "gas_energy or the harmonic estimate; or the name of a "
                                      "[[systems]] table of kind = \"gas\", which gives them at "
                                      "the same temperature")
    gas_frames: int = _spec(1000, _positive, "gas = \"simulate\": frames averaged per epoch")
    gas_every: int = _spec(20, _positive, "gas = \"simulate\": OpenMM steps between frames")
    viscosity: float | None = _spec(None, _positive,
                                    "diffusion: shear viscosity of the model at this state "
                                    "point, Pa·s; adds the Yeh–Hummer finite-size correction "
                                    "k_B T ξ/(6πηL) (cubic box) to D. Without it D is that of "
                                    "the periodic box")
    lag_range: list[float] = _spec([], doc="diffusion: [first, last] lag time of the MSD "
                                           "slope fit, ps, within a window (default: every "
                                           "lag but 0); skip the ballistic first lags")
    temperature: float | None = _spec(None, _positive,
                                      "[[systems.targets]] only: K of the state points this "
                                      "target applies to (default: every state point)")
    pressure: float | None = _spec(None, _positive,
                                   "[[systems.targets]] only: bar of the state points this "
                                   "target applies to (default: every state point)")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.observable == "rdf":
            return "rdf_" + "".join(self.atoms)
        return self.observable

    @property
    def scale(self) -> float:
        """Tolerance of a scalar target (given or default), units of ``value``."""
        return self.tolerance or DEFAULT_TOLERANCES[self.observable]

    def rdf_data(self) -> tuple[np.ndarray, np.ndarray]:
        """Target RDF (r in nm, g) read from ``column`` of ``file``."""
        return read_rdf(self.file, self.column, self.r_unit)

    def rdf_grid(self) -> RdfGrid:
        """The target RDF on the fit's bins (:func:`~openmm_reversible.target_files.rdf_bins`
        with this target's ``r_min``, ``r_max`` and ``bin_width``)."""
        return rdf_bins(*self.rdf_data(), r_min=self.r_min, r_max=self.r_max,
                        bin_width=self.bin_width)


CRYSTAL_LATTICES = ("diamond",)
"""Crystal structures a ``[systems.crystal]`` table builds (:mod:`openmm_reversible.ml.diamond`)."""
ELASTIC_OBSERVABLES = ("stress", "C11", "C12", "C44")
"""Targets of a crystal system (:func:`~openmm_reversible.observables.elastic.\
cubic_elastic_observables`), GPa."""
STRESS_TOLERANCE = 10.0
"""Default tolerance of a stress target, GPa (each of the six Voigt components)."""
MODELS = {"behler_parrinello": BehlerParrinello, "schnet": SchNet}
"""``[model] kind`` → model class; the other keys of ``[model]`` are its arguments."""
PRIORS = {"stillinger_weber": StillingerWeber}
"""``[prior] kind`` → prior class; the other keys of ``[prior]`` are its arguments."""


@dataclass(frozen=True)
class CrystalConfig:
    lattice_constant: float = _spec(check=_positive, doc="nm")
    lattice: str = _spec("diamond", _one_of(*CRYSTAL_LATTICES))
    n_cells: int = _spec(2, _positive, "conventional cells along each axis (diamond: 8·n³ "
                                       "atoms in a cubic box of side n·lattice_constant)")
    element: str = _spec("C", doc="element symbol of every atom")
    mass: float | None = _spec(None, _positive, "amu (default: the element's mass)")
    equilibration_steps: int = _spec(0, _non_negative,
                                     "torch Langevin steps from the perfect lattice (velocities "
                                     "at twice the temperature) before the first epoch")


@dataclass(frozen=True)
class ElasticTargetConfig:
    observable: str = _spec(check=_one_of(*ELASTIC_OBSERVABLES))
    value: float | None = _spec(None, doc="GPa; required for C11, C12, C44; stress: the value "
                                          "of each of the six Voigt components (default 0)")
    tolerance: float | None = _spec(None, _positive,
                                    "GPa: the error that costs weight × 1 (default: |value| "
                                    "for C11/C12/C44, i.e. relative errors; STRESS_TOLERANCE "
                                    "for stress)")
    weight: float = _spec(1.0, _non_negative)
    name: str | None = _spec(None, doc="label in logs and plots")
    temperature: float | None = _spec(None, _positive,
                                      "K of the state points this target applies to (default: "
                                      "every state point)")

    @property
    def label(self) -> str:
        return self.name or self.observable

    @property
    def units(self) -> str:
        return "GPa"

    @property
    def scale(self) -> float:
        """Tolerance (given or default), GPa."""
        if self.tolerance is not None:
            return self.tolerance
        return STRESS_TOLERANCE if self.observable == "stress" else abs(self.value)


@dataclass(frozen=True)
class CrystalSystemConfig:
    """One ``[[systems]]`` table of ``kind = "crystal"``: a perfect crystal in a fixed box,
    its temperatures (NVT state points) and its elastic targets."""

    name: str
    temperature: list[float]
    crystal: CrystalConfig
    targets: list[ElasticTargetConfig] = field(default_factory=list)
    kind: str = "crystal"

    def state_points(self) -> list[tuple[float, None]]:
        """``(temperature K, None)`` of each state point (a fixed box: no pressure)."""
        return [(t, None) for t in self.temperature]

    def targets_at(self, temperature: float, pressure: None = None
                   ) -> list[ElasticTargetConfig]:
        """The targets that apply at a temperature, their selectors cleared."""
        return [dataclasses.replace(t, temperature=None) for t in self.targets
                if t.temperature is None or math.isclose(t.temperature, temperature)]


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the neural potential of a crystal fit; ``arguments`` are the other keys,
    passed to the class of ``kind`` (:data:`MODELS`)."""

    kind: str = _spec("behler_parrinello", _one_of(*MODELS))
    arguments: dict = _spec({}, doc="the class's arguments")
    learning_rate: float | None = _spec(None, _positive,
                                        "Adam step of the network's weights (default "
                                        "schedule.learning_rate)")
    device: str = _spec("cpu", doc="torch device of the dynamics and the model: cpu, cuda")


@dataclass(frozen=True)
class PriorConfig:
    """``[prior]``: the physical prior added to the model (:data:`PRIORS`)."""

    kind: str = _spec("stillinger_weber", _one_of(*PRIORS))
    arguments: dict = _spec({}, doc="the class's arguments")
    learning_rate: float | None = _spec(None, _positive,
                                        "Adam step of the prior's parameters (relative scales "
                                        "for Stillinger-Weber; default schedule.learning_rate)")


@dataclass(frozen=True)
class EvaluationConfig:
    """``[evaluation]``: after the last epoch of a crystal fit, one long plain run of the
    trained model that reports its stress and elastic constants with standard errors."""

    steps: int = _spec(0, _non_negative, "torch Langevin steps (0: no evaluation run)")
    snapshot_every: int = _spec(20, _positive, "steps between the snapshots averaged")
    blocks: int = _spec(5, lambda v: None if v >= 2 else "must be >= 2",
                        "contiguous blocks of the standard errors")


@dataclass(frozen=True)
class FitSystemConfig:
    """One ``[[systems]]`` table: a structure, its ``createSystem`` settings, its state points
    and its targets.

    State point ``k`` is ``(temperature[k], pressure[k])``: NPT at that pressure (bar), or NVT
    when ``pressure`` is not given. A ``pressure`` list of one entry applies to every
    temperature. A target applies to every state point unless its ``temperature`` (and/or
    ``pressure``) selects some.
    """

    name: str
    structure: StructureConfig
    temperature: list[float]
    pressure: list[float] | None = None
    system: SystemConfig = field(default_factory=SystemConfig)
    targets: list[TargetConfig] = field(default_factory=list)

    def state_points(self) -> list[tuple[float, float | None]]:
        """``(temperature K, pressure bar or None)`` of each state point, in order."""
        if self.pressure is None:
            return [(t, None) for t in self.temperature]
        pressures = self.pressure * len(self.temperature) if len(self.pressure) == 1 \
            else self.pressure
        return list(zip(self.temperature, pressures, strict=True))

    def targets_at(self, temperature: float, pressure: float | None) -> list[TargetConfig]:
        """The targets that apply at a state point, their selectors cleared."""
        return [dataclasses.replace(t, temperature=None, pressure=None) for t in self.targets
                if _selects(t, temperature, pressure)]


GAS_REFUSED = {
    "pressure": "a gas system is one molecule in vacuum, without a box, so NVT only: no "
                "pressure and no barostat; remove it",
    "barostat_interval": "a gas system is one molecule in vacuum, without a box, so NVT only: "
                         "no barostat; remove it",
    "targets": "a gas system has no targets of its own: a liquid's enthalpy_of_vaporization "
               "target names it (gas = \"<this system's name>\"); remove them",
    "system.cutoff": "the gas molecule is simulated with NoCutoff (no box, every pair); "
                     "remove it",
    "system.ewald_error_tolerance": "the gas molecule is simulated with NoCutoff (no box, no "
                                    "Ewald sum); remove it",
    "system.reaction_field_dielectric": "the gas molecule is simulated with NoCutoff (no "
                                        "reaction field); remove it",
    "system.nonbonded_method": "the gas molecule is simulated with NoCutoff (no box); remove "
                               "it or set it to \"NoCutoff\"",
}
"""Keys a ``[[systems]]`` table of ``kind = "gas"`` refuses, and why (the text of the error)."""


@dataclass(frozen=True)
class GasStructureConfig:
    """``[systems.structure]`` of a gas system: exactly one of its keys."""

    pdb: str | None = _spec(None, doc="PDB file of a single molecule")
    molecule_of: str | None = _spec(None, doc="name of a liquid [[systems]] table: the first "
                                              "molecule of its structure, with its "
                                              "[systems.system] settings")

    @property
    def source(self) -> str:
        """What the molecule comes from, for messages."""
        return self.pdb if self.pdb is not None else f"the first molecule of {self.molecule_of}"


@dataclass(frozen=True)
class GasSystemConfig:
    """One ``[[systems]]`` table of ``kind = "gas"``: one molecule alone, sampled by plain
    OpenMM (NoCutoff, no box, Langevin-middle NVT with ``[simulation]``'s friction, time
    step and platform) at each of its temperatures, each epoch, for the ⟨E_gas⟩ of the
    ``enthalpy_of_vaporization`` targets that name it (``gas = "<name>"``), and its gradient
    (:class:`~openmm_reversible.gas.GasPhase`). It has no targets of its own.

    ``system`` is None with ``structure.molecule_of``: the molecule keeps that liquid's
    ``[systems.system]`` settings (rigid water, constraints).
    """

    name: str
    temperature: list[float]
    structure: GasStructureConfig
    system: SystemConfig | None = None
    frames: int = _spec(1000, _positive, "frames averaged per epoch and state point")
    every: int = _spec(20, _positive, "OpenMM steps between frames")
    kind: str = "gas"

    def state_points(self) -> list[tuple[float, None]]:
        """``(temperature K, None)`` of each state point (no box: no pressure)."""
        return [(t, None) for t in self.temperature]

    @property
    def targets(self) -> list:
        """None: a gas system gives ⟨E_gas⟩ to the targets of others."""
        return []


def _selects(target: TargetConfig, temperature: float, pressure: float | None) -> bool:
    """Whether a target's ``temperature``/``pressure`` selectors match a state point."""
    return ((target.temperature is None or math.isclose(target.temperature, temperature))
            and (target.pressure is None or (pressure is not None
                                             and math.isclose(target.pressure, pressure))))


@dataclass(frozen=True)
class StatePoint:
    """One system at one state point: a piece of the fit, with its own sampling and windows.

    Attributes
    ----------
    system : str
        Name of its ``[[systems]]`` table ("" for a config without them).
    temperature : float, K
    pressure : float, bar, or None (NVT)
    config : FitConfig
        A config of this system at this state point alone (one structure, one
        ``simulation.temperature``/``pressure``, its targets; no ``[[systems]]``): what the
        sampler, the windows and the objective of this piece are built from.
    """

    system: str
    temperature: float
    pressure: float | None
    config: FitConfig

    @property
    def label(self) -> str:
        """``"liquid 298.15 K 1 bar"``; "" for a config without ``[[systems]]``."""
        if not self.system:
            return ""
        bar = "" if self.pressure is None else f" {self.pressure:g} bar"
        return f"{self.system} {self.temperature:g} K{bar}"

    def key(self, name: str) -> str:
        """The log key of this state point's ``name`` (a target label): ``"label/name"``, or
        ``name`` alone for a config without ``[[systems]]``."""
        return f"{self.label}/{name}" if self.system else name


@dataclass(frozen=True)
class FitConfig:
    """A whole fitting configuration. Build it with :func:`load_config`.

    Without ``[[systems]]`` it describes one system at one state point (``structure``,
    ``system``, ``simulation.temperature``/``pressure``, ``targets``). With them, ``structure``
    is None and ``targets`` empty: each system carries its own, and :meth:`state_points` gives
    a single-system config for each (system, state point).
    """

    forcefield: ForceFieldConfig
    structure: StructureConfig | None
    simulation: SimulationConfig
    schedule: ScheduleConfig
    system: SystemConfig = field(default_factory=SystemConfig)
    equilibration: EquilibrationConfig = field(default_factory=EquilibrationConfig)
    """Before the first epoch: each system at its state point until it stops drifting."""
    failure: FailureConfig = field(default_factory=FailureConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Where the windows run (:mod:`.parallel`); never changes the results."""
    targets: list[TargetConfig] = field(default_factory=list)
    parameters: list[ParameterRule] = field(default_factory=list)
    """Priors, bounds and frozen parameters (``[[parameters]]`` tables, :mod:`.priors`)."""
    systems: list[FitSystemConfig] = field(default_factory=list)
    """``[[systems]]`` tables: several structures and state points in one loss."""
    gases: list[GasSystemConfig] = field(default_factory=list)
    """``[[systems]]`` tables of ``kind = "gas"``: molecules in vacuum whose ⟨E_gas⟩ the ΔHvap
    targets of ``systems`` name; not state points of their own (:meth:`state_points`)."""
    crystals: list[CrystalSystemConfig] = field(default_factory=list)
    """``[[systems]]`` tables of ``kind = "crystal"`` (a config has these or ``systems``);
    ``forcefield.files`` is then empty: the fit trains ``model`` and ``prior``."""
    model: ModelConfig | None = None
    prior: PriorConfig | None = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    path: str | None = None
    """The config file this was read from (absolute), None when built from a dict."""

    def state_points(self) -> list[StatePoint]:
        """Every (system, state point) of the fit, systems in order, then their state points.

        Without ``[[systems]]`` this is one StatePoint whose config is this config itself.
        With them, each has a config of its own: this one's shared tables, the system's
        structure, ``[system]`` settings and targets (a crystal system: ``crystals`` holding
        that system at that temperature alone), its temperature and pressure, and a seed
        of its own (``simulation.seed`` for the first, one derived from it and the state
        point's position for the others, so that no two pieces share noise).
        """
        if not self.systems and not self.crystals:
            sim = self.simulation
            return [StatePoint("", sim.temperature, sim.pressure, self)]
        points = []
        for entry in self.systems or self.crystals:
            for temperature, pressure in entry.state_points():
                k = len(points)
                seed = self.simulation.seed if k == 0 else \
                    counter_seed(self.simulation.seed, k) % _SEED_RANGE + 1
                simulation = dataclasses.replace(self.simulation, temperature=temperature,
                                                 pressure=pressure, seed=seed)
                targets = entry.targets_at(temperature, pressure)
                own = ({"crystals": [dataclasses.replace(entry, temperature=[temperature],
                                                         targets=targets)]} if self.crystals
                       else {"structure": entry.structure, "system": entry.system,
                             "targets": targets, "systems": []})
                config = dataclasses.replace(self, simulation=simulation, **own)
                points.append(StatePoint(entry.name, temperature, pressure, config))
        return points


_SEED_RANGE = 2 ** 31 - 2
"""Seeds derived for state points lie in 1 ... this (OpenMM takes 32-bit signed seeds and
draws a random one for 0)."""


_SECTIONS = {f.name: f for f in dataclasses.fields(FitConfig) if f.name != "path"}
_FROM_SYSTEMS = ("crystals", "gases")
"""FitConfig fields filled from ``[[systems]]`` tables, not tables of their own."""
_CRYSTAL_ONLY = ("model", "prior", "evaluation")
"""Tables only a fit of crystal systems takes."""
_PER_SYSTEM = ("structure", "system", "targets")
"""Tables that a config with ``[[systems]]`` gives inside each system instead."""


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation) -> str:
    """The annotation as a user reads it; ``| None`` left out (TOML cannot write None: the key
    is omitted instead)."""
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace(" | None", "")


def _table_class(annotation):
    """``(dataclass, many)`` of a FitConfig field: ``list[X]`` → (X, True), ``X | None`` →
    (X, False)."""
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation, False


def _table_of(key: str) -> str | None:
    """The table that takes ``key`` (as ``[name]`` or ``[[targets]]``), or None."""
    hints = typing.get_type_hints(FitConfig)
    for name in _SECTIONS:
        if name in _FROM_SYSTEMS:
            continue
        cls, many = _table_class(hints[name])
        if key in {f.name for f in dataclasses.fields(cls)}:
            return f"[[{name}]]" if many else f"[{name}]"
    return None


def _unknown(key: str, known, where: str) -> InputError:
    home = _table_of(key)
    close = difflib.get_close_matches(key, list(known), n=1)
    if home is not None:
        hint = f"; it belongs in {home}"
    elif close:
        hint = f"; did you mean {close[0]!r}?"
    else:
        hint = f"; known keys: {', '.join(known)}"
    return InputError(f"{where}: unknown key{hint}")


def _build(cls, table, where: str):
    """Instantiate dataclass ``cls`` from a TOML table, checking keys, types and values."""
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table ([{where}]), got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise _unknown(key, fields, f"{where}.{key}")
    kwargs = {}
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InputError(f"{where}.{name}: required key is missing")
            continue
        value = table[name]
        if not _type_ok(value, hints[name]):
            raise InputError(f"{where}.{name}: expected {_type_name(hints[name])}, "
                             f"got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{where}.{name} = {value!r}: must be a finite number")
        if hints[name] is float and value is not None:
            value = float(value)
        check = f.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                raise InputError(f"{where}.{name} = {value!r}: {problem}")
        kwargs[name] = value
    return cls(**kwargs)


def check_parallel(parallel: ParallelConfig) -> None:
    """Check a ``[parallel]`` section as a whole (also after the command line changed it).

    Raises
    ------
    InputError
        Both ``workers`` and ``scheduler``; keys of worker jobs without ``cluster`` = slurm
        or pbs; or such a cluster without a number of ``workers`` or their ``memory``.
    """
    if parallel.workers is not None and parallel.scheduler is not None:
        raise InputError("parallel: give either 'workers' (local worker processes) or "
                         "'scheduler' (the address of a running cluster), not both")
    default = ParallelConfig()
    given = [key for key in JOBQUEUE_KEYS if getattr(parallel, key) != getattr(default, key)]
    if parallel.cluster == "local":
        if given:
            raise InputError(f"parallel.{given[0]}: only for worker jobs; set parallel.cluster "
                             f"= 'slurm' or 'pbs', or remove it")
        return
    where = f"parallel.cluster = {parallel.cluster!r}"
    if parallel.scheduler is not None:
        raise InputError(f"{where}: starts its own scheduler; remove parallel.scheduler (or "
                         f"set cluster = 'local' to connect to that one)")
    if not isinstance(parallel.workers, int):
        raise InputError(f"{where}: give parallel.workers, the number of worker jobs to "
                         f"submit, e.g. workers = 8")
    if parallel.memory is None:
        raise InputError(f"{where}: give parallel.memory, the memory of each worker job, e.g. "
                         f"memory = '8GB'")


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_forcefield(name: str, base: Path, where: str) -> str:
    local = Path(_resolve(name, base))
    if local.is_file():
        return str(local)
    bundled = Path(os.path.dirname(app.__file__)) / "data" / name
    if bundled.is_file():
        return name  # OpenMM finds its own data files by name
    raise InputError(f"{where}: file {name!r} not found (looked in {base} and in OpenMM's "
                     f"bundled force fields)")


def _check_target(t: TargetConfig, base: Path, where: str, pressure: float | None
                  ) -> TargetConfig:
    if t.observable != "diffusion":
        for key in ("viscosity", "lag_range"):
            if getattr(t, key):
                raise InputError(f"{where}.{key}: only diffusion targets take {key!r}")
    elif t.lag_range and (len(t.lag_range) != 2 or not 0 <= t.lag_range[0] < t.lag_range[1]):
        raise InputError(f"{where}.lag_range = {t.lag_range}: give [first, last] lag times in "
                         f"ps with 0 <= first < last, e.g. lag_range = [0.5, 2.0]")
    if t.observable == "rdf":
        if len(t.atoms) != 2:
            raise InputError(f"{where}.atoms: an rdf target needs two atom names, e.g. "
                             f"atoms = ['O', 'H'], got {t.atoms}")
        if t.file is None:
            raise InputError(f"{where}.file: an rdf target needs a file with columns r (nm), g")
        for key in ("value", "tolerance", "gas_energy", "gas"):
            if getattr(t, key) is not None:
                raise InputError(f"{where}.{key}: an rdf target takes its target from 'file'; "
                                 f"remove {key!r}")
        path = _resolve(t.file, base)
        if not os.path.isfile(path):
            raise InputError(f"{where}.file: {path} does not exist")
        t = dataclasses.replace(t, file=path)
        try:
            t.rdf_grid()
        except InputError as exc:
            raise InputError(f"{where}.file: {exc}") from None
        return t
    if t.column != 2 or t.r_unit is not None:
        raise InputError(f"{where}: only rdf targets take 'column' and 'r_unit'")
    if t.loss != "l2":
        raise InputError(f"{where}.loss: only rdf targets take 'loss'; a scalar target's term "
                         f"is weight·((value - target) / tolerance)², remove 'loss'")
    for key in ("file", "r_min", "r_max", "bin_width", "bandwidth"):
        if getattr(t, key) is not None:
            raise InputError(f"{where}.{key}: only rdf targets take {key!r}")
    if t.atoms:
        raise InputError(f"{where}.atoms: only rdf targets take 'atoms'")
    if t.gas_energy is not None and t.observable != "enthalpy_of_vaporization":
        raise InputError(f"{where}.gas_energy: only enthalpy_of_vaporization targets take it")
    if t.gas is not None and t.observable != "enthalpy_of_vaporization":
        raise InputError(f"{where}.gas: only enthalpy_of_vaporization targets take it")
    for key in _gas_sampling(t) if t.gas is None else ():  # a gas system's: _check_gas
        raise InputError(f"{where}.{key}: only a target with gas = \"simulate\" takes it")
    if t.gas is not None and t.gas_energy is not None:
        raise InputError(f"{where}.gas: gas = {json.dumps(t.gas)} samples the gas energy; "
                         "remove gas_energy, or gas to use the given value")
    if t.value is None:
        raise InputError(f"{where}.value: a {t.observable} target needs a value in "
                         f"{SCALAR_UNITS[t.observable]}")
    if t.observable in NPT_OBSERVABLES and pressure is None:
        raise InputError(f"{where}: a {t.observable} target needs NPT sampling; set "
                         f"simulation.pressure (bar): it is an average over box fluctuations")
    if t.observable in POSITIVE_TARGETS and t.value <= 0:
        raise InputError(f"{where}.value = {t.value}: must be > 0")
    if t.observable == "dielectric" and t.value < 1:
        raise InputError(f"{where}.value = {t.value}: a static dielectric constant is >= 1 "
                         f"(water: 78.4 at 298 K)")
    if t.observable == "enthalpy_of_vaporization" and not t.value > 0:
        raise InputError(f"{where}.value = {t.value}: an enthalpy of vaporization is the energy "
                         "taken up by vaporising, > 0 in kJ/mol (water: 44.0 at 298 K); check "
                         "the sign and the unit")
    return t


def _schedule(table) -> ScheduleConfig:
    """The ``[schedule]`` table, its window checked for loss snapshots."""
    schedule = _build(ScheduleConfig, table, "schedule")
    if schedule.snapshot_every > schedule.window_steps:
        raise InputError(f"schedule.snapshot_every = {schedule.snapshot_every}: larger than "
                         f"schedule.window_steps = {schedule.window_steps}, so a window would "
                         f"have no loss snapshot")
    if schedule.window_steps % schedule.snapshot_every:
        raise InputError(f"schedule.window_steps = {schedule.window_steps}: must be a multiple "
                         f"of schedule.snapshot_every = {schedule.snapshot_every}")
    return schedule

def _check_target_schedule(t: TargetConfig, schedule: ScheduleConfig,
                            simulation: SimulationConfig, system: SystemConfig, where: str
                            ) -> None:
    """The checks of a target that need the schedule and the system: a diffusion target's
    lags within a window, a dielectric target's periodic electrostatics."""
    if t.observable == "diffusion":
        snapshots = schedule.window_steps // schedule.snapshot_every
        # Snapshots every snapshot_every steps up to the window's end: the longest lag is one
        # snapshot interval short of the window.
        longest = (snapshots - 1) * schedule.snapshot_every * simulation.timestep
        if snapshots < 3:
            raise InputError(f"{where}: a diffusion target fits the slope of the MSD over a "
                             f"window's snapshots, but a window has {snapshots}; make "
                             f"schedule.window_steps at least 3 × schedule.snapshot_every")
        if t.lag_range and t.lag_range[1] > longest * (1 + 1e-9):
            raise InputError(f"{where}.lag_range = {t.lag_range}: the last lag must be within "
                             f"a window's snapshots, at most {longest:g} ps here; lower it or "
                             f"lengthen the windows (schedule.window_steps)")
    if t.observable == "dielectric" and system.nonbonded_method in ("NoCutoff",
                                                                  "CutoffNonPeriodic"):
        raise InputError(f"{where}: the dielectric estimator is that of a periodic box, but "
                         f"system.nonbonded_method is {system.nonbonded_method}; use PME, "
                         f"Ewald or ReactionField")


def _gas_sampling(t: TargetConfig) -> list[str]:
    """The ``gas = "simulate"`` sampling keys (``gas_frames``, ``gas_every``) a target sets."""
    return [key for key in ("gas_frames", "gas_every")
            if getattr(t, key) != _default(TargetConfig.__dataclass_fields__[key])]


def _check_gas(t: TargetConfig, temperature: float,
               gases: dict[str, GasSystemConfig] | None, systems: Sequence[str], where: str
               ) -> None:
    """A ΔHvap target's ``gas``: ``"simulate"``, or a gas system (of ``gases``, by name) with
    a state point at ``temperature`` (K); ``systems`` names every system of the config."""
    if t.gas is None or t.gas == "simulate":
        return
    if gases is None:
        raise InputError(f"{where}.gas = {t.gas!r}: must be one of simulate, or the name of a "
                         "[[systems]] table of kind = \"gas\" (this config has no "
                         "[[systems]])")
    if t.gas not in gases:
        if t.gas in systems:
            raise InputError(f"{where}.gas = {t.gas!r}: that system is not of kind = \"gas\"; "
                             "name a gas system ([[systems]] with kind = \"gas\", e.g. "
                             f"structure.molecule_of = {json.dumps(t.gas)}) or use gas = "
                             "\"simulate\"")
        close = difflib.get_close_matches(t.gas, list(gases), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"{where}.gas = {t.gas!r}: no system has this name; must be one of "
                         f"simulate, {', '.join(gases) or '(no gas system)'}{hint}")
    for key in _gas_sampling(t):
        raise InputError(f"{where}.{key}: only a target with gas = \"simulate\" takes it; the "
                         f"gas system {t.gas!r} samples frames (frames) every so many steps "
                         "(every): set them in its [[systems]] table")
    temperatures = gases[t.gas].temperature
    if not any(math.isclose(temperature, x) for x in temperatures):
        raise InputError(f"{where}.gas = {t.gas!r}: the gas system has no state point at "
                         f"{temperature:g} K (its temperatures: "
                         f"{', '.join(f'{x:g}' for x in temperatures)}); add {temperature:g} "
                         "to its temperature list")


def config_from_dict(data: dict, base_dir: str | os.PathLike = ".",
                     path: str | None = None) -> FitConfig:
    """Validate a parsed config (the TOML document as a dict) and build a :class:`FitConfig`.

    Parameters
    ----------
    data : dict
        The parsed document.
    base_dir : path
        Directory against which relative file names are resolved.
    path : str, optional
        Where the document came from (kept in :attr:`FitConfig.path`).

    Raises
    ------
    InputError
        On any unknown key, wrong type, impossible value or missing file; the message names the
        key.
    """
    base = Path(base_dir).resolve()
    for key in data:
        if key not in _SECTIONS or key in _FROM_SYSTEMS:
            raise _unknown(key, [k for k in _SECTIONS if k not in _FROM_SYSTEMS], key)
    if _has_crystals(data):
        return _crystal_config(data, path)
    for key in _CRYSTAL_ONLY:
        if key in data:
            raise InputError(f"{key}: only a fit of crystal systems takes [{key}] ([[systems]] "
                             f"with kind = \"crystal\"); remove it")
    if "systems" in data:
        return _systems_config(data, base, path)
    return _single_config(data, base, path)


def _single_config(data: dict, base: Path, path: str | None,
                   gases: dict[str, GasSystemConfig] | None = None,
                   systems: Sequence[str] = ()) -> FitConfig:
    """A config of one system at one state point (:func:`config_from_dict` without
    ``[[systems]]``, or one state point of a ``[[systems]]`` table: ``gases`` are then the
    config's gas systems by name, ``systems`` the names of all its systems)."""
    for name, f in _SECTIONS.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise InputError(f"{name}: required table [{name}] is missing")
    ff = _build(ForceFieldConfig, data["forcefield"], "forcefield")
    if not ff.files:
        raise InputError("forcefield.files: name at least one ForceField XML file")
    ff = ForceFieldConfig([_resolve_forcefield(n, base, f"forcefield.files[{i}]")
                           for i, n in enumerate(ff.files)])
    structure = _build(StructureConfig, data["structure"], "structure")
    if (structure.pdb is None) == (structure.water_box is None):
        raise InputError("structure: give exactly one of 'pdb' (a file) or 'water_box' "
                         "(a number of water molecules)")
    if structure.padding is not None and structure.pdb is None:
        raise InputError("structure.padding: only used with 'pdb' (water around a solute)")
    if structure.pdb is not None:
        pdb = _resolve(structure.pdb, base)
        if not os.path.isfile(pdb):
            raise InputError(f"structure.pdb: {pdb} does not exist")
        structure = dataclasses.replace(structure, pdb=pdb)
    system = _build(SystemConfig, data.get("system", {}), "system")
    simulation = _build(SimulationConfig, data["simulation"], "simulation")
    if simulation.pressure is not None and system.nonbonded_method in ("NoCutoff",
                                                                      "CutoffNonPeriodic"):
        raise InputError(f"simulation.pressure: NPT needs a periodic system, but "
                         f"system.nonbonded_method is {system.nonbonded_method}")
    if simulation.deterministic and simulation.platform not in DETERMINISTIC_PLATFORMS:
        raise InputError(f"simulation.deterministic = true: repeatable sampling is established "
                         f"on the {', '.join(DETERMINISTIC_PLATFORMS[1:])} platforms only, not "
                         f"{simulation.platform}; set simulation.platform = \"CPU\" (or "
                         f"\"auto\"), or deterministic = false")
    if simulation.temperature is None:
        raise InputError("simulation.temperature: required key is missing")
    schedule = _schedule(data["schedule"])
    equilibration = _build(EquilibrationConfig, data.get("equilibration", {}), "equilibration")
    if equilibration.sample_every > equilibration.block_steps:
        raise InputError(f"equilibration.sample_every = {equilibration.sample_every}: larger "
                         f"than equilibration.block_steps = {equilibration.block_steps}, so a "
                         "block would have no sample")
    failure = _build(FailureConfig, data.get("failure", {}), "failure")
    output = _build(OutputConfig, data.get("output", {}), "output")
    parallel = _build(ParallelConfig, data.get("parallel", {}), "parallel")
    check_parallel(parallel)
    raw_targets = data.get("targets", [])
    if not isinstance(raw_targets, list) or not raw_targets:
        raise InputError("targets: give at least one [[targets]] table")
    targets = [_check_target(_build(TargetConfig, t, f"targets[{i}]"), base, f"targets[{i}]",
                             simulation.pressure)
               for i, t in enumerate(raw_targets)]
    for i, t in enumerate(targets):
        _check_target_schedule(t, schedule, simulation, system, f"targets[{i}]")
        _check_gas(t, simulation.temperature, gases, systems, f"targets[{i}]")
        for key in ("temperature", "pressure"):
            if getattr(t, key) is not None:
                raise InputError(f"targets[{i}].{key}: only [[systems.targets]] select state "
                                 f"points; a config without [[systems]] has one, given by "
                                 f"simulation.temperature and simulation.pressure")
    labels = [t.label for t in targets]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise InputError(f"targets: duplicate target {duplicates[0]!r}; give each a distinct "
                         f"'name'")
    if not any(t.weight > 0 for t in targets):
        raise InputError("targets: every weight is 0, nothing to fit")
    raw_rules = data.get("parameters", [])
    if not isinstance(raw_rules, list):
        raise InputError("parameters: give [[parameters]] tables (key = \"Atom/sigma/...\", "
                         "prior_width, lower, upper, frozen)")
    rules = [_build(ParameterRule, r, f"parameters[{i}]") for i, r in enumerate(raw_rules)]
    return FitConfig(forcefield=ff, structure=structure, system=system, simulation=simulation,
                     schedule=schedule, equilibration=equilibration, failure=failure,
                     output=output, parallel=parallel,
                     targets=targets, parameters=rules, path=path)


def _numbers(value, where: str, unit: str) -> list[float]:
    """A state-point list (or one number) of positive finite numbers."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(_type_ok(v, float) for v in values):
        raise InputError(f"{where}: expected a list of numbers ({unit}), got {value!r}")
    for v in values:
        if not (math.isfinite(v) and v > 0):
            raise InputError(f"{where} = {value!r}: each entry must be a finite number > 0 "
                             f"({unit})")
    return [float(v) for v in values]


def _state_text(temperature: float, pressure: float | None) -> str:
    return f"{temperature:g} K" + ("" if pressure is None else f", {pressure:g} bar")


def _renamed(exc: InputError, where: str, targets: list[int], state: str) -> InputError:
    """An error of one state point's single-system config, its keys named as the user wrote
    them inside ``[[systems]]`` (``structure.pdb`` → ``systems[0].structure.pdb``,
    ``targets[1]`` → ``systems[0].targets[3]``, ``simulation.pressure`` →
    ``systems[0].pressure``)."""
    message = str(exc)
    for key in ("temperature", "pressure"):
        message = message.replace(f"simulation.{key}", f"{where}.{key}")
    match = re.match(r"targets\[(\d+)\]", message)
    if match:
        message = f"{where}.targets[{targets[int(match[1])]}]{message[match.end():]}"
    elif message.startswith("targets:"):
        message = f"{where}.targets at {state}:{message[len('targets:'):]}"
    elif message.startswith(("structure", "system.", "system:")):
        message = f"{where}.{message}"
    return InputError(message)


def _check_systems(systems) -> None:
    """What the ``[[systems]]`` list must hold as a whole: distinct names, a weighted target."""
    names = [s.name for s in systems]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise InputError(f"systems[{i}].name = {name!r}: another system has this name; "
                             "give each a distinct name")
    if not any(t.weight > 0 for s in systems for t in s.targets):
        raise InputError("systems: every target weight is 0, nothing to fit")


def _system_head(table: dict, fields_of: type, where: str, name_hint: str,
                 temperature_hint: str, content: tuple[str, str], targets: bool = True
                 ) -> tuple[str, list[float]]:
    """The keys every ``[[systems]]`` table shares: no unknown key (the fields of
    ``fields_of``), ``name``, ``temperature`` (K), ``targets`` (unless ``targets`` is False)
    and the system's ``content`` key (``(key, hint)``) present; returns the name and the
    temperatures."""
    known = [f.name for f in dataclasses.fields(fields_of)]
    for key in table:
        if key not in known:
            raise _unknown(key, known, f"{where}.{key}")
    required = [("name", name_hint), ("temperature", temperature_hint), content]
    if targets:
        required.append(("targets", "at least one [[systems.targets]] table"))
    for key, hint in required:
        if key not in table:
            raise InputError(f"{where}.{key}: required key is missing ({hint})")
    name = table["name"]
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise InputError(f"{where}.name: expected a non-empty label without '/', got {name!r}")
    return name, _numbers(table["temperature"], f"{where}.temperature", "K")


def _system_entry(table, shared: dict, base: Path, where: str,
                  gases: dict[str, GasSystemConfig], systems: Sequence[str]
                  ) -> tuple[FitSystemConfig, FitConfig]:
    """One validated ``[[systems]]`` table, and the config of its first state point: each
    state point's single-system config is checked in full by :func:`_single_config` (with
    the config's gas systems ``gases`` and system names ``systems``), its errors named inside
    the table."""
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table ([[systems]]), got {type(table).__name__}")
    name, temperatures = _system_head(
        table, FitSystemConfig, where, 'a label for logs and plots, e.g. name = "liquid"',
        "K, one per state point, e.g. temperature = [278.15, 298.15]",
        ("structure", "[systems.structure] with pdb or water_box"))
    pressures = None
    if "pressure" in table:
        pressures = _numbers(table["pressure"], f"{where}.pressure", "bar")
        if len(pressures) not in (1, len(temperatures)):
            raise InputError(f"{where}.pressure: {len(pressures)} pressures for "
                             f"{len(temperatures)} temperatures; give one pressure per "
                             f"temperature, or one for all")
    raw_targets = table["targets"]
    if not isinstance(raw_targets, list) or not raw_targets:
        raise InputError(f"{where}.targets: give at least one [[systems.targets]] table")
    selectors = [_build(TargetConfig, t, f"{where}.targets[{k}]")
                 for k, t in enumerate(raw_targets)]
    entry = FitSystemConfig(name, StructureConfig(), temperatures, pressures)
    points = entry.state_points()
    if len(set(points)) != len(points):
        raise InputError(f"{where}: a state point is listed twice in temperature/pressure; "
                         f"list each (temperature, pressure) once")
    for k, t in enumerate(selectors):
        if not any(_selects(t, *point) for point in points):
            key = "temperature" if t.temperature is not None else "pressure"
            raise InputError(f"{where}.targets[{k}].{key} = {getattr(t, key)!r}: matches none "
                             f"of the system's state points "
                             f"({'; '.join(_state_text(*p) for p in points)})")
    validated: dict[int, TargetConfig] = {}
    first = None
    for temperature, pressure in points:
        chosen = [k for k, t in enumerate(selectors) if _selects(t, temperature, pressure)]
        state = _state_text(temperature, pressure)
        if not chosen:
            raise InputError(f"{where}: no target applies at {state}; give it a "
                             f"[[systems.targets]] table or remove the state point")
        simulation = dict(shared.get("simulation") or {}, temperature=temperature)
        if pressure is not None:
            simulation["pressure"] = pressure
        piece = dict(shared, structure=table["structure"], simulation=simulation,
                     targets=[{k: v for k, v in raw_targets[k].items()
                               if k not in ("temperature", "pressure")} for k in chosen])
        if "system" in table:
            piece["system"] = table["system"]
        try:
            config = _single_config(piece, base, None, gases, systems)
        except InputError as exc:
            raise _renamed(exc, where, chosen, state) from None
        first = first or config
        for k, t in zip(chosen, config.targets, strict=True):
            validated.setdefault(k, dataclasses.replace(
                t, temperature=selectors[k].temperature, pressure=selectors[k].pressure))
    return dataclasses.replace(entry, structure=first.structure, system=first.system,
                               targets=[validated[k] for k in range(len(selectors))]), first


def _systems_config(data: dict, base: Path, path: str | None) -> FitConfig:
    """A config with ``[[systems]]`` (:func:`config_from_dict` reads it)."""
    raw = data["systems"]
    if not isinstance(raw, list) or not raw:
        raise InputError("systems: give one [[systems]] table per system (name, temperature, "
                         "pressure, [systems.structure], [[systems.targets]])")
    for key in _PER_SYSTEM:
        if key in data:
            table = "[[systems.targets]]" if key == "targets" else f"[systems.{key}]"
            raise InputError(f"{key}: with [[systems]], each system gives its own {table}; "
                             f"move it into the systems")
    simulation = data.get("simulation")
    for key in ("temperature", "pressure"):
        if isinstance(simulation, dict) and key in simulation:
            raise InputError(f"simulation.{key}: with [[systems]], each system lists its state "
                             f"points ({key} = [...] in its [[systems]] table); remove it "
                             "from [simulation]")
    shared = {k: v for k, v in data.items() if k != "systems"}
    is_gas = [isinstance(t, dict) and t.get("kind") == "gas" for t in raw]
    names = [t.get("name") if isinstance(t, dict) else None for t in raw]
    liquids = [n for n, gas in zip(names, is_gas, strict=True) if not gas]
    if all(is_gas):
        raise InputError("systems: every system is of kind = \"gas\"; a gas system gives "
                         "⟨E_gas⟩ to the enthalpy_of_vaporization target of a liquid system "
                         "(gas = \"<its name>\"): add the liquid's [[systems]] table")
    gases = {entry.name: entry for entry in
             (_gas_entry(t, liquids, base, f"systems[{i}]")
              for i, (t, gas) in enumerate(zip(raw, is_gas, strict=True)) if gas)}
    entries = [_system_entry(table, shared, base, f"systems[{i}]", gases, names)
               for i, (table, gas) in enumerate(zip(raw, is_gas, strict=True)) if not gas]
    systems = [entry for entry, _ in entries]
    _check_systems(systems + list(gases.values()))
    used = {t.gas for s in systems for t in s.targets}
    for i, name in enumerate(names):
        if is_gas[i] and name not in used:
            raise InputError(f"systems[{i}]: no enthalpy_of_vaporization target names the gas "
                             f"system {name!r}; give one gas = {json.dumps(name)}, or "
                             "remove the gas system")
    # The shared tables were validated with every state point; keep them, without one.
    first = entries[0][1]
    return dataclasses.replace(
        first, structure=None, system=SystemConfig(), targets=[], systems=systems,
        gases=list(gases.values()), path=path,
        simulation=dataclasses.replace(first.simulation, temperature=None, pressure=None))


def _gas_entry(table: dict, liquids: list, base: Path, where: str) -> GasSystemConfig:
    """One validated ``[[systems]]`` table of ``kind = "gas"`` (``liquids``: the names of the
    config's other systems, which ``structure.molecule_of`` may name)."""
    for key, why in GAS_REFUSED.items():
        table_name, _, sub = key.rpartition(".")
        inner = table.get(table_name, {}) if table_name else table
        if isinstance(inner, dict) and sub in inner and not (
                key == "system.nonbonded_method" and inner[sub] == "NoCutoff"):
            raise InputError(f"{where}.{key}: {why}")
    name, temperatures = _system_head(
        table, GasSystemConfig, where, 'a label for logs, e.g. name = "vapour"',
        "K, one per state point, e.g. temperature = [298.15]",
        ("structure", "[systems.structure] with pdb (one molecule) or molecule_of (a liquid "
                      "system's name)"), targets=False)
    if len(set(temperatures)) != len(temperatures):
        raise InputError(f"{where}.temperature: a temperature is listed twice; list each once")
    raw = table["structure"]
    if isinstance(raw, dict):
        for key in raw:
            if key in {f.name for f in dataclasses.fields(StructureConfig)} - {"pdb"}:
                raise InputError(f"{where}.structure.{key}: a gas system is one molecule "
                                 "without a box; give structure.pdb (a single molecule) or "
                                 "structure.molecule_of = \"<liquid system>\", not "
                                 f"{key}")
    structure = _build(GasStructureConfig, raw, f"{where}.structure")
    if (structure.pdb is None) == (structure.molecule_of is None):
        raise InputError(f"{where}.structure: give exactly one of 'pdb' (a single molecule) or "
                         "'molecule_of' (the name of a liquid system: its first molecule)")
    system = None
    if structure.molecule_of is not None:
        if structure.molecule_of not in liquids:
            close = difflib.get_close_matches(structure.molecule_of, liquids, n=1)
            hint = f"did you mean {close[0]!r}?" if close else \
                f"the liquid systems: {', '.join(map(str, liquids)) or 'none'}"
            raise InputError(f"{where}.structure.molecule_of = {structure.molecule_of!r}: no "
                             f"liquid system has this name; {hint}")
        if "system" in table:
            raise InputError(f"{where}.system: the molecule of structure.molecule_of keeps the "
                             f"[systems.system] settings of {structure.molecule_of!r}; remove "
                             "it (or give structure.pdb with settings of its own)")
    else:
        pdb = _resolve(structure.pdb, base)
        if not os.path.isfile(pdb):
            raise InputError(f"{where}.structure.pdb: {pdb} does not exist")
        structure = dataclasses.replace(structure, pdb=pdb)
        system = dataclasses.replace(
            _build(SystemConfig, table.get("system", {}), f"{where}.system"),
            nonbonded_method="NoCutoff")
    sampling = _build(GasSystemConfig, {k: table[k] for k in ("frames", "every") if k in table}
                      | {"name": name, "temperature": temperatures, "structure": structure},
                      where)
    return dataclasses.replace(sampling, system=system)


_CRYSTAL_REFUSED = {
    "forcefield": "a crystal fit trains the model of [model] and [prior], not ForceField XML",
    "structure": "each crystal system gives its [systems.crystal]",
    "system": "the model's cutoffs are arguments of [model] and [prior]",
    "targets": "each crystal system gives its own [[systems.targets]]",
    "parameters": "[[parameters]] rules apply to tagged ForceField parameters",
    "equilibration": "a crystal is equilibrated for crystal.equilibration_steps (in "
                     "[systems.crystal]) before the first epoch",
    "parallel": "the windows of a crystal fit run in this process",
    "output": "no trajectory files are written for crystal systems",
}
"""Tables a fit of crystal systems does not take, and why (the message of its error)."""
_CRYSTAL_SIMULATION = ("friction", "timestep", "seed")
"""The ``[simulation]`` keys a fit of crystal systems uses (its dynamics run in torch)."""


SYSTEM_KINDS = ("crystal", "gas")
"""The ``kind`` of a ``[[systems]]`` table; a ForceField liquid, box or solution has none."""


def _has_crystals(data: dict) -> bool:
    """Whether a document's ``[[systems]]`` hold a crystal (each ``kind`` checked)."""
    raw = data.get("systems")
    tables = raw if isinstance(raw, list) else []
    for i, t in enumerate(tables):
        if isinstance(t, dict) and "kind" in t and t["kind"] not in SYSTEM_KINDS:
            raise InputError(f"systems[{i}].kind = {t['kind']!r}: must be \"crystal\" or "
                             "\"gas\" (a ForceField liquid, box or solution has no kind)")
    return any(isinstance(t, dict) and t.get("kind") == "crystal" for t in tables)


def _model_table(table, where: str, classes: dict, cls):
    """``[model]`` or ``[prior]``: its own keys (``cls``), the rest the arguments of the
    class of ``kind``, each checked against its signature and by building it once."""
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table ([{where}]), got {type(table).__name__}")
    own = {f.name for f in dataclasses.fields(cls)} - {"arguments"}
    kind = table.get("kind", dataclasses.fields(cls)[0].default)
    if kind not in classes:
        raise InputError(f"{where}.kind = {kind!r}: must be one of {', '.join(classes)}")
    signature = inspect.signature(classes[kind])
    names = [n for n in signature.parameters if n != "self"]
    arguments = {k: v for k, v in table.items() if k not in own}
    for key in arguments:
        if key not in names:
            raise _unknown(key, sorted(own) + names, f"{where}.{key}")
    try:
        classes[kind](**arguments)
    except (TypeError, ValueError, InputError) as exc:
        raise InputError(f"{where}: {classes[kind].__name__}({', '.join(arguments)}) refuses "
                         f"these arguments: {exc}") from None
    config = _build(cls, {k: v for k, v in table.items() if k in own} | {"arguments": {}},
                    where)
    if isinstance(config, ModelConfig):
        try:
            torch.device(config.device)
        except RuntimeError:
            raise InputError(f"{where}.device = {config.device!r}: not a torch device; use "
                             "\"cpu\" or \"cuda\"") from None
    return dataclasses.replace(config, arguments=arguments)


def _crystal_entry(table, where: str) -> CrystalSystemConfig:
    """One validated ``[[systems]]`` table of ``kind = "crystal"``."""
    if not isinstance(table, dict):
        raise InputError(f"{where}: must be a table ([[systems]]), got {type(table).__name__}")
    if table.get("kind") != "crystal":
        given = (f".kind = {table['kind']!r}: must be \"crystal\" (a ForceField system has no "
                 "kind, or kind = \"gas\")" if "kind" in table
                 else ".kind: required key is missing (kind = \"crystal\")")
        raise InputError(f"{where}{given}; a fit of crystal systems trains one ML model, so "
                         "every system is a crystal (fit ForceField systems in a config of "
                         "their own)")
    name, temperatures = _system_head(
        table, CrystalSystemConfig, where, 'a label for logs and plots, e.g. name = "diamond"',
        "K, one per state point, e.g. temperature = [298.0]",
        ("crystal", "[systems.crystal] with lattice_constant (nm)"))
    if len(set(temperatures)) != len(temperatures):
        raise InputError(f"{where}.temperature: a temperature is listed twice; list each once")
    crystal = _build(CrystalConfig, table["crystal"], f"{where}.crystal")
    try:
        element = app.Element.getBySymbol(crystal.element)
    except KeyError:
        raise InputError(f"{where}.crystal.element = {crystal.element!r}: not an element "
                         "symbol (e.g. \"C\", \"Si\")") from None
    if crystal.mass is None:
        crystal = dataclasses.replace(crystal, mass=element.mass.value_in_unit(
            element.mass.unit))
    raw = table["targets"]
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}.targets: give at least one [[systems.targets]] table")
    targets = []
    for k, entry in enumerate(raw):
        t = _build(ElasticTargetConfig, entry, f"{where}.targets[{k}]")
        if t.value is None:
            if t.observable != "stress":
                raise InputError(f"{where}.targets[{k}].value: a {t.observable} target needs "
                                 "a value in GPa")
            t = dataclasses.replace(t, value=0.0)
        if t.scale == 0:
            raise InputError(f"{where}.targets[{k}]: value = 0 and no tolerance; give "
                             "tolerance (GPa), the error that costs weight")
        if t.temperature is not None and not any(math.isclose(t.temperature, x)
                                                 for x in temperatures):
            raise InputError(f"{where}.targets[{k}].temperature = {t.temperature!r}: matches "
                             f"none of the system's temperatures {temperatures}")
        targets.append(t)
    entry = CrystalSystemConfig(name, temperatures, crystal, targets)
    for temperature in temperatures:
        labels = [t.label for t in entry.targets_at(temperature)]
        if not labels:
            raise InputError(f"{where}: no target applies at {temperature:g} K; give it a "
                             "[[systems.targets]] table or remove the temperature")
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise InputError(f"{where}.targets: duplicate target {twice[0]!r} at "
                             f"{temperature:g} K; give each a distinct 'name'")
    return entry


def _crystal_config(data: dict, path: str | None) -> FitConfig:
    """A config whose ``[[systems]]`` are crystals (:func:`config_from_dict` reads it)."""
    for key, why in _CRYSTAL_REFUSED.items():
        if key in data:
            raise InputError(f"{key}: not used with crystal systems ({why}); remove it")
    table = data.get("simulation", {})
    for key in table if isinstance(table, dict) else ():
        if key in ("temperature", "pressure"):
            raise InputError(f"simulation.{key}: each crystal system lists its temperatures "
                             "(temperature = [...] in its [[systems]] table; the box is fixed, "
                             "so there is no pressure); remove it from [simulation]")
        if key in {f.name for f in dataclasses.fields(SimulationConfig)} \
                and key not in _CRYSTAL_SIMULATION:
            raise InputError(f"simulation.{key}: crystal systems run in torch and take only "
                             f"{', '.join(_CRYSTAL_SIMULATION)} from [simulation] (the device "
                             "is model.device); remove it")
    simulation = _build(SimulationConfig, table, "simulation")
    for key in ("schedule", "model"):
        if key not in data:
            raise InputError(f"{key}: required table [{key}] is missing")
    schedule = _schedule(data["schedule"])
    if schedule.replicas != 1:
        raise InputError("schedule.replicas: independent chains are not implemented for "
                         "crystal systems; remove it (or set it to 1)")
    raw = data["systems"]
    crystals = [_crystal_entry(t, f"systems[{i}]") for i, t in enumerate(raw)]
    _check_systems(crystals)
    evaluation = _build(EvaluationConfig, data.get("evaluation", {}), "evaluation")
    snapshots = evaluation.steps // evaluation.snapshot_every
    if evaluation.steps and snapshots < 2 * evaluation.blocks:
        raise InputError(f"evaluation.steps = {evaluation.steps}: {snapshots} snapshots (every "
                         f"{evaluation.snapshot_every} steps) cannot fill {evaluation.blocks} "
                         "blocks of 2; run more steps or use fewer blocks")
    return FitConfig(
        forcefield=ForceFieldConfig([]), structure=None, simulation=simulation,
        schedule=schedule, failure=_build(FailureConfig, data.get("failure", {}), "failure"),
        crystals=crystals, model=_model_table(data["model"], "model", MODELS, ModelConfig),
        prior=(_model_table(data["prior"], "prior", PRIORS, PriorConfig) if "prior" in data
               else None),
        evaluation=evaluation, path=path)


def load_config(path: str | os.PathLike,
                forcefield: Sequence[str | os.PathLike] | None = None) -> FitConfig:
    """Read and validate a TOML fitting config.

    Parameters
    ----------
    path : path
        The TOML file. Relative paths inside it are relative to its directory.
    forcefield : sequence of path, optional
        Replace ``forcefield.files`` (paths relative to the working directory, or OpenMM's
        bundled names): the same fit with another force field, e.g. another functional form.

    Raises
    ------
    InputError
        If the file is missing, is not valid TOML, or fails validation (see
        :func:`config_from_dict`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    if forcefield is not None:
        files = [_resolve_forcefield(str(name), Path.cwd(), f"--forcefield {name}")
                 for name in forcefield]
        data.setdefault("forcefield", {})["files"] = files
    return config_from_dict(data, path.resolve().parent, str(path.resolve()))


def to_dict(config: FitConfig) -> dict:
    """The config as plain data (for logs and checkpoints)."""
    return dataclasses.asdict(config)


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return f.default


def _fill_defaults(table: dict, cls) -> dict:
    filled = dict(table)
    for f in dataclasses.fields(cls):
        if f.name not in filled and (f.default is not dataclasses.MISSING
                                     or f.default_factory is not dataclasses.MISSING):
            filled[f.name] = _default(f)
    return filled


def with_defaults(data: dict) -> dict:
    """A config saved as plain data (:func:`to_dict`) by an earlier version, with every key
    added since then set to its default, so that it compares equal to the same config read
    today (a checkpoint written before a key existed resumes with that key at its default)."""
    filled = _fill_defaults(data, FitConfig)
    hints = typing.get_type_hints(FitConfig)
    for name in _SECTIONS:
        cls, many = _table_class(hints[name])
        if many:
            filled[name] = [_fill_defaults(t, cls) for t in filled[name]]
        elif isinstance(filled.get(name), dict):
            filled[name] = _fill_defaults(filled[name], cls)
    return filled
