"""The reversible-simulation paper's van der Waals forms as CustomNonbondedForce XML, on water.

Each form is written here from its published formula, with the combining rules force fields
use, in a flexible 3-site water force field whose hydrogens have zero well depth (ε_H = 0, and
for Buckingham A_H = B_H = C_H = 0), charges in a NonbondedForce (reaction field) whose own
Lennard-Jones part is off:

- Lennard-Jones ``4ε[(σ/r)¹² − (σ/r)⁶]``, σ = (σ₁+σ₂)/2, ε = (ε₁ε₂)^(1/2), with a global
  scale λ of ε;
- double exponential (Horton et al.), ``ε[β e^α/(α−β) e^(−α r/r_m) − α e^β/(α−β)
  e^(−β r/r_m)]``, r_m = (r_m1 + r_m2)/2, ε = sqrt(ε₁ε₂), global α and β;
- Buckingham ``A e^(−B r) − C/r⁶``, A = sqrt(A₁A₂), B = 2/(1/B₁ + 1/B₂) (harmonic mean, so
  B_H = 0 divides by zero), C = sqrt(C₁C₂);
- buffered 14-7 (Halgren), ``ε ((1+δ)/(ρ+δ))⁷ ((1+γ)/(ρ⁷+γ) − 2)``, ρ = r/r_m,
  r_m = (r_m1 + r_m2)/2, ε = sqrt(ε₁ε₂), global δ = 0.07 and γ = 0.12.

With the oxygen's parameters and a global shape parameter tagged, every gradient must be
finite and equal to backprop-through-time and to central finite differences (the project's
gradient check, :func:`openmm_reversible.gradcheck.check_gradients`), and the torch twin's
energies and forces must equal OpenMM's Reference platform. Before square roots, powers and
divisions were made safe (:mod:`openmm_reversible.safe_math`), the ε_O gradient of the double
exponential was NaN: ``d sqrt(ε_O ε_H)/dε_O = ε_H/(2 sqrt(ε_O ε_H)) = 0/0``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from openmm_reference import reference_energy_forces, relative_errors, single_force_system

from openmm_reversible import gradcheck
from openmm_reversible.export import write_xml
from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential
from openmm_reversible.units import box_tensor, positions_tensor

CUTOFF = 0.35  # nm; the 16-water box is 0.78 nm wide

WATER = """<ForceField>
 <AtomTypes>
  <Type name="w-O" class="OW" element="O" mass="15.99943"/>
  <Type name="w-H" class="HW" element="H" mass="1.007947"/>
 </AtomTypes>
 <Residues>
  <Residue name="HOH">
   <Atom name="O" type="w-O"/>
   <Atom name="H1" type="w-H"/>
   <Atom name="H2" type="w-H"/>
   <Bond atomName1="O" atomName2="H1"/>
   <Bond atomName1="O" atomName2="H2"/>
  </Residue>
 </Residues>
 <HarmonicBondForce>
  <Bond class1="OW" class2="HW" length="0.09572" k="462750.4"/>
 </HarmonicBondForce>
 <HarmonicAngleForce>
  <Angle class1="HW" class2="OW" class3="HW" angle="1.82421813418" k="836.8"/>
 </HarmonicAngleForce>
 <NonbondedForce coulomb14scale="0.833333" lj14scale="0.5">
  <Atom type="w-O" charge="-0.834" sigma="1" epsilon="0"/>
  <Atom type="w-H" charge="0.417" sigma="1" epsilon="0"/>
 </NonbondedForce>
 {custom}
</ForceField>
"""

FORMS = {
    "lennard_jones": (
        "4*lambda*eps*((sig/r)^12-(sig/r)^6); sig=(sigma1+sigma2)/2; "
        "eps=(epsilon1*epsilon2)^(1/2)",
        {"lambda": 1.0}, ("sigma", "epsilon"),
        {"w-O": (0.3150752, 0.635968), "w-H": (1.0, 0.0)}, ("lambda",)),
    "double_exponential": (
        "eps*(beta*exp(alpha)/(alpha-beta)*exp(-alpha*r/rm)"
        "-alpha*exp(beta)/(alpha-beta)*exp(-beta*r/rm)); rm=(rm1+rm2)/2; "
        "eps=sqrt(epsilon1*epsilon2)",
        {"alpha": 16.766, "beta": 4.427}, ("rm", "epsilon"),
        {"w-O": (0.3536559, 0.636), "w-H": (1.0, 0.0)}, ("alpha", "beta")),
    "buckingham": (
        "a*exp(-b*r)-c/r^6; a=sqrt(A1*A2); b=2/(1/B1+1/B2); c=sqrt(C1*C2)",
        {}, ("A", "B", "C"),
        {"w-O": (4.7e5, 36.8, 0.00332), "w-H": (0.0, 0.0, 0.0)}, ()),
    "buffered_14_7": (
        "eps*((1+delta)/(rho+delta))^7*((1+gamma)/(rho^7+gamma)-2); rho=r/rm; "
        "rm=(rm1+rm2)/2; eps=sqrt(epsilon1*epsilon2)",
        {"delta": 0.07, "gamma": 0.12}, ("rm", "epsilon"),
        {"w-O": (0.3536559, 0.636), "w-H": (1.0, 0.0)}, ("delta",)),
}
"""name -> (energy, globals with defaults, per-particle parameters, values per type, the
globals to tag). The oxygen's per-particle parameters are tagged too."""


