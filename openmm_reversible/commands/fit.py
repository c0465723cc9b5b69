"""``openmm-reversible fit CONFIG.toml [--resume] [--output DIR] [--workers N | --scheduler ADDR]``:
train force-field parameters.

The config (:mod:`openmm_reversible.config`) is validated in full before anything runs or is
written; the training loop is :class:`openmm_reversible.train.Trainer`. After every epoch DIR
holds the trained ForceField XML, ``log.jsonl``, ``training.png`` and ``checkpoint.pt``;
``--resume`` continues from the checkpoint. ``--workers N`` runs the pieces of each epoch on N
local worker processes (``auto``: one per GPU), or on N worker jobs of the config's Slurm or PBS
cluster, ``--scheduler ADDR`` on a running Dask cluster (both override the config's
``[parallel]`` section; the results are the same). Exit codes: 0 finished, 1 training
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
    where.add_argument("--workers", default=None, metavar="N",
                       help="run the pieces of each epoch on N worker processes, or 'auto': "
                            "one per GPU, else one per parallel.threads_per_worker cores "
                            "(overrides parallel.workers; with parallel.cluster = slurm or "
                            "pbs, the number of worker jobs)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the windows on the Dask cluster at ADDRESS, e.g. "
                            "tcp://10.0.0.5:8786 (overrides parallel.scheduler)")


def fit_directory(config_path: str, output: str | None) -> Path:
    """``--output`` or, by default, ``fit-output`` beside the config file."""
    return Path(output) if output else Path(config_path).resolve().parent / "fit-output"


def run(args: argparse.Namespace) -> int:
    from ..config import JOBQUEUE_KEYS, ParallelConfig, check_parallel, load_config
    from ..errors import InputError
    from ..train import Trainer

    config = with_epochs(load_config(args.config), args.epochs)
    if args.workers is not None or args.scheduler is not None:
        workers = args.workers
        if workers is not None and workers != "auto":
            if not workers.lstrip("-").isdigit():
                raise InputError(f"--workers {workers}: give a number of workers or 'auto'")
            workers = int(workers)
            if workers < 1:
                raise InputError(f"--workers {workers}: must be >= 1")
        parallel = dataclasses.replace(config.parallel, workers=workers,
                                       scheduler=args.scheduler)
        if args.scheduler is not None:  # a running cluster's, not the config's worker jobs
            default = ParallelConfig()
            parallel = dataclasses.replace(parallel, cluster=default.cluster, **{
                key: getattr(default, key) for key in JOBQUEUE_KEYS})
        check_parallel(parallel)
        config = dataclasses.replace(config, parallel=parallel)
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
