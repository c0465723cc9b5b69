"""Mean squared displacement and self-diffusion coefficient (Einstein relation).

The MSD of molecular centres of mass at lag τ is averaged over every available time origin,

    MSD(τ_k) = ⟨ |R(t_0 + τ_k) - R(t_0)|² ⟩_{molecules, t_0},

from *unwrapped* positions (the reversible integrator never wraps; :func:`unwrap` rebuilds
continuous paths from wrapped frames). In three dimensions MSD(τ) → 6 D τ at long times, so
``D`` is one sixth of the least-squares slope of the MSD over a fitting window. Both are
differentiable through every frame that enters them.

In a periodic box the hydrodynamic interactions of a molecule with its images slow it down:
D from a cubic box of edge L is too small by ``k_B T ξ / (6 π η L)`` (Yeh & Hummer, J. Phys.
Chem. B 108, 15873 (2004); ξ = 2.837297 for the cubic lattice), which
:func:`yeh_hummer_correction` adds back, with the shear viscosity η supplied by the user (from
experiment, or from a separate simulation of the model). For TIP3P-like water in a 3 nm box
the correction is about 10 % of D.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from openmm import unit

from ..errors import InputError
from .frames import MoleculeLayout, check_box, check_frames, minimum_image_frames, volumes

M2_PER_S_PER_NM2_PER_PS = 1e-6
"""1 nm²/ps expressed in m²/s."""

CUBIC_LATTICE_XI = 2.837297
"""ξ of the Yeh–Hummer correction for a cubic periodic lattice (dimensionless)."""

BOLTZMANN_J_PER_K = unit.BOLTZMANN_CONSTANT_kB.value_in_unit(unit.joule / unit.kelvin)
"""k_B, J/K."""


def time_between_frames(steps, timestep: float) -> float:
    """Time between consecutive frames, ps, checking that frames are evenly spaced.

    Parameters
    ----------
    steps : array-like of int, shape (n_frames,)
        Step index of each frame (e.g. ``Trajectory.steps``).
    timestep : float, ps
        Integration time step.
    """
    steps = np.asarray(torch.as_tensor(steps).cpu(), dtype=np.int64).reshape(-1)
    if steps.size < 2:
        raise InputError(f"need at least two frames to define a frame interval, got "
                         f"{steps.size}")
    gaps = np.diff(steps)
    if gaps.min() <= 0 or gaps.min() != gaps.max():
        raise InputError(f"frames must be evenly spaced in time for multiple-origin "
                         f"averages; step gaps range from {gaps.min()} to {gaps.max()}")
    return float(gaps[0]) * float(timestep)


def unwrap(positions: torch.Tensor, box) -> torch.Tensor:
    """Continuous trajectories from wrapped frames, shape (n_frames, n_atoms, 3), nm.

    Each frame is the previous unwrapped frame plus the minimum-image displacement, which is
    correct as long as no atom moves more than half a box width between frames.

    Parameters
    ----------
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm
    """
    positions = check_frames(positions)
    box = check_box(box, positions.shape[0], positions, required=True)
    # The displacement from frame s to s + 1 is taken in the box of frame s + 1.
    steps = minimum_image_frames(positions[1:] - positions[:-1],
                                 box if box.ndim == 2 else box[1:])
    return torch.cat([positions[:1], positions[:1] + torch.cumsum(steps, dim=0)])


def mean_squared_displacement(positions: torch.Tensor, masses: torch.Tensor,
                              molecules: Sequence[Sequence[int]], frame_interval: float,
                              max_lag: float | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """MSD of molecular centres of mass with every frame as a time origin.

    Parameters
    ----------
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
        Unwrapped positions at evenly spaced times (see :func:`unwrap`).
    masses : torch.Tensor, shape (n_atoms,), amu
    molecules : list of array-like of int
        Atom indices of each selected molecule (a single atom is a molecule of one).
    frame_interval : float, ps
        Time between frames (see :func:`time_between_frames`).
    max_lag : float, ps, optional
        Longest lag; default: the whole trajectory, ``(n_frames - 1) * frame_interval``.

    Returns
    -------
    lag_times : torch.Tensor, shape (n_lags,), ps
        ``0, Δt, 2Δt, ...`` up to ``max_lag``.
    msd : torch.Tensor, shape (n_lags,), nm²
        Averaged over molecules and all ``n_frames - k`` origins at lag k.
    """
    positions = check_frames(positions)
    n_frames, n_atoms = positions.shape[:2]
    if not frame_interval > 0:
        raise InputError(f"frame_interval must be a positive time in ps, got {frame_interval!r}")
    longest = (n_frames - 1) * frame_interval
    if max_lag is None:
        n_lags = n_frames
    else:
        if max_lag < 0 or max_lag > longest * (1 + 1e-12):
            raise InputError(f"max_lag = {max_lag} ps is longer than the trajectory "
                             f"({n_frames} frames every {frame_interval} ps span {longest} ps); "
                             f"lower max_lag or provide more frames")
        n_lags = int(round(max_lag / frame_interval)) + 1
    masses = torch.as_tensor(masses, dtype=positions.dtype, device=positions.device)
    centres = MoleculeLayout(molecules, n_atoms).centres(positions, masses)
    msd = [centres.new_zeros(())] + [
        ((centres[k:] - centres[:-k]) ** 2).sum(-1).mean() for k in range(1, n_lags)]
    lag_times = torch.arange(n_lags, dtype=positions.dtype, device=positions.device)
    return lag_times * frame_interval, torch.stack(msd)


def self_diffusion_coefficient(lag_times: torch.Tensor, msd: torch.Tensor,
                               fit_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Self-diffusion coefficient ``D = slope / 6`` from a least-squares line fit, m²/s.

    Parameters
    ----------
    lag_times : torch.Tensor, shape (n_lags,), ps
    msd : torch.Tensor, shape (n_lags,), nm²
        From :func:`mean_squared_displacement`.
    fit_range : (float, float), ps, optional
        Lags included in the fit (inclusive); default: all lags except 0. Skip the ballistic
        regime at short lags and the noisy tail at long lags.

    Returns
    -------
    torch.Tensor, 0-dim, m²/s
        Differentiable in ``msd``. Water at 298 K: about 2.3e-9 m²/s.
    """
    if lag_times.shape != msd.shape or msd.ndim != 1:
        raise InputError(f"lag_times {tuple(lag_times.shape)} and msd {tuple(msd.shape)} must "
                         f"be 1-D of equal length")
    lo, hi = (float(lag_times[1]) if lag_times.numel() > 1 else 0.0,
              float(lag_times[-1])) if fit_range is None else fit_range
    chosen = (lag_times >= lo - 1e-12) & (lag_times <= hi + 1e-12)
    if int(chosen.sum()) < 2:
        raise InputError(f"fit_range {fit_range!r} ps selects {int(chosen.sum())} lag(s); a "
                         f"slope needs at least two (available lags: 0 to "
                         f"{float(lag_times[-1])} ps)")
    t, y = lag_times[chosen], msd[chosen]
    t_centred = t - t.mean()
    slope = (t_centred * (y - y.mean())).sum() / (t_centred ** 2).sum()
    return slope / 6.0 * M2_PER_S_PER_NM2_PER_PS


