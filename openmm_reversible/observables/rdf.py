"""Radial distribution function as a smooth, differentiable histogram.

A hard histogram has zero gradient almost everywhere. Here each pair distance ``d`` is spread
over the bins as a normal distribution of width ``sigma``: bin ``k`` receives the probability
mass that falls inside it,

    w_k(d) = Φ((e_{k+1} - d) / σ) - Φ((e_k - d) / σ),

with Φ the standard normal CDF and ``e`` the bin edges. The weights are smooth in ``d`` (so in
positions and box), sum to one for a distance well inside the range, and tend to the hard
histogram as σ → 0 (σ = 0 *is* the hard histogram). Only the bins within 8σ of a distance are
evaluated (neglected mass < 2e-15 per distance), so memory grows with the number of distances,
not with distances × bins.

The normalisation is mdtraj's ``compute_rdf``: counts over all frames divided by
``n_pairs · Σ_frames (1 / V_frame) · V_shell``, so g(r) → 1 at large r for an ideal gas and
σ → 0 reproduces mdtraj bin for bin.

Two implementations of the smeared counts give the same numbers (≤ 1e-12 relative,
``tests/test_observables_rdf.py``): :func:`smeared_histogram` in torch (the reference, and
the path for any dtype, device or a box that requires grad), and a compiled pair loop
(numba) that :func:`rdf` uses for float64 CPU positions and a constant box. The compiled loop
measures each pair's minimum-image distance, evaluates the Gaussian CDF at the
``2 reach + 2`` edges around it and adds the weights into a per-chunk histogram; its
backward (a ``torch.autograd.Function``, first order) is one more pass over the pairs with
the Gaussian densities at the same edges. No per-pair tensor is made (the torch version holds
``pairs × (2 reach + 2)`` of them). Pairs are split into a fixed number of chunks summed in a
fixed order, so results are bitwise the same whatever the thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from ..errors import InputError
from ..geometry import box_widths
from ..potential.fused import N_CHUNKS, ordered_sum
from .frames import as_index, check_box, check_frames, displacements, volumes
from .selection import pair_indices

_TRUNCATE = 8.0
"""Gaussian smearing is evaluated out to this many σ from each distance."""


def _bins(r_range, bin_width: float | None, n_bins: int | None) -> tuple[float, float, int]:
    try:
        r_min, r_max = (float(r) for r in r_range)
    except (TypeError, ValueError):
        raise InputError(f"r_range must be two numbers (r_min, r_max) in nm, got {r_range!r}"
                         ) from None
    if not (0.0 <= r_min < r_max) or not math.isfinite(r_max):
        raise InputError(f"r_range must satisfy 0 <= r_min < r_max (nm), got {r_range!r}")
    if n_bins is None:
        if bin_width is None or not bin_width > 0:
            raise InputError(f"bin_width must be a positive length in nm, got {bin_width!r}")
        # mdtraj's rule: as many whole bins of bin_width as fit in the range.
        n_bins = int((r_max - r_min) / bin_width)
        if n_bins < 1:
            raise InputError(f"bin_width={bin_width} nm is wider than r_range {r_range!r}")
    elif int(n_bins) < 1 or int(n_bins) != n_bins:
        raise InputError(f"n_bins must be a positive integer, got {n_bins!r}")
    return r_min, r_max, int(n_bins)


def _resolve_pairs(pairs, selections, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    if (pairs is None) == (selections is None):
        raise InputError("give exactly one of pairs (n_pairs, 2) or selections (first, second)")
    if selections is not None:
        first, second = selections
        as_index(first, n_atoms, "selections[0]")
        as_index(second, n_atoms, "selections[1]")
        pairs = pair_indices(first, second)
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise InputError(f"pairs must have shape (n_pairs, 2), got {pairs.shape}")
    idx = as_index(pairs, n_atoms, "pairs").reshape(-1, 2)
    return idx[:, 0], idx[:, 1]


def _smearing_window(edges: torch.Tensor, sigma: float) -> tuple[int, float, float]:
    """Bins evaluated on each side of a value's own bin (``reach``), and the range
    ``[lo, hi]`` (same unit as ``edges``) outside which a value reaches no bin."""
    width = float(edges[1] - edges[0])
    reach = math.ceil(_TRUNCATE * sigma / width)
    return reach, float(edges[0]) - reach * width, float(edges[-1]) + reach * width


def smeared_histogram(values: torch.Tensor, edges: torch.Tensor, sigma: float) -> torch.Tensor:
    """Histogram of ``values`` on uniform ``edges`` with Gaussian smearing of width ``sigma``.

    Parameters
    ----------
    values : torch.Tensor, shape (M,)
        Samples (e.g. distances, nm).
    edges : torch.Tensor, shape (n_bins + 1,)
        Uniformly spaced bin edges.
    sigma : float
        Standard deviation of the smearing, same unit as ``values``; 0 gives the hard
        histogram with NumPy's bin convention (half-open bins, the last one closed).

    Returns
    -------
    torch.Tensor, shape (n_bins,)
        Expected counts per bin; differentiable in ``values`` for ``sigma > 0``.
    """
    n_bins = edges.numel() - 1
    reach, lo, hi = _smearing_window(edges, sigma)
    values = values[(values >= lo) & (values <= hi)]
    # Bin holding each value: edges[k] <= v < edges[k + 1] (v == last edge goes to the last bin).
    home = torch.bucketize(values.detach(), edges, right=True) - 1
    counts = values.new_zeros(n_bins)
    if sigma == 0:
        return counts.index_add(0, home.clamp(0, n_bins - 1), torch.ones_like(values))
    # Each value's Gaussian CDF at the 2 reach + 2 edges around its home bin, once per edge:
    # the upper edge of one bin is the lower edge of the next. For a valid bin both edges are
    # inside ``edges``, so the clamp changes only entries that are masked out.
    offsets = torch.arange(-reach, reach + 2, device=values.device)
    around = home[:, None] + offsets
    scale = 1.0 / (sigma * math.sqrt(2.0))
    cdf = torch.erf((edges[around.clamp(0, n_bins)] - values[:, None]) * scale)
    bins = around[:, :-1]
    valid = (bins >= 0) & (bins < n_bins)
    weights = torch.where(valid, 0.5 * (cdf[:, 1:] - cdf[:, :-1]), torch.zeros_like(cdf[:, 1:]))
    return counts.index_add(0, bins.clamp(0, n_bins - 1).reshape(-1), weights.reshape(-1))


def rdf(positions: torch.Tensor, box, pairs=None, r_range=(0.0, 1.0),
        bin_width: float | None = 0.005, n_bins: int | None = None,
        sigma: float | None = None, periodic: bool = True, selections=None,
        compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Radial distribution function of atom pairs over all frames, smooth and differentiable.

    Parameters
    ----------
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm
        Frames; gradients flow to every frame.
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm
        Periodic box vectors (rows a, b, c); its volume normalises g(r), so it is required.
    pairs : array-like, shape (n_pairs, 2), int, optional
        Each row gives the indices of two atoms (e.g. from
        :func:`~openmm_reversible.observables.pair_indices`).
    r_range : (float, float), nm, default (0.0, 1.0)
        Minimum and maximum radii. With ``periodic``, ``r_range[1]`` must not exceed half the
        smallest perpendicular box width.
    bin_width : float, nm, default 0.005
        Width of the bins; ``int((r_max - r_min) / bin_width)`` bins span ``r_range``
        (mdtraj's rule).
    n_bins : int, optional
        Number of bins; overrides ``bin_width``.
    sigma : float, nm, optional
        Gaussian smearing width; default: the bin width. ``0`` gives the hard histogram
        (identical to ``mdtraj.compute_rdf``, no gradient with respect to positions).
    periodic : bool, default True
        Use minimum-image distances.
    selections : (array-like, array-like), optional
        Two atom selections instead of ``pairs``: all unordered pairs between them
        (each pair once, no self pairs).
    compiled : bool, default True
        Smear with the compiled pair loop (:func:`smeared_pair_counts`) where it applies:
        ``sigma > 0``, float64 positions on the CPU and a box that does not require grad
        (first derivatives only). ``False``, or any other input, uses the torch reference
        :func:`smeared_histogram`; both agree to 1e-12 relative.

    Returns
    -------
    r : torch.Tensor, shape (n_bins,), nm
        Bin centres.
    g_r : torch.Tensor, shape (n_bins,)
        Radial distribution function at ``r`` (dimensionless).

    Raises
    ------
    InputError
        Bad shapes, empty selection, non-positive bins, negative ``sigma``, missing box, or
        ``r_range`` beyond half the box width.

    Examples
    --------
    >>> O = atom_indices(topology, element="O")
    >>> r, g = rdf(positions, box, selections=(O, O), r_range=(0.2, 0.9), bin_width=0.01)
    >>> loss = ((g - g_ref) ** 2).mean(); loss.backward()
    """
    positions = check_frames(positions)
    n_frames, n_atoms = positions.shape[:2]
    box = check_box(box, n_frames, positions, required=True)
    r_min, r_max, n_bins = _bins(r_range, bin_width, n_bins)
    width = (r_max - r_min) / n_bins
    sigma = width if sigma is None else float(sigma)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise InputError(f"sigma must be a non-negative width in nm, got {sigma!r}")
    if periodic:
        half = 0.5 * float(box_widths(box.detach()).min())
        if r_max > half:
            raise InputError(
                f"r_range[1] = {r_max} nm exceeds half the smallest box width ({half:.4f} nm), "
                f"where minimum-image distances stop being unique; lower r_range[1] or use a "
                f"larger box")
    first, second = _resolve_pairs(pairs, selections, n_atoms)
    first, second = first.to(positions.device), second.to(positions.device)

    edges = torch.linspace(r_min, r_max, n_bins + 1, dtype=positions.dtype,
                           device=positions.device)
    if compiled and sigma > 0 and compiled_unavailable(positions, box) is None:
        counts = smeared_pair_counts(positions, box if periodic else None, first, second,
                                     edges, sigma)
    else:
        distances = displacements(positions, first, second, box, periodic).norm(dim=-1)
        counts = smeared_histogram(distances.reshape(-1), edges, sigma)
    shells = (4.0 / 3.0) * math.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    inverse_volume_sum = (1.0 / volumes(box)).sum() if box.ndim == 3 \
        else n_frames / volumes(box)
    g_r = counts / (first.numel() * inverse_volume_sum * shells)
    return 0.5 * (edges[1:] + edges[:-1]), g_r


