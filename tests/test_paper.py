"""The paper's water fit (examples/paper/): its data, its two configs and what they add.

- The Soper 2013 RDFs are the paper's file, unchanged (its checksum is the one the data README
  states), and read with the layout the configs give (r in Å; g_OO column 2, g_OH column 4);
  their first peaks sit where water's are.
- ``water_lj.toml`` is the paper's setting (Greener, PNAS 122, e2426058122 (2025); its
  ``water/water.jl``): each number is checked against the paper's, and the RDF grids have the
  paper's 248 (O–O) and 281 (O–H) points.
- ``water_lj_reduced.toml`` differs from it only in the keys its header names, and one epoch of
  it (sizes shrunk) runs with each of the four functional forms, every term and gradient
  finite.
- ``schedule.gradient_clamp`` clamps what the optimiser sees, the log keeps the raw gradient;
  ``loss = "l1"`` is refused on a scalar target.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from openmm import app, unit

from openmm_reversible.benchmarks.gradient_noise import measure
from openmm_reversible.cli import main
from openmm_reversible.config import config_from_dict, load_config, to_dict
from openmm_reversible.errors import InputError
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.target_files import read_rdf
from openmm_reversible.train import Trainer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PAPER = Path(__file__).resolve().parent.parent / "examples" / "paper"
SOPER = PAPER / "data" / "soper_2013_water_rdf.txt"
FORMS = ("lj", "double_exponential", "buckingham", "buffered_14_7")
BONDED_KEYS = ["Bond/length/OW.HW", "Bond/k/OW.HW", "Angle/angle/HW.OW.HW", "Angle/k/HW.OW.HW"]


def test_soper_file_is_the_papers_and_reads():
    digest = hashlib.sha256(SOPER.read_bytes()).hexdigest()
    assert digest in (PAPER / "data" / "README.md").read_text()
    r, g_oo = read_rdf(SOPER, 2, "angstrom")
    r_oh, g_oh = read_rdf(SOPER, 4, "angstrom")
    assert len(r) == 815 and r[-1] == pytest.approx(2.439) and np.array_equal(r, r_oh)
    assert r[np.argmax(g_oo)] == pytest.approx(0.279) and g_oo.max() == pytest.approx(2.4953)
    assert np.abs(g_oo[r > 1.5] - 1.0).max() < 0.01  # g → 1 far away
    hydrogen_bond = (r > 0.15) & (r < 0.25)
    assert r[hydrogen_bond][np.argmax(g_oh[hydrogen_bond])] == pytest.approx(0.186)
    with pytest.raises(InputError, match='r_unit = "angstrom"'):
        read_rdf(SOPER, 2)  # r in Å is refused without its unit


def one_water() -> app.Topology:
    topology = app.Topology()
    residue = topology.addResidue("HOH", topology.addChain())
    atoms = [topology.addAtom(name, app.element.get_by_symbol(name[0]), residue)
             for name in ("O", "H1", "H2")]
    topology.addBond(atoms[0], atoms[1])
    topology.addBond(atoms[0], atoms[2])
    return topology


def test_full_config_is_the_papers_setting():
    config = load_config(PAPER / "water_lj.toml")
    assert config.structure.water_box == 895
    assert (config.system.nonbonded_method, config.system.cutoff) == ("ReactionField", 1.0)
    assert config.system.reaction_field_dielectric == 78.3 and not config.system.rigid_water
    sim, sched = config.simulation, config.schedule
    assert (sim.temperature, sim.friction, sim.timestep) == (295.15, 1.0, 0.001)
    assert sched.equilibration_steps * sim.timestep == pytest.approx(10.0)  # ps
    assert sched.windows * (sched.bulk_steps + sched.window_steps) * sim.timestep == \
        pytest.approx(50.0)  # ps per epoch after the equilibration
    assert (sched.bulk_steps + sched.window_steps) * sim.timestep == pytest.approx(2.0)
    assert sched.window_steps == sched.snapshot_every == 200 and sched.truncation is None
    assert (sched.optimizer, sched.learning_rate, sched.gradient_clamp) == ("adam", 2e-3, 1e3)
    oo, oh, hvap = config.targets
    for target, points, first in ((oo, 248, 0.261), (oh, 281, 0.162)):
        grid = target.rdf_grid()
        assert target.loss == "l1" and target.weight == points == len(grid.r)
        assert grid.r[0] == pytest.approx(first) and grid.r[-1] == pytest.approx(1.002)
        assert target.bandwidth == pytest.approx(math.sqrt(0.0005 / 2), rel=1e-3)
    assert hvap.value == pytest.approx(44.12 + 2.8) and hvap.gas_energy == 3.69
    (xml,) = config.forcefield.files
    params = ParameterSet.from_forcefield(xml, one_water(), constraints=None, rigidWater=False)
    start = params.values()
    assert (start["Atom/sigma/tip3p-O"], start["Atom/epsilon/tip3p-O"],
            start["Atom/charge/tip3p-O"]) == (0.315, 0.636, -0.834)
    assert start["Atom/charge/tip3p-H"] == pytest.approx(0.417, rel=1e-12)
    assert sorted(params.trainable_keys) == sorted(
        ["Atom/charge/tip3p-O", "Atom/sigma/tip3p-O", "Atom/epsilon/tip3p-O"] + BONDED_KEYS)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_reduced_config_differs_only_where_it_says():
    full = _flat(to_dict(load_config(PAPER / "water_lj.toml")))
    reduced_config = load_config(PAPER / "water_lj_reduced.toml")
    reduced = _flat(to_dict(reduced_config))
    changed = {k for k in full if full[k] != reduced[k]}
    assert changed == {"path", "structure.water_box", "simulation.fused", "schedule.epochs",
                       "schedule.equilibration_steps", "schedule.windows",
                       "schedule.learning_rate"}
    # 300 waters at 0.997 g/cm³: the cutoff and the RDFs' range stay below half the box.
    edge = (reduced["structure.water_box"] * 18.015 / 0.997 / 602.214) ** (1 / 3)  # nm
    assert edge / 2 > 1.03 > max(t.r_max for t in reduced_config.targets[:2])
    assert reduced["structure.water_box"] >= 300


def tiny(form: str, **schedule) -> dict:
    """The reduced config with the given force field and every size shrunk: 40 waters, a
    0.45 nm cutoff and RDF range, one epoch of 20 + 10 OpenMM steps and a 4-step window."""
    data = tomllib.loads((PAPER / "water_lj_reduced.toml").read_text())
    data = copy.deepcopy(data)
    data["forcefield"]["files"] = [f"forcefields/{form}.xml"]
    data["structure"]["water_box"] = 40
    data["system"]["cutoff"] = 0.45
    data["simulation"].update(platform="Reference", fused=False)
    data["schedule"].update(epochs=1, equilibration_steps=20, bulk_steps=10, windows=1,
                            window_steps=4, snapshot_every=4, **schedule)
    for target in data["targets"][:2]:
        target["r_max"] = 0.45
    return data


@pytest.mark.parametrize("form", FORMS)
def test_reduced_config_runs_one_tiny_epoch(form, tmp_path):
    config = config_from_dict(tiny(form), PAPER)
    trainer = Trainer(config, tmp_path / "out", progress=False)
    keys = trainer.parameters.trainable_keys
    assert set(BONDED_KEYS) <= set(keys) and "Atom/charge/tip3p-O" in keys
    record = trainer.run_epoch()
    assert math.isfinite(record["loss"]) and record["loss"] > 0
    assert set(record["terms"]) == {"rdf_OO", "rdf_OH", "enthalpy_of_vaporization"}
    assert all(math.isfinite(v) and v > 0 for v in record["terms"].values()), record["terms"]
    gradient = np.array([record["gradient"][k] for k in keys])
    assert np.isfinite(gradient).all() and np.count_nonzero(gradient) == len(keys), gradient
    assert record["gradient_clamped"] == [k for k in keys if abs(record["gradient"][k]) > 1e3]
    trained = (tmp_path / "out" / f"{form}.xml").read_text()
    assert "parameterize" in trained  # the tagged file, ready to train again


def test_gradient_clamp_limits_the_step_and_logs_the_raw_gradient(tmp_path):
    clamp, lr = 1e-6, 1e-3
    config = config_from_dict(tiny("lj", optimizer="sgd", learning_rate=lr,
                                   gradient_clamp=clamp), PAPER)
    trainer = Trainer(config, tmp_path / "out", progress=False)
    before = trainer.parameters.scaled.detach().clone()
    record = trainer.run_epoch()
    keys = trainer.parameters.trainable_keys
    raw = np.array([record["gradient"][k] for k in keys])
    assert record["gradient_clamped"] == [k for k in keys if abs(record["gradient"][k]) > clamp]
    assert len(record["gradient_clamped"]) >= 1
    step = (trainer.parameters.scaled.detach() - before).numpy()
    np.testing.assert_allclose(step, -lr * np.clip(raw, -clamp, clamp), rtol=1e-6, atol=1e-18)


def test_loss_kind_and_clamp_are_checked():
    data = tiny("lj")
    data["targets"][2]["loss"] = "l1"
    with pytest.raises(InputError, match=r"targets\[2\]\.loss: only rdf targets take 'loss'"):
        config_from_dict(data, PAPER)
    data = tiny("lj")
    data["targets"][0]["loss"] = "l3"
    with pytest.raises(InputError, match=r"targets\[0\]\.loss = 'l3': must be one of l2, l1"):
        config_from_dict(data, PAPER)
    with pytest.raises(InputError, match=r"schedule\.gradient_clamp = -1\.0: must be > 0"):
        config_from_dict(tiny("lj", gradient_clamp=-1.0), PAPER)


def test_tagged_lj_file_loads_in_plain_openmm():
    """The tagged LJ file loads in plain OpenMM as is: charges from the NonbondedForce, the
    hydrogens' tied to the oxygen's."""
    forcefield = app.ForceField(str(PAPER / "forcefields" / "lj.xml"))
    system = forcefield.createSystem(one_water(), nonbondedMethod=app.NoCutoff)
    nonbonded = [f for f in system.getForces() if f.__class__.__name__ == "NonbondedForce"][0]
    charges = [nonbonded.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
               for i in range(3)]
    assert charges == pytest.approx([-0.834, 0.417, 0.417]) and sum(charges) == \
        pytest.approx(0.0, abs=1e-12)


def test_gradient_noise_benchmark_writes_its_record_and_figure(tmp_path, capsys):
    """``benchmark gradient-noise`` at a tiny size: two runs, both estimators finite for σ and
    ε, the summaries are those of the runs, and the JSON and figure are written."""
    code = main(["benchmark", "gradient-noise", "--waters", "16", "--cutoff", "0.35", "--runs",
                 "2", "--steps", "4", "--snapshot-every", "2", "--equilibration-steps", "10",
                 "--output", str(tmp_path), "--json", "--no-progress"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((tmp_path / "gradient_noise.json").read_text())
    assert (tmp_path / "gradient_noise.png").stat().st_size > 0
    assert record["parameters"] == ["Atom/sigma/tip3p-O", "Atom/epsilon/tip3p-O"]
    assert record["frames"] == 2 and len(record["losses"]) == 2
    for method in ("reversible", "reweighting"):
        runs = np.array(record[method]["runs"])
        assert runs.shape == (2, 2) and np.isfinite(runs).all() and np.all(runs != 0)
        np.testing.assert_allclose(record[method]["mean"], runs.mean(0), rtol=1e-12)
        np.testing.assert_allclose(record[method]["std"], runs.std(0, ddof=1), rtol=1e-12)
    # Independent runs: different seeds, different trajectories, different gradients.
    assert not np.allclose(*record["reversible"]["runs"])
    np.testing.assert_allclose(record["spread_ratio"], np.array(record["reweighting"]["std"])
                               / np.array(record["reversible"]["std"]), rtol=1e-12)
    with pytest.raises(InputError, match="runs must be >= 2"):
        measure(runs=1)


def test_validation_config_spans_the_papers_temperatures():
    """examples/paper/validation.toml: five state points between 270 and 360 K at 1 bar, rigid
    PME; density and ΔHvap at each, D at 298.15 K; where a temperature is also one of
    examples/water's, the experimental value is the same as its sourced targets file's."""
    config = load_config(PAPER / "validation.toml")
    points = config.state_points()
    temperatures = [p.temperature for p in points]
    assert len(temperatures) >= 5 and 270 <= min(temperatures) and max(temperatures) <= 360
    sourced = json.loads((PAPER.parent / "water" / "targets" / "temperatures.json").read_text())
    for point in points:
        assert point.pressure == 1.0
        assert point.config.system.rigid_water and point.config.system.nonbonded_method == "PME"
        targets = {t.observable: t.value for t in point.config.targets}
        assert {"density", "enthalpy_of_vaporization"} <= set(targets)
        assert ("diffusion" in targets) == (point.temperature == 298.15)
        for name in ("density", "enthalpy_of_vaporization"):
            value = sourced[name]["values"].get(f"{point.temperature:.2f}")
            if value is not None:
                assert targets[name] == value
