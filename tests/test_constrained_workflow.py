"""Constrained systems and virtual sites through the workflow: the config, ``fit``,
``gradcheck``, ``validate``.

Systems: rigid TIP3P (the example's tagged flexible TIP3P built with ``rigidWater=True``: 3
distance constraints a molecule, no bonds or angles left) and alanine
dipeptide with HBonds constraints (OpenMM's amber14 ff14SB with the σ and ε of the CT and HC
types tagged). Reference ΔHvap: a plain OpenMM run of the same System (Reference platform).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from openmm import unit
from test_gradcheck import water_pdb  # noqa: F401 - a fixture (16 TIP3P waters, PDB)

from openmm_reversible.commands import gradcheck as gradcheck_command
from openmm_reversible.config import config_from_dict
from openmm_reversible.exact import DeterministicForces
from openmm_reversible.potential import TorchPotential, UnsupportedForceError
from openmm_reversible.sampler import SampledState
from openmm_reversible.systems import alanine_dipeptide, openmm_data_file, water_box
from openmm_reversible.train import (
    WindowPiece,
    compute_window,
    fit,
    window_model,
)
from openmm_reversible.units import KB
from openmm_reversible.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# σ, ε and charge of the oxygen tagged (q_H = -q_O / 2); its bonds and angle become the
# constraints of rigid water.
XML = os.path.join(ROOT, "examples", "water", "water_flexible.xml")
TEMPERATURE = 295.15


def gradcheck_json(capsys, *argv: str) -> tuple[int, dict]:
    parser = argparse.ArgumentParser()
    gradcheck_command.add_arguments(parser)
    code = gradcheck_command.run(parser.parse_args([*argv, "--json", "--no-progress"]))
    return code, json.loads(capsys.readouterr().out)


def tagged_tip4p2005(where) -> str:
    """tests/data/tip4p2005.xml with σ and ε of the oxygen tagged, written into ``where``."""
    with open(os.path.join(ROOT, "tests", "data", "tip4p2005.xml")) as handle:
        xml = handle.read().replace('epsilon="0.774908"/>',
                                    'epsilon="0.774908" parameterize="sigma, epsilon"/>')
    path = where / "tip4p2005_tagged.xml"
    path.write_text(xml)
    return str(path)


@pytest.fixture(scope="module")
def dipeptide_files(tmp_path_factory):
    """A PDB of alanine dipeptide and ff14SB with the CT and HC Lennard-Jones tagged."""
    path = tmp_path_factory.mktemp("dipeptide")
    peptide = alanine_dipeptide()
    with open(path / "dipeptide.pdb", "w") as handle:
        app.PDBFile.writeFile(peptide.topology, peptide.positions * unit.nanometer, handle)
    with open(openmm_data_file(os.path.join("amber14", "protein.ff14SB.xml"))) as handle:
        xml = handle.read()
    for atom_type in ("protein-CT", "protein-HC"):
        start = xml.index(f'type="{atom_type}"/>', xml.index("<NonbondedForce"))
        xml = xml[:start] + f'type="{atom_type}" parameterize="sigma, epsilon"/>' + \
            xml[start + len(f'type="{atom_type}"/>'):]
    (path / "ff14SB_tagged.xml").write_text(xml)
    return str(path / "ff14SB_tagged.xml"), str(path / "dipeptide.pdb")


def test_gradcheck_rigid_water_agrees_with_bptt_and_finite_differences(water_pdb, capsys):  # noqa: F811
    code, result = gradcheck_json(capsys, "--forcefield", XML, "--pdb", water_pdb,
                                  "--steps", "6", "--cutoff", "0.35", "--rigid-water",
                                  "--timestep", "0.001")
    assert code == 0, result["verdict"]
    # Only the nonbonded parameters are left: the tagged bond and angle are constraints now.
    names = [p["name"] for p in result["parameters"]]
    assert names and not any(n.startswith(("HarmonicBondForce", "HarmonicAngleForce"))
                             for n in names)
    assert result["rel_error_bptt"] < 1e-8
    assert result["rel_error_fd"] < 1e-4
    assert result["reconstruction_error"] < 1e-10


def test_gradcheck_four_site_rigid_water(tmp_path, capsys):
    """TIP4P/2005 (a virtual M site a molecule) rigid: the sites are placed, not integrated,
    and the gradient equals BPTT and finite differences."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip4pew.xml"), model="tip4pew", numAdded=16,
                        neutralize=False)
    with open(tmp_path / "water16.pdb", "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)
    forcefield = tagged_tip4p2005(tmp_path)
    code, result = gradcheck_json(capsys, "--forcefield", forcefield, "--pdb",
                                  str(tmp_path / "water16.pdb"), "--steps", "6", "--cutoff",
                                  "0.35", "--rigid-water")
    assert code == 0, result["verdict"]
    assert result["rel_error_bptt"] < 1e-8 and result["rel_error_fd"] < 1e-4


def test_gradcheck_hbonds_dipeptide_agrees_with_finite_differences(dipeptide_files, capsys):
    forcefield, pdb = dipeptide_files
    code, result = gradcheck_json(capsys, "--forcefield", forcefield, "--pdb", pdb,
                                  "--steps", "20", "--constraints", "HBonds",
                                  "--timestep", "0.002", "--fd-step", "1e-4")
    assert code == 0, result["verdict"]
    assert len(result["parameters"]) == 4
    assert result["rel_error_bptt"] < 1e-8
    assert result["rel_error_fd"] < 1e-4


def water_config(where, **system):
    (where / "fit").mkdir(exist_ok=True)
    data = {
        "forcefield": {"files": [XML]},
        "structure": {"water_box": 30},
        "system": {"nonbonded_method": "ReactionField", "cutoff": 0.45, **system},
        "simulation": {"temperature": TEMPERATURE, "timestep": 0.002, "platform": "Reference",
                       "seed": 5},
        "schedule": {"epochs": 1, "equilibration_steps": 1000, "bulk_steps": 100,
                     "windows": 3, "window_steps": 40, "snapshot_every": 5,
                     "learning_rate": 1e-3},
        "targets": [{"observable": "enthalpy_of_vaporization", "value": 44.0}],
    }
    return config_from_dict(data, where)


def openmm_hvap(system: openmm.System, positions, n_molecules: int) -> tuple[float, float]:
    """ΔHvap of rigid water (no gas-phase intramolecular energy) from a plain OpenMM run of
    the System: 1000 steps of equilibration, then 200 frames 10 steps apart (2 fs); the
    mean and its standard error by 5 blocks."""
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, 0.002)
    integrator.setRandomNumberSeed(9)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(TEMPERATURE, 9)
    integrator.step(1000)
    energies = []
    for _ in range(200):
        integrator.step(10)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()
                        .value_in_unit(unit.kilojoule_per_mole))
    hvap = -np.asarray(energies) / n_molecules + KB * TEMPERATURE
    blocks = hvap.reshape(5, -1).mean(1)
    return float(hvap.mean()), float(blocks.std(ddof=1) / np.sqrt(5))


