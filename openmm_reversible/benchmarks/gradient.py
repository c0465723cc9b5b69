"""Benchmark ``gradient``: cost of a reversible gradient relative to the forward simulation.

A window of flexible TIP3P water (216 molecules, reaction field, 1 fs, 1000 steps by default)
is run forward only (the loss), then forward and backward (loss and gradient with respect to
the oxygen σ and ε). Reports ``forward_s``, ``forward_reverse_s`` and their ratio
``gradient_over_forward``, plus the reverse pass's state reconstruction error. ``--fused``
evaluates the potential with the fused kernels (:mod:`~openmm_reversible.potential.fused`).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..errors import check_at_least
from .water import flexible_water


def measure(waters: int = 216, steps: int = 1000, snapshot_every: int = 100,
            cutoff: float = 0.9, seed: int = 0, fused: bool = False,
            progress: bool = True) -> dict:
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
    progress : bool
        Show a progress bar of the three stages (build, forward, gradient) on a terminal.

    Returns
    -------
    dict
        The JSON record (times in s, reconstruction error in nm).
    """
    check_at_least(1, steps=steps, snapshot_every=snapshot_every)
    with tqdm(total=3, desc="benchmark gradient", unit="stage", leave=False,
              disable=not progress or None) as bar:
        bar.set_postfix_str("building the water box")
        water = flexible_water(waters, cutoff, seed)
        water.potential.use_fused(fused)
        sim = water.simulation(steps, snapshot_every)
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
    return {"benchmark": "gradient", "n_atoms": water.n_atoms, "steps": steps,
            "forward_s": forward_s, "forward_reverse_s": forward_reverse_s,
            "gradient_over_forward": forward_reverse_s / forward_s,
            "reconstruction_error_nm": sim.info["reconstruction_error"],
            "gradient_norm": float(torch.cat([p.grad.reshape(-1) for p in params]).norm()),
            "torch_threads": torch.get_num_threads(), "fused": bool(fused)}
