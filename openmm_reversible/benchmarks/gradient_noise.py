"""Benchmark ``gradient-noise``: reversible against reweighting gradients of an RDF loss, on
the same trajectories, and their spread over independent runs.

The reversible simulation paper's claim is that gradients through the dynamics are more
accurate than ensemble reweighting (the fluctuation formula) for the same simulation time.
This measures both on the same frames. Each run is independent: the flexible TIP3P box of
:func:`~openmm_reversible.benchmarks.water.flexible_water` (reaction field, oxygen σ and ε
trainable) is equilibrated in OpenMM (CPU platform, its own seed), then one reversible window
of ``steps`` steps is run from that state with its own noise. On that window:

- the *reversible* gradient: the loss of the window's snapshots back-propagated through the
  dynamics (:class:`~openmm_reversible.integrators.ReversibleSimulation`);
- the *reweighting* gradient: the same snapshots treated as Boltzmann samples, the fluctuation
  formula by :func:`~openmm_reversible.gradcheck.reweighting_gradient`.

The loss is :func:`~openmm_reversible.gradcheck.rdf_loss`, ``∫ (g_OO(r) - 1)² dr`` of the
window's mean oxygen–oxygen RDF (a static observable, where both estimators apply). The record
gives, per parameter and method, every run's gradient (d loss / d scaled parameter, the
parameter's value over its start value, as the fit sees it),
their mean, standard deviation and standard error, and the ratio of the two spreads
(``spread_ratio`` = std reweighting / std reversible). ``--output`` writes the record as
``gradient_noise.json`` and a figure ``gradient_noise.png`` (each run's gradient by both
methods, with mean ± standard deviation) into that directory.

The two estimate different things (see :mod:`openmm_reversible.gradcheck`): the reversible
gradient is the derivative of this trajectory's loss from its fixed start, the reweighting
gradient that of the equilibrium average; they agree only for windows long compared with the
RDF's relaxation. The spread over runs is what the figure compares.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import unit
from tqdm.auto import tqdm

from ..errors import check_at_least
from ..gradcheck import rdf_loss, reweighting_gradient
from ..integrators import LangevinMiddleIntegrator, ReversibleSimulation
from ..units import positions_tensor, velocities_tensor
from . import save_record
from .water import FRICTION, TEMPERATURE, TIMESTEP, flexible_water

METHODS = ("reversible", "reweighting")


def _equilibrated(water, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (nm) and velocities (nm/ps) after ``steps`` OpenMM steps (LangevinMiddle at
    the benchmark's temperature, friction and step, CPU platform) with velocities and noise
    from ``seed``."""
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin,
                                                 FRICTION / unit.picosecond,
                                                 TIMESTEP * unit.picosecond)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(water.system, integrator,
                             openmm.Platform.getPlatformByName("CPU"))
    context.setPeriodicBoxVectors(*(openmm.Vec3(*map(float, row))
                                    for row in water.box.numpy()))
    context.setPositions(water.positions.numpy())
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, seed)
    integrator.step(steps)
    state = context.getState(getPositions=True, getVelocities=True)
    return (positions_tensor(state.getPositions(asNumpy=True)),
            velocities_tensor(state.getVelocities(asNumpy=True)))


def _summary(values: np.ndarray) -> dict:
    """Mean, standard deviation and standard error over runs (axis 0) of each parameter."""
    std = values.std(0, ddof=1) if len(values) > 1 else np.full(values.shape[1], np.nan)
    return {"runs": values.tolist(), "mean": values.mean(0).tolist(), "std": std.tolist(),
            "stderr": (std / np.sqrt(len(values))).tolist()}


