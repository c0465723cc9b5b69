"""``openmm-reversible benchmark NAME``: performance measurements, one record each.

The measurements are functions of :mod:`openmm_reversible.benchmarks`; this command prints a
record as ``key: value`` lines or, with ``--json``, as one JSON line. Exit 0, or 2 for bad
options.
"""

from __future__ import annotations

import argparse
import json

from . import OK, defaults

HELP = ("run a benchmark (forces, gradient, memory, constraints, parallel, epoch, "
        "gradient-noise, o2-diffusion, exact)")

BENCHMARKS = {
    "gradient": ("openmm_reversible.benchmarks.gradient", "measure",
                 "Time of a reversible gradient relative to the forward run"),
    "memory": ("openmm_reversible.benchmarks.memory", "compare",
               "Peak memory of reversible gradients vs steps, and of BPTT"),
    "forces": ("openmm_reversible.benchmarks.forces", "measure",
               "Cost of the torch forces and VJPs against an OpenMM CPU step"),
    "constraints": ("openmm_reversible.benchmarks.constraints", "measure",
                    "Cost of a constrained (rigid water) reverse step against an unconstrained "
                    "one on the same box"),
    "parallel": ("openmm_reversible.benchmarks.parallel", "measure",
                 "An epoch's pieces (windows, replicas' sampling) on 1 and on N local Dask "
                 "workers: time per piece, overhead per piece, speed-up, identical results"),
    "epoch": ("openmm_reversible.benchmarks.epoch", "measure",
              "One training epoch of a fit config: wall time, its split between OpenMM "
              "sampling and the reversible windows (forward, reverse), per-step costs against "
              "an OpenMM CPU step"),
    "gradient-noise": ("openmm_reversible.benchmarks.gradient_noise", "measure",
                       "Reversible against reweighting gradients of an RDF loss on the same "
                       "windows, and their spread over independent runs (JSON and figure)"),
    "o2-diffusion": ("openmm_reversible.benchmarks.o2_diffusion", "measure",
                     "Sigma and epsilon of O2 in water fitted to D = 2.0e-9 m^2/s by reversible "
                     "and by reweighting gradients from the same start and schedule (JSON and "
                     "figure)"),
    "exact": ("openmm_reversible.benchmarks.exact", "measure",
              "Bitwise round trip of the water box in fixed point: buffer size, bits per step, "
              "cost vs float"),
}
"""name -> (module, function, one-line help)."""

