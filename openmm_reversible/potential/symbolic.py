"""OpenMM (Lepton) expression trees as sympy laws, for the fused kernels.

:mod:`.expression` parses a ``Custom*Force`` energy into a tree (:class:`~.expression.Number`,
:class:`~.expression.Name`, :class:`~.expression.Call`) and evaluates it with torch. Here the
same tree becomes a sympy expression with the *same* values and derivatives, so that
:mod:`.fused` can differentiate it and generate its kernels: a ``CustomNonbondedForce`` energy
as a pair law (:func:`custom_pair_law`), a custom bond, angle or torsion energy as a chain law
of its internal coordinate (:func:`custom_chain_law`).

The torch evaluation uses :mod:`openmm_reversible.safe_math` (every derivative 0 where the
plain one is infinite or undefined) and Lepton's piecewise functions; each has an exact
symbolic counterpart, built from ``Piecewise`` and :func:`.lawmath.detach` (a value without
derivative):

- ``sqrt(x)``: ``sqrt(x)`` for ``x > 0``, else ``detach(sqrt(x))`` (0 at 0, NaN below);
- ``x / y`` (and ``recip``, ``sec``, ``csc``, ``cot``): ``x / y`` where ``y != 0``, else
  ``detach(x / y)``; a division by a literal number is plain;
- ``x ^ y``: an integer literal ``y`` is a plain power; another literal: ``x^y`` where
  ``x != 0``, else its detached value; an expression ``y``: ``x^y`` for ``x > 0``, the
  detached value at 0, ``x^detach(y)`` below (no derivative in ``y``);
- ``atan2``: detached at the origin; ``step``, ``delta``, ``select``: piecewise constants and
  branches; ``abs``: derivative 0 at 0; ``min``/``max``: torch's values and derivatives, the
  derivative split in halves at a tie; ``floor``/``ceil``: detached.

One difference is left, at a single point: at an exponent of exactly 0, torch's ``pow`` gives
``∂²(x^y)/∂x∂y = 0`` (its ``∂/∂x`` is masked to 0 there) where the true value, which the fused
path gives, is ``1/x``.

A guard that sympy's assumptions decide (``r > 0``, a positive literal) is dropped, so the
common ``.../r^6`` costs no branch. Literal numbers that are not integers are passed to the
kernels as constants (their exact float64 values), integers stay symbolic (exact powers).
Tabulated functions have no symbolic form: :class:`UntranslatableError` names them.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import expression, fused, lawmath
from .bonded import bond_angle, bond_length, dihedral_angle
from .expression import Call, Name, Number
from .nonbonded import switching_function


class UntranslatableError(ValueError):
    """An expression the fused kernels cannot take (the message says why)."""


# --------------------------------------------------------------------------- functions


def _sympy():
    import sympy  # deferred: only the kernel generator needs it

    return sympy


def _nonzero(x) -> bool:
    return getattr(x, "is_zero", None) is False


def _positive(x) -> bool:
    return getattr(x, "is_positive", None) is True


def _div(x, y):
    sympy = _sympy()
    if _nonzero(y):
        return x / y
    return sympy.Piecewise((x / y, sympy.Ne(y, 0)), (lawmath.detach(x / y), True))


def _sqrt(x):
    sympy = _sympy()
    if _positive(x):
        return sympy.sqrt(x)
    return sympy.Piecewise((sympy.sqrt(x), x > 0), (lawmath.detach(sympy.sqrt(x)), True))


def _pow(x, y, literal: bool):
    sympy = _sympy()
    if literal and y.is_Integer:
        return x**y
    if _positive(x):
        return x**y
    if literal:
        return sympy.Piecewise((x**y, sympy.Ne(x, 0)), (lawmath.detach(x**y), True))
    return sympy.Piecewise((x**y, x > 0), (lawmath.detach(x**y), sympy.Eq(x, 0)),
                           (x ** lawmath.detach(y), True))


def _abs(x):
    sympy = _sympy()
    return sympy.Piecewise((x, x > 0), (-x, x < 0), (sympy.S.Zero, True))


def _extremum(x, y, smaller: bool):
    """torch.minimum / torch.maximum: at a tie the value is x (= y) and each argument gets
    half the derivative."""
    sympy = _sympy()
    first, second = (x < y, x > y) if smaller else (x > y, x < y)
    return sympy.Piecewise((x, first), (y, second), ((x + y) / 2, True))


def _atan2(y, x):
    sympy = _sympy()
    return sympy.Piecewise((sympy.atan2(y, x), sympy.Ne(x, 0) | sympy.Ne(y, 0)),
                           (lawmath.detach(sympy.atan2(y, x)), True))


def _functions() -> dict[str, Callable]:
    """Lepton's built-ins (:data:`.expression.BUILTINS`) in sympy, same semantics."""
    sympy = _sympy()
    one = sympy.S.One
    return {
        "sqrt": _sqrt, "exp": sympy.exp, "log": sympy.log, "sin": sympy.sin,
        "cos": sympy.cos, "tan": sympy.tan, "asin": sympy.asin, "acos": sympy.acos,
        "atan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh,
        "erf": sympy.erf, "erfc": sympy.erfc,
        "sec": lambda x: _div(one, sympy.cos(x)), "csc": lambda x: _div(one, sympy.sin(x)),
        "cot": lambda x: _div(one, sympy.tan(x)), "recip": lambda x: _div(one, x),
        "atan2": _atan2,
        "step": lambda x: sympy.Piecewise((one, x >= 0), (sympy.S.Zero, True)),
        "delta": lambda x: sympy.Piecewise((one, sympy.Eq(x, 0)), (sympy.S.Zero, True)),
        "select": lambda x, y, z: sympy.Piecewise((y, sympy.Ne(x, 0)), (z, True)),
        "square": lambda x: x**2, "cube": lambda x: x**3,
        "min": lambda x, y: _extremum(x, y, True), "max": lambda x, y: _extremum(x, y, False),
        "abs": _abs,
        "floor": lambda x: lawmath.detach(sympy.floor(x)),
        "ceil": lambda x: lawmath.detach(sympy.ceiling(x)),
    }


