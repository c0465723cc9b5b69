"""Ready-made molecular systems built with OpenMM's own force fields and Modeller.

Used by the tests, benchmarks, tutorials and the demo so that they all run on the same real
systems (no hand-written coordinates). Every builder is deterministic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import openmm
from openmm import app, unit

from .methods import nonbonded_method


@dataclass
class MolecularSystem:
    """A System with its topology and a starting configuration.

    Attributes
    ----------
    system : openmm.System
    topology : openmm.app.Topology
    positions : ndarray, shape (n_atoms, 3), nm
    box : ndarray, shape (3, 3), nm, or None when not periodic
    """

    system: openmm.System
    topology: app.Topology
    positions: np.ndarray
    box: np.ndarray | None


def openmm_data_file(name: str) -> str:
    """Path of a file shipped in OpenMM's ``app/data`` directory (e.g. ``"test.pdb"``)."""
    return os.path.join(os.path.dirname(app.__file__), "data", name)


O2_FORCEFIELD = os.path.join(os.path.dirname(__file__), "data", "o2.xml")
"""ForceField XML of molecular oxygen for use with OpenMM's ``tip3p.xml`` (residue ``OXY``, type
``o2-O``: σ 0.3297 nm, ε 0.438 kJ/mol, no charge, bond 0.12074 nm; σ and ε tagged
``parameterize``)."""


def _box_array(topology: app.Topology) -> np.ndarray | None:
    vectors = topology.getPeriodicBoxVectors()
    if vectors is None:
        return None
    return np.array([[v[0], v[1], v[2]] for v in vectors.value_in_unit(unit.nanometer)])


def water_box(n_waters: int | None = 216,
              forcefield: tuple[str, ...] = ("amber14/tip3p.xml",), nonbonded: str = "RF",
              cutoff: float = 0.9, rigid: bool = False, model: str = "tip3p",
              box_size: float | None = None, **create_system_kwargs) -> MolecularSystem:
    """A cubic box of water molecules from OpenMM's pre-equilibrated water.

    Parameters
    ----------
    n_waters : int or None
        Number of molecules (216 gives a 1.95 nm box, so cutoffs up to 0.97 nm). ``None``
        with ``box_size`` fills a box of that edge instead.
    forcefield : tuple of str
        ForceField XML files (OpenMM's bundled names or paths).
    nonbonded : str
        One of ``NoCutoff, CutoffNonPeriodic, CutoffPeriodic, RF, Ewald, PME``.
    cutoff : float, nm
    rigid : bool
        Rigid (constrained) or flexible water.
    model : str
        Water model name for Modeller (``tip3p``, ``tip4pew``, ...).
    box_size : float, nm, optional
        Edge of the cubic box to fill (used when ``n_waters`` is None; 3.0 nm gives 887
        TIP3P molecules, 2661 atoms).
    """
    if (n_waters is None) == (box_size is None):
        raise ValueError("give exactly one of n_waters and box_size")
    ff = app.ForceField(*forcefield)
    modeller = app.Modeller(app.Topology(), [])
    if n_waters is not None:
        modeller.addSolvent(ff, model=model, numAdded=n_waters)
    else:
        modeller.addSolvent(ff, model=model, boxSize=openmm.Vec3(box_size, box_size, box_size))
    return _create(ff, modeller.topology, modeller.positions, nonbonded, cutoff,
                   rigidWater=rigid, **create_system_kwargs)


def o2_in_water(n_o2: int = 8, box_size: float = 1.9) -> tuple[app.Topology, np.ndarray]:
    """O₂ molecules on a grid of a cubic box, the rest filled with TIP3P water by Modeller.

    Parameters
    ----------
    n_o2 : int
        Number of O₂ molecules, 1 to 8 (the centres of the box's eight octants; each molecule
        along x, at its bond length 0.12074 nm).
    box_size : float, nm
        Edge of the cubic box (1.9 nm: 8 O₂ and 152 waters, 472 atoms).

    Returns
    -------
    topology : openmm.app.Topology
        Residues ``OXY`` (atoms ``O1``, ``O2``) first, then ``HOH``; periodic box set.
    positions : ndarray, shape (n_atoms, 3), nm

    Build the System from :data:`O2_FORCEFIELD` and ``tip3p.xml`` (e.g. with
    :meth:`~openmm_reversible.parameters.ParameterSet.from_forcefield`).
    """
    if not 1 <= int(n_o2) <= 8:
        raise ValueError(f"n_o2 must be between 1 and 8 (one per octant of the box), got {n_o2}")
    half_bond = 0.12074 / 2
    topology = app.Topology()
    chain = topology.addChain()
    centres = (np.argwhere(np.ones((2, 2, 2))) + 0.5) * box_size / 2
    xyz = []
    for centre in centres[:int(n_o2)]:
        residue = topology.addResidue("OXY", chain)
        first = topology.addAtom("O1", app.element.oxygen, residue)
        second = topology.addAtom("O2", app.element.oxygen, residue)
        topology.addBond(first, second)
        xyz += [centre - [half_bond, 0, 0], centre + [half_bond, 0, 0]]
    modeller = app.Modeller(topology, xyz * unit.nanometer)
    modeller.addSolvent(app.ForceField("tip3p.xml", O2_FORCEFIELD), model="tip3p",
                        boxSize=openmm.Vec3(box_size, box_size, box_size) * unit.nanometer)
    return (modeller.topology,
            np.asarray(modeller.positions.value_in_unit(unit.nanometer), dtype=float))


