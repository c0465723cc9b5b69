"""Diamond from scratch, CPU-sized: a crystal system of the config (64 atoms, 2×2×2 cells,
298 K, γ 4/ps, Δt 0.5 fs) whose Stillinger–Weber prior + SchNet model the one trainer fits
through reversible windows to zero stress and the elastic constants of diamond, then exports
into OpenMM; and the `fit` command on the shipped example at a tiny size.

The training run is shared by the tests (module fixture); the full 1000-atom version is
examples/diamond/diamond.toml.
"""

import json
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from openmm_reversible_plugin import create_force, write_forcefield

from openmm_reversible.cli import main
from openmm_reversible.commands import with_epochs
from openmm_reversible.config import config_from_dict, load_config
from openmm_reversible.crystal import (
    EVALUATION_FILE,
    EXPORT_FILE,
    MODEL_FILE,
    CrystalTrainer,
    ElasticObjective,
    build_models,
    evaluate_elastic,
)
from openmm_reversible.errors import InputError
from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.ml import (
    BehlerParrinello,
    EnergySum,
    MLPotential,
    SchNet,
    StillingerWeber,
    diamond_lattice,
    diamond_topology,
)
from openmm_reversible.train import Trainer, read_log

CARBON = 12.011
LABEL = "diamond 298 K"
SETTINGS = dict(equilibration_steps=200, epochs=4, window_steps=40, snapshot_every=4,
                learning_rate=1e-2, prior_learning_rate=3e-3, seed=5)
TINY = dict(SETTINGS, equilibration_steps=20, window_steps=8)
TARGETS = [{"observable": "stress", "value": 0.0, "tolerance": 10.0},
           {"observable": "C11", "value": 1079.0}, {"observable": "C12", "value": 124.0},
           {"observable": "C44", "value": 578.0}]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "diamond"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: one thread is fastest, and avoids oversubscribing a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config_data(schedule=SETTINGS, **changes) -> dict:
    """A 64-atom diamond fit as a parsed TOML document: SW prior + a small SchNet."""
    data = {
        "systems": [{"name": "diamond", "kind": "crystal", "temperature": [298.0],
                     "crystal": {"n_cells": 2, "lattice_constant": 0.3567, "mass": CARBON,
                                 "equilibration_steps": schedule["equilibration_steps"]},
                     "targets": [dict(t) for t in TARGETS]}],
        "prior": {"kind": "stillinger_weber", "search_cutoff": 0.30,
                  "learning_rate": schedule["prior_learning_rate"]},
        "model": {"kind": "schnet", "n_features": 8, "n_rbf": 6, "n_interactions": 1,
                  "seed": 2, "learning_rate": schedule["learning_rate"]},
        "simulation": {"friction": 4.0, "timestep": 0.0005, "seed": schedule["seed"]},
        "schedule": {"epochs": schedule["epochs"], "equilibration_steps": 0, "bulk_steps": 0,
                     "window_steps": schedule["window_steps"],
                     "snapshot_every": schedule["snapshot_every"]},
    }
    for key, value in changes.items():
        data[key] = value
    return data


def run(output, epochs, resume=False, schedule=SETTINGS, **changes):
    config = with_epochs(config_from_dict(config_data(schedule, **changes)), epochs)
    trainer = CrystalTrainer(config, output, resume=resume, progress=False)
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("diamond")
    trainer, result = run(output, SETTINGS["epochs"])
    return trainer, result, output


def test_training_reduces_the_loss(trained):
    trainer, result, output = trained
    history = result.records
    losses = [r["loss"] for r in history]
    assert len(losses) == SETTINGS["epochs"]
    assert all(np.isfinite(losses))
    # Start: SW at a = 0.3567 nm is ~19 GPa in compression and far from the targets.
    first, last = history[0], history[-1]
    assert first["observables"][f"{LABEL}/stress"][0] < -10.0
    assert last["loss"] < 0.6 * first["loss"]
    assert last["terms"][f"{LABEL}/stress"] < 0.2 * first["terms"][f"{LABEL}/stress"]
    # The window's temperature is the bath's (64 atoms, 10 correlated snapshots: ±20 %).
    assert all(200.0 < r["state_points"][LABEL]["temperature_K"] < 400.0 for r in history)
    # Reversal in float64 over 40 steps reconstructs the forward states to round-off.
    assert max(r["reconstruction_error"] for r in history) < 1e-9
    assert read_log(output / "log.jsonl") == json.loads(json.dumps(history))
    assert trainer.legs[0].state.step == SETTINGS["equilibration_steps"] \
        + 4 * SETTINGS["window_steps"]
    # Each observable has a standard error from blocks of the window's snapshots.
    assert len(last["stderr"][f"{LABEL}/stress"]) == 6
    assert last["stderr"][f"{LABEL}/C44"] > 0
    assert (output / "training.png").stat().st_size > 0


