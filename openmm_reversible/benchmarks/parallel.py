"""Benchmark ``parallel``: an epoch's windows on 1 and on N local Dask workers.

The fit of CONFIG (its schedule's windows, or ``--windows``) runs ``--epochs`` epochs three
times from the same start: in this process with 1 torch thread, on 1 worker and on N workers
(1 torch thread each). Reports, per layout, the engine's start-up time, the last epoch's wall
time and its window phase (sampling in OpenMM stays serial in this process), the speed-up of
N workers over 1, the overhead per piece (the window phase on 1 worker minus the time spent in
the windows themselves: serialisation, transfer and scheduling, per window), the pickled size
of a piece and of its result, and whether every layout gave the same gradients and parameters
bit for bit. ``identical`` can only hold where OpenMM's sampling itself repeats from run to
run (the Reference platform, as in the tests): the windows' start states come from it, and
the water example (CPU platform, NPT) gives different losses in two in-process runs already.
"""

from __future__ import annotations

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


def _fit(config, engine, output: Path) -> tuple[list[dict], tuple[int, int]]:
    """The fit's records, and the pickled sizes (bytes) of a piece and of a result like its
    windows'."""
    from ..train import Trainer, WindowPiece, WindowResult

    trainer = Trainer(config, output, progress=False, engine=engine)
    trainer.run()
    last = trainer.records[-1]
    piece = WindowPiece(last["epoch"], 0, config.schedule.windows,
                        trainer.parameters.scaled.detach().clone(), trainer.state, 0, str(output))
    result = WindowResult(last["loss"], torch.tensor(list(last["gradient"].values())),
                          last["terms"], last["observables"],
                          {"forward_s": 0.0, "backward_s": 0.0, "reconstruction_error": 0.0})
    return trainer.records, (len(pickle.dumps(piece)), len(pickle.dumps(result)))


def measure(config: str, workers: int = 2, windows: int | None = None, epochs: int = 2,
            progress: bool = True) -> dict:
    """Run the fit of ``config`` in-process, on 1 worker and on ``workers`` (module docstring).

    Parameters
    ----------
    config : str
        TOML fitting config.
    workers : int
        Workers to compare with 1.
    windows : int, optional
        Override ``schedule.windows`` (>= 4 keeps the workers busy).
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
    check_at_least(1, epochs=epochs, windows=windows or 1)
    fit_config = load_config(config)
    schedule = dataclasses.replace(fit_config.schedule, epochs=epochs,
                                   windows=windows or fit_config.schedule.windows)
    fit_config = dataclasses.replace(fit_config, schedule=schedule)
    result = {"benchmark": "parallel", "windows": schedule.windows, "workers": workers,
              "cores": len(os.sched_getaffinity(0))}
    layouts = {}
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
                records, sizes = _fit(fit_config, engine, Path(tmp) / name)
            finally:
                torch.set_num_threads(threads)
                engine.close()
            last = records[-1]["timings"]
            layouts[name] = {"startup_s": startup, "epoch_s": last["total_s"],
                             "windows_s": last["windows_s"],
                             "in_windows_s": sum(w["seconds"] for w in last["windows"]),
                             "records": records}
            result["piece_bytes"], result["result_bytes"] = sizes
    one, many = layouts["1_worker"], layouts[f"{workers}_workers"]
    for name, layout in layouts.items():
        for key in ("startup_s", "epoch_s", "windows_s", "in_windows_s"):
            result[f"{name}_{key}"] = round(layout[key], 3)
    result["windows_speedup"] = round(one["windows_s"] / many["windows_s"], 3)
    result["epoch_speedup"] = round(one["epoch_s"] / many["epoch_s"], 3)
    result["overhead_per_piece_s"] = round((one["windows_s"] - one["in_windows_s"])
                                           / schedule.windows, 4)
    keys = ("loss", "gradient", "parameters_after")
    reference = [[r[k] for k in keys] for r in layouts["in_process"]["records"]]
    result["identical"] = all([[r[k] for k in keys] for r in layout["records"]] == reference
                              for layout in layouts.values())
    return result