# ------------------------------------------------------------------------ compiled pair loop


def compiled_unavailable(positions: torch.Tensor, box: torch.Tensor | None) -> str | None:
    """Why :func:`smeared_pair_counts` cannot take these inputs, or None when it can."""
    if positions.dtype != torch.float64 or positions.device.type != "cpu":
        return f"positions are {positions.dtype} on {positions.device}, not float64 on the CPU"
    if box is not None and box.requires_grad:
        return "the box requires grad (the compiled loop differentiates positions only)"
    return None


def smeared_pair_counts(positions: torch.Tensor, box: torch.Tensor | None,
                        first: torch.Tensor, second: torch.Tensor, edges: torch.Tensor,
                        sigma: float) -> torch.Tensor:
    """Smeared histogram of the pair distances of every frame, by the compiled pair loop.

    The same counts as ``smeared_histogram(distances, edges, sigma)`` with ``distances`` the
    minimum-image distances of the pairs ``(first[p], second[p])`` in all frames (module
    docstring), without per-pair tensors.

    Parameters
    ----------
    positions : torch.Tensor, shape (n_frames, n_atoms, 3), nm, float64, CPU
        Differentiable (first order).
    box : torch.Tensor, shape (3, 3) or (n_frames, 3, 3), nm, or None
        Minimum image in this box; ``None`` for plain distances. Not differentiated.
    first, second : torch.Tensor of int64, shape (n_pairs,)
        Atom indices of the pairs.
    edges : torch.Tensor, shape (n_bins + 1,), nm
        Uniformly spaced bin edges.
    sigma : float, nm
        Smearing width, > 0.

    Returns
    -------
    torch.Tensor, shape (n_bins,)
        Expected counts per bin, summed over frames.
    """
    reason = compiled_unavailable(positions, box)
    if reason is not None or not sigma > 0:
        raise InputError(f"the compiled RDF loop cannot take these inputs: "
                         f"{reason or f'sigma = {sigma!r} (it needs sigma > 0)'}; use "
                         "smeared_histogram (or rdf(..., compiled=False))")
    reach, lo, hi = _smearing_window(edges, sigma)
    n_frames = positions.shape[0]
    boxes = np.zeros((n_frames, 3, 3))
    if box is not None:
        boxes[:] = box.detach().numpy()
    fixed = (boxes, box is not None, first.numpy(), second.numpy(),
             np.ascontiguousarray(edges.detach().numpy()), reach, lo, hi,
             1.0 / (sigma * math.sqrt(2.0)))
    return _SmearedPairCounts.apply(positions, fixed)


