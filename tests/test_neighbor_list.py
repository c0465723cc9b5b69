"""The neighbour list's cell-list build against the reference it replaced: vesin's cell list,
then a global sort and unique of the pair keys. Pair for pair, in the same order, on a water
box, a triclinic box, a box smaller than twice the list radius, and without a box."""

import numpy as np
import pytest
import torch
import vesin

from openmm_reversible.geometry import CutoffPairs, NeighborList, image_shifts, minimum_image


def _reference_pairs(x: np.ndarray, box: np.ndarray | None, radius: float) -> np.ndarray:
    """Pairs ``(i, j)``, i < j, as the previous build made them (vesin, sort, unique)."""
    calc = vesin.NeighborList(cutoff=radius, full_list=False)
    if box is None:
        i, j = calc.compute(points=x, box=np.zeros((3, 3)), periodic=False, quantities="ij")
    else:
        frac = x @ np.linalg.inv(box)
        i, j = calc.compute(points=(frac - np.floor(frac)) @ box, box=box, periodic=True,
                            quantities="ij")
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    key = np.unique(lo[lo != hi] * x.shape[0] + hi[lo != hi])
    return np.stack([key // x.shape[0], key % x.shape[0]], 1)


def _water_like(n_molecules: int, box: np.ndarray, rng) -> np.ndarray:
    """Water-like clusters (O and two H within 0.1 nm) at random places in ``box``, some
    outside it (unwrapped coordinates), nm."""
    centres = rng.uniform(-0.3, 1.3, (n_molecules, 3)) @ box
    offsets = np.concatenate([np.zeros((n_molecules, 1, 3)),
                              rng.normal(0.0, 0.06, (n_molecules, 2, 3))], 1)
    return (centres[:, None, :] + offsets).reshape(-1, 3)


BOXES = {
    "water": (np.diag([2.5, 2.5, 2.5]), 300, 1.1),
    "triclinic": (np.array([[2.6, 0.0, 0.0], [0.9, 2.4, 0.0], [-0.8, 1.1, 2.2]]), 250, 1.0),
    "small": (np.array([[1.2, 0.0, 0.0], [0.3, 1.1, 0.0], [0.2, -0.4, 1.0]]), 12, 0.9),
}


@pytest.mark.parametrize("name", sorted(BOXES))
def test_cell_list_equals_the_reference_pair_for_pair(name):
    box, n_molecules, radius = BOXES[name]
    x = _water_like(n_molecules, box, np.random.default_rng(7))
    expected = _reference_pairs(x, box, radius)
    listed = NeighborList(radius - 0.1, 0.1)
    i, j = listed.pairs(torch.from_numpy(x), torch.from_numpy(box))
    assert i.dtype == j.dtype == torch.int64
    assert expected.shape[0] > 0
    np.testing.assert_array_equal(torch.stack([i, j], 1).numpy(), expected)


def test_cell_list_without_a_box_equals_the_reference():
    x = np.random.default_rng(3).uniform(0.0, 3.0, (600, 3))
    expected = _reference_pairs(x, None, 0.8)
    i, j = NeighborList(0.7, 0.1).pairs(torch.from_numpy(x), None)
    np.testing.assert_array_equal(torch.stack([i, j], 1).numpy(), expected)


def test_cell_list_of_a_small_box_keeps_pairs_through_every_image():
    # radius 0.9 nm in a 1.0 nm cube: every pair has an image within it, each listed once
    box = np.eye(3)
    x = np.random.default_rng(5).uniform(0.0, 1.0, (20, 3))
    i, j = NeighborList(0.8, 0.1).pairs(torch.from_numpy(x), torch.from_numpy(box))
    assert i.numel() == 20 * 19 // 2
    assert bool((i < j).all())


def test_cell_list_does_not_depend_on_the_thread_count():
    numba = pytest.importorskip("numba")
    box, n_molecules, radius = BOXES["triclinic"]
    x = torch.from_numpy(_water_like(n_molecules, box, np.random.default_rng(11)))
    threads = numba.get_num_threads()
    try:
        results = []
        for count in sorted({1, threads}):
            numba.set_num_threads(count)
            results.append(NeighborList(radius, 0.1).pairs(x, torch.from_numpy(box)))
    finally:
        numba.set_num_threads(threads)
    for i, j in results[1:]:
        assert torch.equal(i, results[0][0]) and torch.equal(j, results[0][1])


@pytest.mark.parametrize("name", sorted(BOXES))
def test_cutoff_candidates_equal_the_reference(name):
    # the previous candidates: exclusions by binary search, shifts from the minimum image
    box, n_molecules, radius = BOXES[name]
    x = torch.from_numpy(_water_like(n_molecules, box, np.random.default_rng(13)))
    b = torch.from_numpy(box)
    n = x.shape[0]
    water = torch.arange(0, n, 3)
    excluded = torch.sort(torch.cat([water * n + water + 1, water * n + water + 2,
                                     (water + 1) * n + water + 2])).values
    pairs = CutoffPairs(radius - 0.1, 0.1, n, excluded)
    i, j, shifts, wraps, _ = pairs.candidates(x, b)
    ref = torch.from_numpy(_reference_pairs(x.numpy(), box, radius))
    key = ref[:, 0] * n + ref[:, 1]
    ref = ref[~torch.isin(key, excluded)]
    raw = x[ref[:, 1]] - x[ref[:, 0]]
    assert ref.shape[0] < key.shape[0]
    assert torch.equal(torch.stack([i, j], 1), ref)
    assert torch.equal(shifts, image_shifts(raw, minimum_image(raw, b), b))
    assert not bool(wraps.any())


def _reference_codes(shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image codes and lattice as the previous pair_list made them (NumPy, dense case)."""
    n = np.rint(shifts).astype(np.int64)
    low, span = n.min(0), n.max(0) - n.min(0) + 1
    codes = ((n[:, 0] - low[0]) * span[1] + (n[:, 1] - low[1])) * span[2] + n[:, 2] - low[2]
    return codes, (np.indices(tuple(span)).reshape(3, -1).T + low).astype(np.float64)


@pytest.mark.parametrize("name", sorted(BOXES))
def test_fused_pair_list_codes_equal_the_reference(name):
    from openmm_reversible.potential import fused

    box, n_molecules, radius = BOXES[name]
    # unwrapped positions drifted by whole boxes: shifts beyond -1..1
    x = _water_like(n_molecules, box, np.random.default_rng(17))
    x += np.random.default_rng(19).integers(-2, 3, (x.shape[0], 1)) * box[0]
    pairs = CutoffPairs(radius - 0.1, 0.1, x.shape[0], torch.zeros(0, dtype=torch.long))
    i, j, shifts, _, _ = pairs.candidates(torch.from_numpy(x), torch.from_numpy(box))
    listed = fused.pair_list(i, j, shifts)
    codes, lattice = _reference_codes(shifts.numpy())
    assert lattice.shape[0] > 27
    np.testing.assert_array_equal(listed.codes.astype(np.int64), codes)
    np.testing.assert_array_equal(listed.lattice, lattice)
    np.testing.assert_array_equal(listed.lattice[listed.codes.astype(np.int64)], shifts.numpy())
    assert listed.codes.dtype == (np.uint8 if lattice.shape[0] <= 256 else np.uint16)
