"""The training loop: parameter recovery, exact resume, export round trip, failure handling.

The system is 64 Lennard-Jones argon atoms (σ 0.34 nm, ε 0.996 kJ/mol, 120 K, reduced density
0.8) so that every fit takes seconds on the Reference platform. The synthetic targets (Ar–Ar
RDF and ΔH_vap) are simulated here, in plain OpenMM, with the true parameters.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_reversible.commands import fit as fit_cli
from openmm_reversible.config import load_config
from openmm_reversible.errors import InputError
from openmm_reversible.observables.rdf import rdf
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.priors import ParameterRule
from openmm_reversible.train import (
    CHECKPOINT,
    LOG,
    PLOT,
    NonFiniteGradient,
    Trainer,
    TrainingFailed,
    fit,
    read_log,
)
from openmm_reversible.trajectory import Trajectory
from openmm_reversible.units import KB

SIGMA, EPSILON = 0.34, 0.996  # nm, kJ/mol: the truth the recovery test must find again
TEMPERATURE = 120.0  # K
N_SIDE, BOX = 4, 1.47  # 64 atoms in a 1.47 nm cube

XML = """<ForceField>
 <!-- Lennard-Jones argon for the training tests -->
 <AtomTypes>
  <Type name="Ar" class="Ar" element="Ar" mass="39.948"/>
 </AtomTypes>
 <Residues>
  <Residue name="AR">
   <Atom name="AR" type="Ar"/>
  </Residue>
 </Residues>
 <NonbondedForce coulomb14scale="0.833333" lj14scale="0.5">
  <Atom type="Ar" charge="0.0" sigma="{sigma}" epsilon="{epsilon}" parameterize="sigma, epsilon"/>
 </NonbondedForce>
</ForceField>
"""

CONFIG = """
[forcefield]
files = ["{xml}"]

[structure]
pdb = "argon.pdb"

[system]
nonbonded_method = "CutoffPeriodic"
cutoff = 0.7

[simulation]
temperature = 120.0
friction = 5.0
timestep = 0.004
platform = "Reference"
seed = 11

[schedule]
epochs = {epochs}
equilibration_steps = 200
bulk_steps = 100
windows = 1
window_steps = {window_steps}
snapshot_every = 5
learning_rate = 0.03

[failure]
max_retries = {retries}
{failure}

[[targets]]
observable = "enthalpy_of_vaporization"
value = {dhvap}

