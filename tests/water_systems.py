"""Small water systems shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

from openmm import app, unit

from openmm_reversible.parameters import ParameterSet
from openmm_reversible.potential import TorchPotential
from openmm_reversible.units import box_tensor, positions_tensor

TAGGED_TIP3P = os.path.join(os.path.dirname(__file__), "data", "tip3p_flexible.xml")


def tagged_tip3p(n_waters: int = 20, fused: bool = False):
    """Flexible TIP3P from the tagged XML (charges, bonds and LJ trainable), reaction field
    with a 0.4 nm cutoff: ``(potential, positions nm, box nm)``."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=n_waters,
                        neutralize=False)
    parameters = ParameterSet.from_forcefield(
        [TAGGED_TIP3P], modeller.topology, nonbondedMethod=app.CutoffPeriodic,
        nonbondedCutoff=0.4 * unit.nanometer, constraints=None, rigidWater=False,
        removeCMMotion=False)
    potential = TorchPotential(parameters.system, parameters=parameters, fused=fused)
    return (potential, positions_tensor(modeller.getPositions()),
            box_tensor(modeller.topology.getPeriodicBoxVectors()))


WATER_XML = """<ForceField>
 <AtomTypes>
  <Type name="tip3p-O" class="OW" element="O" mass="15.99943"/>
  <Type name="tip3p-H" class="HW" element="H" mass="1.007947"/>
 </AtomTypes>
 <Residues>
  <Residue name="HOH">
   <Atom name="O" type="tip3p-O"/>
   <Atom name="H1" type="tip3p-H"/>
   <Atom name="H2" type="tip3p-H"/>
   <Bond atomName1="O" atomName2="H1"/>
   <Bond atomName1="O" atomName2="H2"/>
  </Residue>
 </Residues>
 <HarmonicBondForce>
  <Bond class1="OW" class2="HW" length="0.09572" k="462750.4" parameterize="k"/>
 </HarmonicBondForce>
 <HarmonicAngleForce>
  <Angle class1="HW" class2="OW" class3="HW" angle="1.82421813418" k="836.8"/>
 </HarmonicAngleForce>
 <NonbondedForce coulomb14scale="0.833333" lj14scale="0.5">
  <Atom type="tip3p-O" charge="-0.834" sigma="0.31507524065751241" epsilon="0.635968"
        parameterize="charge, epsilon"/>
  <Atom type="tip3p-H" charge="0.417" sigma="1" epsilon="0"
        parameter_eval="charge=-0.5*PARM['Atom/charge/tip3p-O']"/>
 </NonbondedForce>
</ForceField>
"""
"""Flexible TIP3P (OpenMM's values) with the bond k, O charge and O epsilon trainable."""


def water_fit_files(tmp_path: Path, config: str) -> Path:
    """A 32-water box (water.pdb), WATER_XML and the config, in tmp_path."""
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(app.ForceField("tip3p.xml"), model="tip3p", numAdded=32,
                        neutralize=False)
    with open(tmp_path / "water.pdb", "w") as f:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, f)
    (tmp_path / "water.xml").write_text(WATER_XML)
    (tmp_path / "fit.toml").write_text(config)
    return tmp_path / "fit.toml"
