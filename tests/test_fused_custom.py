"""CustomNonbondedForce expressions on the fused path against the autograd path: energies,
forces, Hessian-vector products and parameter VJPs (float64, ≤ 1e-12 relative) for the paper's
three functional forms (global shape parameters trained as well), a switched form under every
cutoff method, and every Lepton built-in at the points where the safe functions matter; the
pairs a zero parameter switches off; the autograd fallback and why; bitwise determinism
whatever the thread count; CustomBondForce, CustomAngleForce and CustomTorsionForce through
the generated chain kernel.

Systems: 20 flexible waters from the paper's force fields (examples/paper/forcefields), reaction
field with a 0.4 nm cutoff; a 40-particle periodic box of random particles (two classes,
exclusions) built with the OpenMM API; the 48-atom chain molecule of tests/test_fused.py for
the bonded forms; the `benchmark forces --forcefield` path at a small box; one tiny epoch
of the reduced paper fit (tests/test_paper.py).
"""

import warnings
from pathlib import Path

import numpy as np
import openmm
import pytest
import test_fused
import torch
from openmm import app, unit
from test_fused import EDGE, TRICLINIC, adjoint_products, assert_close, bind_all, derivatives
from test_reversible import TOL, compare_with_bptt, kinetic_and_energy_loss

from openmm_reversible.integrators import LangevinMiddleIntegrator
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential, fused, symbolic
from openmm_reversible.units import box_tensor, positions_tensor

kernel_calls = test_fused.kernel_calls  # the fixture

FORCEFIELDS = Path(__file__).resolve().parents[1] / "examples" / "paper" / "forcefields"
PAPER_FORMS = ["double_exponential", "buckingham", "buffered_14_7"]
DOUBLE_EXPONENTIAL = ("eps*(beta*exp(alpha)/(alpha-beta)*exp(-alpha*r/rm)"
                      "-alpha*exp(beta)/(alpha-beta)*exp(-beta*r/rm)); "
                      "rm=2^(1/6)*(sigma1+sigma2)/2; eps=sqrt(epsilon1*epsilon2)")


