"""Priors, bounds and frozen parameters: what a fit may do to each trainable parameter.

ForceBalance's regularisation, on a :class:`~openmm_reversible.parameters.ParameterSet`:

- **prior width** ``w`` (the parameter's own units): the loss gains ``((p − p₀)/w)²``, so
  moving a parameter by one width from its start costs as much as a loss term of weight 1 off
  by its tolerance. Narrow widths keep poorly determined parameters near their start;
- **bounds** ``lower <= p <= upper`` (units of ``p``): after every optimiser step the parameter
  is put back into its interval (a projection, not a penalty);
- **frozen**: tagged (so it is exported and its key is stable) but never moved: its gradient
  is zeroed before every step.

The penalty is differentiable in ``parameters.scaled``; :meth:`Regularization.mask` and
:meth:`Regularization.project` act on the scaled variables in place.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .errors import InputError
from .parameters import ParameterSet


@dataclass(frozen=True)
class ParameterRule:
    """What a fit may do to one trainable parameter.

    Attributes
    ----------
    key : str
        Site key, e.g. ``"Atom/sigma/tip3p-O"``.
    prior_width : float, optional
        Width of the L2 prior, in the parameter's units (> 0).
    lower, upper : float, optional
        Hard bounds, in the parameter's units.
    frozen : bool
        Tagged but never moved.
    """

    key: str
    prior_width: float | None = None
    lower: float | None = None
    upper: float | None = None
    frozen: bool = False


class Regularization:
    """The rules of a fit, bound to its ParameterSet.

    Parameters
    ----------
    parameters : ParameterSet
        The trainable parameters; their current values are the priors' centres.
    rules : iterable of ParameterRule

    Raises
    ------
    InputError
        For a key that is not a trainable site (naming the closest one), a duplicate rule, a
        width <= 0, ``lower >= upper`` or a start value outside its bounds.
    """

    def __init__(self, parameters: ParameterSet, rules: Iterable[ParameterRule]):
        self.parameters = parameters
        keys = parameters.trainable_keys
        position = {k: j for j, k in enumerate(keys)}
        with torch.no_grad():
            start = self.parameters.trainable_values().clone()
        self.rules = list(rules)
        seen: set[str] = set()
        prior, widths, frozen = [], [], []
        lower = torch.full_like(start, -torch.inf)
        upper = torch.full_like(start, torch.inf)
        for rule in self.rules:
            where = f"parameters[key={rule.key!r}]"
            if rule.key not in position:
                close = difflib.get_close_matches(rule.key, keys, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"trainable: {', '.join(keys)}"
                raise InputError(f"{where}: no trainable parameter has this key; {hint}")
            if rule.key in seen:
                raise InputError(f"{where}: given twice; merge the two entries")
            seen.add(rule.key)
            j = position[rule.key]
            if rule.prior_width is not None:
                if not rule.prior_width > 0:
                    raise InputError(f"{where}.prior_width = {rule.prior_width}: must be > 0")
                prior.append(j)
                widths.append(rule.prior_width)
            if rule.lower is not None and rule.upper is not None and not rule.lower < rule.upper:
                raise InputError(f"{where}: lower = {rule.lower} must be below upper = "
                                 f"{rule.upper}")
            value = float(start[j])
            if (rule.lower is not None and value < rule.lower) or (
                    rule.upper is not None and value > rule.upper):
                raise InputError(f"{where}: the start value {value:g} is outside "
                                 f"[{rule.lower}, {rule.upper}]; widen the bounds or change "
                                 "the start in the XML")
            if rule.lower is not None:
                lower[j] = rule.lower
            if rule.upper is not None:
                upper[j] = rule.upper
            if rule.frozen:
                frozen.append(j)
        self._start = start
        self._prior = torch.tensor(prior, dtype=torch.long)
        self._widths = torch.tensor(widths, dtype=start.dtype)
        self._frozen = torch.tensor(frozen, dtype=torch.long)
        self._lower, self._upper = lower, upper

    def penalty(self) -> torch.Tensor:
        """``Σ ((p − p₀)/w)²`` over the parameters with a prior width (0-dim tensor)."""
        if not self._prior.numel():
            return self.parameters.scaled.new_zeros(())
        delta = self.parameters.trainable_values()[self._prior] - self._start[self._prior]
        return ((delta / self._widths) ** 2).sum()

    def mask(self, grad: torch.Tensor) -> None:
        """Zero the gradient of the frozen parameters, in place."""
        if self._frozen.numel():
            grad[self._frozen] = 0.0

    @torch.no_grad()
    def project(self) -> None:
        """Put every bounded parameter back into its interval (in place, on ``scaled``)."""
        p = self.parameters
        values = p.trainable_values()
        outside = (values < self._lower) | (values > self._upper)
        if bool(outside.any()):
            clamped = torch.minimum(torch.maximum(values, self._lower), self._upper)
            p.scaled.copy_(torch.where(outside, p.scaled_for(clamped), p.scaled))
