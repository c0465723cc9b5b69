"""Directed neighbour pairs for machine-learning potentials, eager and TorchScript alike.

Many-body models (message passing, three-body terms) need, for every atom ``i``, the atoms
``j`` within a cutoff and the minimum-image displacement ``d_ij = x_j - x_i``. :class:`PairSearch`
returns them as a *directed* list (both ``i→j`` and ``j→i``), differentiable in positions and
box vectors: the list only selects indices, the geometry is recomputed in torch.

Two ways to find candidate pairs, the same interactions either way (pairs beyond the cutoff are
dropped, so any superset of the true pairs gives the same energy):

- eager (training, the reversible integrator): the project's
  :class:`~openmm_reversible.geometry.NeighborList`, an O(N) cell list with a skin;
- TorchScript (the model exported into OpenMM's TorchForce): every pair, in pure torch, O(N²)
  memory, which is fine up to a few thousand atoms on a GPU.

Both use the minimum-image convention, so the cutoff must not exceed half the shortest box
width; :func:`check_cutoff` says so when it does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..geometry import NeighborList, box_widths, minimum_image


def check_cutoff(cutoff: float, box: torch.Tensor | None) -> None:
    """Raise if ``cutoff`` (nm) exceeds half the shortest width of ``box`` (minimum image)."""
    if box is not None:
        half = 0.5 * float(box_widths(box.detach()).min())
        if cutoff > half:
            raise ValueError(
                "cutoff " + str(cutoff) + " nm exceeds half the shortest box width ("
                + str(half) + " nm); the minimum-image convention would miss "
                "periodic images: use a larger box (replicate the cell) or a shorter cutoff")


def model_inputs(positions: torch.Tensor, box: torch.Tensor | None,
                 atom_types: torch.Tensor | None, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Positions and box cast to a model's ``dtype``, and atom types (all zero when omitted)."""
    positions = positions.to(dtype)
    if box is not None:
        box = box.to(dtype)
    if atom_types is None:
        atom_types = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    return positions, box, atom_types


def all_pairs(n_atoms: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair ``(i, j)``, ``i != j``, as two long tensors of length N(N-1)."""
    index = torch.arange(n_atoms, device=device)
    i = index.repeat_interleave(n_atoms)
    j = index.repeat(n_atoms)
    keep = i != j
    return i[keep], j[keep]


def neighbor_pairs_of_centres(centre: torch.Tensor, n_atoms: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unordered pair of directed pairs that share a centre atom.

    Parameters
    ----------
    centre : torch.Tensor, shape (P,), long
        Centre atom of each directed pair.
    n_atoms : int

    Returns
    -------
    (first, second) : torch.Tensor, long, shape (T,)
        Indices into the pair list with ``centre[first] == centre[second]``, each unordered
        combination once: ``T = Σ_i n_i (n_i − 1) / 2`` for ``n_i`` neighbours of atom i.
    """
    order = torch.argsort(centre, stable=True)
    sorted_centre = centre[order]
    counts = torch.bincount(sorted_centre, minlength=n_atoms)
    block_start = torch.cumsum(counts, 0) - counts
    position = torch.arange(centre.numel(), device=centre.device)
    local = position - block_start[sorted_centre]
    partners = counts[sorted_centre] - local - 1
    first = torch.repeat_interleave(position, partners)
    run_start = torch.cumsum(partners, 0) - partners
    offset = torch.arange(first.numel(), device=centre.device) - run_start[first]
    second = first + 1 + offset
    return order[first], order[second]


class PairSearch(nn.Module):
    """Directed pairs within ``cutoff`` and their minimum-image displacements.

    Parameters
    ----------
    cutoff : float, nm
        Pairs with ``r < cutoff`` are returned.
    skin : float, nm
        Verlet skin of the eager neighbour list (rebuilt when an atom moves more than skin/2).

    Notes
    -----
    ``forward(positions, box)`` returns ``(i, j, d, r)``: centre and neighbour indices (long,
    shape (P,)), displacements ``x_j - x_i`` (P, 3) nm and distances (P,) nm, in a
    deterministic order (the same pairs in the same order for the same configuration).
    """

    def __init__(self, cutoff: float, skin: float = 0.05):
        super().__init__()
        self.cutoff = float(cutoff)
        self.verlet = NeighborList(self.cutoff, skin)

    @torch.jit.unused
    def _verlet_candidates(self, positions: torch.Tensor, box: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = self.verlet.pairs(positions, box)
        return torch.cat([i, j]), torch.cat([j, i])

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():
            check_cutoff(self.cutoff, box)
            i, j = all_pairs(positions.shape[0], positions.device)
        else:
            check_cutoff(self.cutoff, box)
            i, j = self._verlet_candidates(positions, box)
        d = minimum_image(positions[j] - positions[i], box)
        r2 = (d * d).sum(-1)
        keep = r2.detach() < self.cutoff * self.cutoff
        i, j, d = i[keep], j[keep], d[keep]
        # Distances are > 0 for every kept pair (i != j), so the square root is smooth here.
        return i, j, d, torch.sqrt(r2[keep])
