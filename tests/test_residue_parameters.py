"""Residue-template parameters: charges kept on ``<Residue>`` atoms (amber14 protein.ff14SB.xml).

The structure is ACE-ALA-ASN-LEU-NME (55 atoms) cut from OpenMM's villin ``test.pdb``
(:func:`openmm_reversible.systems.capped_peptide`), in vacuum (NoCutoff); the force field is a
copy of OpenMM's bundled ``amber14/protein.ff14SB.xml`` with tags added on the ``<Residue>``
elements. ALA's CB shares its type protein-CT with LEU's CD1/CD2 and the caps' methyl carbons,
LEU's CB its type protein-2C with ASN's CB: those keep their charges. Energies are OpenMM's
Reference platform (double precision).
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

from openmm_reversible.config import load_config
from openmm_reversible.errors import InputError
from openmm_reversible.export import write_xml
from openmm_reversible.gradcheck import check_forcefield_gradients
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential
from openmm_reversible.systems import capped_peptide
from openmm_reversible.validate import round_trip

AMBER_PROTEIN = Path(os.path.dirname(app.__file__)) / "data" / "amber14" / "protein.ff14SB.xml"
ALA = '<Residue name="ALA">'
LEU = '<Residue name="LEU">'
LEU_TIE = "CB/charge=PARM['Residue/ALA/CB/charge'] + 0.0723"
NET_CHARGE_TOL = 1e-12
"""e: how far a conserved residue's net charge may move (rounding of the tie arithmetic)."""


@pytest.fixture(scope="module")
def peptide():
    return capped_peptide(17, 19)


def tagged(tmp_path: Path, *replacements: tuple[str, str], name="protein.ff14SB.xml") -> Path:
    """A copy of amber14's protein.ff14SB.xml with each (old, new) replaced once."""
    text = AMBER_PROTEIN.read_text()
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def atom_index(topology: app.Topology, residue: str, atom: str) -> int:
    (index,) = [a.index for a in topology.atoms() if a.residue.name == residue and a.name == atom]
    return index


def charges(system: openmm.System) -> np.ndarray:
    """Particle charges (e) of the System's NonbondedForce."""
    force = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    return np.array([force.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                     for i in range(force.getNumParticles())])


def twin_charges(ps: ParameterSet, potential: TorchPotential) -> np.ndarray:
    """Particle charges (e) the twin's NonbondedForce term uses at the current values."""
    force = next(i for i, f in enumerate(ps.system.getForces())
                 if isinstance(f, openmm.NonbondedForce))
    with torch.no_grad():
        return potential.term_for_force(force).tables["particles"](ps())[:, 0].numpy()


def net_charges(values: np.ndarray, topology: app.Topology) -> dict[str, float]:
    return {r.name: float(sum(values[a.index] for a in r.atoms())) for r in topology.residues()}


def energy(system: openmm.System, positions: np.ndarray) -> tuple[float, np.ndarray]:
    """OpenMM Reference energy (kJ/mol) and forces (kJ/mol/nm)."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def check_gradients_against_openmm(ps: ParameterSet, positions: np.ndarray) -> None:
    """dE/d(value) of every trainable site by autograd through the twin equals the central
    difference of OpenMM's energies of Systems rebuilt with the value moved (ties follow)."""
    potential = TorchPotential(ps.system, parameters=ps)
    ps.scaled.grad = None
    potential(torch.tensor(positions), None).backward()
    current = ps.trainable_values().detach().numpy()
    # value = start * scaled (start: the file's value, nonzero here)
    autograd = ps.scaled.grad.numpy() / np.array([s.start for s in ps.sites if s.trainable])
    for key, value, gradient in zip(ps.trainable_keys, current, autograd, strict=True):
        step = 1e-4 * abs(value)
        energies = []
        for moved in (value + step, value - step):
            ps.set_values({key: moved})
            energies.append(energy(ps.create_system(), positions)[0])
        ps.set_values({key: value})
        assert gradient == pytest.approx((energies[0] - energies[1]) / (2 * step), rel=1e-6), key
        assert gradient != 0, key


# --------------------------------------------------------------------------------------------
# Sites keyed by residue and atom name
# --------------------------------------------------------------------------------------------


