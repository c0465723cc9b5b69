"""The fitting config: every bad key or value is an InputError that names it, before any work."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest

from openmm_reversible.commands import fit as fit_cli
from openmm_reversible.config import config_from_dict, load_config, to_dict
from openmm_reversible.errors import InputError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "water"


@pytest.fixture
def base(tmp_path):
    """A minimal valid config (as a dict) and its directory."""
    (tmp_path / "rdf.dat").write_text("0.005 0.0\n0.015 0.5\n0.025 1.0\n0.035 1.0\n")
    data = {
        "forcefield": {"files": [str(EXAMPLE / "water_flexible.xml")]},
        "structure": {"water_box": 30},
        "system": {"cutoff": 0.45},
        "simulation": {"temperature": 295.15, "pressure": 1.0},
        "schedule": {"epochs": 2, "window_steps": 20, "snapshot_every": 5},
        "targets": [{"observable": "rdf", "atoms": ["O", "O"], "file": "rdf.dat"},
                    {"observable": "enthalpy_of_vaporization", "value": 44.0}],
    }
    return data, tmp_path


def _error(data, where) -> str:
    with pytest.raises(InputError) as info:
        config_from_dict(data, where)
    return str(info.value)


def test_example_config_loads():
    config = load_config(EXAMPLE / "water.toml")
    assert config.structure.water_box == 216
    assert config.system.nonbonded_method == "ReactionField"
    assert config.simulation.temperature == 295.15
    assert [t.label for t in config.targets] == ["rdf_OO", "rdf_OH",
                                                "enthalpy_of_vaporization", "density"]
    assert Path(config.targets[0].file).is_file()
    assert Path(config.forcefield.files[0]).is_absolute()
    assert to_dict(config)["schedule"]["epochs"] == config.schedule.epochs


def test_defaults_and_paths(base):
    data, where = base
    config = config_from_dict(data, where)
    assert config.schedule.optimizer == "adam"
    assert config.system.reaction_field_dielectric == 78.3
    assert config.failure.action == "renoise"
    assert config.targets[0].file == str(where / "rdf.dat")
    assert isinstance(config.simulation.temperature, float)


@pytest.mark.parametrize("section, key, value, expected", [
    ("schedule", "epocs", 3, "schedule.epocs: unknown key; did you mean 'epochs'?"),
    ("simulation", "temprature", 300.0, "simulation.temprature: unknown key; did you mean "
                                        "'temperature'?"),
    ("system", "zzz", 1, "system.zzz: unknown key; known keys:"),
])
def test_unknown_keys_are_named(base, section, key, value, expected):
    data, where = base
    data[section][key] = value
    assert expected in _error(data, where)


def test_unknown_section(base):
    data, where = base
    data["schedul"] = {}
    assert "schedul: unknown key; did you mean 'schedule'?" in _error(data, where)


@pytest.mark.parametrize("section, key, value, expected", [
    ("simulation", "timestep", -0.001, "simulation.timestep = -0.001: must be > 0"),
    ("simulation", "temperature", "300", "simulation.temperature: expected float, got '300'"),
    ("schedule", "epochs", 1.5, "schedule.epochs: expected int"),
    ("schedule", "epochs", 0, "schedule.epochs = 0: must be > 0"),
    ("schedule", "optimizer", "lbfgs", "schedule.optimizer = 'lbfgs': must be one of adam, sgd"),
    ("system", "nonbonded_method", "RF", "system.nonbonded_method = 'RF': must be one of"),
    ("system", "rigid_water", 1, "system.rigid_water: expected bool"),
    ("failure", "lr_factor", 1.5, "failure.lr_factor = 1.5: must be in (0, 1)"),
    ("schedule", "lr_decay", 0.0, "schedule.lr_decay = 0.0: must be in (0, 1]"),
    ("simulation", "platform", "TPU", "simulation.platform = 'TPU': must be one of"),
])
def test_impossible_values_are_named(base, section, key, value, expected):
    data, where = base
    data.setdefault(section, {})[key] = value
    assert expected in _error(data, where)


def test_cross_checks(base):
    data, where = base
    d = copy.deepcopy(data)
    d["schedule"]["window_steps"] = 12
    assert "schedule.window_steps = 12: must be a multiple of schedule.snapshot_every" in \
        _error(d, where)
    d = copy.deepcopy(data)
    d["structure"]["pdb"] = "x.pdb"
    assert "give exactly one of 'pdb'" in _error(d, where)
    d = copy.deepcopy(data)
    del d["simulation"]["pressure"]
    d["targets"].append({"observable": "density", "value": 0.997})
    assert "targets[2]: a density target needs NPT sampling; set simulation.pressure" in \
        _error(d, where)
    d = copy.deepcopy(data)
    del d["simulation"]["temperature"]
    assert "simulation.temperature: required key is missing" in _error(d, where)
    d = copy.deepcopy(data)
    del d["schedule"]
    assert "schedule: required table [schedule] is missing" in _error(d, where)


def test_target_checks(base):
    data, where = base
    cases = [
        ({"observable": "rdf", "atoms": ["O"], "file": "rdf.dat"}, "targets[0].atoms"),
        ({"observable": "rdf", "atoms": ["O", "H"], "file": "missing.dat"},
         "targets[0].file: " + str(where / "missing.dat") + " does not exist"),
        ({"observable": "rdf", "atoms": ["O", "H"], "file": "rdf.dat", "value": 1.0},
         "targets[0].value: an rdf target takes its target from 'file'"),
        ({"observable": "enthalpy_of_vaporization"},
         "targets[0].value: a enthalpy_of_vaporization target needs a value in kJ/mol"),
        ({"observable": "enthalpy_of_vaporization", "value": -44.0},
         "targets[0].value = -44.0: an enthalpy of vaporization is the energy taken up by "
         "vaporising, > 0 in kJ/mol (water: 44.0 at 298 K); check the sign and the unit"),
        ({"observable": "enthalpy_of_vaporization", "value": 0.0},
         "targets[0].value = 0.0: an enthalpy of vaporization is the energy taken up"),
        ({"observable": "viscosity", "value": 1.0}, "targets[0].observable = 'viscosity'"),
        ({"observable": "pressure", "value": 1.0, "atoms": ["O", "O"]},
         "targets[0].atoms: only rdf targets take 'atoms'"),
    ]
    for target, expected in cases:
        d = copy.deepcopy(data)
        d["targets"] = [target]
        assert expected in _error(d, where), target
    (where / "bad.dat").write_text("0.0 1.0\n0.02 1.0\n0.01 1.0\n")
    d = copy.deepcopy(data)
    d["targets"] = [{"observable": "rdf", "atoms": ["O", "O"], "file": "bad.dat"}]
    assert "r (column 1) must increase strictly, but data row 3 has r = 0.01 after 0.02" \
        in _error(d, where)
    d = copy.deepcopy(data)
    d["targets"] = []
    assert "targets: give at least one [[targets]] table" in _error(d, where)
    d = copy.deepcopy(data)
    d["targets"].append({"observable": "enthalpy_of_vaporization", "value": 43.0})
    assert "duplicate target 'enthalpy_of_vaporization'" in _error(d, where)


@pytest.mark.parametrize("key, value", [("rigid_water", True), ("constraints", "HBonds")])
def test_constraints_are_accepted(base, key, value):
    """The reversible windows integrate constraints: rigid and HBonds configs load."""
    data, where = base
    data["system"][key] = value
    config = config_from_dict(data, where)
    assert getattr(config.system, key) == value


def test_parameter_rules(base):
    data, where = base
    data["parameters"] = [{"key": "Atom/sigma/tip3p-O", "prior_width": 0.01, "lower": 0.3},
                          {"key": "Bond/k/OW.HW", "frozen": True}]
    config = config_from_dict(data, where)
    assert config.parameters[0].prior_width == 0.01 and config.parameters[1].frozen
    data["parameters"] = [{"key": "Atom/sigma/tip3p-O", "prior_widht": 0.01}]
    assert _error(data, where) == ("parameters[0].prior_widht: unknown key; did you mean "
                                   "'prior_width'?")
    data["parameters"] = {"key": "x"}
    assert _error(data, where).startswith("parameters: give [[parameters]] tables")


def test_missing_forcefield_file(base):
    data, where = base
    data["forcefield"]["files"] = ["nope.xml"]
    assert "forcefield.files[0]: file 'nope.xml' not found" in _error(data, where)
    data["forcefield"]["files"] = ["amber14/tip3p.xml"]  # OpenMM's bundled files are found
    assert config_from_dict(data, where).forcefield.files == ["amber14/tip3p.xml"]


def test_forcefield_override_replaces_the_configs_files(tmp_path, monkeypatch):
    """``fit --forcefield XML``: the same config with another force field; the path is the
    working directory's, and a missing one is named by its option."""
    paper = EXAMPLE.parent / "paper"
    monkeypatch.chdir(paper)
    config = load_config(paper / "water_lj_reduced.toml", ["forcefields/buckingham.xml"])
    assert config.forcefield.files == [str(paper / "forcefields" / "buckingham.xml")]
    assert config.schedule == load_config(paper / "water_lj_reduced.toml").schedule
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="--forcefield forcefields/buckingham.xml: file "):
        load_config(paper / "water_lj_reduced.toml", ["forcefields/buckingham.xml"])
    parser = argparse.ArgumentParser()
    fit_cli.add_arguments(parser)
    args = parser.parse_args(["c.toml", "--forcefield", "a.xml", "--forcefield", "b.xml"])
    assert args.forcefield == ["a.xml", "b.xml"]


