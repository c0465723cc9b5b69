"""Fixed-point numbers and exactly invertible friction for bitwise-reversible dynamics.

In the exact mode every position and velocity is a 64-bit integer count of a fixed resolution,
so each update of the state is an integer operation whose inverse is exact: adding a quantity
that is a deterministic function of something the reverse pass also knows (the other half of
the state, or the regenerated noise) is undone by subtracting it. Only the friction step
``v ← c·v`` loses information; it becomes invertible with an *information buffer*
(:class:`InformationBuffer`) that keeps the digits the rounding would drop, following the exact
multiplication of Maclaurin, Duvenaud & Adams ("Gradient-based hyperparameter optimization
through reversible learning", ICML 2015, Algorithm 3).

Scales (:class:`FixedPointFormat`), all powers of two so that a count converts to float64
without rounding while ``|count| < 2**53``:

==========  ============  ===================  ==============================================
quantity    bits          resolution           range (``|value| < 2**62`` counts)
==========  ============  ===================  ==============================================
position    48 (default)  3.6e-15 nm           ±16384 nm (float64 conversion exact to ±32 nm)
velocity    50            8.9e-16 nm/ps        ±4096 nm/ps
force       32            2.3e-10 kJ/mol/nm    ±1.07e9 kJ/mol/nm per particle
==========  ============  ===================  ==============================================

The resolutions are close to float64's at the typical magnitudes (1 nm, 1 nm/ps), so exact
dynamics stay within rounding of the float scheme they replace: with coarser positions the
stiff O-H bonds of flexible water turn each position rounding into a velocity difference a
thousand times larger. The ranges still leave wide margins (positions are never wrapped,
thermal velocities are a few nm/ps, forces in a relaxed structure below 1e5 kJ/mol/nm).

Every stored integer is kept below ``2**62`` in magnitude, so the sum of any two never wraps
around in int64; a value that would leave the range raises :class:`FixedPointRangeError`
naming the particle (the integrator adds the step).

**Exact multiplication by c ≈ n/2³¹.** With ``d = 2**31`` and ``n = round(c·d)``, one friction
step maps ``(v, b)`` (value, buffer) to ``(v', b')`` by two bijections::

    e  = b mod n,  b ← b div n            (draw a digit in [0, n) from the buffer)
    t  = v·n + e                          (exact, in 94 bits)
    v' = t div d,  b ← b·d + (t mod d)    (store the digit the division drops)

and the inverse runs them backwards (``t = v'·d + (b mod d)``, ``v = t div n``,
``b ← b·n + (t mod n)``). Maclaurin et al. store first and draw second, which leaves ``v'``
within ``n`` counts of ``v·n/d``; drawing first makes ``v'`` accurate to one count with the
same buffer growth, ``log2(d/n) ≈ -log2(c)`` bits per value per step (0.00144 bits at
γ = 1/ps, Δt = 1 fs). All products stay below ``2**63`` by splitting ``v`` into 31-bit halves,
so the arithmetic is plain int64 torch on any device.

The buffer holds one arbitrary-precision non-negative integer per value as little-endian
31-bit limbs, stored row-wise in an int64 tensor of shape (limbs, values): each operation is a
handful of vectorized integer operations per limb, and its size is the measured memory cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError

LIMB_BITS = 31
"""Bits per buffer limb; also log2 of the denominator ``d`` of the friction ratio."""

DENOMINATOR = 1 << LIMB_BITS
"""``d``: the friction factor is represented as ``numerator / 2**31``."""

RANGE_BITS = 62
"""Every stored integer satisfies ``|value| < 2**62`` (sums of two stay inside int64)."""

_LIMB_MASK = DENOMINATOR - 1
_SLACK = 256
"""Free limb rows kept on each side of the buffer's active rows (moves are O(width))."""

_UNITS = {"position": "nm", "velocity": "nm/ps", "force": "kJ/mol/nm"}
_REMEDIES = {
    "position": "positions are never wrapped into the box: start inside the range, or choose "
                "fewer position_bits for a wider range",
    "velocity": "the dynamics blew up (reduce the timestep or relax the starting structure), "
                "or choose fewer velocity_bits for a wider range",
    "force": "atoms overlap (minimize the starting structure first), or choose fewer "
             "force_bits for a wider range",
}


