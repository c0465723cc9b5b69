"""A fit's files in the formats the rest of the ecosystem reads.

Beside ``log.jsonl`` (everything, one JSON object per epoch) a fit writes

- ``state_data.csv``: one row per epoch in the layout of OpenMM's ``StateDataReporter``
  (``#"Epoch","Step","Time (ps)","Potential Energy (kJ/mole)",...``): the OpenMM state the epoch
  ended in, then the loss, each loss term and each scalar observable (RDF curves stay in the
  log), and columns a fit adds (a gas system's ⟨E_gas⟩ and its standard error). Rewritten
  whole, atomically, from the epoch records after every epoch, so it always matches the
  checkpoint: a resumed fit continues it without gaps or repeated rows.
- ``trajectory/epoch_NNNN.dcd`` (or ``.xtc``): frames of the epoch's OpenMM sampling, unwrapped
  positions and the box, with ``trajectory/topology.pdb`` to read them with mdtraj
  (``mdtraj.load("epoch_0001.dcd", top="topology.pdb")``), VMD or PyMOL. Each file is written
  atomically once its epoch has finished; an epoch interrupted by a kill is sampled again on
  resume and its file replaced (the same frames when ``simulation.deterministic = true``; the
  DCD header also records its creation time).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import mdtraj
import numpy as np
from openmm import app, unit

from .config import SCALAR_UNITS, TargetConfig
from .files import atomic_write
from .observables.density import G_CM3_PER_AMU_NM3
from .sampler import SampledState, Sampler

STATE_DATA = "state_data.csv"
TRAJECTORY_DIR = "trajectory"
TOPOLOGY = "topology.pdb"


def state_values(sampler: Sampler) -> dict[str, float]:
    """The sampler's current state as StateDataReporter values, keyed by its column names:
    ``Step``, ``Time (ps)``, ``Potential Energy (kJ/mole)``, ``Kinetic Energy (kJ/mole)``,
    ``Total Energy (kJ/mole)``, ``Temperature (K)`` and, for a periodic System, ``Box Volume
    (nm^3)`` and ``Density (g/mL)``."""
    state = sampler.context.getState(getEnergy=True)
    potential = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    kinetic = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
    values = {"Step": sampler.current_step(),
              "Time (ps)": state.getTime().value_in_unit(unit.picosecond),
              "Potential Energy (kJ/mole)": potential, "Kinetic Energy (kJ/mole)": kinetic,
              "Total Energy (kJ/mole)": potential + kinetic,
              "Temperature (K)": sampler.kinetic_temperature()}
    system = sampler.system
    if system.usesPeriodicBoundaryConditions():
        volume = state.getPeriodicBoxVolume().value_in_unit(unit.nanometer ** 3)
        mass = sum(system.getParticleMass(i).value_in_unit(unit.dalton)
                   for i in range(system.getNumParticles()))
        values["Box Volume (nm^3)"] = volume
        values["Density (g/mL)"] = mass / volume * G_CM3_PER_AMU_NM3
    return values


def state_data_columns(targets: Sequence[TargetConfig], state_points: bool = False,
                       extra: Sequence[str] = ()) -> list[str]:
    """Column names of ``state_data.csv``: StateDataReporter's, then the fit's (with
    ``state_points``, a ``State point`` column after ``Epoch``), then ``extra``."""
    columns = ["Epoch", *(["State point"] if state_points else []), "Step", "Time (ps)",
               "Potential Energy (kJ/mole)",
               "Kinetic Energy (kJ/mole)", "Total Energy (kJ/mole)", "Temperature (K)",
               "Box Volume (nm^3)", "Density (g/mL)", "Loss"]
    columns += [f"Loss {t.label}" for t in targets if t.weight > 0]
    columns += [f"{t.label} ({SCALAR_UNITS[t.observable]})" for t in targets
                if t.observable != "rdf"]
    return columns + list(extra)


def state_data_csv(records: Sequence[dict], targets: Sequence[TargetConfig],
                   state_points: bool = False, extra: Sequence[str] = ()) -> str:
    """The epoch records as StateDataReporter-style CSV text (header line starts with ``#``).

    Each record needs ``epoch``, ``loss``, ``terms``, ``observables`` and ``state`` (the
    StateDataReporter-named values of :func:`state_values`), and ``state_point`` (its label)
    with ``state_points``: one row per epoch and state point. The ``extra`` columns take their
    values from a record's ``columns`` (a dict by column name). Values are written at full
    precision (``repr``); a missing value (a non-periodic box, a target of another state
    point, a loss of a system without targets) is an empty field.
    """
    columns = state_data_columns(targets, state_points, extra)
    lines = ["#" + ",".join(f'"{c}"' for c in columns)]
    for record in records:
        values = {"Epoch": record["epoch"], "Loss": record["loss"], **record["state"],
                  **record.get("columns", {})}
        if state_points:
            values["State point"] = record["state_point"]
        for t in targets:
            values[f"Loss {t.label}"] = record["terms"].get(t.label)
            if t.observable != "rdf":
                values[f"{t.label} ({SCALAR_UNITS[t.observable]})"] = \
                    record["observables"].get(t.label)
        lines.append(",".join("" if values.get(c) is None else
                              f'"{values[c]}"' if isinstance(values[c], str) else repr(values[c])
                              for c in columns))
    return "\n".join(lines) + "\n"


def trajectory_path(output: str | os.PathLike, epoch: int, fmt: str, part: str = "") -> Path:
    """``output/trajectory/[part/]epoch_NNNN.<fmt>``: where an epoch's frames go (``part``:
    the state point's subdirectory in a fit of several)."""
    return Path(output) / TRAJECTORY_DIR / part / f"epoch_{epoch:04d}.{fmt}"


def write_topology(output: str | os.PathLike, topology: app.Topology,
                   positions: np.ndarray, part: str = "") -> Path:
    """Write ``output/trajectory/[part/]topology.pdb`` (atomically) and return its path.

    Parameters
    ----------
    positions : ndarray, shape (N, 3), nm
    part : str
        Subdirectory of the state point in a fit of several ("" for one).
    """
    path = Path(output) / TRAJECTORY_DIR / part / TOPOLOGY
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            app.PDBFile.writeFile(topology, np.asarray(positions) * unit.nanometer, handle)

    atomic_write(path, write)
    return path


def write_trajectory(path: str | os.PathLike, frames: Sequence[SampledState],
                     topology: app.Topology, fmt: str, timestep: float) -> None:
    """Write sampled states as a DCD or XTC trajectory at ``path``, atomically.

    Parameters
    ----------
    path : path
        Destination file; its directory must exist.
    frames : sequence of SampledState
        Positions (nm, not wrapped) and box (nm) of each frame.
    topology : openmm.app.Topology
    fmt : {"dcd", "xtc"}
        DCD stores single-precision Å (~1e-7 relative) and no times; XTC rounds positions to
        0.001 nm and stores each frame's time (OpenMM step × ``timestep``, ps).
    timestep : float, ps
    """
    if fmt not in ("dcd", "xtc"):
        raise ValueError(f"trajectory format must be 'dcd' or 'xtc', got {fmt!r}")
    xyz = np.stack([f.positions for f in frames]).astype(np.float32)
    traj = mdtraj.Trajectory(xyz, mdtraj.Topology.from_openmm(topology),
                             time=np.array([f.step * timestep for f in frames]))
    if frames[0].box is not None:
        traj.unitcell_vectors = np.stack([f.box for f in frames]).astype(np.float32)
    save = traj.save_dcd if fmt == "dcd" else traj.save_xtc
    atomic_write(path, lambda temporary: save(temporary, force_overwrite=True))
