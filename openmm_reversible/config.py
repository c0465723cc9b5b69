"""The fitting configuration: a TOML file read into frozen dataclasses, checked before any work.

A config file has one table per concern::

    [forcefield]   files = ["water.xml"]           ForceField XML, tagged with parameterize
    [structure]    water_box = 216 | pdb = "x.pdb"  what to simulate (Modeller builds boxes)
    [system]       nonbonded_method, cutoff, ...   arguments of ForceField.createSystem
    [simulation]   temperature, friction, timestep, pressure, platform, seed, deterministic
    [schedule]     epochs, equilibration_steps, bulk_steps, windows, window_steps, optimiser
    [failure]      what to do when a simulation blows up (retries, new noise, smaller step)
    [output]       trajectory format and frames per epoch (besides XML, log, CSV, checkpoint)
    [parallel]     workers, scheduler, threads_per_worker: where the windows of an epoch run
    [[targets]]    one table per observable with its target and weight

Every key is checked: an unknown or misspelled key, a value of the wrong type or an impossible
value (a negative time step, a cutoff larger than half the box, a missing target file) raises
:class:`~openmm_reversible.errors.InputError` naming the key (``schedule.epocs: unknown key; did
you mean 'epochs'?``), so a bad config fails before anything is simulated or written.

Relative paths are resolved against the directory of the config file. Units are OpenMM's MD
units (nm, ps, K, kJ/mol) except where a key says otherwise (pressure in bar, density in
g/cm³, diffusion coefficient in nm²/ps).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from openmm import app

from .errors import InputError
from .methods import CONSTRAINTS, NONBONDED_METHODS
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
OBSERVABLES = ("rdf", "enthalpy_of_vaporization", "density", "pressure", "diffusion")
SCALAR_UNITS = {"enthalpy_of_vaporization": "kJ/mol", "density": "g/cm^3", "pressure": "bar",
                "diffusion": "nm^2/ps"}
"""Units of the ``value`` of each scalar target."""
DEFAULT_TOLERANCES = {"enthalpy_of_vaporization": 1.0, "density": 0.01, "pressure": 100.0,
                      "diffusion": 1e-4}
"""Error of a scalar target that costs ``weight`` (loss term ``weight·(error/tolerance)²``)."""


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
    if isinstance(default, list):
        kwargs["default_factory"] = lambda: list(default)
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
    temperature: float = _spec(check=_positive, doc="K")
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
    window_steps: int = _spec(100, _positive, "steps of one reversible window")
    snapshot_every: int = _spec(10, _positive, "steps between loss snapshots in a window")
    truncation: int | None = _spec(None, _positive, "adjoint truncation, steps")
    resync_every: int | None = _spec(None, _positive, "steps between stored resync states")
    optimizer: str = _spec("adam", _one_of(*OPTIMIZERS))
    learning_rate: float = _spec(0.01, _positive, "step on parameters scaled to their start")
    lr_decay: float = _spec(1.0, lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
                            "learning rate multiplied by this after every epoch")


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


@dataclass(frozen=True)
class ParallelConfig:
    workers: int | None = _spec(None, _positive, "local worker processes for the windows "
                                                 "(default: none, windows run in-process)")
    scheduler: str | None = _spec(None, doc="address of a running Dask scheduler, e.g. "
                                            "tcp://10.0.0.5:8786 (instead of local workers)")
    threads_per_worker: int = _spec(1, _positive, "torch threads of each worker")
    retries: int = _spec(2, _non_negative, "extra runs of a window whose worker died or "
                                           "failed unexpectedly")
    connect_timeout: float = _spec(10.0, _positive, "s to wait for the scheduler")


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
    tolerance: float | None = _spec(None, _positive,
                                    "scalar targets: the error that costs weight × 1 "
                                    "(default DEFAULT_TOLERANCES), units of value")
    gas_energy: float | None = _spec(None, doc="enthalpy_of_vaporization: potential energy "
                                               "of one isolated molecule, kJ/mol (default: "
                                               "k_B T/2 per internal harmonic mode)")

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


@dataclass(frozen=True)
class FitConfig:
    """A whole fitting configuration. Build it with :func:`load_config`."""

    forcefield: ForceFieldConfig
    structure: StructureConfig
    simulation: SimulationConfig
    schedule: ScheduleConfig
    system: SystemConfig = field(default_factory=SystemConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Where the windows run (:mod:`.parallel`); never changes the results."""
    targets: list[TargetConfig] = field(default_factory=list)
    parameters: list[ParameterRule] = field(default_factory=list)
    """Priors, bounds and frozen parameters (``[[parameters]]`` tables, :mod:`.priors`)."""
    path: str | None = None
    """The config file this was read from (absolute), None when built from a dict."""


