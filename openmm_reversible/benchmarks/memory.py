"""Benchmark ``memory``: peak memory of a reversible gradient is flat in the number of steps.

Each measurement runs in a fresh Python process (so its peak resident set size is its own):
a reversible gradient through ``--short-steps`` (1,000) and ``--long-steps`` (20,000) steps,
and backpropagation through time through ``--short-steps``, each with the same number of loss
snapshots (``--snapshots``, evenly spaced), so that only the trajectory length differs.
Reports each peak RSS (MiB), the peak after building the system (``baseline``), the growth
above it, and ``memory_ratio`` = peak(long) / peak(short) for the reversible gradient; the
method's promise is a ratio close to 1, where BPTT grows with the steps.

Run one measurement alone with
``python -m openmm_reversible.benchmarks.memory --measure reversible --steps 1000``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from ..errors import InputError


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--waters", type=int, default=216, help="water molecules (216)")
    parser.add_argument("--short-steps", type=int, default=1000, help="(1000)")
    parser.add_argument("--long-steps", type=int, default=20000, help="(20000)")
    parser.add_argument("--snapshots", type=int, default=10,
                        help="loss snapshots per run, the same for every length (10): the "
                             "loss's own graph over its snapshots grows with their number, "
                             "not with the steps between them")
    parser.add_argument("--cutoff", type=float, default=0.9, help="nm (0.9)")
    parser.add_argument("--seed", type=int, default=0)


def measure(mode: str, steps: int, waters: int, snapshot_every: int, cutoff: float,
            seed: int) -> dict:
    """Peak RSS (MiB) of one gradient, measured in this process (call it in a fresh one)."""
    from .water import flexible_water

    water = flexible_water(waters, cutoff, seed)
    sim = water.simulation(steps, snapshot_every, mode=mode)
    baseline = _peak_rss_mib()
    sim(water.positions, water.velocities, water.box).backward()
    return {"mode": mode, "steps": steps, "baseline_mib": baseline,
            "peak_mib": _peak_rss_mib()}


def _in_subprocess(mode: str, steps: int, args: argparse.Namespace) -> dict:
    snapshot_every = max(1, steps // args.snapshots)
    command = [sys.executable, "-m", __name__, "--measure", mode, "--steps", str(steps),
               "--waters", str(args.waters), "--snapshot-every", str(snapshot_every),
               "--cutoff", str(args.cutoff), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement {mode} {steps} steps failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    if args.snapshots < 1:
        raise InputError(f"--snapshots must be >= 1, got {args.snapshots}")
    if not 1 <= args.short_steps <= args.long_steps:
        raise InputError(f"need 1 <= --short-steps <= --long-steps, got {args.short_steps} "
                         f"and {args.long_steps}")
    short = _in_subprocess("reversible", args.short_steps, args)
    long = _in_subprocess("reversible", args.long_steps, args)
    bptt = _in_subprocess("bptt", args.short_steps, args)
    return {"benchmark": "memory", "waters": args.waters, "short_steps": args.short_steps,
            "long_steps": args.long_steps, "snapshots": args.snapshots,
            "baseline_mib": short["baseline_mib"],
            "reversible_short_peak_mib": short["peak_mib"],
            "reversible_long_peak_mib": long["peak_mib"],
            "bptt_short_peak_mib": bptt["peak_mib"],
            "reversible_short_growth_mib": short["peak_mib"] - short["baseline_mib"],
            "reversible_long_growth_mib": long["peak_mib"] - long["baseline_mib"],
            "bptt_short_growth_mib": bptt["peak_mib"] - bptt["baseline_mib"],
            "memory_ratio": long["peak_mib"] / short["peak_mib"]}


def _main() -> None:
    parser = argparse.ArgumentParser(description="one memory measurement (used by the "
                                                 "memory benchmark)")
    parser.add_argument("--measure", choices=("reversible", "bptt"), required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--waters", type=int, default=216)
    parser.add_argument("--snapshot-every", type=int, default=100)
    parser.add_argument("--cutoff", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(json.dumps(measure(a.measure, a.steps, a.waters, a.snapshot_every, a.cutoff,
                             a.seed)))


if __name__ == "__main__":
    _main()
