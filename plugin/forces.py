"""Trained torch potentials as OpenMM forces.

:func:`create_force` turns a model that follows the potential contract
(:mod:`openmm_reversible.ml.contract`) into a Force for any OpenMM System:

- ``openmmtorch.TorchForce`` when openmm-torch is importable: the model is compiled with
  TorchScript and runs inside OpenMM on any platform (CUDA included); ``XmlSerializer`` embeds
  the compiled model in the System XML, so the file is self-contained;
- ``openmm.PythonForce`` otherwise (OpenMM >= 8.5): OpenMM calls back into Python, which
  evaluates the same TorchScript module and its gradient. The callback object pickles the
  compiled model with it, so this System XML is self-contained too.

Both go through :class:`OpenMMModel`, which adapts the contract signature ``model(positions,
box[, atom_types])`` to TorchForce's ``forward(positions[, boxvectors])`` (atom types fixed at
export), casts positions to the model's dtype and returns the energy in the positions' dtype.
"""

from __future__ import annotations

import io

import numpy as np
import openmm
import torch
from openmm import unit
from torch import nn


class OpenMMModel(nn.Module):
    """TorchForce-convention wrapper: ``forward(positions (N,3) nm[, boxvectors (3,3) nm])``.

    Parameters
    ----------
    model : nn.Module
        Contract model (eager or already scripted), called as ``model(positions, box)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        floating = [t for t in list(model.parameters()) + list(model.buffers())
                    if t.is_floating_point()]
        dtype = floating[0].dtype if floating else torch.float64
        # An empty tensor that follows the module's dtype and device (TorchForce moves it).
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype))

    def _inputs(self, positions: torch.Tensor, boxvectors: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        positions = positions.to(self.dtype_probe.dtype)
        if boxvectors is not None:
            boxvectors = boxvectors.to(self.dtype_probe.dtype)
        return positions, boxvectors

    def forward(self, positions: torch.Tensor, boxvectors: torch.Tensor | None = None
                ) -> torch.Tensor:
        x, box = self._inputs(positions, boxvectors)
        return self.model(x, box).reshape(()).to(positions.dtype)


class TypedOpenMMModel(OpenMMModel):
    """:class:`OpenMMModel` for models that take atom types, fixed at export.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(positions, box, atom_types)``.
    atom_types : array-like of int, shape (N,)
    """

    def __init__(self, model: nn.Module, atom_types):
        super().__init__(model)
        self.register_buffer("atom_types", torch.as_tensor(np.asarray(atom_types),
                                                           dtype=torch.long))

    def forward(self, positions: torch.Tensor, boxvectors: torch.Tensor | None = None
                ) -> torch.Tensor:
        x, box = self._inputs(positions, boxvectors)
        return self.model(x, box, self.atom_types).reshape(()).to(positions.dtype)


def script_model(model: nn.Module, atom_types=None) -> torch.jit.ScriptModule:
    """Compile ``model`` (with fixed ``atom_types``, if given) in the TorchForce convention.

    Raises
    ------
    ValueError
        If the model cannot be compiled with ``torch.jit.script``; the message says why.
    """
    wrapper = OpenMMModel(model) if atom_types is None else TypedOpenMMModel(model, atom_types)
    try:
        return torch.jit.script(wrapper)
    except Exception as exc:
        raise ValueError(f"the model cannot be compiled with torch.jit.script, which export to "
                         f"OpenMM needs (neighbour search and energy in pure torch, type "
                         f"annotations on forward): {exc}") from exc


def openmmtorch_available() -> bool:
    """Whether ``openmmtorch`` imports (it needs a torch build matching its own)."""
    try:
        import openmmtorch  # noqa: F401
    except ImportError:
        return False
    from openmm_reversible.potential.torchforce import load_openmmtorch_kernels

    load_openmmtorch_kernels()
    return True


class TorchComputation:
    """Picklable ``openmm.PythonForce`` callback evaluating a TorchScript model.

    Parameters
    ----------
    module : torch.jit.ScriptModule
        TorchForce-convention module (see :func:`script_model`).
    periodic : bool
        Pass the periodic box vectors to the module.
    """

    def __init__(self, module: torch.jit.ScriptModule, periodic: bool):
        self.module = module
        self.periodic = bool(periodic)

    def __call__(self, state: openmm.State) -> tuple[float, np.ndarray]:
        positions = torch.tensor(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                                 dtype=torch.float64, requires_grad=True)
        if self.periodic:
            box = torch.tensor(state.getPeriodicBoxVectors(asNumpy=True)
                               .value_in_unit(unit.nanometer), dtype=torch.float64)
            energy = self.module(positions, box)
        else:
            energy = self.module(positions)
        (gradient,) = torch.autograd.grad(energy, positions)
        return float(energy.detach()), -gradient.numpy()

    def __getstate__(self) -> dict:
        buffer = io.BytesIO()
        torch.jit.save(self.module, buffer)
        return {"module": buffer.getvalue(), "periodic": self.periodic}

    def __setstate__(self, state: dict) -> None:
        self.module = torch.jit.load(io.BytesIO(state["module"]))
        self.periodic = state["periodic"]


def create_force(model: nn.Module, atom_types=None, periodic: bool = True,
                 backend: str = "auto") -> openmm.Force:
    """An OpenMM Force computing the energy of a trained torch model.

    Parameters
    ----------
    model : nn.Module
        Contract model ``model(positions, box[, atom_types]) -> energy`` (kJ/mol), eager or
        scripted; it must compile with ``torch.jit.script``.
    atom_types : array-like of int, shape (N,), optional
        Fixed atom types passed as the model's third argument.
    periodic : bool
        Whether the model uses periodic boundary conditions (receives box vectors).
    backend : {"auto", "torchforce", "pythonforce"}
        ``auto``: TorchForce when openmmtorch imports, PythonForce otherwise.

    Returns
    -------
    openmm.Force
        ``openmmtorch.TorchForce`` or ``openmm.PythonForce``; add it to a System.
    """
    if backend not in ("auto", "torchforce", "pythonforce"):
        raise ValueError(f"unknown backend {backend!r}; choose auto, torchforce or pythonforce")
    if backend == "auto":
        backend = "torchforce" if openmmtorch_available() else "pythonforce"
    module = script_model(model, atom_types)
    if backend == "torchforce":
        try:
            import openmmtorch
        except ImportError as exc:
            raise ValueError(f"backend 'torchforce' needs openmmtorch, which does not import "
                             f"({exc}); install openmm-torch matching this torch, or use "
                             f"backend='pythonforce'") from exc
        force = openmmtorch.TorchForce(module)
    else:
        force = openmm.PythonForce(TorchComputation(module, periodic))
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    return force