[[targets]]
observable = "rdf"
atoms = ["AR", "AR"]
file = "rdf_ArAr.dat"
weight = 10.0
"""


def _write_pdb(path, name: str = "argon.pdb", n_side: int = N_SIDE, box: float = BOX) -> None:
    lines = [f"CRYST1{box * 10:9.3f}{box * 10:9.3f}{box * 10:9.3f}  90.00  90.00  90.00 P 1"
             "           1"]
    grid = (np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1)
            .reshape(-1, 3) + 0.5) * box / n_side * 10
    for k, (x, y, z) in enumerate(grid, start=1):
        lines.append(f"HETATM{k:5d} AR    AR A{k:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00"
                     "          AR")
    (path / name).write_text("\n".join(lines + ["END"]) + "\n")


@pytest.fixture(scope="module")
def argon(tmp_path_factory):
    """Directory with argon.pdb, the true force field and targets simulated with it."""
    path = tmp_path_factory.mktemp("argon")
    _write_pdb(path)
    (path / "true.xml").write_text(XML.format(sigma=SIGMA, epsilon=EPSILON))
    pdb = app.PDBFile(str(path / "argon.pdb"))
    system = app.ForceField(str(path / "true.xml")).createSystem(
        pdb.topology, nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=0.7,
        removeCMMotion=False)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 5.0, 0.004)
    integrator.setRandomNumberSeed(3)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(TEMPERATURE, 3)
    integrator.step(1000)
    frames, energies = [], []
    for _ in range(200):
        integrator.step(10)
        state = context.getState(getPositions=True, getEnergy=True)
        frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    box = torch.tensor(np.asarray(state.getPeriodicBoxVectors(asNumpy=True)
                                  .value_in_unit(unit.nanometer)))
    n = system.getNumParticles()
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    r, g = rdf(torch.tensor(np.array(frames)), box, pairs=pairs, r_range=(0.0, 0.7),
               bin_width=0.01, sigma=0.0)
    np.savetxt(path / "rdf_ArAr.dat", np.column_stack([r.numpy(), g.numpy()]))
    dhvap = -np.mean(energies) / n + KB * TEMPERATURE
    return path, float(dhvap)


def _config(argon, name: str, sigma: float, epsilon: float, epochs: int = 2,
            window_steps: int = 10, retries: int = 1, failure: str = ""):
    path, dhvap = argon
    xml = path / f"{name}.xml"
    xml.write_text(XML.format(sigma=sigma, epsilon=epsilon))
    toml = path / f"{name}.toml"
    toml.write_text(CONFIG.format(xml=xml.name, epochs=epochs, window_steps=window_steps,
                                  retries=retries, failure=failure, dhvap=dhvap))
    return load_config(toml)


@pytest.mark.slow
def test_recovers_known_parameters(argon, tmp_path):
    """Start 3 % off in σ and 8 % off in ε; 8 epochs land within 2 % and 3 % of the truth."""
    config = _config(argon, "perturbed", SIGMA * 1.03, EPSILON * 0.92, epochs=8,
                     window_steps=40)
    result = fit(config, tmp_path / "out", progress=False)
    sigma = result.parameters["Atom/sigma/Ar"]
    epsilon = result.parameters["Atom/epsilon/Ar"]
    assert abs(sigma / SIGMA - 1) < 0.02, sigma
    assert abs(epsilon / EPSILON - 1) < 0.03, epsilon
    # The start was further away than the tolerance, so the fit did move the parameters.
    assert abs(SIGMA * 1.03 / SIGMA - 1) > 0.02 and abs(0.92 - 1) > 0.03


def test_resume_equals_uninterrupted(argon, tmp_path):
    config = _config(argon, "resume", SIGMA * 1.02, EPSILON * 0.95, epochs=2)
    config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule,
                                                                      lr_decay=0.5))
    straight = fit(config, tmp_path / "straight", progress=False)
    first = fit(dataclasses.replace(config, schedule=dataclasses.replace(config.schedule,
                                                                         epochs=1)),
                tmp_path / "split", progress=False)
    assert len(first.records) == 1
    resumed = fit(config, tmp_path / "split", resume=True, progress=False)
    assert [r["epoch"] for r in resumed.records] == [1, 2]
    for a, b in zip(straight.records, resumed.records, strict=True):
        assert a["loss"] == b["loss"]
        assert a["gradient"] == b["gradient"]
        assert a["parameters_after"] == b["parameters_after"]
    assert straight.parameters == resumed.parameters
    # The decayed learning rate is part of the checkpoint.
    assert [r["learning_rate"] for r in resumed.records] == [0.03, 0.015]
    assert (tmp_path / "straight" / "resume.xml").read_bytes() == \
        (tmp_path / "split" / "resume.xml").read_bytes()
    untimed = [{k: v for k, v in r.items() if k != "timings"}
               for r in read_log(tmp_path / "straight" / LOG)]
    assert [{k: v for k, v in r.items() if k != "timings"}
            for r in read_log(tmp_path / "split" / LOG)] == untimed


def test_outputs_and_export_round_trip(argon, tmp_path):
    config = _config(argon, "export", SIGMA * 1.02, EPSILON * 0.95, epochs=1)
    out = tmp_path / "out"
    result = fit(config, out, progress=False)
    original = (argon[0] / "export.xml").read_text()
    trained = (out / "export.xml").read_text()
    # Only the two tagged numbers changed; everything else is byte-for-byte the original.
    number = r'(sigma|epsilon)="[^"]*"'
    assert re.sub(number, "", trained) == re.sub(number, "", original)
    assert trained != original
    topology = app.PDBFile(str(argon[0] / "argon.pdb")).topology
    reread = ParameterSet.from_forcefield([str(out / "export.xml")], topology,
                                          nonbondedMethod=app.CutoffPeriodic,
                                          nonbondedCutoff=0.7)
    assert reread.values() == result.parameters
    (record,) = read_log(out / LOG)
    assert set(record["terms"]) == {"enthalpy_of_vaporization", "rdf_ARAR"}
    assert record["loss"] == pytest.approx(sum(record["terms"].values()), rel=1e-12)
    assert record["gradient_norm"] > 0
    assert set(record["timings"]) >= {"equilibrate_s", "bulk_s", "forward_s", "backward_s",
                                      "total_s"}
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / CHECKPOINT).is_file()


def test_rdf_range_beyond_a_shrunken_box_names_r_max(argon, tmp_path):
    config = _config(argon, "shrunk", SIGMA, EPSILON, epochs=1)
    trainer = Trainer(config, tmp_path / "out", progress=False)
    (target,) = [t for t in config.targets if t.observable == "rdf"]
    n = trainer.parameters.system.getNumParticles()
    traj = Trajectory(positions=torch.rand(2, n, 3, dtype=torch.float64),
                      velocities=torch.zeros(2, n, 3, dtype=torch.float64),
                      box=torch.eye(3, dtype=torch.float64) * 1.3, steps=torch.arange(2),
                      timestep=0.004, masses=torch.ones(n, dtype=torch.float64),
                      temperature=TEMPERATURE)
    with pytest.raises(InputError, match=r"rdf_ARAR .* 0\.65 nm; set r_max = 0\.61"):
        trainer.objective.observable(target, traj, trainer.potential)


def test_explosion_retries_and_keeps_last_good_parameters(argon, tmp_path):
    # Any temperature counts as an explosion: every attempt fails at the first check.
    config = _config(argon, "explode", SIGMA, EPSILON, epochs=1, retries=2,
                     failure='action = "shrink_lr"\nmax_temperature = 1.0')
    trainer = Trainer(config, tmp_path / "out", progress=False)
    before = trainer.parameters.values()
    with pytest.raises(TrainingFailed) as info:
        trainer.run()
    message = str(info.value)
    assert message.count("attempt") == 3
    assert "OpenMM step 100" in message and "Atom/sigma/Ar = 0.34" in message
    assert trainer.parameters.values() == before
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.03 * 0.5 ** 3)
    assert not (tmp_path / "out" / CHECKPOINT).exists()


def test_output_directory_guards(argon, tmp_path):
    config = _config(argon, "guard", SIGMA, EPSILON, epochs=1)
    with pytest.raises(Exception, match="no checkpoint"):
        Trainer(config, tmp_path / "empty", resume=True, progress=False)
    fit(config, tmp_path / "done", progress=False)
    with pytest.raises(Exception, match="already holds a fit"):
        Trainer(config, tmp_path / "done", progress=False)
    changed = dataclasses.replace(config, simulation=dataclasses.replace(config.simulation,
                                                                         seed=99))
    with pytest.raises(Exception, match="simulation.seed"):
        Trainer(changed, tmp_path / "done", resume=True, progress=False)


def test_fit_command(argon, tmp_path, capsys):
    _config(argon, "cli", SIGMA, EPSILON, epochs=1)
    parser = argparse.ArgumentParser()
    fit_cli.add_arguments(parser)
    args = parser.parse_args([str(argon[0] / "cli.toml"), "--output", str(tmp_path / "o"),
                              "--no-progress"])
    assert fit_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "Atom/sigma/Ar" in out and "cli.xml" in out
    record = json.loads((tmp_path / "o" / LOG).read_text().splitlines()[0])
    assert record["epoch"] == 1


def test_stop_action_fails_at_the_first_explosion(argon, tmp_path):
    config = _config(argon, "stop", SIGMA, EPSILON, epochs=1, retries=2,
                     failure='action = "stop"\nmax_temperature = 1.0')
    with pytest.raises(TrainingFailed) as info:
        fit(config, tmp_path / "out", progress=False)
    assert str(info.value).count("attempt") == 1
    assert "kinetic temperature" in str(info.value)


NAN_GRADIENT = """
 <CustomNonbondedForce energy="exp(-alpha*w); w=1/zero" bondCutoff="3">
  <GlobalParameter name="alpha" defaultValue="1" parameterize="defaultValue"/>
  <GlobalParameter name="zero" defaultValue="0"/>
  <Atom type="Ar"/>
 </CustomNonbondedForce>
