"""ParameterSet: sites from tagged ForceField XML, ties, selection, and the mapping to terms.

Reference values: the flexible TIP3P fixture ``tests/data/tip3p_flexible.xml`` (values of
OpenMM's bundled tip3p.xml), energies from OpenMM's Reference platform (double precision).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
import torch

from openmm_reversible.errors import InputError
from openmm_reversible.parameters import ParameterSet, TieExpression
from openmm_reversible.potential import TorchPotential, state_tensors, supported_forces

DATA = Path(__file__).parent / "data"
TAGGED = DATA / "tip3p_flexible.xml"
UNTAGGED = DATA / "tip3p_flexible_untagged.xml"
AMBER_PROTEIN = Path(os.path.dirname(app.__file__)) / "data" / "amber14" / "protein.ff14SB.xml"
WATER_KWARGS = dict(nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=0.9 * unit.nanometer,
                    rigidWater=False)
H_TIE = "-0.5*PARM['Atom/charge/tip3p-O']"
SELECTION = [("Residue/Atom", "tip3p-O", "charge"),
             ("HarmonicBondForce/Bond", "OW.HW", ("length", "k")),
             ("NonbondedForce/Atom", "tip3p-O", "sigma, epsilon".split(", "))]


def _terms_available() -> bool:
    try:
        supported_forces()
    except ImportError:
        return False
    return True


needs_terms = pytest.mark.skipif(not _terms_available(),
                                 reason="the torch terms (potential.nonbonded) are not there")


def water_box():
    """205 flexible TIP3P waters in a 1.86 nm box (cutoff 0.9 nm), bonds and angles strained.

    The positions from ``addSolvent`` have every bond at its rest length, where dE/dk is zero;
    a seeded 0.003 nm jitter makes every parameter gradient non-trivial.
    """
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField(str(UNTAGGED)), model="tip3p",
                        boxSize=openmm.Vec3(1.86, 1.86, 1.86) * unit.nanometer)
    positions = modeller.positions.value_in_unit(unit.nanometer)
    jitter = np.random.default_rng(0).normal(scale=0.003, size=(len(positions), 3))
    return modeller.topology, (np.asarray(positions) + jitter) * unit.nanometer


@pytest.fixture(scope="module")
def water():
    return water_box()


@pytest.fixture(scope="module")
def tagged(water):
    return ParameterSet.from_forcefield(str(TAGGED), water[0], **WATER_KWARGS)


def variant(tmp_path: Path, old: str, new: str, source: Path = TAGGED,
            name: str = "variant.xml") -> Path:
    """A copy of ``source`` with ``old`` replaced by ``new`` (which must be there once)."""
    text = source.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


def reference_energy(system: openmm.System, positions) -> float:
    """Potential energy from OpenMM's Reference platform, kJ/mol."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)


def finite_difference(ps: ParameterSet, key: str, positions, relative_step: float) -> float:
    """Central difference dE/d(site) with the XML value perturbed (ties follow), kJ/mol/unit."""
    start = ps.values()[key]
    step = relative_step * abs(start)
    energies = []
    for value in (start + step, start - step):
        ps.set_values({key: value})
        energies.append(reference_energy(ps.create_system(), positions))
    ps.set_values({key: start})
    return (energies[0] - energies[1]) / (2 * step)


def autograd_site_gradients(ps: ParameterSet, potential: TorchPotential, state
                            ) -> dict[str, float]:
    """dE/d(value) of each trainable site from autograd through the scaled parameters."""
    positions, box = state_tensors(state)
    ps.scaled.grad = None
    potential(positions, box).backward()
    start = np.array([ps.sites[ps.names.index(k)].start for k in ps.trainable_keys])
    return dict(zip(ps.trainable_keys, (ps.scaled.grad.numpy() / start).tolist(), strict=True))


# --------------------------------------------------------------------------------------------
# Sites, keys, values
# --------------------------------------------------------------------------------------------


