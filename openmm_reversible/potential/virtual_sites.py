"""Virtual sites: massless particles whose positions are functions of their parents'.

OpenMM places every virtual site from its parents before computing forces, and distributes the
force on a site back onto its parents (the chain rule). The twin does the same by writing the
site positions into the coordinate array as differentiable functions of the parents: the energy
is then a function of the real atoms only, autograd carries forces, Hessian-vector products and
parameter VJPs through the sites, and the gradient with respect to a site's own (input)
position is zero, as OpenMM's forces on sites are.

Site types (OpenMM's definitions; ``x_i`` the parent positions, nm):

- ``TwoParticleAverageSite``: ``w1 x1 + w2 x2``;
- ``ThreeParticleAverageSite``: ``w1 x1 + w2 x2 + w3 x3``;
- ``OutOfPlaneSite``: ``x1 + w12 r12 + w13 r13 + wc (r12 × r13)``, ``r1k = xk − x1``;
- ``LocalCoordinatesSite``: origin ``o = Σ oᵢ xᵢ``, directions ``dx = Σ xᵢʷ xᵢ``,
  ``dy = Σ yᵢʷ xᵢ``; ``ez = (dx × dy)/|dx × dy|``, ``ex = dx/|dx|``, ``ey = ez × ex``; the
  site is ``o + p_x ex + p_y ey + p_z ez``.

Positions are used as given (no periodic wrapping), as OpenMM does: parents and site belong to
one molecule. ``SymmetrySite`` is refused by name.
"""

from __future__ import annotations

import re

import numpy as np
import openmm
import torch
from torch import nn

from ..units import DTYPE
from .base import UnsupportedForceError

SUPPORTED = ("TwoParticleAverageSite", "ThreeParticleAverageSite", "OutOfPlaneSite",
             "LocalCoordinatesSite")


class VirtualSites(nn.Module):
    """The virtual sites of a System, placed from their parents.

    Parameters
    ----------
    system : openmm.System

    Attributes
    ----------
    indices : torch.Tensor of int, shape (n_sites,)
        The particles that are virtual sites.
    """

    def __init__(self, system: openmm.System):
        super().__init__()
        groups: dict[str, list[tuple[int, list[int], list[float]]]] = {n: [] for n in SUPPORTED}
        unsupported = []
        for i in range(system.getNumParticles()):
            if not system.isVirtualSite(i):
                continue
            site = system.getVirtualSite(i)
            kind = next((n for n in SUPPORTED if isinstance(site, getattr(openmm, n))), None)
            if kind is None:
                unsupported.append((i, type(site).__name__))
                continue
            parents = [site.getParticle(k) for k in range(site.getNumParticles())]
            groups[kind].append((i, parents, _site_weights(kind, site)))
        if unsupported:
            names = sorted(set(_serialized_site_types(system)) - set(SUPPORTED)) or ["unknown"]
            raise UnsupportedForceError(
                f"virtual sites of type {', '.join(names)} (particle "
                f"{unsupported[0][0]} and {len(unsupported) - 1} more) are not supported by the "
                f"torch twin; supported: {', '.join(SUPPORTED)}")
        self.kinds: list[str] = []
        all_sites = []
        for kind, items in groups.items():
            if not items:
                continue
            widths = {len(parents) for _, parents, _ in items}
            for width in sorted(widths):
                rows = [item for item in items if len(item[1]) == width]
                name = f"{kind}_{width}"
                self.kinds.append(name)
                self.register_buffer(f"{name}_sites", torch.tensor([r[0] for r in rows]))
                self.register_buffer(f"{name}_parents", torch.tensor([r[1] for r in rows]))
                self.register_buffer(f"{name}_weights",
                                     torch.tensor(np.array([r[2] for r in rows]), dtype=DTYPE))
                all_sites += [r[0] for r in rows]
        self.register_buffer("indices", torch.tensor(sorted(all_sites), dtype=torch.long))

    @property
    def n_sites(self) -> int:
        return int(self.indices.numel())

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions`` with every site's row replaced by its place from its parents, nm.

        Parameters
        ----------
        positions : torch.Tensor, shape (N, 3), nm
        """
        if not self.kinds:
            return positions
        placed = positions
        for name in self.kinds:
            sites = getattr(self, f"{name}_sites")
            parents = positions[getattr(self, f"{name}_parents")]  # (S, P, 3)
            weights = getattr(self, f"{name}_weights").to(positions.dtype)
            kind = name.rsplit("_", 1)[0]
            placed = placed.index_copy(0, sites, _place(kind, parents, weights))
        return placed


def _serialized_site_types(system: openmm.System) -> list[str]:
    """Class names of the System's virtual sites as its XML serialization spells them (the
    Python bindings return sites of newer types, e.g. SymmetrySite, as the base class)."""
    xml = openmm.XmlSerializer.serialize(system)
    return re.findall(r"<Particle [^>]*mass=\"0\">\s*<(\w+Site)\b", xml)


def _site_weights(kind: str, site) -> list[float]:
    """The coefficients of one site, flattened: see :func:`_place` for their order."""
    if kind == "TwoParticleAverageSite":
        return [site.getWeight(0), site.getWeight(1)]
    if kind == "ThreeParticleAverageSite":
        return [site.getWeight(0), site.getWeight(1), site.getWeight(2)]
    if kind == "OutOfPlaneSite":
        return [site.getWeight12(), site.getWeight13(), site.getWeightCross()]
    local = site.getLocalPosition()
    local = [local[k].value_in_unit(openmm.unit.nanometer) if openmm.unit.is_quantity(local[k])
             else float(local[k]) for k in range(3)]
    return [*site.getOriginWeights(), *site.getXWeights(), *site.getYWeights(), *local]


def _place(kind: str, parents: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Site positions (S, 3) from parents (S, P, 3) and coefficients (S, W)."""
    if kind in ("TwoParticleAverageSite", "ThreeParticleAverageSite"):
        return (weights[:, :, None] * parents).sum(1)
    if kind == "OutOfPlaneSite":
        r12 = parents[:, 1] - parents[:, 0]
        r13 = parents[:, 2] - parents[:, 0]
        return (parents[:, 0] + weights[:, 0:1] * r12 + weights[:, 1:2] * r13
                + weights[:, 2:3] * torch.linalg.cross(r12, r13))
    n = parents.shape[1]
    origin = (weights[:, 0:n, None] * parents).sum(1)
    dx = (weights[:, n:2 * n, None] * parents).sum(1)
    dy = (weights[:, 2 * n:3 * n, None] * parents).sum(1)
    dz = torch.linalg.cross(dx, dy)
    ex = dx / torch.linalg.vector_norm(dx, dim=-1, keepdim=True)
    ez = dz / torch.linalg.vector_norm(dz, dim=-1, keepdim=True)
    ey = torch.linalg.cross(ez, ex)
    local = weights[:, 3 * n:]
    return origin + local[:, 0:1] * ex + local[:, 1:2] * ey + local[:, 2:3] * ez


__all__ = ["SUPPORTED", "VirtualSites"]
