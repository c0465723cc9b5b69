"""OpenMM's Langevin-middle step with constraints, its inverse and the pieces of its adjoint.

The step that produces state ``n`` from ``(x, v)`` (OpenMM's ``LangevinMiddleIntegrator``
with a constraint tolerance at round-off; ``P_x``, ``Π(·; x)`` and ``ν = M⁻¹G(x)ᵀμ`` as in
:mod:`.constraints`, ``c``, ``s``, ``ξ_n`` as in :mod:`.langevin`)::

    v' = P_x(v + Δt·a(x))                 kick, then velocity constraint at x
    w  = c·v' + s·ξ_n                     friction and noise
    u  = x + Δt/2·v' + Δt/2·w             drift-O-drift, unconstrained
    x_n = Π(u; x) = u - ν                 position constraint, old positions as reference
    v_n = w - ν/Δt                        velocity corrected by the position change / Δt

**Inverse.** With ``α = -Δt(1 + 1/c)/2`` and ``β = (1 - 1/c)/2`` the drift inverts to
``x = x_n + α·v_n + Δt·s·ξ_n/(2c) + β·ν`` and ``v' = (v_n + ν/Δt - s·ξ_n)/c``; ``ν`` follows
from the velocity constraint ``G(x)·v' = 0`` (a linear solve at ``x``), so the two are one
fixed-point iteration that contracts by ``O(γΔt)`` per pass (one pass without friction).
The kick is not invertible on its own: ``P_x`` drops the component of ``v + Δt·a`` along the
constraint gradients. That component is fixed by the step before: ``(x, v)`` was produced by
step ``n - 1``, so undoing *its* drift must land on the constraint surface. Writing
``v = v' - Δt·a + M⁻¹G(x)ᵀκ``, that condition is a position projection with reference ``x``
(solved by Newton's method) nested in the same fixed point. At the window's first state (not
produced by a step) the dropped component is taken from the stored initial velocities.

**Adjoint.** Everything after the kick, ``(x, q = v + Δt·a) → (x_n, v_n)``, is a short
differentiable function (:meth:`ConstrainedLangevin.after_kick`: explicit velocity projection,
implicit position projection); its vector-Jacobian product gives ``(λx_direct, λq)``, then
``λv_{n-1} = λq`` and ``λx_{n-1} = λx_direct + (∂a/∂x)ᵀ(Δt·λq)`` exactly as without constraints
(:func:`~.adjoint.adjoint_kick`).
"""

from __future__ import annotations

import torch

from ..units import DTYPE
from .constraints import Constraints
from .langevin import LangevinMiddleIntegrator

_EPS = torch.finfo(DTYPE).eps
_MAX_PASSES = 50
_NOISE_CACHE = 4  # steps


