"""MSD and self-diffusion: a direct NumPy double loop, Brownian motion with a known D,
unwrapping, finite-difference gradients and input errors."""

import math

import numpy as np
import pytest
import torch

from openmm_reversible.errors import InputError
from openmm_reversible.observables import (
    mean_squared_displacement,
    self_diffusion_coefficient,
    time_between_frames,
    unwrap,
    yeh_hummer_correction,
)


def _brownian(n_frames, n_atoms, d_true, dt, seed):
    """Random walk with ⟨Δx²⟩ = 2 D dt per axis, nm (D in nm²/ps)."""
    gen = np.random.default_rng(seed)
    steps = gen.normal(0.0, np.sqrt(2 * d_true * dt), size=(n_frames, n_atoms, 3))
    steps[0] = gen.uniform(0, 2.0, size=(n_atoms, 3))
    return np.cumsum(steps, axis=0)


def test_msd_matches_direct_numpy_loop():
    x = _brownian(12, 6, 0.01, 0.1, seed=1)
    masses = np.array([16.0, 1.0, 1.0, 12.0, 12.0, 40.0])
    mols = [[0, 1, 2], [3, 4], [5]]
    lags, msd = mean_squared_displacement(torch.tensor(x), torch.tensor(masses), mols, 0.1,
                                          max_lag=0.5)
    com = np.stack([(x[:, m] * masses[m, None]).sum(1) / masses[m].sum() for m in mols], 1)
    expected = []
    for k in range(6):
        total, count = 0.0, 0
        for t0 in range(12 - k):
            for m in range(3):
                total += np.sum((com[t0 + k, m] - com[t0, m]) ** 2)
                count += 1
        expected.append(total / count)
    np.testing.assert_allclose(lags.numpy(), 0.1 * np.arange(6), rtol=1e-12)
    np.testing.assert_allclose(msd.numpy(), expected, rtol=1e-12)


def test_diffusion_of_brownian_particles():
    d_true = 2.3e-3  # nm²/ps = 2.3e-9 m²/s, water-like
    x = _brownian(201, 400, d_true, 0.5, seed=4)
    lags, msd = mean_squared_displacement(torch.tensor(x), torch.ones(400, dtype=torch.float64),
                                          [[i] for i in range(400)], 0.5, max_lag=20.0)
    d = self_diffusion_coefficient(lags, msd, fit_range=(2.0, 20.0))
    assert float(d) == pytest.approx(2.3e-9, rel=0.05)
    # Exact slope: MSD = 6 D t on a clean line gives D back to round-off, in m²/s.
    line = 6 * d_true * lags
    assert float(self_diffusion_coefficient(lags, line)) == pytest.approx(2.3e-9, rel=1e-12)


