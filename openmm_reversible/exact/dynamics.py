"""The exact mode: Langevin dynamics whose reverse trajectory equals the forward one bit for bit.

Floating-point reversal drifts: undoing the friction divides by ``c`` and so amplifies
round-off by ``e^{γt}``, and molecular dynamics is chaotic. The float mode therefore truncates
adjoints and resynchronises on stored states. Here the drift is removed altogether:

- positions and velocities are int64 fixed-point counts (:class:`.fixed_point.FixedPointFormat`:
  2⁻⁴⁸ nm and 2⁻⁵⁰ nm/ps by default);
- forces are summed as integers from per-interaction contributions
  (:class:`~openmm_reversible.exact.forces.DeterministicForces`), so the same
  positions give the same forces regardless of summation order, thread count or device;
- each sub-step of the Langevin-middle scheme adds a deterministic function of something the
  reverse pass knows (kick: the forces at the current positions; drift: the current velocity;
  noise: the regenerated ``(seed, step)`` stream), which subtraction undoes exactly;
- the friction ``v ← c·v`` multiplies by ``n/2³¹ ≈ c`` exactly invertibly, keeping the digits
  the rounding drops in an :class:`.fixed_point.InformationBuffer` (Maclaurin, Duvenaud &
  Adams, ICML 2015): about ``-log2(c)`` bits per degree of freedom per step.

Forward step n (counts; ``K``, ``D``, ``Ξ`` round to the nearest count)::

    V += K(F(X))                     K(F) = round(Δt·F/m)
    X += D(V)                        D(V) = round(Δt/2·V)
    V, b = scale_exact(V, n, b)      V ≈ V·n/2³¹, buffer b keeps what rounding loses
    V += Ξ_n                         Ξ_n  = round(s·ξ_n), ξ_n regenerated from (seed, n)
    X += D(V)

The reverse step runs the same operations backwards with ``-=`` and ``unscale_exact``; after
N steps forward and N back the integer state *and* the buffer are the initial ones.

The dynamics are those of :class:`~.langevin.LangevinMiddleIntegrator` with friction
``γ' = -ln(n/2³¹)/Δt`` (within 2.3e-7 relative of the requested γ at 1/ps, 1 fs), up to
rounding to the fixed-point grid. :class:`ExactReversibleSimulation` differentiates a loss with
the same adjoint recurrences as :class:`~.reversible.ReversibleSimulation`, evaluated in float64
at the exactly reconstructed states: no resynchronisation snapshots, any window length,
untruncated or truncated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from openmm import unit

from ..errors import InputError
from ..integrators.adjoint import (
    first_needed_step,
    frame_cotangents,
    initial_state_grads,
    reverse_sweep,
)
from ..integrators.langevin import LangevinMiddleIntegrator
from ..integrators.reversible import LossFunction, ReversibleSimulation
from ..units import box_tensor, positions_tensor, strip, velocities_tensor
from .fixed_point import (
    DENOMINATOR,
    FixedPointFormat,
    FixedPointRangeError,
    InformationBuffer,
    add_counts,
    counts,
    friction_numerator,
    scale_exact,
    unscale_exact,
)
from .forces import DeterministicForces

ForceCounts = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``forces(positions (N, 3) nm float64, box) -> int64 (N, 3)`` counts of force."""


