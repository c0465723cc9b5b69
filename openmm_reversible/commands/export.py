"""``openmm-reversible export CONFIG.toml --from FIT_DIR --output DIR``: a fit's values in XML.

The trained values come from the trainer (:func:`openmm_reversible.train.trained_parameters`),
the files from :func:`openmm_reversible.export.write_xml`. Nothing is written unless every file
can be: a failed export leaves DIR as it was (and does not create it).
"""

from __future__ import annotations

import argparse

from . import OK

HELP = "write a fit's trained values into copies of the original ForceField XML"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.toml", help="the fit's TOML config")
    parser.add_argument("--from", dest="fit_dir", required=True, metavar="FIT_DIR",
                        help="output directory of `openmm-reversible fit` (its checkpoint.pt)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="directory to write the trained ForceField XML into (created if "
                             "missing)")
    parser.add_argument("--plain", action="store_true",
                        help="drop the parameterize/parameter_eval/conserve_charge tags (a "
                             "file that any OpenMM loads, but that cannot be trained again)")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..export import write_xml
    from ..files import output_directory
    from ..train import trained_parameters

    config = load_config(args.config)
    parameters = trained_parameters(config, args.fit_dir)
    with output_directory(args.output) as output:
        paths = write_xml(parameters, output, strip_markup=args.plain)
    for path in paths:
        print(path)
    for key, value in parameters.values().items():
        print(f"  {key} = {value!r}")
    return OK
