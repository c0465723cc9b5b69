"""Energy, ΔHvap, density and pressure against OpenMM on a flexible TIP3P box.

The potential is the library's torch twin (TorchPotential) of an OpenMM System with reaction
field, a switched Lennard-Jones cutoff and the dispersion correction; every reference number
comes from OpenMM's Reference platform (energies, energies of strained boxes) or from
MonteCarloBarostat.computeCurrentPressure.
"""

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from openmm_reversible.errors import InputError
from openmm_reversible.observables import (
    density,
    energy_per_molecule,
    enthalpy_of_vaporization,
    frame_energies,
    kinetic_tensor,
    molecules,
    pressure,
    pressure_tensor,
    virial,
)
from openmm_reversible.observables.density import BAR_PER_KJ_MOL_NM3
from openmm_reversible.potential import TorchPotential
from openmm_reversible.systems import water_box

N_WATERS = 125
TEMPERATURE = 300.0
CUTOFF = 0.7
KJ_MOL = unit.kilojoule_per_mole


class ReferenceEnergy:
    """Potential energy of positions/box on OpenMM's Reference platform (double)."""

    def __init__(self, system):
        self.context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                                      openmm.Platform.getPlatformByName("Reference"))

    def __call__(self, positions, box=None) -> float:
        if box is not None:
            self.context.setPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box))
        self.context.setPositions(np.asarray(positions))
        return self.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(KJ_MOL)


@pytest.fixture(scope="module")
def liquid():
    """Three frames (positions, velocities) of flexible TIP3P water simulated in OpenMM."""
    ms = water_box(N_WATERS, rigid=False, nonbonded="RF", cutoff=CUTOFF,
                   switchDistance=0.6 * unit.nanometer)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1 / unit.picosecond,
                                                 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(11)
    # Reference platform: the frames are bitwise reproducible, so is every comparison below.
    context = openmm.Context(ms.system, integrator,
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(ms.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 11)
    positions, velocities = [], []
    for _ in range(3):
        integrator.step(20)
        state = context.getState(getPositions=True, getVelocities=True)
        positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        velocities.append(state.getVelocities(asNumpy=True)
                          .value_in_unit(unit.nanometer / unit.picosecond))
    masses = torch.tensor([ms.system.getParticleMass(i).value_in_unit(unit.dalton)
                           for i in range(ms.system.getNumParticles())], dtype=torch.float64)
    return dict(ms=ms, potential=TorchPotential(ms.system), x=torch.tensor(np.array(positions)),
                v=torch.tensor(np.array(velocities)), box=torch.tensor(ms.box), masses=masses,
                molecules=molecules(ms.topology))


def test_frame_energies_match_openmm(liquid):
    reference = ReferenceEnergy(liquid["ms"].system)
    expected = [reference(x, liquid["ms"].box) for x in liquid["x"].numpy()]
    energies = frame_energies(liquid["potential"], liquid["x"], liquid["box"])
    np.testing.assert_allclose(energies.detach().numpy(), expected, rtol=1e-6)
    per_molecule = energy_per_molecule(liquid["potential"], liquid["x"], liquid["box"], N_WATERS)
    np.testing.assert_allclose(per_molecule.detach().numpy(), np.array(expected) / N_WATERS,
                               rtol=1e-6)


def test_enthalpy_of_vaporization_matches_openmm(liquid):
    """ΔHvap from torch energies of liquid frames and of distorted single molecules equals
    the same formula evaluated with OpenMM energies."""
    ms = liquid["ms"]
    gas = water_box(N_WATERS, rigid=False, nonbonded="NoCutoff")
    single = openmm.System()
    for i in range(3):
        single.addParticle(gas.system.getParticleMass(i))
    for force in gas.system.getForces():
        if isinstance(force, openmm.HarmonicBondForce | openmm.HarmonicAngleForce):
            copy = force.__class__()
            if isinstance(force, openmm.HarmonicBondForce):
                for k in range(2):
                    copy.addBond(*force.getBondParameters(k))
            else:
                copy.addAngle(*force.getAngleParameters(0))
            single.addForce(copy)
    gen = np.random.default_rng(5)
    gas_frames = liquid["x"][:, :3].numpy() + gen.normal(0, 0.005, size=(3, 3, 3))
    gas_reference = ReferenceEnergy(single)
    gas_openmm = np.mean([gas_reference(g) for g in gas_frames])
    liquid_reference = ReferenceEnergy(ms.system)
    liquid_openmm = np.mean([liquid_reference(x, ms.box) for x in liquid["x"].numpy()])
    rt = (unit.MOLAR_GAS_CONSTANT_R * TEMPERATURE * unit.kelvin).value_in_unit(KJ_MOL)
    expected = gas_openmm - liquid_openmm / N_WATERS + rt

    gas_energy = energy_per_molecule(TorchPotential(single), torch.tensor(gas_frames), None, 1)
    liquid_energy = energy_per_molecule(liquid["potential"], liquid["x"], liquid["box"],
                                        N_WATERS)
    hvap = enthalpy_of_vaporization(liquid_energy, gas_energy, TEMPERATURE)
    assert gas_openmm > 0.1  # the gas reference really is a distorted, strained molecule
    assert float(hvap) == pytest.approx(expected, rel=1e-7)
    assert float(enthalpy_of_vaporization(liquid_energy, 0.0, TEMPERATURE)) == pytest.approx(
        expected - gas_openmm, rel=1e-7)


def test_density_matches_mdtraj(liquid):
    ms = liquid["ms"]
    traj = mdtraj.Trajectory(liquid["x"].numpy(), mdtraj.Topology.from_openmm(ms.topology))
    traj.unitcell_vectors = np.repeat(ms.box[None], 3, axis=0).astype(np.float64)
    expected = mdtraj.density(traj) / 1000.0  # kg/m³ -> g/cm³
    rho = density(liquid["masses"], liquid["box"].expand(3, 3, 3))
    np.testing.assert_allclose(rho.numpy(), expected, rtol=1e-6)
    # By hand: 1 amu = 1.66053906660e-24 g (CODATA 2018), 1 nm³ = 1e-21 cm³.
    by_hand = float(liquid["masses"].sum()) * 1.66053906660e-24 / (np.linalg.det(ms.box) * 1e-21)
    assert float(density(liquid["masses"], liquid["box"])) == pytest.approx(by_hand, rel=1e-9)


# Lower-triangular strains keep OpenMM's reduced box form (a along x, b in the xy plane).
STRAINS = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]


