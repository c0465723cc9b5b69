"""Compare the torch twin of an OpenMM System with OpenMM itself, force by force.

The command line is ``openmm-reversible verify SYSTEM.xml COORDS``
(:mod:`openmm_reversible.commands.verify`).

Each force of the System is put in its own force group so OpenMM reports its energy and forces
separately; the twin's term for the same force is differentiated by autograd. Tolerances are the
project's numerical contract: relative energy error ≤ 1e-6 per force (≤ 1e-5 for Ewald/PME) and
relative RMS force error ≤ 1e-5.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import openmm
import torch
from openmm import unit

from .errors import InputError
from .files import read_structure
from .potential import IGNORED_FORCES, TorchPotential
from .potential.torchforce import concrete_force, deserialize_system
from .units import DTYPE

ENERGY_TOL = 1e-6
"""Largest relative energy error of a force, twin vs OpenMM (the numerical contract)."""
ENERGY_TOL_EWALD = 1e-5
"""The same for Ewald/PME forces (reciprocal-space discretisation)."""
FORCE_TOL = 1e-5
"""Largest relative RMS force error of a force, twin vs OpenMM."""
# Denominator floors, so that a force whose energy (or forces) vanish is judged in absolute
# terms instead of dividing by zero: kJ/mol and kJ/mol/nm.
ENERGY_FLOOR = 1e-3
FORCE_FLOOR = 1e-3


@dataclass
class ForceReport:
    """Errors of one force's twin against OpenMM."""

    index: int
    name: str
    ignored: bool = False
    energy_openmm: float = 0.0
    energy_torch: float = 0.0
    energy_rel_error: float = 0.0
    force_rel_rms_error: float = 0.0
    energy_tolerance: float = ENERGY_TOL
    ok: bool = True


@dataclass
class VerifyReport:
    """Whole-system comparison; ``ok`` when every force is within tolerance."""

    platform: str
    n_atoms: int
    energy_openmm: float
    energy_torch: float
    energy_rel_error: float
    force_rel_rms_error: float
    per_force: list[ForceReport] = field(default_factory=list)
    ok: bool = True
    n_virtual_sites: int = 0
    n_constraints: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _is_ewald(force: openmm.Force) -> bool:
    return (isinstance(force, openmm.NonbondedForce)
            and force.getNonbondedMethod() in (openmm.NonbondedForce.Ewald,
                                               openmm.NonbondedForce.PME,
                                               openmm.NonbondedForce.LJPME))


def _rel(err: float, ref: float, floor: float) -> float:
    return float(err / max(abs(ref), floor))


def _rel_rms(diff: np.ndarray, ref: np.ndarray) -> float:
    return _rel(float(np.sqrt(np.mean(diff**2))), float(np.sqrt(np.mean(ref**2))), FORCE_FLOOR)


def load_system(path: str) -> openmm.System:
    """Deserialize an OpenMM System from XML, with errors that say what the file is instead."""
    if not os.path.exists(path):
        raise InputError(f"no such file: {path}; check the path")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        obj = deserialize_system(text) if "<System" in text[:2000] \
            else openmm.XmlSerializer.deserialize(text)
    except Exception as exc:
        raise InputError(f"{path} is not a serialized OpenMM System ({exc}); write one with "
                         "openmm.XmlSerializer.serialize(system)") from None
    if not isinstance(obj, openmm.System):
        raise InputError(f"{path} holds a serialized {type(obj).__name__}, not a System")
    return obj


