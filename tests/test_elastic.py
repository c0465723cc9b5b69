"""Stress and elastic constants: autograd Born terms against finite-difference strain, and
Stillinger–Weber diamond against its published elastic constants.

Reference: Stillinger–Weber silicon at a₀ = 5.431 Å has C11 = 151.4 GPa and C12 = 76.4 GPa
(Cowley, Phys. Rev. B 38, 1988; Karimi et al., Phys. Rev. B 58, 6019 (1998)). Elastic
constants scale as ε/σ³, so with σ = 0.14 nm, ε = 200 kJ/mol (silicon: 0.20951 nm,
2.1683 eV = 209.209 kJ/mol) they are multiplied by (200/209.209)(0.20951/0.14)³ at the scaled
lattice constant. In diamond C11 and C12 have no internal-relaxation part, so the 0 K Born term
equals them.
"""

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from openmm_reversible.ml import StillingerWeber, diamond_lattice
from openmm_reversible.observables.density import virial
from openmm_reversible.observables.elastic import (
    GPA_PER_KJ_MOL_NM3,
    born_terms,
    elastic_constants,
    relaxed_elastic_constants,
    stress_fluctuation,
    stress_tensor,
    voigt_strain_tensor,
)
from openmm_reversible.units import KB

SCALE = (200.0 / 209.209) * (0.20951 / 0.14) ** 3
SW_EQUILIBRIUM = 0.14 * 0.5431 / 0.20951


@pytest.fixture(scope="module")
def sw():
    return StillingerWeber()


@pytest.fixture(scope="module")
def distorted():
    x, box = diamond_lattice(2)
    x = x + 0.004 * np.random.default_rng(9).standard_normal(x.shape)
    return torch.tensor(x), torch.tensor(box)


def strained_energy(potential, x, box, e):
    """Energy under Voigt Lagrangian strain e, with the exact stretch F = (I + 2η)^½."""
    eta = voigt_strain_tensor(torch.tensor(e, dtype=torch.float64)).numpy()
    stretch = torch.tensor(np.real(scipy.linalg.sqrtm(np.eye(3) + 2 * eta)))
    with torch.no_grad():
        return float(potential(x @ stretch, box @ stretch))


def test_born_terms_match_finite_difference_strain(sw, distorted):
    x, box = distorted
    stress, born = born_terms(sw, x[None], box)
    h = 1e-4
    volume = float(torch.linalg.det(box))
    unit_vectors = np.eye(6)
    fd_stress = np.array([(strained_energy(sw, x, box, h * u) - strained_energy(sw, x, box, -h * u))
                          / (2 * h) for u in unit_vectors]) / volume * GPA_PER_KJ_MOL_NM3
    fd_born = np.empty((6, 6))
    for a in range(6):
        for b in range(a, 6):
            ua, ub = h * unit_vectors[a], h * unit_vectors[b]
            fd_born[a, b] = (strained_energy(sw, x, box, ua + ub)
                             - strained_energy(sw, x, box, ua - ub)
                             - strained_energy(sw, x, box, ub - ua)
                             + strained_energy(sw, x, box, -ua - ub)) / (4 * h * h)
            fd_born[b, a] = fd_born[a, b]
    fd_born *= GPA_PER_KJ_MOL_NM3 / volume
    born = born[0].detach().numpy()
    np.testing.assert_allclose(stress[0].detach().numpy(), fd_stress, rtol=1e-6, atol=1e-5)
    assert np.abs(born - fd_born).max() < 1e-5 * np.abs(fd_born).max()
    np.testing.assert_allclose(born, born.T, atol=1e-9)


def test_stillinger_weber_diamond_matches_published_constants(sw):
    x, box = diamond_lattice(2, SW_EQUILIBRIUM)
    stress, born = born_terms(sw, torch.tensor(x)[None], torch.tensor(box))
    c = born[0].detach().numpy()
    # Near the SW equilibrium lattice: stress ~1e-4 of C11 (a₀ rounded to 5.431 Å).
    assert np.abs(stress.detach().numpy()).max() < 0.05
    assert c[0, 0] == pytest.approx(151.4 * SCALE, rel=1e-3)
    assert c[0, 1] == pytest.approx(76.4 * SCALE, rel=1e-3)
    assert c[0, 0] == pytest.approx(c[1, 1], rel=1e-10)
    assert abs(c[0, 3]) < 1e-8 * c[0, 0]  # cubic symmetry: no normal–shear coupling


