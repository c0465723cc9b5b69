"""Forces as fixed-point integers: bitwise the same for the same positions, always.

A float force is a sum of many per-interaction contributions, and floating-point addition is
not associative: the result depends on summation order, hence on thread count, device and
neighbour-list order. The exact mode (:mod:`openmm_reversible.integrators.exact`) needs
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

Supported terms (the energy laws of :mod:`.bonded` and :mod:`.nonbonded` on those vectors):
``HarmonicBondForce``, ``HarmonicAngleForce``, ``PeriodicTorsionForce``, ``RBTorsionForce``,
and ``NonbondedForce`` with ``NoCutoff``, ``CutoffNonPeriodic`` or ``CutoffPeriodic``
(reaction field); the long-range dispersion correction is position-independent and adds no
force. Reciprocal-space electrostatics (Ewald, PME) and CMAP do not decompose into pair
vectors here and are refused with an error.

Determinism holds across thread counts on a device, since the per-item arithmetic is
elementwise. Across devices it rests on the per-item operations rounding alike: pair laws use
only ``+ - × ÷ √``, which IEEE 754 rounds correctly everywhere; angle and torsion laws call
``atan2``/``cos``, whose last bit may differ between the math libraries of different devices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..integrators.fixed_point import RANGE_BITS, FixedPointFormat, FixedPointRangeError
from . import TorchPotential
from .base import Term, UnsupportedForceError
from .bonded import (
    BondedTerm,
    HarmonicAngleTerm,
    HarmonicBondTerm,
    PeriodicTorsionTerm,
    RBTorsionTerm,
    bond_angle,
    bond_length,
    dihedral_angle,
    harmonic_energy,
    periodic_torsion_energy,
    rb_torsion_energy,
)
from .neighbors import minimum_image
from .nonbonded import (
    NonbondedTerm,
    coulomb,
    lennard_jones,
    reaction_field,
    safe_sqrt,
    switching_function,
)

PAIR_METHODS = ("NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic")
"""NonbondedForce methods whose energy is a sum over pair displacements."""


# ---------------------------------------------------------------------------------------------
# Energy laws on displacement vectors


def _harmonic_bonds(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    return harmonic_energy(bond_length(b[0]), p[:, 0], p[:, 1]).sum()


def _harmonic_angles(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    return harmonic_energy(bond_angle(b[0], b[1]), p[:, 0], p[:, 1]).sum()


def _periodic_torsions(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor
                       ) -> torch.Tensor:
    return periodic_torsion_energy(dihedral_angle(*b), term.periodicity, p[:, 0], p[:, 1]).sum()


def _rb_torsions(term: BondedTerm, b: list[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    return rb_torsion_energy(dihedral_angle(*b), p).sum()


ChainLaw = Callable[[BondedTerm, list[torch.Tensor], torch.Tensor], torch.Tensor]
_CHAIN_LAWS: dict[type, ChainLaw] = {
    HarmonicBondTerm: _harmonic_bonds,
    HarmonicAngleTerm: _harmonic_angles,
    PeriodicTorsionTerm: _periodic_torsions,
    RBTorsionTerm: _rb_torsions,
}


def _length(d: torch.Tensor) -> torch.Tensor:
    """``|d|`` with a fixed summation order (nm)."""
    return torch.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2])


def _pair_energy(term: NonbondedTerm, d: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                 particles: torch.Tensor) -> torch.Tensor:
    """Lennard-Jones (switched) plus cutoff Coulomb of the pairs ``d = x[j] - x[i]``, kJ/mol."""
    r = _length(d)
    q, s, e = particles.unbind(1)
    root_e = safe_sqrt(e)
    lj = lennard_jones(r, 0.5 * (s[i] + s[j]), root_e[i] * root_e[j])
    if term.switch_distance is not None:
        lj = lj * switching_function(r, term.switch_distance, term.cutoff)
    qq = q[i] * q[j]
    elec = coulomb(qq, r) if term.method == "NoCutoff" else reaction_field(qq, r, term.krf,
                                                                           term.crf)
    return (lj + elec).sum()


def _exception_energy(d: torch.Tensor, exceptions: torch.Tensor) -> torch.Tensor:
    """Plain Coulomb plus Lennard-Jones of the exceptions ``d = x[j] - x[i]``, kJ/mol."""
    r = _length(d)
    qq, sigma, epsilon = exceptions.unbind(1)
    return (coulomb(qq, r) + lennard_jones(r, sigma, epsilon)).sum()


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
        for term in terms:
            _check_supported(term)
        self.potential = potential
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
        x = positions.detach()
        box = None if box is None else box.detach()
        sites = self.potential.sites()
        if sites is not None:
            sites = sites.detach()
        items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.enable_grad():
            energy = x.new_zeros(())
            for term in self.potential.terms:
                if isinstance(term, NonbondedTerm):
                    energy = energy + _nonbonded(term, x, box, sites, items)
                else:
                    energy = energy + _chain(term, x, box, sites, items)
            leaves = [d for _, _, d in items]
            grads = torch.autograd.grad(energy, leaves, allow_unused=True) if leaves else []
        return [(i, j, torch.zeros_like(d) if g is None else g)
                for (i, j, d), g in zip(items, grads, strict=True)]

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
        f"NonbondedForce ({', '.join(PAIR_METHODS)})"]
    if isinstance(term, NonbondedTerm):
        if term.method not in PAIR_METHODS:
            raise UnsupportedForceError(
                f"NonbondedForce (force {term.force_index}) uses {term.method}, whose "
                "reciprocal-space part does not split into pair forces, so the exact mode "
                f"cannot sum it as integers; use one of {', '.join(PAIR_METHODS)} (e.g. "
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
    params = term.tables[term.table_name](sites)
    return _CHAIN_LAWS[type(term)](term, vectors, params)


def _nonbonded(term: NonbondedTerm, x: torch.Tensor, box: torch.Tensor | None,
               sites: torch.Tensor | None, items: list) -> torch.Tensor:
    """Energy of a pairwise NonbondedForce on leaf pair and exception vectors."""
    if term.periodic:
        term.check_box(box)
    else:
        box = None
    energy = x.new_zeros(())
    if not term.include_direct:
        return energy
    particles, exceptions = term.current_parameters(sites)
    i, j, shifts = term.interacting_pairs(x, box)
    d = x[j] - x[i]
    if shifts is not None:
        # Image shift n·box with a fixed order of operations (no matrix product).
        d = d - (shifts[:, 0:1] * box[0] + shifts[:, 1:2] * box[1] + shifts[:, 2:3] * box[2])
    d = _leaf(d)
    items.append((i, j, d))
    energy = energy + _pair_energy(term, d, i, j, particles)
    if exceptions.shape[0]:
        ei, ej = term.pair14[:, 0], term.pair14[:, 1]
        de = x[ej] - x[ei]
        if term.exceptions_periodic:
            de = minimum_image(de, box)
        de = _leaf(de)
        items.append((ei, ej, de))
        energy = energy + _exception_energy(de, exceptions)
    return energy


__all__ = ["DeterministicForces", "PAIR_METHODS"]
