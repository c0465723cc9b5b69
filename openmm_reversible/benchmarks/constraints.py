"""Benchmark ``constraints``: cost of a constrained reverse step against an unconstrained one.

The same water box (TIP3P, reaction field, 1 fs) is built flexible and rigid
(:func:`~.water.flexible_water`, :func:`~.water.rigid_water`); each runs a window of ``--steps``
with a single loss snapshot at its end, forward then backward, and the backward time per step
is the reverse step's cost (state reconstruction, force graph, adjoint). The two are measured
alternately, ``--repeats`` times each, and the fastest of each is kept, so a busy machine
slows both alike. Reports both costs, the ratio ``constrained_over_unconstrained`` (target
``<= 1.5``) and the forward ratio.

Measured (216 waters, 0.9 nm, 1 torch thread, 2-core CPU shared with other jobs): reverse step
0.0834 s constrained against 0.0796 s unconstrained, 1.05×; forward 1.02×. On 64 waters
(0.6 nm) the fixed cost of the projections shows. With the fixed points iterating on bond
vectors (Newton's method one step per pass of the kick's fixed point) and the velocity
projection's closed-form VJP, three rounds alternated in one process with the code before
read 1.42, 1.48 and 1.38× at 64 waters against 1.55, 1.55 (and one unusable pair) before
(four more rounds at 64 waters: 1.42–1.46× against 1.58–1.67×),
and 1.18, 1.10, 1.03× at 216 waters against 1.23, 1.12, 1.04 before, on a CPU loaded 3× (so
the times are about twice the idle ones: 26.6 ms against 18.7 ms at 64 waters). Idle, before
the change: 14.4 ms against 9.1 ms, 1.58×.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import check_at_least
from .water import flexible_water, rigid_water


def measure(waters: int = 216, steps: int = 5, repeats: int = 8, cutoff: float = 0.9,
            seed: int = 0, progress: bool = True) -> dict:
    """Time constrained and unconstrained reverse steps alternately (module docstring).

    Parameters
    ----------
    waters : int
        Water molecules in the box.
    steps : int
        Steps in each window (one loss snapshot at its end).
    repeats : int
        Measurements of each; the fastest is kept.
    cutoff : float, nm
        Reaction-field cutoff.
    seed : int
        Noise stream and initial velocities.
    progress : bool
        Show a progress bar of the measurements on a terminal.

    Returns
    -------
    dict
        The JSON record (times in s per step, reconstruction error in nm).
    """
    check_at_least(1, waters=waters, steps=steps, repeats=repeats)
    boxes = {"unconstrained": flexible_water(waters, cutoff, seed),
             "constrained": rigid_water(waters, cutoff, seed)}
    sims = {name: box.simulation(steps, steps) for name, box in boxes.items()}
    best = {name: (float("inf"), float("inf")) for name in boxes}
    errors = {}
    for _ in tqdm(range(repeats), desc="benchmark constraints", unit="repeat", leave=False,
                  disable=not progress or None):
        for name, box in boxes.items():
            sim = sims[name]
            sim(box.positions, box.velocities, box.box).backward()
            forward, backward = best[name]
            best[name] = (min(forward, sim.info["forward_s"] / steps),
                          min(backward, sim.info["backward_s"] / steps))
            errors[name] = sim.info["reconstruction_error"]
    (f_u, r_u), (f_c, r_c) = best["unconstrained"], best["constrained"]
    return {"benchmark": "constraints", "n_atoms": boxes["constrained"].n_atoms,
            "n_constraints": len(boxes["constrained"].constraints), "steps": steps,
            "reverse_step_unconstrained_s": r_u, "reverse_step_constrained_s": r_c,
            "constrained_over_unconstrained": r_c / r_u,
            "forward_step_unconstrained_s": f_u, "forward_step_constrained_s": f_c,
            "forward_constrained_over_unconstrained": f_c / f_u,
            "reconstruction_error_nm": errors["constrained"],
            "torch_threads": torch.get_num_threads()}
