"""Validate a trained force field in plain OpenMM.

The command line is ``openmm-reversible validate TRAINED.xml [...] --config CONFIG.toml``
(:mod:`openmm_reversible.commands.validate`).

Two checks, neither with torch in the simulation loop:

1. **Export round trip.** The System OpenMM builds from the trained XML is compared with the
   torch twin built from the *original* XML with the trained values set: total energy and
   forces at the starting structure must agree to the project's contract (relative energy
   error ≤ 1e-6, ≤ 1e-5 with Ewald/PME; relative RMS force error ≤ 1e-5).
2. **Observables.** A short OpenMM simulation of the trained model (flexible or ``--rigid``,
   reaction field or ``--pme``, NVT or NPT with ``--pressure``) reports each target's
   observable next to its target — density, ΔH_vap, RDF (mdtraj), pressure (molecular virial
   by a finite volume change), the NPT response functions κ_T, α and C_p and the static
   dielectric constant (the fit's estimators,
   :func:`~openmm_reversible.observables.ensemble.ensemble_average`, on the run's frames), the
   self-diffusion coefficient (Yeh–Hummer corrected when the target gives a viscosity) —
   plus the self-diffusion coefficient from the molecules' mean squared displacement always,
   each with its standard error by block averaging
   (:mod:`openmm_reversible.observables.blocking`), as a table (:func:`format_table`),
   ``validation.json`` and ``validation.png`` (:func:`save_report`); observables without a
   target are reported as such, never drawn as a match.

The command exits 0 when the round trip is within tolerance, 1 when it is not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import mdtraj
import numpy as np
import openmm
import torch
from openmm import app, unit
from tqdm.auto import tqdm

from .config import SCALAR_UNITS, FitConfig, GasSystemConfig
from .errors import InputError, structure_errors
from .files import atomic_write_all, text_writer
from .observables.blocking import block_average, block_slices
from .observables.density import G_CM3_PER_AMU_NM3
from .observables.diffusion import M2_PER_S_PER_NM2_PER_PS, yeh_hummer_correction
from .observables.ensemble import ENSEMBLE_OBSERVABLES, EnsembleFrames, ensemble_average
from .observables.selection import molecules
from .parameters import ParameterSet
from .potential import TorchPotential
from .sampler import build_structure, configure_system, create_system_kwargs, select_platform
from .train import harmonic_gas_energy, rdf_pairs
from .units import DTYPE, KB
from .verify import ENERGY_TOL, ENERGY_TOL_EWALD, FORCE_TOL

_VOLUME_STEP = 1e-5
"""Relative volume change of the finite-difference pressure."""


def substitute_files(config: FitConfig, trained: list[str]) -> list[str]:
    """The config's force-field files with each trained file in place of its namesake.

    Raises
    ------
    InputError
        If a trained file matches no file of the config by name.
    """
    files = list(config.forcefield.files)
    names = [Path(f).name for f in files]
    for path in trained:
        path = str(Path(path).resolve())
        if not os.path.isfile(path):
            raise InputError(f"trained force field {path} does not exist")
        name = Path(path).name
        if name not in names:
            raise InputError(f"{name} matches none of the config's forcefield.files "
                             f"({', '.join(names)}); validate the file the fit wrote")
        files[names.index(name)] = path
    return files


# ---------------------------------------------------------------------------------------------
# 1. Round trip
# ---------------------------------------------------------------------------------------------


def round_trip(config: FitConfig, trained_files: list[str], topology: app.Topology,
               positions: np.ndarray) -> dict:
    """OpenMM (Reference) energy and forces (on the particles that are not virtual sites) of
    the trained System vs the twin's.

    Returns
    -------
    dict
        ``energy_openmm``, ``energy_torch`` (kJ/mol), ``energy_rel_error``,
        ``force_rel_rms_error``, ``tolerance`` and ``ok``.
    """
    kwargs = create_system_kwargs(config)
    trained = ParameterSet.from_forcefield(trained_files, topology, **kwargs)
    system = configure_system(trained.system, config)
    original = ParameterSet.from_forcefield(config.forcefield.files, topology, **kwargs)
    original.set_values({k: v for k, v in trained.values().items()
                         if k in original.trainable_keys})
    configure_system(original.system, config)
    if original.system.getNumConstraints():
        # A constrained validation run (rigid water) of a model trained flexibly: its tagged
        # bond lengths are constraint distances here and cannot be bound as parameters; the
        # twin reads the trained values from the System the original files build with them.
        twin = TorchPotential(configure_system(original.create_system(), config))
    else:
        twin = TorchPotential(original.system, parameters=original)

    integrator = openmm.VerletIntegrator(0.001)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        context.setPeriodicBoxVectors(*box)
    context.setPositions(positions)
    # Sites where the trained model puts them (the twin places them too): the structure's
    # may come from another model (Modeller's TIP4P-Ew box for TIP4P/2005).
    context.computeVirtualSites()
    state = context.getState(getEnergy=True, getForces=True)
    e_ref = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    f_ref = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)

    x = torch.tensor(positions, dtype=DTYPE, requires_grad=True)
    box_t = None if box is None else torch.tensor(
        np.asarray(box.value_in_unit(unit.nanometer)), dtype=DTYPE)
    energy = twin(x, box_t)
    forces = -torch.autograd.grad(energy, x)[0].detach().numpy()
    e_torch = float(energy.detach())
    # Real particles only: OpenMM reports a virtual site's force before spreading it onto
    # the parents, the twin (whose energy places the sites) after.
    real = [not system.isVirtualSite(i) for i in range(system.getNumParticles())]
    forces, f_ref = forces[real], np.asarray(f_ref)[real]
    ewald = config.system.nonbonded_method in ("Ewald", "PME")
    tol = ENERGY_TOL_EWALD if ewald else ENERGY_TOL
    e_err = abs(e_torch - e_ref) / max(abs(e_ref), 1e-3)
    f_err = float(np.sqrt(np.mean((forces - f_ref) ** 2)) /
                  max(np.sqrt(np.mean(np.asarray(f_ref) ** 2)), 1e-3))
    return {"energy_openmm": e_ref, "energy_torch": e_torch, "energy_rel_error": e_err,
            "force_rel_rms_error": f_err, "tolerance": tol,
            "ok": bool(e_err <= tol and f_err <= FORCE_TOL)}


# ---------------------------------------------------------------------------------------------
# 2. Observables from a plain OpenMM simulation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Frames:
    """What the validation run recorded, MD units."""

    positions: np.ndarray  # (S, N, 3) nm, unwrapped
    boxes: np.ndarray  # (S, 3, 3) nm
    energies: np.ndarray  # (S,) kJ/mol
    pressures: np.ndarray  # (S,) bar
    times: np.ndarray  # (S,) ps

    def part(self, frames: slice) -> Frames:
        """The frames selected by ``frames`` (e.g. one block of :func:`block_slices`)."""
        return Frames(self.positions[frames], self.boxes[frames], self.energies[frames],
                      self.pressures[frames], self.times[frames])


def _molecular_pressure(context: openmm.Context, groups: list[np.ndarray], masses: np.ndarray,
                        temperature: float) -> float:
    """Pressure (bar) from the molecular virial: ``N_mol k T / V - ∂U/∂V`` with molecule
    centres of mass scaled with the box (the move a MonteCarloBarostat makes), by a central
    finite difference. Uses the bath temperature for the kinetic part."""
    state = context.getState(getPositions=True)
    x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
    volume = float(np.linalg.det(box))
    energies = []
    for sign in (1.0, -1.0):
        factor = (1.0 + sign * _VOLUME_STEP) ** (1.0 / 3.0)
        moved = x.copy()
        for g in groups:
            com = (masses[g, None] * x[g]).sum(0) / masses[g].sum()
            moved[g] += (factor - 1.0) * com
        context.setPeriodicBoxVectors(*(box * factor))
        context.setPositions(moved)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()
                        .value_in_unit(unit.kilojoule_per_mole))
    context.setPeriodicBoxVectors(*box)
    context.setPositions(x)
    du_dv = (energies[0] - energies[1]) / (2.0 * _VOLUME_STEP * volume)
    kj_mol_nm3_in_bar = (1 * unit.kilojoule_per_mole / unit.nanometer ** 3
                         / unit.AVOGADRO_CONSTANT_NA).value_in_unit(unit.bar)
    return (len(groups) * KB * temperature / volume - du_dv) * kj_mol_nm3_in_bar


def simulate(system: openmm.System, topology: app.Topology, positions: np.ndarray,
             config: FitConfig, steps: int, equilibration: int, every: int,
             pressure: float | None, platform: str, seed: int, progress: bool = True) -> Frames:
    """Minimise, equilibrate and record ``steps // every`` frames in plain OpenMM.

    With ``progress``, a bar on standard error (shown on a terminal only) counts the steps.
    """
    sim = config.simulation
    system = openmm.XmlSerializer.clone(system)
    if pressure is not None:
        system.addForce(openmm.MonteCarloBarostat(pressure * unit.bar,
                                                  sim.temperature * unit.kelvin))
    timestep = sim.timestep
    integrator = openmm.LangevinMiddleIntegrator(sim.temperature, sim.friction, timestep)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, select_platform(platform))
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        context.setPeriodicBoxVectors(*box)
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(sim.temperature, seed)
    n_frames = max(1, steps // every)
    bar = tqdm(total=equilibration + n_frames * every, desc="validation run (OpenMM)",
               unit="step", leave=False, disable=not progress or None)
    for done in range(0, equilibration, every):
        chunk = min(every, equilibration - done)
        integrator.step(chunk)
        bar.update(chunk)
    groups = molecules(topology, system)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                       for i in range(system.getNumParticles())])
    periodic = system.usesPeriodicBoundaryConditions()
    xs, boxes, energies, pressures, times = [], [], [], [], []
    for _ in range(n_frames):
        integrator.step(every)
        bar.update(every)
        state = context.getState(getPositions=True, getEnergy=True)
        xs.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        boxes.append(np.asarray(state.getPeriodicBoxVectors(asNumpy=True)
                                .value_in_unit(unit.nanometer)))
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        pressures.append(_molecular_pressure(context, groups, masses, sim.temperature)
                         if periodic else math.nan)
        times.append(state.getTime().value_in_unit(unit.picosecond))
    bar.close()
    return Frames(np.asarray(xs), np.asarray(boxes), np.asarray(energies),
                  np.asarray(pressures), np.asarray(times))


def diffusion_coefficient(frames: Frames, groups: list[np.ndarray],
                          masses: np.ndarray) -> float:
    """Self-diffusion coefficient of the molecules' centres of mass, nm²/ps (Einstein relation,
    MSD slope / 6 fitted over lag times from 10 % to 50 % of the run; no finite-size
    correction)."""
    com = np.stack([(masses[g, None] * frames.positions[:, g]).sum(1) / masses[g].sum()
                    for g in groups], axis=1)
    n = len(com)
    lags = np.arange(max(1, n // 10), max(2, n // 2))
    if len(lags) < 2:
        return math.nan
    msd = np.array([np.mean(np.sum((com[lag:] - com[:-lag]) ** 2, axis=-1)) for lag in lags])
    dt = frames.times[1] - frames.times[0]
    slope = np.polyfit(lags * dt, msd, 1)[0]
    return float(slope / 6.0)


def simulated_gas_energies(config: FitConfig, files: list[str], topology: app.Topology,
                           positions: np.ndarray, system: openmm.System, platform: str,
                           seed: int, gases: Mapping[str, GasSystemConfig] | None = None,
                           structures: Mapping[str, FitConfig] | None = None
                           ) -> dict[str, tuple[float, float, str]]:
    """⟨E_gas⟩ of each ΔH_vap target with ``gas``, sampled in plain OpenMM from ``files``.

    ``gas = "simulate"``: the run's first molecule alone (NoCutoff, the run's constraints);
    ``gas = "<gas system>"``: that system's molecule (its PDB, or the first molecule of the
    liquid ``structure.molecule_of``, whose config ``structures`` gives when it is not the
    one validated), with its ``frames`` and ``every``. Each is a Langevin-middle NVT run at
    the config's temperature (:class:`~openmm_reversible.gas.GasPhase`, seeded by ``seed``).

    Returns
    -------
    dict
        Target label → (⟨E_gas⟩ kJ/mol, its standard error kJ/mol, how it was obtained).
    """
    from .gas import GasPhase, first_molecule, pdb_molecule

    sim = config.simulation
    found = {}
    for t in config.targets:
        if t.observable != "enthalpy_of_vaporization" or t.gas is None:
            continue
        kwargs = create_system_kwargs(config)
        n_frames, every = t.gas_frames, t.gas_every
        if t.gas == "simulate":
            molecule = first_molecule(topology, positions, system)
            how = "simulated: the first molecule in vacuum"
        else:
            if gases is None or t.gas not in gases:
                raise InputError(f"{t.label}: gas = {t.gas!r} names a gas system, which only "
                                 "a config with [[systems]] has; validate with that config")
            gas = gases[t.gas]
            n_frames, every = gas.frames, gas.every
            how = f"simulated: {gas.name} ({gas.structure.source})"
            if gas.structure.pdb is not None:
                molecule = pdb_molecule(gas.structure.pdb)
                own = dataclasses.replace(gas.system, rigid_water=config.system.rigid_water,
                                          constraints=config.system.constraints)
                kwargs = create_system_kwargs(dataclasses.replace(config, system=own))
            else:
                source = (structures or {}).get(gas.structure.molecule_of)
                if source is None or source.structure == config.structure:
                    molecule = first_molecule(topology, positions, system)
                else:
                    kwargs = create_system_kwargs(source)
                    with structure_errors(source.structure.source, files):
                        liquid, xyz = build_structure(source)
                        liquid_system = ParameterSet.from_forcefield(files, liquid,
                                                                     **kwargs).system
                    molecule = first_molecule(liquid, xyz, liquid_system)
        with structure_errors(f"the gas molecule of {t.label}", files):
            phase = GasPhase(files, *molecule, kwargs, None, sim.temperature, sim.friction,
                             sim.timestep, platform)
        estimate = phase.sample(phase.parameters.scaled.detach().clone(), n_frames, every,
                                seed)
        found[t.label] = (estimate.energy, estimate.stderr, how)
    return found


def observables(config: FitConfig, topology: app.Topology, system: openmm.System,
                frames: Frames, rigid: bool, blocks: int = 5,
                gas_energies: Mapping[str, tuple[float, float, str]] | None = None
                ) -> list[dict]:
    """One row per target (and density / diffusion always, with ``target`` None when the
    config has no such target): name, value, target, error (value − target; RMS of the
    difference for an RDF), unit and ``stderr``.

    ``stderr`` is the standard error of ``value`` by block averaging over ``blocks``
    contiguous blocks of the frames (fewer when there are fewer frames; NaN with under 2):
    of the per-frame values for density, ΔH_vap and pressure, of the per-block estimates for
    the diffusion coefficient and, bin by bin (a list), for g(r). It is trustworthy when a
    block is longer than the observable's correlation time.

    ΔH_vap takes ⟨E_gas⟩ from ``gas_energies`` (:func:`simulated_gas_energies`, for targets
    with ``gas``), else the target's ``gas_energy``, else k_B T/2 per internal mode; the row
    says which (``gas``) and its value (``gas_energy``), and ``stderr`` includes the gas
    energy's.
    """
    groups = molecules(topology, system)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton)
                       for i in range(system.getNumParticles())])
    densities = masses.sum() / np.abs(np.linalg.det(frames.boxes)) * G_CM3_PER_AMU_NM3
    n_blocks = min(blocks, len(frames.energies))

    def stderr(series):
        return block_average(series, n_blocks)[1] if n_blocks >= 2 else math.nan

    def per_block(estimate):
        if n_blocks < 2:
            return math.nan
        return stderr([estimate(frames.part(b)) for b in block_slices(len(frames.energies),
                                                                      n_blocks)])

    def diffusion(part):
        return diffusion_coefficient(part, groups, masses)

    def response(name):
        def estimate(part):
            return float(ensemble_average(name, _ensemble_frames(config, system, groups, part),
                                          torch.as_tensor(part.energies, dtype=DTYPE),
                                          _charges(system) if name == "dielectric" else None))
        return lambda: (estimate(frames), float(per_block(estimate)))

    scalars = {"density": lambda: (float(np.mean(densities)), float(stderr(densities))),
               "pressure": lambda: (float(np.mean(frames.pressures)),
                                    float(stderr(frames.pressures))),
               "diffusion": lambda: (diffusion(frames), float(per_block(diffusion))),
               **{name: response(name) for name in ENSEMBLE_OBSERVABLES if name != "density"}}
    rows = []
    for t in config.targets:
        row = {"name": t.label, "observable": t.observable, "target": t.value,
               "unit": SCALAR_UNITS.get(t.observable, "")}
        if t.observable == "rdf":
            grid = t.rdf_grid()
            pairs = rdf_pairs(topology, t.atoms, system)

            def g_of(part, grid=grid, pairs=pairs):
                traj = mdtraj.Trajectory(part.positions, mdtraj.Topology.from_openmm(topology))
                traj.unitcell_vectors = part.boxes
                return mdtraj.compute_rdf(traj, pairs, r_range=grid.r_range,
                                          n_bins=len(grid.r))[1]

            g = g_of(frames)
            g_stderr = per_block(g_of)
            row.update(r=grid.r.tolist(), value=g.tolist(), target=grid.g.tolist(),
                       error=float(np.sqrt(np.mean((g - grid.g) ** 2))), unit="rms",
                       stderr=np.broadcast_to(g_stderr, g.shape).tolist())
        elif t.observable == "enthalpy_of_vaporization":
            gas_stderr = 0.0
            if t.label in (gas_energies or {}):
                gas, gas_stderr, row["gas"] = gas_energies[t.label]
            elif t.gas is not None:
                raise InputError(f"{t.label}: gas = {t.gas!r} but no gas-phase energy was "
                                 "sampled; give gas_energies (simulated_gas_energies)")
            elif t.gas_energy is not None:
                gas, row["gas"] = t.gas_energy, "the target's gas_energy"
            else:
                gas = harmonic_gas_energy(topology, config.simulation.temperature, rigid,
                                          system)
                row["gas"] = "k_B T/2 per internal mode"
            row["gas_energy"] = float(gas)
            row["value"] = float(gas - np.mean(frames.energies) / len(groups)
                                 + KB * config.simulation.temperature)
            row["stderr"] = float(math.hypot(float(stderr(frames.energies)) / len(groups),
                                             gas_stderr))
        elif t.observable == "diffusion" and t.viscosity is not None:
            def corrected(part, eta=t.viscosity):
                d = diffusion(part) * M2_PER_S_PER_NM2_PER_PS
                return float(yeh_hummer_correction(d, config.simulation.temperature, eta,
                                                   part.boxes)) / M2_PER_S_PER_NM2_PER_PS
            row["value"], row["stderr"] = corrected(frames), float(per_block(corrected))
        else:
            row["value"], row["stderr"] = scalars[t.observable]()
        if t.observable != "rdf":
            row["error"] = row["value"] - t.value
        rows.append(row)
    seen = {t.observable for t in config.targets}
    for name in ("density", "diffusion"):
        if name not in seen:
            value, error = scalars[name]()
            rows.append({"name": name, "observable": name, "value": value, "stderr": error,
                         "target": None, "error": None, "unit": SCALAR_UNITS[name]})
    return rows


def _ensemble_frames(config: FitConfig, system: openmm.System, groups: list[np.ndarray],
                     frames: Frames) -> EnsembleFrames:
    """The run's frames as the fit's ensemble estimators take them."""
    sim = config.simulation
    return EnsembleFrames.from_system(system, frames.positions, frames.boxes, sim.temperature,
                                      sim.pressure, groups, config.system.nonbonded_method,
                                      config.system.reaction_field_dielectric)


def _charges(system: openmm.System) -> torch.Tensor:
    """Particle charges of the System's NonbondedForce, e."""
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            return torch.tensor([force.getParticleParameters(i)[0].value_in_unit(
                unit.elementary_charge) for i in range(force.getNumParticles())], dtype=DTYPE)
    raise InputError("a dielectric target needs charges on a NonbondedForce, but the System "
                     "has none; remove the dielectric target")


