"""``openmm-reversible gradcheck`` and ``benchmark`` on a small flexible-water box.

The water box (16 TIP3P molecules, reaction field with a 0.35 nm cutoff) is built by OpenMM's
Modeller and written to a temporary PDB; the force field is the tagged flexible TIP3P of
``tests/data/tip3p_flexible.xml`` (charge, bond and Lennard-Jones parameters trainable).
The ``--reweighting`` tests check the plumbing and the formula (against
:func:`openmm_reversible.reweighting.fluctuation_gradient`); the statistical agreement of the
two gradients is ``tests/test_reweighting_vs_reversible.py``.
"""

import argparse
import json
import os

import numpy as np
import openmm.app as app
import pytest
import torch

from openmm_reversible import gradcheck
from openmm_reversible.benchmarks import memory
from openmm_reversible.commands import benchmark as benchmark_command
from openmm_reversible.commands import gradcheck as gradcheck_command
from openmm_reversible.errors import InputError
from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.observables import atom_indices, rdf
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential
from openmm_reversible.reweighting import fluctuation_gradient
from openmm_reversible.units import box_tensor, positions_tensor

XML = os.path.join(os.path.dirname(__file__), "data", "tip3p_flexible.xml")


@pytest.fixture(scope="module")
def water_pdb(tmp_path_factory):
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=16,
                        neutralize=False)
    path = tmp_path_factory.mktemp("water") / "water16.pdb"
    with open(path, "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)
    return str(path)


def gradcheck_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gradcheck_command.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = gradcheck_command.run(gradcheck_args(*argv, "--json"))
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("loss", ["energy", "kinetic", "rdf"])
def test_gradcheck_agrees_for_every_loss(water_pdb, capsys, loss):
    code, result = run_json(capsys, "--forcefield", XML, "--pdb", water_pdb, "--steps", "4",
                            "--cutoff", "0.35", "--loss", loss)
    assert code == 0 and result["ok"] is True
    assert result["rel_error_bptt"] < 1e-8
    assert result["rel_error_fd"] < 1e-4
    names = [p["name"] for p in result["parameters"]]
    assert names == ["Atom/charge/tip3p-O", "Bond/length/OW.HW", "Bond/k/OW.HW",
                     "Atom/sigma/tip3p-O", "Atom/epsilon/tip3p-O"]
    assert all(p["reversible"] != 0 for p in result["parameters"])


def test_gradcheck_table_and_failure_exit_code(water_pdb, capsys):
    code = gradcheck_command.run(gradcheck_args("--forcefield", XML, "--pdb", water_pdb, "--steps",
                                                "4", "--cutoff", "0.35", "--tol-fd", "0"))
    out = capsys.readouterr().out
    assert code == 1
    assert "Atom/sigma/tip3p-O" in out and "FAILED" in out


def test_gradcheck_bad_input(water_pdb, tmp_path):
    with pytest.raises(InputError, match="--steps must be >= 1"):
        gradcheck_command.run(gradcheck_args("--forcefield", XML, "--pdb", water_pdb,
                                             "--steps", "0"))
    pdb = app.PDBFile(water_pdb)
    pdb.topology.setPeriodicBoxVectors(None)
    no_box = tmp_path / "nobox.pdb"
    with open(no_box, "w") as handle:
        app.PDBFile.writeFile(pdb.topology, pdb.positions, handle)
    with pytest.raises(InputError, match="needs a periodic box"):
        gradcheck_command.run(gradcheck_args("--forcefield", XML, "--pdb", str(no_box),
                                             "--steps", "2", "--nonbonded-method", "PME"))


def test_gradient_benchmark_reports_json(capsys):
    parser = argparse.ArgumentParser()
    benchmark_command.add_arguments(parser)
    args = parser.parse_args(["gradient", "--waters", "16", "--steps", "4",
                              "--snapshot-every", "2", "--cutoff", "0.35", "--json"])
    assert benchmark_command.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_atoms"] == 48 and result["steps"] == 4
    # Timings are reported, never asserted (wall clock on a shared machine).
    assert result["forward_s"] > 0 and result["forward_reverse_s"] > 0
    assert result["reconstruction_error_nm"] < 1e-12
    assert result["gradient_norm"] > 0


def test_gradient_benchmark_with_pme_on_the_fused_kernels(capsys):
    parser = argparse.ArgumentParser()
    benchmark_command.add_arguments(parser)
    args = parser.parse_args(["gradient", "--waters", "16", "--steps", "4", "--snapshot-every",
                              "2", "--cutoff", "0.35", "--nonbonded", "PME", "--fused",
                              "--openmm-steps", "5", "--json"])
    assert benchmark_command.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nonbonded"] == "PME" and result["fused"] is True
    assert result["reconstruction_error_nm"] < 1e-12 and result["gradient_norm"] > 0
    assert result["openmm_step_ms"] > 0
    per_step = 1e3 * result["forward_s"] / 4 / result["openmm_step_ms"]
    assert result["forward_step_over_openmm_step"] == pytest.approx(per_step, rel=1e-12)


EXAMPLE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "water",
                              "water.toml")


