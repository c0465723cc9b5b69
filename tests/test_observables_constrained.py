"""Pressure and virial of a rigid TIP3P box (PME, switched LJ) against OpenMM.

Reference numbers: ``MonteCarloBarostat.computeCurrentPressure`` and the State of OpenMM's
Reference platform (double precision), on frames of a rigid-water Langevin run made here.
"""

from __future__ import annotations

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_reversible.errors import InputError
from openmm_reversible.integrators.constraints import Constraints
from openmm_reversible.observables import (
    constraint_virial,
    kinetic_tensor,
    molecules,
    pressure,
    pressure_tensor,
    virial,
)
from openmm_reversible.observables.density import BAR_PER_KJ_MOL_NM3
from openmm_reversible.potential import TorchPotential
from openmm_reversible.systems import water_box
from openmm_reversible.train import harmonic_gas_energy
from openmm_reversible.units import KB

TEMPERATURE = 300.0


@pytest.fixture(scope="module")
def rigid_box():
    """64 rigid TIP3P waters, PME 0.6 nm with LJ switched from 0.5 nm, two frames 50 steps
    apart (2 fs, constraint tolerance 1e-10) and OpenMM's pressure of each."""
    ms = water_box(64, rigid=True, nonbonded="PME", cutoff=0.6,
                   switchDistance=0.5 * unit.nanometer, ewaldErrorTolerance=1e-6)
    system = openmm.XmlSerializer.clone(ms.system)
    barostat = openmm.MonteCarloBarostat(1 * unit.bar, TEMPERATURE * unit.kelvin, 0)
    system.addForce(barostat)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 1.0, 0.002)
    integrator.setRandomNumberSeed(3)
    integrator.setConstraintTolerance(1e-10)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(ms.positions)
    context.applyConstraints(1e-12)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(TEMPERATURE, 3)
    frames = {"x": [], "v": [], "p": [], "p_conf": [], "kinetic": []}
    for _ in range(2):
        integrator.step(50)
        state = context.getState(getPositions=True, getVelocities=True, getEnergy=True)
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        v = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
        frames["x"].append(x)
        frames["v"].append(v)
        frames["kinetic"].append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
        frames["p"].append(barostat.computeCurrentPressure(context).value_in_unit(unit.bar))
        context.setVelocities(np.zeros_like(v))
        frames["p_conf"].append(barostat.computeCurrentPressure(context).value_in_unit(unit.bar))
        context.setVelocities(v)
    masses = torch.tensor([ms.system.getParticleMass(i).value_in_unit(unit.dalton)
                           for i in range(ms.system.getNumParticles())], dtype=torch.float64)
    return dict(ms=ms, potential=TorchPotential(ms.system), masses=masses,
                x=torch.tensor(np.array(frames["x"])), v=torch.tensor(np.array(frames["v"])),
                box=torch.tensor(ms.box), p=np.array(frames["p"]),
                p_conf=np.array(frames["p_conf"]), kinetic=np.array(frames["kinetic"]),
                molecules=molecules(ms.topology),
                constraints=Constraints.from_system(ms.system))


def test_rigid_pressure_matches_openmm_compute_current_pressure(rigid_box):
    """OpenMM's number is the centre-of-mass kinetic part plus the molecular virial about
    geometric centres (unit masses here) by a central difference over box scalings 1 ± 1e-3:
    equal to its finite-difference accuracy (measured 1.5e-4 relative)."""
    b = rigid_box
    to_bar = BAR_PER_KJ_MOL_NM3 / (3 * float(torch.det(b["box"])))
    kinetic = kinetic_tensor(b["v"], b["masses"], b["molecules"]).diagonal(0, -2, -1).sum(-1)
    np.testing.assert_allclose(kinetic.numpy() * to_bar, b["p"] - b["p_conf"], rtol=1e-9)
    w = virial(b["potential"], b["x"], b["box"], torch.ones_like(b["masses"]), b["molecules"])
    configurational = w.detach().diagonal(0, -2, -1).sum(-1).numpy() * to_bar
    np.testing.assert_allclose(configurational, b["p_conf"], rtol=1e-3)
    # The atomic form without the constraint forces is far off (hundreds of bar here).
    atomic = pressure(b["potential"], b["x"], b["v"], b["box"], b["masses"]).detach().numpy()
    assert np.all(np.abs(atomic - b["p"]) > 100.0)


