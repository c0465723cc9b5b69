"""`openmm-reversible verify`: the twin against OpenMM on real systems, and the exit codes."""

import json

import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_reversible.cli import main
from openmm_reversible.systems import O2_FORCEFIELD, openmm_data_file, villin, water_box
from openmm_reversible.verify import verify


def _write_inputs(tmp_path, msys):
    sys_path = tmp_path / "system.xml"
    sys_path.write_text(openmm.XmlSerializer.serialize(msys.system))
    ctx = openmm.Context(msys.system, openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    if msys.box is not None:
        ctx.setPeriodicBoxVectors(*msys.box)
    ctx.setPositions(msys.positions)
    state_path = tmp_path / "state.xml"
    state_path.write_text(openmm.XmlSerializer.serialize(ctx.getState(getPositions=True)))
    return str(sys_path), str(state_path)


@pytest.mark.parametrize("nonbonded", ["RF", "PME"])
def test_flexible_water_box_within_tolerance(tmp_path, capsys, nonbonded):
    msys = water_box(216, nonbonded=nonbonded, cutoff=0.9, rigid=False,
                     **({"ewaldErrorTolerance": 1e-6} if nonbonded == "PME" else {}))
    sys_path, state_path = _write_inputs(tmp_path, msys)
    assert main(["verify", sys_path, state_path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert {"energy_openmm", "energy_torch", "energy_rel_error", "force_rel_rms_error",
            "per_force"} <= set(out)
    names = {f["name"] for f in out["per_force"]}
    assert {"HarmonicBondForce", "HarmonicAngleForce", "NonbondedForce"} <= names
    cmm = [f for f in out["per_force"] if f["name"] == "CMMotionRemover"]
    assert cmm and cmm[0]["ignored"] is True
    assert out["energy_rel_error"] <= 1e-5 and out["force_rel_rms_error"] <= 1e-5


@pytest.mark.slow
def test_villin_amber14_pme():
    msys = villin(nonbonded="PME", cutoff=1.0, ewaldErrorTolerance=1e-6)
    report = verify(msys.system, msys.positions, msys.box)
    bad = [(r.name, r.energy_rel_error, r.force_rel_rms_error)
           for r in report.per_force if not r.ok]
    assert report.ok, bad


def test_pdb_coordinates_accepted(tmp_path, capsys):
    msys = water_box(216, nonbonded="RF")
    sys_path, _ = _write_inputs(tmp_path, msys)
    pdb_path = tmp_path / "coords.pdb"
    with open(pdb_path, "w") as fh:
        app.PDBFile.writeFile(msys.topology, msys.positions * unit.nanometer, fh)
    # PDB has only 3 decimals in Å; the comparison is still at one configuration for both codes.
    assert main(["verify", sys_path, str(pdb_path)]) == 0
    assert "NonbondedForce" in capsys.readouterr().out


def test_unsupported_force_exit_2(tmp_path, capsys):
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    gb = openmm.GBSAOBCForce()
    for _ in range(2):
        gb.addParticle(0.0, 0.15, 1.0)
    system.addForce(gb)
    path = tmp_path / "gb.xml"
    path.write_text(openmm.XmlSerializer.serialize(system))
    state = tmp_path / "c.pdb"
    top = app.Topology()
    chain = top.addChain()
    res = top.addResidue("AR", chain)
    for name in ("AR1", "AR2"):
        top.addAtom(name, app.element.argon, res)
    with open(state, "w") as fh:
        app.PDBFile.writeFile(top, np.array([[0, 0, 0], [0.3, 0, 0]]) * unit.nanometer, fh)
    assert main(["verify", str(path), str(state)]) == 2
    err = capsys.readouterr().err
    assert "Unsupported force GBSAOBCForce" in err and "NonbondedForce" in err
    assert "Traceback" not in err


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "missing.xml"), "x.pdb"]) == 2
    assert "no such file" in capsys.readouterr().err
    not_system = tmp_path / "integrator.xml"
    not_system.write_text(openmm.XmlSerializer.serialize(openmm.VerletIntegrator(0.001)))
    assert main(["verify", str(not_system), str(not_system)]) == 2
    assert "not a System" in capsys.readouterr().err
    msys = water_box(216, nonbonded="RF")
    sys_path, _ = _write_inputs(tmp_path, msys)
    small = water_box(100, nonbonded="RF")
    pdb_path = tmp_path / "small.pdb"
    with open(pdb_path, "w") as fh:
        app.PDBFile.writeFile(small.topology, small.positions * unit.nanometer, fh)
    assert main(["verify", sys_path, str(pdb_path)]) == 2
    assert "atoms but the System has 648" in capsys.readouterr().err


