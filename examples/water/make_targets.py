"""Generate the target data of the water demo.

Structural targets come from a *different* water model, the 4-site TIP4P-Ew (Horn et al.,
J. Chem. Phys. 120, 9665 (2004); OpenMM's bundled ``tip4pew.xml``), simulated here in plain
OpenMM: 216 rigid molecules, PME, NPT at 1 bar and 295.15 K. The O–O and intermolecular O–H
radial distribution functions are computed with mdtraj and written to ``targets/rdf_OO.dat`` and
``targets/rdf_OH.dat`` (columns r in nm, g(r)). The thermodynamic targets are experiment and
are recorded with their sources in ``targets/targets.json``.

Run from anywhere: ``python examples/water/make_targets.py`` (about 3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import mdtraj
import numpy as np
import openmm
from openmm import app, unit

HERE = os.path.dirname(os.path.abspath(__file__))

TEMPERATURE = 295.15  # K, the temperature of the fit
PRESSURE = 1.0  # bar
N_WATERS = 216
R_MAX = 0.9  # nm, below half the box (~0.93 nm)
BIN_WIDTH = 0.005  # nm

EXPERIMENT = {
    "enthalpy_of_vaporization": {
        "value": 44.0, "unit": "kJ/mol", "temperature_K": 298.15,
        "source": "IAPWS-95: W. Wagner and A. Pruss, J. Phys. Chem. Ref. Data 31, 387 (2002) "
                  "(43.99 kJ/mol at 298.15 K); also NIST Chemistry WebBook, SRD 69"},
    "density": {
        "value": 0.997, "unit": "g/cm^3", "temperature_K": 298.15, "pressure_bar": 1.0,
        "source": "IAPWS-95: W. Wagner and A. Pruss, J. Phys. Chem. Ref. Data 31, 387 (2002) "
                  "(0.99705 g/cm^3 at 298.15 K, 0.1 MPa)"},
}


def simulate(equilibration_ps: float, production_ps: float, frame_ps: float, seed: int,
             platform: str) -> tuple[mdtraj.Trajectory, float]:
    """Run TIP4P-Ew water and return the production frames and the mean density (g/cm^3)."""
    ff = app.ForceField("tip4pew.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, model="tip4pew", numAdded=N_WATERS)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME,
                             nonbondedCutoff=R_MAX * unit.nanometer, constraints=app.HBonds,
                             rigidWater=True)
    system.addForce(openmm.MonteCarloBarostat(PRESSURE * unit.bar, TEMPERATURE * unit.kelvin))
    dt = 0.002  # ps
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, dt)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(modeller.topology, system, integrator,
                                openmm.Platform.getPlatformByName(platform))
    simulation.context.setPositions(modeller.positions)
    simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(TEMPERATURE, seed)
    simulation.step(round(equilibration_ps / dt))
    stride = round(frame_ps / dt)
    xyz, boxes = [], []
    for _ in range(round(production_ps / frame_ps)):
        simulation.step(stride)
        state = simulation.context.getState(getPositions=True)
        xyz.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        boxes.append(np.diag(state.getPeriodicBoxVectors(asNumpy=True)
                             .value_in_unit(unit.nanometer)))
    top = mdtraj.Topology.from_openmm(modeller.topology)
    boxes = np.asarray(boxes)
    traj = mdtraj.Trajectory(np.asarray(xyz), top, unitcell_lengths=boxes,
                             unitcell_angles=np.full_like(boxes, 90.0))
    mass = sum(system.getParticleMass(i).value_in_unit(unit.dalton)
               for i in range(system.getNumParticles()))
    # amu / nm^3 -> g/cm^3
    density = float(np.mean(mass / np.prod(boxes, axis=1))) * 1.66053906660e-24 / 1e-21
    return traj, density


def intermolecular_pairs(top: mdtraj.Topology, name1: str, name2: str) -> np.ndarray:
    """Atom index pairs (element names ``name1``, ``name2``) in different molecules."""
    pairs = top.select_pairs(f"element {name1}", f"element {name2}")
    res = np.array([a.residue.index for a in top.atoms])
    return pairs[res[pairs[:, 0]] != res[pairs[:, 1]]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--equilibration", type=float, default=20.0, help="ps")
    parser.add_argument("--production", type=float, default=100.0, help="ps")
    parser.add_argument("--frame", type=float, default=0.25, help="ps between frames")
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--platform", default="CPU")
    parser.add_argument("--output", default=os.path.join(HERE, "targets"))
    args = parser.parse_args(argv)
    start = time.time()
    traj, density = simulate(args.equilibration, args.production, args.frame, args.seed,
                             args.platform)
    os.makedirs(args.output, exist_ok=True)
    n_bins = round(R_MAX / BIN_WIDTH)
    files = {}
    for a, b in (("O", "O"), ("O", "H")):
        r, g = mdtraj.compute_rdf(traj, intermolecular_pairs(traj.topology, a, b),
                                  r_range=(0.0, R_MAX), n_bins=n_bins)
        name = f"rdf_{a}{b}.dat"
        header = (f"{a}-{b} intermolecular RDF of TIP4P-Ew water, {N_WATERS} molecules, "
                  f"{TEMPERATURE} K, {PRESSURE} bar, {args.production} ps (make_targets.py)\n"
                  f"r (nm)  g(r)")
        np.savetxt(os.path.join(args.output, name), np.column_stack([r, g]), fmt="%.6f",
                   header=header)
        files[f"rdf_{a}{b}"] = name
    meta = {
        "experiment": EXPERIMENT,
        "reference_simulation": {
            "model": "TIP4P-Ew (OpenMM tip4pew.xml), rigid", "n_waters": N_WATERS,
            "temperature_K": TEMPERATURE, "pressure_bar": PRESSURE, "nonbonded": "PME",
            "cutoff_nm": R_MAX, "timestep_ps": 0.002,
            "equilibration_ps": args.equilibration, "production_ps": args.production,
            "frame_ps": args.frame, "seed": args.seed, "platform": args.platform,
            "mean_density_g_cm3": round(density, 4), "rdf_files": files,
            "rdf_bin_width_nm": BIN_WIDTH,
            "openmm_version": openmm.version.full_version,
            "mdtraj_version": mdtraj.__version__,
        },
    }
    with open(os.path.join(args.output, "targets.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    print(f"wrote {', '.join(files.values())} and targets.json to {args.output} "
          f"(density {density:.4f} g/cm^3, {time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
