"""OpenMM's Lepton expressions compiled to torch.

Every ``Custom*Force`` of OpenMM describes its energy with a string in the syntax of Lepton,
OpenMM's expression library: ``+ - * / ^`` (``^`` binds tightest and associates to the right,
unary minus binds tighter than ``*`` but looser than ``^``, so ``-x^2 = -(x^2)``), parentheses,
numbers in any float syntax, the functions of :data:`BUILTINS`, calls of tabulated functions
(``table(r)``) and ``;``-separated definitions::

    4*eps*((sig/r)^12-(sig/r)^6); sig=0.5*(sigma1+sigma2); eps=sqrt(epsilon1*epsilon2)

Definitions are substituted into the expression while parsing, exactly as Lepton does: they
are read from the last one backwards, so a definition may use the ones *after* it; a name
with no definition is a free variable.

:class:`Expression` parses such a string once into a tree and evaluates it on tensors with
torch operations, so autograd differentiates it (twice where the mathematics allows).
Piecewise functions follow Lepton's values: ``step(x)`` is 1 for ``x >= 0`` and 0 otherwise,
``delta(x)`` is 1 only at 0, ``select(x, y, z)`` is ``y`` if ``x != 0`` else ``z``; their
derivatives with respect to their arguments are zero (``select`` passes the derivative of the
branch it picks), as in OpenMM.

Tabulated functions (:class:`SplineFunction`, :class:`DiscreteFunction`, built from OpenMM's
objects by :func:`tabulated_function`) reproduce OpenMM's Reference platform: continuous
functions are cubic splines through uniformly spaced samples (natural or periodic along each
axis), evaluated as tensor-product cubic Hermite patches whose knot derivatives come from
those splines (the same patches OpenMM's bicubic and tricubic coefficients describe), and are
zero outside their range unless periodic; discrete functions look up the sample at the
argument rounded to the nearest integer (half away from zero), clamped to the table.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import openmm
import torch
from torch import nn

from ..errors import InputError
from ..safe_math import safe_atan2, safe_div, safe_pow, safe_sqrt
from ..units import DTYPE


class ExpressionError(InputError):
    """An energy expression that cannot be parsed or evaluated (bad syntax, unknown names)."""


# --------------------------------------------------------------------------- functions


def _step(x: torch.Tensor) -> torch.Tensor:
    return (x >= 0).to(x.dtype)


def _delta(x: torch.Tensor) -> torch.Tensor:
    return (x == 0).to(x.dtype)


def _select(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.where(x != 0, y, z)


BUILTINS: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
    "sqrt": (1, safe_sqrt),
    "exp": (1, torch.exp),
    "log": (1, torch.log),
    "sin": (1, torch.sin),
    "cos": (1, torch.cos),
    "sec": (1, lambda x: safe_div(1.0, torch.cos(x))),
    "csc": (1, lambda x: safe_div(1.0, torch.sin(x))),
    "tan": (1, torch.tan),
    "cot": (1, lambda x: safe_div(1.0, torch.tan(x))),
    "asin": (1, torch.asin),
    "acos": (1, torch.acos),
    "atan": (1, torch.atan),
    "atan2": (2, safe_atan2),
    "sinh": (1, torch.sinh),
    "cosh": (1, torch.cosh),
    "tanh": (1, torch.tanh),
    "erf": (1, torch.special.erf),
    "erfc": (1, torch.special.erfc),
    "step": (1, _step),
    "delta": (1, _delta),
    "square": (1, lambda x: x * x),
    "cube": (1, lambda x: x * x * x),
    "recip": (1, lambda x: safe_div(1.0, x)),
    "min": (2, torch.minimum),
    "max": (2, torch.maximum),
    "abs": (1, torch.abs),
    "floor": (1, torch.floor),
    "ceil": (1, torch.ceil),
    "select": (3, _select),
}
"""Lepton's built-in functions: name → (number of arguments, torch implementation).