# --------------------------------------------------------------------------- translation


def literals(root: expression.Node) -> tuple[float, ...]:
    """The distinct non-integer literal numbers of a tree, in a fixed order (first met in a
    depth-first walk): the constants :func:`to_sympy` reads from ``constants``."""
    found: dict[float, None] = {}
    seen: set[int] = set()

    def walk(node) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Number) and not float(node.value).is_integer():
            found.setdefault(float(node.value), None)
        elif isinstance(node, Call):
            for arg in node.args:
                walk(arg)

    walk(root)
    return tuple(found)


def to_sympy(root: expression.Node, names: dict, constants: Sequence,
             tabulated: frozenset[str] = frozenset()) -> object:
    """The sympy expression of a Lepton tree.

    Parameters
    ----------
    root : Number, Name or Call
        From :func:`.expression.parse`.
    names : dict of str to sympy expression
        A value for every free variable.
    constants : sequence of sympy expressions
        One per entry of :func:`literals` (``root``), in that order.
    tabulated : frozenset of str
        Names of the tabulated functions the tree may call (they shadow built-ins).

    Raises
    ------
    UntranslatableError
        For a call of a tabulated function.
    """
    sympy = _sympy()
    functions = _functions()
    index = {value: k for k, value in enumerate(literals(root))}
    memo: dict[int, object] = {}

    def translate(node):
        key = id(node)
        if key in memo:
            return memo[key]
        if isinstance(node, Number):
            value = float(node.value)
            result = sympy.Integer(int(value)) if value.is_integer() else constants[index[value]]
        elif isinstance(node, Name):
            result = names[node.name]
        else:
            args = [translate(a) for a in node.args]
            f = node.function
            if f == "+":
                result = args[0] + args[1]
            elif f == "-":
                result = args[0] - args[1]
            elif f == "*":
                result = args[0] * args[1]
            elif f == "neg":
                result = -args[0]
            elif f == "/":
                result = (args[0] / args[1] if isinstance(node.args[1], Number)
                          else _div(args[0], args[1]))
            elif f == "^":
                result = _pow(args[0], args[1], isinstance(node.args[1], Number))
            elif f in functions and f not in tabulated:
                result = functions[f](*args)
            else:
                raise UntranslatableError(f"the energy calls the tabulated function {f!r}, "
                                          "which has no symbolic form")
        memo[key] = result
        return result

    return translate(root)


# --------------------------------------------------------------------------- pair laws


