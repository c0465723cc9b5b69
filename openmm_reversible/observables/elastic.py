"""Stress and elastic constants of solids: virial stress and the stress-fluctuation method.

Strain is homogeneous and applied to positions and box alike (rows): ``x → x·F``,
``box → box·F``. It is written in Voigt form ``e = (e_xx, e_yy, e_zz, 2e_yz, 2e_xz, 2e_xy)``
(engineering shears) of the Lagrangian strain ``η = ½(FᵀF − I)``, with the symmetric stretch
``F = (I + 2η)^½ = I + η − η²/2 + O(η³)``, exact to the second order that the derivatives here
need. In this form ``U(e) = U₀ + V σ_α e_α + ½ V C_αβ e_α e_β + …``.

Instantaneous stress (tension positive, the negative of the pressure tensor of
:mod:`.density`)::

    σ = (∂U/∂ε − Σ m v ⊗ v) / V

Isothermal elastic constants by the stress-fluctuation method (J. F. Lutsko, J. Appl. Phys.
65, 2991 (1989); in Voigt form, NVT at fixed box)::

    C_αβ = ⟨C^B_αβ⟩ − (V / kT) [⟨σ^B_α σ^B_β⟩ − ⟨σ^B_α⟩⟨σ^B_β⟩] + (N kT / V) K_αβ

- Born term ``C^B = (1/V) ∂²U/∂e∂e`` and Born stress ``σ^B = (1/V) ∂U/∂e``, both by autograd
  through the potential (exact for any twice-differentiable energy: pair, many-body, ML);
- fluctuation term: the covariance of the Born stress over the frames (it carries the
  internal relaxation of non-Bravais crystals such as diamond);
- kinetic term: ``K = diag(2, 2, 2, 1, 1, 1)``, the ideal-gas contribution.

For a cubic crystal (:func:`cubic_elastic_observables`, the diamond fit's targets) the mean
stress and C11, C12, C44 come from one window's snapshots: :func:`cubic_elastic_frames` gives
each frame's terms, :func:`cubic_elastic_from_frames` the averages over any run of frames (the
whole window for the loss, blocks of it for standard errors).

These are second derivatives of the free energy with respect to Lagrangian strain; at zero
stress they equal the stress–strain coefficients that experiments report. All functions are
differentiable in the frames and the potential's parameters (the Born term's parameter
gradient is a third derivative of the energy, which autograd provides), so they can be
training targets.
"""

from __future__ import annotations

import torch
from openmm import unit

from ..errors import InputError
from ..trajectory import Trajectory
from ..units import KB
from .density import kinetic_tensor, virial
from .energy import Potential
from .frames import box_of_frame, check_box, check_frames, volumes

GPA_PER_KJ_MOL_NM3 = (1 * unit.kilojoule_per_mole / unit.nanometer ** 3
                      / unit.AVOGADRO_CONSTANT_NA).value_in_unit(unit.pascal) * 1e-9
"""1 kJ/mol/nm³ expressed in GPa (≈ 1.66054e-3)."""

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
"""Cartesian index pairs of the Voigt components 1…6 (xx, yy, zz, yz, xz, xy)."""

_KINETIC = (2.0, 2.0, 2.0, 1.0, 1.0, 1.0)


def voigt_strain_tensor(e: torch.Tensor) -> torch.Tensor:
    """Symmetric strain tensor η (3, 3) from Voigt components (engineering shears)."""
    rows = [[e[0], 0.5 * e[5], 0.5 * e[4]],
            [0.5 * e[5], e[1], 0.5 * e[3]],
            [0.5 * e[4], 0.5 * e[3], e[2]]]
    return torch.stack([torch.stack(row) for row in rows])


def deformation(e: torch.Tensor) -> torch.Tensor:
    """Stretch ``F = I + η − η²/2`` for Voigt Lagrangian strain ``e`` (second-order exact)."""
    eta = voigt_strain_tensor(e)
    return torch.eye(3, dtype=e.dtype, device=e.device) + eta - 0.5 * eta @ eta


