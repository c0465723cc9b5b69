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