def test_epoch_benchmark_on_a_tiny_schedule(capsys):
    """One epoch of the water example (216 waters) with 2 windows of 4 steps, on the fused
    kernels: the record's parts add up and the paper estimate follows from its per-step
    costs."""
    parser = argparse.ArgumentParser()
    benchmark_command.add_arguments(parser)
    args = parser.parse_args(["epoch", "--config", EXAMPLE_CONFIG, "--windows", "2",
                              "--window-steps", "4", "--snapshot-every", "2",
                              "--equilibration-steps", "10", "--bulk-steps", "5",
                              "--platform", "CPU", "--fused", "--openmm-steps", "5", "--json"])
    assert benchmark_command.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["benchmark"] == "epoch" and result["n_atoms"] == 648
    assert result["platform"] == "CPU" and result["fused"] is True
    assert result["windows"] == 2 and result["window_steps"] == 4
    assert result["sampling_steps"] == 10 + 2 * 5
    # Timings are reported, never asserted against a figure (wall clock on a shared machine).
    assert 0 < result["forward_s"] + result["reverse_s"] <= result["windows_s"]
    assert result["windows_s"] + result["sampling_s"] <= result["epoch_s"]
    assert result["forward_step_ms"] == pytest.approx(1e3 * result["forward_s"] / 8, rel=1e-12)
    assert result["reverse_step_over_openmm_step"] == pytest.approx(
        result["reverse_step_ms"] / result["openmm_cpu_step_ms"], rel=1e-12)
    assert result["paper_schedule_s"] == pytest.approx(
        50.0 * result["sampling_step_ms"]
        + 5.0 * (result["forward_step_ms"] + result["reverse_step_ms"]), rel=1e-12)


def test_memory_measurement_in_process():
    result = memory.measure("reversible", steps=4, waters=16, snapshot_every=2, cutoff=0.35,
                            seed=0)
    assert result["mode"] == "reversible" and result["steps"] == 4
    assert result["peak_mib"] >= result["baseline_mib"] > 0


def test_gradcheck_reweighting_entry(water_pdb, capsys):
    """--reweighting adds per-parameter fluctuation-formula gradients; the check still passes."""
    code, result = run_json(capsys, "--forcefield", XML, "--pdb", water_pdb, "--steps", "4",
                            "--snapshot-every", "1", "--cutoff", "0.35", "--reweighting")
    assert code == 0 and result["ok"] is True
    entry = result["reweighting"]
    assert entry["n_frames"] == 4
    assert [p["name"] for p in entry["parameters"]] == [p["name"] for p in result["parameters"]]
    assert all(np.isfinite(p["gradient"]) and p["gradient"] != 0 for p in entry["parameters"])
    assert entry["rel_difference_reversible"] > 0
    code = gradcheck_command.run(gradcheck_args("--forcefield", XML, "--pdb", water_pdb,
                                                "--steps", "2", "--cutoff", "0.35",
                                                "--reweighting"))
    assert code == 0 and "reweighting from 2 snapshots" in capsys.readouterr().out


@pytest.fixture(scope="module")
def water_frames(water_pdb):
    """A TorchPotential of the tagged water and 3 snapshots of a short reversible run."""
    pdb = app.PDBFile(water_pdb)
    parameters = ParameterSet.from_forcefield(
        XML, pdb.topology, nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=0.35,
        constraints=None, rigidWater=False, removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters)
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=3)
    sim = ReversibleSimulation(potential, integrator, 6, 2, gradcheck.energy_loss)
    box = box_tensor(pdb.topology.getPeriodicBoxVectors())
    with torch.no_grad():
        sim(positions_tensor(pdb.getPositions()), integrator.noise(0, potential.masses), box)
    return pdb.topology, potential, sim.trajectory


