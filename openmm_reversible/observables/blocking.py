"""Statistical uncertainty of a time series by block averaging.

Successive MD frames are correlated, so the naive standard error ``std / sqrt(S)`` of S frames
is too small. Block averaging (Flyvbjerg & Petersen, J. Chem. Phys. 91, 461 (1989)) splits the
series into ``n_blocks`` contiguous blocks of equal length, averages each, and takes the
standard error of the mean from the spread of the block means,

    SE = std(block means, ddof=1) / sqrt(n_blocks),

which is trustworthy once a block is longer than the correlation time (then more blocks of
the same run give the same SE). For an estimator that is not a plain mean (g(r) with its
volume normalisation, a diffusion coefficient from an MSD fit), evaluate it on each block's
frames (:func:`block_slices`) and pass the per-block values to :func:`block_average` with
``n_blocks`` equal to their number.

The statistical inefficiency g (:func:`statistical_inefficiency`) is the other route: the
series holds about S / g independent samples, so ``SE = std · sqrt(g / S)``. It is estimated
from the integrated normalised autocorrelation function, with the same estimator as pymbar's
``timeseries.statistical_inefficiency`` (Chodera et al., J. Chem. Theory Comput. 3, 26
(2007)), so numbers from either agree.

These are numbers for reports, not differentiable observables: NumPy in, NumPy out.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError


def block_slices(n_samples: int, n_blocks: int) -> list[slice]:
    """``n_blocks`` contiguous slices of ``n_samples // n_blocks`` samples each; the remainder
    (fewer than ``n_blocks`` samples) at the end is left out.

    Raises
    ------
    InputError
        If ``n_blocks < 2`` or there are fewer samples than blocks.
    """
    if int(n_blocks) != n_blocks or n_blocks < 2:
        raise InputError(f"block averaging needs n_blocks >= 2 (an integer), got {n_blocks!r}")
    if n_samples < n_blocks:
        raise InputError(f"block averaging: {n_samples} samples cannot fill {n_blocks} blocks; "
                         f"record more frames or use fewer blocks")
    size = n_samples // n_blocks
    return [slice(k * size, (k + 1) * size) for k in range(n_blocks)]


def block_average(samples, n_blocks: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Mean of a series and its standard error by block averaging.

    Parameters
    ----------
    samples : array-like, shape (S, ...)
        Time series along the first axis (e.g. one energy per frame, kJ/mol, or one g(r) curve
        per frame); any units, returned in the same units.
    n_blocks : int, default 5
        Number of contiguous blocks (>= 2, <= S).

    Returns
    -------
    mean : ndarray, shape (...)
        Mean of the samples the blocks cover (the first ``n_blocks · (S // n_blocks)``).
    stderr : ndarray, shape (...)
        Standard deviation of the block means (ddof = 1) divided by sqrt(n_blocks).
    """
    samples = np.asarray(samples, dtype=float)
    if samples.ndim == 0:
        raise InputError("block_average needs a series (shape (S, ...)), got a scalar")
    means = np.stack([samples[s].mean(axis=0) for s in block_slices(len(samples), n_blocks)])
    return means.mean(axis=0), means.std(axis=0, ddof=1) / math.sqrt(n_blocks)


def statistical_inefficiency(samples, mintime: int = 3) -> float:
    """Statistical inefficiency g ≥ 1 of a time series: S samples hold about S / g
    independent ones.

    With δA = A - mean(A), σ² = mean(δA²) and the normalised autocorrelation at lag t,
    ``C(t) = Σ_{n < S-t} δA_n δA_{n+t} / ((S - t) σ²)``,

        g = 1 + 2 Σ_{t=1}^{t_max} (1 - t/S) C(t),

    where the sum stops before the first lag t > ``mintime`` at which C(t) ≤ 0 (and at
    S - 2 at the latest); g is then raised to 1 if it came out lower. This is the estimator
    of pymbar's ``timeseries.statistical_inefficiency(A_n, fast=False, mintime=3)``.

    Parameters
    ----------
    samples : array-like, shape (S,)
        One number per frame, evenly spaced in time; any units.
    mintime : int, default 3
        Lags up to this one are always summed (their C(t) may be negative by noise).

    Returns
    -------
    float
        g, in units of the frame interval (1 for uncorrelated samples).

    Raises
    ------
    InputError
        If the series is not 1-D, has fewer than two samples or does not vary.
    """
    a = np.asarray(samples, dtype=float)
    if a.ndim != 1 or a.size < 2:
        raise InputError(f"statistical_inefficiency needs a 1-D series of at least two "
                         f"samples, got shape {a.shape}")
    n = a.size
    d = a - a.mean()
    variance = float(np.mean(d * d))
    if variance == 0.0:
        raise InputError("statistical_inefficiency: the series is constant (zero variance), "
                         "so its correlation time is undefined; check that the quantity "
                         "actually fluctuates (e.g. a barostat is active for volumes)")
    # All lagged products at once (zero-padded FFT: linear, not circular, correlation).
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(d, size)
    lagged = np.fft.irfft(spectrum * np.conj(spectrum), size)[:n]
    lags = np.arange(1, n - 1)
    correlation = lagged[1:n - 1] / ((n - lags) * variance)
    stops = np.flatnonzero((correlation <= 0.0) & (lags > mintime))
    end = stops[0] if stops.size else lags.size
    g = 1.0 + 2.0 * float(np.sum((1.0 - lags[:end] / n) * correlation[:end]))
    return max(g, 1.0)


def trend(block_means) -> tuple[float, float]:
    """Least-squares slope of a series of block means against the block index, and its
    standard error.

    Parameters
    ----------
    block_means : array-like, shape (B,)
        One mean per block, in order (B >= 3); any units.

    Returns
    -------
    slope : float
        Change per block, units of the means.
    stderr : float
        Standard error of the slope from the residuals (``B - 2`` degrees of freedom). Block
        means longer than the correlation time are nearly independent, which this assumes.
    """
    y = np.asarray(block_means, dtype=float)
    if y.ndim != 1 or len(y) < 3:
        raise InputError(f"trend needs at least 3 block means in a 1-d series, got shape "
                         f"{y.shape}")
    x = np.arange(len(y), dtype=float) - (len(y) - 1) / 2
    slope = float(x @ (y - y.mean()) / (x @ x))
    residuals = y - y.mean() - slope * x
    stderr = math.sqrt(float(residuals @ residuals) / (len(y) - 2) / float(x @ x))
    return slope, stderr


def drifting(block_means, threshold: float = 2.0) -> tuple[bool, float, float]:
    """Whether the last half of a series of block means still drifts.

    The test of an equilibration: the least-squares slope (:func:`trend`) of the last half
    of the blocks (at least 3) is compared with its standard error; the series drifts while
    ``|slope| > threshold · stderr``.

    Returns
    -------
    drifts : bool
    slope, stderr : float
        Change per block of the last half and its standard error, units of the means.
    """
    y = np.asarray(block_means, dtype=float)
    slope, stderr = trend(y[len(y) - max(3, len(y) // 2):])
    return abs(slope) > threshold * stderr, slope, stderr