def forcefield_xml(name: str) -> str:
    energy, globals_, per_particle, values, tagged = FORMS[name]
    lines = [f'<CustomNonbondedForce energy="{energy}" bondCutoff="3">']
    for g, default in globals_.items():
        tag = ' parameterize="defaultValue"' if g in tagged else ""
        lines.append(f'  <GlobalParameter name="{g}" defaultValue="{default}"{tag}/>')
    lines += [f'  <PerParticleParameter name="{p}"/>' for p in per_particle]
    for atom_type, row in values.items():
        attributes = " ".join(f'{p}="{v}"' for p, v in zip(per_particle, row, strict=True))
        tag = f' parameterize="{", ".join(per_particle)}"' if atom_type == "w-O" else ""
        lines.append(f'  <Atom type="{atom_type}" {attributes}{tag}/>')
    lines.append("</CustomNonbondedForce>")
    return WATER.replace("{custom}", "\n ".join(lines))


@pytest.fixture(scope="module")
def water():
    """16 flexible waters from OpenMM's pre-equilibrated box: (topology, positions nm, box nm)."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=16,
                        neutralize=False)
    box = np.asarray(modeller.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    return modeller.topology, np.asarray(modeller.positions.value_in_unit(unit.nanometer)), box


def parameter_set(name: str, topology, tmp_path) -> ParameterSet:
    path = tmp_path / f"{name}.xml"
    path.write_text(forcefield_xml(name))
    return load(path, topology)


def load(path, topology) -> ParameterSet:
    """The tagged force field at ``path`` on ``topology``: reaction field at CUTOFF, flexible."""
    return ParameterSet.from_forcefield(str(path), topology,
                                        nonbondedMethod=app.CutoffPeriodic,
                                        nonbondedCutoff=CUTOFF * unit.nanometer,
                                        constraints=None, rigidWater=False,
                                        removeCMMotion=False)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_twin_matches_openmm_reference(name, water, tmp_path):
    topology, positions, box = water
    assert_twin_matches_reference(name, parameter_set(name, topology, tmp_path), positions, box)


def assert_twin_matches_reference(name: str, params: ParameterSet, positions, box) -> None:
    """Each force of the twin equals OpenMM's Reference platform (energy ≤ 1e-6, forces ≤
    1e-5 relative), and the CustomNonbondedForce really acts."""
    potential = TorchPotential(params.system, parameters=params)
    x = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    energies = potential.energies(x, box_tensor(box))
    custom = [i for i, f in enumerate(params.system.getForces())
              if isinstance(f, openmm.CustomNonbondedForce)]
    assert len(custom) == 1
    for index, energy in energies.items():
        e_ref, f_ref = reference_energy_forces(single_force_system(params.system, index),
                                               positions, box)
        forces = -torch.autograd.grad(energy, x)[0].numpy()
        energy_error, force_error = relative_errors(float(energy.detach()), forces, e_ref, f_ref)
        assert energy_error <= 1e-6, (name, index)
        assert force_error <= 1e-5, (name, index)
    assert abs(float(energies[custom[0]].detach())) > 1.0  # the form really acts on the oxygens


@pytest.mark.parametrize("name", sorted(FORMS))
def test_gradients_finite_and_equal_to_finite_differences(name, water, tmp_path):
    topology, positions, box = water
    params = parameter_set(name, topology, tmp_path)
    assert params.trainable_keys == ([f"GlobalParameter/defaultValue/{g}" for g in FORMS[name][4]]
                                     + [f"Atom/{p}/w-O" for p in FORMS[name][2]])
    assert_gradients_check(name, params, positions, box)


def assert_gradients_check(name: str, params: ParameterSet, positions, box) -> None:
    """Over a 4-step window of the energy loss, every tagged parameter's reversible gradient
    is finite, nonzero, equal to BPTT (≤ 1e-8) and to central finite differences (≤ 1e-4)."""
    potential = TorchPotential(params.system, parameters=params)
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, 3)
    velocities = integrator.noise(0, potential.masses)
    sim = ReversibleSimulation(potential, integrator, 4, 2, gradcheck.energy_loss)
    result = gradcheck.check_gradients(sim, positions_tensor(positions), velocities,
                                       box_tensor(box), params.trainable_keys)
    for gradient in (result.reversible, result.bptt, result.finite_difference):
        assert np.isfinite(gradient).all(), (name, result.as_dict())
    assert np.all(result.reversible != 0), (name, result.as_dict())
    assert result.rel_error_bptt < 1e-8, (name, result.as_dict())
    assert result.rel_error_fd < 1e-4, (name, result.as_dict())


def test_zero_well_depth_is_what_made_torch_sqrt_fail(water, tmp_path):
    """The hydrogens' zero ε is in the twin's table, and plain ``torch.sqrt`` of the combining
    rule gives the NaN these tests guard against, while the compiled expression does not."""
    topology, _, _ = water
    params = parameter_set("double_exponential", topology, tmp_path)
    potential = TorchPotential(params.system, parameters=params)
    term = next(t for t in potential.terms if t.name == "CustomNonbondedForce")
    table = term.tables["particles"](params()).detach()
    epsilon = table[:, term.tables["particles"].column("epsilon")]
    assert float(epsilon.min()) == 0.0 and float(epsilon.max()) > 0.0
    e_o = torch.tensor(0.636, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(torch.sqrt(e_o * 0.0), e_o)[0]
    safe = torch.autograd.grad(term.energy({"epsilon1": e_o, "epsilon2": 0.0, "r": 0.3,
                                            "rm1": 0.35, "rm2": 1.0, "alpha": 16.766,
                                            "beta": 4.427}), e_o)[0]
    assert torch.isnan(plain) and float(safe) == 0.0


SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "paper" / "forcefields"
SHIPPED_SHAPES = {"double_exponential": ("alpha", "beta"), "buckingham": ("B",),
                  "buffered_14_7": ("delta", "gamma")}
"""The paper's forms as shipped for its water fit, and each one's shape parameters."""


def shape_keys(name: str) -> list[str]:
    """Trainable keys of a shipped form's shape parameters."""
    return ["Atom/B/tip3p-O" if shape == "B" else f"GlobalParameter/defaultValue/{shape}"
            for shape in SHIPPED_SHAPES[name]]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHIPPED_SHAPES))