def measure(waters: int = 64, runs: int = 8, steps: int = 200, snapshot_every: int = 10,
            equilibration_steps: int = 2000, cutoff: float = 0.55, seed: int = 1,
            output: str = "", progress: bool = True) -> dict:
    """Reversible and reweighting gradients of the RDF loss over independent runs.

    Parameters
    ----------
    waters : int
        Water molecules in the box (64: a 1.24 nm box).
    runs : int
        Independent runs (>= 2 for a spread).
    steps : int
        Steps of each run's reversible window (1 fs each).
    snapshot_every : int
        Steps between the window's snapshots (the frames both methods use).
    equilibration_steps : int
        OpenMM steps before each window.
    cutoff : float, nm
        Reaction-field cutoff (below half the box width).
    seed : int
        Run k uses seed + k for its equilibration and its window's noise.
    output : str
        Directory for ``gradient_noise.json`` and ``gradient_noise.png`` ("" writes nothing).
    progress : bool
        Show a progress bar of the runs on a terminal.

    Returns
    -------
    dict
        The JSON record: settings, ``parameters`` (names), ``reversible`` and
        ``reweighting`` (each: ``runs``, ``mean``, ``std``, ``stderr`` per parameter,
        d loss / d scaled parameter, nm), ``spread_ratio``, ``loss`` per run,
        ``frames`` per window, ``seconds``.
    """
    check_at_least(2, runs=runs)
    check_at_least(1, steps=steps, snapshot_every=snapshot_every)
    check_at_least(0, equilibration_steps=equilibration_steps)
    t0 = time.perf_counter()
    water = flexible_water(waters, cutoff, seed)
    names = water.potential.parameters_set.trainable_keys
    gradients = {method: [] for method in METHODS}
    losses, frames = [], 0
    for k in tqdm(range(runs), desc="benchmark gradient-noise", unit="run", leave=False,
                  disable=not progress or None):
        positions, velocities = _equilibrated(water, equilibration_steps, seed + k)
        integrator = LangevinMiddleIntegrator(TIMESTEP, FRICTION, TEMPERATURE, seed + k)
        sim = ReversibleSimulation(water.potential, integrator, steps, snapshot_every,
                                   rdf_loss(water.topology, water.box))
        params = sim.trainable_parameters()
        for p in params:
            p.grad = None
        loss = sim(positions, velocities, water.box)
        loss.backward()
        gradients["reversible"].append(torch.cat([p.grad.reshape(-1) for p in params]).numpy())
        gradients["reweighting"].append(reweighting_gradient(sim.loss_fn, sim.trajectory,
                                                             water.potential, params))
        losses.append(float(loss.detach()))
        frames = sim.trajectory.n_frames
    summaries = {method: _summary(np.asarray(values)) for method, values in gradients.items()}
    record = {"benchmark": "gradient-noise", "n_atoms": water.n_atoms, "waters": waters,
              "runs": runs, "steps": steps, "snapshot_every": snapshot_every,
              "equilibration_steps": equilibration_steps, "cutoff_nm": cutoff, "seed": seed,
              "loss": "rdf: integral of (g_OO - 1)^2 dr, nm", "parameters": names,
              **summaries,
              "spread_ratio": (np.asarray(summaries["reweighting"]["std"])
                               / np.asarray(summaries["reversible"]["std"])).tolist(),
              "losses": losses, "frames": frames,
              "seconds": time.perf_counter() - t0}
    if output:
        save_record(record, output, "gradient_noise", plot)
    return record


def plot(record: dict, path: str | Path) -> None:
    """One panel per parameter: each run's gradient by both methods, with mean ± standard
    deviation, from a :func:`measure` record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = record["parameters"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for j, (ax, name) in enumerate(zip(axes[0], names, strict=True)):
        for x, method in enumerate(METHODS):
            values = np.asarray(record[method]["runs"])[:, j]
            ax.plot(np.full(len(values), x) + np.linspace(-0.12, 0.12, len(values)), values,
                    "o", alpha=0.6, label=method)
            ax.errorbar(x + 0.25, record[method]["mean"][j], yerr=record[method]["std"][j],
                        fmt="s", color="k", capsize=4)
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("d loss / d (value / start), nm")
    fig.suptitle(f"RDF-loss gradient over {record['runs']} runs: {record['waters']} waters, "
                 f"{record['steps']}-step windows, {record['frames']} frames each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
