"""Virtual sites in the reversible windows: integrate the particles with mass, place the rest.

A virtual site (the M of TIP4P-Ew, the lone pairs of TIP5P) is massless and is not integrated:
OpenMM places it from its parents after every step and spreads the force on it onto them. A
window does the same by integrating the *massive* particles only. :class:`MassiveParticles`
maps a state of all ``N`` particles to the ``n`` with mass (and back, the sites placed from
their parents by the potential's own :class:`~openmm_reversible.potential.virtual_sites.
VirtualSites`), and :meth:`MassiveParticles.potential` gives the energy as a function of the
massive particles alone: ``E(x_massive) = E_full(place(x_massive))``. Autograd through the
placement spreads the forces on the sites onto their parents (the chain rule OpenMM applies by
hand), so the dynamics, the inverse and the adjoint (accelerations, their Hessian-vector and
parameter vector-Jacobian products) need nothing else. Constraints, which never involve a
site, are renumbered onto the massive particles.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .constraints import Constraints


class MassiveParticles:
    """The particles with mass of a potential that has virtual sites.

    Parameters
    ----------
    potential : nn.Module
        ``potential(positions (N, 3), box) -> energy`` with a ``virtual_sites`` attribute
        (:class:`~openmm_reversible.potential.TorchPotential`).
    masses : torch.Tensor, shape (N,), amu
        Zero exactly at the virtual sites, > 0 elsewhere.
    """

    def __init__(self, potential: nn.Module, masses: torch.Tensor):
        self.placer = potential.virtual_sites
        sites = self.placer.indices.to(masses.device)
        n = int(masses.shape[0])
        keep = torch.ones(n, dtype=torch.bool, device=masses.device)
        keep[sites] = False
        if bool((masses[sites] != 0).any()):
            raise InputError("a virtual site has a nonzero mass; OpenMM's sites are massless "
                             "(set their mass to 0 in the System)")
        if not bool((masses[keep] > 0).all()):
            raise InputError("every particle that is not a virtual site must have a mass > 0 "
                             "amu (massless particles that are not placed from parents cannot "
                             "be integrated)")
        self.indices = torch.nonzero(keep)[:, 0]
        self.n_particles = n
        self.masses = masses[self.indices]

    @classmethod
    def of(cls, potential: nn.Module, masses: torch.Tensor) -> MassiveParticles | None:
        """The reduction for ``potential``, or None when it has no virtual sites."""
        placer = getattr(potential, "virtual_sites", None)
        if placer is None or not placer.n_sites:
            return None
        return cls(potential, masses)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of the massive particles, shape (..., n, 3) (differentiable)."""
        return values.index_select(-2, self.indices)

    def expand(self, positions: torch.Tensor) -> torch.Tensor:
        """All particles from the massive ones, the sites placed, shape (..., N, 3), nm."""
        if positions.ndim == 3:
            return torch.stack([self.expand(x) for x in positions])
        full = positions.new_zeros(self.n_particles, 3).index_copy(0, self.indices, positions)
        return self.placer(full)

    def expand_velocities(self, velocities: torch.Tensor) -> torch.Tensor:
        """All particles' velocities, zero at the sites (massless: no kinetic energy), nm/ps."""
        shape = (*velocities.shape[:-2], self.n_particles, 3)
        return velocities.new_zeros(shape).index_copy(-2, self.indices, velocities)

    def constraints(self, constraints: Constraints | None) -> Constraints | None:
        """``constraints`` renumbered onto the massive particles."""
        if constraints is None or not len(constraints):
            return constraints
        position = torch.full((self.n_particles,), -1, dtype=torch.long)
        position[self.indices.cpu()] = torch.arange(self.indices.numel())
        pairs = position[constraints.pairs]
        if bool((pairs < 0).any()):
            raise InputError("a constraint involves a virtual site; constrain the parents "
                             "instead (OpenMM places sites, it does not constrain them)")
        return Constraints(pairs, constraints.distances, self.indices.numel())

    def potential(self, potential: nn.Module) -> nn.Module:
        """The energy as a function of the massive particles (module docstring)."""
        return _OnMassive(potential, self)


class _OnMassive(nn.Module):
    """``E(x_massive, box) = potential(place(x_massive), box)``; same parameters."""

    def __init__(self, potential: nn.Module, particles: MassiveParticles):
        super().__init__()
        self.inner = potential
        self.particles = particles

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(self.particles.expand(positions), box)


__all__ = ["MassiveParticles"]
