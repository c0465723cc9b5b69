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
differentiable function (:meth:`ConstrainedLangevin.after_kick`: velocity projection with a
closed-form VJP, implicit position projection); its vector-Jacobian product gives
``(λx_direct, λq)``, then ``λv_{n-1} = λq`` and ``λx_{n-1} = λx_direct + (∂a/∂x)ᵀ(Δt·λq)``
exactly as without constraints (:func:`~.adjoint.adjoint_kick`).
"""

from __future__ import annotations

import torch

from ..units import DTYPE
from .constraints import Constraints
from .langevin import LangevinMiddleIntegrator

_EPS = torch.finfo(DTYPE).eps
_MAX_PASSES = 50
# Extra passes of the kick's fixed point for the Newton steps of its projection.
_NEWTON_PASSES = 50
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
        Differentiable in ``x`` and ``q``: by the closed-form VJP of the velocity projection
        and the implicit-function theorem for the position projection, or with
        ``autograd=True`` by autograd through both (a Newton step at the solution for the
        second; the ground truth of the checks).
        """
        c, half = self.constraints, 0.5 * self.integ.timestep
        kicked = c.project_velocities(x, q, self.inv_masses, autograd=autograd)
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

    def _drift_multipliers(self, bonds: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        """``μ`` of a step that started at ``x`` and produced velocities ``v``, from the
        velocity constraint ``G(x)·(v + ν/Δt - s·ξ) = 0``; ``bonds`` and ``rate`` are the bond
        vectors of ``x`` and of ``v - s·ξ``."""
        c = self.constraints
        return -self.integ.timestep * c.solve(bonds, bonds, self.inv_masses,
                                              (bonds * rate).sum(-1), bonds=(bonds, bonds))

    def _origin(self, x: torch.Tensor, v: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The step's start ``x_n + α·v_n + Δt·s·ξ/(2c)`` before the ``β·ν`` correction."""
        return x + self.alpha * v + (0.5 * self.integ.timestep / self.integ.c) * noise

    def reverse_drift(self, positions: torch.Tensor, velocities: torch.Tensor, step: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Undo the drift, noise, friction and position constraint of step ``step``.

        The fixed point on ``x = y + β·ν(x)`` runs on the bond vectors alone
        (:meth:`~.constraints.Constraints.couple`); the positions are formed once at the end.

        Returns
        -------
        positions : torch.Tensor, shape (N, 3), nm
            Positions of state ``step - 1``.
        kicked : torch.Tensor, shape (N, 3), nm/ps
            The constrained post-kick velocity ``v'`` (tangent at the returned positions).
        multipliers : torch.Tensor, shape (m,)
            ``μ`` of the step's position projection.
        """
        c, inv_masses = self.constraints, self.inv_masses
        noise = self._noise(step, positions)
        y = self._origin(positions, velocities, noise)
        r_y, rate = c.bonds(y), c.bonds(velocities - noise)
        r = r_y
        for _ in range(_MAX_PASSES):
            mu = self._drift_multipliers(r, rate)
            r_next = r_y + self.beta * c.couple(mu, r, inv_masses)
            if self.beta == 0.0 or _settled(r_next, r):
                break
            r = r_next
        else:
            raise _no_convergence("drift")
        nu = c.displacement(y, mu, inv_masses, r)
        kicked = (velocities + nu / self.integ.timestep - noise) / self.integ.c
        return y + self.beta * nu, kicked, mu

    def reverse_kick(self, positions: torch.Tensor, kicked: torch.Tensor, accel: torch.Tensor,
                     step: int, initial_velocities: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Velocities of state ``step`` (the state at ``positions``) from ``v'``.

        The nested fixed point (module docs) runs on bond vectors alone, Newton's method
        included (:meth:`~.constraints.Constraints.newton_on_bonds`); positions and velocities
        are formed once from the converged multipliers.

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
        c, dt, inv_masses = self.constraints, self.integ.timestep, self.inv_masses
        base = kicked - dt * accel
        if initial_velocities is not None:
            q = initial_velocities + dt * accel
            q = kicked + q - c.project_velocities(positions, q, inv_masses)
            return q - dt * accel, q, None
        noise = self._noise(step, positions)
        y = self._origin(positions, base, noise)
        # Bond vectors of the reference (state ``step``), of y and of base - s·ξ; ν = 0 first.
        r_x, r_y, r_base = c.bonds(positions), c.bonds(y), c.bonds(base - noise)
        r_nu = torch.zeros_like(r_y)
        nu_of = mu_p = None  # (μ, bonds) whose displacement is ν
        residual = float("inf")
        # One Newton step of the projection per pass of the fixed point, which ends once
        # Newton has converged (no update) and ν has settled.
        for _ in range(_MAX_PASSES + _NEWTON_PASSES):
            r_z = r_y + self.beta * r_nu
            r_previous = r_z if mu_p is None else r_z - c.couple(mu_p, r_x, inv_masses)
            mu_p, residual, projected = c.newton_update(r_previous, r_x, inv_masses, mu_p,
                                                        residual)
            if not projected:
                r_previous = r_z - c.couple(mu_p, r_x, inv_masses)
            rate = r_base + (r_previous - r_z) / self.alpha        # bonds of v - s·ξ
            mu = self._drift_multipliers(r_previous, rate)
            r_nu_next = c.couple(mu, r_previous, inv_masses)
            done = projected and (self.beta == 0.0
                                  or _settled(self.beta * r_nu_next, self.beta * r_nu))
            if done:
                break
            nu_of, r_nu = (mu, r_previous), r_nu_next
        else:
            raise _no_convergence("kick")
        if mu_p is None:
            mu_p = torch.zeros_like(mu)
        z = y if nu_of is None else y + self.beta * c.displacement(y, nu_of[0], inv_masses,
                                                                  nu_of[1])
        shift = c.displacement(y, mu_p, inv_masses, r_x)
        v = base - shift / self.alpha
        nu = c.displacement(y, mu, inv_masses, r_previous)
        kicked_previous = (v + nu / dt - noise) / self.integ.c
        return v, v + dt * accel, (z - shift, kicked_previous, mu)


def _settled(new: torch.Tensor, old: torch.Tensor) -> bool:
    """Whether a fixed-point pass changed nothing beyond round-off of positions (nm)."""
    scale = 1.0 + float(new.abs().max()) if new.numel() else 1.0
    return float((new - old).abs().max()) <= 4.0 * _EPS * scale


def _no_convergence(part: str) -> RuntimeError:
    return RuntimeError(f"undoing the constrained {part} did not converge in {_MAX_PASSES} "
                        "passes; the friction·timestep is too large for the fixed point "
                        "(reduce the timestep or the friction)")


__all__ = ["ConstrainedLangevin"]
