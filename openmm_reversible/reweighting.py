"""Ensemble reweighting: the fluctuation-formula gradient, the baseline to reversible training.

For frames sampled from the Boltzmann distribution of a potential U_θ at temperature T, the
derivative of an ensemble average of a per-frame observable ℓ (which may itself depend on θ) is

    ∇_θ⟨ℓ⟩ = ⟨∂ℓ/∂θ⟩ - β (⟨ℓ ∂U/∂θ⟩ - ⟨ℓ⟩⟨∂U/∂θ⟩),      β = 1 / (k_B T).

It needs no differentiation through the dynamics, only energies of stored frames, but it holds
only for equilibrium averages (for a dynamical observable such as diffusion it misses how the
parameters change the dynamics) and its statistical noise grows with the size of the system.

Four routes are provided:

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
  frame at a time (memory of one energy graph, as :func:`fluctuation_gradient`);
- :func:`start_reweighting_gradient` is the reweighting gradient of an observable of whole
  trajectories (such as a window's diffusion coefficient): each trajectory weighted by the
  Boltzmann factor of its start configuration, the dynamics held fixed. It is the baseline
  that reversible gradients of dynamical observables are compared with.
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
    energies, d_energies = frame_energy_gradients(potential, positions, box, parameters)
    parameters = list(parameters)
    energies = energies.requires_grad_(True)
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
        gradients.append(direct + torch.tensordot(d_value, d_energies[k], dims=1))
    return value.detach().reshape(()), gradients


def frame_energy_gradients(potential: Potential, positions: torch.Tensor, box,
                           parameters: Sequence[torch.Tensor]
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Potential energy of each fixed frame and its parameter gradient, one frame at a time.

    Parameters
    ----------
    potential : callable
        ``potential(positions (N, 3), box) -> energy`` kJ/mol, depending on ``parameters``.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
        Frames (treated as constants).
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm, or None
    parameters : sequence of torch.Tensor
        Leaves with ``requires_grad=True``.

    Returns
    -------
    energies : torch.Tensor, shape (n_frames,), kJ/mol
        Detached.
    gradients : list of torch.Tensor
        ``∂U_s/∂θ`` of each parameter, shape ``(n_frames, *parameter.shape)``, kJ/mol per unit
        of the parameter (zeros where the energy does not depend on it).
    """
    positions, box, parameters = _fixed_frames(positions, box, parameters)
    energies, d_energies = [], []
    for s in range(positions.shape[0]):
        energy = potential(positions[s], box_of_frame(box, s))
        d_energies.append(_grads(energy, parameters))
        energies.append(energy.detach().reshape(()))
    return torch.stack(energies), [torch.stack([g[k] for g in d_energies])
                                   for k in range(len(parameters))]


def start_reweighting_gradient(values: torch.Tensor, potential: Potential,
                               starts: torch.Tensor, box, temperature: float,
                               parameters: Sequence[torch.Tensor]
                               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Reweighting gradient of a trajectory observable through its start configurations.

    Window ``w`` starts at ``x_w``, drawn from ``exp(-β U_θ(x)) / Z`` (Maxwell–Boltzmann
    velocities and the integrator's noise do not depend on θ), and yields one number ``L_w``
    of its whole trajectory (e.g. the loss of its diffusion coefficient). Weighting the starts
    by their Boltzmann factor and keeping the dynamics fixed gives

        d⟨L⟩/dθ |_dynamics fixed = -β cov_w(L_w, ∂U/∂θ(x_w)),

    the ensemble-reweighting gradient (a fluctuation formula with ``∂L/∂θ = 0``). It ignores
    how θ changes the trajectory that follows each start, which is what a gradient through the
    dynamics (the reversible window's) supplies: the full derivative is the sum of the two,
    ``⟨∂L_w/∂θ |_{x_w fixed}⟩ - β cov_w(L_w, ∂U/∂θ(x_w))``.

    Why the start and not every frame of the window: the start is the only point of the path
    whose distribution is a Boltzmann weight of θ; the later frames are distributed as the
    dynamics carries them from it, so weighting them by their own energies would be the weight
    of no distribution of the path (and for an average of per-frame observables, the frame-wise
    fluctuation formula of :func:`fluctuation_gradient` is the one to use instead).

    Parameters
    ----------
    values : torch.Tensor, shape (n_windows,)
        ``L_w`` of each window (treated as constants).
    potential : callable
        ``potential(positions (N, 3), box) -> energy`` kJ/mol, depending on ``parameters``.
    starts : torch.Tensor, shape (n_windows, n_atoms, 3), nm
        Start positions of the windows, sampled with the current parameters.
    box : torch.Tensor, shape (3, 3) or (n_windows, 3, 3), nm, or None
    temperature : float, K
    parameters : sequence of torch.Tensor
        Leaves with ``requires_grad=True``.

    Returns
    -------
    mean : torch.Tensor, 0-dim
        ``⟨L⟩`` over the windows.
    gradients : list of torch.Tensor
        ``-β (1/n) Σ_w (L_w - ⟨L⟩)(∂U/∂θ(x_w) - ⟨∂U/∂θ⟩)``, one per parameter, same shapes
        (units of L per unit of the parameter).
    stderr : list of torch.Tensor
        Standard error of each entry, ``β std_w(products) / sqrt(n)`` (ddof 1; it neglects
        the error of the two means, of relative order 1/n). NaN for two windows, whose two
        products are always equal.
    """
    values = torch.as_tensor(values).detach().reshape(-1)
    if values.shape[0] < 2 or values.shape[0] != starts.shape[0]:
        raise InputError(f"values {tuple(values.shape)} need one entry per start "
                         f"({starts.shape[0]}), and at least two windows for a covariance")
    beta = inverse_temperature(temperature)
    _, d_energies = frame_energy_gradients(potential, starts, box, parameters)
    deviation = values - values.mean()
    gradients, stderr = [], []
    for du in d_energies:
        weights = deviation.to(du.dtype).reshape(-1, *([1] * (du.ndim - 1)))
        products = -beta * weights * (du - du.mean(0))
        gradients.append(products.mean(0))
        stderr.append(products.std(0) / values.shape[0] ** 0.5 if values.shape[0] > 2
                      else torch.full_like(products[0], float("nan")))
    return values.mean(), gradients, stderr


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
