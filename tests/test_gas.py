"""The simulated gas phase of ΔHvap (``gas = "simulate"``): ⟨E_gas⟩ by plain OpenMM, its
fluctuation gradient, and a liquid + gas fit."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from water_systems import TAGGED_TIP3P, water_fit_files

from openmm_reversible.config import load_config
from openmm_reversible.errors import InputError
from openmm_reversible.gas import GasPhase, first_molecule
from openmm_reversible.observables.blocking import block_average
from openmm_reversible.systems import alanine_dipeptide
from openmm_reversible.train import Trainer, fit
from openmm_reversible.units import KB

AMBER_PROTEIN = Path(os.path.dirname(app.__file__)) / "data" / "amber14" / "protein.ff14SB.xml"
FLEXIBLE = {"constraints": None, "rigidWater": False}


def _one_water():
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=4,
                        neutralize=False)
    positions = np.asarray(modeller.getPositions().value_in_unit(unit.nanometer))
    return first_molecule(modeller.topology, positions)


def test_first_molecule_is_one_water_without_a_box():
    topology, positions = _one_water()
    assert topology.getNumAtoms() == 3 and positions.shape == (3, 3)
    assert topology.getPeriodicBoxVectors() is None
    assert [a.element.symbol for a in topology.atoms()] == ["O", "H", "H"]


def test_first_molecule_keeps_its_virtual_site_with_the_system():
    """TIP4P-Ew's M has no bond in the topology: the System joins it to its water."""
    forcefield = app.ForceField("tip4pew.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(forcefield, model="tip4pew", numAdded=5, neutralize=False)
    positions = np.asarray(modeller.getPositions().value_in_unit(unit.nanometer))
    system = forcefield.createSystem(modeller.topology)
    topology, xyz = first_molecule(modeller.topology, positions, system)
    assert [a.name for a in topology.atoms()] == ["O", "H1", "H2", "M"]
    np.testing.assert_array_equal(xyz, positions[:4])
    forcefield.createSystem(topology)  # the molecule alone matches its template


def test_flexible_tip3p_gas_energy_is_equipartition():
    """Harmonic bonds and angle, no intramolecular nonbonded pair: ⟨U⟩ = 3 · k_B T / 2."""
    topology, positions = _one_water()
    temperature = 300.0
    gas = GasPhase([TAGGED_TIP3P], topology, positions, FLEXIBLE, None, temperature, 10.0,
                   0.0005, platform="Reference")
    estimate = gas.sample(gas.parameters.scaled.detach(), 1500, 40, seed=5)
    expected = 1.5 * KB * temperature
    assert estimate.frames == 1500
    assert 0 < estimate.stderr < 0.1 * expected
    assert abs(estimate.energy - expected) < 3 * estimate.stderr, (estimate, expected)


def test_gas_molecule_must_hold_the_liquids_sites():
    topology, positions = _one_water()
    with pytest.raises(InputError, match="the gas molecule .* has the trainable sites"):
        GasPhase([TAGGED_TIP3P], topology, positions, FLEXIBLE, ["Atom/charge/tip3p-O"], 300.0,
                 10.0, 0.0005, platform="Reference")


def _openmm_mean_energy(system: openmm.System, positions, temperature: float, n_frames: int,
                        every: int, seed: int) -> tuple[float, float]:
    """⟨U⟩ and its block standard error from a plain OpenMM Langevin run, kJ/mol."""
    integrator = openmm.LangevinMiddleIntegrator(temperature, 10.0, 0.0005)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
    context.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(temperature, seed)
    integrator.step(n_frames // 10 * every)
    energies = []
    for _ in range(n_frames):
        integrator.step(every)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy()
                        .value_in_unit(unit.kilojoule_per_mole))
    mean, stderr = block_average(np.asarray(energies), n_blocks=5)
    return float(mean), float(stderr)


def test_gas_energy_gradient_against_finite_differences_of_openmm_runs(tmp_path):
    """Alanine dipeptide (torsions, 1-4 and longer intramolecular pairs) with ALA's CB charge
    trainable: the fluctuation gradient of ⟨E_gas⟩ against central differences of plain
    OpenMM runs at scaled values 1 ± h, within their combined error bars."""
    text = AMBER_PROTEIN.read_text()
    old = '<Residue name="ALA">'
    assert text.count(old) == 1
    xml = tmp_path / "protein.ff14SB.xml"
    xml.write_text(text.replace(old, '<Residue name="ALA" parameterize="CB/charge">'))
    peptide = alanine_dipeptide()
    temperature, n_frames, every = 300.0, 1000, 20
    gas = GasPhase([str(xml)], peptide.topology, peptide.positions, {}, None, temperature,
                   10.0, 0.0005, platform="CPU")
    assert gas.parameters.trainable_keys == ["Residue/ALA/CB/charge"]
    estimate = gas.sample(gas.parameters.scaled.detach(), n_frames, every, seed=5)
    # The gradient's error bar: the estimator on each of five blocks of the frames.
    h, sides = 0.5, []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            gas.parameters.scaled.fill_(1.0 + sign * h)
        sides.append(_openmm_mean_energy(gas.parameters.create_system(), peptide.positions,
                                         temperature, 2 * n_frames, every, seed=11))
    fd = (sides[0][0] - sides[1][0]) / (2 * h)
    fd_err = np.hypot(sides[0][1], sides[1][1]) / (2 * h)
    blocks = [gas.sample(torch.ones(1), n_frames // 5, every, seed=20 + k).gradient[0]
              for k in range(5)]
    grad_err = float(np.std(blocks, ddof=1) / np.sqrt(5))
    grad = float(estimate.gradient[0])
    assert abs(fd) > 3 * fd_err, (fd, fd_err)  # a gradient that is measured, not noise
    print(f"gradient {grad:.2f} ± {grad_err:.2f}, finite differences {fd:.2f} ± {fd_err:.2f}")
    assert abs(grad - fd) < 3 * np.hypot(fd_err, grad_err), (grad, grad_err, fd, fd_err)


CONFIG = """
[forcefield]
files = ["{xml}"]

[structure]
pdb = "water.pdb"

[system]
nonbonded_method = "CutoffPeriodic"
cutoff = 0.45

[simulation]
temperature = 300.0
friction = 10.0
timestep = 0.0005
platform = "Reference"
seed = 4

[schedule]
epochs = 1
equilibration_steps = 20
bulk_steps = 20
windows = 1
window_steps = 10
snapshot_every = 5
learning_rate = 0.01

[[targets]]
observable = "enthalpy_of_vaporization"
value = 44.0
gas = "simulate"
gas_frames = 200
gas_every = 10
"""


def test_liquid_and_gas_fit_epoch_logs_both_and_chains_the_gas_gradient(tmp_path):
    config = load_config(water_fit_files(tmp_path, CONFIG.format(xml="water.xml")))
    trainer = Trainer(config, tmp_path / "out", progress=False)
    try:
        record = trainer.run_epoch()
    finally:
        trainer.close()
    gas = record["gas"]["enthalpy_of_vaporization"]
    assert gas["frames"] == 200 and gas["stderr"] > 0
    assert 0 < gas["energy"] < 20 * KB * 300.0
    hvap = record["observables"]["enthalpy_of_vaporization"]
    target = config.targets[0]
    # The window's ΔHvap used the simulated gas energy, and its backward gave d term/d⟨E_gas⟩
    # = 2 · weight · (ΔHvap − value) / tolerance² (one window), the factor of the gas gradient.
    objective = trainer.objective
    assert objective.gas_energy[target.label] == gas["energy"]
    sensitivity = objective.gas_sensitivities()[target.label]
    assert sensitivity == pytest.approx(2 * target.weight * (hvap - target.value)
                                        / target.scale ** 2, rel=1e-9)
    assert sensitivity != 0
    assert all(np.isfinite(v) for v in record["gradient"].values())
    assert record["timings"]["gas_s"] > 0


def test_gas_key_errors_name_the_key(tmp_path):
    good = CONFIG.format(xml="water.xml")
    for old, new, message in (
            ('gas = "simulate"', 'gas = "simulate"\ngas_energy = 3.7',
             r"targets\[0\]\.gas: .*remove gas_energy"),
            ('gas = "simulate"', 'gas = "harmonic"', r"targets\[0\]\.gas.*must be one of simulate"),
            ('observable = "enthalpy_of_vaporization"', 'observable = "pressure"',
             r"targets\[0\]\.gas: only enthalpy_of_vaporization targets take it"),
            ('gas = "simulate"\n', '', r"targets\[0\]\.gas_frames: only a target with gas")):
        with pytest.raises(InputError, match=message):
            load_config(water_fit_files(tmp_path, good.replace(old, new)))


def test_fit_with_a_simulated_gas_resumes_exactly(tmp_path):
    """The gas molecule's state is in the checkpoint: 1 + 1 resumed epochs = 2 epochs."""
    config = load_config(water_fit_files(tmp_path, CONFIG.format(xml="water.xml").replace(
        "gas_frames = 200", "gas_frames = 50")))
    config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, epochs=2))
    straight = fit(config, tmp_path / "straight", progress=False)
    fit(dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, epochs=1)),
        tmp_path / "split", progress=False)
    resumed = fit(config, tmp_path / "split", resume=True, progress=False)
    assert [r["gas"] for r in resumed.records] == [r["gas"] for r in straight.records]
    assert [r["gradient"] for r in resumed.records] == [r["gradient"] for r in straight.records]
    assert straight.records[0]["gas"] != straight.records[1]["gas"]
