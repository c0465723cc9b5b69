"""Trainable force-field parameters read from the user's OpenMM ForceField XML.

A *site* is one numeric attribute of one element of a ForceField XML file, e.g. ``sigma`` of
``<Atom type="tip3p-O" .../>`` inside ``<NonbondedForce>``. Sites are marked with the
ForceBalance convention, which OpenMM ignores when it loads the file:

- ``parameterize="sigma, epsilon"`` on an element makes those attributes *trainable*;
- ``parameter_eval="charge=-0.5*PARM['Atom/charge/tip3p-O']"`` makes an attribute *tied*: its
  value is an expression of other sites. Several ties on one element are separated by commas
  (ForceBalance) or semicolons: ``parameter_eval="k=2*PARM['Bond/k/OW.HW']; length=0.1"``.

Every site has a key ``Tag/attribute/identifier`` (ForceBalance's parameter ID). The identifier
is the element's ``type``, else its ``class``, else its ``name``, else its ``type1``..``type4``
(or ``class1``..``class4``) values joined by ``.`` (``Bond/k/OW.HW``); an element with none of
these has the key ``Tag/attribute``. Elements that yield the same key are one site when they
agree (both trainable with the same value, or the same tie): the two hydrogens of a water
template, for instance. Otherwise the key is ambiguous and an InputError names both elements.

Residue templates
-----------------
Force fields such as amber14 (``protein.ff14SB.xml``) and charmm36 keep charges on the
``<Atom>`` elements of their ``<Residue>`` templates (``<UseAttributeFromResidue
name="charge"/>``). OpenMM reads every attribute of such an ``<Atom>`` as a number, so the tags
go on the ``<Residue>`` itself (OpenMM ignores unknown attributes there) and name the atom::

    <Residue name="ALA" parameterize="CB/charge" conserve_charge="true">
    <Residue name="LEU" parameter_eval="CB/charge=PARM['Residue/ALA/CB/charge']">

Such a site is keyed by residue and atom name, ``Residue/ALA/CB/charge``, and feeds only the
particles of residues that OpenMM matches to that template; other atoms of the same type keep
their charges. ``conserve_charge="true"`` keeps the residue's net charge where the file has it:
every untagged charged atom of the template becomes a tied site that takes an equal share of
the opposite of the tagged atoms' change, ``q_o = q_o⁰ − Σ_t (q_t − q_t⁰) / n_untagged`` (the
file's values ``q⁰``), so the net charge is that of the file whatever the trained values, and
the export writes every atom's new charge. (An ``<Atom>`` of a template selected in Python with
``("Residue/Atom", "<type>", "charge")`` is keyed by its type instead, ``Atom/charge/<type>``,
as before.)

:class:`ParameterSet` holds the sites as a torch module. Trainable values are stored *scaled*
relative to their start values, ``value = start * scaled`` with ``scaled`` starting at 1.0 (the
reversible-simulation paper's convention: every parameter moves on the same scale, whatever its
unit). A site that starts at zero cannot be scaled, so it moves additively instead:
``value = scaled - 1`` in MD units. Calling the module returns the current values of all sites,
tied ones evaluated in torch so gradients flow through the ties.

Which System items a site feeds is decided by OpenMM itself: :meth:`ParameterSet.bind` rebuilds
the System once per site with only that XML number perturbed and records which entries of the
torch terms' parameter tables moved, and by what factor. Template matching, atom-type and class
wildcards and ``UseAttributeFromResidue`` are therefore exactly OpenMM's.

All values are in OpenMM's MD units (nm, ps, kJ/mol, amu, e, K, rad), as in the XML files.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import io
import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openmm
import openmm.app
import torch
from torch import nn

from .errors import InputError
from .potential.base import Term
from .safe_math import safe_div, safe_pow, safe_sqrt
from .units import DTYPE

if TYPE_CHECKING:
    from .potential import TorchPotential

PARAMETERIZE = "parameterize"
PARAMETER_EVAL = "parameter_eval"
CONSERVE_CHARGE = "conserve_charge"
"""``<Residue conserve_charge="true">``: keep the residue template's net charge (module
docstring)."""
_TAGGING = (PARAMETERIZE, PARAMETER_EVAL, CONSERVE_CHARGE)
"""Attributes that mark parameters and are dropped from a plain export."""

_SCALE_RTOL = 1e-9
"""Relative tolerance for "the same scale at both values" in the perturbation mapping."""

_PERTURBATION = 1.25
"""Factor applied to a site's value when mapping it (an offset of 0.125 for a zero value)."""

# ---------------------------------------------------------------------------------------------
# Raw XML text: start tags located by position, so values can be rewritten in place.
# ---------------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"<!--.*?-->|<\?.*?\?>|<!\[CDATA\[.*?\]\]>|<!DOCTYPE(?:[^\[>]|\[.*?\])*>"
    r"|</[^>]*>"
    r"|<(?P<name>[^\s/>!?]+)(?P<attrs>(?:[^>\"']|\"[^\"]*\"|'[^']*')*)>",
    re.S)
_ATTRIBUTE = re.compile(r"([^\s=/]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")


@dataclasses.dataclass
class _Element:
    """One start tag of a ForceField XML file: where it is and what it says."""

    tag: str
    path: tuple[str, ...]          # tags from below the root down to this element
    attrib: dict[str, str]         # attribute values, entities decoded
    spans: dict[str, tuple[int, int]]  # attribute -> (start, end) of its raw value text
    markup: list[tuple[int, int]]  # raw spans of the tagging attributes, leading space included
    line: int


