"""Forces as fixed-point integers: bitwise the same for the same positions, always.

A float force is a sum of many per-interaction contributions, and floating-point addition is
not associative: the result depends on summation order, hence on thread count, device and
neighbour-list order. The exact mode (:mod:`openmm_reversible.exact`) needs
``same positions → same forces`` bit for bit, so here every interaction is differentiated on
its own and only integers are summed:

1. each term of a :class:`~openmm_reversible.potential.TorchPotential` is evaluated on
   *displacement vectors* ``d = x[j] - x[i]`` (minimum image where periodic) that are autograd
   leaves: bond and torsion chain vectors, pair vectors within the cutoff, exception vectors;
2. ``g = ∂E/∂d`` of every leaf comes from one backward pass; it is elementwise per item (no
   sum over items is involved), so each ``g`` is a deterministic function of that item's
   geometry and parameters;
3. each ``g`` is rounded to an int64 count of ``2**-force_bits`` kJ/mol/nm and scattered as
   ``F[i] += g``, ``F[j] -= g``: integer addition is associative, so the order of the scatter
   does not matter.

Supported terms: the bonded laws of :mod:`openmm_reversible.potential.bonded`, written again
below on chain vectors in correctly rounded arithmetic, and the pair laws of ``NonbondedForce``
(:meth:`~openmm_reversible.potential.nonbonded.NonbondedTerm.pair_law`,
:func:`~openmm_reversible.potential.nonbonded.exception_law`) evaluated on distances computed
here: ``HarmonicBondForce``, ``HarmonicAngleForce``, ``PeriodicTorsionForce``,
``RBTorsionForce``, and ``NonbondedForce`` with ``NoCutoff``, ``CutoffNonPeriodic`` or
``CutoffPeriodic`` (reaction field); the long-range dispersion correction is
position-independent and adds no force. Reciprocal-space electrostatics (Ewald, PME) and CMAP
do not decompose into pair vectors here and are refused with an error.

Determinism across thread counts follows from the elementwise per-item arithmetic. Across
devices (CPU, GPU) it follows from using only operations that IEEE 754 rounds correctly, so
that every device computes the same bits: ``+ - × ÷ √`` and exact ones (negation, comparison,
selection, indexing), in the energy and in its autograd derivatives. No ``atan2``, ``cos``,
``pow``, norm or multi-component reduction enters the graph (see the section below; a test
walks the autograd graph to check it); whether a pair is within the cutoff is decided here by
the same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..geometry import CutoffPairs, minimum_image
from ..methods import PAIRWISE_METHODS
from ..potential import TorchPotential
from ..potential.base import Term, UnsupportedForceError
from ..potential.bonded import (
    BondedTerm,
    HarmonicAngleTerm,
    HarmonicBondTerm,
    PeriodicTorsionTerm,
    RBTorsionTerm,
)
from ..potential.nonbonded import NonbondedTerm, exception_law
from .fixed_point import RANGE_BITS, FixedPointFormat, FixedPointRangeError

PAIR_MARGIN = 1e-9
"""nm: candidate pairs come from a list with the cutoff widened by this much, and the cutoff
itself is applied to the fixed-order squared length here, so that whether a pair interacts is
decided by the same correctly rounded arithmetic on every device."""


# ---------------------------------------------------------------------------------------------
# Geometry and energy laws on displacement vectors, in correctly rounded operations only
#
# IEEE 754 rounds + - × ÷ and √ correctly on every device, so a graph made of these (plus exact
# operations: negation, comparisons, selection, indexing) gives the same bits everywhere, in
# its values and in its autograd derivatives. Library calls (atan2, cos, pow, norms, reductions
# over a vector's components) may differ in the last bit between CPU and GPU math libraries,
# so none is used here: dot and cross products and lengths are written out component by
# component, the angle is an arctangent evaluated by argument halving and a fixed polynomial,
# and torsions use cos φ and sin φ of the chain vectors with the multiple-angle recurrence.


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1],
                        a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                        a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]], dim=1)


def _length(d: torch.Tensor) -> torch.Tensor:
    """``|d|`` with a fixed summation order (nm)."""
    return torch.sqrt(_dot(d, d))


_ATAN_TERMS = tuple((-1.0) ** k / (2 * k + 1) for k in range(13))
"""Taylor coefficients of atan t / t in t²: 13 terms reach 1e-18 for |t| <= tan(π/16)."""


def _angle(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``atan2(y, x)`` in [0, π] for ``y >= 0`` (rad), from correctly rounded operations.

    ``a = min(y, |x|) / max(y, |x|)`` in [0, 1] is halved twice in angle,
    ``t → t / (1 + √(1 + t²))`` (so ``atan a = 4 atan t`` with ``t <= tan(π/16)``), and
    ``atan t`` is the Taylor polynomial of :data:`_ATAN_TERMS`; octant corrections use π/2 and
    π. Agrees with ``torch.atan2`` to a few units in the last place.
    """
    ax = torch.abs(x)
    a = torch.minimum(y, ax) / torch.maximum(y, ax)
    t = a / (1.0 + torch.sqrt(1.0 + a * a))
    t = t / (1.0 + torch.sqrt(1.0 + t * t))
    t2 = t * t
    series = torch.full_like(t, _ATAN_TERMS[-1])
    for c in reversed(_ATAN_TERMS[:-1]):
        series = series * t2 + c
    angle = 4.0 * (t * series)
    angle = torch.where(y > ax, (0.5 * math.pi) - angle, angle)
    return torch.where(x < 0, math.pi - angle, angle)


