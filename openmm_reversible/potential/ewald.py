"""Long-range electrostatics: Ewald splitting, plain Ewald sums and smooth PME in torch.

Ewald summation splits the Coulomb energy of a periodic system with a screening parameter α:

.. math::

    E = \\underbrace{\\sum_{i<j,\\,r<r_c} k_e q_i q_j \\frac{\\operatorname{erfc}(\\alpha r)}{r}}
        _{\\text{direct}}
      + \\underbrace{\\frac{1}{2} \\sum_{\\mathbf{k} \\ne 0} \\frac{k_e}{\\pi V}
        \\frac{e^{-\\pi^2 m^2/\\alpha^2}}{m^2} |S(\\mathbf{m})|^2}_{\\text{reciprocal}}
      - \\underbrace{k_e \\frac{\\alpha}{\\sqrt{\\pi}} \\sum_i q_i^2}_{\\text{self}}
      - \\underbrace{\\frac{\\pi k_e Q^2}{2 V \\alpha^2}}_{\\text{neutralizing plasma}}
      - \\underbrace{\\sum_{(i,j)\\,\\text{excluded}} k_e q_i q_j
        \\frac{\\operatorname{erf}(\\alpha r)}{r}}_{\\text{exclusions}}

with :math:`k_e = 1/(4\\pi\\varepsilon_0)` and :math:`Q = \\sum_i q_i`. The reciprocal sum
includes every pair, so pairs that OpenMM excludes (its exceptions) get their smooth ``erf``
part subtracted again.

This module holds the pieces that are specific to the reciprocal side, each written to
reproduce OpenMM's Reference platform exactly (same α, same k-vectors or grid, same spline
order and moduli), so the torch twin agrees with OpenMM to round-off rather than only to the
Ewald error tolerance:

- :func:`ewald_parameters` / :func:`pme_parameters`: α and k-vector counts or grid sizes as
  OpenMM picks them;
- :class:`EwaldReciprocal`: the explicit k-space sum (rectangular boxes, as in OpenMM);
- :class:`PMEReciprocal`: smooth particle-mesh Ewald (Essmann et al., J. Chem. Phys. 103, 8577
  (1995)): cardinal B-spline charge spreading, FFT, influence function. The energy is written
  as ``½ Σ G(k) |FFT(Q)(k)|²``; autograd through the spreading and the FFT gives the force
  gather, charge and box derivatives and second derivatives with no hand-written code;
- :func:`self_energy`, :func:`direct_pair_energy`, :func:`exclusion_pair_energy`: the
  remaining analytic pieces.

All functions take and return MD units: nm, e, kJ/mol.
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import torch
from openmm import unit
from torch import nn

from ..units import DTYPE, ONE_4PI_EPS0
from . import lawmath

PME_ORDER = 5
"""B-spline interpolation order of OpenMM's PME."""


# --------------------------------------------------------------------------- parameters


def add_constant(module: nn.Module, name: str, value, dtype: torch.dtype | None = None) -> None:
    """Register ``value`` as a non-persistent buffer of ``module``.

    Index arrays and tabulated constants are rebuilt from the OpenMM System whenever a term is
    constructed, so they follow the module across devices but stay out of its ``state_dict``.
    """
    module.register_buffer(name, torch.as_tensor(value, dtype=dtype), persistent=False)