</ForceField>"""
"""A term whose energy is finite (``exp(-alpha/0) = 0``) but whose alpha derivative is
``(1/0)·0 = NaN``: the infinite intermediate meets a parameter in a product."""


def test_non_finite_gradient_stops_the_fit_naming_parameter_and_force(argon, tmp_path):
    config = _config(argon, "nan", SIGMA, EPSILON, epochs=2, retries=2)
    xml = argon[0] / "nan.xml"
    xml.write_text(xml.read_text().replace("</ForceField>", NAN_GRADIENT))
    trainer = Trainer(config, tmp_path / "out", progress=False)
    before = trainer.parameters.values()
    with pytest.raises(NonFiniteGradient) as info:
        trainer.run()
    assert isinstance(info.value, TrainingFailed)
    message = str(info.value)
    assert message.startswith("epoch 1: reversible window 1 (started at OpenMM step 300) gave "
                              "a non-finite gradient for GlobalParameter/defaultValue/alpha "
                              "(nan); at the window's first state it comes from "
                              "CustomNonbondedForce (force 1): "
                              "GlobalParameter/defaultValue/alpha. The fit stops before any "
                              "optimiser step")
    assert "Atom/sigma/Ar" not in message.split("; at the")[0]
    assert trainer.parameters.values() == before
    assert trainer.optimizer.state_dict()["state"] == {}  # no Adam step was taken
    assert not (tmp_path / "out" / CHECKPOINT).exists()


def test_priors_bounds_and_frozen_parameters_in_a_fit(argon, tmp_path):
    """[[parameters]]: ε frozen stays bit for bit, σ stays inside its bounds, the prior's
    penalty enters the logged loss; a key that is no trainable site is refused before any
    sampling (nothing written)."""
    config = _config(argon, "priors", SIGMA * 1.02, EPSILON * 0.95, epochs=2)
    start = SIGMA * 1.02
    rules = [ParameterRule("Atom/epsilon/Ar", frozen=True),
             ParameterRule("Atom/sigma/Ar", prior_width=0.001, lower=start - 1e-5,
                           upper=start + 1e-5)]
    result = fit(dataclasses.replace(config, parameters=rules), tmp_path / "out",
                 progress=False)
    for record in result.records:
        assert record["parameters_after"]["Atom/epsilon/Ar"] == EPSILON * 0.95
        assert record["gradient"]["Atom/epsilon/Ar"] == 0.0
        sigma = record["parameters_after"]["Atom/sigma/Ar"]
        assert start - 1e-5 - 1e-15 <= sigma <= start + 1e-5 + 1e-15
        assert record["prior_penalty"] >= 0.0
        assert record["loss"] >= record["prior_penalty"]
    assert result.records[-1]["prior_penalty"] > 0.0  # σ moved, so the prior costs something
    bad = dataclasses.replace(config, parameters=[ParameterRule("Atom/sigma/Kr", lower=0.1)])
    with pytest.raises(InputError, match="did you mean 'Atom/sigma/Ar'"):
        Trainer(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_fused_fit_equals_the_autograd_fit(argon, tmp_path):
    """simulation.fused = true: the same epoch as autograd, to round-off."""
    config = _config(argon, "fused", SIGMA * 1.02, EPSILON * 0.95, epochs=1)
    fused = dataclasses.replace(config, simulation=dataclasses.replace(config.simulation,
                                                                       fused=True))
    plain = fit(config, tmp_path / "plain", progress=False).records[0]
    fast = fit(fused, tmp_path / "fused", progress=False).records[0]
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-10)
    for key, value in plain["gradient"].items():
        assert fast["gradient"][key] == pytest.approx(value, rel=1e-8, abs=1e-12)


SYSTEMS_CONFIG = """
[forcefield]
files = ["{xml}"]