def test_residue_sites_feed_only_their_templates_atoms(tmp_path, peptide):
    """ALA CB and LEU CB both trainable (one key each, where the type key was ambiguous)."""
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge">'),
                  (LEU, '<Residue name="LEU" parameterize="CB/charge">'))
    app.ForceField(str(path))  # plain OpenMM loads the tagged file
    topology = peptide.topology
    ps = ParameterSet.from_forcefield(path, topology)
    assert ps.names == ["Residue/ALA/CB/charge", "Residue/LEU/CB/charge"]
    assert ps.values() == {"Residue/ALA/CB/charge": -0.1825, "Residue/LEU/CB/charge": -0.1102}
    assert ps.sites[0].element == '<Atom name="CB"> of <Residue name="ALA">'
    ala_cb, leu_cb = atom_index(topology, "ALA", "CB"), atom_index(topology, "LEU", "CB")
    for site, index in ((0, ala_cb), (1, leu_cb)):
        (binding,) = [b for b in ps.bindings() if b.site == site]
        assert (binding.force, binding.table, binding.items.tolist()) == \
            ("NonbondedForce", "particles", [index])

    potential = TorchPotential(ps.system, parameters=ps)
    before = charges(ps.system)
    ps.set_values({"Residue/ALA/CB/charge": -0.25, "Residue/LEU/CB/charge": -0.05})
    after = twin_charges(ps, potential)
    np.testing.assert_array_equal(after, charges(ps.create_system()))
    moved = np.flatnonzero(after != before).tolist()
    assert moved == sorted([ala_cb, leu_cb])
    assert (after[ala_cb], after[leu_cb]) == pytest.approx((-0.25, -0.05), abs=1e-15)
    # Atoms that share the types keep their charges: protein-CT (LEU CD1, CD2, the caps'
    # methyls) and protein-2C (ASN CB).
    for residue, atom in (("LEU", "CD1"), ("LEU", "CD2"), ("ACE", "CH3"), ("NME", "C"),
                          ("ASN", "CB")):
        i = atom_index(topology, residue, atom)
        assert after[i] == before[i] != 0, (residue, atom)
    check_gradients_against_openmm(ps, peptide.positions)


def test_ties_across_residues_follow_and_carry_the_gradient(tmp_path, peptide):
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge">'),
                  (LEU, f'<Residue name="LEU" parameter_eval="{LEU_TIE}">'))
    ps = ParameterSet.from_forcefield(path, peptide.topology)
    assert ps.trainable_keys == ["Residue/ALA/CB/charge"]
    assert [s.key for s in ps.sites if not s.trainable] == ["Residue/LEU/CB/charge"]
    ps.set_values({"Residue/ALA/CB/charge": -0.3})
    assert ps.values()["Residue/LEU/CB/charge"] == pytest.approx(-0.3 + 0.0723, abs=1e-15)
    leu_cb = atom_index(peptide.topology, "LEU", "CB")
    assert charges(ps.create_system())[leu_cb] == pytest.approx(-0.2277, abs=1e-15)
    ps.set_values({"Residue/ALA/CB/charge": -0.1825})
    check_gradients_against_openmm(ps, peptide.positions)  # both atoms' terms reach ALA CB


def test_python_selection_equals_the_tags(tmp_path, peptide):
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge" '
                                  'conserve_charge="true">'),
                  (LEU, f'<Residue name="LEU" parameter_eval="{LEU_TIE}">'))
    from_tags = ParameterSet.from_forcefield(path, peptide.topology)
    selected = ParameterSet.select(AMBER_PROTEIN, peptide.topology, [("Residue", "ALA",
                                                                      "CB/charge")],
                                   {("Residue", "LEU", "CB/charge"): LEU_TIE.split("=", 1)[1]},
                                   conserve_charge=["ALA"])
    assert selected.sites == from_tags.sites
    assert len(selected.sites) == 11  # ALA CB, LEU CB and ALA's nine other atoms


# --------------------------------------------------------------------------------------------
# The net-charge constraint
# --------------------------------------------------------------------------------------------


