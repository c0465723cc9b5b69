"""Constrained dynamics (rigid water, HBonds): the projections, the step against OpenMM's
Reference platform fed the same noise, reversible gradients against backpropagation through
time, reconstruction after many steps back, and the errors of the public API.

Systems: rigid TIP3P boxes (reaction field) from :func:`~openmm_reversible.benchmarks.water
.rigid_water` and alanine dipeptide with HBonds constraints
(:func:`~openmm_reversible.systems.alanine_dipeptide`, amber14, vacuum).
"""

import numpy as np
import openmm
import openmm.app as app
import pytest
import torch
from openmm import unit
from test_reversible import (
    TOL,
    compare_with_bptt,
    gradients,
    kinetic_and_energy_loss,
    position_loss,
)

from openmm_reversible.benchmarks.water import rigid_water
from openmm_reversible.errors import InputError
from openmm_reversible.integrators import (
    Constraints,
    LangevinMiddleIntegrator,
    ReversibleSimulation,
)
from openmm_reversible.integrators.constrained import ConstrainedLangevin
from openmm_reversible.integrators.forces import accelerations
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential
from openmm_reversible.systems import alanine_dipeptide
from openmm_reversible.units import positions_tensor


def dipeptide():
    """Alanine dipeptide with HBonds (12 constraints in clusters of 1 to 3), the σ and ε of
    the CT and HC types trainable; positions on the constraints to round-off."""
    peptide = alanine_dipeptide(constraints=app.HBonds, removeCMMotion=False)
    parameters = ParameterSet.select(
        "amber14/protein.ff14SB.xml", peptide.topology,
        [("NonbondedForce/Atom", "protein-CT", ("sigma", "epsilon")),
         ("NonbondedForce/Atom", "protein-HC", ("sigma", "epsilon"))],
        nonbondedMethod=app.NoCutoff, constraints=app.HBonds, removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters)
    constraints = Constraints.from_system(parameters.system)
    x = positions_tensor(peptide.positions)
    x = constraints.project_positions(x, x, 1.0 / potential.masses)[0]
    return parameters.system, potential, constraints, x


def water_cluster(forcefield: str, model: str, oxygen: str, n_waters: int = 4):
    """``n_waters`` rigid waters of ``forcefield`` in vacuum (no cutoff): the molecules nearest
    the first of a Modeller box of ``model`` geometry, σ and ε of the ``oxygen`` type trainable.
    Returns the potential, its constraints and positions on them to round-off (sites placed).
    Small enough for backpropagation through 1000 steps in a test."""
    ff = app.ForceField(forcefield)
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(ff, model=model, numAdded=30, neutralize=False)
    x = np.asarray(modeller.getPositions().value_in_unit(unit.nanometer))
    residues = list(modeller.topology.residues())
    oxygens = x[[next(iter(r.atoms())).index for r in residues]]
    nearest = set(np.argsort(np.linalg.norm(oxygens - oxygens[0], axis=1))[:n_waters].tolist())
    modeller.delete([r for k, r in enumerate(residues) if k not in nearest])
    modeller.topology.setPeriodicBoxVectors(None)
    parameters = ParameterSet.select(
        forcefield, modeller.topology, [("NonbondedForce/Atom", oxygen, ("sigma", "epsilon"))],
        nonbondedMethod=app.NoCutoff, rigidWater=True, removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters)
    constraints = Constraints.from_system(parameters.system)
    x = positions_tensor(modeller.getPositions())
    x, _ = constraints.constrain_state(x, torch.zeros_like(x), potential.masses)
    if potential.virtual_sites is not None:
        x = potential.virtual_sites(x)
    return potential, constraints, x


def without_settle(system: openmm.System) -> openmm.System:
    """The same System with one O-H distance of every water longer by 1e-7 nm, so that OpenMM
    constrains it with CCMA (converged to its tolerance) instead of SETTLE."""
    seen = set()
    for k in range(system.getNumConstraints()):
        a, b, d = system.getConstraintParameters(k)
        if a not in seen and abs(d.value_in_unit(unit.nanometer) - 0.09572) < 1e-9:
            seen.add(a)
            system.setConstraintParameters(k, a, b, d + 1e-7 * unit.nanometer)
    return system