Square roots, powers, divisions (``/``, ``recip``, ``sec``, ``csc``, ``cot``) and ``atan2`` are
those of :mod:`openmm_reversible.safe_math`: Lepton's values, with derivatives of every order
finite wherever the value is (``sqrt(epsilon1*epsilon2)`` with ``epsilon2 = 0`` has derivative 0
with respect to ``epsilon1``, not NaN). Not covered: an infinite intermediate that meets a
parameter in a product (``exp(-alpha*r/rm)`` with ``rm = 0``: ``d/dalpha`` is ``∞·0``), and
``asin``/``acos`` at ±1, whose derivatives are infinite; the trainer stops on such a gradient
and names the force."""

_OPERATORS: dict[str, Callable] = {"+": operator.add, "-": operator.sub, "*": operator.mul,
                                   "/": safe_div, "^": safe_pow}
_PRECEDENCE = {"+": 0, "-": 0, "*": 1, "/": 1, "^": 3}
_RIGHT_ASSOCIATIVE = {"^"}
_NEGATE_PRECEDENCE = 2
_NEGATE = "neg"


# --------------------------------------------------------------------------- syntax tree


@dataclass(eq=False, frozen=True)
class Number:
    """A constant."""

    value: float


@dataclass(eq=False, frozen=True)
class Name:
    """A free variable, bound at evaluation time."""

    name: str


@dataclass(eq=False, frozen=True)
class Call:
    """An operator (``+ - * / ^``, ``neg``), a built-in or a tabulated function applied to
    its arguments. A definition used twice is the same node twice (evaluated once)."""

    function: str
    args: tuple


Node = Number | Name | Call


@dataclass(frozen=True)
class _Token:
    text: str
    kind: str  # number, operator, variable, function, "(", ")", ","


def _tokenize(text: str) -> list[_Token]:
    """Split ``text`` into tokens with Lepton's rules (a name directly followed by ``(`` is a
    function call; a name runs until an operator, comma, parenthesis or blank)."""
    tokens = []
    pos = 0
    n = len(text)
    while pos < n:
        c = text[pos]
        if c.isspace():
            pos += 1
            continue
        if c in "(),":
            tokens.append(_Token(c, c))
            pos += 1
        elif c in _OPERATORS:
            tokens.append(_Token(c, "operator"))
            pos += 1
        elif c == "." or c.isdigit():
            end = pos + 1
            seen_dot, seen_exp = c == ".", False
            while end < n:
                d = text[end]
                if d.isdigit():
                    end += 1
                elif d == "." and not seen_dot:
                    seen_dot = True
                    end += 1
                elif d in "eE" and not seen_exp:
                    seen_exp = True
                    end += 2 if end + 1 < n and text[end + 1] in "+-" else 1
                else:
                    break
            tokens.append(_Token(text[pos:end], "number"))
            pos = end
        else:
            end = pos
            while end < n and not (text[end] in _OPERATORS or text[end] in ",)("
                                   or text[end].isspace()):
                end += 1
            if end < n and text[end] == "(":
                tokens.append(_Token(text[pos:end], "function"))
                end += 1
            else:
                tokens.append(_Token(text[pos:end], "variable"))
            pos = end
    return tokens


class _Parser:
    """Precedence-climbing parser of one (sub)expression, Lepton's grammar."""

    def __init__(self, tokens: list[_Token], definitions: Mapping[str, Node],
                 functions: Mapping[str, int]):
        self.tokens = tokens
        self.pos = 0
        self.definitions = definitions
        self.functions = functions

    def parse(self) -> Node:
        node = self._expression(0)
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected text at end of expression: "
                                  f"{self.tokens[self.pos].text}")
        return node

    def _expression(self, precedence: int) -> Node:
        if self.pos == len(self.tokens):
            raise ExpressionError("unexpected end of expression")
        token = self.tokens[self.pos]
        self.pos += 1
        if token.kind == "number":
            try:
                node = Number(float(token.text))
            except ValueError:
                raise ExpressionError(f"malformed number {token.text!r}") from None
        elif token.kind == "variable":
            node = self.definitions[token.text] if token.text in self.definitions \
                else Name(token.text)
        elif token.kind == "(":
            node = self._expression(0)
            self._expect_close()
        elif token.kind == "function":
            args = [self._expression(0)]
            while self.pos < len(self.tokens) and self.tokens[self.pos].kind == ",":
                self.pos += 1
                args.append(self._expression(0))
            self._expect_close()
            node = _call(token.text, args, self.functions)
        elif token.kind == "operator" and token.text == "-":
            node = _call(_NEGATE, [self._expression(_NEGATE_PRECEDENCE)], self.functions)
        else:
            raise ExpressionError(f"unexpected token: {token.text}")
        while self.pos < len(self.tokens) and self.tokens[self.pos].kind == "operator":
            op = self.tokens[self.pos].text
            if _PRECEDENCE[op] < precedence:
                break
            self.pos += 1
            right = self._expression(_PRECEDENCE[op] + (op not in _RIGHT_ASSOCIATIVE))
            node = _call(op, [node, right], self.functions)
        return node

    def _expect_close(self) -> None:
        if self.pos == len(self.tokens) or self.tokens[self.pos].kind != ")":
            raise ExpressionError("unbalanced parentheses")
        self.pos += 1