def test_atomic_pressure_with_constraint_forces_equals_molecular(rigid_box):
    """For rigid molecules the atomic pressure with the constraint virial equals the
    molecular one (centre-of-mass centres) frame by frame: the difference is the second time
    derivative of a rigid body's inertia trace, zero. The velocities are made tangent to the
    constraints first (OpenMM's are, to its 1e-10 tolerance)."""
    b = rigid_box
    c, inv_m = b["constraints"], 1.0 / b["masses"]
    v = torch.stack([c.project_velocities(x, v, inv_m) for x, v in zip(b["x"], b["v"],
                                                                        strict=True)])
    atomic = pressure(b["potential"], b["x"], v, b["box"], b["masses"], constraints=c)
    molecular = pressure(b["potential"], b["x"], v, b["box"], b["masses"], b["molecules"])
    np.testing.assert_allclose(atomic.detach().numpy(), molecular.detach().numpy(),
                               rtol=1e-9, atol=1e-6)
    # Without the constraint term the atomic pressure misses hundreds of bar.
    plain = pressure(b["potential"], b["x"], v, b["box"], b["masses"])
    assert float((plain - molecular).detach().abs().min()) > 100.0
    w = constraint_virial(c, b["potential"], b["x"][:1], v[:1], b["box"], b["masses"])[0]
    w = w.detach()
    torch.testing.assert_close(w, w.T, rtol=0, atol=1e-9 * float(w.abs().max()))


def test_constraint_virial_gradient_matches_finite_differences(rigid_box):
    """The constraint virial is differentiable in the positions (double backward through the
    forces and the multipliers' solve): a directional derivative against central
    differences."""
    b = rigid_box
    c = b["constraints"]
    x0, v0 = b["x"][:1].clone(), b["v"][:1].clone()
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)

    def trace(x):
        return constraint_virial(c, b["potential"], x, v0, b["box"], b["masses"])[0].trace()

    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(trace(x), x)
    h = 1e-6
    fd = (float(trace(x0 + h * direction)) - float(trace(x0 - h * direction))) / (2 * h)
    assert float((grad * direction).sum()) == pytest.approx(fd, rel=1e-5)


def test_constraints_or_molecules_not_both(rigid_box):
    b = rigid_box
    with pytest.raises(InputError, match="constraints are for the atomic virial"):
        pressure_tensor(b["potential"], b["x"][:1], b["v"][:1], b["box"], b["masses"],
                        b["molecules"], b["constraints"])
    with pytest.raises(InputError, match="constraints are for 192 particles"):
        constraint_virial(b["constraints"], b["potential"], b["x"][:1, :9], b["v"][:1, :9],
                          b["box"], b["masses"][:9])


@pytest.mark.parametrize("model, rigid, constraints, modes", [
    ("tip3p", True, None, 0), ("tip3p", False, app.HBonds, 1), ("tip3p", False, None, 3),
    ("spce", True, None, 0), ("tip4pew", True, None, 0), ("tip4pew", False, None, 3)])
def test_gas_phase_energy_counts_constraints_and_virtual_sites(model, rigid, constraints,
                                                              modes):
    """k_B T / 2 per internal mode left by the constraints; a virtual site has none. For a
    rigid molecule the value 0 is OpenMM's own energy of one isolated molecule (no bonded
    terms are left and the intramolecular pairs are excluded)."""
    ff = app.ForceField(f"{model}.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, model=model, numAdded=2, neutralize=False)
    kwargs = dict(rigidWater=rigid, constraints=constraints, removeCMMotion=False)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, **kwargs)
    expected = 0.5 * modes * KB * TEMPERATURE
    assert harmonic_gas_energy(modeller.topology, TEMPERATURE, False, system) == pytest.approx(
        expected, rel=1e-12, abs=1e-15)
    if modes == 0:
        assert harmonic_gas_energy(modeller.topology, TEMPERATURE, True, system) == 0.0
        one = app.Modeller(modeller.topology, modeller.positions)
        one.delete([r for r in one.topology.residues()][1:])
        single = ff.createSystem(one.topology, nonbondedMethod=app.NoCutoff, **kwargs)
        context = openmm.Context(single, openmm.VerletIntegrator(0.001),
                                 openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(one.positions)
        context.computeVirtualSites()
        energy = context.getState(getEnergy=True).getPotentialEnergy()
        assert energy.value_in_unit(unit.kilojoule_per_mole) == pytest.approx(0.0, abs=1e-12)


def test_molecules_join_virtual_sites_with_the_system():
    """The M site of TIP4P-Ew is bonded to nothing in the topology: alone it is a molecule of
    its own; with the System it joins its parents, as in OpenMM's Context.getMolecules()."""
    ff = app.ForceField("tip4pew.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, model="tip4pew", numAdded=5, neutralize=False)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, rigidWater=True)
    assert sorted(len(m) for m in molecules(modeller.topology)) == [1] * 5 + [3] * 5
    joined = molecules(modeller.topology, system)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    assert sorted(tuple(m) for m in joined) == sorted(tuple(sorted(m))
                                                      for m in context.getMolecules())