def openmm_langevin_middle(c: float, dt: float) -> openmm.CustomIntegrator:
    """OpenMM's LangevinMiddleIntegrator with constraints as a CustomIntegrator whose noise
    ``s·ξ`` is the per-dof variable ``noise``, set from torch before each step."""
    integrator = openmm.CustomIntegrator(dt)
    integrator.addGlobalVariable("c", c)
    integrator.addPerDofVariable("noise", 0.0)
    integrator.addPerDofVariable("x1", 0.0)
    integrator.addUpdateContextState()
    integrator.addComputePerDof("v", "v + dt*f/m")
    integrator.addConstrainVelocities()
    integrator.addComputePerDof("x", "x + 0.5*dt*v")
    integrator.addComputePerDof("v", "c*v + noise")
    integrator.addComputePerDof("x", "x + 0.5*dt*v")
    integrator.addComputePerDof("x1", "x")
    integrator.addConstrainPositions()
    integrator.addComputePerDof("v", "v + (x - x1)/dt")
    return integrator


def openmm_deviation(system, potential, constraints, x, box, integ, n_steps, reset=False,
                     custom=True):
    """Largest position difference (nm) between the torch step and OpenMM's Reference
    platform over ``n_steps`` fed the same noise (``reset``: OpenMM restarts from the torch
    state every step, so each step is compared on its own)."""
    if custom:
        om_integrator = openmm_langevin_middle(integ.c, integ.timestep)
    else:
        om_integrator = openmm.LangevinMiddleIntegrator(integ.temperature, integ.friction,
                                                        integ.timestep)
    om_integrator.setConstraintTolerance(1e-14)
    context = openmm.Context(system, om_integrator, openmm.Platform.getPlatformByName("Reference"))
    if box is not None:
        context.setPeriodicBoxVectors(*box.numpy())
    scheme = ConstrainedLangevin(integ, constraints, potential.masses)
    v = integ.noise(0, potential.masses)
    context.setPositions(x.numpy())
    context.setVelocities(v.numpy())
    worst = 0.0
    for n in range(1, n_steps + 1):
        if reset:
            context.setPositions(x.numpy())
            context.setVelocities(v.numpy())
        if custom and integ.s:
            noise = (integ.s * integ.noise(n, potential.masses)).numpy()
            om_integrator.setPerDofVariableByName("noise", [openmm.Vec3(*r) for r in noise])
        om_integrator.step(1)
        a, _ = accelerations(potential, x, box, 1.0 / potential.masses)
        with torch.no_grad():
            x, v = scheme.step(x, v, a, n)
        state = context.getState(getPositions=True)
        reference = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        worst = max(worst, float(np.abs(np.asarray(reference) - x.numpy()).max()))
    assert constraints.residual(x) < 1e-14
    return worst


# -- the projections ---------------------------------------------------------------------------


def test_projections_satisfy_the_constraints_and_the_implicit_vjp_is_exact():
    """Π(u; x) lands on the constraints to round-off; P_x q is tangent; the implicit-function
    VJP of Π equals autograd through a Newton step at the solution."""
    _, potential, constraints, x = dipeptide()
    assert constraints.clusters.shape == (6, 3)  # three CH₃ (3 each), two N-H, Cα-H
    inv_masses = 1.0 / potential.masses
    gen = torch.Generator().manual_seed(3)
    u = x + 0.003 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    projected, _ = constraints.project_positions(u, x, inv_masses)
    assert constraints.residual(u) > 1e-3
    assert constraints.residual(projected) < 1e-14
    q = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    tangent = constraints.project_velocities(x, q, inv_masses)
    assert float(constraints.gradient_dot(x, tangent).abs().max()) < 1e-14
    torch.testing.assert_close(constraints.project_velocities(x, tangent, inv_masses), tangent,
                               rtol=0, atol=1e-14)

    weights = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    grads = []
    for autograd in (False, True):
        leaves = (u.clone().requires_grad_(True), x.clone().requires_grad_(True))
        out, _ = constraints.project_positions(*leaves, inv_masses, autograd=autograd)
        grads.append(torch.autograd.grad((out * weights).sum(), leaves))
    for implicit, newton in zip(*grads, strict=True):
        assert float((implicit - newton).abs().max() / newton.abs().max()) < 1e-12


# -- the step against OpenMM ----------------------------------------------------------------


@pytest.fixture(scope="module")
def water30():
    return rigid_water(30, cutoff=0.45, seed=4)


