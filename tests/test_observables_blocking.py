"""Block averaging: hand-computed means and standard errors, shapes, correlated series."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openmm_reversible.errors import InputError
from openmm_reversible.observables import block_average, block_slices


def test_hand_computation():
    # Blocks of 2: [1, 2], [3, 4], [5, 6]; the 7th sample is the remainder, left out.
    # Block means 1.5, 3.5, 5.5: mean 3.5, sample std 2, standard error 2 / sqrt(3).
    mean, stderr = block_average([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], n_blocks=3)
    assert mean == 3.5
    assert stderr == pytest.approx(2.0 / math.sqrt(3.0), rel=1e-15)
    assert block_slices(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 6)]


def test_curves_are_averaged_element_by_element():
    # Two columns: the second is 10 × the first plus 1, so its error is 10 × the first's.
    x = np.arange(12.0) ** 2
    mean, stderr = block_average(np.column_stack([x, 10 * x + 1]), n_blocks=4)
    means = [np.mean(x[k * 3:(k + 1) * 3]) for k in range(4)]
    assert mean.shape == stderr.shape == (2,)
    assert mean[0] == pytest.approx(np.mean(means))
    assert stderr[0] == pytest.approx(np.std(means, ddof=1) / 2.0)
    assert stderr[1] == pytest.approx(10 * stderr[0])
    _, flat = block_average(np.full(10, 3.25), n_blocks=5)
    assert flat == 0.0


def test_correlated_series_gets_its_larger_error():
    """AR(1) with φ = 0.9: the true standard error of the mean is sqrt((1 + φ) / (1 − φ)) ≈
    4.4 times the naive one; long blocks find it (within 25 % for this seed), the naive
    estimate does not."""
    rng = np.random.default_rng(7)
    phi, n = 0.9, 200_000
    noise = rng.normal(size=n)
    x = np.empty(n)
    x[0] = noise[0] / math.sqrt(1 - phi ** 2)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + noise[i]
    true = math.sqrt(1 / (1 - phi ** 2) * (1 + phi) / (1 - phi) / n)
    _, stderr = block_average(x, n_blocks=20)
    assert stderr == pytest.approx(true, rel=0.25)
    naive = x.std(ddof=1) / math.sqrt(n)
    assert stderr > 3 * naive


def test_bad_blocks_are_named():
    with pytest.raises(InputError, match="4 samples cannot fill 5 blocks"):
        block_average(np.ones(4), n_blocks=5)
    with pytest.raises(InputError, match="n_blocks >= 2"):
        block_average(np.ones(4), n_blocks=1)
    with pytest.raises(InputError, match="needs a series"):
        block_average(3.0)
