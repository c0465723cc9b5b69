"""Box dipole moment and the static dielectric constant from its fluctuations.

For a periodic system whose electrostatics are summed with a conducting (tin-foil) boundary,
as PME and Ewald do, the static dielectric constant follows from the fluctuation of the total
dipole moment M = Σ q_i x_i (Neumann, Mol. Phys. 50, 841 (1983)):

    ε = 1 + g,     g = (⟨M·M⟩ - ⟨M⟩·⟨M⟩) / (3 ε₀ ⟨V⟩ k_B T).

With a reaction field of dielectric ε_RF beyond the cutoff (OpenMM's CutoffPeriodic) the
same g gives

    (ε - 1)(2 ε_RF + 1) / (2 ε_RF + ε) = g,   i.e.   ε = (2 ε_RF + 1 + 2 g ε_RF) / (2 ε_RF + 1 - g),

which tends to 1 + g as ε_RF → ∞. M is computed from molecules made whole (each atom at the
minimum image of its molecule's first atom), which for neutral molecules is the sum of the
molecular dipoles and equals mdtraj's ``dipole_moments``.

Gradient. ε is a function of the ensemble averages ⟨M⟩, ⟨M·M⟩ and ⟨V⟩. Their parameter
derivatives have two parts: the explicit one (M depends on trainable charges, ⟨∂A/∂θ⟩) and the
change of the ensemble, −β(⟨A ∂U/∂θ⟩ − ⟨A⟩⟨∂U/∂θ⟩). Given the frames' energies
(``energies``), :func:`static_dielectric` takes the averages with Boltzmann weights
``softmax(-β(U - U_ref))`` (:func:`~.thermodynamics.boltzmann_log_weights`, ``U_ref = U``
detached: the plain mean), so that autograd through ``energies`` adds the second part;
without them only the explicit part is differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import InputError
from ..units import KB, ONE_4PI_EPS0
from .frames import MoleculeLayout, check_box, check_frames, volumes
from .thermodynamics import boltzmann_log_weights


def dipole_moment(positions: torch.Tensor, charges: torch.Tensor, box=None,
                  molecules: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Total dipole moment ``M = Σ q_i x_i`` of every frame, e·nm.

    Parameters
    ----------
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
    charges : torch.Tensor, shape (n_atoms,), e
        Differentiable (e.g. trainable force-field charges).
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm, optional
        With ``molecules``, used to make wrapped molecules whole.
    molecules : list of array-like of int, optional
        Molecules to make whole before summing; without it, positions are used as given
        (correct for unwrapped trajectories).

    Returns
    -------
    torch.Tensor, shape (n_frames, 3), e·nm
    """
    positions = check_frames(positions)
    n_frames, n_atoms = positions.shape[:2]
    charges = torch.as_tensor(charges, dtype=positions.dtype, device=positions.device)
    if charges.shape != (n_atoms,):
        raise InputError(f"charges must have shape ({n_atoms},), got {tuple(charges.shape)}")
    if molecules is None:
        return torch.einsum("n,snk->sk", charges, positions)
    layout = MoleculeLayout(molecules, n_atoms)
    box = check_box(box, n_frames, positions)
    return torch.einsum("n,snk->sk", charges[layout.atoms], layout.whole(positions, box))


def static_dielectric(positions: torch.Tensor, charges: torch.Tensor, box,
                      temperature: float, molecules: Sequence[Sequence[int]] | None = None,
                      epsilon_rf: float = math.inf, energies: torch.Tensor | None = None,
                      reference_energies: torch.Tensor | None = None) -> torch.Tensor:
    """Static dielectric constant from box-dipole fluctuations (dimensionless, 0-dim).

    Parameters
    ----------
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
    charges : torch.Tensor, shape (n_atoms,), e
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm
        The mean volume over frames enters the formula.
    temperature : float, K
    molecules : list of array-like of int, optional
        Make these molecules whole first (needed if the frames are wrapped).
    epsilon_rf : float, default inf
        Dielectric constant of the reaction-field continuum; ``inf`` for PME/Ewald
        (tin-foil boundary).
    energies : torch.Tensor, shape (n_frames,), kJ/mol, optional
        Energy of each frame under the current parameters (the potential energy, or in NPT
        the enthalpy U + PV), differentiable: the averages are then Boltzmann-reweighted, and
        the gradient holds the ensemble's change −β cov(·, ∂U/∂θ) besides the explicit one.
    reference_energies : torch.Tensor, shape (n_frames,), kJ/mol, optional
        The same under the sampling parameters (reweighting to nearby parameters); default
        ``energies`` detached (frames of the current parameters).

    Returns
    -------
    torch.Tensor, 0-dim
        Differentiable in positions, charges, box and ``energies``. Needs many frames to
        converge (nanoseconds for water).
    """
    positions = check_frames(positions)
    if positions.shape[0] < 2:
        raise InputError("static_dielectric needs at least two frames (a fluctuation)")
    if not temperature > 0:
        raise InputError(f"temperature must be positive (K), got {temperature!r}")
    if not epsilon_rf >= 1:
        raise InputError(f"epsilon_rf must be >= 1 (or inf for PME), got {epsilon_rf!r}")
    box = check_box(box, positions.shape[0], positions, required=True)
    moments = dipole_moment(positions, charges, box, molecules)
    n_frames = positions.shape[0]
    if energies is None:
        weights = moments.new_full((n_frames,), 1.0 / n_frames)
    else:
        if tuple(energies.shape) != (n_frames,):
            raise InputError(f"energies must have one value per frame ({n_frames},), got "
                             f"{tuple(energies.shape)}")
        weights = boltzmann_log_weights(energies, temperature, reference_energies).exp()
        weights = weights.to(moments.dtype)
    mean = weights @ moments
    fluctuation = weights @ ((moments - mean) ** 2).sum(-1)
    volume = volumes(box)
    volume = weights @ volume if volume.ndim else volume
    g = 4 * math.pi * ONE_4PI_EPS0 * fluctuation / (3 * volume * KB * float(temperature))
    if math.isinf(epsilon_rf):
        return 1 + g
    a = 2 * epsilon_rf + 1
    return (a + 2 * g * epsilon_rf) / (a - g)