@pytest.mark.parametrize("friction", [1.0, 0.0])
def test_rigid_water_steps_match_openmm_with_the_same_noise(water30, friction):
    """40 steps of rigid TIP3P against OpenMM's Reference platform (CCMA at tolerance 1e-14):
    the trajectories agree to 1e-12 nm, noise included."""
    system = without_settle(openmm.XmlSerializer.clone(water30.potential.parameters_set.system))
    constraints = Constraints.from_system(system)
    potential = TorchPotential(system)
    x = constraints.project_positions(water30.positions, water30.positions,
                                      1.0 / potential.masses)[0]
    integ = LangevinMiddleIntegrator(0.002, friction, 295.15, seed=9)
    assert openmm_deviation(system, potential, constraints, x, water30.box, integ, 40) < 1e-12


def test_rigid_water_steps_match_openmm_settle_to_its_geometry(water30):
    """With OpenMM's own SETTLE each step agrees to 1e-8 nm: the Reference SETTLE returns
    molecules whose O-H and H-H distances are off by ~6e-9 and ~3e-8 (relative), which is
    OpenMM's, not the step's (the CCMA comparison above agrees to 1e-12 nm)."""
    system = water30.potential.parameters_set.system
    integ = LangevinMiddleIntegrator(0.002, 1.0, 295.15, seed=9)
    deviation = openmm_deviation(system, water30.potential, water30.constraints,
                                 water30.positions, water30.box, integ, 10, reset=True)
    assert deviation < 1e-8


@pytest.mark.parametrize("custom", [True, False])
def test_hbonds_peptide_steps_match_openmm(custom):
    """Alanine dipeptide with HBonds: with noise through the CustomIntegrator, and without
    friction against OpenMM's LangevinMiddleIntegrator itself, 40 steps agree to 1e-12 nm."""
    system, potential, constraints, x = dipeptide()
    integ = LangevinMiddleIntegrator(0.002, 1.0 if custom else 0.0, 300.0, seed=5)
    deviation = openmm_deviation(system, potential, constraints, x, None, integ, 40,
                                 custom=custom)
    assert deviation < 1e-12


# -- reversible gradients ------------------------------------------------------------------------


@pytest.mark.parametrize("friction, n_steps", [(1.0, 45), (0.0, 15)])
def test_rigid_water_reversible_matches_bptt(water30, friction, n_steps):
    """Gradients of σ, ε, x₀ and v₀ through constrained dynamics, reversible = BPTT."""
    integ = LangevinMiddleIntegrator(0.002, friction, 295.15, seed=2)
    err, info = compare_with_bptt(water30.potential, integ, water30.positions,
                                  integ.noise(0, water30.potential.masses),
                                  kinetic_and_energy_loss, n_steps, n_steps // 3,
                                  box=water30.box, constraints=water30.constraints)
    assert err < TOL
    assert info["reconstruction_error"] < 1e-12


def test_hbonds_peptide_reversible_matches_bptt():
    _, potential, constraints, x = dipeptide()
    integ = LangevinMiddleIntegrator(0.002, 1.0, 300.0, seed=6)
    err, info = compare_with_bptt(potential, integ, x, integ.noise(0, potential.masses),
                                  position_loss, 60, 20, constraints=constraints)
    assert err < TOL
    assert info["reconstruction_error"] < 1e-10


def test_hbonds_peptide_agrees_with_central_finite_differences():
    """Common random numbers (the same noise stream): the reversible gradient of each σ and ε
    equals the central difference of the constrained loss (no cutoff, so it is smooth)."""
    _, potential, constraints, x = dipeptide()
    integ = LangevinMiddleIntegrator(0.002, 1.0, 300.0, seed=8)
    v = integ.noise(0, potential.masses)
    sim = ReversibleSimulation(potential, integ, 30, 10, kinetic_and_energy_loss,
                               constraints=constraints)
    _, grads = gradients(sim, potential, x, v)
    (sites,) = list(potential.parameters())
    scale = float(grads[0].abs().max())
    for k in range(sites.numel()):
        # A wider step than the unconstrained FD check: the loss's round-off (~1e-13 kJ/mol
        # here) over a 1e-6 relative step already shows at 1e-6 in the difference quotient.
        h = 1e-4 * float(sites.detach()[k].abs())
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                sites[k] += sign * h
                values.append(float(sim(x, v)))
                sites[k] -= sign * h
        fd = (values[0] - values[1]) / (2 * h)
        assert grads[0][k].item() == pytest.approx(fd, rel=1e-5, abs=1e-6 * scale)