def paper_water(form: str, n_waters: int = 20):
    """``n_waters`` flexible waters with the paper's tagged force field ``form``:
    ``(ParameterSet, positions nm, box nm)``."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=n_waters,
                        neutralize=False)
    parameters = ParameterSet.from_forcefield(
        [str(FORCEFIELDS / f"{form}.xml")], modeller.topology,
        nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=0.4 * unit.nanometer,
        constraints=None, rigidWater=False, removeCMMotion=False)
    return (parameters, positions_tensor(modeller.getPositions()),
            box_tensor(modeller.topology.getPeriodicBoxVectors()))


def custom_term(potential: TorchPotential):
    (term,) = [t for t in potential.terms if t.name == "CustomNonbondedForce"]
    return term


@pytest.mark.parametrize("form", PAPER_FORMS)
def test_paper_forms_match_autograd(form, kernel_calls):
    """Every table entry bound (per-particle columns and the global shape parameters), then
    the tagged force field through the whole potential (the reverse pass's products)."""
    parameters, x, box = paper_water(form)
    potential = TorchPotential(parameters.system, parameters=parameters)
    reference = adjoint_products(potential, x, box)
    potential.use_fused(True)
    fast = adjoint_products(potential, x, box)
    assert_close(fast, reference)
    # bonds, angles, Coulomb, Lennard-Jones (no pairs: epsilon 0), exceptions, the custom pairs
    assert len(kernel_calls) == 6
    # the trained shape parameters (GlobalParameter defaultValue, or per-particle B) and the
    # oxygen's well receive a gradient through the fused kernel
    keys = parameters.trainable_keys
    shape = [k for k, key in enumerate(keys) if key.startswith("GlobalParameter/")
             or key in ("Atom/B/tip3p-O", "Atom/C/tip3p-O", "Atom/epsilon/tip3p-O")]
    assert len(shape) >= 2 and bool((fast[2][shape] != 0).all())

    term = custom_term(TorchPotential(parameters.system))
    assert term.has_fused
    sites = bind_all(term)
    reference = derivatives(lambda y, s: term(y, box, s), x, sites)
    assert_close(derivatives(lambda y, s: term.fused_energy(y, box, s), x, sites), reference)


def random_particles(method: str, energy: str, per_particle: dict, global_values: dict,
                     switching: bool = False, box: np.ndarray | None = None, n: int = 40,
                     seed: int = 3):
    """A box of ``n`` random particles (no two closer than 0.15 nm) with one
    CustomNonbondedForce: ``per_particle`` maps a parameter name to its two class values
    (particles alternate between the classes), every fourth pair (k, k+1) is excluded."""
    rng = np.random.default_rng(seed)
    box = np.eye(3) * EDGE if box is None else box
    x = []
    while len(x) < n:
        candidate = rng.random(3) @ box
        if all(np.linalg.norm(candidate - y) > 0.15 for y in x):
            x.append(candidate)
    system = openmm.System()
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
    force = openmm.CustomNonbondedForce(energy)
    for name in per_particle:
        force.addPerParticleParameter(name)
    for name, value in global_values.items():
        force.addGlobalParameter(name, value)
    for k in range(n):
        system.addParticle(16.0)
        force.addParticle([values[k % 2] for values in per_particle.values()])
    for k in range(0, n - 1, 4):
        force.addExclusion(k, k + 1)
    force.setNonbondedMethod(getattr(openmm.CustomNonbondedForce, method))
    force.setCutoffDistance(1.0)
    force.setUseSwitchingFunction(switching)
    force.setSwitchingDistance(0.8)
    system.addForce(force)
    return system, torch.tensor(np.asarray(x)), torch.tensor(box)


@pytest.mark.parametrize("method,switching,triclinic", [
    ("NoCutoff", False, False), ("CutoffNonPeriodic", True, False),
    ("CutoffPeriodic", True, False), ("CutoffPeriodic", True, True)])
def test_switched_double_exponential_under_every_method(method, switching, triclinic,
                                                        kernel_calls):
    system, x, box = random_particles(method, DOUBLE_EXPONENTIAL,
                                      {"sigma": (0.3, 0.35), "epsilon": (0.6, 0.0)},
                                      {"alpha": 16.766, "beta": 4.427}, switching,
                                      TRICLINIC if triclinic else None)
    term = custom_term(TorchPotential(system))
    sites = bind_all(term)
    reference = derivatives(lambda y, s: term(y, box, s), x, sites)
    assert not kernel_calls
    assert_close(derivatives(lambda y, s: term.fused_energy(y, box, s), x, sites), reference)
    assert len(kernel_calls) == 1


BUILTINS = ("k*(sqrt(e1*e2)*exp(-r/s) + step(r-0.5)*cube(r) + delta(w1)*square(r)"
            " + select(w2, log(r), cos(r)) + min(e1, e2)*r + max(s1, s2)/r"
            " + abs(w1-w2)*sin(r) + recip(s)*atan2(r, s-0.3) + tanh(r)*erf(r) + erfc(r)"
            " + (e1+e2)^0.5*r + r^1.5 + sinh(r/3)*cosh(r/4) + atan(r) + tan(r/4) + asin(r/3)"
            " + acos(r/4) + sec(r/5) + csc(r+1) + cot(r+1) + 0.01*floor(3*r) + 0.01*ceil(2*r)"
            " + s^(w1+0.5) + (e1*e2)^(w2+1) + atan2(w1, w2)*r); s=0.5*(s1+s2)")
"""Every Lepton built-in; with zero parameters where the safe functions differ from the plain
ones (sqrt and fractional powers at 0, a zero base under a parameter exponent, atan2 at the
origin) and ties in min/max and abs (particles of the same class)."""


def test_every_builtin_matches_autograd(kernel_calls):
    system, x, box = random_particles("CutoffPeriodic", BUILTINS,
                                      {"e": (0.0, 0.5), "s": (0.3, 0.35), "w": (0.0, 1.0)},
                                      {"k": 1.5}, n=24)
    term = custom_term(TorchPotential(system))
    sites = bind_all(term)
    reference = derivatives(lambda y, s: term(y, box, s), x, sites)
    assert all(bool(torch.isfinite(q).all()) for q in reference)
    assert_close(derivatives(lambda y, s: term.fused_energy(y, box, s), x, sites), reference)
    assert len(kernel_calls) == 1


def test_pairs_switched_off_by_a_zero_are_left_out():
    """Water hydrogens (epsilon 0) take no part in the double exponential's kernel; in the
    Buckingham form the switch W does, unless its own derivative is asked for."""
    parameters, x, box = paper_water("double_exponential")
    term = custom_term(TorchPotential(parameters.system, parameters=parameters))
    term.fused_energy(x, box, parameters())
    candidates = term.cutoff_pairs.candidates(x, box)[0]
    oxygens = int((term.tables["particles"].base[:, 1] > 0).sum())
    assert 0 < len(term._fused_pairs[3]) <= oxygens * (oxygens - 1) // 2 < candidates.numel()

    buckingham = symbolic.custom_pair_law(
        "W1*W2*(a*exp(-b*r)-c/r^6); a=(A1+A2)/2; b=(B1+B2)/2; c=(C1+C2)/2",
        ("A", "B", "C", "W"), (), None, 1.0)
    assert symbolic.inert_columns(buckingham, (0, 1, 2)) == ((3,), (3,))
    assert symbolic.inert_columns(buckingham, (0, 1, 2, 3)) == ((), ())


def test_untranslatable_expressions_fall_back_and_say_why_once():
    system, x, box = random_particles("CutoffPeriodic", "table(r)*sqrt(e1*e2)",
                                      {"e": (0.5, 0.2)}, {})
    force = system.getForce(0)
    force.addTabulatedFunction("table", openmm.Continuous1DFunction(
        list(np.exp(-np.linspace(0.0, 2.0, 30))), 0.0, 2.0))
    grouped, _, _ = random_particles("CutoffPeriodic", DOUBLE_EXPONENTIAL,
                                     {"sigma": (0.3, 0.35), "epsilon": (0.6, 0.0)},
                                     {"alpha": 16.766, "beta": 4.427})
    grouped.getForce(0).addInteractionGroup(range(0, 20), range(20, 40))
    for system_, reason in [
            (system, "the energy calls the tabulated function 'table', which has no symbolic "
                     "form"),
            (grouped, "interaction groups are not on the fused path")]:
        reference = TorchPotential(system_)
        with pytest.warns(UserWarning, match=rf"no fused kernel for CustomNonbondedForce "
                                             rf"\({reason}\): these terms use the autograd "
                                             rf"path"):
            potential = TorchPotential(system_, fused=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            fast = adjoint_products(potential, x, box)
        assert_close(fast, adjoint_products(reference, x, box))
        with pytest.raises(NotImplementedError, match=reason.replace("(", r"\(")):
            custom_term(potential).fused_energy(x, box)


def test_bitwise_deterministic_whatever_the_thread_count(monkeypatch):
    numba = pytest.importorskip("numba")
    parameters, x, box = paper_water("double_exponential")
    term = custom_term(TorchPotential(parameters.system))
    sites = bind_all(term)

    def run():
        return derivatives(lambda y, s: term.fused_energy(y, box, s), x, sites)

    serial = run()
    assert all(torch.equal(a, b) for a, b in zip(serial, run(), strict=True))
    monkeypatch.setattr(fused, "PARALLEL_MIN_ITEMS", 0)  # threaded kernels
    threads = numba.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            results.append(run())
    finally:
        numba.set_num_threads(threads)
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(serial, result, strict=True))


def test_reversible_matches_bptt_with_a_custom_form(kernel_calls):
    parameters, x0, box = paper_water("double_exponential")
    potential = TorchPotential(parameters.system, parameters=parameters, fused=True)
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=8)
    v0 = integrator.noise(0, potential.masses)
    err, info = compare_with_bptt(potential, integrator, x0, v0, kinetic_and_energy_loss, 10,
                                  5, box=box)
    assert err < TOL
    assert info["reconstruction_error"] < 1e-12
    assert kernel_calls


