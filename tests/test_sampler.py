"""The sampling System leaves out the custom pairs that a zero parameter switches off.

OpenMM evaluates every pair of a CustomNonbondedForce within the cutoff; in the paper's
custom water forms the hydrogens carry zero parameters that make eight pairs in nine vanish.
The Sampler restricts such a force to the particles that can contribute (one interaction
group), and must give the energy and forces of the unrestricted System:

- for the three custom forms, against a plain Context of the same System (Reference
  platform, so only the summation order differs), with the group holding the oxygens only;
- after a parameter update that switches a hydrogen on, the group grows to take it;
- a force with a long-range correction, or with no zero that provably switches pairs off,
  is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_reversible.sampler import Sampler, skip_switched_off_pairs

FORCEFIELDS = Path(__file__).resolve().parent.parent / "examples" / "paper" / "forcefields"
CUSTOM_FORMS = ("double_exponential", "buckingham", "buffered_14_7")


@pytest.fixture(scope="module")
def box():
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=40,
                        boxShape="cube")
    return modeller


def _system(modeller, form: str) -> openmm.System:
    forcefield = app.ForceField(str(FORCEFIELDS / f"{form}.xml"))
    return forcefield.createSystem(modeller.topology, nonbondedMethod=app.CutoffPeriodic,
                                   nonbondedCutoff=0.5 * unit.nanometer, rigidWater=False,
                                   constraints=None)


def _energy_forces(context: openmm.Context):
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def _plain(system, modeller):
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(modeller.positions)
    return _energy_forces(context)


def _sampler(system, modeller) -> Sampler:
    box = np.asarray(modeller.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    positions = np.asarray(modeller.positions.value_in_unit(unit.nanometer))
    return Sampler(system, positions, box, 295.15, 1.0, 0.001, platform="Reference")


def _custom(system) -> openmm.CustomNonbondedForce:
    (force,) = [f for f in system.getForces() if isinstance(f, openmm.CustomNonbondedForce)]
    return force


@pytest.mark.parametrize("form", CUSTOM_FORMS)
def test_custom_forms_sample_only_oxygen_pairs_with_the_same_forces(box, form):
    system = _system(box, form)
    sampler = _sampler(system, box)
    force = _custom(sampler.system)
    oxygens = [a.index for a in box.topology.atoms() if a.element.symbol == "O"]
    assert force.getNumInteractionGroups() == 1
    first, second = force.getInteractionGroupParameters(0)
    assert sorted(first) == sorted(second) == oxygens
    assert _custom(system).getNumInteractionGroups() == 0   # the caller's System untouched
    energy, forces = _energy_forces(sampler.context)
    energy_ref, forces_ref = _plain(system, box)
    assert energy == pytest.approx(energy_ref, rel=1e-12)
    np.testing.assert_allclose(forces, forces_ref, rtol=0, atol=1e-9 * np.abs(forces_ref).max())


def test_a_hydrogen_switched_on_joins_the_group(box):
    system = _system(box, "buckingham")
    sampler = _sampler(system, box)
    changed = openmm.XmlSerializer.clone(system)
    force = _custom(changed)
    hydrogen = next(a.index for a in box.topology.atoms() if a.element.symbol == "H")
    force.setParticleParameters(hydrogen, [1000.0, 30.0, 1e-4, 0.5])   # A, B, C, W
    sampler.update_parameters(changed)
    group, _ = _custom(sampler.system).getInteractionGroupParameters(0)
    assert hydrogen in group
    energy, forces = _energy_forces(sampler.context)
    energy_ref, forces_ref = _plain(changed, box)
    assert energy == pytest.approx(energy_ref, rel=1e-12)
    np.testing.assert_allclose(forces, forces_ref, rtol=0, atol=1e-9 * np.abs(forces_ref).max())
    assert energy != pytest.approx(_plain(system, box)[0], rel=1e-9)   # the change mattered


def test_forces_without_a_provable_switch_are_left_alone(box):
    with_correction = _system(box, "buckingham")
    _custom(with_correction).setUseLongRangeCorrection(True)
    assert skip_switched_off_pairs(with_correction) == {}
    assert _custom(with_correction).getNumInteractionGroups() == 0
    # r-only energy: no parameter can switch a pair off
    assert skip_switched_off_pairs(_three_particles("W1*W2 + 1/r")) == {}
    # W1*W2*exp(-r): W = 0 switches off; restricted to the two others
    switched = _three_particles("W1*W2*exp(-r)")
    (off,) = skip_switched_off_pairs(switched).values()
    assert off.tolist() == [True, False, False]
    assert [sorted(s) for s in _custom(switched).getInteractionGroupParameters(0)] == \
        [[1, 2], [1, 2]]


def _three_particles(energy: str) -> openmm.System:
    """Three particles in one CustomNonbondedForce of ``energy``, W = 0, 1, 1."""
    system = openmm.System()
    force = openmm.CustomNonbondedForce(energy)
    force.addPerParticleParameter("W")
    for value in (0.0, 1.0, 1.0):
        system.addParticle(1.0)
        force.addParticle([value])
    system.addForce(force)
    return system
