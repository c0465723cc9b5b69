"""Benchmark ``gradient``: cost of a reversible gradient relative to the forward simulation.

A window of flexible TIP3P water (216 molecules, reaction field, 1 fs, 1000 steps by default)
is run forward only (the loss), then forward and backward (loss and gradient with respect to
the oxygen σ and ε). Reports ``forward_s``, ``forward_reverse_s`` and their ratio
``gradient_over_forward``, plus the reverse pass's state reconstruction error. ``--fused``
evaluates the potential with the fused kernels (:mod:`~openmm_reversible.potential.fused`).
"""

from __future__ import annotations

import argparse
import time

import torch

from .water import flexible_water


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--waters", type=int, default=216, help="water molecules (216)")
    parser.add_argument("--steps", type=int, default=1000, help="steps in the window (1000)")
    parser.add_argument("--snapshot-every", type=int, default=100,
                        help="steps between loss snapshots (100)")
    parser.add_argument("--cutoff", type=float, default=0.9, help="nm (0.9)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fused", action="store_true",
                        help="use the fused kernels instead of autograd for the potential")


def run(args: argparse.Namespace) -> dict:
    water = flexible_water(args.waters, args.cutoff, args.seed)
    water.potential.use_fused(args.fused)
    sim = water.simulation(args.steps, args.snapshot_every)
    with torch.no_grad():
        t0 = time.perf_counter()
        sim(water.positions, water.velocities, water.box)
        forward_s = time.perf_counter() - t0
    params = sim.trainable_parameters()
    for p in params:
        p.grad = None
    t0 = time.perf_counter()
    loss = sim(water.positions, water.velocities, water.box)
    loss.backward()
    forward_reverse_s = time.perf_counter() - t0
    return {"benchmark": "gradient", "n_atoms": water.n_atoms, "steps": args.steps,
            "forward_s": forward_s, "forward_reverse_s": forward_reverse_s,
            "gradient_over_forward": forward_reverse_s / forward_s,
            "reconstruction_error_nm": sim.info["reconstruction_error"],
            "gradient_norm": float(torch.cat([p.grad.reshape(-1) for p in params]).norm()),
            "torch_threads": torch.get_num_threads(), "fused": bool(args.fused)}