def test_sites_have_forcebalance_keys_and_xml_values(tagged):
    assert tagged.names == ["Atom/charge/tip3p-O", "Atom/charge/tip3p-H", "Bond/length/OW.HW",
                            "Bond/k/OW.HW", "Atom/sigma/tip3p-O", "Atom/epsilon/tip3p-O"]
    assert tagged.trainable_keys == ["Atom/charge/tip3p-O", "Bond/length/OW.HW", "Bond/k/OW.HW",
                                     "Atom/sigma/tip3p-O", "Atom/epsilon/tip3p-O"]
    assert tagged.values() == {"Atom/charge/tip3p-O": -0.834, "Atom/charge/tip3p-H": 0.417,
                               "Bond/length/OW.HW": 0.09572, "Bond/k/OW.HW": 462750.4,
                               "Atom/sigma/tip3p-O": 0.31507524065751241,
                               "Atom/epsilon/tip3p-O": 0.635968}
    hydrogen = tagged.sites[1]
    assert hydrogen.expression == H_TIE and not hydrogen.trainable
    assert len(hydrogen.locations) == 2  # H1 and H2 of the template are one site
    assert torch.equal(tagged.scaled.detach(), torch.ones(5, dtype=torch.float64))


def test_system_is_built_by_openmm_from_the_files(tagged, water):
    nonbonded = next(f for f in tagged.system.getForces()
                     if isinstance(f, openmm.NonbondedForce))
    charges = {nonbonded.getParticleParameters(a.index)[0].value_in_unit(unit.elementary_charge)
               for a in water[0].atoms()}
    assert charges == {-0.834, 0.417}
    assert tagged.system.getNumParticles() == water[0].getNumAtoms()


def test_values_are_scaled_and_ties_carry_gradients(water):
    ps = ParameterSet.select(str(UNTAGGED), water[0], [("NonbondedForce/Atom", "tip3p-H",
                                                        "epsilon"),
                                                       ("Residue/Atom", "tip3p-O", "charge")],
                             {("Residue/Atom", "tip3p-H", "charge"): H_TIE}, **WATER_KWARGS)
    assert ps.trainable_keys == ["Atom/charge/tip3p-O", "Atom/epsilon/tip3p-H"]
    with torch.no_grad():
        ps.scaled.copy_(torch.tensor([1.1, 1.5], dtype=torch.float64))
    values = ps.values()
    assert values["Atom/charge/tip3p-O"] == pytest.approx(-0.834 * 1.1, rel=1e-15)
    assert values["Atom/epsilon/tip3p-H"] == pytest.approx(0.5, rel=1e-15)  # zero start: additive
    assert values["Atom/charge/tip3p-H"] == pytest.approx(0.5 * 0.834 * 1.1, rel=1e-15)
    (grad,) = torch.autograd.grad(ps()[ps.names.index("Atom/charge/tip3p-H")], ps.scaled)
    assert grad.tolist() == pytest.approx([0.5 * 0.834, 0.0], rel=1e-15)
    ps.set_values({"Atom/charge/tip3p-O": -0.9, "Atom/epsilon/tip3p-H": 0.25})
    assert ps.values()["Atom/charge/tip3p-H"] == pytest.approx(0.45, rel=1e-15)
    assert ps.scaled.tolist() == pytest.approx([0.9 / 0.834, 1.25], rel=1e-15)


def test_set_values_rejects_tied_and_unknown_keys(tagged):
    with pytest.raises(InputError, match=re.escape(
            "cannot set 'Atom/charge/tip3p-H': it is tied (parameter_eval); set the sites its "
            "expression reads")):
        tagged.set_values({"Atom/charge/tip3p-H": 0.5})
    with pytest.raises(InputError, match="cannot set 'Atom/sigma/tip3p-X': no such site; "
                                         "sites are Atom/charge/tip3p-O, "):
        tagged.set_values({"Atom/sigma/tip3p-X": 0.3})


def test_tags_and_python_selection_give_the_same_parameter_set(tagged, water):
    selected = ParameterSet.select([str(UNTAGGED)], water[0], SELECTION,
                                   {("Residue/Atom", "tip3p-H", "charge"): H_TIE},
                                   **WATER_KWARGS)
    assert selected.sites == tagged.sites
    assert selected.values() == tagged.values()
    assert selected.trainable_keys == tagged.trainable_keys
    assert openmm.XmlSerializer.serialize(selected.system) == \
        openmm.XmlSerializer.serialize(tagged.system)


