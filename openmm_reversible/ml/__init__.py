"""Machine-learning potentials: the model contract, a reference model and a physical prior.

- :mod:`.contract`: what any torch model must satisfy to be a potential (units, dtype,
  device, twice differentiable), :func:`check_energy_model`, and :class:`MLPotential`, which
  adapts a model (plus an optional classical prior) to ``potential(positions, box)`` for the
  reversible integrator and checks the contract at its first call;
- :mod:`.behler_parrinello`: :class:`BehlerParrinello`, atom-centred radial and angular
  symmetry functions and per-type atomic networks (the diamond model);
- :mod:`.schnet`: :class:`SchNet`, a compact message-passing network in pure torch;
- :mod:`.stillinger_weber`: :class:`StillingerWeber`, the three-body prior for diamond;
- :mod:`.pairs`: :class:`PairSearch`, directed neighbour pairs (the project's Verlet list
  eagerly, all pairs in TorchScript);
- :mod:`.functions`: the smooth activation and radial cutoff the models share;
- :mod:`.diamond`: diamond crystals for tests and training.

Fitting a model to zero stress and target elastic constants through reversible windows (the
diamond application) is the trainer's job: a crystal system of the config,
:mod:`openmm_reversible.crystal`.

Example: a Stillinger–Weber prior plus a neural correction, ready for
:class:`~openmm_reversible.integrators.ReversibleSimulation`::

    positions, box = diamond_lattice(2)                 # 64 atoms, nm
    model = EnergySum([StillingerWeber(), SchNet(cutoff=0.27)])
    potential = MLPotential(model, masses=[12.011] * 64)
    energy = potential(torch.as_tensor(positions), torch.as_tensor(box))   # kJ/mol

The same ``model`` exports into OpenMM with :func:`openmm_reversible_plugin.create_force`.
"""

from .behler_parrinello import BehlerParrinello
from .contract import ContractError, EnergySum, MLPotential, check_energy_model
from .diamond import DIAMOND_LATTICE_CONSTANT, diamond_lattice, diamond_topology
from .pairs import PairSearch
from .schnet import SchNet
from .stillinger_weber import StillingerWeber

__all__ = ["DIAMOND_LATTICE_CONSTANT", "BehlerParrinello", "ContractError", "EnergySum",
           "MLPotential", "PairSearch", "SchNet", "StillingerWeber", "check_energy_model",
           "diamond_lattice", "diamond_topology"]
