"""Counter-based Gaussian noise: the random numbers of step ``n`` are a pure function of
``(seed, n)``.

A reversible simulation must subtract, on the way back, exactly the noise it added on the way
forward. Storing every noise vector would cost as much memory as storing the trajectory, so the
noise is *regenerated* instead: a 64-bit SplitMix hash of ``(seed, step)`` seeds a fresh
``torch.Generator`` whose normal stream is drawn on the CPU in float64. The result is bitwise
identical across runs, independent of the number of threads and of the order in which steps
are visited, and the same on every device (the CPU draw is moved, never redrawn, on a GPU).
"""

from __future__ import annotations

import torch

from ..units import DTYPE

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    """One round of the SplitMix64 finaliser (a bijective 64-bit mixer)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def counter_seed(seed: int, step: int) -> int:
    """Generator seed for the noise of ``step`` in the stream ``seed``.

    Parameters
    ----------
    seed : int
        Stream identifier (any Python int; taken modulo 2**64).
    step : int
        Step counter (any Python int; taken modulo 2**64).

    Returns
    -------
    int
        A 64-bit seed; distinct ``(seed, step)`` pairs give unrelated seeds.
    """
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(step) & _MASK64))


def standard_normal(seed: int, step: int, shape: tuple[int, ...], dtype: torch.dtype = DTYPE,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal numbers for ``(seed, step)``, regenerated bit for bit on every call.

    Parameters
    ----------
    seed : int
        Stream identifier.
    step : int
        Step counter.
    shape : tuple of int
        Shape of the result.
    dtype : torch.dtype
        Result dtype; the numbers are drawn in float64 and rounded once to ``dtype``.
    device : torch.device or str, optional
        Result device; the numbers are always drawn on the CPU.

    Returns
    -------
    torch.Tensor
        N(0, 1) samples of the requested shape.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(counter_seed(seed, step))
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    return z.to(dtype=dtype, device=device)