def _call(function: str, args: list[Node], functions: Mapping[str, int]) -> Node:
    """A Call node, checked for arity; folded to a Number when built-in on constants."""
    if function in functions:
        arity = functions[function]
    elif function in BUILTINS:
        arity = BUILTINS[function][0]
    elif function in _OPERATORS:
        arity = 2
    elif function == _NEGATE:
        arity = 1
    else:
        known = sorted(BUILTINS) + sorted(functions)
        raise ExpressionError(f"unknown function: {function} (known functions: "
                              f"{', '.join(known)}; tabulated functions must be added to "
                              "the force)")
    if len(args) != arity:
        raise ExpressionError(f"wrong number of arguments to function {function}: "
                              f"{len(args)} given, {arity} expected")
    node = Call(function, tuple(args))
    if function not in functions and all(isinstance(a, Number) for a in args):
        value = _apply(node, [torch.tensor(a.value, dtype=DTYPE) for a in args], {})
        return Number(float(value))
    return node


def _apply(node: Call, args: list, functions: Mapping[str, Callable]) -> torch.Tensor:
    if node.function in _OPERATORS:
        return _OPERATORS[node.function](args[0], args[1])
    if node.function == _NEGATE:
        return -args[0]
    if node.function in functions:
        return functions[node.function](*args)
    return BUILTINS[node.function][1](*args)


def parse(text: str, functions: Mapping[str, int] | None = None) -> Node:
    """Parse a Lepton expression into a tree.

    Parameters
    ----------
    text : str
        The expression, with optional ``;``-separated ``name=expression`` definitions.
    functions : mapping of str to int, optional
        Tabulated (custom) function names and their numbers of arguments; they shadow
        built-ins of the same name, as in Lepton.

    Returns
    -------
    Number, Name or Call
        Root of the tree; constant sub-trees of built-ins are folded into numbers.

    Raises
    ------
    ExpressionError
        Syntax errors, unknown functions, wrong numbers of arguments; the message quotes
        the expression.
    """
    functions = dict(functions or {})
    try:
        parts = text.split(";")
        definitions: dict[str, Node] = {}
        for sub in reversed(parts[1:]):
            sub = sub.strip()
            if not sub:
                continue
            name, equals, body = sub.partition("=")
            if not equals or not name.strip():
                raise ExpressionError("subexpression does not specify a name")
            definitions[name.strip()] = _Parser(_tokenize(body), definitions, functions).parse()
        return _Parser(_tokenize(parts[0]), definitions, functions).parse()
    except ExpressionError as error:
        raise ExpressionError(f'Parse error in expression "{text}": {error}') from None


