"""Ensemble reweighting: the fluctuation-formula gradient, the baseline to reversible training.

For frames sampled from the Boltzmann distribution of a potential U_θ at temperature T, the
derivative of an ensemble average of a per-frame observable ℓ (which may itself depend on θ) is

    ∇_θ⟨ℓ⟩ = ⟨∂ℓ/∂θ⟩ - β (⟨ℓ ∂U/∂θ⟩ - ⟨ℓ⟩⟨∂U/∂θ⟩),      β = 1 / (k_B T).

It needs no differentiation through the dynamics, only energies of stored frames, but it holds
only for equilibrium averages (not for dynamical observables such as diffusion) and its
statistical noise grows with the size of the system.

Three routes are provided:

- :func:`fluctuation_gradient` evaluates the formula term by term (one parameter gradient of U
  and of ℓ per frame), the textbook baseline;
- :func:`reweighted_average` is the Zwanzig reweighting estimator
  ``Σ_s w_s ℓ_s`` with ``w = softmax(-β (U_θ - U_ref))``. With the reference energies equal to
  the current ones (the default) its value is the plain mean and its autograd gradient is
  exactly the formula above, so any loss of reweighted averages can simply call
  ``.backward()``; it also works for vector observables (e.g. a per-frame g(r)). With
  reference energies from the sampling parameters it reweights to nearby parameters;
  :func:`effective_sample_size` tells how far that can be trusted;
- :func:`through_energies` differentiates any function of the frames' energies (such as a
  fluctuation estimator built on reweighted averages, a function of several of them, or a
  loss of those) without keeping one autograd graph per frame: it takes ``∂f/∂U_s`` from
  autograd on the energies as a leaf, then chains it through each frame's ``∂U_s/∂θ``, one
  frame at a time (memory of one energy graph, as :func:`fluctuation_gradient`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import InputError
from .observables.energy import Potential
from .observables.frames import box_of_frame, check_box, check_frames
from .observables.thermodynamics import boltzmann_log_weights, inverse_temperature


def reweighted_average(values: torch.Tensor, energies: torch.Tensor, temperature: float,
                       reference_energies: torch.Tensor | None = None) -> torch.Tensor:
    """Boltzmann-reweighted average of per-frame values.

    Parameters
    ----------
    values : torch.Tensor, shape (n_frames, ...)
        Per-frame observable ℓ_s (scalar or any shape per frame).
    energies : torch.Tensor, shape (n_frames,), kJ/mol
        Potential energy of each frame under the current parameters (differentiable).
    temperature : float, K
    reference_energies : torch.Tensor, shape (n_frames,), kJ/mol, optional
        Energies under the parameters that generated the frames; default: ``energies``
        detached (frames from the current parameters).

    Returns
    -------
    torch.Tensor, shape (...)
        ``Σ_s w_s ℓ_s``; its gradient is ⟨∂ℓ/∂θ⟩ - β cov(ℓ, ∂U/∂θ) under the weights.
    """
    weights = boltzmann_log_weights(energies, temperature, reference_energies).exp()
    if values.shape[:1] != energies.shape:
        raise InputError(f"values {tuple(values.shape)} need one entry per frame "
                         f"({energies.shape[0]})")
    return torch.tensordot(weights.to(values.dtype), values, dims=1)


def effective_sample_size(energies: torch.Tensor, temperature: float,
                          reference_energies: torch.Tensor) -> torch.Tensor:
    """Kish effective sample size ``1 / Σ w_s²`` of the reweighting weights (0-dim).

    Equal to the number of frames when the parameters have not moved; a small fraction of it
    means the reweighted averages are dominated by a few frames and new samples are needed.
    """
    log_w = boltzmann_log_weights(energies.detach(), temperature, reference_energies)
    return 1.0 / torch.exp(2 * log_w).sum()


def fluctuation_gradient(observable: Callable[[torch.Tensor, torch.Tensor | None],
                                              torch.Tensor],
                         potential: Potential, positions: torch.Tensor, box,
                         temperature: float, parameters: Sequence[torch.Tensor]
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Ensemble average of a per-frame observable and its parameter gradient by the formula.

    Parameters
    ----------
    observable : callable
        ``observable(positions (N, 3), box) -> 0-dim tensor`` for one frame; may depend on the
        parameters (e.g. an energy per molecule).
    potential : callable
        ``potential(positions (N, 3), box) -> energy`` kJ/mol, depending on ``parameters``.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
        Frames sampled with the current parameters (treated as constants).
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm, or None
    temperature : float, K
        Temperature of the sampled ensemble.
    parameters : sequence of torch.Tensor
        Leaves with ``requires_grad=True``.

    Returns
    -------
    average : torch.Tensor, 0-dim
        ⟨ℓ⟩ over the frames (detached).
    gradients : list of torch.Tensor
        ∇_θ⟨ℓ⟩ = ⟨∂ℓ/∂θ⟩ - β(⟨ℓ ∂U/∂θ⟩ - ⟨ℓ⟩⟨∂U/∂θ⟩), one per parameter, same shapes.
    """
    positions, box, parameters = _fixed_frames(positions, box, parameters)
    beta = inverse_temperature(temperature)
    values, d_values, d_energies = [], [], []
    for s in range(positions.shape[0]):
        frame_box = box_of_frame(box, s)
        value = observable(positions[s], frame_box)
        if value.numel() != 1:
            raise InputError(f"observable must return one number per frame, got shape "
                             f"{tuple(value.shape)}; use reweighted_average for vector "
                             f"observables")
        energy = potential(positions[s], frame_box)
        d_values.append(_grads(value, parameters))
        d_energies.append(_grads(energy, parameters))
        values.append(value.detach().reshape(()))
    ell = torch.stack(values)
    mean = ell.mean()
    gradients = []
    for k in range(len(parameters)):
        dl = torch.stack([g[k] for g in d_values])
        du = torch.stack([g[k] for g in d_energies])
        weights = (ell - mean).reshape(-1, *([1] * (du.ndim - 1)))
        gradients.append(dl.mean(0) - beta * (weights * du).mean(0))
    return mean, gradients


