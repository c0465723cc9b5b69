"""Atom selections from an OpenMM Topology: atoms, atom pairs, molecules.

Observables take plain index arrays; these helpers build them from an
:class:`openmm.app.Topology` by atom name, element symbol and residue name, e.g. the oxygen and
hydrogen atoms of water for the O–O and O–H radial distribution functions::

    O = atom_indices(topology, element="O", residue="HOH")
    H = atom_indices(topology, element="H", residue="HOH")
    oo = pair_indices(O, O)                                  # each unordered pair once
    oh = pair_indices(O, H, exclude=molecules(topology))     # intermolecular pairs only
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import openmm
from openmm import app

from ..errors import InputError


def _matches(value: str | None, wanted: str | Collection[str] | None) -> bool:
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return value == wanted
    return value in wanted


def atom_indices(topology: app.Topology, name: str | Collection[str] | None = None,
                 element: str | Collection[str] | None = None,
                 residue: str | Collection[str] | None = None) -> np.ndarray:
    """Indices of the atoms matching every given criterion.

    Parameters
    ----------
    topology : openmm.app.Topology
    name : str or collection of str, optional
        Atom name(s), e.g. ``"O"`` or ``{"H1", "H2"}``.
    element : str or collection of str, optional
        Element symbol(s), e.g. ``"O"``.
    residue : str or collection of str, optional
        Residue name(s), e.g. ``"HOH"``.

    Returns
    -------
    numpy.ndarray, shape (n_selected,), int64
        Atom indices in increasing order.

    Raises
    ------
    InputError
        If nothing matches; the message lists the names present in the topology.
    """
    selected = [atom.index for atom in topology.atoms()
                if _matches(atom.name, name)
                and _matches(atom.element.symbol if atom.element is not None else None, element)
                and _matches(atom.residue.name, residue)]
    if not selected:
        atom_names = sorted({a.name for a in topology.atoms()})
        residue_names = sorted({r.name for r in topology.residues()})
        raise InputError(
            f"empty selection: no atom has name={name!r}, element={element!r}, "
            f"residue={residue!r}; the topology has atom names {atom_names[:20]} and residue "
            f"names {residue_names[:20]}")
    return np.asarray(selected, dtype=np.int64)


def molecules(topology: app.Topology, system: openmm.System | None = None
              ) -> list[np.ndarray]:
    """Atom indices of each molecule: the connected components of the topology's bonds.

    Parameters
    ----------
    topology : openmm.app.Topology
    system : openmm.System, optional
        Also join each virtual site to its parents and each constrained pair, as OpenMM's
        molecules do (the M site of TIP4P-Ew has no bond in the topology).

    Returns
    -------
    list of numpy.ndarray (int64)
        One array per molecule, atoms in increasing order, molecules ordered by first atom.
        An atom without bonds (and, with ``system``, neither a site nor constrained) is a
        molecule of its own.
    """
    parent = list(range(topology.getNumAtoms()))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links = [(bond[0].index, bond[1].index) for bond in topology.bonds()]
    if system is not None:
        links += [tuple(system.getConstraintParameters(k)[:2])
                  for k in range(system.getNumConstraints())]
        for i in range(system.getNumParticles()):
            if system.isVirtualSite(i):
                site = system.getVirtualSite(i)
                links += [(i, site.getParticle(k)) for k in range(site.getNumParticles())]
    for first, second in links:
        a, b = root(first), root(second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(parent)):
        groups.setdefault(root(i), []).append(i)
    return [np.asarray(g, dtype=np.int64) for g in groups.values()]


def pair_indices(first, second, exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """All unordered atom pairs with one atom in ``first`` and the other in ``second``.

    Parameters
    ----------
    first, second : array-like of int
        Two atom selections (they may overlap or be identical).
    exclude : list of array-like of int, optional
        Groups of atoms (typically :func:`molecules`); pairs within one group are dropped,
        e.g. to keep only intermolecular O–H pairs.

    Returns
    -------
    numpy.ndarray, shape (n_pairs, 2), int64
        Each pair once as ``(i, j)`` with ``i < j``, no self pairs, sorted. For ``first`` equal
        to ``second`` (n atoms) this is the n(n-1)/2 pairs, like mdtraj's ``select_pairs``.
    """
    a = np.unique(np.asarray(first, dtype=np.int64).reshape(-1))
    b = np.unique(np.asarray(second, dtype=np.int64).reshape(-1))
    for label, sel in (("first", a), ("second", b)):
        if sel.size == 0:
            raise InputError(f"pair_indices: selection {label!r} is empty")
    i, j = np.meshgrid(a, b, indexing="ij")
    lo, hi = np.minimum(i, j).ravel(), np.maximum(i, j).ravel()
    keep = lo != hi
    if exclude is not None:
        group = np.full(int(max(a.max(), b.max())) + 1, -1, dtype=np.int64)
        for k, members in enumerate(exclude):
            members = np.asarray(members, dtype=np.int64)
            group[members[members < group.size]] = k
        keep &= (group[lo] < 0) | (group[lo] != group[hi])
    n = int(hi.max()) + 1
    key = np.unique(lo[keep] * n + hi[keep])
    if key.size == 0:
        raise InputError("pair_indices: the selections give no pairs (only self pairs or "
                         "pairs inside excluded groups)")
    return np.stack([key // n, key % n], axis=1)
