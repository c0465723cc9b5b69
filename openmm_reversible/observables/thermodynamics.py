"""Thermodynamic response functions from the fluctuations of NPT samples, and their gradients.

From S frames of an isothermal-isobaric (NPT) simulation at temperature T and pressure P, with
volumes V (nm³) and enthalpies H = U + PV (kJ/mol, per mole of boxes; U the potential energy,
optionally plus the kinetic energy, see :func:`enthalpy`), the standard fluctuation estimators
(Allen & Tildesley, *Computer Simulation of Liquids*, 2nd ed., §2.5) are

    isothermal compressibility  κ_T = ⟨δV²⟩ / (k_B T ⟨V⟩)                      1/bar
    thermal expansion           α   = ⟨δV δH⟩ / (k_B T² ⟨V⟩)                   1/K
    isobaric heat capacity      C_p = ⟨δH²⟩ / (k_B T² N_mol)                  J/(mol K)

with δX = X - ⟨X⟩ and C_p per mole of molecules. They are the estimators ForceBalance fits
(its Liquid target). C_p here is the classical value of the model as simulated; the usual
corrections (a quantum correction for the intramolecular vibrations, computed from normal-mode
frequencies, and the kinetic-energy term when H holds the potential energy only) are left to the
user: add them to the value, they do not depend on the samples.

Gradients: the fluctuation formula for second moments
------------------------------------------------------
Every average here is a Boltzmann-reweighted average ⟨a⟩ = Σ_s w_s a_s with
``w = softmax(-β (H - H_ref))`` and ``H_ref = H`` detached by default, so the value is the plain
mean and autograd through ``H`` (computed from a differentiable potential, e.g. the torch twin
of the System, on the fixed frames) gives, for any per-frame ``a`` and U' = ∂U/∂θ,

    d⟨a⟩/dθ = ⟨∂a/∂θ⟩ - β (⟨a U'⟩ - ⟨a⟩⟨U'⟩).

In NPT the Boltzmann factor is exp(-β(U + PV)) and ∂H/∂θ = U' on fixed frames, so H and U
give the same weights' gradient. Applied to the estimators as functions of ensemble averages
(not to the exact ensemble quantities), the chain rule gives their exact derivatives, which is
what autograd returns (``tests/test_observables_thermodynamics.py`` checks it against these
formulas term by term):

    dκ_T/dθ = -β / (k_B T ⟨V⟩) · (⟨δV² δU'⟩ - k_B T κ_T ⟨δV δU'⟩)
    dα/dθ   = (⟨δV δU'⟩ - β ⟨δV δH δU'⟩ + β α k_B T² ⟨δV δU'⟩) / (k_B T² ⟨V⟩)
    dC_p/dθ = (2 ⟨δH δU'⟩ - β ⟨δH² δU'⟩) / (k_B T² N_mol)

(κ_T and α in MD units inside these formulas; the functions convert at the end). The
gradient is that of the equilibrium average only if the frames are equilibrium samples at the
current parameters; it needs no differentiation through the dynamics, so the box may change
from frame to frame (a barostat), which the reversible integrator cannot follow.

Uncertainties
-------------
:func:`uncertainty` gives, for any of these estimators (and any other function of reweighted
averages that takes ``enthalpies`` and ``reference_enthalpies``), a standard error by block
averaging (the estimator evaluated on each block) and one from the statistical inefficiency
of the estimator's influence series ψ_s (its linearisation in the frames, obtained by
differentiating with respect to the frame weights), ``SE = sqrt(g_ψ ⟨ψ²⟩ / S)``.

Inputs are plain tensors in MD units; results are 0-dim float64 tensors differentiable in
``enthalpies``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..units import DTYPE, KB
from .blocking import block_average, block_slices, statistical_inefficiency
from .density import BAR_PER_KJ_MOL_NM3

J_PER_KJ = 1000.0
"""Joules per kilojoule (C_p is reported in J/(mol K))."""


def inverse_temperature(temperature: float) -> float:
    """β = 1 / (k_B T), mol/kJ, for a temperature in K (checked positive)."""
    if not temperature > 0:
        raise InputError(f"temperature must be positive (K), got {temperature!r}")
    return 1.0 / (KB * float(temperature))


def boltzmann_log_weights(energies: torch.Tensor, temperature: float,
                          reference_energies: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised log-weights ``log_softmax(-β (E - E_ref))`` of frames, shape (n_frames,).

    Parameters
    ----------
    energies : torch.Tensor, shape (n_frames,), kJ/mol
        Energies (or, in NPT, enthalpies) under the current parameters, differentiable.
    temperature : float, K
    reference_energies : torch.Tensor, shape (n_frames,), kJ/mol, optional
        The same under the parameters that generated the frames; default ``energies``
        detached (uniform weights whose gradient is the fluctuation formula).
    """
    if energies.ndim != 1 or energies.numel() == 0:
        raise InputError(f"energies must have shape (n_frames,), got {tuple(energies.shape)}")
    reference = energies.detach() if reference_energies is None else torch.as_tensor(
        reference_energies, dtype=energies.dtype, device=energies.device)
    if reference.shape != energies.shape:
        raise InputError(f"reference_energies {tuple(reference.shape)} and energies "
                         f"{tuple(energies.shape)} must have the same shape")
    return torch.log_softmax(-inverse_temperature(temperature) * (energies - reference), dim=0)


