"""``NonbondedForce``: Lennard-Jones and Coulomb interactions, the torch twin of OpenMM's.

Energy of every particle pair ``i < j`` that is not an exception:

.. math::

    E_{ij} = 4\\varepsilon_{ij} S(r) \\left[\\left(\\frac{\\sigma_{ij}}{r}\\right)^{12}
             - \\left(\\frac{\\sigma_{ij}}{r}\\right)^{6}\\right] + E^{\\mathrm{C}}_{ij}(r),
    \\qquad \\sigma_{ij} = \\frac{\\sigma_i + \\sigma_j}{2},\\quad
    \\varepsilon_{ij} = \\sqrt{\\varepsilon_i \\varepsilon_j}

with the Coulomb law ``E^C`` set by the nonbonded method, exactly as OpenMM's Reference
platform computes it:

- ``NoCutoff``: ``k_e q_i q_j / r`` over all pairs;
- ``CutoffNonPeriodic``, ``CutoffPeriodic``: reaction field ``k_e q_i q_j (1/r + k_rf r² - c_rf)``
  for ``r < r_c``, with ``k_rf = r_c⁻³ (ε_rf - 1)/(2ε_rf + 1)`` and
  ``c_rf = r_c⁻¹ 3ε_rf/(2ε_rf + 1)`` (periodic: minimum image);
- ``Ewald``, ``PME``: direct space ``k_e q_i q_j erfc(α r)/r`` for ``r < r_c`` plus the
  reciprocal, self and exclusion terms of :mod:`.ewald`.

Lennard-Jones is truncated at the cutoff (no shift) and multiplied by OpenMM's switching
function ``S = 1 - 10t³ + 15t⁴ - 6t⁵``, ``t = (r - r_s)/(r_c - r_s)``, when enabled. Exceptions
(OpenMM's 1-4 pairs and exclusions) are removed from the pair sum and contribute plain
``k_e q_ij / r + 4ε_ij[(σ_ij/r)¹² - (σ_ij/r)⁶]`` with their own parameters, without cutoff.
The long-range dispersion correction adds ``C(σ, ε) / V``, OpenMM's average over classes of
particles with equal ``(σ, ε)`` including the integral of the switched-off part.

Parameters live in two tables: ``particles`` (charge e, sigma nm, epsilon kJ/mol) and
``exceptions`` (chargeProd e², sigma nm, epsilon kJ/mol). Force fields generate most exceptions
from the particle parameters with two scale factors (Amber: 1-4 Coulomb × 1/1.2, 1-4 LJ × 1/2;
exclusions × 0). The twin detects, per exception, whether its Coulomb part and its LJ part
follow that combination rule

.. math:: q_{ij} = c_s q_i q_j,\\qquad \\sigma_{ij} = (\\sigma_i + \\sigma_j)/2,\\qquad
          \\varepsilon_{ij} = \\ell_s \\sqrt{\\varepsilon_i \\varepsilon_j},

infers each exception's ``c_s`` and ``ℓ_s`` and recomputes those parts from the current particle
table on every evaluation, so training a particle's charge, sigma or epsilon moves its 1-4
interactions too. Parts that do not follow the rule (e.g. CHARMM's special 1-4 Lennard-Jones)
keep their own table values. ``exceptions`` is therefore a derived table.

Parameter offsets (``addParticleParameterOffset`` / ``addExceptionParameterOffset``) are applied
with the default values of their global parameters, as a freshly created OpenMM Context does;
derived exception values are computed from particle values *without* particle offsets, as OpenMM
keeps exception parameters independent of particle offsets. ``LJPME`` is not supported.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import openmm
import torch
from openmm import unit

from ..errors import InputError
from ..geometry import CutoffPairs, minimum_image
from ..methods import NONBONDED_FORCE_METHODS
from ..safe_math import safe_sqrt
from ..units import ONE_4PI_EPS0, scalar
from . import ewald, fused, lawmath, register
from .base import ParameterTable, Term, UnsupportedForceError
from .bonded import bond_length
from .ewald import (
    EwaldReciprocal,
    PMEReciprocal,
    add_constant,
    direct_pair_energy,
    ewald_parameters,
    exclusion_pair_energy,
    pme_parameters,
    self_energy,
)

_SIGMA_RTOL = 1e-12
"""Relative tolerance for "exception sigma equals the mean of its particles' sigmas"."""

# --------------------------------------------------------------------------- scalar laws


def lennard_jones(r: torch.Tensor, sigma: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """Lennard-Jones energy ``4ε[(σ/r)¹² - (σ/r)⁶]``, kJ/mol.

    Parameters
    ----------
    r : torch.Tensor, nm
    sigma : torch.Tensor, nm
    epsilon : torch.Tensor, kJ/mol
    """
    s = sigma / r
    s2 = s * s  # products, not pow: correctly rounded on every device (exact mode)
    s6 = s2 * s2 * s2
    return 4.0 * epsilon * (s6 - 1.0) * s6


def coulomb(qq: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Plain Coulomb energy ``k_e q_i q_j / r``, kJ/mol (``qq`` in e², ``r`` in nm)."""
    return ONE_4PI_EPS0 * qq / r