@dataclass
class ExactState:
    """The complete state of exact dynamics: integers and the information buffer.

    Attributes
    ----------
    positions : torch.Tensor, int64, shape (N, 3)
        Counts of ``2**-position_bits`` nm (never wrapped into the box).
    velocities : torch.Tensor, int64, shape (N, 3)
        Counts of ``2**-velocity_bits`` nm/ps.
    buffer : InformationBuffer
        The digits the friction steps dropped so far.
    step : int
        Index of this state.
    """

    positions: torch.Tensor
    velocities: torch.Tensor
    buffer: InformationBuffer
    step: int

    def copy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the integer positions and velocities."""
        return self.positions.clone(), self.velocities.clone()


class ExactLangevinIntegrator:
    """Langevin-middle dynamics in fixed point, reversible bit for bit.

    Parameters
    ----------
    timestep : float or openmm.unit.Quantity, ps
    friction : float or openmm.unit.Quantity, 1/ps
        Requested γ; the dynamics use the nearest representable ``c = n/2³¹`` (see
        :attr:`friction`).
    temperature : float or openmm.unit.Quantity, K
    seed : int
        Noise stream, shared with the float integrator: the noise of step ``n`` depends only
        on ``(seed, n)``.
    fixed_point : FixedPointFormat, optional
        Resolutions and ranges of positions, velocities and forces.

    Attributes
    ----------
    numerator : int
        ``n`` in ``c = n / 2**31``.
    float_integrator : LangevinMiddleIntegrator
        The same scheme in float64 with friction :attr:`friction`: its coefficients serve the
        adjoint, and it is the reference the exact dynamics approximate.

    Examples
    --------
    >>> integrator = ExactLangevinIntegrator(0.001, 1.0, 295.15, seed=1)
    >>> forces = integrator.forces(potential)
    >>> state = integrator.state(positions, velocities)
    >>> integrator.run(state, forces, box, masses, 1000)
    >>> integrator.run_reverse(state, forces, box, masses, 1000)   # the initial state, exactly
    """

    def __init__(self, timestep, friction, temperature, seed: int = 0,
                 fixed_point: FixedPointFormat | None = None):
        requested = LangevinMiddleIntegrator(timestep, friction, temperature, seed)
        self.requested_friction = requested.friction
        self.numerator = (friction_numerator(requested.c) if requested.friction > 0
                          else DENOMINATOR)
        effective = -math.log(self.numerator / DENOMINATOR) / requested.timestep
        self.float_integrator = LangevinMiddleIntegrator(requested.timestep, effective,
                                                         requested.temperature, seed)
        self.fixed_point = fixed_point or FixedPointFormat()
        fmt = self.fixed_point
        # D(V) = round(V·drift_scale); K(F) = round(F·kick_scale/m); Ξ = round(s·ξ·noise_scale)
        self._drift_scale = 0.5 * self.timestep * 2.0 ** (fmt.position_bits - fmt.velocity_bits)
        self._kick_scale = self.timestep * 2.0 ** (fmt.velocity_bits - fmt.force_bits)
        self._noise_scale = self.float_integrator.s * 2.0 ** fmt.velocity_bits

    def __repr__(self) -> str:
        return (f"ExactLangevinIntegrator(timestep={self.timestep}, friction={self.friction}, "
                f"temperature={self.temperature}, seed={self.seed}, {self.fixed_point})")

    @property
    def timestep(self) -> float:
        """Δt, ps."""
        return self.float_integrator.timestep

    @property
    def friction(self) -> float:
        """The friction the dynamics use, ``-ln(n/2³¹)/Δt``, 1/ps."""
        return self.float_integrator.friction

    @property
    def temperature(self) -> float:
        """Heat-bath temperature, K."""
        return self.float_integrator.temperature

    @property
    def seed(self) -> int:
        return self.float_integrator.seed

    @property
    def c(self) -> float:
        """The friction factor ``n / 2**31``."""
        return self.numerator / DENOMINATOR

    @property
    def bits_per_step(self) -> float:
        """Information-buffer growth per degree of freedom per step, ``log2(2³¹/n)`` bits."""
        return math.log2(DENOMINATOR / self.numerator)

    def forces(self, potential) -> ForceCounts:
        """Deterministic integer forces of a TorchPotential in this integrator's format."""
        return DeterministicForces(potential, self.fixed_point)

    # -- conversions ---------------------------------------------------------------------------

    def state(self, positions, velocities, step: int = 0) -> ExactState:
        """Round a float state to the fixed-point grid (an empty information buffer).

        Parameters
        ----------
        positions : torch.Tensor, shape (N, 3), nm (or array / Quantity)
        velocities : torch.Tensor, shape (N, 3), nm/ps (or array / Quantity)
        step : int
            Index of the state (selects the noise of the following steps).
        """
        x = positions_tensor(strip(positions, unit.nanometer))
        v = positions_tensor(strip(velocities, unit.nanometer / unit.picosecond))
        if x.shape != v.shape:
            raise InputError(f"positions {tuple(x.shape)} and velocities {tuple(v.shape)} "
                             "must have the same shape (N, 3)")
        fmt = self.fixed_point
        return ExactState(fmt.to_fixed(x.detach(), "position"),
                          fmt.to_fixed(v.detach(), "velocity"),
                          InformationBuffer(tuple(v.shape), device=v.device), int(step))

    def positions(self, state: ExactState) -> torch.Tensor:
        """Positions of ``state`` as float64, nm."""
        return self.fixed_point.to_float(state.positions, "position")

    def velocities(self, state: ExactState) -> torch.Tensor:
        """Velocities of ``state`` as float64, nm/ps."""
        return self.fixed_point.to_float(state.velocities, "velocity")

    # -- the sub-steps (each a deterministic integer function) --------------------------------

    def _kick(self, forces: ForceCounts, positions: torch.Tensor, box: torch.Tensor | None,
              masses: torch.Tensor) -> torch.Tensor:
        f = forces(self.fixed_point.to_float(positions, "position"), box)
        scale = (self._kick_scale / masses.to(torch.float64))[:, None]
        return counts(f.to(torch.float64) * scale, self.fixed_point, "velocity", " increment")

    def _drift(self, velocities: torch.Tensor) -> torch.Tensor:
        return counts(velocities.to(torch.float64) * self._drift_scale, self.fixed_point,
                      "position", " increment")

    def _noise(self, step: int, masses: torch.Tensor) -> torch.Tensor:
        xi = self.float_integrator.noise(step, masses.to(torch.float64))
        return counts(xi * self._noise_scale, self.fixed_point, "velocity", " noise")

    @property
    def _thermostat(self) -> bool:
        return self.numerator != DENOMINATOR

    # -- steps ---------------------------------------------------------------------------------

    def step(self, state: ExactState, forces: ForceCounts, box: torch.Tensor | None,
             masses: torch.Tensor) -> None:
        """Advance ``state`` (in place) by one step, to state ``state.step + 1``.

        Raises FixedPointRangeError naming the particle and the step if any value would leave
        its range; the state is then unusable.
        """
        n, fmt = state.step + 1, self.fixed_point
        try:
            x, v = state.positions, state.velocities
            v = add_counts(v, self._kick(forces, x, box, masses), fmt, "velocity")
            x = add_counts(x, self._drift(v), fmt, "position")
            if self._thermostat:
                v = add_counts(scale_exact(v, self.numerator, state.buffer),
                               self._noise(n, masses), fmt, "velocity")
            x = add_counts(x, self._drift(v), fmt, "position")
        except FixedPointRangeError as err:
            raise err.at_step(n) from None
        state.positions, state.velocities, state.step = x, v, n

    def reverse_drift(self, state: ExactState, masses: torch.Tensor) -> None:
        """First half of a reverse step: undo drift, noise, friction and drift (in place).

        Afterwards ``state.positions`` are those of state ``state.step - 1`` and
        ``state.velocities`` hold the post-kick velocity; :meth:`reverse_kick` completes the
        step.
        """
        n, fmt = state.step, self.fixed_point
        try:
            x, v = state.positions, state.velocities
            x = add_counts(x, -self._drift(v), fmt, "position")
            if self._thermostat:
                v = unscale_exact(add_counts(v, -self._noise(n, masses), fmt, "velocity"),
                                  self.numerator, state.buffer)
            x = add_counts(x, -self._drift(v), fmt, "position")
        except FixedPointRangeError as err:
            raise err.at_step(n) from None
        state.positions, state.velocities = x, v

    def reverse_kick(self, state: ExactState, forces: ForceCounts, box: torch.Tensor | None,
                     masses: torch.Tensor) -> None:
        """Second half of a reverse step: undo the kick; ``state`` becomes state ``step - 1``."""
        try:
            kick = self._kick(forces, state.positions, box, masses)
            v = add_counts(state.velocities, -kick, self.fixed_point, "velocity")
        except FixedPointRangeError as err:
            raise err.at_step(state.step) from None
        state.velocities, state.step = v, state.step - 1

    def reverse_step(self, state: ExactState, forces: ForceCounts, box: torch.Tensor | None,
                     masses: torch.Tensor) -> None:
        """Undo the step that produced ``state`` (in place): state ``state.step - 1``."""
        self.reverse_drift(state, masses)
        self.reverse_kick(state, forces, box, masses)

    def run(self, state: ExactState, forces: ForceCounts, box: torch.Tensor | None,
            masses: torch.Tensor, n_steps: int) -> ExactState:
        """``n_steps`` forward steps in place; returns ``state``."""
        for _ in range(int(n_steps)):
            self.step(state, forces, box, masses)
        return state

    def run_reverse(self, state: ExactState, forces: ForceCounts, box: torch.Tensor | None,
                    masses: torch.Tensor, n_steps: int) -> ExactState:
        """``n_steps`` reverse steps in place; returns ``state``."""
        for _ in range(int(n_steps)):
            self.reverse_step(state, forces, box, masses)
        return state