def test_prior_and_model_parameters_are_trained(trained):
    trainer, result, _ = trained
    prior, model = trainer.model
    assert not torch.allclose(prior.scales, torch.ones(7, dtype=torch.float64))
    fresh_model = SchNet(n_features=8, n_rbf=6, n_interactions=1, seed=2)
    assert float(model.readout[1].weight.detach().abs().max()) > 0.0  # starts at zero
    assert not torch.equal(model.embedding.weight, fresh_model.embedding.weight)
    assert result.parameters["sigma"] == pytest.approx(prior.parameter_dict()["sigma"])


def _openmm_energy_forces(system, positions, box):
    integrator = openmm.VerletIntegrator(0.0005)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def _torch_energy_forces(model, positions, box):
    x = torch.tensor(positions, requires_grad=True)
    energy = model(x, torch.tensor(box))
    (gradient,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -gradient.numpy()


def test_exported_force_reproduces_trained_energy(trained):
    trainer, _, output = trained
    x = trainer.legs[0].state.positions
    box = diamond_lattice(2)[1]
    reference_energy, reference_forces = _torch_energy_forces(trainer.model, x, box)
    loaded = torch.jit.load(str(output / MODEL_FILE))
    system = openmm.System()
    for _ in range(len(x)):
        system.addParticle(CARBON)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    system.addForce(create_force(loaded))
    energy, forces = _openmm_energy_forces(system, x, box)
    assert energy == pytest.approx(reference_energy, rel=1e-10)
    np.testing.assert_allclose(forces, reference_forces, rtol=1e-8, atol=1e-8)

    path = output / "diamond.xml"
    write_forcefield(str(path), trainer.model, {"C": ("C", CARBON, 0)})
    topology = diamond_topology(len(x), box)
    system = app.ForceField(str(path)).createSystem(topology, nonbondedMethod=app.CutoffPeriodic)
    energy, forces = _openmm_energy_forces(system, x, box)
    assert energy == pytest.approx(reference_energy, rel=1e-10)
    np.testing.assert_allclose(forces, reference_forces, rtol=1e-8, atol=1e-8)


def test_resume_continues_the_run(tmp_path):
    straight, done = run(tmp_path / "straight", 2, schedule=TINY)
    run(tmp_path / "split", 1, schedule=TINY)
    with pytest.raises(InputError, match="already holds a fit .*pass --resume"):
        run(tmp_path / "split", 2, schedule=TINY)
    resumed, again = run(tmp_path / "split", 2, resume=True, schedule=TINY)
    assert len(again.records) == 2
    assert resumed.legs[0].state.step == straight.legs[0].state.step
    for a, b in zip(again.records, done.records, strict=True):
        assert a["loss"] == b["loss"]
        assert a["parameters_after"] == b["parameters_after"]
    np.testing.assert_array_equal(resumed.legs[0].state.positions,
                                  straight.legs[0].state.positions)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # As for every fit, only schedule.epochs (and [output]) may change on resume.
    with pytest.raises(InputError, match=r"differs from the checkpoint's in simulation\.seed"):
        run(tmp_path / "split", 3, resume=True, schedule=dict(TINY, seed=6))
    with pytest.raises(InputError, match=r"in schedule\.window_steps"):
        run(tmp_path / "split", 3, resume=True, schedule=dict(TINY, window_steps=12))


def _small_behler_parrinello():
    model = BehlerParrinello(n_radial=4, zetas=(1.0, 4.0), angular_widths=(0.15,), hidden=(8,),
                             seed=2)
    model.standardize(*diamond_lattice(2))
    return model


@pytest.mark.parametrize("kind", ["schnet", "behler_parrinello"])
def test_elastic_loss_gradient_matches_backprop_through_time(kind):
    """The loss reaches the parameters directly (Born term) and through the frames; the
    reversible gradient of both equals backprop-through-time."""
    config = config_from_dict(config_data())
    model, prior = build_models(config)
    if kind == "behler_parrinello":
        model = _small_behler_parrinello()
    last = model.readout[1] if kind == "schnet" else model.networks[0].output
    with torch.no_grad():  # a non-zero network, so that its weights get gradients everywhere
        last.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    x, box = diamond_lattice(2)
    potential = MLPotential(EnergySum([prior, model]), masses=np.full(64, CARBON))
    v = 3.0 * torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for mode in ("reversible", "bptt"):
        potential.zero_grad()
        sim = ReversibleSimulation(potential, LangevinMiddleIntegrator(0.0005, 4.0, 298.0, 11),
                                   n_steps=6, snapshot_every=3, mode=mode,
                                   loss_fn=ElasticObjective(config.crystals[0].targets))
        sim(torch.tensor(x), v, torch.tensor(box)).backward()
        grads[mode] = torch.cat([torch.zeros_like(p).flatten() if p.grad is None
                                 else p.grad.flatten() for p in potential.parameters()])
    reference = grads["bptt"]
    assert float(reference.norm()) > 0
    assert float((grads["reversible"] - reference).norm() / reference.norm()) < 1e-8


def test_crystal_targets_weigh_like_the_relative_loss():
    """Default tolerances: the constants' own values (relative errors), 10 GPa of stress."""
    targets = config_from_dict(config_data()).crystals[0].targets
    assert [t.scale for t in targets] == [10.0, 1079.0, 124.0, 578.0]
    objective = ElasticObjective(targets)
    total, report = objective.loss.evaluate({
        "stress": torch.full((6,), 2.0, dtype=torch.float64),
        "C11": torch.tensor(1079.0 * 1.1, dtype=torch.float64),
        "C12": torch.tensor(124.0, dtype=torch.float64),
        "C44": torch.tensor(578.0 * 0.8, dtype=torch.float64)})
    assert float(total) == pytest.approx(0.01 * 4.0 + 0.1 ** 2 + 0.2 ** 2, rel=1e-12)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["systems"][0]["crystal"].update(cells=2),
     r"systems\[0\]\.crystal\.cells: unknown key; did you mean 'n_cells'\?"),
    (lambda d: d["systems"][0]["crystal"].pop("lattice_constant"),
     r"systems\[0\]\.crystal\.lattice_constant: required key is missing"),
    (lambda d: d["systems"][0]["crystal"].update(element="Xx"),
     r"systems\[0\]\.crystal\.element = 'Xx': not an element symbol"),
    (lambda d: d["systems"][0]["targets"][1].pop("value"),
     r"systems\[0\]\.targets\[1\]\.value: a C11 target needs a value in GPa"),
    (lambda d: d["systems"][0]["targets"][2].update(value=0.0),
     r"systems\[0\]\.targets\[2\]: value = 0 and no tolerance"),
    (lambda d: d["systems"][0]["targets"][0].update(observable="C13"),
     r"systems\[0\]\.targets\[0\]\.observable = 'C13': must be one of stress, C11, C12, C44"),
    (lambda d: d["systems"][0].update(kind="liquid"),
     r"systems\[0\]\.kind = 'liquid': must be \"crystal\""),
    (lambda d: d["model"].update(kind="mace"),
     r"model\.kind = 'mace': must be one of behler_parrinello, schnet"),
    (lambda d: d["model"].update(n_feature=8),
     r"model\.n_feature: unknown key; did you mean 'n_features'\?"),
    (lambda d: d["prior"].update(sigma=-1.0), r"prior: StillingerWeber\(.*\) refuses"),
    (lambda d: d.update(forcefield={"files": ["x.xml"]}),
     r"forcefield: not used with crystal systems"),
    (lambda d: d["simulation"].update(temperature=300.0),
     r"simulation\.temperature: each crystal system lists its temperatures"),
    (lambda d: d["simulation"].update(platform="CPU"),
     r"simulation\.platform: crystal systems run in torch"),
    (lambda d: d["schedule"].update(replicas=2), r"schedule\.replicas: independent chains"),
    (lambda d: d.update(evaluation={"blocks": 1}), r"evaluation\.blocks = 1: must be >= 2"),
    (lambda d: d.update(evaluation={"steps": 60, "snapshot_every": 20}),
     r"evaluation\.steps = 60: 3 snapshots \(every 20 steps\) cannot fill 5 blocks"),
])
def test_bad_crystal_config_names_the_key(change, message):
    data = config_data()
    change(data)
    with pytest.raises(InputError, match=message):
        config_from_dict(data)