def load_coordinates(path: str, system: openmm.System) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions (nm) and box (nm, or None) from a PDB/PDBx file or a serialized State."""
    if not os.path.exists(path):
        raise InputError(f"no such file: {path}; check the path")
    lower = path.lower()
    box = None
    if lower.endswith((".pdb", ".ent", ".cif", ".pdbx")):
        pdb = read_structure(path)
        positions, top_box = pdb.getPositions(asNumpy=True), pdb.topology.getPeriodicBoxVectors()
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                state = openmm.XmlSerializer.deserialize(fh.read())
        except Exception as exc:
            raise InputError(f"{path}: COORDS must be a PDB/PDBx file or a serialized "
                             f"OpenMM State (XML), and this does not parse as one ({exc})"
                             ) from None
        if not isinstance(state, openmm.State):
            raise InputError(f"{path} holds a serialized {type(state).__name__}, not a State")
        positions = state.getPositions(asNumpy=True)
        top_box = state.getPeriodicBoxVectors()
    positions = np.asarray(positions.value_in_unit(unit.nanometer), dtype=float)
    if not np.isfinite(positions).all():
        raise InputError(f"{path}: non-finite coordinates; fix the positions")
    if positions.shape[0] != system.getNumParticles():
        raise InputError(f"{path} has {positions.shape[0]} atoms but the System has "
                         f"{system.getNumParticles()} particles")
    if system.usesPeriodicBoundaryConditions():
        vectors = top_box if top_box is not None else system.getDefaultPeriodicBoxVectors()
        box = np.array([[v[0], v[1], v[2]] for v in
                        (x.value_in_unit(unit.nanometer) for x in vectors)], dtype=float)
    return positions, box


def verify(system: openmm.System, positions: np.ndarray, box: np.ndarray | None = None,
           platform: str = "Reference") -> VerifyReport:
    """Compare the twin of ``system`` with OpenMM at one configuration.

    Parameters
    ----------
    system : openmm.System
    positions : ndarray, shape (n_atoms, 3), nm
    box : ndarray, shape (3, 3), nm, optional
        Periodic box vectors (rows); defaults to the System's default box when periodic.
    platform : str
        OpenMM platform for the reference values ("Reference" is double precision).
    """
    system = deserialize_system(openmm.XmlSerializer.serialize(system))
    forces = [concrete_force(f) for f in system.getForces()]
    if len(forces) > 32:
        raise InputError(f"System has {len(forces)} forces; verify compares at most 32 "
                         "(one OpenMM force group each)")
    for i, f in enumerate(forces):
        f.setForceGroup(i)
    if box is None and system.usesPeriodicBoundaryConditions():
        box = np.array([v.value_in_unit(unit.nanometer)
                        for v in system.getDefaultPeriodicBoxVectors()], dtype=float)
    twin = TorchPotential(system)
    try:
        plat = openmm.Platform.getPlatformByName(platform)
    except Exception:
        names = [openmm.Platform.getPlatform(i).getName()
                 for i in range(openmm.Platform.getNumPlatforms())]
        raise InputError(f"unknown platform {platform!r}; available: {', '.join(names)}") from None
    props = {"Precision": "double"} if platform in ("CPU", "CUDA", "OpenCL") else {}
    props = {k: v for k, v in props.items() if k in plat.getPropertyNames()}
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), plat, props)
    if box is not None:
        ctx.setPeriodicBoxVectors(*box)
    ctx.setPositions(positions)
    ctx.computeVirtualSites()  # the twin places the sites from their parents too

    x = torch.tensor(positions, dtype=DTYPE, requires_grad=True)
    sites = twin.virtual_sites.indices.numpy()
    b = None if box is None else torch.tensor(box, dtype=DTYPE)
    term_energy = twin.energies(x, b)

    reports: list[ForceReport] = []
    total_o, total_t = 0.0, 0.0
    sum_fo = np.zeros_like(positions)
    sum_ft = np.zeros_like(positions)
    for i, force in enumerate(forces):
        name = force.__class__.__name__
        state = ctx.getState(getEnergy=True, getForces=True, groups={i})
        eo = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        fo = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        # OpenMM spreads a site's force onto its parents but still reports it on the site;
        # sites are no degrees of freedom, so only the real particles are compared.
        fo[sites] = 0.0
        if name in IGNORED_FORCES:
            reports.append(ForceReport(i, name, ignored=True, energy_openmm=eo))
            continue
        et_t = term_energy[i]
        ft = -torch.autograd.grad(et_t, x, retain_graph=True, allow_unused=True)[0]
        ft = np.zeros_like(positions) if ft is None else ft.detach().numpy()
        et = float(et_t.detach())
        tol = ENERGY_TOL_EWALD if _is_ewald(force) else ENERGY_TOL
        e_err = _rel(abs(et - eo), eo, ENERGY_FLOOR)
        f_err = _rel_rms(ft - fo, fo)
        reports.append(ForceReport(i, name, False, eo, et, e_err, f_err, tol,
                                   bool(e_err <= tol and f_err <= FORCE_TOL)))
        total_o += eo
        total_t += et
        sum_fo += fo
        sum_ft += ft
    energy_err = _rel(abs(total_t - total_o), total_o, ENERGY_FLOOR)
    force_err = _rel_rms(sum_ft - sum_fo, sum_fo)
    ok = all(r.ok for r in reports) and math.isfinite(total_t)
    return VerifyReport(platform, system.getNumParticles(), total_o, total_t, energy_err,
                        force_err, reports, ok, twin.virtual_sites.n_sites,
                        system.getNumConstraints())


def format_report(report: VerifyReport) -> str:
    """Human-readable table of a :class:`VerifyReport`."""
    lines = [f"{'force':<32} {'E openmm':>16} {'E torch':>16} {'rel dE':>9} {'rel F':>9}  ok"]
    for r in report.per_force:
        label = f"{r.index}: {r.name}"
        if r.ignored:
            lines.append(f"{label:<32} {'(no energy: ignored)':>43}")
            continue
        lines.append(f"{label:<32} {r.energy_openmm:16.6f} {r.energy_torch:16.6f} "
                     f"{r.energy_rel_error:9.1e} {r.force_rel_rms_error:9.1e}  "
                     f"{'yes' if r.ok else 'NO'}")
    lines.append(f"{'total':<32} {report.energy_openmm:16.6f} {report.energy_torch:16.6f} "
                 f"{report.energy_rel_error:9.1e} {report.force_rel_rms_error:9.1e}  "
                 f"{'yes' if report.ok else 'NO'}")
    if report.n_virtual_sites or report.n_constraints:
        lines.append(f"{report.n_virtual_sites} virtual sites (placed from their parents), "
                     f"{report.n_constraints} constraints (no energy; the reversible windows "
                     "integrate the constraints and place the sites)")
    return "\n".join(lines)

