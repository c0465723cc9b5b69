"""Crystal systems: a machine-learning potential trained to the stress and elastic constants of
a crystal, by the one training loop of :class:`~openmm_reversible.train.Trainer`.

A config whose ``[[systems]]`` have ``kind = "crystal"`` (:mod:`openmm_reversible.config`)
fits the neural model of ``[model]`` plus the physical prior of ``[prior]`` (usually
Stillinger–Weber) so that each crystal, in its fixed box at each of its temperatures, has the
target stress and cubic elastic constants C11, C12, C44 (the solid-state application of the
reversible simulation paper: diamond from scratch). :class:`CrystalTrainer` is the trainer's
leg kind for them: the epochs, the retries on failure, the optimiser step, checkpoints,
``log.jsonl``, ``training.png`` and resume are :class:`~openmm_reversible.train.Trainer`'s
own; what differs is where the dynamics run and what is trained.

- Each (crystal system, temperature) is a leg. It starts from the perfect lattice with
  Maxwell–Boltzmann velocities at twice the temperature (half of that kinetic energy flows
  into the lattice vibrations' potential energy) and, before the first epoch, runs
  ``crystal.equilibration_steps`` torch Langevin-middle steps.
- One epoch, for each leg: ``schedule.equilibration_steps`` plain steps, then for each of
  ``schedule.windows`` windows ``schedule.bulk_steps`` plain steps and one reversible window
  (:class:`~openmm_reversible.integrators.ReversibleSimulation`) whose loss is computed from
  its snapshots; ``loss / windows`` is back-propagated, which runs the dynamics backward and
  fills the gradients of the prior and the model. The noise of an epoch is seeded by
  ``(leg seed, epoch, attempt)``, so a retry draws new noise and a resumed fit repeats the
  uninterrupted one. Then one optimiser step, with the learning rates of ``[model]`` and
  ``[prior]``.
- The dynamics are torch float64 code on ``model.device``, not OpenMM: the model is the
  potential, and every step is repeatable bit for bit on a given device.

The loss of a window (:class:`ElasticObjective`) is ``Σ weight · ((x − value) / tolerance)²``
over the leg's targets, x from
:func:`~openmm_reversible.observables.elastic.cubic_elastic_observables` over the window's
snapshots (the stress a mean over its six Voigt components). The constants depend on the
parameters directly (Born term, a third derivative of the energy) and through the snapshots
(the reversible adjoint); both reach the gradient.

After every epoch the output directory holds ``checkpoint.pt`` (model, optimiser, each leg's
state, records), ``log.jsonl``, ``training.png`` and ``model.pt`` (prior + model as one
TorchScript contract model), written together atomically. After the last epoch,
:meth:`CrystalTrainer.evaluate` runs ``[evaluation]``: one long plain run per leg whose
stress and constants carry block standard errors (:func:`evaluate_elastic`), and
:func:`export_crystal` writes the ForceField XML with the model embedded and an OpenMM System
of each crystal, and checks that OpenMM's energy equals the model's.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import app, unit
from tqdm.auto import tqdm

from .config import MODELS, PRIORS, FitConfig, StatePoint
from .errors import InputError
from .files import atomic_write_all, atomic_write_text, text_writer
from .geometry import NeighborList
from .integrators import LangevinMiddleIntegrator, ReversibleSimulation
from .losses import Loss, Target
from .ml import EnergySum, MLPotential, PairSearch, diamond_lattice, diamond_topology
from .observables.blocking import block_slices
from .observables.elastic import (
    born_terms,
    cubic_constants,
    cubic_elastic_frames,
    cubic_elastic_from_frames,
    stress_fluctuation,
    virial_voigt,
)
from .sampler import SimulationExploded
from .train import (
    BLOCKS_PER_WINDOW,
    CHECKPOINT,
    CHECKPOINT_VERSION,
    LOG,
    PLOT,
    NonFiniteGradient,
    Panel,
    Trainer,
    TrainingFailed,
    TrainResult,
    plot_training,
    pooled_stderr,
)
from .trajectory import Trajectory
from .units import DTYPE, KB

MODEL_FILE = "model.pt"
"""TorchScript file of the trained prior + model, written with every checkpoint."""
FORCEFIELD_FILE = "forcefield.xml"
"""ForceField XML with the trained model embedded (:func:`export_crystal`)."""
EVALUATION_FILE = "evaluation.json"
"""The report of :meth:`CrystalTrainer.evaluate`."""
EXPORT_FILE = "export.json"
"""What :func:`export_crystal` wrote and the energies it compared."""
EXPORT_TOLERANCE = 1e-8
"""Largest relative difference between OpenMM's energy of an exported crystal and the model's
that :func:`export_crystal` accepts (both are the same float64 TorchScript code)."""


def crystal_structure(point: StatePoint) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Perfect-lattice positions (N, 3) nm, box (3, 3) nm and masses (N,) amu of the crystal
    of a state point of a crystal fit."""
    crystal = point.config.crystals[0].crystal
    positions, box = diamond_lattice(crystal.n_cells, crystal.lattice_constant)
    return positions, box, np.full(len(positions), float(crystal.mass))