def test_bad_toml_and_missing_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[schedule\nepochs = 2\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "none.toml")


def test_bad_config_writes_nothing(tmp_path):
    text = (EXAMPLE / "water.toml").read_text().replace("epochs = ", "epocs = ")
    config = tmp_path / "water.toml"
    config.write_text(text.replace('"water_flexible.xml"',
                                   f'"{EXAMPLE / "water_flexible.xml"}"')
                      .replace('"targets/', f'"{EXAMPLE}/targets/'))
    parser = argparse.ArgumentParser()
    fit_cli.add_arguments(parser)
    args = parser.parse_args([str(config), "--output", str(tmp_path / "out")])
    with pytest.raises(InputError, match="schedule.epocs: unknown key; did you mean 'epochs'"):
        fit_cli.run(args)
    assert not (tmp_path / "out").exists()


def test_toml_reader_is_declared_for_every_supported_python():
    """``tomllib`` from Python 3.11, ``tomli`` before: both the package metadata and the
    pinned environment declare it for the Pythons ``requires-python`` allows."""
    import importlib.util
    import sys
    from pathlib import Path

    import tomllib

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert 'tomli>=1.1; python_version<"3.11"' in project["dependencies"]
    assert 'tomli==2.5.0 ; python_version < "3.11"' in \
        (root / "requirements.lock").read_text().splitlines()
    # On Python 3.10 (no tomllib) the config module falls back to tomli.
    spec = importlib.util.spec_from_file_location("openmm_reversible._config_py310",
                                                  root / "openmm_reversible" / "config.py")
    module = importlib.util.module_from_spec(spec)
    saved = {name: sys.modules.get(name) for name in ("tomllib", "tomli", spec.name)}
    sys.modules["tomllib"], sys.modules["tomli"] = None, tomllib
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    assert module.tomllib is tomllib


