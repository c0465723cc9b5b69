"""Reversible gradients against backpropagation through time (the ground truth), against
central finite differences with common random numbers, truncation, resynchronisation and
determinism.

Systems: an 8-atom Lennard-Jones cluster (non-periodic), a 27-atom periodic Lennard-Jones fluid,
a neural pair potential (a tiny MLP on pair distances on top of a fixed repulsion) and a box of
20 flexible TIP3P waters (the classical TorchPotential of a tagged force field).
"""


import openmm.app as app
import pytest
import torch
from openmm import unit
from test_integrator import LennardJones, lj_cluster
from torch import nn
from water_systems import tagged_tip3p

from openmm_reversible.errors import InputError
from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.potential import TorchPotential
from openmm_reversible.trajectory import Trajectory

TOL = 1e-8  # docs/design.md: reversible vs BPTT, float64, untruncated, <= 1000 steps


class PairMLP(nn.Module):
    """E = Σ_pairs [ (0.3 nm / r)^12 + MLP(r) ]: a smooth neural pair potential, kJ/mol."""

    def __init__(self, n_atoms: int, hidden: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
        self.register_buffer("masses", torch.full((n_atoms,), 20.0, dtype=torch.float64))

    def forward(self, positions, box):
        i, j = torch.triu_indices(positions.shape[0], positions.shape[0], 1)
        r = (positions[j] - positions[i]).norm(dim=-1)
        return ((0.3 / r) ** 12).sum() + self.mlp(r[:, None]).sum()


def position_loss(traj: Trajectory, potential) -> torch.Tensor:
    """Mean squared distance from the centroid over the snapshots, nm²."""
    centred = traj.positions - traj.positions.mean(dim=1, keepdim=True)
    return (centred**2).sum(-1).mean()


def kinetic_and_energy_loss(traj: Trajectory, potential) -> torch.Tensor:
    """Depends on velocities and, through frame energies, directly on the parameters."""
    energies = torch.stack([potential(x, traj.box) for x in traj.positions])
    return traj.kinetic_energy().mean() + 0.1 * energies.mean()


def per_frame_loss(traj: Trajectory, potential) -> torch.Tensor:
    """A sum of independent per-snapshot terms (so truncation has a closed-form reference)."""
    return (traj.positions[..., 0] ** 2).sum() + 0.05 * traj.kinetic_energy().sum()


def gradients(sim, potential, x0, v0, box=None, start_step=0):
    """Loss and gradients w.r.t. the potential's parameters, x0 and v0."""
    potential.zero_grad()
    x = x0.clone().requires_grad_(True)
    v = v0.clone().requires_grad_(True)
    loss = sim(x, v, box, start_step=start_step)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in potential.parameters()] + [x.grad, v.grad]


def rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| relative to the largest |b|, over each pair of tensors."""
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b, strict=True))


def compare_with_bptt(potential, integrator, x0, v0, loss_fn, n_steps, snapshot_every,
                      box=None, **kwargs):
    results = {}
    for mode in ("reversible", "bptt"):
        sim = ReversibleSimulation(potential, integrator, n_steps, snapshot_every, loss_fn,
                                   mode=mode, **kwargs)
        results[mode] = gradients(sim, potential, x0, v0, box)
        if mode == "reversible":
            info = sim.info
    (loss_r, grads_r), (loss_b, grads_b) = results["reversible"], results["bptt"]
    assert torch.equal(loss_r, loss_b)
    assert all(bool(g.abs().max() > 0) for g in grads_b)
    return rel_error(grads_r, grads_b), info


def test_position_loss_matches_bptt_over_1000_steps():
    x0, v0 = lj_cluster()
    pot = LennardJones(n_atoms=8)
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 120.0, seed=1)
    err, info = compare_with_bptt(pot, integrator, x0, v0, position_loss, 1000, 100)
    assert err < TOL
    assert info["reconstruction_error"] < 1e-9
    assert info["n_resyncs"] == 10  # 9 earlier snapshots and the initial state


def test_velocity_and_energy_loss_matches_bptt_neural_potential():
    x0, v0 = lj_cluster(spacing=0.36, seed=5)
    pot = PairMLP(n_atoms=8)
    integrator = LangevinMiddleIntegrator(0.001, 2.0, 200.0, seed=2)
    err, _ = compare_with_bptt(pot, integrator, x0, v0, kinetic_and_energy_loss, 300, 30)
    assert err < TOL


def test_periodic_fluid_matches_bptt():
    x0, v0 = lj_cluster(n_side=3, spacing=0.4, seed=6)
    box = torch.eye(3, dtype=torch.float64) * 1.2
    pot = LennardJones(n_atoms=27)
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 120.0, seed=3)
    err, _ = compare_with_bptt(pot, integrator, x0, v0, kinetic_and_energy_loss, 150, 25,
                               box=box)
    assert err < TOL


def test_resync_bounds_drift():
    # γΔt = 0.4: reversal amplifies round-off by e^0.4 per step, e^80 over the window.
    x0, v0 = lj_cluster(seed=7)
    pot = LennardJones(n_atoms=8)
    integrator = LangevinMiddleIntegrator(0.004, 100.0, 120.0, seed=4)
    drifting = ReversibleSimulation(pot, integrator, 200, 200, position_loss)
    gradients(drifting, pot, x0, v0)
    assert not drifting.info["reconstruction_error"] < 1e-3
    err, info = compare_with_bptt(pot, integrator, x0, v0, position_loss, 200, 200,
                                  resync_every=10)
    assert err < TOL
    assert info["reconstruction_error"] < 1e-9
    assert info["n_resyncs"] == 20


def test_agrees_with_central_finite_differences():
    x0, v0 = lj_cluster(seed=8)
    pot = LennardJones(n_atoms=8)
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 120.0, seed=5)
    sim = ReversibleSimulation(pot, integrator, 100, 10, kinetic_and_energy_loss)
    _, grads = gradients(sim, pot, x0, v0)
    for k, p in enumerate(pot.parameters()):
        h = 1e-6 * float(p.detach().abs())
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                p += sign * h
                values.append(float(sim(x0, v0)))
                p -= sign * h
        fd = (values[0] - values[1]) / (2 * h)
        assert grads[k].item() == pytest.approx(fd, rel=1e-6)


def truncated_reference(potential, integrator, x0, v0, loss_fn, n_steps, snapshot_every, T):
    """Sum over snapshots of BPTT gradients with the state T steps before each one detached."""
    total = None
    for s in range(snapshot_every, n_steps + 1, snapshot_every):
        start = max(0, s - T)
        x, v = integrator.run(potential, x0, v0, None, potential.masses, start)
        sim = ReversibleSimulation(potential, integrator, s - start, s - start, loss_fn,
                                   mode="bptt")
        _, grads = gradients(sim, potential, x, v, start_step=start)
        if start > 0:  # the initial state is outside this snapshot's window
            grads[-2:] = [torch.zeros_like(g) for g in grads[-2:]]
        total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
    return total


@pytest.mark.parametrize("T", [30, 70, 400])
def test_truncation_matches_windowed_bptt(T):
    x0, v0 = lj_cluster(seed=9)
    pot = LennardJones(n_atoms=8)
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 120.0, seed=6)
    sim = ReversibleSimulation(pot, integrator, 200, 50, per_frame_loss, truncation=T)
    _, grads = gradients(sim, pot, x0, v0)
    reference = truncated_reference(pot, integrator, x0, v0, per_frame_loss, 200, 50, T)
    assert rel_error(grads, reference) < TOL


def test_bitwise_determinism_and_window_continuation():
    x0, v0 = lj_cluster(seed=10)
    pot = LennardJones(n_atoms=8)
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 120.0, seed=7)
    sim = ReversibleSimulation(pot, integrator, 100, 20, kinetic_and_energy_loss,
                               truncation=50, resync_every=30)
    loss_a, grads_a = gradients(sim, pot, x0, v0)
    loss_b, grads_b = gradients(sim, pot, x0, v0)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    # Two consecutive windows of 50 steps continue one noise stream: same final state.
    half = ReversibleSimulation(pot, integrator, 50, 50, position_loss)
    half(x0, v0)
    half(*half.final_state, start_step=50)
    assert torch.equal(half.final_state[0], sim.final_state[0])
    assert torch.equal(half.trajectory.steps, torch.tensor([100]))


def test_second_backward_evaluates_the_loss_again():
    """The loss graph kept by the forward pass serves one backward; a second one
    (``retain_graph=True``) evaluates the loss again and gives the same gradient."""
    x0, v0 = lj_cluster(seed=4)
    pot = LennardJones(n_atoms=8)
    sim = ReversibleSimulation(pot, LangevinMiddleIntegrator(0.002, 1.0, 120.0, seed=3), 40,
                               20, kinetic_and_energy_loss)
    pot.zero_grad()
    x = x0.clone().requires_grad_(True)
    loss = sim(x, v0)
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in pot.parameters()] + [x.grad.clone()]
    loss.backward()
    second = [p.grad for p in pot.parameters()] + [x.grad]
    assert all(bool(a.abs().max() > 0) for a in first)
    assert all(torch.equal(2 * a, b) for a, b in zip(first, second, strict=True))


def test_rejects_bad_input():
    pot = LennardJones(n_atoms=8)
    integrator = LangevinMiddleIntegrator(0.002, 1.0, 120.0)
    with pytest.raises(InputError, match="snapshot_every must be between 1 and n_steps"):
        ReversibleSimulation(pot, integrator, 10, 20, position_loss)
    with pytest.raises(InputError, match="truncation is only available"):
        ReversibleSimulation(pot, integrator, 10, 5, position_loss, truncation=3, mode="bptt")
    with pytest.raises(InputError, match="pass masses="):
        ReversibleSimulation(lambda x, box: (x**2).sum(), integrator, 10, 5, position_loss)
    x0, v0 = lj_cluster()
    sim = ReversibleSimulation(pot, integrator, 10, 5, lambda traj, p: traj.positions)
    with pytest.raises(InputError, match="loss_fn must return a scalar tensor"):
        sim(x0, v0)
    with pytest.raises(InputError, match=r"expected \(8, 3\)"):
        ReversibleSimulation(pot, integrator, 10, 5, position_loss)(x0[:4], v0[:4])


@pytest.mark.parametrize("kwargs", [{"rigidWater": True}, {"constraints": app.HBonds}])
def test_constrained_systems_are_refused_before_any_step(kwargs):
    """Rigid water or bond constraints: refused with the fix named, not run unconstrained."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=10,
                        neutralize=False)
    system = app.ForceField("tip3p.xml").createSystem(
        modeller.topology, nonbondedMethod=app.NoCutoff,
        **{"constraints": None, "rigidWater": False, **kwargs})
    pot = TorchPotential(system)
    assert pot.n_constraints == system.getNumConstraints() > 0
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=8)
    with pytest.raises(InputError, match=r"constraints.*rigidWater=False and constraints=None"):
        ReversibleSimulation(pot, integrator, 10, 5, position_loss)


