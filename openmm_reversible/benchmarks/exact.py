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

import time

import torch
from tqdm.auto import tqdm

from ..errors import check_at_least
from ..exact import ExactLangevinIntegrator
from .water import FRICTION, TEMPERATURE, TIMESTEP, flexible_water


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


def _run_in_chunks(advance, n_steps: int, description: str, progress: bool,
                   chunk: int = 1000) -> None:
    """``advance(k)`` moves the state ``k`` steps; called in chunks under a progress bar (shown
    on a terminal, with ``progress``) so that a 100,000-step run reports where it is."""
    with tqdm(total=n_steps, desc=description, unit="step", disable=not progress or None,
              leave=False) as bar:
        for done in range(0, n_steps, chunk):
            k = min(chunk, n_steps - done)
            advance(k)
            bar.update(k)


def measure(waters: int = 216, steps: int = 100_000, timing_steps: int = 200,
            cutoff: float = 0.9, seed: int = 0, progress: bool = True) -> dict:
    """Round trip of the water box in fixed point: ``steps`` forward, as many back.

    Parameters
    ----------
    waters : int
        Water molecules in the box.
    steps : int
        Steps forward, then as many back (>= 2).
    timing_steps : int
        Steps of the float and exact round trips timed for ``exact_over_float``.
    cutoff : float, nm
    seed : int
    progress : bool
        Show progress bars of the long runs on a terminal.

    Returns
    -------
    dict
        The JSON record (module docstring).
    """
    check_at_least(2, steps=steps)
    check_at_least(1, timing_steps=timing_steps)
    water = flexible_water(waters, cutoff, seed)
    potential, box, masses = water.potential, water.box, water.potential.masses
    exact = ExactLangevinIntegrator(TIMESTEP, FRICTION, TEMPERATURE, seed)
    forces = exact.forces(potential)
    state = exact.state(water.positions, water.velocities)
    initial = state.copy()

    with torch.no_grad():
        float_step_s, exact_step_s = _round_trip_times(exact, forces, water,
                                                       min(timing_steps, steps))
        half = steps // 2
        t0 = time.perf_counter()
        def forward(k):
            exact.run(state, forces, box, masses, k)

        _run_in_chunks(forward, half, "forward, first half", progress)
        bits_half = float(state.buffer.bit_lengths().mean())
        _run_in_chunks(forward, steps - half, "forward, second half", progress)
        forward_s = time.perf_counter() - t0
        bits_end = float(state.buffer.bit_lengths().mean())
        buffer_bytes = state.buffer.nbytes
        t0 = time.perf_counter()
        _run_in_chunks(lambda k: exact.run_reverse(state, forces, box, masses, k), steps,
                       "reverse", progress)
        reverse_s = time.perf_counter() - t0

    identical = (state.step == 0 and torch.equal(state.positions, initial[0])
                 and torch.equal(state.velocities, initial[1]) and state.buffer.n_limbs == 0)
    return {"benchmark": "exact", "waters": waters, "atoms": water.n_atoms,
            "steps": steps, "bitwise_identical": bool(identical),
            "buffer_bytes": buffer_bytes, "buffer_bits_per_dof": bits_end,
            "bits_per_dof_per_step": (bits_end - bits_half) / (steps - half),
            "expected_bits_per_dof_per_step": exact.bits_per_step,
            "friction_used": exact.friction, "forward_s": forward_s, "reverse_s": reverse_s,
            "exact_step_s": exact_step_s, "float_step_s": float_step_s,
            "exact_over_float": exact_step_s / float_step_s,
            "threads": torch.get_num_threads()}
