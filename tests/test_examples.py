"""The shipped example configs load and their window model runs (examples/tip4p_ew/)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from openmm import unit

from openmm_reversible.config import load_config
from openmm_reversible.sampler import SampledState
from openmm_reversible.systems import openmm_data_file
from openmm_reversible.train import WindowPiece, compute_window, window_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def shipped_tip4pew() -> dict[str, tuple[float, float, float]]:
    """(charge e, sigma nm, epsilon kJ/mol) of each type in OpenMM's tip4pew.xml."""
    forcefield = app.ForceField(openmm_data_file("tip4pew.xml"))
    (generator,) = [g for g in forcefield.getGenerators()
                    if isinstance(g, app.forcefield.NonbondedGenerator)]
    values = generator.params.paramsForType
    return {name: (values[name]["charge"], values[name]["sigma"], values[name]["epsilon"])
            for name in ("tip4pew-O", "tip4pew-H", "tip4pew-M")}


def test_tip4p_ew_example_window_runs(monkeypatch):
    """examples/tip4p_ew/tip4p_ew.toml: rigid TIP4P-Ew with PME, 216 waters with their M
    sites; the start is the shipped model perturbed as its XML comment says (σ +3 %, ε −10 %,
    q −4 %), the molecule is neutral, and a 4-step reversible window from an OpenMM state
    gives a finite, nonzero gradient with the state reconstructed."""
    monkeypatch.chdir(EXAMPLES.parent)
    config = load_config(os.path.join("examples", "tip4p_ew", "tip4p_ew.toml"))
    assert config.system.rigid_water and config.system.nonbonded_method == "PME"
    config = dataclasses.replace(config, schedule=dataclasses.replace(
        config.schedule, window_steps=4, snapshot_every=2))
    model = window_model(config)
    assert model.potential.virtual_sites.n_sites == 216 and len(model.constraints) == 3 * 216
    assert sorted(model.parameters.trainable_keys) == [
        "Atom/charge/tip4pew-M", "Atom/epsilon/tip4pew-O", "Atom/sigma/tip4pew-O"]
    shipped = shipped_tip4pew()
    start = model.parameters.values()
    for key, (index, factor) in {"charge": (0, 0.96), "sigma": (1, 1.03),
                                 "epsilon": (2, 0.90)}.items():
        atom_type = "tip4pew-M" if key == "charge" else "tip4pew-O"
        assert start[f"Atom/{key}/{atom_type}"] == pytest.approx(
            factor * shipped[atom_type][index], rel=1e-5), key
    nonbonded = next(f for f in model.parameters.system.getForces()
                     if isinstance(f, openmm.NonbondedForce))
    charges = [nonbonded.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
               for i in range(4)]
    assert sum(charges) == pytest.approx(0.0, abs=1e-12)
    assert charges[1] == pytest.approx(-0.5 * 0.96 * shipped["tip4pew-M"][0], rel=1e-5)

    system = model.parameters.system
    integrator = openmm.LangevinMiddleIntegrator(config.simulation.temperature, 1.0, 0.002)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
    context.setPositions(model.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 50.0, 50)
    context.setVelocitiesToTemperature(config.simulation.temperature, 3)
    integrator.step(10)
    state = context.getState(getPositions=True, getVelocities=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    velocities = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
    box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer)
    piece = WindowPiece(1, 0, 1, model.parameters.scaled.detach().clone(),
                        SampledState(positions, velocities, np.asarray(box), 0), 3, "out")
    result = compute_window(model, piece)
    assert np.isfinite(result.loss)
    assert bool(torch.isfinite(result.gradient).all()) and bool((result.gradient != 0).all())
    assert result.info["reconstruction_error"] < 1e-8


def test_water_temperatures_example_parses_and_one_tiny_epoch_runs(monkeypatch, tmp_path):
    """examples/water/water_temperatures.toml: water at 278.15-338.15 K, NPT at 1 bar, density
    and ΔHvap at each temperature and the Soper 2013 O-O RDF at 298.15 K; every target value
    is the one targets/temperatures.json gives with its source. One epoch of a few steps runs
    over all four state points and gives one loss over all nine targets (the full fit is not
    run here)."""
    import json

    from openmm_reversible.train import fit

    monkeypatch.chdir(EXAMPLES.parent)
    config = load_config(os.path.join("examples", "water", "water_temperatures.toml"))
    sources = json.loads((EXAMPLES / "water" / "targets" / "temperatures.json").read_text())
    points = config.state_points()
    assert [p.temperature for p in points] == [278.15, 298.15, 318.15, 338.15]
    assert all(p.pressure == 1.0 for p in points)
    for point in points:
        targets = {t.observable: t for t in point.config.targets}
        for observable in ("density", "enthalpy_of_vaporization"):
            assert targets[observable].value == \
                sources[observable]["values"][f"{point.temperature:.2f}"], (point.label,
                                                                             observable)
        assert ("rdf" in targets) == (point.temperature == 298.15)
    for observable in ("density", "enthalpy_of_vaporization", "rdf"):
        assert "source" in sources[observable]
    (rdf_target,) = [t for t in points[1].config.targets if t.observable == "rdf"]
    r, g = rdf_target.rdf_data()
    assert r[-1] == pytest.approx(2.439) and 2.4 < g.max() < 2.6  # Soper's first O-O peak

    tiny = dataclasses.replace(
        config, schedule=dataclasses.replace(config.schedule, epochs=1, equilibration_steps=20,
                                             bulk_steps=20, windows=1, window_steps=2,
                                             snapshot_every=1),
        equilibration=dataclasses.replace(config.equilibration, max_steps=0),
        simulation=dataclasses.replace(config.simulation, platform="CPU"))
    (record,) = fit(tiny, tmp_path / "out", progress=False).records
    assert len(record["terms"]) == 9
    assert record["loss"] == pytest.approx(sum(record["terms"].values()), rel=1e-12)
    assert np.isfinite(record["loss"]) and record["gradient_norm"] > 0
    assert set(record["state_points"]) == {p.label for p in points}