def build_models(config: FitConfig) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The neural model of ``[model]`` and the prior of ``[prior]`` (None without one).

    A model with a ``standardize`` method (Behler–Parrinello) is standardized on the first
    crystal's perfect lattice, so that its network sees relative changes of its environment.
    """
    model = MODELS[config.model.kind](**config.model.arguments)
    if hasattr(model, "standardize"):
        positions, box, _ = crystal_structure(config.state_points()[0])
        model.standardize(positions, box)
    prior = (None if config.prior is None
             else PRIORS[config.prior.kind](**config.prior.arguments))
    return model, prior


class ElasticObjective:
    """The loss of a crystal leg's targets, as a ``loss_fn(trajectory, potential)``.

    After each call, :attr:`last_terms` holds each weighted term and :attr:`last_observables`
    each observable (GPa; the stress as its six Voigt components) for logs and plots, and
    :meth:`blocks` gives them on contiguous blocks of the window's snapshots.
    """

    def __init__(self, targets):
        self.targets = list(targets)
        self.loss = Loss([Target(t.observable,
                                 np.full(6, t.value) if t.observable == "stress" else t.value,
                                 weight=t.weight / t.scale ** 2, units=t.units, name=t.label)
                          for t in self.targets])
        self.last_terms: dict[str, float] = {}
        self.last_observables: dict[str, object] = {}
        self._frames: tuple | None = None

    def __call__(self, traj: Trajectory, potential) -> torch.Tensor:
        frames = cubic_elastic_frames(traj, potential)
        self._frames = (*[f.detach() for f in frames], traj.n_atoms, traj.box.detach(),
                        traj.temperature)
        total, report = self.loss.evaluate(cubic_elastic_from_frames(
            *frames, traj.n_atoms, traj.box, traj.temperature))
        self.last_terms = {name: r.contribution for name, r in report.items()}
        self.last_observables = {name: r.value.tolist() if r.value.ndim else float(r.value)
                                 for name, r in report.items()}
        return total

    def blocks(self, n_blocks: int = BLOCKS_PER_WINDOW) -> dict[str, list]:
        """Each target's observable on ``n_blocks`` contiguous blocks of the last window's
        snapshots (fewer with fewer snapshots), from the terms that window computed; numbers
        for standard errors, not differentiable."""
        born_stress, born, stress, n_atoms, box, temperature = self._frames
        n = min(n_blocks, born_stress.shape[0])
        values: dict[str, list] = {t.label: [] for t in self.targets}
        if n < 2:
            return values
        for part in block_slices(born_stress.shape[0], n):
            block = cubic_elastic_from_frames(born_stress[part], born[part], stress[part],
                                              n_atoms, box, temperature)
            for t in self.targets:
                value = block[t.observable]
                values[t.label].append(value.tolist() if value.ndim else float(value))
        return values


@dataclass
class CrystalState:
    """Where a crystal leg's next epoch starts: positions and velocities (N, 3), nm and
    nm/ps, and the torch steps run so far."""

    positions: np.ndarray
    velocities: np.ndarray
    step: int = 0


@dataclass
class CrystalLeg:
    """One (crystal system, temperature) of a crystal fit.

    Attributes
    ----------
    point : StatePoint
        Its config holds this crystal at this temperature alone.
    potential : MLPotential
        The fit's prior + model with this crystal's masses.
    box : torch.Tensor, shape (3, 3), nm
    masses : torch.Tensor, shape (N,), amu
    objective : ElasticObjective
    state : CrystalState or None
    equilibration : dict or None
        How the equilibration before the first epoch went; None until it ran.
    """

    point: StatePoint
    potential: MLPotential
    box: torch.Tensor
    masses: torch.Tensor
    objective: ElasticObjective
    state: CrystalState | None = None
    equilibration: dict | None = None

    @property
    def temperature(self) -> float:
        return self.point.temperature

    def integrator(self, seed: int) -> LangevinMiddleIntegrator:
        sim = self.point.config.simulation
        return LangevinMiddleIntegrator(sim.timestep, sim.friction, self.temperature, seed)

    def kinetic_temperature(self, velocities: torch.Tensor) -> float:
        """Instantaneous temperature of ``velocities`` (N, 3) nm/ps, K (3N degrees)."""
        return float((self.masses[:, None] * velocities ** 2).sum()
                     / (3 * velocities.shape[0] * KB))


def torch_device(name: str) -> torch.device:
    """The torch device of ``model.device``, refused when torch cannot use it."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"model.device = {name!r}: torch sees no CUDA device; set "
                         "model.device = \"cpu\" (e.g. examples/diamond/diamond_cpu.toml)")
    return device


