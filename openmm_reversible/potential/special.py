"""Compiled special functions for the fused kernels: the scaled complementary error function.

The direct-space Ewald law ``erfc(αr) / r`` needs ``erfc`` and, in all its derivatives,
``exp(-α²r²)``. The kernels write ``erfc(z) = exp(-z²) · erfcx(z)``: the exponential is then
shared with the derivatives, and ``erfcx`` — smooth, slowly varying and positive on
``z ≥ 0`` — is evaluated by a piecewise polynomial instead of a library ``erfc`` call.

Construction (no fitted numbers): on ``[0, Z_MAX)``, in intervals of width
``1 / INTERVALS_PER_UNIT``, the Taylor polynomial of degree ``DEGREE`` of ``erfcx`` about the
interval's midpoint ``c``.
Its coefficients follow from the differential equation ``y' = 2 z y - 2/√π``:

.. math::

    a_0 = \\operatorname{erfcx}(c), \\quad a_1 = 2 c a_0 - 2/\\sqrt{\\pi}, \\quad
    (n + 1) a_{n+1} = 2 c a_n + 2 a_{n-1} \\;(n \\ge 1),

evaluated in 40-digit arithmetic (mpmath) and rounded once to float64. The truncation error
is of the order of ``|a_{DEGREE+1}| (h/2)^{DEGREE+1}`` (``h`` the width; about 1e-18), far
under float64 round-off; the relative error
of ``exp(-z²) · erfcx(z)`` against ``erfc`` is measured in ``tests/test_fused.py``: ≤ 1e-14
on the table's range, ≤ 1e-13 beyond (where the rounding of ``z²`` in the exponential,
relative ``~z² ε``, dominates).
Outside ``[0, Z_MAX)`` (never reached by a cutoff pair with a usual α; ``erfc(6) ≈ 2e-17``)
the library ``erfc`` is used: ``erfcx(z) = exp(z²) erfc(z)`` there (for ``z ≥ 26``, where
``exp(z²)`` would overflow, the asymptotic series).
"""

from __future__ import annotations

import math

import numba
import numpy as np

Z_MAX = 6.0
"""Upper end of the tabulated range of ``erfcx``."""

INTERVALS_PER_UNIT = 32
"""Tabulation intervals per unit of the argument (width 1/32)."""

DEGREE = 8
"""Degree of the Taylor polynomial in each interval."""


def taylor_table(z_max: float = Z_MAX, per_unit: int = INTERVALS_PER_UNIT,
                 degree: int = DEGREE) -> np.ndarray:
    """Taylor coefficients of ``erfcx`` about each interval's midpoint, shape
    (n_intervals, degree + 1), lowest order first (the recurrence of the module docstring)."""
    import mpmath  # a dependency of sympy

    with mpmath.workdps(40):
        two_over_root_pi = 2 / mpmath.sqrt(mpmath.pi)
        rows = []
        for k in range(int(round(z_max * per_unit))):
            c = (mpmath.mpf(k) + mpmath.mpf(1) / 2) / per_unit
            a = [mpmath.exp(c * c) * mpmath.erfc(c)]
            a.append(2 * c * a[0] - two_over_root_pi)
            for n in range(1, degree):
                a.append((2 * c * a[n] + 2 * a[n - 1]) / (n + 1))
            rows.append([float(v) for v in a])
    return np.array(rows)


_TABLE = taylor_table()


@numba.njit(cache=True, error_model="numpy", inline="always")
def erfcx(z: float) -> float:
    """``exp(z²) erfc(z)`` (dimensionless) by the piecewise Taylor table; library ``erfc``
    outside ``[0, Z_MAX)``."""
    if z >= 0.0 and z < Z_MAX:
        k = int(z * INTERVALS_PER_UNIT)
        t = z - (k + 0.5) / INTERVALS_PER_UNIT
        value = _TABLE[k, DEGREE]
        for n in range(DEGREE - 1, -1, -1):
            value = value * t + _TABLE[k, n]
        return value
    if z < _ASYMPTOTIC:
        return math.exp(z * z) * math.erfc(z)
    # asymptotic series (exp(z²) would overflow): terms up to (2n-1)!!/(2z²)^n, n = 6
    u = 0.5 / (z * z)
    series = 1.0 + u * (-1.0 + u * (3.0 + u * (-15.0 + u * (105.0 + u * (-945.0 + u * 10395.0)))))
    return series / (z * math.sqrt(math.pi))


_ASYMPTOTIC = 26.0
"""From here on ``erfcx`` is its asymptotic series (relative error below 1e-15 there), as
``exp(z²)`` overflows from ``z ≈ 26.6``."""