def test_rigid_water_reconstructs_100_steps_back_without_resync(water30):
    """One snapshot at the end: the reverse pass walks 100 constrained steps back to the
    initial state with no resynchronisation on the way."""
    integ = LangevinMiddleIntegrator(0.002, 1.0, 295.15, seed=7)
    sim = ReversibleSimulation(water30.potential, integ, 100, 100, position_loss,
                               constraints=water30.constraints)
    x0 = water30.positions.clone().requires_grad_(True)
    sim(x0, integ.noise(0, water30.potential.masses), water30.box).backward()
    moved = float((sim.final_state[0] - water30.positions).abs().max())
    assert moved > 0.02
    assert sim.info["n_resyncs"] == 1  # the initial state only
    assert sim.info["reconstruction_error"] < 1e-10
    assert sim.info["velocity_error"] < 1e-8
    assert bool(torch.isfinite(x0.grad).all())


@pytest.mark.slow
@pytest.mark.parametrize("forcefield, model, oxygen", [
    ("tip3p.xml", "tip3p", "tip3p-O"),
    ("opc3.xml", "tip3p", "opc3-O"),
    ("tip4pew.xml", "tip4pew", "tip4pew-O"),
])
def test_rigid_water_cluster_reversible_matches_bptt_over_1000_steps(forcefield, model, oxygen):
    """The contract's full length: 1000 constrained steps (2 ps) of four rigid TIP3P, OPC3 or
    TIP4P-Ew molecules in vacuum, ten loss snapshots; reversible = BPTT to 1e-8 relative for
    σ, ε, x₀ and v₀, with the reverse pass resynchronised only at the snapshots."""
    potential, constraints, x = water_cluster(forcefield, model, oxygen)
    integ = LangevinMiddleIntegrator(0.002, 1.0, 300.0, seed=4)
    v0 = torch.where(potential.masses[:, None] > 0, integ.noise(0, potential.masses), 0.0)
    err, info = compare_with_bptt(potential, integ, x, v0, kinetic_and_energy_loss, 1000, 100,
                                  constraints=constraints)
    assert err < TOL
    assert info["n_resyncs"] == 10
    assert info["reconstruction_error"] < 1e-10


# -- the API ---------------------------------------------------------------------------------


def test_constraints_are_required_matched_and_satisfied(water30):
    integ = LangevinMiddleIntegrator(0.002, 1.0, 295.15, seed=1)
    with pytest.raises(InputError, match=r"constraints=Constraints\.from_system\(system\)"):
        ReversibleSimulation(water30.potential, integ, 10, 5, position_loss)
    _, _, peptide_constraints, _ = dipeptide()
    with pytest.raises(InputError, match="has 12 distances but the potential's System has 90"):
        ReversibleSimulation(water30.potential, integ, 10, 5, position_loss,
                             constraints=peptide_constraints)
    sim = ReversibleSimulation(water30.potential, integ, 10, 5, position_loss,
                               constraints=water30.constraints)
    off = water30.positions.clone()
    off[1] += 1e-6
    with pytest.raises(InputError, match="initial positions violate the constraints"):
        sim(off, torch.zeros_like(off), water30.box)
    with pytest.raises(InputError, match="one distance per pair"):
        Constraints([[0, 1]], [0.1, 0.2], 3)
    with pytest.raises(InputError, match="outside 0..2"):
        Constraints([[0, 3]], [0.1], 3)


