"""Reversible molecular dynamics in torch.

- :mod:`.noise`: counter-based Gaussian noise, regenerated from ``(seed, step)``;
- :mod:`.forces`: accelerations ``-∇E/m`` of any energy module, by autograd;
- :mod:`.langevin`: the Langevin-middle step, its exact inverse and its adjoint;
- :mod:`.constraints`: distance constraints (rigid water, HBonds) and their projections;
  :mod:`.constrained`: OpenMM's constrained Langevin-middle step, its inverse and its adjoint;
- :mod:`.sites`: virtual sites in a window (the particles with mass integrated, the sites
  placed from them);
- :mod:`.adjoint`: the reverse sweep (adjoint recurrence, snapshot injection, truncation)
  shared by the float and the exact mode;
- :mod:`.reversible`: :class:`ReversibleSimulation`, a window of dynamics whose loss is
  differentiated by running the dynamics backward (or by backprop through time, for checks).

The exact mode (bitwise-reversible fixed-point dynamics) is :mod:`openmm_reversible.exact`.
"""

from .constraints import Constraints
from .langevin import LangevinMiddleIntegrator
from .reversible import ReversibleSimulation

__all__ = ["Constraints", "LangevinMiddleIntegrator", "ReversibleSimulation"]
