"""The exact mode: dynamics whose reverse trajectory equals the forward one bit for bit.

- :mod:`.fixed_point`: 64-bit fixed-point state, exactly invertible friction and the
  information buffer that keeps the digits it drops;
- :mod:`.forces`: forces summed as integers from per-interaction contributions, the same bits
  for the same positions on any thread count or device;
- :mod:`.dynamics`: :class:`ExactLangevinIntegrator` and :class:`ExactReversibleSimulation`,
  whose backward pass is the reverse sweep of :mod:`openmm_reversible.integrators.adjoint`
  over exactly reconstructed states.
"""

from .dynamics import ExactLangevinIntegrator, ExactReversibleSimulation, ExactState
from .fixed_point import FixedPointFormat, FixedPointRangeError
from .forces import DeterministicForces

__all__ = ["DeterministicForces", "ExactLangevinIntegrator", "ExactReversibleSimulation",
           "ExactState", "FixedPointFormat", "FixedPointRangeError"]
