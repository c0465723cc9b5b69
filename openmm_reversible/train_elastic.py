"""Training a machine-learning potential to the stress and elastic constants of a crystal.

The solid-state application of reversible simulation (the paper's diamond-from-scratch case): a
neural potential, usually added to a physical prior such as
:class:`~.stillinger_weber.StillingerWeber`, is trained so that the crystal it simulates at a
given lattice constant and temperature has zero stress and prescribed cubic elastic constants.
Both are ensemble averages, so their gradients come from differentiating through dynamics.

One run of :func:`train_elastic`:

1. the perfect crystal gets Maxwell–Boltzmann velocities at twice the temperature (from
   ``settings.seed``; half of that kinetic energy flows into the lattice vibrations' potential
   energy) and is equilibrated with the torch Langevin-middle integrator under the starting
   potential;
2. every epoch runs ``decorrelation_steps`` plain steps, then one reversible window
   (:class:`~openmm_reversible.integrators.ReversibleSimulation`) whose loss is computed from its
   snapshots; ``loss.backward()`` runs the dynamics backward and fills the gradients of the prior
   and model parameters; one Adam step follows (separate learning rates for the prior, whose
   parameters are relative scales, and the neural model). The next epoch continues from the
   window's final state: the whole run is one trajectory with one noise stream;
3. after every epoch a one-line summary goes to the ``logging`` logger of this module, and, when
   an output directory is given, ``log.jsonl`` (one JSON record per epoch) and
   ``checkpoint.pt`` (model, optimiser, dynamical state, history) are written atomically;
   ``resume=True`` continues from the checkpoint. At the end ``model.pt`` holds the trained
   prior + model as one TorchScript contract model, ready for
   ``openmm_reversible_plugin.create_force`` or a ``<TorchPotential file="model.pt">`` tag.

The loss of a window with snapshots ``s`` (:meth:`ElasticTargets.loss`)::

    L = w_σ · mean_α ⟨σ_α⟩²  +  Σ_{k ∈ 11, 12, 44} ((C_k − C_k*) / C_k*)²

with ``⟨σ_α⟩`` the six Voigt components of the virial stress (kinetic part included, GPa)
averaged over the snapshots, ``w_σ`` in GPa⁻², and ``C_k`` the cubic elastic constants from the
stress-fluctuation formula over the same snapshots
(:func:`~openmm_reversible.observables.elastic.stress_fluctuation`; the shear stresses fluctuate
about zero, their exact mean by cubic symmetry, rather than about the window's short mean),
each averaged over its three symmetry-equivalent Voigt entries. The elastic term depends on
the parameters directly (Born term: a third derivative of the energy, by autograd) and through
the snapshots (the reversible adjoint); both reach the gradient.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError
from .files import atomic_write, atomic_write_text
from .integrators import LangevinMiddleIntegrator, ReversibleSimulation
from .losses import Loss, Target
from .ml.contract import EnergySum, MLPotential
from .observables.density import kinetic_tensor
from .observables.elastic import (
    GPA_PER_KJ_MOL_NM3,
    VOIGT,
    born_terms,
    stress_fluctuation,
)
from .train import CHECKPOINT, LOG, TrainingFailed
from .trajectory import Trajectory
from .units import DTYPE, KB

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
"""TorchScript file of the trained prior + model, written at the end of a run."""

CHECKPOINT_VERSION = 1


def _from_mapping(cls, mapping: Mapping[str, Any], section: str):
    """Build the dataclass ``cls`` from a mapping (e.g. a TOML table), naming unknown keys."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise InputError(f"[{section}] has unknown keys {unknown}; valid keys: "
                         f"{', '.join(sorted(known))}")
    return cls(**mapping)


