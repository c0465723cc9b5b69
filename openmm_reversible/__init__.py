"""openmm-reversible: train OpenMM force fields through reversible molecular dynamics."""

__version__ = "0.1.0"
