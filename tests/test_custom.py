"""Custom forces: each one alone in a System, torch twin against OpenMM's Reference platform.

Contract (docs/design.md): relative energy error <= 1e-6 and relative RMS force error <= 1e-5, in an
orthorhombic box, a triclinic box in OpenMM's reduced form, and without periodicity. Gradients
beyond forces are checked against central finite differences: one Hessian-vector product and
one parameter VJP (d(v·F)/dθ) per force type. Systems are small and built from fixed seeds.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from openmm_reference import reference_energy_forces, single_force_system

from openmm_reversible.errors import InputError
from openmm_reversible.potential.base import UnsupportedForceError
from openmm_reversible.potential.custom import (
    CustomAngleTerm,
    CustomBondTerm,
    CustomNonbondedTerm,
    CustomTorsionTerm,
)
from openmm_reversible.potential.expression import ExpressionError

ENERGY_RTOL = 1e-6
FORCE_RTOL = 1e-5

# O2 (docs/design.md, reference values): bond 0.12074 nm, sigma 0.3297 nm, epsilon 0.438 kJ/mol.
O2_BOND, O2_SIGMA, O2_EPSILON = 0.12074, 0.3297, 0.438
SPACING = 0.62  # nm between molecule centres on the starting lattice

BOXES = {
    "orthorhombic": np.diag([4 * SPACING, 4 * SPACING, 4 * SPACING]),
    # Rhombic dodecahedron (d = 2.8 nm) in OpenMM's reduced form: a along x, b in the xy
    # plane, |b_x| <= a_x/2, |c_x| <= a_x/2, |c_y| <= b_y/2.
    "triclinic": 2.8 * np.array([[1.0, 0.0, 0.0], [1 / 3, 2 * math.sqrt(2) / 3, 0.0],
                                 [-1 / 3, math.sqrt(2) / 3, math.sqrt(6) / 3]]),
    "nonperiodic": None,
}


# --------------------------------------------------------------------------- helpers


def o2_fluid(box: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """64 O2 molecules on a jittered 4×4×4 lattice (fractional in ``box`` if given), randomly
    oriented; atoms 2m and 2m+1 form molecule m. Positions (128, 3), nm, not wrapped."""
    rng = np.random.default_rng(seed)
    frac = (np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
            + 0.5) / 4
    frame = box if box is not None else np.eye(3) * 4 * SPACING
    centres = frac @ frame + rng.normal(scale=0.03, size=frac.shape)
    axis = rng.normal(size=centres.shape)
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    half = 0.5 * O2_BOND * axis
    return np.stack([centres - half, centres + half], 1).reshape(-1, 3)


def make_system(n: int, box: np.ndarray | None, force: openmm.Force) -> openmm.System:
    system = openmm.System()
    for _ in range(n):
        system.addParticle(15.999)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
    system.addForce(force)
    return system


def compare(term, system: openmm.System, positions: np.ndarray, box: np.ndarray | None
            ) -> tuple[float, float]:
    """Relative energy error and relative RMS force error of ``term`` vs OpenMM Reference."""
    e_ref, f_ref = reference_energy_forces(system, positions, box)
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    b = None if box is None else torch.tensor(box, dtype=torch.float64)
    energy = term(x, b)
    (grad,) = torch.autograd.grad(energy, x)
    forces = -grad.numpy()
    rel_energy = abs(energy.item() - e_ref) / abs(e_ref)
    rel_forces = math.sqrt(((forces - f_ref) ** 2).mean() / (f_ref**2).mean())
    return rel_energy, rel_forces


def assert_matches_openmm(term, system, positions, box) -> None:
    rel_energy, rel_forces = compare(term, system, positions, box)
    assert rel_energy <= ENERGY_RTOL, f"relative energy error {rel_energy:.2e}"
    assert rel_forces <= FORCE_RTOL, f"relative RMS force error {rel_forces:.2e}"


def assert_hessian_vector_product(term, positions, box, seed: int = 3, h: float = 1e-5,
                                  rtol: float = 1e-6) -> None:
    """H v by double backward vs central differences of the gradient along v."""
    rng = np.random.default_rng(seed)
    v = torch.tensor(rng.normal(size=positions.shape), dtype=torch.float64)
    b = None if box is None else torch.tensor(box, dtype=torch.float64)

    def gradient(x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        return torch.autograd.grad(term(x, b), x, create_graph=create_graph)[0]

    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    (hv,) = torch.autograd.grad((gradient(x, True) * v).sum(), x)
    plus = gradient(torch.tensor(positions, dtype=torch.float64, requires_grad=True) + h * v)
    minus = gradient(torch.tensor(positions, dtype=torch.float64, requires_grad=True) - h * v)
    fd = (plus - minus) / (2 * h)
    error = torch.linalg.norm(hv - fd) / torch.linalg.norm(fd)
    assert error <= rtol, f"Hessian-vector product relative error {error:.2e}"


def assert_parameter_vjp(term, positions, box, sites: np.ndarray, seed: int = 4,
                         rel_h: float = 1e-6, rtol: float = 1e-6) -> None:
    """d(v·F)/dθ and dE/dθ by autograd vs central differences in every site θ."""
    rng = np.random.default_rng(seed)
    v = torch.tensor(rng.normal(size=positions.shape), dtype=torch.float64)
    b = None if box is None else torch.tensor(box, dtype=torch.float64)

    def energy_and_vjp(theta: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, ...]:
        x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
        energy = term(x, b, theta)
        (grad,) = torch.autograd.grad(energy, x, create_graph=create_graph)
        return energy, -(grad * v).sum()

    theta = torch.tensor(sites, dtype=torch.float64, requires_grad=True)
    energy, vjp = energy_and_vjp(theta, True)
    d_energy, d_vjp = (torch.autograd.grad(q, theta, retain_graph=True)[0].numpy()
                       for q in (energy, vjp))
    for k in range(len(sites)):
        h = rel_h * abs(sites[k])
        values = []
        for sign in (1.0, -1.0):
            shifted = torch.tensor(sites, dtype=torch.float64)
            shifted[k] += sign * h
            values.append([q.item() for q in energy_and_vjp(shifted, False)])
        fd_energy = (values[0][0] - values[1][0]) / (2 * h)
        fd_vjp = (values[0][1] - values[1][1]) / (2 * h)
        assert d_energy[k] == pytest.approx(fd_energy, rel=rtol, abs=1e-8), f"dE/dθ[{k}]"
        assert d_vjp[k] == pytest.approx(fd_vjp, rel=rtol, abs=1e-6), f"d(v·F)/dθ[{k}]"


def bind_all(table, column: str, site: int) -> None:
    """Bind ``column`` of every row of ``table`` to one site."""
    table.bind(np.arange(table.base.shape[0]), column, site)


# --------------------------------------------------------------------------- nonbonded forms

LB_MIXING = "sig=0.5*(sigma1+sigma2); eps=sqrt(epsilon1*epsilon2)"
# Buckingham exp-6 with the LJ minimum of O2 (alpha 13): A = 6 eps/(alpha-6) e^alpha,
# B = alpha/r_m, C = eps alpha r_m^6/(alpha-6), r_m = 2^(1/6) sigma.
_RM = 2 ** (1 / 6) * O2_SIGMA
BUCKINGHAM = (6 * O2_EPSILON / 7 * math.exp(13), 13 / _RM, O2_EPSILON * 13 * _RM**6 / 7)

FORMS = {
    "lennard-jones": (f"4*eps*((sig/r)^12-(sig/r)^6); {LB_MIXING}",
                      ("sigma", "epsilon"), (O2_SIGMA, O2_EPSILON), {}),
    "mie": (f"c*eps*((sig/r)^n-(sig/r)^m); c=(n/(n-m))*(n/m)^(m/(n-m)); {LB_MIXING}",
            ("sigma", "epsilon"), (O2_SIGMA, O2_EPSILON), {"n": 14.0, "m": 6.0}),
    "buckingham": ("A*exp(-B*r)-C/r^6; A=sqrt(A1*A2); B=2/(1/B1+1/B2); C=sqrt(C1*C2)",
                   ("A", "B", "C"), BUCKINGHAM, {}),
    "double-exponential": ("eps*(beta*exp(alpha)/(alpha-beta)*exp(-alpha*r/rm)"
                           "-alpha*exp(beta)/(alpha-beta)*exp(-beta*r/rm)); rm=2^(1/6)*sig; "
                           + LB_MIXING, ("sigma", "epsilon"), (O2_SIGMA, O2_EPSILON),
                           {"alpha": 16.766, "beta": 4.427}),
    "lj-soft-core": ("4*eps*lambda*(1/s^2-1/s); s=alpha_sc*(1-lambda)+(r/sig)^6; " + LB_MIXING,
                     ("sigma", "epsilon"), (O2_SIGMA, O2_EPSILON),
                     {"lambda": 0.6, "alpha_sc": 0.5}),
    "buffered-14-7": ("eps*((1+delta)/(rho+delta))^7*((1+gamma)/(rho^7+gamma)-2); rho=r/rm; "
                      "rm=2^(1/6)*sig; " + LB_MIXING, ("sigma", "epsilon"),
                      (O2_SIGMA, O2_EPSILON), {"delta": 0.07, "gamma": 0.12}),
}


def nonbonded_force(form: str, geometry: str) -> openmm.CustomNonbondedForce:
    """The O2 fluid with functional form ``form``: two particle kinds (every third molecule's
    parameters scaled) so mixing and the class sums of the long-range correction matter."""
    energy, names, values, globals_ = FORMS[form]
    force = openmm.CustomNonbondedForce(energy)
    for name in names:
        force.addPerParticleParameter(name)
    for name, value in globals_.items():
        force.addGlobalParameter(name, value)
    for i in range(128):
        scale = 1.04 if (i // 2) % 3 == 0 else 1.0
        force.addParticle([v * scale for v in values])
    for m in range(64):
        force.addExclusion(2 * m, 2 * m + 1)
    force.setCutoffDistance(1.0)
    if geometry == "nonperiodic":
        force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffNonPeriodic)
        force.setUseSwitchingFunction(True)
        force.setSwitchingDistance(0.85)
    else:
        force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
        force.setUseLongRangeCorrection(True)
        force.setUseSwitchingFunction(geometry == "orthorhombic")
        force.setSwitchingDistance(0.8)
    return force


@pytest.mark.parametrize("geometry", list(BOXES))
@pytest.mark.parametrize("form", list(FORMS))
def test_nonbonded_forms_match_openmm(form, geometry):
    box = BOXES[geometry]
    force = nonbonded_force(form, geometry)
    system = make_system(128, box, force)
    term = CustomNonbondedTerm.from_force(force, 0, system)
    assert_matches_openmm(term, system, o2_fluid(box), box)


def test_no_cutoff_matches_openmm():
    force = nonbonded_force("lennard-jones", "nonperiodic")
    force.setNonbondedMethod(openmm.CustomNonbondedForce.NoCutoff)
    system = make_system(128, None, force)
    term = CustomNonbondedTerm.from_force(force, 0, system)
    assert term.cutoff is None and term.switch_distance is None  # OpenMM ignores both
    assert_matches_openmm(term, system, o2_fluid(None), None)


def test_long_range_correction_and_its_global_derivative_match_openmm():
    """The correction alone (with minus without) and dE/dn of the Mie exponent, which OpenMM
    computes through its own quadrature of the derivative expression."""
    box = BOXES["orthorhombic"]
    positions = o2_fluid(box)
    force = nonbonded_force("mie", "orthorhombic")
    force.addEnergyParameterDerivative("n")
    system = make_system(128, box, force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getParameterDerivatives=True)
    e_with, de_dn = state.getPotentialEnergy()._value, state.getEnergyParameterDerivatives()["n"]
    without = nonbonded_force("mie", "orthorhombic")
    without.setUseLongRangeCorrection(False)
    e_without, _ = reference_energy_forces(make_system(128, box, without), positions)

    term = CustomNonbondedTerm.from_force(nonbonded_force("mie", "orthorhombic"), 0, system)
    particles = term.tables["particles"]()
    coefficient = term.long_range_coefficient(particles, {"n": torch.tensor(14.0),
                                                          "m": torch.tensor(6.0)})
    correction = coefficient.item() / np.prod(np.diag(box))
    assert correction == pytest.approx(e_with - e_without, rel=1e-6)
    assert correction < 0

    bind_all(term.tables["globals"], "n", 0)
    bind_all(term.tables["globals"], "m", 1)
    sites = torch.tensor([14.0, 6.0], dtype=torch.float64, requires_grad=True)
    energy = term(torch.tensor(positions), torch.tensor(box), sites)
    (d_sites,) = torch.autograd.grad(energy, sites)
    assert energy.item() == pytest.approx(e_with, rel=ENERGY_RTOL)
    assert d_sites[0].item() == pytest.approx(de_dn, rel=1e-6)


def test_interaction_groups_match_openmm():
    """Asymmetric energy (particle 1 from set1) with overlapping sets, exclusions and the
    long-range correction counted over group pairs only."""
    box = BOXES["triclinic"]
    force = openmm.CustomNonbondedForce("a1*b2*(0.3/r)^6 + 0.01*a2/r^4")
    force.addPerParticleParameter("a")
    force.addPerParticleParameter("b")
    for i in range(128):
        force.addParticle([1.0 + 0.1 * (i % 5), 0.5 + 0.2 * (i % 3)])
    for m in range(64):
        force.addExclusion(2 * m, 2 * m + 1)
    force.addInteractionGroup(range(0, 80), range(40, 128))
    force.addInteractionGroup([3, 5, 7, 101], [0, 1, 2, 3, 120, 121])
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(1.0)
    force.setUseLongRangeCorrection(True)
    system = make_system(128, box, force)
    term = CustomNonbondedTerm.from_force(force, 0, system)
    assert_matches_openmm(term, system, o2_fluid(box, seed=5), box)


def test_nonbonded_hessian_vector_product_and_parameter_vjp():
    box = BOXES["orthorhombic"]
    force = nonbonded_force("mie", "orthorhombic")
    term = CustomNonbondedTerm.from_force(force, 0, make_system(128, box, force))
    positions = o2_fluid(box)
    assert_hessian_vector_product(term, positions, box)
    # Sites: sigma and epsilon of the first kind, sigma of the second, the exponent n.
    particles = term.tables["particles"]
    kind = (np.arange(128) // 2) % 3 == 0
    particles.bind(np.flatnonzero(~kind), "sigma", 0)
    particles.bind(np.flatnonzero(~kind), "epsilon", 1)
    particles.bind(np.flatnonzero(kind), "sigma", 2)
    bind_all(term.tables["globals"], "n", 3)
    sites = np.array([O2_SIGMA, O2_EPSILON, 1.04 * O2_SIGMA, 14.0])
    # Bound values equal the base values: same energy as OpenMM's.
    x = torch.tensor(positions)
    assert term(x, torch.tensor(box), torch.tensor(sites)).item() == pytest.approx(
        term(x, torch.tensor(box)).item(), rel=1e-14)
    assert_parameter_vjp(term, positions, box, sites)


def _pair_count_force() -> openmm.CustomNonbondedForce:
    force = openmm.CustomNonbondedForce("1")
    for _ in range(128):
        force.addParticle([])
    for m in range(64):
        force.addExclusion(2 * m, 2 * m + 1)
    force.setNonbondedMethod(openmm.CustomNonbondedForce.CutoffPeriodic)
    force.setCutoffDistance(1.0)
    return force


def test_strongly_tilted_box_finds_every_pair():
    """In this box OpenMM's Reference voxel neighbour list misses pairs within the cutoff
    (1993 counted instead of 1995 with seed 0); the CPU platform and the interaction-group
    path of Reference find all of them, and so must the twin."""
    box = np.array([[2.6, 0.0, 0.0], [0.8, 2.5, 0.0], [-0.6, 0.9, 2.4]])
    positions = o2_fluid(box)
    context = openmm.Context(make_system(128, box, _pair_count_force()),
                             openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(positions)
    cpu_pairs = context.getState(getEnergy=True).getPotentialEnergy()._value
    term = CustomNonbondedTerm.from_force(_pair_count_force(), 0)
    pairs = term(torch.tensor(positions), torch.tensor(box)).item()
    assert pairs == cpu_pairs == 1995


# --------------------------------------------------------------------------- bonded


def chains(n_chains: int, length: int, box: np.ndarray | None, seed: int) -> np.ndarray:
    """Random chains of ``length`` atoms (bonds 0.1–0.2 nm), each atom wrapped into the box
    on its own so that items straddle the boundaries. Positions (n_chains*length, 3), nm."""
    rng = np.random.default_rng(seed)
    frame = box if box is not None else np.eye(3) * 2.5
    atoms = []
    for _ in range(n_chains):
        x = rng.uniform(size=3) @ frame
        for _ in range(length):
            atoms.append(x)
            step = rng.normal(size=3)
            x = x + rng.uniform(0.1, 0.2) * step / np.linalg.norm(step)
    x = np.array(atoms)
    if box is not None:
        frac = x @ np.linalg.inv(box)
        x = (frac - np.floor(frac)) @ box
    return x


def bonded_force(kind: str, n_chains: int, periodic: bool, seed: int = 6) -> openmm.Force:
    """One custom bonded force over the chains, with per-item and global parameters."""
    rng = np.random.default_rng(seed)
    if kind == "bond":
        force = openmm.CustomBondForce("scale*D*(1-exp(-a*(r-r0)))^2")
        names, add, k = ("D", "a", "r0"), force.addBond, 2
        params = lambda: (rng.uniform(300, 500), rng.uniform(15, 25), rng.uniform(0.12, 0.18))  # noqa: E731
        force.addGlobalParameter("scale", 1.3)
    elif kind == "angle":
        force = openmm.CustomAngleForce("0.5*k*(theta-theta0)^2 + c*cos(theta)^3")
        names, add, k = ("k", "theta0"), force.addAngle, 3
        params = lambda: (rng.uniform(200, 400), rng.uniform(1.7, 2.1))  # noqa: E731
        force.addGlobalParameter("c", 5.0)
    else:
        # sin(theta) is odd: a sign error in the dihedral would show.
        force = openmm.CustomTorsionForce("k*(1+cos(n*theta-theta0)) + c*sin(theta)")
        names, add, k = ("k", "n", "theta0"), force.addTorsion, 4
        params = lambda: (rng.uniform(1, 10), float(rng.integers(1, 4)),  # noqa: E731
                          rng.uniform(-3, 3))
        force.addGlobalParameter("c", 2.5)
    for name in names:
        getattr(force, {2: "addPerBondParameter", 3: "addPerAngleParameter",
                        4: "addPerTorsionParameter"}[k])(name)
    for chain in range(n_chains):
        first = chain * 5
        for start in range(first, first + 5 - k + 1):
            add(*range(start, start + k), params())
    force.setUsesPeriodicBoundaryConditions(periodic)
    return force


BONDED_TERMS = {"bond": CustomBondTerm, "angle": CustomAngleTerm, "torsion": CustomTorsionTerm}


@pytest.mark.parametrize("geometry", list(BOXES))
@pytest.mark.parametrize("kind", list(BONDED_TERMS))
def test_bonded_match_openmm(kind, geometry):
    box = BOXES[geometry]
    positions = chains(12, 5, box, seed=7)
    force = bonded_force(kind, 12, box is not None)
    system = make_system(60, box, force)
    term = BONDED_TERMS[kind].from_force(force, 0, system)
    assert term.periodic == (box is not None)
    assert_matches_openmm(term, system, positions, box)


@pytest.mark.parametrize("kind", list(BONDED_TERMS))
def test_bonded_hessian_vector_product_and_parameter_vjp(kind):
    box = BOXES["triclinic"]
    positions = chains(6, 5, box, seed=8)
    force = bonded_force(kind, 6, True)
    term = BONDED_TERMS[kind].from_force(force, 0, make_system(30, box, force))
    assert_hessian_vector_product(term, positions, box)
    table = term.tables[term.table_name]
    first = table.columns[0]
    table.bind([0, 2], first, 0)                          # two items share one site
    table.bind([1], table.columns[-1], 1)
    global_name = term.tables["globals"].columns[0]
    bind_all(term.tables["globals"], global_name, 2)
    base = table.base.numpy()
    sites = np.array([base[0, 0], base[1, -1], term.tables["globals"].base[0, 0].item()])
    table.base[2, 0] = base[0, 0]                         # the shared site's value
    assert_parameter_vjp(term, positions, box, sites)


# --------------------------------------------------------------------------- a real force field


@pytest.fixture(scope="module")
def charmm() -> app.ForceField:
    """CHARMM36 with one extra NBFIX pair (CTL2–HAL2, present in DPPC and in its 1-4 pairs),
    so the NBFIX paths of both the nonbonded tables and the 1-4 bonds are exercised."""
    nbfix = io.StringIO(
        '<ForceField><LennardJonesForce lj14scale="1.0">'
        '<NBFixPair type1="CTL2" type2="HAL2" sigma="0.27" epsilon="0.12"/>'
        "</LennardJonesForce></ForceField>")
    return app.ForceField("charmm36.xml", nbfix)


def dppc_lipid_system(forcefield: app.ForceField, nonbonded_method,
                      box: np.ndarray | None = None, **kwargs) -> tuple[openmm.System, np.ndarray]:
    """One DPPC lipid (the first 130 atoms of OpenMM's DPPC.pdb, with their CONECT records).
    CHARMM36's ``LennardJonesForce`` makes a CustomNonbondedForce over Discrete2DFunction A/B
    tables and a CustomBondForce for the 1-4 pairs; its impropers are a CustomTorsionForce."""
    n_atoms = 130
    lines = []
    with open(os.path.join(os.path.dirname(app.__file__), "data", "DPPC.pdb")) as handle:
        for line in handle:
            if line.startswith(("HETATM", "ATOM")) and int(line[6:11]) <= n_atoms:
                lines.append(line)
            elif line.startswith("CONECT") and all(int(a) <= n_atoms for a in line.split()[1:]):
                lines.append(line)
    pdb = app.PDBFile(io.StringIO("".join(lines) + "END\n"))
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    if box is not None:
        pdb.topology.setPeriodicBoxVectors(box)
        positions = positions - positions.mean(0) + np.diag(box) / 2
    system = forcefield.createSystem(pdb.topology, nonbondedMethod=nonbonded_method, **kwargs)
    return system, positions


def _force_index(system: openmm.System, name: str) -> int:
    return next(i for i, f in enumerate(system.getForces()) if f.getName() == name)


@pytest.mark.filterwarnings("ignore:Conflicting settings for useDispersionCorrection")
@pytest.mark.parametrize("periodic", [False, True])
def test_charmm_lennard_jones_force_matches_openmm(charmm, periodic):
    if periodic:
        box = np.diag([4.0, 4.0, 4.5])
        system, positions = dppc_lipid_system(charmm, app.CutoffPeriodic, box,
                                              nonbondedCutoff=1.0, switchDistance=0.9,
                                              useDispersionCorrection=True)
    else:
        system, positions = dppc_lipid_system(charmm, app.NoCutoff)
        box = None
    force = system.getForce(_force_index(system, "LennardJones"))
    assert force.getNumTabulatedFunctions() == 2
    assert force.getUseLongRangeCorrection() == periodic
    # The NBFIX pair is in the A table and among the 1-4 pairs.
    acoef = force.getTabulatedFunction(0).getFunctionParameters()[2]
    assert min(abs(a / (4 * 0.12 * 0.27**12) - 1) for a in acoef) < 1e-12
    pairs14 = system.getForce(_force_index(system, "LennardJones14"))
    assert any(pairs14.getBondParameters(i)[2] == (0.27, 0.12)
               for i in range(pairs14.getNumBonds()))
    for name, cls in (("LennardJones", CustomNonbondedTerm), ("LennardJones14", CustomBondTerm),
                      ("CustomTorsionForce", CustomTorsionTerm)):
        index = _force_index(system, name)
        single = single_force_system(system, index)
        term = cls.from_force(system.getForce(index), index, system)
        assert_matches_openmm(term, single, positions, box)


def test_lennard_jones_tables_hessian_vector_product(charmm):
    system, positions = dppc_lipid_system(charmm, app.NoCutoff)
    index = _force_index(system, "LennardJones")
    term = CustomNonbondedTerm.from_force(system.getForce(index), index, system)
    assert_hessian_vector_product(term, positions, None)


# --------------------------------------------------------------------------- registry and errors


def test_factories_are_registered():
    from openmm_reversible.potential import build_term

    bond = openmm.CustomBondForce("k*r")
    bond.addPerBondParameter("k")
    bond.addBond(0, 1, [2.0])
    nonbonded = openmm.CustomNonbondedForce("r")
    nonbonded.addParticle([])
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    for force, cls in ((bond, CustomBondTerm), (openmm.CustomAngleForce("theta"), CustomAngleTerm),
                       (openmm.CustomTorsionForce("theta"), CustomTorsionTerm)):
        term = build_term(force, 4, system)
        assert type(term) is cls and term.force_index == 4 and term.name == cls.openmm_class
    assert build_term(bond, 0, system).tables["bonds"].columns == ("k",)
    with pytest.raises(InputError, match="has 1 particles but the System has 2"):
        build_term(nonbonded, 1, system)
    nonbonded.addParticle([])
    assert type(build_term(nonbonded, 1, system)) is CustomNonbondedTerm


def test_computed_values_are_unsupported():
    force = openmm.CustomNonbondedForce("s1*s2/r")
    force.addPerParticleParameter("q")
    force.addComputedValue("s", "2*q")
    force.addParticle([1.0])
    with pytest.raises(UnsupportedForceError, match=r"computed values \(s\)"):
        CustomNonbondedTerm.from_force(force, 3)


def test_undefined_variable_names_the_force_and_the_fix():
    force = openmm.CustomBondForce("0.5*k*(r-r0)^2")
    force.addPerBondParameter("k")
    force.addBond(0, 1, [100.0])
    with pytest.raises(ExpressionError, match="CustomBondForce.*undefined variable.*r0.*"
                                              "per-item or global parameters"):
        CustomBondTerm.from_force(force, 0)


def test_box_checks():
    force = nonbonded_force("lennard-jones", "orthorhombic")
    term = CustomNonbondedTerm.from_force(force, 0)
    x = torch.tensor(o2_fluid(BOXES["orthorhombic"]))
    with pytest.raises(InputError, match="no box was given"):
        term(x, None)
    with pytest.raises(InputError, match="smaller than twice the cutoff"):
        term(x, torch.eye(3, dtype=torch.float64) * 1.9)
