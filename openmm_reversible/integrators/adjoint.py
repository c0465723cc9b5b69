"""The reverse sweep shared by every reversible simulation: adjoints carried back in time.

A reversible simulation (float :class:`~.reversible.ReversibleSimulation`, or the exact mode
of :mod:`openmm_reversible.exact`) stores only its loss snapshots in the forward pass. Its
backward pass then

1. differentiates the loss with respect to the stored frames (:func:`frame_cotangents`);
2. walks the dynamics back from the last snapshot (:func:`reverse_sweep`), asking the
   dynamics to undo one step at a time (:class:`ReverseDynamics`), and carries the adjoint
   ``(λx, λv)`` of every live truncation window over each step (:func:`adjoint_kick`): the
   dynamics give the adjoint of the step after its kick, ``(λx_direct, λq)``
   (:meth:`ReverseDynamics.drift_cotangent`; without constraints ``λx_direct = λx_n`` and
   ``λq = c·λv_n + Δt(1 + c)/2·λx_n``), then
   ``λx_{n-1} = λx_direct + (∂a/∂x)ᵀ(Δt·λq)``, ``λv_{n-1} = λq``, ``∇θ += (∂a/∂θ)ᵀ(Δt·λq)``;

3. injects the cotangents of each snapshot when the sweep reaches it (:func:`inject`):
   untruncated, all snapshots share one adjoint; truncated to ``T`` steps, the snapshots whose
   windows end at the same state share one;
4. returns the adjoint that reached the initial state (the gradient of the initial positions
   and velocities, :func:`initial_state_grads`).

What differs between the float and exact dynamics (how a step is undone, how a stored state
is used to resynchronise or only to check) is behind :class:`ReverseDynamics`; the recurrence,
injection and truncation live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .forces import Potential, accelerations
from .langevin import LangevinMiddleIntegrator


@dataclass
class Adjoint:
    """Cotangents ``(λx, λv)`` of the current reverse-pass state, for the snapshots whose
    truncation windows end at state ``stop``."""

    x: torch.Tensor
    v: torch.Tensor
    stop: int


class ReverseDynamics(Protocol):
    """What a reversible dynamics provides to :func:`reverse_sweep`.

    The sweep holds the step index; the dynamics hold the state.
    """

    def visit(self, n: int) -> None:
        """The sweep is at state ``n``: compare with a stored copy of it, if any (and, for
        float dynamics, continue from that copy)."""

    def undo_drift(self, n: int) -> torch.Tensor:
        """Undo the drift, noise and friction of the step that produced state ``n``; return
        the positions of state ``n - 1`` (float64, nm), where the kick is evaluated."""

    def undo_kick(self, accelerations: torch.Tensor | None) -> None:
        """Undo the kick; the state becomes state ``n - 1``. ``accelerations`` are those at
        the positions :meth:`undo_drift` returned when the sweep computed them (nm/ps²)."""

    def drift_cotangent(self, cot_positions: torch.Tensor, cot_velocities: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adjoint of the step just undone from its kicked velocity on: the map
        ``(x_{n-1}, q = v_{n-1} + Δt·a) → (x_n, v_n)``. Given ``(λx_n, λv_n)`` return
        ``(λx_direct, λq)``: the cotangent of ``x_{n-1}`` through everything but the
        accelerations, and that of ``q``. Called after :meth:`undo_kick`, with grad enabled.
        Without constraints it is ``(λx_n, c·λv_n + Δt(1 + c)/2·λx_n)``."""


def first_needed_step(snapshot_every: int, truncation: int | None) -> int:
    """Earliest step (relative to the window start) that the reverse pass must reach."""
    if truncation is None:
        return 0
    return max(0, snapshot_every - truncation)


def or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``grad``, or zeros shaped like ``like`` where autograd found no dependence (None)."""
    return torch.zeros_like(like) if grad is None else grad


def frame_cotangents(loss_of_frames: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     xs: torch.Tensor, vs: torch.Tensor, params: Sequence[torch.Tensor],
                     grad_loss: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Cotangents of the stored frames and the loss's direct parameter gradients.

    Parameters
    ----------
    loss_of_frames : callable
        ``loss_of_frames(positions (S, N, 3) nm, velocities (S, N, 3) nm/ps) -> scalar``.
    xs, vs : torch.Tensor, shape (S, N, 3)
        The snapshots.
    params : sequence of torch.Tensor
        The trainable parameters.
    grad_loss : torch.Tensor
        Incoming cotangent of the loss.

    Returns
    -------
    (g_x, g_v, param_grads)
        ``∂ℓ/∂xs``, ``∂ℓ/∂vs`` (zeros where the loss does not depend on them) and
        ``∂ℓ/∂θ`` through the loss's explicit dependence (fresh tensors, accumulated into by
        the sweep).
    """
    return loss_cotangents(*loss_of_leaf_frames(loss_of_frames, xs, vs), params, grad_loss)


