"""The Langevin-middle integrator (OpenMM's ``LangevinMiddleIntegrator``) and its exact inverse.

With ``c = exp(-γΔt)``, ``s = sqrt(1 - c²)`` and ``ξ_n = sqrt(kT/m)·N(0, I)`` regenerated from
``(seed, n)`` (:mod:`.noise`), the step that produces state ``n`` is::

    v' = v + Δt·a(x)          (kick, a = F/m)
    x' = x + Δt/2·v'          (drift)
    v_n = c·v' + s·ξ_n        (friction and noise)
    x_n = x' + Δt/2·v_n       (drift)

Every sub-step is invertible in closed form, so the previous state follows from the current
one with one force evaluation, at the reconstructed positions::

    x' = x_n - Δt/2·v_n;   v' = (v_n - s·ξ_n)/c;   x = x' - Δt/2·v';   v = v' - Δt·a(x)

With friction 0 (``c = 1``, ``s = 0``) the scheme is leapfrog / velocity Verlet, the same as
OpenMM's ``VerletIntegrator``; velocities are those of OpenMM's integrator (half a step behind
the positions in the leapfrog sense). Positions are never wrapped into the box, so the reverse
pass visits exactly the coordinates of the forward pass.

The integrator holds only the scheme: step coefficients, the noise stream and the adjoint of the
step. State, masses and the potential are passed in, so one integrator serves any system.
"""

from __future__ import annotations

import math

import torch
from openmm import unit

from ..errors import InputError
from ..units import KB, strip
from .forces import Potential, accelerations
from .noise import standard_normal