def test_the_forcefield_trainer_points_to_the_crystal_trainer(tmp_path):
    with pytest.raises(InputError, match=r"systems are crystals .*CrystalTrainer"):
        Trainer(config_from_dict(config_data()), tmp_path / "out")


def test_crystal_tables_need_crystal_systems():
    with pytest.raises(InputError, match=r"model: only a fit of crystal systems takes \[model\]"):
        config_from_dict({"model": {"kind": "schnet"}})


def test_bad_crystal_config_exits_2(tmp_path, capsys):
    text = (EXAMPLE / "diamond_cpu.toml").read_text().replace("n_cells = 2", "n_cells = -2")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["fit", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "systems[0].crystal.n_cells = -2: must be > 0" in err
    assert not (tmp_path / "out").exists()


def test_evaluation_run_reports_constants_with_errors(trained):
    trainer, _, _ = trained
    leg = trainer.legs[0]
    args = (trainer.model, leg.state.positions, leg.state.velocities, leg.box, leg.masses)
    dynamics = dict(temperature=298.0, friction=4.0, timestep=0.0005, seed=5)
    report = evaluate_elastic(*args, **dynamics, steps=16, snapshot_every=2, blocks=2, chunk=3,
                              progress=False)
    # Born terms evaluated in other pieces: the same numbers.
    again = evaluate_elastic(*args, **dynamics, steps=16, snapshot_every=2, blocks=2, chunk=100,
                             progress=False)
    for key in ("C11_GPa", "C12_GPa", "C44_GPa", "C44_stderr_GPa", "stress_GPa"):
        np.testing.assert_allclose(report[key], again[key], rtol=1e-10)
    assert report["n_snapshots"] == 8 and len(report["stress_GPa"]) == 6
    assert all(np.isfinite(report[f"{k}_stderr_GPa"]) and report[f"{k}_stderr_GPa"] >= 0
               for k in ("C11", "C12", "C44"))
    assert 100 < report["temperature_K"] < 600
    with pytest.raises(InputError, match="at least 2 blocks"):
        evaluate_elastic(*args, **dynamics, steps=4, snapshot_every=2, blocks=2,
                         progress=False)


@pytest.mark.parametrize("name", ["diamond.toml", "diamond_cpu.toml"])
def test_example_configurations_build(name):
    """The shipped configurations parse and build their prior, model, schedule and targets."""
    config = load_config(EXAMPLE / name)
    small = config.crystals[0].crystal.n_cells == 2
    model, prior = build_models(config)
    assert isinstance(model, BehlerParrinello) and model.n_features == 20
    assert float(model.shift.abs().min()) > 0  # standardized on the crystal (shift 0 before)
    assert isinstance(prior, StillingerWeber)
    assert config.model.device == ("cuda" if name == "diamond.toml" else "cpu")
    assert small == (name == "diamond_cpu.toml")
    c44 = [t for t in config.crystals[0].targets if t.observable == "C44"]
    assert c44[0].value == 578.0 and c44[0].scale == 578.0


def test_unknown_model_kind_is_refused(tmp_path):
    text = (EXAMPLE / "diamond_cpu.toml").read_text().replace('kind = "behler_parrinello"',
                                                             'kind = "mace"')
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=r"model\.kind = 'mace': must be one of"):
        load_config(path)


