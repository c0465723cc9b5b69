"""NonbondedForce twin against OpenMM's Reference platform (double precision).

Every case copies the NonbondedForce of a System built by OpenMM's own ForceField into a System
of its own (:func:`openmm_reference.single_force_system`) and compares energy and forces.
The numerical contract is a relative energy error <= 1e-6 (1e-5 for Ewald/PME) and a relative
RMS force error <= 1e-5; because the twin reproduces OpenMM's algorithms exactly (same Ewald α,
k-vectors, PME grid, spline order and moduli, switching integral), the tests hold it to
:data:`EXACT`, round-off level agreement, so that a subtle deviation cannot hide under the
contract tolerance.

Systems: a flexible TIP3P water box (Modeller.addSolvent with OpenMM's ``tip3p.xml``, 2.0 nm
cube, 258 waters) and water in a rhombic-dodecahedron box; villin headpiece (the protein of
OpenMM's ``data/test.pdb``) with ``amber14-all.xml``, whose NonbondedForce holds 1-4
exceptions. Gradients (Hessian-vector products, parameter VJPs, box
derivatives) are checked against central finite differences.
"""

from __future__ import annotations

import copy
import math
import os
import pickle

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from openmm import unit
from openmm_reference import reference_energy_forces, relative_errors, single_force_system

from openmm_reversible.errors import InputError
from openmm_reversible.potential.base import UnsupportedForceError
from openmm_reversible.potential.ewald import PMEReciprocal, bspline_moduli, bspline_weights
from openmm_reversible.potential.nonbonded import (
    NonbondedTerm,
    exception_rules,
    switched_tail_integrals,
    switching_function,
)

NM = unit.nanometer
EXACT = 1e-9
"""Relative energy and RMS force error required here (the contract allows 1e-6 / 1e-5)."""

DATA = os.path.join(os.path.dirname(app.__file__), "data")


# --------------------------------------------------------------------------- systems