def format_table(rows: list[dict]) -> str:
    """The observables as an aligned text table (± the block-averaging standard error; for an
    RDF its largest over the bins)."""
    lines = [f"{'observable':<28}{'simulated':>14}{'± stderr':>11}{'target':>14}{'error':>12}"
             f"  unit"]
    for row in rows:
        if row["observable"] == "rdf":
            worst = np.nanmax(row["stderr"]) if np.isfinite(row["stderr"]).any() else math.nan
            lines.append(f"{row['name']:<28}{'(curve)':>14}{worst:>11.2g}{'(curve)':>14}"
                         f"{row['error']:>12.4g}  rms of g(r)")
        else:
            target = "no target" if row["target"] is None else f"{row['target']:.5g}"
            error = "-" if row["error"] is None else f"{row['error']:.4g}"
            lines.append(f"{row['name']:<28}{row['value']:>14.5g}{row['stderr']:>11.2g}"
                         f"{target:>14}{error:>12}  {row['unit']}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | os.PathLike) -> None:
    """RDFs overlaid on their targets (a band of ± 1 standard error), and each targeted scalar
    as simulated ± standard error against its target line. Observables without a target are
    not drawn as if they matched one: they are listed, value ± error, under the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r["observable"] == "rdf"]
    scalars = [r for r in rows if r["observable"] != "rdf" and r["target"] is not None]
    untargeted = [r for r in rows if r["observable"] != "rdf" and r["target"] is None]
    n = max(1, len(curves) + len(scalars))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, row in zip(axes[0], curves, strict=False):
        g, se = np.asarray(row["value"]), np.asarray(row["stderr"])
        ax.plot(row["r"], row["target"], "k-", lw=1.5, label="target")
        ax.plot(row["r"], g, "C3-", lw=1, label="trained (OpenMM)")
        ax.fill_between(row["r"], g - se, g + se, color="C3", alpha=0.3, lw=0)
        ax.set_xlabel("r (nm)")
        ax.set_ylabel("g(r)")
        ax.set_title(row["name"], fontsize=9)
        ax.legend(fontsize=7)
    for ax, row in zip(axes[0][len(curves):], scalars, strict=False):
        ax.errorbar([0], [row["value"]], yerr=[row["stderr"]], fmt="o", color="C0", capsize=4,
                    label="trained (OpenMM) ± stderr")
        ax.axhline(row["target"], color="k", lw=1, label="target")
        ax.set_xticks([])
        ax.set_ylabel(f"{row['observable']} ({row['unit']})")
        ax.set_title(row["name"], fontsize=9)
        ax.legend(fontsize=7)
    if not curves and not scalars:
        axes[0][0].set_axis_off()
    if untargeted:
        fig.suptitle("no target: " + "; ".join(
            f"{r['name']} {r['value']:.4g} ± {r['stderr']:.2g} {r['unit']}" for r in untargeted),
            fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


REPORT = "validation.json"
FIGURE = "validation.png"


def save_report(report: dict, output: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``validation.json`` and ``validation.png`` (:func:`plot`) into ``output``.

    Both are written to temporary files first and renamed only when both are complete
    (:func:`~openmm_reversible.files.atomic_write_all`), so a failure leaves neither.

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        The report and the figure.
    """
    output = Path(output)
    paths = output / REPORT, output / FIGURE
    atomic_write_all([(paths[0], text_writer(json.dumps(report, indent=1))),
                      (paths[1], lambda tmp: plot(report["observables"], tmp))])
    return paths


def validate(trained: list[str], config: FitConfig, steps: int = 5000,
             equilibration: int = 2000, every: int = 50, rigid: bool = False,
             nonbonded: str | None = None, pressure: float | None = None,
             platform: str | None = None, seed: int = 1, progress: bool = True,
             blocks: int = 5, gases: Mapping[str, GasSystemConfig] | None = None,
             structures: Mapping[str, FitConfig] | None = None) -> dict:
    """Run both checks; returns a report dict (``round_trip``, ``observables``, ``settings``).

    Parameters
    ----------
    trained : list of str
        Trained ForceField XML files (each replaces the config's file of the same name).
    config : FitConfig
        The fitting config (structure, original force field, targets).
    steps, equilibration, every : int
        Production steps, equilibration steps and steps between frames.
    rigid : bool
        Simulate rigid water (``rigidWater=True``, HBonds constraints, 2 fs step).
    nonbonded : str, optional
        Override ``system.nonbonded_method`` for the simulation (e.g. ``"PME"``).
    pressure : float, bar, optional
        NPT at this pressure (default: the config's ``simulation.pressure``; NVT if none).
    platform : str, optional
        OpenMM platform (default: the config's).
    seed : int
        Seed of OpenMM's thermostat and initial velocities.
    progress : bool
        Show a progress bar of the OpenMM run (on a terminal only).
    blocks : int
        Blocks of the standard errors (:func:`observables`).
    gases, structures : mapping, optional
        The config's gas systems and its liquid systems' configs by name, for ΔH_vap targets
        with ``gas = "<gas system>"`` (:func:`simulated_gas_energies`;
        :func:`validate_state_points` passes them).

    Raises
    ------
    InputError
        For bad values or files, or a structure the force field does not describe.
    """
    for name, value in (("steps", steps), ("every", every)):
        if value < 1:
            raise InputError(f"--{name} {value}: must be >= 1")
    if equilibration < 0:
        raise InputError(f"--equilibration {equilibration}: must be >= 0")
    files = substitute_files(config, trained)
    with structure_errors(config.structure.source, files):
        topology, positions = build_structure(config)
        check = round_trip(config, files, topology, positions)
    system_cfg = dataclasses.replace(config.system, rigid_water=rigid or config.system.rigid_water,
                                     constraints="HBonds" if rigid else config.system.constraints,
                                     nonbonded_method=nonbonded or config.system.nonbonded_method)
    sim_cfg = config.simulation
    if rigid:
        sim_cfg = dataclasses.replace(sim_cfg, timestep=max(sim_cfg.timestep, 0.002))
    run_config = dataclasses.replace(config, system=system_cfg, simulation=sim_cfg)
    with structure_errors(config.structure.source, files):
        system = configure_system(
            ParameterSet.from_forcefield(files, topology,
                                         **create_system_kwargs(run_config)).system,
            run_config)
    pressure = sim_cfg.pressure if pressure is None else pressure
    run_config = dataclasses.replace(run_config, simulation=dataclasses.replace(
        run_config.simulation, pressure=pressure))
    frames = simulate(system, topology, positions, run_config, steps, equilibration, every,
                      pressure, platform or sim_cfg.platform, seed, progress)
    gas_energies = simulated_gas_energies(run_config, files, topology, positions, system,
                                          platform or sim_cfg.platform, seed, gases,
                                          structures)
    rows = observables(run_config, topology, system, frames, rigid=system_cfg.rigid_water,
                       blocks=blocks, gas_energies=gas_energies)
    return {"round_trip": check, "observables": rows,
            "settings": {"files": files, "steps": steps, "equilibration": equilibration,
                         "every": every, "rigid": system_cfg.rigid_water,
                         "nonbonded_method": system_cfg.nonbonded_method,
                         "pressure_bar": pressure, "timestep_ps": sim_cfg.timestep,
                         "temperature_K": sim_cfg.temperature}}



def validate_state_points(trained: list[str], config: FitConfig, **settings) -> dict:
    """:func:`validate` at every (system, state point) of a config with ``[[systems]]``.

    Parameters
    ----------
    trained : list of str
        Trained ForceField XML files.
    config : FitConfig
    **settings
        Passed to :func:`validate` (steps, equilibration, every, rigid, ...).

    Returns
    -------
    dict
        ``state_points``: one report per state point, in order, each :func:`validate`'s with
        ``label``, ``system``, ``temperature`` (K) and ``pressure`` (bar or None) added.
    """
    points = config.state_points()
    gases = {gas.name: gas for gas in config.gases}
    structures = {point.system: point.config for point in points}
    return {"state_points": [
        {"label": point.label, "system": point.system, "temperature": point.temperature,
         "pressure": point.pressure,
         **validate(trained, point.config, gases=gases, structures=structures, **settings)}
        for point in points]}


def plot_state_points(report: dict, path: str | os.PathLike) -> None:
    """Each targeted scalar property of each system against temperature: simulated ± standard
    error (error bars) and the targets (crosses), one panel per system and property."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], list] = {}
    for point in report["state_points"]:
        for row in point["observables"]:
            if row["observable"] != "rdf" and row["target"] is not None:
                panels.setdefault((point["system"], row["name"]), []).append(
                    (point["temperature"], row))
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.4), squeeze=False)
    for ax, ((system, name), rows) in zip(axes[0], panels.items(), strict=False):
        temperatures = [t for t, _ in rows]
        ax.errorbar(temperatures, [r["value"] for _, r in rows],
                    yerr=[r["stderr"] for _, r in rows], fmt="o-", color="C0", capsize=4,
                    label="trained (OpenMM) ± stderr")
        ax.plot(temperatures, [r["target"] for _, r in rows], "kx", ms=8, label="target")
        ax.set_xlabel("temperature (K)")
        ax.set_ylabel(f"{rows[0][1]['observable']} ({rows[0][1]['unit']})")
        ax.set_title(f"{system}: {name}", fontsize=9)
        ax.legend(fontsize=7)
    if not panels:
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def save_state_points_report(report: dict, output: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``validation.json`` (every state point's report) and ``validation.png``
    (:func:`plot_state_points`) into ``output``, both or neither."""
    output = Path(output)
    paths = output / REPORT, output / FIGURE
    atomic_write_all([(paths[0], text_writer(json.dumps(report, indent=1))),
                      (paths[1], lambda tmp: plot_state_points(report, tmp))])
    return paths
