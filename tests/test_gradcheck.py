"""``openmm-reversible gradcheck`` and ``benchmark`` on a small flexible-water box.

The water box (16 TIP3P molecules, reaction field with a 0.35 nm cutoff) is built by OpenMM's
Modeller and written to a temporary PDB; the force field is the tagged flexible TIP3P of
``tests/data/tip3p_flexible.xml`` (charge, bond and Lennard-Jones parameters trainable).
"""

import argparse
import json
import os

import openmm.app as app
import pytest

from openmm_reversible import benchmarks, gradcheck
from openmm_reversible.benchmarks import memory
from openmm_reversible.errors import InputError

XML = os.path.join(os.path.dirname(__file__), "data", "tip3p_flexible.xml")


@pytest.fixture(scope="module")
def water_pdb(tmp_path_factory):
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=16,
                        neutralize=False)
    path = tmp_path_factory.mktemp("water") / "water16.pdb"
    with open(path, "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)
    return str(path)


def gradcheck_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gradcheck.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = gradcheck.run(gradcheck_args(*argv, "--json"))
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("loss", ["energy", "kinetic", "rdf"])
def test_gradcheck_agrees_for_every_loss(water_pdb, capsys, loss):
    code, result = run_json(capsys, "--forcefield", XML, "--pdb", water_pdb, "--steps", "4",
                            "--cutoff", "0.35", "--loss", loss)
    assert code == 0 and result["ok"] is True
    assert result["rel_error_bptt"] < 1e-8
    assert result["rel_error_fd"] < 1e-4
    names = [p["name"] for p in result["parameters"]]
    assert names == ["Atom/charge/tip3p-O", "Bond/length/OW.HW", "Bond/k/OW.HW",
                     "Atom/sigma/tip3p-O", "Atom/epsilon/tip3p-O"]
    assert all(p["reversible"] != 0 for p in result["parameters"])


def test_gradcheck_table_and_failure_exit_code(water_pdb, capsys):
    code = gradcheck.run(gradcheck_args("--forcefield", XML, "--pdb", water_pdb, "--steps",
                                        "4", "--cutoff", "0.35", "--tol-fd", "0"))
    out = capsys.readouterr().out
    assert code == 1
    assert "Atom/sigma/tip3p-O" in out and "FAILED" in out


def test_gradcheck_bad_input(water_pdb, tmp_path):
    with pytest.raises(InputError, match="--steps must be >= 1"):
        gradcheck.run(gradcheck_args("--forcefield", XML, "--pdb", water_pdb, "--steps", "0"))
    pdb = app.PDBFile(water_pdb)
    pdb.topology.setPeriodicBoxVectors(None)
    no_box = tmp_path / "nobox.pdb"
    with open(no_box, "w") as handle:
        app.PDBFile.writeFile(pdb.topology, pdb.positions, handle)
    with pytest.raises(InputError, match="needs a periodic box"):
        gradcheck.run(gradcheck_args("--forcefield", XML, "--pdb", str(no_box), "--steps", "2",
                                     "--nonbonded-method", "PME"))


def test_gradient_benchmark_reports_json(capsys):
    parser = argparse.ArgumentParser()
    benchmarks.add_arguments(parser)
    args = parser.parse_args(["gradient", "--waters", "16", "--steps", "4",
                              "--snapshot-every", "2", "--cutoff", "0.35", "--json"])
    assert benchmarks.run(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_atoms"] == 48 and result["steps"] == 4
    assert result["gradient_over_forward"] > 1.0
    assert result["reconstruction_error_nm"] < 1e-12
    assert result["gradient_norm"] > 0


def test_memory_measurement_in_process():
    result = memory.measure("reversible", steps=4, waters=16, snapshot_every=2, cutoff=0.35,
                            seed=0)
    assert result["mode"] == "reversible" and result["steps"] == 4
    assert result["peak_mib"] >= result["baseline_mib"] > 0