class FixedPointRangeError(InputError):
    """A value that does not fit its fixed-point range (never a silent wrap-around).

    Attributes
    ----------
    quantity : str
        ``"position"``, ``"velocity"`` or ``"force"``.
    particle : int
        Index of the first offending particle.
    step : int or None
        Step being computed when it happened (set by the integrator).
    """

    def __init__(self, quantity: str, particle: int, value: float, limit: float, bits: int,
                 step: int | None = None, detail: str = ""):
        self.quantity, self.particle, self.value = quantity, int(particle), float(value)
        self.limit, self.bits, self.step, self.detail = float(limit), int(bits), step, detail
        where = "" if step is None else f"step {step}: "
        unit = _UNITS[quantity]
        super().__init__(
            f"{where}particle {self.particle} {quantity}{detail} {self.value:.6g} {unit} is "
            f"outside the fixed-point range ±{self.limit:.6g} {unit} ({quantity}_bits="
            f"{self.bits}); {_REMEDIES[quantity]}")

    def at_step(self, step: int) -> FixedPointRangeError:
        """The same error, reported at ``step``."""
        return FixedPointRangeError(self.quantity, self.particle, self.value, self.limit,
                                    self.bits, step, self.detail)


@dataclass(frozen=True)
class FixedPointFormat:
    """Binary fixed-point scales of the exact mode (see the module table).

    Parameters
    ----------
    position_bits : int
        Fractional bits of positions: resolution ``2**-position_bits`` nm.
    velocity_bits : int
        Fractional bits of velocities: resolution ``2**-velocity_bits`` nm/ps.
    force_bits : int
        Fractional bits of per-interaction forces and their sums: resolution
        ``2**-force_bits`` kJ/mol/nm.
    """

    position_bits: int = 48
    velocity_bits: int = 50
    force_bits: int = 32

    def __post_init__(self):
        for name in ("position_bits", "velocity_bits", "force_bits"):
            bits = getattr(self, name)
            if not 0 <= int(bits) <= RANGE_BITS:
                raise InputError(f"{name} must lie in [0, {RANGE_BITS}], got {bits}")

    def bits(self, quantity: str) -> int:
        """Fractional bits of ``quantity`` (``"position"``, ``"velocity"`` or ``"force"``)."""
        return int(getattr(self, f"{quantity}_bits"))

    def resolution(self, quantity: str) -> float:
        """Value of one count of ``quantity``, in its MD unit."""
        return math.ldexp(1.0, -self.bits(quantity))

    def range(self, quantity: str) -> float:
        """Largest magnitude ``quantity`` may take, in its MD unit (``2**62`` counts)."""
        return math.ldexp(1.0, RANGE_BITS - self.bits(quantity))

    def to_fixed(self, values: torch.Tensor, quantity: str, detail: str = "") -> torch.Tensor:
        """Round MD-unit values to counts of ``quantity``; FixedPointRangeError outside range.

        Parameters
        ----------
        values : torch.Tensor, shape (N, ...) , MD units
            Row ``p`` belongs to particle ``p`` (named in the error).
        quantity : str
        detail : str
            Words inserted after the quantity in the error message (e.g. ``" increment"``).

        Returns
        -------
        torch.Tensor, int64, same shape
        """
        return counts(torch.ldexp(values.to(torch.float64),
                                  torch.tensor(self.bits(quantity), device=values.device)),
                      self, quantity, detail)

    def to_float(self, values: torch.Tensor, quantity: str) -> torch.Tensor:
        """Counts of ``quantity`` as float64 MD-unit values (exact while ``|counts| < 2**53``)."""
        return torch.ldexp(values.to(torch.float64),
                           torch.tensor(-self.bits(quantity), device=values.device))


def counts(scaled: torch.Tensor, fmt: FixedPointFormat, quantity: str, detail: str = ""
           ) -> torch.Tensor:
    """Round values already expressed in counts to int64, refusing any outside the range.

    Parameters
    ----------
    scaled : torch.Tensor, float64, shape (N, ...)
        Values in counts of ``quantity``; row ``p`` belongs to particle ``p``.
    fmt : FixedPointFormat
    quantity : str
    detail : str
        Words inserted after the quantity in the error message.

    Returns
    -------
    torch.Tensor, int64
        ``round(scaled)`` (ties to even, elementwise, hence deterministic).
    """
    check_range(scaled, fmt, quantity, detail)
    return torch.round(scaled).to(torch.int64)


