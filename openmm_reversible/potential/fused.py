"""Fused CPU kernels for energy terms: forces, Hessian-vector products and parameter VJPs.

The autograd path builds per-pair tensors and a double-backward graph at every step of a
reversible window. The fused path instead lifts a *scalar law* over a term's pairs or bonded
chains in one compiled loop, with every derivative the reverse pass needs **generated** from
the law by sympy (never written by hand):

- **Pair family** (:class:`PairLaw`): ``u(r; p_i, p_j)`` of a distance and the parameter rows of
  the two particles (e.g. charge, sigma, sqrt(epsilon)). Generated: ``u``, ``u'``, ``u''``,
  ``∂u/∂p``, ``∂u'/∂p`` and ``∂²u/∂p²``. The kernel lifts them with the radial identities
  ``∇u = u' d/r`` and ``H w = (u'/r) w + (u'' - u'/r)(d·w) d / r²``.
- **Chain family** (:class:`ChainLaw`): ``E(b_1 … b_k; p)`` of the chain vectors of a bond,
  angle or torsion (``b_m = x[a_m] - x[a_{m-1}]``) through its geometry (length, angle,
  dihedral) and energy law. Generated: ``E``, ``∂E/∂b``, ``∂E/∂p`` and the directional
  derivatives of ``(∂E/∂b)·v + (∂E/∂p)·w`` in ``b`` and ``p``.

Each law is the same Python function the autograd path evaluates (it is called with sympy
symbols here, see :mod:`.lawmath`), so the two paths cannot drift apart.

The kernels plug into autograd without changing any caller's math: :func:`pair_energy` and
:func:`chain_energy` return an energy whose backward gives the forces (computed in the same
pass as the energy), and that gradient's backward gives the Hessian-vector product with the
cotangent and the parameter VJP in one further pass. Accelerations, their VJPs and double
backward in the integrators work unchanged.

Determinism: the items are split into a fixed number of contiguous chunks (``N_CHUNKS``, not
the thread count); each chunk is summed serially into its own buffer and the buffers are added
in chunk order. The same positions give bitwise the same results whatever the number of
threads. Kernels run on the CPU in float64 (numba; CUDA is not covered): other dtypes and
devices, or a box that requires grad, use the autograd path (:func:`unavailable_reason`).

Generated modules are written to a cache directory outside the source tree (environment
variable ``OPENMM_REVERSIBLE_CACHE``, default ``~/.cache/openmm-reversible``), keyed by a hash
of the generator and law sources, and numba caches their machine code beside them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numba
import numpy as np
import torch

from . import lawmath, special

N_CHUNKS = 16
"""Fixed number of summation chunks (independent of the thread count: determinism)."""

PARALLEL_MIN_ITEMS = 50_000
"""Items (pairs, bonds) from which the threaded kernels are used: below it, starting threads
costs more than it saves. Results do not depend on the choice."""

_VERSION = "5"
"""Bump when the generated code changes shape (part of the cache key)."""


# ------------------------------------------------------------------------------- availability


def unavailable_reason(positions: torch.Tensor, box: torch.Tensor | None) -> str | None:
    """Why the fused kernels cannot evaluate at these inputs, or ``None`` if they can.

    Parameters
    ----------
    positions : torch.Tensor, shape (n_atoms, 3), nm
    box : torch.Tensor, shape (3, 3), nm, or None
    """
    if positions.device.type != "cpu":
        return f"positions are on {positions.device.type}; the fused kernels run on the CPU only"
    if positions.dtype != torch.float64:
        return f"positions are {positions.dtype}; the fused kernels need float64"
    if box is not None and box.requires_grad:
        return "the box requires grad; the fused kernels give no derivatives w.r.t. the box"
    return None


# ------------------------------------------------------------------------------- laws


@dataclass(frozen=True)
class PairLaw:
    """A pair energy ``u(r; p_i, p_j; c)`` to lift over pairs of particles.

    Parameters
    ----------
    name : str
        Identifier (part of the generated module's name).
    law : callable
        ``law(r, a, b, c) -> energy``: ``r`` the distance (nm), ``a`` and ``b`` the parameter
        rows of the two particles (tuples of length ``n_params``), ``c`` the constants (tuple
        of length ``n_consts``). Called with sympy symbols; must use only arithmetic and
        :mod:`.lawmath`.
    n_params, n_consts : int
    sources : tuple of callables
        Functions whose source defines the law (for the cache key).
    """

    name: str
    law: Callable
    n_params: int
    n_consts: int
    sources: tuple = field(default=())


@dataclass(frozen=True)
class ChainLaw:
    """An energy ``E(b_1 … b_k; p; c)`` of the chain vectors of one bonded item.

    Parameters
    ----------
    name : str
    law : callable
        ``law(vectors, p, c) -> energy`` with ``vectors`` a list of ``width - 1`` sympy 3-vectors
        (nm), ``p`` the item's parameter row (tuple of ``n_params``), ``c`` the constants.
    width : int
        Atoms per chain (2 bond, 3 angle, 4 torsion).
    n_params, n_consts : int
    sources : tuple of callables
    """

    name: str
    law: Callable
    width: int
    n_params: int
    n_consts: int
    sources: tuple = field(default=())


# ------------------------------------------------------------------------------- generation


@functools.cache
def _sympy_classes() -> tuple:
    """The symbolic function ``erfcx`` and a printer that writes it as :func:`.special.erfcx`
    (made on first use: sympy is imported only to generate kernels)."""
    import sympy
    from sympy.printing.pycode import PythonCodePrinter

    class Erfcx(sympy.Function):
        """``exp(z²) erfc(z)``; only printed, never differentiated (the laws are
        differentiated with ``erfc`` before it is rewritten)."""

    class Printer(PythonCodePrinter):
        def _print_Erfcx(self, expr) -> str:
            return f"erfcx({self._print(expr.args[0])})"

        def _print_Detached(self, expr) -> str:  # lawmath.detach: a value, no derivative
            return f"({self._print(expr.args[0])})"

        def _print_Pow(self, expr, rational=False) -> str:
            # numba raises ZeroDivisionError for 0.0 ** -n; 1.0 / 0.0 ** n is inf (the
            # kernels' error model), as in torch: a law's unused branch may meet it
            if expr.exp.is_Integer and expr.exp < 0:
                return f"(1.0/({self._print(expr.base ** -expr.exp)}))"
            return super()._print_Pow(expr, rational)

    return Erfcx, Printer


def _cse_lines(exprs, indent: str, inverse: tuple | None = None) -> str:
    """Python assignments ``x_k = ...; o_m = ...`` computing ``exprs`` with common
    subexpressions shared (the printer emits ``math.*`` calls and inline conditionals).
    ``inverse = (r, ir)`` writes negative powers of ``r`` as powers of ``ir = 1/r`` (one
    division per pair instead of one per power)."""
    import sympy

    erfcx, printer_class = _sympy_classes()
    exprs = list(exprs)
    if inverse is not None:
        r, ir = inverse
        exprs = [sympy.sympify(e).replace(
            lambda e: e.is_Pow and e.base == r and e.exp.is_negative,
            lambda e: ir ** (-e.exp)) for e in exprs]
    # erfc(z) = exp(-z²) erfcx(z): the exponential is shared with the derivatives and
    # erfcx is a table lookup (special.erfcx) instead of a library erfc call
    exprs = [sympy.sympify(e).replace(sympy.erfc, lambda z: sympy.exp(-z**2) * erfcx(z))
             for e in exprs]
    printer = printer_class({"fully_qualified_modules": True})
    replacements, reduced = sympy.cse(exprs, symbols=sympy.numbered_symbols("t_"))
    lines = [f"{indent}{name} = {printer.doprint(value)}" for name, value in replacements]
    lines += [f"{indent}o{k} = {printer.doprint(value)}" for k, value in enumerate(reduced)]
    return "\n".join(lines)


def _symbols(prefix: str, count: int) -> tuple:
    import sympy

    return tuple(sympy.Symbol(f"{prefix}{k}", real=True) for k in range(count))


_HEADER = '''"""Generated by openmm_reversible.potential.fused from the law {name!r}"""
import math

import numba
import numpy as np

from openmm_reversible.potential.special import erfcx  # noqa: F401 (used by some laws)

'''


def _chunked_loop(count: str, consts: str, setup: str = "") -> str:
    """Generated source opening a kernel's loop: ``count`` items in ``n_chunks`` fixed chunks
    (``numba.prange``), each summing into ``acc`` in item order; the body follows at 12
    spaces, item index ``t``. The fixed chunks make the sums independent of the thread
    count."""
    return (f"    n = {count}\n{setup}{consts}\n"
            "    for chunk in numba.prange(n_chunks):\n"
            "        lo = chunk * n // n_chunks\n"
            "        hi = (chunk + 1) * n // n_chunks\n"
            "        acc = 0.0\n"
            "        for t in range(lo, hi):")


def _hoisted(n_consts: int) -> str:
    """Box entries and law constants as locals (the loop writes arrays, so the compiler could
    not keep array loads out of it by itself)."""
    return "\n".join([f"    box{a}{b} = box[{a}, {b}]" for a in range(3) for b in range(3)]
                     + [f"    c{m} = consts[{m}]" for m in range(n_consts)])


_PAIR_ARGS = "x, box, i, j, codes, images, P, consts, cutoff2, suspect2, n_chunks"
_CHAIN_ARGS = "x, box, atoms, P, consts, periodic, n_chunks"


def _kernel(name: str, arguments: str, body: str) -> str:
    """A kernel twice: serial ``name`` and threaded ``name_parallel`` (same chunks, so the same
    bits; numba compiles each on first use). NumPy's error model: IEEE division without a
    zero check per operation (the laws are finite wherever the pairs are distinct)."""
    return "".join(f"""
@numba.njit({flags}cache=True, error_model="numpy")
def {name}{suffix}({arguments}):
{body}""" for suffix, flags in (("", ""), ("_parallel", "parallel=True, ")))


_XYZ = "xyz"


def _pair_loop(k: int, n_consts: int, outputs: tuple[str, str], inputs: tuple[str, ...],
               row_loads: list[str], branch: bool) -> tuple[str, str]:
    """Generated source of a pair kernel up to its law, and the lines that close a chunk.

    Fixed chunks as in :func:`_chunked_loop`; in each, the pairs in list order, with the first
    particle's contributions summed in locals (``fa*``, ``pa*``) and added to its rows of the
    chunk buffers ``outputs`` (positions, parameters) when the first index changes. The half
    list is sorted by ``i``, so a row is loaded and written once per run of pairs instead of
    once per pair (any order gives the same sums, pair by pair). Arrays are read flat with
    unsigned indices (no negative-index wraparound per access). A pair beyond the cutoff is
    skipped when ``branch``; otherwise it is evaluated and weighted by ``keep = 0`` (the laws
    are finite there): for a cheap law a branch taken at random costs more than the
    arithmetic it saves. Both give the same bits (``keep = 1`` multiplies exactly)."""
    ind = " " * 12
    gx, gp = outputs
    row_sums = " = ".join([f"fa{a}" for a in _XYZ] + [f"pa{m}" for m in range(k)]) + " = 0.0"
    flush = ([f"{gx}c[3 * ia + {m}] += fa{_XYZ[m]}" for m in range(3)]
             + [f"{gp}c[{k} * ia + {m}] += pa{m}" for m in range(k)])
    # The pair selection of neighbors.CutoffPairs, in the loop: the cached image of the pair
    # (the positions are moved back by the atoms' wraps since the list build, see
    # pair_energy); the full minimum image (OpenMM's order: c, b, a) where the cached image
    # may not be the nearest; then the cutoff.
    minimum_image = "\n".join(
        f"{ind}    s = np.rint(d{_XYZ[axis]} / box{axis}{axis})\n"
        + "\n".join(f"{ind}    d{_XYZ[m]} -= s * box{axis}{m}" for m in range(3))
        for axis in (2, 1, 0))
    flat = "\n".join(f"    {name}f = {name}.reshape(-1)" for name in ("x", "P", *inputs))
    views = "\n".join(f"        {name}c = {name}[chunk].reshape(-1)" for name in outputs)
    locals_ = " = ".join(["xa0", "xa1", "xa2"] + [line.split(" = ")[0] for line in row_loads])
    select = (f"{ind}if r2 >= cutoff2:\n{ind}    continue\n{ind}keep = 1.0" if branch
              else f"{ind}keep = 1.0 if r2 < cutoff2 else 0.0")
    source = f"""    n = i.shape[0]
    periodic = codes.shape[0] > 0
    imagesf = images.reshape(-1)
{flat}
{_hoisted(n_consts)}
    for chunk in numba.prange(n_chunks):
        lo = chunk * n // n_chunks
        hi = (chunk + 1) * n // n_chunks
{views}
        acc = 0.0
        ia = np.uint64(0)
        started = False
        {row_sums}
        {locals_} = 0.0
        for tt in range(lo, hi):
            t = np.uint64(tt)
            it = np.uint64(i[t])
            if not started or it != ia:
                if started:
{chr(10).join(f"{ind}        {line}" for line in flush)}
                started = True
                ia = it
                {row_sums}
{chr(10).join(f"{ind}    xa{m} = xf[3 * ia + {m}]" for m in range(3))}
{chr(10).join(f"{ind}    {line}" for line in row_loads)}
            ib = np.uint64(j[t])
            rx = xf[3 * ib] - xa0
            ry = xf[3 * ib + 1] - xa1
            rz = xf[3 * ib + 2] - xa2
            dx = rx
            dy = ry
            dz = rz
            if periodic:
                c = 3 * np.uint64(codes[t])
                dx = rx - imagesf[c]
                dy = ry - imagesf[c + 1]
                dz = rz - imagesf[c + 2]
            r2 = dx * dx + dy * dy + dz * dz
            if r2 > suspect2:
                dx = rx
                dy = ry
                dz = rz
{minimum_image}
                r2 = dx * dx + dy * dy + dz * dz
{select}
            r = math.sqrt(r2)
            ir = 1.0 / r
"""
    source += "".join(f"{ind}b{m} = Pf[{k} * ib + {m}]\n" for m in range(k))
    at_end = ("        if started:\n" + "".join(f"            {line}\n" for line in flush))
    return source, at_end


def _pair_source(spec: PairLaw) -> str:
    """Source of the module with ``forward``, ``backward`` and ``backward_vp`` pair kernels."""
    import sympy

    k = spec.n_params
    r = sympy.Symbol("r", positive=True)
    inverse = (r, sympy.Symbol("ir", positive=True))
    a, b, c = _symbols("a", k), _symbols("b", k), _symbols("c", spec.n_consts)
    p = a + b
    u = sympy.sympify(spec.law(r, a, b, c))
    u_r = sympy.diff(u, r)
    u_rr = sympy.diff(u_r, r)
    u_p = [sympy.diff(u, s) for s in p]
    u_rp = [sympy.diff(u_r, s) for s in p]
    u_pp = [sympy.diff(u_p[m], s) for m in range(2 * k) for s in p]

    ind = " " * 12
    params = [f"a{m} = Pf[{k} * ia + {m}]" for m in range(k)]
    # The forward pass of a law of pure arithmetic is cheaper without the cutoff branch; a law
    # calling functions (exp, erfcx, ...) and every backward pass are cheaper with it
    # (measured on the 2661-atom water box).
    calls = bool(u.atoms(sympy.Function))
    loop, at_end = _pair_loop(k, spec.n_consts, ("g", "gp"), (), params, branch=calls)
    forward_scatter = "\n".join(
        [f"{ind}acc += o0 * keep", f"{ind}f = o1 * ir * keep"]
        + [f"{ind}gc[3 * ib + {m}] += f * d{_XYZ[m]}" for m in range(3)]
        + [f"{ind}fa{_XYZ[m]} -= f * d{_XYZ[m]}" for m in range(3)]
        + [f"{ind}pa{m} += o{2 + m} * keep" for m in range(k)]
        + [f"{ind}gpc[{k} * ib + {m}] += o{2 + k + m} * keep" for m in range(k)])
    source = _HEADER.format(name=spec.name) + _kernel(
        "forward", f"{_PAIR_ARGS}, energy, g, gp",
        f"{loop}{_cse_lines([u, u_r, *u_p], ind, inverse)}\n{forward_scatter}\n{at_end}"
        "        energy[chunk] = acc\n")
    for variant, with_vp in (("backward", False), ("backward_vp", True)):
        exprs = [u_r, u_rr, *u_rp] + (u_pp if with_vp else [])
        loads = params + [f"va{_XYZ[m]} = vxf[3 * ia + {m}]" for m in range(3)]
        if with_vp:
            loads += [f"v{m} = vpf[{k} * ia + {m}]" for m in range(k)]
        loop, at_end = _pair_loop(k, spec.n_consts, ("hx", "hp"), ("vx", "vp"), loads,
                                  branch=True)
        lines = [f"{ind}w{_XYZ[m]} = vxf[3 * ib + {m}] - va{_XYZ[m]}" for m in range(3)]
        lines += [f"{ind}nw = (dx * wx + dy * wy + dz * wz) * ir",
                  f"{ind}f = o0 * ir * keep", f"{ind}q = (o1 * keep - f) * nw * ir"]
        if with_vp:
            lines += [f"{ind}v{k + m} = vpf[{k} * ib + {m}]" for m in range(k)]
            lines.append(f"{ind}q += (" + " + ".join(f"o{2 + m} * v{m}" for m in range(2 * k))
                         + ") * ir * keep")
        lines += [f"{ind}hxc[3 * ib + {m}] += f * w{_XYZ[m]} + q * d{_XYZ[m]}"
                  for m in range(3)]
        lines += [f"{ind}fa{_XYZ[m]} -= f * w{_XYZ[m]} + q * d{_XYZ[m]}" for m in range(3)]
        for m in range(2 * k):
            term = f"o{2 + m} * nw"
            if with_vp:
                base = 2 + 2 * k + 2 * k * m
                term += " + " + " + ".join(f"o{base + s} * v{s}" for s in range(2 * k))
            target = f"pa{m}" if m < k else f"hpc[{k} * ib + {m - k}]"
            lines.append(f"{ind}{target} += ({term}) * keep")
        body = f"{loop}{_cse_lines(exprs, ind, inverse)}\n" + "\n".join(lines) + f"\n{at_end}"
        source += _kernel(variant, f"{_PAIR_ARGS}, vx, vp, hx, hp", body)
    return source


def _chain_source(spec: ChainLaw) -> str:
    """Source of the module with ``forward``, ``backward`` and ``backward_vp`` chain kernels."""
    import sympy

    nv, k = spec.width - 1, spec.n_params
    d = [sympy.Matrix(_symbols(f"d{m}_", 3)) for m in range(nv)]
    v = [sympy.Matrix(_symbols(f"v{m}_", 3)) for m in range(nv)]
    coords = [s for vec in d for s in vec]
    cotangent = [s for vec in v for s in vec]
    p, w, c = _symbols("p", k), _symbols("w", k), _symbols("c", spec.n_consts)
    energy = sympy.sympify(spec.law(d, p, c))
    e_d = [sympy.diff(energy, s) for s in coords]
    e_p = [sympy.diff(energy, s) for s in p]
    directional = sum(g * s for g, s in zip(e_d, cotangent, strict=True))

    ind = " " * 12
    consts = _hoisted(spec.n_consts)
    load = [f"{ind}p{m} = P[t, {m}]" for m in range(k)]
    for m in range(nv):
        for a in range(3):
            load.append(f"{ind}d{m}_{a} = x[atoms[t, {m + 1}], {a}] - x[atoms[t, {m}], {a}]")
    for m in range(nv):  # minimum image, OpenMM's order (c, then b, then a): as neighbors.py
        for axis in (2, 1, 0):
            load.append(f"{ind}if periodic:")
            load.append(f"{ind}    s = np.rint(d{m}_{axis} / box{axis}{axis})")
            load += [f"{ind}    d{m}_{a} -= s * box{axis}{a}" for a in range(3)]
    geometry = _chunked_loop("atoms.shape[0]", consts) + "\n" + "\n".join(load) + "\n"

    def scatter(out: str, first: int) -> list[str]:
        lines = []
        for m in range(nv):
            for a in range(3):
                o = f"o{first + 3 * m + a}"
                lines.append(f"{ind}{out}[chunk, atoms[t, {m + 1}], {a}] += {o}")
                lines.append(f"{ind}{out}[chunk, atoms[t, {m}], {a}] -= {o}")
        return lines

    forward_lines = ([f"{ind}acc += o0"] + scatter("g", 1)
                     + [f"{ind}gp[t, {m}] = o{1 + 3 * nv + m}" for m in range(k)]
                     + ["        energy[chunk] = acc"])
    source = _HEADER.format(name=spec.name) + _kernel(
        "forward", f"{_CHAIN_ARGS}, energy, g, gp",
        f"{geometry}{_cse_lines([energy, *e_d, *e_p], ind)}\n" + "\n".join(forward_lines) + "\n")
    for variant, with_vp in (("backward", False), ("backward_vp", True)):
        s = directional + (sum(g * q for g, q in zip(e_p, w, strict=True)) if with_vp else 0)
        exprs = [sympy.diff(s, q) for q in coords] + [sympy.diff(s, q) for q in p]
        load_v = []
        for m in range(nv):
            for a in range(3):
                load_v.append(f"{ind}v{m}_{a} = vx[atoms[t, {m + 1}], {a}]"
                              f" - vx[atoms[t, {m}], {a}]")
        if with_vp:
            load_v += [f"{ind}w{m} = vp[t, {m}]" for m in range(k)]
        lines = scatter("hx", 0) + [f"{ind}hp[t, {m}] = o{3 * nv + m}" for m in range(k)]
        source += _kernel(variant, f"{_CHAIN_ARGS}, vx, vp, hx, hp",
                          geometry + "\n".join(load_v) + "\n" + _cse_lines(exprs, ind) + "\n"
                          + "\n".join(lines) + "\n")
    return source


# ------------------------------------------------------------------------------- loading

_MODULES: dict[tuple, ModuleType] = {}


def cache_directory() -> Path:
    """Where generated kernel modules (and numba's compiled code) are kept."""
    root = os.environ.get("OPENMM_REVERSIBLE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "openmm-reversible"
    return base / "fused"


def _cache_key(spec: PairLaw | ChainLaw) -> str:
    digest = hashlib.sha256()
    shape = (type(spec).__name__, spec.name, spec.n_params, spec.n_consts,
             getattr(spec, "width", 2))
    digest.update(f"{_VERSION} {importlib.metadata.version('sympy')} {shape}".encode())
    modules = {inspect.getmodule(fn) for fn in (_pair_source, lawmath.dot, special.erfcx,
                                                spec.law, *spec.sources)} - {None}
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:20]


def _module(spec: PairLaw | ChainLaw) -> ModuleType:
    """The generated kernel module of a law: from memory, else from the cache directory, else
    generated (sympy) and written there first."""
    key = (type(spec).__name__, spec.name, spec.law, spec.n_params, spec.n_consts)
    if key in _MODULES:
        return _MODULES[key]
    name = f"fused_{spec.name}_{_cache_key(spec)}"
    path = cache_directory() / f"{name}.py"
    if not path.exists():
        source = _pair_source(spec) if isinstance(spec, PairLaw) else _chain_source(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as tmp:
            tmp.write(source)
        os.replace(tmp.name, path)  # atomic: concurrent processes see a whole file
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    _MODULES[key] = module
    return module


# ------------------------------------------------------------------------------- autograd


def ordered_sum(chunks: np.ndarray) -> np.ndarray:
    """Sum of per-chunk buffers in chunk order (fixed order: bitwise reproducible)."""
    total = chunks[0].copy()
    for part in chunks[1:]:
        total += part
    return total


class _Evaluation:
    """One fused evaluation: the kernels of a law and the fixed inputs of a call."""

    def __init__(self, module: ModuleType, fixed: tuple, n_items: int, per_item: bool,
                 offset: np.ndarray | None = None):
        self.fixed = fixed
        self.per_item = per_item  # chain laws: one parameter row per item, no chunk buffer
        self.offset = offset  # subtracted from the positions (the pair kernels' wraps)
        threaded = n_items >= PARALLEL_MIN_ITEMS and numba.get_num_threads() > 1
        suffix = "_parallel" if threaded else ""
        self.kernels = {name: getattr(module, name + suffix)
                        for name in ("forward", "backward", "backward_vp")}

    def _moved(self, x: np.ndarray) -> np.ndarray:
        return x if self.offset is None else x - self.offset

    def forward(self, x: np.ndarray, params: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        energy = np.zeros(N_CHUNKS)
        g = np.zeros((N_CHUNKS, *x.shape))
        gp = np.zeros(params.shape if self.per_item else (N_CHUNKS, *params.shape))
        self.kernels["forward"](self._moved(x), *self.fixed, N_CHUNKS, energy, g, gp)
        return (float(ordered_sum(energy)), ordered_sum(g),
                gp if self.per_item else ordered_sum(gp))

    def backward(self, x: np.ndarray, vx: np.ndarray, vp: np.ndarray | None,
                 params_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        hx = np.zeros((N_CHUNKS, *x.shape))
        hp = np.zeros(params_shape if self.per_item else (N_CHUNKS, *params_shape))
        if vp is None:
            self.kernels["backward"](self._moved(x), *self.fixed, N_CHUNKS, vx,
                                     np.zeros((0, 0)), hx, hp)
        else:
            self.kernels["backward_vp"](self._moved(x), *self.fixed, N_CHUNKS, vx, vp, hx, hp)
        return ordered_sum(hx), hp if self.per_item else ordered_sum(hp)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())


class _KernelEnergy(torch.autograd.Function):
    """Energy; its backward is the gradient computed in the same kernel pass."""

    @staticmethod
    def forward(ctx, evaluation: _Evaluation, x: torch.Tensor, params: torch.Tensor):
        with torch.no_grad():
            params_np = _np(params)
            energy, g, gp = evaluation.forward(_np(x), params_np)
        ctx.evaluation = evaluation
        ctx.gradients = (torch.from_numpy(g), torch.from_numpy(gp))
        ctx.save_for_backward(x, params)
        return x.new_tensor(energy)

    @staticmethod
    def backward(ctx, grad_energy):
        x, params = ctx.saved_tensors
        g, gp = _FusedGradient.apply(ctx.evaluation, ctx.gradients, x, params)
        return None, grad_energy * g, grad_energy * gp


class _FusedEnergy(_KernelEnergy):
    """The energy of a generated pair or chain kernel."""


class _EvaluatedEnergy(_KernelEnergy):
    """The energy of another evaluation (:func:`kernel_energy`)."""


class _FusedGradient(torch.autograd.Function):
    """``(∂E/∂x, ∂E/∂p)``; its backward is the Hessian-vector product ``H·(v_x, v_p)`` from one
    kernel pass (positions and parameter blocks together)."""

    @staticmethod
    def forward(ctx, evaluation: _Evaluation, gradients: tuple, x: torch.Tensor,
                params: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.evaluation = evaluation
        ctx.save_for_backward(x, params)
        return gradients[0].clone(), gradients[1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, vx, vp):
        x, params = ctx.saved_tensors
        if vx is None and vp is None:
            return None, None, None, None
        x_np = _np(x)
        vx_np = np.zeros_like(x_np) if vx is None else _np(vx)
        vp_np = None if vp is None else _np(vp)
        hx, hp = ctx.evaluation.backward(x_np, vx_np, vp_np, tuple(params.shape))
        return None, None, torch.from_numpy(hx), torch.from_numpy(hp)


def _as_box(box: torch.Tensor | None) -> np.ndarray:
    return np.zeros((3, 3)) if box is None else _np(box.to(torch.float64))


def _consts(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class PairList:
    """Pairs prepared for the pair kernels, once per neighbour-list build (:func:`pair_list`).

    Attributes
    ----------
    i, j : numpy.ndarray of uint32, shape (n_pairs,)
        Particle indices (sorted by ``i`` for speed; any order gives the same sums).
    codes : numpy.ndarray of unsigned int, shape (n_pairs,) or (0,)
        Per pair, the row of ``lattice`` holding its image shift; empty without shifts.
    lattice : numpy.ndarray of float64, shape (n_images, 3)
        The distinct integer image shifts ``n`` (the displacement is ``x[j] - x[i] - n @ box``).
    """

    i: np.ndarray
    j: np.ndarray
    codes: np.ndarray
    lattice: np.ndarray

    def __len__(self) -> int:
        return int(self.i.shape[0])


_DENSE_IMAGES = 4096
"""Largest box of shift ranges coded arithmetically; beyond it the distinct shifts are
found by sorting (atoms far apart in unwrapped coordinates)."""


def pair_list(i: torch.Tensor, j: torch.Tensor, shifts: torch.Tensor | None) -> PairList:
    """Prepare pairs ``(i, j)`` and their integer image shifts for :func:`pair_energy`.

    The kernels read one small code per pair instead of three shift components: a shift is
    the code's row of a table of the distinct shifts, whose image vectors ``n @ box`` are
    formed once per evaluation.

    Parameters
    ----------
    i, j : torch.Tensor of int, shape (n_pairs,)
    shifts : torch.Tensor, shape (n_pairs, 3), or None
        Integer image shifts (any integer or float dtype).

    Returns
    -------
    PairList
    """
    ii = _np(i).astype(np.uint32)
    jj = _np(j).astype(np.uint32)
    if shifts is None:
        return PairList(ii, jj, np.zeros(0, dtype=np.uint8), np.zeros((0, 3)))
    shifts = _np(shifts).astype(np.float64, copy=False).reshape(-1, 3)
    if not shifts.shape[0]:
        return PairList(ii, jj, np.zeros(0, dtype=np.uint8), np.zeros((0, 3)))
    low, high = _shift_range(shifts)
    span = high - low + 1
    if int(np.prod(span)) <= _DENSE_IMAGES:
        # mixed-radix code of the shift within its range: no sort
        lattice = (np.indices(tuple(span)).reshape(3, -1).T + low).astype(np.float64)
        codes = np.empty(shifts.shape[0], dtype=_code_dtype(lattice.shape[0]))
        _dense_codes(shifts, low, span, codes)
    else:
        lattice, codes = np.unique(np.rint(shifts).astype(np.int64), axis=0,
                                   return_inverse=True)
        lattice = lattice.astype(np.float64)
        codes = codes.reshape(-1).astype(_code_dtype(lattice.shape[0]))
    return PairList(ii, jj, codes, lattice)


def _code_dtype(n_images: int) -> type:
    """The smallest unsigned integer type that numbers ``n_images`` images."""
    return next(t for t in (np.uint8, np.uint16, np.uint32) if n_images <= np.iinfo(t).max + 1)


@numba.njit(cache=True)
def _shift_range(shifts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Per axis, the smallest and the largest integer shift (rounded), int64 (3,) each."""
    low = np.full(3, np.iinfo(np.int64).max)
    high = np.full(3, np.iinfo(np.int64).min)
    for t in range(shifts.shape[0]):
        for a in range(3):
            v = np.int64(np.rint(shifts[t, a]))
            low[a] = min(low[a], v)
            high[a] = max(high[a], v)
    return low, high


@numba.njit(cache=True)
def _dense_codes(shifts: np.ndarray, low: np.ndarray, span: np.ndarray,
                 codes: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``codes[t]``: the row of shift ``t`` in the lattice ``np.indices(span) + low``."""
    for t in range(shifts.shape[0]):
        c = np.int64(0)
        for a in range(3):
            c = c * span[a] + np.int64(np.rint(shifts[t, a])) - low[a]
        codes[t] = c


def pair_energy(spec: PairLaw, positions: torch.Tensor, box: torch.Tensor | None,
                pairs: PairList, params: torch.Tensor, consts=(), cutoff: float | None = None,
                wraps: torch.Tensor | None = None, suspect: float = math.inf) -> torch.Tensor:
    """``Σ u(r_ij; params[i], params[j])`` over pairs, by the fused pair kernel.

    Parameters
    ----------
    spec : PairLaw
    positions : torch.Tensor, shape (n_atoms, 3), nm, float64, CPU
    box : torch.Tensor, shape (3, 3), nm, or None
        Needed with image shifts; not differentiated.
    pairs : PairList
        From :func:`pair_list`; with image shifts, the displacement of a pair is
        ``x[j] - x[i] - n @ box``.
    params : torch.Tensor, shape (n_particles, n_params)
        Per-particle parameter rows; differentiable.
    consts : sequence of float
        The law's constants (``spec.n_consts``).
    cutoff : float, nm, optional
        Pairs at or beyond it contribute nothing.
    wraps : torch.Tensor, shape (n_atoms, 3), optional
        Whole box vectors each atom moved by since the shifts were computed: the shift of a
        pair is ``n + wraps[j] - wraps[i]`` (see
        :meth:`~openmm_reversible.geometry.CutoffPairs.candidates`). The kernels move each
        atom back by its wraps instead (the same displacement up to round-off).
    suspect : float, nm²
        Squared distance above which the full minimum image replaces the shifted one.

    Returns
    -------
    torch.Tensor, 0-dim, kJ/mol
        Differentiable twice w.r.t. ``positions`` and ``params``.
    """
    box_np = _as_box(box)
    offset = None
    if wraps is not None and bool(wraps.any()):
        offset = _np(wraps.to(torch.float64)) @ box_np
    fixed = (box_np, pairs.i, pairs.j, pairs.codes,
             np.ascontiguousarray(pairs.lattice @ box_np), _np(params), _consts(consts),
             np.inf if cutoff is None else float(cutoff) ** 2, float(suspect))
    evaluation = _Evaluation(_module(spec), fixed, len(pairs), per_item=False, offset=offset)
    return _FusedEnergy.apply(evaluation, positions, params)


def chain_energy(spec: ChainLaw, positions: torch.Tensor, box: torch.Tensor | None,
                 atoms: torch.Tensor, params: torch.Tensor, consts=(),
                 periodic: bool = False) -> torch.Tensor:
    """``Σ E(chain vectors of item t; params[t])`` over bonded items, by the fused chain kernel.

    Parameters
    ----------
    spec : ChainLaw
    positions : torch.Tensor, shape (n_atoms, 3), nm, float64, CPU
    box : torch.Tensor, shape (3, 3), nm, or None
        Required when ``periodic`` (minimum image on every chain vector); not differentiated.
    atoms : torch.Tensor of int64, shape (n_items, spec.width)
    params : torch.Tensor, shape (n_items, spec.n_params)
        Per-item parameter rows; differentiable.
    consts : sequence of float
    periodic : bool

    Returns
    -------
    torch.Tensor, 0-dim, kJ/mol
    """
    fixed = (_as_box(box), _np(atoms), _np(params), _consts(consts), bool(periodic))
    evaluation = _Evaluation(_module(spec), fixed, atoms.shape[0], per_item=True)
    return _FusedEnergy.apply(evaluation, positions, params)


def kernel_energy(evaluation, positions: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """An energy whose derivatives come from hand-made kernels outside the generated laws
    (the PME mesh, :mod:`.fused_pme`), differentiable twice as :func:`pair_energy`'s is.

    Parameters
    ----------
    evaluation : object
        With ``forward(x, params) -> (energy, ∂E/∂x, ∂E/∂params)`` and
        ``backward(x, v_x, v_params or None, params_shape) -> ((H v)_x, (H v)_params)``, the
        Hessian-vector product with the cotangent ``(v_x, v_params)``; NumPy float64 arrays
        in and out, ``backward`` called at the positions of the last ``forward``.
    positions : torch.Tensor, shape (n_atoms, 3), nm, float64, CPU
    params : torch.Tensor
        Differentiable parameters of the energy.

    Returns
    -------
    torch.Tensor, 0-dim, kJ/mol
    """
    return _EvaluatedEnergy.apply(evaluation, positions, params)