def yeh_hummer_correction(diffusion, temperature: float, viscosity: float, box) -> torch.Tensor:
    """Self-diffusion coefficient corrected to infinite system size, m²/s.

    ``D_∞ = D_PBC + k_B T ξ / (6 π η L)`` with ξ = 2.837297 (Yeh & Hummer 2004), for a cubic
    box of edge L.

    Parameters
    ----------
    diffusion : torch.Tensor or float, m²/s
        D measured in the periodic box (e.g. :func:`self_diffusion_coefficient`); the result
        is differentiable in it.
    temperature : float, K
    viscosity : float, Pa·s
        Shear viscosity η of the *model* liquid at this state point (water at 298 K,
        experiment: 0.89e-3 Pa·s; TIP3P: about 0.32e-3 Pa·s).
    box : float, nm, or torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm
        The box edge L, or box vectors (their mean volume gives L = ⟨V⟩^(1/3); the box must
        be cubic, as the correction assumes).

    Returns
    -------
    torch.Tensor, 0-dim, m²/s
    """
    if not temperature > 0:
        raise InputError(f"temperature must be positive (K), got {temperature!r}")
    if not viscosity > 0:
        raise InputError(f"viscosity must be a positive shear viscosity in Pa·s (water at "
                         f"298 K: 0.89e-3), got {viscosity!r}")
    edge = _cubic_edge(box)
    d = torch.as_tensor(diffusion, dtype=torch.float64)
    return d + BOLTZMANN_J_PER_K * float(temperature) * CUBIC_LATTICE_XI / (
        6 * np.pi * float(viscosity) * edge * 1e-9)


def _cubic_edge(box) -> float:
    """Edge of a cubic box, nm, from an edge or (3, 3) / (n_frames, 3, 3) box vectors."""
    if isinstance(box, int | float):
        edge = float(box)
    else:
        vectors = torch.as_tensor(box, dtype=torch.float64).detach()
        if vectors.shape[-2:] != (3, 3) or vectors.ndim not in (2, 3):
            raise InputError(f"box must be an edge length (nm) or box vectors of shape (3, 3) "
                             f"or (n_frames, 3, 3), got shape {tuple(vectors.shape)}")
        frames = vectors.reshape(-1, 3, 3)
        lengths = frames.norm(dim=-1)
        off_diagonal = (frames - torch.diag_embed(frames.diagonal(dim1=-2, dim2=-1))).abs()
        if bool((off_diagonal > 1e-6 * lengths[:, :1, None]).any()) or bool(
                ((lengths - lengths.mean(-1, keepdim=True)).abs() > 1e-6 * lengths).any()):
            raise InputError("the Yeh–Hummer correction (xi = 2.837297) holds for a cubic box; "
                             "this box is not cubic (unequal or tilted edges)")
        edge = float(volumes(frames).mean()) ** (1 / 3)
    if not edge > 0:
        raise InputError(f"box edge must be positive (nm), got {edge!r}")
    return edge
