"""Export of learned potentials into plain OpenMM: TorchForce / PythonForce, System XML,
the <TorchPotential> ForceField tag, a stable OpenMM simulation, and the twin of TorchForce."""

import numpy as np
import openmm
import openmm_reversible_plugin as plugin
import pytest
import torch
from openmm import app, unit

from openmm_reversible.ml import (
    BehlerParrinello,
    EnergySum,
    SchNet,
    StillingerWeber,
    diamond_lattice,
    diamond_topology,
)
from openmm_reversible.potential import build_term
from openmm_reversible.potential.torchforce import concrete_force, deserialize_system

PLATFORMS = ["Reference", "CPU"]
BACKENDS = ["torchforce", "pythonforce"] if plugin.openmmtorch_available() else ["pythonforce"]
KJ, KJ_NM = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer


@pytest.fixture(scope="module")
def model():
    schnet = SchNet(n_features=16, n_rbf=8, seed=2)
    with torch.no_grad():
        schnet.readout[1].weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    return EnergySum([StillingerWeber(), schnet])


@pytest.fixture(scope="module")
def behler_parrinello_model():
    network = BehlerParrinello(hidden=(16,), seed=3)
    network.standardize(*diamond_lattice(2))
    with torch.no_grad():
        network.networks[0].output.weight.normal_(0.0, 0.3,
                                                  generator=torch.Generator().manual_seed(3))
    return EnergySum([StillingerWeber(), network])


@pytest.fixture(scope="module")
def crystal():
    x, box = diamond_lattice(2)
    return x + 0.004 * np.random.default_rng(5).standard_normal(x.shape), box


def reference(model, x, box):
    xt = torch.tensor(x, requires_grad=True)
    energy = model(xt, torch.tensor(box))
    return float(energy.detach()), -torch.autograd.grad(energy, xt)[0].numpy()


def carbon_system(force, box, n_atoms=64):
    system = openmm.System()
    for _ in range(n_atoms):
        system.addParticle(12.011)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in box])
    system.addForce(force)
    return system


def evaluate(system, x, platform):
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.0005),
                         openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(x)
    state = ctx.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(KJ),
            state.getForces(asNumpy=True).value_in_unit(KJ_NM))


