"""Fused kernels against the autograd path: energies, forces, Hessian-vector products and
parameter VJPs (float64, ≤ 1e-12 relative) for every law and force family they cover; the
reversible gradient against BPTT on the fused path; the autograd fallback and its warning;
bitwise determinism whatever the thread count.

Systems: a synthetic 48-atom periodic chain molecule (random charges, sigmas and epsilons,
bonds, angles, torsions and scaled 1-4 exceptions, built with the OpenMM API) for each nonbonded
method, with and without switching; 20 flexible TIP3P waters from the tagged force field for
the reversible checks.
"""

import warnings

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from openmm_reference import reference_energy_forces, relative_errors, single_force_system
from test_reversible import TOL, compare_with_bptt, kinetic_and_energy_loss
from water_systems import tagged_tip3p

from openmm_reversible.errors import InputError
from openmm_reversible.integrators import LangevinMiddleIntegrator
from openmm_reversible.potential import TorchPotential, fused, fused_pme, special
from openmm_reversible.potential.ewald import PMEReciprocal, bspline_weights

RTOL = 1e-12
EDGE = 2.6  # nm
METHODS = {"NoCutoff": openmm.NonbondedForce.NoCutoff,
           "CutoffNonPeriodic": openmm.NonbondedForce.CutoffNonPeriodic,
           "CutoffPeriodic": openmm.NonbondedForce.CutoffPeriodic,
           "Ewald": openmm.NonbondedForce.Ewald,
           "PME": openmm.NonbondedForce.PME}


@pytest.fixture
def kernel_calls(monkeypatch) -> list:
    """Counts fused-kernel evaluations, so a test cannot pass by silently using autograd."""
    calls = []
    apply = fused._FusedEnergy.apply
    monkeypatch.setattr(fused._FusedEnergy, "apply",
                        lambda *args: calls.append(args[0]) or apply(*args))
    return calls


TRICLINIC = np.array([[EDGE, 0.0, 0.0], [0.7, EDGE, 0.0], [-0.5, 0.9, EDGE]])  # reduced form


def chain_system(method: str, switching: bool = False, n: int = 48, seed: int = 0,
                 periodic_bonds: bool = False, box: np.ndarray | None = None):
    """A periodic box holding one flexible chain of ``n`` atoms (a random walk of 0.15 nm
    steps, turned so that no two atoms come closer than 0.12 nm) with every bonded family and
    a NonbondedForce using ``method``; bonded terms and exceptions by minimum image when
    ``periodic_bonds``; ``box`` (rows a, b, c, nm) replaces the cubic box."""
    rng = np.random.default_rng(seed)
    x = [np.array([0.3, 0.3, 0.3])]
    while len(x) < n:
        step = rng.normal(size=3)
        candidate = x[-1] + 0.15 * step / np.linalg.norm(step)
        if min(np.linalg.norm(candidate - y) for y in x) > 0.12:
            x.append(candidate)
    x = np.asarray(x)
    system = openmm.System()
    box = np.eye(3) * EDGE if box is None else box
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
    for _ in range(n):
        system.addParticle(12.0)
    bonds, angles, torsions = (openmm.HarmonicBondForce(), openmm.HarmonicAngleForce(),
                               openmm.PeriodicTorsionForce())
    for k in range(n - 1):
        bonds.addBond(k, k + 1, 0.15 + 0.01 * rng.random(), 2e5 * (1 + rng.random()))
    for k in range(n - 2):
        angles.addAngle(k, k + 1, k + 2, 1.9 + 0.2 * rng.random(), 400 * (1 + rng.random()))
    for k in range(n - 3):
        torsions.addTorsion(k, k + 1, k + 2, k + 3, 1 + k % 3, rng.random() * 3.0,
                            2.0 + rng.random())
    nb = openmm.NonbondedForce()
    charges = rng.normal(0.0, 0.4, n)
    charges -= charges.mean()
    for k in range(n):
        # Every fourth atom is a bare charge (epsilon 0), as water hydrogens are.
        nb.addParticle(charges[k], 0.25 + 0.1 * rng.random(), 0.0 if k % 4 == 3 else
                       0.2 + 0.5 * rng.random())
    nb.createExceptionsFromBonds([(k, k + 1) for k in range(n - 1)], 0.8333, 0.5)
    nb.setNonbondedMethod(METHODS[method])
    nb.setCutoffDistance(1.0)
    nb.setUseSwitchingFunction(switching)
    nb.setSwitchingDistance(0.8)
    nb.setEwaldErrorTolerance(1e-5)
    nb.setExceptionsUsePeriodicBoundaryConditions(periodic_bonds)
    for force in (bonds, angles, torsions):
        force.setUsesPeriodicBoundaryConditions(periodic_bonds)
    for force in (bonds, angles, torsions, nb):
        system.addForce(force)
    return system, torch.tensor(x), torch.tensor(box)