class ConstrainedLangevin:
    """The constrained Langevin-middle step of one System (module docs).

    Parameters
    ----------
    integrator : LangevinMiddleIntegrator
        Step size, friction, temperature and noise seed.
    constraints : Constraints
    masses : torch.Tensor, shape (N,), amu
    """

    def __init__(self, integrator: LangevinMiddleIntegrator, constraints: Constraints,
                 masses: torch.Tensor):
        self.integ, self.constraints, self.masses = integrator, constraints, masses
        self.inv_masses = 1.0 / masses
        dt, c = integrator.timestep, integrator.c
        self.alpha = -0.5 * dt * (1.0 + 1.0 / c)
        self.beta = 0.5 * (1.0 - 1.0 / c)
        # The reverse pass needs the noise of each step twice (undoing its drift and, one step
        # later, its kick's fixed point): the last few are kept, keyed by everything they
        # depend on.
        self._noise_cache: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"ConstrainedLangevin({self.integ!r}, {self.constraints!r})"

    def _noise(self, step: int, like: torch.Tensor) -> torch.Tensor:
        """``s·ξ_step`` (nm/ps), zeros without friction."""
        if self.integ.s == 0.0:
            return torch.zeros_like(like)
        key = (self.integ.seed, self.integ.kT, self.integ.s, step)
        noise = self._noise_cache.get(key)
        if noise is None:
            if len(self._noise_cache) >= _NOISE_CACHE:
                del self._noise_cache[next(iter(self._noise_cache))]
            noise = self._noise_cache[key] = self.integ.s * self.integ.noise(step, self.masses)
        return noise

    # -- forward ----------------------------------------------------------------------------

    def after_kick(self, x: torch.Tensor, q: torch.Tensor, step: int, autograd: bool = False,
                   initial: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """State ``step`` from the positions ``x`` and the kicked velocity ``q = v + Δt·a``.

        Returns positions (nm), velocities (nm/ps) and the position multipliers ``μ``.
        Differentiable in ``x`` and ``q``: by the implicit-function theorem, or by autograd
        through a Newton step at the solution with ``autograd=True``.
        """
        c, half = self.constraints, 0.5 * self.integ.timestep
        kicked = c.project_velocities(x, q, self.inv_masses)
        w = self.integ.c * kicked + self._noise(step, x)
        u = x + half * kicked + half * w
        x_new, mu = c.project_positions(u, x, self.inv_masses, autograd=autograd,
                                        initial=initial)
        return x_new, w + (x_new - u) / self.integ.timestep, mu

    def step(self, positions: torch.Tensor, velocities: torch.Tensor, accel: torch.Tensor,
             step: int, autograd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step, producing state ``step`` (as
        :meth:`~.langevin.LangevinMiddleIntegrator.step`, constrained)."""
        x, v, _ = self.after_kick(positions, velocities + self.integ.timestep * accel, step,
                                  autograd=autograd)
        return x, v

    # -- inverse ----------------------------------------------------------------------------

    def _drift_multipliers(self, x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, ν)`` of a step that started at ``x`` and produced velocities ``v``: from the
        velocity constraint ``G(x)·(v + ν/Δt - s·ξ) = 0``."""
        c = self.constraints
        r = c.bonds(x)
        mu = -self.integ.timestep * c.solve(x, x, self.inv_masses,
                                            c.gradient_dot(x, v - noise, r), bonds=(r, r))
        return mu, c.displacement(x, mu, self.inv_masses, r)

    def _origin(self, x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The step's start ``x_n + α·v_n + Δt·s·ξ/(2c)`` before the ``β·ν`` correction."""
        return x + self.alpha * v + (0.5 * self.integ.timestep / self.integ.c) * noise

    def reverse_drift(self, positions: torch.Tensor, velocities: torch.Tensor, step: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Undo the drift, noise, friction and position constraint of step ``step``.

        Returns
        -------
        positions : torch.Tensor, shape (N, 3), nm
            Positions of state ``step - 1``.
        kicked : torch.Tensor, shape (N, 3), nm/ps
            The constrained post-kick velocity ``v'`` (tangent at the returned positions).
        multipliers : torch.Tensor, shape (m,)
            ``μ`` of the step's position projection.
        """
        noise = self._noise(step, positions)
        y = self._origin(positions, velocities, noise)
        x, mu, nu = y, None, torch.zeros_like(y)
        for _ in range(_MAX_PASSES):
            mu, nu = self._drift_multipliers(x, velocities, noise)
            x_next = y + self.beta * nu
            done = _settled(x_next, x) or self.beta == 0.0
            x = x_next
            if done:
                break
        else:
            raise _no_convergence("drift")
        kicked = (velocities + nu / self.integ.timestep - noise) / self.integ.c
        return x, kicked, mu

    def reverse_kick(self, positions: torch.Tensor, kicked: torch.Tensor, accel: torch.Tensor,
                     step: int, initial_velocities: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Velocities of state ``step`` (the state at ``positions``) from ``v'``.

        Parameters
        ----------
        positions : torch.Tensor, shape (N, 3), nm
            Positions of state ``step``.
        kicked : torch.Tensor, shape (N, 3), nm/ps
            The post-kick velocity of the step that follows.
        accel : torch.Tensor, shape (N, 3), nm/ps²
            Accelerations at ``positions``.
        step : int
            Index of the state reconstructed (its velocities were produced by step ``step``,
            whose noise they carry).
        initial_velocities : torch.Tensor, optional
            Stored velocities of this state when no step produced it (a window's first
            state): the component ``P_x`` drops is taken from them instead of solved for.

        Returns
        -------
        velocities : torch.Tensor, shape (N, 3), nm/ps
            Velocities of state ``step``.
        q : torch.Tensor, shape (N, 3), nm/ps
            ``velocities + Δt·accel``, the kicked velocity before its projection.
        previous : tuple of torch.Tensor or None
            What :meth:`reverse_drift` of step ``step`` returns, found on the way (None with
            ``initial_velocities``).
        """
        c, dt = self.constraints, self.integ.timestep
        base = kicked - dt * accel
        if initial_velocities is not None:
            q = initial_velocities + dt * accel
            q = kicked + q - c.project_velocities(positions, q, self.inv_masses)
            return q - dt * accel, q, None
        noise = self._noise(step, positions)
        y = self._origin(positions, base, noise)
        nu = torch.zeros_like(y)
        mu_p = None
        for _ in range(_MAX_PASSES):
            z = y + self.beta * nu
            previous, mu_p = c.project_positions(z, positions, self.inv_masses, initial=mu_p)
            v = base + (previous - z) / self.alpha
            mu, nu_next = self._drift_multipliers(previous, v, noise)
            done = _settled(self.beta * nu_next, self.beta * nu) or self.beta == 0.0
            nu = nu_next
            if done:
                break
        else:
            raise _no_convergence("kick")
        kicked_previous = (v + nu / dt - noise) / self.integ.c
        return v, v + dt * accel, (previous, kicked_previous, mu)


def _settled(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether a fixed-point pass changed nothing beyond round-off of positions (nm)."""
    scale = 1.0 + float(new.abs().max()) if new.numel() else 1.0
    return float((new - old).abs().max()) <= 4.0 * _EPS * scale


def _no_convergence(part: str) -> RuntimeError:
    return RuntimeError(f"undoing the constrained {part} did not converge in {_MAX_PASSES} "
                        "passes; the friction·timestep is too large for the fixed point "
                        "(reduce the timestep or the friction)")


__all__ = ["ConstrainedLangevin"]
