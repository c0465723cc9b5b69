"""``openmm-reversible fit CONFIG.toml [--resume] [--output DIR] [--workers N | --scheduler ADDR]``:
train force-field parameters.

The config (:mod:`openmm_reversible.config`) is validated in full before anything runs or is
written; the training loop is :class:`openmm_reversible.train.Trainer`. After every epoch DIR
holds the trained ForceField XML, ``log.jsonl``, ``training.png`` and ``checkpoint.pt``;
``--resume`` continues from the checkpoint. ``--workers N`` runs the windows of each epoch on N
local worker processes, ``--scheduler ADDR`` on a running Dask cluster (both override the
config's ``[parallel]`` section; the results are the same). Exit codes: 0 finished, 1 training
failed (the last good parameters stay in DIR), 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import OK, OUTSIDE_TOLERANCE, train, with_epochs

HELP = "train tagged force-field parameters from a TOML config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML fitting config (see examples/water/water.toml)")
    parser.add_argument("--output", "-o", default=None,
                        help="output directory (default: fit-output next to the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from DIR/checkpoint.pt")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override schedule.epochs, e.g. to extend a finished fit "
                             "(default: the config's)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run the windows on N local worker processes (overrides "
                            "parallel.workers)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the windows on the Dask cluster at ADDRESS, e.g. "
                            "tcp://10.0.0.5:8786 (overrides parallel.scheduler)")


def fit_directory(config_path: str, output: str | None) -> Path:
    """``--output`` or, by default, ``fit-output`` beside the config file."""
    return Path(output) if output else Path(config_path).resolve().parent / "fit-output"


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import InputError
    from ..train import Trainer

    config = with_epochs(load_config(args.config), args.epochs)
    if args.workers is not None or args.scheduler is not None:
        if args.workers is not None and args.workers < 1:
            raise InputError(f"--workers {args.workers}: must be >= 1")
        config = dataclasses.replace(config, parallel=dataclasses.replace(
            config.parallel, workers=args.workers, scheduler=args.scheduler))
    output = fit_directory(args.config, args.output)
    trainer = Trainer(config, output, resume=args.resume, progress=not args.no_progress)
    for label, note in trainer.rdf_notes.items():
        print(f"{label}: {note}")
    result = train(trainer, "fit")
    if result is None:
        return OUTSIDE_TOLERANCE
    last = result.records[-1] if result.records else None
    if last is not None:
        print(f"epoch {last['epoch']}: loss {last['loss']:.6g}")
        for key, value in result.parameters.items():
            print(f"  {key} = {value:.6g}")
    print(f"trained force field: {', '.join(str(p) for p in result.files['forcefield'])}")
    print(f"log: {result.files['log']}  plot: {result.files['plot']}")
    return OK