class ExactReversibleSimulation(ReversibleSimulation):
    """A differentiable window of exact dynamics: ``loss = sim(positions, velocities, box)``.

    The same interface and adjoint as :class:`~.reversible.ReversibleSimulation` (``loss_fn``
    sees a :class:`~openmm_reversible.trajectory.Trajectory` of float64 snapshots;
    ``loss.backward()`` fills parameter gradients and those of the initial state), but the
    backward pass reconstructs every state exactly, so no resynchronisation states are stored
    and windows may be arbitrarily long. The initial state is first rounded to the fixed-point
    grid; its gradient treats that rounding as the identity.

    Parameters
    ----------
    potential : TorchPotential
        With terms the integer force accumulation supports.
    integrator : ExactLangevinIntegrator
    n_steps, snapshot_every, loss_fn, truncation, masses
        As for :class:`~.reversible.ReversibleSimulation`.

    Attributes
    ----------
    info : dict
        After a call: ``forward_s``, ``buffer_bytes`` and ``buffer_bits_per_dof`` (the
        information buffer after the forward pass); after backward also ``backward_s``,
        ``bitwise_identical`` (every reconstructed snapshot, and the initial state when the
        reverse pass reaches it, equal the forward ones bit for bit) and
        ``reconstruction_error`` (nm) and ``velocity_error`` (nm/ps), both 0.0 when bitwise
        identical.
    final_exact_state : tuple of torch.Tensor
        Integer positions and velocities after ``n_steps``.
    """

    def __init__(self, potential, integrator: ExactLangevinIntegrator, n_steps: int,
                 snapshot_every: int, loss_fn: LossFunction, truncation: int | None = None,
                 masses: torch.Tensor | None = None):
        if not isinstance(integrator, ExactLangevinIntegrator):
            raise InputError(f"ExactReversibleSimulation needs an ExactLangevinIntegrator, got "
                             f"{type(integrator).__name__}; use ReversibleSimulation for float "
                             "dynamics")
        super().__init__(potential, integrator.float_integrator, n_steps, snapshot_every,
                         loss_fn, truncation=truncation, masses=masses)
        self.exact_integrator = integrator
        self.forces = integrator.forces(potential)
        self.final_exact_state: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (f"ExactReversibleSimulation(n_steps={self.n_steps}, "
                f"snapshot_every={self.snapshot_every}, truncation={self.truncation}, "
                f"{self.exact_integrator!r})")

    def __call__(self, positions, velocities, box=None, start_step: int = 0) -> torch.Tensor:
        """Run the window and return the loss (0-dim tensor, differentiable).

        Parameters are those of :meth:`ReversibleSimulation.__call__`.
        """
        dtype, device = self.masses.dtype, self.masses.device
        state = []
        for t, as_tensor in ((positions, positions_tensor), (velocities, velocities_tensor)):
            if not isinstance(t, torch.Tensor):
                t = as_tensor(t, dtype=dtype, device=device)
            if tuple(t.shape) != (self.masses.shape[0], 3):
                raise InputError(f"the state has shape {tuple(t.shape)}; expected "
                                 f"({self.masses.shape[0]}, 3) to match the masses")
            state.append(t)
        if box is not None:
            box = (box if isinstance(box, torch.Tensor)
                   else box_tensor(box, dtype=dtype, device=device)).detach()
        return _ExactFunction.apply(self, int(start_step), box, *state,
                                    *self.trainable_parameters())