class _SmearedPairCounts(torch.autograd.Function):
    """Counts of the compiled pair loop; backward: the positions' VJP in one more pass."""

    @staticmethod
    def forward(ctx, positions: torch.Tensor, fixed: tuple) -> torch.Tensor:
        x = np.ascontiguousarray(positions.detach().numpy())
        boxes, *rest = fixed
        chunks = np.zeros((N_CHUNKS, fixed[4].shape[0] - 1))
        counts = np.zeros(chunks.shape[1])
        for s in range(x.shape[0]):
            chunks[:] = 0.0
            _pair_counts(x[s], boxes[s], *rest, chunks)
            counts += ordered_sum(chunks)
        ctx.fixed = fixed
        ctx.save_for_backward(positions)
        return torch.from_numpy(counts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_counts: torch.Tensor):
        (positions,) = ctx.saved_tensors
        x = np.ascontiguousarray(positions.detach().numpy())
        boxes, *rest = ctx.fixed
        cotangent = np.ascontiguousarray(grad_counts.detach().numpy(), dtype=np.float64)
        grad = np.empty_like(x)
        chunks = np.zeros((N_CHUNKS, *x.shape[1:]))
        for s in range(x.shape[0]):
            chunks[:] = 0.0
            _pair_counts_vjp(x[s], boxes[s], *rest, cotangent, chunks)
            grad[s] = ordered_sum(chunks)
        return torch.from_numpy(grad), None


