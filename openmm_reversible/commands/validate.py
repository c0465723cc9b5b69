"""``openmm-reversible validate TRAINED.xml [...] --config CONFIG.toml``: check in plain OpenMM.

The checks are :func:`openmm_reversible.validate.validate`. The command prints the round trip
and the observables, writes ``validation.json`` and ``validation.png``, and exits 0 when the
round trip is within tolerance, 1 when it is not, 2 for bad input (nothing written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import OK, OUTSIDE_TOLERANCE, defaults

HELP = "check a trained force field in plain OpenMM"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..validate import validate

    default = defaults(validate)
    parser.add_argument("trained", nargs="+", help="trained ForceField XML file(s)")
    parser.add_argument("--config", required=True, help="the fitting config (TOML)")
    parser.add_argument("--forcefield", action="append", default=None, metavar="XML",
                        help="the force field the fit ran with when it replaced the config's "
                             "(fit --forcefield; repeat for several files): the trained "
                             "files take their places by name (default: the config's "
                             "forcefield.files)")
    parser.add_argument("--steps", type=int, default=default["steps"], help="production steps")
    parser.add_argument("--equilibration", type=int, default=default["equilibration"],
                        help="equilibration steps")
    parser.add_argument("--every", type=int, default=default["every"],
                        help="steps between frames")
    parser.add_argument("--rigid", action="store_true", help="rigid water (2 fs step)")
    parser.add_argument("--nonbonded", choices=("ReactionField", "PME", "CutoffPeriodic",
                                                "Ewald"), default=None,
                        help="nonbonded method of the run (default: the config's)")
    parser.add_argument("--pressure", type=float, default=None,
                        help="NPT at this pressure, bar (default: the config's; NVT if none)")
    parser.add_argument("--platform", default=None,
                        help="OpenMM platform (default: the config's)")
    parser.add_argument("--seed", type=int, default=default["seed"],
                        help="seed of the thermostat and the initial velocities")
    parser.add_argument("--output", "-o", default=None,
                        help="directory for validation.json and validation.png "
                             "(default: beside the first trained file)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _print_report(report: dict) -> bool:
    """Print one state point's round trip and table; whether its round trip is ok."""
    from ..validate import format_table

    check = report["round_trip"]
    verdict = "ok" if check["ok"] else "FAILED"
    print(f"round trip (trained XML in OpenMM vs torch twin): energy rel. error "
          f"{check['energy_rel_error']:.2e}, force rel. RMS error "
          f"{check['force_rel_rms_error']:.2e} (tolerance {check['tolerance']:.0e}): {verdict}")
    print(format_table(report["observables"]))
    return check["ok"]


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..files import output_directory
    from ..validate import (
        save_report,
        save_state_points_report,
        validate,
        validate_state_points,
    )

    config = load_config(args.config, args.forcefield)
    output = Path(args.output) if args.output else Path(args.trained[0]).resolve().parent
    settings = dict(steps=args.steps, equilibration=args.equilibration, every=args.every,
                    rigid=args.rigid, nonbonded=args.nonbonded, pressure=args.pressure,
                    platform=args.platform, seed=args.seed, progress=not args.no_progress)
    with output_directory(output):
        if config.systems:
            report = validate_state_points(args.trained, config, **settings)
            paths = save_state_points_report(report, output)
        else:
            report = validate(args.trained, config, **settings)
            paths = save_report(report, output)
    if config.systems:
        ok = True
        for point in report["state_points"]:
            print(f"{point['label']}:")
            ok = _print_report(point) and ok
    else:
        ok = _print_report(report)
    print(f"wrote {paths[0]} and {paths[1]}")
    return OK if ok else OUTSIDE_TOLERANCE