def test_relaxed_constants_match_published_stillinger_weber_values(sw):
    # Stillinger-Weber silicon at its equilibrium lattice: C11/C12/C44 = 151.4/76.4/56.4 GPa,
    # C44 with internal relaxation (the unrelaxed Born value is about twice as large).
    x, box = diamond_lattice(2, SW_EQUILIBRIUM)
    stress, c = relaxed_elastic_constants(sw, torch.tensor(x), torch.tensor(box))
    assert np.abs(stress.numpy()).max() < 0.05
    assert float(c[0, 0]) == pytest.approx(151.4 * SCALE, rel=1e-3)
    assert float(c[0, 1]) == pytest.approx(76.4 * SCALE, rel=1e-3)
    assert float(c[3, 3]) == pytest.approx(56.4 * SCALE, rel=1e-3)
    _, born = born_terms(sw, torch.tensor(x)[None], torch.tensor(box))
    assert float(born[0, 3, 3].detach()) > 1.9 * float(c[3, 3])
    with pytest.raises(ValueError, match="the structure is not relaxed"):
        relaxed_elastic_constants(sw, torch.tensor(x + 0.004 * np.random.default_rng(1)
                                                   .standard_normal(x.shape)), torch.tensor(box))


def test_relaxed_c44_matches_finite_difference_of_minimised_energies(sw):
    # Shear the crystal by ±h, let the atoms relax (L-BFGS), and difference the energies.
    x, box = diamond_lattice(2)
    x, box = torch.tensor(x), torch.tensor(box)
    _, c = relaxed_elastic_constants(sw, x, box)
    h = 2e-3

    def relaxed_energy(shear):
        e = torch.zeros(6, dtype=torch.float64)
        e[3] = shear
        eta = voigt_strain_tensor(e).numpy()
        stretch = torch.tensor(np.real(scipy.linalg.sqrtm(np.eye(3) + 2 * eta)))
        xs, bs = x @ stretch, box @ stretch

        def fun(u):
            y = (xs + torch.tensor(u).reshape(-1, 3)).requires_grad_(True)
            energy = sw(y, bs)
            return float(energy.detach()), torch.autograd.grad(energy, y)[0].numpy().ravel()

        result = scipy.optimize.minimize(fun, np.zeros(x.numel()), jac=True, method="L-BFGS-B",
                                         options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 500})
        return result.fun

    volume = float(torch.linalg.det(box))
    second = (relaxed_energy(h) + relaxed_energy(-h) - 2 * relaxed_energy(0.0)) / h ** 2
    assert second / volume * GPA_PER_KJ_MOL_NM3 == pytest.approx(float(c[3, 3]), rel=1e-4)


def test_stress_tensor_is_virial_plus_kinetic(sw, distorted):
    x, box = distorted
    masses = torch.full((64,), 12.011, dtype=torch.float64)
    v = 0.3 * torch.randn(1, 64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sigma = stress_tensor(sw, x[None], v, box, masses)[0]
    volume = torch.linalg.det(box)
    kinetic = torch.einsum("n,na,nb->ab", masses, v[0], v[0])
    expected = -(virial(sw, x[None], box)[0] + kinetic) / volume * GPA_PER_KJ_MOL_NM3
    torch.testing.assert_close(sigma, expected)
    # The configurational part is the Born stress (two independent strain parametrisations).
    born_stress = born_terms(sw, x[None], box)[0][0]
    config = -virial(sw, x[None], box)[0] / volume * GPA_PER_KJ_MOL_NM3
    voigt = torch.stack([config[0, 0], config[1, 1], config[2, 2], config[1, 2], config[0, 2],
                         config[0, 1]])
    torch.testing.assert_close(voigt, born_stress, rtol=1e-9, atol=1e-9)


def test_elastic_constants_assemble_born_fluctuation_and_kinetic(sw, distorted):
    x, box = distorted
    frames = torch.stack([x, x + 0.002 * torch.randn(x.shape, dtype=torch.float64,
                                                     generator=torch.Generator().manual_seed(1))])
    temperature = 298.0
    c = elastic_constants(sw, frames, box, temperature)
    stress, born = born_terms(sw, frames, box)
    volume = float(torch.linalg.det(box))
    kT = KB * temperature
    s = stress.detach().numpy()
    covariance = np.cov(s.T, bias=True)
    kinetic = 64 * kT / volume * GPA_PER_KJ_MOL_NM3 * np.diag([2, 2, 2, 1, 1, 1])
    expected = (born.detach().numpy().mean(0) - volume / kT * covariance / GPA_PER_KJ_MOL_NM3
                + kinetic)
    np.testing.assert_allclose(c.detach().numpy(), expected, rtol=1e-10, atol=1e-8)
    assert c.requires_grad  # a training target: differentiable in the model's parameters
    # About a known mean the covariance is the second moment about it (here: zero shear).
    centre = torch.cat([stress.mean(0)[:3], stress.new_zeros(3)]).detach()
    about = stress_fluctuation(stress, born, 64, box, temperature, mean=centre)
    moment = ((s - centre.numpy()).T @ (s - centre.numpy())) / len(s)
    np.testing.assert_allclose(
        (c - about).detach().numpy(), volume / kT * (moment - covariance) / GPA_PER_KJ_MOL_NM3,
        rtol=1e-10, atol=1e-8)
    assert not np.allclose(moment, covariance)  # the shear means of these frames are not zero
