"""Targets and the composed training loss.

A :class:`Target` says what an observable should be: the observable (a name or a function),
the reference value or curve, a weight, the units (for reports) and the kind of discrepancy:

- ``"l2"``: mean over elements of (value - reference)²  (a scalar: its square error);
- ``"l1"``: mean over elements of |value - reference|   (for curves such as an RDF on a grid:
  the mean absolute deviation over the grid points).

:class:`Loss` sums ``weight × discrepancy`` over its targets and can report every term for
logging. It is evaluated on a *source*: a mapping ``{name: tensor}`` of observables the caller
has computed (targets that name their observable look it up there), or any object (e.g. a
:class:`~openmm_reversible.trajectory.Trajectory`) handed to targets whose observable is a
function::

    loss = Loss([
        Target("hvap", 44.0, weight=1.0, units="kJ/mol"),
        Target(lambda traj: rdf(traj.positions, traj.box, oo, r_range=(0.2, 0.9))[1],
               g_oo_experiment, kind="l1", name="rdf_OO"),
    ])

Where the reference comes from (experiment, a grid to interpolate onto) is the caller's job:
curves must already be on the observable's grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .units import DTYPE

KINDS = ("l2", "l1")


@dataclass(frozen=True)
class Target:
    """One term of a loss: an observable, its reference and how to compare them.

    Parameters
    ----------
    observable : str or callable
        Name of an entry of the mapping the loss is evaluated on, or a function
        ``observable(source) -> torch.Tensor`` of whatever the loss is evaluated on.
    reference : float or array-like
        Target value (scalar) or curve (same shape as the observable's value), in the
        observable's units.
    weight : float, default 1.0
        Non-negative multiplier of the discrepancy.
    units : str, optional
        Units of the observable and reference, for reports only (e.g. ``"kJ/mol"``).
    kind : {"l2", "l1"}, default "l2"
        Mean squared or mean absolute difference over the elements.
    name : str, optional
        Label in reports; default: ``observable`` if it is a string, else the function name.
    """

    observable: str | Callable[[Any], torch.Tensor]
    reference: Any
    weight: float = 1.0
    units: str = ""
    kind: str = "l2"
    name: str | None = None
    reference_tensor: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not (isinstance(self.observable, str) or callable(self.observable)):
            raise InputError(f"Target observable must be a name or a function, got "
                             f"{type(self.observable).__name__}")
        name = self.name
        if name is None:
            name = self.observable if isinstance(self.observable, str) else getattr(
                self.observable, "__name__", "observable")
        object.__setattr__(self, "name", name)
        if self.kind not in KINDS:
            raise InputError(f"Target {name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise InputError(f"Target {name!r}: weight must be a finite number >= 0, got "
                             f"{self.weight!r}")
        reference = torch.as_tensor(np.asarray(
            self.reference.detach().cpu() if isinstance(self.reference, torch.Tensor)
            else self.reference, dtype=float), dtype=DTYPE)
        if reference.numel() == 0 or not torch.isfinite(reference).all():
            raise InputError(f"Target {name!r}: reference must be finite and non-empty")
        object.__setattr__(self, "reference_tensor", reference)

    def value(self, source) -> torch.Tensor:
        """The observable's current value, computed from or looked up in ``source``."""
        if callable(self.observable):
            value = self.observable(source)
        elif isinstance(source, Mapping):
            if self.observable not in source:
                raise InputError(f"Target {self.name!r}: no observable {self.observable!r} "
                                 f"among the computed values {sorted(source)}")
            value = source[self.observable]
        else:
            raise InputError(f"Target {self.name!r} names its observable "
                             f"({self.observable!r}), so the loss must be evaluated on a "
                             f"mapping of observable values, got {type(source).__name__}")
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value, dtype=DTYPE)
        return value

    def discrepancy(self, value: torch.Tensor) -> torch.Tensor:
        """Mean squared (``l2``) or absolute (``l1``) difference from the reference, 0-dim."""
        reference = self.reference_tensor.to(value.dtype).to(value.device)
        if value.shape != reference.shape and value.numel() != reference.numel():
            raise InputError(f"Target {self.name!r}: observable has shape "
                             f"{tuple(value.shape)} but the reference has shape "
                             f"{tuple(reference.shape)}; put the reference on the "
                             f"observable's grid")
        difference = value.reshape(reference.shape) - reference
        if self.kind == "l2":
            return (difference ** 2).mean()
        return difference.abs().mean()


@dataclass(frozen=True)
class TermReport:
    """One target's state, for logs (plain numbers, detached from the graph).

    Attributes
    ----------
    name : str
    value : numpy.ndarray
        Current value of the observable.
    reference : numpy.ndarray
    units : str
    kind : str
    discrepancy : float
        Unweighted mean squared / absolute difference.
    contribution : float
        ``weight × discrepancy``, this term's share of the loss.
    """

    name: str
    value: np.ndarray
    reference: np.ndarray
    units: str
    kind: str
    discrepancy: float
    contribution: float

    def __str__(self) -> str:
        if self.value.size == 1:
            shown = (f"{float(self.value.reshape(())):.6g} (target "
                     f"{float(self.reference.reshape(())):.6g}) {self.units}").rstrip()
        else:
            shown = f"{self.value.size} points"
        return (f"{self.name}: {shown}, {self.kind} {self.discrepancy:.4g}, "
                f"loss {self.contribution:.4g}")


class Loss:
    """Weighted sum of target discrepancies.

    Parameters
    ----------
    targets : sequence of Target
        Terms of the loss; their names must be unique.

    Examples
    --------
    >>> loss = Loss([Target("hvap", 44.0, units="kJ/mol"), Target("density", 0.997, 100.0)])
    >>> total, report = loss.evaluate({"hvap": hvap, "density": rho})
    >>> total.backward(); print(*report.values(), sep="\\n")
    """

    def __init__(self, targets: Sequence[Target]):
        targets = list(targets)
        if not targets:
            raise InputError("Loss needs at least one Target")
        for t in targets:
            if not isinstance(t, Target):
                raise InputError(f"Loss takes Target objects, got {type(t).__name__}")
        names = [t.name for t in targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputError(f"Target names must be unique, repeated: {duplicates}; pass "
                             f"name=... to tell them apart")
        self.targets = targets

    def evaluate(self, source) -> tuple[torch.Tensor, dict[str, TermReport]]:
        """Total loss (0-dim tensor, differentiable) and a report of every term.

        Parameters
        ----------
        source : mapping of str to torch.Tensor, or any object
            Looked up by targets that name their observable; passed to those with a function.
        """
        total = None
        report: dict[str, TermReport] = {}
        for target in self.targets:
            value = target.value(source)
            discrepancy = target.discrepancy(value)
            term = target.weight * discrepancy
            total = term if total is None else total + term
            report[target.name] = TermReport(
                name=target.name, value=value.detach().cpu().numpy().copy(),
                reference=target.reference_tensor.numpy().copy(), units=target.units,
                kind=target.kind, discrepancy=float(discrepancy.detach()),
                contribution=float(term.detach()))
        return total, report

    def __call__(self, source) -> torch.Tensor:
        """Total loss, 0-dim tensor (see :meth:`evaluate`)."""
        return self.evaluate(source)[0]
