"""``openmm-reversible demo --output DIR``: the water fit of ``examples/water``, end to end.

Fits σ_O, ε_O and q_O (q_H = −q_O/2) of flexible 3-site water with reaction-field
electrostatics — 216 molecules, from a perturbed TIP3P start — to the O–O and O–H RDFs of
TIP4P-Ew water and the experimental ΔH_vap, on the CPU (CUDA when present) in about ten
minutes, then checks the trained XML in plain OpenMM (:mod:`openmm_reversible.validate`).
DIR receives the trained ``water_flexible.xml``, ``training.png``, ``log.jsonl``, ``checkpoint.pt``,
``validation.png`` and ``validation.json``. Running the demo again on the same DIR resumes
(and, when the fit is complete, only repeats the validation). Exit 0 when the trained XML
passes the round trip in OpenMM, 1 when the training or the round trip fails, 2 for bad input.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import OK, OUTSIDE_TOLERANCE, train, with_epochs

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "water"
CONFIG = EXAMPLE / "water.toml"
HELP = "fit flexible 3-site water to RDFs and the heat of vaporisation (make demo)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", default="demo-output", help="output directory")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the number of epochs of examples/water/water.toml "
                             "(default: the config's)")
    parser.add_argument("--validation-steps", type=int, default=3000,
                        help="OpenMM steps of the closing validation run")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import InputError
    from ..train import CHECKPOINT, Trainer
    from ..validate import format_table, save_report, validate

    if not CONFIG.is_file():
        raise InputError(f"the demo needs the repository's examples/water directory "
                         f"({CONFIG} is missing); run it from a source checkout")
    config = with_epochs(load_config(CONFIG), args.epochs)
    output = Path(args.output)
    start = time.perf_counter()
    resume = (output / CHECKPOINT).is_file()
    trainer = Trainer(config, output, resume=resume, progress=not args.no_progress)
    print(f"demo: {trainer.topology.getNumResidues()} flexible waters, "
          f"{trainer.sampler.platform_name} sampling, {config.schedule.epochs} epochs "
          f"× {config.schedule.windows} windows of {config.schedule.window_steps} steps"
          + (" (resuming)" if resume else ""))
    result = train(trainer, "demo")
    if result is None:
        return OUTSIDE_TOLERANCE
    first, last = result.records[0], result.records[-1]
    print(f"loss: epoch {first['epoch']} {first['loss']:.4g} -> epoch {last['epoch']} "
          f"{last['loss']:.4g}")
    for key in first["parameters"]:
        print(f"  {key:<24} {first['parameters'][key]:>10.5f} -> {result.parameters[key]:.5f}")
    trained = [str(p) for p in result.files["forcefield"]]
    report = validate(trained, config, steps=args.validation_steps, equilibration=1000,
                      every=25, progress=not args.no_progress)
    report_path, figure_path = save_report(report, output)
    check = report["round_trip"]
    print(f"trained XML in plain OpenMM vs torch twin: energy rel. error "
          f"{check['energy_rel_error']:.1e}, force rel. RMS error "
          f"{check['force_rel_rms_error']:.1e}")
    print(format_table(report["observables"]))
    print(f"wrote {', '.join(trained)}, {result.files['plot']}, {figure_path} and "
          f"{report_path} ({time.perf_counter() - start:.0f} s)")
    return OK if check["ok"] else OUTSIDE_TOLERANCE
