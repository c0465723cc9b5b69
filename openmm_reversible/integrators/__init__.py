"""Reversible molecular dynamics in torch.

- :mod:`.noise`: counter-based Gaussian noise, regenerated from ``(seed, step)``;
- :mod:`.forces`: accelerations ``-∇E/m`` of any energy module, by autograd;
- :mod:`.langevin`: the Langevin-middle step, its exact inverse and its adjoint;
- :mod:`.reversible`: :class:`ReversibleSimulation`, a window of dynamics whose loss is
  differentiated by running the dynamics backward (or by backprop through time, for checks);
- :mod:`.fixed_point`, :mod:`.exact`: the exact mode, bitwise-reversible dynamics in 64-bit
  fixed point with an information buffer for the friction step.
"""

from .exact import ExactLangevinIntegrator, ExactReversibleSimulation, ExactState
from .fixed_point import FixedPointFormat, FixedPointRangeError
from .forces import accelerations
from .langevin import LangevinMiddleIntegrator
from .noise import counter_seed, standard_normal
from .reversible import ReversibleSimulation

__all__ = ["ExactLangevinIntegrator", "ExactReversibleSimulation", "ExactState",
           "FixedPointFormat", "FixedPointRangeError", "LangevinMiddleIntegrator",
           "ReversibleSimulation", "accelerations", "counter_seed", "standard_normal"]