def free_variables(node: Node) -> frozenset[str]:
    """Names of the free variables of a tree."""
    seen: set[int] = set()
    names: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Name):
            names.add(item.name)
        elif isinstance(item, Call):
            stack.extend(item.args)
    return frozenset(names)


# --------------------------------------------------------------------------- tabulated functions


class TabulatedFunction(nn.Module):
    """Base of the torch twins of OpenMM's tabulated functions.

    Subclasses hold their samples as buffers and map ``n_args`` tensors (broadcast together)
    to a tensor of the broadcast shape.
    """

    n_args: int = 0

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.n_args = len(self.shape)
        # Flat index of grid point (i, j, k) in OpenMM's order: i + nx*(j + ny*k).
        self.strides = tuple(int(s) for s in np.cumprod((1,) + self.shape[:-1]))

    def _prepare(self, args: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Size]:
        if len(args) != self.n_args:
            raise ExpressionError(f"tabulated function takes {self.n_args} arguments, "
                                  f"got {len(args)}")
        args = torch.broadcast_tensors(*args)
        return [a.reshape(-1) for a in args], args[0].shape


class DiscreteFunction(TabulatedFunction):
    """``Discrete1DFunction``/``Discrete2DFunction``/``Discrete3DFunction``.

    Parameters
    ----------
    values : array-like, shape (nx * ny * nz,)
        Samples in OpenMM's order (``values[i + nx*(j + ny*k)]``).
    shape : sequence of int
        ``(nx,)``, ``(nx, ny)`` or ``(nx, ny, nz)``.

    Notes
    -----
    Each argument is rounded to the nearest integer (halves away from zero, like C's
    ``round``) and clamped to ``[0, n - 1]``; the result does not depend smoothly on the
    arguments, so their derivative is zero.
    """

    def __init__(self, values, shape: Sequence[int]):
        super().__init__(shape)
        values = np.asarray(values, dtype=float).ravel()
        if values.size != int(np.prod(self.shape)) or values.size == 0:
            raise InputError(f"discrete tabulated function of shape {self.shape} needs "
                             f"{int(np.prod(self.shape))} values, got {values.size}")
        self.register_buffer("values", torch.as_tensor(values, dtype=DTYPE))

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        flat_args, shape = self._prepare(args)
        index = torch.zeros(flat_args[0].shape, dtype=torch.long, device=flat_args[0].device)
        for t, n, stride in zip(flat_args, self.shape, self.strides, strict=True):
            t = t.detach()
            nearest = torch.where(t >= 0, torch.floor(t + 0.5), torch.ceil(t - 0.5))
            index = index + stride * torch.clamp(nearest, 0, n - 1).long()
        return self.values.to(flat_args[0].dtype)[index].reshape(shape)


