"""Bonded terms and CMAP against OpenMM's Reference platform, and their derivatives.

Each OpenMM force is evaluated on its own (copied into a System holding only that force) for
the villin headpiece from OpenMM's ``test.pdb`` (water and ions removed, coordinates jittered by
0.01 nm with a fixed seed), parameterized with OpenMM's amber14-all.xml, amber19-all.xml
(ff19SB CMAP) and charmm36.xml. Derivatives are checked against central finite differences:
Hessian-vector products (double backward of the energy) and parameter VJPs (gradient of
``v · F`` with respect to a table column bound to trainable sites).
"""

from __future__ import annotations

import math
import os

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from openmm_reference import reference_energy_forces, relative_errors, single_force_system

from openmm_reversible.errors import InputError
from openmm_reversible.potential import build_term
from openmm_reversible.potential.bonded import (
    CMAPTorsionTerm,
    HarmonicAngleTerm,
    HarmonicBondTerm,
    PeriodicTorsionTerm,
    RBTorsionTerm,
    dihedral_angle,
)

ENERGY_TOL = 1e-6
FORCE_TOL = 1e-5
TERMS = {cls.openmm_class: cls for cls in (HarmonicBondTerm, HarmonicAngleTerm,
                                           PeriodicTorsionTerm, RBTorsionTerm, CMAPTorsionTerm)}
