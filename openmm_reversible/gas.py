"""The simulated gas phase of ΔH_vap: one isolated molecule sampled by plain OpenMM.

ΔH_vap = ⟨E_gas⟩ − ⟨E_liquid⟩/N + RT needs the mean potential energy of one molecule in vacuum.
For a rigid molecule it is 0 and for a purely harmonic one k_B T/2 per internal mode, but a
molecule with torsions, intramolecular 1-4 pairs or other anharmonic terms has to be sampled.
:class:`GasPhase` builds the liquid's first molecule alone (``gas = "simulate"``), or the
molecule of a ``[[systems]]`` table of ``kind = "gas"`` (same force-field files and tagged
sites, ``NoCutoff``, no box), samples it with OpenMM (Langevin-middle NVT at the state
point's temperature) and evaluates each frame with its torch twin, whose sites are the
liquid's (same keys and start values, so the same scaled variables). Its
:meth:`GasPhase.sample` gives ⟨E_gas⟩, its standard error from blocks and its gradient in the
scaled parameters by the fluctuation estimator

    d⟨U⟩/dθ = ⟨∂U/∂θ⟩ − β cov(U, ∂U/∂θ)

(:func:`~openmm_reversible.reweighting.through_energies` of the reweighted mean energy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openmm
import torch
from openmm import app, unit

from .errors import InputError
from .files import read_structure
from .observables.blocking import block_average
from .observables.selection import molecules
from .parameters import ParameterSet
from .potential import TorchPotential
from .reweighting import reweighted_average, through_energies
from .sampler import SampledState, Sampler
from .units import DTYPE

GAS_BLOCKS = 5
"""Contiguous blocks of the gas frames for the standard error of ⟨E_gas⟩."""

MAX_TEMPERATURE_FACTOR = 20.0
"""Kinetic temperature, in units of the bath's, above which the gas run counts as exploded: a
few atoms' instantaneous temperature fluctuates far more than a liquid's (NaN is caught
too)."""


@dataclass(frozen=True)
class GasEstimate:
    """One sampling of the gas phase.

    Attributes
    ----------
    energy : float, kJ/mol
        ⟨E_gas⟩ over the frames.
    stderr : float, kJ/mol
        Its standard error from :data:`GAS_BLOCKS` blocks.
    gradient : torch.Tensor, shape (P,), kJ/mol
        d⟨E_gas⟩ / d(scaled parameters), fluctuation estimator.
    frames : int
        Frames averaged.
    """

    energy: float
    stderr: float
    gradient: torch.Tensor
    frames: int


def pdb_molecule(path: str) -> tuple[app.Topology, np.ndarray]:
    """The topology and positions (nm) of a gas system's ``structure.pdb``."""
    pdb = read_structure(path)
    return pdb.topology, np.asarray(pdb.positions.value_in_unit(unit.nanometer), dtype=float)


def first_molecule(topology: app.Topology, positions: np.ndarray,
                   system: openmm.System | None = None) -> tuple[app.Topology, np.ndarray]:
    """The first molecule (bond-connected atoms) of a topology alone, without a box.

    Parameters
    ----------
    topology : openmm.app.Topology
    positions : numpy.ndarray, shape (N, 3), nm
    system : openmm.System, optional
        The topology's System: its virtual sites and constrained pairs join their molecules
        (TIP4P's M has no bond in the topology), as in
        :func:`~openmm_reversible.observables.selection.molecules`.

    Returns
    -------
    topology : openmm.app.Topology
        Its atoms, residues and bonds, no periodic box.
    positions : numpy.ndarray, shape (n, 3), nm
    """
    keep = {int(i) for i in molecules(topology, system)[0]}
    modeller = app.Modeller(topology, np.asarray(positions, dtype=float))
    modeller.delete([a for a in topology.atoms() if a.index not in keep])
    gas = modeller.getTopology()
    gas.setPeriodicBoxVectors(None)
    xyz = np.asarray(positions, dtype=float)[sorted(keep)]
    return gas, xyz