def test_tie_evaluated_into_the_system(tmp_path, water):
    """A tie overrides the numbers written in the file, as in ForceBalance."""
    path = variant(tmp_path, 'name="H2" type="tip3p-H" charge="0.417"',
                   'name="H2" type="tip3p-H" charge="0.4"')
    ps = ParameterSet.from_forcefield(path, water[0], **WATER_KWARGS)
    assert ps.sites[1].start == 0.417
    nonbonded = ps.system.getForce(
        [type(f).__name__ for f in ps.system.getForces()].index("NonbondedForce"))
    assert [nonbonded.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
            for i in range(3)] == [-0.834, 0.417, 0.417]


# --------------------------------------------------------------------------------------------
# Mapping sites to System items, and gradients
# --------------------------------------------------------------------------------------------


@needs_terms
def test_bind_maps_each_site_to_the_items_that_use_it(tagged, water):
    topology = water[0]
    oxygens = [a.index for a in topology.atoms() if a.element.symbol == "O"]
    hydrogens = [a.index for a in topology.atoms() if a.element.symbol == "H"]
    by_key: dict[str, list] = {}
    for binding in tagged.bindings():
        by_key.setdefault(tagged.names[binding.site], []).append(binding)
    assert set(by_key) == set(tagged.names)
    for key, items, column in [("Atom/charge/tip3p-O", oxygens, "charge"),
                               ("Atom/charge/tip3p-H", hydrogens, "charge"),
                               ("Atom/sigma/tip3p-O", oxygens, "sigma"),
                               ("Atom/epsilon/tip3p-O", oxygens, "epsilon"),
                               ("Bond/length/OW.HW", range(len(hydrogens)), "length"),
                               ("Bond/k/OW.HW", range(len(hydrogens)), "k")]:
        (binding,) = by_key[key]
        potential_term = TorchPotential(tagged.system).term_for_force(binding.force_index)
        assert potential_term.tables[binding.table].columns[binding.column] == column
        assert sorted(binding.items.tolist()) == list(items)
        assert np.all(binding.scales == 1.0)


