"""Benchmark ``gradient``: cost of a reversible gradient relative to the forward simulation.

A window of flexible TIP3P water (216 molecules, reaction field or ``--nonbonded PME``, 1 fs,
1000 steps by default) is run forward only (the loss), then forward and backward (loss and
gradient with respect to the oxygen σ and ε). Reports ``forward_s``, ``forward_reverse_s`` and
their ratio ``gradient_over_forward``, the reverse pass's state reconstruction error, and the
cost per step against one OpenMM CPU step of the same System (``openmm_step_ms``;
``forward_step_over_openmm_step``, and ``reverse_step_over_openmm_step`` for the reverse step
with its adjoint, ``(forward_reverse_s - forward_s) / steps``). ``--fused`` evaluates the
potential with the fused kernels (:mod:`~openmm_reversible.potential.fused`).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import check_at_least
from .water import flexible_water, openmm_step_ms


def measure(waters: int = 216, steps: int = 1000, snapshot_every: int = 100,
            cutoff: float = 0.9, seed: int = 0, fused: bool = False, nonbonded: str = "RF",
            openmm_steps: int = 200, progress: bool = True) -> dict:
    """Time a forward window and a forward + reverse (gradient) window of the water box.

    Parameters
    ----------
    waters : int
        Water molecules in the box.
    steps : int
        Steps in the window.
    snapshot_every : int
        Steps between loss snapshots.
    cutoff : float, nm
        Reaction-field cutoff (below half the box width).
    seed : int
        Noise stream and initial velocities.
    fused : bool
        Evaluate the potential with the fused kernels instead of autograd.
    nonbonded : {"RF", "PME"}
        Electrostatics: reaction field or particle-mesh Ewald.
    openmm_steps : int
        OpenMM CPU steps timed for ``openmm_step_ms``.
    progress : bool
        Show a progress bar of the four stages (build, forward, gradient, OpenMM) on a
        terminal.

    Returns
    -------
    dict
        The JSON record (times in s, reconstruction error in nm).
    """
    check_at_least(1, steps=steps, snapshot_every=snapshot_every, openmm_steps=openmm_steps)
    with tqdm(total=4, desc="benchmark gradient", unit="stage", leave=False,
              disable=not progress or None) as bar:
        bar.set_postfix_str("building the water box")
        water = flexible_water(waters, cutoff, seed, nonbonded)
        water.potential.use_fused(fused)
        sim = water.simulation(steps, snapshot_every)
        # Warm-up: a one-step gradient loads (first use: compiles) the kernels and builds the
        # neighbour list outside the timings.
        water.simulation(1, 1)(water.positions, water.velocities, water.box).backward()
        bar.update()
        bar.set_postfix_str("forward window")
        with torch.no_grad():
            t0 = time.perf_counter()
            sim(water.positions, water.velocities, water.box)
            forward_s = time.perf_counter() - t0
        bar.update()
        bar.set_postfix_str("forward + reverse window")
        params = sim.trainable_parameters()
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        loss = sim(water.positions, water.velocities, water.box)
        loss.backward()
        forward_reverse_s = time.perf_counter() - t0
        bar.update()
        bar.set_postfix_str("OpenMM steps")
        step_ms = openmm_step_ms(water.system, water.positions.numpy(), water.box.numpy(),
                                 openmm_steps)
        bar.update()
    forward_step_ms = 1e3 * forward_s / steps
    reverse_step_ms = 1e3 * (forward_reverse_s - forward_s) / steps
    return {"benchmark": "gradient", "n_atoms": water.n_atoms, "nonbonded": nonbonded,
            "steps": steps, "forward_s": forward_s, "forward_reverse_s": forward_reverse_s,
            "gradient_over_forward": forward_reverse_s / forward_s,
            "reconstruction_error_nm": sim.info["reconstruction_error"],
            "gradient_norm": float(torch.cat([p.grad.reshape(-1) for p in params]).norm()),
            "openmm_step_ms": step_ms,
            "forward_step_over_openmm_step": forward_step_ms / step_ms,
            "reverse_step_over_openmm_step": reverse_step_ms / step_ms,
            "torch_threads": torch.get_num_threads(), "fused": bool(fused)}