def _kink_free_step(x, box, cutoff=CUTOFF):
    """A strain step too small for any pair to cross the cutoff, where reaction-field forces
    jump (a central difference across that kink would be off by up to half the jump)."""
    i, j = np.triu_indices(len(x), 1)
    d = x[j] - x[i]
    d -= box[0, 0] * np.round(d / box[0, 0])
    r = np.linalg.norm(d, axis=-1)
    # Under a strain of size δ a distance moves by at most δ·(r + 2 × molecular radius).
    return min(1e-6, 0.4 * float(np.min(np.abs(r - cutoff) / (r + 0.3))))


def _fd_virial(reference, x, box, points):
    """-∂E/∂ε_ab by central differences of OpenMM energies under x + c·ε, box·(I + ε)."""
    delta = _kink_free_step(x, box)
    result = {}
    for a, b in STRAINS:
        energies = []
        for sign in (1, -1):
            strain = np.zeros((3, 3))
            strain[a, b] = sign * delta
            energies.append(reference(x + points @ strain, box + box @ strain))
        result[a, b] = -(energies[0] - energies[1]) / (2 * delta)
    return result


@pytest.mark.parametrize("mode", ["atomic", "molecular"])
def test_virial_matches_openmm_strain_derivative(liquid, mode):
    ms = liquid["ms"]
    x, box = liquid["x"][:1], liquid["box"]
    if mode == "atomic":
        w = virial(liquid["potential"], x, box)[0]
        points = x[0].numpy()
    else:
        # Unit masses make the molecular centre the geometric centre (OpenMM's convention);
        # molecules are whole in OpenMM's unwrapped positions.
        w = virial(liquid["potential"], x, box, torch.ones_like(liquid["masses"]),
                   liquid["molecules"])[0]
        centres = np.zeros_like(x[0].numpy())
        for mol in liquid["molecules"]:
            centres[mol] = x[0].numpy()[mol].mean(0)
        points = centres
    expected = _fd_virial(ReferenceEnergy(ms.system), x[0].numpy(), ms.box, points)
    w = w.detach()
    scale = np.abs(list(expected.values())).max()
    for (a, b), value in expected.items():
        assert float(w[a, b]) == pytest.approx(value, abs=1e-5 * scale), (a, b)
    if mode == "atomic":  # rotation invariance; the molecular virial carries torques
        torch.testing.assert_close(w, w.T, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("rigid_molecules", [False, True])
def test_pressure_matches_openmm_barostat(liquid, rigid_molecules):
    """Kinetic part exactly (same velocities), configurational part to the accuracy of OpenMM's
    finite difference (box scaled by 1 ± 1e-3: pairs crossing the cutoff, where reaction-field
    forces jump, make it up to ~1.5% off; the strain-derivative test above is the tight
    check). OpenMM moves molecules by their geometric centres, so the molecular comparison
    uses unit masses for the centres."""
    ms = liquid["ms"]
    system = openmm.XmlSerializer.clone(ms.system)
    barostat = openmm.MonteCarloBarostat(1 * unit.bar, TEMPERATURE * unit.kelvin, 0)
    barostat.setScaleMoleculesAsRigid(rigid_molecules)
    system.addForce(barostat)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(liquid["x"][0].numpy())
    context.setVelocities(liquid["v"][0].numpy())
    p_openmm = barostat.computeCurrentPressure(context).value_in_unit(unit.bar)
    context.setVelocities(np.zeros_like(liquid["v"][0].numpy()))
    configurational_openmm = barostat.computeCurrentPressure(context).value_in_unit(unit.bar)

    mols = liquid["molecules"] if rigid_molecules else None
    to_bar = BAR_PER_KJ_MOL_NM3 / (3 * float(torch.det(liquid["box"])))
    kinetic = float(kinetic_tensor(liquid["v"][:1], liquid["masses"], mols)[0].trace())
    assert kinetic * to_bar == pytest.approx(p_openmm - configurational_openmm, rel=1e-6)
    centre_masses = torch.ones_like(liquid["masses"]) if rigid_molecules else liquid["masses"]
    w = virial(liquid["potential"], liquid["x"][:1], liquid["box"], centre_masses, mols)
    assert float(w[0].trace().detach()) * to_bar == pytest.approx(configurational_openmm,
                                                                  rel=2e-2)
    if not rigid_molecules:
        p = pressure(liquid["potential"], liquid["x"][:1], liquid["v"][:1], liquid["box"],
                     liquid["masses"])
        assert float(p[0].detach()) == pytest.approx(p_openmm,
                                                     abs=2e-2 * abs(configurational_openmm))


def test_pressure_tensor_consistency(liquid):
    args = (liquid["potential"], liquid["x"][:2], liquid["v"][:2], liquid["box"],
            liquid["masses"], liquid["molecules"])
    tensor = pressure_tensor(*args)
    scalar = pressure(*args)
    assert tensor.shape == (2, 3, 3)
    torch.testing.assert_close(scalar, tensor.diagonal(dim1=-2, dim2=-1).mean(-1))
    per_frame_box = pressure_tensor(args[0], args[1], args[2], liquid["box"].expand(2, 3, 3),
                                    *args[4:])
    torch.testing.assert_close(per_frame_box, tensor, rtol=1e-12, atol=1e-9)


def test_pressure_gradient_matches_finite_differences():
    """Double backward: ∂P/∂(positions, velocities, ε_LJ) of a small periodic LJ fluid."""
    gen = torch.Generator().manual_seed(2)
    box = torch.eye(3, dtype=torch.float64) * 1.2
    lattice = torch.cartesian_prod(*[torch.tensor([0.0, 0.6], dtype=torch.float64)] * 3)
    positions = lattice + 0.05 * torch.randn(1, 8, 3, generator=gen, dtype=torch.float64)
    velocities = torch.randn(1, 8, 3, generator=gen, dtype=torch.float64)
    masses = torch.linspace(10.0, 20.0, 8, dtype=torch.float64)
    i, j = torch.triu_indices(8, 8, 1)

    def lj(epsilon):
        def energy(x, b):
            d = x[j] - x[i]
            d = d - torch.round(d / b.diagonal()) * b.diagonal()
            s6 = (0.3 ** 2 / (d ** 2).sum(-1)) ** 3
            return (4 * epsilon * (s6 ** 2 - s6)).sum()
        return energy

    def p_of(x, v, epsilon):
        return pressure_tensor(lj(epsilon), x, v, box, masses, [[0, 1], [2, 3, 4], [5], [6, 7]])

    inputs = (positions.requires_grad_(), velocities.requires_grad_(),
              torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(p_of, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_input_errors(liquid):
    pot, x, box, masses = liquid["potential"], liquid["x"][:1], liquid["box"], liquid["masses"]
    with pytest.raises(InputError, match="molecules cover 3 of 375 atoms"):
        virial(pot, x, box, masses, [[0, 1, 2]])
    with pytest.raises(InputError, match="needs masses"):
        virial(pot, x, box, None, liquid["molecules"])
    with pytest.raises(InputError, match="box is None"):
        pressure(pot, x, liquid["v"][:1], None, masses)
    with pytest.raises(InputError, match="velocities .* must have the same shape"):
        pressure(pot, x, liquid["v"], box, masses)
    with pytest.raises(InputError, match="n_molecules must be a positive integer"):
        energy_per_molecule(pot, x, box, 0)
    with pytest.raises(InputError, match="temperature must be positive"):
        enthalpy_of_vaporization(torch.zeros(3), 0.0, -1.0)
    with pytest.raises(InputError, match="must return a scalar tensor"):
        frame_energies(lambda p, b: p.sum(0), x, box)
    with pytest.raises(InputError, match="more than one molecule"):
        kinetic_tensor(liquid["v"][:1], masses, [[0, 1], [1, 2]])
