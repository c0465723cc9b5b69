"""Dipole moment and static dielectric constant against mdtraj on OpenMM water frames,
the reaction-field relation, finite-difference gradients and input errors."""

import math

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from openmm_reversible.errors import InputError
from openmm_reversible.observables import dipole_moment, molecules, static_dielectric
from openmm_reversible.systems import water_box

TEMPERATURE = 300.0


@pytest.fixture(scope="module")
def water():
    """Eight frames of 125 rigid TIP3P waters, wrapped atom by atom (molecules split)."""
    ms = water_box(125, rigid=True, nonbonded="RF", cutoff=0.7)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1 / unit.picosecond,
                                                 2 * unit.femtosecond)
    integrator.setRandomNumberSeed(3)
    context = openmm.Context(ms.system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(ms.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 100)
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 3)
    frames = []
    for _ in range(8):
        integrator.step(25)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True)
                      .value_in_unit(unit.nanometer))
    length = ms.box[0, 0]
    xyz = np.asarray(frames)
    wrapped = xyz - np.floor(xyz / length) * length
    nonbonded = next(f for f in ms.system.getForces() if isinstance(f, openmm.NonbondedForce))
    charges = np.array([nonbonded.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                        for i in range(ms.system.getNumParticles())])
    traj = mdtraj.Trajectory(wrapped, mdtraj.Topology.from_openmm(ms.topology))
    traj.unitcell_vectors = np.repeat(ms.box[None], len(xyz), axis=0)
    return ms, xyz, wrapped, charges, traj


def test_dipole_moment_matches_mdtraj(water):
    ms, xyz, wrapped, charges, traj = water
    mols = molecules(ms.topology)
    split = sum(np.ptp(wrapped[0, m], axis=0).max() > 0.5 * ms.box[0, 0] for m in mols)
    assert split > 0  # some molecules really are split by wrapping
    q = torch.tensor(charges)
    from_wrapped = dipole_moment(torch.tensor(wrapped), q, torch.tensor(ms.box), mols)
    from_unwrapped = dipole_moment(torch.tensor(xyz), q)
    # mdtraj 1.11 sums q·(x_first_atom_of_system - x_i): the same vector with opposite sign
    # for a neutral system (its static_dielectric uses fluctuations, which the sign leaves alone).
    np.testing.assert_allclose(from_wrapped.numpy(), -mdtraj.dipole_moments(traj, charges),
                               atol=2e-5)
    torch.testing.assert_close(from_wrapped, from_unwrapped, rtol=0, atol=1e-10)


def test_static_dielectric_matches_mdtraj(water):
    ms, _, wrapped, charges, traj = water
    eps = static_dielectric(torch.tensor(wrapped), torch.tensor(charges), torch.tensor(ms.box),
                            TEMPERATURE, molecules(ms.topology))
    expected = mdtraj.static_dielectric(traj, charges, TEMPERATURE)
    assert float(eps) == pytest.approx(expected, rel=1e-4)
    assert float(eps) > 1.5


def test_reaction_field_relation(water):
    """The ε_RF result satisfies (ε - 1)(2ε_RF + 1)/(2ε_RF + ε) = g with g = ε_tin-foil - 1."""
    ms, xyz, _, charges, _ = water
    args = (torch.tensor(xyz), torch.tensor(charges), torch.tensor(ms.box), TEMPERATURE)
    g = float(static_dielectric(*args)) - 1
    for eps_rf in (1.0, 78.3):
        eps = float(static_dielectric(*args, epsilon_rf=eps_rf))
        assert (eps - 1) * (2 * eps_rf + 1) / (2 * eps_rf + eps) == pytest.approx(g, rel=1e-12)
    assert float(static_dielectric(*args, epsilon_rf=1e12)) == pytest.approx(1 + g, rel=1e-9)


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 3, generator=gen, dtype=torch.float64).requires_grad_()
    q = torch.tensor([-0.8, 0.4, 0.4, -0.6, 0.3, 0.3], dtype=torch.float64, requires_grad=True)
    box = torch.eye(3, dtype=torch.float64) * 3.0

    def eps_of(positions, charges):
        return static_dielectric(positions, charges, box, TEMPERATURE, epsilon_rf=78.3)

    assert torch.autograd.gradcheck(eps_of, (x, q), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_input_errors(water):
    ms, xyz, _, charges, _ = water
    x, q, box = torch.tensor(xyz), torch.tensor(charges), torch.tensor(ms.box)
    with pytest.raises(InputError, match="at least two frames"):
        static_dielectric(x[:1], q, box, TEMPERATURE)
    with pytest.raises(InputError, match=r"charges must have shape \(375,\)"):
        dipole_moment(x, q[:10])
    with pytest.raises(InputError, match="epsilon_rf must be >= 1"):
        static_dielectric(x, q, box, TEMPERATURE, epsilon_rf=0.5)
    with pytest.raises(InputError, match="temperature must be positive"):
        static_dielectric(x, q, box, 0.0)
    assert math.isfinite(float(static_dielectric(x, q, box, TEMPERATURE)))
