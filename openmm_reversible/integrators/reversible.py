"""Gradients of a trajectory loss by reversible simulation, as a drop-in autograd operation.

:class:`ReversibleSimulation` runs a window of Langevin-middle dynamics and returns the loss of
its snapshots; ``loss.backward()`` then fills ``.grad`` of every parameter of the potential
(classical force-field parameters or neural-network weights alike), and of the initial
positions and velocities when they require grad.

How (the same shape as an adjoint ODE solver):

- **Forward** runs under ``no_grad`` and stores only the states at the loss snapshots (every
  ``snapshot_every`` steps) and, optionally, sparse resynchronisation states (every
  ``resync_every`` steps). Memory is independent of the number of steps between them.
- **Backward** differentiates the loss with respect to the stored frames (``g_x``, ``g_v``, and
  its direct parameter dependence; through the graph the forward pass kept of the loss, so
  the loss is evaluated once), then runs the dynamics backward with the exact algebraic
  inverse of each step (:class:`~.langevin.LangevinMiddleIntegrator`), reconstructing every
  state, while the adjoint state ``(λx, λv)`` is carried back. For the step producing state
  ``n`` from ``(x, v)`` with ``v' = v + Δt·a(x)``::

      λv' = c·λv_n + Δt(1 + c)/2·λx_n
      λx_{n-1} = λx_n + (∂a/∂x)ᵀ(Δt·λv')      λv_{n-1} = λv'      ∇θ += (∂a/∂θ)ᵀ(Δt·λv')

  Both vector-Jacobian products come from one ``torch.autograd.grad`` call through the force
  graph at the reconstructed positions (double backward), so each reverse step costs one force
  evaluation plus one backward pass. At every snapshot ``g_x``, ``g_v`` are added to the adjoint.

  These are the first-order form of the recurrences in docs/design.md ("The adjoint"): with
  ``A = 2λv'/Δt`` the parameter term ``(Δt²/2)(∂a/∂θ)ᵀA`` is the same, and ``B``, ``C``,
  ``D``, ``φ`` re-express the same linear recurrence in second-order form. The sweep itself is
  :func:`~.adjoint.reverse_sweep`, shared with the exact mode.
- **Truncation** (``truncation=T``): the adjoint of each snapshot is propagated only ``T`` steps
  back (its contribution to earlier states is dropped). Snapshots whose windows end at the same
  state share one adjoint, so an untruncated run carries exactly one.
- **Resynchronisation**: round-off in the reverse pass is amplified by ``1/c`` per step and by
  the chaos of the dynamics. When the reverse pass reaches a stored state (a resync state or a
  loss snapshot, both exact) it measures ``max |x_reconstructed - x_stored|`` and continues from
  the stored state. The largest such error is reported in :attr:`ReversibleSimulation.info`.

``mode="bptt"`` gives the same loss by plain autograd through every step (memory grows with the
number of steps): the ground truth the reversible gradient is tested against on short runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..trajectory import Trajectory
from ..units import box_tensor, positions_tensor, velocities_tensor
from .adjoint import (
    first_needed_step,
    frame_cotangents,
    initial_state_grads,
    loss_cotangents,
    loss_of_leaf_frames,
    reverse_sweep,
)
from .constrained import ConstrainedLangevin
from .constraints import Constraints
from .forces import accelerations
from .langevin import LangevinMiddleIntegrator
from .sites import MassiveParticles

LossFunction = Callable[[Trajectory, Any], torch.Tensor]
"""``loss_fn(trajectory, potential) -> scalar tensor``."""

MODES = ("reversible", "bptt")


# Initial positions must satisfy the constraints this closely (relative): the first step's
# inverse assumes that it started on the constraint surface.
INITIAL_CONSTRAINT_TOL = 1e-10


def check_constraints(potential, constraints: Constraints | None) -> None:
    """Refuse a potential whose System has constraints unless they are given: integrating a
    rigid or HBonds System unconstrained would train silently wrong."""
    n = int(getattr(potential, "n_constraints", 0) or 0)
    if n and constraints is None:
        raise InputError(
            f"the System has {n} constraints (rigid water or bond constraints); pass them, "
            "ReversibleSimulation(..., constraints=Constraints.from_system(system)), to "
            "integrate them, or build it with rigidWater=False and constraints=None (config: "
            "system.rigid_water = false, system.constraints = \"none\") for a flexible model")
    if constraints is not None and n and len(constraints) != n:
        raise InputError(f"constraints has {len(constraints)} distances but the potential's "
                         f"System has {n}; build them with Constraints.from_system(system) "
                         "from the same System")


class ReversibleSimulation:
    """A differentiable simulation window: ``loss = sim(positions, velocities, box)``.

    Parameters
    ----------
    potential : nn.Module
        ``potential(positions, box) -> energy`` (kJ/mol). Its parameters that require grad
        receive gradients.
    integrator : LangevinMiddleIntegrator
        Step size, friction, temperature and noise seed.
    n_steps : int
        Steps in the window.
    snapshot_every : int
        Steps between loss snapshots; the snapshots are at ``start_step + k·snapshot_every``,
        ``k = 1 … n_steps // snapshot_every``.
    loss_fn : callable
        ``loss_fn(trajectory: Trajectory, potential) -> scalar tensor``. May depend on
        positions, velocities and (through the potential, e.g. frame energies) parameters.
    truncation : int, optional
        Truncation window T in steps: each snapshot's adjoint is propagated T steps back.
        ``None`` (default) for the exact, untruncated gradient.
    resync_every : int, optional
        Store the exact state every K steps in the forward pass, and resynchronise the reverse
        pass there. Loss snapshots are always resynchronisation points.
    masses : torch.Tensor, shape (N,), amu, optional
        Particle masses; default ``potential.masses``.
    mode : {"reversible", "bptt"}
        Gradient by reversible simulation, or by backpropagation through time (for checks; no
        truncation).
    constraints : Constraints, optional
        Distance constraints (rigid water, HBonds), integrated as OpenMM's
        LangevinMiddleIntegrator does (:mod:`.constrained`); required when the potential's
        System has any. The initial positions must satisfy them (relative error
        ``<= 1e-10``; :meth:`~.constraints.Constraints.project_positions` puts them there).

    Virtual sites (massless particles of a TorchPotential's System: TIP4P-Ew's M) are not
    integrated: the window integrates the particles with mass and places the sites from them
    (:mod:`.sites`), so forces on sites reach their parents through autograd. Positions and
    velocities in and out (the snapshots, :attr:`final_state`) hold every particle, the sites
    placed, with zero velocity; gradients with respect to the sites' input rows are zero.

    Attributes
    ----------
    info : dict
        After a call (and after backward): ``forward_s`` and ``backward_s`` (seconds),
        ``reconstruction_error`` (nm, the largest ``max |x_rec - x_stored|`` met in the reverse
        pass, over resync states, snapshots and the initial state), ``velocity_error`` (nm/ps,
        the same for velocities) and ``n_resyncs``.
    trajectory : Trajectory
        The snapshots of the last call (detached).
    final_state : tuple of torch.Tensor
        Positions and velocities after ``n_steps`` (detached), to start the next window.
    sites : MassiveParticles or None
        With virtual sites, the particles the window integrates (:mod:`.sites`).

    Examples
    --------
    >>> integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=7)
    >>> sim = ReversibleSimulation(potential, integrator, n_steps=1000, snapshot_every=100,
    ...                            loss_fn=lambda traj, pot: traj.kinetic_energy().mean())
    >>> loss = sim(positions, velocities, box)
    >>> loss.backward()            # fills p.grad for p in potential.parameters()
    """

    def __init__(self, potential: nn.Module, integrator: LangevinMiddleIntegrator, n_steps: int,
                 snapshot_every: int, loss_fn: LossFunction, truncation: int | None = None,
                 resync_every: int | None = None, masses: torch.Tensor | None = None,
                 mode: str = "reversible", constraints: Constraints | None = None):
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if int(n_steps) < 1:
            raise InputError(f"n_steps must be >= 1, got {n_steps}")
        if not 1 <= int(snapshot_every) <= int(n_steps):
            raise InputError(f"snapshot_every must be between 1 and n_steps={n_steps}, "
                             f"got {snapshot_every}")
        if truncation is not None and int(truncation) < 1:
            raise InputError(f"truncation must be >= 1 step or None, got {truncation}")
        if resync_every is not None and int(resync_every) < 1:
            raise InputError(f"resync_every must be >= 1 step or None, got {resync_every}")
        if mode == "bptt" and truncation is not None:
            raise InputError("truncation is only available in mode='reversible'; "
                             "use truncation=None with mode='bptt'")
        if masses is None:
            masses = getattr(potential, "masses", None)
            if masses is None:
                raise InputError("the potential has no 'masses' attribute; pass masses= "
                                 "(tensor of shape (N,), amu)")
        masses = torch.as_tensor(masses)
        check_constraints(potential, constraints)
        self.sites = MassiveParticles.of(potential, masses)
        if self.sites is None and not bool((masses > 0).all()):
            raise InputError("every mass must be > 0 amu (massless particles are integrated "
                             "only as the virtual sites of a TorchPotential, placed from their "
                             "parents)")
        self.potential = potential
        self.integrator = integrator
        self.n_steps = int(n_steps)
        self.snapshot_every = int(snapshot_every)
        self.loss_fn = loss_fn
        self.truncation = None if truncation is None else int(truncation)
        self.resync_every = None if resync_every is None else int(resync_every)
        self.masses = masses
        self.mode = mode
        self.constraints = constraints if constraints is not None and len(constraints) else None
        # What the dynamics integrate: every particle, or those with mass (sites placed).
        if self.sites is None:
            self._dynamics, self._masses, integrated = potential, masses, self.constraints
        else:
            self._dynamics, self._masses = self.sites.potential(potential), self.sites.masses
            integrated = self.sites.constraints(self.constraints)
        self.scheme = (None if integrated is None
                       else ConstrainedLangevin(integrator, integrated, self._masses))
        self.info: dict[str, float | int | str] = {}
        self.trajectory: Trajectory | None = None
        self.final_state: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (f"ReversibleSimulation(n_steps={self.n_steps}, "
                f"snapshot_every={self.snapshot_every}, truncation={self.truncation}, "
                f"resync_every={self.resync_every}, mode={self.mode!r}, {self.integrator!r})")

    @property
    def n_snapshots(self) -> int:
        return self.n_steps // self.snapshot_every

    def trainable_parameters(self) -> tuple[torch.Tensor, ...]:
        """The potential's parameters that require grad, in ``potential.parameters()`` order."""
        return tuple(p for p in self.potential.parameters() if p.requires_grad)

    def __call__(self, positions, velocities, box=None, start_step: int = 0) -> torch.Tensor:
        """Run the window and return the loss (0-dim tensor, differentiable).

        Parameters
        ----------
        positions : torch.Tensor, shape (N, 3), nm (or array / Quantity)
        velocities : torch.Tensor, shape (N, 3), nm/ps (or array / Quantity)
        box : torch.Tensor, shape (3, 3), nm, or None
            Constant over the window; no gradient is computed with respect to it.
        start_step : int
            Global index of the initial state; the noise of step n depends on
            ``(integrator.seed, n)``, so consecutive windows continue one noise stream.
        """
        dtype, device = self.masses.dtype, self.masses.device
        if not isinstance(positions, torch.Tensor):
            positions = positions_tensor(positions, dtype=dtype, device=device)
        if not isinstance(velocities, torch.Tensor):
            velocities = velocities_tensor(velocities, dtype=dtype, device=device)
        if box is not None and not isinstance(box, torch.Tensor):
            box = box_tensor(box, dtype=dtype, device=device)
        if box is not None:
            box = box.detach()
        n_atoms = self.masses.shape[0]
        for name, t in (("positions", positions), ("velocities", velocities)):
            if tuple(t.shape) != (n_atoms, 3):
                raise InputError(f"{name} has shape {tuple(t.shape)}; expected ({n_atoms}, 3) "
                                 "to match the masses")
        if self.constraints is not None:
            residual = self.constraints.residual(positions.detach())
            if residual > INITIAL_CONSTRAINT_TOL:
                raise InputError(
                    f"the initial positions violate the constraints (largest relative error "
                    f"{residual:.3g} > {INITIAL_CONSTRAINT_TOL:g}); constrain them first, e.g. "
                    "positions = constraints.project_positions(positions, positions, "
                    "1 / masses)[0], or Context.applyConstraints(1e-12) in OpenMM")
        if self.sites is not None:
            positions, velocities = self.sites.reduce(positions), self.sites.reduce(velocities)
        if self.mode == "bptt":
            return self._bptt(positions, velocities, box, int(start_step))
        return _ReversibleFunction.apply(self, int(start_step), box, positions, velocities,
                                         *self.trainable_parameters())

    # -- shared pieces ---------------------------------------------------------------------

    def _trajectory(self, xs: torch.Tensor, vs: torch.Tensor, box: torch.Tensor | None,
                    start_step: int) -> Trajectory:
        """The snapshots of all particles (sites placed from the integrated ones)."""
        steps = start_step + self.snapshot_every * torch.arange(
            1, self.n_snapshots + 1, device=xs.device)
        if self.sites is not None:
            xs, vs = self.sites.expand(xs), self.sites.expand_velocities(vs)
        return Trajectory(positions=xs, velocities=vs, box=box, steps=steps,
                          timestep=self.integrator.timestep, masses=self.masses,
                          temperature=self.integrator.temperature)

    def _loss(self, traj: Trajectory) -> torch.Tensor:
        loss = self.loss_fn(traj, self.potential)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise InputError("loss_fn must return a scalar tensor, got "
                             f"{type(loss).__name__} of shape {getattr(loss, 'shape', None)}")
        return loss.reshape(())

    def _step(self, x, v, a, step: int, autograd: bool = False):
        """One forward step (constrained when the simulation has constraints)."""
        if self.scheme is None:
            return self.integrator.step(x, v, a, step, self._masses)
        return self.scheme.step(x, v, a, step, autograd=autograd)

    def _remember(self, xs, vs, box, start_step, x, v) -> None:
        self.trajectory = self._trajectory(xs.detach(), vs.detach(), box, start_step)
        x, v = x.detach(), v.detach()
        self.final_state = (x, v) if self.sites is None else (
            self.sites.expand(x), self.sites.expand_velocities(v))

    # -- backpropagation through time ----------------------------------------------------------

    def _bptt(self, positions, velocities, box, start_step) -> torch.Tensor:
        t0 = time.perf_counter()
        inv_masses = 1.0 / self._masses
        x, v = positions, velocities
        xs, vs = [], []
        for k in range(1, self.n_steps + 1):
            a, x = accelerations(self._dynamics, x, box, inv_masses, create_graph=True)
            x, v = self._step(x, v, a, start_step + k, autograd=True)
            if k % self.snapshot_every == 0:
                xs.append(x)
                vs.append(v)
        xs, vs = torch.stack(xs), torch.stack(vs)
        loss = self._loss(self._trajectory(xs, vs, box, start_step))
        self._remember(xs, vs, box, start_step, x, v)
        self.info = {"mode": "bptt", "forward_s": time.perf_counter() - t0}
        return loss


