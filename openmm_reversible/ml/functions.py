"""Smooth functions shared by the reference models: activations and the radial cutoff.

Both are twice continuously differentiable, so energies, forces and force derivatives of a
model built from them are continuous (the reversible step differentiates forces once more).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    """``softplus(x) − log 2``: smooth, zero at zero."""
    return nn.functional.softplus(x) - math.log(2.0)


def cutoff_function(r: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``(1 − (r/r_c)²)³`` for ``r < r_c``; C² at the cutoff (pairs beyond it are never passed).

    Parameters
    ----------
    r : torch.Tensor, nm
    cutoff : float, nm
    """
    u = r / cutoff
    return (1.0 - u * u) ** 3


__all__ = ["cutoff_function", "shifted_softplus"]