def spline_slope_matrix(n: int, spacing: float, periodic: bool) -> np.ndarray:
    """Matrix ``S`` (n × n) with ``S @ y`` = derivatives at the knots of the cubic spline
    through ``y`` sampled with uniform ``spacing``, as OpenMM's ``SplineFitter`` builds it.

    Parameters
    ----------
    n : int
        Number of samples (≥ 2 natural, ≥ 3 periodic).
    spacing : float
        Distance between samples (units of the argument).
    periodic : bool
        Natural spline (zero second derivative at both ends) or periodic spline (the last
        sample repeats the first; derivatives continuous across the wrap).

    Returns
    -------
    numpy.ndarray, shape (n, n)
        Derivative (value units per argument unit) at knot i is ``(S @ y)[i]``.

    Notes
    -----
    With second derivatives M solving ``M[i-1] + 4 M[i] + M[i+1] = 6/h² (y[i-1] - 2 y[i] +
    y[i+1])`` on interior knots (natural: ``M[0] = M[n-1] = 0``; periodic: indices cyclic over
    the n - 1 distinct samples), the slope at knot i < n - 1 is
    ``(y[i+1] - y[i])/h - h (2 M[i] + M[i+1])/6`` and at the last knot
    ``(y[n-1] - y[n-2])/h + h (M[n-2] + 2 M[n-1])/6``.
    """
    h = float(spacing)
    eye = np.eye(n)
    if periodic:
        m = n - 1
        up = np.roll(np.eye(m), 1, axis=1)   # (up @ y)[i] = y[i+1 mod m]
        cyclic = up.T + 4.0 * np.eye(m) + up
        second_m = np.linalg.solve(cyclic, 6.0 / h**2 * (up.T - 2.0 * np.eye(m) + up))
        # Samples 0..m-1 determine everything: sample m repeats sample 0.
        fold = np.hstack([np.eye(m), np.zeros((m, 1))])
        second = np.vstack([second_m, second_m[:1]]) @ fold
    else:
        system = np.eye(n)
        rhs = np.zeros((n, n))
        for i in range(1, n - 1):
            system[i, i - 1:i + 2] = (1.0, 4.0, 1.0)
            rhs[i, i - 1:i + 2] = np.array([1.0, -2.0, 1.0]) * 6.0 / h**2
        second = np.linalg.solve(system, rhs)
    slopes = np.empty((n, n))
    slopes[:-1] = (eye[1:] - eye[:-1]) / h - h / 6.0 * (2.0 * second[:-1] + second[1:])
    slopes[-1] = (eye[-1] - eye[-2]) / h + h / 6.0 * (second[-2] + 2.0 * second[-1])
    return slopes