class _ReversibleFunction(torch.autograd.Function):
    """Forward under no_grad storing snapshots; backward by reverse dynamics (module docs)."""

    @staticmethod
    def forward(ctx, sim: ReversibleSimulation, start_step: int, box, positions, velocities,
                *params):
        t0 = time.perf_counter()
        inv_masses = 1.0 / sim._masses
        last = sim.n_snapshots * sim.snapshot_every
        first_needed = first_needed_step(sim.snapshot_every, sim.truncation)
        x, v = positions.detach(), velocities.detach()
        xs, vs, resync = [], [], {}
        for k in range(1, sim.n_steps + 1):
            a, _ = accelerations(sim._dynamics, x, box, inv_masses)
            x, v = sim._step(x, v, a, start_step + k)
            if k % sim.snapshot_every == 0:
                xs.append(x)
                vs.append(v)
            elif sim.resync_every and k % sim.resync_every == 0 and first_needed < k < last:
                resync[start_step + k] = (x, v)
        xs, vs = torch.stack(xs), torch.stack(vs)
        # The loss keeps its graph from leaf copies of the frames: the backward pass takes its
        # cotangents from it instead of evaluating the loss a second time.
        graph = loss_of_leaf_frames(
            lambda fx, fv: sim._loss(sim._trajectory(fx, fv, box, start_step)), xs, vs)
        loss = graph[0].detach()
        sim._remember(xs, vs, box, start_step, x, v)
        sim.info = {"mode": "reversible", "forward_s": time.perf_counter() - t0}
        ctx.sim, ctx.start_step, ctx.box, ctx.resync = sim, start_step, box, resync
        ctx.initial = (positions.detach(), velocities.detach())
        ctx.loss_graph = graph
        ctx.save_for_backward(xs, vs, *params)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        t0 = time.perf_counter()
        sim, start, box = ctx.sim, ctx.start_step, ctx.box
        xs, vs, *params = ctx.saved_tensors
        if ctx.loss_graph is not None:  # the forward pass's loss, used once
            g_x, g_v, param_grads = loss_cotangents(*ctx.loss_graph, params, grad_loss)
            ctx.loss_graph = None
        else:  # a second backward (retain_graph): the loss again
            g_x, g_v, param_grads = frame_cotangents(
                lambda fx, fv: sim._loss(sim._trajectory(fx, fv, box, start)), xs, vs, params,
                grad_loss)
        every = sim.snapshot_every
        stored = {start + (i + 1) * every: (xs[i], vs[i]) for i in range(xs.shape[0])}
        top = start + sim.n_snapshots * every
        exact = {**ctx.resync, start: ctx.initial, **stored}
        if sim.scheme is None:
            dynamics = _FloatReverse(sim.integrator, sim._masses, (xs[-1], vs[-1]), top, exact)
        else:
            dynamics = _ConstrainedReverse(sim.scheme, (xs[-1], vs[-1]), top, exact, start)
        at_start = reverse_sweep(
            dynamics, top=top, stop=start + first_needed_step(every, sim.truncation),
            start=start, snapshots={n: (g_x[i], g_v[i]) for i, n in enumerate(stored)},
            truncation=sim.truncation, potential=sim._dynamics, integ=sim.integrator, box=box,
            inv_masses=1.0 / sim._masses, params=params, param_grads=param_grads,
            needs_accelerations=True)
        sim.info.update(backward_s=time.perf_counter() - t0,
                        reconstruction_error=dynamics.x_err, velocity_error=dynamics.v_err,
                        n_resyncs=dynamics.n_resyncs)
        grad_x0, grad_v0 = initial_state_grads(at_start, xs[0], ctx.needs_input_grad[3],
                                               ctx.needs_input_grad[4])
        return (None, None, None, grad_x0, grad_v0, *param_grads)