def ewald_parameters(force: openmm.NonbondedForce, box: np.ndarray
                     ) -> tuple[float, tuple[int, int, int]]:
    """Ewald screening parameter and number of k-vectors per axis, as OpenMM chooses them.

    Parameters
    ----------
    force : openmm.NonbondedForce
        Force using ``NonbondedForce.Ewald``; its cutoff and ``ewaldErrorTolerance`` are used.
    box : numpy.ndarray, shape (3, 3), nm
        Default periodic box vectors of the System (rows).

    Returns
    -------
    alpha : float, 1/nm
        ``sqrt(-ln(2 δ)) / r_c`` for error tolerance δ.
    kmax : tuple of 3 int
        Per axis, the smallest ``k`` (made odd) at which the estimated reciprocal-space error
        ``0.05 sqrt(L α) k exp(-(π k / (L α))²)`` falls below δ.
    """
    tol = force.getEwaldErrorTolerance()
    cutoff = force.getCutoffDistance().value_in_unit(unit.nanometer)
    alpha = math.sqrt(-math.log(2.0 * tol)) / cutoff

    def error(k: int, width: float) -> float:
        return tol - 0.05 * math.sqrt(width * alpha) * k * math.exp(
            -(k * math.pi / (width * alpha)) ** 2)

    def first_k(width: float) -> int:
        # Search from k = 10 in the direction that crosses zero, as OpenMM does.
        k = 10
        if error(k, width) > 0.0:
            while k > 0 and error(k, width) > 0.0:
                k -= 1
            k += 1
        else:
            while error(k, width) < 0.0:
                k += 1
        return k + 1 if k % 2 == 0 else k

    kmax = tuple(first_k(float(box[d, d])) for d in range(3))
    return alpha, kmax


