"""Twin of ``openmmtorch.TorchForce``: evaluate the embedded TorchScript model in torch.

A TorchForce carries a TorchScript module following openmm-torch's convention,
``forward(positions (N, 3) nm[, boxvectors (3, 3) nm][, *global_parameters]) -> energy
kJ/mol``. The twin calls the same module on the twin's positions, so energies and forces agree
with OpenMM up to the platform's arithmetic, and autograd differentiates it like any other term
(twice, if the model is twice differentiable). Models that output forces themselves
(``setOutputsForces(True)``) are not supported: their energy need not be differentiable.

:func:`deserialize_system` reads a System XML that contains TorchForces. It exists because
the installed openmm-torch wheel can crash inside ``XmlSerializer.deserialize`` for a
TorchForce (its library and OpenMM's disagree on the C++ string ABI); the model bytes embedded
in the XML (``encodedFileContents``) are read here instead and each TorchForce is rebuilt from
them, at its original position in the force list. :func:`concrete_force` recovers the
TorchForce class from the generic ``openmm.Force`` that ``System.getForce`` returns for it.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import openmm
import torch

from . import register
from .base import Term, UnsupportedForceError

TORCHFORCE_TYPE = "TorchForce"
"""The ``type`` attribute of a serialized TorchForce."""


def load_openmmtorch_kernels() -> None:
    """Load openmm-torch's platform kernels if importing openmm before torch made them fail.

    OpenMM loads its plugin libraries when ``openmm`` is first imported. openmm-torch's kernel
    libraries link against torch's shared libraries, which are only on the search path once
    ``torch`` has been imported; imported the other way round, the kernels fail to load and no
    platform can run a TorchForce. torch is imported by this module, so loading the failed
    libraries again now succeeds. Harmless when nothing failed.
    """
    prefix = "Error loading library "
    for failure in openmm.Platform.getPluginLoadFailures():
        path = failure[len(prefix):].split(": ", 1)[0] if failure.startswith(prefix) else ""
        if "OpenMMTorch" in path:
            try:
                openmm.Platform.loadPluginLibrary(path)
            except Exception:  # still unloadable (e.g. a missing driver): leave it failed
                pass


class TorchModelTerm(Term):
    """Energy of a TorchScript model in the TorchForce convention, kJ/mol.

    Parameters
    ----------
    module : torch.jit.ScriptModule or nn.Module
        ``module(positions[, boxvectors][, *globals]) -> energy``.
    periodic : bool
        Pass the box vectors (TorchForce ``usesPeriodicBoundaryConditions``).
    global_parameters : sequence of float
        Default values of the force's global parameters, passed after the positions (and box).
    force_index : int
        Index of the TorchForce in its System.
    """

    openmm_class = TORCHFORCE_TYPE

    def __init__(self, module, periodic: bool, global_parameters=(), force_index: int = -1):
        super().__init__(force_index)
        self.module = module
        self.periodic = bool(periodic)
        self.global_parameters = tuple(float(v) for v in global_parameters)

    def forward(self, positions: torch.Tensor, box: torch.Tensor | None,
                sites: torch.Tensor | None = None) -> torch.Tensor:
        args = [positions]
        if self.periodic:
            if box is None:
                raise ValueError("this TorchForce uses periodic boundary conditions but no box "
                                 "vectors were given")
            args.append(box)
        args += [torch.tensor(v, dtype=positions.dtype, device=positions.device)
                 for v in self.global_parameters]
        energy = self.module(*args)
        return energy.reshape(()).to(positions.dtype)


def concrete_force(force: openmm.Force) -> openmm.Force:
    """The TorchForce behind a generic ``openmm.Force`` proxy, else ``force`` unchanged.

    ``System.getForce`` returns plugin forces (openmm-torch's TorchForce) as plain
    ``openmm.Force`` proxies; this casts them back so that their class name and methods are
    available.
    """
    if type(force) is not openmm.Force:
        return force
    try:
        import openmmtorch
    except ImportError:
        return force
    load_openmmtorch_kernels()
    return openmmtorch.TorchForce.cast(force) if openmmtorch.TorchForce.isinstance(force) \
        else force


@register(TORCHFORCE_TYPE)
def _torch_force(force, index: int, system: openmm.System) -> TorchModelTerm:
    if force.getOutputsForces():
        raise UnsupportedForceError(
            f"TorchForce (force {index}) outputs its own forces (setOutputsForces(True)); the "
            f"twin needs an energy-only model it can differentiate: export the model without "
            f"outputsForces")
    defaults = [force.getGlobalParameterDefaultValue(k)
                for k in range(force.getNumGlobalParameters())]
    return TorchModelTerm(force.getModule(), force.usesPeriodicBoundaryConditions(), defaults,
                          index)


def _rebuild_torch_force(element: ET.Element) -> openmm.Force:
    import openmmtorch

    module = torch.jit.load(io.BytesIO(bytes.fromhex(element.attrib["encodedFileContents"])))
    force = openmmtorch.TorchForce(module)
    force.setUsesPeriodicBoundaryConditions(element.attrib.get("usesPeriodic", "0") == "1")
    force.setOutputsForces(element.attrib.get("outputsForces", "0") == "1")
    force.setForceGroup(int(element.attrib.get("forceGroup", "0")))
    if "name" in element.attrib:
        force.setName(element.attrib["name"])
    for parameter in element.iterfind("GlobalParameters/Parameter"):
        force.addGlobalParameter(parameter.attrib["name"], float(parameter.attrib["default"]))
    for prop in element.iterfind("Properties/Property"):
        force.setProperty(prop.attrib["name"], prop.attrib["value"])
    return force


def deserialize_system(text: str) -> openmm.System:
    """Deserialize a System XML, rebuilding any TorchForce from its embedded model.

    Parameters
    ----------
    text : str
        XML written by ``openmm.XmlSerializer.serialize(system)``.

    Returns
    -------
    openmm.System
        Equal to ``XmlSerializer.deserialize(text)``, forces in the same order.

    Raises
    ------
    ValueError
        If the XML holds TorchForces and openmmtorch cannot be imported.
    """
    root = ET.fromstring(text)
    forces = root.find("Forces")
    if root.tag != "System" or forces is None or not any(
            f.attrib.get("type") == TORCHFORCE_TYPE for f in forces):
        return openmm.XmlSerializer.deserialize(text)
    try:
        import openmmtorch  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"the System holds a TorchForce but openmmtorch does not import "
                         f"({exc}); install openmm-torch matching this torch") from exc
    elements = list(forces)
    for element in elements:
        if element.attrib.get("type") == TORCHFORCE_TYPE:
            forces.remove(element)
    system = openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode"))
    others = [system.getForce(k).__deepcopy__(None) for k in range(system.getNumForces())]
    while system.getNumForces():
        system.removeForce(system.getNumForces() - 1)
    others.reverse()
    for element in elements:
        system.addForce(_rebuild_torch_force(element)
                        if element.attrib.get("type") == TORCHFORCE_TYPE else others.pop())
    return system