def check_range(values: torch.Tensor, fmt: FixedPointFormat, quantity: str, detail: str = ""
                ) -> None:
    """FixedPointRangeError unless every ``|value| < 2**62`` (counts; NaN is out of range)."""
    limit = float(1 << RANGE_BITS)
    magnitude = values.abs().to(torch.float64)
    bad = ~(magnitude < limit)
    if bool(bad.any()):
        flat = int(torch.nonzero(bad.reshape(bad.shape[0], -1).any(1))[0, 0])
        worst = values[flat].reshape(-1).to(torch.float64)
        value = float(worst[torch.argmax(torch.nan_to_num(worst.abs(), nan=math.inf))])
        raise FixedPointRangeError(quantity, flat, value * fmt.resolution(quantity),
                                   fmt.range(quantity), fmt.bits(quantity), detail=detail)


def add_counts(state: torch.Tensor, increment: torch.Tensor, fmt: FixedPointFormat,
               quantity: str) -> torch.Tensor:
    """``state + increment`` for in-range int64 counts, refusing a result outside the range."""
    total = state + increment  # both below 2**62 in magnitude: no wrap-around
    check_range(total, fmt, quantity)
    return total


# ---------------------------------------------------------------------------------------------
# The information buffer


class InformationBuffer:
    """One arbitrary-precision non-negative integer per value: the bits friction would lose.

    Parameters
    ----------
    shape : tuple of int
        Shape of the values it serves (e.g. (N, 3) velocities); every integer starts at 0.
    device : torch.device or str, optional

    Notes
    -----
    The integers are stored as little-endian 31-bit limbs, row ``k`` of the active block
    holding limb ``k`` of every value; free rows on both sides let the block move (pushing a
    limb in front, popping one) without copying. All operations are exact.
    """

    def __init__(self, shape: tuple[int, ...], device: torch.device | str | None = None):
        self.shape = tuple(int(s) for s in shape)
        size = math.prod(self.shape)
        self._limbs = torch.zeros((2 * _SLACK, size), dtype=torch.int64, device=device)
        self._low = self._top = _SLACK  # active rows [low, top); none: every value is 0

    @property
    def n_limbs(self) -> int:
        """Limbs per value in use."""
        return self._top - self._low

    @property
    def nbytes(self) -> int:
        """Bytes held by the limbs in use (8 per limb per value)."""
        return self.n_limbs * self._limbs.shape[1] * self._limbs.element_size()

    def bit_lengths(self) -> np.ndarray:
        """Bits of information in each integer (``int.bit_length``), shape ``self.shape``."""
        limbs = self._limbs[self._low:self._top].cpu().numpy()
        bits = np.zeros(limbs.shape[1], dtype=np.int64)
        for k in range(limbs.shape[0]):  # a higher non-zero limb overrides a lower one
            nonzero = limbs[k] > 0
            bits[nonzero] = k * LIMB_BITS + np.floor(np.log2(limbs[k][nonzero])).astype(
                np.int64) + 1
        return bits.reshape(self.shape)

    def values(self) -> list[int]:
        """The integers as Python ints, flattened (for inspection and tests)."""
        limbs = self._limbs[self._low:self._top].cpu().numpy()
        return [sum(int(limb) << (LIMB_BITS * k) for k, limb in enumerate(column))
                for column in limbs.T]

    def _rows(self) -> torch.Tensor:
        return self._limbs[self._low:self._top]

    def _recentre(self) -> None:
        """Move the active rows to the middle of a fresh block with free rows on both sides."""
        width = self.n_limbs
        limbs = self._limbs.new_zeros((width + 2 * _SLACK, self._limbs.shape[1]))
        limbs[_SLACK:_SLACK + width] = self._rows()
        self._limbs, self._low, self._top = limbs, _SLACK, _SLACK + width

    def _trim(self) -> None:
        while self._top > self._low and not bool(self._limbs[self._top - 1].any()):
            self._top -= 1

    def divmod(self, divisor: int) -> torch.Tensor:
        """``b, r = b div divisor, b mod divisor`` for every integer; returns ``r``.

        Parameters
        ----------
        divisor : int
            In ``[1, 2**31]``.

        Returns
        -------
        torch.Tensor, int64, flat
            Remainders in ``[0, divisor)``.
        """
        rem = self._limbs.new_zeros(self._limbs.shape[1])
        for k in range(self._top - 1, self._low - 1, -1):
            current = (rem << LIMB_BITS) | self._limbs[k]  # rem < 2**31: below 2**62
            quotient = torch.div(current, divisor, rounding_mode="floor")
            self._limbs[k] = quotient
            rem = current - quotient * divisor
        self._trim()
        return rem

    def multiply_add(self, factor: int, digits: torch.Tensor) -> None:
        """``b = b·factor + digits`` for every integer (``factor ≤ 2**31``, digits in
        ``[0, factor)``); the inverse of :meth:`divmod`."""
        carry = digits.reshape(-1)
        for k in range(self._low, self._top):
            total = self._limbs[k] * factor + carry  # below 2**62 + 2**32
            self._limbs[k] = total & _LIMB_MASK
            carry = total >> LIMB_BITS
        if bool(carry.any()):
            if self._top == self._limbs.shape[0]:
                self._recentre()
            self._limbs[self._top] = carry
            self._top += 1

    def push_limb(self, digits: torch.Tensor) -> None:
        """``b = b·2**31 + digits`` for every integer (digits in ``[0, 2**31)``)."""
        if self._low == 0:
            self._recentre()
        if self._top == self._low and not bool(digits.any()):
            return  # 0·2**31 + 0 is still 0
        self._low -= 1
        self._limbs[self._low] = digits.reshape(-1)

    def pop_limb(self) -> torch.Tensor:
        """``b, r = b div 2**31, b mod 2**31`` for every integer; returns ``r`` (flat)."""
        if self._top == self._low:
            return self._limbs.new_zeros(self._limbs.shape[1])
        digits = self._limbs[self._low].clone()
        self._low += 1
        return digits