def reaction_field(qq: torch.Tensor, r: torch.Tensor, krf: float, crf: float) -> torch.Tensor:
    """Reaction-field Coulomb energy ``k_e q_i q_j (1/r + k_rf r² - c_rf)``, kJ/mol.

    Parameters
    ----------
    qq : torch.Tensor, e²
    r : torch.Tensor, nm
    krf : float, nm⁻³
    crf : float, nm⁻¹
    """
    return ONE_4PI_EPS0 * qq * (1.0 / r + krf * r * r - crf)


def exception_law(r: torch.Tensor, exceptions: torch.Tensor) -> torch.Tensor:
    """Summed energy of exception pairs: plain Coulomb plus Lennard-Jones, no cutoff, kJ/mol.

    Parameters
    ----------
    r : torch.Tensor, shape (P,), nm
    exceptions : torch.Tensor, shape (P, 3)
        chargeProd (e²), sigma (nm), epsilon (kJ/mol) of each pair.
    """
    qq, sigma, epsilon = exceptions.unbind(1)
    return (coulomb(qq, r) + lennard_jones(r, sigma, epsilon)).sum()


def switching_function(r: torch.Tensor, switch_distance: float, cutoff: float) -> torch.Tensor:
    """OpenMM's Lennard-Jones switch: 1 below ``r_s``, ``1 - 10t³ + 15t⁴ - 6t⁵`` above.

    Parameters
    ----------
    r : torch.Tensor, nm
    switch_distance : float, nm
    cutoff : float, nm
    """
    t = lawmath.clamp_min((r - switch_distance) / (cutoff - switch_distance), 0.0)
    return 1.0 + t * t * t * (-10.0 + t * (15.0 - 6.0 * t))


def switched_tail_integrals(switch_distance: float, cutoff: float) -> tuple[float, float]:
    """Integrals ``∫_{r_s}^{r_c} (1 - S(r)) r^{-p} dr`` for ``p = 10`` and ``p = 4``, exactly.

    The Lennard-Jones energy that the switch removes from one pair, weighted by the shell
    volume ``4πr²``, is ``16πε(σ¹² I₁₀ - σ⁶ I₄)``. ``1 - S`` is a quintic in ``r``; each
    monomial is integrated in closed form (a logarithm for ``r⁻¹``).

    Parameters
    ----------
    switch_distance, cutoff : float, nm

    Returns
    -------
    (float, float)
        ``I₁₀`` in nm⁻⁹ and ``I₄`` in nm⁻³.
    """
    poly = np.polynomial.Polynomial
    t = poly([-switch_distance, 1.0]) / (cutoff - switch_distance)
    one_minus_s = 10 * t ** 3 - 15 * t ** 4 + 6 * t ** 5
    results = []
    for p in (10, 4):
        total = 0.0
        for k, c in enumerate(one_minus_s.coef):
            n = k - p
            if n == -1:
                total += c * math.log(cutoff / switch_distance)
            else:
                total += c * (cutoff ** (n + 1) - switch_distance ** (n + 1)) / (n + 1)
        results.append(total)
    return results[0], results[1]


# --------------------------------------------------------------------------- fused laws
# The same laws, lifted by the fused kernels (:mod:`.fused`) instead of autograd. Particle rows
# are (charge e, sigma nm, sqrt(epsilon) (kJ/mol)^½); exception rows (chargeProd, sigma, eps).


def _coulomb_law(method: str, r, a, b, c):
    """Coulomb energy of two particles with rows ``a = (q_i,)``, ``b = (q_j,)`` under
    ``method`` (constants ``c``: ``(k_rf, c_rf)`` for reaction field, ``(α,)`` for Ewald/PME)."""
    qq = a[0] * b[0]
    if method == "NoCutoff":
        return coulomb(qq, r)
    if method in ("CutoffNonPeriodic", "CutoffPeriodic"):
        return reaction_field(qq, r, c[0], c[1])
    return direct_pair_energy(qq, r, c[0])


