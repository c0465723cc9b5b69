"""Machine-learning potentials: the reference models, the contract check, and their use in the
reversible integrator.

Reference values: the Stillinger–Weber cohesive energy is exactly −2ε per atom in the perfect
diamond lattice at the potential's own equilibrium lattice constant (Stillinger & Weber 1985:
a₀ = 5.431 Å for σ = 2.0951 Å, scaled here to σ = 0.14 nm).
"""

import numpy as np
import pytest
import torch

from openmm_reversible.integrators import LangevinMiddleIntegrator, ReversibleSimulation
from openmm_reversible.ml import (
    BehlerParrinello,
    ContractError,
    EnergySum,
    MLPotential,
    PairSearch,
    SchNet,
    StillingerWeber,
    check_energy_model,
    diamond_lattice,
)
from openmm_reversible.ml.pairs import neighbor_pairs_of_centres

SW_EQUILIBRIUM = 0.14 * 0.5431 / 0.20951  # nm, SW silicon a₀ scaled by σ
CARBON = 12.011


def crystal(n_cells=2, a=0.3567, jitter=0.004, seed=0):
    x, box = diamond_lattice(n_cells, a)
    x = x + jitter * np.random.default_rng(seed).standard_normal(x.shape)
    return torch.tensor(x), torch.tensor(box)


def trained_schnet(seed=1, scale=0.3, **sizes):
    """A SchNet whose zero-initialised readout is set to random values (non-zero energy)."""
    model = SchNet(seed=seed, **sizes)
    with torch.no_grad():
        model.readout[1].weight.copy_(scale * torch.randn(model.readout[1].weight.shape,
                                                          generator=torch.Generator()
                                                          .manual_seed(seed),
                                                          dtype=torch.float64))
    return model


def trained_behler_parrinello(seed=1, scale=0.3, **sizes):
    """A Behler–Parrinello model standardized on the perfect crystal, with random output
    weights (non-zero energy)."""
    model = BehlerParrinello(seed=seed, **sizes)
    x, box = diamond_lattice(2)
    model.standardize(x, box)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for network in model.networks:
            network.output.weight.copy_(scale * torch.randn(network.output.weight.shape,
                                                            generator=generator,
                                                            dtype=torch.float64))
    return model


def forces(model, x, box, *args):
    x = x.detach().clone().requires_grad_(True)
    energy = model(x, box, *args)
    return energy.detach(), -torch.autograd.grad(energy, x)[0]


def test_stillinger_weber_cohesive_energy_is_minus_two_epsilon():
    x, box = diamond_lattice(2, SW_EQUILIBRIUM)
    energy = StillingerWeber()(torch.tensor(x), torch.tensor(box))
    assert float(energy.detach()) / 64 == pytest.approx(-400.0, rel=1e-6)


def test_stillinger_weber_three_body_vanishes_at_tetrahedral_angle():
    # In the perfect lattice every angle is tetrahedral (cos = -1/3): only the pair term counts.
    sw = StillingerWeber()
    x, box = diamond_lattice(2)
    no_three_body = StillingerWeber(lambda_=0.0)
    xt, bt = torch.tensor(x), torch.tensor(box)
    assert float(sw(xt, bt).detach()) == pytest.approx(float(no_three_body(xt, bt).detach()),
                                                       rel=1e-12)
    # ... and a distortion raises the three-body energy above zero.
    xd, bd = crystal()
    assert float(sw(xd, bd).detach()) > float(no_three_body(xd, bd).detach())


def test_neighbor_pairs_of_centres_counts_each_pair_once():
    centre = torch.tensor([2, 0, 2, 1, 0, 2, 2])
    first, second = neighbor_pairs_of_centres(centre, 3)
    pairs = sorted(tuple(sorted(p)) for p in zip(first.tolist(), second.tolist(), strict=True))
    expected = sorted([(1, 4), (0, 2), (0, 5), (0, 6), (2, 5), (2, 6), (5, 6)])
    assert pairs == expected


def test_pair_search_with_no_pair_in_range():
    # A dilute gas: the cell list finds nothing, and models see an empty pair list.
    x, box = diamond_lattice(2)
    x, box = torch.tensor(x * 3), torch.tensor(box * 3)
    i, j, d, r = PairSearch(0.27)(x, box)
    assert i.numel() == j.numel() == r.numel() == 0 and d.shape == (0, 3)
    assert float(StillingerWeber()(x, box).detach()) == 0.0


@pytest.mark.parametrize("make", [
    StillingerWeber, trained_schnet, trained_behler_parrinello,
    lambda: trained_behler_parrinello(angular_cutoff=0.2)])