@pytest.fixture
def systems(base):
    """A valid [[systems]] config: a liquid at two state points and a second, NVT box."""
    data, where = base
    shared = {k: v for k, v in data.items() if k not in ("structure", "system", "targets")}
    shared["simulation"] = {"seed": 5}
    shared["systems"] = [
        {"name": "liquid", "temperature": [278.15, 298.15], "pressure": [1.0],
         "structure": {"water_box": 30}, "system": {"cutoff": 0.45},
         "targets": [{"observable": "density", "value": 0.99997, "temperature": 278.15},
                     {"observable": "density", "value": 0.99705, "temperature": 298.15},
                     {"observable": "enthalpy_of_vaporization", "value": 44.0}]},
        {"name": "box", "temperature": 298.15, "structure": {"water_box": 24},
         "system": {"cutoff": 0.4},
         "targets": [{"observable": "rdf", "atoms": ["O", "O"], "file": "rdf.dat"}]}]
    return shared, where


def test_systems_and_state_points(systems):
    """Each (system, state point) is a single-system config of its own: its structure, state
    point, targets (selected by temperature) and a seed of its own."""
    data, where = systems
    config = config_from_dict(data, where)
    assert config.structure is None and config.targets == []
    assert config.simulation.temperature is None
    points = config.state_points()
    assert [p.label for p in points] == ["liquid 278.15 K 1 bar", "liquid 298.15 K 1 bar",
                                         "box 298.15 K"]
    cold, warm, box = (p.config for p in points)
    assert (cold.simulation.temperature, cold.simulation.pressure) == (278.15, 1.0)
    assert box.simulation.pressure is None and box.structure.water_box == 24
    assert [(t.observable, t.value) for t in cold.targets] == [
        ("density", 0.99997), ("enthalpy_of_vaporization", 44.0)]
    assert [t.value for t in warm.targets] == [0.99705, 44.0]
    assert box.targets[0].file == str(where / "rdf.dat")
    assert all(t.temperature is None for p in points for t in p.config.targets)
    seeds = [p.config.simulation.seed for p in points]
    assert seeds[0] == 5 and len(set(seeds)) == 3 and max(seeds) < 2 ** 31
    assert points[2].key("rdf_OO") == "box 298.15 K/rdf_OO"
    assert to_dict(config)["systems"][0]["targets"][0]["temperature"] == 278.15


