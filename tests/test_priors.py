"""Priors, bounds and frozen parameters on a real ParameterSet (tagged flexible TIP3P)."""

from __future__ import annotations

import os

import openmm.app as app
import pytest
import torch

from openmm_reversible.errors import InputError
from openmm_reversible.parameters import ParameterSet
from openmm_reversible.priors import ParameterRule, Regularization

XML = os.path.join(os.path.dirname(__file__), "data", "tip3p_flexible.xml")


@pytest.fixture
def parameters():
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=8,
                        neutralize=False)
    return ParameterSet.from_forcefield(XML, modeller.topology, nonbondedMethod=app.NoCutoff,
                                        constraints=None, rigidWater=False)


def test_penalty_is_the_squared_move_in_widths(parameters):
    reg = Regularization(parameters, [ParameterRule("Atom/sigma/tip3p-O", prior_width=0.01),
                                      ParameterRule("Atom/charge/tip3p-O", prior_width=0.1)])
    assert float(reg.penalty().detach()) == 0.0
    start = parameters.values()
    parameters.set_values({"Atom/sigma/tip3p-O": start["Atom/sigma/tip3p-O"] + 0.02,
                           "Atom/charge/tip3p-O": start["Atom/charge/tip3p-O"] - 0.05})
    assert float(reg.penalty().detach()) == pytest.approx(2.0 ** 2 + 0.5 ** 2, rel=1e-9)
    # Its gradient in the scaled variables: 2 (Δ/w²) · start (the chain rule of value = p0·s).
    parameters.scaled.grad = None
    reg.penalty().backward()
    j = parameters.trainable_keys.index("Atom/sigma/tip3p-O")
    expected = 2 * 0.02 / 0.01 ** 2 * start["Atom/sigma/tip3p-O"]
    assert float(parameters.scaled.grad[j]) == pytest.approx(expected, rel=1e-7)
    untouched = parameters.trainable_keys.index("Bond/k/OW.HW")
    assert float(parameters.scaled.grad[untouched]) == 0.0


def test_bounds_project_and_frozen_mask(parameters):
    key = "Atom/sigma/tip3p-O"
    start = parameters.values()[key]
    reg = Regularization(parameters, [ParameterRule(key, lower=start - 0.001,
                                                    upper=start + 0.002),
                                      ParameterRule("Bond/k/OW.HW", frozen=True)])
    before = parameters.scaled.detach().clone()
    parameters.set_values({key: start + 0.01})
    reg.project()
    assert parameters.values()[key] == pytest.approx(start + 0.002, rel=1e-12)
    others = [j for j, k in enumerate(parameters.trainable_keys) if k != key]
    assert torch.equal(parameters.scaled.detach()[others], before[others])  # bit for bit
    grad = torch.ones_like(parameters.scaled)
    reg.mask(grad)
    frozen = parameters.trainable_keys.index("Bond/k/OW.HW")
    assert float(grad[frozen]) == 0.0 and float(grad.sum()) == len(grad) - 1


@pytest.mark.parametrize("rule, message", [
    (ParameterRule("Atom/sigma/tip3p-Q", prior_width=0.1),
     "no trainable parameter has this key; did you mean 'Atom/sigma/tip3p-O'?"),
    (ParameterRule("Atom/sigma/tip3p-O", prior_width=0.0), "prior_width = 0.0: must be > 0"),
    (ParameterRule("Atom/sigma/tip3p-O", lower=0.4, upper=0.3), "must be below upper"),
    (ParameterRule("Atom/sigma/tip3p-O", lower=0.4), "start value 0.315.* is outside"),
])
def test_bad_rules_are_named(parameters, rule, message):
    with pytest.raises(InputError, match=message):
        Regularization(parameters, [rule])
    with pytest.raises(InputError, match="given twice"):
        Regularization(parameters, [ParameterRule("Bond/k/OW.HW", frozen=True)] * 2)
