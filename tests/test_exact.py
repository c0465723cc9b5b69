"""The exact mode: fixed-point arithmetic, the information buffer, integer forces, bitwise
reversal of flexible TIP3P water, and gradients against backprop-through-time and float mode.

Systems are built with OpenMM's bundled ``tip3p.xml`` (flexible, reaction field): 216 waters
for the bitwise claims, 20 waters (cutoff 0.4 nm) for gradients.
"""

import math
import random
from fractions import Fraction

import openmm
import openmm.app as app
import pytest
import torch
from openmm import unit

from openmm_reversible.benchmarks.water import flexible_water
from openmm_reversible.exact import (
    DeterministicForces,
    ExactLangevinIntegrator,
    ExactReversibleSimulation,
)
from openmm_reversible.exact.fixed_point import (
    DENOMINATOR,
    LIMB_BITS,
    FixedPointFormat,
    FixedPointRangeError,
    InformationBuffer,
    friction_numerator,
    scale_exact,
    unscale_exact,
)
from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.potential import TorchPotential
from openmm_reversible.potential.base import UnsupportedForceError
from openmm_reversible.systems import openmm_data_file
from openmm_reversible.trajectory import Trajectory
from openmm_reversible.units import positions_tensor

TOL = 1e-8  # docs/design.md: gradients vs BPTT / float mode on short runs