def test_conserve_charge_keeps_each_residues_net_charge(tmp_path, peptide):
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge" '
                                  'conserve_charge="true">'),
                  (LEU, f'<Residue name="LEU" parameter_eval="{LEU_TIE}" '
                        'conserve_charge="true">'))
    topology = peptide.topology
    ps = ParameterSet.from_forcefield(path, topology)
    assert ps.trainable_keys == ["Residue/ALA/CB/charge"]
    assert ps.names[:4] == ["Residue/ALA/CB/charge", "Residue/LEU/CB/charge",
                            "Residue/ALA/N/charge", "Residue/ALA/H/charge"]
    assert len(ps.names) == 2 + 9 + 18
    potential = TorchPotential(ps.system, parameters=ps)
    original = charges(ps.system)
    start = net_charges(original, topology)
    assert start["ALA"] == pytest.approx(0.0, abs=1e-9)

    ps.set_values({"Residue/ALA/CB/charge": -0.3})
    values = ps.values()
    shift = (-0.3 - -0.1825) / 9
    assert values["Residue/ALA/N/charge"] == pytest.approx(-0.4157 - shift, abs=1e-15)
    assert values["Residue/LEU/CG/charge"] == pytest.approx(0.3531 - (-0.3 + 0.0723 + 0.1102)
                                                            / 18, abs=1e-15)
    twin = twin_charges(ps, potential)
    system = charges(ps.create_system())
    (exported,) = write_xml(ps, tmp_path / "trained/")
    plain = charges(app.ForceField(str(exported)).createSystem(topology))
    for name, q in (("twin", twin), ("System", system), ("exported", plain)):
        got = net_charges(q, topology)
        for residue, net in start.items():
            assert abs(got[residue] - net) <= NET_CHARGE_TOL, (name, residue)
    np.testing.assert_array_equal(plain, system)
    np.testing.assert_array_equal(twin, system)
    asn = [a.index for a in topology.atoms() if a.residue.name in ("ASN", "ACE", "NME")]
    np.testing.assert_array_equal(system[asn], original[asn])
    assert np.count_nonzero(system != original) == 10 + 19

    # Trained again from the exported file: the constraint now keeps the trained net charge.
    again = ParameterSet.from_forcefield(exported, topology)
    assert again.names == ps.names and again.values() == values
    again.set_values({"Residue/ALA/CB/charge": -0.1})
    got = net_charges(charges(again.create_system()), topology)
    assert all(abs(got[r] - start[r]) <= NET_CHARGE_TOL for r in start)
    check_gradients_against_openmm(ps, peptide.positions)


# --------------------------------------------------------------------------------------------
# Export, round trip and gradcheck on the peptide
# --------------------------------------------------------------------------------------------


def test_export_round_trip_in_plain_openmm(tmp_path, peptide):
    """The exported file (tags kept) loads in plain OpenMM with the trained charges, and
    ``validate``'s round trip (its System vs the twin of the original file at the trained
    values) is within the project's tolerances."""
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge" '
                                  'conserve_charge="true">'),
                  (LEU, '<Residue name="LEU" parameterize="CB/charge">'))
    ps = ParameterSet.from_forcefield(path, peptide.topology)
    ps.set_values({"Residue/ALA/CB/charge": -0.21, "Residue/LEU/CB/charge": -0.02})
    (exported,) = write_xml(ps, tmp_path / "out/")
    text = exported.read_text()
    assert '<Atom charge="-0.21" name="CB" type="protein-CT"/>' in text
    assert '<Atom charge="-0.02" name="CB" type="protein-2C"/>' in text
    assert ps.texts()[0] == text
    plain = app.ForceField(str(exported)).createSystem(peptide.topology)
    np.testing.assert_array_equal(charges(plain), charges(ps.create_system()))

    pdb = tmp_path / "peptide.pdb"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(peptide.topology, peptide.positions * unit.nanometer, handle)
    config = tmp_path / "fit.toml"
    config.write_text(f"""
[forcefield]
files = ["{path}"]
[structure]
pdb = "{pdb}"
[system]
nonbonded_method = "NoCutoff"
[simulation]
temperature = 300.0
[schedule]
epochs = 1
[[targets]]
observable = "enthalpy_of_vaporization"
value = 44.0
""")
    check = round_trip(load_config(config), [str(exported)], peptide.topology,
                       peptide.positions)
    assert check["ok"], check
    assert check["energy_rel_error"] <= check["tolerance"] and check["energy_openmm"] != 0
    (stripped,) = write_xml(ps, tmp_path / "plain.xml", strip_markup=True)
    assert "conserve_charge" not in stripped.read_text()
    assert "parameterize" not in stripped.read_text()