def test_rigid_water_fit_runs_and_its_hvap_is_openmm_rigid_tip3p(tmp_path):
    """One epoch of a rigid-water fit: the windows integrate the 90 constraints and their
    ΔHvap is that of plain OpenMM on the same rigid System (the old unconstrained windows
    read ~30 kJ/mol too high)."""
    config = water_config(tmp_path, rigid_water=True)
    model = window_model(config)
    assert model.constraints is not None and len(model.constraints) == 90
    assert model.parameters.system.getNumConstraints() == 90
    result = fit(config, tmp_path / "fit" / "out", progress=False)
    (record,) = result.records
    hvap = record["observables"]["enthalpy_of_vaporization"]
    reference, stderr = openmm_hvap(model.parameters.system, model.positions, 30)
    print(f"rigid-water fit ΔHvap {hvap:.2f} kJ/mol, OpenMM {reference:.2f} ± {stderr:.2f}")
    assert abs(hvap - reference) < 3.0, (hvap, reference, stderr)
    assert record["reconstruction_error"] < 1e-8
    assert all(np.isfinite(g) and g != 0 for g in record["gradient"].values())
    # The trained XML validates in plain OpenMM in the setting it was trained in (rigid).
    report = validate([str(f) for f in result.files["forcefield"]], config, steps=400,
                      equilibration=200, every=20, progress=False)
    assert report["round_trip"]["ok"] and report["settings"]["rigid"]
    (row,) = [r for r in report["observables"] if r["observable"] == "enthalpy_of_vaporization"]
    assert abs(row["value"] - reference) < 3.0