# A reduced triclinic box (OpenMM's form) smaller than the protein, so that wrapping every atom
# into it separates bonded atoms by whole box vectors.
TRICLINIC_BOX = np.array([[3.2, 0.0, 0.0], [0.8, 3.0, 0.0], [-0.6, 0.7, 2.9]])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def villin():
    """Topology and jittered positions (nm) of the villin headpiece, protein only."""
    data = os.path.join(os.path.dirname(app.__file__), "data")
    pdb = app.PDBFile(os.path.join(data, "test.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.deleteWater()
    modeller.delete([r for r in modeller.topology.residues() if r.name.upper() in ("CL", "NA")])
    positions = np.asarray(modeller.getPositions().value_in_unit(openmm.unit.nanometer))
    positions = positions + np.random.default_rng(0).normal(scale=0.01, size=positions.shape)
    return modeller.topology, positions


_SYSTEMS: dict[str, openmm.System] = {}


def villin_system(villin, forcefield: str) -> openmm.System:
    """The villin System for one force field file (built once per module)."""
    if forcefield not in _SYSTEMS:
        _SYSTEMS[forcefield] = app.ForceField(forcefield).createSystem(villin[0])
    return _SYSTEMS[forcefield]


def force_index(system: openmm.System, name: str) -> int:
    return next(i for i, f in enumerate(system.getForces()) if f.__class__.__name__ == name)


def rb_system(villin) -> openmm.System:
    """RBTorsionForce over every torsion quadruple of amber14's villin, random c0..c5.

    No force field shipped with OpenMM uses Ryckaert-Bellemans torsions, so the geometry is the
    protein's and the coefficients are drawn with a fixed seed (kJ/mol, both signs).
    """
    amber = villin_system(villin, "amber14-all.xml")
    periodic = amber.getForce(force_index(amber, "PeriodicTorsionForce"))
    quads = sorted({tuple(periodic.getTorsionParameters(i)[:4])
                    for i in range(periodic.getNumTorsions())})
    coefficients = np.random.default_rng(1).normal(scale=5.0, size=(len(quads), 6))
    rb = openmm.RBTorsionForce()
    for quad, c in zip(quads, coefficients, strict=True):
        rb.addTorsion(*quad, *c)
    system = openmm.System()
    for i in range(amber.getNumParticles()):
        system.addParticle(amber.getParticleMass(i))
    system.addForce(rb)
    return system


CASES = {
    "bond": ("amber14-all.xml", "HarmonicBondForce"),
    "angle": ("amber14-all.xml", "HarmonicAngleForce"),
    "torsion": ("amber14-all.xml", "PeriodicTorsionForce"),
    "rb": (None, "RBTorsionForce"),
    "cmap-ff19SB": ("amber19-all.xml", "CMAPTorsionForce"),
    "cmap-charmm36": ("charmm36.xml", "CMAPTorsionForce"),
}


def case_system(villin, case: str) -> tuple[openmm.System, int]:
    """(System, index of the force under test) for a named case."""
    forcefield, name = CASES[case]
    system = rb_system(villin) if forcefield is None else villin_system(villin, forcefield)
    return system, force_index(system, name)


def term_for(system: openmm.System, index: int):
    force = system.getForce(index)
    return TERMS[force.__class__.__name__].from_force(force, index, system)


def term_energy_forces(term, positions: np.ndarray, box: np.ndarray | None = None,
                       sites: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    x = torch.tensor(positions, requires_grad=True)
    energy = term(x, None if box is None else torch.tensor(box), sites)
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -grad.numpy()


def assert_matches_openmm(system: openmm.System, index: int, positions: np.ndarray,
                          box: np.ndarray | None = None) -> None:
    single = single_force_system(system, index)
    ref_energy, ref_forces = reference_energy_forces(single, positions, box)
    term = term_for(single, 0)
    assert term.n_items > 0
    energy, forces = term_energy_forces(term, positions, box)
    energy_error, force_error = relative_errors(energy, forces, ref_energy, ref_forces)
    assert energy_error <= ENERGY_TOL, (energy, ref_energy)
    assert force_error <= FORCE_TOL, force_error


# --------------------------------------------------------------------------- vs OpenMM


@pytest.mark.parametrize("case", list(CASES))
def test_build_term_dispatches_to_the_bonded_twin(villin, case):
    system, index = case_system(villin, case)
    term = build_term(system.getForce(index), index, system)
    assert isinstance(term, TERMS[CASES[case][1]])
    assert term.force_index == index
    assert term.n_items == _n_items(system.getForce(index))


def _n_items(force: openmm.Force) -> int:
    if isinstance(force, openmm.HarmonicBondForce):
        return force.getNumBonds()
    if isinstance(force, openmm.HarmonicAngleForce):
        return force.getNumAngles()
    return force.getNumTorsions()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_openmm_reference(villin, case):
    system, index = case_system(villin, case)
    assert_matches_openmm(system, index, villin[1])


def test_torsion_sign_convention_with_arbitrary_phases(villin):
    """Phases other than 0 and π make the energy depend on the sign of φ."""
    amber = villin_system(villin, "amber14-all.xml")
    single = single_force_system(amber, force_index(amber, "PeriodicTorsionForce"))
    force = single.getForce(0)
    rng = np.random.default_rng(2)
    for i in range(force.getNumTorsions()):
        *atoms, _, _, k = force.getTorsionParameters(i)
        force.setTorsionParameters(i, *atoms, int(rng.integers(1, 7)),
                                   rng.uniform(-math.pi, math.pi), k)
    assert_matches_openmm(single, 0, villin[1])


def test_cmap_synthetic_maps_cover_every_patch():
    """Two random maps of odd and even size, many random (φ, ψ) pairs: grid order, patch
    lookup and spline coefficients all matter."""
    rng = np.random.default_rng(3)
    n_pairs = 400
    force = openmm.CMAPTorsionForce()
    for size in (7, 10):
        force.addMap(size, rng.normal(scale=3.0, size=size * size).tolist())
    for p in range(n_pairs):
        a = 5 * p  # two torsions sharing three atoms, as φ/ψ do in a protein backbone
        force.addTorsion(p % 2, a, a + 1, a + 2, a + 3, a + 1, a + 2, a + 3, a + 4)
    system = openmm.System()
    for _ in range(5 * n_pairs):
        system.addParticle(12.0)
    system.addForce(force)
    positions = rng.uniform(0.0, 0.3, size=(5 * n_pairs, 3))
    assert_matches_openmm(system, 0, positions)


@pytest.mark.parametrize("case", ["bond", "angle", "torsion", "rb", "cmap-ff19SB"])
def test_periodic_force_with_atoms_wrapped_into_triclinic_box(villin, case):
    system, index = case_system(villin, case)
    single = single_force_system(system, index)
    single.getForce(0).setUsesPeriodicBoundaryConditions(True)
    single.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in TRICLINIC_BOX))
    x = villin[1]
    wrapped = x - np.floor(x @ np.linalg.inv(TRICLINIC_BOX)) @ TRICLINIC_BOX
    term = term_for(single, 0)
    raw = np.linalg.norm(np.diff(wrapped[term.atoms.numpy()], axis=1), axis=-1)
    assert (raw > 1.0).any(), "no item straddles the box: the test would not test wrapping"
    assert_matches_openmm(single, 0, wrapped, TRICLINIC_BOX)


def test_periodic_term_without_box_is_an_input_error():
    term = HarmonicBondTerm([[0, 1]], [[0.1, 1000.0]], periodic=True)
    with pytest.raises(InputError, match="periodic boundary conditions but no box"):
        term(torch.zeros(2, 3, dtype=torch.float64), None)


def test_cmap_map_of_wrong_length_is_an_input_error():
    with pytest.raises(InputError, match="size 4 needs 16 energies"):
        CMAPTorsionTerm([list(range(8))], [0], [(4, np.zeros(15))])


def test_empty_forces_give_zero_energy():
    x = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    for force in (openmm.HarmonicBondForce(), openmm.HarmonicAngleForce(),
                  openmm.PeriodicTorsionForce(), openmm.RBTorsionForce(),
                  openmm.CMAPTorsionForce()):
        energy = TERMS[force.__class__.__name__].from_force(force)(x, None)
        assert energy.item() == 0.0


# --------------------------------------------------------------------------- derivatives


def forces_at(term, x: np.ndarray, sites: torch.Tensor | None = None) -> torch.Tensor:
    return -torch.func.grad(lambda y: term(y, None, sites))(torch.tensor(x))


@pytest.mark.parametrize("case", ["bond", "angle", "torsion", "rb", "cmap-charmm36"])
def test_hessian_vector_product_matches_finite_differences(villin, case):
    system, index = case_system(villin, case)
    term = term_for(system, index)
    x0 = villin[1]
    v = np.random.default_rng(4).normal(size=x0.shape)
    x = torch.tensor(x0, requires_grad=True)
    (grad,) = torch.autograd.grad(term(x, None), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * torch.tensor(v)).sum(), x)
    eps = 1e-6
    fd = -(forces_at(term, x0 + eps * v) - forces_at(term, x0 - eps * v)) / (2 * eps)
    error = float(torch.linalg.norm(hvp - fd) / torch.linalg.norm(hvp))
    assert error < 1e-6, error


