"""Langevin-middle integrator: noise stream, agreement with OpenMM, exact reversal.

The OpenMM comparisons run the same Lennard-Jones cluster in OpenMM (Reference platform, double
precision) and in torch: friction 0 against OpenMM's own Verlet and Langevin-middle integrators,
and with friction against an ``openmm.CustomIntegrator`` spelling out the middle scheme whose
per-dof noise is set, every step, from our counter-based generator.
"""

import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from torch import nn

from openmm_reversible.errors import InputError
from openmm_reversible.geometry import minimum_image
from openmm_reversible.integrators import LangevinMiddleIntegrator
from openmm_reversible.integrators.forces import accelerations
from openmm_reversible.integrators.noise import counter_seed, standard_normal

SIGMA, EPSILON, MASS = 0.34, 0.99, 39.948  # argon-like: nm, kJ/mol, amu


class LennardJones(nn.Module):
    """All-pairs 12-6 Lennard-Jones with trainable σ (nm) and ε (kJ/mol), minimum image."""

    def __init__(self, sigma: float = SIGMA, epsilon: float = EPSILON, n_atoms: int = 0):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(sigma, dtype=torch.float64))
        self.epsilon = nn.Parameter(torch.tensor(epsilon, dtype=torch.float64))
        self.register_buffer("masses", torch.full((n_atoms,), MASS, dtype=torch.float64))

    def forward(self, positions, box):
        i, j = torch.triu_indices(positions.shape[0], positions.shape[0], 1)
        d = minimum_image(positions[j] - positions[i], box)
        s6 = (self.sigma**2 / (d * d).sum(-1)) ** 3
        return (4 * self.epsilon * (s6 * s6 - s6)).sum()