def enthalpy(potential_energies: torch.Tensor, volumes, pressure: float,
             kinetic_energies=None) -> torch.Tensor:
    """Instantaneous enthalpy ``H = U (+ K) + P V`` of every frame, kJ/mol.

    Parameters
    ----------
    potential_energies : torch.Tensor, shape (n_frames,), kJ/mol
        U of each frame, e.g. :func:`~openmm_reversible.observables.frame_energies` of the
        twin potential (then H carries the parameter gradient).
    volumes : array-like, shape (n_frames,), nm³
        Box volume of each frame (e.g. :func:`~.frames.volumes` of per-frame boxes).
    pressure : float, bar
        The barostat's pressure.
    kinetic_energies : array-like, shape (n_frames,), kJ/mol, optional
        K of each frame. It does not change κ_T or α (K is independent of the configuration),
        but adds its fluctuation to C_p: include it for the full classical C_p, or leave it
        out and add ``n_dof k_B / (2 N_mol)`` (the exact classical kinetic part) yourself.
    """
    u = _series(potential_energies, "potential_energies", None)
    v = _series(volumes, "volumes", u.shape[0])
    h = u + float(pressure) * v / BAR_PER_KJ_MOL_NM3
    if kinetic_energies is not None:
        h = h + _series(kinetic_energies, "kinetic_energies", v.shape[0])
    return h