VJP_CASES = [("bond", "bonds", "length"), ("bond", "bonds", "k"), ("angle", "angles", "angle"),
             ("torsion", "torsions", "phase"), ("rb", "torsions", "c3"),
             ("cmap-ff19SB", "maps", "energy")]


@pytest.mark.parametrize(("case", "table", "column"), VJP_CASES)
def test_parameter_vjp_through_forces_matches_finite_differences(villin, case, table, column):
    """d(v · F)/dθ with θ a table column bound one-to-one to trainable sites."""
    system, index = case_system(villin, case)
    term = term_for(system, index)
    params = term.tables[table]
    n = params.base.shape[0]
    params.bind(np.arange(n), column, np.arange(n))
    base_values = params.base[:, params.column(column)].clone()
    x0 = villin[1]
    rng = np.random.default_rng(5)
    v = torch.tensor(rng.normal(size=x0.shape))
    u = torch.tensor(rng.normal(size=n)) * base_values.abs().clamp(min=1e-3)

    # The bound path at the base values is the unbound energy.
    assert term(torch.tensor(x0), None, base_values).item() == pytest.approx(
        term(torch.tensor(x0), None).item(), rel=1e-12)

    sites = base_values.clone().requires_grad_(True)
    x = torch.tensor(x0, requires_grad=True)
    (grad_x,) = torch.autograd.grad(term(x, None, sites), x, create_graph=True)
    (vjp,) = torch.autograd.grad((-grad_x * v).sum(), sites)

    eps = 1e-6

    def v_dot_forces(s):
        return float((forces_at(term, x0, s) * v).sum())

    fd = (v_dot_forces(base_values + eps * u) - v_dot_forces(base_values - eps * u)) / (2 * eps)
    assert float(vjp @ u) == pytest.approx(fd, rel=1e-6)


def test_planar_and_linear_geometries_have_finite_second_derivatives():
    """cis/trans dihedrals and a nearly linear angle: where acos would give infinite slopes."""
    chain = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, 0.0], [0.15, 0.0, 0.0],
                          [0.15, -0.1, 0.0], [0.15, 0.1, 0.0]], dtype=torch.float64)
    trans = PeriodicTorsionTerm([[0, 1, 2, 3]], [2], [[0.3, 4.0]])
    cis = PeriodicTorsionTerm([[0, 1, 2, 4]], [3], [[0.0, 4.0]])
    linear = HarmonicAngleTerm([[0, 1, 2]], [[2.0, 300.0]])
    x = chain.clone()
    x[0] = torch.tensor([-0.1, 1e-7, 0.0], dtype=torch.float64)  # angle 0-1-2 ≈ π
    for term, positions in ((trans, chain), (cis, chain), (linear, x)):
        y = positions.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(term(y, None), y, create_graph=True)
        (hvp,) = torch.autograd.grad(grad.sum(), y)
        assert torch.isfinite(grad).all() and torch.isfinite(hvp).all()
    phi = dihedral_angle(*(chain[[1, 2, 3]] - chain[[0, 1, 2]]))
    assert abs(abs(phi.item()) - math.pi) < 1e-12  # trans: x0 and x3 on opposite sides