[simulation]
friction = 5.0
timestep = 0.004
platform = "Reference"
seed = 11

[schedule]
epochs = {epochs}
equilibration_steps = 100
bulk_steps = 50
windows = 1
window_steps = 10
snapshot_every = 5
learning_rate = 0.03

[[systems]]
name = "liquid"
temperature = [120.0, 130.0]
[systems.structure]
pdb = "argon.pdb"
[systems.system]
nonbonded_method = "CutoffPeriodic"
cutoff = 0.7
[[systems.targets]]
observable = "enthalpy_of_vaporization"
value = {dhvap}
temperature = 120.0
[[systems.targets]]
observable = "rdf"
atoms = ["AR", "AR"]
file = "rdf_ArAr.dat"
weight = 10.0

[[systems]]
name = "small"
temperature = [120.0]
[systems.structure]
pdb = "small.pdb"
[systems.system]
nonbonded_method = "CutoffPeriodic"
cutoff = 0.5
[[systems.targets]]
observable = "enthalpy_of_vaporization"
value = {dhvap}
"""


def _systems_config(argon, epochs: int):
    path, dhvap = argon
    xml = path / "systems.xml"
    xml.write_text(XML.format(sigma=SIGMA * 1.02, epsilon=EPSILON * 0.95))
    _write_pdb(path, "small.pdb", n_side=3, box=1.10)
    toml = path / f"systems{epochs}.toml"
    toml.write_text(SYSTEMS_CONFIG.format(xml=xml.name, epochs=epochs, dhvap=dhvap))
    return load_config(toml)


LABELS = ["liquid 120 K", "liquid 130 K", "small 120 K"]


def test_systems_and_state_points_in_one_fit(argon, tmp_path):
    """Two systems, one at two temperatures: every state point is a piece of its own (its
    sampling, its window), the epoch's loss and gradient are the sums of theirs (the same, bit
    for bit, as fitting each state point's config alone), each observable carries a standard
    error, and the CSV and trajectories are per state point."""
    config = _systems_config(argon, epochs=1)
    out = tmp_path / "all"
    (record,) = fit(config, out, progress=False).records
    assert list(record["state_points"]) == LABELS
    assert "state" not in record
    assert set(record["terms"]) == {"liquid 120 K/enthalpy_of_vaporization",
                                    "liquid 120 K/rdf_ARAR", "liquid 130 K/rdf_ARAR",
                                    "small 120 K/enthalpy_of_vaporization"}
    assert set(record["stderr"]) == set(record["observables"]) == set(record["terms"])
    for key, value in record["stderr"].items():
        assert value is not None and np.all(np.asarray(value) >= 0), key
    assert record["stderr"]["small 120 K/enthalpy_of_vaporization"] > 0
    assert record["loss"] == pytest.approx(sum(record["terms"].values()), rel=1e-12)
    assert [w["state_point"] for w in record["timings"]["windows"]] == LABELS
    # The small box is its own system: 27 atoms, its own trajectory directory.
    small = mdtraj_load(out, "small_120_K")
    assert small.n_atoms == 27
    assert mdtraj_load(out, "liquid_130_K").n_atoms == 64

    gradient = np.zeros(2)
    for point in config.state_points():
        (alone,) = fit(point.config, tmp_path / point.label.replace(" ", "_"),
                       progress=False).records
        part = record["state_points"][point.label]
        assert part["loss"] == alone["loss"]
        assert part["state"] == alone["state"]
        for name, value in alone["observables"].items():
            assert record["observables"][point.key(name)] == value
        gradient = gradient + np.array(list(alone["gradient"].values()))
    assert list(record["gradient"].values()) == gradient.tolist()

    header, *rows = list(csv.reader((out / "state_data.csv").read_text()[1:].splitlines()))
    assert header[:3] == ["Epoch", "State point", "Step"]
    assert [row[1] for row in rows] == LABELS
    values = dict(zip(header, rows[2], strict=True))
    assert float(values["enthalpy_of_vaporization (kJ/mol)"]) == \
        record["observables"]["small 120 K/enthalpy_of_vaporization"]
    assert values["Loss rdf_ARAR"] == ""  # the small box has no RDF target


def mdtraj_load(out, part: str):
    import mdtraj

    directory = out / "trajectory" / part
    return mdtraj.load(str(directory / "epoch_0001.dcd"), top=str(directory / "topology.pdb"))


def test_systems_fit_resumes_exactly(argon, tmp_path):
    """A fit of several state points killed after epoch 1 and resumed equals the uninterrupted
    one: the checkpoint holds every state point's state."""
    straight = fit(_systems_config(argon, epochs=2), tmp_path / "straight", progress=False)
    fit(_systems_config(argon, epochs=1), tmp_path / "split", progress=False)
    saved = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert [s["positions"].shape[0] for s in saved["state"]] == [64, 64, 27]
    resumed = fit(_systems_config(argon, epochs=2), tmp_path / "split", resume=True,
                  progress=False)
    untimed = [{k: v for k, v in r.items() if k != "timings"} for r in straight.records]
    assert [{k: v for k, v in r.items() if k != "timings"} for r in resumed.records] == untimed
    assert straight.parameters == resumed.parameters
    assert straight.parameters != resumed.records[0]["parameters"]  # the fit moved them