@dataclass(frozen=True)
class CustomPairLaw:
    """A ``CustomNonbondedForce`` energy as a fused pair law.

    Attributes
    ----------
    law : fused.PairLaw
        Particle rows: the per-particle parameters, then the global parameters (the same value
        in every row; the law reads them from the first particle of a pair, so summing their
        row derivatives gives the global ones).
    constants : tuple of float
        The law's constants: the expression's literals, then ``(r_switch, cutoff)`` (nm) when
        switched.
    """

    law: fused.PairLaw
    constants: tuple[float, ...]


def _pair_law(text: str, columns: tuple[str, ...], global_names: tuple[str, ...],
              switched: bool, r, a, b, c):
    """The law of :func:`custom_pair_law` at the generator's symbols (``c``: literals, then
    the switching distance and the cutoff when ``switched``)."""
    sympy = _sympy()
    root = expression.parse(text)
    values = literals(root)
    # Symbols with the signs of the literals and r > 0 let sympy drop the guards it can
    # decide; they are replaced by the generator's symbols afterwards.
    known = _signed_symbols(values)
    radius = sympy.Symbol("radius", positive=True)
    names = {g: a[len(columns) + m] for m, g in enumerate(global_names)}
    names.update({f"{name}1": a[m] for m, name in enumerate(columns)})
    names.update({f"{name}2": b[m] for m, name in enumerate(columns)})
    names["r"] = radius
    energy = to_sympy(root, names, known)
    energy = energy.xreplace({radius: r, **dict(zip(known, c, strict=False))})
    if switched:
        energy = energy * switching_function(r, c[len(values)], c[len(values) + 1])
    return energy


@functools.cache
def custom_pair_law(text: str, columns: tuple[str, ...], global_names: tuple[str, ...],
                    switch_distance: float | None, cutoff: float | None,
                    tabulated: tuple[tuple[str, int], ...] = ()) -> CustomPairLaw:
    """The fused pair law of a ``CustomNonbondedForce`` energy (cached per arguments).

    Parameters
    ----------
    text : str
        The Lepton energy expression (``r``, per-particle parameters suffixed 1 and 2,
        global parameters).
    columns : tuple of str
        Per-particle parameter names.
    global_names : tuple of str
        Global parameter names.
    switch_distance, cutoff : float or None, nm
        OpenMM's switching function between them multiplies the energy when both are given.
    tabulated : tuple of (str, int)
        The force's tabulated functions and their numbers of arguments.

    Raises
    ------
    UntranslatableError
        An expression without a symbolic form (tabulated functions).
    """
    root = _translatable_tree(text, tabulated)
    n_literals = len(literals(root))
    switched = switch_distance is not None and cutoff is not None
    digest = hashlib.sha256(repr((text, columns, global_names, switched)).encode())
    law = fused.PairLaw(
        f"custom_nonbonded_{digest.hexdigest()[:16]}",
        functools.partial(_pair_law, text, columns, global_names, switched),
        n_params=len(columns) + len(global_names), n_consts=n_literals + 2 * switched,
        sources=(_pair_law, expression.parse, switching_function))
    constants = literals(root) + ((float(switch_distance), float(cutoff)) if switched else ())
    return CustomPairLaw(law, constants)