class LangevinMiddleIntegrator:
    """Langevin dynamics, middle scheme (BAOAB with the force at the start of the step).

    Parameters
    ----------
    timestep : float or openmm.unit.Quantity, ps
        Step size Δt.
    friction : float or openmm.unit.Quantity, 1/ps
        Collision rate γ; 0 gives velocity Verlet (no noise).
    temperature : float or openmm.unit.Quantity, K
        Heat-bath temperature.
    seed : int
        Noise stream: the noise of step ``n`` depends only on ``(seed, n)``.

    Examples
    --------
    >>> integrator = LangevinMiddleIntegrator(0.001, 1.0, 300.0, seed=1)
    >>> x, v = integrator.run(potential, x, v, box, masses, n_steps=100)
    >>> x0, v0 = integrator.run_reverse(potential, x, v, box, masses, n_steps=100)
    """

    def __init__(self, timestep, friction, temperature, seed: int = 0):
        self.timestep = float(strip(timestep, unit.picosecond))
        self.friction = float(strip(friction, unit.picosecond**-1))
        self.temperature = float(strip(temperature, unit.kelvin))
        self.seed = int(seed)
        if not self.timestep > 0:
            raise InputError(f"timestep must be > 0 ps, got {self.timestep}")
        if not self.friction >= 0:
            raise InputError(f"friction must be >= 0 1/ps, got {self.friction}")
        if not self.temperature >= 0:
            raise InputError(f"temperature must be >= 0 K, got {self.temperature}")
        self.c = math.exp(-self.friction * self.timestep)
        # sqrt(1 - c²) without cancellation for small γΔt.
        self.s = math.sqrt(-math.expm1(-2.0 * self.friction * self.timestep))

    def __repr__(self) -> str:
        return (f"LangevinMiddleIntegrator(timestep={self.timestep}, friction={self.friction}, "
                f"temperature={self.temperature}, seed={self.seed})")

    @property
    def kT(self) -> float:
        """Thermal energy k_B·T, kJ/mol."""
        return KB * self.temperature

    def noise(self, step: int, masses: torch.Tensor) -> torch.Tensor:
        """Thermal velocity noise ``ξ_step = sqrt(kT/m)·N(0, I)``, nm/ps, shape (N, 3)."""
        z = standard_normal(self.seed, step, (masses.shape[0], 3), masses.dtype, masses.device)
        return torch.sqrt(self.kT / masses)[:, None] * z

    def step(self, positions: torch.Tensor, velocities: torch.Tensor, accel: torch.Tensor,
             step: int, masses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step, producing state ``step`` from state ``step - 1``.

        Parameters
        ----------
        positions, velocities : torch.Tensor, shape (N, 3), nm and nm/ps
            State ``step - 1``.
        accel : torch.Tensor, shape (N, 3), nm/ps²
            Accelerations at ``positions``.
        step : int
            Index of the state produced (selects the noise).
        masses : torch.Tensor, shape (N,), amu

        Returns
        -------
        positions, velocities : torch.Tensor, shape (N, 3)
            State ``step``.
        """
        half = 0.5 * self.timestep
        v = velocities + self.timestep * accel
        x = positions + half * v
        if self.s != 0.0:
            v = self.c * v + self.s * self.noise(step, masses)
        return x + half * v, v

    def reverse_drift(self, positions: torch.Tensor, velocities: torch.Tensor, step: int,
                      masses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo the drift-noise-drift part of step ``step``.

        Returns
        -------
        positions : torch.Tensor, shape (N, 3), nm
            Positions of state ``step - 1`` (exact up to round-off).
        kicked : torch.Tensor, shape (N, 3), nm/ps
            The post-kick velocity ``v'``; pass it to :meth:`reverse_kick` with the
            accelerations at the returned positions.
        """
        half = 0.5 * self.timestep
        x = positions - half * velocities
        v = velocities
        if self.s != 0.0:
            v = (v - self.s * self.noise(step, masses)) / self.c
        return x - half * v, v

    def reverse_kick(self, kicked: torch.Tensor, accel: torch.Tensor) -> torch.Tensor:
        """Velocities of state ``step - 1`` from ``v'`` and the accelerations there."""
        return kicked - self.timestep * accel

    def kick_cotangent(self, cot_positions: torch.Tensor, cot_velocities: torch.Tensor
                       ) -> torch.Tensor:
        """Adjoint of the drift-noise-drift part of a step.

        Given the cotangents ``λx_n = ∂ℓ/∂x_n`` and ``λv_n = ∂ℓ/∂v_n`` of the state a step
        produced, returns the cotangent of the post-kick velocity,
        ``λv' = c·λv_n + Δt(1 + c)/2·λx_n``. The rest of the step's adjoint is then
        ``λv_{n-1} = λv'``, ``λx_{n-1} = λx_n + (∂a/∂x)ᵀ(Δt·λv')`` and
        ``∇θ += (∂a/∂θ)ᵀ(Δt·λv')``.
        """
        return self.c * cot_velocities + (0.5 * self.timestep * (1.0 + self.c)) * cot_positions

    def run(self, potential: Potential, positions: torch.Tensor, velocities: torch.Tensor,
            box: torch.Tensor | None, masses: torch.Tensor, n_steps: int, start_step: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate ``n_steps`` forward from state ``start_step`` (no gradient tracking).

        Returns the state ``start_step + n_steps`` as detached tensors.
        """
        x, v = positions.detach(), velocities.detach()
        inv_masses = 1.0 / masses
        with torch.no_grad():
            for n in range(start_step + 1, start_step + n_steps + 1):
                a, _ = accelerations(potential, x, box, inv_masses)
                x, v = self.step(x, v, a, n, masses)
        return x, v

    def run_reverse(self, potential: Potential, positions: torch.Tensor,
                    velocities: torch.Tensor, box: torch.Tensor | None, masses: torch.Tensor,
                    n_steps: int, end_step: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct the state ``n_steps`` steps earlier by running the dynamics backward.

        Parameters
        ----------
        positions, velocities : torch.Tensor, shape (N, 3)
            State ``end_step``.
        end_step : int, optional
            Index of the given state (default ``n_steps``, i.e. recover state 0).
        """
        end = n_steps if end_step is None else end_step
        x, v = positions.detach(), velocities.detach()
        inv_masses = 1.0 / masses
        with torch.no_grad():
            for n in range(end, end - n_steps, -1):
                x, kicked = self.reverse_drift(x, v, n, masses)
                a, _ = accelerations(potential, x, box, inv_masses)
                v = self.reverse_kick(kicked, a)
        return x, v
