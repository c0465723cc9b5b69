"""RDF and atom selections: mdtraj on a real OpenMM water trajectory, an independent dense
smearing computation, finite-difference gradients, and input errors."""

import math

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from scipy.special import ndtr

from openmm_reversible.errors import InputError
from openmm_reversible.observables import atom_indices, molecules, pair_indices, rdf
from openmm_reversible.systems import water_box

N_WATERS = 216


@pytest.fixture(scope="module")
def water():
    """Ten frames of a 216-molecule rigid TIP3P box (reaction field) simulated in OpenMM."""
    ms = water_box(N_WATERS, rigid=True, nonbonded="RF", cutoff=0.9)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond,
                                                 2 * unit.femtosecond)
    integrator.setRandomNumberSeed(7)
    context = openmm.Context(ms.system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(ms.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 100)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    frames = []
    for _ in range(10):
        integrator.step(30)
        state = context.getState(getPositions=True)
        frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    xyz = np.asarray(frames)
    traj = mdtraj.Trajectory(xyz, mdtraj.Topology.from_openmm(ms.topology))
    traj.unitcell_vectors = np.repeat(ms.box[None], len(xyz), axis=0)
    return ms, xyz, traj


def _distances(xyz, box, pairs):
    """Minimum-image pair distances in a cubic box, float64 NumPy, shape (frames * pairs,)."""
    d = xyz[:, pairs[:, 1]] - xyz[:, pairs[:, 0]]
    d -= box[0, 0] * np.round(d / box[0, 0])
    return np.linalg.norm(d, axis=-1).ravel()


def _edge_gap(d, start, width):
    """Distance of each value in ``d`` to the nearest edge of uniform bins from ``start``."""
    u = (d - start) / width
    return np.abs(u - np.round(u)) * width


def _pair_norm(n_frames, box, n_pairs, edges):
    """Value of g(r) contributed by one pair distance in each bin (mdtraj's normalisation)."""
    shells = 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    return np.linalg.det(box) / (n_frames * n_pairs * shells)


@pytest.mark.parametrize("partner", ["O", "H"])
def test_hard_histogram_matches_mdtraj(water, partner):
    ms, xyz, traj = water
    pairs = pair_indices(atom_indices(ms.topology, element="O"),
                         atom_indices(ms.topology, element=partner))
    r_md, g_md = mdtraj.compute_rdf(traj, pairs, r_range=(0.0, 0.9), bin_width=0.01)
    r, g = rdf(torch.tensor(xyz), torch.tensor(ms.box), pairs, r_range=(0.0, 0.9),
               bin_width=0.01, sigma=0.0)
    np.testing.assert_allclose(r.numpy(), r_md, rtol=0, atol=1e-12)
    # mdtraj measures distances in float32: a distance within ~1e-6 nm of a bin edge may land
    # in the neighbouring bin. Each such distance can move one count between two bins.
    edges = np.linspace(0.0, 0.9, 91)
    d = _distances(xyz, ms.box, pairs)
    near_edge = int(np.sum(_edge_gap(d, 0.0, 0.01) < 1e-6))
    moved = np.abs(g.numpy() - g_md) / _pair_norm(len(xyz), ms.box, len(pairs), edges)
    assert moved.sum() <= 2 * near_edge + 1e-6
    assert g_md.max() > 1.5  # a real liquid structure was compared


def test_smeared_histogram_matches_dense_reference(water):
    """Windowed erf smearing equals the exact (all bins, scipy) Gaussian-integral histogram."""
    ms, xyz, traj = water
    oxygen = atom_indices(ms.topology, element="O")
    pairs = pair_indices(oxygen, oxygen)
    sigma, edges = 0.02, np.linspace(0.1, 0.8, 36)
    _, g = rdf(torch.tensor(xyz[:2]), torch.tensor(ms.box), pairs, r_range=(0.1, 0.8),
               n_bins=35, sigma=sigma)
    d = _distances(xyz[:2], ms.box, pairs)
    np.testing.assert_allclose(d, mdtraj.compute_distances(traj[:2], pairs).ravel(),
                               atol=2e-6)  # same pairs and minimum image as mdtraj
    cdf = ndtr((edges[None, :] - d[:, None]) / sigma)
    counts = (cdf[:, 1:] - cdf[:, :-1]).sum(0)
    expected = counts * _pair_norm(2, ms.box, len(pairs), edges)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_small_sigma_converges_to_hard_histogram(water):
    """Smearing only moves counts of distances within 8σ of a bin edge, so as σ → 0 the
    smooth g(r) tends to the hard histogram with a bound that shrinks with σ."""
    ms, xyz, _ = water
    oxygen = atom_indices(ms.topology, element="O")
    pairs = pair_indices(oxygen, oxygen)
    x, box = torch.tensor(xyz), torch.tensor(ms.box)
    edges = np.linspace(0.2, 0.9, 71)
    per_pair = _pair_norm(len(xyz), ms.box, len(pairs), edges)
    gap = _edge_gap(_distances(xyz, ms.box, pairs), 0.2, 0.01)
    _, hard = rdf(x, box, pairs, r_range=(0.2, 0.9), bin_width=0.01, sigma=0.0)
    moved = []
    for sigma in (1e-2, 1e-3, 1e-4):
        _, soft = rdf(x, box, pairs, r_range=(0.2, 0.9), bin_width=0.01, sigma=sigma)
        moved.append(float(np.sum(np.abs((soft - hard).numpy()) / per_pair)))
        assert moved[-1] <= 2 * np.sum(gap < 8 * sigma) + 1e-6
    assert moved[0] > moved[1] > moved[2] > 0


def test_selections_pairs_and_per_frame_box_agree(water):
    ms, xyz, _ = water
    oxygen = atom_indices(ms.topology, name="O", residue="HOH")
    x, box = torch.tensor(xyz[:3]), torch.tensor(ms.box)
    _, by_pairs = rdf(x, box, pair_indices(oxygen, oxygen), r_range=(0.2, 0.8))
    _, by_selection = rdf(x, box, selections=(oxygen, oxygen), r_range=(0.2, 0.8))
    _, by_frame_box = rdf(x, box.expand(3, 3, 3), selections=(oxygen, oxygen),
                          r_range=(0.2, 0.8))
    torch.testing.assert_close(by_pairs, by_selection, rtol=0, atol=0)
    torch.testing.assert_close(by_pairs, by_frame_box, rtol=1e-13, atol=1e-13)


def test_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(3)
    positions = (torch.rand(2, 9, 3, generator=gen, dtype=torch.float64) * 2.0
                 ).requires_grad_()
    box = torch.diag(torch.tensor([2.0, 2.1, 2.2], dtype=torch.float64)).requires_grad_()
    pairs = pair_indices(np.arange(9), np.arange(9))

    def g_of(x, b):
        return rdf(x, b, pairs, r_range=(0.3, 0.95), n_bins=12, sigma=0.06)[1]

    assert torch.autograd.gradcheck(g_of, (positions, box), eps=1e-6, atol=1e-7, rtol=1e-5)
    grad = torch.autograd.grad(g_of(positions, box)[4], positions)[0]
    assert all(float(grad[s].abs().sum()) > 0 for s in range(2))  # every frame is reached


def test_selection_helpers(water):
    ms, _, _ = water
    oxygen = atom_indices(ms.topology, element="O")
    hydrogen = atom_indices(ms.topology, element="H")
    mols = molecules(ms.topology)
    assert len(oxygen) == N_WATERS and len(hydrogen) == 2 * N_WATERS
    assert len(mols) == N_WATERS and all(len(m) == 3 for m in mols)
    oo = pair_indices(oxygen, oxygen)
    assert oo.shape == (N_WATERS * (N_WATERS - 1) // 2, 2) and np.all(oo[:, 0] < oo[:, 1])
    oh_all = pair_indices(oxygen, hydrogen)
    oh_inter = pair_indices(oxygen, hydrogen, exclude=mols)
    assert len(oh_all) == N_WATERS * 2 * N_WATERS
    assert len(oh_inter) == len(oh_all) - 2 * N_WATERS


def test_input_errors(water):
    ms, xyz, _ = water
    x, box = torch.tensor(xyz[:1]), torch.tensor(ms.box)
    oxygen = atom_indices(ms.topology, element="O")
    with pytest.raises(InputError, match="empty selection.*element='Xe'"):
        atom_indices(ms.topology, element="Xe")
    with pytest.raises(InputError, match="selections\\[1\\] is empty"):
        rdf(x, box, selections=(oxygen, []), r_range=(0.0, 0.9))
    half = 0.5 * ms.box[0, 0]
    with pytest.raises(InputError, match=f"r_range\\[1\\] = 1.2 nm exceeds half.*{half:.4f}"):
        rdf(x, box, selections=(oxygen, oxygen), r_range=(0.0, 1.2))
    with pytest.raises(InputError, match="box is None"):
        rdf(x, None, selections=(oxygen, oxygen))
    with pytest.raises(InputError, match="exactly one of pairs"):
        rdf(x, box, r_range=(0.0, 0.9))
    with pytest.raises(InputError, match="n_bins must be a positive integer"):
        rdf(x, box, selections=(oxygen, oxygen), n_bins=0)
    with pytest.raises(InputError, match="sigma must be a non-negative"):
        rdf(x, box, selections=(oxygen, oxygen), sigma=-0.1)
    with pytest.raises(InputError, match="shape \\(n_frames, n_atoms, 3\\)"):
        rdf(x[0], box, selections=(oxygen, oxygen))
    with pytest.raises(InputError, match="outside \\[0, 648\\)"):
        rdf(x, box, np.array([[0, 648]]), r_range=(0.0, 0.9))
    assert math.isclose(float(rdf(x, box, selections=(oxygen, oxygen), r_range=(0, 0.9),
                                  periodic=False)[0][-1]), 0.8975)


def _triclinic_frames(n_frames=3, n_atoms=60, seed=11):
    """Random frames in a reduced triclinic box (OpenMM's form), float64."""
    gen = torch.Generator().manual_seed(seed)
    box = torch.tensor([[2.2, 0.0, 0.0], [0.5, 2.1, 0.0], [-0.4, 0.6, 2.3]], dtype=torch.float64)
    frac = torch.rand(n_frames, n_atoms, 3, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    return frac @ box, box


def _rdf_and_vjp(x, box, pairs, compiled, periodic=True):
    x = x.clone().requires_grad_(True)
    _, g = rdf(x, box, pairs, r_range=(0.15, 0.9), n_bins=90, sigma=0.02, periodic=periodic,
               compiled=compiled)
    weights = torch.cos(torch.arange(g.numel(), dtype=g.dtype))
    (grad,) = torch.autograd.grad((g * weights).sum(), x)
    return g.detach(), grad


@pytest.mark.parametrize("case", ["water_OO", "water_OH", "triclinic", "frame_boxes",
                                  "not_periodic"])
def test_compiled_pair_loop_matches_torch_reference(water, case):
    """The compiled smeared histogram and its VJP equal the torch reference (<= 1e-12)."""
    ms, xyz, _ = water
    periodic = case != "not_periodic"
    if case.startswith("water"):
        oxygen = atom_indices(ms.topology, element="O")
        partner = atom_indices(ms.topology, element=case[-1])
        pairs = pair_indices(oxygen, partner, exclude=molecules(ms.topology))
        x, box = torch.tensor(xyz[:3]), torch.tensor(ms.box)
    else:
        x, box = _triclinic_frames()
        pairs = pair_indices(np.arange(60), np.arange(60))
        if case == "frame_boxes":
            box = box * torch.tensor([1.0, 1.02, 0.99], dtype=torch.float64)[:, None, None]
    fast = _rdf_and_vjp(x, box, pairs, compiled=True, periodic=periodic)
    reference = _rdf_and_vjp(x, box, pairs, compiled=False, periodic=periodic)
    for a, b in zip(fast, reference, strict=True):
        scale = float(b.abs().max())
        assert scale > 0
        assert float((a - b).abs().max()) <= 1e-12 * scale


def test_compiled_pair_loop_is_bitwise_independent_of_threads(water):
    numba = pytest.importorskip("numba")
    ms, xyz, _ = water
    oxygen = atom_indices(ms.topology, element="O")
    pairs = pair_indices(oxygen, atom_indices(ms.topology, element="H"))
    x, box = torch.tensor(xyz[:2]), torch.tensor(ms.box)
    previous = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            results.append(_rdf_and_vjp(x, box, pairs, compiled=True))
    finally:
        numba.set_num_threads(previous)
    again = _rdf_and_vjp(x, box, pairs, compiled=True)
    for a, b in zip(results[0], again, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(results[0], results[-1], strict=True):
        assert torch.equal(a, b)


def test_compiled_gradient_matches_finite_differences():
    x, box = _triclinic_frames(n_frames=2, n_atoms=9, seed=5)
    pairs = pair_indices(np.arange(9), np.arange(9))

    def g_of(positions):
        return rdf(positions, box, pairs, r_range=(0.3, 0.95), n_bins=12, sigma=0.06)[1]

    assert torch.autograd.gradcheck(g_of, (x.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_compiled_pair_loop_refuses_what_it_cannot_take():
    from openmm_reversible.observables.rdf import smeared_pair_counts

    x, box = _triclinic_frames(n_frames=1, n_atoms=4)
    first, second = torch.tensor([0, 1]), torch.tensor([2, 3])
    edges = torch.linspace(0.1, 0.9, 9, dtype=torch.float64)
    with pytest.raises(InputError, match="not float64 on the CPU; use smeared_histogram"):
        smeared_pair_counts(x.float(), box.float(), first, second, edges.float(), 0.02)
    with pytest.raises(InputError, match="it needs sigma > 0"):
        smeared_pair_counts(x, box, first, second, edges, 0.0)
    with pytest.raises(InputError, match="the box requires grad"):
        smeared_pair_counts(x, box.requires_grad_(), first, second, edges, 0.02)
