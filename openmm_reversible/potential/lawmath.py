"""Elementary functions for energy laws, on torch tensors and sympy expressions alike.

An energy law (``lennard_jones(r, sigma, epsilon)``, ``bond_angle(b1, b2)``, ...) is written
once. Called with torch tensors it is the autograd path; called with sympy symbols it is the
source from which :mod:`.fused` differentiates and generates compiled kernels. Laws built only
from arithmetic need nothing from here; the few functions that differ between the two worlds
(``erfc``, ``cos``, ``atan2``, clamping, vector products) dispatch on their argument's type.
Vectors are torch tensors of shape (..., 3) or sympy column matrices of shape (3, 1).
"""

from __future__ import annotations

import functools

import torch


def is_symbolic(x) -> bool:
    """Whether ``x`` is a sympy object (expression or matrix) rather than a tensor/number."""
    return type(x).__module__.startswith("sympy")


def _sympy():
    import sympy  # deferred: only the kernel generator needs it

    return sympy


@functools.cache
def detached_class():
    """The sympy function ``Detached(x)``: the value of ``x`` with derivative 0 (made on first
    use; the kernel printer writes it as its argument)."""
    sympy = _sympy()

    class Detached(sympy.Function):
        @classmethod
        def eval(cls, x):
            return x if x.is_Number else None  # a constant has no derivative anyway

        def fdiff(self, argindex=1):
            return sympy.S.Zero

    return Detached


def detach(x):
    """The value of ``x`` without its derivative (``Tensor.detach``; symbolically
    :func:`detached_class`)."""
    return detached_class()(x) if is_symbolic(x) else x.detach()


def erfc(x):
    """Complementary error function."""
    return _sympy().erfc(x) if is_symbolic(x) else torch.special.erfc(x)


def cos(x):
    """Cosine (argument in rad)."""
    return _sympy().cos(x) if is_symbolic(x) else torch.cos(x)


def atan2(y, x):
    """Four-quadrant arctangent of ``y / x``, rad."""
    if is_symbolic(y) or is_symbolic(x):
        return _sympy().atan2(y, x)
    return torch.atan2(y, x)


def clamp_min(x, lower: float):
    """``max(x, lower)``; symbolically a Piecewise, so its derivative is defined piecewise."""
    if is_symbolic(x):
        sympy = _sympy()
        return sympy.Piecewise((x, x > lower), (sympy.Float(lower), True))
    return torch.clamp(x, min=lower)


def dot(a, b):
    """Dot product of vectors (last axis for tensors)."""
    if is_symbolic(a):
        return a.dot(b)
    return (a * b).sum(-1)


def cross(a, b):
    """Cross product of 3-vectors (last axis for tensors)."""
    if is_symbolic(a):
        return a.cross(b)
    return torch.linalg.cross(a, b)


def norm(a):
    """Euclidean length of vectors (last axis for tensors)."""
    if is_symbolic(a):
        return _sympy().sqrt(a.dot(a))
    return torch.linalg.vector_norm(a, dim=-1)
