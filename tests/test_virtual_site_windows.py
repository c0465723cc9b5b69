"""Virtual sites inside the reversible windows: rigid TIP4P-Ew (one M site a molecule).

The windows integrate the particles with mass and place the sites from them
(:mod:`openmm_reversible.integrators.sites`). Checked: the trajectory against OpenMM's
Reference platform fed the same noise (CCMA at 1e-14, sites placed by OpenMM), reversible =
backprop through time, and central finite differences with common random numbers.
"""

from __future__ import annotations

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from openmm import unit
from test_constraints import openmm_langevin_middle, without_settle
from test_reversible import TOL, compare_with_bptt, gradients, kinetic_and_energy_loss

from openmm_reversible.integrators import (
    Constraints,
    LangevinMiddleIntegrator,
    ReversibleSimulation,
)
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential
from openmm_reversible.units import box_tensor, positions_tensor

TEMPERATURE = 300.0


@pytest.fixture(scope="module")
def tip4pew():
    """30 rigid TIP4P-Ew waters, reaction field 0.45 nm, σ and ε of O and the M charge
    trainable; positions minimised in OpenMM and put on the constraints to round-off."""
    ff = app.ForceField("tip4pew.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, model="tip4pew", numAdded=30, neutralize=False)
    kwargs = dict(nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=0.45 * unit.nanometer,
                  rigidWater=True, removeCMMotion=False)
    parameters = ParameterSet.select(
        "tip4pew.xml", modeller.topology,
        [("NonbondedForce/Atom", "tip4pew-O", ("sigma", "epsilon"))], **kwargs)
    system = without_settle(parameters.system)
    context = openmm.Context(openmm.XmlSerializer.clone(system), openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(modeller.positions)
    context.applyConstraints(1e-12)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.computeVirtualSites()
    x = positions_tensor(context.getState(getPositions=True).getPositions())
    potential = TorchPotential(system, parameters=parameters)
    constraints = Constraints.from_system(system)
    x, _ = constraints.constrain_state(x, torch.zeros_like(x), potential.masses)
    return dict(system=system, potential=potential, constraints=constraints,
                x=potential.virtual_sites(x),
                box=box_tensor(modeller.topology.getPeriodicBoxVectors()))


def start_velocities(integ, masses):
    return torch.where(masses[:, None] > 0, integ.noise(0, masses), 0.0)


def test_sites_are_massless_and_only_the_massive_particles_are_integrated(tip4pew):
    masses = tip4pew["potential"].masses
    assert int((masses == 0).sum()) == 30 and tip4pew["potential"].virtual_sites.n_sites == 30
    integ = LangevinMiddleIntegrator(0.002, 1.0, TEMPERATURE, seed=2)
    sim = ReversibleSimulation(tip4pew["potential"], integ, 4, 2, kinetic_and_energy_loss,
                               constraints=tip4pew["constraints"])
    assert sim.sites.masses.shape == (90,)
    with torch.no_grad():
        sim(tip4pew["x"], start_velocities(integ, masses), tip4pew["box"])
    x, v = sim.final_state
    assert x.shape == (120, 3) and bool(torch.isfinite(x).all())
    torch.testing.assert_close(x, tip4pew["potential"].virtual_sites(x), rtol=0, atol=1e-15)
    assert bool((v[masses == 0] == 0).all())
    assert tip4pew["constraints"].residual(x) < 1e-14


def test_rigid_tip4pew_steps_match_openmm_with_the_same_noise(tip4pew):
    """20 steps against OpenMM's Reference platform (constrained Langevin middle as a
    CustomIntegrator fed the torch noise, CCMA at 1e-14): every particle, sites included,
    agrees to 1e-11 nm."""
    system, potential, box = tip4pew["system"], tip4pew["potential"], tip4pew["box"]
    integ = LangevinMiddleIntegrator(0.002, 1.0, TEMPERATURE, seed=9)
    om = openmm_langevin_middle(integ.c, integ.timestep)
    om.setConstraintTolerance(1e-14)
    context = openmm.Context(system, om, openmm.Platform.getPlatformByName("Reference"))
    context.setPeriodicBoxVectors(*box.numpy())
    masses = potential.masses
    v0 = start_velocities(integ, masses)
    context.setPositions(tip4pew["x"].numpy())
    context.setVelocities(v0.numpy())
    n_steps = 20
    sim = ReversibleSimulation(potential, integ, n_steps, 1, kinetic_and_energy_loss,
                               constraints=tip4pew["constraints"])
    with torch.no_grad():
        sim(tip4pew["x"], v0, box)
    massive = masses > 0
    worst = 0.0
    for n in range(1, n_steps + 1):
        noise = torch.zeros_like(v0)
        noise[massive] = integ.s * integ.noise(n, masses[massive])
        om.setPerDofVariableByName("noise", [openmm.Vec3(*r) for r in noise.numpy()])
        om.step(1)
        reference = context.getState(getPositions=True).getPositions(asNumpy=True)
        diff = np.abs(reference.value_in_unit(unit.nanometer)
                      - sim.trajectory.positions[n - 1].numpy())
        worst = max(worst, float(diff.max()))
    assert worst < 1e-11


@pytest.mark.parametrize("friction, n_steps", [(1.0, 30), (0.0, 12)])
def test_rigid_tip4pew_reversible_matches_bptt(tip4pew, friction, n_steps):
    integ = LangevinMiddleIntegrator(0.002, friction, TEMPERATURE, seed=4)
    v0 = start_velocities(integ, tip4pew["potential"].masses)
    err, info = compare_with_bptt(tip4pew["potential"], integ, tip4pew["x"], v0,
                                  kinetic_and_energy_loss, n_steps, n_steps // 3,
                                  box=tip4pew["box"], constraints=tip4pew["constraints"])
    assert err < TOL
    assert info["reconstruction_error"] < 1e-10


def test_rigid_tip4pew_agrees_with_central_finite_differences(tip4pew):
    """Common random numbers: d loss / d(σ_O, ε_O) of a 10-step window against central
    differences (no pair crosses the cutoff within the step at this size)."""
    potential = tip4pew["potential"]
    integ = LangevinMiddleIntegrator(0.002, 1.0, TEMPERATURE, seed=8)
    v0 = start_velocities(integ, potential.masses)
    sim = ReversibleSimulation(potential, integ, 10, 5, kinetic_and_energy_loss,
                               constraints=tip4pew["constraints"])
    _, grads = gradients(sim, potential, tip4pew["x"], v0, tip4pew["box"])
    (scaled,) = [p for p in potential.parameters() if p.requires_grad]
    for k in range(scaled.numel()):
        h = 1e-5
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                scaled[k] += sign * h
                values.append(float(sim(tip4pew["x"], v0, tip4pew["box"])))
                scaled[k] -= sign * h
        fd = (values[0] - values[1]) / (2 * h)
        assert grads[0][k].item() == pytest.approx(fd, rel=1e-5)


def test_benchmark_boxes_rigid_and_four_site():
    """``benchmark memory --rigid-water --model tip4pew`` builds a rigid TIP4P-Ew box: sites
    placed and still, massive particles on the constraints with tangent velocities; its
    in-process measurement runs; an unknown model is named with the choices."""
    from openmm_reversible.benchmarks import memory
    from openmm_reversible.benchmarks.water import water
    from openmm_reversible.errors import InputError

    box = water(16, cutoff=0.35, rigid=True, model="tip4pew")
    masses = box.potential.masses
    assert int((masses == 0).sum()) == 16 and len(box.constraints) == 48
    torch.testing.assert_close(box.positions, box.potential.virtual_sites(box.positions),
                               rtol=0, atol=1e-15)
    assert bool((box.velocities[masses == 0] == 0).all())
    assert box.constraints.residual(box.positions) < 1e-14
    tangent = box.constraints.gradient_dot(box.positions, box.velocities)
    assert float(tangent.abs().max()) < 1e-12
    result = memory.measure("reversible", steps=4, waters=16, snapshot_every=2, cutoff=0.35,
                            seed=0, model="tip4pew", rigid_water=True)
    assert result["peak_mib"] >= result["baseline_mib"] > 0
    with pytest.raises(InputError, match="--model tip5p: choose tip3p or tip4pew"):
        water(16, cutoff=0.35, model="tip5p")