NPT_CONFIG = """
[forcefield]
files = ["{xml}"]
[simulation]
friction = 5.0
timestep = 0.004
platform = "CPU"
deterministic = true
barostat_interval = 2
seed = 11
[schedule]
epochs = 1
equilibration_steps = 0
bulk_steps = {bulk_steps}
window_steps = 10
snapshot_every = 5
[equilibration]
max_steps = {max_steps}
block_steps = 250
[[systems]]
name = "argon"
temperature = [120.0]
pressure = [400.0]
[systems.structure]
pdb = "loose.pdb"
[systems.system]
nonbonded_method = "CutoffPeriodic"
cutoff = 0.6
{targets}
"""
DHVAP_TARGET = """[[systems.targets]]
observable = "enthalpy_of_vaporization"
value = 5.0
"""


def _npt_config(argon, max_steps: int, bulk_steps: int = 50, targets: str = DHVAP_TARGET):
    """Argon at 120 K and 400 bar from a loose lattice (1.6 nm box: 0.94 g/cm^3; the dense
    fluid is near 1.28 g/cm^3)."""
    path, _ = argon
    _write_pdb(path, "loose.pdb", n_side=4, box=1.6)
    (path / "npt.xml").write_text(XML.format(sigma=SIGMA, epsilon=EPSILON))
    toml = path / "npt.toml"
    toml.write_text(NPT_CONFIG.format(xml="npt.xml", max_steps=max_steps, bulk_steps=bulk_steps,
                                      targets=targets))
    return load_config(toml)