@numba.njit(cache=True, inline="always")
def _pair_distance(x: np.ndarray, box: np.ndarray, periodic: bool, i: int, j: int
                   ) -> tuple:  # pragma: no cover (compiled)
    """``|d|`` and ``d = x[j] - x[i]`` (nm), minimum image as :func:`~..geometry.minimum_image`
    (c, then b, then a, each rounded on its own axis)."""
    dx, dy, dz = x[j, 0] - x[i, 0], x[j, 1] - x[i, 1], x[j, 2] - x[i, 2]
    if periodic:
        n = np.rint(dz / box[2, 2])
        dx, dy, dz = dx - n * box[2, 0], dy - n * box[2, 1], dz - n * box[2, 2]
        n = np.rint(dy / box[1, 1])
        dx, dy, dz = dx - n * box[1, 0], dy - n * box[1, 1], dz - n * box[1, 2]
        n = np.rint(dx / box[0, 0])
        dx, dy, dz = dx - n * box[0, 0], dy - n * box[0, 1], dz - n * box[0, 2]
    return math.sqrt(dx * dx + dy * dy + dz * dz), dx, dy, dz


@numba.njit(cache=True, inline="always")
def _bins_reached(edges: np.ndarray, reach: int, v: float) -> tuple:  # pragma: no cover
    """The bins ``[b0, b1)`` that value ``v`` contributes to: those within ``reach`` of its
    home bin (the last edge ``<= v``, as ``torch.bucketize(..., right=True) - 1``)."""
    n_bins = edges.shape[0] - 1
    home = int(math.floor((v - edges[0]) / (edges[1] - edges[0])))
    home = min(max(home, -1), n_bins)
    while home < n_bins and edges[home + 1] <= v:
        home += 1
    while home >= 0 and edges[home] > v:
        home -= 1
    return max(home - reach, 0), min(home + reach + 1, n_bins)


