"""OpenMM's custom forces, with their energy expressions compiled to torch.

A ``Custom*Force`` is a functional form written as a Lepton expression (see
:mod:`~openmm_reversible.potential.expression`) applied to one internal coordinate per item
plus parameters. The twins here reproduce OpenMM's Reference platform:

- :class:`CustomBondTerm` (``CustomBondForce``): ``E(r)`` per bond, r the distance;
- :class:`CustomAngleTerm` (``CustomAngleForce``): ``E(theta)`` per angle at the middle atom;
- :class:`CustomTorsionTerm` (``CustomTorsionForce``): ``E(theta)`` per torsion, theta the
  dihedral in (-π, π] with OpenMM's sign;
- :class:`CustomNonbondedTerm` (``CustomNonbondedForce``): ``E(r)`` per particle pair, the
  per-particle parameters of the two particles named with suffixes ``1`` and ``2``, with
  exclusions, interaction groups, cutoffs (none, non-periodic, periodic minimum image), OpenMM's
  switching function and its long-range correction.

Parameters live in :class:`~openmm_reversible.potential.base.ParameterTable` s so that they can
be bound to trainable force-field sites: one row per item with one column per per-item
parameter (tables ``"bonds"``, ``"angles"``, ``"torsions"``, ``"particles"``), and a table
``"globals"`` with a single row holding the global parameters (their default values in the
System). Autograd then gives forces, Hessian-vector products and derivatives with respect to
every parameter, global ones included.

Fused path (``fused_energy``): the same expression translated into a sympy law
(:mod:`.symbolic`) runs through the generated kernels of :mod:`.fused` — the pair kernel over
the same candidate pairs for a nonbonded energy, the chain kernel for a bonded one — with the
global parameters appended to every row. Expressions with tabulated functions and forces with
interaction groups have no fused kernel (:meth:`fused_fallback_reason` says which).

Long-range correction (``CutoffPeriodic`` with ``setUseLongRangeCorrection(True)``): OpenMM
assumes a uniform fluid beyond the cutoff. Particles are grouped into classes of identical
parameters; for each pair of classes (a, b) with ``n_ab`` counted pairs the integral

    I_ab = ∫_rc^∞ E(r) r² dr + ∫_rs^rc (1 - S(r)) E(r) r² dr

(the second term only with a switching function S) is evaluated with OpenMM's quadrature: the
midpoint rule in x = rc/r on (0, 1] (resp. in the switching interval), tripling the number of
points until two successive estimates agree to 1e-5 (at least four rounds). The energy is
``2π N² Σ n_ab I_ab / (N (N+1)/2) / V`` with V = a_x b_y c_z. The number of rounds is decided
without gradient tracking; the final estimate is differentiable in the parameters and in the
box.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import openmm
import torch
from openmm import unit

from ..errors import InputError
from ..geometry import CutoffPairs, minimum_image
from ..methods import PAIRWISE_METHODS
from . import fused, register, symbolic
from .base import ParameterTable, Term, UnsupportedForceError
from .bonded import bond_angle, bond_length, dihedral_angle
from .expression import Expression, ExpressionError, TabulatedFunction, tabulated_function
from .nonbonded import switching_function

# --------------------------------------------------------------------------- shared pieces


def tabulated_functions(force: openmm.Force) -> dict[str, TabulatedFunction]:
    """Torch twins of the tabulated functions of ``force``, keyed by their names."""
    count = force.getNumTabulatedFunctions() if hasattr(force, "getNumTabulatedFunctions") else 0
    return {force.getTabulatedFunctionName(i): tabulated_function(force.getTabulatedFunction(i))
            for i in range(count)}


def global_parameters(force: openmm.Force) -> tuple[list[str], list[float]]:
    """Names and default values of the global parameters of ``force``."""
    count = force.getNumGlobalParameters()
    return ([force.getGlobalParameterName(i) for i in range(count)],
            [float(force.getGlobalParameterDefaultValue(i)) for i in range(count)])


def _globals_table(names: Sequence[str], values: Sequence[float]) -> ParameterTable:
    if len(names) != len(values):
        raise InputError(f"{len(names)} global parameter names but {len(values)} values")
    return ParameterTable(np.asarray(values, dtype=float).reshape(1, len(names)), names)


def _table_env(table: torch.Tensor, columns: Sequence[str], rows: torch.Tensor | None = None,
               suffix: str = "") -> dict[str, torch.Tensor]:
    """``{column + suffix: table[rows, column]}`` for every column (all rows if ``rows`` is
    None)."""
    values = table if rows is None else table[rows]
    return {name + suffix: values[..., k] for k, name in enumerate(columns)}


def _arities(energy: Expression) -> tuple[tuple[str, int], ...]:
    """``(name, number of arguments)`` of the tabulated functions an expression may call."""
    return tuple((name, f.n_args) for name, f in
                 zip(energy.function_names, energy.tabulated, strict=True))


def _check_variables(owner: str, energy: Expression, defined: Iterable[str]) -> None:
    unknown = energy.variables - set(defined)
    if unknown:
        raise ExpressionError(
            f'{owner}: energy "{energy.text}" uses undefined variable(s) '
            f"{', '.join(sorted(unknown))}; it may use {', '.join(sorted(set(defined)))}. "
            "Add them to the force as per-item or global parameters")


class _TranslatedEnergy:
    """The fused-path side of a custom term: its energy translated by :mod:`.symbolic` on
    first use (``_translate``, which raises :class:`symbolic.UntranslatableError` or returns
    the law), kept with why not when it cannot be."""

    _translation: tuple | None = None

    def _translate(self):
        raise NotImplementedError

    def _fused_translation(self) -> tuple:
        """``(law, "")``, or ``(None, why not)``; computed once."""
        if self._translation is None:
            try:
                self._translation = (self._translate(), "")
            except symbolic.UntranslatableError as error:
                self._translation = (None, str(error))
        return self._translation

    @property
    def has_fused(self) -> bool:
        """Whether the energy translates into a fused law."""
        return self._fused_translation()[0] is not None

    def fused_fallback_reason(self) -> str:
        return self._fused_translation()[1]


# --------------------------------------------------------------------------- bonded


class CustomBondedTerm(_TranslatedEnergy, Term):
    """Common machinery of the custom bond, angle and torsion terms.

    Parameters
    ----------
    energy : str
        Lepton expression of the energy of one item (kJ/mol) in terms of the coordinate
        (:attr:`coordinate`), the per-item parameters and the global parameters.
    atoms : array-like of int, shape (n_items, atoms_per_item)
        Atom indices of every item, in chain order.
    parameter_names : sequence of str
        Per-item parameter names: the columns of the item table.
    parameters : array-like, shape (n_items, n_parameters)
        Per-item parameter values, MD units.
    global_names : sequence of str
        Global parameter names: the columns of table ``"globals"``.
    global_values : sequence of float
        Their values (OpenMM's defaults).
    functions : mapping of str to TabulatedFunction, optional
        Tabulated functions the expression calls.
    periodic : bool
        Minimum-image displacements (``usesPeriodicBoundaryConditions()``).
    force_index : int
        Index of the twin force in its System.
    """

    atoms_per_item = 0
    coordinate = ""
    table_name = ""
    _openmm_getters: tuple[str, str, str, str] = ("", "", "", "")
    """Names of the OpenMM methods: item count, item parameters, per-item parameter count,
    per-item parameter name."""

    def __init__(self, energy: str, atoms, parameter_names: Sequence[str], parameters,
                 global_names: Sequence[str] = (), global_values: Sequence[float] = (),
                 functions: Mapping[str, TabulatedFunction] | None = None,
                 periodic: bool = False, force_index: int = -1):
        super().__init__(force_index)
        atoms = np.asarray(atoms, dtype=np.int64).reshape(-1, self.atoms_per_item)
        if (atoms < 0).any():
            raise InputError(f"{self.name}: negative atom index; atom indices must refer to "
                             "particles of the System")
        self.register_buffer("atoms", torch.as_tensor(atoms))
        self.periodic = bool(periodic)
        parameter_names = list(parameter_names)
        parameters = np.asarray(parameters, dtype=float).reshape(self.n_items,
                                                                 len(parameter_names))
        self.energy = Expression(energy, functions)
        self.tables[self.table_name] = ParameterTable(parameters, parameter_names)
        self.tables["globals"] = _globals_table(global_names, global_values)
        _check_variables(self.name, self.energy,
                         [self.coordinate, *parameter_names, *global_names])
        self._translation: tuple | None = None  # ((fused.ChainLaw, constants) or None, why)

    @property
    def n_items(self) -> int:
        """Number of bonds, angles or torsions."""
        return int(self.atoms.shape[0])

    def internal_coordinate(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """The coordinate of every item from its chain vectors, shape (n_items,)."""
        raise NotImplementedError

    @classmethod
    def from_force(cls, force: openmm.Force, force_index: int = -1,
                   system: openmm.System | None = None) -> CustomBondedTerm:
        """Twin of an OpenMM custom bonded force (``system`` is not needed)."""
        count, item, n_params, param_name = (getattr(force, g) for g in cls._openmm_getters)
        rows = [item(i) for i in range(count())]
        k = cls.atoms_per_item
        atoms = np.array([row[:k] for row in rows], dtype=np.int64).reshape(-1, k)
        names = [param_name(i) for i in range(n_params())]
        params = np.array([row[k] for row in rows], dtype=float).reshape(len(rows), len(names))
        global_names, global_values = global_parameters(force)
        return cls(force.getEnergyFunction(), atoms, names, params, global_names, global_values,
                   tabulated_functions(force), force.usesPeriodicBoundaryConditions(),
                   force_index)

    def _translate(self):
        """``(fused.ChainLaw, constants)`` of the energy (no tabulated functions)."""
        return symbolic.custom_chain_law(
            self.energy.text, self.coordinate, self.atoms_per_item,
            self.tables[self.table_name].columns, self.tables["globals"].columns,
            _arities(self.energy))

    def fused_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                     sites: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` by the generated chain kernel (:mod:`.fused`); the global
        parameters ride in every item's row (their derivatives summed back by autograd)."""
        translation, reason = self._fused_translation()
        if translation is None:
            raise NotImplementedError(f"{self.name} (force {self.force_index}) has no fused "
                                      f"kernel: {reason}")
        if self.n_items == 0:
            return positions.new_zeros(())
        self._check_box(box)
        law, constants = translation
        dtype = positions.dtype
        rows = torch.cat([self.tables[self.table_name](sites).to(dtype),
                          self.tables["globals"](sites).to(dtype).expand(self.n_items, -1)], 1)
        return fused.chain_energy(law, positions, box, self.atoms, rows, constants,
                                  periodic=self.periodic)

    def _check_box(self, box: torch.Tensor | None) -> None:
        if self.periodic and box is None:
            raise InputError(f"{self.name} (force {self.force_index}) uses periodic boundary "
                             "conditions but no box was given; pass the periodic box vectors")

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None,
                sites: torch.Tensor | None = None) -> torch.Tensor:
        if self.n_items == 0:
            return positions.new_zeros(())
        self._check_box(box)
        x = positions[self.atoms]
        chain = x[:, 1:] - x[:, :-1]
        if self.periodic:
            chain = minimum_image(chain, box)
        coordinate = self.internal_coordinate(list(chain.unbind(1)))
        table = self.tables[self.table_name]
        env = _table_env(table(sites).to(coordinate.dtype), table.columns)
        env.update(_table_env(self.tables["globals"](sites).to(coordinate.dtype)[0],
                              self.tables["globals"].columns))
        env[self.coordinate] = coordinate
        return torch.broadcast_to(self.energy(env), coordinate.shape).sum()