def test_single_system_config_is_one_state_point(base):
    data, where = base
    config = config_from_dict(data, where)
    (point,) = config.state_points()
    assert point.config is config and point.label == "" and point.key("x") == "x"
    data["targets"][1]["temperature"] = 295.15
    assert _error(data, where).startswith("targets[1].temperature: only [[systems.targets]] "
                                          "select state points")


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["systems"][0].pop("name"), "systems[0].name: required key is missing"),
    (lambda d: d["systems"][0].update(temperature=[]),
     "systems[0].temperature: expected a list of numbers (K), got []"),
    (lambda d: d["systems"][0].update(temperature=[300.0, -5.0]),
     "systems[0].temperature = [300.0, -5.0]: each entry must be a finite number > 0 (K)"),
    (lambda d: d["systems"][0].update(pressure=[1.0, 1.0, 1.0]),
     "systems[0].pressure: 3 pressures for 2 temperatures"),
    (lambda d: d["systems"][0].update(temperature=[298.15, 298.15]),
     "systems[0]: a state point is listed twice"),
    (lambda d: d["systems"][0].update(temprature=[300.0]),
     "systems[0].temprature: unknown key; did you mean 'temperature'?"),
    (lambda d: d["systems"][1].update(name="liquid"),
     "systems[1].name = 'liquid': another system has this name"),
    (lambda d: d["systems"][0]["targets"][0].update(temperature=300.0),
     "systems[0].targets[0].temperature = 300.0: matches none of the system's state points "
     "(278.15 K, 1 bar; 298.15 K, 1 bar)"),
    (lambda d: d["systems"][0]["targets"].pop(2) and d["systems"][0]["targets"].pop(1),
     "systems[0]: no target applies at 298.15 K, 1 bar"),
    (lambda d: d["systems"][0]["targets"][2].update(value=-44.0),
     "systems[0].targets[2].value = -44.0: an enthalpy of vaporization"),
    (lambda d: d["systems"][1]["targets"].append({"observable": "density", "value": 1.0}),
     "systems[1].targets[1]: a density target needs NPT sampling; set systems[1].pressure"),
    (lambda d: d["systems"][1]["structure"].update(pdb="x.pdb"),
     "systems[1].structure: give exactly one of 'pdb'"),
    (lambda d: d["systems"][1]["system"].update(cutof=1.0),
     "systems[1].system.cutof: unknown key; did you mean 'cutoff'?"),
    (lambda d: d["systems"][1].update(system={"nonbonded_method": "NoCutoff"}, pressure=1.0),
     "systems[1].pressure: NPT needs a periodic system"),
    (lambda d: d["simulation"].update(temperature=300.0),
     "simulation.temperature: with [[systems]], each system lists its state points"),
    (lambda d: d.update(structure={"water_box": 10}),
     "structure: with [[systems]], each system gives its own [systems.structure]"),
    (lambda d: d.update(systems=[]), "systems: give one [[systems]] table per system"),
    (lambda d: [t.update(weight=0.0) for s in d["systems"] for t in s["targets"]],
     "every weight is 0"),
])
def test_bad_system_entries_name_the_key(systems, change, expected):
    data, where = systems
    change(data)
    assert expected in _error(data, where)