def stress_tensor(potential: Potential, positions: torch.Tensor, velocities: torch.Tensor,
                  box, masses: torch.Tensor) -> torch.Tensor:
    """Instantaneous virial stress of every frame, kinetic part included, GPa.

    Parameters
    ----------
    potential, positions, velocities, box, masses
        As for :func:`~openmm_reversible.observables.density.pressure_tensor` (atomic virial).

    Returns
    -------
    torch.Tensor, shape (n_frames, 3, 3), GPa
        ``σ = (∂U/∂ε − Σ m v ⊗ v) / V`` (tension positive; equals minus the pressure tensor).
    """
    positions = check_frames(positions)
    box = check_box(box, positions.shape[0], positions, required=True)
    total = -(kinetic_tensor(velocities, masses) + virial(potential, positions, box))
    volume = volumes(box)
    volume = volume[:, None, None] if volume.ndim == 1 else volume
    return total / volume * GPA_PER_KJ_MOL_NM3


def born_terms(potential: Potential, positions: torch.Tensor, box
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Born stress ``(1/V) ∂U/∂e`` and Born matrix ``(1/V) ∂²U/∂e∂e`` of every frame, GPa.

    Parameters
    ----------
    potential : callable
        ``potential(positions (N, 3), box (3, 3)) -> energy``, kJ/mol; twice differentiable.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm

    Returns
    -------
    stress : torch.Tensor, shape (n_frames, 6), GPa
        Configurational stress in Voigt order (xx, yy, zz, yz, xz, xy).
    born : torch.Tensor, shape (n_frames, 6, 6), GPa
        Affine (unrelaxed) elastic constants of each frame, symmetric.
    """
    positions = check_frames(positions)
    n_frames = positions.shape[0]
    box = check_box(box, n_frames, positions, required=True)
    stresses, borns = [], []
    for s in range(n_frames):
        e = positions.new_zeros(6, requires_grad=True)
        stretch = deformation(e)
        frame_box = box_of_frame(box, s)
        energy = potential(positions[s] @ stretch, frame_box @ stretch)
        (first,) = torch.autograd.grad(energy, e, create_graph=True)
        rows = [torch.autograd.grad(first[a], e, create_graph=True)[0] for a in range(6)]
        volume = torch.abs(torch.linalg.det(frame_box))
        stresses.append(first / volume)
        borns.append(torch.stack(rows) / volume)
    return (torch.stack(stresses) * GPA_PER_KJ_MOL_NM3,
            torch.stack(borns) * GPA_PER_KJ_MOL_NM3)


def elastic_constants(potential: Potential, positions: torch.Tensor, box, temperature: float
                      ) -> torch.Tensor:
    """Isothermal elastic constants by the stress-fluctuation method, GPa.

    Parameters
    ----------
    potential : callable
        ``potential(positions (N, 3), box (3, 3)) -> energy``, kJ/mol; twice differentiable.
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
        Frames sampled from the canonical ensemble at ``temperature`` in a fixed box.
    box : torch.Tensor, shape (3, 3), nm
        The (fixed) box of every frame.
    temperature : float, K

    Returns
    -------
    torch.Tensor, shape (6, 6), GPa
        ``C = ⟨C^B⟩ − (V/kT) Cov(σ^B) + (N kT/V) diag(2, 2, 2, 1, 1, 1)``; with one frame the
        covariance is zero and ``C`` is the Born term plus the kinetic term (at 0 K: the affine,
        unrelaxed constants).
    """
    positions = check_frames(positions)
    box = torch.as_tensor(box, dtype=positions.dtype, device=positions.device)
    if box.shape != (3, 3):
        raise ValueError(f"elastic_constants needs one fixed box of shape (3, 3), got "
                         f"{tuple(box.shape)} (the method assumes constant volume and shape)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 K, got {temperature}")
    stress, born = born_terms(potential, positions, box)
    return stress_fluctuation(stress, born, positions.shape[1], box, temperature)


def stress_fluctuation(stress: torch.Tensor, born: torch.Tensor, n_atoms: int, box,
                       temperature: float, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Elastic constants (6, 6), GPa, from the per-frame :func:`born_terms` of ``n_atoms``
    atoms in the fixed (3, 3) ``box`` (nm) at ``temperature`` (K); see
    :func:`elastic_constants`. Frames may come in pieces: concatenate their terms first.

    ``mean`` (6,), GPa, is the ensemble mean of the configurational stress about which the
    fluctuations are taken; by default the frames' own mean. A short run's own mean absorbs
    the slow part of the fluctuations and biases the covariance low (the constants high);
    where the mean is known exactly — the shear stresses of a cubic crystal average to zero
    by symmetry — passing it removes that bias."""
    kT = KB * float(temperature)
    volume = torch.abs(torch.linalg.det(torch.as_tensor(box, dtype=stress.dtype,
                                                        device=stress.device)))
    fluct = stress - (stress.mean(0) if mean is None else mean)
    covariance = fluct.T @ fluct / stress.shape[0]
    # Cov is in GPa²; V/kT converts one GPa back to kJ/mol/nm³.
    fluctuation = volume / kT * covariance / GPA_PER_KJ_MOL_NM3
    kinetic = n_atoms * kT / volume * GPA_PER_KJ_MOL_NM3 * torch.diag(
        torch.tensor(_KINETIC, dtype=stress.dtype, device=stress.device))
    return born.mean(0) - fluctuation + kinetic


def relaxed_elastic_constants(potential: Potential, positions: torch.Tensor, box,
                              force_tolerance: float = 1e-3
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-temperature elastic constants with internal relaxation (lattice statics), GPa.

    For a structure at a minimum of its internal coordinates ``u`` (every force zero, as in a
    perfect crystal), the constants at fixed strain ``e`` after the atoms relax are::

        C = (1/V) [∂²U/∂e∂e − Ξᵀ H⁺ Ξ],   Ξ = ∂²U/∂u∂e,   H = ∂²U/∂u∂u

    (``H⁺``: pseudo-inverse, dropping the uniform translations). The second term is the
    internal relaxation of non-Bravais crystals (in diamond it halves the Born C44). This is
    the 0 K limit of the stress-fluctuation formula and the quickest check of what a
    functional form can reach: e.g. whether a prior can match target constants at all.

    Parameters
    ----------
    potential : callable
        ``potential(positions (N, 3), box (3, 3)) -> energy``, kJ/mol; twice differentiable.
    positions : torch.Tensor, shape (N, 3), nm
        A relaxed structure (the largest force must be below ``force_tolerance``).
    box : torch.Tensor, shape (3, 3), nm
    force_tolerance : float, kJ/mol/nm

    Returns
    -------
    stress : torch.Tensor, shape (6,), GPa
        Configurational stress ``(1/V) ∂U/∂e`` (Voigt order).
    constants : torch.Tensor, shape (6, 6), GPa

    Notes
    -----
    Builds the full ``(3N + 6)²`` Hessian with ``3N + 6`` autograd passes: meant for cells of
    up to a few hundred atoms. The result is detached.
    """
    positions = torch.as_tensor(positions, dtype=torch.float64)
    box = torch.as_tensor(box, dtype=positions.dtype, device=positions.device)
    n = positions.numel()
    z = positions.new_zeros(n + 6, requires_grad=True)
    stretch = deformation(z[n:])
    energy = potential((positions + z[:n].reshape(positions.shape)) @ stretch, box @ stretch)
    (gradient,) = torch.autograd.grad(energy, z, create_graph=True)
    largest_force = float(gradient[:n].detach().abs().max())
    if largest_force > force_tolerance:
        raise ValueError(
            f"the structure is not relaxed: the largest force component is {largest_force:.3g} "
            f"kJ/mol/nm (tolerance {force_tolerance:g}); minimise the energy at fixed box first "
            "(or use elastic_constants on a thermal trajectory)")
    hessian = torch.stack([torch.autograd.grad(gradient[k], z, retain_graph=True)[0]
                           for k in range(n + 6)]).detach()
    h_uu, h_ue, h_ee = hessian[:n, :n], hessian[:n, n:], hessian[n:, n:]
    relaxation = h_ue.T @ torch.linalg.pinv(h_uu, rtol=1e-10, hermitian=True) @ h_ue
    volume = float(torch.abs(torch.linalg.det(box)))
    scale = GPA_PER_KJ_MOL_NM3 / volume
    return gradient[n:].detach() * scale, (h_ee - relaxation) * scale


def virial_voigt(born_stress: torch.Tensor, velocities: torch.Tensor, masses: torch.Tensor,
                 box: torch.Tensor) -> torch.Tensor:
    """Virial stress of every frame in Voigt order, kinetic part included.

    Parameters
    ----------
    born_stress : torch.Tensor, shape (n_frames, 6), GPa
        Configurational stress of :func:`born_terms`.
    velocities : torch.Tensor, shape (n_frames, N, 3), nm/ps
    masses : torch.Tensor, shape (N,), amu
    box : torch.Tensor, shape (3, 3), nm

    Returns
    -------
    torch.Tensor, shape (n_frames, 6), GPa
        ``σ^B − Σ m v ⊗ v / V`` (tension positive), components xx, yy, zz, yz, xz, xy.
    """
    kinetic = kinetic_tensor(velocities, masses) / torch.linalg.det(box).abs() \
        * GPA_PER_KJ_MOL_NM3
    return born_stress - torch.stack([kinetic[:, a, b] for a, b in VOIGT], 1)


def cubic_constants(c: torch.Tensor) -> dict[str, torch.Tensor]:
    """C11, C12, C44 (0-dim, GPa) of a (6, 6) elastic matrix, each the mean of its three
    cubic-symmetry-equivalent entries."""
    return {"C11": torch.diagonal(c)[:3].mean(), "C12": (c[0, 1] + c[0, 2] + c[1, 2]) / 3.0,
            "C44": torch.diagonal(c)[3:].mean()}


CUBIC_OBSERVABLES = ("stress", "C11", "C12", "C44")
"""What :func:`cubic_elastic_observables` returns: the mean Voigt stress (6,) and the cubic
constants, GPa."""


def cubic_elastic_frames(trajectory: Trajectory, potential: Potential
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-frame terms of the cubic elastic observables (differentiable).

    Parameters
    ----------
    trajectory : Trajectory
        Canonical-ensemble snapshots in one fixed periodic box (positions, velocities and
        masses are used).
    potential : callable
        ``potential(positions (N, 3) nm, box (3, 3) nm) -> energy`` kJ/mol, twice
        differentiable.

    Returns
    -------
    born_stress : torch.Tensor, shape (n_frames, 6), GPa
    born : torch.Tensor, shape (n_frames, 6, 6), GPa
    stress : torch.Tensor, shape (n_frames, 6), GPa
        Virial stress with its kinetic part (:func:`virial_voigt`).
    """
    box = trajectory.box
    if box is None or box.shape != (3, 3):
        raise InputError(f"stress and elastic constants need one fixed periodic box (3, 3); "
                         f"the trajectory has box="
                         f"{None if box is None else tuple(box.shape)}")
    born_stress, born = born_terms(potential, trajectory.positions, box)
    return born_stress, born, virial_voigt(born_stress, trajectory.velocities,
                                           trajectory.masses, box)


def cubic_elastic_from_frames(born_stress: torch.Tensor, born: torch.Tensor,
                              stress: torch.Tensor, n_atoms: int, box: torch.Tensor,
                              temperature: float) -> dict[str, torch.Tensor]:
    """Mean stress and cubic constants over frames (any run of the frames of
    :func:`cubic_elastic_frames`), GPa: ``stress`` (6,) and ``C11``, ``C12``, ``C44``.

    The shear stresses of a cubic crystal average to zero by symmetry: their fluctuations are
    taken about zero, not about the frames' short (biased) mean
    (:func:`stress_fluctuation`'s ``mean``)."""
    centre = torch.cat([born_stress.mean(0)[:3], born_stress.new_zeros(3)])
    c = stress_fluctuation(born_stress, born, n_atoms, box, temperature, mean=centre)
    return {"stress": stress.mean(0), **cubic_constants(c)}


def cubic_elastic_observables(trajectory: Trajectory, potential: Potential
                              ) -> dict[str, torch.Tensor]:
    """Mean stress and cubic elastic constants of a window's snapshots (differentiable).

    Parameters
    ----------
    trajectory : Trajectory
        As for :func:`cubic_elastic_frames`.
    potential : callable
        ``potential(positions (N, 3) nm, box (3, 3) nm) -> energy`` kJ/mol, twice
        differentiable.

    Returns
    -------
    dict of str to torch.Tensor
        ``stress``: shape (6,), GPa, the Voigt components (xx, yy, zz, yz, xz, xy) of the
        snapshot-averaged virial stress, kinetic part included (tension positive);
        ``C11``, ``C12``, ``C44``: 0-dim, GPa, stress-fluctuation elastic constants, each the
        mean of its three cubic-symmetry-equivalent entries of the 6×6 matrix. They depend on
        the potential's parameters directly (Born term: a third derivative of the energy) and
        through the frames.
    """
    return cubic_elastic_from_frames(*cubic_elastic_frames(trajectory, potential),
                                     trajectory.n_atoms, trajectory.box, trajectory.temperature)
