"""``[[systems]]`` of ``kind = "gas"``: a molecule in vacuum whose ⟨E_gas⟩ and gradient a
liquid's ΔHvap target takes (``gas = "<name>"``); bad gas entries; a solution system."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from openmm import app, unit
from water_systems import water_fit_files

from openmm_reversible.cli import main
from openmm_reversible.config import config_from_dict, load_config
from openmm_reversible.errors import InputError
from openmm_reversible.gas import GasPhase, first_molecule
from openmm_reversible.integrators.noise import counter_seed
from openmm_reversible.systems import alanine_dipeptide
from openmm_reversible.train import GAS_ENERGY, GAS_STDERR, Trainer, fit
from openmm_reversible.units import DTYPE, KB

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TEMPERATURE = 300.0
FRAMES, EVERY = 60, 10

LIQUID = """
[forcefield]
files = ["water.xml"]

[simulation]
friction = 10.0
timestep = 0.0005
platform = "Reference"
seed = 4

[schedule]
epochs = {epochs}
equilibration_steps = 20
bulk_steps = 20
windows = 1
window_steps = 10
snapshot_every = 5

[[systems]]
name = "liquid"
temperature = [300.0]
[systems.structure]
pdb = "water.pdb"
[systems.system]
nonbonded_method = "CutoffPeriodic"
cutoff = 0.45
[[systems.targets]]
observable = "enthalpy_of_vaporization"
value = 44.0
{gas}
"""

GAS = """
[[systems]]
name = "vapour"
kind = "gas"
temperature = [300.0]
frames = 60
every = 10
[systems.structure]
molecule_of = "liquid"
"""


def _config(tmp_path: Path, gas: str = 'gas = "vapour"', epochs: int = 1,
            gas_system: str = GAS) -> Path:
    return water_fit_files(tmp_path, LIQUID.format(epochs=epochs, gas=gas) + gas_system)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """The liquid + gas fit, two epochs straight and 1 + 1 resumed, and its trainer's gas
    point (seed and molecule)."""
    tmp = tmp_path_factory.mktemp("gas_system")
    config = load_config(_config(tmp, epochs=2))
    straight = fit(config, tmp / "straight", progress=False)
    one = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, epochs=1))
    fit(one, tmp / "split", progress=False)
    resumed = fit(config, tmp / "split", resume=True, progress=False)
    return tmp, config, straight, resumed


def test_gas_system_config(tmp_path):
    config = load_config(_config(tmp_path))
    (gas,) = config.gases
    assert (gas.name, gas.temperature, gas.frames, gas.every) == ("vapour", [300.0], 60, 10)
    assert gas.structure.molecule_of == "liquid" and gas.system is None
    # Not a state point of its own: its molecule is sampled for the liquid's target.
    assert [p.label for p in config.state_points()] == ["liquid 300 K"]
    assert config.state_points()[0].config.targets[0].gas == "vapour"


def test_two_system_fit_hvap_is_gas_minus_liquid_plus_rt_and_gets_the_gas_gradient(
        two_epochs, tmp_path):
    tmp, config, straight, _ = two_epochs
    record = straight.records[0]
    key = "liquid 300 K/enthalpy_of_vaporization"
    part = record["state_points"]["vapour 300 K"]
    e_gas, hvap = part["gas_energy"], record["observables"][key]
    assert part["kind"] == "gas" and part["frames"] == FRAMES
    assert 0 < part["gas_energy_stderr"] < e_gas
    assert record["gas"][key]["energy"] == e_gas
    # The same liquid windows (same seeds, Reference) with the gas energy 0, then with the
    # gas system's value given as gas_energy: ΔHvap = ⟨E_gas⟩ − ⟨E_liq⟩/N + RT.
    fixed = {}
    for name in ("water.pdb", "water.xml"):
        shutil.copy(tmp / name, tmp_path / name)
    for name, value in (("zero", 0.0), ("given", e_gas)):
        path = tmp_path / f"{name}.toml"
        path.write_text(LIQUID.format(epochs=1, gas=f"gas_energy = {value!r}"))
        fixed[name] = fit(load_config(path), tmp_path / name, progress=False).records[0]
    cohesion = fixed["zero"]["observables"][key] - KB * TEMPERATURE  # −⟨E_liq⟩/N
    assert 20 < cohesion < 80
    assert hvap == pytest.approx(e_gas + cohesion + KB * TEMPERATURE, rel=1e-12, abs=1e-12)
    assert fixed["given"]["observables"][key] == pytest.approx(hvap, rel=1e-12)
    # The gradients differ by the gas term, d term/d⟨E_gas⟩ · d⟨E_gas⟩/dθ (one window).
    target = config.systems[0].targets[0]
    sensitivity = 2 * target.weight * (hvap - target.value) / target.scale ** 2
    gas_gradient = record["gas"][key]["gradient"]
    assert gas_gradient["Bond/k/OW.HW"] != 0
    for name, g in record["gradient"].items():
        expected = fixed["given"]["gradient"][name] + sensitivity * gas_gradient[name]
        assert g == pytest.approx(expected, rel=1e-9, abs=1e-9), name


def test_gas_systems_energy_and_gradient_are_the_fluctuation_formula(two_epochs, tmp_path):
    """The logged ⟨E_gas⟩ and gradient equal ⟨U⟩ and ⟨∂U/∂θ⟩ − β cov(U, ∂U/∂θ) over the
    frames of the liquid's first molecule sampled again here with the fit's seed."""
    _, config, straight, _ = two_epochs
    trainer = Trainer(config, tmp_path / "unused", progress=False)  # writes nothing
    point, liquid = trainer.gas_points[0], trainer.legs[0].model
    topology, positions = first_molecule(liquid.topology, liquid.positions,
                                         liquid.parameters.system)
    assert topology.getNumAtoms() == 3
    sim = config.simulation
    phase = GasPhase(config.forcefield.files, topology, positions,
                     liquid.parameters.create_system_kwargs, None, TEMPERATURE, sim.friction,
                     sim.timestep, sim.platform)
    sampler = phase.sampler
    sampler.restart(sampler.state(), counter_seed(counter_seed(point.seed, 1), 0))
    sampler.step(FRAMES // 10 * EVERY)
    start = sampler.current_step()
    frames = sampler.step(FRAMES * EVERY, set(range(start + EVERY, start + (FRAMES + 1) * EVERY,
                                                    EVERY)))
    scaled = phase.parameters.scaled
    u, du = [], []
    for frame in frames:
        energy = phase.potential(torch.as_tensor(frame.positions, dtype=DTYPE), None)
        (grad,) = torch.autograd.grad(energy, [scaled])
        u.append(float(energy.detach()))
        du.append(grad.numpy())
    u, du = np.asarray(u), np.asarray(du)
    beta = 1.0 / (KB * TEMPERATURE)
    expected = du.mean(0) - beta * ((u[:, None] * du).mean(0) - u.mean() * du.mean(0))
    record = straight.records[0]
    logged = record["gas"]["liquid 300 K/enthalpy_of_vaporization"]
    assert logged["energy"] == pytest.approx(u.mean(), rel=1e-10)
    np.testing.assert_allclose(list(logged["gradient"].values()), expected, rtol=1e-8,
                               atol=1e-10)


def test_gas_system_in_state_data_and_resume(two_epochs):
    tmp, _, straight, resumed = two_epochs
    rows = (tmp / "straight" / "state_data.csv").read_text().splitlines()
    header = rows[0][1:].split(",")
    gas_rows = [r.split(",") for r in rows[1:] if '"vapour 300 K"' in r]
    assert len(gas_rows) == 2 and len(rows) == 5  # a liquid and a gas row per epoch
    for record, row in zip(straight.records, gas_rows, strict=True):
        part = record["state_points"]["vapour 300 K"]
        assert float(row[header.index(f'"{GAS_ENERGY}"')]) == part["gas_energy"]
        assert float(row[header.index(f'"{GAS_STDERR}"')]) == part["gas_energy_stderr"]
        assert row[header.index('"Loss"')] == ""  # no loss of its own
    # The gas molecule's state is in the checkpoint: 1 + 1 resumed epochs = 2 epochs.
    for a, b in zip(resumed.records, straight.records, strict=True):
        assert a["state_points"]["vapour 300 K"]["gas_energy"] == \
            b["state_points"]["vapour 300 K"]["gas_energy"]
        assert a["gradient"] == b["gradient"]
    energies = [r["state_points"]["vapour 300 K"]["gas_energy"] for r in straight.records]
    assert energies[0] != energies[1]


def test_validate_samples_the_named_gas_system(tmp_path):
    """``validate`` of a liquid + gas config: ΔHvap's ⟨E_gas⟩ is the gas system's molecule
    sampled in plain OpenMM with its frames, not k_B T/2 per mode."""
    from openmm_reversible.validate import validate_state_points

    config = load_config(_config(tmp_path))
    report = validate_state_points(config.forcefield.files, config, steps=40,
                                   equilibration=10, every=10, progress=False)
    ((row,),) = [[r for r in point["observables"] if r["name"] == "enthalpy_of_vaporization"]
                 for point in report["state_points"]]
    assert row["gas"] == "simulated: vapour (the first molecule of liquid)"
    assert row["gas_energy"] != pytest.approx(3 * 0.5 * KB * TEMPERATURE, rel=1e-6)
    assert row["gas_energy"] == pytest.approx(3 * 0.5 * KB * TEMPERATURE, abs=2.0)


def test_gas_system_from_a_one_molecule_pdb(tmp_path):
    """``structure.pdb`` of one water, flexible by default: its molecule alone, NoCutoff."""
    config_path = _config(tmp_path, gas_system=GAS.replace('molecule_of = "liquid"',
                                                           'pdb = "one.pdb"'))
    pdb = app.PDBFile(str(tmp_path / "water.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete(list(modeller.topology.residues())[1:])
    with open(tmp_path / "one.pdb", "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)
    config = load_config(config_path)
    assert config.gases[0].system.nonbonded_method == "NoCutoff"
    trainer = Trainer(config, tmp_path / "out", progress=False)
    phase = trainer.gas_points[0].phase
    assert phase.parameters.system.getNumParticles() == 3
    assert not phase.parameters.system.usesPeriodicBoundaryConditions()
    assert phase.parameters.trainable_keys == trainer.parameters.trainable_keys


def test_gas_system_pdb_of_several_molecules_is_refused(tmp_path):
    config = load_config(_config(tmp_path, gas_system=GAS.replace('molecule_of = "liquid"',
                                                                  'pdb = "water.pdb"')))
    with pytest.raises(InputError, match=r"vapour \(kind = \"gas\"\): structure.pdb .* holds "
                                         r"32 molecules; a gas system is one molecule"):
        Trainer(config, tmp_path / "out", progress=False)


BAD = [
    (lambda d: d["systems"][1].update(pressure=[1.0]),
     "systems[1].pressure: a gas system is one molecule in vacuum, without a box"),
    (lambda d: d["systems"][1].update(barostat_interval=25),
     "systems[1].barostat_interval: a gas system is one molecule in vacuum"),
    (lambda d: d["systems"][1].update(system={"cutoff": 1.0}),
     "systems[1].system.cutoff: the gas molecule is simulated with NoCutoff"),
    (lambda d: d["systems"][1].update(system={"nonbonded_method": "PME"}),
     "systems[1].system.nonbonded_method: the gas molecule is simulated with NoCutoff"),
    (lambda d: d["systems"][1].update(system={"rigid_water": True}),
     "systems[1].system: the molecule of structure.molecule_of keeps the [systems.system] "
     "settings of 'liquid'"),
    (lambda d: d["systems"][1].update(targets=[{"observable": "pressure", "value": 1.0}]),
     "systems[1].targets: a gas system has no targets of its own"),
    (lambda d: d["systems"][1]["structure"].update(water_box=1),
     "systems[1].structure.water_box: a gas system is one molecule without a box"),
    (lambda d: d["systems"][1]["structure"].update(pdb="water.pdb"),
     "systems[1].structure: give exactly one of 'pdb' (a single molecule) or 'molecule_of'"),
    (lambda d: d["systems"][1]["structure"].update(molecule_of="liquids"),
     "systems[1].structure.molecule_of = 'liquids': no liquid system has this name; did you "
     "mean 'liquid'?"),
    (lambda d: d["systems"][1].pop("temperature"),
     "systems[1].temperature: required key is missing"),
    (lambda d: d["systems"][1].update(frames=0), "systems[1].frames = 0: must be > 0"),
    (lambda d: d["systems"][1].update(kind="gaz"),
     "systems[1].kind = 'gaz': must be \"crystal\" or \"gas\""),
    (lambda d: d["systems"][0]["targets"][0].update(gas="vapor"),
     "systems[0].targets[0].gas = 'vapor': no system has this name; must be one of simulate, "
     "vapour; did you mean 'vapour'?"),
    (lambda d: d["systems"][0]["targets"][0].update(gas="liquid"),
     "systems[0].targets[0].gas = 'liquid': that system is not of kind = \"gas\""),
    (lambda d: d["systems"][0].update(temperature=[300.0, 320.0]),
     "systems[0].targets[0].gas = 'vapour': the gas system has no state point at 320 K (its "
     "temperatures: 300); add 320 to its temperature list"),
    (lambda d: d["systems"][0]["targets"][0].update(gas_frames=10),
     "systems[0].targets[0].gas_frames: only a target with gas = \"simulate\" takes it; the gas "
     "system 'vapour' samples frames"),
    (lambda d: d["systems"][0]["targets"][0].update(gas="simulate"),
     "systems[1]: no enthalpy_of_vaporization target names the gas system 'vapour'; give one "
     "gas = \"vapour\""),
    (lambda d: d["systems"].pop(0),
     "systems: every system is of kind = \"gas\""),
]


@pytest.mark.parametrize("change, message", BAD)
def test_bad_gas_entries_name_the_key(tmp_path, change, message):
    data = tomllib.loads(_config(tmp_path).read_text())
    change(data)
    with pytest.raises(InputError) as info:
        config_from_dict(data, tmp_path)
    assert message in str(info.value)


def test_bad_gas_entry_exits_2_from_the_command_line(tmp_path, capsys):
    path = _config(tmp_path)
    path.write_text(path.read_text().replace("frames = 60", "frames = 60\npressure = 1.0"))
    assert main(["fit", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "systems[1].pressure: a gas system is one molecule" in capsys.readouterr().err


def test_gas_system_name_without_systems_is_refused(tmp_path):
    data = tomllib.loads(_config(tmp_path).read_text())
    liquid = copy.deepcopy(data["systems"][0])
    single = {"forcefield": data["forcefield"], "schedule": data["schedule"],
              "simulation": dict(data["simulation"], temperature=300.0),
              "structure": liquid["structure"], "system": liquid["system"],
              "targets": liquid["targets"]}
    with pytest.raises(InputError, match=r"targets\[0\]\.gas = 'vapour': must be one of "
                                         r"simulate, or the name of a \[\[systems\]\] table"):
        config_from_dict(single, tmp_path)


AMBER = Path(os.path.dirname(app.__file__)) / "data" / "amber14"

SOLUTION = """
[forcefield]
files = ["protein.ff14SB.xml", "amber14/tip3p.xml"]