def _torsion_cos_sin(b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos φ`` and ``sin φ`` of the dihedral of chain vectors ``b1, b2, b3`` (the convention
    of :func:`~.bonded.dihedral_angle`: ``φ = atan2(|b2| b1·(b2×b3), (b1×b2)·(b2×b3))``)."""
    b1, b2, b3 = b
    n2 = _cross(b2, b3)
    x = _dot(_cross(b1, b2), n2)
    y = _length(b2) * _dot(b1, n2)
    rho = torch.sqrt(x * x + y * y)
    return x / rho, y / rho


def _harmonic(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    delta = value - p[:, 0]
    return 0.5 * p[:, 1] * (delta * delta)


def _harmonic_bonds(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    return _harmonic(_length(b[0]), p).sum()


def _harmonic_angles(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    u, v = -b[0], b[1]
    return _harmonic(_angle(_length(_cross(u, v)), _dot(u, v)), p).sum()


def _periodic_torsions(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor
                       ) -> torch.Tensor:
    """``k (1 + cos nφ cos φ0 + sin nφ sin φ0)``: ``cos nφ``, ``sin nφ`` by the recurrence of
    the angle-addition formulas; ``cos φ0``, ``sin φ0`` are constants of the parameters,
    evaluated on the CPU (one math library, whatever the device of the run)."""
    c1, s1 = _torsion_cos_sin(b)
    n = term.periodicity
    if not n.numel():
        return c1.sum()  # no torsions: zero, still attached to the leaves
    cos_n, sin_n = torch.ones_like(c1), torch.zeros_like(s1)
    multiples = []
    for _ in range(int(n.max())):
        cos_n, sin_n = cos_n * c1 - sin_n * s1, sin_n * c1 + cos_n * s1
        multiples.append((cos_n, sin_n))
    rows = torch.arange(n.numel(), device=n.device)
    cos_n = torch.stack([m[0] for m in multiples], 1)[rows, n - 1]
    sin_n = torch.stack([m[1] for m in multiples], 1)[rows, n - 1]
    phase = p[:, 0].detach().cpu()
    cos_0, sin_0 = torch.cos(phase).to(c1.device), torch.sin(phase).to(c1.device)
    return (p[:, 1] * (1.0 + (cos_n * cos_0 + sin_n * sin_0))).sum()


def _rb_torsions(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """``Σ c_n cos^n ψ`` by Horner's rule, ``cos ψ = -cos φ``."""
    cos_psi = -_torsion_cos_sin(b)[0]
    energy = p[:, -1]
    for column in range(p.shape[1] - 2, -1, -1):
        energy = energy * cos_psi + p[:, column]
    return energy.sum()


ChainLaw = Callable[[BondedTerm, list[torch.Tensor], torch.Tensor], torch.Tensor]
_CHAIN_LAWS: dict[type, ChainLaw] = {
    HarmonicBondTerm: _harmonic_bonds,
    HarmonicAngleTerm: _harmonic_angles,
    PeriodicTorsionTerm: _periodic_torsions,
    RBTorsionTerm: _rb_torsions,
}


# ---------------------------------------------------------------------------------------------


class DeterministicForces:
    """Forces of a TorchPotential summed as fixed-point integers.

    Parameters
    ----------
    potential : TorchPotential
        Every term must be supported (module docstring); its current parameter values are
        read at each call.
    fixed_point : FixedPointFormat, optional
        ``force_bits`` sets the resolution of every contribution and of the sums.

    Examples
    --------
    >>> forces = DeterministicForces(potential)
    >>> counts = forces(positions, box)           # int64 (N, 3), units 2**-32 kJ/mol/nm
    >>> f = forces.fixed_point.to_float(counts, "force")
    """

    def __init__(self, potential: TorchPotential, fixed_point: FixedPointFormat | None = None):
        terms = getattr(potential, "terms", None)
        if terms is None:
            raise UnsupportedForceError(
                f"exact forces need a TorchPotential (one term per OpenMM force), got "
                f"{type(potential).__name__}; the exact mode cannot split an arbitrary energy "
                "module into per-interaction contributions")
        if potential.virtual_sites.n_sites or potential.n_constraints:
            raise UnsupportedForceError(
                "the exact mode does not support virtual sites or constraints (the System has "
                f"{potential.virtual_sites.n_sites} sites and {potential.n_constraints} "
                "constraints); use a flexible model without virtual sites")
        for term in terms:
            _check_supported(term)
        self.potential = potential
        self._candidates = {
            id(term): CutoffPairs(term.cutoff + PAIR_MARGIN, term.skin, term.n_particles,
                                  term.exclusion_keys)
            for term in terms if isinstance(term, NonbondedTerm) and term.uses_cutoff}
        self.fixed_point = fixed_point or FixedPointFormat()

    def contributions(self, positions: torch.Tensor, box: torch.Tensor | None
                      ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per-interaction force contributions ``(i, j, g)``, float64.

        Parameters
        ----------
        positions : torch.Tensor, shape (N, 3), nm
        box : torch.Tensor, shape (3, 3), nm, or None

        Returns
        -------
        list of (torch.Tensor, torch.Tensor, torch.Tensor)
            Atom indices ``i``, ``j`` (shape (P,)) and ``g = ∂E/∂d`` (shape (P, 3), kJ/mol/nm)
            for displacement vectors ``d = x[j] - x[i]``: particle ``i`` receives ``+g`` and
            particle ``j`` receives ``-g``.
        """
        items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.enable_grad():
            energy = self.leaf_energy(positions, box, items)
            leaves = [d for _, _, d in items]
            grads = torch.autograd.grad(energy, leaves, allow_unused=True) if leaves else []
        return [(i, j, torch.zeros_like(d) if g is None else g)
                for (i, j, d), g in zip(items, grads, strict=True)]

    def leaf_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                    items: list) -> torch.Tensor:
        """Energy (kJ/mol) as a function of the interactions' displacement vectors: appends
        ``(i, j, d)`` to ``items`` for every leaf ``d`` (requires grad) and returns the energy
        whose autograd graph :meth:`contributions` differentiates."""
        x = positions.detach()
        box = None if box is None else box.detach()
        sites = self.potential.sites()
        if sites is not None:
            sites = sites.detach()
        energy = x.new_zeros(())
        for term in self.potential.terms:
            if isinstance(term, NonbondedTerm):
                energy = energy + _nonbonded(term, self._candidates.get(id(term)), x, box,
                                             sites, items)
            else:
                energy = energy + _chain(term, x, box, sites, items)
        return energy

    def __call__(self, positions: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        """Total forces in counts of ``2**-force_bits`` kJ/mol/nm, int64 of shape (N, 3).

        Raises FixedPointRangeError (naming the particle) when a contribution or a particle's
        total could leave the force range.
        """
        fmt = self.fixed_point
        scale = float(2 ** fmt.force_bits)
        limit = float(1 << RANGE_BITS)
        quantized = []
        largest, n_terms = 0.0, 0
        for i, j, g in self.contributions(positions, box):
            scaled = g * scale
            magnitude = scaled.abs()
            bad = ~(magnitude < limit)
            if bool(bad.any()):
                row = int(torch.nonzero(bad.any(1))[0, 0])
                worst = float(scaled[row][torch.argmax(magnitude[row])])
                raise FixedPointRangeError(
                    "force", int(i[row]), worst / scale, fmt.range("force"), fmt.force_bits,
                    detail=f" from its interaction with particle {int(j[row])}")
            if magnitude.numel():
                largest = max(largest, float(magnitude.max()))
            n_terms += 2 * i.numel()
            quantized.append((i, j, torch.round(scaled).to(torch.int64), magnitude))
        forces = positions.new_zeros(positions.shape, dtype=torch.int64)
        if largest * n_terms >= limit:
            # Some particle might accumulate past the range: bound each sum by its magnitudes.
            bound = positions.new_zeros(positions.shape, dtype=torch.float64)
            for i, j, _, magnitude in quantized:
                bound.index_add_(0, i, magnitude).index_add_(0, j, magnitude)
            bad = ~(bound < limit)
            if bool(bad.any()):
                row = int(torch.nonzero(bad.any(1))[0, 0])
                raise FixedPointRangeError(
                    "force", row, float(bound[row].max()) / scale, fmt.range("force"),
                    fmt.force_bits, detail=" (sum of contribution magnitudes)")
        for i, j, q, _ in quantized:
            forces.index_add_(0, i, q)
            forces.index_add_(0, j, -q)
        return forces


def _check_supported(term: Term) -> None:
    supported = [cls.openmm_class for cls in _CHAIN_LAWS] + [
        f"NonbondedForce ({', '.join(PAIRWISE_METHODS)})"]
    if isinstance(term, NonbondedTerm):
        if term.method not in PAIRWISE_METHODS:
            raise UnsupportedForceError(
                f"NonbondedForce (force {term.force_index}) uses {term.method}, whose "
                "reciprocal-space part does not split into pair forces, so the exact mode "
                f"cannot sum it as integers; use one of {', '.join(PAIRWISE_METHODS)} (e.g. "
                "CutoffPeriodic, reaction field) for exact dynamics")
        return
    if type(term) not in _CHAIN_LAWS:
        raise UnsupportedForceError(
            f"{term.name} (force {term.force_index}) is not supported by the exact mode's "
            f"integer force accumulation; supported: {', '.join(supported)}")


def _leaf(d: torch.Tensor) -> torch.Tensor:
    return d.detach().requires_grad_(True)


def _chain(term: BondedTerm, x: torch.Tensor, box: torch.Tensor | None,
           sites: torch.Tensor | None, items: list) -> torch.Tensor:
    """Energy of a bonded term on leaf chain vectors (appended to ``items``)."""
    vectors = [_leaf(b) for b in term.chain_vectors(x, box)]
    for k, b in enumerate(vectors):
        items.append((term.atoms[:, k], term.atoms[:, k + 1], b))
    return _CHAIN_LAWS[type(term)](term, vectors, term.parameters_now(sites))


def _nonbonded(term: NonbondedTerm, candidates: CutoffPairs | None, x: torch.Tensor,
               box: torch.Tensor | None, sites: torch.Tensor | None, items: list
               ) -> torch.Tensor:
    """Energy of a pairwise NonbondedForce on leaf pair and exception vectors; ``candidates``
    lists the pairs within the cutoff plus :data:`PAIR_MARGIN` (None: no cutoff)."""
    if term.periodic:
        term.check_box(box)
    else:
        box = None
    energy = x.new_zeros(())
    if not term.include_direct:
        return energy
    particles, exceptions = term.current_parameters(sites)
    if candidates is None:
        i, j, shifts = term.all_pairs[0], term.all_pairs[1], None
    else:
        i, j, shifts = candidates(x, box)
    d = x[j] - x[i]
    if shifts is not None:
        # Image shift n·box with a fixed order of operations (no matrix product).
        d = d - (shifts[:, 0:1] * box[0] + shifts[:, 1:2] * box[1] + shifts[:, 2:3] * box[2])
    if candidates is not None:
        within = torch.nonzero(_dot(d, d) < term.cutoff * term.cutoff).squeeze(1)
        i, j, d = i[within], j[within], d[within]
    d = _leaf(d)
    items.append((i, j, d))
    energy = energy + term.pair_law(_length(d), i, j, particles)
    if exceptions.shape[0]:
        ei, ej = term.pair14[:, 0], term.pair14[:, 1]
        de = x[ej] - x[ei]
        if term.exceptions_periodic:
            de = minimum_image(de, box)
        de = _leaf(de)
        items.append((ei, ej, de))
        energy = energy + exception_law(_length(de), exceptions)
    return energy


__all__ = ["DeterministicForces"]
