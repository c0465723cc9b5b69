"""Diamond from scratch: train a Stillinger–Weber prior plus a neural network to the stress and
elastic constants of diamond by reversible simulation, then export the result into OpenMM.

The configuration (``diamond.toml`` beside this file) has five tables: ``[crystal]`` (cells,
lattice constant, mass), ``[prior]`` (:class:`~openmm_reversible.ml.StillingerWeber`
arguments), ``[model]`` (``kind``: ``behler_parrinello`` or ``schnet``, and the arguments
of :class:`~openmm_reversible.ml.BehlerParrinello` or :class:`~openmm_reversible.ml.SchNet`),
``[training]`` (:class:`~openmm_reversible.train_elastic.ElasticTrainingSettings`) and
``[targets]``
(:class:`~openmm_reversible.train_elastic.ElasticTargets`), and an optional sixth,
``[evaluation]`` (``steps``, ``snapshot_every``, ``blocks``): a long plain run of the trained
model afterwards that reports its stress and elastic constants with standard errors
(:func:`~openmm_reversible.train_elastic.evaluate_elastic`).

The output directory receives ``log.jsonl``, ``checkpoint.pt`` and ``model.pt`` from the
training, ``evaluation.json``, then ``diamond_trained.xml`` (a ForceField with the trained
model embedded) and ``system.xml`` (an OpenMM System built from it). The script checks that
OpenMM's energy of the final configuration equals the torch model's.

Usage::

    python examples/diamond/train_diamond.py examples/diamond/diamond.toml --output out
    OMP_NUM_THREADS=1 python examples/diamond/train_diamond.py \\
        examples/diamond/diamond_cpu.toml --output out-cpu   # the 64-atom CPU version
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# torch before openmm: OpenMM loads its plugins on import, and openmm-torch's kernels need the
# CUDA runtime libraries that importing torch loads (otherwise no platform runs a TorchForce).
import torch  # isort: split

import numpy as np
import openmm
from openmm import app, unit
from openmm_reversible_plugin import write_forcefield

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from openmm_reversible.files import atomic_write_text
from openmm_reversible.ml import (
    BehlerParrinello,
    SchNet,
    StillingerWeber,
    diamond_lattice,
    diamond_topology,
)
from openmm_reversible.train_elastic import (
    ElasticTargets,
    ElasticTrainingSettings,
    evaluate_elastic,
    train_elastic,
)

SECTIONS = ("crystal", "prior", "model", "training", "targets")
MODELS = {"behler_parrinello": BehlerParrinello, "schnet": SchNet}
"""``[model] kind`` → model class; the other keys of ``[model]`` are its arguments."""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="TOML configuration (see diamond.toml)")
    parser.add_argument("--output", type=Path, default=Path("diamond-output"),
                        help="output directory (default: diamond-output)")
    parser.add_argument("--n-cells", type=int, help="override [crystal] n_cells")
    parser.add_argument("--device", help="override [training] device (cpu, cuda)")
    parser.add_argument("--epochs", type=int, help="override [training] epochs")
    parser.add_argument("--evaluate-steps", type=int,
                        help="override [evaluation] steps (0: no evaluation run)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --output (the config may "
                        "change the schedule, learning rates and device, not the dynamics)")
    return parser.parse_args(argv)


def load_config(path: Path, args: argparse.Namespace) -> dict:
    """The TOML tables, with the command-line overrides applied."""
    with open(path, "rb") as fh:
        config = tomllib.load(fh)
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise SystemExit(f"{path}: missing tables {missing}; see examples/diamond/diamond.toml")
    if args.n_cells is not None:
        config["crystal"]["n_cells"] = args.n_cells
    for key in ("device", "epochs"):
        if getattr(args, key) is not None:
            config["training"][key] = getattr(args, key)
    config.setdefault("evaluation", {})
    unknown = sorted(set(config["evaluation"]) - {"steps", "snapshot_every", "blocks"})
    if unknown:
        raise SystemExit(f"{path}: [evaluation] has unknown keys {unknown}; valid keys: "
                         "blocks, snapshot_every, steps")
    if args.evaluate_steps is not None:
        config["evaluation"]["steps"] = args.evaluate_steps
    kind = config["model"].get("kind", "behler_parrinello")
    if kind not in MODELS:
        raise SystemExit(f"{path}: [model] kind {kind!r} is not one of {sorted(MODELS)}")
    return config


def build_model(model_config: dict, positions: np.ndarray, box: np.ndarray):
    """The neural model of ``[model]``; Behler–Parrinello descriptors are standardized on the
    perfect crystal (so the network sees relative changes of its environment)."""
    arguments = dict(model_config)
    model = MODELS[arguments.pop("kind", "behler_parrinello")](**arguments)
    if hasattr(model, "standardize"):
        model.standardize(positions, box)
    return model


def openmm_energy(system: openmm.System, positions: np.ndarray, box: np.ndarray) -> float:
    """Potential energy (kJ/mol) of ``positions`` (nm) in OpenMM, on its fastest platform."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005))
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    context.setPositions(positions)
    state = context.getState(getEnergy=True)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(args.config, args)
    crystal = config["crystal"]
    positions, box = diamond_lattice(crystal["n_cells"], crystal["lattice_constant"])
    masses = np.full(len(positions), float(crystal["mass"]))
    settings = ElasticTrainingSettings.from_mapping(config["training"])
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("device 'cuda' requested but torch sees no CUDA device; pass "
                         "--device cpu, or run examples/diamond/diamond_cpu.toml (64 atoms)")
    print(f"{len(positions)} atoms, box {box[0, 0]:.4f} nm, device {settings.device}")

    result = train_elastic(build_model(config["model"], positions, box), positions, box, masses,
                           prior=StillingerWeber(**config["prior"]),
                           targets=ElasticTargets.from_mapping(config["targets"]),
                           settings=settings, output=args.output, resume=args.resume)
    first, last = result.history[0], result.history[-1]
    for label, record in (("first epoch", first), ("last epoch", last)):
        print(f"{label}: loss {record['loss']:.4g}, stress {np.round(record['stress_GPa'], 2)}"
              f" GPa, C11/C12/C44 {record['C11_GPa']:.0f}/{record['C12_GPa']:.0f}/"
              f"{record['C44_GPa']:.0f} GPa")
    evaluation = config["evaluation"]
    if evaluation.get("steps", 0) > 0:
        report = evaluate_elastic(result.model, result.positions.cpu(), result.velocities.cpu(),
                                  box, masses, settings, start_step=result.step, **evaluation)
        atomic_write_text(args.output / "evaluation.json", json.dumps(report, indent=1) + "\n")
        print(f"evaluation over {report['n_snapshots']} snapshots of {report['steps']} steps: "
              + ", ".join(f"{k} {report[k + '_GPa']:.0f} ± {report[k + '_stderr_GPa']:.0f}"
                          for k in ("C11", "C12", "C44"))
              + f" GPa, stress {np.round(report['stress_GPa'], 2)} GPa "
              f"({report['seconds']:.0f} s; evaluation.json)")
    model = result.model.to("cpu")
    print("trained Stillinger-Weber parameters:", model[0].parameter_dict())
    forcefield_path = args.output / "diamond_trained.xml"
    write_forcefield(str(forcefield_path), model, {"C": ("C", float(crystal["mass"]), 0)})
    topology = diamond_topology(len(positions), box)
    system = app.ForceField(str(forcefield_path)).createSystem(
        topology, nonbondedMethod=app.CutoffPeriodic)
    (args.output / "system.xml").write_text(openmm.XmlSerializer.serialize(system))
    final = result.positions.cpu().numpy()
    with torch.no_grad():
        reference = float(model(torch.tensor(final), torch.tensor(box)))
    exported = openmm_energy(system, final, box)
    print(f"energy of the final state: torch {reference:.6f}, OpenMM {exported:.6f} kJ/mol "
          f"(relative difference {abs(exported - reference) / abs(reference):.1e})")
    print(f"wrote {forcefield_path} and {args.output / 'system.xml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