def test_unwrap_restores_continuous_paths():
    x = torch.tensor(_brownian(30, 5, 0.005, 1.0, seed=2))  # steps ≪ half the box
    box = torch.diag(torch.tensor([1.5, 1.7, 1.9], dtype=torch.float64))
    wrapped = x - torch.floor(x / box.diagonal()) * box.diagonal()
    assert not torch.allclose(wrapped, x)
    restored = unwrap(wrapped, box)
    torch.testing.assert_close(restored, x - (x[0] - wrapped[0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(unwrap(wrapped, box.expand(30, 3, 3)), restored, rtol=0,
                               atol=1e-12)


def test_gradient_matches_finite_differences():
    x = torch.tensor(_brownian(6, 4, 0.02, 0.2, seed=3), requires_grad=True)
    masses = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=torch.float64)

    def d_of(positions):
        lags, msd = mean_squared_displacement(positions, masses, [[0, 1], [2], [3]], 0.2)
        return self_diffusion_coefficient(lags, msd) * 1e6  # nm²/ps scale for FD

    assert torch.autograd.gradcheck(d_of, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    grad = torch.autograd.grad(d_of(x), x)[0]
    assert all(float(grad[s].abs().sum()) > 0 for s in range(6))  # every frame is reached


def test_time_between_frames():
    assert time_between_frames(torch.tensor([100, 150, 200, 250]), 0.002) == pytest.approx(0.1)
    with pytest.raises(InputError, match="evenly spaced.*from 50 to 60"):
        time_between_frames([0, 50, 110], 0.002)
    with pytest.raises(InputError, match="at least two frames"):
        time_between_frames([0], 0.002)


def test_input_errors():
    x = torch.tensor(_brownian(5, 2, 0.01, 0.1, seed=0))
    masses = torch.ones(2, dtype=torch.float64)
    with pytest.raises(InputError, match="max_lag = 0.5 ps is longer than the trajectory"):
        mean_squared_displacement(x, masses, [[0], [1]], 0.1, max_lag=0.5)
    with pytest.raises(InputError, match="frame_interval must be a positive time"):
        mean_squared_displacement(x, masses, [[0], [1]], 0.0)
    with pytest.raises(InputError, match=r"molecules\[1\] is empty"):
        mean_squared_displacement(x, masses, [[0], []], 0.1)
    lags, msd = mean_squared_displacement(x, masses, [[0], [1]], 0.1)
    with pytest.raises(InputError, match="selects 1 lag"):
        self_diffusion_coefficient(lags, msd, fit_range=(0.1, 0.15))
    with pytest.raises(InputError, match="box is None"):
        unwrap(x, None)


def test_yeh_hummer_correction_by_hand():
    """k_B T ξ / (6 π η L) with k_B = 1.380649e-23 J/K (exact, SI 2019): water at 298.15 K,
    η = 0.89 mPa·s, L = 3 nm adds 2.32e-10 m²/s."""
    added = 1.380649e-23 * 298.15 * 2.837297 / (6 * math.pi * 0.89e-3 * 3e-9)
    assert added == pytest.approx(2.32e-10, rel=2e-3)
    d_pbc = torch.tensor(2.0e-9, dtype=torch.float64, requires_grad=True)
    corrected = yeh_hummer_correction(d_pbc, 298.15, 0.89e-3, 3.0)
    assert float(corrected.detach()) == pytest.approx(2.0e-9 + added, rel=1e-12)
    assert float(torch.autograd.grad(corrected, d_pbc)[0]) == 1.0
    # Box vectors (one or one per frame, NPT): the edge is the cube root of the mean volume.
    box = torch.eye(3, dtype=torch.float64) * 3.0
    assert float(yeh_hummer_correction(2.0e-9, 298.15, 0.89e-3, box)) == pytest.approx(
        float(corrected.detach()), rel=1e-12)
    frames = torch.stack([box * 0.99, box * 1.01])
    edge = float(((0.99 ** 3 + 1.01 ** 3) / 2) ** (1 / 3)) * 3.0
    assert float(yeh_hummer_correction(0.0, 298.15, 0.89e-3, frames)) == pytest.approx(
        added * 3.0 / edge, rel=1e-12)
    # The correction falls as 1/L.
    assert float(yeh_hummer_correction(0.0, 298.15, 0.89e-3, 6.0)) == pytest.approx(
        added / 2, rel=1e-12)


def test_yeh_hummer_correction_errors():
    with pytest.raises(InputError, match="viscosity must be a positive shear viscosity in Pa"):
        yeh_hummer_correction(2e-9, 298.15, 0.0, 3.0)
    with pytest.raises(InputError, match="temperature must be positive"):
        yeh_hummer_correction(2e-9, -1.0, 1e-3, 3.0)
    with pytest.raises(InputError, match="holds for a cubic box"):
        yeh_hummer_correction(2e-9, 298.15, 1e-3, torch.diag(torch.tensor([3.0, 3.0, 3.2])))
    tilted = torch.eye(3, dtype=torch.float64) * 3.0
    tilted[1, 0] = 0.5
    with pytest.raises(InputError, match="holds for a cubic box"):
        yeh_hummer_correction(2e-9, 298.15, 1e-3, tilted)
    with pytest.raises(InputError, match="box must be an edge length"):
        yeh_hummer_correction(2e-9, 298.15, 1e-3, torch.ones(3))
    with pytest.raises(InputError, match="box edge must be positive"):
        yeh_hummer_correction(2e-9, 298.15, 1e-3, 0.0)