def _scan(text: str, source: str) -> list[_Element]:
    """All elements of ``text`` in document order, with the positions of their attributes.

    The file is parsed twice: by ElementTree (well-formedness and decoded attribute values) and
    by a tokenizer that records where each start tag and attribute value sits in the raw text.
    Both must see the same sequence of elements.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InputError(f"{source}: not well-formed XML ({exc}); fix the file") from None
    tree_elements: list[tuple[ET.Element, tuple[str, ...]]] = []

    def walk(element: ET.Element, path: tuple[str, ...]) -> None:
        tree_elements.append((element, path))
        for child in element:
            walk(child, path + (child.tag,))

    walk(root, ())
    elements: list[_Element] = []
    # Line numbers counted on from the previous tag: counting from the top for every element
    # is quadratic in the file's size (minutes for charmm36.xml's 100 000 elements).
    line, counted = 1, 0
    for match in _TOKEN.finditer(text):
        if match.group("name") is None:
            continue
        offset = match.start("attrs")
        spans, markup = {}, []
        for attr in _ATTRIBUTE.finditer(match.group("attrs")):
            group = 2 if attr.group(2) is not None else 3
            spans[attr.group(1)] = (offset + attr.start(group), offset + attr.end(group))
            if attr.group(1) in _TAGGING:
                start = offset + attr.start()
                while text[start - 1].isspace():
                    start -= 1
                markup.append((start, offset + attr.end()))
        index = len(elements)
        if index >= len(tree_elements) or tree_elements[index][0].tag != match.group("name"):
            raise InputError(f"{source}: could not locate element {index} in the raw text; "
                             "remove DTD internal subsets or unusual markup from the file")
        element, path = tree_elements[index]
        line += text.count("\n", counted, match.start())
        counted = match.start()
        elements.append(_Element(element.tag, path, dict(element.attrib), spans, markup, line))
    if len(elements) != len(tree_elements):
        raise InputError(f"{source}: found {len(elements)} start tags in the text but "
                         f"{len(tree_elements)} elements; simplify the markup")
    return elements


_ITEM_NOUNS = {"Atom": "particle", "Bond": "bond", "Angle": "angle", "Proper": "torsion",
               "Improper": "torsion", "UreyBradley": "angle", "Torsion": "torsion"}
"""What OpenMM makes of an element, for the message about a site that nothing uses."""


def _identifier(element: _Element) -> tuple[str, str] | None:
    """(attribute description, value) naming the element in keys, ForceBalance style."""
    for name in ("type", "class", "name"):
        if name in element.attrib:
            return name, element.attrib[name]
    for prefix in ("type", "class"):
        names = [f"{prefix}{i}" for i in range(1, 5) if f"{prefix}{i}" in element.attrib]
        if names:
            return "/".join(names), ".".join(element.attrib[n] for n in names)
    return None


def _describe(element: _Element) -> str:
    """``<Atom type="tip3p-O">``: the element as a user recognises it in messages."""
    ident = _identifier(element)
    if ident is None:
        return f"<{element.tag}>"
    names = ident[0].split("/")
    inner = " ".join(f'{n}="{element.attrib[n]}"' for n in names)
    return f"<{element.tag} {inner}>"


def _usage(element: _Element) -> str:
    """'particle uses type tip3p-X': what a System item must match to use this element."""
    noun = _ITEM_NOUNS.get(element.tag, "System item")
    ident = _identifier(element)
    if ident is None:
        return f"{noun} uses it"
    return f"{noun} uses {ident[0].replace('/', '.')} {ident[1]}"


def _key(element: _Element, attribute: str) -> str:
    ident = _identifier(element)
    return f"{element.tag}/{attribute}" if ident is None else \
        f"{element.tag}/{attribute}/{ident[1]}"


def _split_top_level(text: str, separators: str) -> list[str]:
    """Split ``text`` at ``separators`` that are outside brackets and quotes.

    Quotes count only inside brackets (``PARM['key']``), so atom names with a prime
    (``parameterize="C1'/charge, C2'/charge"``) split as they read.
    """
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"" and depth > 0:
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch in separators and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


# ---------------------------------------------------------------------------------------------
# Tie expressions: a small, safe arithmetic language evaluated in torch.
# ---------------------------------------------------------------------------------------------

_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sqrt": safe_sqrt, "exp": torch.exp, "log": torch.log, "abs": torch.abs,
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan,
    "sinh": torch.sinh, "cosh": torch.cosh, "tanh": torch.tanh,
}
_CONSTANTS = {"pi": math.pi}
_BINARY = {ast.Add: torch.add, ast.Sub: torch.sub, ast.Mult: torch.mul, ast.Div: safe_div,
           ast.Pow: safe_pow}
"""Square roots, divisions and powers with finite derivatives where their values are finite
(:mod:`openmm_reversible.safe_math`): a tie ``sqrt(PARM['a']*PARM['b'])`` with a zero ``b``
has derivative 0 with respect to ``a``, not NaN."""

Env = Mapping[str, torch.Tensor]


class TieExpression:
    """A ``parameter_eval`` right-hand side, compiled to a torch function of other sites.

    Allowed: numbers, ``+ - * / **``, unary ``-``/``+``, parentheses, ``PARM['key']`` (or
    ForceBalance's ``PRM['key']``), the constant ``pi`` and the functions
    ``sqrt exp log abs sin cos tan sinh cosh tanh`` of one argument. Anything else is an
    InputError: expressions come from files and are never executed as Python.

    Parameters
    ----------
    text : str
        The expression, e.g. ``"-0.5*PARM['Atom/charge/tip3p-O']"``.
    where : str
        Where the expression comes from, for error messages.
    """

    def __init__(self, text: str, where: str):
        self.text = text
        self.where = where
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise InputError(f"{where}: cannot parse expression {text!r} ({exc.msg}); "
                             "write e.g. -0.5*PARM['Atom/charge/tip3p-O']") from None
        self.keys: list[str] = []
        self._function = self._compile(tree.body)

    def _reject(self, node: ast.AST) -> InputError:
        return InputError(
            f"{self.where}: {ast.unparse(node)!r} is not allowed in expression {self.text!r}; "
            "use numbers, + - * / **, PARM['key'], pi and "
            f"{', '.join(sorted(_FUNCTIONS))} of one argument")

    def _compile(self, node: ast.AST) -> Callable[[Env], torch.Tensor]:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = float(node.value)
            return lambda env: torch.tensor(value, dtype=DTYPE)
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            value = _CONSTANTS[node.id]
            return lambda env: torch.tensor(value, dtype=DTYPE)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            op, left, right = _BINARY[type(node.op)], self._compile(node.left), \
                self._compile(node.right)
            return lambda env: op(left(env), right(env))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            operand = self._compile(node.operand)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return lambda env: sign * operand(env)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) \
                and node.value.id in ("PARM", "PRM") and isinstance(node.slice, ast.Constant) \
                and isinstance(node.slice.value, str):
            key = node.slice.value
            self.keys.append(key)
            return lambda env: env[key]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _FUNCTIONS and len(node.args) == 1 and not node.keywords:
            function, argument = _FUNCTIONS[node.func.id], self._compile(node.args[0])
            return lambda env: function(argument(env))
        raise self._reject(node)

    def __call__(self, env: Env) -> torch.Tensor:
        return self._function(env)


# ---------------------------------------------------------------------------------------------
# Files and sites
# ---------------------------------------------------------------------------------------------


def _data_directories() -> list[str]:
    """Where OpenMM looks for force-field files given by name (bundled and plugin data)."""
    finder = getattr(openmm.app.forcefield, "_getDataDirectories", None)
    if finder is not None:
        return list(finder())
    return [os.path.join(os.path.dirname(openmm.app.__file__), "data")]


def _resolve(name: str | os.PathLike) -> Path:
    path = Path(name)
    if path.is_file():
        return path.resolve()
    for directory in _data_directories():
        candidate = Path(directory) / name
        if candidate.is_file():
            return candidate.resolve()
    raise InputError(f"force field file {str(name)!r} not found (neither a path nor one of "
                     "OpenMM's bundled files); check the name")


def is_bundled(path: str | os.PathLike) -> bool:
    """True if ``path`` lies in one of OpenMM's force-field data directories."""
    resolved = Path(path).resolve()
    return any(Path(d).resolve() in resolved.parents for d in _data_directories())


@dataclasses.dataclass
class _XmlFile:
    name: str    # as the user gave it
    path: Path   # resolved
    text: str
    elements: list[_Element]

    def where(self, element: _Element) -> str:
        return f"{self.path.name}:{element.line}"


def _residue_tags(xml: _XmlFile) -> list[tuple[str, str]]:
    """The tagging attributes on residue templates' ``<Atom>`` elements of one file, each as
    (``'water.xml:8: parameterize="charge" on <Atom name="O" type="w-O"> of <Residue
    name="HOH">'``, the same tag where OpenMM loads it: ``'<Residue name="HOH"
    parameterize="O/charge">'``)."""
    found = []
    residue = ""
    for element in xml.elements:
        if element.tag == "Residue":
            residue = element.attrib.get("name", "")
        if element.path[-2:] != ("Residue", "Atom"):
            continue
        for attribute in (PARAMETERIZE, PARAMETER_EVAL):
            if attribute in element.attrib:
                names = " ".join(f'{n}="{element.attrib[n]}"' for n in ("name", "type")
                                 if n in element.attrib)
                atom = element.attrib.get("name", "")
                entries = ", ".join(f"{atom}/{e}" for e in
                                    _split_top_level(element.attrib[attribute], ",;"))
                found.append((f'{xml.where(element)}: {attribute}="{element.attrib[attribute]}" '
                              f'on <Atom {names}> of <Residue name="{residue}">',
                              f'<Residue name="{residue}" {attribute}="{entries}">'))
    return found


_RESIDUE_TAG_FIX = (
    "OpenMM reads every attribute of a residue template's <Atom> as a number, so plain OpenMM "
    "cannot load such a file (\"could not convert string to float\"). Tag the value where the "
    "force defines it instead (e.g. charge on <NonbondedForce>'s <Atom type=...> with "
    "parameterize=\"charge\"); in Python a residue charge can be selected without a tag: "
    "ParameterSet.select(files, topology, select=[(\"Residue/Atom\", \"<type>\", "
    "\"charge\")])")


def residue_tag_error(xml_files: str | os.PathLike | Sequence[str | os.PathLike]
                      ) -> InputError | None:
    """The error that explains why OpenMM cannot load tagged files, if that is the reason.

    Parameters
    ----------
    xml_files : path or sequence of paths
        ForceField XML files (names of OpenMM's bundled files work too).

    Returns
    -------
    InputError or None
        Naming every ``parameterize``/``parameter_eval`` on a ``<Residue>``'s ``<Atom>``
        (file and line) and the fix; None when there is none (or a file cannot be read).
    """
    names = [xml_files] if isinstance(xml_files, str | os.PathLike) else list(xml_files)
    found = []
    for name in names:
        try:
            path = _resolve(name)
            text = path.read_text(encoding="utf-8")
            found += _residue_tags(_XmlFile(str(name), path, text, _scan(text, path.name)))
        except (InputError, OSError, UnicodeDecodeError):
            continue
    if not found:
        return None
    # Keys change with the move (Residue/<residue>/<atom>/<attribute>), so PARM[...] in ties
    # that read these sites must be renamed too; the message says so.
    instead = (f"Tag the <Residue> instead, naming the atom (OpenMM loads that): "
               f"{found[0][1]}, and so on; the keys become Residue/<residue>/<atom>/<attribute> "
               "(rename them in PARM[...]). ")
    return InputError("; ".join(f for f, _ in found) + ". " + instead + _RESIDUE_TAG_FIX)


@dataclasses.dataclass(frozen=True)
class Site:
    """One XML number that the ParameterSet controls.

    Attributes
    ----------
    key : str
        ``Tag/attribute/identifier``, the name of the site (e.g. ``'Atom/sigma/tip3p-O'``).
    element : str
        The element as written, e.g. ``'<Atom type="tip3p-O">'`` (the first one if merged).
    attribute : str
        The XML attribute (``'sigma'``).
    start : float
        Value the System is built with, in the attribute's MD unit.
    expression : str or None
        The tie expression, or None for a trainable site.
    locations : tuple of (int, int, int)
        (file index, start, end) of every raw attribute value this site writes.
    """

    key: str
    element: str
    attribute: str
    start: float
    expression: str | None
    locations: tuple[tuple[int, int, int], ...] = dataclasses.field(compare=False)
    usage: str = dataclasses.field(default="", compare=False, repr=False)

    @property
    def trainable(self) -> bool:
        return self.expression is None


Selection = tuple[str, str, str | Sequence[str]]
"""(element path, identifier, attribute or attributes): ``("NonbondedForce/Atom", "tip3p-O",
("sigma", "epsilon"))``. The path is matched against the trailing tags of the element's
position (``"Atom"``, ``"Residue/Atom"``, ``"NonbondedForce/Atom"``). On ``"Residue"`` the
identifier is the template's name and each attribute ``atom/attribute``: ``("Residue", "ALA",
"CB/charge")`` is the site ``Residue/ALA/CB/charge``."""


def _residue_key(residue: str, atom: str, attribute: str) -> str:
    """``Residue/ALA/CB/charge``: the key of a residue template's atom's attribute."""
    return f"Residue/{residue}/{atom}/{attribute}"


def _residue_key_parts(key: str) -> tuple[str, str, str] | None:
    """(residue, atom, attribute) of a key made by :func:`_residue_key`, else None."""
    parts = key.split("/")
    return (parts[1], parts[2], parts[3]) if len(parts) == 4 and parts[0] == "Residue" else None


@dataclasses.dataclass
class _Mark:
    """How one attribute of one element is marked: trainable (expression None) or tied.

    ``residue`` is the template's name when the mark was made on a ``<Residue>`` for one of its
    atoms (the key is then ``Residue/<residue>/<atom>/<attribute>``).
    """

    file: int
    element: _Element
    attribute: str
    expression: str | None
    how: str  # 'parameterize', 'parameter_eval', 'select' or 'conserve_charge', for messages
    residue: str | None = None

    @property
    def key(self) -> str:
        if self.residue is None:
            return _key(self.element, self.attribute)
        return _residue_key(self.residue, self.element.attrib["name"], self.attribute)

    def describe(self) -> str:
        """The element as a user recognises it in messages."""
        if self.residue is None:
            return _describe(self.element)
        return f'<Atom name="{self.element.attrib["name"]}"> of <Residue name="{self.residue}">'

    def usage(self) -> str:
        if self.residue is None:
            return _usage(self.element)
        return f"residue uses template {self.residue}"


def _residue_atoms(xml: _XmlFile, index: int) -> dict[str, _Element]:
    """The ``<Atom>`` children of the ``<Residue>`` at ``xml.elements[index]``, by name."""
    depth = len(xml.elements[index].path)
    atoms = {}
    for element in xml.elements[index + 1:]:
        if len(element.path) <= depth:
            break
        if len(element.path) == depth + 1 and element.tag == "Atom" and "name" in element.attrib:
            atoms[element.attrib["name"]] = element
    return atoms


def _residue_mark(file: int, xml: _XmlFile, index: int, entry: str, expression: str | None,
                  how: str, what: str) -> _Mark:
    """The mark that ``entry`` (``"CB/charge"``) on the ``<Residue>`` at ``index`` makes.

    ``what`` says where the entry comes from, for messages (``"ala.xml:44: parameterize
    names 'CB/charge' on <Residue name="ALA">"``).
    """
    residue = xml.elements[index].attrib.get("name", "")
    atom_name, _, attribute = entry.partition("/")
    atom_name, attribute = atom_name.strip(), attribute.strip()
    if not atom_name or not attribute:
        if how == "select":
            example = f"('Residue', '{residue}', 'CB/charge')"
        else:
            example = f"{how}=\"CB/charge\"" if expression is None else \
                f"{how}=\"CB/charge=PARM['Residue/{residue}/CA/charge']\""
        raise InputError(f"{what}: a residue template's entry names the atom and the "
                         f"attribute; write e.g. {example}")
    atoms = _residue_atoms(xml, index)
    if atom_name not in atoms:
        raise InputError(f"{what}, but it has no <Atom name=\"{atom_name}\">; its atoms are "
                         f"{', '.join(atoms) or '(none)'}")
    atom = atoms[atom_name]
    present = [a for a in atom.attrib if a not in ("name", "type") + _TAGGING]
    if attribute not in present:
        atom_type = atom.attrib.get("type", "?")
        hint = (f"; it has {', '.join(present)}" if present else
                f": this force field keeps no parameters on residue templates' atoms; tag "
                f"{attribute} where its force defines it (parameterize=\"{attribute}\" on the "
                f"force's <Atom type=\"{atom_type}\">, key 'Atom/{attribute}/{atom_type}')")
        raise InputError(f"{what}, but its <Atom name=\"{atom_name}\" type=\"{atom_type}\"> has "
                         f"no {attribute}{hint}")
    return _Mark(file, atom, attribute, expression, how, residue)


def _residue_what(xml: _XmlFile, element: _Element, how: str, entry: str) -> str:
    verb = "names" if how == PARAMETERIZE else "sets"
    return (f"{xml.where(element)}: {how} {verb} {entry!r} on "
            f"<Residue name=\"{element.attrib.get('name', '')}\">")


def _tagged_marks(index: int, xml: _XmlFile) -> list[_Mark]:
    marks = []
    for position, element in enumerate(xml.elements):
        residue = element.tag == "Residue"
        for attribute in _split_top_level(element.attrib.get(PARAMETERIZE, ""), ","):
            if residue:
                marks.append(_residue_mark(index, xml, position, attribute, None, PARAMETERIZE,
                                           _residue_what(xml, element, PARAMETERIZE, attribute)))
            else:
                marks.append(_Mark(index, element, attribute, None, PARAMETERIZE))
        for field in _split_top_level(element.attrib.get(PARAMETER_EVAL, ""), ",;"):
            attribute, sep, expression = field.partition("=")
            if not sep or not expression.strip():
                example = "CB/charge=PARM['Residue/ALA/CB/charge']" if residue else \
                    "charge=-0.5*PARM['Atom/charge/tip3p-O']"
                raise InputError(f"{xml.where(element)}: parameter_eval entry {field!r} of "
                                 f"{_describe(element)} is not of the form "
                                 f"attribute=expression; write e.g. {example}")
            if residue:
                what = _residue_what(xml, element, PARAMETER_EVAL, attribute.strip())
                marks.append(_residue_mark(index, xml, position, attribute, expression.strip(),
                                           PARAMETER_EVAL, what))
            else:
                marks.append(_Mark(index, element, attribute.strip(), expression.strip(),
                                   PARAMETER_EVAL))
    return marks


def _path_matches(element: _Element, pattern: str) -> bool:
    wanted = tuple(p for p in pattern.split("/") if p)
    return len(wanted) <= len(element.path) and element.path[len(element.path)
                                                             - len(wanted):] == wanted


def _no_match_hint(ident: str, seen: list[str], path: str) -> str:
    """What the identifiers at ``path`` are, for a selection that matched none."""
    if not seen:
        return f"no element is at {path}; paths look like 'NonbondedForce/Atom'"
    names = list(dict.fromkeys(seen))
    if len(names) <= _LISTED:
        return f"identifiers at {path}: {', '.join(names)}"
    close = difflib.get_close_matches(ident, names, n=3)
    return (f"did you mean {' or '.join(map(repr, close))}? " if close else "") + \
        f"({len(names)} identifiers at {path}: {', '.join(names[:_LISTED])}, ...)"


_LISTED = 20
"""Most identifiers a message lists (amber14 has hundreds of residue templates)."""


def _selected_marks(files: list[_XmlFile], selection: Iterable[Selection],
                    ties: Mapping[tuple[str, str, str], str]) -> list[_Mark]:
    requests = [(path, ident, attr, None) for path, ident, attrs in selection
                for attr in ([attrs] if isinstance(attrs, str) else attrs)]
    requests += [(path, ident, attr, expr) for (path, ident, attr), expr in ties.items()]
    marks = []
    for path, ident, attribute, expression in requests:
        found, seen = [], []
        for index, xml in enumerate(files):
            for position, element in enumerate(xml.elements):
                if not _path_matches(element, path):
                    continue
                element_ident = _identifier(element)
                seen.append("(none)" if element_ident is None else element_ident[1])
                if (element_ident[1] if element_ident else "") != ident:
                    continue
                if element.tag == "Residue":
                    what = (f"{xml.where(element)}: selection ({path!r}, {ident!r}, "
                            f"{attribute!r}) on <Residue name=\"{ident}\">")
                    found.append(_residue_mark(index, xml, position, attribute, expression,
                                               "select", what))
                else:
                    found.append(_Mark(index, element, attribute, expression, "select"))
        if not found:
            raise InputError(f"selection ({path!r}, {ident!r}, {attribute!r}) matches no "
                             f"element; {_no_match_hint(ident, seen, path)}")
        marks.extend(found)
    return marks


def _conserved_residues(files: list[_XmlFile], names: Iterable[str]
                        ) -> list[tuple[int, int]]:
    """(file, element index) of the ``<Residue>`` templates whose net charge is kept: those
    with ``conserve_charge="true"`` and those named in ``names``."""
    chosen, named = [], dict.fromkeys(names)
    templates = []
    for file, xml in enumerate(files):
        for index, element in enumerate(xml.elements):
            if element.tag != "Residue":
                continue
            name = element.attrib.get("name", "")
            templates.append(name)
            flag = element.attrib.get(CONSERVE_CHARGE, "false").strip().lower()
            if flag not in ("true", "false"):
                raise InputError(f"{xml.where(element)}: {CONSERVE_CHARGE}="
                                 f"{element.attrib[CONSERVE_CHARGE]!r} on <Residue "
                                 f"name=\"{name}\">; write \"true\" or \"false\"")
            if flag == "true" or name in named:
                chosen.append((file, index))
    for name in named:
        if name not in templates:
            raise InputError(f"conserve_charge names residue {name!r}, but no <Residue> of the "
                             f"files has that name; {_no_match_hint(name, templates, 'Residue')}")
    return chosen


def _compensation_marks(files: list[_XmlFile], marks: list[_Mark],
                        residues: list[tuple[int, int]]) -> list[_Mark]:
    """Ties that keep each conserved residue's net charge (module docstring).

    Every charged ``<Atom>`` of the template that no mark sets gets the tie
    ``q⁰ − Σ_t (PARM[t] − q_t⁰) / n`` over the marked atoms ``t`` (the files' values ``q⁰``).
    """
    charge_marks = {(m.file, id(m.element)): m for m in marks
                    if m.attribute == "charge" and "charge" in m.element.attrib}
    found = []
    for file, index in residues:
        xml = files[file]
        element = xml.elements[index]
        name = element.attrib.get("name", "")
        where = f"{xml.where(element)}: {CONSERVE_CHARGE} on <Residue name=\"{name}\">"
        atoms = [a for a in _residue_atoms(xml, index).values() if "charge" in a.attrib]
        marked = [charge_marks[(file, id(a))] for a in atoms if (file, id(a)) in charge_marks]
        free = [a for a in atoms if (file, id(a)) not in charge_marks]
        if not marked:
            raise InputError(f"{where}, but none of its charges is a parameter; tag one "
                             f"(parameterize=\"{atoms[0].attrib['name'] if atoms else 'CB'}"
                             f"/charge\" on the <Residue>) or remove {CONSERVE_CHARGE}")
        if not free:
            raise InputError(f"{where}, but every charge of it is a parameter, so no atom is "
                             "left to compensate; leave one untagged, or drop "
                             f"{CONSERVE_CHARGE} and tie the charges so that they keep the sum")
        shift = " + ".join(f"(PARM[{m.key!r}] - ({format_value(_number(xml, m))}))"
                           for m in marked)
        for atom in free:
            mark = _Mark(file, atom, "charge", None, CONSERVE_CHARGE, name)
            mark.expression = f"{format_value(_number(xml, mark))} - ({shift}) / {len(free)}"
            found.append(mark)
    return found


def _number(xml: _XmlFile, mark: _Mark) -> float:
    """The marked attribute's value in the file, or an InputError naming it."""
    try:
        return float(mark.element.attrib[mark.attribute])
    except ValueError:
        raise InputError(f"{xml.where(mark.element)}: {mark.attribute}="
                         f"{mark.element.attrib[mark.attribute]!r} of {mark.describe()} is "
                         "not a number, so it cannot be a parameter; remove it from "
                         f"{mark.how}") from None


def _build_sites(files: list[_XmlFile], marks: list[_Mark]) -> list[Site]:
    """Check the marks and merge them into sites, in document order (the ties that conserve
    residue charges last)."""
    by_attribute: dict[tuple[int, int, str], _Mark] = {}
    for mark in marks:
        xml, element = files[mark.file], mark.element
        if mark.attribute not in element.attrib or mark.attribute in _TAGGING:
            ident = _identifier(element)
            present = [a for a in element.attrib if a not in _TAGGING
                       and (ident is None or a not in ident[0].split("/"))]
            verb = "names" if mark.how == PARAMETERIZE else "sets"
            raise InputError(f"{xml.where(element)}: {mark.how} {verb} {mark.attribute!r} but "
                             f"{_describe(element)} has attributes {', '.join(present)}")
        _number(xml, mark)
        slot = (mark.file, id(element), mark.attribute)
        previous = by_attribute.get(slot)
        if previous is not None and previous.expression != mark.expression:
            raise InputError(f"{xml.where(element)}: {mark.attribute!r} of "
                             f"{mark.describe()} is marked both trainable and tied "
                             f"({previous.how} and {mark.how}); keep one")
        if previous is not None and previous.key != mark.key:
            raise InputError(f"{xml.where(element)}: {mark.attribute!r} of {mark.describe()} "
                             f"is marked as {previous.key!r} ({previous.how}) and as "
                             f"{mark.key!r} ({mark.how}); keep one")
        by_attribute[slot] = mark
    ordered = sorted(by_attribute.values(),
                     key=lambda m: (m.how == CONSERVE_CHARGE, m.file,
                                    m.element.spans[m.attribute][0]))
    groups: dict[str, list[_Mark]] = {}
    for mark in ordered:
        groups.setdefault(mark.key, []).append(mark)
    sites = []
    for key, group in groups.items():
        first = group[0]
        for other in group[1:]:
            # A shared tie overwrites every copy, so only trainable copies must agree in value.
            if other.expression != first.expression or first.expression is None and \
                    float(other.element.attrib[other.attribute]) != \
                    float(first.element.attrib[first.attribute]):
                raise InputError(
                    f"key {key!r} is ambiguous: {files[first.file].where(first.element)} "
                    f"{first.describe()} and {files[other.file].where(other.element)} "
                    f"{other.describe()} both yield it but differ in value or tie; "
                    "give the elements the same value and tag, or distinct types")
        sites.append(Site(
            key=key, element=first.describe(), attribute=first.attribute,
            start=float(first.element.attrib[first.attribute]), expression=first.expression,
            locations=tuple((m.file, *m.element.spans[m.attribute]) for m in group),
            usage=first.usage()))
    return sites


def _tie_order(sites: list[Site], ties: dict[int, TieExpression],
               templates: Sequence[str] = ()) -> list[int]:
    """Indices of tied sites so that every tie comes after the sites it reads.

    ``templates`` are the names of the files' ``<Residue>`` templates, for the message about a
    ``PARM['Residue/<residue>/<atom>/<attribute>']`` that is not a site.
    """
    index = {site.key: i for i, site in enumerate(sites)}
    for tie in ties.values():
        for key in tie.keys:
            if key in index:
                continue
            parts = _residue_key_parts(key)
            if parts is not None and parts[0] not in templates:
                fix = (f"the files have no <Residue name=\"{parts[0]}\">; "
                       f"{_no_match_hint(parts[0], list(templates), 'Residue')}")
            elif parts is not None:
                fix = (f"tag it with parameterize=\"{parts[1]}/{parts[2]}\" on <Residue "
                       f"name=\"{parts[0]}\">")
            else:
                fix = "tag that attribute with parameterize"
            raise InputError(f"{tie.where}: PARM[{key!r}] is not a site; {fix} "
                             f"(sites: {', '.join(index)})")
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, chain: tuple[str, ...]) -> None:
        if state.get(i) == "done" or i not in ties:
            return
        if state.get(i) == "open":
            raise InputError(f"ties form a cycle: {' -> '.join(chain + (sites[i].key,))}; "
                             "make one of them trainable")
        state[i] = "open"
        for key in ties[i].keys:
            visit(index[key], chain + (sites[i].key,))
        state[i] = "done"
        order.append(i)

    for i in ties:
        visit(i, ())
    return order


