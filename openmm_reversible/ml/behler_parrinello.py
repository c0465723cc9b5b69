"""A Behler–Parrinello network: atom-centred symmetry functions and per-type atomic networks.

J. Behler and M. Parrinello, Phys. Rev. Lett. 98, 146401 (2007); J. Behler, J. Chem. Phys.
134, 074106 (2011). Each atom ``i`` is described by

- radial functions ``G2_i(μ) = Σ_j exp(−η (r_ij − μ)²) f(r_ij)`` on a grid of centres μ;
- angular functions ``G4_i(ζ, λ, η) = 2^(1−ζ) Σ_{j<k} (1 + λ cos θ_jik)^ζ
  exp(−η (r_ij² + r_ik²)) f(r_ij) f(r_ik)`` (the form without the ``r_jk`` factor, sometimes
  called G5), over neighbours within the angular cutoff (the radial one by default),

with the cutoff function ``f(r) = (1 − (r/r_c)²)³`` (C² at ``r_c``). The descriptors are shifted
and scaled (:meth:`BehlerParrinello.standardize`), and a small network per atom type maps them
to an atomic energy; the energy is their sum. Descriptors are summed over all neighbours
whatever their type (they are not resolved by element pair).

Unlike a radial message-passing model, the angular functions see bond angles directly, and
the atomic network is a nonlinear function of the whole environment (bond–bond coupling):
the terms that set the shear and bulk moduli of a covalent crystal independently of each
other. The last layer starts at zero, so added to a prior (e.g.
:class:`~.stillinger_weber.StillingerWeber`) training starts exactly from the prior.

Every operation is smooth, so energy, forces and their derivatives (Hessian-vector products,
parameter gradients through forces, the elastic Born term) are exact by autograd. The module
works in float64 and float32, on CPU and CUDA, and ``torch.jit.script(model)`` exports it.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..units import DTYPE
from .functions import cutoff_function, shifted_softplus
from .pairs import PairSearch, model_inputs, neighbor_pairs_of_centres


class _AtomicNetwork(nn.Module):
    """Descriptors → atomic energy: hidden layers with shifted softplus, last layer at zero."""

    def __init__(self, n_in: int, hidden: list[int]):
        super().__init__()
        sizes = [n_in, *hidden]
        self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:],
                                                                       strict=False)])
        self.output = nn.Linear(sizes[-1], 1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = shifted_softplus(layer(x))
        return self.output(x)[:, 0]


class BehlerParrinello(nn.Module):
    """Behler–Parrinello energy model ``E(positions, box, atom_types)``, kJ/mol.

    Parameters
    ----------
    n_types : int
        Number of atom types; each has its own atomic network. ``atom_types`` holds values in
        ``[0, n_types)``.
    cutoff : float, nm
        Radius of the radial symmetry functions (must not exceed half the shortest box width).
    angular_cutoff : float, nm, optional
        Radius of the angular symmetry functions (default ``cutoff``). A shorter one, e.g. the
        first shell only, cuts the number of triplets (and the memory of the elastic Born
        terms) by the square of the neighbour-count ratio.
    n_radial : int
        Number of radial centres μ, evenly spaced from ``radial_start`` to ``cutoff``; the
        Gaussian width equals the spacing.
    radial_start : float, nm
        First radial centre (no pair is closer than about this in the systems of interest).
    zetas, lambdas : sequence
        Angular exponents ζ and signs λ = ±1; every combination is used.
    angular_widths : sequence of float, nm
        Radial widths w of the angular functions, ``η = 1/(2 w²)``.
    hidden : sequence of int
        Hidden layer widths of the atomic networks.
    energy_scale : float, kJ/mol
        Multiplies the atomic networks' outputs.
    seed : int
        Seed of the weight initialisation (deterministic models).

    Notes
    -----
    Follows the potential contract of :mod:`openmm_reversible.ml.contract`. Parameters are
    float64 at construction; ``.to(torch.float32)`` gives a float32 model. Call
    :meth:`standardize` once with a representative structure (the crystal, a solvated box) so
    that the network sees descriptors of order one; until then they enter unscaled.
    """

    def __init__(self, n_types: int = 1, cutoff: float = 0.27,
                 angular_cutoff: float | None = None, n_radial: int = 8,
                 radial_start: float = 0.1, zetas: tuple[float, ...] = (1.0, 2.0, 4.0),
                 lambdas: tuple[float, ...] = (-1.0, 1.0),
                 angular_widths: tuple[float, ...] = (0.1, 0.2),
                 hidden: tuple[int, ...] = (32, 32), energy_scale: float = 10.0, seed: int = 0):
        super().__init__()
        if n_types < 1 or n_radial < 2 or cutoff <= 0 or not 0 <= radial_start < cutoff:
            raise ValueError("BehlerParrinello needs n_types >= 1, n_radial >= 2 and "
                             "0 <= radial_start < cutoff (nm)")
        if any(abs(abs(float(lam)) - 1.0) > 0 for lam in lambdas) or any(
                float(z) < 1 for z in zetas):
            raise ValueError("angular lambdas must be +1 or -1 and zetas >= 1")
        if not zetas or not lambdas or not angular_widths or not hidden:
            raise ValueError("zetas, lambdas, angular_widths and hidden must not be empty")
        self.n_types = int(n_types)
        self.cutoff = float(cutoff)
        self.angular_cutoff = self.cutoff if angular_cutoff is None else float(angular_cutoff)
        if not 0 < self.angular_cutoff <= self.cutoff:
            raise ValueError("angular_cutoff must be > 0 and <= cutoff (nm)")
        self.energy_scale = float(energy_scale)
        spacing = (self.cutoff - radial_start) / (n_radial - 1)
        self.radial_coefficient = -0.5 / spacing ** 2
        combos = list(itertools.product([float(z) for z in zetas],
                                        [float(lam) for lam in lambdas],
                                        [0.5 / float(w) ** 2 for w in angular_widths]))
        self.register_buffer("centres", torch.linspace(radial_start, self.cutoff, n_radial,
                                                      dtype=DTYPE))
        self.register_buffer("zeta", torch.tensor([c[0] for c in combos], dtype=DTYPE))
        self.register_buffer("lam", torch.tensor([c[1] for c in combos], dtype=DTYPE))
        self.register_buffer("eta", torch.tensor([c[2] for c in combos], dtype=DTYPE))
        n_features = n_radial + len(combos)
        self.register_buffer("shift", torch.zeros(n_features, dtype=DTYPE))
        self.register_buffer("scale", torch.ones(n_features, dtype=DTYPE))
        with torch.random.fork_rng(devices=[]):  # seeded weights, caller's generator untouched
            torch.manual_seed(seed)
            self.networks = nn.ModuleList([_AtomicNetwork(n_features, [int(h) for h in hidden])
                                           for _ in range(self.n_types)])
        self.pairs = PairSearch(self.cutoff)
        self.to(DTYPE)

    @property
    def n_features(self) -> int:
        """Number of symmetry functions per atom."""
        return int(self.shift.numel())

    def descriptors(self, positions: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        """Raw symmetry functions of every atom, shape (N, n_features): radial, then angular."""
        i, _, d, r = self.pairs(positions, box)
        n_atoms = positions.shape[0]
        envelope = cutoff_function(r, self.cutoff)
        radial = torch.exp(self.radial_coefficient * (r[:, None] - self.centres) ** 2)
        g2 = positions.new_zeros(n_atoms, self.centres.numel()).index_add(
            0, i, radial * envelope[:, None])
        if self.angular_cutoff < self.cutoff:
            near = r.detach() < self.angular_cutoff
            i, d, r = i[near], d[near], r[near]
            envelope = cutoff_function(r, self.angular_cutoff)
        first, second = neighbor_pairs_of_centres(i, n_atoms)
        cos = (d[first] * d[second]).sum(-1) / (r[first] * r[second])
        r2 = r[first] ** 2 + r[second] ** 2
        weight = envelope[first] * envelope[second]
        base = 1.0 + self.lam * cos[:, None]
        terms = (torch.pow(2.0, 1.0 - self.zeta) * base ** self.zeta
                 * torch.exp(-self.eta * r2[:, None]) * weight[:, None])
        g4 = positions.new_zeros(n_atoms, self.zeta.numel()).index_add(0, i[first], terms)
        return torch.cat([g2, g4], dim=1)

    @torch.jit.unused
    def standardize(self, positions, box=None) -> None:
        """Set the descriptor shift and scale from a representative structure.

        The shift is the mean of each symmetry function over the atoms and the scale its
        root mean square (so a perfect crystal, where every atom is alike, is mapped to zero
        with unit scale per relative change). Call before training; the values are saved with
        the model (buffers) and exported with it.

        Parameters
        ----------
        positions : array-like, shape (N, 3), nm
        box : array-like, shape (3, 3), nm, or None
        """
        dtype = self.centres.dtype
        positions = torch.as_tensor(positions, dtype=dtype, device=self.centres.device)
        box = None if box is None else torch.as_tensor(box, dtype=dtype,
                                                       device=self.centres.device)
        with torch.no_grad():
            g = self.descriptors(positions, box)
            rms = torch.sqrt((g * g).mean(0))
            if bool((rms == 0).any()):
                raise ValueError("a symmetry function is zero for every atom of this structure "
                                 "(no neighbour within its range): widen the cutoff or pass "
                                 "a denser structure")
            self.shift.copy_(g.mean(0))
            self.scale.copy_(rms)

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None,
                atom_types: torch.Tensor | None = None) -> torch.Tensor:
        """Total energy, kJ/mol (0-dim), in the model's dtype: positions (N, 3) nm, box (3, 3)
        nm or None, atom types (N,) long or None (all zero), as :meth:`.SchNet.forward`."""
        positions, box, atom_types = model_inputs(positions, box, atom_types,
                                                  self.centres.dtype)
        features = (self.descriptors(positions, box) - self.shift) / self.scale
        energy = positions.new_zeros(())
        for t, network in enumerate(self.networks):
            mask = atom_types == t
            energy = energy + network(features[mask]).sum()
        return self.energy_scale * energy