def through_energies(function: Callable[[torch.Tensor], torch.Tensor], potential: Potential,
                     positions: torch.Tensor, box, parameters: Sequence[torch.Tensor]
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A scalar function of the frames' potential energies and its total parameter gradient.

    With ``U_s = potential(positions[s], box_s)`` on fixed frames, the gradient is

        df/dθ = ∂f/∂θ + Σ_s (∂f/∂U_s) ∂U_s/∂θ,

    where ``∂f/∂θ`` is the dependence of ``function`` on the parameters other than through the
    energies (e.g. trainable charges in a dipole moment). For ``f`` built on reweighted
    averages (weights ``softmax(-β(U - U_ref))``, ``U_ref = U`` detached) this is the
    fluctuation formula ``⟨∂A/∂θ⟩ - β(⟨A ∂U/∂θ⟩ - ⟨A⟩⟨∂U/∂θ⟩)`` of every average in ``f``,
    chained through ``f``.

    Parameters
    ----------
    function : callable
        ``function(energies (n_frames,) kJ/mol) -> 0-dim tensor``; differentiable in the
        energies (a leaf it receives) and in ``parameters``.
    potential : callable
        ``potential(positions (N, 3), box) -> energy`` kJ/mol, depending on ``parameters``.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
        Frames sampled with the current parameters (treated as constants).
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm, or None
    parameters : sequence of torch.Tensor
        Leaves with ``requires_grad=True``.

    Returns
    -------
    value : torch.Tensor, 0-dim
        ``function(U)`` (detached).
    gradients : list of torch.Tensor
        ``df/dθ``, one per parameter, same shapes.
    """
    positions, box, parameters = _fixed_frames(positions, box, parameters)
    values, d_energies = [], []
    for s in range(positions.shape[0]):
        energy = potential(positions[s], box_of_frame(box, s))
        d_energies.append(_grads(energy, parameters))
        values.append(energy.detach().reshape(()))
    energies = torch.stack(values).requires_grad_(True)
    value = function(energies)
    if value.numel() != 1:
        raise InputError(f"function must return one number, got shape {tuple(value.shape)}")
    if not value.requires_grad:
        return value.detach().reshape(()), [torch.zeros_like(p) for p in parameters]
    grads = torch.autograd.grad(value.reshape(()), [energies, *parameters], allow_unused=True)
    d_value = torch.zeros_like(energies) if grads[0] is None else grads[0]
    gradients = []
    for k, p in enumerate(parameters):
        direct = torch.zeros_like(p) if grads[k + 1] is None else grads[k + 1]
        du = torch.stack([g[k] for g in d_energies])
        gradients.append(direct + torch.tensordot(d_value, du, dims=1))
    return value.detach().reshape(()), gradients


def _fixed_frames(positions, box, parameters):
    """Frames and boxes checked and detached (constants), and the parameters checked to be
    leaves that require grad."""
    positions = check_frames(positions).detach()
    box = check_box(box, positions.shape[0], positions)
    box = None if box is None else box.detach()
    parameters = list(parameters)
    if not parameters or not all(p.requires_grad for p in parameters):
        raise InputError("parameters must be a non-empty sequence of tensors with "
                         "requires_grad=True")
    return positions, box, parameters


def _grads(output: torch.Tensor, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂output/∂parameters with zeros for parameters the output does not depend on."""
    if not output.requires_grad:
        return [torch.zeros_like(p) for p in parameters]
    grads = torch.autograd.grad(output.reshape(()), parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, parameters,
                                                                      strict=True)]
