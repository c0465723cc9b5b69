"""Instantaneous temperature against OpenMM's StateDataReporter, flexible and rigid."""

from __future__ import annotations

import io

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_reversible.errors import InputError
from openmm_reversible.observables import degrees_of_freedom, temperature
from openmm_reversible.units import KB


@pytest.mark.parametrize("rigid, remove_cm", [(False, False), (True, False), (True, True)])
def test_temperature_equals_openmm_state_data_reporter(rigid, remove_cm):
    ff = app.ForceField("tip3p.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, model="tip3p", numAdded=30, neutralize=False)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff,
                             rigidWater=rigid, constraints=None, removeCMMotion=remove_cm)
    assert degrees_of_freedom(system) == 270 - (90 if rigid else 0) - (3 if remove_cm else 0)
    integrator = openmm.LangevinMiddleIntegrator(300.0, 1.0, 0.001)
    integrator.setRandomNumberSeed(5)
    simulation = app.Simulation(modeller.topology, system, integrator,
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(modeller.positions)
    simulation.context.setVelocitiesToTemperature(300.0, 5)
    simulation.step(10)
    report = io.StringIO()
    simulation.reporters.append(app.StateDataReporter(report, 1, temperature=True))
    simulation.step(1)
    reported = float(report.getvalue().splitlines()[1])
    state = simulation.context.getState(getVelocities=True, getEnergy=True)
    kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
    # The reporter's number is 2K/(n_dof k_B) with OpenMM's own K: our count of n_dof is its.
    assert 2 * kinetic / (degrees_of_freedom(system) * KB) == pytest.approx(reported, rel=1e-6)
    v = torch.tensor(state.getVelocities(asNumpy=True).value_in_unit(
        unit.nanometer / unit.picosecond))[None]
    masses = torch.tensor([system.getParticleMass(i).value_in_unit(unit.dalton)
                           for i in range(system.getNumParticles())])
    ours = float(temperature(v, masses, degrees_of_freedom(system))[0])
    # StateDataReporter prints with limited digits and uses the leapfrog-corrected kinetic
    # energy of LangevinMiddle (the velocities half a step earlier), so compare loosely; the
    # degrees of freedom are what this checks (a rigid box would read 2/3 of the truth).
    assert ours == pytest.approx(reported, rel=0.05)
    assert np.isfinite(ours)


def test_bad_shapes_are_named():
    with pytest.raises(InputError, match="velocities must have shape"):
        temperature(torch.zeros(3, 3), torch.ones(3), 9)
    with pytest.raises(InputError, match="n_dof must be >= 1"):
        temperature(torch.zeros(1, 3, 3), torch.ones(3), 0)