@pytest.fixture(autouse=True)
def one_thread():
    """Run single-threaded (the machine is shared); tests that vary threads restore this."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_water():
    return flexible_water(20, cutoff=0.4, seed=5)


def energy_and_kinetic_loss(traj: Trajectory, potential) -> torch.Tensor:
    """Depends on positions and velocities and, through frame energies, on the parameters."""
    energies = torch.stack([potential(x, traj.box) for x in traj.positions])
    return traj.kinetic_energy().mean() + 0.1 * energies.mean()


def loss_and_gradients(sim, potential, x0, v0, box):
    potential.zero_grad()
    x = x0.clone().requires_grad_(True)
    v = v0.clone().requires_grad_(True)
    loss = sim(x, v, box)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in potential.parameters()] + [x.grad, v.grad]


def rel_error(a, b) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------ fixed-point arithmetic


def test_information_buffer_matches_python_integers():
    rng = random.Random(3)
    values = [0, 1, (1 << 200) + 12345, rng.getrandbits(97), rng.getrandbits(31)]
    buffer = InformationBuffer((len(values),))
    for k in range(7, -1, -1):  # b = b·2**31 + limb, most significant limb first
        buffer.push_limb(torch.tensor([(v >> (LIMB_BITS * k)) & (DENOMINATOR - 1)
                                       for v in values]))
    assert buffer.values() == values
    assert buffer.n_limbs == 7
    remainders = buffer.divmod(1_000_003)
    assert remainders.tolist() == [v % 1_000_003 for v in values]
    assert buffer.values() == [v // 1_000_003 for v in values]
    buffer.multiply_add(1_000_003, remainders)
    assert buffer.values() == values
    assert buffer.pop_limb().tolist() == [v % DENOMINATOR for v in values]
    assert buffer.values() == [v >> LIMB_BITS for v in values]
    assert buffer.bit_lengths().tolist() == [(v >> LIMB_BITS).bit_length() for v in values]


def test_exact_friction_is_accurate_to_one_count_and_exactly_invertible():
    numerator = friction_numerator(math.exp(-1.0 * 0.001))
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-2**61, 2**61, (40, 3), generator=generator)
    values[0] = torch.tensor([0, 1, -1])
    values[1] = torch.tensor([2**62 - 1, -(2**62) + 1, -7])
    buffer = InformationBuffer(values.shape)
    history = [values]
    steps = 1500
    for _ in range(steps):
        scaled = scale_exact(history[-1], numerator, buffer)
        exact = [Fraction(int(v) * numerator, DENOMINATOR) for v in history[-1].reshape(-1)]
        assert all(abs(int(s) - e) < 1 for s, e in zip(scaled.reshape(-1), exact, strict=True))
        history.append(scaled)
    # The buffer holds the first stored limb plus log2(d/n) bits per value per step.
    growth = buffer.bit_lengths().mean() - LIMB_BITS
    assert growth == pytest.approx(steps * math.log2(DENOMINATOR / numerator), abs=1.0)
    assert buffer.nbytes == buffer.n_limbs * values.numel() * 8
    v = history[-1]
    for k in range(steps):
        v = unscale_exact(v, numerator, buffer)
        assert torch.equal(v, history[-2 - k])
    assert buffer.n_limbs == 0  # the buffer is empty again: all information returned


def test_fixed_point_format_scales_and_range_errors():
    fmt = FixedPointFormat()
    assert fmt.resolution("position") == 2.0**-48
    assert fmt.range("velocity") == 2.0**12
    x = torch.tensor([[0.1, -2.5, 12.345678]], dtype=torch.float64)
    counts = fmt.to_fixed(x, "position")
    assert torch.equal(fmt.to_fixed(fmt.to_float(counts, "position"), "position"), counts)
    assert float((fmt.to_float(counts, "position") - x).abs().max()) <= 2.0**-49
    far = torch.zeros(4, 3, dtype=torch.float64)
    far[2, 1] = -2e4
    with pytest.raises(FixedPointRangeError, match="particle 2 position -20000 nm is outside "
                                                   "the fixed-point range ±16384 nm"):
        fmt.to_fixed(far, "position")
    with pytest.raises(FixedPointRangeError, match="particle 0 velocity nan"):
        fmt.to_fixed(torch.full((1, 3), math.nan, dtype=torch.float64), "velocity")


# ------------------------------------------------------------------------ integer forces


def test_integer_forces_match_autograd_and_do_not_depend_on_history(small_water):
    pot, x, box = small_water.potential, small_water.positions, small_water.box
    forces = DeterministicForces(pot)
    counts = forces(x, box)
    x_req = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(-pot(x_req, box), x_req)
    got = forces.fixed_point.to_float(counts, "force")
    assert float((got - reference).abs().max() / reference.abs().max()) < 1e-9
    # A far-away evaluation forces a neighbour-list rebuild in a different order of calls:
    # the integer forces at x are unchanged.
    forces(x + 0.3, box)
    assert torch.equal(forces(x, box), counts)


@pytest.fixture(scope="module")
def villin():
    """Villin headpiece without water (amber14): torsions, 1-4 exceptions, switched cutoff."""
    pdb = app.PDBFile(openmm_data_file("test.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.deleteWater()  # the protein and its counter-ions remain
    forcefield = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.CutoffNonPeriodic,
                                     nonbondedCutoff=1.0 * unit.nanometer,
                                     switchDistance=0.8 * unit.nanometer)
    return TorchPotential(system), positions_tensor(modeller.getPositions())


def test_integer_forces_of_a_protein_with_torsions_and_exceptions(villin):
    pot, x = villin
    forces = DeterministicForces(pot)
    x_req = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(-pot(x_req, None), x_req)
    got = forces.fixed_point.to_float(forces(x, None), "force")
    assert float((got - reference).abs().max() / reference.abs().max()) < 1e-9


CORRECTLY_ROUNDED = {
    # + - × ÷ √ (IEEE 754 rounds them correctly on every device) and exact operations.
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward1",
    "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "ReciprocalBackward0",
    "SqrtBackward0", "NegBackward0", "AbsBackward0", "WhereBackward0", "MaximumBackward0",
    "MinimumBackward0", "ClampMinBackward0", "ClampBackward1", "IndexBackward0",
    "SelectBackward0", "StackBackward0", "UnbindBackward0", "SumBackward0",
    "AccumulateGrad"}


def graph_operations(root) -> set[str]:
    seen, names, stack = set(), set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_integer_forces_use_only_correctly_rounded_operations(small_water, villin):
    """Device independence: the graph behind the integer forces (bonds, angles, RF pairs,
    torsions, exceptions, switching) holds no library function whose last bit may differ
    between devices (atan2, cos, pow, norms, reductions over components)."""
    for potential, x, box in ((small_water.potential, small_water.positions, small_water.box),
                              (*villin, None)):
        items = []
        with torch.enable_grad():
            energy = DeterministicForces(potential).leaf_energy(x, box, items)
        used = graph_operations(energy)
        assert used <= CORRECTLY_ROUNDED, used - CORRECTLY_ROUNDED
        assert {"SqrtBackward0", "DivBackward0", "WhereBackward0"} <= used


@pytest.mark.gpu
def test_integer_forces_are_the_same_on_cpu_and_cuda(villin):
    water = flexible_water(216, cutoff=0.9, seed=4)
    for potential, x, box in ((water.potential, water.positions, water.box), (*villin, None)):
        cpu = DeterministicForces(potential)(x, box)
        gpu = DeterministicForces(potential.to("cuda"))(x.cuda(), box.cuda())
        potential.to("cpu")
        assert torch.equal(gpu.cpu(), cpu)


def test_unsupported_potentials_are_refused():
    modeller = app.Modeller(app.Topology(), [])
    forcefield = app.ForceField("tip3p.xml")
    modeller.addSolvent(forcefield, model="tip3p", numAdded=20, neutralize=False)
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                     nonbondedCutoff=0.4 * unit.nanometer, rigidWater=False,
                                     constraints=None)
    with pytest.raises(UnsupportedForceError, match="uses PME.*CutoffPeriodic"):
        DeterministicForces(TorchPotential(system))
    with pytest.raises(UnsupportedForceError, match="need a TorchPotential"):
        DeterministicForces(torch.nn.Linear(3, 1))
    custom = openmm.System()
    for _ in range(2):
        custom.addParticle(1.0)
    bond = openmm.CustomBondForce("r^2")
    bond.addBond(0, 1, [])
    custom.addForce(bond)
    with pytest.raises(UnsupportedForceError, match=r"CustomBondForce \(force 0\) is not "
                                                    "supported by the exact mode.*supported: "
                                                    "HarmonicBondForce"):
        DeterministicForces(TorchPotential(custom))


# ------------------------------------------------------------------------ exact dynamics


def test_216_waters_1000_steps_forward_and_back_is_bitwise_identical():
    water = flexible_water(216, cutoff=0.5, seed=2)
    integrator = ExactLangevinIntegrator(0.001, 1.0, 295.15, seed=11)
    forces = integrator.forces(water.potential)
    state = integrator.state(water.positions, water.velocities)
    x0, v0 = state.copy()
    integrator.run(state, forces, water.box, water.potential.masses, 1000)
    assert state.step == 1000
    assert not torch.equal(state.positions, x0)
    n_dof = x0.numel()
    bits = state.buffer.bit_lengths().mean()
    assert bits == pytest.approx(LIMB_BITS + 1000 * integrator.bits_per_step, abs=1.0)
    assert state.buffer.nbytes <= 2 * 8 * n_dof  # at most 2 limbs of 8 bytes per dof
    integrator.run_reverse(state, forces, water.box, water.potential.masses, 1000)
    assert state.step == 0
    assert torch.equal(state.positions, x0)
    assert torch.equal(state.velocities, v0)
    assert state.buffer.n_limbs == 0


def test_two_thread_counts_give_identical_integers():
    water = flexible_water(216, cutoff=0.9, seed=4)  # > 32768 pairs: threads split the work
    integrator = ExactLangevinIntegrator(0.001, 1.0, 295.15, seed=6)
    forces = integrator.forces(water.potential)
    finals = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        state = integrator.state(water.positions, water.velocities)
        integrator.run(state, forces, water.box, water.potential.masses, 8)
        finals.append((state.positions, state.velocities, state.buffer.values()))
    assert torch.equal(finals[0][0], finals[1][0])
    assert torch.equal(finals[0][1], finals[1][1])
    assert finals[0][2] == finals[1][2]


def test_exact_dynamics_follow_the_float_integrator(small_water):
    integrator = ExactLangevinIntegrator(0.001, 1.0, 295.15, seed=9)
    assert integrator.friction == pytest.approx(1.0, rel=3e-7)
    assert integrator.float_integrator.c == pytest.approx(integrator.c, rel=1e-15)
    pot, box, masses = small_water.potential, small_water.box, small_water.potential.masses
    state = integrator.state(small_water.positions, small_water.velocities)
    x, v = integrator.positions(state), integrator.velocities(state)
    integrator.run(state, integrator.forces(pot), box, masses, 50)
    x, v = integrator.float_integrator.run(pot, x, v, box, masses, 50)
    # Rounding to 4e-15 nm per step is all that separates them (stiff O-H bonds turn
    # position differences into ~1e2 times larger velocity differences).
    assert float((integrator.positions(state) - x).abs().max()) < 1e-12
    assert float((integrator.velocities(state) - v).abs().max()) < 1e-10


def test_range_errors_name_particle_and_step(small_water):
    pot, box, masses = small_water.potential, small_water.box, small_water.potential.masses
    tight = ExactLangevinIntegrator(0.001, 1.0, 295.15, fixed_point=FixedPointFormat(
        force_bits=60))  # force range ±4 kJ/mol/nm: any water bond exceeds it
    state = tight.state(small_water.positions, small_water.velocities)
    with pytest.raises(FixedPointRangeError, match=r"step 1: particle \d+ force from its "
                                                   r"interaction with particle \d+"):
        tight.step(state, tight.forces(pot), box, masses)
    integrator = ExactLangevinIntegrator(0.001, 1.0, 295.15, fixed_point=FixedPointFormat(
        position_bits=60, velocity_bits=40))  # position range ±4 nm
    v = small_water.velocities.clone()
    v[7] = 1e4  # nm/ps: 5 nm per half drift
    state = integrator.state(small_water.positions, v)
    forces = integrator.forces(pot)
    with pytest.raises(FixedPointRangeError, match="step 1: particle 7 position"):
        integrator.run(state, forces, box, masses, 3)


# ------------------------------------------------------------------------ gradients


def exact_and_float(water, n_steps, snapshot_every, truncation=None, seed=8):
    """Exact-mode gradients and the float references on the same (rounded) initial state."""
    pot, box = water.potential, water.box
    integrator = ExactLangevinIntegrator(0.001, 1.0, 295.15, seed=seed)
    state = integrator.state(water.positions, water.velocities)
    x0, v0 = integrator.positions(state), integrator.velocities(state)
    exact = ExactReversibleSimulation(pot, integrator, n_steps, snapshot_every,
                                      energy_and_kinetic_loss, truncation=truncation)
    results = {"exact": loss_and_gradients(exact, pot, x0, v0, box)}
    for mode in ("reversible",) if truncation else ("reversible", "bptt"):
        sim = ReversibleSimulation(pot, integrator.float_integrator, n_steps, snapshot_every,
                                   energy_and_kinetic_loss, truncation=truncation, mode=mode)
        results[mode] = loss_and_gradients(sim, pot, x0, v0, box)
    return results, exact.info


def test_gradients_match_bptt_and_float_mode(small_water):
    results, info = exact_and_float(small_water, 30, 10)
    assert info["bitwise_identical"] and info["reconstruction_error"] == 0.0
    loss, grads = results["exact"]
    for reference in ("bptt", "reversible"):
        ref_loss, ref_grads = results[reference]
        assert float(abs(loss - ref_loss) / abs(ref_loss)) < TOL
        assert rel_error(grads, ref_grads) < TOL


def test_truncated_gradients_match_float_mode(small_water):
    results, info = exact_and_float(small_water, 30, 10, truncation=6)
    assert info["bitwise_identical"]
    assert rel_error(results["exact"][1], results["reversible"][1]) < TOL
    untruncated = exact_and_float(small_water, 30, 10)[0]["exact"][1]
    assert rel_error(results["exact"][1], untruncated) > 1e-3  # truncation changes the answer


def test_long_window_reconstructs_every_snapshot_exactly(small_water):
    integrator = ExactLangevinIntegrator(0.001, 5.0, 295.15, seed=1)
    sim = ExactReversibleSimulation(small_water.potential, integrator, 400, 100,
                                    energy_and_kinetic_loss)
    loss = sim(small_water.positions, small_water.velocities, small_water.box)
    loss.backward(retain_graph=True)
    assert sim.info["bitwise_identical"]
    assert sim.info["buffer_bits_per_dof"] == pytest.approx(
        LIMB_BITS + 400 * integrator.bits_per_step, abs=1.0)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all())
               for p in small_water.potential.parameters())
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_exact_simulation_rejects_a_float_integrator(small_water):
    float_integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15)
    with pytest.raises(ValueError, match="needs an ExactLangevinIntegrator"):
        ExactReversibleSimulation(small_water.potential, float_integrator, 10, 5,
                                  energy_and_kinetic_loss)


def test_openmm_velocity_quantities_are_accepted(small_water):
    """A velocity Quantity (nm/ps, or any velocity unit) gives the loss of the plain tensor."""
    pot, box = small_water.potential, small_water.box
    integrator = ExactLangevinIntegrator(0.001, 1.0, 295.15, seed=8)
    state = integrator.state(small_water.positions, small_water.velocities)
    x0, v0 = integrator.positions(state), integrator.velocities(state)
    sim = ExactReversibleSimulation(pot, integrator, 4, 2, energy_and_kinetic_loss)
    expected = sim(x0, v0, box)
    quantity = v0.numpy() * unit.nanometer / unit.picosecond
    assert torch.equal(sim(x0 * 1.0, quantity, box), expected)
    assert torch.equal(sim(x0.numpy() * unit.nanometer, quantity, box), expected)
