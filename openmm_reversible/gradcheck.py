"""Check the reversible gradients of a force field on a structure.

For every trainable parameter of a tagged ForceField XML (``parameterize`` /
``parameter_eval``, see :mod:`openmm_reversible.parameters`), the gradient of a trajectory loss
is computed three ways on the same short simulation (same initial state, same noise seed):

- by reversible simulation (the method used for training);
- by backpropagation through time (plain autograd through every step: the ground truth);
- by central finite differences with common random numbers (forward runs only).

Gradients are with respect to the trainable variables of the ParameterSet (each parameter
scaled by its start value, so a gradient is the change of the loss per unit *relative* change
of the parameter). :func:`check_forcefield_gradients` does it for a tagged ForceField XML on a
PDB file; ``openmm-reversible gradcheck`` (:mod:`openmm_reversible.commands.gradcheck`) prints
the gradients with the largest relative errors, ``rel_error_bptt`` and ``rel_error_fd``, and
exits 0 when both are within tolerance, 1 when not, 2 for bad input.

Relative error of one parameter: ``|g - g_ref| / max(|g_ref|, 1e-3·max_k |g_ref,k|)``, so a
parameter with a negligible gradient is judged on the scale of the largest one.

When finite differences can judge, and when not
-------------------------------------------------
The central differences are taken at two steps, h and h/2. Where the loss is smooth at that
scale they agree closely, and they judge the gradient at ``--tol-fd``. Where they disagree by
more than ``--fd-consistency`` the loss jumps within the step: a truncated (unswitched) cutoff
makes a trajectory's loss jump whenever a pair crosses it, and over long windows some pair
always does, so ``L(θ ± h)`` straddle jumps. Such finite differences are reported as
inconclusive (with the reason) and judge nothing; backprop through time, the exact derivative
of the same trajectory, still judges the reversible gradient. Short windows, switched cutoffs
or larger systems with few steps keep finite differences conclusive.

Reweighting baseline (``--reweighting``)
----------------------------------------
Every loss here is a function of a window average, ``L = f(ℓ̄)`` with ``ℓ̄`` the mean over the
snapshots of a per-frame quantity ℓ_s (energy: ``U(x_s)/N``; kinetic: ``K(v_s)/N``; rdf: the
g(r) of frame s, a vector, with ``f(g) = ∫ (g - 1)² dr``). With ``--reweighting`` the same
snapshots of the same reversible run are treated as Boltzmann samples at the integrator's
temperature and the fluctuation formula gives

    ∇θ L ≈ f'(ℓ̄) · (⟨∂ℓ/∂θ⟩ - β (⟨ℓ ∂U/∂θ⟩ - ⟨ℓ⟩⟨∂U/∂θ⟩)),

evaluated by autograd of :func:`~openmm_reversible.reweighting.reweighted_average` (weights
``softmax(-β U_θ)`` of the frame energies, equal at the current parameters). The JSON gains a
``reweighting`` entry with these per-parameter gradients, the number of frames and their
relative difference from the reversible gradient, and the table a column; neither enters the
exit code.

The two answer different questions. The reversible (= BPTT = finite-difference) gradient is the
derivative of the loss of *this* trajectory, from its fixed initial state with its fixed noise:
it includes how the dynamics carry a parameter change forward in time. The reweighting
gradient is the derivative of the *equilibrium* average, estimated from the snapshots. They
agree, within statistical error, only for static observables (energy, RDF, density-like
averages), on windows started from equilibrated states and long compared with the
observable's relaxation time, with enough snapshots; the kinetic energy at equilibrium does
not depend on the force field, so both tend to zero for it. For dynamical observables
(diffusion, time correlations) there is no reweighting formula and only the reversible
gradient is meaningful.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import openmm
import openmm.app as app
import torch
from tqdm.auto import tqdm

from .errors import InputError, check_at_least, check_positive, structure_errors
from .geometry import box_widths
from .integrators import Constraints, LangevinMiddleIntegrator, ReversibleSimulation
from .methods import CONSTRAINTS, NONBONDED_METHODS
from .observables.energy import frame_energies
from .reweighting import reweighted_average
from .trajectory import Trajectory
from .units import box_tensor, positions_tensor

LOSSES = ("energy", "kinetic", "rdf")
RDF_R_MAX = 0.9
FD_CONSISTENCY = 1e-2
"""Largest relative difference between the central differences at steps h and h/2 for which
finite differences are trusted to judge a gradient."""
"""Largest RDF radius, nm (lowered to half the box width for small boxes)."""


@dataclass(frozen=True)
class FrameLoss:
    """A loss of a window's snapshots that is a function of one per-frame average.

    ``loss(traj, potential) = reduce(mean_s per_frame(traj, potential)[s])``. Written this way
    the same loss can be differentiated through the dynamics (call it as a ``loss_fn`` of
    :class:`~openmm_reversible.integrators.ReversibleSimulation`) and by ensemble reweighting
    (:meth:`reweighted`).

    Attributes
    ----------
    per_frame : callable
        ``per_frame(traj, potential) -> torch.Tensor`` of shape (S, ...): one value (scalar or
        array) per snapshot, in the observable's units.
    reduce : callable
        ``reduce(average) -> 0-dim tensor``: the loss of the frame average.
    """

    per_frame: Callable[[Trajectory, object], torch.Tensor]
    reduce: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, traj: Trajectory, potential) -> torch.Tensor:
        return self.reduce(self.per_frame(traj, potential).mean(0))

    def reweighted(self, traj: Trajectory, potential) -> torch.Tensor:
        """The loss of the Boltzmann-reweighted frame average (0-dim tensor).

        At the current parameters its value equals :meth:`__call__`; its gradient with respect
        to the potential's parameters is the fluctuation-formula gradient (chain rule through
        ``reduce``). Frames are treated as constants (detached).
        """
        frames = dataclasses.replace(traj, positions=traj.positions.detach(),
                                     velocities=traj.velocities.detach())
        energies = frame_energies(potential, frames.positions, frames.box)
        average = reweighted_average(self.per_frame(frames, potential), energies,
                                     frames.temperature)
        return self.reduce(average)


def _identity(average: torch.Tensor) -> torch.Tensor:
    return average


energy_loss = FrameLoss(
    lambda traj, potential: frame_energies(potential, traj.positions, traj.box) / traj.n_atoms,
    _identity)
"""Mean potential energy of the snapshots per atom, kJ/mol."""

kinetic_loss = FrameLoss(lambda traj, potential: traj.kinetic_energy() / traj.n_atoms, _identity)
"""Mean kinetic energy of the snapshots per atom, kJ/mol."""


def rdf_loss(topology: app.Topology, box: torch.Tensor | None,
             system: openmm.System | None = None) -> FrameLoss:
    """``∫ (g(r) - 1)² dr`` (nm) of the oxygen–oxygen RDF, or of all atoms without oxygens.

    The per-frame quantity is the g(r) of each snapshot; with a fixed box their mean is the
    g(r) of the window. With the OpenMM ``system`` "all atoms" leaves out its virtual sites
    (massless, placed from their parents: not atoms of the liquid's structure).
    """
    from .observables.rdf import rdf
    from .observables.selection import atom_indices

    if box is None:
        raise InputError("--loss rdf needs a periodic box: give a PDB with a CRYST1 record")
    atoms = [a.index for a in topology.atoms()
             if system is None or not system.isVirtualSite(a.index)]
    oxygens = atom_indices(topology, element="O") if any(
        a.element is not None and a.element.symbol == "O" for a in topology.atoms()) else atoms
    half_box = 0.5 * float(box_widths(box).min())
    r_range, bin_width = (0.2, min(RDF_R_MAX, half_box)), 0.02

    def per_frame(traj: Trajectory, potential) -> torch.Tensor:
        return torch.stack([rdf(x[None], traj.box, selections=(oxygens, oxygens),
                                r_range=r_range, bin_width=bin_width)[1]
                            for x in traj.positions])

    def reduce(g: torch.Tensor) -> torch.Tensor:
        return ((g - 1.0) ** 2).sum() * bin_width

    return FrameLoss(per_frame, reduce)


def reweighting_gradient(loss: FrameLoss, traj: Trajectory, potential,
                         parameters: Sequence[torch.Tensor]) -> np.ndarray:
    """Fluctuation-formula gradient of ``loss`` from the snapshots ``traj``, flattened.

    Parameters
    ----------
    loss : FrameLoss
    traj : Trajectory
        Frames treated as Boltzmann samples at ``traj.temperature`` (K) of ``potential``.
    potential : callable
        ``potential(positions, box) -> energy`` kJ/mol, depending on ``parameters``.
    parameters : sequence of torch.Tensor
        Leaves that require grad.

    Returns
    -------
    numpy.ndarray, shape (total number of parameter entries,)
        d loss / d parameter, in the order of ``parameters`` (zeros where the loss does not
        depend on a parameter).
    """
    parameters = list(parameters)
    value = loss.reweighted(traj, potential)
    grads = torch.autograd.grad(value, parameters, allow_unused=True) \
        if value.requires_grad else [None] * len(parameters)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, parameters, strict=True)]).cpu().numpy()


@dataclass(frozen=True)
class GradientCheck:
    """Gradients of one loss by three methods, per trainable variable.

    Attributes
    ----------
    names : list of str
        Name of each variable.
    reversible, bptt, finite_difference : numpy.ndarray, shape (n,)
        d loss / d variable.
    loss : float
        Loss at the current parameters.
    reconstruction_error : float, nm
        Largest state reconstruction error met by the reverse pass.
    reweighting : numpy.ndarray, shape (n,), or None
        Fluctuation-formula gradient from the snapshots of the same run (module docstring),
        when requested.
    n_frames : int
        Number of loss snapshots of the run.
    """

    names: list[str]
    reversible: np.ndarray
    bptt: np.ndarray
    finite_difference: np.ndarray
    loss: float
    reconstruction_error: float
    reweighting: np.ndarray | None = None
    n_frames: int = 0
    finite_difference_half: np.ndarray | None = None
    fd_step: float = 0.0

    @property
    def rel_error_bptt(self) -> float:
        return relative_error(self.reversible, self.bptt)

    @property
    def rel_error_fd(self) -> float:
        """Largest relative error against the finite differences at step h (all parameters,
        conclusive or not: see :meth:`verdict`)."""
        return relative_error(self.reversible, self.finite_difference)

    @property
    def fd_spread(self) -> np.ndarray:
        """Per-parameter relative difference between the central differences at steps h and
        h/2 (zeros when only one step was taken)."""
        if self.finite_difference_half is None:
            return np.zeros_like(self.finite_difference)
        scale = np.maximum(np.abs(self.finite_difference_half),
                           1e-3 * np.abs(self.finite_difference_half).max())
        scale = np.where(scale > 0, scale, 1.0)
        return np.abs(self.finite_difference - self.finite_difference_half) / scale

    def fd_conclusive(self, consistency: float = FD_CONSISTENCY) -> np.ndarray:
        """Which parameters' finite differences can judge the gradient: those whose central
        differences at h and h/2 agree within ``consistency`` (relative), i.e. whose loss is
        smooth at the scale of the step."""
        return self.fd_spread <= consistency

    def verdict(self, tol_bptt: float, tol_fd: float,
                consistency: float = FD_CONSISTENCY) -> tuple[bool, str]:
        """Whether the reversible gradient passes, and why (one line).

        It fails when it differs from backprop through time by more than ``tol_bptt``, or
        from conclusive finite differences by more than ``tol_fd``. Finite differences whose
        values at steps h and h/2 disagree by more than ``consistency`` are inconclusive (the
        loss jumps within the step: e.g. pairs crossing a truncated cutoff over a long window)
        and judge nothing; backprop through time, the exact derivative of the same
        trajectory, still does.
        """
        if not self.rel_error_bptt <= tol_bptt:
            return False, (f"reversible differs from backprop through time by "
                           f"{self.rel_error_bptt:.3e} (tol {tol_bptt:g})")
        conclusive = self.fd_conclusive(consistency)
        inconclusive = [n for n, c in zip(self.names, conclusive, strict=True) if not c]
        if conclusive.any():
            err = relative_error(self.reversible[conclusive],
                                 self.finite_difference[conclusive])
            if not err <= tol_fd:
                return False, (f"reversible differs from finite differences by {err:.3e} "
                               f"(tol {tol_fd:g})")
        if inconclusive:
            worst = float(self.fd_spread.max())
            return True, (f"finite differences inconclusive for {', '.join(inconclusive)} "
                          f"because the central differences at steps {self.fd_step:g} and "
                          f"{self.fd_step / 2:g} differ by {worst:.2e} relative: the loss is "
                          "not smooth at that scale (e.g. pairs crossing a truncated cutoff "
                          "during the run); judged by backprop through time alone "
                          f"({self.rel_error_bptt:.1e}); use fewer steps or a switched cutoff "
                          "for a finite-difference check")
        return True, "reversible equals backprop through time and finite differences"

    @property
    def rel_difference_reweighting(self) -> float | None:
        """Largest relative difference of the reweighting gradient from the reversible one
        (a statistical comparison, not a test of correctness; None without reweighting)."""
        if self.reweighting is None:
            return None
        return relative_error(self.reweighting, self.reversible)

    def as_dict(self) -> dict:
        out = {"loss": self.loss, "reconstruction_error": self.reconstruction_error,
               "parameters": [{"name": n, "reversible": float(r), "bptt": float(b),
                               "finite_difference": float(f)}
                              for n, r, b, f in zip(self.names, self.reversible, self.bptt,
                                                    self.finite_difference, strict=True)],
               "rel_error_bptt": self.rel_error_bptt, "rel_error_fd": self.rel_error_fd,
               "fd_spread": [float(v) for v in self.fd_spread]}
        if self.reweighting is not None:
            out["reweighting"] = {
                "n_frames": self.n_frames,
                "parameters": [{"name": n, "gradient": float(g)}
                               for n, g in zip(self.names, self.reweighting, strict=True)],
                "rel_difference_reversible": self.rel_difference_reweighting}
        return out


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    """Largest per-entry relative error (see the module docstring for the floor)."""
    scale = np.maximum(np.abs(reference), 1e-3 * np.abs(reference).max())
    scale = np.where(scale > 0, scale, 1.0)
    return float(np.max(np.abs(value - reference) / scale))


def check_gradients(sim: ReversibleSimulation, positions: torch.Tensor,
                    velocities: torch.Tensor, box: torch.Tensor | None,
                    names: Sequence[str] | None = None, fd_step: float = 1e-6,
                    reweighting: bool = False, progress: bool = False) -> GradientCheck:
    """Reversible, BPTT and central finite-difference gradients of ``sim``'s loss.

    Parameters
    ----------
    sim : ReversibleSimulation
        In reversible mode; a BPTT twin with the same settings is made internally.
    positions, velocities : torch.Tensor, shape (N, 3), nm and nm/ps
    box : torch.Tensor, shape (3, 3), nm, or None
    names : sequence of str, optional
        One name per scalar trainable variable (default ``"<parameter name>[i]"``).
    fd_step : float
        Absolute step of the central differences in each variable.
    reweighting : bool
        Also compute the fluctuation-formula gradient from the snapshots of the reversible run
        (``sim.loss_fn`` must then be a :class:`FrameLoss`).
    progress : bool
        Show a progress bar (one tick per simulation: reversible, BPTT, then four runs per
        variable for the finite differences) on a terminal.
    """
    params = sim.trainable_parameters()
    if not params:
        raise InputError("the potential has no trainable parameters; tag some with "
                         "parameterize=\"...\" in the force field XML")
    bptt = ReversibleSimulation(sim.potential, sim.integrator, sim.n_steps, sim.snapshot_every,
                                sim.loss_fn, masses=sim.masses, mode="bptt",
                                constraints=sim.constraints)

    def flat_gradient(simulation: ReversibleSimulation) -> tuple[float, np.ndarray]:
        for p in params:
            p.grad = None
        loss = simulation(positions, velocities, box)
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in params]).cpu().numpy()

    if reweighting and not isinstance(sim.loss_fn, FrameLoss):
        raise InputError("the reweighting gradient needs a loss written as a FrameLoss "
                         "(a function of the mean of a per-frame quantity); got "
                         f"{type(sim.loss_fn).__name__}")
    n_variables = sum(p.numel() for p in params)
    bar = tqdm(total=2 + 4 * n_variables, desc="gradcheck", unit="run", leave=False,
               disable=not progress or None)
    bar.set_postfix_str("reversible")
    loss, reversible = flat_gradient(sim)
    reconstruction_error = float(sim.info["reconstruction_error"])
    frames = sim.trajectory
    reweighted = reweighting_gradient(sim.loss_fn, frames, sim.potential, params) \
        if reweighting else None
    bar.update()
    bar.set_postfix_str("backprop through time")
    _, through_time = flat_gradient(bptt)
    bar.update()
    bar.set_postfix_str("finite differences")
    fd = {step: [] for step in (fd_step, 0.5 * fd_step)}
    with bar, torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for i in range(flat.numel()):
                original = flat[i].clone()
                for step, column in fd.items():
                    values = []
                    for sign in (1.0, -1.0):
                        flat[i] = original + sign * step
                        values.append(float(sim(positions, velocities, box)))
                        bar.update()
                    flat[i] = original
                    column.append((values[0] - values[1]) / (2.0 * step))
    if names is None:
        names = [f"{name}[{i}]" for name, p in sim.potential.named_parameters()
                 if p.requires_grad for i in range(p.numel())]
    full, half = (np.asarray(column) for column in fd.values())
    return GradientCheck(list(names), reversible, through_time, full, loss,
                         reconstruction_error, reweighted, frames.n_frames, half, fd_step)


def check_forcefield_gradients(forcefield: str | Sequence[str], pdb: str, steps: int,
                               loss: str = "energy", snapshot_every: int | None = None,
                               timestep: float = 0.001, friction: float = 1.0,
                               temperature: float = 295.15, seed: int = 0,
                               nonbonded_method: str | None = None, cutoff: float = 0.9,
                               fd_step: float = 1e-6, reweighting: bool = False,
                               progress: bool = False, rigid_water: bool = False,
                               constraints: str = "none") -> GradientCheck:
    """:func:`check_gradients` for a tagged force field on a structure file.

    The System is built by OpenMM from ``forcefield`` for the structure (no centre-of-mass
    remover; flexible unless ``rigid_water`` or ``constraints``), its tagged parameters are
    the variables, and a short Langevin simulation from the structure's positions, with
    initial velocities drawn from the same noise stream, gives the loss. With constraints the
    dynamics are OpenMM's constrained Langevin-middle scheme
    (:mod:`~openmm_reversible.integrators.constrained`), started from the structure put on
    the constraints (positions projected, velocities made tangent). Virtual sites are placed
    from their parents, not integrated (:mod:`~openmm_reversible.integrators.sites`).

    Parameters
    ----------
    forcefield : str or sequence of str
        ForceField XML files with ``parameterize`` tags, in load order (bundled names work).
    pdb : str
        PDB or PDBx file of the structure; a CRYST1 record makes it periodic.
    steps : int
        Simulation steps (>= 1).
    loss : {"energy", "kinetic", "rdf"}
        Mean potential energy per atom, mean kinetic energy per atom (kJ/mol), or the O–O RDF's
        deviation from 1 (:func:`rdf_loss`).
    snapshot_every : int, optional
        Steps between loss snapshots (default ``steps // 5``, at least 1).
    timestep : float, ps
    friction : float, 1/ps
    temperature : float, K
    seed : int
        Noise stream and initial velocities.
    nonbonded_method : str, optional
        A key of :data:`NONBONDED_METHODS`; default CutoffPeriodic (reaction field) with a box,
        else NoCutoff.
    cutoff : float, nm
        Nonbonded cutoff (ignored with NoCutoff).
    fd_step, reweighting, progress
        As in :func:`check_gradients`.
    rigid_water : bool
        Rigid water molecules (``rigidWater=True``).
    constraints : str
        A key of :data:`~openmm_reversible.methods.CONSTRAINTS` ("none", "HBonds",
        "AllBonds", "HAngles").

    Raises
    ------
    InputError
        For bad values, unreadable files, or a structure the force field does not describe.
    """
    from .files import read_structure
    from .parameters import ParameterSet
    from .potential import TorchPotential

    check_at_least(1, steps=steps)
    if snapshot_every is not None and not 1 <= snapshot_every <= steps:
        raise InputError(f"--snapshot-every must be between 1 and --steps ({steps}), got "
                         f"{snapshot_every}")
    if loss not in LOSSES:
        raise InputError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    check_positive(timestep=timestep, temperature=temperature, cutoff=cutoff, fd_step=fd_step)
    check_at_least(0, friction=friction)
    snapshot_every = snapshot_every or max(1, steps // 5)
    files = [forcefield] if isinstance(forcefield, str) else list(forcefield)
    structure = read_structure(pdb)
    vectors = structure.topology.getPeriodicBoxVectors()
    method = nonbonded_method or ("CutoffPeriodic" if vectors is not None else "NoCutoff")
    if method not in NONBONDED_METHODS:
        raise InputError(f"--nonbonded-method {method!r}: choose one of "
                         f"{', '.join(sorted(NONBONDED_METHODS))}")
    if vectors is None and method in ("CutoffPeriodic", "Ewald", "PME"):
        raise InputError(f"--nonbonded-method {method} needs a periodic box, but {pdb} "
                         "has no CRYST1 record")
    if constraints not in CONSTRAINTS:
        raise InputError(f"--constraints {constraints!r}: choose one of "
                         f"{', '.join(CONSTRAINTS)}")
    kwargs = {"nonbondedMethod": NONBONDED_METHODS[method],
              "constraints": CONSTRAINTS[constraints], "rigidWater": bool(rigid_water),
              "removeCMMotion": False}
    if method != "NoCutoff":
        kwargs["nonbondedCutoff"] = cutoff * openmm.unit.nanometer
    with structure_errors(pdb, files):
        parameters = ParameterSet.from_forcefield(files, structure.topology, **kwargs)
    potential = TorchPotential(parameters.system, parameters=parameters)
    box = None if vectors is None else box_tensor(vectors)
    positions = positions_tensor(structure.getPositions())
    integrator = LangevinMiddleIntegrator(timestep, friction, temperature, seed)
    # State 0 never uses the noise of "step 0", so it seeds the initial velocities.
    velocities = integrator.noise(0, potential.masses)
    # Virtual sites (massless) have no velocity; the windows place them from their parents.
    velocities = torch.where(potential.masses[:, None] > 0, velocities, 0.0)
    constrained = Constraints.from_system(parameters.system)
    positions, velocities = constrained.constrain_state(positions, velocities, potential.masses)
    loss_fn = {"energy": energy_loss, "kinetic": kinetic_loss}.get(loss) \
        or rdf_loss(structure.topology, box, parameters.system)
    sim = ReversibleSimulation(potential, integrator, steps, snapshot_every, loss_fn,
                               constraints=constrained)
    return check_gradients(sim, positions, velocities, box, parameters.trainable_keys,
                           fd_step, reweighting=reweighting, progress=progress)
