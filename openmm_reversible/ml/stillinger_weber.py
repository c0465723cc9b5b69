"""The Stillinger–Weber potential in torch: a physical prior for tetrahedral solids.

F. H. Stillinger and T. A. Weber, Phys. Rev. B 31, 5262 (1985). With ``r_c = a·σ``::

    E = Σ_{i<j} φ2(r_ij) + Σ_i Σ_{j<k} φ3(r_ij, r_ik, θ_jik)

    φ2(r)         = A ε [B (σ/r)^p − (σ/r)^q] exp(σ / (r − a σ))                  r < a σ
    φ3(r, s, θ)   = λ ε (cos θ + 1/3)² exp(γ σ / (r − a σ)) exp(γ σ / (s − a σ))   r, s < a σ

Every term and all its derivatives vanish at the cutoff (``exp(c/(r − aσ)) → 0`` faster than any
power), so the energy is infinitely differentiable: forces, Hessian-vector products and
parameter gradients by autograd are exact. The three-body sum runs over pairs of neighbours
of each centre (see :func:`~.pairs.neighbor_pairs_of_centres`); the neighbour search is
:class:`~openmm_reversible.ml.pairs.PairSearch` (Verlet list eagerly, all pairs in
TorchScript), so the module is scriptable and can be exported into OpenMM.

The seven energy parameters are trainable through relative scales (value = start × scale,
scales start at 1), so one optimiser step size suits ε ≈ 200 kJ/mol and σ ≈ 0.14 nm alike.
"""

from __future__ import annotations

import torch
from torch import nn

from ..units import DTYPE
from .pairs import PairSearch, neighbor_pairs_of_centres

PARAMETER_NAMES = ("A", "B", "a", "lambda", "gamma", "sigma", "epsilon")
"""Trainable parameters, in the order of :attr:`StillingerWeber.start`."""

DIAMOND_START = {"A": 7.049556, "B": 0.602225, "a": 1.80, "lambda": 21.0, "gamma": 1.20,
                 "sigma": 0.14, "epsilon": 200.0}
"""Starting values for carbon in diamond (σ nm, ε kJ/mol; the others are dimensionless)."""


class StillingerWeber(nn.Module):
    """Stillinger–Weber energy of a one-species system, kJ/mol.

    Parameters
    ----------
    A, B, a, lambda_, gamma : float
        Dimensionless SW parameters (``lambda_`` is λ).
    sigma : float, nm
    epsilon : float, kJ/mol
    p, q : float
        Exponents of the two-body term (fixed).
    search_cutoff : float, nm, optional
        Radius of the neighbour search; default ``1.05·a·σ``, leaving room for ``a·σ`` to grow
        during training. The energy is always cut at the current ``a·σ``.

    Notes
    -----
    Follows the potential contract of :mod:`openmm_reversible.ml.contract`:
    ``forward(positions (N, 3) nm, box (3, 3) nm or None, atom_types ignored) -> energy``.
    """

    def __init__(self, A: float = DIAMOND_START["A"], B: float = DIAMOND_START["B"],
                 a: float = DIAMOND_START["a"], lambda_: float = DIAMOND_START["lambda"],
                 gamma: float = DIAMOND_START["gamma"], sigma: float = DIAMOND_START["sigma"],
                 epsilon: float = DIAMOND_START["epsilon"], p: float = 4.0, q: float = 0.0,
                 search_cutoff: float | None = None):
        super().__init__()
        start = torch.tensor([A, B, a, lambda_, gamma, sigma, epsilon], dtype=DTYPE)
        if not bool((start[[0, 2, 5, 6]] > 0).all()):
            raise ValueError("Stillinger-Weber A, a, sigma and epsilon must be > 0")
        self.register_buffer("start", start)
        self.scales = nn.Parameter(torch.ones(len(PARAMETER_NAMES), dtype=DTYPE))
        self.p = float(p)
        self.q = float(q)
        self.pairs = PairSearch(1.05 * a * sigma if search_cutoff is None else search_cutoff)

    def values(self) -> torch.Tensor:
        """Current parameter values, shape (7,), in :data:`PARAMETER_NAMES` order."""
        return self.start * self.scales

    def parameter_dict(self) -> dict[str, float]:
        """Current parameter values by name (σ nm, ε kJ/mol), as plain floats."""
        values = self.values().detach().tolist()
        return {k: float(v) for k, v in zip(PARAMETER_NAMES, values, strict=True)}

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None,
                atom_types: torch.Tensor | None = None) -> torch.Tensor:
        """Total energy, kJ/mol (0-dim), in the dtype of the module's parameters.

        The arguments are those of the model contract (:mod:`.contract`): positions (N, 3) nm,
        box (3, 3) nm or None; ``atom_types`` is accepted for that signature and ignored (one
        species).
        """
        values = self.values().to(positions.dtype)
        A, B, a, lam, gamma, sigma, eps = values.unbind(0)
        cutoff = a * sigma
        if float(cutoff.detach()) > self.pairs.cutoff:
            raise ValueError("Stillinger-Weber cutoff a*sigma grew beyond the neighbour search "
                             "radius; build the model with a larger search_cutoff")
        i, j, d, r = self.pairs(positions, box)
        inside = r.detach() < cutoff.detach()
        i, d, r = i[inside], d[inside], r[inside]
        decay = torch.exp(sigma / (r - cutoff))
        s_r = sigma / r
        # Each unordered pair appears twice in the directed list: halve the two-body sum.
        two_body = 0.5 * (A * eps * (B * s_r ** self.p - s_r ** self.q) * decay).sum()
        first, second = neighbor_pairs_of_centres(i, positions.shape[0])
        cos = (d[first] * d[second]).sum(-1) / (r[first] * r[second])
        radial = torch.exp(gamma * sigma / (r[first] - cutoff)
                           + gamma * sigma / (r[second] - cutoff))
        three_body = (lam * eps * (cos + 1.0 / 3.0) ** 2 * radial).sum()
        return two_body + three_body
