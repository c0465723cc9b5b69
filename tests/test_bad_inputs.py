"""Bad inputs, every command: exit 2, one line on stderr naming the problem, no traceback, no files.

Each case writes its inputs (configs, ForceField XML, PDB, checkpoints, target files: truncated,
of the wrong type, with NaN or negative values, missing, with tags in the wrong place) into a
temporary directory and runs the command in-process through :func:`openmm_reversible.cli.main`.
Every case fails before any dynamics, so the whole corpus runs in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_reversible.cli import main

DATA = Path(__file__).resolve().parent / "data"
TAGGED = DATA / "tip3p_flexible.xml"  # tags on a residue template's <Atom>: ParameterSet only
UNTAGGED = DATA / "tip3p_flexible_untagged.xml"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "water"
WATER_XML = EXAMPLE / "water_flexible.xml"  # tags in the force sections: loads in OpenMM too
HOH = '<Residue name="HOH">'
HOH_TAGGED = ('<Residue name="HOH" parameterize="O/charge" parameter_eval="H1/charge=-0.5*'
              "PARM['Residue/HOH/O/charge']; H2/charge=-0.5*PARM['Residue/HOH/O/charge']\">")
"""The charges of UNTAGGED's water template, tagged where OpenMM loads the file."""


@pytest.fixture(scope="module")
def water(tmp_path_factory):
    """16 TIP3P waters with a CRYST1 box: (topology, positions)."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=16,
                        neutralize=False)
    return modeller.topology, modeller.positions


def _pdb(path: Path, topology, positions) -> str:
    with open(path, "w") as handle:
        app.PDBFile.writeFile(topology, positions, handle)
    return str(path)


def _leucine(path: Path) -> str:
    """Three backbone atoms of a leucine residue: no water force field has a template for it."""
    topology = app.Topology()
    residue = topology.addResidue("LEU", topology.addChain())
    for name, element in (("N", "N"), ("CA", "C"), ("C", "C")):
        topology.addAtom(name, app.Element.getBySymbol(element), residue)
    return _pdb(path, topology, np.array([[0, 0, 0], [0.15, 0, 0], [0.3, 0.05, 0]])
                * unit.nanometer)


def _rdf(path: Path, rows: list[str]) -> str:
    path.write_text("# r (nm)  g(r)\n" + "\n".join(rows) + "\n")
    return str(path)


GOOD_RDF = [f"{0.2 + 0.01 * i:.3f} {1.0 + 0.1 * np.sin(i):.4f}" for i in range(30)]


def _config(path: Path, *, forcefield: Path = WATER_XML, structure: str = "water_box = 16",
            rdf: str | None = None, replace: tuple[str, str] | None = None) -> str:
    """A small, valid fitting config (16 flexible waters, one RDF and one ΔHvap target), with
    one textual change when ``replace`` is given."""
    rdf = rdf or _rdf(path.parent / "rdf.dat", GOOD_RDF)
    text = f"""