@dataclass(frozen=True)
class ElasticTargets:
    """Zero stress and the cubic elastic constants C11, C12, C44 as a training loss.

    Defaults are diamond at 298 K (a = 0.3567 nm).

    Parameters
    ----------
    c11, c12, c44 : float, GPa
        Target elastic constants (Voigt notation).
    stress_weight : float, GPa⁻²
        Weight of the mean square of the six Voigt stress components; with 1e-2 a residual
        stress of 10 GPa in every component costs as much as a 100 % error in one constant.
    """

    c11: float = 1079.0
    c12: float = 124.0
    c44: float = 578.0
    stress_weight: float = 1e-2

    def __post_init__(self):
        for name in ("c11", "c12", "c44"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value != 0):
                raise InputError(f"target {name} must be a finite, non-zero number of GPa "
                                 f"(the loss uses relative errors), got {value!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> ElasticTargets:
        """From a mapping such as a TOML ``[targets]`` table; unknown keys raise InputError."""
        return _from_mapping(cls, mapping, "targets")

    def loss(self) -> Loss:
        """The loss over the observables of :func:`cubic_elastic_observables`."""
        return Loss([
            Target("stress", np.zeros(6), weight=self.stress_weight, units="GPa"),
            Target("C11", self.c11, weight=1.0 / self.c11 ** 2, units="GPa"),
            Target("C12", self.c12, weight=1.0 / self.c12 ** 2, units="GPa"),
            Target("C44", self.c44, weight=1.0 / self.c44 ** 2, units="GPa"),
        ])


def cubic_elastic_observables(trajectory: Trajectory, potential: nn.Module
                              ) -> dict[str, torch.Tensor]:
    """Mean stress and cubic elastic constants of a window's snapshots (differentiable).

    Parameters
    ----------
    trajectory : Trajectory
        Canonical-ensemble snapshots in a fixed periodic box (positions, velocities, masses and
        temperature are used).
    potential : callable
        ``potential(positions (N, 3) nm, box (3, 3) nm) -> energy`` kJ/mol, twice
        differentiable.

    Returns
    -------
    dict of str to torch.Tensor
        ``stress``: shape (6,), GPa, the Voigt components (xx, yy, zz, yz, xz, xy) of the
        snapshot-averaged virial stress, kinetic part included (tension positive);
        ``C11``, ``C12``, ``C44``: 0-dim, GPa, stress-fluctuation elastic constants, each the
        mean of its three cubic-symmetry-equivalent entries of the 6×6 matrix.
    """
    box = trajectory.box
    if box is None or box.shape != (3, 3):
        raise InputError(f"stress and elastic constants need one fixed periodic box (3, 3); "
                         f"the trajectory has box="
                         f"{None if box is None else tuple(box.shape)}")
    born_stress, born = born_terms(potential, trajectory.positions, box)
    voigt = virial_voigt(born_stress, trajectory.velocities, trajectory.masses, box)
    # The shear stresses of a cubic crystal average to zero by symmetry: their fluctuations
    # are taken about zero, not about the window's short (biased) mean.
    centre = torch.cat([born_stress.mean(0)[:3], born_stress.new_zeros(3)])
    c = stress_fluctuation(born_stress, born, trajectory.n_atoms, box, trajectory.temperature,
                           mean=centre)
    return {"stress": voigt.mean(0), **_cubic(c)}


def virial_voigt(born_stress: torch.Tensor, velocities: torch.Tensor, masses: torch.Tensor,
                 box: torch.Tensor) -> torch.Tensor:
    """Virial stress (n_frames, 6), GPa, Voigt order, tension positive: the configurational
    stress of :func:`~openmm_reversible.observables.elastic.born_terms` minus the kinetic
    term ``Σ m v ⊗ v / V`` of ``velocities`` (n_frames, N, 3) nm/ps, ``masses`` (N,) amu."""
    kinetic = kinetic_tensor(velocities, masses) / torch.linalg.det(box).abs() \
        * GPA_PER_KJ_MOL_NM3
    return born_stress - torch.stack([kinetic[:, a, b] for a, b in VOIGT], 1)


def _cubic(c: torch.Tensor) -> dict[str, torch.Tensor]:
    """C11, C12, C44 of a (6, 6) matrix, each the mean of its three cubic-equivalent entries."""
    return {"C11": torch.diagonal(c)[:3].mean(), "C12": (c[0, 1] + c[0, 2] + c[1, 2]) / 3.0,
            "C44": torch.diagonal(c)[3:].mean()}


def evaluate_elastic(model: nn.Module, positions, velocities, box, masses,
                     settings: ElasticTrainingSettings | None = None, steps: int = 20000,
                     snapshot_every: int = 20, blocks: int = 5, start_step: int = 0,
                     chunk: int = 16, progress: bool = True) -> dict:
    """Stress and cubic elastic constants of a long plain run: the numbers to judge a model by.

    A training window's estimates come from a few correlated snapshots and scatter by
    10-20 %; this runs ``steps`` Langevin-middle steps (no gradients) with the dynamics of
    ``settings`` from the given state, and evaluates the stress-fluctuation formula over all
    ``steps // snapshot_every`` snapshots. The standard errors are those of the mean of
    ``blocks`` contiguous blocks, each evaluated on its own.

    Parameters
    ----------
    model : nn.Module
        ``model(positions (N, 3) nm, box (3, 3) nm[, atom_types]) -> energy`` kJ/mol, e.g.
        the ``model`` of an :class:`ElasticTrainingResult`.
    positions, velocities : array-like, shape (N, 3), nm and nm/ps
        Starting state (e.g. the final state of the training).
    box : array-like, shape (3, 3), nm
    masses : array-like, shape (N,), amu
    settings : ElasticTrainingSettings, optional
        Temperature, friction, timestep, seed and device.
    steps, snapshot_every, blocks : int
    start_step : int
        Index of the starting state in the noise stream.
    chunk : int
        Snapshots whose Born terms are evaluated together (memory only; same result).
    progress : bool
        Progress bars for the dynamics and the Born terms (on a terminal).

    Returns
    -------
    dict
        ``C11_GPa``, ``C12_GPa``, ``C44_GPa`` and their ``*_stderr_GPa``; ``stress_GPa``
        (6 Voigt components of the mean virial stress, kinetic part included) and
        ``stress_stderr_GPa``; ``temperature_K`` (mean kinetic temperature),
        ``n_snapshots``, ``steps``, ``seconds``.
    """
    settings = ElasticTrainingSettings() if settings is None else settings
    n_snapshots = steps // snapshot_every
    if snapshot_every <= 0 or n_snapshots < 2 * blocks or blocks < 2:
        raise InputError(f"evaluate_elastic needs at least 2 blocks of 2 snapshots: got "
                         f"steps={steps}, snapshot_every={snapshot_every}, blocks={blocks}")
    device = torch.device(settings.device)

    def tensor(value):
        return torch.as_tensor(np.asarray(value, dtype=float), dtype=DTYPE, device=device)

    x, v, box, masses = tensor(positions), tensor(velocities), tensor(box), tensor(masses)
    potential = MLPotential(model.to(device), masses=masses)
    integrator = LangevinMiddleIntegrator(settings.timestep, settings.friction,
                                          settings.temperature, settings.seed)
    start = time.perf_counter()
    frames, speeds = [], []
    step = start_step
    bar = dict(disable=not progress or None, leave=False)
    for _ in tqdm(range(n_snapshots), desc="evaluation run", unit="snapshot", **bar):
        x, v = integrator.run(potential, x, v, box, masses, snapshot_every, start_step=step)
        step += snapshot_every
        frames.append(x)
        speeds.append(v)
    frames, speeds = torch.stack(frames), torch.stack(speeds)
    pieces = []  # detached at once: each chunk's double-backward graph is freed before the next
    for k in tqdm(range(0, n_snapshots, chunk), desc="Born terms", unit="chunk", **bar):
        pieces.append([term.detach() for term in born_terms(potential, frames[k:k + chunk], box)])
    born_stress = torch.cat([p[0] for p in pieces])
    born = torch.cat([p[1] for p in pieces])

    def constants(rows) -> dict[str, float]:
        c = stress_fluctuation(born_stress[rows], born[rows], x.shape[0], box,
                               settings.temperature)
        return {k: float(value) for k, value in _cubic(c).items()}

    whole = constants(slice(None))
    size = n_snapshots // blocks
    per_block = [constants(slice(b * size, (b + 1) * size)) for b in range(blocks)]
    voigt = virial_voigt(born_stress, speeds, masses, box)
    block_stress = torch.stack([voigt[b * size:(b + 1) * size].mean(0) for b in range(blocks)])
    kinetic = (masses[None, :, None] * speeds ** 2).sum((1, 2)) / (3 * x.shape[0] * KB)
    result = {f"{k}_GPa": value for k, value in whole.items()}
    for k in whole:
        spread = np.std([block[k] for block in per_block], ddof=1)
        result[f"{k}_stderr_GPa"] = float(spread / math.sqrt(blocks))
    result.update({
        "stress_GPa": voigt.mean(0).tolist(),
        "stress_stderr_GPa": (block_stress.std(0) / math.sqrt(blocks)).tolist(),
        "temperature_K": float(kinetic.mean()),
        "n_snapshots": n_snapshots, "steps": steps,
        "seconds": time.perf_counter() - start})
    return result


@dataclass(frozen=True)
class ElasticTrainingSettings:
    """Dynamics, schedule and optimiser of :func:`train_elastic`.

    Parameters
    ----------
    temperature : float, K
    friction : float, 1/ps
    timestep : float, ps
    seed : int
        Initial velocities and the noise stream of the whole run.
    equilibration_steps : int
        Steps from the perfect crystal before the first window.
    epochs : int
        Reversible windows, one optimiser step each.
    decorrelation_steps : int
        Plain (non-differentiated) steps before each window.
    window_steps : int
        Steps of each reversible window.
    snapshot_every : int
        Steps between the window's loss snapshots (``window_steps // snapshot_every`` frames
        enter the averages).
    truncation : int or None
        Truncation of the adjoint, steps (None: exact gradient).
    resync_every : int or None
        Steps between stored states that resynchronise the reverse pass.
    learning_rate : float
        Adam step size of the neural model's parameters.
    prior_learning_rate : float
        Adam step size of the prior's parameters (relative scales for Stillinger–Weber).
    device : str
        Torch device of the run (``"cpu"``, ``"cuda"``).
    """

    temperature: float = 298.0
    friction: float = 4.0
    timestep: float = 0.0005
    seed: int = 0
    equilibration_steps: int = 2000
    epochs: int = 20
    decorrelation_steps: int = 0
    window_steps: int = 200
    snapshot_every: int = 10
    truncation: int | None = None
    resync_every: int | None = None
    learning_rate: float = 1e-3
    prior_learning_rate: float = 2e-3
    device: str = "cpu"

    def __post_init__(self):
        for name in ("equilibration_steps", "decorrelation_steps"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epochs", "window_steps", "snapshot_every"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window_steps // self.snapshot_every < 2:
            raise InputError(f"window_steps={self.window_steps} with snapshot_every="
                             f"{self.snapshot_every} gives fewer than 2 snapshots; the "
                             f"stress-fluctuation term needs several: lower snapshot_every")
        for name in ("learning_rate", "prior_learning_rate"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> ElasticTrainingSettings:
        """From a mapping such as a TOML ``[training]`` table; unknown keys raise InputError."""
        return _from_mapping(cls, mapping, "training")


@dataclass
class ElasticTrainingResult:
    """What :func:`train_elastic` returns.

    Attributes
    ----------
    model : EnergySum
        The trained prior + model as one contract model ``model(positions, box, atom_types)``
        (scriptable; export with ``openmm_reversible_plugin.create_force``).
    history : list of dict
        One record per epoch (the lines of ``log.jsonl``), loss and observables measured in
        that epoch's window, before its optimiser step.
    positions, velocities : torch.Tensor, shape (N, 3), nm and nm/ps
        State at the end of the run.
    step : int
        Global step index of that state.
    """

    model: EnergySum
    history: list[dict]
    positions: torch.Tensor
    velocities: torch.Tensor
    step: int


class _Objective:
    """``loss_fn`` of the windows; keeps the report of its last evaluation for the log."""

    def __init__(self, loss: Loss):
        self.loss = loss
        self.report: dict = {}

    def __call__(self, trajectory: Trajectory, potential: nn.Module) -> torch.Tensor:
        total, self.report = self.loss.evaluate(cubic_elastic_observables(trajectory, potential))
        return total


def _record(epoch: int, step: int, loss: torch.Tensor, objective: _Objective,
            sim: ReversibleSimulation, prior: nn.Module | None, parameters: list[torch.Tensor],
            seconds: float) -> dict:
    """One epoch's log record: plain numbers only."""
    report = objective.report
    traj = sim.trajectory
    temperature = 2.0 * float(traj.kinetic_energy().mean()) / (3 * traj.n_atoms * KB)
    gradient = torch.cat([p.grad.flatten() for p in parameters if p.grad is not None])
    record = {
        "epoch": epoch, "step": step, "loss": float(loss.detach()),
        "terms": {name: term.contribution for name, term in report.items()},
        "stress_GPa": [float(s) for s in report["stress"].value],
        "C11_GPa": float(report["C11"].value), "C12_GPa": float(report["C12"].value),
        "C44_GPa": float(report["C44"].value), "temperature_K": temperature,
        "gradient_norm": float(gradient.norm()),
        "reconstruction_error_nm": float(sim.info["reconstruction_error"]),
        "forward_s": float(sim.info["forward_s"]), "backward_s": float(sim.info["backward_s"]),
        "epoch_s": seconds,
    }
    if hasattr(prior, "parameter_dict"):
        record["prior"] = prior.parameter_dict()
    return record


def _summary(record: dict, epochs: int) -> str:
    normal = np.mean(record["stress_GPa"][:3])
    return (f"epoch {record['epoch'] + 1}/{epochs}  loss {record['loss']:.4g}  mean normal "
            f"stress {normal:+.3g} GPa  C11 {record['C11_GPa']:.4g}  C12 {record['C12_GPa']:.4g}"
            f"  C44 {record['C44_GPa']:.4g} GPa  T {record['temperature_K']:.1f} K  "
            f"{record['epoch_s']:.1f} s")


RESUMABLE = ("epochs", "decorrelation_steps", "window_steps", "snapshot_every", "truncation",
             "resync_every", "learning_rate", "prior_learning_rate", "device")
"""Settings a resumed run may change: the schedule, the step sizes and the device. The
dynamics (temperature, friction, timestep, seed, equilibration) are fixed by the checkpoint."""


def _settings_difference(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Keys whose values differ: (those a resumed run may change, those it may not)."""
    changed = sorted(k for k in current if saved.get(k) != current[k])
    return ([k for k in changed if k in RESUMABLE], [k for k in changed if k not in RESUMABLE])


def train_elastic(model: nn.Module, positions, box, masses, prior: nn.Module | None = None,
                  targets: ElasticTargets | None = None,
                  settings: ElasticTrainingSettings | None = None,
                  output: str | os.PathLike | None = None, resume: bool = False
                  ) -> ElasticTrainingResult:
    """Train ``prior + model`` so that the crystal has zero stress and the target constants.

    Parameters
    ----------
    model : nn.Module
        Neural potential following the contract of :mod:`.contract`, called as
        ``model(positions, box, atom_types)`` (e.g. :class:`~.schnet.SchNet`).
    positions : array-like, shape (N, 3), nm
        The crystal at the target lattice constant (e.g. :func:`~.diamond.diamond_lattice`).
    box : array-like, shape (3, 3), nm
        Its periodic box (fixed: the targets are defined at this lattice constant).
    masses : array-like, shape (N,), amu
    prior : nn.Module, optional
        Physical prior with the same signature (e.g. :class:`~.stillinger_weber.StillingerWeber`),
        trained with ``settings.prior_learning_rate``.
    targets : ElasticTargets, optional
        Default: diamond (zero stress, C11/C12/C44 = 1079/124/578 GPa).
    settings : ElasticTrainingSettings, optional
        Dynamics, schedule and optimiser; default the class defaults.
    output : path, optional
        Directory for ``log.jsonl``, ``checkpoint.pt`` and ``model.pt`` (created if absent).
    resume : bool
        Continue from ``output/checkpoint.pt``. With the same settings (``epochs`` aside) the
        result equals an uninterrupted run; the keys of :data:`RESUMABLE` (schedule, learning
        rates, device) may change, e.g. to continue with longer windows and smaller steps.

    Returns
    -------
    ElasticTrainingResult

    Raises
    ------
    InputError
        Bad shapes, an output directory that already holds a checkpoint without
        ``resume=True``, or a checkpoint written with other settings.
    TrainingFailed
        A window gives a non-finite loss or gradient (the message names the epoch).
    """
    targets = ElasticTargets() if targets is None else targets
    settings = ElasticTrainingSettings() if settings is None else settings
    device = torch.device(settings.device)
    x = torch.as_tensor(np.asarray(positions, dtype=float), dtype=DTYPE, device=device)
    box = torch.as_tensor(np.asarray(box, dtype=float), dtype=DTYPE, device=device)
    masses = torch.as_tensor(np.asarray(masses, dtype=float), dtype=DTYPE, device=device)
    if x.ndim != 2 or x.shape[1] != 3 or masses.shape != (x.shape[0],) or box.shape != (3, 3):
        raise InputError(f"need positions (N, 3), masses (N,) and box (3, 3); got "
                         f"{tuple(x.shape)}, {tuple(masses.shape)} and {tuple(box.shape)}")
    combined = EnergySum([m for m in (prior, model) if m is not None]).to(device)
    potential = MLPotential(combined, masses=masses)
    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr}
              for module, lr in ((prior, settings.prior_learning_rate),
                                 (model, settings.learning_rate)) if module is not None]
    groups = [g for g in groups if g["params"]]
    trainable = [p for g in groups for p in g["params"]]
    if not trainable:
        raise InputError("neither the model nor the prior has parameters that require grad")
    optimizer = torch.optim.Adam(groups)
    integrator = LangevinMiddleIntegrator(settings.timestep, settings.friction,
                                          settings.temperature, settings.seed)
    objective = _Objective(targets.loss())
    directory = None if output is None else Path(output)
    history: list[dict] = []
    checkpoint = None if directory is None else directory / CHECKPOINT
    if checkpoint is not None and checkpoint.exists() and not resume:
        raise InputError(f"{checkpoint} exists; pass resume=True to continue that run or "
                         f"choose another output directory")
    if resume and (checkpoint is None or not checkpoint.exists()):
        raise InputError(f"resume=True but there is no checkpoint "
                         f"{checkpoint or '(no output directory given)'}")

    if resume:
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        allowed, refused = _settings_difference(saved["settings"], asdict(settings))
        if refused or saved["targets"] != asdict(targets):
            raise InputError(f"{checkpoint} was written with other settings or targets "
                             f"(changed: {refused or 'targets'}); resume with the same ones "
                             f"(only {', '.join(RESUMABLE)} may change) or start a new "
                             f"output directory")
        combined.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        for group, fresh in zip(optimizer.param_groups, groups, strict=True):
            group["lr"] = fresh["lr"]  # the checkpoint's moments, this run's step sizes
        changes = [f"{k} {saved['settings'].get(k)} -> {getattr(settings, k)}"
                   for k in allowed if k != "epochs"]
        if changes:
            logger.info("resuming with changed settings: %s", ", ".join(changes))
        x, v, step = saved["positions"], saved["velocities"], int(saved["step"])
        history = list(saved["history"])
    else:
        # Velocities at 2T: started from its energy minimum, a crystal shares kinetic energy
        # equally with potential energy (equipartition of a harmonic solid), so it settles
        # near T within a few vibrations instead of the thermostat's 1/γ.
        generator = torch.Generator().manual_seed(settings.seed)
        v = (torch.randn(x.shape, dtype=DTYPE, generator=generator).to(device)
             * torch.sqrt(2.0 * integrator.kT / masses)[:, None])
        x, v = integrator.run(potential, x, v, box, masses, settings.equilibration_steps)
        step = settings.equilibration_steps
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    for epoch in range(len(history), settings.epochs):
        start = time.perf_counter()
        if settings.decorrelation_steps:
            x, v = integrator.run(potential, x, v, box, masses, settings.decorrelation_steps,
                                  start_step=step)
            step += settings.decorrelation_steps
        sim = ReversibleSimulation(potential, integrator, settings.window_steps,
                                   settings.snapshot_every, objective,
                                   truncation=settings.truncation,
                                   resync_every=settings.resync_every)
        optimizer.zero_grad()
        loss = sim(x, v, box, start_step=step)
        loss.backward()
        finite = bool(torch.isfinite(loss)) and all(
            bool(torch.isfinite(p.grad).all()) for p in trainable if p.grad is not None)
        if not finite:
            raise TrainingFailed(f"epoch {epoch + 1}: the window starting at step {step} gave "
                                 f"a non-finite loss or gradient (loss {float(loss)}); lower "
                                 f"the learning rates or the timestep")
        x, v = sim.final_state
        step += settings.window_steps
        record = _record(epoch, step, loss, objective, sim, prior, trainable,
                         time.perf_counter() - start)
        optimizer.step()
        history.append(record)
        logger.info(_summary(record, settings.epochs))
        if directory is not None:
            _save(directory, combined, optimizer, x, v, step, history, settings, targets)
    if directory is not None:
        scripted = torch.jit.script(combined)
        atomic_write(directory / MODEL_FILE, lambda path: torch.jit.save(scripted, path))
    return ElasticTrainingResult(model=combined, history=history, positions=x, velocities=v,
                                 step=step)


def _save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
          x: torch.Tensor, v: torch.Tensor, step: int, history: list[dict],
          settings: ElasticTrainingSettings, targets: ElasticTargets) -> None:
    """Write ``log.jsonl`` and ``checkpoint.pt`` atomically."""
    atomic_write_text(directory / LOG, "".join(json.dumps(r) + "\n" for r in history))
    state = {"version": CHECKPOINT_VERSION, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "positions": x, "velocities": v,
             "step": step, "history": history, "settings": asdict(settings),
             "targets": asdict(targets)}
    atomic_write(directory / CHECKPOINT, lambda path: torch.save(state, path))
