"""Fluctuation-formula gradients: an exactly sampled harmonic oscillator with a closed-form
answer, agreement of the two estimators, finite differences of the reweighting estimator,
effective sample size and input errors."""

import numpy as np
import pytest
import torch

from openmm_reversible.errors import InputError
from openmm_reversible.observables import frame_energies
from openmm_reversible.reweighting import (
    effective_sample_size,
    fluctuation_gradient,
    reweighted_average,
)
from openmm_reversible.units import KB

TEMPERATURE = 300.0
KT = KB * TEMPERATURE


def harmonic(k):
    """U = k/2 Σ|x|² over atoms, kJ/mol; ``k`` in kJ/mol/nm²."""
    return lambda x, box: 0.5 * k * (x ** 2).sum()


def boltzmann_samples(k, n_frames, n_atoms=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_frames, n_atoms, 3, generator=gen, dtype=torch.float64) * np.sqrt(KT / k)


def test_harmonic_oscillator_closed_form():
    """⟨|x|²⟩ = 3kT/k, so d⟨|x|²⟩/dk = -3kT/k²; samples drawn exactly from Boltzmann."""
    k0 = 500.0
    k = torch.tensor(k0, dtype=torch.float64, requires_grad=True)
    frames = boltzmann_samples(k0, 20000)
    mean, (grad,) = fluctuation_gradient(lambda x, box: (x ** 2).sum(), harmonic(k), frames,
                                         None, TEMPERATURE, [k])
    assert float(mean) == pytest.approx(3 * KT / k0, rel=0.03)
    # Relative standard error of the sampled variance of a χ²₃ variable: sqrt(6/n) ≈ 1.7%.
    assert float(grad) == pytest.approx(-3 * KT / k0 ** 2, rel=0.06)


def test_formula_and_reweighted_average_agree():
    """Same gradient from the explicit formula and from autograd of the reweighted average,
    for an observable that also depends on the parameters explicitly."""
    frames = boltzmann_samples(400.0, 50, n_atoms=3, seed=1)
    k = torch.tensor(400.0, dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)

    def potential(x, box):
        return 0.5 * k * ((x - shift) ** 2).sum()

    def observable(x, box):
        return potential(x, box) / 3 + (x[0] * shift).sum()

    mean, grads = fluctuation_gradient(observable, potential, frames, None, TEMPERATURE,
                                       [k, shift])
    values = torch.stack([observable(x, None) for x in frames])
    average = reweighted_average(values, frame_energies(potential, frames), TEMPERATURE)
    assert float(average.detach()) == pytest.approx(float(mean), rel=1e-14)
    autograd = torch.autograd.grad(average, [k, shift])
    for g_formula, g_autograd in zip(grads, autograd, strict=True):
        torch.testing.assert_close(g_formula, g_autograd, rtol=1e-10, atol=1e-12)


def test_reweighted_average_gradient_matches_finite_differences():
    """With fixed samples and reference energies, the reweighting estimator is a smooth
    function of the parameters whose derivative at the sampling point is the formula."""
    frames = boltzmann_samples(300.0, 40, seed=2)
    reference = frame_energies(harmonic(300.0), frames).detach()

    def estimate(k):
        values = (frames ** 2).sum(dim=(1, 2))[:, None] * torch.tensor([1.0, 2.0])
        return reweighted_average(values.to(k.dtype), frame_energies(harmonic(k), frames),
                                  TEMPERATURE, reference)

    k = torch.tensor(300.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(estimate, (k,), eps=1e-4, atol=1e-10, rtol=1e-6)
    mean_at_k0 = estimate(k).detach()
    torch.testing.assert_close(mean_at_k0[0], (frames ** 2).sum(dim=(1, 2)).mean())


def test_effective_sample_size():
    frames = boltzmann_samples(300.0, 100, seed=3)
    reference = frame_energies(harmonic(300.0), frames)
    assert float(effective_sample_size(reference, TEMPERATURE, reference)) == pytest.approx(100)
    moved = frame_energies(harmonic(450.0), frames)
    w = np.exp(-(moved - reference).numpy() / KT)
    w /= w.sum()
    ess = float(effective_sample_size(moved, TEMPERATURE, reference))
    assert ess == pytest.approx(1 / np.sum(w ** 2), rel=1e-12)
    assert ess < 90


def test_input_errors():
    frames = boltzmann_samples(300.0, 4)
    k = torch.tensor(300.0, dtype=torch.float64, requires_grad=True)
    energies = frame_energies(harmonic(k), frames)
    with pytest.raises(InputError, match="temperature must be positive"):
        reweighted_average(torch.zeros(4), energies, 0.0)
    with pytest.raises(InputError, match="need one entry per frame"):
        reweighted_average(torch.zeros(3), energies, TEMPERATURE)
    with pytest.raises(InputError, match="reference_energies \\(3,\\) and energies \\(4,\\)"):
        reweighted_average(torch.zeros(4), energies, TEMPERATURE, torch.zeros(3))
    with pytest.raises(InputError, match="requires_grad=True"):
        fluctuation_gradient(lambda x, b: x.sum(), harmonic(k), frames, None, TEMPERATURE,
                             [torch.tensor(1.0)])
    with pytest.raises(InputError, match="one number per frame"):
        fluctuation_gradient(lambda x, b: x[0], harmonic(k), frames, None, TEMPERATURE, [k])