@needs_terms
def test_energy_and_parameter_gradients_match_openmm_finite_differences(tagged, water):
    potential = TorchPotential(tagged.system, parameters=tagged)
    context = openmm.Context(tagged.system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(water[1])
    state = context.getState(getEnergy=True, getPositions=True)
    expected = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    positions, box = state_tensors(state)
    assert potential(positions, box).item() == pytest.approx(expected, rel=1e-6)
    gradients = autograd_site_gradients(tagged, potential, state)
    for key in tagged.trainable_keys:
        numeric = finite_difference(tagged, key, water[1], 1e-4)
        assert gradients[key] == pytest.approx(numeric, rel=1e-6), key


def _protein():
    pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete([r for r in modeller.topology.residues() if r.name in ("HOH", "Cl")])
    return modeller.topology, modeller.positions


@needs_terms
def test_amber_residue_charge_and_bond_class_move_everywhere(tmp_path):
    """One XML number of amber14 feeds every matching item, 1-4 exceptions included."""
    path = variant(tmp_path, '<Atom charge="-0.1825" name="CB" type="protein-CT"/>',
                   '<Atom charge="-0.1825" name="CB" type="protein-CT" parameterize="charge"/>',
                   source=AMBER_PROTEIN, name="protein.ff14SB.xml")
    path = variant(tmp_path, 'length="0.1522" type1="protein-C" type2="protein-CX"/>',
                   'length="0.1522" type1="protein-C" type2="protein-CX" parameterize="k"/>',
                   source=path, name="protein.ff14SB.xml")
    topology, positions = _protein()
    ps = ParameterSet.from_forcefield(path, topology)
    assert ps.names == ["Atom/charge/protein-CT", "Bond/k/protein-C.protein-CX"]
    potential = TorchPotential(ps.system, parameters=ps)
    alanine_cb = [a.index for a in topology.atoms() if a.residue.name == "ALA" and a.name == "CB"]
    (charge,) = [b for b in ps.bindings() if b.site == 0]
    assert sorted(charge.items.tolist()) == alanine_cb
    bond_force = next(f for f in ps.system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    backbone = {tuple(sorted((a.index, b.index))) for a, b in topology.bonds()
                if {a.name, b.name} == {"C", "CA"}}
    (bond,) = [b for b in ps.bindings() if b.site == 1]
    assert {tuple(sorted(bond_force.getBondParameters(i)[:2])) for i in bond.items} == backbone
    context = openmm.Context(ps.system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getPositions=True)
    gradients = autograd_site_gradients(ps, potential, state)
    for key in ps.names:
        numeric = finite_difference(ps, key, positions, 1e-3)
        assert gradients[key] == pytest.approx(numeric, rel=1e-6), key


# --------------------------------------------------------------------------------------------
# Errors: the text is part of the API
# --------------------------------------------------------------------------------------------


def test_unknown_attribute_in_parameterize(tmp_path, water):
    path = variant(tmp_path, 'parameterize="sigma, epsilon"', 'parameterize="sigmaa, epsilon"')
    with pytest.raises(InputError) as info:
        ParameterSet.from_forcefield(path, water[0], **WATER_KWARGS)
    assert str(info.value) == ("variant.xml:28: parameterize names 'sigmaa' but "
                               '<Atom type="tip3p-O"> has attributes sigma, epsilon')


@needs_terms
def test_site_that_no_item_uses(tmp_path, water):
    path = variant(tmp_path, '<Type name="tip3p-H"',
                   '<Type name="tip3p-X" class="XW" element="Ne" mass="20.18"/>\n'
                   '  <Type name="tip3p-H"')
    path = variant(tmp_path, '<Atom type="tip3p-H" sigma="1" epsilon="0"/>',
                   '<Atom type="tip3p-H" sigma="1" epsilon="0"/>\n'
                   '  <Atom type="tip3p-X" sigma="0.3" epsilon="0.5" parameterize="sigma"/>',
                   source=path)
    ps = ParameterSet.from_forcefield(path, water[0], **WATER_KWARGS)
    with pytest.raises(InputError) as info:
        ps.bindings()
    assert str(info.value) == (
        "parameterize names 'sigma' on <Atom type=\"tip3p-X\"> but no particle uses type "
        "tip3p-X in this System; remove the tag, or build a topology that contains it")


@needs_terms
def test_non_proportional_table_entry_is_rejected(tagged, water, monkeypatch):
    """A term storing k**2 cannot be bound to the XML k: the mapping says so."""
    from openmm_reversible import potential
    from openmm_reversible.potential.base import ParameterTable

    original = potential._FACTORIES["HarmonicBondForce"]

    def squared(force, index, system):
        term = original(force, index, system)
        table = term.tables["bonds"]
        term.tables["bonds"] = ParameterTable(table.base.numpy() ** 2, table.columns)
        return term

    monkeypatch.setitem(potential._FACTORIES, "HarmonicBondForce", squared)
    ps = ParameterSet.from_forcefield(str(TAGGED), water[0], **WATER_KWARGS)
    with pytest.raises(InputError, match=re.escape(
            "Bond/length/OW.HW: HarmonicBondForce table 'bonds' column 'length' item 0 is not "
            "proportional to length")):
        ps.bindings()


@pytest.mark.parametrize("old, new, message", [
    ('charge="0.417"\n         parameter_eval="charge=-0.5*PARM[\'Atom/charge/tip3p-O\']"/>\n'
     '   <Bond',
     'charge="0.417"\n         parameter_eval="charge=0.417"/>\n   <Bond',
     "key 'Atom/charge/tip3p-H' is ambiguous: variant.xml:12 <Atom type=\"tip3p-H\"> and "
     "variant.xml:14 <Atom type=\"tip3p-H\"> both yield it but differ in value or tie; give "
     "the elements the same value and tag, or distinct types"),
    ("-0.834\" parameterize=\"charge\"", "-0.834\" parameterize=\"charge\" "
     "parameter_eval=\"charge=1.0\"",
     "variant.xml:11: 'charge' of <Atom type=\"tip3p-O\"> is marked both trainable and tied "
     "(parameterize and parameter_eval); keep one"),
    ("parameterize=\"sigma, epsilon\"", "parameterize=\"type\"",
     "variant.xml:28: type='tip3p-O' of <Atom type=\"tip3p-O\"> is not a number, so it "
     "cannot be a parameter; remove it from parameterize"),
    ('parameterize="length, k"', 'parameter_eval="k=2*PARM[\'Bond/length/OW.HW\']"',
     "Bond/k/OW.HW (<Bond class1=\"OW\" class2=\"HW\">): PARM['Bond/length/OW.HW'] is not a "
     "site; tag that attribute with parameterize (sites: Atom/charge/tip3p-O, "),
    ('parameterize="length, k"',
     'parameter_eval="k=2*PARM[\'Bond/length/OW.HW\'], length=PARM[\'Bond/k/OW.HW\']"',
     "ties form a cycle: "),
    ('parameterize="length, k"', 'parameter_eval="k"',
     "variant.xml:21: parameter_eval entry 'k' of <Bond class1=\"OW\" class2=\"HW\"> is not of "
     "the form attribute=expression"),
    ('parameterize="length, k"', 'parameter_eval="k=__import__(\'os\').getcwd()"',
     "Bond/k/OW.HW (<Bond class1=\"OW\" class2=\"HW\">): \"__import__('os').getcwd()\" is not "
     "allowed in expression"),
])
def test_bad_tags_are_input_errors(tmp_path, water, old, new, message):
    path = variant(tmp_path, old, new)
    with pytest.raises(InputError) as info:
        ParameterSet.from_forcefield(path, water[0], **WATER_KWARGS)
    assert str(info.value).startswith(message)


def test_selection_that_matches_nothing(water):
    with pytest.raises(InputError) as info:
        ParameterSet.select(str(UNTAGGED), water[0], [("NonbondedForce/Atom", "tip3p-X",
                                                       "sigma")], **WATER_KWARGS)
    assert str(info.value) == ("selection ('NonbondedForce/Atom', 'tip3p-X', 'sigma') matches "
                               "no element; identifiers at NonbondedForce/Atom: tip3p-O, tip3p-H")


def test_untagged_bundled_file_has_no_parameters(water):
    with pytest.raises(InputError, match=re.escape(
            "no parameters to train in tip3p.xml: tag attributes with "
            "parameterize=\"sigma, epsilon\" or pass select=[...]")):
        ParameterSet.from_forcefield("tip3p.xml", water[0])


def test_bundled_file_by_name_with_python_selection(water):
    ps = ParameterSet.select("tip3p.xml", water[0],
                             [("NonbondedForce/Atom", "tip3p-O", "sigma")])
    assert ps.values() == {"Atom/sigma/tip3p-O": 0.31507524065751241}
    assert ps.files[0].name == "tip3p.xml" and ps.files[0].is_file()


@pytest.mark.parametrize("expression, expected", [
    ("-0.5*PARM['a']", -1.0), ("PARM['a']**2 / 4 + 1", 2.0), ("sqrt(PARM['a'] * 8)", 4.0),
    ("-(PRM['a'] - 3) * pi", np.pi), ("exp(log(PARM['a']))", 2.0),
])
def test_tie_expressions(expression, expected):
    tie = TieExpression(expression, "test")
    assert tie.keys == ["a"]
    assert tie({"a": torch.tensor(2.0, dtype=torch.float64)}).item() == \
        pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("expression", ["PARM['a'] if 1 else 0", "a", "max(PARM['a'], 1)",
                                        "PARM[0]", "open('f')", "True * 2", "[1][0]"])
def test_tie_expressions_reject_everything_else(expression):
    with pytest.raises(InputError, match="is not allowed in expression"):
        TieExpression(expression, "test")


def test_tagged_file_with_includes_is_refused(tmp_path, water):
    path = variant(tmp_path, "<ForceField>\n", '<ForceField>\n <Include file="other.xml"/>\n')
    with pytest.raises(InputError, match=re.escape(
            "variant.xml has parameters and includes other.xml; pass the included files to "
            "xml_files directly")):
        ParameterSet.from_forcefield(path, water[0], **WATER_KWARGS)


@needs_terms
def test_bind_refuses_a_potential_of_another_system(water):
    ps = ParameterSet.from_forcefield(str(TAGGED), water[0], **WATER_KWARGS)
    ps.set_values({"Atom/sigma/tip3p-O": 0.32})
    with pytest.raises(InputError, match=re.escape(
            "the potential's NonbondedForce table 'particles' does not hold "
            "Atom/sigma/tip3p-O = 0.3150752406575124; build it from parameter_set.system")):
        TorchPotential(ps.create_system(), parameters=ps)
    potential = TorchPotential(ps.system, parameters=ps)  # the mapping is independent of values
    assert len(potential.parameters_set.bindings()) == 6


@needs_terms
def test_zero_start_value_is_warned_about_and_its_gradient_is_zero(tmp_path, water):
    from openmm_reversible.units import box_tensor, positions_tensor

    path = variant(tmp_path, '<Atom type="tip3p-H" sigma="1" epsilon="0"/>',
                   '<Atom type="tip3p-H" sigma="1" epsilon="0" parameterize="epsilon"/>')
    with pytest.warns(UserWarning) as record:
        ps = ParameterSet.from_forcefield(path, water[0], **WATER_KWARGS)
    messages = [str(w.message) for w in record if "starts at 0" in str(w.message)]
    assert messages == [
        'Atom/epsilon/tip3p-H (<Atom type="tip3p-H">) is tagged for training but starts at 0: '
        "it cannot move relative to its start value, so it moves additively, by steps of the "
        "learning rate in MD units; and where it enters the energy as a factor of a combining "
        "rule at 0 (the square root of a zero well depth, sqrt(epsilon1*epsilon2)) its "
        "gradient is 0 and it never moves. Start it at a small nonzero value (e.g. 1e-3), or "
        "remove 'epsilon' from parameterize"]
    # What the warning says: the Lennard-Jones gradient of a zero well depth is exactly 0.
    potential = TorchPotential(ps.system, parameters=ps)
    potential(positions_tensor(water[1]), box_tensor(water[0].getPeriodicBoxVectors())).backward()
    gradient = dict(zip(ps.trainable_keys, ps.scaled.grad.tolist(), strict=True))
    assert gradient.pop("Atom/epsilon/tip3p-H") == 0.0
    assert all(np.isfinite(g) and g != 0 for g in gradient.values())


def test_readme_tagging_example_loads_in_plain_openmm_and_trains(tmp_path, water):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Marking what to train"):]
    snippet = section[section.index("```xml\n") + 7:section.index("```", section.index("```xml")
                                                                  + 6)]
    text = UNTAGGED.read_text()
    start, end = text.index(" <NonbondedForce"), text.index("</NonbondedForce>") + 17
    path = tmp_path / "readme.xml"
    path.write_text(text[:start] + snippet + text[end:])
    app.ForceField(str(path)).createSystem(water[0])  # plain OpenMM loads it
    ps = ParameterSet.from_forcefield(path, water[0], **WATER_KWARGS)
    assert ps.trainable_keys == ["Atom/charge/tip3p-O", "Atom/sigma/tip3p-O",
                                 "Atom/epsilon/tip3p-O"]
    assert [s.key for s in ps.sites if not s.trainable] == ["Atom/charge/tip3p-H"]


def test_tags_on_residue_template_atoms_are_named_with_the_fix():
    from openmm_reversible.parameters import residue_tag_error

    with pytest.raises(ValueError, match="could not convert string to float: 'charge'"):
        app.ForceField(str(TAGGED))
    message = str(residue_tag_error(TAGGED))
    assert message.startswith(
        'tip3p_flexible.xml:11: parameterize="charge" on <Atom name="O" type="tip3p-O"> of '
        '<Residue name="HOH">; tip3p_flexible.xml:12: parameter_eval="charge=-0.5*'
        "PARM['Atom/charge/tip3p-O']\" on <Atom name=\"H1\" type=\"tip3p-H\"> of <Residue "
        'name="HOH">; tip3p_flexible.xml:14: parameter_eval=')
    assert message.endswith(
        "OpenMM reads every attribute of a residue template's <Atom> as a number, so plain "
        'OpenMM cannot load such a file ("could not convert string to float"). Tag the value '
        "where the force defines it instead (e.g. charge on <NonbondedForce>'s <Atom type=...> "
        'with parameterize="charge"); in Python a residue charge can be selected without a '
        'tag: ParameterSet.select(files, topology, select=[("Residue/Atom", "<type>", '
        '"charge")])')
    assert residue_tag_error([UNTAGGED, "tip3p.xml"]) is None


def test_fit_structure_from_residue_tagged_files_names_the_tags():
    from types import SimpleNamespace

    from openmm_reversible.sampler import build_structure

    config = SimpleNamespace(structure=SimpleNamespace(water_box=4, model="tip3p"),
                             forcefield=SimpleNamespace(files=[str(TAGGED)]))
    with pytest.raises(InputError, match=r'^tip3p_flexible.xml:11: parameterize="charge" on '):
        build_structure(config)
