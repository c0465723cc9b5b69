"""A ForceField XML tag for learned potentials: ``<TorchPotential>``.

Importing :mod:`openmm_reversible_plugin` registers a generator for this tag with OpenMM's
``openmm.app.forcefield.parsers``, after which ::

    ForceField("trained.xml").createSystem(topology)

adds the learned model to the System (as a TorchForce, or a PythonForce without
openmm-torch; see :mod:`.forces`). The tag::

    <TorchPotential file="model.pt" periodic="true">
      <Type type="C" index="0"/>
    </TorchPotential>

- ``file``: a TorchScript file (``torch.jit.save``) holding a contract model
  ``model(positions, box, atom_types)``; an absolute path or one relative to the working
  directory. Instead of ``file`` the model may be embedded as base64 text inside the tag
  (``encoding="base64"``), which keeps the XML self-contained (:func:`write_forcefield`).
- ``periodic``: ``true``/``false``; when omitted, periodic iff createSystem's nonbonded method
  is periodic.
- ``<Type type=... index=...>``: the model's atom-type index of each force-field atom type;
  every atom of the topology must have one.

:func:`write_forcefield` writes such a file (atom types, one single-atom residue template per
element, and the tag) for a trained model of an atomic solid or liquid.

Plain OpenMM skips XML tags it has no generator for, so without the plugin imported a
``<TorchPotential>`` would be dropped without a word and the System would lack the model.
The files :func:`write_forcefield` writes therefore carry an ``<InitializationScript>``
(:data:`LOADER_SCRIPT`), which OpenMM runs at the end of ``ForceField.loadFile``, after the
force tags: it imports this package and builds the generators of the file's
``<TorchPotential>`` tags (:func:`load_tags`; the ones OpenMM already parsed because the plugin
was imported before are not added twice). Loading such a file in plain OpenMM thus either
includes the model or, where the package is not installed, fails with an ImportError naming it.
"""

from __future__ import annotations

import base64
import io
import os
import xml.etree.ElementTree as ET

import openmm
import torch
from openmm import app

from .forces import create_force

TAG = "TorchPotential"


