"""Benchmark ``parallel``: an epoch's pieces on 1 and on N local Dask workers, in one run.

The fit of CONFIG (its schedule's windows and replicas, or ``--windows`` and ``--replicas``)
runs ``--epochs`` epochs three times from the same start: in this process with 1 torch
thread, on 1 worker and on N workers (1 torch thread each). The last epoch of each is timed.
An epoch has two phases:

- **sampling**: OpenMM. With one replica it runs in this process and stays serial. With R > 1
  replicas, each replica's sampling is a piece (``schedule.replicas``);
- **windows**: the R × W reversible windows, one piece each.

Reported (times in s, sizes in bytes):

- per layout, the engine's start-up time, the epoch's wall time and each phase's wall time;
- the **time per piece**: the mean time spent inside a window piece, and inside a replica's
  sampling piece, on 1 worker;
- the **overhead per piece**: on 1 worker, the phases' wall time minus the time spent inside
  their pieces, divided by the number of pieces. That is serialisation, transfer and
  scheduling (one worker runs its pieces one after another, so no waiting for a free worker
  is counted);
- the **speed-up** of N workers over 1 worker: of each phase and of the whole epoch;
- the pickled size of a window piece and its result (and of a replica piece and its result);
- ``identical``: whether every layout gave the same losses, gradients and parameters bit for
  bit. That can only hold where OpenMM's sampling repeats from run to run (the Reference
  platform, or ``simulation.deterministic``), because the windows' start states come from it;
- the 1-minute load average before and after, since other jobs on the machine slow the
  workers down.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import load_config
from ..errors import check_at_least
from ..parallel import DaskEngine, InProcess
from ..train import ReplicaPiece, SampledReplica, Trainer, WindowPiece, WindowResult

COMPARED = ("loss", "gradient", "parameters_after", "replica_losses")
"""Record entries that must not depend on the layout."""


def _sizes(trainer) -> dict[str, int]:
    """Pickled sizes (bytes) of pieces and results like those of the trainer's last epoch."""
    last, sched = trainer.records[-1], trainer.config.schedule
    scaled = trainer.parameters.scaled.detach().clone()
    info = {"forward_s": 0.0, "backward_s": 0.0, "reconstruction_error": 0.0}
    sizes = {
        "piece_bytes": WindowPiece(last["epoch"], 0, sched.windows, scaled, trainer.state, 0,
                                   str(trainer.output)),
        "result_bytes": WindowResult(last["loss"], torch.tensor(list(last["gradient"].values())),
                                     last["terms"], last["observables"], info)}
    if sched.replicas > 1:
        sizes["replica_piece_bytes"] = ReplicaPiece(last["epoch"], 1, scaled, trainer.state, 0)
        # Distinct copies of the state: pickle would store one object repeated only once.
        sizes["replica_result_bytes"] = SampledReplica(
            starts=[copy.deepcopy(trainer.state) for _ in range(sched.windows)], frames=[],
            ensemble=[], end=copy.deepcopy(trainer.state), state=last["state"],
            timings={"push_s": 0.0, "equilibrate_s": 0.0, "bulk_s": 0.0})
    return {key: len(pickle.dumps(value)) for key, value in sizes.items()}


def _timed(timings: dict) -> dict[str, float]:
    """An epoch's wall times and the time spent inside its pieces (s)."""
    replicas = timings.get("replicas", [])
    return {"epoch_s": timings["total_s"], "sampling_s": timings["sampling_s"],
            "windows_s": timings["windows_s"],
            "in_sampling_s": sum(r["seconds"] for r in replicas),
            "in_windows_s": sum(w["seconds"] for w in timings["windows"]),
            "sampling_pieces": len(replicas), "window_pieces": len(timings["windows"])}


def measure(config: str, workers: int = 2, windows: int | None = None,
            replicas: int | None = None, epochs: int = 2, progress: bool = True) -> dict:
    """Run the fit of ``config`` in-process, on 1 worker and on ``workers`` (module docstring).

    Parameters
    ----------
    config : str
        TOML fitting config.
    workers : int
        Workers to compare with 1.
    windows : int, optional
        Override ``schedule.windows``.
    replicas : int, optional
        Override ``schedule.replicas`` (> 1 makes each replica's sampling a piece too).
    epochs : int
        Epochs per layout; the last one is timed.
    progress : bool
        Show a progress bar of the three layouts on a terminal.

    Returns
    -------
    dict
        The JSON record (times in s, sizes in bytes).
    """
    check_at_least(2, workers=workers)
    check_at_least(1, epochs=epochs, windows=windows or 1, replicas=replicas or 1)
    fit_config = load_config(config)
    schedule = dataclasses.replace(fit_config.schedule, epochs=epochs,
                                   windows=windows or fit_config.schedule.windows,
                                   replicas=replicas or fit_config.schedule.replicas)
    fit_config = dataclasses.replace(fit_config, schedule=schedule)
    result = {"benchmark": "parallel", "windows": schedule.windows,
              "replicas": schedule.replicas, "workers": workers,
              "cores": len(os.sched_getaffinity(0)),
              "load_average_before": round(os.getloadavg()[0], 2)}
    layouts, records = {}, {}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        layout_list = (("in_process", None), ("1_worker", 1), (f"{workers}_workers", workers))
        for name, count in tqdm(layout_list, desc="benchmark parallel", unit="layout",
                                leave=False, disable=not progress or None):
            t = time.perf_counter()
            engine = InProcess() if count is None else DaskEngine(workers=count)
            startup = time.perf_counter() - t
            torch.set_num_threads(1)
            try:
                trainer = Trainer(fit_config, Path(tmp) / name, progress=False, engine=engine)
                trainer.run()
            finally:
                torch.set_num_threads(threads)
                engine.close()
            layouts[name] = {"startup_s": startup, **_timed(trainer.records[-1]["timings"])}
            records[name] = [[r.get(k) for k in COMPARED] for r in trainer.records]
        result.update(_sizes(trainer))
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    one, many = layouts["1_worker"], layouts[f"{workers}_workers"]
    for name, layout in layouts.items():
        for key in ("startup_s", "epoch_s", "sampling_s", "windows_s"):
            result[f"{name}_{key}"] = round(layout[key], 3)
    result["window_piece_s"] = round(one["in_windows_s"] / one["window_pieces"], 4)
    pieces = one["window_pieces"] + one["sampling_pieces"]
    overhead = one["windows_s"] - one["in_windows_s"]
    if one["sampling_pieces"]:
        result["replica_piece_s"] = round(one["in_sampling_s"] / one["sampling_pieces"], 4)
        overhead += one["sampling_s"] - one["in_sampling_s"]
        result["sampling_speedup"] = round(one["sampling_s"] / many["sampling_s"], 3)
    result["overhead_per_piece_s"] = round(overhead / pieces, 4)
    result["windows_speedup"] = round(one["windows_s"] / many["windows_s"], 3)
    result["epoch_speedup"] = round(one["epoch_s"] / many["epoch_s"], 3)
    result["identical"] = all(r == records["in_process"] for r in records.values())
    return result