def lj_cluster(n_side: int = 2, spacing: float = 0.38, seed: int = 0):
    """A jittered cubic cluster (n_side³ atoms) with thermal-scale velocities, float64."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.arange(n_side, dtype=torch.float64) * spacing
    x = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    x = x + 0.01 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    v = 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return x, v


def openmm_context(positions, velocities, integrator):
    system = openmm.System()
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(openmm.NonbondedForce.NoCutoff)
    for _ in range(positions.shape[0]):
        system.addParticle(MASS)
        force.addParticle(0.0, SIGMA, EPSILON)
    system.addForce(force)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions.numpy())
    context.setVelocities(velocities.numpy())
    return context


def openmm_state(context):
    state = context.getState(getPositions=True, getVelocities=True)
    return (torch.from_numpy(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)),
            torch.from_numpy(state.getVelocities(asNumpy=True)
                             .value_in_unit(unit.nanometer / unit.picosecond)))


def test_noise_is_a_pure_function_of_seed_and_step():
    a = standard_normal(5, 17, (64, 3))
    assert torch.equal(a, standard_normal(5, 17, (64, 3)))
    assert not torch.equal(a, standard_normal(5, 18, (64, 3)))
    assert not torch.equal(a, standard_normal(6, 17, (64, 3)))
    assert counter_seed(0, 1) != counter_seed(1, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = standard_normal(5, 17, (5000, 3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, standard_normal(5, 17, (5000, 3)))
    assert standard_normal(5, 17, (64, 3), dtype=torch.float32).dtype == torch.float32


def test_noise_statistics():
    z = torch.cat([standard_normal(1, n, (200, 3)) for n in range(50)]).flatten()
    assert abs(float(z.mean())) < 0.02  # 30,000 samples: standard error 0.006
    assert abs(float(z.std()) - 1.0) < 0.02
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 300.0, seed=1)
    masses = torch.tensor([1.0, 16.0], dtype=torch.float64).repeat(2000)
    xi = integrator.noise(3, masses)
    kt = integrator.kT
    assert xi[0::2].var().item() == pytest.approx(kt / 1.0, rel=0.05)
    assert xi[1::2].var().item() == pytest.approx(kt / 16.0, rel=0.05)


@pytest.mark.parametrize("kind", ["verlet", "langevin_middle"])
def test_frictionless_matches_openmm(kind):
    x0, v0 = lj_cluster()
    dt, n_steps = 0.002, 100
    omm = (openmm.VerletIntegrator(dt) if kind == "verlet"
           else openmm.LangevinMiddleIntegrator(300.0, 0.0, dt))
    context = openmm_context(x0, v0, omm)
    omm.step(n_steps)
    x_ref, v_ref = openmm_state(context)
    pot = LennardJones(n_atoms=x0.shape[0])
    x, v = LangevinMiddleIntegrator(dt, 0.0, 300.0).run(pot, x0, v0, None, pot.masses, n_steps)
    assert (x - x0).abs().max() > 0.01  # the atoms really moved
    assert torch.allclose(x, x_ref, rtol=0, atol=1e-11)
    assert torch.allclose(v, v_ref, rtol=0, atol=1e-9)


def test_langevin_matches_openmm_custom_integrator_with_same_noise():
    x0, v0 = lj_cluster(seed=1)
    dt, friction, temperature, n_steps = 0.002, 5.0, 120.0, 100
    ours = LangevinMiddleIntegrator(dt, friction, temperature, seed=11)
    custom = openmm.CustomIntegrator(dt)
    custom.addGlobalVariable("c", ours.c)
    custom.addGlobalVariable("s", ours.s)
    custom.addPerDofVariable("xi", 0.0)
    custom.addComputePerDof("v", "v + dt*f/m")
    custom.addComputePerDof("x", "x + 0.5*dt*v")
    custom.addComputePerDof("v", "c*v + s*xi")
    custom.addComputePerDof("x", "x + 0.5*dt*v")
    context = openmm_context(x0, v0, custom)
    pot = LennardJones(n_atoms=x0.shape[0])
    x, v = x0, v0
    for n in range(1, n_steps + 1):
        xi = ours.noise(n, pot.masses).numpy()
        custom.setPerDofVariableByName("xi", [openmm.Vec3(*row) for row in xi])
        custom.step(1)
        a, _ = accelerations(pot, x, None, 1.0 / pot.masses)
        x, v = ours.step(x, v, a, n, pot.masses)
    x_ref, v_ref = openmm_state(context)
    assert torch.allclose(x, x_ref, rtol=0, atol=1e-11)
    assert torch.allclose(v, v_ref, rtol=0, atol=1e-9)
    # Friction really mattered: without noise the trajectory is different.
    x_det, _ = LangevinMiddleIntegrator(dt, 0.0, 0.0).run(pot, x0, v0, None, pot.masses,
                                                          n_steps)
    assert (x_det - x).abs().max() > 1e-3


@pytest.mark.parametrize("box", [None, 1.2])
def test_forward_then_reverse_recovers_initial_state(box):
    x0, v0 = lj_cluster(seed=2)
    box = None if box is None else torch.eye(3, dtype=torch.float64) * box
    pot = LennardJones(n_atoms=x0.shape[0])
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 150.0, seed=4)
    n_steps = 1000
    x, v = integrator.run(pot, x0, v0, box, pot.masses, n_steps, start_step=50)
    assert (x - x0).abs().max() > 0.05
    xr, vr = integrator.run_reverse(pot, x, v, box, pot.masses, n_steps, end_step=1050)
    assert (xr - x0).abs().max() <= 1e-9
    assert (vr - v0).abs().max() <= 1e-7


def test_reversal_needs_the_same_noise():
    x0, v0 = lj_cluster(seed=3)
    pot = LennardJones(n_atoms=x0.shape[0])
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 150.0, seed=4)
    x, v = integrator.run(pot, x0, v0, None, pot.masses, 20)
    other = LangevinMiddleIntegrator(0.002, 1.0, 150.0, seed=5)
    xr, _ = other.run_reverse(pot, x, v, None, pot.masses, 20)
    assert (xr - x0).abs().max() > 1e-4


def test_integrator_rejects_bad_settings_and_accepts_quantities():
    with pytest.raises(InputError, match="timestep must be > 0"):
        LangevinMiddleIntegrator(0.0, 1.0, 300.0)
    with pytest.raises(InputError, match="friction must be >= 0"):
        LangevinMiddleIntegrator(0.001, -1.0, 300.0)
    integrator = LangevinMiddleIntegrator(2 * unit.femtosecond, 1 / unit.picosecond,
                                          300 * unit.kelvin)
    assert integrator.timestep == pytest.approx(0.002)
    assert integrator.c == pytest.approx(np.exp(-0.002))
    assert integrator.c**2 + integrator.s**2 == pytest.approx(1.0, abs=1e-15)
