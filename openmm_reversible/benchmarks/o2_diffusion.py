"""Benchmark ``o2-diffusion``: σ and ε of O₂ in water fitted to a diffusion coefficient, once
by reversible gradients and once by the reweighting gradient, from the same start.

The reversible simulation paper's claim for dynamical targets: a gradient through the dynamics
can fit them, ensemble reweighting cannot, because the diffusion coefficient is a property of
trajectories, not a Boltzmann average of single frames. The system is the O₂-in-TIP3P box of
the tutorial (:func:`~openmm_reversible.systems.o2_in_water`, σ 0.3297 nm, ε 0.438 kJ/mol,
r₀ 0.12074 nm, flexible water, reaction field), 298.15 K, γ 1/ps, Δt 1 fs; the loss of a window
is ``((D_w - D_target) / 10⁻⁹ m²/s)²`` with ``D_w`` the O₂ self-diffusion coefficient of the
window's own snapshots (MSD of the molecular centres over every time origin, slope fitted over
the lags from ``fit_start`` of the window to its end).

Two parameter chains start from the same parameters, seeds and sampling schedule. Each epoch
of a chain: its OpenMM sampler (CPU platform, deterministic, its current parameters) runs
``bulk_steps`` before each of ``windows`` reversible windows of ``window_steps`` steps; then

- the *reversible* chain back-propagates each window's loss through its dynamics
  (:class:`~openmm_reversible.integrators.ReversibleSimulation`), follows the mean over windows,
  and on the same windows also evaluates the reweighting gradient;
- the *reweighting* chain runs the same windows forward only and follows the reweighting
  gradient :func:`~openmm_reversible.reweighting.start_reweighting_gradient`: each window's
  loss weighted by the Boltzmann factor of its start configuration,
  ``-β cov_w(L_w, ∂U/∂θ(x_w))``, which holds the dynamics fixed.

Both follow their gradient with Adam on the scaled parameters (value / start value). In epoch 0
the two chains sample identical windows (same parameters and seeds, deterministic OpenMM and
integrator noise), so their first reweighting gradients are equal. The record gives per chain
and epoch the parameter values, the windows' D, losses and MSD exponents
(``d log MSD / d log τ`` over the fit range: 2 ballistic, 1 diffusive), and the gradients with
their standard errors over windows. ``--output`` writes ``o2_diffusion.json`` and the figure
``o2_diffusion.png``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from openmm import app, unit
from tqdm.auto import tqdm

from ..errors import check_at_least, check_positive
from ..integrators import LangevinMiddleIntegrator, ReversibleSimulation
from ..observables import (
    mean_squared_displacement,
    self_diffusion_coefficient,
    time_between_frames,
)
from ..parameters import ParameterSet
from ..potential import TorchPotential
from ..reweighting import start_reweighting_gradient
from ..sampler import Sampler
from ..systems import O2_FORCEFIELD, o2_in_water
from ..trajectory import Trajectory
from . import save_record
from .water import FRICTION, TIMESTEP, check_cutoff

TEMPERATURE = 298.15  # K
TARGET = 2.0e-9  # m²/s, D of O₂ in water at 298 K
SCALE = 1.0e-9  # m²/s, the loss's unit of D
CHAINS = ("reversible", "reweighting")


@dataclass
class _Chain:
    """One fit: its parameters, twin potential, OpenMM sampler, optimiser and history."""

    parameters: ParameterSet
    potential: TorchPotential
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    molecules: list[list[int]]
    history: dict = field(default_factory=dict)


def _chain(n_o2: int, box_size: float, cutoff: float, equilibration_steps: int,
           learning_rate: float, seed: int) -> _Chain:
    """A fit from the start parameters: the box built, minimised and equilibrated in OpenMM."""
    topology, positions = o2_in_water(n_o2, box_size)
    box = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    check_cutoff(box, cutoff)
    parameters = ParameterSet.from_forcefield(
        ["tip3p.xml", O2_FORCEFIELD], topology, nonbondedMethod=app.CutoffPeriodic,
        nonbondedCutoff=cutoff * unit.nanometer, constraints=None, rigidWater=False,
        removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters, fused=True)
    sampler = Sampler(parameters.system, positions, box, temperature=TEMPERATURE,
                      friction=FRICTION, timestep=TIMESTEP, platform="CPU", seed=seed,
                      deterministic=True)
    sampler.minimize()
    sampler.set_velocities(seed)
    sampler.step(equilibration_steps)
    molecules = [[a.index for a in r.atoms()] for r in topology.residues() if r.name == "OXY"]
    optimizer = torch.optim.Adam([parameters.scaled], lr=learning_rate)
    return _Chain(parameters, potential, sampler, optimizer, molecules)


def diffusion(traj: Trajectory, molecules: list[list[int]], fit_start: float
              ) -> tuple[torch.Tensor, float]:
    """Self-diffusion coefficient of ``molecules`` over a window's snapshots, and the MSD
    exponent over the fit range.

    Parameters
    ----------
    traj : Trajectory
        Snapshots of one window (unwrapped: the reversible integrator never wraps).
    molecules : list of list of int
        Atom indices of each molecule.
    fit_start : float
        The MSD slope is fitted over the lags from ``fit_start`` × the window to its end.

    Returns
    -------
    d : torch.Tensor, 0-dim, m²/s
        Differentiable through the snapshots.
    exponent : float
        Least-squares slope of log MSD against log lag over the fit range (2 ballistic,
        1 diffusive).
    """
    lags, msd = mean_squared_displacement(traj.positions, traj.masses, molecules,
                                          time_between_frames(traj.steps, traj.timestep))
    fit = (fit_start * float(lags[-1]), float(lags[-1]))
    d = self_diffusion_coefficient(lags, msd, fit)
    chosen = (lags.detach().numpy() >= fit[0] - 1e-12) & (lags.detach().numpy() > 0)
    exponent = np.polyfit(np.log(lags.detach().numpy()[chosen]),
                          np.log(msd.detach().numpy()[chosen]), 1)[0]
    return d, float(exponent)


def _diffusion_loss(molecules: list[list[int]], fit_start: float, window: dict):
    """The window loss ``((D - target) / 1e-9 m²/s)²``; it leaves the window's ``D`` (m²/s)
    and ``msd_exponent`` in ``window`` (the forward pass calls it, and the backward pass again:
    the last call's values stay)."""

    def loss_fn(traj: Trajectory, potential) -> torch.Tensor:
        d, window["msd_exponent"] = diffusion(traj, molecules, fit_start)
        window["D"] = float(d.detach())
        return ((d - TARGET) / SCALE) ** 2

    return loss_fn


def _epoch(chain: _Chain, epoch: int, follow: str, windows: int, window_steps: int,
           snapshot_every: int, bulk_steps: int, fit_start: float, seed: int) -> None:
    """Sample the chain's windows, take its gradients, step its optimiser; append to its
    history."""
    chain.sampler.update_parameters(chain.parameters.create_system())
    scaled = chain.parameters.scaled
    values = chain.parameters.values()
    record = {"values": [float(values[k]) for k in chain.parameters.trainable_keys],
              "D": [], "loss": [], "msd_exponent": []}
    reversible, starts = [], []
    for w in range(windows):
        chain.sampler.step(bulk_steps)
        state = chain.sampler.state()
        box = torch.tensor(state.box)
        starts.append(torch.tensor(state.positions))

        window = {}
        integrator = LangevinMiddleIntegrator(TIMESTEP, FRICTION, TEMPERATURE,
                                              seed=seed + 1000 * epoch + w)
        sim = ReversibleSimulation(chain.potential, integrator, window_steps, snapshot_every,
                                   _diffusion_loss(chain.molecules, fit_start, window))
        if follow == "reversible":
            scaled.grad = None
            loss = sim(starts[-1], torch.tensor(state.velocities), box)
            loss.backward()
            reversible.append(scaled.grad.detach().clone())
        else:
            with torch.no_grad():
                loss = sim(starts[-1], torch.tensor(state.velocities), box)
        record["loss"].append(float(loss.detach()))
        record["D"].append(window["D"])
        record["msd_exponent"].append(window["msd_exponent"])
    _, (gradient,), (stderr,) = start_reweighting_gradient(
        torch.tensor(record["loss"]), chain.potential, torch.stack(starts), box, TEMPERATURE,
        [scaled])
    record["reweighting_gradient"] = gradient.tolist()
    record["reweighting_gradient_stderr"] = stderr.tolist()
    if follow == "reversible":
        per_window = torch.stack(reversible)
        gradient = per_window.mean(0)
        record["reversible_gradient"] = gradient.tolist()
        record["reversible_gradient_stderr"] = (per_window.std(0) / windows ** 0.5).tolist()
        record["reversible_gradient_windows"] = per_window.tolist()
    chain.optimizer.zero_grad()
    scaled.grad = gradient.detach().clone()
    chain.optimizer.step()
    for key, value in record.items():
        chain.history.setdefault(key, []).append(value)


def measure(n_o2: int = 8, box_size: float = 1.9, cutoff: float = 0.9, epochs: int = 5,
            windows: int = 3, window_steps: int = 300, snapshot_every: int = 10,
            equilibration_steps: int = 10000, bulk_steps: int = 2000,
            learning_rate: float = 0.02, fit_start: float = 1 / 3, seed: int = 1,
            output: str = "", progress: bool = True) -> dict:
    """Fit σ, ε of O₂ to D = 2.0e-9 m²/s by reversible and by reweighting gradients.

    Parameters
    ----------
    n_o2 : int
        O₂ molecules in the box (1 to 8).
    box_size : float, nm
        Edge of the cubic box (1.9 with 8 O₂: 472 atoms, the tutorial's full size).
    cutoff : float, nm
        Reaction-field cutoff (below half the box edge).
    epochs : int
        Optimiser steps of each chain.
    windows : int
        Reversible windows per epoch (>= 3 for the covariance and its standard error).
    window_steps : int
        Steps of each window (1 fs each); the MSD spans the window.
    snapshot_every : int
        Steps between the window's snapshots (the MSD's frames).
    equilibration_steps : int
        OpenMM steps after minimisation, before the first epoch.
    bulk_steps : int
        OpenMM steps before each window (decorrelates the starts).
    learning_rate : float
        Adam's step on the scaled parameters (value / start value).
    fit_start : float
        The MSD slope is fitted from this fraction of the window to its end.
    seed : int
        Seed of OpenMM (velocities, noise) and, with the epoch and window, of each window's
        noise; the same for both chains.
    output : str
        Directory for ``o2_diffusion.json`` and ``o2_diffusion.png`` ("" writes nothing).
    progress : bool
        Show a progress bar of the epochs on a terminal.

    Returns
    -------
    dict
        The JSON record: settings, ``parameters`` (names), ``reversible`` and ``reweighting``
        (each: per epoch ``values`` (σ nm, ε kJ/mol before the step), ``D`` (m²/s) and
        ``loss`` and ``msd_exponent`` per window, ``reweighting_gradient`` and its ``_stderr``
        (d loss / d scaled parameter); the reversible chain also ``reversible_gradient``, its
        ``_stderr`` and ``_windows``; ``final_values`` after the last step), and ``seconds``.
    """
    check_at_least(1, n_o2=n_o2, epochs=epochs, window_steps=window_steps,
                   snapshot_every=snapshot_every)
    check_at_least(3, windows=windows)
    check_at_least(0, equilibration_steps=equilibration_steps, bulk_steps=bulk_steps)
    check_positive(box_size=box_size, cutoff=cutoff, learning_rate=learning_rate,
                   fit_start=fit_start)
    t0 = time.perf_counter()
    chains = {name: _chain(n_o2, box_size, cutoff, equilibration_steps, learning_rate, seed)
              for name in CHAINS}
    for epoch in tqdm(range(epochs), desc="benchmark o2-diffusion", unit="epoch",
                      leave=False, disable=not progress or None):
        for name, chain in chains.items():
            _epoch(chain, epoch, name, windows, window_steps, snapshot_every, bulk_steps,
                   fit_start, seed)
    first = chains["reversible"]
    record = {"benchmark": "o2-diffusion", "n_atoms": first.potential.masses.shape[0],
              "n_o2": n_o2, "box_nm": box_size, "cutoff_nm": cutoff, "epochs": epochs,
              "windows": windows, "window_steps": window_steps,
              "snapshot_every": snapshot_every, "equilibration_steps": equilibration_steps,
              "bulk_steps": bulk_steps, "learning_rate": learning_rate,
              "fit_range_ps": [fit_start * window_steps * TIMESTEP, window_steps * TIMESTEP],
              "temperature_K": TEMPERATURE, "target_m2_per_s": TARGET, "seed": seed,
              "loss": "((D - target) / 1e-9 m^2/s)^2 per window",
              "parameters": first.parameters.trainable_keys}
    for name, chain in chains.items():
        values = chain.parameters.values()
        record[name] = {**chain.history, "final_values": [
            float(values[k]) for k in chain.parameters.trainable_keys]}
    record["seconds"] = time.perf_counter() - t0
    if output:
        save_record(record, output, "o2_diffusion", plot)
    return record


def plot(record: dict, path: str | Path) -> None:
    """D, σ and ε against epoch for both chains (top), and the per-epoch gradients of σ and ε
    with their standard errors over windows and the MSD exponent (bottom), from a
    :func:`measure` record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    epochs = np.arange(record["epochs"])
    colours = {"reversible": "C0", "reweighting": "C1"}
    for offset, name in zip((-0.08, 0.08), CHAINS, strict=True):
        chain = record[name]
        d = np.asarray(chain["D"]) * 1e9
        axes[0, 0].errorbar(epochs + offset, d.mean(1), d.std(1, ddof=1) / np.sqrt(d.shape[1]),
                            fmt="o-", capsize=3, color=colours[name], label=f"{name} fit")
        values = np.vstack([chain["values"], chain["final_values"]])
        for j, ax in enumerate(axes[0, 1:]):
            ax.plot(np.arange(len(values)), values[:, j], "o-", color=colours[name],
                    label=f"{name} fit")
        exponent = np.asarray(chain["msd_exponent"])
        axes[1, 2].plot(epochs + offset, exponent.mean(1), "o-", color=colours[name],
                        label=f"{name} fit")
    axes[0, 0].axhline(record["target_m2_per_s"] * 1e9, color="k", lw=1, label="target")
    axes[0, 0].set(xlabel="epoch", ylabel="D(O$_2$) / 10$^{-9}$ m$^2$/s",
                   title="D of each epoch's windows (mean ± s.e.)")
    for ax, name, unit_name in zip(axes[0, 1:], record["parameters"], ("nm", "kJ/mol"),
                                   strict=True):
        ax.set(xlabel="epoch", ylabel=f"{name.split('/')[1]}, {unit_name}", title=name)
    reversible = record["reversible"]
    series = [("reversible (reversible fit)", "C0", reversible["reversible_gradient"],
               reversible["reversible_gradient_stderr"]),
              ("reweighting on the reversible fit's windows", "C2",
               reversible["reweighting_gradient"], reversible["reweighting_gradient_stderr"]),
              ("reweighting (reweighting fit)", "C1",
               record["reweighting"]["reweighting_gradient"],
               record["reweighting"]["reweighting_gradient_stderr"])]
    for j, ax in enumerate(axes[1, :2]):
        for offset, (label, colour, gradient, stderr) in zip((-0.12, 0.0, 0.12), series,
                                                             strict=True):
            ax.errorbar(epochs + offset, np.asarray(gradient)[:, j], np.asarray(stderr)[:, j],
                        fmt="o", capsize=3, color=colour, label=label)
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set(xlabel="epoch", ylabel="d loss / d (value / start)",
               title=f"gradient of {record['parameters'][j].split('/')[1]} (± s.e.)")
    axes[1, 2].axhline(1.0, color="k", lw=1, label="diffusive")
    axes[1, 2].set(xlabel="epoch", ylabel="d log MSD / d log τ",
                   title=f"MSD exponent over {record['fit_range_ps'][0]:.2g}–"
                         f"{record['fit_range_ps'][1]:.2g} ps")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle(f"O$_2$ in water ({record['n_atoms']} atoms): {record['windows']} windows of "
                 f"{record['window_steps']} fs an epoch", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
