"""``openmm-reversible fit CONFIG.toml [--resume] [--output DIR] [--forcefield XML]
[--workers N | --scheduler ADDR]``: train force-field parameters.

The config (:mod:`openmm_reversible.config`) is validated in full before anything runs or is
written; the training loop is :class:`openmm_reversible.train.Trainer`. After every epoch DIR
holds the trained ForceField XML, ``log.jsonl``, ``training.png`` and ``checkpoint.pt``;
``--resume`` continues from the checkpoint. ``--workers N`` runs the pieces of each epoch on N
local worker processes (``auto``: one per GPU), or on N worker jobs of the config's Slurm or PBS
cluster, ``--scheduler ADDR`` on a running Dask cluster (both override the config's
``[parallel]`` section; the results are the same). Exit codes: 0 finished, 1 training
failed (the last good parameters stay in DIR), 2 bad input.

A config of crystal systems (``[[systems]]`` with ``kind = "crystal"``) trains its ML model
with :class:`openmm_reversible.crystal.CrystalTrainer` (the same loop, files and resume; DIR
holds ``model.pt`` instead of XML); after the last epoch the ``[evaluation]`` run writes
``evaluation.json``, and the trained model is exported (``forcefield.xml``, ``system.xml``) and
checked in OpenMM (``export.json``) with ``openmm_reversible_plugin``'s ForceField writer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
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
    parser.add_argument("--forcefield", action="append", default=None, metavar="XML",
                        help="fit this ForceField XML instead of the config's "
                             "forcefield.files (repeat for several files), e.g. another "
                             "functional form: examples/paper/forcefields/buckingham.xml "
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

    config = with_epochs(load_config(args.config, args.forcefield), args.epochs)
    output = fit_directory(args.config, args.output)
    if config.crystals:
        return _fit_crystals(config, output, args)
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


def _fit_crystals(config, output: Path, args: argparse.Namespace) -> int:
    """``fit`` of a config of crystal systems: train, evaluate, export and check."""
    from ..crystal import CrystalTrainer, export_crystal
    from ..errors import InputError
    from ..train import TrainingFailed

    if args.workers is not None or args.scheduler is not None:
        option = "--workers" if args.workers is not None else "--scheduler"
        raise InputError(f"{option}: the windows of a crystal fit run in this process; remove "
                         f"{option}")
    trainer = CrystalTrainer(config, output, resume=args.resume, progress=not args.no_progress)
    result = train(trainer, "fit")
    if result is None:
        return OUTSIDE_TOLERANCE
    last = result.records[-1]
    print(f"epoch {last['epoch']}: loss {last['loss']:.6g}")
    for key, value in last["observables"].items():
        shown = (", ".join(f"{v:.4g}" for v in value) if isinstance(value, list)
                 else f"{value:.6g}")
        print(f"  {key} = {shown} GPa")
    for key, value in result.parameters.items():
        print(f"  {key} = {value:.6g}")
    if config.evaluation.steps > 0:
        for label, report in trainer.evaluate().items():
            constants = ", ".join(f"{k} {report[k + '_GPa']:.5g} ± "
                                  f"{report[k + '_stderr_GPa']:.2g}" for k in ("C11", "C12", "C44"))
            stress = ", ".join(f"{s:+.3g}" for s in report["stress_GPa"])
            print(f"evaluation of {label} ({report['n_snapshots']} snapshots of "
                  f"{report['steps']} steps): {constants} GPa; stress {stress} GPa; "
                  f"{report['temperature_K']:.1f} K")
    # The ForceField writer of the learned-potential tag is the plugin's; the command layer
    # hands it to the library, which never imports the plugin.
    import openmm_reversible_plugin

    try:
        report = export_crystal(trainer, openmm_reversible_plugin.write_forcefield)
    except TrainingFailed as exc:
        print(f"openmm-reversible fit: export failed: {exc}", file=sys.stderr)
        return OUTSIDE_TOLERANCE
    for label, energy in report["energies"].items():
        print(f"{label}: energy of the final state: torch {energy['torch']:.6f}, OpenMM "
              f"{energy['openmm']:.6f} kJ/mol (relative difference "
              f"{energy['relative_difference']:.1e})")
    print(f"trained model: {result.files['model']}  force field: {report['forcefield']}  "
          f"systems: {', '.join(report['systems'].values())}")
    print(f"log: {result.files['log']}  plot: {result.files['plot']}")
    return OK
