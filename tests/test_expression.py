"""Lepton expressions compiled to torch, checked against OpenMM's own evaluation.

OpenMM evaluates an expression as the energy of a two-particle ``CustomNonbondedForce``
(NoCutoff) at distance ``r``, every other variable a global parameter set in the Context; the
force on the second particle gives dE/dr. The torch twin must give the same values (relative
1e-12) and derivatives (autograd against OpenMM's symbolic derivative).
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
import torch

from openmm_reversible.errors import InputError
from openmm_reversible.potential.expression import (
    DiscreteFunction,
    Expression,
    ExpressionError,
    SplineFunction,
    free_variables,
    parse,
    spline_slope_matrix,
    tabulated_function,
)

R_POINTS = np.array([0.23, 0.37, 0.5, 0.51, 0.66, 0.79, 0.93, 1.07])


def lepton(expression: str, points: dict[str, np.ndarray],
           functions: dict[str, openmm.TabulatedFunction] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """OpenMM's energy and dE/dr of ``expression`` at each point (``points["r"]`` and the
    other variables, which become global parameters)."""
    force = openmm.CustomNonbondedForce(expression)
    names = [name for name in points if name != "r"]
    for name in names:
        force.addGlobalParameter(name, 0.0)
    for name, function in (functions or {}).items():
        force.addTabulatedFunction(name, function)
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
        force.addParticle([])
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    energies, slopes = [], []
    for k, r in enumerate(points["r"]):
        for name in names:
            context.setParameter(name, float(points[name][k]))
        context.setPositions([openmm.Vec3(0, 0, 0), openmm.Vec3(float(r), 0, 0)])
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy()._value)
        slopes.append(-state.getForces(asNumpy=True)._value[1, 0])
    return np.array(energies), np.array(slopes)


def twin(expression: str, points: dict[str, np.ndarray],
         functions: dict[str, openmm.TabulatedFunction] | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """The torch expression's values and dE/dr at the same points."""
    compiled = Expression(expression, {k: tabulated_function(f)
                                       for k, f in (functions or {}).items()})
    env = {k: torch.tensor(v, dtype=torch.float64) for k, v in points.items()}
    env["r"].requires_grad_(True)
    value = compiled(env)
    (slope,) = torch.autograd.grad(value.sum(), env["r"])
    return value.detach().numpy(), slope.numpy()


