"""Targets and composed losses: values by hand, gradients, reports and input errors."""

import numpy as np
import pytest
import torch

from openmm_reversible.errors import InputError
from openmm_reversible.losses import Loss, Target


def test_scalar_and_curve_terms_by_hand():
    hvap = torch.tensor(42.0, dtype=torch.float64, requires_grad=True)
    curve = torch.tensor([0.0, 1.5, 1.0, 0.5], dtype=torch.float64, requires_grad=True)
    reference = np.array([0.0, 2.0, 1.0, 1.0])
    loss = Loss([Target("hvap", 44.0, weight=0.5, units="kJ/mol"),
                 Target("rdf", reference, weight=2.0, kind="l1"),
                 Target("rdf", reference, kind="l2", name="rdf_l2")])
    total, report = loss.evaluate({"hvap": hvap, "rdf": curve})
    l1 = (0 + 0.5 + 0 + 0.5) / 4
    l2 = (0 + 0.25 + 0 + 0.25) / 4
    assert float(total.detach()) == pytest.approx(0.5 * 4.0 + 2.0 * l1 + l2, rel=1e-15)
    assert list(report) == ["hvap", "rdf", "rdf_l2"]
    assert report["hvap"].discrepancy == pytest.approx(4.0)
    assert report["rdf"].contribution == pytest.approx(2.0 * l1)
    assert sum(r.contribution for r in report.values()) == pytest.approx(float(total.detach()))
    np.testing.assert_array_equal(report["rdf"].value, curve.detach().numpy())
    assert str(report["hvap"]) == "hvap: 42 (target 44) kJ/mol, l2 4, loss 2"
    assert str(report["rdf"]).startswith("rdf: 4 points, l1 0.25")

    total.backward()
    assert float(hvap.grad) == pytest.approx(0.5 * 2 * (42.0 - 44.0))
    expected = 2.0 * np.sign(curve.detach().numpy() - reference) / 4 \
        + 2 * (curve.detach().numpy() - reference) / 4
    np.testing.assert_allclose(curve.grad.numpy(), expected, rtol=1e-15)


def test_callable_observables_receive_the_source():
    class Frames:
        positions = torch.arange(6.0, dtype=torch.float64).reshape(2, 1, 3)

    def mean_z(frames):
        return frames.positions[..., 2].mean()

    loss = Loss([Target(mean_z, 3.0), Target(lambda f: f.positions.sum(), 15.0, name="sum")])
    total, report = loss.evaluate(Frames())
    assert float(total) == pytest.approx((3.5 - 3.0) ** 2 + 0.0)
    assert list(report) == ["mean_z", "sum"]
    assert float(loss(Frames())) == float(total)


def test_input_errors():
    with pytest.raises(InputError, match="kind must be one of"):
        Target("x", 1.0, kind="huber")
    with pytest.raises(InputError, match="weight must be a finite number >= 0"):
        Target("x", 1.0, weight=-1.0)
    with pytest.raises(InputError, match="reference must be finite"):
        Target("x", [1.0, float("nan")])
    with pytest.raises(InputError, match="must be a name or a function"):
        Target(3, 1.0)
    with pytest.raises(InputError, match="repeated: \\['x'\\]"):
        Loss([Target("x", 1.0), Target("x", 2.0)])
    with pytest.raises(InputError, match="at least one Target"):
        Loss([])
    loss = Loss([Target("x", [1.0, 2.0])])
    with pytest.raises(InputError, match="no observable 'x' among the computed values \\['y'\\]"):
        loss({"y": torch.zeros(2)})
    with pytest.raises(InputError, match="shape \\(3,\\) but the reference has shape \\(2,\\)"):
        loss({"x": torch.zeros(3)})
    with pytest.raises(InputError, match="must be evaluated on a mapping"):
        loss(torch.zeros(2))
