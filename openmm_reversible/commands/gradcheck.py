"""``openmm-reversible gradcheck``: reversible vs BPTT vs finite-difference gradients.

The check is :func:`openmm_reversible.gradcheck.check_forcefield_gradients`; this command prints
its gradients (a table, or one JSON object) and the verdict of
:meth:`~openmm_reversible.gradcheck.GradientCheck.verdict`: exit 0 when the reversible gradient
equals backprop through time within ``--tol-bptt`` and the conclusive finite differences within
``--tol-fd`` (finite differences whose values at steps h and h/2 disagree by more than
``--fd-consistency`` are reported as inconclusive, with the reason), 1 when not, 2 for bad
input.
"""

from __future__ import annotations

import argparse
import json

from . import OK, OUTSIDE_TOLERANCE, defaults

HELP = "compare reversible, BPTT and finite-difference gradients of a tagged force field"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..gradcheck import FD_CONSISTENCY, LOSSES, check_forcefield_gradients
    from ..methods import CONSTRAINTS, NONBONDED_METHODS

    default = defaults(check_forcefield_gradients)
    parser.add_argument("--forcefield", action="append", required=True, metavar="FF.xml",
                        help="ForceField XML with parameterize tags (repeat for several files, "
                             "in load order; bundled names such as tip3p.xml work)")
    parser.add_argument("--pdb", required=True, metavar="COORDS",
                        help="PDB file with the structure (CRYST1 gives the periodic box)")
    parser.add_argument("--steps", type=int, required=True, help="simulation steps")
    parser.add_argument("--loss", choices=LOSSES, default=default["loss"],
                        help="mean potential energy, mean kinetic energy, or O-O RDF deviation "
                             "from 1")
    parser.add_argument("--snapshot-every", type=int, default=None,
                        help="steps between loss snapshots (default: steps // 5, at least 1)")
    parser.add_argument("--timestep", type=float, default=default["timestep"], help="ps")
    parser.add_argument("--friction", type=float, default=default["friction"], help="1/ps")
    parser.add_argument("--temperature", type=float, default=default["temperature"], help="K")
    parser.add_argument("--seed", type=int, default=default["seed"],
                        help="noise and velocity seed")
    parser.add_argument("--nonbonded-method", choices=sorted(NONBONDED_METHODS), default=None,
                        help="default: CutoffPeriodic (reaction field) with a box, else "
                             "NoCutoff")
    parser.add_argument("--cutoff", type=float, default=default["cutoff"], help="nm")
    parser.add_argument("--rigid-water", action="store_true",
                        help="rigid water molecules (constrained, as OpenMM's rigidWater)")
    parser.add_argument("--constraints", choices=list(CONSTRAINTS),
                        default=default["constraints"],
                        help="bond constraints (as OpenMM's createSystem constraints)")
    parser.add_argument("--fd-step", type=float, default=default["fd_step"],
                        help="finite-difference step in the scaled variables")
    parser.add_argument("--tol-bptt", type=float, default=1e-8,
                        help="tolerance on rel_error_bptt")
    parser.add_argument("--tol-fd", type=float, default=1e-4, help="tolerance on rel_error_fd")
    parser.add_argument("--fd-consistency", type=float, default=FD_CONSISTENCY,
                        help="finite differences judge a parameter only where those at steps "
                             "h and h/2 agree within this (relative)")
    parser.add_argument("--reweighting", action="store_true",
                        help="also report the ensemble-reweighting (fluctuation-formula) "
                             "gradient from the run's snapshots; compare it on long runs "
                             "with many snapshots (not part of the pass/fail test)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def format_table(result, loss: str, steps: int, tol_bptt: float, tol_fd: float,
                 ok: bool, why: str) -> str:
    """The gradients of a :class:`~openmm_reversible.gradcheck.GradientCheck`, one row per
    parameter, with the verdict."""
    width = max(len(n) for n in result.names)
    lines = [f"loss {loss} = {result.loss:.10g} after {steps} steps "
             f"(reconstruction error {result.reconstruction_error:.2e} nm)"]
    columns = [result.reversible, result.bptt, result.finite_difference]
    header = ["reversible", "bptt", "finite diff"]
    if result.reweighting is not None:
        columns.append(result.reweighting)
        header.append("reweighting")
    lines.append(f"{'parameter':<{width}}" + "".join(f"  {h:>16}" for h in header))
    for i, name in enumerate(result.names):
        lines.append(f"{name:<{width}}" + "".join(f"  {c[i]:16.9e}" for c in columns))
    if result.reweighting is not None:
        lines.append(f"reweighting from {result.n_frames} snapshots: largest relative "
                     f"difference from reversible {result.rel_difference_reweighting:.3e} "
                     f"(statistical; static observables only)")
    lines.append(f"rel_error_bptt {result.rel_error_bptt:.3e} (tol {tol_bptt:g})  "
                 f"rel_error_fd {result.rel_error_fd:.3e} (tol {tol_fd:g})  "
                 f"{'ok' if ok else 'FAILED'}: {why}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..gradcheck import check_forcefield_gradients

    result = check_forcefield_gradients(
        args.forcefield, args.pdb, args.steps, loss=args.loss,
        snapshot_every=args.snapshot_every, timestep=args.timestep, friction=args.friction,
        temperature=args.temperature, seed=args.seed, nonbonded_method=args.nonbonded_method,
        cutoff=args.cutoff, fd_step=args.fd_step, reweighting=args.reweighting,
        progress=not args.no_progress, rigid_water=args.rigid_water,
        constraints=args.constraints)
    ok, why = result.verdict(args.tol_bptt, args.tol_fd, args.fd_consistency)
    if args.json:
        print(json.dumps(result.as_dict() | {"ok": ok, "verdict": why, "loss_name": args.loss,
                                             "steps": args.steps}))
    else:
        print(format_table(result, args.loss, args.steps, args.tol_bptt, args.tol_fd, ok, why))
    return OK if ok else OUTSIDE_TOLERANCE
