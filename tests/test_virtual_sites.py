"""Virtual sites in the twin: 4- and 5-site water against OpenMM's Reference platform.

Each System is built by OpenMM from a shipped (or cited, tests/data) force field; the
comparison is the numerical contract of docs/design.md: relative energy error <= 1e-6
(PME <= 1e-5) and relative RMS force error <= 1e-5, forces on the real atoms (OpenMM spreads
the force on a site onto its parents; the twin gets the same from the chain rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from openmm_reversible.errors import InputError
from openmm_reversible.exact import DeterministicForces
from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.potential import TorchPotential, UnsupportedForceError
from openmm_reversible.systems import openmm_data_file
from openmm_reversible.verify import verify

DATA = Path(__file__).resolve().parent / "data"
CUTOFF = 0.9


def water_box(forcefield: str, model: str, n_waters: int = 60, seed: int = 3):
    """A small box of ``model`` water from Modeller, perturbed so forces are not symmetric."""
    ff = app.ForceField(forcefield)
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, model=model, numAdded=n_waters, neutralize=False)
    size = max(modeller.topology.getPeriodicBoxVectors()[k][k].value_in_unit(unit.nanometer)
               for k in range(3))
    box = np.eye(3) * max(size, 2.0 * CUTOFF + 0.05)
    modeller.topology.setPeriodicBoxVectors(box * unit.nanometer)
    x = np.asarray(modeller.getPositions().value_in_unit(unit.nanometer))
    x = x + np.random.default_rng(seed).normal(scale=2e-3, size=x.shape)
    return ff, modeller.topology, x, box


@pytest.mark.parametrize("forcefield, model", [
    ("tip4pew.xml", "tip4pew"),
    (str(DATA / "tip4p2005.xml"), "tip4pew"),
    ("opc.xml", "tip4pew"),
    ("tip5p.xml", "tip5p"),
])
@pytest.mark.parametrize("method", [app.PME, app.CutoffPeriodic])
def test_four_and_five_site_water_verify_against_openmm(forcefield, model, method):
    ff, topology, x, box = water_box(forcefield, model)
    system = ff.createSystem(topology, nonbondedMethod=method,
                             nonbondedCutoff=CUTOFF * unit.nanometer, rigidWater=False,
                             constraints=None, ewaldErrorTolerance=1e-6)
    report = verify(system, x, box)
    n_sites = sum(system.isVirtualSite(i) for i in range(system.getNumParticles()))
    assert report.n_virtual_sites == n_sites > 0
    assert report.ok, [(r.name, r.energy_rel_error, r.force_rel_rms_error)
                       for r in report.per_force]
    assert report.force_rel_rms_error <= 1e-5


def _local_coordinates_system():
    """Three atoms and one LocalCoordinatesSite off the plane, with charges on every particle."""
    system = openmm.System()
    for mass in (16.0, 1.0, 1.0, 0.0):
        system.addParticle(mass)
    site = openmm.LocalCoordinatesSite([0, 1, 2], [0.5, 0.3, 0.2], [-1.0, 1.0, 0.0],
                                       [-1.0, 0.0, 1.0], openmm.Vec3(0.03, 0.02, 0.05))
    system.setVirtualSite(3, site)
    nb = openmm.NonbondedForce()
    for q in (-0.4, 0.3, 0.5, -0.4):
        nb.addParticle(q, 0.3, 0.5)
    # A second copy of the molecule so the site interacts through the pair sum.
    for mass in (16.0, 1.0, 1.0, 0.0):
        system.addParticle(mass)
    system.setVirtualSite(7, openmm.LocalCoordinatesSite(
        [4, 5, 6], [0.5, 0.3, 0.2], [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0],
        openmm.Vec3(0.03, 0.02, 0.05)))
    for q in (-0.4, 0.3, 0.5, -0.4):
        nb.addParticle(q, 0.3, 0.5)
    for i, j in ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)):
        nb.addException(i, j, 0.0, 1.0, 0.0)
        nb.addException(i + 4, j + 4, 0.0, 1.0, 0.0)
    system.addForce(nb)
    x = np.array([[0.0, 0.0, 0.0], [0.1, 0.0, 0.01], [-0.02, 0.09, 0.0], [0.0, 0.0, 0.0],
                  [0.4, 0.1, 0.05], [0.5, 0.12, 0.0], [0.38, 0.2, 0.02], [0.0, 0.0, 0.0]])
    return system, x


def test_local_coordinates_site_matches_openmm():
    system, x = _local_coordinates_system()
    report = verify(system, x)
    assert report.n_virtual_sites == 2
    assert report.ok and report.force_rel_rms_error <= 1e-5
    # The placed site equals OpenMM's.
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(x)
    context.computeVirtualSites()
    placed = context.getState(getPositions=True).getPositions(asNumpy=True)
    twin = TorchPotential(system).virtual_sites(torch.tensor(x))
    np.testing.assert_allclose(twin.numpy(), placed.value_in_unit(unit.nanometer),
                               rtol=0, atol=1e-12)


def test_site_positions_do_not_enter_the_energy():
    """Whatever a site's input position, the energy depends only on its parents."""
    ff, topology, x, box = water_box("tip4pew.xml", "tip4pew", n_waters=30)
    system = ff.createSystem(topology, nonbondedMethod=app.CutoffPeriodic,
                             nonbondedCutoff=CUTOFF * unit.nanometer, rigidWater=False)
    pot = TorchPotential(system)
    x = torch.tensor(x, requires_grad=True)
    moved = x.detach().clone()
    moved[pot.virtual_sites.indices] += 0.05
    b = torch.tensor(box)
    assert float(pot(x.detach(), b)) == float(pot(moved, b))
    (grad,) = torch.autograd.grad(pot(x, b), x)
    assert bool((grad[pot.virtual_sites.indices] == 0).all())


