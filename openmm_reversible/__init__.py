"""openmm-reversible: train OpenMM force fields through reversible molecular dynamics.

The public API, in data-flow order::

    from openmm_reversible import (ParameterSet, TorchPotential, LangevinMiddleIntegrator,
                                   ReversibleSimulation, Trajectory, Target, Loss, write_xml)

    params = ParameterSet.from_forcefield("water.xml", topology, nonbondedMethod=...)
    potential = TorchPotential(params.system, parameters=params)   # E(x, box), kJ/mol
    sim = ReversibleSimulation(potential, LangevinMiddleIntegrator(0.001, 1.0, 295.15, seed=0),
                               n_steps=1000, snapshot_every=100, loss_fn=my_loss)
    loss = sim(positions, velocities, box)
    loss.backward()                                     # fills params.scaled.grad
    write_xml(params, "trained/")                       # values written into your own XML

    # or the whole workflow from a TOML config (what ``openmm-reversible fit`` runs):
    from openmm_reversible import Trainer, load_config
    Trainer(load_config("water.toml"), "out/").run()

Names are imported lazily so that ``import openmm_reversible`` (and the command line) start fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    # set-up: tagged XML -> parameters -> the torch twin
    "ParameterSet": "openmm_reversible.parameters",
    "TorchPotential": "openmm_reversible.potential",
    "supported_forces": "openmm_reversible.potential",
    # reversible windows (float and exact)
    "LangevinMiddleIntegrator": "openmm_reversible.integrators",
    "ReversibleSimulation": "openmm_reversible.integrators",
    "Constraints": "openmm_reversible.integrators",
    "ExactLangevinIntegrator": "openmm_reversible.exact",
    "ExactReversibleSimulation": "openmm_reversible.exact",
    "Trajectory": "openmm_reversible.trajectory",
    # losses and the trainer
    "Target": "openmm_reversible.losses",
    "Loss": "openmm_reversible.losses",
    "load_config": "openmm_reversible.config",
    "Trainer": "openmm_reversible.train",
    "CrystalTrainer": "openmm_reversible.crystal",
    # checks, export and validation
    "check_gradients": "openmm_reversible.gradcheck",
    "write_xml": "openmm_reversible.export",
    "validate": "openmm_reversible.validate",
    "InputError": "openmm_reversible.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'openmm_reversible' has no attribute {name!r}")
