"""Benchmark ``exact``: bitwise reversal of the water box in fixed point, and what it costs.

Runs ``--steps`` (100,000) steps of exact Langevin dynamics on the flexible TIP3P box of
:mod:`.water` (reaction field), then the same number of steps backward, and reports:

- ``bitwise_identical``: the integer positions and velocities after the round trip equal the
  initial ones bit for bit, and the information buffer is empty again;
- ``buffer_bytes``: memory of the information buffer after the forward run (its limbs in
  use), ``buffer_bits_per_dof`` the mean information it holds per degree of freedom;
- ``bits_per_dof_per_step``: the measured growth of the buffer over the second half of the
  run, against ``expected_bits_per_dof_per_step`` = ``-log2(c)``;
- ``exact_over_float``: time per step of an exact round trip over ``--timing-steps`` over
  that of the float integrator's round trip on the same system, measured alternately (best
  of two each): the cost of exactness. ``forward_s`` and ``reverse_s`` time the long run.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..exact import ExactLangevinIntegrator
from .water import FRICTION, TEMPERATURE, TIMESTEP, flexible_water


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--waters", type=int, default=216, help="water molecules (216)")
    parser.add_argument("--steps", type=int, default=100_000,
                        help="steps forward, then as many back (100000)")
    parser.add_argument("--timing-steps", type=int, default=200,
                        help="steps of the float integrator timed for the ratio (200)")
    parser.add_argument("--cutoff", type=float, default=0.9, help="nm (0.9)")
    parser.add_argument("--seed", type=int, default=0)


def _round_trip_times(exact: ExactLangevinIntegrator, forces, water, steps: int,
                      repeats: int = 2) -> tuple[float, float]:
    """Seconds per step of a float and of an exact round trip (``steps`` forward and back).

    The two are measured alternately and the fastest repeat of each is kept, so that load
    from other processes on a shared machine biases neither.
    """
    potential, box, masses = water.potential, water.box, water.potential.masses
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        state = exact.state(water.positions, water.velocities)
        x, v = exact.positions(state), exact.velocities(state)
        t0 = time.perf_counter()
        x, v = exact.float_integrator.run(potential, x, v, box, masses, steps)
        exact.float_integrator.run_reverse(potential, x, v, box, masses, steps)
        t1 = time.perf_counter()
        exact.run(state, forces, box, masses, steps)
        exact.run_reverse(state, forces, box, masses, steps)
        t2 = time.perf_counter()
        best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
    return best[0] / (2 * steps), best[1] / (2 * steps)


def _run_in_chunks(advance, n_steps: int, description: str, chunk: int = 1000) -> None:
    """``advance(k)`` moves the state ``k`` steps; called in chunks under a progress bar (shown
    on a terminal) so that a 100,000-step run reports where it is."""
    with tqdm(total=n_steps, desc=description, unit="step", disable=None, leave=False) as bar:
        for done in range(0, n_steps, chunk):
            k = min(chunk, n_steps - done)
            advance(k)
            bar.update(k)


def run(args: argparse.Namespace) -> dict:
    if args.steps < 2:
        raise InputError(f"--steps must be at least 2, got {args.steps}")
    if args.timing_steps < 1:
        raise InputError(f"--timing-steps must be at least 1, got {args.timing_steps}")
    water = flexible_water(args.waters, args.cutoff, args.seed)
    potential, box, masses = water.potential, water.box, water.potential.masses
    exact = ExactLangevinIntegrator(TIMESTEP, FRICTION, TEMPERATURE, args.seed)
    forces = exact.forces(potential)
    state = exact.state(water.positions, water.velocities)
    initial = state.copy()

    with torch.no_grad():
        float_step_s, exact_step_s = _round_trip_times(exact, forces, water,
                                                       min(args.timing_steps, args.steps))
        half = args.steps // 2
        t0 = time.perf_counter()
        def forward(k):
            exact.run(state, forces, box, masses, k)

        _run_in_chunks(forward, half, "forward, first half")
        bits_half = float(state.buffer.bit_lengths().mean())
        _run_in_chunks(forward, args.steps - half, "forward, second half")
        forward_s = time.perf_counter() - t0
        bits_end = float(state.buffer.bit_lengths().mean())
        buffer_bytes = state.buffer.nbytes
        t0 = time.perf_counter()
        _run_in_chunks(lambda k: exact.run_reverse(state, forces, box, masses, k), args.steps,
                       "reverse")
        reverse_s = time.perf_counter() - t0

    identical = (state.step == 0 and torch.equal(state.positions, initial[0])
                 and torch.equal(state.velocities, initial[1]) and state.buffer.n_limbs == 0)
    return {"benchmark": "exact", "waters": args.waters, "atoms": water.n_atoms,
            "steps": args.steps, "bitwise_identical": bool(identical),
            "buffer_bytes": buffer_bytes, "buffer_bits_per_dof": bits_end,
            "bits_per_dof_per_step": (bits_end - bits_half) / (args.steps - half),
            "expected_bits_per_dof_per_step": exact.bits_per_step,
            "friction_used": exact.friction, "forward_s": forward_s, "reverse_s": reverse_s,
            "exact_step_s": exact_step_s, "float_step_s": float_step_s,
            "exact_over_float": exact_step_s / float_step_s,
            "threads": torch.get_num_threads()}
