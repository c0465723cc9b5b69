"""Validation in plain OpenMM: export round trip, observables, command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from openmm import app

import openmm_reversible.validate as validate_lib
from openmm_reversible.commands import validate as validate_cli
from openmm_reversible.config import load_config
from openmm_reversible.errors import InputError
from openmm_reversible.export import write_xml
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.sampler import build_structure, create_system_kwargs
from openmm_reversible.validate import (
    Frames,
    diffusion_coefficient,
    round_trip,
    substitute_files,
    validate,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "water"

CONFIG = f"""
[forcefield]
files = ["{EXAMPLE / 'water_flexible.xml'}"]
[structure]
water_box = 30
[system]
nonbonded_method = "ReactionField"
cutoff = 0.45
[simulation]
temperature = 295.15
platform = "Reference"
[schedule]
epochs = 1
[[targets]]
observable = "rdf"
atoms = ["O", "H"]
file = "{EXAMPLE / 'targets' / 'rdf_OH.dat'}"
r_max = 0.45
[[targets]]
observable = "enthalpy_of_vaporization"
value = 44.0
[[targets]]
observable = "pressure"
value = 1.0
"""

TRAINED = {"Atom/sigma/tip3p-O": 0.3201, "Atom/epsilon/tip3p-O": 0.55,
           "Atom/charge/tip3p-O": -0.88}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A config and a 'trained' water_flexible.xml written by the export."""
    path = tmp_path_factory.mktemp("validate")
    (path / "fit.toml").write_text(CONFIG)
    config = load_config(path / "fit.toml")
    topology, _ = build_structure(config)
    ps = ParameterSet.from_forcefield(config.forcefield.files, topology,
                                      **create_system_kwargs(config))
    ps.set_values(TRAINED)
    (path / "out").mkdir()
    (xml,) = write_xml(ps, path / "out")
    return config, xml, path


def test_round_trip_matches_twin(trained):
    config, xml, _ = trained
    topology, positions = build_structure(config)
    files = substitute_files(config, [str(xml)])
    check = round_trip(config, files, topology, positions)
    assert check["ok"]
    assert check["energy_rel_error"] <= 1e-6
    assert check["force_rel_rms_error"] <= 1e-5
    # The trained values really are different from the start (the check is not trivial).
    start = round_trip(config, config.forcefield.files, topology, positions)
    assert abs(start["energy_openmm"] - check["energy_openmm"]) > 1.0


def test_round_trip_detects_an_untagged_change(trained, tmp_path):
    config, xml, _ = trained
    edited = tmp_path / xml.name
    edited.write_text(xml.read_text().replace('k="462750.4"', 'k="400000.0"'))
    topology, positions = build_structure(config)
    check = round_trip(config, substitute_files(config, [str(edited)]), topology, positions)
    assert not check["ok"]
    assert check["energy_rel_error"] > 1e-6 and check["force_rel_rms_error"] > 1e-3


def test_substitute_files_names_the_problem(trained, tmp_path):
    config, _, _ = trained
    other = tmp_path / "other.xml"
    other.write_text("<ForceField/>")
    with pytest.raises(InputError, match="other.xml matches none of the config's"):
        substitute_files(config, [str(other)])


def test_short_simulation_reports_every_target(trained):
    config, xml, _ = trained
    report = validate([str(xml)], config, steps=200, equilibration=100, every=20)
    rows = {r["name"]: r for r in report["observables"]}
    assert set(rows) == {"rdf_OH", "enthalpy_of_vaporization", "pressure", "density",
                         "diffusion"}
    g = np.asarray(rows["rdf_OH"]["value"])
    assert g.shape == np.asarray(rows["rdf_OH"]["target"]).shape
    assert np.all(g[np.asarray(rows["rdf_OH"]["r"]) < 0.12] == 0)  # no intramolecular O-H
    assert 20 < rows["enthalpy_of_vaporization"]["value"] < 70
    # The Modeller box of 30 waters is ~0.76 g/cm^3 (NVT here, no barostat).
    assert rows["density"]["value"] == pytest.approx(0.76, abs=0.05)
    assert math.isfinite(rows["pressure"]["value"])
    assert report["round_trip"]["ok"]


def test_rigid_pme_npt(trained):
    config, xml, _ = trained
    report = validate([str(xml)], config, steps=100, equilibration=50, every=25, rigid=True,
                      nonbonded="PME", pressure=1.0)
    assert report["settings"]["rigid"] and report["settings"]["nonbonded_method"] == "PME"
    assert report["settings"]["timestep_ps"] == 0.002
    rows = {r["name"]: r for r in report["observables"]}
    assert 0.5 < rows["density"]["value"] < 1.2