def _lj_law(switched: bool, r, a, b, c):
    """Lennard-Jones energy of two particles with rows ``(σ, sqrt(ε))``, switched between
    ``c = (r_s, r_c)`` when ``switched``."""
    lj = lennard_jones(r, 0.5 * (a[0] + b[0]), a[1] * b[1])
    return lj * switching_function(r, c[0], c[1]) if switched else lj


def _exception_law(vectors, p, c):
    """Exception energy (plain Coulomb + Lennard-Jones) of the pair vector ``vectors[0]``."""
    r = bond_length(vectors[0])
    return coulomb(p[0], r) + lennard_jones(r, p[1], p[2])


@functools.cache
def fused_pair_laws(method: str, switched: bool) -> tuple[fused.PairLaw, fused.PairLaw]:
    """The fused-kernel forms (Coulomb, Lennard-Jones) of the non-excepted pair energy."""
    n_consts = {"NoCutoff": 0, "CutoffNonPeriodic": 2, "CutoffPeriodic": 2}.get(method, 1)
    return (fused.PairLaw(f"coulomb_{method}", functools.partial(_coulomb_law, method),
                          n_params=1, n_consts=n_consts, sources=(_coulomb_law, ewald)),
            fused.PairLaw(f"lennard_jones{'_switched' if switched else ''}",
                          functools.partial(_lj_law, switched), n_params=2,
                          n_consts=2 * switched, sources=(_lj_law,)))


EXCEPTION_LAW = fused.ChainLaw("nonbonded_exception", _exception_law, width=2, n_params=3,
                               n_consts=0, sources=(bond_length,))


# --------------------------------------------------------------------------- reading the force


def _particle_arrays(force: openmm.NonbondedForce) -> np.ndarray:
    """(n_particles, 3) charge, sigma, epsilon."""
    rows = []
    for i in range(force.getNumParticles()):
        q, s, e = force.getParticleParameters(i)
        rows.append((scalar(q, unit.elementary_charge), scalar(s, unit.nanometer),
                     scalar(e, unit.kilojoule_per_mole)))
    return np.asarray(rows, dtype=float).reshape(-1, 3)


def _exception_arrays(force: openmm.NonbondedForce) -> tuple[np.ndarray, np.ndarray]:
    """Atom pairs (n_exceptions, 2) and parameters (n_exceptions, 3) chargeProd, sigma, eps."""
    atoms, params = [], []
    for k in range(force.getNumExceptions()):
        i, j, qq, s, e = force.getExceptionParameters(k)
        atoms.append((i, j))
        params.append((scalar(qq, unit.elementary_charge ** 2), scalar(s, unit.nanometer),
                       scalar(e, unit.kilojoule_per_mole)))
    return (np.asarray(atoms, dtype=np.int64).reshape(-1, 2),
            np.asarray(params, dtype=float).reshape(-1, 3))