def villin(nonbonded: str = "PME", cutoff: float = 1.0, **create_system_kwargs
           ) -> MolecularSystem:
    """Villin headpiece in water (OpenMM's ``test.pdb``) with amber14 + TIP3P."""
    pdb = app.PDBFile(openmm_data_file("test.pdb"))
    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    return _create(ff, pdb.topology, pdb.positions, nonbonded, cutoff, **create_system_kwargs)


def alanine_dipeptide(nonbonded: str = "NoCutoff", cutoff: float = 1.0,
                      **create_system_kwargs) -> MolecularSystem:
    """Alanine dipeptide (ACE-ALA-NME, 22 atoms) in vacuum with amber14.

    Cut from OpenMM's ``test.pdb`` (villin): residue ALA 8 (:func:`capped_peptide`).
    """
    return capped_peptide(7, 7, nonbonded, cutoff, **create_system_kwargs)


def capped_peptide(first: int, last: int, nonbonded: str = "NoCutoff", cutoff: float = 1.0,
                   **create_system_kwargs) -> MolecularSystem:
    """Residues ``first``..``last`` (0-based) of villin, capped ACE/NME, in vacuum with amber14.

    Cut from OpenMM's ``test.pdb``: the residues keep their heavy atoms, the carbonyl and Cα of
    the residue before become the acetyl cap, the N and Cα of the residue after the N-methyl
    cap, and Modeller adds the hydrogens. ``capped_peptide(17, 19)`` is ACE-ALA-ASN-LEU-NME
    (55 atoms).

    Parameters
    ----------
    first, last : int
        Indices of the first and last residue kept, ``1 <= first <= last <= 33``.
    nonbonded, cutoff, **create_system_kwargs
        As in :func:`water_box`.
    """
    pdb = app.PDBFile(openmm_data_file("test.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    keep = {first - 1: {"C", "O", "CA"}, last + 1: {"N", "CA"}}
    keep.update({i: None for i in range(first, last + 1)})
    modeller.delete([a for a in modeller.topology.atoms() if a.residue.index not in keep
                     or (keep[a.residue.index] is None and a.element == app.element.hydrogen)
                     or (keep[a.residue.index] is not None
                         and a.name not in keep[a.residue.index])])
    residues = list(modeller.topology.residues())
    ace, nme = residues[0], residues[-1]
    ace.name, nme.name = "ACE", "NME"
    for residue, methyl in ((ace, "CH3"), (nme, "C")):
        for atom in residue.atoms():
            if atom.name == "CA":
                atom.name = methyl
    ff = app.ForceField("amber14-all.xml")
    modeller.addHydrogens(ff)
    return _create(ff, modeller.topology, modeller.positions, nonbonded, cutoff,
                   **create_system_kwargs)


def _create(ff: app.ForceField, topology: app.Topology, positions, nonbonded: str,
            cutoff: float, **kwargs) -> MolecularSystem:
    method = nonbonded_method(nonbonded)
    if method != app.NoCutoff:
        kwargs["nonbondedCutoff"] = cutoff * unit.nanometer
    kwargs.setdefault("constraints", None)
    system = ff.createSystem(topology, nonbondedMethod=method, **kwargs)
    pos = np.asarray(positions.value_in_unit(unit.nanometer), dtype=float)
    box = _box_array(topology) if system.usesPeriodicBoundaryConditions() else None
    return MolecularSystem(system, topology, pos, box)