def test_diffusion_of_a_known_random_walk():
    """Brownian centres with D = 2.3e-3 nm²/ps: the MSD estimate lands within 10 %."""
    rng = np.random.default_rng(0)
    d, dt, n_frames, n_mol = 2.3e-3, 0.5, 400, 300
    steps = rng.normal(0.0, math.sqrt(2 * d * dt), size=(n_frames, n_mol, 3))
    positions = np.cumsum(steps, axis=0)
    frames = Frames(positions, np.repeat(np.eye(3)[None] * 5.0, n_frames, 0),
                    np.zeros(n_frames), np.zeros(n_frames), np.arange(n_frames) * dt)
    groups = [np.array([i]) for i in range(n_mol)]
    assert diffusion_coefficient(frames, groups, np.ones(n_mol)) == pytest.approx(d, rel=0.1)


def test_command_line(trained, capsys):
    _, xml, path = trained
    parser = argparse.ArgumentParser()
    validate_cli.add_arguments(parser)
    args = parser.parse_args([str(xml), "--config", str(path / "fit.toml"), "--steps", "100",
                              "--equilibration", "20", "--every", "20",
                              "--output", str(path / "report")])
    assert validate_cli.run(args) == 0
    out = capsys.readouterr().out
    assert "round trip" in out and "enthalpy_of_vaporization" in out and ": ok" in out
    report = json.loads((path / "report" / "validation.json").read_text())
    assert report["round_trip"]["ok"]
    assert (path / "report" / "validation.png").read_bytes()[:4] == b"\x89PNG"


def test_forcefield_option_names_the_files_the_fit_ran_with(trained, tmp_path, capsys):
    """``validate --forcefield XML``: a fit run with ``fit --forcefield`` is validated with the
    same override; without it the trained file matches none of the config's."""
    _, xml, path = trained
    other = tmp_path / "other.xml"
    other.write_text((EXAMPLE / "water_flexible.xml").read_text())
    config = tmp_path / "fit.toml"
    config.write_text((path / "fit.toml").read_text().replace(
        str(EXAMPLE / "water_flexible.xml"), str(other)))
    parser = argparse.ArgumentParser()
    validate_cli.add_arguments(parser)
    common = [str(xml), "--config", str(config), "--steps", "40", "--equilibration", "0",
              "--every", "20", "--output", str(tmp_path / "report")]
    with pytest.raises(InputError, match="water_flexible.xml matches none of the config's"):
        validate_cli.run(parser.parse_args(common))
    args = parser.parse_args(common + ["--forcefield", str(EXAMPLE / "water_flexible.xml")])
    assert validate_cli.run(args) == 0
    assert ": ok" in capsys.readouterr().out


def test_standard_errors_by_block_averaging(trained):
    """Per-frame energies, pressures and boxes with hand-computable block errors."""
    config, xml, _ = trained
    topology, _ = build_structure(config)
    system = ParameterSet.from_forcefield(config.forcefield.files, topology,
                                          **create_system_kwargs(config)).system
    n = 10
    energies = np.array([-1200.0, -1210, -1190, -1205, -1195, -1220, -1180, -1200, -1215,
                         -1185])
    pressures = np.arange(n, dtype=float) * 10.0
    boxes = np.repeat(np.eye(3)[None] * 0.98, n, 0)
    rng = np.random.default_rng(1)
    positions = np.cumsum(rng.normal(0, 0.01, (n, 90, 3)), axis=0) + rng.uniform(0, 0.98,
                                                                               (1, 90, 3))
    frames = Frames(positions, boxes, energies, pressures, np.arange(n) * 0.05)
    rows = {r["name"]: r for r in validate_lib.observables(config, topology, system, frames,
                                                           rigid=False, blocks=5)}
    block_means = energies.reshape(5, 2).mean(1)
    assert rows["enthalpy_of_vaporization"]["stderr"] == pytest.approx(
        np.std(block_means, ddof=1) / math.sqrt(5) / 30, rel=1e-12)
    assert rows["pressure"]["stderr"] == pytest.approx(
        np.std(pressures.reshape(5, 2).mean(1), ddof=1) / math.sqrt(5), rel=1e-12)
    assert rows["density"]["stderr"] < 1e-15  # the box never changes
    assert rows["density"]["target"] is None and rows["density"]["error"] is None
    g_err = np.asarray(rows["rdf_OH"]["stderr"])
    assert g_err.shape == np.asarray(rows["rdf_OH"]["value"]).shape and np.all(g_err >= 0)
    assert np.any(g_err > 0)
    table = validate_lib.format_table(list(rows.values()))
    density_line = next(line for line in table.splitlines() if line.startswith("density"))
    assert "no target" in density_line and "± stderr" in table.splitlines()[0]