def _water(box_vectors) -> tuple[app.Topology, np.ndarray]:
    forcefield = app.ForceField("tip3p.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(forcefield, boxVectors=[openmm.Vec3(*v) * NM for v in box_vectors])
    return modeller.topology, np.asarray(modeller.positions.value_in_unit(NM))


@pytest.fixture(scope="module")
def water():
    """Cubic 2.0 nm box of TIP3P water (774 atoms)."""
    return _water(np.eye(3) * 2.0)


@pytest.fixture(scope="module")
def water_dodecahedron():
    """Water in a rhombic dodecahedron (OpenMM reduced form, d = 2.3 nm; 819 atoms)."""
    d = 2.3
    return _water([(d, 0, 0), (0, d, 0), (0.5 * d, 0.5 * d, 0.5 * math.sqrt(2) * d)])


@pytest.fixture(scope="module")
def villin():
    """Villin headpiece without solvent and ions (582 atoms)."""
    pdb = app.PDBFile(os.path.join(DATA, "test.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.deleteWater()
    modeller.delete([r for r in modeller.topology.residues() if r.name.upper() in ("CL", "NA")])
    return modeller.topology, np.asarray(modeller.positions.value_in_unit(NM))


def _water_system(topology, method, cutoff=1.0, tolerance=1e-6, **options) -> openmm.System:
    """Flexible TIP3P System; ``tolerance`` is OpenMM's ewaldErrorTolerance."""
    return app.ForceField("tip3p.xml").createSystem(
        topology, nonbondedMethod=method, nonbondedCutoff=cutoff * NM, rigidWater=False,
        ewaldErrorTolerance=tolerance, **options)


def _nonbonded_force(system: openmm.System) -> openmm.NonbondedForce:
    """The NonbondedForce of ``system`` (owned by ``system``: keep it alive while in use)."""
    return next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))


def _nonbonded(system: openmm.System) -> tuple[openmm.System, openmm.NonbondedForce]:
    """System holding only the NonbondedForce of ``system``, and that force."""
    index = next(i for i, f in enumerate(system.getForces())
                 if isinstance(f, openmm.NonbondedForce))
    single = single_force_system(system, index)
    return single, single.getForce(0)


def _box(system: openmm.System) -> torch.Tensor:
    return torch.tensor([[v[k].value_in_unit(NM) for k in range(3)]
                         for v in system.getDefaultPeriodicBoxVectors()], dtype=torch.float64)


def _plain(quantities) -> list[float]:
    """Values of OpenMM getter results in MD units (e, nm, kJ/mol)."""
    return [q.value_in_unit_system(unit.md_unit_system) for q in quantities]


def _energy_forces(term: NonbondedTerm, positions: np.ndarray, box: torch.Tensor | None,
                   sites: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energy = term(x, box, sites)
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -grad.numpy()


def _compare(system: openmm.System, positions: np.ndarray, tol: float = EXACT
             ) -> tuple[float, float]:
    """Twin vs Reference for the NonbondedForce of ``system``; asserts and returns errors."""
    single, force = _nonbonded(system)
    reference = reference_energy_forces(single, positions)
    term = NonbondedTerm(force, 0, single)
    errors = relative_errors(*_energy_forces(term, positions, _box(single)), *reference)
    assert errors[0] <= tol and errors[1] <= tol, errors
    return errors


# --------------------------------------------------------------------------- vs OpenMM


def test_water_reaction_field(water):
    system = _water_system(water[0], app.CutoffPeriodic)
    assert _nonbonded_force(system).getReactionFieldDielectric() == pytest.approx(78.3)
    _compare(system, water[1])


@pytest.mark.parametrize("method", [app.PME, app.Ewald], ids=["PME", "Ewald"])
def test_water_ewald_methods(water, method):
    _compare(_water_system(water[0], method), water[1])


@pytest.mark.parametrize("method", [app.CutoffPeriodic, app.PME], ids=["RF", "PME"])
def test_triclinic_dodecahedron(water_dodecahedron, method):
    topology, positions = water_dodecahedron
    system = _water_system(topology, method, cutoff=0.8, tolerance=1e-5)
    assert _box(system).tril(-1).abs().sum() > 1.0
    _compare(system, positions)


@pytest.mark.parametrize("method", [app.CutoffPeriodic, app.PME], ids=["RF", "PME"])
def test_switching_and_dispersion_correction(water, method):
    system = _water_system(water[0], method, tolerance=1e-5, switchDistance=0.85 * NM)
    single, force = _nonbonded(system)
    assert force.getUseSwitchingFunction() and force.getUseDispersionCorrection()
    _compare(system, water[1])
    # The correction alone, at a different volume: it scales as 1/V and must match OpenMM's.
    term = NonbondedTerm(force, 0, single)
    box = _box(single) * 1.1
    particles, _ = term.current_parameters()
    correction = float(term.dispersion_energy(particles, box))
    force.setUseDispersionCorrection(False)
    without = reference_energy_forces(single, water[1] * 1.1, box.numpy())[0]
    force.setUseDispersionCorrection(True)
    with_correction = reference_energy_forces(single, water[1] * 1.1, box.numpy())[0]
    assert correction < 0.0
    assert correction == pytest.approx(with_correction - without, rel=1e-9)


def test_parameter_offsets(water):
    system = _water_system(water[0], app.PME, tolerance=1e-4)
    force = _nonbonded_force(system)
    force.addGlobalParameter("lambda_q", 0.3)
    force.addGlobalParameter("lambda_lj", -0.4)
    force.addParticleParameterOffset("lambda_q", 0, 0.5, 0.0, 0.0)
    force.addParticleParameterOffset("lambda_lj", 3, -0.1, 0.02, 0.3)
    force.addExceptionParameterOffset("lambda_q", 0, 0.2, 0.0, 0.0)
    force.addExceptionParameterOffset("lambda_lj", 5, -0.1, 0.0, 0.0)
    _compare(system, water[1])


@pytest.mark.parametrize("method", [app.NoCutoff, app.CutoffNonPeriodic],
                         ids=["NoCutoff", "CutoffNonPeriodic"])
def test_villin_amber(villin, method):
    system = app.ForceField("amber14-all.xml").createSystem(
        villin[0], nonbondedMethod=method, nonbondedCutoff=1.0 * NM)
    _compare(system, villin[1])


def test_villin_switching_nonperiodic(villin):
    system = app.ForceField("amber14-all.xml").createSystem(
        villin[0], nonbondedMethod=app.CutoffNonPeriodic, nonbondedCutoff=1.0 * NM,
        switchDistance=0.9 * NM)
    _compare(system, villin[1])


def test_villin_pme_net_charge(villin):
    """A charged solute (+2 e) in a periodic box: neutralizing-plasma term and exclusions."""
    topology = villin[0]
    topology.setPeriodicBoxVectors(np.eye(3) * 4.5 * NM)
    try:
        system = app.ForceField("amber14-all.xml").createSystem(
            topology, nonbondedMethod=app.PME, nonbondedCutoff=1.0 * NM,
            ewaldErrorTolerance=5e-5)
    finally:
        topology.setPeriodicBoxVectors(None)
    force = _nonbonded_force(system)
    charges = [_plain(force.getParticleParameters(i))[0] for i in range(force.getNumParticles())]
    assert sum(charges) == pytest.approx(2.0)
    _compare(system, villin[1])


# --------------------------------------------------------------------------- exceptions


def test_exception_rules_classification():
    particles = np.array([[0.5, 0.30, 0.4],
                          [-0.4, 0.20, 0.9],
                          [0.0, 0.10, 0.0],
                          [0.3, 0.25, 0.6],
                          [0.0, 0.20, 0.5]])
    pairs = np.array([[0, 1], [0, 2], [1, 3], [2, 3], [0, 3], [0, 4]])
    exceptions = np.array([
        [0.5 * -0.4 / 1.2, 0.25, 0.5 * math.sqrt(0.4 * 0.9)],   # Amber 1-4
        [0.0, 1.0, 0.0],                                         # exclusion
        [-0.4 * 0.3 / 1.2, 0.31, 0.7],                           # special 1-4 LJ
        [0.2, 0.175, 0.0],                                       # charge from nothing
        [0.0, 0.275, 0.0],                                       # exclusion, sigma = mean
        [0.0, 0.25, 0.5 * math.sqrt(0.4 * 0.5)],                 # 1-4 with a neutral atom
    ])
    rules = exception_rules(particles, pairs, exceptions)
    np.testing.assert_array_equal(rules["charge_rule"], [True, True, True, False, True, True])
    np.testing.assert_array_equal(rules["lj_rule"], [True, False, False, True, True, True])
    assert rules["charge_scale"][0] == pytest.approx(1 / 1.2)
    assert rules["lj_scale"][0] == pytest.approx(0.5)
    # Exclusions have zero scales; scales the data leave open take the force's common value.
    assert rules["charge_scale"][1] == 0.0 and rules["charge_scale"][4] == 0.0
    assert rules["lj_scale"][4] == 0.0
    assert rules["charge_scale"][5] == pytest.approx(1 / 1.2)
    assert rules["lj_scale"][3] == pytest.approx(0.5)
    assert rules["lj_scale"][5] == pytest.approx(0.5)


def test_exceptions_follow_trained_particles(villin):
    """Binding a particle's parameters to sites moves its 1-4 exceptions by the Amber rule."""
    topology, positions = villin
    system = app.ForceField("amber14-all.xml").createSystem(topology,
                                                            nonbondedMethod=app.NoCutoff)
    single, force = _nonbonded(system)
    term = NonbondedTerm(force, 0, single)
    atom = next(a.index for a in topology.atoms() if a.name == "CB")
    q, s, e = _plain(force.getParticleParameters(atom))
    new = (1.3 * q, 1.1 * s, 1.5 * e)
    table = term.tables["particles"]
    for column, name in enumerate(("charge", "sigma", "epsilon")):
        table.bind([atom], name, [column])
    sites = torch.tensor(new, dtype=torch.float64)

    # Independent reference: the Amber rule applied by hand in a copy of the force.
    force.setParticleParameters(atom, *new)
    changed = 0
    for k in range(force.getNumExceptions()):
        i, j, *params = force.getExceptionParameters(k)
        qq, _, eps = _plain(params)
        if atom in (i, j) and (qq != 0.0 or eps != 0.0):
            (qi, si, ei), (qj, sj, ej) = (_plain(force.getParticleParameters(a)) for a in (i, j))
            force.setExceptionParameters(k, i, j, qi * qj / 1.2, 0.5 * (si + sj),
                                         0.5 * math.sqrt(ei * ej))
            changed += 1
    assert changed >= 3
    reference = reference_energy_forces(single, positions)
    errors = relative_errors(*_energy_forces(term, positions, None, sites), *reference)
    assert errors[0] <= EXACT and errors[1] <= EXACT, errors


# --------------------------------------------------------------------------- derivatives


def _central(f, x: torch.Tensor, direction: torch.Tensor, h: float) -> torch.Tensor:
    return (f(x + h * direction) - f(x - h * direction)) / (2.0 * h)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_hessian_vector_product_villin(villin):
    topology, positions = villin
    system = app.ForceField("amber14-all.xml").createSystem(topology,
                                                            nonbondedMethod=app.NoCutoff)
    single, force = _nonbonded(system)
    term = NonbondedTerm(force, 0, single)
    gen = torch.Generator().manual_seed(7)
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def gradient(y: torch.Tensor) -> torch.Tensor:
        y = y.detach().requires_grad_(True)
        return torch.autograd.grad(term(y, None), y)[0]

    (g,) = torch.autograd.grad(term(x, None), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    assert _rel(hv, _central(gradient, x.detach(), v, 1e-6)) < 1e-6


def test_pme_reciprocal_hvp_and_box_derivative(water):
    """Second derivatives through spline spreading and FFT; box derivative of the mesh sum."""
    system = _water_system(water[0], app.PME, tolerance=1e-4)
    single, force = _nonbonded(system)
    term = NonbondedTerm(force, 0, single)
    pme = term.reciprocal
    assert isinstance(pme, PMEReciprocal)
    charges = term.current_parameters()[0][:, 0]
    box = _box(single)
    gen = torch.Generator().manual_seed(3)
    x = torch.tensor(water[1], dtype=torch.float64, requires_grad=True)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    def gradient(y: torch.Tensor) -> torch.Tensor:
        y = y.detach().requires_grad_(True)
        return torch.autograd.grad(pme(y, charges, box), y)[0]

    (g,) = torch.autograd.grad(pme(x, charges, box), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    assert _rel(hv, _central(gradient, x.detach(), v, 1e-6)) < 1e-6

    b = box.clone().requires_grad_(True)
    (db,) = torch.autograd.grad(pme(x.detach(), charges, b), b)
    strain = torch.tensor([[0.3, 0.0, 0.0], [0.1, -0.2, 0.0], [0.05, 0.2, 0.4]],
                          dtype=torch.float64)
    numeric = _central(lambda bb: pme(x.detach(), charges, bb), box, strain, 1e-6)
    assert float((db * strain).sum()) == pytest.approx(float(numeric), rel=1e-6)


@pytest.mark.parametrize("case", ["villin-amber-nocutoff", "water-pme"])
def test_parameter_vjp(villin, water, case):
    """d/d(charge, sigma, epsilon) through ParameterTable bindings, of the energy and of
    ``forces · u`` (the VJP a reversible adjoint needs), vs central differences."""
    if case == "water-pme":
        topology, positions = water
        system = _water_system(topology, app.PME, cutoff=0.8, tolerance=1e-4,
                               switchDistance=0.7 * NM)
        groups = {"O": [a.index for a in topology.atoms() if a.element.symbol == "O"],
                  "H": [a.index for a in topology.atoms() if a.element.symbol == "H"]}
        bindings = [("O", "charge"), ("H", "charge"), ("O", "sigma"), ("O", "epsilon")]
    else:
        topology, positions = villin
        system = app.ForceField("amber14-all.xml").createSystem(topology,
                                                                nonbondedMethod=app.NoCutoff)
        groups = {name: [a.index for a in topology.atoms() if a.name == name]
                  for name in ("CA", "N", "O")}
        bindings = [("CA", "charge"), ("N", "sigma"), ("O", "epsilon"), ("O", "charge")]
    single, force = _nonbonded(system)
    term = NonbondedTerm(force, 0, single)
    table = term.tables["particles"]
    start = []
    for k, (group, column) in enumerate(bindings):
        table.bind(groups[group], column, k)
        start.append(float(table.base[groups[group][0], table.column(column)]))
    box = _box(single) if term.periodic else None
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    u = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def energy_and_projection(sites: torch.Tensor, create_graph: bool = False):
        energy = term(x, box, sites)
        (grad,) = torch.autograd.grad(energy, x, create_graph=create_graph)
        return energy, -(grad * u).sum()

    sites = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    energy, projection = energy_and_projection(sites, create_graph=True)
    (de,) = torch.autograd.grad(energy, sites, retain_graph=True)
    (dp,) = torch.autograd.grad(projection, sites)
    for k in range(len(start)):
        step = torch.zeros_like(sites)
        step[k] = 1e-6 * abs(start[k])
        plus = energy_and_projection(sites.detach() + step)
        minus = energy_and_projection(sites.detach() - step)
        numeric_e = float((plus[0] - minus[0]).detach()) / (2 * float(step[k]))
        numeric_p = float((plus[1] - minus[1]).detach()) / (2 * float(step[k]))
        assert float(de[k]) == pytest.approx(numeric_e, rel=1e-6), bindings[k]
        assert float(dp[k]) == pytest.approx(numeric_p, rel=1e-5), bindings[k]


# --------------------------------------------------------------------------- pieces


def test_bspline_weights_partition_of_unity_and_moduli():
    u = torch.linspace(0.0, 0.999, 7, dtype=torch.float64)
    w = bspline_weights(u)
    assert torch.allclose(w.sum(-1), torch.ones_like(u))
    assert torch.allclose(w[0], torch.tensor([1, 11, 11, 1, 0], dtype=torch.float64) / 24)
    moduli = bspline_moduli(8)
    # Even grid, odd order: the Nyquist modulus vanishes and is replaced by its neighbours.
    assert moduli[4] == pytest.approx(0.5 * (moduli[3] + moduli[5]))
    assert moduli[0] == pytest.approx(1.0)


def test_switched_tail_integrals_match_quadrature():
    rs, rc = 0.8, 1.1
    r = np.linspace(rs, rc, 20001)
    one_minus_s = 1.0 - switching_function(torch.tensor(r), rs, rc).numpy()
    i10, i4 = switched_tail_integrals(rs, rc)
    assert i10 == pytest.approx(np.trapezoid(one_minus_s * r ** -10, r), rel=1e-7)
    assert i4 == pytest.approx(np.trapezoid(one_minus_s * r ** -4, r), rel=1e-7)


def test_errors_name_the_problem(water):
    system = _water_system(water[0], app.CutoffPeriodic)
    single, force = _nonbonded(system)
    term = NonbondedTerm(force, 0, single)
    x = torch.tensor(water[1], dtype=torch.float64)
    with pytest.raises(InputError, match="no box was given"):
        term(x, None)
    with pytest.raises(InputError, match="smaller than twice the cutoff"):
        term(x, torch.eye(3, dtype=torch.float64) * 1.5)
    force.setNonbondedMethod(openmm.NonbondedForce.LJPME)
    with pytest.raises(UnsupportedForceError, match="LJPME"):
        NonbondedTerm(force, 0, single)


def test_copy_and_pickle_keep_the_energy(water):
    """A term holds no native handles in its state: deep copies and pickles evaluate alike."""
    system = _water_system(water[0], app.PME, tolerance=1e-4)
    single, force = _nonbonded(system)
    term = NonbondedTerm(force, 0, single)
    x = torch.tensor(water[1], dtype=torch.float64)
    box = _box(single)
    energy = term(x, box)
    assert "pair14" not in term.state_dict() and "tables.particles.base" in term.state_dict()
    for other in (copy.deepcopy(term), pickle.loads(pickle.dumps(term))):
        assert torch.equal(other(x, box), energy)


def test_reciprocal_space_only(water):
    """``setIncludeDirectSpace(False)``: only the mesh, self and plasma terms remain."""
    system = _water_system(water[0], app.PME, tolerance=1e-4)
    _nonbonded_force(system).setIncludeDirectSpace(False)
    _compare(system, water[1])


@pytest.mark.parametrize("periodic", [False, True], ids=["raw", "minimum-image"])
def test_exceptions_across_the_boundary(water, periodic):
    """A hydrogen moved by one box vector: exclusion corrections use the raw distance unless
    ``exceptionsUsePeriodicBoundaryConditions`` is set, exactly as OpenMM."""
    system = _water_system(water[0], app.PME, tolerance=1e-4)
    _nonbonded_force(system).setExceptionsUsePeriodicBoundaryConditions(periodic)
    positions = water[1].copy()
    positions[1] += _box(system)[0].numpy()
    _compare(system, positions)


@pytest.mark.parametrize("case", ["cube", "dodecahedron"])
def test_cached_images_follow_moves_and_wraps(water, water_dodecahedron, case):
    """Image shifts cached at the list build stay right after moves and wraps, also when the
    box is narrower than 2 (cutoff + skin), where some minimum images must change."""
    topology, x0 = water if case == "cube" else water_dodecahedron
    box_np = np.eye(3) * 2.0 if case == "cube" else None
    system = _water_system(topology, app.CutoffPeriodic, cutoff=0.95 if case == "cube" else 0.8)
    single, force = _nonbonded(system)
    box = _box(single)
    if box_np is None:
        box_np = box.numpy()
    term = NonbondedTerm(force, 0, single)
    term(torch.tensor(x0), box)  # builds the list and caches the shifts at x0
    rng = np.random.default_rng(7)
    x1 = x0 + rng.uniform(-0.02, 0.02, x0.shape)  # within the skin: no rebuild
    x1 += rng.integers(-1, 2, (len(x0), 3)) @ box_np  # wrapped by whole box vectors
    builds = term._pairs.neighbors.n_builds
    cached = term.interacting_pairs(torch.tensor(x1), box)
    assert term._pairs.neighbors.n_builds == builds
    fresh = NonbondedTerm(force, 0, single).interacting_pairs(torch.tensor(x1), box)

    def by_pair(i, j, shifts):
        pairs = zip(i.tolist(), j.tolist(), strict=True)
        return dict(zip(pairs, map(tuple, shifts.tolist()), strict=True))

    assert by_pair(*cached) == by_pair(*fresh)
    errors = relative_errors(*_energy_forces(term, x1, box),
                             *reference_energy_forces(single, x1))
    assert errors[0] <= EXACT and errors[1] <= EXACT, errors


def test_pair_whose_minimum_image_changed_since_the_list_build():
    """Two particles almost half a box apart: after moves within the skin the minimum image
    is the other one, and inside the cutoff. The cached image is 1.079 nm long; the pair must
    still be found (2.0 nm box, cutoff 0.95 nm, skin 0.1 nm)."""
    system = openmm.System()
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) * NM for row in np.eye(3) * 2.0))
    force = openmm.NonbondedForce()
    force.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(0.95)
    for charge in (1.0, -1.0):
        system.addParticle(1.0)
        force.addParticle(charge, 0.3, 0.5)
    system.addForce(force)
    term = NonbondedTerm(force, 0, system)
    box = _box(system)
    x_ref = np.array([[0.0, 0.0, 0.0], [1.001, 0.0, 0.0]])
    assert term.interacting_pairs(torch.tensor(x_ref), box)[0].numel() == 0
    x = x_ref + np.array([[0.04, 0.0, 0.0], [-0.04, 0.0, 0.0]])  # now 0.921 nm apart
    i, j, shifts = term.interacting_pairs(torch.tensor(x), box)
    assert term._pairs.neighbors.n_builds == 1
    assert (i.tolist(), j.tolist(), shifts.tolist()) == ([0], [1], [[0.0, 0.0, 0.0]])
    errors = relative_errors(*_energy_forces(term, x, box), *reference_energy_forces(system, x))
    assert errors[0] <= EXACT and errors[1] <= EXACT, errors