def test_fit_command_trains_evaluates_and_exports(tmp_path, capsys):
    """`openmm-reversible fit examples/diamond/diamond_cpu.toml`, shrunk to a tiny size: two
    epochs, the evaluation run, the exported force field checked in OpenMM; then resumed."""
    text = (EXAMPLE / "diamond_cpu.toml").read_text()
    for old, new in (("equilibration_steps = 4000", "equilibration_steps = 20"),
                     ("bulk_steps = 100", "bulk_steps = 4"),
                     ("window_steps = 200", "window_steps = 8"),
                     ("snapshot_every = 10 ", "snapshot_every = 2 "),
                     ("steps = 10000", "steps = 16"), ("snapshot_every = 20", "snapshot_every = 2"),
                     ("blocks = 5 ", "blocks = 2 "), ("n_radial = 8", "n_radial = 4"),
                     ("zetas = [1.0, 2.0, 4.0]", "zetas = [1.0]"),
                     ("angular_widths = [0.1, 0.2]", "angular_widths = [0.15]"),
                     ("hidden = [32, 32]", "hidden = [4]")):
        assert old in text
        text = text.replace(old, new, 1)
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    output = tmp_path / "out"
    assert main(["fit", str(path), "--output", str(output), "--epochs", "2",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "evaluation of diamond 298 K (8 snapshots of 16 steps)" in printed
    for name in ("checkpoint.pt", "log.jsonl", "training.png", MODEL_FILE, "forcefield.xml",
                 "system.xml", EVALUATION_FILE, EXPORT_FILE):
        assert (output / name).is_file(), name
    export = json.loads((output / EXPORT_FILE).read_text())
    assert export["energies"][LABEL]["relative_difference"] < 1e-10
    assert set(json.loads((output / EVALUATION_FILE).read_text())[LABEL]) >= {
        "C11_GPa", "C11_stderr_GPa", "stress_GPa"}
    assert len(read_log(output / "log.jsonl")) == 2
    assert main(["fit", str(path), "--output", str(output), "--epochs", "3", "--resume",
                 "--no-progress"]) == 0
    assert [r["epoch"] for r in read_log(output / "log.jsonl")] == [1, 2, 3]
