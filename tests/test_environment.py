"""The environment is real: OpenMM runs physics on its Reference and CPU platforms, and
openmmtorch's TorchForce evaluates a torch model on the CPU."""

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

KB = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin)


def water_box(n_waters: int = 216, nonbonded=app.CutoffPeriodic, cutoff=0.9,
              switching: bool = False):
    ff = app.ForceField("amber14/tip3p.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, numAdded=n_waters, model="tip3p")
    system = ff.createSystem(modeller.topology, nonbondedMethod=nonbonded,
                             nonbondedCutoff=cutoff * unit.nanometer, rigidWater=True)
    if switching:
        nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
        nb.setUseSwitchingFunction(True)
        nb.setSwitchingDistance((cutoff - 0.1) * unit.nanometer)
    return modeller, system


def n_dof(system: openmm.System) -> int:
    cmm = any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())
    return 3 * system.getNumParticles() - system.getNumConstraints() - (3 if cmm else 0)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_nve_conserves_energy(platform):
    modeller, system = water_box(125, nonbonded=app.PME, cutoff=0.7, switching=True)
    integrator = openmm.VerletIntegrator(0.5 * unit.femtosecond)
    integrator.setConstraintTolerance(1e-8)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    integrator.step(100)
    totals, kinetic = [], []
    for _ in range(40):
        integrator.step(10)
        s = ctx.getState(getEnergy=True)
        ke = s.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        pe = s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        totals.append(ke + pe)
        kinetic.append(ke)
    totals, kinetic = np.array(totals), np.array(kinetic)
    # Total energy fluctuates far less than its parts exchange (a broken integrator or force
    # would make them comparable), and drifts by < 0.5% of the kinetic energy over 200 fs.
    assert totals.std() < 0.05 * kinetic.std()
    assert abs(totals[-1] - totals[0]) < 5e-3 * kinetic.mean()


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_langevin_thermostat_temperature(platform):
    temperature = 300.0
    modeller, system = water_box(125, cutoff=0.7)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 5.0 / unit.picosecond,
                                                 2.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(2024)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    ctx.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    ctx.setVelocitiesToTemperature(temperature * unit.kelvin, 7)
    integrator.step(300)
    dof = n_dof(system)
    temps = []
    for _ in range(100):
        integrator.step(10)
        ke = ctx.getState(getEnergy=True).getKineticEnergy().value_in_unit(
            unit.kilojoule_per_mole)
        temps.append(2 * ke / (dof * KB))
    temps = np.array(temps)
    # Canonical instantaneous-temperature spread is T*sqrt(2/dof); samples 20 fs apart are
    # correlated over ~0.1 ps, so take ~20 effective samples and allow 5 standard errors.
    sigma = temperature * np.sqrt(2.0 / dof)
    assert temps.std() == pytest.approx(sigma, rel=0.5)
    assert abs(temps.mean() - temperature) < 5 * sigma / np.sqrt(20)


class _Harmonic(torch.nn.Module):
    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return 50.0 * torch.sum((positions - 0.1) ** 2)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
def test_torchforce_evaluates_on_cpu(tmp_path, platform):
    openmmtorch = pytest.importorskip("openmmtorch")
    path = str(tmp_path / "harmonic.pt")
    torch.jit.script(_Harmonic()).save(path)
    system = openmm.System()
    for _ in range(3):
        system.addParticle(1.0)
    system.addForce(openmmtorch.TorchForce(path))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName(platform))
    x = np.array([[0.0, 0.1, 0.2], [0.3, -0.1, 0.5], [1.0, 0.2, 0.1]])
    ctx.setPositions(x)
    state = ctx.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert energy == pytest.approx(50.0 * np.sum((x - 0.1) ** 2), rel=1e-6)
    np.testing.assert_allclose(forces, -100.0 * (x - 0.1), rtol=1e-5, atol=1e-6)