def friction_numerator(factor: float) -> int:
    """``n = round(factor·2**31)``, the numerator of the friction ratio ``n / 2**31``.

    Raises InputError when the factor rounds to 0 (friction far too strong for the step).
    """
    numerator = round(factor * DENOMINATOR)
    if not 1 <= numerator <= DENOMINATOR:
        raise InputError(f"the friction factor exp(-γΔt) = {factor:.3g} is not representable "
                         f"as n/2**31 with 1 <= n <= 2**31; use a smaller friction or timestep")
    return numerator


def scale_exact(values: torch.Tensor, numerator: int, buffer: InformationBuffer
                ) -> torch.Tensor:
    """``values·numerator/2**31`` to within one count, keeping the lost digits in ``buffer``.

    Parameters
    ----------
    values : torch.Tensor, int64
        ``|values| < 2**62``.
    numerator : int
        In ``[1, 2**31]``.
    buffer : InformationBuffer
        Of the same number of elements; updated in place.

    Returns
    -------
    torch.Tensor, int64
        The scaled values; :func:`unscale_exact` recovers ``values`` and the buffer exactly.
    """
    digits = buffer.divmod(numerator).reshape(values.shape)
    high, low = values >> LIMB_BITS, values & _LIMB_MASK
    t = low * numerator + digits  # < 2**62
    buffer.push_limb(t & _LIMB_MASK)
    return high * numerator + (t >> LIMB_BITS)


def unscale_exact(values: torch.Tensor, numerator: int, buffer: InformationBuffer
                  ) -> torch.Tensor:
    """Exact inverse of :func:`scale_exact` (same ``numerator`` and ``buffer``)."""
    digits = buffer.pop_limb().reshape(values.shape)
    # t = values·2**31 + digits = c1·2**62 + c0·2**31 + digits, divided by n limb by limb.
    c1, c0 = values >> LIMB_BITS, values & _LIMB_MASK
    q1 = torch.div(c1, numerator, rounding_mode="floor")
    current = ((c1 - q1 * numerator) << LIMB_BITS) | c0
    q2 = torch.div(current, numerator, rounding_mode="floor")
    current = ((current - q2 * numerator) << LIMB_BITS) | digits
    q3 = torch.div(current, numerator, rounding_mode="floor")
    buffer.multiply_add(numerator, current - q3 * numerator)
    return (q1 << (2 * LIMB_BITS)) + (q2 << LIMB_BITS) + q3


__all__ = ["DENOMINATOR", "LIMB_BITS", "RANGE_BITS", "FixedPointFormat", "FixedPointRangeError",
           "InformationBuffer", "add_counts", "check_range", "counts", "friction_numerator",
           "scale_exact", "unscale_exact"]