def test_gradcheck_on_the_peptide(tmp_path, peptide):
    """Reversible = backprop through time = finite differences, through a tie across residues
    and the compensating ties of ALA (4 steps: the check is not cheaper per parameter)."""
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge" '
                                  'conserve_charge="true">'),
                  (LEU, f'<Residue name="LEU" parameter_eval="{LEU_TIE}">'))
    pdb = tmp_path / "peptide.pdb"
    with open(pdb, "w") as handle:
        app.PDBFile.writeFile(peptide.topology, peptide.positions * unit.nanometer, handle)
    result = check_forcefield_gradients([str(path)], str(pdb), steps=4, loss="energy")
    assert result.names == ["Residue/ALA/CB/charge"]
    ok, why = result.verdict(tol_bptt=1e-8, tol_fd=1e-4)
    assert ok and result.fd_conclusive().all(), why
    assert result.rel_error_bptt < 1e-8 and result.rel_error_fd < 1e-4
    assert np.all(result.reversible != 0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_atom_names_with_primes_split_as_they_read(tmp_path):
    """``parameterize="C1'/charge, O1'/charge"``: quotes outside brackets are part of names."""
    path = tmp_path / "primes.xml"
    path.write_text("""<ForceField>
 <AtomTypes>
  <Type name="c" class="c" element="C" mass="12.01"/>
  <Type name="o" class="o" element="O" mass="16.0"/>
 </AtomTypes>
 <Residues>
  <Residue name="CO" parameterize="C1'/charge, O1'/charge">
   <Atom name="C1'" type="c" charge="0.2"/>
   <Atom name="O1'" type="o" charge="-0.2"/>
   <Bond atomName1="C1'" atomName2="O1'"/>
  </Residue>
 </Residues>
 <HarmonicBondForce>
  <Bond class1="c" class2="o" length="0.113" k="1e5"/>
 </HarmonicBondForce>
 <NonbondedForce coulomb14scale="0.8333" lj14scale="0.5">
  <UseAttributeFromResidue name="charge"/>
  <Atom type="c" sigma="0.34" epsilon="0.36"/>
  <Atom type="o" sigma="0.30" epsilon="0.88"/>
 </NonbondedForce>
</ForceField>
""")
    topology = app.Topology()
    for _ in range(2):
        residue = topology.addResidue("CO", topology.addChain())
        c = topology.addAtom("C1'", app.Element.getBySymbol("C"), residue)
        o = topology.addAtom("O1'", app.Element.getBySymbol("O"), residue)
        topology.addBond(c, o)
    ps = ParameterSet.from_forcefield(path, topology)
    assert ps.names == ["Residue/CO/C1'/charge", "Residue/CO/O1'/charge"]
    assert [b.items.tolist() for b in ps.bindings()] == [[0, 2], [1, 3]]


@pytest.mark.parametrize("tag, message", [
    ('<Residue name="ALA" parameterize="CB">',
     "protein.ff14SB.xml:44: parameterize names 'CB' on <Residue name=\"ALA\">: a residue "
     "template's entry names the atom and the attribute; write e.g. "
     "parameterize=\"CB/charge\""),
    ('<Residue name="ALA" conserve_charge="true">',
     "protein.ff14SB.xml:44: conserve_charge on <Residue name=\"ALA\">, but none of its charges "
     "is a parameter; tag one (parameterize=\"N/charge\" on the <Residue>) or remove "
     "conserve_charge"),
    ('<Residue name="ALA" parameterize="N/charge, H/charge, CA/charge, HA/charge, CB/charge, '
     'HB1/charge, HB2/charge, HB3/charge, C/charge, O/charge" conserve_charge="true">',
     "protein.ff14SB.xml:44: conserve_charge on <Residue name=\"ALA\">, but every charge of it "
     "is a parameter, so no atom is left to compensate; leave one untagged, or drop "
     "conserve_charge and tie the charges so that they keep the sum"),
    ('<Residue name="ALA" parameterize="CB/charge" conserve_charge="yes">',
     "protein.ff14SB.xml:44: conserve_charge='yes' on <Residue name=\"ALA\">; write \"true\" or "
     "\"false\""),
])
def test_residue_tag_errors(tmp_path, peptide, tag, message):
    path = tagged(tmp_path, (ALA, tag))
    with pytest.raises(InputError) as info:
        ParameterSet.from_forcefield(path, peptide.topology)
    assert str(info.value) == message


def test_a_tie_that_reads_an_untagged_residue_atom(tmp_path, peptide):
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge">'),
                  (LEU, '<Residue name="LEU" parameter_eval="CB/charge=PARM'
                        "['Residue/ALA/CA/charge']\">"))
    with pytest.raises(InputError) as info:
        ParameterSet.from_forcefield(path, peptide.topology)
    assert str(info.value) == (
        "Residue/LEU/CB/charge (<Atom name=\"CB\"> of <Residue name=\"LEU\">): "
        "PARM['Residue/ALA/CA/charge'] is not a site; tag it with parameterize=\"CA/charge\" "
        "on <Residue name=\"ALA\"> (sites: Residue/ALA/CB/charge, Residue/LEU/CB/charge)")