class SplineFunction(TabulatedFunction):
    """``Continuous1DFunction``/``Continuous2DFunction``/``Continuous3DFunction``.

    Parameters
    ----------
    values : array-like, shape (nx * ny * nz,)
        Samples in OpenMM's order (``values[i + nx*(j + ny*k)]``) at uniformly spaced points
        from ``lower`` to ``upper`` (both included) along each axis.
    shape : sequence of int
        ``(nx,)``, ``(nx, ny)`` or ``(nx, ny, nz)``.
    lower, upper : sequence of float
        Range of each argument.
    periodic : bool
        Periodic splines (arguments wrapped into the range; the last sample along each axis
        must equal the first) instead of natural ones (zero outside the range).

    Notes
    -----
    The knot derivatives of every mixed order (∂x, ∂y, ∂x∂y, ...) are linear in the samples:
    ``D[o] = S_x^{o_x} S_y^{o_y} S_z^{o_z} values`` with the slope matrices of
    :func:`spline_slope_matrix`. Inside a grid cell the function is the tensor product of
    cubic Hermite polynomials matching the values and these derivatives at the cell's
    corners, which is the unique (bi/tri)cubic OpenMM fits to the same data.
    """

    def __init__(self, values, shape: Sequence[int], lower: Sequence[float],
                 upper: Sequence[float], periodic: bool = False):
        super().__init__(shape)
        values = np.asarray(values, dtype=float).ravel()
        lower = [float(v) for v in lower]
        upper = [float(v) for v in upper]
        need = 3 if periodic else 2
        if values.size != int(np.prod(self.shape)):
            raise InputError(f"continuous tabulated function of shape {self.shape} needs "
                             f"{int(np.prod(self.shape))} values, got {values.size}")
        if min(self.shape) < need:
            raise InputError(f"a {'periodic' if periodic else 'natural'} spline needs at least "
                             f"{need} samples along each axis, got shape {self.shape}")
        if any(hi <= lo for lo, hi in zip(lower, upper, strict=True)):
            raise InputError(f"tabulated function range must have max > min, got "
                             f"min {lower}, max {upper}")
        grid = values.reshape(self.shape, order="F")   # grid[i, j, k]
        if periodic:
            for axis, n in enumerate(self.shape):
                first, last = np.take(grid, 0, axis=axis), np.take(grid, n - 1, axis=axis)
                if not np.allclose(first, last, rtol=1e-15, atol=1e-15):
                    raise InputError("periodic tabulated function: the first and last samples "
                                     f"along axis {axis} must be equal; repeat the first "
                                     "value at the end")
        self.periodic = bool(periodic)
        self.lower = tuple(lower)
        self.upper = tuple(upper)
        self.spacing = tuple((hi - lo) / (n - 1)
                             for lo, hi, n in zip(lower, upper, self.shape, strict=True))
        derivatives = [grid]
        for axis, (n, h) in enumerate(zip(self.shape, self.spacing, strict=True)):
            slope = spline_slope_matrix(n, h, self.periodic)
            derivatives = [d for grid_d in derivatives for d in
                           (grid_d, np.moveaxis(np.tensordot(slope, grid_d, axes=(1, axis)),
                                                0, axis))]
        # Row o (bit a of o, most significant first = derivative along axis a) in flat order.
        flat = np.stack([d.ravel(order="F") for d in derivatives])
        self.register_buffer("derivatives", torch.as_tensor(flat, dtype=DTYPE))
        corners = np.array(np.meshgrid(*([[0, 1]] * self.n_args), indexing="ij")
                           ).reshape(self.n_args, -1).T
        self.register_buffer("corner_offsets",
                             torch.as_tensor(corners @ np.asarray(self.strides), dtype=torch.long))

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        flat_args, shape = self._prepare(args)
        inside = torch.ones(flat_args[0].shape, dtype=torch.bool, device=flat_args[0].device)
        cell = torch.zeros(flat_args[0].shape, dtype=torch.long, device=flat_args[0].device)
        weights = None
        for t, n, lo, hi, h, stride in zip(flat_args, self.shape, self.lower, self.upper,
                                           self.spacing, self.strides, strict=True):
            if self.periodic:
                s = (t - lo) / (hi - lo)
                t = lo + (hi - lo) * (s - torch.floor(s.detach()))
            else:
                inside = inside & (t >= lo) & (t <= hi)
            u = (t - lo) / h
            index = torch.clamp(torch.floor(u.detach()), 0, n - 2)
            f = torch.clamp(u - index, 0.0, 1.0)
            cell = cell + stride * index.long()
            g = 1.0 - f
            # basis[corner, order]: cubic Hermite functions on the cell, derivatives scaled by h.
            basis = torch.stack([torch.stack([(1.0 + 2.0 * f) * g * g, f * g * g * h]),
                                 torch.stack([f * f * (3.0 - 2.0 * f), -f * f * g * h])])
            weights = basis if weights is None else (
                weights[:, None, :, None] * basis[None, :, None, :]).reshape(
                    2 * weights.shape[0], 2 * weights.shape[1], -1)
        data = self.derivatives.to(flat_args[0].dtype)
        samples = data[:, cell[None, :] + self.corner_offsets[:, None]]  # (order, corner, P)
        value = (weights.transpose(0, 1) * samples).sum((0, 1))
        return torch.where(inside, value, torch.zeros_like(value)).reshape(shape)


