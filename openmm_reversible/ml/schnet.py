"""A compact SchNet-style message-passing potential, in pure torch.

K. T. Schütt et al., "SchNet – A deep learning architecture for molecules and materials",
J. Chem. Phys. 148, 241722 (2018). Atoms start from a learned embedding of their type; each
interaction block adds to atom ``i`` a sum over neighbours ``j`` within the cutoff of
``W(r_ij) ⊙ h_j``, where the continuous filter ``W`` is a small network of Gaussian radial
features of the distance, multiplied by a cutoff function. A per-atom readout network gives atomic
energies, summed to the total energy.

Every operation is smooth: shifted-softplus activations and the cutoff function
``f(r) = (1 − (r/r_c)²)³``, whose value and first two derivatives vanish at ``r_c``. Energy,
forces and force derivatives (for Hessian-vector products, parameter gradients through forces,
and the elastic Born term) are therefore continuous and exact by autograd.

The readout's last layer starts at zero, so a fresh model predicts zero energy: added to a
physical prior (e.g. :class:`~.stillinger_weber.StillingerWeber`), training starts exactly from
the prior. The module works in float64 and float32 (``model.to(torch.float32)``), on CPU and
CUDA, and ``torch.jit.script(model)`` gives the TorchScript version exported into OpenMM.
"""

from __future__ import annotations

import torch
from torch import nn

from ..units import DTYPE
from .functions import cutoff_function, shifted_softplus
from .pairs import PairSearch, model_inputs


class _Dense(nn.Module):
    """Linear layer followed by a shifted softplus."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_softplus(self.linear(x))


class _Interaction(nn.Module):
    """One continuous-filter convolution block with a residual update."""

    def __init__(self, n_features: int, n_rbf: int):
        super().__init__()
        self.filter = nn.Sequential(_Dense(n_rbf, n_features), nn.Linear(n_features, n_features))
        self.to_message = nn.Linear(n_features, n_features, bias=False)
        self.update = nn.Sequential(_Dense(n_features, n_features),
                                    nn.Linear(n_features, n_features))

    def forward(self, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor, rbf: torch.Tensor,
                envelope: torch.Tensor) -> torch.Tensor:
        weights = self.filter(rbf) * envelope[:, None]
        messages = self.to_message(h)[j] * weights
        aggregated = torch.zeros_like(h).index_add(0, i, messages)
        return h + self.update(aggregated)


class SchNet(nn.Module):
    """SchNet-style energy model ``E(positions, box, atom_types)``, kJ/mol.

    Parameters
    ----------
    n_types : int
        Number of atom types (embeddings); ``atom_types`` holds values in ``[0, n_types)``.
    cutoff : float, nm
        Interaction cutoff (must not exceed half the shortest box width).
    n_features : int
        Width of atom features and filters.
    n_rbf : int
        Number of Gaussian radial features between 0 and ``cutoff``.
    n_interactions : int
        Number of message-passing blocks.
    energy_scale : float, kJ/mol
        Multiplies the network output, so that weights of order one give energies of this order.
    seed : int
        Seed of the weight initialisation (deterministic models).

    Notes
    -----
    Follows the potential contract of :mod:`openmm_reversible.ml.contract`. Parameters are
    float64 at construction; ``.to(torch.float32)`` gives a float32 model (positions are cast to
    the model's dtype and the energy is returned in it).
    """

    def __init__(self, n_types: int = 1, cutoff: float = 0.27, n_features: int = 32,
                 n_rbf: int = 16, n_interactions: int = 2, energy_scale: float = 10.0,
                 seed: int = 0):
        super().__init__()
        if n_types < 1 or n_features < 1 or n_rbf < 2 or n_interactions < 1 or cutoff <= 0:
            raise ValueError("SchNet needs n_types >= 1, n_features >= 1, n_rbf >= 2, "
                             "n_interactions >= 1 and cutoff > 0 nm")
        self.n_types = int(n_types)
        self.cutoff = float(cutoff)
        self.energy_scale = float(energy_scale)
        with torch.random.fork_rng(devices=[]):  # seeded weights, caller's generator untouched
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(n_types, n_features)
            self.interactions = nn.ModuleList(
                [_Interaction(n_features, n_rbf) for _ in range(n_interactions)])
            self.readout = nn.Sequential(_Dense(n_features, n_features // 2 or 1),
                                         nn.Linear(n_features // 2 or 1, 1))
        nn.init.zeros_(self.readout[1].weight)
        nn.init.zeros_(self.readout[1].bias)
        spacing = self.cutoff / (n_rbf - 1)
        self.register_buffer("centres", torch.linspace(0.0, self.cutoff, n_rbf, dtype=DTYPE))
        self.rbf_coefficient = -0.5 / spacing ** 2
        self.pairs = PairSearch(self.cutoff)
        self.to(DTYPE)

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None,
                atom_types: torch.Tensor | None = None) -> torch.Tensor:
        """Total energy, kJ/mol (0-dim), in the model's dtype.

        Parameters
        ----------
        positions : torch.Tensor, shape (N, 3), nm
        box : torch.Tensor, shape (3, 3), nm, or None
        atom_types : torch.Tensor, shape (N,), long, optional
            Type index of each atom; all zero when omitted.
        """
        positions, box, atom_types = model_inputs(positions, box, atom_types,
                                                  self.centres.dtype)
        i, j, _, r = self.pairs(positions, box)
        rbf = torch.exp(self.rbf_coefficient * (r[:, None] - self.centres) ** 2)
        envelope = cutoff_function(r, self.cutoff)
        h = self.embedding(atom_types)
        for block in self.interactions:
            h = block(h, i, j, rbf, envelope)
        return self.energy_scale * self.readout(h).sum()