class CustomBondTerm(CustomBondedTerm):
    """``CustomBondForce``: E = Σ_bonds f(r, per-bond and global parameters); table
    ``"bonds"``."""

    openmm_class = "CustomBondForce"
    atoms_per_item = 2
    coordinate = "r"
    table_name = "bonds"
    _openmm_getters = ("getNumBonds", "getBondParameters", "getNumPerBondParameters",
                       "getPerBondParameterName")

    def internal_coordinate(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return bond_length(vectors[0])


class CustomAngleTerm(CustomBondedTerm):
    """``CustomAngleForce``: E = Σ_angles f(theta, ...), theta in [0, π] at the middle atom;
    table ``"angles"``."""

    openmm_class = "CustomAngleForce"
    atoms_per_item = 3
    coordinate = "theta"
    table_name = "angles"
    _openmm_getters = ("getNumAngles", "getAngleParameters", "getNumPerAngleParameters",
                       "getPerAngleParameterName")

    def internal_coordinate(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return bond_angle(*vectors)


class CustomTorsionTerm(CustomBondedTerm):
    """``CustomTorsionForce``: E = Σ_torsions f(theta, ...), theta the dihedral in (-π, π]
    (OpenMM's sign convention); table ``"torsions"``."""

    openmm_class = "CustomTorsionForce"
    atoms_per_item = 4
    coordinate = "theta"
    table_name = "torsions"
    _openmm_getters = ("getNumTorsions", "getTorsionParameters", "getNumPerTorsionParameters",
                       "getPerTorsionParameterName")

    def internal_coordinate(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return dihedral_angle(*vectors)


# --------------------------------------------------------------------------- nonbonded

Integrand = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``integrand(x, pairs)``: values (m, n) at points x (n,) of (0, 1) for class pairs (m,)."""


def _midpoint(integrand: Integrand, level: int, pairs: torch.Tensor,
              like: torch.Tensor) -> torch.Tensor:
    """Midpoint rule with 3**level points on (0, 1), shape (m,)."""
    n = 3**level
    x = (torch.arange(n, dtype=like.dtype, device=like.device) + 0.5) / n
    return integrand(x, pairs).sum(-1) / n


def quadrature_levels(integrand: Integrand, n_pairs: int, like: torch.Tensor,
                      failure: str) -> np.ndarray:
    """OpenMM's stopping rule for its tripled midpoint rule, per class pair.

    The level k (3**k points) is the first with k > 2 at which the estimate changed by less
    than 1e-5 (relative) from 3**(k-1) points, or is zero. Evaluated without gradient tracking.

    Raises
    ------
    InputError
        With message ``failure`` when some pair does not converge (OpenMM's criterion: no
        convergence by k = 10, or a change above 1e-3 after k = 7).
    """
    all_pairs = torch.arange(n_pairs, device=like.device)
    levels = np.full(n_pairs, -1)
    previous = np.zeros(n_pairs)
    with torch.no_grad():
        for level in range(11):
            current = _midpoint(integrand, level, all_pairs, like).cpu().numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                change = np.abs((current - previous) / current)
            pending = levels < 0
            done = pending & (level > 2) & ((change < 1e-5) | (current == 0))
            levels[done] = level
            if (pending & ~done & ((level == 10) | ((level > 7) & (change > 1e-3)))).any():
                raise InputError(failure)
            if (levels >= 0).all():
                break
            previous = current
    return levels


def midpoint_integral(integrand: Integrand, levels: np.ndarray,
                      like: torch.Tensor) -> torch.Tensor:
    """∫_0^1 integrand dx per class pair with 3**levels[pair] midpoints, shape (n_pairs,),
    differentiable."""
    result = like.new_zeros(levels.shape[0])
    for level in np.unique(levels):
        pairs = torch.as_tensor(np.flatnonzero(levels == level), device=like.device)
        result = result.index_put((pairs,), _midpoint(integrand, int(level), pairs, like))
    return result


class CustomNonbondedTerm(_TranslatedEnergy, Term):
    """``CustomNonbondedForce``: E = Σ_pairs S(r) f(r, params1, params2, globals) [+ LRC].

    Parameters
    ----------
    energy : str
        Lepton expression of one pair's energy (kJ/mol) in terms of ``r`` (nm), the per-particle
        parameters suffixed ``1`` and ``2`` and the global parameters.
    parameter_names : sequence of str
        Per-particle parameter names: the columns of table ``"particles"``.
    parameters : array-like, shape (n_particles, n_parameters)
        Per-particle values, MD units.
    global_names, global_values : sequence of str, sequence of float
        Global parameters (table ``"globals"``, one row).
    functions : mapping of str to TabulatedFunction, optional
        Tabulated functions the expression calls.
    exclusions : array-like of int, shape (n_exclusions, 2)
        Pairs that do not interact.
    method : {"NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic"}
        As OpenMM's ``NonbondedMethod``; periodic uses the minimum image.
    cutoff : float, nm
        Pairs with r >= cutoff do not interact (ignored with NoCutoff).
    switch_distance : float or None, nm
        Switching function from this distance to the cutoff (None: no switching; ignored with
        NoCutoff, as in OpenMM).
    long_range_correction : bool
        Add OpenMM's long-range correction (CutoffPeriodic only).
    interaction_groups : sequence of (set1, set2)
        If given, only pairs with one particle in set1 and the other in set2 interact, the set1
        particle being particle 1 (and the lower index when both are in both sets).
    force_index : int
        Index of the twin force in its System.
    skin : float, nm
        Verlet skin of the neighbour list.
    """

    openmm_class = "CustomNonbondedForce"

    def __init__(self, energy: str, parameter_names: Sequence[str], parameters,
                 global_names: Sequence[str] = (), global_values: Sequence[float] = (),
                 functions: Mapping[str, TabulatedFunction] | None = None,
                 exclusions=(), method: str = "NoCutoff", cutoff: float = 1.0,
                 switch_distance: float | None = None, long_range_correction: bool = False,
                 interaction_groups: Sequence[tuple[Iterable[int], Iterable[int]]] = (),
                 force_index: int = -1, skin: float = 0.1):
        super().__init__(force_index)
        if method not in PAIRWISE_METHODS:
            raise InputError(f"unknown nonbonded method {method!r}; use one of {PAIRWISE_METHODS}")
        parameter_names = list(parameter_names)
        parameters = np.asarray(parameters, dtype=float)
        parameters = parameters.reshape(parameters.shape[0] if parameters.ndim else 0,
                                        len(parameter_names))
        n = parameters.shape[0]
        self.n_particles = n
        self.energy = Expression(energy, functions)
        self.tables["particles"] = ParameterTable(parameters, parameter_names)
        self.tables["globals"] = _globals_table(global_names, global_values)
        _check_variables(self.name, self.energy,
                         ["r", *(p + s for p in parameter_names for s in "12"), *global_names])
        self.method = method
        self.cutoff = None if method == "NoCutoff" else float(cutoff)
        self.periodic = method == "CutoffPeriodic"
        if switch_distance is not None and self.cutoff is not None:
            if not 0 <= switch_distance < self.cutoff:
                raise InputError(f"{self.name}: switching distance {switch_distance} nm must "
                                 f"satisfy 0 <= r_switch < cutoff ({self.cutoff} nm)")
            self.switch_distance = float(switch_distance)
        else:
            self.switch_distance = None
        self.long_range_correction = bool(long_range_correction) and self.periodic
        if self.long_range_correction and "r" not in self.energy.variables:
            raise InputError(f"{self.name}: cannot use the long-range correction with an energy "
                             "that does not depend on r; disable it "
                             "(setUseLongRangeCorrection(False))")

        exclusions = np.asarray(exclusions, dtype=np.int64).reshape(-1, 2)
        if exclusions.size and (exclusions.min() < 0 or exclusions.max() >= n):
            raise InputError(f"{self.name}: exclusion refers to a particle outside 0..{n - 1}")
        lo, hi = exclusions.min(1, initial=n), exclusions.max(1, initial=0)
        self.register_buffer("excluded_keys", torch.as_tensor(np.unique(lo * n + hi)))
        self.groups = [(sorted(int(a) for a in s1), sorted(int(a) for a in s2))
                       for s1, s2 in interaction_groups]
        for s1, s2 in self.groups:
            if any(not 0 <= a < n for a in s1 + s2):
                raise InputError(f"{self.name}: interaction group refers to a particle outside "
                                 f"0..{n - 1}")
        if self.groups:
            first, second = self._group_pairs()
        elif self.cutoff is None:
            first, second = np.triu_indices(n, 1)
        else:
            first = second = np.zeros(0, dtype=np.int64)
        keep = ~np.isin(first * n + second, self.excluded_keys.numpy()) \
            & ~np.isin(second * n + first, self.excluded_keys.numpy())
        self.register_buffer("fixed_first", torch.as_tensor(first[keep], dtype=torch.long))
        self.register_buffer("fixed_second", torch.as_tensor(second[keep], dtype=torch.long))
        self.cutoff_pairs = None if self.groups or self.cutoff is None \
            else CutoffPairs(self.cutoff, skin, n, self.excluded_keys)
        self._classes: tuple | None = None  # (binding count, representatives, pair counts)
        self._levels: tuple | None = None   # (parameter values, quadrature levels)
        self._translation: tuple | None = None  # (symbolic.CustomPairLaw or None, why)
        self._fused_pairs: tuple | None = None  # (candidates, off 1, off 2, fused.PairList)

    # ---- construction helpers

    def _group_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Ordered (particle 1, particle 2) of every interaction-group pair, as OpenMM visits
        them (self pairs dropped; a pair of two particles in both sets once, lower first)."""
        firsts, seconds = [], []
        for s1, s2 in self.groups:
            a1, a2 = (g.ravel() for g in np.meshgrid(s1, s2, indexing="ij"))
            duplicate = (a1 > a2) & np.isin(a2, s1) & np.isin(a1, s2)
            keep = (a1 != a2) & ~duplicate
            firsts.append(a1[keep])
            seconds.append(a2[keep])
        return (np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64))

    @classmethod
    def from_force(cls, force: openmm.CustomNonbondedForce, force_index: int = -1,
                   system: openmm.System | None = None) -> CustomNonbondedTerm:
        """Twin of an OpenMM ``CustomNonbondedForce``."""
        if force.getNumComputedValues() > 0:
            names = [force.getComputedValueParameters(i)[0]
                     for i in range(force.getNumComputedValues())]
            raise UnsupportedForceError(
                f"CustomNonbondedForce (force {force_index}): computed values "
                f"({', '.join(names)}) are not supported; write them into the energy as "
                "';'-separated definitions of the per-particle parameters")
        if system is not None and force.getNumParticles() != system.getNumParticles():
            raise InputError(f"CustomNonbondedForce (force {force_index}) has "
                             f"{force.getNumParticles()} particles but the System has "
                             f"{system.getNumParticles()}; add every particle to the force")
        names = [force.getPerParticleParameterName(i)
                 for i in range(force.getNumPerParticleParameters())]
        params = np.array([force.getParticleParameters(i) for i in range(force.getNumParticles())],
                          dtype=float).reshape(force.getNumParticles(), len(names))
        global_names, global_values = global_parameters(force)
        exclusions = [force.getExclusionParticles(i) for i in range(force.getNumExclusions())]
        groups = [force.getInteractionGroupParameters(i)
                  for i in range(force.getNumInteractionGroups())]
        switch = force.getSwitchingDistance().value_in_unit(unit.nanometer) \
            if force.getUseSwitchingFunction() else None
        method = PAIRWISE_METHODS[force.getNonbondedMethod()]
        return cls(force.getEnergyFunction(), names, params, global_names, global_values,
                   tabulated_functions(force), exclusions, method,
                   force.getCutoffDistance().value_in_unit(unit.nanometer), switch,
                   force.getUseLongRangeCorrection(), groups, force_index)

    # ---- pairs

    def pairs(self, positions: torch.Tensor, box: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Interacting pairs (particle 1, particle 2), excluded pairs left out, within the
        cutoff if there is one, and their minimum-image displacements, nm (differentiable)."""
        box = box if self.periodic else None
        if self.cutoff_pairs is not None:
            first, second, shifts = self.cutoff_pairs(positions, box)
            d = positions[second] - positions[first]
            return first, second, d if shifts is None else d - shifts @ box
        first, second = self.fixed_first, self.fixed_second
        d = minimum_image(positions[second] - positions[first], box)
        if self.cutoff is not None:
            within = torch.nonzero((d.detach() ** 2).sum(-1) < self.cutoff**2).squeeze(-1)
            first, second, d = first[within], second[within], d[within]
        return first, second, d

    # ---- long-range correction

    def _particle_classes(self) -> tuple[np.ndarray, np.ndarray]:
        """Representative particle of every class and the number of counted pairs of every
        class pair (upper triangle), as OpenMM counts them.

        A class is a set of particles with identical parameters; particles whose parameters are
        bound to different trainable sites are kept apart even when their values coincide, so
        that each site receives its own gradient.
        """
        table = self.tables["particles"]
        if self._classes is not None and self._classes[0] == table.bound_items.numel():
            return self._classes[1], self._classes[2]
        n, n_columns = table.base.shape
        binding = np.zeros((n, n_columns, 2))
        binding[..., 0] = -1.0
        binding[table.bound_items.cpu().numpy(), table.bound_columns.cpu().numpy()] = np.stack(
            [table.bound_sites.cpu().numpy(), table.bound_scales.cpu().numpy()], -1)
        keys = np.concatenate([table.base.cpu().numpy(), binding.reshape(n, -1)], 1)
        _, first_index, inverse = np.unique(keys, axis=0, return_index=True,
                                            return_inverse=True)
        order = np.argsort(first_index)                    # classes by first appearance
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        atom_class = rank[inverse.ravel()]
        n_classes = order.size
        if not self.groups:
            size = np.bincount(atom_class, minlength=n_classes).astype(float)
            counts = np.triu(np.outer(size, size), 1) + np.diag(size * (size + 1) / 2)
        else:
            # OpenMM counts the group pairs including excluded ones.
            counts = np.zeros((n_classes, n_classes))
            c1, c2 = (atom_class[a] for a in self._group_pairs())
            np.add.at(counts, (np.minimum(c1, c2), np.maximum(c1, c2)), 1.0)
        self._classes = (table.bound_items.numel(), first_index[order], counts)
        return self._classes[1], self._classes[2]

    def long_range_coefficient(self, particles: torch.Tensor,
                               global_env: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """OpenMM's long-range correction times the volume, kJ/mol·nm³ (0-dim tensor).

        Parameters
        ----------
        particles : torch.Tensor, shape (n_particles, n_parameters)
            Current per-particle parameter table.
        global_env : mapping of str to torch.Tensor
            Current global parameters.
        """
        representatives, counts = self._particle_classes()
        class1, class2 = np.nonzero(counts)
        columns = self.tables["particles"].columns
        rep = torch.as_tensor(representatives, device=particles.device)
        p1 = particles[rep[torch.as_tensor(class1, device=particles.device)]]
        p2 = particles[rep[torch.as_tensor(class2, device=particles.device)]]
        cutoff = self.cutoff

        def pair_energy(r: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
            env = dict(global_env)
            env.update(_table_env(p1[pairs, None, :], columns, suffix="1"))
            env.update(_table_env(p2[pairs, None, :], columns, suffix="2"))
            env["r"] = r[None, :]
            return torch.broadcast_to(self.energy(env), (pairs.shape[0], r.shape[0]))

        def tail(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
            r = cutoff / x
            return pair_energy(r, pairs) * r**4 / cutoff

        integrands = [(tail, f"{self.name}: long range correction did not converge; does "
                       "the energy go to 0 faster than 1/r^3? Otherwise disable it "
                       "(setUseLongRangeCorrection(False))")]
        if self.switch_distance is not None:
            rs, width = self.switch_distance, cutoff - self.switch_distance

            def switched(x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
                r = rs + x * width
                off = x**3 * (10.0 + x * (-15.0 + 6.0 * x))   # 1 - S(r)
                return off * pair_energy(r, pairs) * r**2 * width

            integrands.append((switched, f"{self.name}: long range correction did not "
                               "converge in the switching interval; is the energy finite "
                               "there?"))
        # The quadrature levels depend on the parameter values only: reuse them while those
        # stay the same (most evaluations move atoms, not parameters).
        key = class1.tobytes() + class2.tobytes() + b"".join(
            t.detach().cpu().numpy().tobytes() for t in (p1, p2, *global_env.values()))
        if self._levels is None or self._levels[0] != key:
            self._levels = (key, [quadrature_levels(f, class1.size, particles, failure)
                                  for f, failure in integrands])
        integral = sum(midpoint_integral(f, levels, particles)
                       for (f, _), levels in zip(integrands, self._levels[1], strict=True))
        weights = torch.as_tensor(counts[class1, class2], dtype=particles.dtype,
                                  device=particles.device)
        n = float(self.n_particles)
        return 2.0 * math.pi * n * n * (weights * integral).sum() / (n * (n + 1) / 2)

    # ---- fused kernels

    def _translate(self) -> symbolic.CustomPairLaw:
        """The energy as a fused pair law (no tabulated functions, no interaction groups)."""
        if self.groups:
            raise symbolic.UntranslatableError("interaction groups are not on the fused path")
        return symbolic.custom_pair_law(
            self.energy.text, self.tables["particles"].columns, self.tables["globals"].columns,
            self.switch_distance, self.cutoff, _arities(self.energy))

    def _fused_pair_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                           particles: torch.Tensor, globals_row: torch.Tensor) -> torch.Tensor:
        """The pair sum of :meth:`forward` by the generated pair kernel: the candidate pairs
        (excluded ones left out), the kernel selecting those within the cutoff; the global
        parameters ride in every particle row (their derivatives summed back by autograd)."""
        translation, reason = self._fused_translation()
        if translation is None:
            raise NotImplementedError(f"{self.name} (force {self.force_index}) has no fused "
                                      f"kernel: {reason}")
        shifts = wraps = None
        suspect = math.inf
        if self.cutoff_pairs is not None:
            i, j, shifts, wraps, suspect = self.cutoff_pairs.candidates(positions, box)
        else:
            i, j = self.fixed_first, self.fixed_second
        rows = torch.cat([particles, globals_row.expand(particles.shape[0], -1)], 1)
        # Pairs that a zero parameter switches off entirely (symbolic.inert_columns) are left
        # out, as the NonbondedForce kernels leave out pairs without Lennard-Jones.
        live = torch.cat([self.tables["particles"].bound_columns,
                          self.tables["globals"].bound_columns + particles.shape[1]])
        inert = symbolic.inert_columns(translation, tuple(torch.unique(live).tolist()))
        detached = rows.detach()
        off1, off2 = ((detached[:, list(columns)] == 0).any(1) for columns in inert)
        cache = self._fused_pairs
        if (cache is None or cache[0] is not i or not torch.equal(cache[1], off1)
                or not torch.equal(cache[2], off2)):
            keep = torch.nonzero(~(off1[i] | off2[j])).squeeze(1)
            cache = (i, off1, off2, fused.pair_list(i[keep], j[keep],
                                                    None if shifts is None else shifts[keep]))
            self._fused_pairs = cache
        return fused.pair_energy(translation.law, positions, box, cache[3], rows,
                                 translation.constants, self.cutoff, wraps, suspect)

    # ---- energy

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None,
                sites: torch.Tensor | None = None) -> torch.Tensor:
        return self._energy(positions, box, sites, use_fused=False)

    def fused_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                     sites: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` with the pair sum by the generated pair kernel (:mod:`.fused`); the
        long-range correction by autograd."""
        return self._energy(positions, box, sites, use_fused=True)

    def _energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                sites: torch.Tensor | None, use_fused: bool) -> torch.Tensor:
        if self.periodic:
            if box is None:
                raise InputError(f"{self.name} (force {self.force_index}) uses CutoffPeriodic "
                                 "but no box was given; pass the periodic box vectors")
            if float(torch.diagonal(box.detach()).min()) < 2.0 * self.cutoff:
                raise InputError(f"{self.name} (force {self.force_index}): the periodic box "
                                 f"is smaller than twice the cutoff ({self.cutoff} nm); use a "
                                 "larger box or a shorter cutoff")
        dtype = positions.dtype
        particles = self.tables["particles"](sites).to(dtype)
        globals_row = self.tables["globals"](sites).to(dtype)
        global_env = _table_env(globals_row[0], self.tables["globals"].columns)
        box_used = box if self.periodic else None
        if use_fused:
            energy = self._fused_pair_energy(positions, box_used, particles, globals_row)
        else:
            energy = self._pair_energy(positions, box, particles, global_env)
        if self.long_range_correction:
            volume = box[0, 0] * box[1, 1] * box[2, 2]
            energy = energy + self.long_range_coefficient(particles, global_env) / volume
        return energy

    def _pair_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                     particles: torch.Tensor, global_env: Mapping[str, torch.Tensor]
                     ) -> torch.Tensor:
        """Σ over interacting pairs of the (switched) expression, by autograd, kJ/mol."""
        first, second, d = self.pairs(positions, box)
        r = torch.linalg.vector_norm(d, dim=-1)
        env = dict(global_env)
        env.update(_table_env(particles, self.tables["particles"].columns, first, "1"))
        env.update(_table_env(particles, self.tables["particles"].columns, second, "2"))
        env["r"] = r
        pair_energy = torch.broadcast_to(self.energy(env), r.shape)
        if self.switch_distance is not None:
            pair_energy = pair_energy * switching_function(r, self.switch_distance, self.cutoff)
        return pair_energy.sum()


# --------------------------------------------------------------------------- registry

for _term in (CustomBondTerm, CustomAngleTerm, CustomTorsionTerm, CustomNonbondedTerm):
    register(_term.openmm_class)(_term.from_force)

__all__ = ["CustomBondedTerm", "CustomBondTerm", "CustomAngleTerm", "CustomTorsionTerm",
           "CustomNonbondedTerm", "tabulated_functions",
           "global_parameters", "quadrature_levels", "midpoint_integral"]
