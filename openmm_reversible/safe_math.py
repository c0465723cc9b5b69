"""Elementary functions whose derivatives stay finite wherever their value is finite.

Autograd differentiates a composition by the chain rule, and one infinite factor poisons the
product even when another factor is zero. ``d/dε₁ sqrt(ε₁ ε₂)`` at ``ε₂ = 0`` is
``ε₂ / (2 sqrt(ε₁ ε₂)) = 0/0``, NaN in torch, although ``sqrt(ε₁·0) = 0`` for every ``ε₁``
so the true derivative is 0. Force fields meet such points all the time: hydrogens with zero
Lennard-Jones well depth, combining rules such as ``sqrt(ε₁ε₂)``, ``(ε₁ε₂)^0.5`` or
``2/(1/B₁ + 1/B₂)`` with a zero ``B``.

Each function here has the value of its torch counterpart everywhere. At the points where that
counterpart's derivative is infinite or undefined (the argument of a square root or fractional
power at 0, a zero divisor, ``atan2(0, 0)``) it takes every derivative, first and second alike,
as 0; elsewhere its derivatives are the usual ones, to every order. The trick is the "double
``where``": the singular input is replaced by a harmless one *before* the singular operation,
and the result is selected afterwards, so no infinite factor ever enters the backward pass
(``where(mask, f(x), c)`` alone is not enough: its backward multiplies ``f'(x) = ∞`` by 0).
"""

from __future__ import annotations

import math

import torch

from .units import DTYPE

Number = torch.Tensor | float


def _tensor(x: Number, like: Number) -> torch.Tensor:
    if torch.is_tensor(x):
        return x
    reference = like if torch.is_tensor(like) else None
    return torch.as_tensor(x, dtype=DTYPE if reference is None else reference.dtype,
                           device=None if reference is None else reference.device)


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` with every derivative at ``x = 0`` taken as 0 (not infinity).

    Zero Lennard-Jones well depths are common (hydrogens of many water models); the true
    derivative of ``sqrt(ε_i ε_j)`` there is infinite and would turn gradients into NaN.
    Negative arguments give NaN, as ``sqrt`` does.
    """
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, torch.ones_like(x)))
    return torch.where(positive, root, torch.where(x == 0, torch.zeros_like(x),
                                                   torch.full_like(x, math.nan)))


def safe_pow(x: Number, y: Number) -> torch.Tensor:
    """``x ** y`` (C's ``pow``) with finite derivatives wherever the value is finite.

    - integer constant ``y``: plain ``x ** n``, whose derivatives ``n x^(n-1)``, ... are exact
      at ``x = 0`` and for negative ``x``;
    - other ``y``: at ``x = 0`` the value ``0^y`` (0 for ``y > 0``, 1 for ``y = 0``, ``inf``
      for ``y < 0``) with every derivative 0 (``y x^(y-1)`` is infinite there for ``y < 1``,
      and ``x^y log x`` undefined); for ``x < 0`` no derivative with respect to ``y`` (``x^y``
      is real only at integer ``y``, where C's ``pow`` gives it, so ``log x`` is undefined),
      and NaN for a non-integer ``y``, as ``pow`` gives.

    Parameters
    ----------
    x, y : torch.Tensor or float
        Base and exponent; broadcast together.
    """
    x = _tensor(x, y)
    if not torch.is_tensor(y):
        y = float(y)
        if y.is_integer():
            return x ** int(y)
        zero = x == 0
        at_zero = math.inf if y < 0 else 0.0
        return torch.where(zero, torch.full_like(x, at_zero),
                           torch.where(zero, torch.ones_like(x), x) ** y)
    positive, zero = x > 0, x == 0
    fixed = y.detach()
    return torch.where(
        positive, torch.where(positive, x, torch.ones_like(x)) ** y,
        torch.where(zero, torch.zeros_like(x) ** fixed,
                    torch.where(x < 0, x, -torch.ones_like(x)) ** fixed))


def safe_div(x: Number, y: Number) -> torch.Tensor:
    """``x / y`` with every derivative 0 where ``y = 0``.

    The value there is what division gives (``±inf``, or NaN for ``0/0``); downstream terms
    often make it harmless (``exp(-inf) = 0``, ``1/inf = 0``: a combining rule
    ``2/(1/B₁ + 1/B₂)`` with ``B₂ = 0``), and the derivatives then are the limits, 0.
    """
    if not torch.is_tensor(y):
        return _tensor(x, y) / y
    zero = y == 0
    numerator = x.detach() if torch.is_tensor(x) else x
    return torch.where(zero, numerator / y.detach(),
                       x / torch.where(zero, torch.ones_like(y), y))


def safe_atan2(y: Number, x: Number) -> torch.Tensor:
    """``atan2(y, x)`` with every derivative 0 at ``x = y = 0`` (where they are 0/0)."""
    y, x = _tensor(y, x), _tensor(x, y)
    origin = (x == 0) & (y == 0)
    return torch.where(origin, torch.atan2(y.detach(), x.detach()),
                       torch.atan2(y, torch.where(origin, torch.ones_like(x), x)))


__all__ = ["safe_atan2", "safe_div", "safe_pow", "safe_sqrt"]