def pme_parameters(force: openmm.NonbondedForce, system: openmm.System
                   ) -> tuple[float, tuple[int, int, int]]:
    """PME screening parameter and grid size exactly as OpenMM's Reference platform uses them.

    A throwaway Reference Context holding a copy of ``force`` is asked through
    ``getPMEParametersInContext``; this honours explicit ``setPMEParameters`` values as well
    as the automatic choice from the cutoff, error tolerance and default box.

    Parameters
    ----------
    force : openmm.NonbondedForce
        Force using ``NonbondedForce.PME``.
    system : openmm.System
        Its System (particle count and default box).

    Returns
    -------
    alpha : float, 1/nm
    grid : tuple of 3 int
        Grid points along the a, b and c box vectors.
    """
    probe = openmm.System()
    for _ in range(system.getNumParticles()):
        probe.addParticle(1.0)
    probe.setDefaultPeriodicBoxVectors(*system.getDefaultPeriodicBoxVectors())
    copy = openmm.XmlSerializer.clone(force)
    probe.addForce(copy)
    context = openmm.Context(probe, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    alpha, nx, ny, nz = copy.getPMEParametersInContext(context)
    if unit.is_quantity(alpha):
        alpha = alpha.value_in_unit(unit.nanometer ** -1)
    del context
    return float(alpha), (int(nx), int(ny), int(nz))


# --------------------------------------------------------------------------- analytic pieces


def self_energy(charges: torch.Tensor, alpha: float, volume: torch.Tensor) -> torch.Tensor:
    """Ewald self energy plus the neutralizing-plasma term for a net charge, kJ/mol.

    Parameters
    ----------
    charges : torch.Tensor, shape (n_atoms,), e
    alpha : float, 1/nm
    volume : torch.Tensor, 0-dim, nm³
        Box volume (product of the diagonal of the reduced box).
    """
    total = charges.sum()
    return -ONE_4PI_EPS0 * (alpha / math.sqrt(math.pi) * (charges * charges).sum()
                            + 0.5 * math.pi * total * total / (volume * alpha * alpha))


def direct_pair_energy(qq: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """Direct-space Ewald energy ``k_e q_i q_j erfc(α r) / r`` of each pair, kJ/mol.

    Parameters
    ----------
    qq : torch.Tensor, shape (n_pairs,), e²
        Charge products.
    r : torch.Tensor, shape (n_pairs,), nm
    alpha : float, 1/nm
    """
    return ONE_4PI_EPS0 * qq * lawmath.erfc(alpha * r) / r


def exclusion_pair_energy(qq: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """Reciprocal-space contribution of excluded pairs, ``k_e q_i q_j erf(α r) / r``, kJ/mol.

    The caller subtracts it. For ``erf(α r) <= 1e-6`` the ``r → 0`` limit
    ``k_e q_i q_j 2α/√π`` is used, as in OpenMM (this also keeps coincident particles finite).

    Parameters
    ----------
    qq : torch.Tensor, shape (n_pairs,), e²
    r : torch.Tensor, shape (n_pairs,), nm
    alpha : float, 1/nm
    """
    erf = torch.special.erf(alpha * r)
    far = erf > 1e-6
    safe_r = torch.where(far, r, torch.ones_like(r))
    return ONE_4PI_EPS0 * qq * torch.where(far, erf / safe_r,
                                           torch.full_like(r, 2.0 * alpha / math.sqrt(math.pi)))


def _reciprocal_box(box: torch.Tensor) -> torch.Tensor:
    """Inverse of the box matrix (rows a, b, c): fractional coordinates are ``x @ inv``."""
    return torch.linalg.inv(box)


# --------------------------------------------------------------------------- plain Ewald


class EwaldReciprocal(nn.Module):
    """Reciprocal-space sum of plain Ewald summation over an explicit set of k-vectors.

    The wave vectors are ``k = 2π (n_x/L_x, n_y/L_y, n_z/L_z)`` with ``|n_d| < kmax_d``, one
    of each ``±k`` pair (OpenMM's half space ``n_x > 0``, or ``n_x = 0, n_y > 0``, or
    ``n_x = n_y = 0, n_z > 0``), and

    .. math:: E = \\frac{4\\pi k_e}{V} \\sum_{\\mathbf{k}}
              \\frac{e^{-k^2/4\\alpha^2}}{k^2} |S(\\mathbf{k})|^2,
              \\qquad S(\\mathbf{k}) = \\sum_i q_i e^{i \\mathbf{k}\\cdot\\mathbf{x}_i}.

    Only rectangular boxes are supported (as in OpenMM); use PME for triclinic boxes.

    Parameters
    ----------
    alpha : float, 1/nm
        Ewald screening parameter.
    kmax : tuple of 3 int
        Number of k-vector indices per axis (``n_d`` runs over ``-kmax_d + 1 .. kmax_d - 1``).
    """

    def __init__(self, alpha: float, kmax: tuple[int, int, int]):
        super().__init__()
        self.alpha = float(alpha)
        self.kmax = tuple(int(k) for k in kmax)
        axes = [np.arange(-k + 1, k) for k in self.kmax]
        n = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        half = (n[:, 0] > 0) | ((n[:, 0] == 0) & (n[:, 1] > 0)) | \
               ((n[:, 0] == 0) & (n[:, 1] == 0) & (n[:, 2] > 0))
        add_constant(self, "n", n[half], DTYPE)

    def forward(self, positions: torch.Tensor, charges: torch.Tensor,
                box: torch.Tensor) -> torch.Tensor:
        """Reciprocal-space energy, kJ/mol.

        Parameters
        ----------
        positions : torch.Tensor, shape (n_atoms, 3), nm
        charges : torch.Tensor, shape (n_atoms,), e
        box : torch.Tensor, shape (3, 3), nm
            Rectangular box (off-diagonal entries zero).
        """
        lengths = torch.diagonal(box)
        k = self.n.to(positions.dtype) * (2.0 * math.pi / lengths)
        k2 = (k * k).sum(-1)
        phase = positions @ k.T
        cos_sum = charges @ torch.cos(phase)
        sin_sum = charges @ torch.sin(phase)
        weight = torch.exp(-k2 / (4.0 * self.alpha ** 2)) / k2
        volume = lengths.prod()
        return 4.0 * math.pi * ONE_4PI_EPS0 / volume * (
            weight * (cos_sum * cos_sum + sin_sum * sin_sum)).sum()


# --------------------------------------------------------------------------- smooth PME


def bspline_weights(u: torch.Tensor, order: int = PME_ORDER) -> torch.Tensor:
    """Cardinal B-spline weights of the ``order`` grid points nearest a particle.

    Uses the recursion ``M_n(u) = (u M_{n-1}(u) + (n - u) M_{n-1}(u - 1)) / (n - 1)`` with
    ``M_2(u) = 1 - |u - 1|``, evaluated at ``u + j`` for ``j = 0 .. order-1``.

    Parameters
    ----------
    u : torch.Tensor, shape (...), dimensionless in [0, 1)
        Offset of the particle from its grid cell's lower corner, in grid spacings.
    order : int
        Spline order (number of grid points touched per axis).

    Returns
    -------
    torch.Tensor, shape (..., order)
        Weight of grid points ``index + j``, ``j = 0 .. order-1``; they sum to one.
    """
    w = [1.0 - u, u] + [torch.zeros_like(u) for _ in range(order - 2)]
    for n in range(3, order + 1):
        inv = 1.0 / (n - 1)
        w[n - 1] = inv * u * w[n - 2]
        for m in range(1, n - 1):
            w[n - m - 1] = inv * ((u + m) * w[n - m - 2] + (n - m - u) * w[n - m - 1])
        w[0] = inv * (1.0 - u) * w[0]
    return torch.stack(w, -1)


def bspline_moduli(size: int, order: int = PME_ORDER) -> np.ndarray:
    """Squared moduli ``|b(m)|⁻²`` denominators of the Euler exponential spline, per grid index.

    Parameters
    ----------
    size : int
        Grid points along the axis.
    order : int
        Spline order.

    Returns
    -------
    numpy.ndarray, shape (size,)
        ``|Σ_j M_order(j + 1) exp(2πi m j / size)|²``. Values below 1e-7 (the Nyquist index of
        an even grid with an odd spline order, where the sum vanishes) are replaced by the
        mean of their neighbours, as OpenMM does.
    """
    values = bspline_weights(torch.zeros((), dtype=torch.float64), order).numpy()
    j = np.arange(order)
    m = np.arange(size)[:, None]
    arg = 2.0 * np.pi * m * (j + 1)[None, :] / size
    moduli = (values * np.cos(arg)).sum(1) ** 2 + (values * np.sin(arg)).sum(1) ** 2
    for i in range(size):
        if moduli[i] < 1e-7:
            moduli[i] = 0.5 * (moduli[(i - 1) % size] + moduli[(i + 1) % size])
    return moduli


def _signed_frequency(index: np.ndarray, size: int) -> np.ndarray:
    """Signed integer frequency of FFT index ``index`` (upper half negative, as OpenMM)."""
    return np.where(index < (size + 1) // 2, index, index - size)


class PMEReciprocal(nn.Module):
    """Reciprocal-space energy of smooth particle-mesh Ewald.

    Charges are spread on an ``nx × ny × nz`` grid over fractional coordinates with cardinal
    B-splines of order 5, Fourier transformed, and contracted with the influence function

    .. math:: G(\\mathbf{m}) = \\frac{k_e}{\\pi V}
              \\frac{\\exp(-\\pi^2 |\\mathbf{m}^*|^2/\\alpha^2)}{|\\mathbf{m}^*|^2\\,
              B_x(m_x) B_y(m_y) B_z(m_z)},
              \\qquad E = \\tfrac{1}{2} \\sum_{\\mathbf{m} \\ne 0} G(\\mathbf{m})
              |\\hat{Q}(\\mathbf{m})|^2,

    where ``m*`` is the reciprocal-lattice vector of the signed grid frequency ``m`` and
    ``B_d`` are the spline moduli (:func:`bspline_moduli`). A real-to-complex FFT is used;
    the influence function is folded onto the stored half of the spectrum, pairing each
    frequency with its mirror exactly as the full complex transform would (this matters for
    triclinic boxes on even grids, where OpenMM's Nyquist convention breaks the ``±m``
    symmetry).

    Parameters
    ----------
    alpha : float, 1/nm
        Ewald screening parameter.
    grid : tuple of 3 int
        Grid size along a, b, c.
    order : int
        B-spline order (OpenMM uses 5).
    """

    def __init__(self, alpha: float, grid: tuple[int, int, int], order: int = PME_ORDER):
        super().__init__()
        self.alpha = float(alpha)
        self.grid = tuple(int(g) for g in grid)
        self.order = int(order)
        nx, ny, nz = self.grid
        half = nz // 2 + 1
        for name, size in zip("xyz", self.grid, strict=True):
            add_constant(self, f"moduli_{name}", bspline_moduli(size, order), DTYPE)
        # Signed frequencies of each stored index and of its mirror (-k mod n).
        index = [np.arange(nx), np.arange(ny), np.arange(half)]
        sizes = (nx, ny, nz)
        freq = [_signed_frequency(i, n) for i, n in zip(index, sizes, strict=True)]
        mirror = [(-i) % n for i, n in zip(index, sizes, strict=True)]
        mirror_freq = [_signed_frequency(i, n) for i, n in zip(mirror, sizes, strict=True)]
        add_constant(self, "freq", np.concatenate(freq), DTYPE)
        add_constant(self, "mirror_freq", np.concatenate(mirror_freq), DTYPE)
        add_constant(self, "mirror_index", np.concatenate(mirror))
        # Planes kz = 0 (and kz = nz/2 for even nz) are their own mirror: counted once.
        self_mirror = (index[2] == 0) | (2 * index[2] == nz)
        add_constant(self, "mirror_weight", np.where(self_mirror, 0.0, 1.0), DTYPE)
        add_constant(self, "offsets", np.arange(order))
        self._influence_cache: tuple[torch.Tensor, dict] | None = None

    def _influence(self, freqs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   moduli: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   recip: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        """``G`` on the stored half-spectrum for the given signed frequencies, zero at m = 0."""
        mx, my, mz = freqs
        # Reciprocal vector R m (R lower triangular for OpenMM's reduced boxes).
        m_vec = (mx[:, None, None, None] * recip[:, 0]
                 + my[None, :, None, None] * recip[:, 1]
                 + mz[None, None, :, None] * recip[:, 2])
        m2 = (m_vec * m_vec).sum(-1)
        origin = (mx[:, None, None] == 0) & (my[None, :, None] == 0) & (mz[None, None, :] == 0)
        m2 = torch.where(origin, torch.ones_like(m2), m2)
        denom = (math.pi * volume * m2 * moduli[0][:, None, None] * moduli[1][None, :, None]
                 * moduli[2][None, None, :])
        g = ONE_4PI_EPS0 * torch.exp(-(math.pi / self.alpha) ** 2 * m2) / denom
        return torch.where(origin, torch.zeros_like(g), g)

    def influence_function(self, box: torch.Tensor) -> torch.Tensor:
        """Folded influence function on the real-FFT half grid, shape (nx, ny, nz//2+1)."""
        g, g_mirror = self._influence_pair(box)
        return g + self.mirror_weight.to(box.dtype) * g_mirror

    def symmetric_influence(self, box: torch.Tensor) -> torch.Tensor:
        """``G_sym(m) = (G(m) + G(-m)) / 2`` on the real-FFT half grid, kJ/mol/e² (``-m`` the
        mirror index, ``-k mod n``): the energy is ``½ Σ_m G_sym |Q̂(m)|²`` over the full
        grid, and ``N · IFFT(G_sym Q̂)`` is its gradient ``∂E/∂Q`` (real, since ``G_sym`` is
        even)."""
        g, g_mirror = self._influence_pair(box)
        return 0.5 * (g + g_mirror)

    def _influence_pair(self, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``G`` at each stored index and at its mirror, on the real-FFT half grid."""
        nx, ny, nz = self.grid
        half = nz // 2 + 1
        recip = _reciprocal_box(box)
        volume = box[0, 0] * box[1, 1] * box[2, 2]
        split = [nx, ny, half]
        freqs = torch.split(self.freq.to(box.dtype), split)
        mirror_freqs = torch.split(self.mirror_freq.to(box.dtype), split)
        mirror_index = torch.split(self.mirror_index, split)
        full = (self.moduli_x.to(box.dtype), self.moduli_y.to(box.dtype),
                self.moduli_z.to(box.dtype))
        moduli = (full[0], full[1], full[2][:half])
        mirror_moduli = tuple(m[i] for m, i in zip(full, mirror_index, strict=True))
        return (self._influence(freqs, moduli, recip, volume),
                self._influence(mirror_freqs, mirror_moduli, recip, volume))

    def charge_grid(self, positions: torch.Tensor, charges: torch.Tensor,
                    box: torch.Tensor) -> torch.Tensor:
        """Charges spread on the grid with B-spline weights, shape (nx, ny, nz), e."""
        sizes = torch.as_tensor(self.grid, device=positions.device)
        frac = positions @ _reciprocal_box(box)
        frac = frac - torch.floor(frac)
        t = frac * sizes.to(positions.dtype)
        cell = torch.floor(t).detach()
        weights = bspline_weights(t - cell, self.order)          # (n_atoms, 3, order)
        idx = (cell.long()[:, :, None] + self.offsets) % sizes[:, None]
        nx, ny, nz = self.grid
        flat = ((idx[:, 0, :, None, None] * ny + idx[:, 1, None, :, None]) * nz
                + idx[:, 2, None, None, :])
        spread = (charges[:, None, None, None] * weights[:, 0, :, None, None]
                  * weights[:, 1, None, :, None] * weights[:, 2, None, None, :])
        grid = positions.new_zeros(nx * ny * nz).index_add(0, flat.reshape(-1),
                                                           spread.reshape(-1))
        return grid.reshape(nx, ny, nz)

    def forward(self, positions: torch.Tensor, charges: torch.Tensor,
                box: torch.Tensor) -> torch.Tensor:
        """Reciprocal-space energy, kJ/mol; arguments as for :meth:`EwaldReciprocal.forward`,
        but ``box`` may be any box in OpenMM's reduced form (rows a, b, c)."""
        spectrum = torch.fft.rfftn(self.charge_grid(positions, charges, box))
        power = spectrum.real ** 2 + spectrum.imag ** 2
        return 0.5 * (self._influence_for(box) * power).sum()

    def fused_energy(self, positions: torch.Tensor, charges: torch.Tensor,
                     box: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` by the fused mesh kernels (:mod:`.fused_pme`: forces, Hessian-vector
        products and charge VJPs in spread/FFT/gather passes); float64 on the CPU, the box not
        differentiated."""
        from . import fused_pme  # compiles its kernels on first use

        multiplier = self._cached(box, "multiplier", lambda b: float(
            np.prod(self.grid)) * self.symmetric_influence(b))
        return fused_pme.reciprocal_energy(positions, charges, box, self.grid, self.order,
                                           multiplier)

    def _influence_for(self, box: torch.Tensor) -> torch.Tensor:
        """Influence function, reused while the box stays the same and needs no gradient
        (the common fixed-volume case, where it would otherwise dominate the cost)."""
        if box.requires_grad:
            return self.influence_function(box)
        return self._cached(box, "folded", self.influence_function)

    def _cached(self, box: torch.Tensor, name: str, compute) -> torch.Tensor:
        """``compute(box)``, kept (under ``name``) while the box stays the same."""
        cache = self._influence_cache
        if (cache is None or cache[0].device != box.device or cache[0].dtype != box.dtype
                or not torch.equal(cache[0], box)):
            cache = (box.detach().clone(), {})
            self._influence_cache = cache
        if name not in cache[1]:
            cache[1][name] = compute(box.detach())
        return cache[1][name]