class _ExactFunction(torch.autograd.Function):
    """Forward in fixed point storing snapshots; backward by exact reverse dynamics."""

    @staticmethod
    def forward(ctx, sim: ExactReversibleSimulation, start_step: int, box, positions,
                velocities, *params):
        t0 = time.perf_counter()
        integ, fmt, masses = sim.exact_integrator, sim.exact_integrator.fixed_point, sim.masses
        state = integ.state(positions.detach(), velocities.detach(), start_step)
        initial = state.copy()
        xs, vs = [], []
        for k in range(1, sim.n_steps + 1):
            integ.step(state, sim.forces, box, masses)
            if k % sim.snapshot_every == 0:
                xs.append(state.positions.clone())
                vs.append(state.velocities.clone())
        xs_fixed, vs_fixed = torch.stack(xs), torch.stack(vs)
        xs = fmt.to_float(xs_fixed, "position")
        vs = fmt.to_float(vs_fixed, "velocity")
        with torch.enable_grad():
            loss = sim._loss(sim._trajectory(xs, vs, box, start_step)).detach()
        sim._remember(xs, vs, box, start_step, integ.positions(state), integ.velocities(state))
        sim.final_exact_state = state.copy()
        sim.info = {"mode": "exact", "forward_s": time.perf_counter() - t0,
                    "buffer_bytes": state.buffer.nbytes,
                    "buffer_bits_per_dof": float(state.buffer.bit_lengths().mean())}
        ctx.sim, ctx.start_step, ctx.box, ctx.state = sim, start_step, box, state
        ctx.initial, ctx.fixed = initial, (xs_fixed, vs_fixed)
        ctx.save_for_backward(xs, vs, *params)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        t0 = time.perf_counter()
        sim, start, box, state = ctx.sim, ctx.start_step, ctx.box, ctx.state
        xs, vs, *params = ctx.saved_tensors
        integ = sim.exact_integrator
        if state.step != start + sim.n_steps:
            raise RuntimeError("the exact reverse pass consumes the forward pass's information "
                               "buffer: backward can run only once per call")
        g_x, g_v, param_grads = frame_cotangents(
            lambda fx, fv: sim._loss(sim._trajectory(fx, fv, box, start)), xs, vs, params,
            grad_loss)
        every = sim.snapshot_every
        steps = [start + (i + 1) * every for i in range(xs.shape[0])]
        stored = {n: (ctx.fixed[0][i], ctx.fixed[1][i]) for i, n in enumerate(steps)}
        dynamics = _ExactReverse(integ, sim.forces, box, sim.masses, state,
                                 {start: ctx.initial, **stored})
        at_start = reverse_sweep(
            dynamics, top=steps[-1], stop=start + first_needed_step(every, sim.truncation),
            start=start, snapshots={n: (g_x[i], g_v[i]) for i, n in enumerate(steps)},
            truncation=sim.truncation, potential=sim.potential, integ=integ.float_integrator,
            box=box, inv_masses=1.0 / sim.masses, params=params, param_grads=param_grads,
            needs_accelerations=False)
        fmt, mismatch = integ.fixed_point, dynamics.mismatch
        sim.info.update(backward_s=time.perf_counter() - t0, bitwise_identical=mismatch == [0, 0],
                        reconstruction_error=mismatch[0] * fmt.resolution("position"),
                        velocity_error=mismatch[1] * fmt.resolution("velocity"))
        grad_x0, grad_v0 = initial_state_grads(at_start, xs[0], ctx.needs_input_grad[3],
                                               ctx.needs_input_grad[4])
        return (None, None, None, grad_x0, grad_v0, *param_grads)