def test_a_template_the_structure_does_not_use(tmp_path, peptide):
    path = tagged(tmp_path, ('<Residue name="GLY">', '<Residue name="GLY" '
                                                     'parameterize="CA/charge">'))
    ps = ParameterSet.from_forcefield(path, peptide.topology)
    with pytest.raises(InputError) as info:
        ps.bindings()
    assert str(info.value) == (
        "parameterize names 'charge' on <Atom name=\"CA\"> of <Residue name=\"GLY\"> but no "
        "residue uses template GLY in this System; remove the tag, or build a topology that "
        "contains it")


def test_selection_errors_name_the_residue(peptide):
    with pytest.raises(InputError) as info:
        ParameterSet.select(AMBER_PROTEIN, peptide.topology, [("Residue", "ALX", "CB/charge")])
    assert str(info.value).startswith(
        "selection ('Residue', 'ALX', 'CB/charge') matches no element; did you mean 'VAL' or "
        "'ALA'? (78 identifiers at Residue: ALA, ARG, ")
    with pytest.raises(InputError) as info:
        ParameterSet.select(AMBER_PROTEIN, peptide.topology, [("Residue", "ALA", "charge")])
    assert str(info.value) == (
        "protein.ff14SB.xml:44: selection ('Residue', 'ALA', 'charge') on <Residue "
        "name=\"ALA\">: a residue template's entry names the atom and the attribute; write e.g. "
        "('Residue', 'ALA', 'CB/charge')")
    with pytest.raises(InputError) as info:
        ParameterSet.select(AMBER_PROTEIN, peptide.topology, [("Residue", "ALA", "CB/charge")],
                            conserve_charge=["LUE"])
    assert str(info.value).startswith(
        "conserve_charge names residue 'LUE', but no <Residue> of the files has that name; "
        "did you mean 'LEU'")


def test_a_number_marked_under_two_keys_is_refused(tmp_path, peptide):
    path = tagged(tmp_path, (ALA, '<Residue name="ALA" parameterize="CB/charge">'))
    with pytest.raises(InputError) as info:
        ParameterSet.select(path, peptide.topology, [("Residue/Atom", "protein-CT", "charge")])
    assert "is marked as 'Residue/ALA/CB/charge' (parameterize) and as " \
        "'Atom/charge/protein-CT' (select); keep one" in str(info.value)


# --------------------------------------------------------------------------------------------
# charmm36: the same keys and constraint on a zwitterionic peptide with terminal patches
# --------------------------------------------------------------------------------------------

CHARMM36 = Path(os.path.dirname(app.__file__)) / "data" / "charmm36.xml"
CHARMM_RESIDUES = ("ALA", "ASN", "LEU")