def test_unsupported_site_type_is_named():
    system = openmm.System()
    system.addParticle(1.0)
    system.addParticle(0.0)
    system.setVirtualSite(1, openmm.SymmetrySite(0, openmm.Vec3(1, 0, 0), openmm.Vec3(0, 1, 0),
                                                 openmm.Vec3(0, 0, 1), openmm.Vec3(0.1, 0, 0),
                                                 False))
    with pytest.raises(UnsupportedForceError, match="SymmetrySite.*supported: TwoParticle"):
        TorchPotential(system)


def test_reversible_windows_integrate_and_exact_mode_refuses_virtual_sites():
    """The windows integrate the massive particles and place the sites
    (tests/test_virtual_site_windows.py checks them against OpenMM and BPTT); the exact mode
    refuses sites."""
    ff = app.ForceField("tip4pew.xml")
    pdb = app.PDBFile(openmm_data_file("tip4pew.pdb"))
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, rigidWater=False)
    pot = TorchPotential(system)
    sim = ReversibleSimulation(pot, LangevinMiddleIntegrator(0.001, 1.0, 300.0), 10, 5,
                               lambda traj, p: traj.positions.sum())
    assert sim.sites is not None and sim.sites.n_particles == system.getNumParticles()
    with pytest.raises(InputError, match="a virtual site has a nonzero mass"):
        ReversibleSimulation(pot, LangevinMiddleIntegrator(0.001, 1.0, 300.0), 10, 5,
                             lambda traj, p: traj.positions.sum(),
                             masses=torch.ones(system.getNumParticles(), dtype=torch.float64))
    with pytest.raises(UnsupportedForceError, match="exact mode does not support virtual"):
        DeterministicForces(pot)


def test_rdf_pairs_of_four_site_water_leave_out_the_sites_unless_named():
    """The fit's and validate's RDF pairs of TIP4P-Ew: "O"/"H" (names or elements) never
    select the massless M; naming "M" does, and with the System its own molecule's O-M pair
    (0.0125 nm apart) is excluded, which the topology's bonds alone do not see."""
    from openmm_reversible.train import rdf_pairs

    ff, topology, x, box = water_box("tip4pew.xml", "tip4pew", n_waters=20)
    system = ff.createSystem(topology, nonbondedMethod=app.CutoffPeriodic,
                             nonbondedCutoff=CUTOFF * unit.nanometer, rigidWater=True)
    sites = {i for i in range(system.getNumParticles()) if system.isVirtualSite(i)}
    assert len(sites) == 20
    for atoms, n_pairs in ((["O", "O"], 190), (["O", "H"], 20 * 40 - 40)):
        pairs = rdf_pairs(topology, atoms, system)
        assert len(pairs) == n_pairs
        assert not sites & set(pairs.ravel().tolist())
    with_sites = rdf_pairs(topology, ["O", "M"], system)
    assert len(with_sites) == 20 * 20 - 20 and sites <= set(with_sites.ravel().tolist())
    closest = np.linalg.norm(x[with_sites[:, 0]] - x[with_sites[:, 1]], axis=1).min()
    assert closest > 0.2
    assert len(rdf_pairs(topology, ["O", "M"])) == 20 * 20  # without the System: O-M kept


def test_gradcheck_rdf_of_all_atoms_leaves_out_virtual_sites():
    """gradcheck's RDF loss falls back to all atoms when there is no oxygen; with the System
    that means the particles with mass (here TIP4P-Ew with its O renamed to neon)."""
    from types import SimpleNamespace

    from openmm_reversible.gradcheck import RDF_R_MAX, rdf_loss
    from openmm_reversible.observables.rdf import rdf

    ff, topology, x, box = water_box("tip4pew.xml", "tip4pew", n_waters=20)
    system = ff.createSystem(topology, nonbondedMethod=app.CutoffPeriodic,
                             nonbondedCutoff=CUTOFF * unit.nanometer, rigidWater=True)
    for atom in topology.atoms():
        if atom.element is not None and atom.element.symbol == "O":
            atom.element = app.element.neon
    frame = SimpleNamespace(positions=torch.as_tensor(x)[None], box=torch.as_tensor(box))
    massive = [i for i in range(system.getNumParticles()) if not system.isVirtualSite(i)]
    expected = rdf(frame.positions, frame.box, selections=(massive, massive),
                   r_range=(0.2, min(RDF_R_MAX, 0.5 * box[0, 0])), bin_width=0.02)[1]
    got = rdf_loss(topology, frame.box, system).per_frame(frame, None)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with_sites = rdf_loss(topology, frame.box).per_frame(frame, None)[0]
    assert float((with_sites - expected).abs().max()) > 1e-3