OPTIONS = {
    "gradient": {"waters": (int, "water molecules"), "steps": (int, "steps in the window"),
                 "snapshot_every": (int, "steps between loss snapshots"),
                 "cutoff": (float, "nm"), "seed": (int, "noise and velocity seed"),
                 "fused": (bool, "use the fused kernels instead of autograd"),
                 "nonbonded": (str, "electrostatics: RF (reaction field) or PME"),
                 "openmm_steps": (int, "OpenMM CPU steps timed for the per-step ratios")},
    "memory": {"waters": (int, "water molecules"),
               "short_steps": (int, "steps of the short runs"),
               "long_steps": (int, "steps of the long reversible run"),
               "snapshots": (int, "loss snapshots per run, the same for every length: the "
                                  "loss's own graph over its snapshots grows with their "
                                  "number, not with the steps between them"),
               "cutoff": (float, "nm"), "seed": (int, "noise and velocity seed"),
               "model": (str, "water model: tip3p, or tip4pew (a virtual site a molecule)"),
               "rigid_water": (bool, "rigid molecules (constrained dynamics)")},
    "forces": {"box_size": (float, "edge of the water box, nm (3.0: 2661 atoms)"),
               "cutoff": (float, "nm"), "repeats": (int, "timed repeats (median)"),
               "nonbonded": (str, "electrostatics: RF (reaction field) or PME"),
               "forcefield": (str, "tagged water force field XML to time instead of TIP3P "
                                   "(e.g. examples/paper/forcefields/double_exponential.xml)")},
    "constraints": {"waters": (int, "water molecules"),
                    "steps": (int, "steps in each window"),
                    "repeats": (int, "measurements of each (the fastest is kept)"),
                    "cutoff": (float, "nm"), "seed": (int, "noise and velocity seed")},
    "parallel": {"config": (str, "TOML fitting config"),
                 "workers": (int, "workers to compare with 1"),
                 "windows": (int, "override schedule.windows (>= 4 keeps the workers busy)"),
                 "replicas": (int, "override schedule.replicas (> 1: each replica's OpenMM "
                                   "sampling is a piece too)"),
                 "epochs": (int, "epochs per layout; the last one is timed")},
    "epoch": {"config": (str, "TOML fitting config (e.g. examples/water/water.toml)"),
              "waters": (int, "override structure.water_box (molecules)"),
              "windows": (int, "override schedule.windows"),
              "window_steps": (int, "override schedule.window_steps"),
              "snapshot_every": (int, "override schedule.snapshot_every"),
              "equilibration_steps": (int, "override schedule.equilibration_steps"),
              "bulk_steps": (int, "override schedule.bulk_steps"),
              "platform": (str, "override simulation.platform (OpenMM's sampling)"),
              "fused": (bool, "reversible windows on the fused kernels"),
              "openmm_steps": (int, "OpenMM CPU steps timed for the per-step ratios")},
    "gradient-noise": {"waters": (int, "water molecules"),
                       "runs": (int, "independent runs (>= 2)"),
                       "steps": (int, "steps of each run's reversible window"),
                       "snapshot_every": (int, "steps between the window's snapshots"),
                       "equilibration_steps": (int, "OpenMM steps before each window"),
                       "cutoff": (float, "nm"), "seed": (int, "seed of the first run"),
                       "output": (str, "directory for gradient_noise.json and .png "
                                       "(default: none)")},
    "o2-diffusion": {"n_o2": (int, "O2 molecules (1 to 8)"),
                     "box_size": (float, "edge of the cubic box, nm"),
                     "cutoff": (float, "nm"), "epochs": (int, "optimiser steps of each fit"),
                     "windows": (int, "reversible windows per epoch (>= 3)"),
                     "window_steps": (int, "steps of each window (1 fs)"),
                     "snapshot_every": (int, "steps between the window's snapshots"),
                     "equilibration_steps": (int, "OpenMM steps before the first epoch"),
                     "bulk_steps": (int, "OpenMM steps before each window"),
                     "learning_rate": (float, "Adam step on the scaled parameters"),
                     "fit_start": (float, "MSD slope fitted from this fraction of the window"),
                     "seed": (int, "seed of OpenMM and of the windows' noise"),
                     "output": (str, "directory for o2_diffusion.json and .png "
                                     "(default: none)")},
    "exact": {"waters": (int, "water molecules"),
              "steps": (int, "steps forward, then as many back"),
              "timing_steps": (int, "steps of the float and exact round trips timed for the "
                                    "ratio"),
              "cutoff": (float, "nm"), "seed": (int, "noise and velocity seed")},
}
"""name -> {parameter of the benchmark function: (type, help)}; each is an option
``--parameter-name`` whose default is the function's."""


def _function(name: str):
    import importlib

    module, function, _ = BENCHMARKS[name]
    return getattr(importlib.import_module(module), function)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, (_, _, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=parser.formatter_class)
        default = defaults(_function(name))
        for option, (kind, option_help) in OPTIONS[name].items():
            flag = f"--{option.replace('_', '-')}"
            if kind is bool:  # a switch, off by default
                p.add_argument(flag, action="store_true", help=option_help)
            elif option not in default:  # no library default: required
                p.add_argument(flag, type=kind, required=True, help=option_help)
            else:
                p.add_argument(flag, type=kind, default=default[option], help=option_help)
        p.add_argument("--json", action="store_true", help="print one JSON line")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    options = {option: getattr(args, option) for option in OPTIONS[args.benchmark]}
    result = _function(args.benchmark)(**options, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return OK