_SECTIONS = {f.name: f for f in dataclasses.fields(FitConfig) if f.name != "path"}


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
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _table_of(key: str) -> str | None:
    """The table that takes ``key`` (as ``[name]`` or ``[[targets]]``), or None."""
    hints = typing.get_type_hints(FitConfig)
    for name in _SECTIONS:
        cls = hints[name]
        many = typing.get_origin(cls) is list
        cls = typing.get_args(cls)[0] if many else cls
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
    if t.observable == "rdf":
        if len(t.atoms) != 2:
            raise InputError(f"{where}.atoms: an rdf target needs two atom names, e.g. "
                             f"atoms = ['O', 'H'], got {t.atoms}")
        if t.file is None:
            raise InputError(f"{where}.file: an rdf target needs a file with columns r (nm), g")
        for key in ("value", "tolerance", "gas_energy"):
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
    for key in ("file", "r_min", "r_max", "bin_width", "bandwidth"):
        if getattr(t, key) is not None:
            raise InputError(f"{where}.{key}: only rdf targets take {key!r}")
    if t.atoms:
        raise InputError(f"{where}.atoms: only rdf targets take 'atoms'")
    if t.gas_energy is not None and t.observable != "enthalpy_of_vaporization":
        raise InputError(f"{where}.gas_energy: only enthalpy_of_vaporization targets take it")
    if t.value is None:
        raise InputError(f"{where}.value: a {t.observable} target needs a value in "
                         f"{SCALAR_UNITS[t.observable]}")
    if t.observable == "density" and pressure is None:
        raise InputError(f"{where}: a density target needs NPT sampling; set "
                         f"simulation.pressure (bar)")
    if t.observable in ("density", "diffusion") and t.value <= 0:
        raise InputError(f"{where}.value = {t.value}: must be > 0")
    if t.observable == "enthalpy_of_vaporization" and not t.value > 0:
        raise InputError(f"{where}.value = {t.value}: an enthalpy of vaporization is the energy "
                         "taken up by vaporising, > 0 in kJ/mol (water: 44.0 at 298 K); check "
                         "the sign and the unit")
    return t


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
        if key not in _SECTIONS:
            raise _unknown(key, _SECTIONS, key)
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
    schedule = _build(ScheduleConfig, data["schedule"], "schedule")
    if schedule.snapshot_every > schedule.window_steps:
        raise InputError(f"schedule.snapshot_every = {schedule.snapshot_every}: larger than "
                         f"schedule.window_steps = {schedule.window_steps}, so a window would "
                         f"have no loss snapshot")
    if schedule.window_steps % schedule.snapshot_every:
        raise InputError(f"schedule.window_steps = {schedule.window_steps}: must be a multiple "
                         f"of schedule.snapshot_every = {schedule.snapshot_every}")
    failure = _build(FailureConfig, data.get("failure", {}), "failure")
    output = _build(OutputConfig, data.get("output", {}), "output")
    parallel = _build(ParallelConfig, data.get("parallel", {}), "parallel")
    if parallel.workers is not None and parallel.scheduler is not None:
        raise InputError("parallel: give either 'workers' (local worker processes) or "
                         "'scheduler' (the address of a running cluster), not both")
    raw_targets = data.get("targets", [])
    if not isinstance(raw_targets, list) or not raw_targets:
        raise InputError("targets: give at least one [[targets]] table")
    targets = [_check_target(_build(TargetConfig, t, f"targets[{i}]"), base, f"targets[{i}]",
                             simulation.pressure)
               for i, t in enumerate(raw_targets)]
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
                     schedule=schedule, failure=failure, output=output, parallel=parallel,
                     targets=targets, parameters=rules, path=path)


def load_config(path: str | os.PathLike) -> FitConfig:
    """Read and validate a TOML fitting config.

    Parameters
    ----------
    path : path
        The TOML file. Relative paths inside it are relative to its directory.

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
        if name == "targets":
            filled[name] = [_fill_defaults(t, TargetConfig) for t in filled[name]]
        elif isinstance(filled.get(name), dict):
            filled[name] = _fill_defaults(filled[name], hints[name])
    return filled
