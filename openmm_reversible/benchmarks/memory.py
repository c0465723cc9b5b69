"""Benchmark ``memory``: peak memory of a reversible gradient is flat in the number of steps.

Each measurement runs in a fresh Python process (so its peak resident set size is its own):
a reversible gradient through ``--short-steps`` (1,000) and ``--long-steps`` (20,000) steps,
and backpropagation through time through ``--short-steps``, each with the same number of loss
snapshots (``--snapshots``, evenly spaced), so that only the trajectory length differs.
Reports each peak RSS (MiB), the peak after building the system (``baseline``), the growth
above it, and ``memory_ratio`` = peak(long) / peak(short) for the reversible gradient; the
method's promise is a ratio close to 1, where BPTT grows with the steps. The box is flexible
TIP3P by default; ``--rigid-water`` makes its molecules rigid (constrained dynamics and their
inverse) and ``--model tip4pew`` gives it a massless virtual site a molecule.

Measured (2-core CPU shared with other jobs; 32 waters, 0.45 nm, 100 and 1000 steps, 5
snapshots): rigid TIP3P, reversible growth above the baseline 36.1 MiB (100 steps) and
36.8 MiB (1000), ratio 1.001, BPTT 67.2 MiB at 100 steps; rigid TIP4P-Ew, 36.9 and 37.8 MiB,
ratio 1.001, BPTT 88.7 MiB at 100 steps.

One measurement alone is :func:`measure` (call it in a fresh process).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from tqdm.auto import tqdm

from ..errors import InputError, check_at_least
from .water import check_model


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(mode: str, steps: int, waters: int, snapshot_every: int, cutoff: float,
            seed: int, model: str = "tip3p", rigid_water: bool = False) -> dict:
    """Peak RSS (MiB) of one gradient, measured in this process (call it in a fresh one)."""
    from .water import water as water_box

    water = water_box(waters, cutoff, seed, rigid=rigid_water, model=model)
    sim = water.simulation(steps, snapshot_every, mode=mode)
    baseline = _peak_rss_mib()
    sim(water.positions, water.velocities, water.box).backward()
    return {"mode": mode, "steps": steps, "baseline_mib": baseline,
            "peak_mib": _peak_rss_mib()}


_MEASURE = """
import json, sys
from openmm_reversible.benchmarks.memory import measure
from openmm_reversible.errors import InputError
try:
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
except InputError as exc:
    print(json.dumps({"input_error": str(exc)}))
"""
"""What a fresh interpreter runs for one measurement: ``measure(**kwargs)`` as one JSON line."""


def _in_subprocess(**kwargs) -> dict:
    """:func:`measure` in a fresh Python process (so its peak RSS is its own)."""
    command = [sys.executable, "-c", _MEASURE, json.dumps(kwargs)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement {kwargs['mode']} {kwargs['steps']} steps "
                           f"failed: {last}")
    result = json.loads(lines[-1])
    if "input_error" in result:
        raise InputError(result["input_error"])
    return result


def compare(waters: int = 216, short_steps: int = 1000, long_steps: int = 20000,
            snapshots: int = 10, cutoff: float = 0.9, seed: int = 0, model: str = "tip3p",
            rigid_water: bool = False, progress: bool = True) -> dict:
    """Peak memory of reversible gradients through ``short_steps`` and ``long_steps`` and of
    BPTT through ``short_steps``, each measured in a fresh process.

    Parameters
    ----------
    waters : int
        Water molecules in the box.
    short_steps, long_steps : int
        Trajectory lengths, ``1 <= short_steps <= long_steps``.
    snapshots : int
        Loss snapshots per run, the same for every length: the loss's own graph over its
        snapshots grows with their number, not with the steps between them.
    cutoff : float, nm
    seed : int
    model : {"tip3p", "tip4pew"}
        Water model (:data:`~.water.WATER_MODELS`).
    rigid_water : bool
        Rigid molecules (constrained dynamics) instead of flexible ones.
    progress : bool
        Show a progress bar of the three measurements on a terminal.

    Returns
    -------
    dict
        The JSON record (MiB; ``memory_ratio`` = peak(long) / peak(short), reversible).
    """
    check_at_least(1, snapshots=snapshots)
    check_model(model)
    if not 1 <= short_steps <= long_steps:
        raise InputError(f"need 1 <= --short-steps <= --long-steps, got {short_steps} "
                         f"and {long_steps}")
    runs = {"short": ("reversible", short_steps), "long": ("reversible", long_steps),
            "bptt": ("bptt", short_steps)}
    results = {}
    bar = tqdm(runs.items(), desc="benchmark memory", unit="run", leave=False,
               disable=not progress or None)
    for key, (mode, steps) in bar:
        bar.set_postfix_str(f"{mode}, {steps} steps")
        results[key] = _in_subprocess(mode=mode, steps=steps, waters=waters,
                                      snapshot_every=max(1, steps // snapshots), cutoff=cutoff,
                                      seed=seed, model=model, rigid_water=rigid_water)
    short, long, bptt = results["short"], results["long"], results["bptt"]
    return {"benchmark": "memory", "model": model, "rigid_water": rigid_water,
            "waters": waters, "short_steps": short_steps,
            "long_steps": long_steps, "snapshots": snapshots,
            "baseline_mib": short["baseline_mib"],
            "reversible_short_peak_mib": short["peak_mib"],
            "reversible_long_peak_mib": long["peak_mib"],
            "bptt_short_peak_mib": bptt["peak_mib"],
            "reversible_short_growth_mib": short["peak_mib"] - short["baseline_mib"],
            "reversible_long_growth_mib": long["peak_mib"] - long["baseline_mib"],
            "bptt_short_growth_mib": bptt["peak_mib"] - bptt["baseline_mib"],
            "memory_ratio": long["peak_mib"] / short["peak_mib"]}
