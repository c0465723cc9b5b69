"""Fused smooth-PME reciprocal space: energy, forces, Hessian-vector products and charge VJPs
by spreading, FFT and gathering passes, with no autograd graph.

The reciprocal energy of smooth PME (:class:`~.ewald.PMEReciprocal`) is a quadratic form in
the charges:

.. math::

    E = \\tfrac{1}{2} Q^\\mathsf{T} K Q, \\qquad
    Q(\\mathbf{g}) = \\sum_i q_i W_i(\\mathbf{g}), \\qquad
    W_i(\\mathbf{g}) = \\prod_{d} w_{d}(t_{id} - g_d),

where ``t_i = n ⊙ frac(x_i B⁻¹)`` are the atom's scaled fractional coordinates (``n`` the grid
size, ``B`` the box with rows a, b, c), ``w`` the cardinal B-spline weights of
:func:`~.ewald.bspline_weights`, and ``K`` the convolution whose Fourier multiplier is the
symmetrised influence function (``K Q = N · IFFT(G_sym · FFT(Q))``, :meth:`~.ewald.PMEReciprocal.
symmetric_influence`). ``φ = K Q = ∂E/∂Q`` is the potential on the grid. With the constant
Jacobian ``J = B⁻¹ diag(n)`` (``∂t/∂x``), every derivative the reverse pass asks for is again a
spread, a convolution or a gather:

- gradient: ``∂E/∂q_i = Σ_g W_i φ`` and ``∂E/∂x_i = q_i J Σ_g ∇_t W_i φ``;
- Hessian-vector product with a cotangent ``(v_x, v_q)``: spread the tangent grid
  ``δQ = Σ_i v_q,i W_i + q_i (Jᵀ v_x,i) · ∇_t W_i``, convolve ``δφ = K δQ``, then gather

  ``(Hv)_x,i = q_i J [Σ_g ∇_t W_i δφ + (Σ_g ∇_t ∇_tᵀ W_i φ) Jᵀ v_x,i] + v_q,i J Σ_g ∇_t W_i φ``,
  ``(Hv)_q,i = Σ_g W_i δφ + (Jᵀ v_x,i) · Σ_g ∇_t W_i φ``.

The spline derivatives follow from ``M_n'(u) = M_{n-1}(u) - M_{n-1}(u - 1)``: with the weights
of orders ``p - 1`` and ``p - 2`` kept from the recursion, ``w'_j = w^{(p-1)}_{j-1} -
w^{(p-1)}_j`` and ``w''_j = w^{(p-2)}_{j-2} - 2 w^{(p-2)}_{j-1} + w^{(p-2)}_j``.

The box is not differentiated (a box that requires grad takes the autograd path, see
:func:`.fused.unavailable_reason`). Determinism: the spreading runs serially in atom order and
each atom's gather is independent, so results do not depend on the thread count. Kernels are
numba-compiled on first use and cached.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..errors import InputError
from . import fused

_ORDER_MIN = 3
"""Smallest spline order with a continuous first derivative (the HVP needs ``w''``)."""


@numba.njit(cache=True, error_model="numpy")
def _splines(t, sizes, order, index, w, dw, ddw):
    """Grid indices and B-spline weights with their first two derivatives, per atom and axis.

    ``t`` (n, 3) scaled fractional coordinates in [0, n_d); outputs (n, 3, order).
    The weights use the recursion of :func:`~.ewald.bspline_weights` operation for operation.
    """
    w1 = np.zeros(order)
    w2 = np.zeros(order)
    for i in range(t.shape[0]):
        for d in range(3):
            cell = math.floor(t[i, d])
            u = t[i, d] - cell
            base = int(cell)
            for j in range(order):
                index[i, d, j] = (base + j) % sizes[d]
            v = w[i, d]
            v[:] = 0.0
            v[0] = 1.0
            for n in range(2, order + 1):
                inv = 1.0 / (n - 1)
                v[n - 1] = inv * u * v[n - 2]
                for m in range(1, n - 1):
                    v[n - m - 1] = inv * ((u + m) * v[n - m - 2] + (n - m - u) * v[n - m - 1])
                v[0] = inv * (1.0 - u) * v[0]
                if n == order - 2:
                    w2[:] = v
                elif n == order - 1:
                    w1[:] = v
            if order - 2 == 1:
                w2[:] = 0.0
                w2[0] = 1.0
            for j in range(order):
                first = 0.0
                if j >= 1:
                    first += w1[j - 1]
                if j <= order - 2:
                    first -= w1[j]
                dw[i, d, j] = first
                second = 0.0
                if j >= 2:
                    second += w2[j - 2]
                if 1 <= j <= order - 2:
                    second -= 2.0 * w2[j - 1]
                if j <= order - 3:
                    second += w2[j]
                ddw[i, d, j] = second


@numba.njit(cache=True, error_model="numpy")
def _spread(index, w, dw, coef, tangent, with_tangent, grid):
    """``grid += Σ_i coef_i W_i + tangent_i · ∇_t W_i`` (the tangent part if
    ``with_tangent``), serially in atom order."""
    order = w.shape[2]
    for i in range(index.shape[0]):
        c = coef[i]
        tx = ty = tz = 0.0
        if with_tangent:
            tx, ty, tz = tangent[i, 0], tangent[i, 1], tangent[i, 2]
        for a in range(order):
            ga = index[i, 0, a]
            wx, dx = w[i, 0, a], dw[i, 0, a]
            for b in range(order):
                gb = index[i, 1, b]
                wy, dy = w[i, 1, b], dw[i, 1, b]
                value = c * wx * wy
                value_z = 0.0
                if with_tangent:
                    value_z = tz * wx * wy
                    value += tx * dx * wy + ty * wx * dy
                for k in range(order):
                    gc = index[i, 2, k]
                    contribution = value * w[i, 2, k]
                    if with_tangent:
                        contribution += value_z * dw[i, 2, k]
                    grid[ga, gb, gc] += contribution


@numba.njit(cache=True, error_model="numpy")
def _gather(index, w, dw, ddw, phi, second, s0, s1, s2):
    """Per atom: ``s0 = Σ W φ``, ``s1 = Σ ∇_t W φ`` and, if ``second``, the upper triangle of
    ``Σ ∇_t ∇_tᵀ W φ`` as ``s2 = (xx, yy, zz, xy, xz, yz)``."""
    order = w.shape[2]
    for i in range(index.shape[0]):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = 0.0
        for a in range(order):
            ga = index[i, 0, a]
            wx, dx, ddx = w[i, 0, a], dw[i, 0, a], ddw[i, 0, a]
            for b in range(order):
                gb = index[i, 1, b]
                wy, dy, ddy = w[i, 1, b], dw[i, 1, b], ddw[i, 1, b]
                z0 = z1 = z2 = 0.0
                for k in range(order):
                    p = phi[ga, gb, index[i, 2, k]]
                    z0 += w[i, 2, k] * p
                    z1 += dw[i, 2, k] * p
                    if second:
                        z2 += ddw[i, 2, k] * p
                a0 += wx * wy * z0
                a1 += dx * wy * z0
                a2 += wx * dy * z0
                a3 += wx * wy * z1
                if second:
                    a4 += ddx * wy * z0
                    a5 += wx * ddy * z0
                    a6 += wx * wy * z2
                    a7 += dx * dy * z0
                    a8 += dx * wy * z1
                    a9 += wx * dy * z1
        s0[i] = a0
        s1[i, 0] = a1
        s1[i, 1] = a2
        s1[i, 2] = a3
        if second:
            s2[i, 0] = a4
            s2[i, 1] = a5
            s2[i, 2] = a6
            s2[i, 3] = a7
            s2[i, 4] = a8
            s2[i, 5] = a9


_UPPER = np.array([[0, 3, 4], [3, 1, 5], [4, 5, 2]])
"""Position of ``(d, e)`` in the packed symmetric ``s2`` rows."""


class MeshEvaluation:
    """One fused PME reciprocal evaluation at fixed box and grid (the evaluation protocol of
    :func:`.fused.kernel_energy`): the spline tables and the grid potential of the forward
    pass are kept for the backward pass at the same positions.

    Parameters
    ----------
    box : numpy.ndarray, shape (3, 3), nm
        Box vectors as rows (OpenMM's reduced form).
    grid : tuple of 3 int
        Grid points along a, b, c.
    order : int
        B-spline order.
    multiplier : numpy.ndarray, shape (nx, ny, nz//2+1), kJ/mol/e²
        Fourier multiplier of ``K`` on the real-FFT half grid: ``N · G_sym``.
    """

    def __init__(self, box: np.ndarray, grid: tuple[int, int, int], order: int,
                 multiplier: np.ndarray):
        if order < _ORDER_MIN:
            raise InputError(f"PME spline order {order}: the fused mesh kernels need order >= "
                             f"{_ORDER_MIN} (continuous second derivatives); use the "
                             "autograd path (TorchPotential(fused=False))")
        self.grid = tuple(int(g) for g in grid)
        self.order = int(order)
        self.multiplier = multiplier
        self.inverse = np.linalg.inv(box)
        self.jacobian = self.inverse * np.asarray(self.grid, dtype=np.float64)[None, :]
        self._state: tuple | None = None

    def _tables(self, x: np.ndarray) -> tuple:
        frac = x @ self.inverse
        frac = frac - np.floor(frac)
        t = frac * np.asarray(self.grid, dtype=np.float64)
        shape = (x.shape[0], 3, self.order)
        index = np.empty(shape, dtype=np.int64)
        w, dw, ddw = np.empty(shape), np.empty(shape), np.empty(shape)
        _splines(t, np.asarray(self.grid, dtype=np.int64), self.order, index, w, dw, ddw)
        return index, w, dw, ddw

    def _convolve(self, charge_grid: np.ndarray) -> np.ndarray:
        """``K Q``: the grid potential of a charge grid, kJ/mol/e."""
        spectrum = np.fft.rfftn(charge_grid)
        spectrum *= self.multiplier
        return np.fft.irfftn(spectrum, s=self.grid, axes=(0, 1, 2))

    def _spread(self, tables: tuple, coef: np.ndarray, tangent: np.ndarray | None
                ) -> np.ndarray:
        index, w, dw, _ = tables
        out = np.zeros(self.grid)
        with_tangent = tangent is not None
        _spread(index, w, dw, coef, tangent if with_tangent else np.zeros((0, 3)),
                with_tangent, out)
        return out

    def _gather(self, tables: tuple, phi: np.ndarray, second: bool) -> tuple:
        index, w, dw, ddw = tables
        n = index.shape[0]
        s0, s1 = np.empty(n), np.empty((n, 3))
        s2 = np.empty((n, 6) if second else (0, 6))
        _gather(index, w, dw, ddw, phi, second, s0, s1, s2)
        return s0, s1, s2

    def forward(self, x: np.ndarray, q: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Energy (kJ/mol), ``∂E/∂x`` (kJ/mol/nm) and ``∂E/∂q`` (kJ/mol/e)."""
        tables = self._tables(x)
        phi = self._convolve(self._spread(tables, q, None))
        s0, s1, _ = self._gather(tables, phi, second=False)
        # E = ½ Q·φ = ½ Σ_i q_i Σ_g W_i φ
        energy = 0.5 * float(q @ s0)
        self._state = (tables, q.copy(), phi, s1)
        return energy, q[:, None] * (s1 @ self.jacobian.T), s0

    def backward(self, x: np.ndarray, vx: np.ndarray, vq: np.ndarray | None,
                 params_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        """Hessian-vector product ``H (v_x, v_q)``: its position part (kJ/mol/nm²·nm) and its
        charge part; ``vq`` None for a position-only cotangent."""
        if self._state is None:
            raise RuntimeError("MeshEvaluation.backward before forward: evaluate the energy "
                               "first")
        tables, q, phi, s1 = self._state
        tangent_t = vx @ self.jacobian               # Jᵀ v_x per atom, in grid coordinates
        coef = np.zeros(q.shape) if vq is None else vq
        dphi = self._convolve(self._spread(tables, coef, q[:, None] * tangent_t))
        d0, d1, _ = self._gather(tables, dphi, second=False)
        _, _, s2 = self._gather(tables, phi, second=True)
        curvature = s2[:, _UPPER]                    # (n, 3, 3) Σ ∇∇ᵀW φ
        inner = d1 + np.einsum("nde,ne->nd", curvature, tangent_t)
        hx = q[:, None] * (inner @ self.jacobian.T)
        hq = d0 + (s1 * tangent_t).sum(1)
        if vq is not None:
            hx += vq[:, None] * (s1 @ self.jacobian.T)
        return hx, hq.reshape(params_shape)


def reciprocal_energy(positions: torch.Tensor, charges: torch.Tensor, box: torch.Tensor,
                      grid: tuple[int, int, int], order: int,
                      multiplier: torch.Tensor) -> torch.Tensor:
    """Smooth-PME reciprocal energy by the fused mesh kernels, kJ/mol.

    Parameters
    ----------
    positions : torch.Tensor, shape (n_atoms, 3), nm, float64, CPU
    charges : torch.Tensor, shape (n_atoms,), e
        Differentiable (charge VJPs).
    box : torch.Tensor, shape (3, 3), nm
        Reduced box (rows a, b, c); not differentiated.
    grid : tuple of 3 int
    order : int
        B-spline order.
    multiplier : torch.Tensor, shape (nx, ny, nz//2+1), kJ/mol/e²
        ``N · G_sym`` (:meth:`~.ewald.PMEReciprocal.symmetric_influence` times the number of
        grid points).

    Returns
    -------
    torch.Tensor, 0-dim, kJ/mol
        Differentiable twice w.r.t. ``positions`` and ``charges``.
    """
    evaluation = MeshEvaluation(box.detach().numpy(), grid, order,
                                np.ascontiguousarray(multiplier.detach().numpy()))
    return fused.kernel_energy(evaluation, positions, charges)
