"""The frames a loss sees: :class:`Trajectory`, the snapshots of one simulation window.

A reversible simulation stores only the states at its loss snapshots; the loss function gets
them as one ``Trajectory`` and returns a scalar. In the reversible mode the position and
velocity tensors are leaves that require grad (the backward pass differentiates the loss with
respect to them and then propagates those cotangents back through the dynamics); in the
backprop-through-time mode they carry the graph of the whole simulation. Either way a loss is
written once, as a plain differentiable function of the frames (and of the potential, for
losses that evaluate energies of the frames).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Trajectory:
    """Snapshots of a simulation window, in MD units.

    Attributes
    ----------
    positions : torch.Tensor, shape (S, N, 3), nm
        Positions at each snapshot, not wrapped into the box (use minimum-image displacements).
    velocities : torch.Tensor, shape (S, N, 3), nm/ps
        Velocities at each snapshot, as defined by the integrator (for the Langevin-middle
        scheme: the velocity after the second friction half, as reported by OpenMM).
    box : torch.Tensor, shape (3, 3), nm, or None
        Periodic box vectors (rows a, b, c), constant over the window; ``None`` if non-periodic.
    steps : torch.Tensor, shape (S,), int64
        Global step index of each snapshot.
    timestep : float, ps
        Integration step Δt (time of snapshot k is ``steps[k] * timestep``).
    masses : torch.Tensor, shape (N,), amu
        Particle masses.
    temperature : float, K
        Heat-bath temperature of the integrator.
    """

    positions: torch.Tensor
    velocities: torch.Tensor
    box: torch.Tensor | None
    steps: torch.Tensor
    timestep: float
    masses: torch.Tensor
    temperature: float

    @property
    def n_frames(self) -> int:
        """Number of snapshots S."""
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        """Number of particles N."""
        return int(self.positions.shape[1])

    @property
    def times(self) -> torch.Tensor:
        """Time of each snapshot, ps, shape (S,)."""
        return self.steps.to(self.positions.dtype) * self.timestep

    def kinetic_energy(self) -> torch.Tensor:
        """Kinetic energy of each snapshot, kJ/mol, shape (S,): ``Σ m v² / 2``."""
        return 0.5 * torch.einsum("n,snk,snk->s", self.masses, self.velocities, self.velocities)