def test_openmm_quantities_are_accepted_for_positions_and_velocities():
    """OpenMM's own state (Quantities in nm and nm/ps) gives the same loss as tensors."""
    import openmm

    x0, v0 = lj_cluster(seed=3)
    pot = LennardJones(n_atoms=8)
    sim = ReversibleSimulation(pot, LangevinMiddleIntegrator(0.002, 1.0, 120.0, seed=2), 10, 5,
                               kinetic_and_energy_loss)
    expected = sim(x0, v0)
    system = openmm.System()
    for _ in range(8):
        system.addParticle(20.0)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(x0.numpy())
    context.setVelocities(v0.numpy())
    state = context.getState(getPositions=True, getVelocities=True)
    assert torch.equal(sim(state.getPositions(), state.getVelocities()), expected)
    assert torch.equal(sim(state.getPositions(asNumpy=True),
                           state.getVelocities(asNumpy=True)), expected)
    in_angstrom = (v0.numpy() * 10.0) * unit.angstrom / unit.picosecond
    assert torch.allclose(sim(x0, in_angstrom), expected, rtol=1e-12, atol=0.0)


def test_classical_water_matches_bptt():
    """Flexible TIP3P (reaction field) from tagged XML: charges, bonds and LJ all trainable."""
    pot, x0, box = tagged_tip3p()
    integrator = LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=8)
    v0 = integrator.noise(0, pot.masses)
    err, info = compare_with_bptt(pot, integrator, x0, v0, kinetic_and_energy_loss, 20, 5,
                                  box=box)
    assert err < TOL
    assert info["reconstruction_error"] < 1e-12


@pytest.mark.slow
def test_216_water_box_reverses_1000_steps_to_1e9_nm():
    """Float64, no re-synchronisation: 1 ps forward then 1 ps backward on the 216-water box
    (flexible TIP3P, reaction field) returns to the initial positions within 1e-9 nm."""
    from openmm_reversible.benchmarks.water import flexible_water

    w = flexible_water(216)
    masses = w.potential.masses
    x, v = w.integrator.run(w.potential, w.positions, w.velocities, w.box, masses, 1000)
    assert (x - w.positions).abs().max() > 0.1  # the molecules really moved
    xr, vr = w.integrator.run_reverse(w.potential, x, v, w.box, masses, 1000)
    assert (xr - w.positions).abs().max() <= 1e-9
    assert (vr - w.velocities).abs().max() <= 1e-7