class GasPhase:
    """One molecule in vacuum sampled by OpenMM, with the torch twin of its System.

    Parameters
    ----------
    forcefield_files : list of str
        The liquid's force-field files (tagged), in load order.
    topology : openmm.app.Topology
        The gas molecule (:func:`first_molecule`).
    positions : numpy.ndarray, shape (n, 3), nm
    create_system_kwargs : dict
        The liquid's ``createSystem`` settings; ``nonbondedMethod`` becomes ``NoCutoff`` and
        the cutoff-only settings are dropped.
    trainable_keys : list of str, optional
        The liquid's trainable site keys: the gas molecule must have the same, in the same
        order (its scaled variables are the liquid's); not checked when None.
    temperature : float, K
    friction : float, 1/ps
    timestep : float, ps
    platform : str
        OpenMM platform name or ``"auto"``.
    start : SampledState, optional
        Where the molecule continues from (:attr:`state` of an earlier GasPhase, e.g. from a
        checkpoint); without it the molecule is minimised and given velocities at
        ``temperature``. Every random number of the sampling comes from the seed of each
        :meth:`sample`.
    deterministic : bool
        Repeatable OpenMM sampling (one CPU thread, deterministic forces:
        :class:`~openmm_reversible.sampler.Sampler`).
    molecule : str
        How the error of a molecule without the liquid's trainable sites names it.
    """

    def __init__(self, forcefield_files, topology: app.Topology, positions: np.ndarray,
                 create_system_kwargs: dict, trainable_keys, temperature: float,
                 friction: float, timestep: float, platform: str = "auto",
                 start: SampledState | None = None, deterministic: bool = False,
                 molecule: str = "gas = \"simulate\": the gas molecule (the structure's first "
                                 "molecule)"):
        kwargs = {k: v for k, v in create_system_kwargs.items()
                  if k not in ("nonbondedCutoff", "ewaldErrorTolerance", "switchDistance",
                               "useDispersionCorrection")}
        kwargs["nonbondedMethod"] = app.NoCutoff
        self.parameters = ParameterSet.from_forcefield(forcefield_files, topology, **kwargs)
        if trainable_keys is not None and \
                list(self.parameters.trainable_keys) != list(trainable_keys):
            raise InputError(
                f"{molecule} has the trainable sites {self.parameters.trainable_keys}, the "
                f"liquid {list(trainable_keys)}; simulate the gas phase of a molecule that "
                "holds every tagged site, or give gas_energy instead")
        self.potential = TorchPotential(self.parameters.system, parameters=self.parameters)
        self.temperature = float(temperature)
        self.sampler = Sampler(self.parameters.system, positions, None, temperature, friction,
                               timestep, platform=platform, seed=1,
                               deterministic=deterministic,
                               max_temperature=MAX_TEMPERATURE_FACTOR * temperature)
        if start is None:
            self.sampler.minimize()
            self.sampler.set_velocities(1)
        else:
            self.sampler.restart(start, 1)

    @property
    def state(self) -> SampledState:
        """Where the next :meth:`sample` continues from (nm, nm/ps, no box)."""
        return self.sampler.state()

    def sample(self, scaled: torch.Tensor, n_frames: int, every: int, seed: int
               ) -> GasEstimate:
        """Sample ⟨E_gas⟩ at the scaled parameter values ``scaled`` and differentiate it.

        The parameters are pushed into OpenMM, the molecule continues from where the last
        sampling left it (new noise from ``seed``), runs ``n_frames // 10 * every`` steps to
        settle at the new values, then records ``n_frames`` frames ``every`` steps apart.

        Parameters
        ----------
        scaled : torch.Tensor, shape (P,)
            Scaled trainable values (the liquid's).
        n_frames : int
        every : int
            OpenMM steps between frames.
        seed : int

        Returns
        -------
        GasEstimate
        """
        with torch.no_grad():
            self.parameters.scaled.copy_(scaled)
        self.sampler.update_parameters(self.parameters.create_system())
        self.sampler.restart(self.sampler.state(), seed)
        self.sampler.step(n_frames // 10 * every)
        start = self.sampler.current_step()
        steps = set(range(start + every, start + (n_frames + 1) * every, every))
        frames = self.sampler.step(n_frames * every, steps)
        positions = torch.as_tensor(np.stack([f.positions for f in frames]), dtype=DTYPE)
        energies = {}

        def mean_energy(u: torch.Tensor) -> torch.Tensor:
            energies["u"] = u.detach()
            return reweighted_average(u, u, self.temperature)

        if self.parameters.scaled.numel():
            mean, (gradient,) = through_energies(mean_energy, self.potential, positions, None,
                                                 [self.parameters.scaled])
        else:
            with torch.no_grad():
                mean = mean_energy(torch.stack([self.potential(x, None) for x in positions]))
            gradient = torch.zeros(0, dtype=DTYPE)
        stderr = block_average(energies["u"].numpy(), n_blocks=GAS_BLOCKS)[1]
        return GasEstimate(float(mean), float(stderr), gradient.detach().clone(), len(frames))