def test_equilibration_runs_until_the_density_stops_drifting(argon, tmp_path):
    """[equilibration]: the loose box is compressed by the barostat until the slope of the
    last half of its block means is within twice its error; the log says how long it took,
    and the first epoch starts where it ended. With too small a step cap the log says it was
    still drifting."""
    (record,) = fit(_npt_config(argon, max_steps=20000,
                                targets=DHVAP_TARGET + DENSITY_TARGET), tmp_path / "eq",
                    progress=False).records
    info = record["equilibration"]["argon 120 K 400 bar"]
    assert info["converged"] and info["observable"] == "density"
    assert info["steps"] < 20000 and info["steps"] % 250 == 0 and info["seconds"] > 0
    means = info["block_means"]
    assert len(means) == info["steps"] // 250 >= 10
    assert means[-1] > 1.2 and means[-1] - means[0] > 0.05  # compressed from 0.94 g/cm^3
    assert abs(info["slope_per_block"]) <= 2.0 * info["slope_stderr"]
    state = record["state_points"]["argon 120 K 400 bar"]["state"]
    assert state["Step"] == info["steps"] + 50
    assert state["Density (g/mL)"] > 1.15
    # The density target: averaged over the NPT frames of the bulk sampling (every 10 steps
    # and the window's start), with its standard error, fitted (a loss term and a gradient).
    key = "argon 120 K 400 bar/density"
    assert 1.15 < record["observables"][key] < 1.5 and record["stderr"][key] > 0
    assert record["terms"][key] == pytest.approx(
        ((record["observables"][key] - 1.0) / 0.01) ** 2, rel=1e-12)
    assert record["loss"] == pytest.approx(sum(record["terms"].values()), rel=1e-12)
    assert record["timings"]["ensemble_s"] > 0 and record["gradient_norm"] > 0
    # A state point with only a density target runs no reversible window.
    (capped,) = fit(_npt_config(argon, max_steps=500, targets=DENSITY_TARGET),
                    tmp_path / "capped", progress=False).records
    info = capped["equilibration"]["argon 120 K 400 bar"]
    assert not info["converged"] and info["steps"] == 500 and info["slope_per_block"] is None
    assert capped["timings"]["windows"] == [] and list(capped["terms"]) == [key]
    assert capped["loss"] == capped["terms"][key] and capped["gradient_norm"] > 0


DENSITY_TARGET = """[[systems.targets]]
observable = "density"
value = 1.0
tolerance = 0.01
"""