def test_parameters_that_openmm_makes_constraint_distances_are_refused():
    """A tagged O-H length or H-O-H angle of rigid water, or the length of an HBonds bond, is
    a constraint distance in the System: refused when the potential is built, saying why and
    what to do. A force constant of a constrained bond (absent from the System) is named as
    such; the same tags in a flexible System train."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=5,
                        neutralize=False)
    kwargs = dict(nonbondedMethod=app.NoCutoff, constraints=None, removeCMMotion=False)
    fix = r"Train it in a flexible model \(rigidWater=False, constraints=None"
    cases = [(("HarmonicBondForce/Bond", "OW.HW", ("length",)), "15 constraint distance"),
             (("HarmonicAngleForce/Angle", "HW.OW.HW", ("angle",)), "5 constraint distance"),
             (("HarmonicBondForce/Bond", "OW.HW", ("k",)),
              "this System has 15 constraints: OpenMM leaves the bonds and angles it "
              "constrains out of the bonded forces")]
    for selection, why in cases:
        with pytest.raises(InputError, match=why) as info:
            parameters = ParameterSet.select("tip3p.xml", modeller.topology, [selection],
                                             rigidWater=True, **kwargs)
            TorchPotential(parameters.system, parameters=parameters)
        assert "rigidWater=False, constraints=None" in str(info.value)
        flexible = ParameterSet.select("tip3p.xml", modeller.topology, [selection],
                                       rigidWater=False, **kwargs)
        assert TorchPotential(flexible.system, parameters=flexible).n_constraints == 0
    peptide = alanine_dipeptide(constraints=app.HBonds, removeCMMotion=False)
    with pytest.raises(InputError, match=r"'length' on <Bond type1=\"protein-CX\" "
                       r"type2=\"protein-H1\">, but with this System's constraints.*" + fix):
        parameters = ParameterSet.select(
            "amber14/protein.ff14SB.xml", peptide.topology,
            [("HarmonicBondForce/Bond", "protein-CX.protein-H1", ("length",))],
            nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
        TorchPotential(parameters.system, parameters=parameters)


@pytest.mark.slow
def test_216_rigid_waters_reconstruct_1000_steps_to_1e8_nm():
    """1 ps forward, then the reverse pass walks all of it back to the initial state without
    resynchronisation (rigid TIP3P, reaction field 0.9 nm, 1 fs)."""
    water = rigid_water(216)
    sim = ReversibleSimulation(water.potential, water.integrator, 1000, 1000, position_loss,
                               constraints=water.constraints)
    sim(water.positions, water.velocities, water.box).backward()
    assert float((sim.final_state[0] - water.positions).abs().max()) > 0.1
    assert sim.info["n_resyncs"] == 1
    assert sim.info["reconstruction_error"] <= 1e-8


@pytest.mark.parametrize("system", ["water", "peptide"])
def test_bond_space_iteration_equals_the_particle_projections(system, water30):
    """``couple`` is the bond vectors of a displacement and ``newton_on_bonds`` the multipliers
    of ``project_positions`` with the bonds of its result, on rigid water (clusters in
    constraint order, reshaped) and on the peptide (padded clusters of 1 to 3, gathered)."""
    if system == "water":
        constraints, x = water30.constraints, water30.positions
        inv_masses = 1.0 / water30.potential.masses
    else:
        _, potential, constraints, x = dipeptide()
        inv_masses = 1.0 / potential.masses
    gen = torch.Generator().manual_seed(5)
    mu = torch.randn(len(constraints), generator=gen, dtype=x.dtype)
    r = constraints.bonds(x)
    moved = constraints.bonds(constraints.displacement(x, mu, inv_masses))
    assert float(moved.abs().max()) > 1e-3
    torch.testing.assert_close(constraints.couple(mu, r, inv_masses), moved, rtol=0, atol=1e-15)

    u = x + 0.002 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    projected, multipliers = constraints.project_positions(u, x, inv_masses)
    found, bonds = constraints.newton_on_bonds(constraints.bonds(u), r, inv_masses)
    assert float(multipliers.abs().max()) > 1e-6
    torch.testing.assert_close(found, multipliers, rtol=0, atol=0)
    torch.testing.assert_close(bonds, constraints.bonds(projected), rtol=0, atol=1e-15)
    lengths = bonds.norm(dim=-1)
    assert float(((lengths - constraints.distances).abs() / constraints.distances).max()) < 1e-14


@pytest.mark.parametrize("system", ["water", "peptide"])
def test_velocity_projection_closed_form_vjp_equals_autograd(system, water30):
    """The closed-form VJP of ``P_x q`` (``autograd=False``) equals autograd through the
    explicit formula, in both ``x`` and ``q``, and the values are the same."""
    if system == "water":
        constraints, x = water30.constraints, water30.positions
        inv_masses = 1.0 / water30.potential.masses
    else:
        _, potential, constraints, x = dipeptide()
        inv_masses = 1.0 / potential.masses
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    weights = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    values, grads = [], []
    for autograd in (False, True):
        leaves = (x.clone().requires_grad_(True), q.clone().requires_grad_(True))
        out = constraints.project_velocities(*leaves, inv_masses, autograd=autograd)
        values.append(out.detach())
        grads.append(torch.autograd.grad((out * weights).sum(), leaves))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    for closed, auto in zip(*grads, strict=True):
        assert float(auto.abs().max()) > 1e-3
        assert float((closed - auto).abs().max() / auto.abs().max()) < 1e-12