def test_equilibration_table(base):
    data, where = base
    assert config_from_dict(data, where).equilibration.max_steps == 0  # off unless asked for
    data["equilibration"] = {"max_steps": 20000, "block_steps": 5, "sample_every": 10}
    assert _error(data, where).startswith("equilibration.sample_every = 10: larger than "
                                          "equilibration.block_steps = 5")
    data["equilibration"] = {"max_steps": 20000, "min_blocks": 4}
    assert _error(data, where).startswith("equilibration.min_blocks = 4: must be >= 6")


def test_state_points_example_config_loads():
    config = load_config(EXAMPLE / "water_state_points.toml")
    points = config.state_points()
    assert [p.label for p in points] == [f"water {t} K 1 bar" for t in (278.15, 298.15, 318.15)]
    assert [[t.label for t in p.config.targets] for p in points] == [
        ["density"], ["density", "enthalpy_of_vaporization", "rdf_OO"], ["density"]]
    assert [p.config.targets[0].value for p in points] == [0.99997, 0.99705, 0.99021]
    assert config.equilibration.max_steps == 100000


def test_readme_systems_example_is_a_valid_config():
    """The README's [[systems]] block, with a [forcefield] and a [schedule], loads."""
    import re

    import tomllib

    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
                if "[[systems]]" in b]
    data = tomllib.loads(block)
    data["forcefield"] = {"files": ["water_flexible.xml"]}
    data["schedule"] = {"epochs": 1, "window_steps": 10, "snapshot_every": 5}
    config = config_from_dict(data, EXAMPLE)
    assert [p.label for p in config.state_points()] == [
        "water 278.15 K 1 bar", "water 298.15 K 1 bar", "small box 298.15 K"]