def _offsets(force: openmm.NonbondedForce, getter: str, count_getter: str, size: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Summed parameter offsets at the global parameters' default values, shape (size, 3),
    and a mask of the items that have any offset."""
    defaults = {force.getGlobalParameterName(k): force.getGlobalParameterDefaultValue(k)
                for k in range(force.getNumGlobalParameters())}
    total = np.zeros((size, 3))
    has = np.zeros(size, dtype=bool)
    for k in range(getattr(force, count_getter)()):
        name, item, dq, ds, de = getattr(force, getter)(k)
        if name not in defaults:
            raise InputError(f"NonbondedForce parameter offset {k} uses global parameter "
                             f"{name!r}, which the force does not define; add it with "
                             "addGlobalParameter")
        total[item] += defaults[name] * np.array([dq, ds, de], dtype=float)
        has[item] = True
    return total, has


def _common_ratio(ratios: np.ndarray) -> float:
    """Most frequent value of ``ratios`` (to 10 decimals), 1.0 if there are none."""
    if ratios.size == 0:
        return 1.0
    values, counts = np.unique(np.round(ratios, 10), return_counts=True)
    return float(values[np.argmax(counts)])


def exception_rules(particles: np.ndarray, pairs: np.ndarray, exceptions: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """Which exceptions follow the combination rule, and their scale factors.

    Parameters
    ----------
    particles : numpy.ndarray, shape (n_particles, 3)
        charge (e), sigma (nm), epsilon (kJ/mol) of every particle.
    pairs : numpy.ndarray of int, shape (n_exceptions, 2)
    exceptions : numpy.ndarray, shape (n_exceptions, 3)
        chargeProd (e²), sigma (nm), epsilon (kJ/mol) of every exception.

    Returns
    -------
    dict of str to numpy.ndarray, each shape (n_exceptions,)
        ``charge_rule`` / ``lj_rule`` (bool): whether chargeProd, respectively (sigma,
        epsilon), equal ``c_s q_i q_j``, respectively ``((σ_i+σ_j)/2, ℓ_s sqrt(ε_i ε_j))``;
        ``charge_scale`` ``c_s`` and ``lj_scale`` ``ℓ_s``. A zero exception (chargeProd and
        epsilon both 0: an exclusion) follows the rule with ``c_s = ℓ_s = 0`` (its LJ part
        only if its sigma is the mean, so a parameter offset on it keeps its sigma). Where the
        particle product is zero the scale is not determined by the data; it is then the
        force's most common scale, so a parameter trained away from zero gets the same
        scaling as the other 1-4 pairs.
    """
    q, s, e = particles[:, 0], particles[:, 1], particles[:, 2]
    i, j = pairs[:, 0], pairs[:, 1]
    qq_ex, sig_ex, eps_ex = exceptions[:, 0], exceptions[:, 1], exceptions[:, 2]
    zero = (qq_ex == 0.0) & (eps_ex == 0.0)

    qq = q[i] * q[j]
    charge_known = qq != 0.0
    charge_ratio = qq_ex / np.where(charge_known, qq, 1.0)
    charge_common = _common_ratio(charge_ratio[charge_known & ~zero])
    charge_scale = np.where(charge_known, charge_ratio, charge_common)
    charge_rule = charge_known | (qq_ex == 0.0)

    ee = np.sqrt(e[i]) * np.sqrt(e[j])
    sigma_ok = np.isclose(sig_ex, 0.5 * (s[i] + s[j]), rtol=_SIGMA_RTOL, atol=0.0)
    lj_known = sigma_ok & (ee != 0.0)
    lj_ratio = eps_ex / np.where(lj_known, ee, 1.0)
    lj_common = _common_ratio(lj_ratio[lj_known & ~zero])
    lj_scale = np.where(lj_known, lj_ratio, lj_common)
    lj_rule = lj_known | (sigma_ok & (eps_ex == 0.0))

    charge_scale[zero] = 0.0
    lj_scale[zero] = 0.0
    return {"charge_rule": charge_rule, "lj_rule": lj_rule,
            "charge_scale": charge_scale, "lj_scale": lj_scale}


# --------------------------------------------------------------------------- the term


class NonbondedTerm(Term):
    """Torch twin of an OpenMM ``NonbondedForce`` (see the module docstring for the physics).

    Tables: ``particles`` (charge e, sigma nm, epsilon kJ/mol) and ``exceptions``
    (chargeProd e², sigma nm, epsilon kJ/mol; derived from ``particles`` where the
    combination rule holds).

    Parameters
    ----------
    force : openmm.NonbondedForce
        The force to mirror; its values are copied (no reference to it is kept).
    force_index : int
        Index of the force in ``system``.
    system : openmm.System
        Its System (default box: PME grid and Ewald k-vectors are chosen from it, as OpenMM
        does when a Context is created).
    skin : float, nm
        Neighbour-list skin for the cutoff methods.

    Attributes
    ----------
    method : str
        OpenMM nonbonded method name.
    cutoff : float, nm
    """

    openmm_class = "NonbondedForce"
    derived_tables = ("exceptions",)
    has_fused = True

    def __init__(self, force: openmm.NonbondedForce, force_index: int, system: openmm.System,
                 skin: float = 0.1):
        super().__init__(force_index)
        self.method = NONBONDED_FORCE_METHODS[force.getNonbondedMethod()]
        if self.method == "LJPME":
            raise UnsupportedForceError(
                f"NonbondedForce (force {force_index}) uses LJPME, which the torch twin does not "
                "support; use PME with useDispersionCorrection=True for the long-range "
                "dispersion instead")
        n = force.getNumParticles()
        self.n_particles = n
        self.periodic = self.method in ("CutoffPeriodic", "Ewald", "PME")
        self.cutoff = scalar(force.getCutoffDistance(), unit.nanometer)
        self.include_direct = bool(force.getIncludeDirectSpace())
        self.exceptions_periodic = self.periodic and bool(
            force.getExceptionsUsePeriodicBoundaryConditions())

        particles = _particle_arrays(force)
        pairs, exceptions = _exception_arrays(force)
        self.tables["particles"] = ParameterTable(particles, ("charge", "sigma", "epsilon"))
        self.tables["exceptions"] = ParameterTable(exceptions,
                                                   ("chargeProd", "sigma", "epsilon"))
        particle_offsets, _ = _offsets(force, "getParticleParameterOffset",
                                       "getNumParticleParameterOffsets", n)
        add_constant(self, "particle_offsets", particle_offsets)
        self._init_exceptions(force, particles, pairs, exceptions)

        self.uses_cutoff = self.method != "NoCutoff"
        self.skin = float(skin)
        if not self.uses_cutoff:
            i, j = np.triu_indices(n, 1)
            keep = ~np.isin(i * n + j, self.exclusion_keys.numpy())
            add_constant(self, "all_pairs", np.stack([i[keep], j[keep]]))
        self._pairs: CutoffPairs | None = None  # made on first use (holds native handles)
        self._fused_candidates: tuple | None = None  # per list build (fused kernels)
        self._dispersion_classes: tuple | None = None  # per (sigma, epsilon) values

        rf = force.getReactionFieldDielectric()
        self.krf = self.cutoff ** -3 * (rf - 1.0) / (2.0 * rf + 1.0)
        self.crf = 3.0 * rf / (self.cutoff * (2.0 * rf + 1.0))
        self.switch_distance = (scalar(force.getSwitchingDistance(), unit.nanometer)
                                if force.getUseSwitchingFunction() and self.uses_cutoff
                                else None)
        self._init_long_range(force, system)

    def _init_exceptions(self, force: openmm.NonbondedForce, particles: np.ndarray,
                         pairs: np.ndarray, exceptions: np.ndarray) -> None:
        """Exclusion keys of every exception, and the rules, scales and offsets of those that
        can contribute energy (OpenMM's "1-4" list: not identically zero, or offset)."""
        n = self.n_particles
        exception_offsets, has_offset = _offsets(force, "getExceptionParameterOffset",
                                                 "getNumExceptionParameterOffsets", len(pairs))
        rules = exception_rules(particles, pairs, exceptions)
        zero = (exceptions[:, 0] == 0.0) & (exceptions[:, 2] == 0.0)
        active = np.flatnonzero(~zero | has_offset)
        add_constant(self, "pair14_index", active)
        add_constant(self, "pair14", pairs[active])
        for name, values in rules.items():
            add_constant(self, f"pair14_{name}", values[active])
        add_constant(self, "pair14_offsets", exception_offsets[active])
        lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
        keys = np.unique(lo * n + hi)
        add_constant(self, "exclusion_keys", keys)
        add_constant(self, "exclusions", np.stack([keys // n, keys % n], 1))

    def _init_long_range(self, force: openmm.NonbondedForce, system: openmm.System) -> None:
        """Ewald/PME reciprocal space and the dispersion-correction coefficients."""
        default_box = np.asarray([[v[k] for k in range(3)] for v in (
            x.value_in_unit(unit.nanometer) for x in system.getDefaultPeriodicBoxVectors())])
        self.reciprocal: EwaldReciprocal | PMEReciprocal | None = None
        self.alpha = 0.0
        if self.method == "Ewald":
            if np.tril(default_box, -1).any():
                raise UnsupportedForceError(
                    f"NonbondedForce (force {self.force_index}) uses Ewald with a triclinic "
                    "box; OpenMM supports Ewald only for rectangular boxes, use PME instead")
            self.alpha, kmax = ewald_parameters(force, default_box)
            self.reciprocal = EwaldReciprocal(self.alpha, kmax)
        elif self.method == "PME":
            self.alpha, grid = pme_parameters(force, system)
            self.reciprocal = PMEReciprocal(self.alpha, grid)

        # The tail of one pair, integrated against its shell volume, is ε(c12 σ¹² - c6 σ⁶)
        # up to the factor 8π: the full potential beyond r_c plus the switched-off part.
        self.dispersion: tuple[float, float] | None = None
        if force.getUseDispersionCorrection() and self.periodic:
            rc = self.cutoff
            i10, i4 = (switched_tail_integrals(self.switch_distance, rc)
                       if self.switch_distance is not None else (0.0, 0.0))
            self.dispersion = (1.0 / (9.0 * rc ** 9) + i10, 1.0 / (3.0 * rc ** 3) + i4)

    # ------------------------------------------------------------------ parameters

    def current_parameters(self, sites: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Current effective particle and active-exception parameters.

        Parameters
        ----------
        sites : torch.Tensor, optional
            Current values of the bound XML sites.

        Returns
        -------
        particles : torch.Tensor, shape (n_particles, 3)
            charge (e), sigma (nm), epsilon (kJ/mol), parameter offsets included.
        exceptions : torch.Tensor, shape (n_active_exceptions, 3)
            chargeProd (e²), sigma (nm), epsilon (kJ/mol) of the exceptions that are not
            identically zero, rule-following parts recomputed from the particle table.
        """
        table = self.tables["particles"](sites)
        q, s, e = table.unbind(1)
        own = self.tables["exceptions"](sites)[self.pair14_index]
        i, j = self.pair14[:, 0], self.pair14[:, 1]
        root_e = safe_sqrt(e)
        charge = torch.where(self.pair14_charge_rule, self.pair14_charge_scale * q[i] * q[j],
                             own[:, 0])
        sigma = torch.where(self.pair14_lj_rule, 0.5 * (s[i] + s[j]), own[:, 1])
        epsilon = torch.where(self.pair14_lj_rule,
                              self.pair14_lj_scale * root_e[i] * root_e[j], own[:, 2])
        exceptions = torch.stack([charge, sigma, epsilon], 1) + self.pair14_offsets
        return table + self.particle_offsets, exceptions

    # ------------------------------------------------------------------ geometry

    def interacting_pairs(self, positions: torch.Tensor, box: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Non-excepted pairs within the cutoff (all of them without one) and, for periodic
        boxes, their integer image shifts ``n``: the minimum-image displacement is
        ``x[j] - x[i] - n @ box`` (see :class:`~openmm_reversible.geometry.CutoffPairs`)."""
        if not self.uses_cutoff:
            return self.all_pairs[0], self.all_pairs[1], None
        return self._cutoff_pairs()(positions, box)

    def _cutoff_pairs(self) -> CutoffPairs:
        if self._pairs is None:
            self._pairs = CutoffPairs(self.cutoff, self.skin, self.n_particles,
                                      self.exclusion_keys)
        return self._pairs

    def check_box(self, box: torch.Tensor | None) -> None:
        if box is None:
            raise InputError(f"NonbondedForce (force {self.force_index}) uses {self.method}, "
                             "which is periodic, but no box was given; pass the periodic box "
                             "vectors (3, 3) in nm")
        if float(torch.diagonal(box).detach().min()) < 1.999999 * self.cutoff:
            raise InputError(
                f"NonbondedForce (force {self.force_index}): the periodic box "
                f"{torch.diagonal(box).tolist()} nm is smaller than twice the cutoff "
                f"{self.cutoff} nm; use a larger box or a shorter cutoff")
        if self.method == "Ewald" and bool((box.detach().tril(-1) != 0).any()):
            raise InputError(f"NonbondedForce (force {self.force_index}) uses Ewald, which "
                             "needs a rectangular box; use PME for triclinic boxes")

    # ------------------------------------------------------------------ energy pieces

    def pair_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                    particles: torch.Tensor, use_fused: bool = False) -> torch.Tensor:
        """Lennard-Jones plus direct/cutoff Coulomb energy of the non-excepted pairs, kJ/mol
        (by autograd, or by the fused pair kernel with ``use_fused``)."""
        if use_fused:
            return self._fused_pair_energy(positions, box, particles)
        i, j, shifts = self.interacting_pairs(positions, box)
        d = positions.index_select(0, j) - positions.index_select(0, i)
        if shifts is not None:
            d = d - shifts @ box
        return self.pair_law(torch.linalg.vector_norm(d, dim=-1), i, j, particles)

    def pair_law(self, r: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                 particles: torch.Tensor) -> torch.Tensor:
        """The pair energy law: summed LJ (switched) plus this method's Coulomb, kJ/mol.

        Part of the term's interface for other evaluators of the same energy (the exact mode
        computes ``r`` in its own arithmetic and differentiates per pair).

        Parameters
        ----------
        r : torch.Tensor, shape (P,), nm
            Distances of the pairs ``(i, j)``.
        i, j : torch.Tensor of int, shape (P,)
        particles : torch.Tensor, shape (n_particles, 3)
            From :meth:`current_parameters`.
        """
        q, s, e = particles.unbind(1)
        qq = q[i] * q[j]
        if self.method == "NoCutoff":
            elec = coulomb(qq, r)
        elif self.method in ("CutoffNonPeriodic", "CutoffPeriodic"):
            elec = reaction_field(qq, r, self.krf, self.crf)
        else:
            elec = direct_pair_energy(qq, r, self.alpha)
        # A pair with a zero well depth contributes exactly nothing to the energy, the forces
        # and (safe_sqrt) the gradients: Lennard-Jones only runs over pairs with ε_i ε_j > 0
        # (for water models with bare hydrogens, one pair in nine).
        has_lj = e.detach() > 0
        if not bool(has_lj.all()):
            lj_pairs = torch.nonzero(has_lj[i] & has_lj[j]).squeeze(1)
            i, j, r = i[lj_pairs], j[lj_pairs], r[lj_pairs]
        root_e = safe_sqrt(e)
        lj = lennard_jones(r, 0.5 * (s[i] + s[j]), root_e[i] * root_e[j])
        if self.switch_distance is not None:
            lj = lj * switching_function(r, self.switch_distance, self.cutoff)
        return elec.sum() + lj.sum()

    def _fused_pair_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                           particles: torch.Tensor) -> torch.Tensor:
        """:meth:`pair_energy` by the fused kernels: Coulomb over the candidate pairs, LJ over
        those with ``ε_i ε_j > 0``; the kernels select the pairs within the cutoff themselves.
        Candidate index arrays are prepared once per neighbour-list build."""
        shifts = wraps = None
        suspect = math.inf
        if self.uses_cutoff:
            i, j, shifts, wraps, suspect = self._cutoff_pairs().candidates(positions, box)
            listed = i  # the same object until the list is rebuilt
        else:
            listed = self.all_pairs
            i, j = listed[0], listed[1]
        q, s, e = particles.unbind(1)
        has_lj = e.detach() > 0
        cache = self._fused_candidates
        if cache is None or cache[0] is not listed or not torch.equal(cache[1], has_lj):
            lj = torch.nonzero(has_lj[i] & has_lj[j]).squeeze(1)
            cache = (listed, has_lj, fused.pair_list(i, j, shifts),
                     fused.pair_list(i[lj], j[lj], None if shifts is None else shifts[lj]))
            self._fused_candidates = cache
        switched = self.switch_distance is not None
        coulomb_law, lj_law = fused_pair_laws(self.method, switched)
        coulomb_consts = {"NoCutoff": (), "CutoffNonPeriodic": (self.krf, self.crf),
                          "CutoffPeriodic": (self.krf, self.crf)}.get(self.method, (self.alpha,))
        cutoff = self.cutoff if self.uses_cutoff else None
        energy = fused.pair_energy(coulomb_law, positions, box, cache[2], q[:, None],
                                   coulomb_consts, cutoff, wraps, suspect)
        return energy + fused.pair_energy(
            lj_law, positions, box, cache[3], torch.stack([s, safe_sqrt(e)], 1),
            (self.switch_distance, self.cutoff) if switched else (), cutoff, wraps, suspect)

    def _exception_distances(self, pairs: torch.Tensor, positions: torch.Tensor,
                             box: torch.Tensor | None) -> torch.Tensor:
        """Distances (nm) of exception pairs (n, 2): minimum image only if OpenMM's
        ``exceptionsUsePeriodicBoundaryConditions`` is set, as in OpenMM."""
        d = positions[pairs[:, 1]] - positions[pairs[:, 0]]
        if self.exceptions_periodic:
            d = minimum_image(d, box)
        return torch.linalg.vector_norm(d, dim=-1)

    def exception_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                         exceptions: torch.Tensor, use_fused: bool = False) -> torch.Tensor:
        """Energy of the exceptions (plain Coulomb + LJ, no cutoff), kJ/mol (by autograd, or
        by the fused chain kernel with ``use_fused``)."""
        if use_fused:
            return fused.chain_energy(EXCEPTION_LAW, positions, box, self.pair14, exceptions,
                                      periodic=self.exceptions_periodic)
        return exception_law(self._exception_distances(self.pair14, positions, box),
                             exceptions)

    def exclusion_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                         charges: torch.Tensor) -> torch.Tensor:
        """Reciprocal-space energy of excluded pairs that Ewald/PME must subtract, kJ/mol."""
        r = self._exception_distances(self.exclusions, positions, box)
        qq = charges[self.exclusions[:, 0]] * charges[self.exclusions[:, 1]]
        return exclusion_pair_energy(qq, r, self.alpha).sum()

    def dispersion_energy(self, particles: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """Long-range dispersion correction ``C(σ, ε) / V``, kJ/mol.

        OpenMM's coefficient averages the LJ tail over all particle pairs ``i <= j`` (self
        pairs included), grouping particles into classes of equal ``(σ, ε)``. Classes are found
        from the current values; each class value is the mean over its members, which equals
        the common value and spreads the gradient evenly over the members (the exact
        per-particle derivative, by symmetry).
        """
        sigma, epsilon = particles[:, 1], particles[:, 2]
        values = torch.stack([sigma, epsilon], 1).detach().cpu().numpy()
        cached = self._dispersion_classes
        if cached is None or not np.array_equal(cached[0], values):
            # (NumPy's row-unique is ~20x faster than torch.unique(dim=0) here; the classes
            # only change when sigma or epsilon do, so they are kept for the next call.)
            _, member, counts = np.unique(values, axis=0, return_inverse=True,
                                          return_counts=True)
            cached = (values.copy(), torch.as_tensor(member.reshape(-1), device=sigma.device),
                      torch.as_tensor(counts, dtype=sigma.dtype, device=sigma.device))
            self._dispersion_classes = cached
        member, counts = cached[1], cached[2]
        k = counts.shape[0]
        sigma_c = sigma.new_zeros(k).index_add(0, member, sigma) / counts
        root_c = safe_sqrt(epsilon.new_zeros(k).index_add(0, member, epsilon) / counts)
        sig = 0.5 * (sigma_c[:, None] + sigma_c[None, :])
        eps = root_c[:, None] * root_c[None, :]
        sig6 = sig ** 6
        c12, c6 = self.dispersion
        pair = eps * (c12 * sig6 * sig6 - c6 * sig6)
        weight = torch.triu(counts[:, None] * counts[None, :], 1) + torch.diag(
            0.5 * counts * (counts + 1.0))
        n = float(self.n_particles)
        coefficient = 8.0 * math.pi * n * n * (weight * pair).sum() / (0.5 * n * (n + 1.0))
        return coefficient / (box[0, 0] * box[1, 1] * box[2, 2])

    # ------------------------------------------------------------------ total

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None,
                sites: torch.Tensor | None = None) -> torch.Tensor:
        """Nonbonded energy, kJ/mol.

        Parameters
        ----------
        positions : torch.Tensor, shape (n_atoms, 3), nm
        box : torch.Tensor, shape (3, 3), nm, or None
            Required for periodic methods; ignored for NoCutoff and CutoffNonPeriodic.
        sites : torch.Tensor, optional
            Current values of the bound XML sites.
        """
        return self._energy(positions, box, sites, use_fused=False)

    def fused_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                     sites: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` with the pair sum, the exceptions and the PME reciprocal space in
        fused kernels; plain Ewald's reciprocal sum, the excluded-pair correction, the self
        energy and the dispersion correction stay on the autograd path."""
        return self._energy(positions, box, sites, use_fused=True)

    def _energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                sites: torch.Tensor | None, use_fused: bool) -> torch.Tensor:
        if self.periodic:
            self.check_box(box)
        else:
            box = None
        particles, exceptions = self.current_parameters(sites)
        energy = positions.new_zeros(())
        if self.include_direct:
            energy = energy + self.pair_energy(positions, box, particles, use_fused)
            energy = energy + self.exception_energy(positions, box, exceptions, use_fused)
            if self.reciprocal is not None:
                energy = energy - self.exclusion_energy(positions, box, particles[:, 0])
            if self.dispersion is not None:
                energy = energy + self.dispersion_energy(particles, box)
        if self.reciprocal is not None:
            charges = particles[:, 0]
            energy = energy + self.reciprocal_energy(positions, charges, box, use_fused)
            energy = energy + self_energy(charges, self.alpha, box[0, 0] * box[1, 1] * box[2, 2])
        return energy

    def reciprocal_energy(self, positions: torch.Tensor, charges: torch.Tensor,
                          box: torch.Tensor, use_fused: bool = False) -> torch.Tensor:
        """Ewald/PME reciprocal-space energy, kJ/mol (PME by the fused mesh kernels with
        ``use_fused``; plain Ewald always by autograd)."""
        if use_fused and isinstance(self.reciprocal, PMEReciprocal):
            return self.reciprocal.fused_energy(positions, charges, box)
        return self.reciprocal(positions, charges, box)


@register("NonbondedForce")
def _nonbonded(force: openmm.NonbondedForce, index: int, system: openmm.System) -> NonbondedTerm:
    return NonbondedTerm(force, index, system)