class _ExactReverse:
    """Exact dynamics undone step by step (:class:`~..integrators.adjoint.ReverseDynamics`);
    a stored state is only compared with (the reconstruction is exact, so nothing is reset)."""

    def __init__(self, integ: ExactLangevinIntegrator, forces: ForceCounts,
                 box: torch.Tensor | None, masses: torch.Tensor, state: ExactState,
                 stored: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.integ, self.forces, self.box, self.masses = integ, forces, box, masses
        self.state, self.stored = state, stored
        self.mismatch = [0, 0]  # largest |reconstructed - stored|, position and velocity counts

    def visit(self, n: int) -> None:
        exact = self.stored.get(n)
        if exact is None:
            return
        now = (self.state.positions, self.state.velocities)
        for k, (value, stored) in enumerate(zip(now, exact, strict=True)):
            self.mismatch[k] = max(self.mismatch[k], int((value - stored).abs().max()))

    def undo_drift(self, n: int) -> torch.Tensor:
        self.integ.reverse_drift(self.state, self.masses)
        return self.integ.positions(self.state)

    def undo_kick(self, accelerations: torch.Tensor | None) -> None:
        self.integ.reverse_kick(self.state, self.forces, self.box, self.masses)

    def drift_cotangent(self, cot_positions: torch.Tensor, cot_velocities: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        return cot_positions, self.integ.float_integrator.kick_cotangent(cot_positions,
                                                                         cot_velocities)


__all__ = ["ExactLangevinIntegrator", "ExactReversibleSimulation", "ExactState"]
