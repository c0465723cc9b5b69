"""Diamond from scratch, CPU-sized: Stillinger–Weber prior + SchNet trained through reversible
windows to zero stress and the elastic constants of diamond (64 atoms, 2×2×2 cells, 298 K,
γ 4/ps, Δt 0.5 fs), then exported into OpenMM.

The training run is shared by the tests (module fixture); the full 1000-atom version is
examples/diamond/.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from openmm_reversible_plugin import create_force, write_forcefield

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
from openmm_reversible.train import read_log
from openmm_reversible.train_elastic import (
    MODEL_FILE,
    ElasticTargets,
    ElasticTrainingSettings,
    cubic_elastic_observables,
    evaluate_elastic,
    train_elastic,
)

CARBON = 12.011
SETTINGS = dict(equilibration_steps=200, epochs=4, window_steps=40, snapshot_every=4,
                learning_rate=1e-2, prior_learning_rate=3e-3, seed=5)
TINY = dict(SETTINGS, equilibration_steps=20, window_steps=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small tensors: one thread is fastest, and avoids oversubscribing a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_models():
    return (SchNet(n_features=8, n_rbf=6, n_interactions=1, seed=2),
            StillingerWeber(search_cutoff=0.30))


def crystal():
    x, box = diamond_lattice(2)
    return x, box, np.full(len(x), CARBON)


def run(output, epochs, resume=False, schedule=SETTINGS):
    model, prior = small_models()
    settings = ElasticTrainingSettings(**{**schedule, "epochs": epochs})
    return train_elastic(model, *crystal(), prior=prior, settings=settings, output=output,
                         resume=resume)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("diamond")
    return run(output, SETTINGS["epochs"]), output


def test_training_reduces_the_loss(trained):
    result, output = trained
    losses = [r["loss"] for r in result.history]
    assert len(losses) == SETTINGS["epochs"]
    assert all(np.isfinite(losses))
    # Start: SW at a = 0.3567 nm is ~19 GPa in compression and far from the targets.
    first, last = result.history[0], result.history[-1]
    assert first["stress_GPa"][0] < -10.0
    assert last["loss"] < 0.6 * first["loss"]
    assert last["terms"]["stress"] < 0.2 * first["terms"]["stress"]
    # The window's temperature is the bath's (64 atoms, 10 correlated snapshots: ±20 %).
    assert all(200.0 < r["temperature_K"] < 400.0 for r in result.history)
    # Reversal in float64 over 40 steps reconstructs the forward states to round-off.
    assert max(r["reconstruction_error_nm"] for r in result.history) < 1e-9
    assert read_log(output / "log.jsonl") == json.loads(json.dumps(result.history))
    assert result.step == SETTINGS["equilibration_steps"] + 4 * SETTINGS["window_steps"]


def test_prior_and_model_parameters_are_trained(trained):
    result, _ = trained
    prior, model = result.model
    assert not torch.allclose(prior.scales, torch.ones(7, dtype=torch.float64))
    fresh_model, _ = small_models()
    assert float(model.readout[1].weight.detach().abs().max()) > 0.0  # starts at zero
    assert not torch.equal(model.embedding.weight, fresh_model.embedding.weight)


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
    result, output = trained
    x = result.positions.numpy()
    box = diamond_lattice(2)[1]
    reference_energy, reference_forces = _torch_energy_forces(result.model, x, box)
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
    write_forcefield(str(path), result.model, {"C": ("C", CARBON, 0)})
    topology = diamond_topology(len(x), box)
    system = app.ForceField(str(path)).createSystem(topology, nonbondedMethod=app.CutoffPeriodic)
    energy, forces = _openmm_energy_forces(system, x, box)
    assert energy == pytest.approx(reference_energy, rel=1e-10)
    np.testing.assert_allclose(forces, reference_forces, rtol=1e-8, atol=1e-8)


def test_resume_continues_the_run(tmp_path):
    straight = run(tmp_path / "straight", 2, schedule=TINY)
    run(tmp_path / "split", 1, schedule=TINY)
    with pytest.raises(InputError, match="resume=True"):
        run(tmp_path / "split", 2, schedule=TINY)
    resumed = run(tmp_path / "split", 2, resume=True, schedule=TINY)
    assert len(resumed.history) == 2
    assert resumed.step == straight.step
    for a, b in zip(resumed.history, straight.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    torch.testing.assert_close(resumed.positions, straight.positions, rtol=0, atol=1e-12)
    with pytest.raises(InputError, match=r"other settings or targets \(changed: \['seed'\]"):
        run(tmp_path / "split", 3, resume=True, schedule=dict(TINY, seed=6))
    # The schedule and the step sizes may change on resume; the run goes on from the saved state.
    longer = run(tmp_path / "split", 3, resume=True,
                 schedule=dict(TINY, window_steps=12, learning_rate=2e-3))
    assert longer.step == straight.step + 12  # no decorrelation steps in TINY
    assert longer.history[:2] == resumed.history
    saved = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert [g["lr"] for g in saved["optimizer"]["param_groups"]] == [
        TINY["prior_learning_rate"], 2e-3]
    assert saved["settings"]["window_steps"] == 12


def _small_behler_parrinello():
    model = BehlerParrinello(n_radial=4, zetas=(1.0, 4.0), angular_widths=(0.15,), hidden=(8,),
                             seed=2)
    model.standardize(*diamond_lattice(2))
    return model


@pytest.mark.parametrize("kind", ["schnet", "behler_parrinello"])
def test_elastic_loss_gradient_matches_backprop_through_time(kind):
    """The loss reaches the parameters directly (Born term) and through the frames; the
    reversible gradient of both equals backprop-through-time."""
    model, prior = small_models()
    if kind == "behler_parrinello":
        model = _small_behler_parrinello()
    last = model.readout[1] if kind == "schnet" else model.networks[0].output
    with torch.no_grad():  # a non-zero network, so that its weights get gradients everywhere
        last.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    x, box, masses = crystal()
    potential = MLPotential(EnergySum([prior, model]), masses=masses)
    v = 3.0 * torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss_fn = ElasticTargets().loss()
    grads = {}
    for mode in ("reversible", "bptt"):
        potential.zero_grad()
        sim = ReversibleSimulation(potential, LangevinMiddleIntegrator(0.0005, 4.0, 298.0, 11),
                                   n_steps=6, snapshot_every=3, mode=mode,
                                   loss_fn=lambda t, p: loss_fn(cubic_elastic_observables(t, p)))
        sim(torch.tensor(x), v, torch.tensor(box)).backward()
        grads[mode] = torch.cat([torch.zeros_like(p).flatten() if p.grad is None
                                 else p.grad.flatten() for p in potential.parameters()])
    reference = grads["bptt"]
    assert float(reference.norm()) > 0
    assert float((grads["reversible"] - reference).norm() / reference.norm()) < 1e-8


def test_settings_and_targets_from_mapping_name_bad_keys():
    settings = ElasticTrainingSettings.from_mapping({"epochs": 3, "device": "cpu"})
    assert settings.epochs == 3 and settings.timestep == 0.0005
    with pytest.raises(InputError, match=r"\[training\] has unknown keys \['epoch'\]"):
        ElasticTrainingSettings.from_mapping({"epoch": 3})
    with pytest.raises(InputError, match="fewer than 2 snapshots"):
        ElasticTrainingSettings(window_steps=10, snapshot_every=10)
    with pytest.raises(InputError, match="target c12 must be a finite, non-zero"):
        ElasticTargets.from_mapping({"c12": 0.0})
    assert ElasticTargets.from_mapping({"c11": 500.0}).c44 == 578.0


def test_evaluation_run_reports_constants_with_errors(trained):
    result, _ = trained
    x, box, masses = crystal()
    settings = ElasticTrainingSettings(**TINY)
    args = (result.model, result.positions, result.velocities, box, masses, settings)
    report = evaluate_elastic(*args, steps=16, snapshot_every=2, blocks=2, chunk=3,
                              start_step=result.step, progress=False)
    # Born terms evaluated in other pieces: the same numbers.
    again = evaluate_elastic(*args, steps=16, snapshot_every=2, blocks=2, chunk=100,
                             start_step=result.step, progress=False)
    for key in ("C11_GPa", "C12_GPa", "C44_GPa", "C44_stderr_GPa", "stress_GPa"):
        np.testing.assert_allclose(report[key], again[key], rtol=1e-10)
    assert report["n_snapshots"] == 8 and len(report["stress_GPa"]) == 6
    assert all(np.isfinite(report[f"{k}_stderr_GPa"]) and report[f"{k}_stderr_GPa"] >= 0
               for k in ("C11", "C12", "C44"))
    assert 100 < report["temperature_K"] < 600
    with pytest.raises(InputError, match="at least 2 blocks"):
        evaluate_elastic(*args, steps=4, snapshot_every=2, blocks=2, progress=False)


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "diamond"


def _example_script():
    """examples/diamond/train_diamond.py as a module."""
    spec = importlib.util.spec_from_file_location("train_diamond", EXAMPLE / "train_diamond.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("name", ["diamond.toml", "diamond_cpu.toml"])
def test_example_configurations_build(name):
    """The shipped configurations parse and build their prior, model, settings and targets."""
    script = _example_script()
    config = script.load_config(EXAMPLE / name, script.parse_arguments([str(EXAMPLE / name)]))
    x, box = diamond_lattice(2)
    model = script.build_model(config["model"], x, box)
    assert isinstance(model, BehlerParrinello) and model.n_features == 20
    assert float(model.shift.abs().min()) > 0  # standardized on the crystal (shift 0 before)
    StillingerWeber(**config["prior"])
    settings = ElasticTrainingSettings.from_mapping(config["training"])
    assert settings.device == ("cuda" if name == "diamond.toml" else "cpu")
    assert ElasticTargets.from_mapping(config["targets"]).c44 == 578.0


def test_unknown_model_kind_is_refused(tmp_path):
    script = _example_script()
    text = (EXAMPLE / "diamond_cpu.toml").read_text().replace('kind = "behler_parrinello"',
                                                             'kind = "mace"')
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=r"\[model\] kind 'mace' is not one of"):
        script.load_config(path, script.parse_arguments([str(path)]))