[forcefield]
files = ["{forcefield}"]
[structure]
{structure}
[system]
nonbonded_method = "ReactionField"
cutoff = 0.35
[simulation]
temperature = 295.15
timestep = 0.001
platform = "Reference"
[schedule]
epochs = 1
equilibration_steps = 2
bulk_steps = 2
window_steps = 4
snapshot_every = 2
[[targets]]
observable = "rdf"
atoms = ["O", "O"]
file = "{rdf}"
r_max = 0.35
[[targets]]
observable = "enthalpy_of_vaporization"
value = 44.0
"""
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    path.write_text(text)
    return str(path)


def _systems_config(path: Path, replace: tuple[str, str] | None = None) -> str:
    """The config of :func:`_config` as two ``[[systems]]`` (a box at two temperatures and a
    second box), with one textual change when ``replace`` is given."""
    text = Path(_config(path)).read_text()
    head, targets = text.split("[[targets]]", 1)
    head = head.replace("[structure]\nwater_box = 16\n", "").replace(
        "temperature = 295.15\n", "")
    system = head[head.index("[system]"):head.index("[simulation]")]
    head = head.replace(system, "")
    body = system.replace("[system]", "[systems.system]")
    tables = "[[systems.targets]]" + targets.replace("[[targets]]", "[[systems.targets]]")
    text = (head + '[[systems]]\nname = "liquid"\ntemperature = [280.0, 300.0]\n'
            "[systems.structure]\nwater_box = 16\n" + body + tables
            + '[[systems]]\nname = "small"\ntemperature = [300.0]\n'
            "[systems.structure]\nwater_box = 12\n" + body + tables)
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace, 1)
    path.write_text(text)
    return str(path)


def _system(path: Path, water) -> str:
    system = app.ForceField(str(UNTAGGED)).createSystem(water[0], nonbondedMethod=app.NoCutoff)
    path.write_text(openmm.XmlSerializer.serialize(system))
    return str(path)


def _checkpoint(path: Path, content) -> str:
    torch.save(content, path)
    return str(path)


def _truncated(path: Path, source: Path | str, fraction: float = 0.5, *,
               after: str | None = None) -> str:
    """``source`` cut at ``fraction`` of its length, or just after the first ``after`` (a cut
    that does not depend on how long the paths written into the file are)."""
    data = Path(source).read_bytes()
    cut = int(len(data) * fraction) if after is None else data.index(after.encode()) + len(after)
    path.write_bytes(data[:cut])
    return str(path)


def _nan_pdb(path: Path, water) -> str:
    lines = Path(_pdb(path, *water)).read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(("ATOM", "HETATM")))
    lines[first] = lines[first][:30] + f"{'nan':>8}" + lines[first][38:]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _no_box_pdb(path: Path, water) -> str:
    lines = Path(_pdb(path, *water)).read_text().splitlines()
    path.write_text("\n".join(line for line in lines if not line.startswith("CRYST1")) + "\n")
    return str(path)


def _cut_pdb(path: Path, water) -> str:
    """The water PDB cut off after its first atom (a water without hydrogens)."""
    lines = Path(_pdb(path, *water)).read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(("ATOM", "HETATM")))
    path.write_text("\n".join(lines[:first + 1]) + "\n")
    return str(path)


def _fit_dir(path: Path, checkpoint) -> str:
    path.mkdir()
    checkpoint(path / "checkpoint.pt")
    return str(path)


def _real_checkpoint(path: Path) -> None:
    """A checkpoint with every entry the trainer writes, for a different force field."""
    torch.save({"version": 1, "epoch": 1, "sites": ["Atom/sigma/X"], "scaled": torch.ones(1),
                "optimizer": {}, "records": [], "state": {}, "config": {}}, path)


def _with(path: Path, source: Path, old: str, new: str) -> str:
    text = source.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return str(path)


# (id, argv builder (input dir, output dir, water) -> argv, fragments of the stderr line)
Case = tuple[str, Callable[[Path, Path, tuple], list[str]], tuple[str, ...]]
CASES: list[Case] = [
    # verify SYSTEM.xml COORDS
    ("verify-missing-system",
     lambda d, o, w: ["verify", str(d / "none.xml"), _pdb(d / "w.pdb", *w)], ("no such file",)),
    ("verify-truncated-system",
     lambda d, o, w: ["verify", _truncated(d / "t.xml", _system(d / "s.xml", w)),
                      _pdb(d / "w.pdb", *w)], ("t.xml is not a serialized OpenMM System",)),
    ("verify-binary-system",
     lambda d, o, w: ["verify", _checkpoint(d / "s.xml", {"a": 1}), _pdb(d / "w.pdb", *w)],
     ("is not a serialized OpenMM System",)),
    ("verify-garbage-pdb",
     lambda d, o, w: ["verify", _system(d / "s.xml", w), _rdf(d / "g.pdb", ["hello world"])],
     ("g.pdb: not a readable PDB file",)),
    ("verify-empty-pdb",
     lambda d, o, w: ["verify", _system(d / "s.xml", w), _rdf(d / "e.pdb", [])],
     ("e.pdb: not a readable PDB file",)),
    ("verify-nan-coordinates",
     lambda d, o, w: ["verify", _system(d / "s.xml", w), _nan_pdb(d / "n.pdb", w)],
     ("n.pdb: atom 1 has a non-finite coordinate",)),
    ("verify-truncated-state",
     lambda d, o, w: ["verify", _system(d / "s.xml", w),
                      _truncated(d / "state.xml", _system(d / "x.xml", w), 0.2)],
     ("must be a PDB/PDBx file or a serialized OpenMM State",)),
    ("verify-wrong-atom-count",
     lambda d, o, w: ["verify", _system(d / "s.xml", w), _leucine(d / "leu.pdb")],
     ("has 3 atoms but the System has 48",)),
    ("verify-unknown-platform",
     lambda d, o, w: ["verify", _system(d / "s.xml", w), _pdb(d / "w.pdb", *w),
                      "--platform", "Abacus"], ("unknown platform 'Abacus'",)),
    # gradcheck --forcefield FF.xml --pdb X.pdb --steps N
    ("gradcheck-missing-forcefield",
     lambda d, o, w: ["gradcheck", "--forcefield", str(d / "none.xml"), "--pdb",
                      _pdb(d / "w.pdb", *w), "--steps", "2"], ("none.xml", "not found")),
    ("gradcheck-truncated-forcefield",
     lambda d, o, w: ["gradcheck", "--forcefield", _truncated(d / "ff.xml", TAGGED), "--pdb",
                      _pdb(d / "w.pdb", *w), "--steps", "2"], ("ff.xml: not well-formed XML",)),
    ("gradcheck-unmatched-residue",
     lambda d, o, w: ["gradcheck", "--forcefield", str(TAGGED), "--pdb", _leucine(d / "leu.pdb"),
                      "--steps", "2"],
     ("leu.pdb: residue 0 (LEU) matches no residue template of", "tip3p_flexible.xml",
      "add", "hydrogens")),
    ("gradcheck-truncated-pdb",  # the file ends after the first oxygen
     lambda d, o, w: ["gradcheck", "--forcefield", str(TAGGED), "--pdb",
                      _cut_pdb(d / "cut.pdb", w), "--steps", "2", "--nonbonded-method",
                      "NoCutoff"],
     ("cut.pdb: residue 0 (HOH) matches no residue template",)),
    ("gradcheck-garbage-pdb",
     lambda d, o, w: ["gradcheck", "--forcefield", str(TAGGED), "--pdb",
                      _rdf(d / "g.pdb", ["ATOM      1  O   HOH"]), "--steps", "2"],
     ("g.pdb: not a readable PDB file",)),
    ("gradcheck-missing-pdb",
     lambda d, o, w: ["gradcheck", "--forcefield", str(TAGGED), "--pdb", str(d / "none.pdb"),
                      "--steps", "2"], ("none.pdb: no such structure file",)),
    ("gradcheck-zero-steps",
     lambda d, o, w: ["gradcheck", "--forcefield", str(TAGGED), "--pdb", _pdb(d / "w.pdb", *w),
                      "--steps", "0"], ("--steps must be >= 1, got 0",)),
    ("gradcheck-negative-timestep",
     lambda d, o, w: ["gradcheck", "--forcefield", str(TAGGED), "--pdb", _pdb(d / "w.pdb", *w),
                      "--steps", "2", "--timestep=-0.001"], ("--timestep must be > 0",)),
    ("gradcheck-tag-names-missing-attribute",
     lambda d, o, w: ["gradcheck", "--forcefield",
                      _with(d / "ff.xml", TAGGED, 'parameterize="sigma, epsilon"',
                            'parameterize="sigmaa"'),
                      "--pdb", _pdb(d / "w.pdb", *w), "--steps", "2"], ("'sigmaa'",)),
    ("gradcheck-untagged-forcefield",
     lambda d, o, w: ["gradcheck", "--forcefield", str(UNTAGGED), "--pdb",
                      _pdb(d / "w.pdb", *w), "--steps", "2"], ("no parameters to train",)),
    ("gradcheck-residue-tag-names-unknown-atom",
     lambda d, o, w: ["gradcheck", "--forcefield",
                      _with(d / "ff.xml", UNTAGGED, HOH,
                            '<Residue name="HOH" parameterize="OW/charge">'),
                      "--pdb", _pdb(d / "w.pdb", *w), "--steps", "2"],
     ("ff.xml:9: parameterize names 'OW/charge' on <Residue name=\"HOH\">, but it has no "
      "<Atom name=\"OW\">; its atoms are O, H1, H2",)),
    ("gradcheck-residue-key-of-unknown-residue",
     lambda d, o, w: ["gradcheck", "--forcefield",
                      _with(d / "ff.xml", UNTAGGED, HOH, HOH_TAGGED.replace(
                          "H1/charge=-0.5*PARM['Residue/HOH", "H1/charge=-0.5*PARM['Residue/WAT")),
                      "--pdb", _pdb(d / "w.pdb", *w), "--steps", "2"],
     ("PARM['Residue/WAT/O/charge'] is not a site; the files have no <Residue name=\"WAT\">; "
      "identifiers at Residue: HOH",)),
    ("gradcheck-residue-key-without-residue-charges",
     lambda d, o, w: ["gradcheck", "--forcefield",
                      _with(d / "ff.xml", WATER_XML, HOH,
                            '<Residue name="HOH" parameterize="O/charge">'),
                      "--pdb", _pdb(d / "w.pdb", *w), "--steps", "2"],
     ("parameterize names 'O/charge' on <Residue name=\"HOH\">, but its <Atom name=\"O\" "
      "type=\"tip3p-O\"> has no charge: this force field keeps no parameters on residue "
      "templates' atoms; tag charge where its force defines it (parameterize=\"charge\" on the "
      "force's <Atom type=\"tip3p-O\">, key 'Atom/charge/tip3p-O')",)),
    ("gradcheck-conserve-charge-without-tagged-charges",
     lambda d, o, w: ["gradcheck", "--forcefield",
                      _with(d / "ff.xml", UNTAGGED, HOH,
                            '<Residue name="HOH" conserve_charge="true">'),
                      "--pdb", _pdb(d / "w.pdb", *w), "--steps", "2"],
     ("conserve_charge on <Residue name=\"HOH\">, but none of its charges is a parameter",)),
    ("gradcheck-pme-without-box",
     lambda d, o, w: ["gradcheck", "--forcefield", str(TAGGED), "--pdb",
                      _no_box_pdb(d / "nobox.pdb", w), "--steps", "2", "--nonbonded-method",
                      "PME"], ("needs a periodic box", "nobox.pdb")),
    # fit CONFIG.toml
    ("fit-missing-config",
     lambda d, o, w: ["fit", str(d / "none.toml"), "--output", str(o)], ("does not exist",)),
    ("fit-truncated-config",
     lambda d, o, w: ["fit", _truncated(d / "t.toml", _config(d / "c.toml"), after='files = ["/'),
                      "--output", str(o)], ("not valid TOML",)),
    ("fit-wrong-type",
     lambda d, o, w: ["fit", _config(d / "c.toml", replace=("epochs = 1", 'epochs = "one"')),
                      "--output", str(o)], ("schedule.epochs: expected int",)),
    ("fit-nan-value",
     lambda d, o, w: ["fit", _config(d / "c.toml", replace=("temperature = 295.15",
                                                            "temperature = nan")),
                      "--output", str(o)], ("simulation.temperature = nan: must be a finite",)),
    ("fit-negative-value",
     lambda d, o, w: ["fit", _config(d / "c.toml", replace=("timestep = 0.001",
                                                            "timestep = -0.001")),
                      "--output", str(o)], ("simulation.timestep = -0.001: must be > 0",)),
    ("fit-unknown-key",
     lambda d, o, w: ["fit", _config(d / "c.toml", replace=("epochs = 1", "epocs = 1")),
                      "--output", str(o)], ("did you mean 'epochs'",)),
    ("fit-table-in-the-wrong-place",
     lambda d, o, w: ["fit", _config(d / "c.toml", replace=(
         'platform = "Reference"\n[schedule]\n', '[schedule]\nplatform = "Reference"\n')),
         "--output", str(o)], ("schedule.platform: unknown key; it belongs in [simulation]",)),
    ("fit-missing-target-file",
     lambda d, o, w: ["fit", _config(d / "c.toml", rdf=str(d / "none.dat")), "--output",
                      str(o)], ("targets[0].file", "none.dat does not exist")),
    ("fit-target-nan",
     lambda d, o, w: ["fit", _config(d / "c.toml", rdf=_rdf(d / "nan.dat",
                                                            GOOD_RDF[:5] + ["0.25 nan"])),
                      "--output", str(o)], ("nan.dat: non-finite r or g in data row",)),
    ("fit-target-negative",
     lambda d, o, w: ["fit", _config(d / "c.toml", rdf=_rdf(
         d / "neg.dat", GOOD_RDF[:3] + ["0.230 -0.5"] + GOOD_RDF[4:])),
         "--output", str(o)], ("neg.dat has a negative g in data row 4",)),
    ("fit-target-not-numbers",
     lambda d, o, w: ["fit", _config(d / "c.toml", rdf=_rdf(d / "txt.dat", ["r g", "a b"])),
                      "--output", str(o)], ("txt.dat: no numeric rows",)),
    ("fit-target-truncated",
     lambda d, o, w: ["fit", _config(d / "c.toml", rdf=_rdf(d / "short.dat", GOOD_RDF[:2])),
                      "--output", str(o)], ("short.dat: needs >= 3 rows",)),
    ("fit-garbage-pdb",
     lambda d, o, w: ["fit", _config(d / "c.toml", structure=f'pdb = "{_rdf(d / "g.pdb", ["x"])}"'),
                      "--output", str(o)], ("g.pdb: not a readable PDB file",)),
    ("fit-unmatched-residue",
     lambda d, o, w: ["fit", _config(d / "c.toml",
                                     structure=f'pdb = "{_leucine(d / "leu.pdb")}"'),
                      "--output", str(o)],
     ("leu.pdb: residue 0 (LEU) matches no residue template of", "water_flexible.xml")),
    ("fit-periodic-method-without-box",
     lambda d, o, w: ["fit", _config(d / "c.toml",
                                     structure=f'pdb = "{_no_box_pdb(d / "nobox.pdb", w)}"'),
                      "--output", str(o)], ("nobox.pdb has no periodic box",)),
    ("fit-truncated-forcefield",
     lambda d, o, w: ["fit", _config(d / "c.toml", forcefield=Path(
         _truncated(d / "ff.xml", WATER_XML))), "--output", str(o)],
     ("forcefield.files: OpenMM cannot load",)),
    ("fit-tag-on-residue-template-atom",
     lambda d, o, w: ["fit", _config(d / "c.toml", forcefield=TAGGED), "--output", str(o)],
     ('parameterize="charge" on <Atom name="O" type="tip3p-O"> of <Residue name="HOH">',
      "could not convert string to float", "Tag the value where the force defines it")),
    ("fit-residue-key-without-residue-charges",
     lambda d, o, w: ["fit", _config(d / "c.toml", forcefield=Path(_with(
         d / "ff.xml", WATER_XML, HOH, '<Residue name="HOH" parameterize="H1/charge">'))),
         "--output", str(o)],
     ("parameterize names 'H1/charge' on <Residue name=\"HOH\">", "has no charge",
      "key 'Atom/charge/tip3p-H'")),
    ("fit-prior-on-unknown-residue-key",
     lambda d, o, w: ["fit", _config(d / "c.toml", forcefield=Path(_with(
         d / "ff.xml", UNTAGGED, HOH, HOH_TAGGED)), replace=(
         "[simulation]", '[[parameters]]\nkey = "Residue/WAT/O/charge"\nprior_width = 0.1\n'
                         "[simulation]")), "--output", str(o)],
     ("parameters[key='Residue/WAT/O/charge']: no trainable parameter has this key; did you "
      "mean 'Residue/HOH/O/charge'?",)),
    ("fit-resume-truncated-checkpoint",
     lambda d, o, w: ["fit", _config(d / "c.toml"), "--resume", "--output", _fit_dir(
         o, lambda p: _truncated(p, _checkpoint(d / "full.pt", {"version": 1}), 0.5))],
     ("checkpoint.pt: not a readable checkpoint",)),
    ("fit-resume-foreign-checkpoint",
     lambda d, o, w: ["fit", _config(d / "c.toml"), "--resume", "--output",
                      _fit_dir(o, lambda p: _checkpoint(p, [1, 2, 3]))],
     ("not a checkpoint of `openmm-reversible fit`",)),
    ("fit-systems-negative-temperature",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "temperature = [280.0, 300.0]", "temperature = [280.0, -300.0]")), "--output", str(o)],
     ("systems[0].temperature = [280.0, -300.0]: each entry must be a finite number > 0",)),
    ("fit-systems-pressure-count",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "temperature = [280.0, 300.0]", "temperature = [280.0, 300.0]\npressure = [1, 1, 1]")),
         "--output", str(o)], ("systems[0].pressure: 3 pressures for 2 temperatures",)),
    ("fit-systems-target-selects-nothing",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "value = 44.0", "value = 44.0\ntemperature = 310.0")), "--output", str(o)],
     ("systems[0].targets[1].temperature = 310.0: matches none of the system's state points",)),
    ("fit-systems-unknown-key",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         'name = "small"', 'name = "small"\ntemprature = [300.0]')), "--output", str(o)],
     ("systems[1].temprature: unknown key; did you mean 'temperature'?",)),
    ("fit-systems-bad-target",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "value = 44.0", "value = -44.0")), "--output", str(o)],
     ("systems[0].targets[1].value = -44.0: an enthalpy of vaporization",)),
    ("fit-systems-with-top-level-structure",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "[[systems]]", "[structure]\nwater_box = 16\n[[systems]]")), "--output", str(o)],
     ("structure: with [[systems]], each system gives its own [systems.structure]",)),
    ("fit-systems-unmatched-residue",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "[systems.structure]\nwater_box = 12", f'[systems.structure]\npdb = '
         f'"{_leucine(d / "leu.pdb")}"')), "--output", str(o)],
     ("error: small 300 K: ", "leu.pdb: residue 0 (LEU) matches no residue template of")),
    ("fit-systems-missing-name",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=('name = "small"\n', "")),
                      "--output", str(o)],
     ("systems[1].name: required key is missing (a label for logs and plots",)),
    ("fit-systems-name-with-slash",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         'name = "small"', 'name = "sm/all"')), "--output", str(o)],
     ("systems[1].name: expected a non-empty label without '/', got 'sm/all'",)),
    ("fit-systems-duplicate-name",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         'name = "small"', 'name = "liquid"')), "--output", str(o)],
     ("systems[1].name = 'liquid': another system has this name; give each a distinct name",)),
    ("fit-systems-temperature-not-numbers",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "temperature = [300.0]", 'temperature = ["hot"]')), "--output", str(o)],
     ("systems[1].temperature: expected a list of numbers (K), got ['hot']",)),
    ("fit-systems-state-point-twice",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "temperature = [280.0, 300.0]", "temperature = [300.0, 300.0]")), "--output", str(o)],
     ("systems[0]: a state point is listed twice in temperature/pressure",)),
    ("fit-systems-zero-pressure",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "temperature = [280.0, 300.0]", "temperature = [280.0, 300.0]\npressure = [0.0]")),
         "--output", str(o)],
     ("systems[0].pressure = [0.0]: each entry must be a finite number > 0 (bar)",)),
    ("fit-systems-density-without-pressure",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "value = 44.0", 'value = 44.0\n[[systems.targets]]\nobservable = "density"\n'
         "value = 1.0")), "--output", str(o)],
     ("systems[0].targets[2]: a density target needs NPT sampling; set systems[0].pressure",)),
    ("fit-systems-temperature-in-simulation",
     lambda d, o, w: ["fit", _systems_config(d / "c.toml", replace=(
         "[simulation]\n", "[simulation]\ntemperature = 300.0\n")), "--output", str(o)],
     ("simulation.temperature: with [[systems]], each system lists its state points",)),
    ("fit-zero-epochs",
     lambda d, o, w: ["fit", _config(d / "c.toml"), "--epochs", "0", "--output", str(o)],
     ("--epochs must be >= 1",)),
    # export CONFIG.toml --from FIT_DIR --output DIR
    ("export-no-checkpoint",
     lambda d, o, w: ["export", _config(d / "c.toml"), "--from", str(d), "--output", str(o)],
     ("no checkpoint at", "pass the output directory")),
    ("export-truncated-checkpoint",
     lambda d, o, w: ["export", _config(d / "c.toml"), "--from", _fit_dir(
         d / "fit", lambda p: _truncated(p, _checkpoint(d / "full.pt", {"version": 1}), 0.6)),
         "--output", str(o)], ("not a readable checkpoint",)),
    ("export-checkpoint-without-entries",
     lambda d, o, w: ["export", _config(d / "c.toml"), "--from", _fit_dir(
         d / "fit", lambda p: _checkpoint(p, {"version": 1, "sites": []})),
         "--output", str(o)], ("checkpoint lacks epoch, scaled",)),
    ("export-checkpoint-of-another-force-field",
     lambda d, o, w: ["export", _config(d / "c.toml"), "--from",
                      _fit_dir(d / "fit", _real_checkpoint), "--output", str(o)],
     ("holds parameters ['Atom/sigma/X']", "pass the config the fit used")),
    ("export-bad-config",
     lambda d, o, w: ["export", _config(d / "c.toml", replace=("cutoff = 0.35", "cutoff = 0")),
                      "--from", str(d), "--output", str(o)], ("system.cutoff = 0.0",)),
    # validate TRAINED.xml --config CONFIG.toml
    ("validate-missing-trained",
     lambda d, o, w: ["validate", str(d / "water_flexible.xml"), "--config",
                      _config(d / "c.toml"), "--output", str(o)], ("does not exist",)),
    ("validate-truncated-trained",
     lambda d, o, w: ["validate", _truncated(d / "water_flexible.xml", WATER_XML), "--config",
                      _config(d / "c.toml"), "--output", str(o)],
     ("water_flexible.xml: not well-formed XML",)),
    ("validate-trained-of-another-fit",
     lambda d, o, w: ["validate", str(TAGGED), "--config", _config(d / "c.toml"), "--output",
                      str(o)], ("tip3p_flexible.xml matches none of the config's",)),
    ("validate-zero-steps",
     lambda d, o, w: ["validate", str(WATER_XML), "--config", _config(d / "c.toml"),
                      "--steps", "0", "--output", str(o)], ("--steps 0: must be >= 1",)),
    ("validate-output-is-a-file",
     lambda d, o, w: ["validate", str(WATER_XML), "--config", _config(d / "c.toml"),
                      "--output", _rdf(d / "file", [])], ("is a file, not a directory",)),
    # benchmark NAME
    ("benchmark-gradient-zero-steps",
     lambda d, o, w: ["benchmark", "gradient", "--steps", "0"], ("--steps must be >= 1",)),
    ("benchmark-gradient-cutoff-beyond-half-box",
     lambda d, o, w: ["benchmark", "gradient", "--waters", "16", "--cutoff", "2", "--steps", "2"],
     ("--cutoff 2.0 nm: not below half the box width",)),
    ("benchmark-memory-zero-snapshots",
     lambda d, o, w: ["benchmark", "memory", "--snapshots", "0"], ("--snapshots must be >= 1",)),
    ("benchmark-memory-short-longer-than-long",
     lambda d, o, w: ["benchmark", "memory", "--short-steps", "10", "--long-steps", "5"],
     ("need 1 <= --short-steps <= --long-steps",)),
    ("benchmark-forces-zero-repeats",
     lambda d, o, w: ["benchmark", "forces", "--repeats", "0"], ("--repeats must be >= 1",)),
    ("benchmark-epoch-zero-windows",
     lambda d, o, w: ["benchmark", "epoch", "--config", _config(d / "c.toml"), "--windows",
                      "0"], ("--windows must be >= 1",)),
    ("benchmark-epoch-waters-without-a-water-box",
     lambda d, o, w: ["benchmark", "epoch", "--config",
                      _config(d / "c.toml", structure=f'pdb = "{_pdb(d / "w.pdb", *w)}"'),
                      "--waters", "30"],
     ("--waters 30: the structure of", "not a water box; drop --waters")),
    ("benchmark-exact-one-step",
     lambda d, o, w: ["benchmark", "exact", "--steps", "1"], ("--steps must be >= 2",)),
    # demo
    ("demo-zero-epochs",
     lambda d, o, w: ["demo", "--epochs", "0", "--output", str(o)], ("--epochs must be >= 1",)),
]


def _files(root: Path) -> set[Path]:
    return {Path(dirpath) / name for dirpath, dirs, names in os.walk(root)
            for name in dirs + names}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, water, tmp_path, capsys):
    name, argv, fragments = case
    inputs = tmp_path / "in"
    inputs.mkdir()
    args = argv(inputs, tmp_path / "out", water)
    before = _files(tmp_path)
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"openmm-reversible {args[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _files(tmp_path) == before, "the failed command wrote files"


def test_internal_error_is_one_line_and_debug_adds_the_traceback(tmp_path, capsys,
                                                                 monkeypatch):
    import openmm_reversible.verify as verify_module

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nwith a second line")

    monkeypatch.setattr(verify_module, "load_system", broken)
    argv = ["verify", str(tmp_path / "s.xml"), str(tmp_path / "c.pdb")]
    assert main(argv) == 3
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines == ["openmm-reversible verify: internal error: RuntimeError: something inside "
                     "broke with a second line (rerun with --debug for the traceback, and "
                     "please report it)"]
    assert "Traceback" not in out + err
    assert main(["--debug", *argv]) == 3
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "RuntimeError: something inside broke" in err
    assert err.strip().splitlines()[-1] == lines[0]
    assert main([*argv, "--debug"]) == 3  # also accepted after the command
    assert capsys.readouterr().err.startswith("Traceback")


def test_failed_export_leaves_no_partial_files(tmp_path, monkeypatch):
    """write_xml writes nothing unless every file is written (atomic as a group)."""
    from openmm_reversible import files

    calls = []
    real = files.text_writer

    def failing_second(text):
        write = real(text)

        def maybe_fail(temporary):
            calls.append(temporary)
            if len(calls) == 2:
                raise OSError("disk full")
            write(temporary)
        return maybe_fail

    monkeypatch.setattr(files, "text_writer", failing_second)
    targets = [(tmp_path / "a.xml", files.text_writer("a")),
               (tmp_path / "b.xml", files.text_writer("b"))]
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_all(targets)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), files.output_directory(tmp_path / "x" / "y"):
        raise RuntimeError("failed inside")
    assert list(tmp_path.iterdir()) == []