def assert_matches_lepton(expression: str, points: dict[str, np.ndarray],
                          functions=None, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    # The twin first: OpenMM's force takes ownership of the function objects (and frees them).
    e, de = twin(expression, points, functions)
    e_ref, de_ref = lepton(expression, points, functions)
    np.testing.assert_allclose(e, e_ref, rtol=rtol, atol=atol, err_msg=f"value of {expression}")
    np.testing.assert_allclose(de, de_ref, rtol=max(rtol, 1e-10), atol=max(atol, 1e-10),
                               err_msg=f"dE/dr of {expression}")


BUILTIN_CASES = [
    "sqrt(r)+exp(-r)+log(r)",
    "sin(r)*cos(r)+tan(r/3)",
    "sec(r)+csc(r)+cot(r)",
    "asin(r/2)+acos(r/2)+atan(r)+atan2(r, 0.5)",
    "sinh(r)+cosh(r)+tanh(r)",
    "erf(r)+erfc(2*r)",
    "step(r-0.6)*r + delta(r-0.5) + select(step(r-0.7), r^2, -r) + step(r-0.5)",
    "square(r)+cube(r)+recip(r)",
    "min(r, 0.6)+max(r^2, 0.4)+abs(r-0.65)",
    "floor(3*r)+ceil(2*r)*r",
    # precedence and associativity: -x^2 = -(x^2), right-associative ^, left-associative / and -
    "-r^2 + 2^-r*3 - r/2/3 - 1-r + 2^r^2 + (-r)^2*-1",
    "1e-1*r + .5*r^2 + 5.*r^3 + 1E+0*r + 2.5e1",
    # definitions: a later definition may be used by an earlier one
    "a*b + c; a=r+c; b=c*2; c=0.5*r",
]


@pytest.mark.parametrize("expression", BUILTIN_CASES)
def test_builtins_match_lepton(expression):
    assert_matches_lepton(expression, {"r": R_POINTS})


def test_global_parameters_and_names_that_are_also_functions():
    points = {"r": R_POINTS, "k": np.linspace(0.5, 2.0, R_POINTS.size),
              "delta": np.full(R_POINTS.size, 0.07), "n": np.full(R_POINTS.size, 7.5)}
    expression = "k*((1+delta)/(r+delta))^n + delta(r-0.5)"
    assert_matches_lepton(expression, points)
    assert free_variables(parse(expression)) == {"k", "delta", "n", "r"}


def test_constants_are_folded_and_constant_expressions_broadcast():
    node = parse("2^(1/6)*sqrt(4)")
    assert node.value == pytest.approx(2.0 * 2 ** (1 / 6), rel=1e-15)
    value = Expression("3; unused=r")({"r": torch.ones(4, dtype=torch.float64)})
    assert value.shape == () and float(value) == 3.0


def test_shared_definition_is_evaluated_once():
    calls = []

    class Counting(DiscreteFunction):
        def forward(self, *args):
            calls.append(1)
            return super().forward(*args)

    expression = Expression("t*t + t; t=f(r)", {"f": Counting([1.0, 2.0, 3.0], (3,))})
    value = expression({"r": torch.tensor([0.0, 1.2, 7.0], dtype=torch.float64)})
    assert value.tolist() == [2.0, 6.0, 12.0]
    assert len(calls) == 1


def test_second_derivatives_exist():
    lj = Expression("4*eps*((sig/r)^12-(sig/r)^6); sig=0.5*(s1+s2); eps=sqrt(e1*e2)")
    inputs = tuple(torch.tensor(v, dtype=torch.float64, requires_grad=True)
                   for v in ([0.33, 0.4, 0.71], [0.3, 0.31, 0.33], [0.32, 0.3, 0.34],
                             [0.4, 0.5, 0.6], [0.45, 0.5, 0.3]))

    def f(r, s1, s2, e1, e2):
        return lj({"r": r, "s1": s1, "s2": s2, "e1": e1, "e2": e2})

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


SINGULAR = ("sqrt(e1*e2)*r + (e1*e2)^0.5 + (e1*e2)^1.5/r + exp(-b*r) + (e2*r)^n"
            " + recip(1/e2); b=2/(1/b1+1/b2)")
"""Combining rules at points where plain torch derivatives are 0·∞ or 0/0: ``e2 = 0`` (a zero
well depth), ``b2 = 0`` (a zero Buckingham exponent)."""


def test_singular_points_match_lepton_with_finite_derivatives_of_every_order():
    n = R_POINTS.size
    points = {"r": R_POINTS, "e1": np.linspace(0.2, 0.9, n), "e2": np.zeros(n),
              "b1": np.linspace(30.0, 40.0, n), "b2": np.zeros(n), "n": np.full(n, 2.5)}
    assert_matches_lepton(SINGULAR, points)
    # OpenMM's own dE/dr of atan2(0, 0) is NaN; its value is 0, as here.
    np.testing.assert_array_equal(twin("atan2(e2*r, e2)", points)[0],
                                  lepton("atan2(e2*r, e2)", points)[0])
    compiled = Expression("atan2(e2*r, e2) + " + SINGULAR)
    env = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in points.items()}
    value = compiled(env).sum()
    names = ["r", "e1", "e2", "b1", "b2", "n"]
    first = torch.autograd.grad(value, [env[k] for k in names], create_graph=True)
    for name, g in zip(names, first, strict=True):
        assert torch.isfinite(g).all(), name
        for h in torch.autograd.grad(g.sum(), [env[k] for k in names], retain_graph=True,
                                     allow_unused=True):
            assert h is None or torch.isfinite(h).all(), name
    # The limits: nothing here depends on e1, b1 or n while e2 = b2 = 0.
    for name in ("e1", "b1", "n"):
        assert float(first[names.index(name)].detach().abs().max()) == 0.0, name


def test_powers_of_negative_bases_and_zero_keep_their_derivatives():
    r = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64, requires_grad=True)
    n = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    value = Expression("(r-0.6)^2 + (r-0.6)^n + (r-0.6)^1")({"r": r, "n": n})
    (dr,) = torch.autograd.grad(value.sum(), r, create_graph=True)
    (d2r,) = torch.autograd.grad(dr.sum(), r)
    x = r.detach() - 0.6
    assert torch.allclose(value.detach(), x**2 + x**3 + x, rtol=1e-15)
    # x = 0 exactly at r = 0.6: 2x + 1 and 2 are exact there for constant integer exponents.
    assert torch.allclose(dr.detach()[[0, 2]], (2 * x + 3 * x**2 + 1)[[0, 2]], rtol=1e-15)
    assert float(dr[1].detach()) == pytest.approx(1.0, abs=1e-12)
    assert float(d2r[1]) == pytest.approx(2.0, abs=1e-12)
    (dn,) = torch.autograd.grad(Expression("(r-0.6)^n")({"r": r, "n": n}).sum(), n)
    assert math.isfinite(float(dn))


@pytest.mark.parametrize(("text", "message"), [
    ("foo(r)", "unknown function: foo"),
    ("sqrt(r, 2)", "wrong number of arguments to function sqrt: 2 given, 1 expected"),
    ("(r+1", "unbalanced parentheses"),
    ("r+1)", "unexpected text at end of expression: )"),
    ("r; =2", "subexpression does not specify a name"),
    ("r*", "unexpected end of expression"),
    ("sqrt (r)", "unexpected text at end of expression: ("),
])
def test_parse_errors_name_the_problem(text, message):
    with pytest.raises(ExpressionError, match="Parse error in expression") as error:
        parse(text)
    assert message in str(error.value)
    assert isinstance(error.value, InputError)


