"""OpenMM's nonbonded methods and constraint types, by name: the one place that maps them.

Configs, command lines and system builders name methods as strings; ``createSystem`` wants
``openmm.app`` constants; a built ``NonbondedForce`` or ``CustomNonbondedForce`` reports an
integer enum. Every module converts through these tables.
"""

from __future__ import annotations

import openmm
from openmm import app

NONBONDED_METHODS = {
    "NoCutoff": app.NoCutoff,
    "CutoffNonPeriodic": app.CutoffNonPeriodic,
    "CutoffPeriodic": app.CutoffPeriodic,
    "ReactionField": app.CutoffPeriodic,  # OpenMM's CutoffPeriodic is reaction-field Coulomb
    "Ewald": app.Ewald,
    "PME": app.PME,
}
"""Accepted method names (configs, command lines) → the ``nonbondedMethod`` of
``ForceField.createSystem``. ``ReactionField`` is an alias of ``CutoffPeriodic``."""

SHORT_NAMES = {"RF": "ReactionField"}
"""Shorthands the Python system builders also accept (:func:`nonbonded_method`)."""

NONBONDED_FORCE_METHODS = {
    openmm.NonbondedForce.NoCutoff: "NoCutoff",
    openmm.NonbondedForce.CutoffNonPeriodic: "CutoffNonPeriodic",
    openmm.NonbondedForce.CutoffPeriodic: "CutoffPeriodic",
    openmm.NonbondedForce.Ewald: "Ewald",
    openmm.NonbondedForce.PME: "PME",
    openmm.NonbondedForce.LJPME: "LJPME",
}
"""``NonbondedForce.getNonbondedMethod()`` → its name."""

PAIRWISE_METHODS = ("NoCutoff", "CutoffNonPeriodic", "CutoffPeriodic")
"""Methods whose energy is a sum over pairs (no reciprocal space); also the methods of
``CustomNonbondedForce``, in the order of its enum."""

CONSTRAINTS = {"none": None, "HBonds": app.HBonds, "AllBonds": app.AllBonds,
               "HAngles": app.HAngles}
"""Accepted constraint names → the ``constraints`` of ``ForceField.createSystem``."""


def nonbonded_method(name: str):
    """The ``openmm.app`` constant for a method name or shorthand; ValueError listing the
    choices."""
    try:
        return NONBONDED_METHODS[SHORT_NAMES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown nonbonded method {name!r}; choose from "
                         f"{', '.join([*NONBONDED_METHODS, *SHORT_NAMES])}") from None


__all__ = ["CONSTRAINTS", "NONBONDED_FORCE_METHODS", "NONBONDED_METHODS", "PAIRWISE_METHODS",
           "SHORT_NAMES", "nonbonded_method"]