def test_shipped_forms_match_openmm_and_check_every_tagged_gradient(name, water):
    """examples/paper/forcefields: the twin equals OpenMM, and the gradcheck passes for every
    tagged parameter, the shape parameters, charge and bonded terms included."""
    topology, positions, box = water
    params = load(SHIPPED / f"{name}.xml", topology)
    assert set(shape_keys(name)) <= set(params.trainable_keys)
    assert {"Atom/charge/tip3p-O", "Bond/length/OW.HW", "Angle/k/HW.OW.HW"} <= \
        set(params.trainable_keys)
    assert_twin_matches_reference(name, params, positions, box)
    assert_gradients_check(name, params, positions, box)


@pytest.mark.parametrize("name", sorted(SHIPPED_SHAPES))
def test_shipped_forms_export_trained_values_that_openmm_loads(name, water, tmp_path):
    """Trained values (every tagged parameter moved by 1-3 %) are written back into the XML;
    plain OpenMM loads the written file, and its energy is the twin's at those values."""
    topology, positions, box = water
    params = load(SHIPPED / f"{name}.xml", topology)
    keys = params.trainable_keys
    start = params.values()
    trained = {k: start[k] * (1.0 + 0.01 * (1 + i % 3)) for i, k in enumerate(keys)}
    params.set_values(trained)
    (written,) = write_xml(params, tmp_path / "trained/")
    reread = load(written, topology).values()
    for key, value in trained.items():
        assert reread[key] == pytest.approx(value, rel=1e-12), key
    assert reread["Atom/charge/tip3p-H"] == pytest.approx(-0.5 * trained["Atom/charge/tip3p-O"],
                                                          rel=1e-12)
    system = app.ForceField(str(written)).createSystem(
        topology, nonbondedMethod=app.CutoffPeriodic, nonbondedCutoff=CUTOFF * unit.nanometer,
        constraints=None, rigidWater=False, removeCMMotion=False)
    e_openmm, _ = reference_energy_forces(system, positions, box)
    potential = TorchPotential(params.system, parameters=params)
    with torch.no_grad():
        e_twin = float(potential(positions_tensor(positions), box_tensor(box)))
    assert e_twin == pytest.approx(e_openmm, rel=1e-6)
    start_system = load(SHIPPED / f"{name}.xml", topology).system
    e_start, _ = reference_energy_forces(start_system, positions, box)
    assert abs(e_openmm - e_start) > 1e-3 * abs(e_start)  # the trained values took effect