def _npt_densities(config, model, scaled, steps: int, every: int = 20):
    """Plain OpenMM NPT at the scaled parameter values: the frames (SampledState) and the
    density of each (g/cm^3), after 5000 steps of equilibration."""
    from openmm_reversible.observables.density import G_CM3_PER_AMU_NM3
    from openmm_reversible.sampler import Sampler

    with torch.no_grad():
        model.parameters.scaled.copy_(torch.tensor(scaled, dtype=torch.float64))
    sampler = Sampler.from_config(config, model.parameters.create_system(), model.positions,
                                  model.topology)
    sampler.minimize()
    sampler.set_velocities(3)
    sampler.step(5000)
    frames = []
    for _ in range(steps // every):
        frames += sampler.step(every, {sampler.current_step() + every})
    mass = sum(39.948 for _ in range(model.topology.getNumAtoms()))
    densities = np.array([mass / abs(np.linalg.det(f.box)) * G_CM3_PER_AMU_NM3 for f in frames])
    return frames, densities


@pytest.mark.slow
def test_density_gradient_by_fluctuation_against_finite_differences(argon, tmp_path):
    """The NPT density target's gradient (fluctuation estimator on OpenMM's NPT frames, 64
    argon atoms at 120 K and 400 bar) agrees with central finite differences of long plain
    OpenMM NPT runs at σ and ε ± 5 %, within 3 combined standard errors (block averaging);
    both are well resolved (the test could fail), and the trainer's loss gradient is exactly
    the chain rule through the target's term."""
    from openmm_reversible.observables.blocking import block_average, block_slices
    from openmm_reversible.train import ensemble_terms, window_model

    config = _npt_config(argon, max_steps=0, targets=DENSITY_TARGET)
    point = config.state_points()[0].config
    model = window_model(point)
    frames, rho = _npt_densities(point, model, [1.0, 1.0], steps=6000)
    du = []
    for f in frames:
        energy = model.potential(torch.tensor(f.positions), torch.tensor(f.box))
        du.append(torch.autograd.grad(energy, [model.parameters.scaled])[0].numpy())
    du = np.array(du)
    beta = 1.0 / (KB * 120.0)

    def estimate(part):
        return -beta * ((rho[part, None] - rho[part].mean()) * du[part]).mean(0)

    blocks = np.array([estimate(b) for b in block_slices(len(rho), 5)])
    gradient, stderr = estimate(slice(None)), blocks.std(0, ddof=1) / np.sqrt(5)
    # The trainer's term on the first 30 frames: 100 (⟨ρ⟩ - 1)² / 0.01² chained exactly.
    result = ensemble_terms(model, frames[:30])
    mean = rho[:30].mean()
    assert result.observables["density"] == pytest.approx(mean, rel=1e-12)
    assert result.loss == pytest.approx(((mean - 1.0) / 0.01) ** 2, rel=1e-12)
    assert result.gradient.numpy() == pytest.approx(
        2 * (mean - 1.0) / 0.01 ** 2 * estimate(slice(0, 30)), rel=1e-9)
    for k, name in enumerate(("sigma", "epsilon")):
        up, down = [1.0, 1.0], [1.0, 1.0]
        up[k], down[k] = 1.05, 0.95
        (m_up, e_up), (m_down, e_down) = (
            block_average(_npt_densities(point, model, s, steps=20000)[1], 10) for s in
            (up, down))
        fd, fd_error = (m_up - m_down) / 0.1, math.hypot(e_up, e_down) / 0.1
        assert abs(fd) > 4 * fd_error and stderr[k] < abs(fd) / 3, (name, fd, fd_error,
                                                                    stderr[k])
        assert abs(gradient[k] - fd) < 3 * math.hypot(stderr[k], fd_error), (
            name, gradient[k], stderr[k], fd, fd_error)
    assert gradient[0] < 0 < gradient[1]  # larger atoms: less dense; more cohesion: denser


DIFFUSION_TARGET = """[[systems.targets]]
observable = "diffusion"
value = 2.0e-3
lag_range = [0.02, 0.06]
viscosity = 2.0e-4
"""
RESPONSE_TARGETS = """[[systems.targets]]
observable = "compressibility"
value = 2.0e-4
tolerance = 1e-4
[[systems.targets]]
observable = "thermal_expansion"
value = 3.0e-3
tolerance = 1e-3
[[systems.targets]]
observable = "heat_capacity"
value = 40.0
tolerance = 5.0
"""


def _window_start(model, steps: int = 400):
    """An OpenMM state of the model after ``steps`` steps from its minimised start."""
    from openmm_reversible.sampler import Sampler

    sampler = Sampler.from_config(model.config, model.parameters.create_system(),
                                  model.positions, model.topology)
    sampler.minimize()
    sampler.set_velocities(3)
    (state,) = sampler.step(steps, {steps})
    return state


def test_diffusion_target_gradient_through_the_reversible_window(argon):
    """A diffusion target is fitted through the windows: its reversible gradient equals
    central finite differences of the window's loss (same start state and noise), and the
    Yeh–Hummer term adds k_B T ξ / (6π η L) to the box's D."""
    from openmm_reversible.config import config_from_dict
    from openmm_reversible.train import WindowPiece, compute_window, window_model

    path, _ = argon
    (path / "diffusion.xml").write_text(XML.format(sigma=SIGMA, epsilon=EPSILON))
    target = {"observable": "diffusion", "value": 2.0e-3, "tolerance": 1e-4,
              "lag_range": [0.04, 0.08], "viscosity": 2.0e-4}
    data = {"forcefield": {"files": ["diffusion.xml"]}, "structure": {"pdb": "argon.pdb"},
            "system": {"nonbonded_method": "CutoffPeriodic", "cutoff": 0.7},
            "simulation": {"temperature": TEMPERATURE, "friction": 5.0, "timestep": 0.004,
                           "platform": "Reference", "seed": 11},
            "schedule": {"epochs": 1, "window_steps": 25, "snapshot_every": 5},
            "targets": [target]}
    model = window_model(config_from_dict(data, path))
    start = model.parameters.scaled.detach().clone()
    state = _window_start(model, 200)

    def window(scaled):
        return compute_window(model, WindowPiece(1, 0, 1, scaled, state, 5, "out"))

    result = window(start)
    d = result.observables["diffusion"]
    assert 1e-4 < d < 1e-1  # nm^2/ps, a fluid
    assert result.loss == pytest.approx(((d - 2.0e-3) / 1e-4) ** 2, rel=1e-12)
    assert result.blocks["diffusion"] == [pytest.approx(d, rel=1e-12)]  # one per window
    h = 1e-6
    for k in range(len(start)):
        up, down = start.clone(), start.clone()
        up[k] += h
        down[k] -= h
        fd = (window(up).loss - window(down).loss) / (2 * h)
        assert float(result.gradient[k]) == pytest.approx(fd, rel=1e-5), k
    assert abs(float(result.gradient[0])) > 0
    # Without the viscosity, D is that of the periodic box.
    data["targets"] = [{k: v for k, v in target.items() if k != "viscosity"}]
    plain = compute_window(window_model(config_from_dict(data, path)),
                           WindowPiece(1, 0, 1, start, state, 5, "out"))
    edge = float(np.linalg.det(state.box)) ** (1 / 3) * 1e-9  # m
    correction = 1.380649e-23 * TEMPERATURE * 2.837297 / (6 * math.pi * 2.0e-4 * edge) * 1e6
    assert d - plain.observables["diffusion"] == pytest.approx(correction, rel=1e-6)


def test_response_and_diffusion_targets_in_a_fit_and_its_validation(argon, tmp_path, capsys):
    """κ_T, α and C_p (ensemble targets on the NPT frames) and D (through the windows) in one
    fit: each a loss term with its observable and standard error in the log, the CSV and the
    plot; `validate` reports each against its target with a standard error."""
    from openmm_reversible.cli import main

    _npt_config(argon, max_steps=0)  # writes loose.pdb and npt.xml
    toml = argon[0] / "response.toml"
    toml.write_text(NPT_CONFIG.format(xml="npt.xml", max_steps=2000, bulk_steps=200,
                                      targets=RESPONSE_TARGETS + DIFFUSION_TARGET)
                    .replace("window_steps = 10", "window_steps = 20"))
    config = load_config(toml)
    out = tmp_path / "fit"
    (record,) = fit(config, out, progress=False).records
    prefix = "argon 120 K 400 bar/"
    names = ("compressibility", "thermal_expansion", "heat_capacity", "diffusion")
    assert set(record["terms"]) == {prefix + n for n in names}
    # 1/bar, 1/K, J/(mol K), nm^2/ps: plausible for dense argon over a short sampling
    for name, (low, high) in zip(names, ((1e-6, 1e-2), (-0.1, 0.1), (10.0, 200.0),
                                         (1e-4, 0.1)), strict=True):
        value = record["observables"][prefix + name]
        assert low < value < high, (name, value)
        stderr = record["stderr"][prefix + name]
        assert stderr is not None and stderr > 0 if name != "diffusion" else stderr is None
    assert record["loss"] == pytest.approx(sum(record["terms"].values()), rel=1e-12)
    assert record["gradient_norm"] > 0
    header = (out / "state_data.csv").read_text().splitlines()[0]
    assert "compressibility (1/bar)" in header and "heat_capacity (J/(mol K))" in header
    assert (out / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    xml = str(next(out.glob("*.xml")))
    assert main(["validate", xml, "--config", config.path, "--steps", "2000",
                 "--equilibration", "500", "--every", "20", "--platform", "Reference",
                 "--output", str(tmp_path / "validation"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "validation" / "validation.json").read_text())
    (point,) = report["state_points"]
    rows = {r["name"]: r for r in point["observables"]}
    for name in names:
        row = rows[name]
        assert row["target"] is not None and math.isfinite(row["value"]), name
        assert row["stderr"] > 0 and row["error"] == pytest.approx(row["value"] - row["target"])
    assert "compressibility" in capsys.readouterr().out


def test_validation_across_state_points(argon, tmp_path, capsys):
    """`validate` on a config with [[systems]]: a round trip and a table (values ± standard
    error) per state point, one report and one plot of each property against temperature."""
    from openmm_reversible.cli import main

    config = _systems_config(argon, epochs=1)
    xml = str(argon[0] / "systems.xml")
    assert main(["validate", xml, "--config", config.path, "--steps", "400",
                 "--equilibration", "100", "--every", "20", "--platform", "Reference",
                 "--output", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert [line[:-1] for line in out.splitlines() if line.endswith(" K:")] == LABELS
    assert out.count("round trip") == 3
    report = json.loads((tmp_path / "validation.json").read_text())
    points = report["state_points"]
    assert [(p["system"], p["temperature"], p["pressure"]) for p in points] == [
        ("liquid", 120.0, None), ("liquid", 130.0, None), ("small", 120.0, None)]
    rows = {p["label"]: {r["name"]: r for r in p["observables"]} for p in points}
    hvap = rows["small 120 K"]["enthalpy_of_vaporization"]
    assert hvap["target"] == pytest.approx(argon[1]) and hvap["stderr"] > 0
    assert "enthalpy_of_vaporization" not in rows["liquid 130 K"]  # selected at 120 K only
    assert (tmp_path / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
