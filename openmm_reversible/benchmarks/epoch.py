"""Benchmark ``epoch``: the cost of one training epoch and its split between OpenMM and the
reversible windows.

The fit of CONFIG (e.g. ``examples/water/water.toml``; ``--waters``, ``--windows``,
``--window-steps``, ``--snapshot-every``, ``--equilibration-steps``, ``--bulk-steps``,
``--platform`` and ``--fused`` override its settings) runs one epoch in a temporary directory,
after the kernels have been loaded (a first use of the fused kernels compiles them) and the
start minimised. Reported, in seconds unless named otherwise:

- ``epoch_s``: the whole epoch (:meth:`~openmm_reversible.train.Trainer.run_epoch`: sampling,
  windows, optimiser step and the epoch's files);
- ``sampling_s``: OpenMM (parameter push, equilibration and bulk steps) on the config's
  ``platform``, and ``sampling_step_ms`` per step; ``push_s``: the parameter push alone
  (once per epoch, counted in the per-step cost here);
- ``windows_s``: the window phase; ``forward_s`` and ``reverse_s``: the reversible windows'
  forward runs and their reverse (gradient) passes, summed over the windows, and per step
  ``forward_step_ms`` / ``reverse_step_ms``;
- ``openmm_cpu_step_ms``: one LangevinMiddleIntegrator step of the same System on OpenMM's
  CPU platform (NVT, timed apart), and the window steps against it
  (``forward_step_over_openmm_step``, ``reverse_step_over_openmm_step``);
- ``paper_schedule_s``: the epoch the paper's water setting would cost at this system size,
  from the per-step costs measured here: 50,000 sampling steps and 25 windows of 200
  reversible steps (:data:`PAPER_SAMPLING_STEPS`, :data:`PAPER_WINDOW_STEPS`). The window
  costs include the loss at the config's snapshot rate, so the estimate is the paper's epoch
  only for windows of its shape and box: ``--waters 895 --window-steps 200 --snapshot-every
  200`` (one loss per window), and a 1.0 nm cutoff in the config.
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch
from tqdm.auto import tqdm

from ..config import load_config
from ..errors import InputError, check_at_least
from .water import openmm_step_ms

PAPER_SAMPLING_STEPS = 50_000
"""OpenMM steps per epoch in the paper's water training (50 ps at 1 fs)."""

PAPER_WINDOW_STEPS = 25 * 200
"""Reversible steps per epoch in the paper's water training (25 windows of 200 steps)."""


def _overridden(config: str, waters, windows, window_steps, snapshot_every,
                equilibration_steps, bulk_steps, platform, fused):
    """The config of ``config`` with the given (not None) settings replaced, for one epoch."""
    fit_config = load_config(config)
    schedule = {"epochs": 1, "windows": windows, "window_steps": window_steps,
                "snapshot_every": snapshot_every, "equilibration_steps": equilibration_steps,
                "bulk_steps": bulk_steps}
    schedule = dataclasses.replace(fit_config.schedule,
                                   **{k: v for k, v in schedule.items() if v is not None})
    simulation = dataclasses.replace(fit_config.simulation, fused=fused or
                                     fit_config.simulation.fused,
                                     platform=platform or fit_config.simulation.platform)
    structure = fit_config.structure
    if waters is not None:
        if structure.water_box is None:
            raise InputError(f"--waters {waters}: the structure of {config} is "
                             f"{structure.source}, not a water box; drop --waters or use a "
                             "config with [structure] water_box")
        structure = dataclasses.replace(structure, water_box=waters)
    return dataclasses.replace(fit_config, schedule=schedule, simulation=simulation,
                               structure=structure, output=dataclasses.replace(
                                   fit_config.output, trajectory="none"))


def _warm_up(trainer) -> None:
    """Forces and both VJPs once at the start state: loads (first use: compiles) the kernels
    and builds the neighbour list outside the timings."""
    state = trainer.state
    x = torch.as_tensor(state.positions, dtype=torch.float64).requires_grad_(True)
    box = None if state.box is None else torch.as_tensor(state.box, dtype=torch.float64)
    weights = [p for p in trainer.potential.parameters() if p.requires_grad]
    (g,) = torch.autograd.grad(trainer.potential(x, box), x, create_graph=True)
    torch.autograd.grad(g, [x, *weights], torch.ones_like(g))


