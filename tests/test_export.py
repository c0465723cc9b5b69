"""Export: trained values written into the original XML text, everything else byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openmm
import openmm.app as app
import openmm.unit as unit
import pytest
from test_parameters import (
    TAGGED,
    UNTAGGED,
    WATER_KWARGS,
    needs_terms,
    reference_energy,
    water_box,
)

from openmm_reversible.errors import InputError
from openmm_reversible.export import write_xml
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential, state_tensors

TRAINED = {"Atom/charge/tip3p-O": -0.91207, "Bond/length/OW.HW": 0.0961234567891234,
           "Bond/k/OW.HW": 455000.25, "Atom/sigma/tip3p-O": 0.32294, "Atom/epsilon/tip3p-O":
           0.532}
"""Values in the spirit of the published reversible-trained water (sigma, epsilon, q_O)."""


@pytest.fixture(scope="module")
def water():
    return water_box()


def expected_text(original: str, values: dict[str, float]) -> str:
    """The original text with exactly the trained numbers replaced, written independently of
    the library: one literal substitution per tagged attribute."""
    hydrogen = repr(values["Atom/charge/tip3p-H"])
    assert values["Atom/charge/tip3p-H"] == -0.5 * values["Atom/charge/tip3p-O"]
    replacements = [
        ('charge="-0.834" parameterize', f'charge="{values["Atom/charge/tip3p-O"]!r}" '
                                         'parameterize'),
        ('type="tip3p-H" charge="0.417"\n', f'type="tip3p-H" charge="{hydrogen}"\n'),
        ('length="0.09572" k="462750.4"', f'length="{values["Bond/length/OW.HW"]!r}" '
                                          f'k="{values["Bond/k/OW.HW"]!r}"'),
        ('sigma="0.31507524065751241" epsilon="0.635968"',
         f'sigma="{values["Atom/sigma/tip3p-O"]!r}" '
         f'epsilon="{values["Atom/epsilon/tip3p-O"]!r}"'),
    ]
    for old, new in replacements:
        assert old in original
        original = original.replace(old, new)
    return original


@pytest.fixture
def trained(tmp_path, water):
    """A ParameterSet read from a private copy of the tagged fixture, set to TRAINED."""
    source = tmp_path / "source" / TAGGED.name
    source.parent.mkdir()
    shutil.copy(TAGGED, source)
    ps = ParameterSet.from_forcefield(source, water[0], **WATER_KWARGS)
    ps.set_values(TRAINED)
    return ps


def test_only_the_trained_numbers_change(trained, tmp_path):
    (written,) = write_xml(trained, tmp_path)
    assert written == tmp_path / TAGGED.name
    assert written.read_bytes() == expected_text(TAGGED.read_text(), trained.values()).encode()


def test_untouched_values_keep_their_original_text(tmp_path, water):
    ps = ParameterSet.from_forcefield(TAGGED, water[0], **WATER_KWARGS)
    ps.set_values({"Bond/k/OW.HW": 1.0})
    ps.set_values({"Bond/k/OW.HW": 462750.4})
    (written,) = write_xml(ps, tmp_path / "copy.xml")
    # '0.31507524065751241' has more digits than repr() writes: it must survive unchanged.
    assert written.read_bytes() == TAGGED.read_bytes()


def test_round_trip_through_plain_openmm(trained, tmp_path, water):
    (written,) = write_xml(trained, tmp_path / "trained.xml")
    again = ParameterSet.from_forcefield(written, water[0], **WATER_KWARGS)
    assert again.values() == trained.values()  # float64 survives the text
    (plain,) = write_xml(trained, tmp_path / "plain.xml", strip_markup=True)
    assert "parameterize=" not in plain.read_text()
    assert "parameter_eval=" not in plain.read_text()
    system = app.ForceField(str(plain)).createSystem(water[0], **WATER_KWARGS)
    forces = {type(f).__name__: f for f in system.getForces()}
    values = trained.values()
    assert values == pytest.approx(TRAINED | {"Atom/charge/tip3p-H": 0.5 * 0.91207}, rel=1e-15)
    charge, sigma, epsilon = forces["NonbondedForce"].getParticleParameters(0)
    assert (charge.value_in_unit(unit.elementary_charge), sigma.value_in_unit(unit.nanometer),
            epsilon.value_in_unit(unit.kilojoule_per_mole)) == (
        values["Atom/charge/tip3p-O"], values["Atom/sigma/tip3p-O"],
        values["Atom/epsilon/tip3p-O"])
    assert forces["NonbondedForce"].getParticleParameters(1)[0].value_in_unit(
        unit.elementary_charge) == values["Atom/charge/tip3p-H"]
    length, k = forces["HarmonicBondForce"].getBondParameters(0)[2:]
    assert (length.value_in_unit(unit.nanometer),
            k.value_in_unit(unit.kilojoule_per_mole / unit.nanometer**2)) == \
        (values["Bond/length/OW.HW"], values["Bond/k/OW.HW"])
    assert openmm.XmlSerializer.serialize(system) == \
        openmm.XmlSerializer.serialize(trained.create_system())


@needs_terms
def test_exported_energy_equals_the_torch_mirror(trained, tmp_path, water):
    (plain,) = write_xml(trained, tmp_path / "plain.xml", strip_markup=True)
    system = app.ForceField(str(plain)).createSystem(water[0], **WATER_KWARGS)
    exported = reference_energy(system, water[1])
    potential = TorchPotential(trained.system, parameters=trained)
    positions, box = state_tensors(_state(trained.system, water[1]))
    assert potential(positions, box).item() == pytest.approx(exported, rel=1e-6)
    assert exported != pytest.approx(reference_energy(trained.system, water[1]), rel=1e-3)


def _state(system: openmm.System, positions) -> openmm.State:
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    return context.getState(getPositions=True)


def test_in_place_export_is_atomic(trained):
    source = trained.files[0]
    before = set(os.listdir(source.parent))
    (written,) = write_xml(trained)
    assert written == source
    assert set(os.listdir(source.parent)) == before  # no temporary file left behind
    assert source.read_text() == expected_text(TAGGED.read_text(), trained.values())


def test_line_endings_are_preserved(tmp_path, water):
    source = tmp_path / "crlf.xml"
    source.write_bytes(TAGGED.read_bytes().replace(b"\n", b"\r\n"))
    ps = ParameterSet.from_forcefield(source, water[0], **WATER_KWARGS)
    ps.set_values({"Atom/sigma/tip3p-O": 0.32294})
    (written,) = write_xml(ps, tmp_path / "out.xml")
    sigma = repr(ps.values()["Atom/sigma/tip3p-O"]).encode()
    assert written.read_bytes() == source.read_bytes().replace(b'"0.31507524065751241"',
                                                               b'"' + sigma + b'"')


def test_bundled_files_are_never_overwritten(tmp_path, water):
    ps = ParameterSet.select("tip3p.xml", water[0], [("NonbondedForce/Atom", "tip3p-O", "sigma")])
    ps.set_values({"Atom/sigma/tip3p-O": 0.32})
    with pytest.raises(InputError, match="tip3p.xml is one of OpenMM's bundled files and is "
                                         "not overwritten; pass a directory"):
        write_xml(ps)
    (written,) = write_xml(ps, tmp_path)
    sigma = repr(ps.values()["Atom/sigma/tip3p-O"])
    assert written.read_text() == ps.files[0].read_text().replace('"0.31507524065751241"',
                                                                  f'"{sigma}"')


def test_parameters_in_two_files(tmp_path, water):
    text = UNTAGGED.read_text()
    split = text.index(" <HarmonicBondForce>")
    (tmp_path / "templates.xml").write_text(text[:split] + "</ForceField>\n")
    (tmp_path / "forces.xml").write_text("<ForceField>\n" + text[split:])
    ps = ParameterSet.select([tmp_path / "templates.xml", tmp_path / "forces.xml"], water[0],
                             [("Residue/Atom", "tip3p-O", "charge"),
                              ("NonbondedForce/Atom", "tip3p-O", "sigma")], **WATER_KWARGS)
    ps.set_values({"Atom/charge/tip3p-O": -0.9, "Atom/sigma/tip3p-O": 0.32})
    with pytest.raises(InputError, match=r"parameters live in 2 files \(templates.xml, "
                                         r"forces.xml\) but .* is not a directory"):
        write_xml(ps, tmp_path / "single.xml")
    out = tmp_path / "out"
    out.mkdir()
    assert write_xml(ps, out) == [out / "templates.xml", out / "forces.xml"]
    again = ParameterSet.select([out / "templates.xml", out / "forces.xml"], water[0],
                                [("Residue/Atom", "tip3p-O", "charge"),
                                 ("NonbondedForce/Atom", "tip3p-O", "sigma")], **WATER_KWARGS)
    assert again.values() == ps.values()
    assert again.values() == pytest.approx({"Atom/charge/tip3p-O": -0.9,
                                            "Atom/sigma/tip3p-O": 0.32}, rel=1e-15)


def test_missing_destination_directory(trained, tmp_path):
    with pytest.raises(InputError, match="does not exist; create it first"):
        write_xml(trained, tmp_path / "nowhere" / "out.xml")


def test_selected_parameters_export_to_a_plain_openmm_file(tmp_path, water):
    """A selection made in Python adds no tags: the default export loads in plain OpenMM."""
    ps = ParameterSet.select(str(UNTAGGED), water[0], [("HarmonicBondForce/Bond", "OW.HW", "k")],
                             **WATER_KWARGS)
    ps.set_values({"Bond/k/OW.HW": 400000.5})
    (written,) = write_xml(ps, tmp_path)
    system = app.ForceField(str(written)).createSystem(water[0], **WATER_KWARGS)
    bonds = next(f for f in system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    assert bonds.getBondParameters(0)[3].value_in_unit(
        unit.kilojoule_per_mole / unit.nanometer**2) == ps.values()["Bond/k/OW.HW"]


def test_markup_around_values_is_located_by_position(tmp_path, water):
    """Comments that look like elements, single quotes and '>' inside values do not confuse the
    search for the value to rewrite."""
    text = UNTAGGED.read_text().replace(
        '<Atom type="tip3p-O" sigma="0.31507524065751241" epsilon="0.635968"/>',
        "<!-- <Atom type=\"tip3p-O\" sigma=\"0.31507524065751241\"/> -->\n"
        "  <Atom note='a > b' type='tip3p-O'\tsigma = '0.31507524065751241' epsilon=\"0.635968\""
        " parameterize='sigma'/>")
    source = tmp_path / "tricky.xml"
    source.write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + text)
    ps = ParameterSet.from_forcefield(source, water[0], **WATER_KWARGS)
    assert ps.values() == {"Atom/sigma/tip3p-O": 0.31507524065751241}
    ps.set_values({"Atom/sigma/tip3p-O": 0.33})
    (written,) = write_xml(ps, tmp_path / "out.xml")
    sigma = repr(ps.values()["Atom/sigma/tip3p-O"])
    assert written.read_text() == source.read_text().replace(
        "sigma = '0.31507524065751241'", f"sigma = '{sigma}'")


def test_path_ending_in_a_slash_is_a_directory_created_if_missing(trained, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    (written,) = write_xml(trained, "trained/")  # as in the README
    assert (tmp_path / "trained").is_dir()
    assert written == Path("trained") / trained.files[0].name
    assert (tmp_path / written).read_text() == trained.texts()[0]
    (nested,) = write_xml(trained, str(tmp_path / "a" / "b") + os.sep)
    assert nested == tmp_path / "a" / "b" / trained.files[0].name and nested.is_file()
