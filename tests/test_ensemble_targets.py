"""Ensemble targets: every estimator's gradient through the frames' energies is exact.

On fixed frames, the reweighted estimator of parameters θ, with the frames' energies under θ
and the sampling's energies as the reference, is an exact function of θ whose derivative at the
sampling parameters is the fluctuation gradient. Central finite differences of that function
must therefore equal the gradient :func:`through_energies` returns to FD accuracy; a gradient
without the −β covariance term of the ensemble's change (the dielectric estimator's, before)
fails that check. The agreement with finite differences of long plain-OpenMM runs is in
``tests/test_train.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from water_systems import tagged_tip3p

from openmm_reversible.errors import InputError
from openmm_reversible.observables.density import density as mass_density
from openmm_reversible.observables.ensemble import (
    ENSEMBLE_OBSERVABLES,
    EnsembleFrames,
    ensemble_average,
    particle_charges,
)
from openmm_reversible.observables.selection import molecules
from openmm_reversible.reweighting import fluctuation_gradient, through_energies
from openmm_reversible.units import KB

TEMPERATURE, PRESSURE = 300.0, 1.0  # K, bar


@pytest.fixture(scope="module")
def water():
    """20 flexible TIP3P waters (charges, LJ and bonds trainable) and 8 frames: the start
    jittered by 0.001 nm and boxes scaled by up to ±1 %."""
    potential, positions, box = tagged_tip3p(20)
    generator = torch.Generator().manual_seed(4)
    n = 8
    frames = positions + 1e-3 * torch.randn((n, *positions.shape), generator=generator,
                                             dtype=positions.dtype)
    boxes = box * (1 + 0.01 * torch.linspace(-1, 1, n, dtype=box.dtype))[:, None, None]
    system = potential.parameters_set.system
    topology = potential.parameters_set.topology
    sampled = EnsembleFrames.from_system(system, frames, boxes, TEMPERATURE, PRESSURE,
                                         molecules(topology, system), "CutoffPeriodic", 78.3)
    return potential, sampled


def _energies(potential, frames: EnsembleFrames) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([potential(x, b) for x, b in zip(frames.positions, frames.boxes,
                                                             strict=True)])


H = 1e-6
"""Step of the central differences, on the scaled parameters."""


@pytest.fixture(scope="module")
def shifted(water):
    """Energies of the frames under the sampling parameters (the reference), and the energies
    and charges under each scaled parameter moved by ±H (reweighted to by the estimators)."""
    potential, frames = water
    parameters = potential.parameters_set
    start = parameters.scaled.detach().clone()
    reference = _energies(potential, frames)
    moved = []
    for k in range(len(start)):
        pair = []
        for sign in (1.0, -1.0):
            scaled = start.clone()
            scaled[k] += sign * H
            with torch.no_grad():
                parameters.scaled.copy_(scaled)
                pair.append((_energies(potential, frames), particle_charges(potential)))
        moved.append(pair)
    with torch.no_grad():
        parameters.scaled.copy_(start)
    return reference, moved


@pytest.mark.parametrize("observable", ENSEMBLE_OBSERVABLES)
def test_gradient_equals_finite_differences_of_the_reweighted_estimator(water, shifted,
                                                                        observable):
    potential, frames = water
    parameters = potential.parameters_set
    reference, moved = shifted

    def estimator(energies):
        return ensemble_average(observable, frames, energies, particle_charges(potential))

    value, (gradient,) = through_energies(estimator, potential, frames.positions,
                                          frames.boxes, [parameters.scaled])
    with torch.no_grad():
        assert float(value) == pytest.approx(float(estimator(reference)), rel=1e-12)
        fd = torch.tensor([
            (float(ensemble_average(observable, frames, *up, reference))
             - float(ensemble_average(observable, frames, *down, reference))) / (2 * H)
            for up, down in moved], dtype=gradient.dtype)
    scale = float(fd.abs().max())
    assert scale > 0
    np.testing.assert_allclose(gradient.numpy(), fd.numpy(), rtol=2e-5, atol=1e-6 * scale)
    if observable == "dielectric":
        # Without the energies only the charges' explicit part is differentiated: the
        # ensemble's change (−β covariance with ∂U/∂θ) is missing and the gradient is wrong.
        explicit = ensemble_average("dielectric", frames, reference,
                                    particle_charges(potential))
        (alone,) = torch.autograd.grad(explicit, [parameters.scaled])
        assert float((alone - fd).abs().max()) > 1e-2 * scale


def test_through_energies_is_the_fluctuation_formula(water):
    """The density by :func:`through_energies` equals the term-by-term fluctuation formula,
    and a direct dependence of the function on the parameters is added to it."""
    potential, frames = water
    parameters = potential.parameters_set
    density, (gradient,) = through_energies(
        lambda u: ensemble_average("density", frames, u), potential, frames.positions,
        frames.boxes, [parameters.scaled])
    mean, (formula,) = fluctuation_gradient(lambda x, box: mass_density(frames.masses, box),
                                            potential, frames.positions, frames.boxes,
                                            TEMPERATURE, [parameters.scaled])
    assert float(density) == pytest.approx(float(mean), rel=1e-12)
    np.testing.assert_allclose(gradient.numpy(), formula.numpy(), rtol=1e-9,
                               atol=1e-12 * float(formula.abs().max()))
    assert float(formula.abs().max()) > 0
    # f = ⟨ρ⟩ + Σθ: the direct part adds one to every component.
    _, (shifted,) = through_energies(
        lambda u: ensemble_average("density", frames, u) + parameters.scaled.sum(),
        potential, frames.positions, frames.boxes, [parameters.scaled])
    np.testing.assert_allclose((shifted - gradient).numpy(), 1.0, rtol=1e-12)


def test_heat_capacity_adds_the_exact_kinetic_part(water):
    """C_p = ⟨δH²⟩/(k_B T² N_mol) + n_dof k_B / (2 N_mol), with H = U + PV."""
    potential, frames = water
    u = _energies(potential, frames)
    v = torch.linalg.det(frames.boxes)
    h = u + PRESSURE * v / 16.6054
    n_mol = len(frames.molecules)
    expected = (float(h.var(unbiased=False)) / (KB * TEMPERATURE ** 2 * n_mol)
                + frames.n_dof * KB / (2 * n_mol)) * 1000
    assert float(ensemble_average("heat_capacity", frames, u)) == pytest.approx(expected,
                                                                                rel=1e-4)
    assert frames.n_dof == 9 * n_mol  # flexible water, no constraints, no CM remover


def test_refusals(water):
    potential, frames = water
    u = _energies(potential, frames)
    nvt = EnsembleFrames(frames.positions, frames.boxes, frames.masses, TEMPERATURE, None,
                         frames.molecules, frames.n_dof)
    with pytest.raises(InputError, match="compressibility is an NPT average: sample with a "
                                         "barostat"):
        ensemble_average("compressibility", nvt, u)
    with pytest.raises(InputError, match="'viscosity' is not an ensemble observable"):
        ensemble_average("viscosity", frames, u)
    with pytest.raises(InputError, match="the dielectric constant needs the particle charges"):
        ensemble_average("dielectric", frames, u)
    # NVT frames: the dielectric constant still works (H = U).
    with torch.no_grad():
        assert float(ensemble_average("dielectric", nvt, u, particle_charges(potential))) > 1


def test_dielectric_target_in_a_fit(tmp_path):
    """A dielectric target of a water box (NVT, reaction field) is an ensemble target of the
    fit: averaged over OpenMM's frames with its standard error, a loss term, and a gradient
    in the oxygen charge (its explicit part and the ensemble's change)."""
    from pathlib import Path

    from openmm_reversible.config import config_from_dict
    from openmm_reversible.train import fit

    xml = Path(__file__).resolve().parent.parent / "examples" / "water" / "water_flexible.xml"
    data = {"forcefield": {"files": [str(xml)]}, "structure": {"water_box": 30},
            "system": {"cutoff": 0.45},
            "simulation": {"temperature": 300.0, "platform": "Reference", "timestep": 0.0005},
            "schedule": {"epochs": 1, "equilibration_steps": 200, "bulk_steps": 400,
                         "ensemble_every": 10, "window_steps": 10, "snapshot_every": 5},
            "output": {"trajectory": "none"},
            "targets": [{"observable": "dielectric", "value": 78.4, "tolerance": 10.0}]}
    (record,) = fit(config_from_dict(data, tmp_path), tmp_path / "out", progress=False).records
    value = record["observables"]["dielectric"]
    assert 1 < value < 1000 and record["stderr"]["dielectric"] > 0
    assert record["terms"]["dielectric"] == pytest.approx(((value - 78.4) / 10.0) ** 2,
                                                          rel=1e-12)
    assert record["timings"]["windows"] == []  # no window target: OpenMM frames only
    assert abs(record["gradient"]["Atom/charge/tip3p-O"]) > 0