@numba.njit(cache=True, parallel=True)
def _pair_counts(x: np.ndarray, box: np.ndarray, periodic: bool, first: np.ndarray,
                 second: np.ndarray, edges: np.ndarray, reach: int, lo: float, hi: float,
                 scale: float, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """Add each pair's smeared weights ``½(erf((e_{b+1} - d)·scale) - erf((e_b - d)·scale))``
    into ``out[chunk]`` (shape (n_chunks, n_bins)), chunks of consecutive pairs."""
    n_chunks, n_pairs = out.shape[0], first.shape[0]
    for c in numba.prange(n_chunks):
        for p in range(c * n_pairs // n_chunks, (c + 1) * n_pairs // n_chunks):
            v = _pair_distance(x, box, periodic, first[p], second[p])[0]
            if not (v >= lo and v <= hi):
                continue
            b0, b1 = _bins_reached(edges, reach, v)
            below = math.erf((edges[b0] - v) * scale)
            for b in range(b0, b1):
                above = math.erf((edges[b + 1] - v) * scale)
                out[c, b] += 0.5 * (above - below)
                below = above


@numba.njit(cache=True, parallel=True)
def _pair_counts_vjp(x: np.ndarray, box: np.ndarray, periodic: bool, first: np.ndarray,
                     second: np.ndarray, edges: np.ndarray, reach: int, lo: float, hi: float,
                     scale: float, cotangent: np.ndarray, out: np.ndarray
                     ) -> None:  # pragma: no cover (compiled)
    """Add ``Σ_b cotangent[b] ∂w_b/∂x`` of each pair into ``out[chunk]`` (shape
    (n_chunks, n_atoms, 3)): ``∂w_b/∂d = -scale/√π (exp(-z_{b+1}²) - exp(-z_b²))``,
    ``z = (e - d)·scale``, and ``∂d/∂x_j = -∂d/∂x_i = d⃗/|d|``."""
    n_chunks, n_pairs = out.shape[0], first.shape[0]
    factor = -scale / math.sqrt(math.pi)
    for c in numba.prange(n_chunks):
        for p in range(c * n_pairs // n_chunks, (c + 1) * n_pairs // n_chunks):
            i, j = first[p], second[p]
            v, dx, dy, dz = _pair_distance(x, box, periodic, i, j)
            if not (v >= lo and v <= hi) or v == 0.0:
                continue
            b0, b1 = _bins_reached(edges, reach, v)
            z = (edges[b0] - v) * scale
            below = math.exp(-z * z)
            total = 0.0
            for b in range(b0, b1):
                z = (edges[b + 1] - v) * scale
                above = math.exp(-z * z)
                total += cotangent[b] * (above - below)
                below = above
            s = factor * total / v
            out[c, j, 0] += s * dx
            out[c, j, 1] += s * dy
            out[c, j, 2] += s * dz
            out[c, i, 0] -= s * dx
            out[c, i, 1] -= s * dy
            out[c, i, 2] -= s * dz
