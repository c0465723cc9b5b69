"""``openmm_reversible_plugin``: learned torch potentials inside plain OpenMM.

- :func:`create_force`: a trained model as an OpenMM Force (openmm-torch ``TorchForce`` when
  it imports, ``openmm.PythonForce`` otherwise); both serialize into System XML with the model;
- ``<TorchPotential>``: a ForceField XML tag, registered on import, so that
  ``ForceField("trained.xml").createSystem(topology)`` includes the learned model;
  :func:`write_forcefield` writes such a file.

The package depends on :mod:`openmm_reversible` only through the model contract; the library
never imports it.
"""

from .forcefield import TorchPotentialGenerator, register_generator, write_forcefield
from .forces import (
    OpenMMModel,
    TorchComputation,
    TypedOpenMMModel,
    create_force,
    openmmtorch_available,
    script_model,
)

register_generator()

__all__ = ["OpenMMModel", "TorchComputation", "TorchPotentialGenerator", "TypedOpenMMModel",
           "create_force", "openmmtorch_available", "register_generator", "script_model",
           "write_forcefield"]