def _bool(text: str, what: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ValueError(f"<{TAG}> attribute {what}={text!r} must be true or false")
    return value in ("true", "1")


class TorchPotentialGenerator:
    """ForceField generator for ``<TorchPotential>``: one learned model per tag.

    Parameters
    ----------
    model_bytes : bytes
        The TorchScript file's contents.
    types : dict of str to int
        Force-field atom type name → model atom-type index.
    periodic : bool or None
        None: follow the nonbonded method of ``createSystem``.
    """

    def __init__(self, model_bytes: bytes, types: dict[str, int], periodic: bool | None):
        self.model_bytes = model_bytes
        self.types = types
        self.periodic = periodic

    @staticmethod
    def parseElement(element: ET.Element, ff: app.ForceField) -> None:
        if "file" in element.attrib:
            path = element.attrib["file"]
            if not os.path.isfile(path):
                raise ValueError(f"<{TAG} file={path!r}>: no such file (relative paths are "
                                 f"taken from the working directory {os.getcwd()}); give an "
                                 f"absolute path or embed the model with encoding=\"base64\"")
            with open(path, "rb") as fh:
                model_bytes = fh.read()
        elif element.attrib.get("encoding") == "base64" and (element.text or "").strip():
            model_bytes = base64.b64decode("".join(element.text.split()))
        else:
            raise ValueError(f"<{TAG}> needs a file=\"model.pt\" attribute or a base64-encoded "
                             f"model as its text with encoding=\"base64\"")
        types = {}
        for entry in element.iterfind("Type"):
            if "type" not in entry.attrib or "index" not in entry.attrib:
                raise ValueError(f"<{TAG}><Type> needs attributes type (a force-field atom "
                                 f"type) and index (the model's type index)")
            types[entry.attrib["type"]] = int(entry.attrib["index"])
        if not types:
            raise ValueError(f"<{TAG}> has no <Type type=... index=.../> children: the model "
                             f"needs the type index of every force-field atom type")
        periodic = _bool(element.attrib["periodic"], "periodic") \
            if "periodic" in element.attrib else None
        generator = TorchPotentialGenerator(model_bytes, types, periodic)
        generator.element = element  # so that load_tags does not parse it a second time
        ff.registerGenerator(generator)

    def createForce(self, system: openmm.System, data, nonbondedMethod, nonbondedCutoff,
                    args) -> None:
        atom_types = []
        for atom in data.atoms:
            name = data.atomType[atom]
            if name not in self.types:
                raise ValueError(f"atom {atom.name} of residue {atom.residue.name} has atom "
                                 f"type {name!r}, which <{TAG}> does not map; add "
                                 f"<Type type=\"{name}\" index=\"...\"/> (mapped: "
                                 f"{', '.join(sorted(self.types))})")
            atom_types.append(self.types[name])
        periodic = self.periodic
        if periodic is None:
            periodic = nonbondedMethod in (app.CutoffPeriodic, app.Ewald, app.PME, app.LJPME)
        model = torch.jit.load(io.BytesIO(self.model_bytes))
        system.addForce(create_force(model, atom_types, periodic=periodic))


def register_generator() -> None:
    """Make ``ForceField`` understand ``<TorchPotential>`` (done on import of the plugin)."""
    app.forcefield.parsers[TAG] = TorchPotentialGenerator.parseElement


LOADER_SCRIPT = """
try:
    import openmm_reversible_plugin
except ImportError as error:
    raise ImportError("this force field file holds a learned model (<TorchPotential>), which "
                      "needs the package openmm_reversible_plugin (pip install "
                      "openmm-reversible); without it OpenMM would leave the model out of the "
                      "System") from error
openmm_reversible_plugin.forcefield.load_tags(self, tree)
"""
"""The ``<InitializationScript>`` of the files :func:`write_forcefield` writes. OpenMM executes
it in ``ForceField.loadFile`` with ``self`` the ForceField and ``tree`` the file's parsed XML."""


def load_tags(ff: app.ForceField, tree: ET.ElementTree) -> None:
    """Register a generator for every ``<TorchPotential>`` of ``tree`` that ``ff`` lacks.

    Called by :data:`LOADER_SCRIPT` while OpenMM loads a file, so that the file's learned
    models are included whether or not the plugin was imported before.
    """
    register_generator()
    parsed = {id(getattr(g, "element", None)) for g in ff.getGenerators()
              if isinstance(g, TorchPotentialGenerator)}
    for element in tree.getroot().findall(TAG):
        if id(element) not in parsed:
            TorchPotentialGenerator.parseElement(element, ff)


def write_forcefield(path: str, model: torch.nn.Module, types: dict[str, tuple[str, float, int]],
                     periodic: bool = True) -> None:
    """Write a self-contained ForceField XML for a learned model of single-atom residues.

    Parameters
    ----------
    path : str
        Output file.
    model : nn.Module
        Contract model ``model(positions, box, atom_types)``; compiled with TorchScript and
        embedded as base64.
    types : dict
        ``{element symbol: (atom type name, mass in amu, model type index)}``; each element gets
        an atom type and a one-atom residue template named after the element.
    periodic : bool
        Whether the model uses periodic boundary conditions.
    """
    scripted = model if isinstance(model, torch.jit.ScriptModule) else torch.jit.script(model)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    root = ET.Element("ForceField")
    atom_types = ET.SubElement(root, "AtomTypes")
    residues = ET.SubElement(root, "Residues")
    tag = ET.SubElement(root, TAG, periodic="true" if periodic else "false", encoding="base64")
    for symbol, (type_name, mass, index) in types.items():
        ET.SubElement(atom_types, "Type", name=type_name, **{"class": type_name},
                      element=symbol, mass=repr(float(mass)))
        residue = ET.SubElement(residues, "Residue", name=symbol)
        ET.SubElement(residue, "Atom", name=symbol, type=type_name)
        ET.SubElement(tag, "Type", type=type_name, index=str(int(index)))
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    tag.text = "\n" + "\n".join(encoded[k:k + 100] for k in range(0, len(encoded), 100)) + "\n"
    root.append(ET.Comment(" Loading this file imports openmm_reversible_plugin, which adds the "
                           f"learned model of <{TAG}>; without that package the load fails "
                           "instead of leaving the model out. "))
    ET.SubElement(root, "InitializationScript").text = LOADER_SCRIPT
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="unicode", xml_declaration=False)