def assert_matches(openmm_result, torch_result):
    (eo, fo), (et, ft) = openmm_result, torch_result
    assert eo == pytest.approx(et, rel=1e-6)
    assert np.sqrt(np.mean((fo - ft) ** 2)) / np.sqrt(np.mean(ft ** 2)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_force_matches_torch_model_after_xml_round_trip(model, crystal, backend, platform):
    x, box = crystal
    system = carbon_system(plugin.create_force(model, backend=backend), box)
    # The serialized System carries the model: rebuilt from the XML text alone.
    restored = deserialize_system(openmm.XmlSerializer.serialize(system))
    assert_matches(evaluate(restored, x, platform), reference(model, x, box))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_behler_parrinello_force_matches_torch_model(behler_parrinello_model, crystal, backend,
                                                     platform):
    x, box = crystal
    force = plugin.create_force(behler_parrinello_model, backend=backend)
    system = deserialize_system(openmm.XmlSerializer.serialize(carbon_system(force, box)))
    assert_matches(evaluate(system, x, platform), reference(behler_parrinello_model, x, box))


def test_auto_backend_prefers_torchforce(model):
    force = plugin.create_force(model)
    assert (type(force).__name__ == "TorchForce") == plugin.openmmtorch_available()


def test_unscriptable_model_is_reported():
    class Numpy(torch.nn.Module):
        def forward(self, positions, box):
            return torch.tensor(np.sum(positions.detach().numpy()))

    with pytest.raises(ValueError, match="cannot be compiled with torch.jit.script"):
        plugin.create_force(Numpy())


@pytest.mark.parametrize("embed", [True, False])
def test_forcefield_tag_creates_system_with_learned_model(model, crystal, tmp_path,
                                                          monkeypatch, embed):
    x, box = crystal
    path = str(tmp_path / "trained.xml")
    plugin.write_forcefield(path, model, {"C": ("diamond-C", 12.011, 0)})
    if not embed:
        # The same model as a separate TorchScript file, referenced by file=.
        torch.jit.script(model).save(str(tmp_path / "model.pt"))
        text = open(path).read()
        start, end = text.index("<TorchPotential"), text.index("</TorchPotential>")
        tag = ('<TorchPotential file="model.pt" periodic="true">'
               '<Type type="diamond-C" index="0"/>')
        open(path, "w").write(text[:start] + tag + text[end:])
        monkeypatch.chdir(tmp_path)
    topology = diamond_topology(64, box)
    system = app.ForceField(path).createSystem(topology)
    assert system.getParticleMass(0).value_in_unit(unit.dalton) == pytest.approx(12.011)
    assert_matches(evaluate(system, x, "Reference"), reference(model, x, box))


def test_forcefield_tag_names_unmapped_atom_type(model, tmp_path):
    path = str(tmp_path / "trained.xml")
    plugin.write_forcefield(path, model, {"C": ("diamond-C", 12.011, 0)})
    text = open(path).read().replace('<Type type="diamond-C" index="0" />',
                                     '<Type type="other" index="0" />')
    open(path, "w").write(text)
    _, box = diamond_lattice(2)
    with pytest.raises(ValueError, match="atom type 'diamond-C', which <TorchPotential> does not"):
        app.ForceField(path).createSystem(diamond_topology(64, box))


def test_plain_openmm_simulation_is_stable(model, crystal):
    """298 K, γ 4/ps, Δt 0.5 fs: 100 steps stay near the lattice at a sensible temperature."""
    x, box = crystal
    system = carbon_system(plugin.create_force(model), box)
    integrator = openmm.LangevinMiddleIntegrator(298 * unit.kelvin, 4 / unit.picosecond,
                                                 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(7)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(x)
    ctx.setVelocitiesToTemperature(298 * unit.kelvin, 3)
    integrator.step(100)
    state = ctx.getState(getEnergy=True, getPositions=True)
    kinetic = state.getKineticEnergy().value_in_unit(KJ)
    temperature = 2 * kinetic / (3 * 64 * unit.MOLAR_GAS_CONSTANT_R.value_in_unit(KJ / unit.kelvin))
    assert 100 < temperature < 600
    d = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) - x
    d -= np.round(d / np.diag(box)) * np.diag(box)
    assert np.abs(d).max() < 0.05


def test_twin_of_torchforce_matches_openmm(model, crystal):
    x, box = crystal
    if not plugin.openmmtorch_available():
        pytest.skip("openmmtorch does not import")
    system = deserialize_system(openmm.XmlSerializer.serialize(
        carbon_system(plugin.create_force(model), box)))
    force = concrete_force(system.getForce(0))
    assert type(force).__name__ == "TorchForce"
    term = build_term(force, 0, system)
    xt = torch.tensor(x, requires_grad=True)
    energy = term(xt, torch.tensor(box))
    twin = float(energy.detach()), -torch.autograd.grad(energy, xt)[0].numpy()
    assert_matches(evaluate(system, x, "Reference"), twin)


def test_verify_command_accepts_exported_torchforce_system(model, crystal, tmp_path, capsys):
    import json

    from openmm_reversible.cli import main

    if not plugin.openmmtorch_available():
        pytest.skip("openmmtorch does not import")
    x, box = crystal
    system = carbon_system(plugin.create_force(model), box)
    system_path = tmp_path / "ml_system.xml"
    system_path.write_text(openmm.XmlSerializer.serialize(system))
    ctx = openmm.Context(carbon_system(plugin.create_force(model), box),
                         openmm.VerletIntegrator(0.0005),
                         openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(x)
    state_path = tmp_path / "state.xml"
    state_path.write_text(openmm.XmlSerializer.serialize(ctx.getState(getPositions=True)))
    assert main(["verify", str(system_path), str(state_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and [f["name"] for f in report["per_force"]] == ["TorchForce"]
    assert report["energy_rel_error"] <= 1e-6 and report["force_rel_rms_error"] <= 1e-5


PLAIN_OPENMM = """
import json, sys
import numpy as np
import openmm
from openmm import app, unit
if {hide}:
    sys.modules["openmm_reversible_plugin"] = None  # as if the package were not installed
x, box = np.load(sys.argv[2]), np.load(sys.argv[3])
topology = app.Topology()
chain = topology.addChain()
for _ in range(len(x)):
    topology.addAtom("C", app.element.carbon, topology.addResidue("C", chain))
topology.setPeriodicBoxVectors(box * unit.nanometer)
system = app.ForceField(sys.argv[1]).createSystem(topology)
context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
context.setPeriodicBoxVectors(*box)
context.setPositions(x)
energy = context.getState(getEnergy=True).getPotentialEnergy()
print(json.dumps({{"forces": [f.__class__.__name__ for f in system.getForces()],
                  "energy": energy.value_in_unit(unit.kilojoule_per_mole)}}))
"""
"""Load a trained ForceField file in a fresh interpreter that never imports the plugin itself."""


def run_plain_openmm(tmp_path, path, x, box, hide: bool):
    """Run :data:`PLAIN_OPENMM` with this checkout's library and plugin on the path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    packages = tmp_path / "packages"
    packages.mkdir(exist_ok=True)
    link = packages / "openmm_reversible_plugin"
    if not link.exists():
        link.symlink_to(root / "plugin", target_is_directory=True)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "box.npy", box)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(packages), str(root)]))
    return subprocess.run([sys.executable, "-c", PLAIN_OPENMM.format(hide=hide), str(path),
                           str(tmp_path / "x.npy"), str(tmp_path / "box.npy")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_trained_file_includes_the_model_in_plain_openmm_without_importing_the_plugin(
        model, crystal, tmp_path):
    import json

    x, box = crystal
    path = tmp_path / "trained.xml"
    plugin.write_forcefield(str(path), model, {"C": ("diamond-C", 12.011, 0)})
    assert "<InitializationScript>" in path.read_text()
    result = run_plain_openmm(tmp_path, path, x, box, hide=False)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    # One model force (a TorchForce shows as its base class Force where openmmtorch is not
    # imported), whose energy is the model's.
    assert len([f for f in output["forces"] if f != "CMMotionRemover"]) == 1
    assert output["energy"] == pytest.approx(reference(model, x, box)[0], rel=1e-6)


def test_trained_file_fails_loudly_where_the_plugin_is_not_installed(model, crystal, tmp_path):
    x, box = crystal
    path = tmp_path / "trained.xml"
    plugin.write_forcefield(str(path), model, {"C": ("diamond-C", 12.011, 0)})
    result = run_plain_openmm(tmp_path, path, x, box, hide=True)
    assert result.returncode != 0 and result.stdout == ""
    assert ("ImportError: this force field file holds a learned model (<TorchPotential>), which "
            "needs the package openmm_reversible_plugin (pip install openmm-reversible); "
            "without it OpenMM would leave the model out of the System") in result.stderr


def test_plugin_imported_before_loading_adds_the_model_once(model, crystal, tmp_path):
    """OpenMM parses the tag (the plugin is imported here), then runs the file's script, which
    must not add the same model a second time."""
    x, box = crystal
    path = str(tmp_path / "trained.xml")
    plugin.write_forcefield(path, model, {"C": ("diamond-C", 12.011, 0)})
    forcefield = app.ForceField(path)
    assert len([g for g in forcefield.getGenerators()
                if isinstance(g, plugin.TorchPotentialGenerator)]) == 1
    system = forcefield.createSystem(diamond_topology(64, box))
    assert len([f for f in system.getForces() if not isinstance(f, openmm.CMMotionRemover)]) == 1