@functools.cache
def inert_columns(pair_law: CustomPairLaw, live: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Columns that switch a pair off: a zero there makes the pair contribute nothing.

    A column ``m`` is inert for the first particle when, with ``a[m] = 0``, the law and every
    derivative the kernels use vanish identically in the other variables: ``u``, ``u'``,
    ``u''`` and, for every ``live`` column ``p`` (of either particle), ``∂u/∂p``, ``∂u'/∂p``
    and ``∂²u/∂p∂q``. Derivatives with respect to the other columns are not needed: nothing
    receives them (their cotangents are zero too). Pairs with such a zero can be left out of
    the kernels without changing any result (water hydrogens with zero well depth: eight pairs
    in nine). Decided by sympy, once per law and live set; a vanishing it cannot prove keeps
    the pairs.

    Parameters
    ----------
    pair_law : CustomPairLaw
    live : tuple of int
        Row columns (per-particle, then global) whose derivatives are needed.

    Returns
    -------
    (tuple of int, tuple of int)
        The inert columns for the first and for the second particle of a pair.
    """
    sympy = _sympy()
    spec = pair_law.law
    r = sympy.Symbol("r", positive=True)
    a, b = (tuple(sympy.Symbol(f"{s}{m}", real=True) for m in range(spec.n_params))
            for s in "ab")
    c = tuple(sympy.Symbol(f"c{m}", real=True) for m in range(spec.n_consts))
    u = sympy.sympify(spec.law(r, a, b, c))
    variables = [a[m] for m in live] + [b[m] for m in live]
    first = [u, sympy.diff(u, r)] + [sympy.diff(u, p) for p in variables]
    needed = first + [sympy.diff(first[1], r)] + [sympy.diff(f, p) for f in first[1:]
                                                  for p in variables]

    def inert(symbol) -> bool:
        return all(sympy.sympify(e).subs(symbol, 0) == 0 for e in needed)

    return (tuple(m for m in range(spec.n_params) if inert(a[m])),
            tuple(m for m in range(spec.n_params) if inert(b[m])))


# --------------------------------------------------------------------------- chain laws

_GEOMETRY = {2: bond_length, 3: bond_angle, 4: dihedral_angle}
"""The internal coordinate of a chain of 2, 3 or 4 atoms (the custom bonded terms' own)."""


def _chain_law(text: str, coordinate: str, width: int, columns: tuple[str, ...],
               global_names: tuple[str, ...], vectors, p, c):
    """The law of :func:`custom_chain_law` at the generator's symbols (``c``: literals)."""
    sympy = _sympy()
    root = expression.parse(text)
    known = _signed_symbols(literals(root))
    # a bond length is positive (guards on it dropped); angles are only real
    value = sympy.Symbol("value", positive=True) if width == 2 else sympy.Symbol("value",
                                                                                 real=True)
    names = {g: p[len(columns) + m] for m, g in enumerate(global_names)}
    names.update({name: p[m] for m, name in enumerate(columns)})
    names[coordinate] = value
    energy = to_sympy(root, names, known)
    return energy.xreplace({value: _GEOMETRY[width](*vectors), **dict(zip(known, c, strict=True))})


@functools.cache
def custom_chain_law(text: str, coordinate: str, width: int, columns: tuple[str, ...],
                     global_names: tuple[str, ...], tabulated: tuple[tuple[str, int], ...] = ()
                     ) -> tuple[fused.ChainLaw, tuple[float, ...]]:
    """The fused chain law of a ``CustomBondForce``/``CustomAngleForce``/``CustomTorsionForce``
    energy (cached per arguments), and its constants (the expression's literals).

    Parameters
    ----------
    text : str
        The Lepton energy of one item.
    coordinate : str
        Its variable: ``"r"`` (bond length, nm) or ``"theta"`` (angle or dihedral, rad).
    width : int
        Atoms per item: 2, 3 or 4.
    columns, global_names : tuple of str
        Per-item and global parameter names; the law's rows hold the per-item values, then
        the global ones (the same in every row).
    tabulated : tuple of (str, int)
        The force's tabulated functions and their numbers of arguments.

    Raises
    ------
    UntranslatableError
        An expression without a symbolic form (tabulated functions).
    """
    root = _translatable_tree(text, tabulated)
    n_literals = len(literals(root))
    digest = hashlib.sha256(repr((text, coordinate, width, columns, global_names)).encode())
    law = fused.ChainLaw(
        f"custom_chain{width}_{digest.hexdigest()[:16]}",
        functools.partial(_chain_law, text, coordinate, width, columns, global_names),
        width=width, n_params=len(columns) + len(global_names), n_consts=n_literals,
        sources=(_chain_law, expression.parse, *_GEOMETRY.values()))
    return law, literals(root)


def _signed_symbols(values: Sequence[float]) -> list:
    """A symbol per literal, with the literal's sign (nonzero: literals are not integers)."""
    sympy = _sympy()
    return [sympy.Symbol(f"k{m}", positive=True) if v > 0 else
            sympy.Symbol(f"k{m}", negative=True) for m, v in enumerate(values)]


def _translatable_tree(text: str, tabulated: tuple[tuple[str, int], ...]) -> expression.Node:
    """The parsed energy, checked to translate (placeholder symbols for every variable).

    Raises
    ------
    UntranslatableError
    """
    sympy = _sympy()
    root = expression.parse(text, dict(tabulated))
    names = {name: sympy.Symbol(name, real=True) for name in expression.free_variables(root)}
    to_sympy(root, names, _signed_symbols(literals(root)),
             frozenset(name for name, _ in tabulated))
    return root


__all__ = ["CustomPairLaw", "UntranslatableError", "custom_chain_law", "custom_pair_law",
           "inert_columns", "literals", "to_sympy"]
