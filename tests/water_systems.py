"""Small water systems shared by several test modules."""

from __future__ import annotations

import os

from openmm import app, unit

from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential
from openmm_reversible.units import box_tensor, positions_tensor

TAGGED_TIP3P = os.path.join(os.path.dirname(__file__), "data", "tip3p_flexible.xml")


def tagged_tip3p(n_waters: int = 20, fused: bool = False):
    """Flexible TIP3P from the tagged XML (charges, bonds and LJ trainable), reaction field
    with a 0.4 nm cutoff: ``(potential, positions nm, box nm)``."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=n_waters,
                        neutralize=False)
    parameters = ParameterSet.from_forcefield(
        [TAGGED_TIP3P], modeller.topology, nonbondedMethod=app.CutoffPeriodic,
        nonbondedCutoff=0.4 * unit.nanometer, constraints=None, rigidWater=False,
        removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters, fused=fused)
    return (potential, positions_tensor(modeller.getPositions()),
            box_tensor(modeller.topology.getPeriodicBoxVectors()))
