"""The reweighting gradient of trajectory observables (reweighting.start_reweighting_gradient)
and the ``benchmark o2-diffusion`` command that compares it with reversible gradients."""

import json

import numpy as np
import pytest
import torch

from openmm_reversible.cli import main
from openmm_reversible.errors import InputError
from openmm_reversible.observables.thermodynamics import inverse_temperature
from openmm_reversible.reweighting import (
    reweighted_average,
    start_reweighting_gradient,
    through_energies,
)

TEMPERATURE = 300.0  # K


def harmonic(theta: torch.Tensor):
    """U = θ |x|² / 2 of one particle (kJ/mol, θ in kJ/mol/nm²)."""
    return lambda positions, box: 0.5 * theta * (positions ** 2).sum()


def test_start_reweighting_gradient_matches_the_analytic_derivative():
    """Starts from exp(-βθ|x|²/2) (σ² = k_B T / θ per component) and L = |x|²: ⟨L⟩ = 3 k_B T / θ,
    so d⟨L⟩/dθ = -3 k_B T / θ²; the estimator is within four of its own standard errors of that,
    and the standard error is small."""
    theta = torch.tensor(1000.0, dtype=torch.float64, requires_grad=True)
    kt = 1.0 / inverse_temperature(TEMPERATURE)
    rng = np.random.default_rng(5)
    starts = torch.tensor(rng.normal(0.0, (kt / 1000.0) ** 0.5, size=(4000, 1, 3)))
    values = (starts ** 2).sum((1, 2))
    mean, (gradient,), (stderr,) = start_reweighting_gradient(
        values, harmonic(theta), starts, None, TEMPERATURE, [theta])
    exact = -3 * kt / 1000.0 ** 2
    assert float(mean) == pytest.approx(3 * kt / 1000.0, rel=0.05)
    assert abs(float(gradient) - exact) < 4 * float(stderr)
    assert float(stderr) < 0.1 * abs(exact)


def test_start_reweighting_gradient_is_the_derivative_of_the_reweighted_average():
    """On fixed starts and values, the estimator equals autograd through the Zwanzig average
    (through_energies) to round-off and a central finite difference of that average in θ."""
    theta = torch.tensor(800.0, dtype=torch.float64, requires_grad=True)
    rng = np.random.default_rng(2)
    starts = torch.tensor(rng.normal(0.0, 0.05, size=(12, 2, 3)))
    values = torch.tensor(rng.normal(1.0, 0.5, size=12))
    _, (gradient,), _ = start_reweighting_gradient(values, harmonic(theta), starts, None,
                                                   TEMPERATURE, [theta])
    _, (through,) = through_energies(lambda u: reweighted_average(values, u, TEMPERATURE),
                                     harmonic(theta), starts, None, [theta])
    assert float(gradient) == pytest.approx(float(through), rel=1e-12)

    def average(value: float) -> float:
        energies = 0.5 * value * (starts ** 2).sum((1, 2))
        reference = 0.5 * 800.0 * (starts ** 2).sum((1, 2))
        return float(reweighted_average(values, energies, TEMPERATURE, reference))

    h = 1e-3
    assert float(gradient) == pytest.approx((average(800.0 + h) - average(800.0 - h)) / (2 * h),
                                            rel=1e-7)


def test_start_reweighting_gradient_needs_one_value_per_start():
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    starts = torch.zeros(3, 1, 3, dtype=torch.float64)
    with pytest.raises(InputError, match=r"one entry per start \(3\)"):
        start_reweighting_gradient(torch.ones(2), harmonic(theta), starts, None, TEMPERATURE,
                                   [theta])


def test_o2_diffusion_benchmark_writes_both_fits(tmp_path, capsys):
    """``benchmark o2-diffusion`` at a tiny size: both chains' records are finite and complete,
    their first epoch (same parameters and seeds) saw the same windows, so the same D and the
    same reweighting gradient, and each chain moved its parameters."""
    code = main(["benchmark", "o2-diffusion", "--n-o2", "2", "--box-size", "1.4", "--cutoff",
                 "0.6", "--epochs", "2", "--windows", "3", "--window-steps", "10",
                 "--snapshot-every", "2", "--equilibration-steps", "50", "--bulk-steps", "20",
                 "--output", str(tmp_path), "--json", "--no-progress"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((tmp_path / "o2_diffusion.json").read_text())
    assert (tmp_path / "o2_diffusion.png").stat().st_size > 0
    assert record["parameters"] == ["Atom/sigma/o2-O", "Atom/epsilon/o2-O"]
    common = {"values", "D", "loss", "msd_exponent", "reweighting_gradient",
              "reweighting_gradient_stderr", "final_values"}
    assert set(record["reweighting"]) == common
    assert set(record["reversible"]) == common | {"reversible_gradient",
                                                  "reversible_gradient_stderr",
                                                  "reversible_gradient_windows"}
    for name in ("reversible", "reweighting"):
        chain = record[name]
        for key in common:
            assert np.isfinite(np.asarray(chain[key], dtype=float)).all(), (name, key)
        assert np.asarray(chain["D"]).shape == (2, 3)
        assert np.asarray(chain["reweighting_gradient"]).shape == (2, 2)
        assert chain["values"][0] == pytest.approx([0.3297, 0.438])
        assert chain["final_values"] != chain["values"][0]
    reversible, reweighting = record["reversible"], record["reweighting"]
    assert np.isfinite(reversible["reversible_gradient_windows"]).all()
    assert reversible["D"][0] == reweighting["D"][0]
    assert reversible["reweighting_gradient"][0] == reweighting["reweighting_gradient"][0]


def test_o2_diffusion_benchmark_needs_three_windows():
    from openmm_reversible.benchmarks.o2_diffusion import measure

    with pytest.raises(InputError, match="--windows must be >= 3, got 2"):
        measure(windows=2)
