"""Accelerations ``a = F/m = -∇E/m`` from any energy module, by autograd.

The potential is any ``nn.Module`` (or callable) ``potential(positions, box) -> energy`` with
positions (n_atoms, 3) in nm, box (3, 3) in nm or ``None``, and a 0-dim energy in kJ/mol; so a
classical :class:`~openmm_reversible.potential.TorchPotential` and a neural network are used the
same way. With ``create_graph=True`` the accelerations keep their graph, so that one
``torch.autograd.grad`` call on them gives vector-Jacobian products with respect to positions
and parameters (double backward), which is what the adjoint of the dynamics needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError

Potential = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``potential(positions (N, 3) nm, box (3, 3) nm or None) -> energy`` (0-dim, kJ/mol)."""


def accelerations(potential: Potential, positions: torch.Tensor, box: torch.Tensor | None,
                  inv_masses: torch.Tensor, create_graph: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accelerations of all atoms.

    Parameters
    ----------
    potential : callable
        ``potential(positions, box) -> energy``, kJ/mol.
    positions : torch.Tensor, shape (N, 3), nm
        Where to evaluate. Without ``create_graph`` it is detached first; with it, a tensor
        that already requires grad is used as is (so a graph through earlier steps is kept).
    box : torch.Tensor, shape (3, 3), nm, or None
    inv_masses : torch.Tensor, shape (N,), 1/amu
    create_graph : bool
        Keep the graph of the accelerations (for vector-Jacobian products).

    Returns
    -------
    a : torch.Tensor, shape (N, 3), nm/ps²
        ``-∇E / m`` (kJ/mol/nm/amu = nm/ps²).
    x : torch.Tensor, shape (N, 3), nm
        The tensor the energy was differentiated with respect to.
    """
    x = positions
    if not (create_graph and x.requires_grad):
        x = positions.detach().requires_grad_(True)
    with torch.enable_grad():
        energy = potential(x, box)
        if energy.ndim != 0:
            raise InputError(f"the potential returned an energy of shape {tuple(energy.shape)};"
                             " it must return a 0-dim tensor (total energy, kJ/mol)")
        (gradient,) = torch.autograd.grad(energy, x, create_graph=create_graph)
        a = -gradient * inv_masses[:, None]
    return a, x