def tabulated_function(function: openmm.TabulatedFunction) -> TabulatedFunction:
    """The torch twin of an OpenMM tabulated function (any of the six kinds)."""
    params = function.getFunctionParameters()
    if isinstance(function, openmm.Continuous1DFunction):
        values, lo, hi = params
        return SplineFunction(values, (len(values),), (lo,), (hi,), function.getPeriodic())
    if isinstance(function, openmm.Continuous2DFunction):
        nx, ny, values, x0, x1, y0, y1 = params
        return SplineFunction(values, (nx, ny), (x0, y0), (x1, y1), function.getPeriodic())
    if isinstance(function, openmm.Continuous3DFunction):
        nx, ny, nz, values, x0, x1, y0, y1, z0, z1 = params
        return SplineFunction(values, (nx, ny, nz), (x0, y0, z0), (x1, y1, z1),
                              function.getPeriodic())
    if isinstance(function, openmm.Discrete1DFunction):
        return DiscreteFunction(params, (len(params),))
    if isinstance(function, openmm.Discrete2DFunction):
        nx, ny, values = params
        return DiscreteFunction(values, (nx, ny))
    if isinstance(function, openmm.Discrete3DFunction):
        nx, ny, nz, values = params
        return DiscreteFunction(values, (nx, ny, nz))
    raise InputError(f"unknown tabulated function type {type(function).__name__}; supported: "
                     "Continuous1D/2D/3DFunction, Discrete1D/2D/3DFunction")


# --------------------------------------------------------------------------- compiled expression


class Expression(nn.Module):
    """A Lepton expression evaluated with torch operations.

    Parameters
    ----------
    text : str
        The expression (see the module docstring for the syntax).
    functions : mapping of str to TabulatedFunction, optional
        Tabulated functions callable by name in ``text``.

    Attributes
    ----------
    variables : frozenset of str
        Free variables; :meth:`forward` needs a value for each.

    Examples
    --------
    >>> lj = Expression("4*eps*((sig/r)^12-(sig/r)^6); sig=0.5*(s1+s2); eps=sqrt(e1*e2)")
    >>> sorted(lj.variables)
    ['e1', 'e2', 'r', 's1', 's2']
    >>> energy = lj({"r": r, "s1": s[i], "s2": s[j], "e1": e[i], "e2": e[j]})
    """

    def __init__(self, text: str, functions: Mapping[str, TabulatedFunction] | None = None):
        super().__init__()
        functions = dict(functions or {})
        self.text = text
        self.function_names = list(functions)
        self.tabulated = nn.ModuleList(functions.values())
        self.root = parse(text, {name: f.n_args for name, f in functions.items()})
        self.variables = free_variables(self.root)

    def forward(self, env: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Value of the expression.

        Parameters
        ----------
        env : mapping of str to torch.Tensor or float
            A value for every free variable; tensors broadcast together.

        Returns
        -------
        torch.Tensor
            Shape: the broadcast shape of the tensors in ``env`` that the expression uses.
        """
        missing = self.variables - set(env)
        if missing:
            raise ExpressionError(f'expression "{self.text}" uses undefined variable(s) '
                                  f"{', '.join(sorted(missing))}; defined: "
                                  f"{', '.join(sorted(env)) or 'none'}")
        tensors = [v for k, v in env.items() if k in self.variables and torch.is_tensor(v)]
        like = tensors[0] if tensors else torch.zeros((), dtype=DTYPE)
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        functions = dict(zip(self.function_names, self.tabulated, strict=True))
        memo: dict[int, torch.Tensor | float] = {}

        def evaluate(node: Node) -> torch.Tensor | float:
            key = id(node)
            if key not in memo:
                if isinstance(node, Number):
                    memo[key] = node.value
                elif isinstance(node, Name):
                    memo[key] = env[node.name]
                else:
                    args = [evaluate(a) for a in node.args]
                    if node.function not in _OPERATORS:
                        args = [a if torch.is_tensor(a) else
                                torch.as_tensor(a, dtype=like.dtype, device=like.device)
                                for a in args]
                    memo[key] = _apply(node, args, functions)
            return memo[key]

        value = evaluate(self.root)
        value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
        return value.expand(shape) if value.shape != shape else value

    def extra_repr(self) -> str:
        return repr(self.text)


__all__ = ["BUILTINS", "Call", "DiscreteFunction", "Expression", "ExpressionError", "Name",
           "Number", "SplineFunction", "TabulatedFunction", "free_variables", "parse",
           "spline_slope_matrix", "tabulated_function"]
