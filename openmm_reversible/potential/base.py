"""The contract shared by every energy term of a :class:`TorchPotential`.

A *term* is the torch twin of one OpenMM ``Force``. It is an ``nn.Module`` whose ``forward``
maps ``(positions, box, sites)`` to a scalar energy:

- ``positions``: (n_atoms, 3) tensor, nm, float64 by default;
- ``box``: (3, 3) tensor of periodic box vectors (rows a, b, c) in nm, or ``None``;
- ``sites``: 1-D tensor with the current values of the force field's XML parameter *sites*
  (see :mod:`openmm_reversible.parameters`), possibly empty. Terms never own trainable
  parameters: they read them from ``sites`` through :class:`ParameterTable` bindings, so one
  XML number moves everywhere it appears and autograd reaches it.

Per-item parameters (per particle, bond, angle, ...) live in a :class:`ParameterTable`: a
fixed base array read from the OpenMM force, plus bindings ``(item, column) ← scale·sites[k]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..units import DTYPE


class ParameterTable(nn.Module):
    """Per-item parameters of one force: base values plus bindings to XML sites.

    Parameters
    ----------
    base : array-like, shape (n_items, n_columns)
        Values read from the OpenMM force, in MD units.
    columns : sequence of str
        Column names (e.g. ``("length", "k")``); used in error messages and bindings.
    """

    def __init__(self, base, columns):
        super().__init__()
        base = torch.as_tensor(np.asarray(base, dtype=float), dtype=DTYPE)
        if base.ndim == 1:
            base = base[:, None]
        if base.shape[1] != len(columns):
            raise ValueError(f"table has {base.shape[1]} columns but names {list(columns)}")
        self.columns = tuple(columns)
        self.register_buffer("base", base)
        self.register_buffer("bound_items", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bound_columns", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bound_sites", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bound_scales", torch.zeros(0, dtype=DTYPE))

    def column(self, name: str) -> int:
        """Index of column ``name`` (ValueError listing the columns if unknown)."""
        try:
            return self.columns.index(name)
        except ValueError:
            raise ValueError(f"no column {name!r}; columns are {list(self.columns)}") from None

    def bind(self, items, column: str | int, sites, scales=1.0) -> None:
        """Make ``table[items, column] = scales * sites_values[sites]`` at evaluation time."""
        col = self.column(column) if isinstance(column, str) else int(column)
        items = torch.as_tensor(np.atleast_1d(items), dtype=torch.long)
        sites = torch.as_tensor(np.broadcast_to(np.asarray(sites), items.shape).copy(),
                                dtype=torch.long)
        scales = torch.as_tensor(np.broadcast_to(np.asarray(scales, dtype=float),
                                                 items.shape).copy(), dtype=DTYPE)
        self.bound_items = torch.cat([self.bound_items, items])
        self.bound_columns = torch.cat([self.bound_columns,
                                        torch.full_like(items, col)])
        self.bound_sites = torch.cat([self.bound_sites, sites])
        self.bound_scales = torch.cat([self.bound_scales, scales])

    @property
    def is_bound(self) -> bool:
        return self.bound_items.numel() > 0

    def forward(self, sites: torch.Tensor | None = None) -> torch.Tensor:
        """Current table, shape (n_items, n_columns), differentiable w.r.t. ``sites``."""
        if not self.is_bound or sites is None:
            return self.base
        values = self.bound_scales.to(sites.dtype) * sites[self.bound_sites]
        return self.base.to(sites.dtype).index_put(
            (self.bound_items, self.bound_columns), values)


class Term(nn.Module):
    """Base class of every energy term (the twin of one OpenMM Force).

    Subclasses set ``tables`` (a ``dict[str, ParameterTable]`` registered as an ``nn.ModuleDict``)
    in ``__init__`` and implement :meth:`forward`. ``force_index`` is the index of the twin force
    in its System and ``name`` the OpenMM class name, for reports.
    """

    openmm_class: str = ""
    derived_tables: tuple[str, ...] = ()
    """Tables whose entries the term recomputes from its other tables (e.g. NonbondedForce
    exceptions from particle parameters); parameter mapping does not bind them."""

    def __init__(self, force_index: int = -1):
        super().__init__()
        self.force_index = force_index
        self.tables = nn.ModuleDict()

    @property
    def name(self) -> str:
        return self.openmm_class or type(self).__name__

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None,
                sites: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    has_fused: bool = False
    """Whether :meth:`fused_energy` is implemented (see :mod:`.fused`)."""

    def fused_energy(self, positions: torch.Tensor, box: torch.Tensor | None,
                     sites: torch.Tensor | None = None) -> torch.Tensor:
        """The energy of :meth:`forward` (same arguments, kJ/mol), computed by fused kernels
        whose backward gives the forces and whose double backward gives Hessian-vector
        products and parameter VJPs. Only for terms with ``has_fused``."""
        raise NotImplementedError(f"{self.name} has no fused kernel; call it directly")

    def fused_fallback_reason(self) -> str:
        """Why a term of a family that has fused kernels cannot use them ("" otherwise; e.g. a
        custom expression calling a tabulated function)."""
        return ""


class UnsupportedForceError(ValueError):
    """An OpenMM force that the torch twin cannot represent."""