def charmm36_for(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    """A copy of OpenMM's charmm36.xml with its <Residues> cut to ALA, ASN and LEU (the rest of
    the file, atom types, patches and every force, verbatim) and each (old, new) replaced once.
    The cut keeps the peptide's System the same and spares the ~1000 other templates, which
    make every ForceField load of the whole file take seconds."""
    text = CHARMM36.read_text()
    start, end = text.index("  <Residues>\n"), text.index("  </Residues>\n")
    names = "|".join(CHARMM_RESIDUES)
    kept = re.findall(rf'    <Residue name="(?:{names})">.*?</Residue>\n',
                      text[start:end], re.S)
    assert len(kept) == len(CHARMM_RESIDUES)
    text = text[:start] + "  <Residues>\n" + "".join(kept) + text[end:]
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "charmm36_peptide.xml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def charmm_peptide(tmp_path_factory):
    """Zwitterionic ALA-ASN-LEU (villin residues 17-19, heavy atoms; LEU's OXT where the next
    residue's N was), hydrogens added by Modeller for charmm36: the NTER and CTER patches
    apply to ALA and LEU. Returns (topology, positions nm)."""
    pdb = app.PDBFile(str(Path(os.path.dirname(app.__file__)) / "data" / "test.pdb"))
    source = list(pdb.topology.residues())
    xyz = pdb.positions.value_in_unit(unit.nanometer)
    topology, positions = app.Topology(), []
    chain = topology.addChain()
    for residue in source[17:20]:
        new = topology.addResidue(residue.name, chain)
        for atom in residue.atoms():
            if atom.element != app.element.hydrogen:
                topology.addAtom(atom.name, atom.element, new)
                positions.append(xyz[atom.index])
    (n_next,) = [a for a in source[20].atoms() if a.name == "N"]
    topology.addAtom("OXT", app.element.oxygen, new)
    positions.append(xyz[n_next.index])
    topology.createStandardBonds()
    modeller = app.Modeller(topology, positions * unit.nanometer)
    modeller.addHydrogens(app.ForceField(str(charmm36_for(tmp_path_factory.mktemp("c36")))))
    return modeller.topology, np.asarray(modeller.positions.value_in_unit(unit.nanometer))


def test_charmm36_residue_charges_conserve_charge_and_gradient(tmp_path, charmm_peptide):
    """charmm36 keeps charges on <Residue> atoms too: Residue/ASN/CB/charge trainable with
    ASN's net charge conserved, LEU's CB tied to it (LEU carries the CTER patch), ALA's CB
    (under the NTER patch) trainable on its own. Moving them moves exactly those atoms and
    ASN's compensating ones, each residue keeps its net charge where conserved, the patched
    terminal atoms keep theirs, and dE/dq agrees with finite differences of OpenMM energies."""
    topology, positions = charmm_peptide
    path = charmm36_for(
        tmp_path,
        ('<Residue name="ASN">', '<Residue name="ASN" parameterize="CB/charge" '
                                 'conserve_charge="true">'),
        ('<Residue name="LEU">', '<Residue name="LEU" parameter_eval="CB/charge='
                                 "PARM['Residue/ASN/CB/charge']\">"),
        ('<Residue name="ALA">', '<Residue name="ALA" parameterize="CB/charge">'))
    ps = ParameterSet.from_forcefield(path, topology)
    assert ps.trainable_keys == ["Residue/ALA/CB/charge", "Residue/ASN/CB/charge"]
    assert ps.values()["Residue/ASN/CB/charge"] == ps.values()["Residue/LEU/CB/charge"] == -0.18
    asn = [a for a in topology.atoms() if a.residue.name == "ASN"]
    assert len(ps.names) == 3 + len(asn) - 1  # ASN's other atoms compensate
    original = charges(ps.system)
    start = net_charges(original, topology)
    assert start == pytest.approx({"ALA": 1.0, "ASN": 0.0, "LEU": -1.0}, abs=1e-9)

    potential = TorchPotential(ps.system, parameters=ps)
    ps.set_values({"Residue/ASN/CB/charge": -0.25, "Residue/ALA/CB/charge": -0.22})
    system = charges(ps.create_system())
    np.testing.assert_array_equal(twin_charges(ps, potential), system)
    got = net_charges(system, topology)
    assert got["ASN"] == pytest.approx(start["ASN"], abs=NET_CHARGE_TOL)
    assert got["LEU"] == pytest.approx(start["LEU"] - 0.07, abs=NET_CHARGE_TOL)
    assert got["ALA"] == pytest.approx(start["ALA"] + 0.05, abs=NET_CHARGE_TOL)
    for residue, atom, q in (("ASN", "CB", -0.25), ("LEU", "CB", -0.25), ("ALA", "CB", -0.22)):
        assert system[atom_index(topology, residue, atom)] == pytest.approx(q, abs=1e-15)
    moved = {(a.residue.name, a.name) for a in topology.atoms() if system[a.index] !=
             original[a.index]}
    assert moved == {("ASN", a.name) for a in asn} | {("LEU", "CB"), ("ALA", "CB")}
    # The NTER patch's ammonium and the CTER patch's carboxylate keep their charges.
    for residue, atom in (("ALA", "N"), ("ALA", "H2"), ("LEU", "OXT"), ("LEU", "C")):
        i = atom_index(topology, residue, atom)
        assert system[i] == original[i] != 0, (residue, atom)
    check_gradients_against_openmm(ps, positions)


def test_charmm36_tag_errors_name_the_line(tmp_path, charmm_peptide):
    """Messages about a tag give the file and line of its element, deep in a large file too
    (the LEU template sits past 500 lines of atom types and other templates)."""
    path = charmm36_for(tmp_path, ('<Residue name="LEU">',
                                   '<Residue name="LEU" parameterize="CB">'))
    text = path.read_text()
    line = text[:text.index('<Residue name="LEU" parameterize')].count("\n") + 1
    assert line > 500
    with pytest.raises(InputError) as info:
        ParameterSet.from_forcefield(path, charmm_peptide[0])
    assert str(info.value).startswith(f"charmm36_peptide.xml:{line}: parameterize names 'CB' "
                                      "on <Residue name=\"LEU\">")