def loss_of_leaf_frames(loss_of_frames: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        xs: torch.Tensor, vs: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of the frames, with its graph, from detached copies of them that require
    grad: ``(loss, frames_x, frames_v)`` for :func:`loss_cotangents` (so that a loss computed
    in the forward pass serves the backward pass without a second evaluation)."""
    frames_x = xs.detach().requires_grad_(True)
    frames_v = vs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_of_frames(frames_x, frames_v)
    return loss, frames_x, frames_v


def loss_cotangents(loss: torch.Tensor, frames_x: torch.Tensor, frames_v: torch.Tensor,
                    params: Sequence[torch.Tensor], grad_loss: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`frame_cotangents` of a loss already computed by :func:`loss_of_leaf_frames`
    (its graph is consumed)."""
    grads = torch.autograd.grad(loss, [frames_x, frames_v, *params], grad_loss,
                                allow_unused=True)
    param_grads = [or_zeros(g, p) for g, p in zip(grads[2:], params, strict=True)]
    return or_zeros(grads[0], frames_x), or_zeros(grads[1], frames_v), param_grads


def inject(adjoints: dict[int, Adjoint], n: int, start: int, truncation: int | None,
           g_x: torch.Tensor, g_v: torch.Tensor) -> None:
    """Add the loss cotangents of snapshot ``n`` to the adjoint whose truncation window ends
    where this snapshot's does (state ``start`` when untruncated, else ``n - truncation``)."""
    stop = start if truncation is None else max(start, n - truncation)
    if stop in adjoints:
        adjoints[stop].x = adjoints[stop].x + g_x
        adjoints[stop].v = adjoints[stop].v + g_v
    else:
        adjoints[stop] = Adjoint(g_x.clone(), g_v.clone(), stop)


def adjoint_kick(dynamics: ReverseDynamics, potential: Potential, timestep: float,
                 x: torch.Tensor, box: torch.Tensor | None, inv_masses: torch.Tensor,
                 params: Sequence[torch.Tensor], adjoints: list[Adjoint],
                 param_grads: list[torch.Tensor]) -> None:
    """Undo the kick at the reconstructed positions ``x`` and carry every live adjoint back
    over the step (``timestep`` in ps).

    The dynamics undo their kick with the (detached) accelerations at ``x``; each adjoint then
    goes through :meth:`ReverseDynamics.drift_cotangent` and the accelerations' VJP:
    ``λx_{n-1} = λx_direct + (∂a/∂x)ᵀ(Δt·λq)``, ``λv_{n-1} = λq``, ``∇θ += (∂a/∂θ)ᵀ(Δt·λq)``.
    Updates the adjoints and ``param_grads`` in place. One force graph serves all adjoints;
    each adjoint needs its own position VJP, the parameter VJPs come out of the same calls
    (double backward).
    """
    with torch.enable_grad():
        a, leaf = accelerations(potential, x, box, inv_masses, create_graph=True)
        dynamics.undo_kick(a.detach())
        for j, adj in enumerate(adjoints):
            direct, kicked = dynamics.drift_cotangent(adj.x, adj.v)
            vjps = torch.autograd.grad(a, [leaf, *params], timestep * kicked, allow_unused=True,
                                       retain_graph=j < len(adjoints) - 1)
            adj.x = direct + vjps[0]
            adj.v = kicked
            for k, g in enumerate(vjps[1:]):
                if g is not None:
                    param_grads[k] += g


def reverse_sweep(dynamics: ReverseDynamics, *, top: int, stop: int, start: int,
                  snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]],
                  truncation: int | None, potential: Potential,
                  integ: LangevinMiddleIntegrator, box: torch.Tensor | None,
                  inv_masses: torch.Tensor, params: Sequence[torch.Tensor],
                  param_grads: list[torch.Tensor], needs_accelerations: bool) -> Adjoint | None:
    """Walk the dynamics back from state ``top`` to state ``stop``, carrying the adjoints.

    Parameters
    ----------
    dynamics : ReverseDynamics
        At state ``top`` when called.
    top, stop, start : int
        Global indices of the last snapshot, of the earliest state the sweep must reach and of
        the window's initial state.
    snapshots : dict of int to (torch.Tensor, torch.Tensor)
        Cotangents ``(g_x, g_v)`` of each snapshot, by state index.
    truncation : int or None
        Truncation window in steps.
    potential, integ, box, inv_masses, params
        What :func:`adjoint_kick` needs (``integ`` is the float integrator whose timestep the
        adjoint uses).
    param_grads : list of torch.Tensor
        Accumulated in place.
    needs_accelerations : bool
        Whether :meth:`ReverseDynamics.undo_kick` needs the float accelerations on steps where
        no adjoint is live (float dynamics do; the exact mode computes integer forces itself).

    Returns
    -------
    Adjoint or None
        The adjoint that reached the initial state, or None if none did (truncated windows).
    """
    adjoints: dict[int, Adjoint] = {}
    n = top
    with torch.no_grad():
        while True:
            dynamics.visit(n)
            if n in snapshots:
                inject(adjoints, n, start, truncation, *snapshots[n])
            if n == stop:
                break
            x = dynamics.undo_drift(n)
            if adjoints:
                adjoint_kick(dynamics, potential, integ.timestep, x, box, inv_masses, params,
                             list(adjoints.values()), param_grads)
            elif needs_accelerations:
                dynamics.undo_kick(accelerations(potential, x, box, inv_masses)[0])
            else:
                dynamics.undo_kick(None)
            n -= 1
            if n > start:
                adjoints.pop(n, None)
    return adjoints.get(start)


def initial_state_grads(at_start: Adjoint | None, like: torch.Tensor,
                        needs_x: bool, needs_v: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of the initial positions and velocities from the adjoint at the start
    (zeros when no adjoint reached it; None where no gradient was asked for)."""
    grad_x = grad_v = None
    if needs_x:
        grad_x = at_start.x if at_start is not None else torch.zeros_like(like)
    if needs_v:
        grad_v = at_start.v if at_start is not None else torch.zeros_like(like)
    return grad_x, grad_v


__all__ = ["Adjoint", "ReverseDynamics", "adjoint_kick", "first_needed_step",
           "frame_cotangents", "initial_state_grads", "inject", "loss_cotangents",
           "loss_of_leaf_frames", "or_zeros", "reverse_sweep"]