[simulation]
friction = 10.0
timestep = 0.0005
platform = "CPU"
seed = 3

[schedule]
epochs = 1
equilibration_steps = 10
bulk_steps = 10
windows = 1
window_steps = 10
snapshot_every = 5

[[systems]]
name = "solution"
temperature = [300.0]
[systems.structure]
pdb = "dipeptide.pdb"
padding = 0.5
[systems.system]
nonbonded_method = "CutoffPeriodic"
cutoff = 0.6
[[systems.targets]]
observable = "pressure"
value = 1.0
tolerance = 1000.0
"""


def test_solution_system_of_a_pdb_solute_and_padding_water_runs_an_epoch(tmp_path):
    """Alanine dipeptide (ALA's CB charge tagged) in 0.5 nm of TIP3P water as a
    ``[[systems]]`` structure: built by Modeller, sampled and differentiated."""
    text = (AMBER / "protein.ff14SB.xml").read_text()
    (tmp_path / "protein.ff14SB.xml").write_text(
        text.replace('<Residue name="ALA">', '<Residue name="ALA" parameterize="CB/charge">'))
    peptide = alanine_dipeptide()
    with open(tmp_path / "dipeptide.pdb", "w") as handle:
        app.PDBFile.writeFile(peptide.topology, peptide.positions * unit.nanometer, handle)
    (tmp_path / "fit.toml").write_text(SOLUTION)
    config = load_config(tmp_path / "fit.toml")
    trainer = Trainer(config, tmp_path / "out", progress=False)
    try:
        residues = [r.name for r in trainer.topology.residues()]
        assert residues[:3] == ["ACE", "ALA", "NME"] and residues.count("HOH") > 20
        box = trainer.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)
        assert min(box[i][i] for i in range(3)) > 2 * 0.6
        record = trainer.run_epoch()
    finally:
        trainer.close()
    assert list(record["gradient"]) == ["Residue/ALA/CB/charge"]
    assert np.isfinite(record["gradient"]["Residue/ALA/CB/charge"])
    assert record["gradient"]["Residue/ALA/CB/charge"] != 0
    assert np.isfinite(record["observables"]["solution 300 K/pressure"])
