"""The contract of a machine-learning potential, and the check that enforces it.

Any ``torch.nn.Module`` can be the potential of a reversible simulation, of gradient checks
and of the fitting workflow, alone or added to a classical prior, when it satisfies:

Signature
    ``model(positions, box)`` or ``model(positions, box, atom_types)`` returns the total
    potential energy.

    - ``positions``: tensor (N, 3), nm, unwrapped (use minimum-image displacements);
    - ``box``: tensor (3, 3), nm, periodic box vectors as rows in OpenMM's reduced form, or
      ``None`` for a non-periodic system;
    - ``atom_types``: long tensor (N,) of type indices (fixed for the whole simulation).

Output
    A floating-point tensor with one element (0-dim preferred), kJ/mol, finite, on the same
    device as ``positions``. Sum per-atom energies inside the model.

Dtype and device
    Positions arrive in the simulation's dtype (float64 by default) and on its device. The model
    may compute in float32 (cast inside, as :class:`~.schnet.SchNet` does); autograd returns
    forces in the positions' dtype. It must make no other assumption: no ``.cpu()``,
    ``.numpy()`` or ``.item()`` on anything positions flow through.

Twice differentiable
    The reversible adjoint differentiates *forces*: it needs ``∂F/∂x`` (Hessian-vector
    products) and ``∂F/∂θ`` for the model's trainable parameters θ, i.e. the energy must be
    differentiable twice, with ``create_graph=True``, with respect to positions, and its
    position gradient differentiable with respect to the parameters. Use smooth operations
    (softplus, SiLU, tanh, exp; no ReLU, whose second derivative is zero almost everywhere),
    smooth cutoffs (value and two derivatives vanishing at the cutoff) and no ``.detach()`` or
    ``torch.no_grad()`` on the path from positions to energy. Custom ``autograd.Function``\\ s
    need a differentiable backward.

For export into OpenMM (TorchForce, :mod:`openmm_reversible_plugin`) the model must also be
scriptable with ``torch.jit.script``; the reference models are.

:func:`check_energy_model` tests one call against every clause and raises
:class:`ContractError` naming the clause that failed; :class:`MLPotential` runs it at its first
call, so a broken model stops a simulation before the first step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..units import DTYPE


class ContractError(InputError):
    """A model that breaks the potential contract; the message names the clause."""


def _call(model: nn.Module, positions: torch.Tensor, box: torch.Tensor | None,
          atom_types: torch.Tensor | None) -> torch.Tensor:
    if atom_types is None:
        return model(positions, box)
    return model(positions, box, atom_types)


def check_energy_model(model: nn.Module, positions: torch.Tensor, box: torch.Tensor | None = None,
                       atom_types: torch.Tensor | None = None, name: str = "model") -> None:
    """Check one evaluation of ``model`` against the potential contract.

    Parameters
    ----------
    model : nn.Module
        ``model(positions, box[, atom_types]) -> energy``.
    positions : torch.Tensor, shape (N, 3), nm
        A representative configuration (detached copies are used).
    box : torch.Tensor, shape (3, 3), nm, or None
    atom_types : torch.Tensor, shape (N,), long, or None
        Passed as the third argument when given.
    name : str
        How to call the model in error messages.

    Raises
    ------
    ContractError
        Naming the clause that failed: the call itself, output type or shape, finiteness,
        device, first derivative (forces), second derivative with respect to positions or to
        the trainable parameters.
    """
    x = positions.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        try:
            energy = _call(model, x, box, atom_types)
        except ContractError:
            raise
        except Exception as exc:
            signature = "(positions, box)" if atom_types is None else \
                "(positions, box, atom_types)"
            raise ContractError(f"{name} failed when called as {name}{signature} with "
                                f"positions of shape {tuple(x.shape)}: "
                                f"{type(exc).__name__}: {exc}") from exc
        _check_output(energy, x, name)
        (gradient,) = torch.autograd.grad(energy.sum(), x, create_graph=True, allow_unused=True)
        if gradient is None or not gradient.requires_grad:
            what = "positions" if gradient is None else "positions twice"
            raise ContractError(
                f"{name} is not differentiable with respect to {what}: the energy must be "
                f"differentiable twice (forces and their derivatives); remove .detach(), "
                f".item(), numpy or torch.no_grad() from the path from positions to energy and "
                f"give custom autograd Functions a differentiable backward")
        if not bool(torch.isfinite(gradient).all()):
            raise ContractError(f"{name} gives non-finite forces (NaN or inf) at this "
                                f"configuration; check for zero distances, self pairs or "
                                f"non-smooth functions such as sqrt at 0")
        _check_second_derivative(model, gradient, x, name)


def _check_output(energy, x: torch.Tensor, name: str) -> None:
    if not isinstance(energy, torch.Tensor):
        raise ContractError(f"{name} returned {type(energy).__name__}; the contract is a "
                            f"torch.Tensor holding the total energy in kJ/mol")
    if energy.numel() != 1 or energy.ndim > 1:
        raise ContractError(f"{name} returned shape {tuple(energy.shape)}; the contract is the "
                            f"total energy, a tensor with one element (0-dim), kJ/mol: sum "
                            f"per-atom or per-frame energies inside the model")
    if not energy.is_floating_point():
        raise ContractError(f"{name} returned dtype {energy.dtype}; the energy must be a "
                            f"floating-point tensor (float64 or float32)")
    if energy.device != x.device:
        raise ContractError(f"{name} returned its energy on {energy.device} for positions on "
                            f"{x.device}; compute on the positions' device")
    if not bool(torch.isfinite(energy).all()):
        raise ContractError(f"{name} returned a non-finite energy ({float(energy.detach())}) "
                            f"at this configuration; check the model and the input positions "
                            f"(nm)")
    if not energy.requires_grad:
        raise ContractError(f"{name} returned an energy that does not depend differentiably on "
                            f"the positions (no autograd graph): remove .detach(), .item(), "
                            f"numpy or torch.no_grad() from the path from positions to energy")


def _check_second_derivative(model: nn.Module, gradient: torch.Tensor, x: torch.Tensor,
                             name: str) -> None:
    # A fixed direction: a Hessian-vector product and ∂(F·v)/∂θ in one backward pass.
    direction = torch.linspace(-1.0, 1.0, gradient.numel(), dtype=gradient.dtype,
                               device=gradient.device).reshape(gradient.shape)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        second = torch.autograd.grad((gradient * direction).sum(), [x, *params],
                                     allow_unused=True)
    except RuntimeError as exc:
        raise ContractError(f"{name} is not differentiable twice: differentiating its forces "
                            f"failed ({exc}); use operations with double-backward support") \
            from exc
    if second[0] is None:
        raise ContractError(f"{name}'s forces do not depend on the positions through autograd "
                            f"(no second derivative): the reversible adjoint needs dF/dx")
    if not bool(torch.isfinite(second[0]).all()):
        raise ContractError(f"{name}'s second derivative with respect to positions is not "
                            f"finite; use smooth functions and cutoffs")
    if params and all(g is None for g in second[1:]):
        raise ContractError(f"{name}'s forces do not depend on any of its trainable parameters "
                            f"through autograd: gradients of a trajectory loss would be zero")
    if any(g is not None and not bool(torch.isfinite(g).all()) for g in second[1:]):
        raise ContractError(f"{name}'s force derivative with respect to its parameters is not "
                            f"finite")


class EnergySum(nn.ModuleList):
    """Sum of energy models sharing the signature ``(positions, box, atom_types)``.

    Scriptable, so that e.g. a Stillinger–Weber prior plus a neural correction exports to
    OpenMM as one model.
    """

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None,
                atom_types: torch.Tensor | None = None) -> torch.Tensor:
        energy = torch.zeros((), dtype=positions.dtype, device=positions.device)
        for model in self:
            energy = energy + model(positions, box, atom_types)
        return energy


class MLPotential(nn.Module):
    """A contract model (plus an optional prior) as ``potential(positions, box)``.

    This is the form the reversible integrator, gradient checks and observables take. The
    model's contract is checked at the first call (a :class:`ContractError` names the broken
    clause); later calls cost nothing extra.

    Parameters
    ----------
    model : nn.Module
        ``model(positions, box[, atom_types]) -> energy`` (kJ/mol).
    prior : nn.Module, optional
        ``prior(positions, box) -> energy`` added to the model, e.g. a
        :class:`~openmm_reversible.potential.TorchPotential` of a classical System.
    atom_types : array-like of int, shape (N,), optional
        Passed to the model as its third argument.
    masses : array-like, shape (N,), amu, optional
        Particle masses for the integrator; default ``prior.masses`` when the prior has them.
    """

    def __init__(self, model: nn.Module, prior: nn.Module | None = None, atom_types=None,
                 masses=None):
        super().__init__()
        self.model = model
        self.prior = prior
        if atom_types is not None:
            atom_types = torch.as_tensor(atom_types, dtype=torch.long)
            if atom_types.ndim != 1:
                raise InputError(f"atom_types must have shape (n_atoms,), got "
                                 f"{tuple(atom_types.shape)}")
        self.register_buffer("atom_types", atom_types)
        if masses is None and prior is not None:
            masses = getattr(prior, "masses", None)
        if masses is not None and not torch.is_tensor(masses):
            masses = torch.as_tensor(np.asarray(masses, dtype=float), dtype=DTYPE)
        self.register_buffer("masses", masses)
        self._checked = False

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None = None) -> torch.Tensor:
        """Total energy, kJ/mol: ``model(positions, box[, atom_types]) + prior(positions, box)``."""
        if not self._checked:
            if self.atom_types is not None and self.atom_types.shape[0] != positions.shape[0]:
                raise ContractError(f"atom_types has {self.atom_types.shape[0]} entries but "
                                    f"positions have {positions.shape[0]} atoms")
            check_energy_model(self.model, positions, box, self.atom_types)
            if self.prior is not None:
                check_energy_model(self.prior, positions, box, name="prior")
            self._checked = True
        energy = _call(self.model, positions, box, self.atom_types)
        if self.prior is not None:
            energy = energy + self.prior(positions, box)
        return energy.reshape(()).to(positions.dtype)