def test_structure_density_scales_the_box_with_rigid_molecules(base):
    """structure.density: a Modeller water box (loose: 0.76 g/cm^3) is scaled to 0.9 g/cm^3,
    each water moved with its centre of mass (its O-H bonds unchanged to round-off)."""
    import numpy as np
    from openmm import unit

    from openmm_reversible.observables.density import G_CM3_PER_AMU_NM3
    from openmm_reversible.sampler import build_structure

    data, where = base
    topology, plain = build_structure(config_from_dict(data, where))
    data["structure"]["density"] = 0.9
    scaled_topology, scaled = build_structure(config_from_dict(data, where))
    box = np.asarray(scaled_topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    mass = sum(a.element.mass.value_in_unit(unit.dalton) for a in topology.atoms())
    assert mass / np.linalg.det(box) * G_CM3_PER_AMU_NM3 == pytest.approx(0.9, rel=1e-12)
    before = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    assert box[0, 0] < before[0, 0] - 0.03  # Modeller's 30 waters: 0.76 g/cm^3, compressed
    bonds = [(b.atom1.index, b.atom2.index) for b in topology.bonds()]
    for i, j in bonds:
        assert np.linalg.norm(scaled[i] - scaled[j]) == pytest.approx(
            np.linalg.norm(plain[i] - plain[j]), abs=1e-12)
    assert np.abs(scaled - plain).max() > 0.01


def test_response_dielectric_and_diffusion_targets(base):
    """The ensemble targets (κ_T, α, C_p, ε) and diffusion read with their units and default
    tolerances; their own keys (viscosity, lag_range) are kept."""
    data, where = base
    data["targets"] += [
        {"observable": "compressibility", "value": 4.5e-5},
        {"observable": "thermal_expansion", "value": 2.6e-4, "tolerance": 2e-5},
        {"observable": "heat_capacity", "value": 75.3},
        {"observable": "dielectric", "value": 78.4, "weight": 0.5},
        {"observable": "diffusion", "value": 2.3e-3, "viscosity": 0.89e-3,
         "lag_range": [0.005, 0.015]}]
    config = config_from_dict(data, where)
    by_label = {t.label: t for t in config.targets}
    assert by_label["compressibility"].scale == 2e-6
    assert by_label["thermal_expansion"].scale == 2e-5
    assert by_label["heat_capacity"].scale == 2.0
    assert by_label["dielectric"].scale == 2.0 and by_label["dielectric"].weight == 0.5
    diffusion = by_label["diffusion"]
    assert diffusion.viscosity == 0.89e-3 and diffusion.lag_range == [0.005, 0.015]


@pytest.mark.parametrize("target, change, message", [
    ({"observable": "compressibility", "value": 4.5e-5}, {"pressure": None},
     "targets[2]: a compressibility target needs NPT sampling; set simulation.pressure (bar)"),
    ({"observable": "heat_capacity", "value": 75.3}, {"pressure": None},
     "targets[2]: a heat_capacity target needs NPT sampling"),
    ({"observable": "heat_capacity", "value": -1.0}, {}, "targets[2].value = -1.0: must be > 0"),
    ({"observable": "dielectric", "value": 0.5}, {},
     "targets[2].value = 0.5: a static dielectric constant is >= 1"),
    ({"observable": "dielectric", "value": 78.0}, {"nonbonded_method": "NoCutoff"},
     "targets[2]: the dielectric estimator is that of a periodic box, but "
     "system.nonbonded_method is NoCutoff; use PME, Ewald or ReactionField"),
    ({"observable": "density", "value": 1.0, "viscosity": 1e-3}, {},
     "targets[2].viscosity: only diffusion targets take 'viscosity'"),
    ({"observable": "rdf", "atoms": ["O", "O"], "file": "rdf.dat", "name": "g",
      "lag_range": [0.0, 0.01]}, {}, "targets[2].lag_range: only diffusion targets take"),
    ({"observable": "diffusion", "value": 2e-3, "viscosity": -1.0}, {},
     "targets[2].viscosity = -1.0: must be > 0"),
    ({"observable": "diffusion", "value": 2e-3, "lag_range": [0.01, 0.005]}, {},
     "targets[2].lag_range = [0.01, 0.005]: give [first, last] lag times in ps"),
    ({"observable": "diffusion", "value": 2e-3, "lag_range": [0.005, 0.02]}, {},
     "targets[2].lag_range = [0.005, 0.02]: the last lag must be within a window's "
     "snapshots, at most 0.015 ps here"),
    ({"observable": "diffusion", "value": 2e-3}, {"snapshot_every": 10},
     "targets[2]: a diffusion target fits the slope of the MSD over a window's snapshots, "
     "but a window has 2"),
])
def test_bad_new_targets(base, target, change, message):
    data, where = base
    data = copy.deepcopy(data)
    data["targets"].append(target)
    if "pressure" in change:
        del data["simulation"]["pressure"]
    if "nonbonded_method" in change:
        data["system"]["nonbonded_method"] = change["nonbonded_method"]
        del data["simulation"]["pressure"]
    if "snapshot_every" in change:
        data["schedule"]["snapshot_every"] = change["snapshot_every"]
    assert message in _error(data, where)