def test_windows_start_on_the_constraints_to_round_off(tmp_path):
    """A state from OpenMM at its default constraint tolerance (1e-5) violates the
    constraints far beyond the windows' 1e-10; the window puts it on them and runs. HBonds
    with a flexible angle: two constraints a water."""
    config = water_config(tmp_path, constraints="HBonds")
    model = window_model(config)
    assert len(model.constraints) == 60
    system = model.parameters.system
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, 0.001)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(model.positions)
    context.applyConstraints(1e-5)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 100)
    context.setVelocitiesToTemperature(TEMPERATURE, 2)
    integrator.step(20)
    state = context.getState(getPositions=True, getVelocities=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    velocities = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    assert model.constraints.residual(torch.as_tensor(positions)) > 1e-10
    x, _ = model.constraints.constrain_state(torch.as_tensor(positions),
                                             torch.as_tensor(velocities), model.potential.masses)
    assert model.constraints.residual(x) < 1e-14
    box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
    piece = WindowPiece(1, 0, 1, model.parameters.scaled.detach().clone(),
                        SampledState(positions, velocities, np.asarray(box), 0), 3, "out")
    result = compute_window(model, piece)
    assert np.isfinite(result.loss) and bool(torch.isfinite(result.gradient).all())
    assert result.info["reconstruction_error"] < 1e-8
    # ΔHvap's gas phase keeps the flexible angle's k_B T / 2.
    assert model.objective.gas_energy["enthalpy_of_vaporization"] == pytest.approx(
        0.5 * KB * TEMPERATURE)


def test_four_site_rigid_fit_runs_and_its_hvap_is_openmm(tmp_path):
    """One epoch of a rigid TIP4P/2005 fit (a virtual M site a molecule): the windows
    integrate the 90 massive particles under 90 constraints and place the sites; the ΔHvap
    of the windows is that of plain OpenMM on the same System, and the trained XML
    validates in OpenMM."""
    data = {"forcefield": {"files": [tagged_tip4p2005(tmp_path)]},
            "structure": {"water_box": 30, "model": "tip4pew"},
            "system": {"nonbonded_method": "ReactionField", "cutoff": 0.45,
                       "rigid_water": True},
            "simulation": {"temperature": TEMPERATURE, "timestep": 0.002,
                           "platform": "Reference", "seed": 5},
            "schedule": {"epochs": 1, "equilibration_steps": 1000, "bulk_steps": 100,
                         "windows": 3, "window_steps": 40, "snapshot_every": 5,
                         "learning_rate": 1e-3},
            "targets": [{"observable": "enthalpy_of_vaporization", "value": 44.0},
                        {"observable": "pressure", "value": 1.0, "weight": 0.0}]}
    config = config_from_dict(data, tmp_path)
    model = window_model(config)
    assert model.potential.virtual_sites.n_sites == 30 and len(model.constraints) == 90
    assert len(model.objective._molecules) == 30
    result = fit(config, tmp_path / "out", progress=False)
    (record,) = result.records
    hvap = record["observables"]["enthalpy_of_vaporization"]
    reference, stderr = openmm_hvap(model.parameters.system, model.positions, 30)
    print(f"TIP4P/2005 fit ΔHvap {hvap:.2f} kJ/mol, OpenMM {reference:.2f} ± {stderr:.2f}")
    assert abs(hvap - reference) < 3.0, (hvap, reference, stderr)
    assert np.isfinite(record["observables"]["pressure"])
    assert record["reconstruction_error"] < 1e-8
    assert all(np.isfinite(g) and g != 0 for g in record["gradient"].values())
    report = validate([str(f) for f in result.files["forcefield"]], config, steps=400,
                      equilibration=200, every=20, progress=False)
    (row,) = [r for r in report["observables"] if r["observable"] == "enthalpy_of_vaporization"]
    assert report["round_trip"]["ok"] and abs(row["value"] - reference) < 3.0


def test_exact_mode_refuses_constraints():
    ms = water_box(8, rigid=True, nonbonded="NoCutoff")
    with pytest.raises(UnsupportedForceError, match="exact mode does not support virtual "
                                                    "sites or constraints .* 24 constraints"):
        DeterministicForces(TorchPotential(ms.system))