def isothermal_compressibility(volumes, enthalpies: torch.Tensor, temperature: float,
                               reference_enthalpies: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """κ_T = ⟨δV²⟩ / (k_B T ⟨V⟩), 1/bar (water at 298 K: 4.5e-5 /bar).

    Parameters
    ----------
    volumes : array-like, shape (n_frames,), nm³
    enthalpies : torch.Tensor, shape (n_frames,), kJ/mol
        H of each frame (:func:`enthalpy`); enters through the Boltzmann weights only, which
        carry the parameter gradient.
    temperature : float, K
    reference_enthalpies : torch.Tensor, shape (n_frames,), kJ/mol, optional
        H under the sampling parameters, to reweight to nearby parameters; default
        ``enthalpies`` detached.

    Returns
    -------
    torch.Tensor, 0-dim, 1/bar
    """
    w, v, _ = _weighted(volumes, enthalpies, temperature, reference_enthalpies)
    return _covariance(w, v, v) / (KB * float(temperature) * (w @ v)) / BAR_PER_KJ_MOL_NM3


def thermal_expansion(volumes, enthalpies: torch.Tensor, temperature: float,
                      reference_enthalpies: torch.Tensor | None = None) -> torch.Tensor:
    """α = ⟨δV δH⟩ / (k_B T² ⟨V⟩), 1/K (water at 298 K: 2.6e-4 /K).

    Parameters are those of :func:`isothermal_compressibility`; here H enters both the
    weights and the cross fluctuation.

    Returns
    -------
    torch.Tensor, 0-dim, 1/K
    """
    w, v, h = _weighted(volumes, enthalpies, temperature, reference_enthalpies)
    return _covariance(w, v, h) / (KB * float(temperature) ** 2 * (w @ v))


def heat_capacity(enthalpies: torch.Tensor, temperature: float, n_molecules: int,
                  reference_enthalpies: torch.Tensor | None = None) -> torch.Tensor:
    """C_p = ⟨δH²⟩ / (k_B T² N_mol), J/(mol K) per mole of molecules.

    Classical and uncorrected (water at 298 K, experiment: 75.3 J/(mol K); a classical
    flexible model is far off without the quantum correction of its vibrations).

    Parameters
    ----------
    enthalpies : torch.Tensor, shape (n_frames,), kJ/mol
        H of each frame (:func:`enthalpy`), with or without the kinetic energy (see there).
    temperature : float, K
    n_molecules : int
        Molecules in the box (C_p is per mole of molecules).
    reference_enthalpies : torch.Tensor, shape (n_frames,), kJ/mol, optional
        As in :func:`isothermal_compressibility`.

    Returns
    -------
    torch.Tensor, 0-dim, J/(mol K)
    """
    if int(n_molecules) != n_molecules or n_molecules < 1:
        raise InputError(f"n_molecules must be a positive integer, got {n_molecules!r}")
    w, _, h = _weighted(None, enthalpies, temperature, reference_enthalpies)
    return _covariance(w, h, h) * J_PER_KJ / (KB * float(temperature) ** 2 * int(n_molecules))


@dataclass(frozen=True)
class Estimate:
    """A fluctuation estimate with its uncertainty, in the estimator's units.

    Attributes
    ----------
    value : float
        The estimator on all frames.
    stderr : float
        Standard error by block averaging: the estimator on each of ``n_blocks`` contiguous
        blocks, std (ddof 1) of those / sqrt(n_blocks).
    stderr_inefficiency : float
        Standard error ``sqrt(g ⟨ψ²⟩ / S)`` from the influence series ψ and its statistical
        inefficiency g.
    statistical_inefficiency : float
        g of the influence series, in frames (S / g independent samples).
    n_blocks : int
    """

    value: float
    stderr: float
    stderr_inefficiency: float
    statistical_inefficiency: float
    n_blocks: int


def uncertainty(estimator: Callable[..., torch.Tensor], series: Mapping[str, object],
                temperature: float, n_blocks: int = 5, **constants) -> Estimate:
    """Value and standard errors of a fluctuation estimator over correlated frames.

    Parameters
    ----------
    estimator : callable
        Called as ``estimator(**series, temperature=temperature, **constants,
        reference_enthalpies=...)`` and returning
        a 0-dim tensor: :func:`isothermal_compressibility`, :func:`thermal_expansion`,
        :func:`heat_capacity`, or any function of reweighted averages with those keywords.
    series : mapping of str to array-like, shape (n_frames,)
        The per-frame arguments, sliced into blocks; must hold ``enthalpies``.
    temperature : float, K
        The ensemble's temperature (passed to the estimator).
    n_blocks : int, default 5
        Blocks for the block-averaging error (each should be longer than the correlation time).
    **constants
        Other arguments passed unchanged (``n_molecules``).

    Returns
    -------
    Estimate

    Examples
    --------
    >>> alpha = uncertainty(thermal_expansion, {"volumes": v, "enthalpies": h}, 298.15)
    >>> alpha.value, alpha.stderr                                       # 1/K
    """
    if "enthalpies" not in series:
        raise InputError(f"uncertainty needs the per-frame 'enthalpies' among the series (the "
                         f"estimator's Boltzmann weights), got {sorted(series)}")
    arrays = {name: _series(values, name, None).detach() for name, values in series.items()}
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    n_frames = lengths["enthalpies"]
    if set(lengths.values()) != {n_frames}:
        raise InputError(f"the series must all have one value per frame, got lengths {lengths}")
    # Influence series: ψ_s = S · ∂f/∂(log w_s), and perturbing H_ref by δ perturbs log w by βδ.
    reference = arrays["enthalpies"].clone().requires_grad_(True)
    constants["temperature"] = temperature
    value = estimator(**arrays, **constants, reference_enthalpies=reference)
    (d_reference,) = torch.autograd.grad(value, reference)
    psi = (d_reference * n_frames / inverse_temperature(temperature)).numpy()
    g = statistical_inefficiency(psi) if np.any(psi != 0) else 1.0
    with torch.no_grad():
        blocks = [float(estimator(**{k: a[s] for k, a in arrays.items()}, **constants))
                  for s in block_slices(n_frames, n_blocks)]
    _, block_error = block_average(np.asarray(blocks), n_blocks)
    return Estimate(value=float(value.detach()), stderr=float(block_error),
                    stderr_inefficiency=math.sqrt(g * float(np.mean(psi ** 2)) / n_frames),
                    statistical_inefficiency=g, n_blocks=int(n_blocks))


def _series(values, name: str, n_frames: int | None) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=DTYPE)
    if t.ndim != 1 or t.numel() == 0 or (n_frames is not None and t.shape[0] != n_frames):
        wanted = "n_frames" if n_frames is None else n_frames
        raise InputError(f"{name} must have shape ({wanted},) (one value per frame), got "
                         f"{tuple(t.shape)}")
    return t


def _weighted(volumes, enthalpies, temperature, reference_enthalpies):
    """(weights, volumes, enthalpies) with shapes checked; the weights are differentiable."""
    h = _series(enthalpies, "enthalpies", None)
    if h.shape[0] < 2:
        raise InputError("a fluctuation estimator needs at least two frames")
    v = None if volumes is None else _series(volumes, "volumes", h.shape[0])
    if v is not None and not bool((v > 0).all()):
        raise InputError("volumes must be positive (nm³); got a value <= 0")
    return boltzmann_log_weights(h, temperature, reference_enthalpies).exp(), v, h


def _covariance(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Weighted covariance Σ w (a - ⟨a⟩)(b - ⟨b⟩) (equal to ⟨ab⟩ - ⟨a⟩⟨b⟩)."""
    return w @ ((a - w @ a) * (b - w @ b))
