"""Reversible and reweighting gradients of a static observable agree within statistical error.

System: 27 Lennard-Jones argon atoms (σ 0.3405 nm, ε 0.996 kJ/mol, 39.948 amu) in a periodic
1.5 nm box at 150 K (a dense supercritical fluid), Langevin-middle dynamics with Δt 10 fs and
γ 1/ps. Observable: the coordination number, the mean number of neighbours closer than
0.5 nm (a smooth step of width 0.02 nm); it does not depend on σ and ε explicitly, so every bit
of its gradient comes from how the sampled configurations respond to the parameters.

- Reversible: a chain of 24 windows of 200 steps (2 ps), each started from the last state of
  the previous one. The loss of a window is the mean coordination number over its snapshots
  in the second half (1-2 ps), so the start's memory has decayed (a window's gradient is the
  response of *that* trajectory from a fixed start; it tends to the equilibrium derivative
  only once the window is longer than the observable's relaxation time). The estimate is the
  mean of the 24 window gradients, its standard error their standard deviation / √24.
- Reweighting: the fluctuation formula :func:`openmm_reversible.reweighting.fluctuation_gradient`
  on every snapshot of the same chain; its standard error by block averaging of the centred
  products ``-β (ℓ_s - ℓ̄)(∂U/∂θ_s - ∂Ū/∂θ)``, one block per window.

The test asserts that the ε gradient is clearly non-zero (so agreement means something) and
that both gradients agree within three combined standard errors.
"""

import numpy as np
import pytest
import torch
from torch import nn

from openmm_reversible.geometry import minimum_image
from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.reweighting import fluctuation_gradient
from openmm_reversible.units import KB

N_SIDE = 3
BOX = 1.5           # nm
TEMPERATURE = 150.0  # K
WINDOWS, STEPS, EVERY = 24, 200, 5
NEIGHBOUR_RADIUS, STEP_WIDTH = 0.5, 0.02  # nm


class PairLJ(nn.Module):
    """Lennard-Jones energy of all minimum-image pairs with trainable σ (nm) and ε (kJ/mol).

    ``U = Σ_{i<j} 4ε((σ/r)¹² - (σ/r)⁶) S(r)`` with OpenMM's switching polynomial
    ``S = 1 - 10t³ + 15t⁴ - 6t⁵``, ``t = (r - r_s)/(r_c - r_s)`` clamped to [0, 1], so the energy
    and forces are smooth (r_c must not exceed half the box width).
    """

    def __init__(self, n_atoms: int, sigma: float, epsilon: float, mass: float,
                 switch: float = 0.6, cutoff: float = 0.7):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(sigma, dtype=torch.float64))
        self.epsilon = nn.Parameter(torch.tensor(epsilon, dtype=torch.float64))
        first, second = torch.triu_indices(n_atoms, n_atoms, 1)
        self.register_buffer("first", first)
        self.register_buffer("second", second)
        self.register_buffer("masses", torch.full((n_atoms,), mass, dtype=torch.float64))
        self.switch, self.cutoff = switch, cutoff

    def distances(self, positions: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        d = positions[..., self.second, :] - positions[..., self.first, :]
        return minimum_image(d, box).norm(dim=-1)

    def forward(self, positions: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        r = self.distances(positions, box)
        t = ((r - self.switch) / (self.cutoff - self.switch)).clamp(0.0, 1.0)
        s = 1.0 - t ** 3 * (10.0 - 15.0 * t + 6.0 * t * t)
        sr6 = (self.sigma / r) ** 6
        return (4.0 * self.epsilon * (sr6 * sr6 - sr6) * s).sum()


def coordination(potential: PairLJ, positions: torch.Tensor, box: torch.Tensor
                 ) -> torch.Tensor:
    """Mean number of neighbours within NEIGHBOUR_RADIUS per atom, one value per frame."""
    r = potential.distances(positions, box)
    n_atoms = potential.masses.shape[0]
    return 2.0 * torch.sigmoid((NEIGHBOUR_RADIUS - r) / STEP_WIDTH).sum(-1) / n_atoms


@pytest.mark.slow
def test_reversible_and_reweighting_gradients_agree():
    torch.manual_seed(0)
    potential = PairLJ(N_SIDE ** 3, sigma=0.3405, epsilon=0.996, mass=39.948)
    parameters = [potential.sigma, potential.epsilon]
    box = torch.eye(3, dtype=torch.float64) * BOX
    grid = (torch.arange(N_SIDE, dtype=torch.float64) + 0.5) * BOX / N_SIDE
    x = torch.stack(torch.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    integrator = LangevinMiddleIntegrator(0.01, 1.0, TEMPERATURE, seed=1)
    v = integrator.noise(0, potential.masses)
    burn = STEPS // EVERY // 2

    def second_half(traj, pot):
        return coordination(pot, traj.positions[burn:], traj.box).mean()

    with torch.no_grad():  # 5 ps of equilibration from the lattice
        equilibrate = ReversibleSimulation(potential, integrator, 500, 500, second_half)
        equilibrate(x, v, box)
        x, v = equilibrate.final_state

    sim = ReversibleSimulation(potential, integrator, STEPS, EVERY, second_half)
    window_grads, frames, start = [], [], 500
    for _ in range(WINDOWS):
        for p in parameters:
            p.grad = None
        sim(x, v, box, start_step=start).backward()
        assert sim.info["reconstruction_error"] < 1e-10
        window_grads.append([float(p.grad) for p in parameters])
        frames.append(sim.trajectory.positions)
        x, v = sim.final_state
        start += STEPS
    window_grads = np.array(window_grads)
    reversible = window_grads.mean(0)
    reversible_se = window_grads.std(0, ddof=1) / np.sqrt(WINDOWS)

    frames = torch.cat(frames)
    _, grads = fluctuation_gradient(lambda pos, b: coordination(potential, pos, b), potential,
                                    frames, box, TEMPERATURE, parameters)
    reweighting = np.array([float(g) for g in grads])

    # Block standard error of the fluctuation term (the observable has no explicit θ term).
    beta = 1.0 / (KB * TEMPERATURE)
    ell = coordination(potential, frames, box).detach()
    d_energy = torch.stack([torch.stack(torch.autograd.grad(potential(f, box), parameters))
                            for f in frames]).detach()
    products = -beta * (ell - ell.mean())[:, None] * (d_energy - d_energy.mean(0))
    np.testing.assert_allclose(products.mean(0).numpy(), reweighting, rtol=1e-10)
    blocks = products.reshape(WINDOWS, -1, 2).mean(1).numpy()
    reweighting_se = blocks.std(0, ddof=1) / np.sqrt(WINDOWS)

    # Larger ε binds neighbours more: a clearly positive derivative of the coordination.
    assert reversible[1] > 4 * reversible_se[1]
    assert reweighting[1] > 2 * reweighting_se[1]
    combined = np.sqrt(reversible_se ** 2 + reweighting_se ** 2)
    assert np.all(np.abs(reversible - reweighting) < 3 * combined), (
        reversible, reversible_se, reweighting, reweighting_se)
