"""``openmm-reversible`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches. Exit codes: 0 success / within tolerance,
1 computed but outside tolerance, 2 bad or unsupported input (one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "verify": ("openmm_reversible.verify",
               "compare the torch twin of a serialized System with OpenMM, force by force"),
    "gradcheck": ("openmm_reversible.gradcheck",
                  "compare reversible, BPTT and finite-difference gradients of a tagged "
                  "force field"),
    "benchmark": ("openmm_reversible.benchmarks",
                  "run a benchmark (forces, gradient, memory, exact) and print its results"),
    "fit": ("openmm_reversible.fit", "train tagged force-field parameters from a TOML config"),
    "export": ("openmm_reversible.export",
               "write a fit's trained values into copies of the original ForceField XML"),
    "validate": ("openmm_reversible.validate", "check a trained force field in plain OpenMM"),
    "demo": ("openmm_reversible.demo",
             "fit flexible 3-site water to RDFs and the heat of vaporisation (make demo)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openmm-reversible",
        description="Train OpenMM force fields by differentiating through molecular dynamics "
                    "with reversible simulation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import InputError
    from .potential.base import UnsupportedForceError
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (InputError, UnsupportedForceError, FileNotFoundError) as exc:
        print(f"openmm-reversible {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
