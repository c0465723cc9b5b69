"""Block averaging: hand-computed means and standard errors, shapes, correlated series."""

from __future__ import annotations

import math

import numpy as np
import pytest

from openmm_reversible.errors import InputError
from openmm_reversible.observables import block_average, block_slices, statistical_inefficiency


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


def _ar1(phi: float, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=n)
    x = np.empty(n)
    x[0] = noise[0] / math.sqrt(1 - phi ** 2)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + noise[i]
    return x


def _inefficiency_by_definition(a: np.ndarray, mintime: int = 3) -> float:
    """pymbar's statistical_inefficiency (fast=False), written lag by lag."""
    n, d = len(a), a - a.mean()
    variance, g, t = np.mean(d * d), 1.0, 1
    while t < n - 1:
        c = np.sum(d[:n - t] * d[t:]) / ((n - t) * variance)
        if c <= 0 and t > mintime:
            break
        g += 2 * c * (1 - t / n)
        t += 1
    return max(g, 1.0)


def test_statistical_inefficiency_equals_its_definition():
    """The FFT route gives the lag-by-lag sum to round-off, including the mintime rule."""
    x = _ar1(0.7, 3000, seed=1)
    for mintime in (0, 3, 10):
        assert statistical_inefficiency(x, mintime) == pytest.approx(
            _inefficiency_by_definition(x, mintime), rel=1e-10)
    # A series anticorrelated at lag 1 gives g < 1, which is raised to 1.
    assert statistical_inefficiency(np.tile([1.0, -1.0], 50), mintime=0) == 1.0


def test_statistical_inefficiency_of_ar1_process():
    """AR(1) x_n = φ x_{n-1} + ε_n has C(t) = φ^t, so g = (1 + φ) / (1 - φ) (9 for φ = 0.8,
    1 for white noise); 200 000 samples give it within a few per cent."""
    assert statistical_inefficiency(_ar1(0.8, 200_000, seed=3)) == pytest.approx(9.0, rel=0.05)
    assert statistical_inefficiency(_ar1(0.0, 200_000, seed=4)) == pytest.approx(1.0, abs=0.02)


def test_statistical_inefficiency_matches_pymbar():
    timeseries = pytest.importorskip("pymbar.timeseries")
    x = _ar1(0.9, 20_000, seed=5)
    expected = timeseries.statistical_inefficiency(x) if hasattr(
        timeseries, "statistical_inefficiency") else timeseries.statisticalInefficiency(x)
    assert statistical_inefficiency(x) == pytest.approx(expected, rel=1e-10)


def test_statistical_inefficiency_bad_input():
    with pytest.raises(InputError, match="constant \\(zero variance\\)"):
        statistical_inefficiency(np.full(10, 2.0))
    with pytest.raises(InputError, match="1-D series of at least two samples"):
        statistical_inefficiency(np.ones((4, 2)))


def test_trend_by_hand_and_the_drift_test():
    """trend: slope of y = 2 + 0.5 k + (+1, -1, -1, +1)·0.1 is 0.5 (the residual pattern is
    orthogonal to k), its standard error from the residuals by the textbook formula;
    drifting: a ramp under noise drifts, the same noise about a constant does not."""
    from openmm_reversible.observables.blocking import drifting, trend

    noise = np.array([1.0, -1.0, -1.0, 1.0]) * 0.1
    slope, stderr = trend(2.0 + 0.5 * np.arange(4) + noise)
    assert slope == pytest.approx(0.5, rel=1e-12)
    # Residuals are the noise itself: SE = sqrt(Σr² / (n - 2) / Σ(k - k̄)²) = sqrt(0.04/2/5).
    assert stderr == pytest.approx(math.sqrt(0.04 / 2 / 5), rel=1e-12)
    rng = np.random.default_rng(3)
    flat = 1.0 + 0.01 * rng.standard_normal(20)
    assert not drifting(flat)[0]
    ramp = flat + 0.01 * np.arange(20)
    drifts, slope, stderr = drifting(ramp)
    assert drifts and slope == pytest.approx(0.01, abs=3 * stderr)
    # Only the last half counts: an early transient that has settled is not drift.
    settled = np.concatenate([np.linspace(0.5, 1.0, 10), flat[:10]])
    assert not drifting(settled)[0] and drifting(settled[:12])[0]
    with pytest.raises(InputError, match="at least 3 block means"):
        trend([1.0, 2.0])
