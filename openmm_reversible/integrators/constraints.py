"""Distance constraints ``|x_a - x_b| = d`` (rigid water, HBonds): the two projections of a
constrained step, solved to round-off in float64, and their vector-Jacobian products.

With ``g_k(x) = (|x_a - x_b|² - d_k²)/2``, its gradient ``G(x)`` (one row per constraint: ``+r_k``
on atom a, ``-r_k`` on atom b, ``r_k = x_a - x_b``) and ``M⁻¹`` the inverse masses:

- **velocity projection** at ``x`` (RATTLE's velocity step, OpenMM's ``applyToVelocities``):
  ``P_x q = q - M⁻¹G(x)ᵀ(G(x)M⁻¹G(x)ᵀ)⁻¹G(x)q``, so that ``G(x)·P_x q = 0``. It is linear in
  ``q`` and explicit in ``x``, so autograd differentiates it directly;
- **position projection** of ``u`` with reference ``x`` (SHAKE/SETTLE/CCMA converged,
  OpenMM's ``apply``): ``Π(u; x) = u - M⁻¹G(x)ᵀμ`` with ``μ`` such that ``g(Π) = 0``. Newton's
  method on ``μ`` (Jacobian ``-G(Π)M⁻¹G(x)ᵀ``) converges quadratically to round-off. Its
  vector-Jacobian product follows from the implicit-function theorem (no unrolled iterations):
  with ``ρ = λ - G(Π)ᵀ(G(x)M⁻¹G(Π)ᵀ)⁻¹G(x)M⁻¹λ``, ``ū = ρ`` and ``x̄ = -∇_x[μ·G(x)M⁻¹ρ]``.

SETTLE solves the same equations as converged SHAKE for a rigid triangle, so one solver
serves rigid water and bond constraints alike. The constraints are grouped into clusters
(connected components of the graph of constrained atoms: a water, a CH₃ group); each Newton or
projection step is one batched dense solve over the clusters, padded to the largest one.
Newton's method iterates on bond vectors only (:meth:`Constraints.couple`: the bonds of a
displacement ``M⁻¹G(x)ᵀμ`` are one dense product per cluster), so its passes neither gather nor
scatter over the particles; the positions are formed once, from the converged ``μ``.
"""

from __future__ import annotations

import openmm
import torch

from ..errors import InputError
from ..units import DTYPE

# Newton stops once the largest relative residual |g_k|/d_k² is at round-off: a few ulps, or
# below _FLOOR_TOL once a step no longer halves it (the round-off floor of the geometry). It
# has converged quadratically long before the iteration cap, which only guards divergence.
_RESIDUAL_TOL = 8.0 * torch.finfo(DTYPE).eps
_FLOOR_TOL = 1e-14
_MAX_ITERATIONS = 50


