"""``benchmark forces``: cost of the twin's forces and VJPs against an OpenMM CPU step.

System: the 3 nm flexible TIP3P box (2661 atoms, reaction field, 1.0 nm cutoff; ``--nonbonded
PME`` for particle-mesh Ewald) with the water oxygen's charge, sigma and epsilon trainable
(hydrogen charge tied to keep molecules neutral); ``--forcefield`` puts a tagged water force
field in its place (e.g. ``examples/paper/forcefields/double_exponential.xml``, whose
CustomNonbondedForce runs on the fused pair kernel), trained as its tags say. Reported, in
milliseconds (median of ``repeats``), all measured in the same run:

- ``torch_force_ms``: energy and forces by autograd;
- ``torch_force_vjp_ms``: forces with their graph, then both vector-Jacobian products the
  adjoint needs (w.r.t. positions and w.r.t. parameters) in one backward call;
- ``fused_force_ms``, ``fused_force_vjp_ms``: the same with the fused kernels
  (``TorchPotential(fused=True)``; with PME the reciprocal space on the fused mesh kernels),
  and ``fused_threads``, the numba threads they could use;
- ``openmm_step_ms``: one LangevinMiddleIntegrator step (1 fs) on OpenMM's CPU platform;
- ratios of the torch timings to the OpenMM step.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from openmm import unit
from tqdm.auto import tqdm

from ..errors import check_at_least, check_positive
from ..parameters import ParameterSet
from ..potential import TorchPotential
from ..systems import water_box
from ..units import DTYPE
from .water import NONBONDED_METHODS, check_cutoff, check_nonbonded, openmm_step_ms

WATER_SELECTION = [("NonbondedForce/Atom", "tip3p-O", ("charge", "sigma", "epsilon"))]
WATER_TIES = {("NonbondedForce/Atom", "tip3p-H", "charge"): "-0.5*PARM['Atom/charge/tip3p-O']"}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (neighbour list build, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def measure(box_size: float = 3.0, cutoff: float = 1.0, repeats: int = 5,
            openmm_steps: int = 200, nonbonded: str = "RF", forcefield: str = "",
            progress: bool = True) -> dict:
    """Time the twin (autograd and fused) and OpenMM on the same flexible water box.

    Parameters
    ----------
    box_size : float, nm
        Edge of the cubic water box (3.0: 2661 atoms).
    cutoff : float, nm
        Reaction-field cutoff, below half the box edge.
    repeats : int
        Timed repeats of each torch evaluation (the median is reported).
    openmm_steps : int
        OpenMM steps timed for ``openmm_step_ms``.
    nonbonded : {"RF", "PME"}
        Electrostatics: reaction field or particle-mesh Ewald.
    forcefield : str
        A tagged water ForceField XML (3-site, residue HOH) to time instead of TIP3P ("").
    progress : bool
        Show a progress bar of the three timings on a terminal.

    Returns
    -------
    dict
        The JSON record (module docstring).
    """
    check_positive(box_size=box_size, cutoff=cutoff)
    check_at_least(1, repeats=repeats, openmm_steps=openmm_steps)
    check_nonbonded(nonbonded)
    bar = tqdm(total=4, desc="benchmark forces", unit="stage", leave=False,
               disable=not progress or None)
    bar.set_postfix_str("building the water box")
    msys = water_box(None, box_size=box_size, forcefield=("tip3p.xml",), nonbonded=nonbonded,
                     cutoff=cutoff, rigid=False)
    check_cutoff(msys.box, cutoff)
    if forcefield:
        params = ParameterSet.from_forcefield([forcefield], msys.topology,
                                              **params_kwargs(cutoff, nonbonded))
    else:
        params = ParameterSet.select("tip3p.xml", msys.topology, select=WATER_SELECTION,
                                     ties=WATER_TIES, **params_kwargs(cutoff, nonbonded))
    potential = TorchPotential(params.system, parameters=params)
    x = torch.tensor(msys.positions, dtype=DTYPE)
    box = torch.tensor(msys.box, dtype=DTYPE)
    weights = [p for p in potential.parameters() if p.requires_grad]
    cotangent = torch.randn(x.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(0))

    def force():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(potential(xr, box), xr)
        return g

    def force_vjp():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(potential(xr, box), xr, create_graph=True)
        return torch.autograd.grad(g, [xr, *weights], cotangent)

    bar.set_postfix_str("torch forces")
    torch_force_ms = _median_ms(force, repeats)
    bar.update()
    bar.set_postfix_str("torch forces and VJPs")
    torch_force_vjp_ms = _median_ms(force_vjp, repeats)
    bar.update()
    bar.set_postfix_str("fused forces and VJPs (first use compiles them)")
    potential.use_fused(True)
    force()  # generates and compiles the kernels on a first run (cached afterwards)
    force_vjp()
    fused_force_ms = _median_ms(force, repeats)
    fused_force_vjp_ms = _median_ms(force_vjp, repeats)
    potential.use_fused(False)
    bar.update()
    bar.set_postfix_str("OpenMM steps")

    step_ms = openmm_step_ms(params.system, msys.positions, msys.box, openmm_steps)
    bar.update()
    bar.close()
    return {
        "benchmark": "forces",
        "n_atoms": potential.n_atoms,
        "nonbonded": nonbonded,
        "forcefield": forcefield or "tip3p.xml",
        "cutoff_nm": cutoff,
        "torch_threads": torch.get_num_threads(),
        "fused_threads": fused_threads(),
        "torch_force_ms": round(torch_force_ms, 3),
        "torch_force_vjp_ms": round(torch_force_vjp_ms, 3),
        "fused_force_ms": round(fused_force_ms, 3),
        "fused_force_vjp_ms": round(fused_force_vjp_ms, 3),
        "openmm_step_ms": round(step_ms, 3),
        "force_over_openmm_step": round(torch_force_ms / step_ms, 3),
        "force_vjp_over_openmm_step": round(torch_force_vjp_ms / step_ms, 3),
        "fused_force_over_openmm_step": round(fused_force_ms / step_ms, 3),
        "fused_force_vjp_over_openmm_step": round(fused_force_vjp_ms / step_ms, 3),
        "goal_force_vjp_over_openmm_step": 3.0,
    }


def fused_threads() -> int:
    """Threads the fused kernels may use (numba's setting; 0 when numba is missing)."""
    try:
        import numba
    except ImportError:
        return 0
    return int(numba.get_num_threads())


def params_kwargs(cutoff: float, nonbonded: str = "RF") -> dict:
    """createSystem arguments of the benchmark's water box (flexible; reaction field or
    PME)."""
    return {"nonbondedMethod": NONBONDED_METHODS[nonbonded],
            "nonbondedCutoff": cutoff * unit.nanometer, "rigidWater": False,
            "constraints": None}