@pytest.mark.slow
def test_villin_charmm36_pme_cmap_urey_bradley_nbfix():
    """CHARMM36: CMAP, Urey-Bradley (a second bond force), impropers
    (CustomTorsionForce) and NBFIX/LJ tables (CustomNonbondedForce), with PME."""
    pdb = app.PDBFile(openmm_data_file("test.pdb"))
    ff = app.ForceField("charmm36.xml", "charmm36/water.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.PME,
                             nonbondedCutoff=1.0 * unit.nanometer, ewaldErrorTolerance=1e-6,
                             constraints=None, rigidWater=False)
    positions = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    box = np.array(pdb.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    report = verify(system, positions, box)
    names = {r.name for r in report.per_force}
    assert {"CMAPTorsionForce", "CustomTorsionForce", "CustomNonbondedForce"} <= names
    assert report.ok, [(r.name, r.energy_rel_error, r.force_rel_rms_error)
                       for r in report.per_force if not r.ok]


def o2_in_water(n_o2: int = 6, box_size: float = 2.2):
    """A box of O2 molecules in flexible TIP3P water (O2_FORCEFIELD), reaction field."""
    files = ["tip3p.xml", O2_FORCEFIELD]
    ff = app.ForceField(*files)
    top, positions = app.Topology(), []
    chain = top.addChain()
    rng = np.random.default_rng(11)
    for k in range(n_o2):
        residue = top.addResidue("OXY", chain)
        a = top.addAtom("O1", app.element.oxygen, residue)
        b = top.addAtom("O2", app.element.oxygen, residue)
        top.addBond(a, b)
        centre = (np.array([k % 3, (k // 3) % 3, k // 9]) + 0.5) * box_size / 3
        axis = rng.normal(size=3)
        axis *= 0.5 * 0.12074 / np.linalg.norm(axis)
        positions += [centre - axis, centre + axis]
    modeller = app.Modeller(top, np.array(positions) * unit.nanometer)
    modeller.addSolvent(ff, boxSize=openmm.Vec3(box_size, box_size, box_size))
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.CutoffPeriodic,
                             nonbondedCutoff=0.9 * unit.nanometer, rigidWater=False,
                             constraints=None)
    pos = np.asarray(modeller.positions.value_in_unit(unit.nanometer))
    box = np.array(modeller.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    return system, pos, box


@pytest.mark.parametrize("form", ["lennard-jones", "mie", "buckingham", "double-exponential",
                                  "lj-soft-core", "buffered-14-7"])
def test_o2_in_water_with_each_functional_form(form):
    """The Lennard-Jones part of the NonbondedForce is replaced by a CustomNonbondedForce of
    each functional form (per-particle parameters from the original σ, ε; same exclusions,
    long-range correction on); charges stay in the NonbondedForce."""
    from test_custom import FORMS  # the forms and their global parameters

    system, positions, box = o2_in_water()
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    energy, names, _, globals_ = FORMS[form]
    custom = openmm.CustomNonbondedForce(energy)
    for name in names:
        custom.addPerParticleParameter(name)
    for name, value in globals_.items():
        custom.addGlobalParameter(name, value)
    for i in range(nb.getNumParticles()):
        charge, sigma, epsilon = nb.getParticleParameters(i)
        sigma = sigma.value_in_unit(unit.nanometer)
        epsilon = epsilon.value_in_unit(unit.kilojoule_per_mole)
        if form == "buckingham":  # exp-6 with the same minimum (alpha 13)
            rm = 2 ** (1 / 6) * sigma
            custom.addParticle([6 * epsilon / 7 * np.exp(13), 13 / rm, epsilon * 13 * rm**6 / 7])
        else:
            custom.addParticle([sigma, epsilon])
        nb.setParticleParameters(i, charge, sigma, 0.0)
    for k in range(nb.getNumExceptions()):
        i, j, qq, sigma, _ = nb.getExceptionParameters(k)
        custom.addExclusion(i, j)
        nb.setExceptionParameters(k, i, j, qq, sigma, 0.0)
    custom.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    custom.setCutoffDistance(0.9)
    custom.setUseLongRangeCorrection(True)
    system.addForce(custom)
    report = verify(system, positions, box)
    assert report.ok, [(r.name, r.energy_rel_error, r.force_rel_rms_error)
                       for r in report.per_force if not r.ok]
    assert any(r.name == "CustomNonbondedForce" and abs(r.energy_openmm) > 1.0
               for r in report.per_force)
