"""TorchPotential: the differentiable twin of an OpenMM System.

One :class:`~openmm_reversible.potential.base.Term` per OpenMM Force, each built by a factory
registered for the force's class name (``@register("HarmonicBondForce")``). The total energy
``E(positions, box)`` is float64 by default; forces, Hessian-vector products and parameter VJPs
come from autograd.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import openmm
import torch
from torch import nn

from ..units import DTYPE, box_tensor, positions_tensor
from . import fused
from .base import ParameterTable, Term, UnsupportedForceError
from .virtual_sites import VirtualSites

TermFactory = Callable[[openmm.Force, int, openmm.System], Term]
_FACTORIES: dict[str, TermFactory] = {}

IGNORED_FORCES = ("CMMotionRemover", "MonteCarloBarostat", "MonteCarloAnisotropicBarostat",
                  "MonteCarloFlexibleBarostat", "MonteCarloMembraneBarostat")
"""Forces that contribute no energy: accepted and reported as ignored."""


def register(openmm_class: str) -> Callable[[TermFactory], TermFactory]:
    """Register ``factory(force, force_index, system) -> Term`` for an OpenMM force class."""

    def deco(factory: TermFactory) -> TermFactory:
        _FACTORIES[openmm_class] = factory
        return factory

    return deco


def supported_forces() -> list[str]:
    """Names of the OpenMM force classes the twin supports (energies) or ignores."""
    _load_terms()
    return sorted(_FACTORIES) + list(IGNORED_FORCES)


def _load_terms() -> None:
    # Importing the term modules fills the registry.
    from . import bonded, custom, nonbonded, torchforce  # noqa: F401


def build_term(force: openmm.Force, index: int, system: openmm.System) -> Term | None:
    """The twin of one force, ``None`` for an ignored one; UnsupportedForceError otherwise."""
    _load_terms()
    from .torchforce import concrete_force

    force = concrete_force(force)
    name = force.__class__.__name__
    if name in IGNORED_FORCES:
        return None
    if name not in _FACTORIES:
        raise UnsupportedForceError(
            f"Unsupported force {name} (force {index}); supported: "
            f"{', '.join(supported_forces())}")
    return _FACTORIES[name](force, index, system)


def _concrete_name(force: openmm.Force) -> str:
    from .torchforce import concrete_force

    return concrete_force(force).__class__.__name__


class TorchPotential(nn.Module):
    """Energy of an OpenMM System as a torch module.

    Parameters
    ----------
    system : openmm.System
        The System to mirror. Every force must be supported or ignorable.
    parameters : openmm_reversible.parameters.ParameterSet, optional
        Trainable force-field parameters; binds XML values into the terms' tables.
    fused : bool
        Evaluate the terms that have one through their fused kernels (:mod:`.fused`: forces,
        Hessian-vector products and parameter VJPs in compiled loops, same values as the
        autograd path to round-off). Terms without one, and inputs the kernels cannot take
        (not float64 on the CPU, a box that requires grad, numba missing), use autograd; each
        such fallback is reported once per potential by a ``UserWarning``. See
        :meth:`use_fused`.

    Attributes
    ----------
    virtual_sites : VirtualSites
        Placed from their parents before every evaluation, so forces land on the parents.
    n_constraints : int
        The System's constraints. The energy ignores them (as OpenMM's does); the reversible
        windows refuse a potential that has any.

    Examples
    --------
    >>> pot = TorchPotential(system)
    >>> energy = pot(positions, box)            # kJ/mol, positions (N, 3) nm, box (3, 3) nm
    >>> forces = -torch.autograd.grad(energy, positions)[0]
    """

    def __init__(self, system: openmm.System, parameters=None, fused: bool = False):
        super().__init__()
        terms, ignored, problems = [], [], []
        try:
            self.virtual_sites = VirtualSites(system)
        except UnsupportedForceError as error:
            problems.append(str(error))
        _load_terms()
        unknown = []
        # Every problem of the System goes into one error, not just the first one met.
        for index, force in enumerate(system.getForces()):
            name = _concrete_name(force)
            if name not in _FACTORIES and name not in IGNORED_FORCES:
                unknown.append(f"{name} (force {index})")
                continue
            try:
                term = build_term(force, index, system)
            except UnsupportedForceError as error:
                problems.append(str(error))
                continue
            if term is None:
                ignored.append(force.__class__.__name__)
            else:
                terms.append(term)
        if unknown:
            problems.insert(0, f"Unsupported force{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(unknown)}; supported: {', '.join(supported_forces())}")
        if problems:
            raise UnsupportedForceError("; ".join(problems))
        self.terms = nn.ModuleList(terms)
        self.ignored = ignored
        masses = [system.getParticleMass(i).value_in_unit(openmm.unit.dalton)
                  for i in range(system.getNumParticles())]
        self.register_buffer("masses", torch.tensor(masses, dtype=DTYPE))
        self.n_constraints = system.getNumConstraints()
        self.parameters_set = parameters
        if parameters is not None:
            parameters.bind(self)
        self._warned: set[str] = set()
        self.use_fused(fused)

    def use_fused(self, enabled: bool = True) -> None:
        """Switch the fused kernels on or off (warns once about terms that have none)."""
        self.fused = bool(enabled)
        if self.fused:
            without = sorted({t.name + (f" ({reason})" if (reason := t.fused_fallback_reason())
                                        else "") for t in self.terms if not t.has_fused})
            if without:
                self._warn_once(f"no fused kernel for {', '.join(without)}: "
                                "these terms use the autograd path")

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"TorchPotential: {message}", UserWarning, stacklevel=3)

    def _fused_now(self, positions: torch.Tensor, box: torch.Tensor | None) -> bool:
        if not self.fused:
            return False
        reason = fused.unavailable_reason(positions, box)
        if reason is not None:
            self._warn_once(f"fused kernels not used ({reason}); using the autograd path")
        return reason is None

    def _term_energy(self, term: Term, positions, box, sites, use_fused: bool):
        if use_fused and term.has_fused:
            return term.fused_energy(positions, box, sites)
        return term(positions, box, sites)

    @property
    def n_atoms(self) -> int:
        return int(self.masses.shape[0])

    def sites(self) -> torch.Tensor | None:
        """Current values of the bound XML parameter sites (None without a ParameterSet)."""
        return None if self.parameters_set is None else self.parameters_set()

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        """Total potential energy, kJ/mol (0-dim tensor).

        Parameters
        ----------
        positions : torch.Tensor, shape (n_atoms, 3), nm
        box : torch.Tensor, shape (3, 3), nm, or None for non-periodic systems
        """
        sites = self.sites()
        positions = self.virtual_sites(positions)
        use_fused = self._fused_now(positions, box)
        energy = positions.new_zeros(())
        for term in self.terms:
            energy = energy + self._term_energy(term, positions, box, sites, use_fused)
        return energy

    def energies(self, positions: torch.Tensor, box: torch.Tensor | None = None
                 ) -> dict[int, torch.Tensor]:
        """Energy of each term keyed by its force index in the System, kJ/mol."""
        sites = self.sites()
        positions = self.virtual_sites(positions)
        use_fused = self._fused_now(positions, box)
        return {term.force_index: self._term_energy(term, positions, box, sites, use_fused)
                for term in self.terms}

    def term_for_force(self, index: int) -> Term:
        for term in self.terms:
            if term.force_index == index:
                return term
        raise KeyError(f"no term for force {index}")


def state_tensors(state: openmm.State, dtype=DTYPE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions and periodic box vectors (both nm) of an OpenMM State as tensors."""
    pos = positions_tensor(state.getPositions(asNumpy=True), dtype=dtype)
    box = box_tensor(np.asarray(state.getPeriodicBoxVectors(asNumpy=True)
                                .value_in_unit(openmm.unit.nanometer)), dtype=dtype)
    return pos, box


__all__ = ["TorchPotential", "Term", "ParameterTable", "UnsupportedForceError", "register",
           "supported_forces", "build_term", "state_tensors", "IGNORED_FORCES"]