def bind_all(term) -> torch.Tensor:
    """Bind every entry of every bindable table of ``term`` to its own site; return the site
    values (a leaf that requires grad), so parameter VJPs are per entry."""
    values = []
    for name, table in term.tables.items():
        if name in term.derived_tables:
            continue
        n_items, n_columns = table.base.shape
        for column in range(n_columns):
            start = sum(v.numel() for v in values)
            table.bind(np.arange(n_items), column, start + np.arange(n_items))
            values.append(table.base[:, column].clone())
    return torch.cat(values).requires_grad_(True)


def derivatives(energy_fn, x: torch.Tensor, sites: torch.Tensor, seed: int = 1):
    """Energy, forces, parameter gradient, and the second-order products the reverse pass can
    ask for: ``H_xx v + H_xθ w`` and ``H_θx v + H_θθ w`` (random ``v``, ``w``), and the
    position-only product with its parameter part (what the integrator's adjoint uses)."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    w = torch.randn(sites.shape, dtype=x.dtype, generator=gen)
    x = x.detach().requires_grad_(True)
    energy = energy_fn(x, sites)
    gx, gs = torch.autograd.grad(energy, [x, sites], create_graph=True)
    hx_only = torch.autograd.grad(gx, [x, sites], v, retain_graph=True)
    mixed = torch.autograd.grad((gx * v).sum() + (gs * w).sum(), [x, sites])
    return [energy.detach(), gx.detach(), gs.detach(), *hx_only, *mixed]


def assert_close(fast: list[torch.Tensor], reference: list[torch.Tensor], rtol=RTOL):
    for k, (a, b) in enumerate(zip(fast, reference, strict=True)):
        scale = float(b.abs().max())
        assert scale > 0, f"quantity {k} is identically zero: the test would prove nothing"
        error = float((a - b).abs().max()) / scale
        assert error <= rtol, f"quantity {k}: relative error {error:.3g} > {rtol}"


@pytest.mark.parametrize("method,switching,triclinic", [
    ("NoCutoff", False, False), ("CutoffNonPeriodic", False, False),
    ("CutoffPeriodic", False, False), ("CutoffPeriodic", True, True), ("Ewald", False, False),
    ("PME", True, False), ("PME", False, True)])
def test_every_term_matches_autograd(method, switching, triclinic, kernel_calls):
    system, x, box = chain_system(method, switching, box=TRICLINIC if triclinic else None,
                                  periodic_bonds=triclinic)
    potential = TorchPotential(system)
    assert [t.name for t in potential.terms] == ["HarmonicBondForce", "HarmonicAngleForce",
                                                "PeriodicTorsionForce", "NonbondedForce"]
    for term in potential.terms:
        assert term.has_fused
        sites = bind_all(term)
        reference = derivatives(lambda y, s, t=term: t(y, box, s), x, sites)
        fast = derivatives(lambda y, s, t=term: t.fused_energy(y, box, s), x, sites)
        assert_close(fast, reference)
    # bonds, angles, torsions; Coulomb, Lennard-Jones and exceptions: one evaluation each
    assert len(kernel_calls) == 6


def test_exceptions_and_exclusions_are_covered():
    """The chain's 1-4 pairs contribute (scaled Coulomb and LJ) and its bonded pairs are
    excluded: the fused pair sum must skip exactly the excluded pairs."""
    system, x, box = chain_system("CutoffPeriodic")
    nb = TorchPotential(system).terms[-1]
    _, exceptions = nb.current_parameters()
    assert nb.pair14.shape[0] > 0 and bool((exceptions[:, 0] != 0).all())
    assert float((nb.fused_energy(x, box) - nb(x, box)).abs()) <= RTOL * float(nb(x, box).abs())


def adjoint_products(potential, x, box, seed: int = 0):
    """Forces and both VJPs of the forces, exactly as the reverse pass asks for them."""
    weights = [p for p in potential.parameters() if p.requires_grad]
    cotangent = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    xr = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(potential(xr, box), xr, create_graph=True)
    return [g.detach(), *torch.autograd.grad(g, [xr, *weights], cotangent)]


def test_tied_force_field_parameters_match_autograd(kernel_calls):
    """Through a ParameterSet (charges tied, sigma/epsilon/bonds trainable) and the whole
    TorchPotential: forces, position VJP and parameter VJPs."""
    potential, x, box = tagged_tip3p(fused=False)
    reference = adjoint_products(potential, x, box)
    assert not kernel_calls
    potential.use_fused(True)
    assert_close(adjoint_products(potential, x, box), reference)
    assert len(kernel_calls) == 5  # bonds, angles, Coulomb, Lennard-Jones, exceptions


def test_reversible_matches_bptt_on_the_fused_path(kernel_calls):
    potential, x0, box = tagged_tip3p(fused=True)
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=8)
    v0 = integrator.noise(0, potential.masses)
    err, info = compare_with_bptt(potential, integrator, x0, v0, kinetic_and_energy_loss, 20,
                                  5, box=box)
    assert err < TOL
    assert info["reconstruction_error"] < 1e-12
    assert kernel_calls


def test_reversible_gradient_is_the_autograd_one():
    """The same window's reversible gradient on both paths (not only self-consistent)."""
    grads = {}
    for fused_path in (False, True):
        potential, x0, box = tagged_tip3p(fused=fused_path)
        integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=8)
        v0 = integrator.noise(0, potential.masses)
        err, _ = compare_with_bptt(potential, integrator, x0, v0, kinetic_and_energy_loss, 10,
                                   5, box=box)
        assert err < TOL
        grads[fused_path] = [p.grad.clone() for p in potential.parameters()]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert float((a - b).abs().max()) <= 1e-9 * float(b.abs().max())