def test_undefined_variable_is_reported():
    with pytest.raises(ExpressionError, match="undefined variable.*sigma2"):
        Expression("sigma1*sigma2/r")({"r": torch.ones(2), "sigma1": torch.ones(2)})


# --------------------------------------------------------------------------- tabulated functions


def _grid(*sizes: int) -> np.ndarray:
    """Smooth, non-symmetric samples in OpenMM order (x fastest)."""
    axes = np.meshgrid(*[np.linspace(0.0, 1.0, n) for n in sizes], indexing="ij")
    values = np.sin(3.1 * axes[0] + 0.4) + sum((k + 1) * a**2 * axes[0] for k, a in
                                               enumerate(axes[1:]))
    return values.ravel(order="F")


def _periodic_grid(*sizes: int) -> np.ndarray:
    axes = np.meshgrid(*[np.linspace(0.0, 2 * math.pi, n) for n in sizes], indexing="ij")
    values = np.sin(axes[0] + 0.3) + sum(np.cos((k + 2) * a + 0.1 * k) * np.sin(axes[0])
                                         for k, a in enumerate(axes[1:]))
    return values.ravel(order="F")


def test_continuous_1d_natural_and_periodic_match_openmm():
    rng = np.random.default_rng(1)
    r = np.concatenate([rng.uniform(0.2, 1.3, 25), [0.25, 0.3, 1.2, 1.25]])  # in and out of range
    natural = openmm.Continuous1DFunction(list(_grid(11) * 3.0), 0.25, 1.2)
    assert_matches_lepton("f(r)", {"r": r}, {"f": natural})
    theta = _periodic_grid(13)
    theta[-1] = theta[0]
    periodic = openmm.Continuous1DFunction(list(theta), 0.3, 0.9, True)
    assert_matches_lepton("f(r)", {"r": r}, {"f": periodic})
    two_point = openmm.Continuous1DFunction([1.0, 3.0], 0.2, 1.4)
    assert_matches_lepton("f(r)", {"r": r}, {"f": two_point})


@pytest.mark.parametrize("periodic", [False, True])
def test_continuous_2d_and_3d_match_openmm(periodic):
    rng = np.random.default_rng(2)
    n = 40
    points = {"r": rng.uniform(0.2, 1.3, n), "a": rng.uniform(-0.2, 2.3, n),
              "b": rng.uniform(-0.5, 1.6, n)}
    grid = _periodic_grid if periodic else _grid
    f2 = openmm.Continuous2DFunction(7, 5, list(grid(7, 5)), 0.25, 1.2, 0.0, 2.0, periodic)
    f3 = openmm.Continuous3DFunction(6, 5, 4, list(grid(6, 5, 4)), 0.25, 1.2, 0.0, 2.0,
                                     -0.3, 1.4, periodic)
    assert_matches_lepton("g(r, a) + h(r, a, b)", points, {"g": f2, "h": f3})


def test_discrete_functions_round_half_away_from_zero_and_clamp():
    indices = np.array([-1.5, -0.5, -0.49, 0.49, 0.5, 1.5, 2.5, 2.51, 7.0])
    n = indices.size
    points = {"r": np.full(n, 0.5), "a": indices, "b": indices[::-1].copy(),
              "c": np.roll(indices, 3)}
    functions = {"d1": openmm.Discrete1DFunction([1.0, -2.0, 3.5, 4.25]),
                 "d2": openmm.Discrete2DFunction(3, 4, list(np.arange(12.0) ** 1.5)),
                 "d3": openmm.Discrete3DFunction(2, 3, 4, list(np.cos(np.arange(24.0))))}
    assert_matches_lepton("r*(d1(a) + 10*d2(a, b) + 100*d3(b, c, a))", points, functions)


def test_spline_slopes_are_exact_for_linear_and_periodic_constants():
    x = np.linspace(0.0, 2.0, 9)
    natural = spline_slope_matrix(9, 0.25, periodic=False)
    np.testing.assert_allclose(natural @ (3.0 * x - 1.0), np.full(9, 3.0), rtol=1e-13)
    periodic = spline_slope_matrix(9, 0.25, periodic=True)
    np.testing.assert_allclose(periodic @ np.full(9, 2.0), np.zeros(9), atol=1e-12)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: SplineFunction([1.0, 2.0, 3.0], (3,), (0.0,), (1.0,), periodic=True),
     "first and last samples"),
    (lambda: SplineFunction([1.0], (1,), (0.0,), (1.0,)), "at least 2 samples"),
    (lambda: SplineFunction([1.0, 2.0], (2,), (1.0,), (1.0,)), "max > min"),
    (lambda: DiscreteFunction([1.0, 2.0, 3.0], (2, 2)), "needs 4 values"),
])
def test_bad_tables_are_rejected(make, message):
    with pytest.raises(InputError, match=message):
        make()