CUSTOM_BONDED = [
    (openmm.CustomBondForce, "Bond", 2,
     "D*(1-exp(-a*(r-r0)))^2 + c*step(r-r0)*(r-r0)^3", ("D", "a", "r0"), {"c": 50.0}),
    (openmm.CustomAngleForce, "Angle", 3,
     "0.5*k*(cos(theta)-cos(theta0))^2 + b*abs(theta-theta0)", ("k", "theta0"), {"b": 0.3}),
    (openmm.CustomTorsionForce, "Torsion", 4,
     "k*(1+cos(n*theta-phase)) + g*min(theta, 0.5)^2", ("k", "n", "phase"), {"g": 0.7}),
]


@pytest.mark.parametrize("periodic", [False, True])
def test_custom_bonded_forces_match_autograd(periodic, kernel_calls):
    """CustomBondForce, CustomAngleForce and CustomTorsionForce on the chain molecule through
    the generated chain kernel, per-item and global parameters bound."""
    system, x, box = test_fused.chain_system("CutoffPeriodic", periodic_bonds=periodic,
                                             box=TRICLINIC if periodic else None)
    rng = np.random.default_rng(7)
    n = x.shape[0]
    for cls, kind, width, energy, per_item, global_values in CUSTOM_BONDED:
        force = cls(energy)
        for name in per_item:
            getattr(force, f"addPer{kind}Parameter")(name)
        for name, value in global_values.items():
            force.addGlobalParameter(name, value)
        for k in range(n - width + 1):
            values = {"D": 300.0, "a": 20.0, "r0": 0.14 + 0.02 * rng.random(),
                      "k": 50.0 + 10 * rng.random(), "theta0": 1.9, "n": float(1 + k % 3),
                      "phase": rng.random()}
            getattr(force, f"add{kind}")(*range(k, k + width), [values[p] for p in per_item])
        force.setUsesPeriodicBoundaryConditions(periodic)
        system.addForce(force)
    terms = TorchPotential(system).terms[-3:]
    assert [t.name for t in terms] == ["CustomBondForce", "CustomAngleForce",
                                       "CustomTorsionForce"]
    for term in terms:
        assert term.has_fused
        sites = bind_all(term)
        reference = derivatives(lambda y, s, t=term: t(y, box, s), x, sites)
        assert_close(derivatives(lambda y, s, t=term: t.fused_energy(y, box, s), x, sites),
                     reference)
    assert len(kernel_calls) == 3