class CrystalTrainer(Trainer):
    """The trainer of a config with crystal systems (see the module docstring).

    Parameters
    ----------
    config : FitConfig
        A validated configuration with ``crystals``.
    output : path
        Output directory; created if missing.
    resume : bool
        Continue from ``output/checkpoint.pt`` (only ``schedule.epochs`` may change, as for
        every fit).
    progress : bool
        Show progress bars.

    Attributes
    ----------
    model : EnergySum
        Prior + model (one contract model ``model(positions, box)``), the trained module.
    legs : list of CrystalLeg
    """

    CHECKPOINT_ENTRIES = ("version", "epoch", "model", "optimizer", "records", "state",
                          "config")

    def __init__(self, config: FitConfig, output, resume: bool = False, progress: bool = True):
        if not config.crystals:
            raise InputError("CrystalTrainer needs a config with crystal systems ([[systems]] "
                             "with kind = \"crystal\"); use Trainer for the others")
        self.config = config
        self.engine = None
        self._owns_engine = False
        self.output = Path(output)
        self.progress = progress
        checkpoint = self._open_checkpoint(resume)
        self.device = torch_device(config.model.device)
        network, prior = build_models(config)
        self.model = EnergySum([m for m in (prior, network) if m is not None]).to(self.device)
        self.prior = prior
        self.legs = [self._crystal_leg(point) for point in config.state_points()]
        sched = config.schedule
        groups = [{"params": [p for p in module.parameters() if p.requires_grad],
                   "lr": rate or sched.learning_rate}
                  for module, rate in ((prior, config.prior and config.prior.learning_rate),
                                       (network, config.model.learning_rate))
                  if module is not None]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise InputError("model: neither the model nor the prior has trainable parameters")
        self.trainable = [p for g in groups for p in g["params"]]
        optimizer_cls = torch.optim.Adam if sched.optimizer == "adam" else torch.optim.SGD
        self.optimizer = optimizer_cls(groups)
        self._begin(checkpoint)

    def _crystal_leg(self, point: StatePoint) -> CrystalLeg:
        positions, box, masses = crystal_structure(point)
        masses = torch.as_tensor(masses, dtype=DTYPE, device=self.device)
        return CrystalLeg(point, MLPotential(self.model, masses=masses),
                          torch.as_tensor(box, dtype=DTYPE, device=self.device), masses,
                          ElasticObjective(point.config.crystals[0].targets))

    def _initial_state(self, leg: CrystalLeg) -> CrystalState:
        """The perfect lattice, velocities at twice the temperature from the leg's seed: started
        from its energy minimum, a crystal shares kinetic energy equally with potential energy
        (equipartition of a harmonic solid), so it settles near T within a few vibrations
        instead of the thermostat's 1/γ."""
        positions, _, _ = crystal_structure(leg.point)
        generator = torch.Generator().manual_seed(leg.point.config.simulation.seed)
        kT = KB * leg.temperature
        v = (torch.randn(positions.shape, dtype=DTYPE, generator=generator)
             * torch.sqrt(2.0 * kT / leg.masses.cpu())[:, None])
        return CrystalState(positions, v.numpy())

    def _tensors(self, state: CrystalState) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.as_tensor(state.positions, dtype=DTYPE, device=self.device),
                torch.as_tensor(state.velocities, dtype=DTYPE, device=self.device))

    def _state(self, x: torch.Tensor, v: torch.Tensor, step: int) -> CrystalState:
        return CrystalState(x.detach().cpu().numpy(), v.detach().cpu().numpy(), step)

    def _plain_steps(self, leg: CrystalLeg, integrator, x, v, n_steps: int, start: int,
                     global_step: int):
        """``n_steps`` plain steps from step ``start`` of the integrator's stream; refused as an
        explosion when the state turns non-finite or hotter than ``failure.max_temperature``."""
        if n_steps == 0:
            return x, v
        x, v = integrator.run(leg.potential, x, v, leg.box, leg.masses, n_steps,
                              start_step=start)
        limit = self.config.failure.max_temperature or 3.0 * leg.temperature
        temperature = leg.kinetic_temperature(v)
        if not (bool(torch.isfinite(x).all()) and math.isfinite(temperature)):
            raise SimulationExploded(global_step + n_steps, f"{leg.point.label}: non-finite "
                                     "positions or velocities (torch dynamics)")
        if temperature > limit:
            raise SimulationExploded(global_step + n_steps, f"{leg.point.label}: temperature "
                                     f"{temperature:.1f} K > {limit:g} K (torch dynamics)")
        return x, v

    # -- the trainer's hooks --------------------------------------------------------------------

    def _equilibrate(self) -> dict[str, dict]:
        """Before the first epoch: ``crystal.equilibration_steps`` plain steps of each leg."""
        report = {}
        for leg in self.legs:
            steps = leg.point.config.crystals[0].crystal.equilibration_steps
            if not steps or leg.equilibration is not None:
                continue
            start = time.perf_counter()
            x, v = self._tensors(leg.state)
            try:
                x, v = self._plain_steps(leg, leg.integrator(self._seed(leg, 0)), x, v, steps,
                                         0, leg.state.step)
            except SimulationExploded as exc:
                raise TrainingFailed(f"equilibration before the first epoch: {exc}; nothing "
                                     "was written") from None
            leg.state = self._state(x, v, leg.state.step + steps)
            leg.equilibration = {"steps": steps, "seconds": time.perf_counter() - start,
                                 "temperature_K": leg.kinetic_temperature(v)}
            report[leg.point.label] = leg.equilibration
        return report

    def _attempt(self, attempt: int) -> dict:
        """Plain steps, windows and gradient of the current epoch; the epoch's record."""
        sched = self.config.schedule
        epoch = self.epoch + 1
        self.optimizer.zero_grad(set_to_none=True)
        timings = {"dynamics_s": 0.0, "forward_s": 0.0, "backward_s": 0.0}
        totals, ends = [], []
        for leg in self.legs:
            self._fresh_neighbor_lists()
            integrator = leg.integrator(self._seed(leg, epoch, attempt))
            x, v = self._tensors(leg.state)
            step = 0
            t = time.perf_counter()
            x, v = self._plain_steps(leg, integrator, x, v, sched.equilibration_steps, step,
                                     leg.state.step)
            step += sched.equilibration_steps
            leg_totals = {"loss": 0.0, "terms": {}, "observables": {}, "blocks": {},
                          "reconstruction_error": 0.0, "temperature_K": 0.0}
            for w in range(sched.windows):
                x, v = self._plain_steps(leg, integrator, x, v, sched.bulk_steps, step,
                                         leg.state.step + step)
                step += sched.bulk_steps
                timings["dynamics_s"] += time.perf_counter() - t
                x, v = self._window(leg, integrator, x, v, step, w, epoch, leg_totals,
                                    timings)
                step += sched.window_steps
                t = time.perf_counter()
            timings["dynamics_s"] += time.perf_counter() - t
            totals.append(leg_totals)
            ends.append(self._state(x, v, leg.state.step + step))
        grads = [p.grad.flatten() for p in self.trainable if p.grad is not None]
        gradient = torch.cat(grads) if grads else torch.zeros(0, dtype=DTYPE)
        record = {
            "epoch": epoch, "loss": sum(t["loss"] for t in totals),
            "terms": {leg.point.key(n): v for leg, t in zip(self.legs, totals, strict=True)
                      for n, v in t["terms"].items()},
            "observables": {leg.point.key(n): np.asarray(v).tolist()
                            for leg, t in zip(self.legs, totals, strict=True)
                            for n, v in t["observables"].items()},
            "stderr": {leg.point.key(n): pooled_stderr(b)
                       for leg, t in zip(self.legs, totals, strict=True)
                       for n, b in t["blocks"].items()},
            "parameters": self._parameter_values(),
            "gradient_norm": float(gradient.norm()),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "learning_rates": [g["lr"] for g in self.optimizer.param_groups],
            "attempts": attempt + 1,
            "reconstruction_error": max(t["reconstruction_error"] for t in totals),
            "state_points": {
                leg.point.label: {"system": leg.point.system,
                                  "temperature": leg.temperature, "loss": t["loss"],
                                  "reconstruction_error": t["reconstruction_error"],
                                  "temperature_K": t["temperature_K"], "step": end.step}
                for leg, t, end in zip(self.legs, totals, ends, strict=True)},
        }
        # Per leg, its chains' end states (a crystal leg has one chain: no replicas).
        record.update(end_states=[[end] for end in ends], frames=[[] for _ in self.legs],
                      timings=timings)
        return record

    def _fresh_neighbor_lists(self) -> None:
        """New neighbour lists, built from the state a leg's epoch starts from: the lists of
        a resumed fit are new, and a list built elsewhere holds other candidate pairs, whose
        sums round differently; so an epoch gives the same bits resumed or not."""
        for module in self.model.modules():
            if isinstance(module, PairSearch):
                module.verlet = NeighborList(module.cutoff, module.verlet.skin)

    def _window(self, leg: CrystalLeg, integrator, x, v, step: int, index: int, epoch: int,
                totals: dict, timings: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One reversible window of ``leg`` from (x, v) at step ``step`` of the integrator's
        stream; its loss / windows back-propagated into the parameters' gradients and its
        numbers added to ``totals``; returns its end state."""
        windows = self.config.schedule.windows
        sched = self.config.schedule
        sim = ReversibleSimulation(leg.potential, integrator, sched.window_steps,
                                   sched.snapshot_every, leg.objective,
                                   truncation=sched.truncation, resync_every=sched.resync_every)
        loss = sim(x, v, leg.box, start_step=step)
        name = f"reversible window {index + 1} of {leg.point.label}"
        if not bool(torch.isfinite(loss)) or not bool(
                torch.isfinite(sim.trajectory.positions).all()):
            raise SimulationExploded(leg.state.step + step, f"{name} became non-finite "
                                     f"(loss {float(loss.detach())})")
        (loss / windows).backward()
        bad = [f"{n} ({g})" for n, g in self._gradients().items() if not math.isfinite(g)]
        if bad:
            raise NonFiniteGradient(
                f"epoch {epoch}: {name} gave a non-finite gradient of {', '.join(bad[:5])}; "
                f"the fit stops before any optimiser step; the last good model is kept in "
                f"{self.output}. Lower the learning rates or the timestep")
        totals["loss"] += float(loss.detach()) / windows
        for label, value in leg.objective.last_terms.items():
            totals["terms"][label] = totals["terms"].get(label, 0.0) + value / windows
        for label, value in leg.objective.last_observables.items():
            part = np.asarray(value, dtype=float) / windows
            acc = totals["observables"].get(label)
            totals["observables"][label] = part if acc is None else acc + part
        for label, values in leg.objective.blocks().items():
            totals["blocks"].setdefault(label, []).extend(values)
        kinetic = float(sim.trajectory.kinetic_energy().mean())
        totals["temperature_K"] += 2.0 * kinetic / (3 * leg.masses.shape[0] * KB) / windows
        totals["reconstruction_error"] = max(totals["reconstruction_error"],
                                             float(sim.info["reconstruction_error"]))
        for key in ("forward_s", "backward_s"):
            timings[key] += float(sim.info[key])
        return sim.final_state

    def _gradients(self) -> dict[str, float]:
        """The largest-magnitude gradient entry of each trainable tensor, by parameter name
        (NaN or inf where one is not finite)."""
        found = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                g = p.grad.detach()
                finite = bool(torch.isfinite(g).all())
                found[name] = float(g.abs().max()) if finite else float(
                    g[~torch.isfinite(g)].flatten()[0])
        return found

    def _parameter_values(self) -> dict[str, float]:
        """The prior's parameters by name (its ``parameter_dict``) and the norm of the
        network's weights."""
        values = dict(self.prior.parameter_dict()) if hasattr(self.prior, "parameter_dict") \
            else {}
        weights = [p.detach().flatten() for p in self.model[-1].parameters()]
        values["network_weight_norm"] = float(torch.cat(weights).norm()) if weights else 0.0
        return values

    def _describe_parameters(self) -> str:
        return ", ".join(f"{k} = {v:.6g}" for k, v in self._parameter_values().items())

    def _parameter_state(self) -> dict:
        return copy.deepcopy(self.model.state_dict())

    def _set_parameter_state(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def _constrain_parameters(self) -> None:
        """Nothing to clip: the prior's scales and the network's weights are unbounded."""

    def _checkpoint(self) -> dict:
        states = [{"positions": torch.from_numpy(leg.state.positions),
                   "velocities": torch.from_numpy(leg.state.velocities),
                   "step": leg.state.step} for leg in self.legs]
        return {"version": CHECKPOINT_VERSION, "epoch": self.epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "records": self.records, "state": states, "config": self._saved_config()}

    def _load_checkpoint(self, checkpoint: dict) -> None:
        path = self.output / CHECKPOINT
        try:
            self.model.load_state_dict(checkpoint["model"])
        except (RuntimeError, KeyError) as exc:
            raise InputError(f"{path}: its model does not fit the config's [model] and "
                             f"[prior] ({' '.join(str(exc).split())[:200]}); pass the config "
                             "the fit used, or start a new fit") from None
        states = checkpoint["state"]
        if len(states) != len(self.legs):
            raise InputError(f"{path} holds {len(states)} state points but the config has "
                             f"{len(self.legs)}; pass the config the fit used, or start a new "
                             "fit")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch = int(checkpoint["epoch"])
        self.records = list(checkpoint["records"])
        for leg, s in zip(self.legs, states, strict=True):
            leg.state = CrystalState(s["positions"].numpy(), s["velocities"].numpy(),
                                     int(s["step"]))
            leg.equilibration = {}  # the checkpoint's states are past it

    def _save(self, frames) -> None:
        """Checkpoint, log, plot and TorchScript model: all of these written, or none."""
        self.output.mkdir(parents=True, exist_ok=True)
        scripted = torch.jit.script(self.model)
        atomic_write_all([
            (self.output / CHECKPOINT, lambda tmp: torch.save(self._checkpoint(), tmp)),
            (self.output / LOG, text_writer("".join(json.dumps(r) + "\n"
                                                    for r in self.records))),
            (self.output / PLOT, lambda tmp: plot_training(self.records, self.panels(), tmp)),
            (self.output / MODEL_FILE, lambda tmp: torch.jit.save(scripted, tmp))])

    def panels(self) -> list[Panel]:
        return [Panel(leg.point.key(t.label), t) for leg in self.legs
                for t in leg.objective.targets]

    def _result(self) -> TrainResult:
        return TrainResult(records=self.records, parameters=self._parameter_values(),
                           files={"model": self.output / MODEL_FILE, "log": self.output / LOG,
                                  "checkpoint": self.output / CHECKPOINT,
                                  "plot": self.output / PLOT})

    # -- after the fit --------------------------------------------------------------------------

    def evaluate(self, chunk: int = 16) -> dict[str, dict]:
        """The ``[evaluation]`` run of every leg from its current state (:func:`evaluate_elastic`;
        seeded by the leg's seed, apart from the epochs' streams), written to
        ``evaluation.json``; the reports keyed by state-point label."""
        ev = self.config.evaluation
        if ev.steps <= 0:
            raise InputError("evaluation.steps: 0, no evaluation run asked for; set "
                             "[evaluation] steps (e.g. 10000)")
        reports = {}
        for leg in self.legs:
            sim = leg.point.config.simulation
            reports[leg.point.label] = evaluate_elastic(
                self.model, leg.state.positions, leg.state.velocities, leg.box, leg.masses,
                temperature=leg.temperature, friction=sim.friction, timestep=sim.timestep,
                seed=self._seed(leg, 0, 1), steps=ev.steps, snapshot_every=ev.snapshot_every,
                blocks=ev.blocks, chunk=chunk, progress=self.progress)
        atomic_write_text(self.output / EVALUATION_FILE, json.dumps(reports, indent=1) + "\n")
        return reports


def evaluate_elastic(model: torch.nn.Module, positions, velocities, box, masses,
                     temperature: float, friction: float, timestep: float, seed: int = 0,
                     steps: int = 20000, snapshot_every: int = 20, blocks: int = 5,
                     start_step: int = 0, chunk: int = 16, progress: bool = True) -> dict:
    """Stress and cubic elastic constants of a long plain run: the numbers to judge a model by.

    A training window's estimates come from a few correlated snapshots and scatter by
    10-20 %; this runs ``steps`` Langevin-middle steps (no gradients) from the given state and
    evaluates the stress-fluctuation formula over all ``steps // snapshot_every`` snapshots.
    The standard errors are those of the mean of ``blocks`` contiguous blocks, each evaluated
    on its own.

    Parameters
    ----------
    model : nn.Module
        ``model(positions (N, 3) nm, box (3, 3) nm) -> energy`` kJ/mol, twice differentiable.
    positions, velocities : array-like, shape (N, 3), nm and nm/ps
        Starting state (e.g. the final state of the training).
    box : array-like, shape (3, 3), nm
    masses : array-like, shape (N,), amu
    temperature : float, K
    friction : float, 1/ps
    timestep : float, ps
    seed : int
        Seed of the run's noise.
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
    n_snapshots = steps // snapshot_every if snapshot_every > 0 else 0
    if snapshot_every <= 0 or n_snapshots < 2 * blocks or blocks < 2:
        raise InputError(f"evaluate_elastic needs at least 2 blocks of 2 snapshots: got "
                         f"steps={steps}, snapshot_every={snapshot_every}, blocks={blocks}")
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    def tensor(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to(dtype=DTYPE, device=device)
        return torch.as_tensor(np.asarray(value, dtype=float), dtype=DTYPE, device=device)

    x, v, box, masses = tensor(positions), tensor(velocities), tensor(box), tensor(masses)
    potential = MLPotential(model, masses=masses)
    integrator = LangevinMiddleIntegrator(timestep, friction, temperature, seed)
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
        c = stress_fluctuation(born_stress[rows], born[rows], x.shape[0], box, temperature)
        return {k: float(value) for k, value in cubic_constants(c).items()}

    whole = constants(slice(None))
    per_block = [constants(part) for part in block_slices(n_snapshots, blocks)]
    voigt = virial_voigt(born_stress, speeds, masses, box)
    block_stress = torch.stack([voigt[part].mean(0) for part in block_slices(n_snapshots,
                                                                             blocks)])
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


def openmm_energy(system: openmm.System, positions: np.ndarray, box: np.ndarray) -> float:
    """Potential energy (kJ/mol) of ``positions`` (nm) in ``box`` (nm) on OpenMM's Reference
    platform."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.asarray(box)])
    context.setPositions(positions)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)


def export_crystal(trainer: CrystalTrainer,
                   write_forcefield: Callable[[str, torch.nn.Module, dict], None]) -> dict:
    """Export a crystal fit into OpenMM and check it.

    Writes ``forcefield.xml`` (a ForceField whose learned-potential tag embeds the trained
    prior + model), builds each crystal system's OpenMM System from it with
    ``ForceField.createSystem`` and writes it (``system.xml``, or ``<name>_system.xml`` with
    several crystal systems), then compares OpenMM's energy of each leg's current state with
    the model's. The report goes to ``export.json``.

    Parameters
    ----------
    trainer : CrystalTrainer
        After its epochs.
    write_forcefield : callable
        ``write_forcefield(path, model, {element: (type name, mass amu, type index)})``: the
        writer of the learned-potential ForceField tag (``openmm_reversible_plugin``'s,
        passed in by the command layer: the library does not import the plugin). Loading
        the file imports the plugin through the file's own initialisation script.

    Returns
    -------
    dict
        ``forcefield`` and ``systems`` (paths), ``energies`` ({label: {"torch", "openmm",
        "relative_difference"}}, kJ/mol).

    Raises
    ------
    TrainingFailed
        If an OpenMM energy differs from the model's by more than :data:`EXPORT_TOLERANCE`
        (relative); the files stay for inspection.
    """
    output = trainer.output
    model = copy.deepcopy(trainer.model).to("cpu")
    crystals = trainer.config.crystals
    first = crystals[0].crystal
    forcefield = output / FORCEFIELD_FILE
    write_forcefield(str(forcefield), model, {first.element: (first.element, first.mass, 0)})
    loaded = app.ForceField(str(forcefield))
    systems, energies = {}, {}
    for leg in trainer.legs:
        entry = leg.point.config.crystals[0]
        if entry.name not in systems:
            _, box, _ = crystal_structure(leg.point)
            topology = diamond_topology(len(leg.state.positions), box, entry.crystal.element)
            system = loaded.createSystem(topology, nonbondedMethod=app.CutoffPeriodic)
            path = output / ("system.xml" if len(crystals) == 1 else f"{entry.name}_system.xml")
            atomic_write_text(path, openmm.XmlSerializer.serialize(system))
            systems[entry.name] = (path, system, box)
        path, system, box = systems[entry.name]
        with torch.no_grad():
            reference = float(model(torch.as_tensor(leg.state.positions, dtype=DTYPE),
                                    torch.as_tensor(box, dtype=DTYPE)))
        exported = openmm_energy(system, leg.state.positions, box)
        energies[leg.point.label] = {
            "torch": reference, "openmm": exported,
            "relative_difference": abs(exported - reference) / max(abs(reference), 1e-300)}
    report = {"forcefield": str(forcefield),
              "systems": {name: str(p) for name, (p, _, _) in systems.items()},
              "energies": energies}
    atomic_write_text(output / EXPORT_FILE, json.dumps(report, indent=1) + "\n")
    worst = max(e["relative_difference"] for e in energies.values())
    if worst > EXPORT_TOLERANCE:
        raise TrainingFailed(f"the exported model's OpenMM energy differs from the torch "
                             f"model's by {worst:.2g} (relative; tolerance "
                             f"{EXPORT_TOLERANCE:g}): see {output / EXPORT_FILE}")
    return report