def test_torchscript_equals_eager(make):
    model = make()
    x, box = crystal()
    e_eager, f_eager = forces(model, x, box)
    e_script, f_script = forces(torch.jit.script(model), x, box)
    assert float(e_script) == pytest.approx(float(e_eager), rel=1e-12)
    torch.testing.assert_close(f_script, f_eager, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [trained_schnet, trained_behler_parrinello])
def test_float32_matches_float64(make):
    model = make()
    x, box = crystal()
    e64, f64 = forces(model, x, box)
    model32 = make().to(torch.float32)
    e32, f32 = forces(model32, x.float(), box.float())
    assert e32.dtype == torch.float32
    assert float(e32) == pytest.approx(float(e64), rel=1e-5)
    assert float((f32.double() - f64).norm() / f64.norm()) < 1e-4


def test_models_are_twice_differentiable():
    # gradgradcheck on a small non-periodic cluster: exact second derivatives of the energy.
    x = torch.tensor([[0.0, 0.0, 0.0], [0.09, 0.08, 0.01], [-0.08, 0.1, -0.03],
                      [0.02, -0.1, 0.09]], dtype=torch.float64, requires_grad=True)
    small_bp = BehlerParrinello(n_radial=3, zetas=(2.0,), lambdas=(-1.0,), angular_widths=(0.15,),
                                hidden=(4,))
    torch.nn.init.normal_(small_bp.networks[0].output.weight, std=0.5)
    for model in (StillingerWeber(), trained_schnet(n_features=4, n_rbf=4, n_interactions=1),
                  small_bp):
        assert torch.autograd.gradgradcheck(lambda y, m=model: m(y, None), (x,))


@pytest.mark.parametrize("angular_cutoff", [0.27, 0.2])
def test_behler_parrinello_descriptors_match_their_definition(angular_cutoff):
    # Four atoms, no box: every radial and angular symmetry function summed by hand.
    x = np.array([[0.0, 0.0, 0.0], [0.15, 0.02, 0.0], [-0.05, 0.14, 0.03],
                  [0.01, -0.04, -0.2]])
    model = BehlerParrinello(cutoff=0.27, angular_cutoff=angular_cutoff, n_radial=5,
                             radial_start=0.1)
    g = model.descriptors(torch.tensor(x), None).numpy()
    cutoff, centres = 0.27, np.linspace(0.1, 0.27, 5)
    width = centres[1] - centres[0]
    combos = [(z, lam, w) for z in (1.0, 2.0, 4.0) for lam in (-1.0, 1.0) for w in (0.1, 0.2)]

    def fc(r, rc=cutoff):
        return (1 - (r / rc) ** 2) ** 3 if r < rc else 0.0

    for i in range(4):
        others = [j for j in range(4) if j != i]
        radial = sum(np.exp(-(np.linalg.norm(x[j] - x[i]) - centres) ** 2 / (2 * width ** 2))
                     * fc(np.linalg.norm(x[j] - x[i])) for j in others)
        np.testing.assert_allclose(g[i, :5], radial, rtol=1e-12, atol=1e-15)
        for c, (zeta, lam, w) in enumerate(combos):
            total = 0.0
            for a, j in enumerate(others):
                for k in others[a + 1:]:
                    dj, dk = x[j] - x[i], x[k] - x[i]
                    rj, rk = np.linalg.norm(dj), np.linalg.norm(dk)
                    cos = dj @ dk / (rj * rk)
                    total += (2 ** (1 - zeta) * (1 + lam * cos) ** zeta
                              * np.exp(-(rj ** 2 + rk ** 2) / (2 * w ** 2))
                              * fc(rj, angular_cutoff) * fc(rk, angular_cutoff))
            assert g[i, 5 + c] == pytest.approx(total, rel=1e-12, abs=1e-15)


def test_behler_parrinello_standardize_centres_the_crystal():
    x, box = diamond_lattice(2)
    model = BehlerParrinello(cutoff=0.27)
    model.standardize(x, box)
    xt, bt = torch.tensor(x), torch.tensor(box)
    features = (model.descriptors(xt, bt) - model.shift) / model.scale
    assert float(features.abs().max()) < 1e-12          # every atom alike: all zero
    assert bool((model.scale > 0).all())
    # A fresh model predicts zero (the last layer starts at zero): training starts at the prior.
    assert float(model(*crystal()).detach()) == 0.0
    # Symmetry functions with no neighbour in range cannot be scaled: the error says why.
    with pytest.raises(ValueError, match="no neighbour within its range"):
        BehlerParrinello(cutoff=0.27, radial_start=0.0).standardize(x * 3, box * 3)