def test_forces_benchmark_times_a_paper_form_on_the_fused_path(kernel_calls):
    from openmm_reversible.benchmarks import forces

    record = forces.measure(box_size=1.5, cutoff=0.7, repeats=1, openmm_steps=2,
                            forcefield=str(FORCEFIELDS / "double_exponential.xml"),
                            progress=False)
    assert record["forcefield"].endswith("double_exponential.xml")
    assert record["fused_force_vjp_ms"] > 0 and record["torch_force_vjp_ms"] > 0
    assert any(evaluation.kernels["forward"].__module__.startswith("fused_custom_nonbonded")
               for evaluation in kernel_calls)


def test_tiny_paper_epoch_gradient_is_the_autograd_one(tmp_path, kernel_calls):
    """One tiny epoch of the reduced paper fit with the double exponential (RDF and ΔHvap
    losses, the gas-phase molecule included): the same loss and gradient, α and β included,
    on the fused and the autograd path."""
    from test_paper import PAPER, tiny

    from openmm_reversible.config import config_from_dict
    from openmm_reversible.train import Trainer

    records = []
    for use_fused in (False, True):
        data = tiny("double_exponential")
        data["simulation"]["fused"] = use_fused
        trainer = Trainer(config_from_dict(data, PAPER), tmp_path / f"out{use_fused}",
                          progress=False)
        records.append(trainer.run_epoch())
        assert bool(kernel_calls) == use_fused
    keys = list(records[0]["gradient"])
    assert "GlobalParameter/defaultValue/alpha" in keys
    reference, fast = (torch.tensor([r["gradient"][k] for k in keys]) for r in records)
    assert bool((reference != 0).all())
    assert float((fast - reference).abs().max()) <= 1e-9 * float(reference.abs().max())
    assert abs(records[1]["loss"] - records[0]["loss"]) <= 1e-12 * abs(records[0]["loss"])