class Constraints:
    """A set of distance constraints and the projections of a constrained step.

    Parameters
    ----------
    pairs : torch.Tensor, shape (m, 2), int
        Constrained particle pairs ``(a, b)``.
    distances : torch.Tensor, shape (m,), nm
        Constrained distances.
    n_particles : int
        Number of particles of the System.

    Examples
    --------
    >>> constraints = Constraints.from_system(system)
    >>> sim = ReversibleSimulation(potential, integrator, 100, 10, loss_fn,
    ...                            constraints=constraints)
    """

    def __init__(self, pairs, distances, n_particles: int):
        pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
        distances = torch.as_tensor(distances, dtype=DTYPE).reshape(-1)
        if pairs.shape[0] != distances.shape[0]:
            raise InputError(f"{pairs.shape[0]} constrained pairs but {distances.shape[0]} "
                             "distances; give one distance per pair")
        if pairs.numel() and not (0 <= int(pairs.min()) and int(pairs.max()) < n_particles):
            raise InputError(f"a constrained pair names a particle outside 0..{n_particles - 1}")
        if bool((pairs[:, 0] == pairs[:, 1]).any()):
            raise InputError("a constraint joins a particle to itself; remove it")
        if not bool((distances > 0).all()):
            raise InputError("every constrained distance must be > 0 nm")
        self.pairs, self.distances, self.n_particles = pairs, distances, int(n_particles)
        self.clusters = _clusters(pairs, n_particles)
        # Atom a and atom b of every constraint, and both, per device (index_select wants the
        # index on the data's device).
        self._indices: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._layout_key: torch.Tensor | None = None
        self._layout_cache: tuple[torch.Tensor, ...] = ()

    @classmethod
    def from_system(cls, system: openmm.System) -> Constraints:
        """The constraints of an OpenMM System (``system.getConstraintParameters``)."""
        pairs, distances = [], []
        for k in range(system.getNumConstraints()):
            a, b, d = system.getConstraintParameters(k)
            pairs.append((a, b))
            distances.append(d.value_in_unit(openmm.unit.nanometer))
        return cls(torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
                   torch.tensor(distances, dtype=DTYPE), system.getNumParticles())

    def __len__(self) -> int:
        return int(self.pairs.shape[0])

    def __repr__(self) -> str:
        return (f"Constraints({len(self)} distances in {self.clusters.shape[0]} clusters of at "
                f"most {self.clusters.shape[1]})")

    # -- geometry ---------------------------------------------------------------------------

    def _ends(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Atoms a (m,), atoms b (m,) and both (2m,) of the constraints on ``device``."""
        ends = self._indices.get(device)
        if ends is None:
            first = self.pairs[:, 0].contiguous().to(device)
            second = self.pairs[:, 1].contiguous().to(device)
            ends = self._indices[device] = (first, second, torch.cat([first, second]))
        return ends

    def bonds(self, x: torch.Tensor) -> torch.Tensor:
        """``r_k = x_a - x_b`` for every constraint, shape (m, 3), nm."""
        first, second, _ = self._ends(x.device)
        return x.index_select(0, first) - x.index_select(0, second)

    def residual(self, x: torch.Tensor) -> float:
        """Largest relative violation ``| |r_k| - d_k | / d_k`` at ``x`` (dimensionless)."""
        if not len(self):
            return 0.0
        return float(((self.bonds(x).norm(dim=-1) - self.distances).abs() / self.distances).max())

    def _scatter(self, along: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-particle sum of ``+along_k`` on atom a and ``-along_k`` on atom b, (N, 3)."""
        _, _, both = self._ends(like.device)
        return torch.zeros_like(like).index_add(0, both, torch.cat([along, -along]))

    def displacement(self, x: torch.Tensor, multipliers: torch.Tensor,
                     inv_masses: torch.Tensor, bonds: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """``M⁻¹G(x)ᵀμ``: per-particle displacement of the multipliers, shape (N, 3).

        ``bonds``, when given, is ``self.bonds(x)`` already computed (the fixed points reuse
        it across their passes)."""
        r = self.bonds(x) if bonds is None else bonds
        return self._scatter(multipliers[:, None] * r, x) * inv_masses[:, None]

    def gradient_dot(self, x: torch.Tensor, w: torch.Tensor, bonds: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """``G(x)·w`` for a per-particle vector ``w``, shape (m,) (``bonds``: as in
        :meth:`displacement`)."""
        r = self.bonds(x) if bonds is None else bonds
        return (r * self.bonds(w)).sum(-1)

    def _layout(self, inv_masses: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Cluster tables for :meth:`solve` (cached for the last ``inv_masses`` tensor):
        constraint index per slot (C, K), the mass coupling of each slot pair (C, K, K), the
        identity on padded slots, each constraint's flat slot (m,), the slots' validity and
        whether the table is ``arange(m)`` in rows (every cluster of the same size and in
        constraint order, as rigid water: then the gathers are reshapes)."""
        if self._layout_key is inv_masses:
            return self._layout_cache
        clusters = self.clusters
        valid = clusters >= 0
        index = clusters.clamp(min=0).to(inv_masses.device)
        a, b = self.pairs[index, 0], self.pairs[index, 1]          # (C, K)
        ai, aj, bi, bj = a[:, :, None], a[:, None, :], b[:, :, None], b[:, None, :]
        w_a, w_b = inv_masses[a][:, :, None], inv_masses[b][:, :, None]
        dtype = inv_masses.dtype
        # ∂g_i/∂x_p · M⁻¹ · ∂g_j/∂x_p summed over the particles p the two constraints share.
        coupling = (w_a * ((ai == aj).to(dtype) - (ai == bj).to(dtype))
                    + w_b * ((bi == bj).to(dtype) - (bi == aj).to(dtype)))
        mask = (valid[:, :, None] & valid[:, None, :]).to(inv_masses.device)
        coupling = torch.where(mask, coupling, torch.zeros((), dtype=dtype))
        eye = torch.eye(clusters.shape[1], dtype=dtype, device=inv_masses.device)
        padding = torch.where(mask, torch.zeros((), dtype=dtype), eye.expand_as(coupling))
        slot = torch.empty(len(self), dtype=torch.long)
        slot[clusters[valid]] = torch.nonzero(valid.reshape(-1))[:, 0]
        ordered = bool(valid.all()) and torch.equal(clusters.reshape(-1),
                                                     torch.arange(len(self)))
        self._layout_key = inv_masses
        self._layout_cache = (index, coupling, padding, slot.to(inv_masses.device),
                              valid.to(dtype).to(inv_masses.device), ordered)
        return self._layout_cache

    def solve(self, left: torch.Tensor, right: torch.Tensor, inv_masses: torch.Tensor,
              rhs: torch.Tensor, bonds: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> torch.Tensor:
        """Solve ``G(left)M⁻¹G(right)ᵀ·y = rhs`` cluster by cluster, shape (m,).

        ``bonds``, when given, is ``(self.bonds(left), self.bonds(right))`` already computed.
        """
        index, coupling, padding, slot, valid, ordered = self._layout(inv_masses)
        if bonds is None:
            bonds = (self.bonds(left), None if right is left else self.bonds(right))
        same = bonds[1] is None or bonds[1] is bonds[0]
        if ordered:
            r_left = bonds[0].reshape(*index.shape, 3)
            r_right = r_left if same else bonds[1].reshape(*index.shape, 3)
            matrix = coupling * (r_left @ r_right.transpose(1, 2))
            return torch.linalg.solve(matrix, rhs.reshape(*index.shape, 1)).reshape(-1)
        r_left = bonds[0][index]
        r_right = r_left if same else bonds[1][index]
        matrix = coupling * (r_left @ r_right.transpose(1, 2)) + padding
        y = torch.linalg.solve(matrix, (rhs[index] * valid)[..., None])
        return y.reshape(-1)[slot]

    def couple(self, multipliers: torch.Tensor, bonds: torch.Tensor, inv_masses: torch.Tensor
               ) -> torch.Tensor:
        """Bond vectors of the displacement ``M⁻¹G(x)ᵀμ``, shape (m, 3).

        ``bonds`` is ``self.bonds(x)``. Bond vectors are linear in the positions, so
        ``self.bonds(y - self.displacement(x, μ, inv_masses))`` equals
        ``self.bonds(y) - self.couple(μ, self.bonds(x), inv_masses)``: one dense product per
        cluster (the mass coupling of its constraints) with no gather or scatter over the
        particles, which lets the fixed points of a constrained step iterate on bond vectors
        alone (nm times the multipliers' unit)."""
        index, coupling, _, slot, valid, ordered = self._layout(inv_masses)
        along = multipliers[:, None] * bonds
        if ordered:
            return (coupling @ along.reshape(*index.shape, 3)).reshape(-1, 3)
        moved = coupling @ (along[index] * valid[..., None])
        return moved.reshape(-1, 3)[slot]

    def force_multipliers(self, x: torch.Tensor, v: torch.Tensor, forces: torch.Tensor,
                          inv_masses: torch.Tensor) -> torch.Tensor:
        """Multipliers ``λ`` of the instantaneous constraint forces ``f = G(x)ᵀλ`` (kJ/mol/nm²).

        The forces that keep the constrained distances fixed in continuous time at the state
        ``(x, v)``: with them ``d²g_k/dt² = |ṙ_k|² + r_k·r̈_k = 0``, i.e.
        ``G M⁻¹Gᵀ λ = -(|ṙ_k|² + G M⁻¹F)``. Atom a of constraint k feels ``+λ_k r_k`` and atom
        b ``-λ_k r_k``; their virial is ``Σ_k λ_k r_k ⊗ r_k`` (kJ/mol). Differentiable by
        autograd in all inputs.

        Parameters
        ----------
        x : torch.Tensor, shape (N, 3), nm
        v : torch.Tensor, shape (N, 3), nm/ps
            Velocities (tangent to the constraints for a consistent state).
        forces : torch.Tensor, shape (N, 3), kJ/mol/nm
            The potential's forces at ``x``.
        inv_masses : torch.Tensor, shape (N,), 1/amu

        Returns
        -------
        torch.Tensor, shape (m,)
        """
        if not len(self):
            return x.new_zeros(0)
        rate = self.bonds(v)
        rhs = (rate * rate).sum(-1) + self.gradient_dot(x, forces * inv_masses[:, None])
        return self.solve(x, x, inv_masses, -rhs)

    # -- projections ------------------------------------------------------------------------

    def project_velocities(self, x: torch.Tensor, q: torch.Tensor, inv_masses: torch.Tensor,
                           autograd: bool = True) -> torch.Tensor:
        """``P_x q``: remove the mass-weighted components of ``q`` along the constraint
        gradients at ``x`` (nm/ps).

        Differentiable in ``x`` and ``q``: by autograd through the explicit formula (default),
        or with ``autograd=False`` by its closed-form vector-Jacobian product (module docs), one
        short backward with no graph recorded."""
        if not len(self):
            return q
        if not autograd and torch.is_grad_enabled() and (x.requires_grad or q.requires_grad):
            return _VelocityProjection.apply(x, q, inv_masses, self)
        return self._velocity_projection(x, q, inv_masses)[0]

    def _velocity_projection(self, x: torch.Tensor, q: torch.Tensor, inv_masses: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``P_x q``, its multipliers ``λ = (GM⁻¹Gᵀ)⁻¹Gq`` and the bond vectors of ``x``."""
        r = self.bonds(x)
        lam = self.solve(x, x, inv_masses, self.gradient_dot(x, q, r), bonds=(r, r))
        return q - self.displacement(x, lam, inv_masses, r), lam, r

    def position_multipliers(self, u: torch.Tensor, reference: torch.Tensor,
                             inv_masses: torch.Tensor, initial: torch.Tensor | None = None
                             ) -> torch.Tensor:
        """Multipliers ``μ`` of ``Π(u; reference)`` by Newton's method, to round-off.

        When the inputs require grad the result is differentiable by autograd: the converged
        ``μ*`` (no graph) plus the graph of one more Newton update from it with its value
        removed, ``Δ - Δ.detach()``. So the value is bitwise that of the no-grad solve and the
        derivative is autograd's through a Newton step at the solution (the ground truth the
        implicit vector-Jacobian product is checked against).
        """
        with torch.no_grad():
            mu = self._newton(u, reference, inv_masses, initial)
        if not (torch.is_grad_enabled() and (u.requires_grad or reference.requires_grad)):
            return mu
        x = u - self.displacement(reference, mu, inv_masses)
        r = self.bonds(x)
        step = self.solve(x, reference, inv_masses, 0.5 * ((r * r).sum(-1) - self.distances**2))
        return mu + (step - step.detach())

    def _newton(self, u: torch.Tensor, reference: torch.Tensor, inv_masses: torch.Tensor,
                initial: torch.Tensor | None) -> torch.Tensor:
        return self.newton_on_bonds(self.bonds(u), self.bonds(reference), inv_masses,
                                    initial)[0]

    def newton_on_bonds(self, unconstrained: torch.Tensor, reference: torch.Tensor,
                        inv_masses: torch.Tensor, initial: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Multipliers ``μ`` of ``Π(u; x)`` by Newton's method, to round-off, from bond vectors.

        Parameters
        ----------
        unconstrained : torch.Tensor, shape (m, 3), nm
            ``self.bonds(u)``.
        reference : torch.Tensor, shape (m, 3), nm
            ``self.bonds(x)``, the reference positions' bond vectors.
        inv_masses : torch.Tensor, shape (N,), 1/amu
        initial : torch.Tensor, shape (m,), optional
            Starting multipliers (default zeros).

        Returns
        -------
        multipliers : torch.Tensor, shape (m,)
            ``μ`` (no graph).
        bonds : torch.Tensor, shape (m, 3), nm
            Bond vectors of ``Π(u; x) = u - M⁻¹G(x)ᵀμ`` (:meth:`couple`).
        """
        mu, previous = initial, float("inf")  # None: zeros, whose displacement is skipped
        for _ in range(_MAX_ITERATIONS):
            r = (unconstrained if mu is None
                 else unconstrained - self.couple(mu, reference, inv_masses))
            mu, previous, converged = self.newton_update(r, reference, inv_masses, mu, previous)
            if converged:
                return (r.new_zeros(len(self)) if mu is None else mu), r
        raise self._no_convergence(previous)

    def newton_update(self, bonds: torch.Tensor, reference: torch.Tensor,
                      inv_masses: torch.Tensor, multipliers: torch.Tensor | None,
                      previous: float) -> tuple[torch.Tensor | None, float, bool]:
        """One step of Newton's method for ``Π(u; x)`` (:meth:`newton_on_bonds`).

        Parameters
        ----------
        bonds : torch.Tensor, shape (m, 3), nm
            Bond vectors of ``u - M⁻¹G(x)ᵀμ`` at the current ``μ``.
        reference : torch.Tensor, shape (m, 3), nm
            Bond vectors of ``x``.
        inv_masses : torch.Tensor, shape (N,), 1/amu
        multipliers : torch.Tensor, shape (m,), or None
            The current ``μ`` (None: zeros).
        previous : float
            Largest relative residual of the step before (``inf`` at the first).

        Returns
        -------
        multipliers : torch.Tensor or None
            ``μ`` updated, unchanged when converged.
        residual : float
            Largest relative residual ``|g_k|/d_k²`` at ``bonds``.
        converged : bool
            Whether the residual is at round-off (then ``μ`` was not updated).
        """
        d2 = self.distances**2
        g = 0.5 * ((bonds * bonds).sum(-1) - d2)
        residual = float((g.detach().abs() / d2).max())
        if residual <= _RESIDUAL_TOL or (residual <= _FLOOR_TOL and residual > 0.5 * previous):
            return multipliers, residual, True
        step = self.solve(bonds, reference, inv_masses, g, bonds=(bonds, reference))
        return (step if multipliers is None else multipliers + step), residual, False

    @staticmethod
    def _no_convergence(residual: float) -> RuntimeError:
        return RuntimeError(
            f"the position constraints did not converge in {_MAX_ITERATIONS} Newton steps "
            f"(largest relative residual {residual:.3g}); the step is too large for the "
            "constrained geometry: reduce the timestep")

    def constrain_state(self, positions: torch.Tensor, velocities: torch.Tensor,
                        masses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A state put on the constraints to round-off: positions projected onto them
        (``Π(x; x)``, the smallest mass-weighted move) and velocities made tangent there
        (``P_x v``). For states from an OpenMM platform, whose constraint tolerance
        (1e-5 relative by default) is far above round-off.

        Parameters
        ----------
        positions : torch.Tensor, shape (N, 3), nm
        velocities : torch.Tensor, shape (N, 3), nm/ps
        masses : torch.Tensor, shape (N,), amu

        Returns
        -------
        (torch.Tensor, torch.Tensor)
            Positions (nm) and velocities (nm/ps), detached.
        """
        masses = masses.to(positions.dtype)
        # Massless particles (virtual sites) are never constrained and never moved.
        inv_masses = torch.where(masses > 0, 1.0 / masses, torch.zeros_like(masses))
        with torch.no_grad():
            x, _ = self.project_positions(positions, positions, inv_masses)
            return x, self.project_velocities(x, velocities, inv_masses)

    def project_positions(self, u: torch.Tensor, reference: torch.Tensor,
                          inv_masses: torch.Tensor, autograd: bool = False,
                          initial: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``Π(u; reference)`` and its multipliers ``μ``.

        Parameters
        ----------
        u : torch.Tensor, shape (N, 3), nm
            Unconstrained positions.
        reference : torch.Tensor, shape (N, 3), nm
            Positions whose constraint gradients carry the correction (the step's start).
        inv_masses : torch.Tensor, shape (N,), 1/amu
        autograd : bool
            Differentiate by autograd through a Newton step at the solution (for checks,
            :meth:`position_multipliers`); default the implicit-function vector-Jacobian
            product.
        initial : torch.Tensor, shape (m,), optional
            Starting multipliers for Newton's method (default zeros).

        Returns
        -------
        positions : torch.Tensor, shape (N, 3), nm
            Constrained positions, ``|r_k| = d_k`` to round-off.
        multipliers : torch.Tensor, shape (m,)
            ``μ`` (detached unless ``autograd``).
        """
        if not len(self):
            return u, u.new_zeros(0)
        if autograd:
            mu = self.position_multipliers(u, reference, inv_masses, initial)
            return u - self.displacement(reference, mu, inv_masses), mu
        x, mu = _PositionProjection.apply(u, reference, inv_masses, self, initial)
        return x, mu.detach()


class _PositionProjection(torch.autograd.Function):
    """``Π(u; reference)`` solved without a graph, differentiated by the implicit-function
    theorem (module docs)."""

    @staticmethod
    def forward(ctx, u, reference, inv_masses, constraints: Constraints, initial):
        with torch.no_grad():
            r_reference = constraints.bonds(reference)
            mu, r = constraints.newton_on_bonds(constraints.bonds(u), r_reference, inv_masses,
                                                initial)
            x = u - constraints.displacement(reference, mu, inv_masses, r_reference)
        ctx.constraints = constraints
        ctx.save_for_backward(x, inv_masses, mu, r_reference, r)
        ctx.mark_non_differentiable(mu)
        return x, mu

    @staticmethod
    def backward(ctx, grad_x, grad_mu):
        x, inv_masses, mu, r_reference, r = ctx.saved_tensors
        c = ctx.constraints
        with torch.no_grad():
            # ρ = λ - G(x)ᵀ (G(ref) M⁻¹ G(x)ᵀ)⁻¹ G(ref) M⁻¹ λ
            scaled = grad_x * inv_masses[:, None]
            y = c.solve(r_reference, r, inv_masses, c.gradient_dot(x, scaled, r_reference),
                        bonds=(r_reference, r))
            rho = grad_x - c._scatter(y[:, None] * r, x)
            # x̄_ref = -∇_ref [μ · G(ref) M⁻¹ ρ]: ∓μ_k (σ_a - σ_b) on atoms a, b, σ = M⁻¹ρ.
            sigma = rho * inv_masses[:, None]
            grad_ref = -c._scatter(mu[:, None] * c.bonds(sigma), x)
        return rho, grad_ref, None, None, None


class _VelocityProjection(torch.autograd.Function):
    """``P_x q`` with its closed-form vector-Jacobian product. For a cotangent ``ω``, with
    ``λ = (GM⁻¹Gᵀ)⁻¹Gq``, ``η = (GM⁻¹Gᵀ)⁻¹GM⁻¹ω`` and ``p = P_x q``: ``q̄ = ω - Gᵀη`` and
    ``x̄ = -Σ_k ∇_x r_k·(λ_k r_k(M⁻¹q̄) + η_k r_k(p))``, ``r_k(w) = w_a - w_b`` (bond vectors of
    a per-particle vector; ``∇_x`` puts ``+`` on atom a and ``-`` on atom b)."""

    @staticmethod
    def forward(ctx, x, q, inv_masses, constraints: Constraints):
        with torch.no_grad():
            p, lam, r = constraints._velocity_projection(x, q, inv_masses)
        ctx.constraints = constraints
        ctx.save_for_backward(inv_masses, p, lam, r)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        inv_masses, p, lam, r = ctx.saved_tensors
        c = ctx.constraints
        with torch.no_grad():
            eta = c.solve(r, r, inv_masses, (r * c.bonds(grad_p * inv_masses[:, None])).sum(-1),
                          bonds=(r, r))
            grad_q = grad_p - c._scatter(eta[:, None] * r, grad_p)
            grad_x = -c._scatter(lam[:, None] * c.bonds(grad_q * inv_masses[:, None])
                                 + eta[:, None] * c.bonds(p), grad_p)
        return grad_x, grad_q, None, None


def _clusters(pairs: torch.Tensor, n_particles: int) -> torch.Tensor:
    """Constraint indices grouped by connected component of the constrained atoms, padded
    with -1: shape (C, K), K the largest cluster."""
    parent = list(range(n_particles))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[int, list[int]] = {}
    for k, (a, _) in enumerate(pairs.tolist()):
        groups.setdefault(root(a), []).append(k)
    width = max((len(g) for g in groups.values()), default=0)
    table = torch.full((len(groups), width), -1, dtype=torch.long)
    for row, members in enumerate(groups.values()):
        table[row, :len(members)] = torch.tensor(members, dtype=torch.long)
    return table


__all__ = ["Constraints"]
