"""``openmm-reversible verify SYSTEM.xml COORDS``: the torch twin of a System against OpenMM.

Exit 0 when every force is within the tolerances of :mod:`openmm_reversible.verify`, 1 when
one is not, 2 for bad input.
"""

from __future__ import annotations

import argparse
import json

from . import OK, OUTSIDE_TOLERANCE, defaults

HELP = "compare the torch twin of a serialized System with OpenMM, force by force"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..verify import verify

    parser.add_argument("system", metavar="SYSTEM.xml", help="serialized OpenMM System")
    parser.add_argument("coords", metavar="COORDS", help="PDB/PDBx file or serialized State XML")
    parser.add_argument("--platform", default=defaults(verify)["platform"],
                        help="OpenMM platform for the reference values")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..verify import format_report, load_coordinates, load_system, verify

    system = load_system(args.system)
    positions, box = load_coordinates(args.coords, system)
    report = verify(system, positions, box, args.platform)
    print(json.dumps(report.to_dict()) if args.json else format_report(report), flush=True)
    return OK if report.ok else OUTSIDE_TOLERANCE