def test_untargeted_observables_are_not_drawn_as_a_match(trained, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [{"name": "pressure", "observable": "pressure", "value": 30.0, "stderr": 5.0,
             "target": 1.0, "error": 29.0, "unit": "bar"},
            {"name": "density", "observable": "density", "value": 0.76, "stderr": 0.01,
             "target": None, "error": None, "unit": "g/cm^3"},
            {"name": "diffusion", "observable": "diffusion", "value": 2e-3, "stderr": 1e-4,
             "target": None, "error": None, "unit": "nm^2/ps"}]
    validate_lib.plot(rows, tmp_path / "v.png")
    (fig,) = figures
    (ax,) = fig.axes  # one panel: the only targeted observable
    assert ax.get_title() == "pressure"
    assert [line.get_ydata()[0] for line in ax.get_lines()][-1] == 1.0  # the target line
    title = fig._suptitle.get_text()
    assert title.startswith("no target: ") and "density 0.76 ± 0.01 g/cm^3" in title
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_rigid_validation_of_a_model_with_trained_bond_lengths(tmp_path):
    """A flexibly trained model whose bond length and angle were tagged validates rigid: the
    trained geometry becomes the constraint distances, and the round trip compares the twin
    of the original files with the trained values against the written file."""
    paper = Path(__file__).resolve().parent.parent / "examples" / "paper" / "forcefields"
    text = CONFIG.replace(str(EXAMPLE / "water_flexible.xml"), str(paper / "lj.xml"))
    (tmp_path / "fit.toml").write_text(text)
    config = load_config(tmp_path / "fit.toml")
    topology, _ = build_structure(config)
    ps = ParameterSet.from_forcefield(config.forcefield.files, topology,
                                      **create_system_kwargs(config))
    ps.set_values({"Bond/length/OW.HW": 0.0980, "Atom/sigma/tip3p-O": 0.3201})
    (xml,) = write_xml(ps, tmp_path)
    report = validate([str(xml)], config, steps=50, equilibration=10, every=25, rigid=True,
                      nonbonded="PME", pressure=1.0, progress=False)
    assert report["settings"]["rigid"]
    assert report["round_trip"]["ok"], report["round_trip"]
    assert report["round_trip"]["energy_rel_error"] < 1e-9
    rigid = app.ForceField(str(xml)).createSystem(topology, rigidWater=True)
    distances = {round(rigid.getConstraintParameters(k)[2]._value, 12)
                 for k in range(rigid.getNumConstraints())}
    assert 0.0980 in distances


def test_simulated_gas_phase_in_delta_h_vap(trained, tmp_path):
    """``gas = "simulate"``: validate samples the first molecule alone in plain OpenMM (as the
    fit does) instead of taking k_B T/2 per mode; a flexible water is nearly harmonic, so its
    ⟨E_gas⟩ lands near 3/2 k_B T. A gas system's name needs the [[systems]] config."""
    config, xml, path = trained
    text = CONFIG.replace('value = 44.0\n', 'value = 44.0\ngas = "simulate"\ngas_frames = 400\n'
                          'gas_every = 10\n')
    (tmp_path / "fit.toml").write_text(text)
    simulating = load_config(tmp_path / "fit.toml")
    report = validate([str(xml)], simulating, steps=100, equilibration=20, every=20)
    plain = validate([str(xml)], config, steps=100, equilibration=20, every=20)
    (row,) = [r for r in report["observables"] if r["name"] == "enthalpy_of_vaporization"]
    (approx,) = [r for r in plain["observables"] if r["name"] == "enthalpy_of_vaporization"]
    assert row["gas"].startswith("simulated: the first molecule")
    assert approx["gas"] == "k_B T/2 per internal mode"
    half_kt = 0.5 * 0.0083144626 * 295.15
    assert approx["gas_energy"] == pytest.approx(3 * half_kt)
    assert row["gas_energy"] != approx["gas_energy"]
    assert row["gas_energy"] == pytest.approx(3 * half_kt, abs=1.0)
    # the same liquid frames (same seed): ΔHvap differs by the gas energies alone
    assert row["value"] - approx["value"] == pytest.approx(
        row["gas_energy"] - approx["gas_energy"], abs=1e-9)
    assert row["stderr"] > approx["stderr"]
    named = dataclasses.replace(simulating, targets=[
        dataclasses.replace(simulating.targets[1], gas="vapour")])
    with pytest.raises(InputError, match="gas = 'vapour' names a gas system"):
        validate_lib.simulated_gas_energies(named, simulating.forcefield.files,
                                            *build_structure(simulating), None, "Reference", 1)