def test_reweighting_gradient_is_the_fluctuation_formula(water_frames):
    """The autograd route of gradcheck equals reweighting.fluctuation_gradient term by term."""
    _, potential, traj = water_frames
    params = [p for p in potential.parameters() if p.requires_grad]
    ours = gradcheck.reweighting_gradient(gradcheck.energy_loss, traj, potential, params)
    _, formula = fluctuation_gradient(lambda x, box: potential(x, box) / traj.n_atoms,
                                      potential, traj.positions, traj.box, traj.temperature,
                                      params)
    np.testing.assert_allclose(ours, torch.cat([g.reshape(-1) for g in formula]).numpy(),
                               rtol=1e-10, atol=1e-12)


def test_frame_loss_is_the_window_loss(water_frames):
    """The mean of per-frame g(r) is the window's g(r), so the rdf loss keeps its value."""
    topology, potential, traj = water_frames
    loss = gradcheck.rdf_loss(topology, traj.box)
    oxygens = atom_indices(topology, element="O")
    _, g = rdf(traj.positions, traj.box, selections=(oxygens, oxygens), r_range=(0.2, 0.5 *
               float(traj.box[0, 0])), bin_width=0.02)
    expected = ((g - 1.0) ** 2).sum() * 0.02
    assert float(loss(traj, potential)) == pytest.approx(float(expected), rel=1e-12)
    reweighted = float(loss.reweighted(traj, potential).detach())
    assert reweighted == pytest.approx(float(expected), rel=1e-12)


def test_reweighting_needs_a_frame_loss(water_frames):
    _, potential, traj = water_frames
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=3)
    sim = ReversibleSimulation(potential, integrator, 2, 1, lambda t, p: t.kinetic_energy().sum())
    with pytest.raises(InputError, match="FrameLoss"):
        gradcheck.check_gradients(sim, traj.positions[0], traj.velocities[0], traj.box,
                                  reweighting=True)


def _check(reversible, bptt, fd, fd_half) -> gradcheck.GradientCheck:
    return gradcheck.GradientCheck(["a", "b"], np.asarray(reversible), np.asarray(bptt),
                                   np.asarray(fd), 0.0, 0.0, finite_difference_half=np.asarray(
                                       fd_half), fd_step=1e-6)


def test_verdict_separates_wrong_gradients_from_inconclusive_differences():
    ok, why = _check([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]).verdict(1e-8, 1e-4)
    assert ok and why == "reversible equals backprop through time and finite differences"
    ok, why = _check([1.0, 2.0], [1.0, 2.5], [1.0, 2.0], [1.0, 2.0]).verdict(1e-8, 1e-4)
    assert not ok and why.startswith("reversible differs from backprop through time")
    ok, why = _check([1.0, 2.0], [1.0, 2.0], [1.0, 2.5], [1.0, 2.5]).verdict(1e-8, 1e-4)
    assert not ok and why.startswith("reversible differs from finite differences")
    ok, why = _check([1.0, 2.0], [1.0, 2.0], [1.0, 900.0], [1.0, -400.0]).verdict(1e-8, 1e-4)
    assert ok and why.startswith("finite differences inconclusive for b because")


def test_a_loss_that_jumps_within_the_step_makes_finite_differences_inconclusive(water_frames):
    """A real run whose loss jumps between p - h and p + h (as a truncated cutoff makes long
    windows do): reversible = BPTT, the finite differences at h and h/2 disagree, and the
    check says so instead of failing the gradient."""
    _, potential, traj = water_frames
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=3)
    first = next(p for p in potential.parameters() if p.requires_grad)
    start = float(first.detach().view(-1)[0])
    h = 1e-6

    def jumping(t, pot):
        jump = (first.view(-1)[0] > start + 0.3 * h).to(first.dtype)
        return gradcheck.energy_loss(t, pot) + jump

    sim = ReversibleSimulation(potential, integrator, 4, 2, jumping)
    result = gradcheck.check_gradients(sim, traj.positions[0], traj.velocities[0], traj.box,
                                       fd_step=h)
    assert result.rel_error_bptt < 1e-8
    assert result.fd_spread[0] > 0.1 and not result.fd_conclusive()[0]
    assert result.fd_conclusive()[1:].all()
    ok, why = result.verdict(1e-8, 1e-4)
    assert ok, why
    assert "finite differences inconclusive for" in why