def measure(config: str, waters: int | None = None, windows: int | None = None,
            window_steps: int | None = None, snapshot_every: int | None = None,
            equilibration_steps: int | None = None, bulk_steps: int | None = None,
            platform: str | None = None, fused: bool = False, openmm_steps: int = 200,
            progress: bool = True) -> dict:
    """Time one epoch of the fit of ``config`` (module docstring).

    Parameters
    ----------
    config : str
        TOML fitting config.
    waters : int, optional
        Override ``structure.water_box`` (molecules).
    windows, window_steps, snapshot_every, equilibration_steps, bulk_steps : int, optional
        Override the ``[schedule]`` settings of the same names.
    platform : str, optional
        Override ``simulation.platform`` (OpenMM's sampling).
    fused : bool
        Run the windows on the fused kernels (``simulation.fused = true``).
    openmm_steps : int
        OpenMM CPU steps timed for ``openmm_cpu_step_ms``.
    progress : bool
        Show a progress bar of the stages on a terminal.

    Returns
    -------
    dict
        The JSON record (times in s, per-step times in ms).
    """
    from ..train import Trainer

    given = {name: value for name, value in (
        ("waters", waters), ("windows", windows), ("window_steps", window_steps),
        ("snapshot_every", snapshot_every), ("openmm_steps", openmm_steps)) if value is not None}
    check_at_least(1, **given)
    check_at_least(0, **{name: value for name, value in (
        ("equilibration_steps", equilibration_steps), ("bulk_steps", bulk_steps))
        if value is not None})
    fit_config = _overridden(config, waters, windows, window_steps, snapshot_every,
                             equilibration_steps, bulk_steps, platform, fused)
    sched = fit_config.schedule
    with tqdm(total=4, desc="benchmark epoch", unit="stage", leave=False,
              disable=not progress or None) as bar, tempfile.TemporaryDirectory() as tmp:
        bar.set_postfix_str("building the system, minimising")
        trainer = Trainer(fit_config, tmp, progress=False)
        bar.update()
        bar.set_postfix_str("loading the kernels")
        _warm_up(trainer)
        bar.update()
        bar.set_postfix_str("one epoch")
        try:
            record = trainer.run_epoch()
        finally:
            trainer.close()
        bar.update()
        bar.set_postfix_str("OpenMM CPU steps")
        state = trainer.state
        cpu_step_ms = openmm_step_ms(trainer.parameters.create_system(), state.positions,
                                     state.box, openmm_steps)
        bar.update()
    timings = record["timings"]
    sampling_steps = sched.equilibration_steps + sched.windows * sched.bulk_steps
    window_steps_total = sched.windows * sched.window_steps
    sampling_s = timings["push_s"] + timings["equilibrate_s"] + timings["bulk_s"]
    sampling_step_ms = 1e3 * sampling_s / max(sampling_steps, 1)
    forward_step_ms = 1e3 * timings["forward_s"] / window_steps_total
    reverse_step_ms = 1e3 * timings["backward_s"] / window_steps_total
    return {
        "benchmark": "epoch", "n_atoms": trainer.potential.n_atoms,
        "platform": trainer.sampler.platform_name, "fused": fit_config.simulation.fused,
        "windows": sched.windows, "window_steps": sched.window_steps,
        "sampling_steps": sampling_steps, "torch_threads": torch.get_num_threads(),
        "epoch_s": timings["total_s"], "sampling_s": sampling_s, "push_s": timings["push_s"],
        "windows_s": timings["windows_s"], "forward_s": timings["forward_s"],
        "reverse_s": timings["backward_s"],
        "windows_fraction": timings["windows_s"] / timings["total_s"],
        "sampling_step_ms": sampling_step_ms, "forward_step_ms": forward_step_ms,
        "reverse_step_ms": reverse_step_ms, "openmm_cpu_step_ms": cpu_step_ms,
        "forward_step_over_openmm_step": forward_step_ms / cpu_step_ms,
        "reverse_step_over_openmm_step": reverse_step_ms / cpu_step_ms,
        "paper_schedule_s": 1e-3 * (PAPER_SAMPLING_STEPS * sampling_step_ms
                                    + PAPER_WINDOW_STEPS * (forward_step_ms + reverse_step_ms)),
    }
