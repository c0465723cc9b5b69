"""``openmm-reversible benchmark NAME``: performance measurements, one JSON line each.

- ``gradient``: time of a reversible gradient over the forward run alone (:mod:`.gradient`);
- ``memory``: peak memory of reversible gradients through 1,000 and 20,000 steps and of
  backprop through time (:mod:`.memory`);
- ``forces``: torch force and VJP cost against an OpenMM step (:mod:`.forces`);
- ``parallel``: an epoch's windows on 1 and on N local Dask workers: speed-up, overhead per
  piece, identical results (:mod:`.parallel`);
- ``exact``: bitwise round trip of the water box in fixed point: information-buffer size,
  bits per degree of freedom and step, and cost relative to the float mode (:mod:`.exact`).

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> dict``.
"""

from __future__ import annotations

import argparse
import importlib
import json

BENCHMARKS = {"gradient": "Time of a reversible gradient relative to the forward run",
              "memory": "Peak memory of reversible gradients vs steps, and of BPTT",
              "forces": "Cost of the torch forces and VJPs against an OpenMM CPU step",
              "parallel": "An epoch's windows on 1 and on N local Dask workers: speed-up, "
                          "overhead per piece",
              "exact": "Bitwise round trip of the water box in fixed point: buffer size, "
                       "bits per step, cost vs float"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="NAME", required=True)
    for name, help_text in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"{__name__}.{name}").add_arguments(p)
        p.add_argument("--json", action="store_true", help="print one JSON line")


def run(args: argparse.Namespace) -> int:
    result = importlib.import_module(f"{__name__}.{args.benchmark}").run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