class _FloatReverse:
    """Float dynamics undone step by step (:class:`~.adjoint.ReverseDynamics`); at every
    stored exact state the reconstruction error is measured and the sweep continues from the
    stored state."""

    def __init__(self, integ: LangevinMiddleIntegrator, masses: torch.Tensor,
                 state: tuple[torch.Tensor, torch.Tensor], top: int,
                 stored: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.integ, self.masses, self.top, self.stored = integ, masses, top, stored
        self.x, self.v = state
        self.kicked: torch.Tensor | None = None
        self.x_err = self.v_err = 0.0
        self.n_resyncs = 0

    def visit(self, n: int) -> None:
        exact = self.stored.get(n)
        if exact is not None and n != self.top:
            self.x_err = _worst(self.x_err, self.x - exact[0])
            self.v_err = _worst(self.v_err, self.v - exact[1])
            self.x, self.v = exact
            self.n_resyncs += 1

    def undo_drift(self, n: int) -> torch.Tensor:
        self.x, self.kicked = self.integ.reverse_drift(self.x, self.v, n, self.masses)
        return self.x

    def undo_kick(self, accelerations: torch.Tensor | None) -> None:
        self.v = self.integ.reverse_kick(self.kicked, accelerations)

    def drift_cotangent(self, cot_positions: torch.Tensor, cot_velocities: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        return cot_positions, self.integ.kick_cotangent(cot_positions, cot_velocities)


class _ConstrainedReverse(_FloatReverse):
    """Constrained float dynamics undone step by step (:mod:`.constrained`); resynchronised
    at stored states as :class:`_FloatReverse`."""

    def __init__(self, scheme: ConstrainedLangevin, state: tuple[torch.Tensor, torch.Tensor],
                 top: int, stored: dict[int, tuple[torch.Tensor, torch.Tensor]], start: int):
        super().__init__(scheme.integ, scheme.masses, state, top, stored)
        self.scheme, self.start = scheme, start
        self.n = top
        self.multipliers: torch.Tensor | None = None
        self.q: torch.Tensor | None = None
        self._graph: tuple[torch.Tensor, ...] | None = None
        # The inverse of the next drift, found while undoing the kick (dropped on a resync).
        self._next_drift: tuple[torch.Tensor, ...] | None = None

    def visit(self, n: int) -> None:
        super().visit(n)
        if n in self.stored and n != self.top:
            self._next_drift = None

    def undo_drift(self, n: int) -> torch.Tensor:
        self.n, self._graph = n, None
        if self._next_drift is None:
            self._next_drift = self.scheme.reverse_drift(self.x, self.v, n)
        self.x, self.kicked, self.multipliers = self._next_drift
        return self.x

    def undo_kick(self, accelerations: torch.Tensor | None) -> None:
        previous = self.n - 1
        initial = self.stored[previous][1] if previous == self.start else None
        self.v, self.q, self._next_drift = self.scheme.reverse_kick(
            self.x, self.kicked, accelerations, previous, initial_velocities=initial)

    def drift_cotangent(self, cot_positions: torch.Tensor, cot_velocities: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph is None:
            x = self.x.detach().requires_grad_(True)
            q = self.q.detach().requires_grad_(True)
            x_n, v_n, _ = self.scheme.after_kick(x, q, self.n, initial=self.multipliers)
            self._graph = (x, q, x_n, v_n)
        x, q, x_n, v_n = self._graph
        direct, kicked = torch.autograd.grad((x_n, v_n), (x, q),
                                             (cot_positions, cot_velocities), retain_graph=True)
        return direct, kicked


def _worst(current: float, difference: torch.Tensor) -> float:
    """Running maximum of ``|difference|`` that keeps a NaN (a diverged reconstruction)."""
    err = float(difference.abs().max())
    return current if (err <= current or current != current) else err
