"""A System the torch twin cannot represent is refused with every problem named at once."""

from __future__ import annotations

import openmm
import pytest
from openmm import app

from openmm_reversible.potential import TorchPotential, UnsupportedForceError


def test_amoeba_system_names_every_unsupported_force():
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=2,
                        neutralize=False)
    system = app.ForceField("amoeba2018.xml").createSystem(modeller.topology,
                                                          nonbondedMethod=app.NoCutoff)
    names = {f.__class__.__name__ for f in system.getForces()}
    assert {"AmoebaMultipoleForce", "AmoebaVdwForce", "CustomCompoundBondForce"} <= names
    with pytest.raises(UnsupportedForceError) as error:
        TorchPotential(system)
    message = str(error.value)
    assert message.startswith("Unsupported forces ")
    for index, force in enumerate(system.getForces()):
        name = force.__class__.__name__
        if name in ("AmoebaMultipoleForce", "AmoebaVdwForce", "AmoebaTorsionTorsionForce",
                    "CustomCompoundBondForce"):
            assert f"{name} (force {index})" in message
    assert "supported: " in message and "HarmonicBondForce" in message.split("supported: ")[1]


def test_unsupported_setting_and_unsupported_class_are_reported_together():
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in
                                          [(3, 0, 0), (0, 3, 0), (0, 0, 3)]))
    nonbonded = openmm.NonbondedForce()
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.LJPME)
    for _ in range(2):
        nonbonded.addParticle(0.0, 0.3, 0.5)
    system.addForce(nonbonded)
    system.addForce(openmm.GBSAOBCForce())
    with pytest.raises(UnsupportedForceError) as error:
        TorchPotential(system)
    message = str(error.value)
    assert message.startswith("Unsupported force GBSAOBCForce (force 1); supported: ")
    assert "LJPME" in message