def _substitute(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Replace the raw spans ``(start, end)`` of ``text`` by new strings, back to front."""
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def format_value(value: float) -> str:
    """Shortest decimal text that reads back as the same float64."""
    return repr(float(value))


# ---------------------------------------------------------------------------------------------
# Mapping sites to System items
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Binding:
    """Entries ``(items, column)`` of table ``table`` of the term for force ``force_index``
    equal ``scales * sites[site]``."""

    force_index: int
    force: str
    table: str
    column: int
    site: int
    items: np.ndarray
    scales: np.ndarray


def _terms(system: openmm.System) -> dict[int, Term]:
    """The torch term of every non-ignored force of ``system``, by force index."""
    from .potential import build_term
    terms = {}
    for index, force in enumerate(system.getForces()):
        term = build_term(force, index, system)
        if term is not None:
            terms[index] = term
    return terms


def _constraint_distances(system: openmm.System) -> np.ndarray:
    """Distance of every constraint of ``system``, nm, in constraint order."""
    return np.array([system.getConstraintParameters(k)[2].value_in_unit(openmm.unit.nanometer)
                     for k in range(system.getNumConstraints())], dtype=np.float64)


def _constraint_error(site: Site, n_changed: int) -> InputError:
    verb = "parameterize names" if site.trainable else "parameter_eval sets"
    return InputError(
        f"{verb} {site.attribute!r} on {site.element}, but with this System's constraints "
        f"(rigid water or constraints=HBonds) OpenMM turns it into {n_changed} constraint "
        "distance(s): the dynamics hold those fixed and give it no gradient. Train it in a "
        "flexible model (rigidWater=False, constraints=None; config: system.rigid_water = "
        f"false, system.constraints = \"none\"), or remove {site.attribute!r} from "
        "parameterize")


def _free_tables(term: Term) -> dict[str, np.ndarray]:
    """Base arrays of the tables that mapping may bind (derived tables excluded)."""
    return {name: table.base.detach().cpu().numpy() for name, table in term.tables.items()
            if name not in term.derived_tables}


def _zero_start_warning(site: Site) -> str:
    return (f"{site.key} ({site.element}) is tagged for training but starts at 0: it cannot move "
            "relative to its start value, so it moves additively, by steps of the learning rate "
            "in MD units; and where it enters the energy as a factor of a combining rule at 0 "
            "(the square root of a zero well depth, sqrt(epsilon1*epsilon2)) its gradient is 0 "
            "and it never moves. Start it at a small nonzero value (e.g. 1e-3), or remove "
            f"{site.attribute!r} from parameterize")


class ParameterSet(nn.Module):
    """Force-field parameter sites as a torch module; ``forward()`` returns their values.

    Build it with :meth:`from_forcefield` (tags in the XML) or :meth:`select` (a selection
    in Python). ``.system`` is the OpenMM System created from the files (OpenMM does the
    template matching); ``TorchPotential(ps.system, parameters=ps)`` binds the sites into the
    torch terms.

    Attributes
    ----------
    sites : list of Site
        All sites, trainable and tied, in document order.
    system : openmm.System
        The System built from the files with the tied values evaluated.
    scaled : torch.nn.Parameter, shape (n_trainable,)
        The trainable variables, 1.0 at the start (see the module docstring).
    """

    def __init__(self, files: list[_XmlFile], sites: list[Site], topology: openmm.app.Topology,
                 create_system_kwargs: dict):
        super().__init__()
        self._files = files
        self.sites = sites
        self.topology = topology
        self.create_system_kwargs = dict(create_system_kwargs)
        self._ties = {i: TieExpression(s.expression, f"{s.key} ({s.element})")
                      for i, s in enumerate(sites) if s.expression is not None}
        templates = [e.attrib.get("name", "") for f in files for e in f.elements
                     if e.tag == "Residue"]
        self._tie_order = _tie_order(sites, self._ties, templates)
        trainable = [i for i, s in enumerate(sites) if s.trainable]
        start = torch.tensor([sites[i].start for i in trainable], dtype=DTYPE)
        self.register_buffer("_trainable_index", torch.tensor(trainable, dtype=torch.long))
        self.register_buffer("_reference", torch.where(start != 0, start, torch.ones_like(start)))
        self.register_buffer("_offset", torch.where(start != 0, torch.zeros_like(start),
                                                    -torch.ones_like(start)))
        self.scaled = nn.Parameter(torch.ones_like(start))
        for site in sites:
            if site.trainable and site.start == 0:
                warnings.warn(_zero_start_warning(site), UserWarning, stacklevel=2)
        # Ties are evaluated once so the System is built with the values forward() returns.
        with torch.no_grad():
            current = self.forward().tolist()
        self.sites = [dataclasses.replace(s, start=v) if not s.trainable else s
                      for s, v in zip(sites, current, strict=True)]
        self.system = self.create_system()
        self._bindings: list[Binding] | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_forcefield(cls, xml_files: str | os.PathLike | Sequence[str | os.PathLike],
                        topology: openmm.app.Topology, **create_system_kwargs) -> ParameterSet:
        """Sites tagged in ``xml_files`` (``parameterize`` / ``parameter_eval``).

        Parameters
        ----------
        xml_files : path or sequence of paths
            ForceField XML files, in the order ``openmm.app.ForceField`` should load them;
            names of OpenMM's bundled files (``"tip3p.xml"``) work too.
        topology : openmm.app.Topology
            The system to build.
        **create_system_kwargs
            Passed to ``ForceField.createSystem`` (``nonbondedMethod``, ``rigidWater``, ...).
        """
        return cls.select(xml_files, topology, (), None, (), **create_system_kwargs)

    @classmethod
    def select(cls, xml_files: str | os.PathLike | Sequence[str | os.PathLike],
               topology: openmm.app.Topology, select: Iterable[Selection] = (),
               ties: Mapping[tuple[str, str, str], str] | None = None,
               conserve_charge: Iterable[str] = (),
               **create_system_kwargs) -> ParameterSet:
        """Sites chosen in Python, in addition to any tags in the files.

        ``select=[("NonbondedForce/Atom", "tip3p-O", ("sigma", "epsilon"))]`` and
        ``ties={("Residue/Atom", "tip3p-H", "charge"): "-0.5*PARM['Atom/charge/tip3p-O']"}``
        give the same ParameterSet as the equivalent ``parameterize`` and ``parameter_eval``
        tags. A residue template's atom is selected on its ``<Residue>``, by residue name and
        ``atom/attribute``: ``select=[("Residue", "ALA", "CB/charge")]`` is the site
        ``Residue/ALA/CB/charge``, as ``<Residue name="ALA" parameterize="CB/charge">``.

        Parameters
        ----------
        xml_files, topology, **create_system_kwargs
            As in :meth:`from_forcefield`.
        select : iterable of (str, str, str or sequence of str)
            (element path, identifier, attributes) of the trainable sites.
        ties : mapping of (str, str, str) to str, optional
            (element path, identifier, attribute) -> tie expression.
        conserve_charge : iterable of str
            Names of residue templates whose net charge is kept, as with
            ``<Residue conserve_charge="true">`` (module docstring).
        """
        names = [xml_files] if isinstance(xml_files, str | os.PathLike) else list(xml_files)
        if not names:
            raise InputError("no force field files given; pass e.g. ['my_water.xml']")
        files = []
        for name in names:
            path = _resolve(name)
            with open(path, encoding="utf-8", newline="") as handle:  # keep line endings
                text = handle.read()
            files.append(_XmlFile(str(name), path, text, _scan(text, path.name)))
        marks = [m for i, xml in enumerate(files) for m in _tagged_marks(i, xml)]
        marks += _selected_marks(files, select, ties or {})
        marks += _compensation_marks(files, marks, _conserved_residues(files, conserve_charge))
        sites = _build_sites(files, marks)
        if not sites:
            raise InputError(f"no parameters to train in {', '.join(names)}: tag attributes "
                             "with parameterize=\"sigma, epsilon\" or pass select=[...]")
        for index in {loc[0] for s in sites for loc in s.locations}:
            includes = [e.attrib.get("file", "") for e in files[index].elements
                        if e.tag == "Include"]
            if includes:
                raise InputError(f"{files[index].path.name} has parameters and includes "
                                 f"{', '.join(includes)}; pass the included files to "
                                 "xml_files directly")
        return cls(files, sites, topology, create_system_kwargs)

    # -- values ---------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Keys of all sites, in the order of ``forward()``."""
        return [s.key for s in self.sites]

    @property
    def trainable_keys(self) -> list[str]:
        return [s.key for s in self.sites if s.trainable]

    @property
    def files(self) -> list[Path]:
        """The resolved force field files, in load order."""
        return [f.path for f in self._files]

    def trainable_values(self) -> torch.Tensor:
        """Current values of the trainable sites, in :attr:`trainable_keys` order (MD units),
        differentiable in :attr:`scaled`."""
        return self._reference * self.scaled + self._offset

    def scaled_for(self, values: torch.Tensor) -> torch.Tensor:
        """The scaled variables at which the trainable sites take ``values`` (MD units)."""
        return (values - self._offset) / self._reference

    def forward(self) -> torch.Tensor:
        """Current values of all sites, shape (n_sites,), MD units, differentiable."""
        trainable = self.trainable_values()
        values: list[torch.Tensor | None] = [None] * len(self.sites)
        for j, i in enumerate(self._trainable_index.tolist()):
            values[i] = trainable[j]
        env = {self.sites[i].key: v for i, v in enumerate(values) if v is not None}
        for i in self._tie_order:
            values[i] = self._ties[i](env).to(trainable)
            env[self.sites[i].key] = values[i]
        return torch.stack(values) if values else trainable

    def values(self) -> dict[str, float]:
        """Current value of every site, keyed by site key."""
        with torch.no_grad():
            return dict(zip(self.names, self.forward().tolist(), strict=True))

    def set_values(self, values: Mapping[str, float]) -> None:
        """Set trainable sites to the given values (MD units); tied ones follow.

        The scaled variables are set to ``value / start``, so :meth:`values` returns the value
        to within one rounding of that product.

        Raises
        ------
        InputError
            For an unknown key or a tied site.
        """
        position = {s.key: j for j, s in enumerate(s for s in self.sites if s.trainable)}
        for key, value in values.items():
            if key not in position:
                tied = key in self.names
                raise InputError(
                    f"cannot set {key!r}: " + ("it is tied (parameter_eval); set the sites its "
                                               "expression reads" if tied else
                                               f"no such site; sites are {', '.join(self.names)}"))
            j = position[key]
            with torch.no_grad():
                self.scaled[j] = (float(value) - self._offset[j]) / self._reference[j]

    def texts(self, values: Mapping[str, float] | None = None, strip_markup: bool = False
              ) -> list[str]:
        """The files' text with site values written in; everything else unchanged.

        A value equal (as a float) to the number already in the file keeps its original text.

        Parameters
        ----------
        values : mapping of str to float, optional
            Values by key; the current values for the keys not given.
        strip_markup : bool
            Also remove the ``parameterize``/``parameter_eval``/``conserve_charge`` attributes
            (OpenMM reads every attribute of a residue template's ``<Atom>`` as a number, so it
            cannot load them there).
        """
        current = self.values() | dict(values or {})
        edits: list[list[tuple[int, int, str]]] = [[] for _ in self._files]
        for site in self.sites:
            for file, start, end in site.locations:
                old = self._files[file].text[start:end]
                if float(old) != current[site.key]:
                    edits[file].append((start, end, format_value(current[site.key])))
        if strip_markup:
            for file, xml in enumerate(self._files):
                edits[file] += [(start, end, "") for element in xml.elements
                                for start, end in element.markup]
        return [_substitute(f.text, e) for f, e in zip(self._files, edits, strict=True)]

    def site_files(self) -> list[int]:
        """Indices (into :attr:`files`) of the files that hold sites."""
        return sorted({loc[0] for s in self.sites for loc in s.locations})

    def create_system(self) -> openmm.System:
        """A new OpenMM System built from the files with the current values written in."""
        return self._create_system(self.texts(strip_markup=True))

    def _create_system(self, texts: list[str]) -> openmm.System:
        holding = set(self.site_files()) | {i for i, f in enumerate(self._files)
                                            if any(e.markup for e in f.elements)}
        sources = [io.StringIO(t) if i in holding else str(f.path)
                   for i, (f, t) in enumerate(zip(self._files, texts, strict=True))]
        forcefield = openmm.app.ForceField(*sources)
        return forcefield.createSystem(self.topology, **self.create_system_kwargs)

    # -- mapping to the torch terms -----------------------------------------------------------

    def bindings(self) -> list[Binding]:
        """Which table entries each site sets, found by perturbing it (cached).

        For each site the System is rebuilt with only that XML number changed (by a factor
        1.25, or to 0.125 from zero), the torch terms are built for it and their non-derived
        tables compared with the unperturbed ones. Every changed entry must be
        ``scale * value`` with the same scale at both values.
        """
        if self._bindings is None:
            baseline = _terms(self.system)
            base_tables = {i: _free_tables(t) for i, t in baseline.items()}
            # From a System rebuilt at the start values, not self.system, which a caller may
            # have edited (e.g. its constraint distances) after it was built.
            distances = _constraint_distances(self._create_system(self.texts(
                {s.key: s.start for s in self.sites}, strip_markup=True)))
            bindings = []
            for index, site in enumerate(self.sites):
                bindings += self._map_site(index, site, baseline, base_tables, distances)
            self._bindings = bindings
        return self._bindings

    def _map_site(self, index: int, site: Site, baseline: dict[int, Term],
                  base_tables: dict[int, dict[str, np.ndarray]], distances: np.ndarray
                  ) -> list[Binding]:
        value = site.start
        moved = value * _PERTURBATION if value != 0 else _PERTURBATION - 1.0
        try:
            # Every other site at the value self.system was built with, whatever the current
            # values are, so that only this number differs from the baseline.
            system = self._create_system(self.texts(
                {s.key: s.start for s in self.sites} | {site.key: moved}, strip_markup=True))
        except Exception as exc:
            raise InputError(f"{site.key}: OpenMM cannot build the System with {site.attribute}"
                             f"={moved!r} on {site.element} ({exc}); this attribute cannot be "
                             "a continuous parameter") from None
        moved_distances = _constraint_distances(system)
        if moved_distances.shape != distances.shape:
            raise InputError(f"{site.key}: perturbing it changed the number of constraints of "
                             f"the System ({distances.size} -> {moved_distances.size}); it "
                             "cannot be a parameter")
        changed = int(np.count_nonzero(moved_distances != distances))
        if changed:
            raise _constraint_error(site, changed)
        perturbed = _terms(system)
        found = []
        for force_index, tables in base_tables.items():
            term = perturbed.get(force_index)
            name = baseline[force_index].name
            if term is None or term.name != name:
                raise InputError(f"{site.key}: perturbing it changed the forces of the System "
                                 f"(force {force_index}, {name}); it cannot be a parameter")
            for table, base in tables.items():
                new = term.tables[table].base.detach().cpu().numpy()
                if new.shape != base.shape:
                    raise InputError(f"{site.key}: perturbing it changed the number of items "
                                     f"of {name} table {table!r} ({base.shape[0]} -> "
                                     f"{new.shape[0]}); it cannot be a parameter")
                items, columns = np.nonzero(new != base)
                if items.size == 0:
                    continue
                scales = new[items, columns] / moved
                if value == 0:
                    linear = base[items, columns] == 0
                else:
                    linear = np.isclose(base[items, columns] / value, scales, rtol=_SCALE_RTOL,
                                        atol=0.0)
                if not linear.all():
                    k = int(np.argmin(linear))
                    raise InputError(
                        f"{site.key}: {name} table {table!r} column "
                        f"{term.tables[table].columns[columns[k]]!r} item {items[k]} is not "
                        f"proportional to {site.attribute} ({base[items[k], columns[k]]!r} at "
                        f"{value!r}, {new[items[k], columns[k]]!r} at {moved!r}); the torch "
                        "term must store the XML value times a constant")
                for column in np.unique(columns):
                    chosen = columns == column
                    found.append(Binding(force_index, name, table, int(column), index,
                                         items[chosen], scales[chosen]))
        if not found:
            verb = "parameterize names" if site.trainable else "parameter_eval sets"
            constrained = ""
            if distances.size and site.key.startswith(("Bond/", "Angle/")):
                constrained = (f" (this System has {distances.size} constraints: OpenMM leaves "
                               "the bonds and angles it constrains out of the bonded forces, "
                               "so their parameters do not enter it; train them in a flexible "
                               "model, rigidWater=False, constraints=None)")
            raise InputError(
                f"{verb} {site.attribute!r} on {site.element} but no {site.usage} in this "
                f"System{constrained}; remove the tag, or build a topology that contains it")
        return found

    def bind(self, potential: TorchPotential) -> None:
        """Bind every site into the tables of ``potential``'s terms.

        Parameters
        ----------
        potential : openmm_reversible.potential.TorchPotential
            Built from :attr:`system` (or a System with the same forces and parameters).
        """
        for binding in self.bindings():
            try:
                term = potential.term_for_force(binding.force_index)
            except KeyError:
                term = None
            if term is None or term.name != binding.force or binding.table not in term.tables:
                raise InputError(f"the potential has no {binding.force} at force index "
                                 f"{binding.force_index}; build it from parameter_set.system")
            table = term.tables[binding.table]
            start = self.sites[binding.site].start
            got = table.base[binding.items, binding.column].detach().cpu().numpy()
            if not np.allclose(got, binding.scales * start, rtol=_SCALE_RTOL, atol=0.0):
                raise InputError(f"the potential's {binding.force} table {binding.table!r} "
                                 f"does not hold {self.sites[binding.site].key} = {start!r}; "
                                 "build it from parameter_set.system")
            table.bind(binding.items, binding.column, binding.site, binding.scales)

    def extra_repr(self) -> str:
        return f"sites={len(self.sites)}, trainable={len(self.trainable_keys)}"


__all__ = ["ParameterSet", "Site", "Binding", "Selection", "TieExpression", "format_value",
           "is_bundled", "PARAMETERIZE", "PARAMETER_EVAL"]