@pytest.mark.gpu
def test_models_on_cuda_match_cpu():
    model = EnergySum([StillingerWeber(), trained_schnet(), trained_behler_parrinello()])
    x, box = crystal()
    e_cpu, f_cpu = forces(model, x, box)
    e_gpu, f_gpu = forces(model.to("cuda"), x.cuda(), box.cuda())
    assert float(e_gpu) == pytest.approx(float(e_cpu), rel=1e-10)
    torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=1e-8, atol=1e-8)


class _WrongShape(torch.nn.Module):
    def forward(self, positions, box):
        return (positions ** 2).sum(-1)


class _NaN(torch.nn.Module):
    def forward(self, positions, box):
        return (positions ** 2).sum() * float("nan")


class _Detached(torch.nn.Module):
    def forward(self, positions, box):
        return (positions.detach() ** 2).sum()


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x ** 2).sum()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2 * x.detach()


class _FirstOrderOnly(torch.nn.Module):
    def forward(self, positions, box):
        return _OnceDifferentiable.apply(positions)


@pytest.mark.parametrize("model, clause", [
    (_WrongShape(), "returned shape (5,)"),
    (_NaN(), "non-finite energy"),
    (_Detached(), "does not depend differentiably on the positions"),
    (_FirstOrderOnly(), "not differentiable with respect to positions twice"),
])
def test_contract_violation_is_caught_at_first_call(model, clause):
    potential = MLPotential(model, masses=[1.0] * 5)
    with pytest.raises(ContractError) as info:
        potential(torch.rand(5, 3, dtype=torch.float64), None)
    assert clause in str(info.value)


def test_contract_accepts_reference_models_and_rejects_bad_call():
    x, box = crystal()
    check_energy_model(EnergySum([StillingerWeber(), SchNet(), trained_behler_parrinello()]), x,
                       box, torch.zeros(64, dtype=torch.long))
    with pytest.raises(ContractError, match="failed when called as model"):
        check_energy_model(SchNet(n_types=1), x, box, torch.full((64,), 3, dtype=torch.long))


def test_reversible_gradient_of_ml_potential_matches_backprop():
    """Stillinger–Weber prior + SchNet in the reversible integrator (diamond, 298 K, γ 4/ps,
    Δt 0.5 fs): parameter gradients equal backprop-through-time to 1e-8."""
    x, box = crystal()
    model = EnergySum([StillingerWeber(), trained_schnet(n_features=8, n_rbf=6)])
    potential = MLPotential(model, masses=torch.full((64,), CARBON, dtype=torch.float64))
    v = 0.5 * torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def loss_fn(traj, pot):
        return (traj.positions[..., 0] ** 2).mean() + 1e-3 * (traj.velocities ** 2).mean()

    grads = {}
    for mode in ("reversible", "bptt"):
        potential.zero_grad()
        sim = ReversibleSimulation(potential, LangevinMiddleIntegrator(0.0005, 4.0, 298.0, 11),
                                   n_steps=8, snapshot_every=4, loss_fn=loss_fn, mode=mode)
        sim(x, v, box).backward()
        grads[mode] = torch.cat([torch.zeros_like(p).flatten() if p.grad is None
                                 else p.grad.flatten() for p in potential.parameters()])
    reference = grads["bptt"]
    assert float(reference.norm()) > 0
    assert float((grads["reversible"] - reference).norm() / reference.norm()) < 1e-8


def test_gradcheck_of_an_ml_potential():
    """The library's gradient check on Stillinger-Weber + Behler-Parrinello: reversible,
    backprop-through-time and central finite differences agree for every weight."""
    from openmm_reversible.gradcheck import check_gradients

    x, box = crystal()
    network = BehlerParrinello(n_radial=3, zetas=(2.0,), lambdas=(-1.0,), angular_widths=(0.15,),
                               hidden=(3,), seed=4)
    network.standardize(*diamond_lattice(2))
    torch.nn.init.normal_(network.networks[0].output.weight, std=0.5,
                          generator=torch.Generator().manual_seed(4))
    potential = MLPotential(EnergySum([StillingerWeber(), network]),
                            masses=torch.full((64,), CARBON, dtype=torch.float64))
    v = 0.5 * torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sim = ReversibleSimulation(potential, LangevinMiddleIntegrator(0.0005, 4.0, 298.0, 2),
                               n_steps=6, snapshot_every=3,
                               loss_fn=lambda traj, pot: pot(traj.positions[-1], traj.box) / 64)
    result = check_gradients(sim, x, v, box, fd_step=1e-5)
    assert len(result.names) == 7 + sum(p.numel() for p in network.parameters())
    assert result.rel_error_bptt < 1e-8
    assert result.rel_error_fd < 1e-5