@pytest.mark.parametrize("periodic", [False, True])
def test_rb_torsions_match_autograd(periodic, kernel_calls):
    """Ryckaert-Bellemans torsions (random c0 ... c5 on every torsion of the chain) through the
    generated chain kernel: energy, forces, HVPs and parameter VJPs of every coefficient."""
    system, x, box = chain_system("CutoffPeriodic", periodic_bonds=periodic,
                                  box=TRICLINIC if periodic else None)
    rng = np.random.default_rng(5)
    rb = openmm.RBTorsionForce()
    for k in range(x.shape[0] - 3):
        rb.addTorsion(k, k + 1, k + 2, k + 3, *rng.normal(0.0, 2.0, 6))
    rb.setUsesPeriodicBoundaryConditions(periodic)
    system.addForce(rb)
    term = TorchPotential(system).terms[-1]
    assert term.name == "RBTorsionForce" and term.has_fused
    sites = bind_all(term)
    reference = derivatives(lambda y, s: term(y, box, s), x, sites)
    assert not kernel_calls
    assert_close(derivatives(lambda y, s: term.fused_energy(y, box, s), x, sites), reference)
    assert len(kernel_calls) == 1


def test_term_without_fused_kernel_falls_back_once():
    system, x, box = chain_system("CutoffPeriodic")
    cmap = openmm.CMAPTorsionForce()
    cmap.addMap(4, list(np.random.default_rng(2).normal(0.0, 3.0, 16)))
    cmap.addTorsion(0, 0, 1, 2, 3, 1, 2, 3, 4)
    system.addForce(cmap)
    reference = TorchPotential(system)
    with pytest.warns(UserWarning, match=r"no fused kernel for CMAPTorsionForce: these terms "
                                         r"use the autograd path"):
        potential = TorchPotential(system, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: no second warning when evaluating
        fast = adjoint_products(potential, x, box)
        potential.use_fused(True)
    assert_close(fast, adjoint_products(reference, x, box))


def test_inputs_the_kernels_cannot_take_fall_back_once(kernel_calls):
    system, x, box = chain_system("CutoffPeriodic")
    potential = TorchPotential(system, fused=True)
    x32 = x.float()
    with pytest.warns(UserWarning, match=r"fused kernels not used \(positions are "
                                         r"torch.float32; the fused kernels need float64\)"):
        first = potential(x32, box.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = potential(x32, box.float())
    assert torch.equal(first, second)
    assert not kernel_calls
    assert fused.unavailable_reason(x, box.requires_grad_(True)) == (
        "the box requires grad; the fused kernels give no derivatives w.r.t. the box")


def test_bitwise_deterministic_whatever_the_thread_count(monkeypatch):
    numba = pytest.importorskip("numba")
    system, x, box = chain_system("PME", switching=True)
    potential = TorchPotential(system, fused=True)
    bound = bind_all(potential.terms[-1])

    def run():
        return derivatives(lambda y, s: potential.terms[-1].fused_energy(y, box, s)
                           + potential(y, box), x, bound)

    serial = run()
    assert all(torch.equal(a, b) for a, b in zip(serial, run(), strict=True))
    monkeypatch.setattr(fused, "PARALLEL_MIN_ITEMS", 0)  # threaded kernels for everything
    threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            torch.set_num_threads(n)
            results.append(run())
    finally:
        numba.set_num_threads(threads)
        torch.set_num_threads(torch_threads)
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(serial, result, strict=True))


def test_atoms_wrapped_since_the_list_build(kernel_calls):
    """Atoms moved by whole box vectors after the neighbour list was built (wrapping): the
    kernels add the wraps to the cached image shifts; energies and forces are unchanged."""
    system, x, box = chain_system("CutoffPeriodic", switching=True, periodic_bonds=True)
    fast, reference = TorchPotential(system, fused=True), TorchPotential(system)
    fast(x, box)  # builds the list at x
    wrapped = x.clone()
    wrapped[::3] += torch.tensor([1.0, -2.0, 0.0], dtype=x.dtype) @ box
    wrapped[1::5] -= box[2]
    before = kernel_calls[:]
    assert_close(adjoint_products(fast, wrapped, box), adjoint_products(reference, x, box))
    assert len(kernel_calls) > len(before)
    assert fast.terms[-1]._pairs.neighbors.n_builds == 1


def test_erfc_from_the_erfcx_table_is_accurate():
    """The kernels' ``erfc(z) = exp(-z²) erfcx(z)`` (piecewise Taylor table) against 40-digit
    erfc wherever erfc is a normal float64: ≤ 1e-14 relative on the table's range (a dense
    grid and the interval edges), ≤ 1e-13 beyond it and into the asymptotic range."""
    mpmath = pytest.importorskip("mpmath")
    h = 1.0 / special.INTERVALS_PER_UNIT
    edges = np.arange(0.0, special.Z_MAX + h, h)
    z = np.concatenate([np.linspace(0.0, 7.0, 3001), edges, edges[1:] - 1e-13, edges + 1e-13,
                        [0.0, 1e-300, 25.999, 26.0, 26.3, 26.5]])
    with mpmath.workdps(40):
        reference = np.array([float(mpmath.erfc(mpmath.mpf(float(v)))) for v in z])
    fast = np.array([np.exp(-v * v) * special.erfcx(float(v)) for v in z])
    normal = reference >= np.finfo(np.float64).tiny
    assert normal.sum() > 3000 and z[normal].max() > 26.2
    errors = np.abs(fast[normal] - reference[normal]) / reference[normal]
    table = z[normal] < special.Z_MAX
    assert errors[table].max() <= 1e-14, errors[table].max()
    # beyond it, the rounding of z² in exp(-z²) dominates (relative ~ z² ε): still ≤ 1e-13
    assert errors[~table].max() <= 1e-13, errors[~table].max()
    # and the table alone against erfcx where exp(z²) is exact enough to form it
    inside = z[(z > 0) & (z < 3.0)]
    with mpmath.workdps(40):
        scaled = np.array([float(mpmath.exp(mpmath.mpf(float(v)) ** 2)
                                 * mpmath.erfc(mpmath.mpf(float(v)))) for v in inside])
    table = np.array([special.erfcx(float(v)) for v in inside])
    assert np.abs(table - scaled).max() / scaled.min() <= 1e-15


# --------------------------------------------------------------------------- PME mesh


@pytest.fixture
def mesh_calls(monkeypatch) -> list:
    """Counts fused PME mesh evaluations (the reciprocal space outside the generated laws)."""
    calls = []
    apply = fused._EvaluatedEnergy.apply
    monkeypatch.setattr(fused._EvaluatedEnergy, "apply",
                        lambda *args: calls.append(args[0]) or apply(*args))
    return calls


def test_spline_derivatives_are_those_of_the_weights():
    """The mesh kernels' B-spline weights and their first two derivatives (from the
    lower-order weights) against autograd through :func:`bspline_weights`."""
    u = torch.linspace(0.0, 0.999, 41, dtype=torch.float64)
    sizes = np.array([7, 9, 11])
    t = np.stack([u.numpy() + 3.0, u.numpy(), u.numpy() + 10.0], 1)  # cells 3, 0 and 10
    for order in (3, 4, 5, 6):
        shape = (u.shape[0], 3, order)
        index = np.empty(shape, dtype=np.int64)
        w, dw, ddw = np.empty(shape), np.empty(shape), np.empty(shape)
        fused_pme._splines(t, sizes, order, index, w, dw, ddw)
        leaf = u.clone().requires_grad_(True)
        weights = bspline_weights(leaf, order)
        first = torch.stack([torch.autograd.grad(weights[:, j].sum(), leaf, create_graph=True)[0]
                             for j in range(order)], 1)
        second = torch.stack([torch.autograd.grad(first[:, j].sum(), leaf, retain_graph=True)[0]
                              for j in range(order)], 1)
        for computed, expected in ((w, weights), (dw, first), (ddw, second)):
            assert np.abs(computed[:, 1] - expected.detach().numpy()).max() <= 1e-14
        assert index[0, 0].tolist() == [(3 + j) % 7 for j in range(order)]
        assert index[0, 2].tolist() == [(10 + j) % 11 for j in range(order)]


@pytest.mark.parametrize("grid,box", [
    ((12, 14, 15), np.diag([2.0, 2.2, 2.4])),
    ((16, 16, 16), np.array([[2.3, 0.0, 0.0], [0.0, 2.3, 0.0], [1.15, 1.15, 1.626]]))],
    ids=["rectangular-odd", "dodecahedron-even"])
def test_pme_mesh_matches_autograd(grid, box, mesh_calls):
    """Energy, forces, charge gradient and every second-order product of the fused mesh
    against autograd through spreading and FFT (atoms also outside the home box; the even
    triclinic grid breaks the ±m symmetry of the influence function)."""
    gen = torch.Generator().manual_seed(4)
    x = 3.0 * torch.rand((60, 3), dtype=torch.float64, generator=gen) - 0.5
    charges = torch.randn(60, dtype=torch.float64, generator=gen)
    charges = (charges - charges.mean()).requires_grad_(True)
    pme, box = PMEReciprocal(3.0, grid), torch.tensor(box)
    reference = derivatives(lambda y, q: pme(y, q, box), x, charges)
    assert not mesh_calls
    fast = derivatives(lambda y, q: pme.fused_energy(y, q, box), x, charges)
    assert len(mesh_calls) == 1
    assert_close(fast, reference)


@pytest.mark.parametrize("triclinic", [False, True], ids=["cube", "dodecahedron"])
def test_fused_pme_water_matches_openmm_reference(triclinic, mesh_calls):
    """The whole NonbondedForce with PME through ``TorchPotential(fused=True)`` against
    OpenMM's Reference platform (error tolerance 1e-6): energy and forces to round-off,
    far inside the contract (1e-6 relative energy, 1e-5 relative RMS force)."""
    d = 2.3 if triclinic else 2.0
    vectors = ([(d, 0, 0), (0, d, 0), (0.5 * d, 0.5 * d, 0.5 * np.sqrt(2) * d)] if triclinic
               else np.eye(3) * d)
    forcefield = app.ForceField("tip3p.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(forcefield, boxVectors=[openmm.Vec3(*v) * unit.nanometer
                                                for v in vectors])
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                     nonbondedCutoff=0.8 * unit.nanometer, rigidWater=False,
                                     ewaldErrorTolerance=1e-6)
    index = next(k for k, f in enumerate(system.getForces())
                 if isinstance(f, openmm.NonbondedForce))
    single = single_force_system(system, index)
    positions = np.asarray(modeller.positions.value_in_unit(unit.nanometer))
    potential = TorchPotential(single, fused=True)
    x = torch.tensor(positions, requires_grad=True)
    energy = potential(x, torch.tensor(np.asarray(vectors, dtype=np.float64)))
    (grad,) = torch.autograd.grad(energy, x)
    assert len(mesh_calls) == 1
    errors = relative_errors(float(energy.detach()), -grad.numpy(),
                             *reference_energy_forces(single, positions))
    assert errors[0] <= 1e-9 and errors[1] <= 1e-9, errors


def test_pme_mesh_refuses_what_it_cannot_do():
    with pytest.raises(InputError, match=r"PME spline order 2: the fused mesh kernels need "
                                         r"order >= 3 \(continuous second derivatives\); use "
                                         r"the autograd path"):
        PMEReciprocal(3.0, (8, 8, 8), order=2).fused_energy(
            torch.zeros((2, 3), dtype=torch.float64), torch.ones(2, dtype=torch.float64),
            torch.eye(3, dtype=torch.float64) * 2.0)
