"""Windows on Dask workers: the same result bit for bit with any layout, worker faults survived,
a piece that keeps failing named, bad scheduler addresses refused in one clear message.

The fit is the tiny argon fit of test_train.py (64 atoms, Reference platform) with 4 windows an
epoch, so that each epoch has 4 independent pieces to spread over the workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import signal

import pytest
import torch
from test_train import EPSILON, SIGMA, _config, argon  # noqa: F401 - argon is a fixture

from openmm_reversible.commands import fit as fit_cli
from openmm_reversible.config import ParallelConfig, load_config
from openmm_reversible.errors import InputError
from openmm_reversible.parallel import (
    IN_PROCESS,
    ClusterUnavailable,
    DaskEngine,
    InProcess,
    open_engine,
)
from openmm_reversible.train import TrainingFailed, fit

WINDOWS = 4


def _windows_config(argon, name: str, epochs: int = 2, **parallel):  # noqa: F811
    config = _config(argon, name, SIGMA * 1.02, EPSILON * 0.95, epochs=epochs)
    return dataclasses.replace(
        config, schedule=dataclasses.replace(config.schedule, windows=WINDOWS),
        parallel=dataclasses.replace(config.parallel, **parallel))


def _results(result) -> list[tuple]:
    """What must not depend on the layout: every epoch's loss, terms, gradient and step."""
    return [(r["loss"], r["terms"], r["gradient"], r["parameters"], r["parameters_after"],
             r["observables"]) for r in result.records]


@pytest.fixture(scope="module")
def in_process(argon, tmp_path_factory):  # noqa: F811
    """The reference: the windows run here, one after another, with 1 torch thread (as in the
    workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(_windows_config(argon, "layout"), tmp_path_factory.mktemp("here"),
                   progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_workers():
    with DaskEngine(workers=2, threads_per_worker=1, retries=2) as engine:
        yield engine


def test_gradient_and_parameters_identical_on_1_and_2_workers(argon, in_process, two_workers,  # noqa: F811
                                                              tmp_path):
    assert {w["worker"] for r in in_process.records for w in r["timings"]["windows"]} == \
        {IN_PROCESS}
    assert in_process.parameters != {"Atom/sigma/Ar": SIGMA * 1.02,
                                     "Atom/epsilon/Ar": EPSILON * 0.95}  # the fit moved
    # One local worker, as the config's [parallel] section asks (opened and closed by fit).
    one = fit(_windows_config(argon, "layout", workers=1), tmp_path / "one", progress=False)
    two = fit(_windows_config(argon, "layout"), tmp_path / "two", progress=False,
              engine=two_workers)
    for result in (one, two):
        assert _results(result) == _results(in_process)
        assert result.parameters == in_process.parameters
    assert (tmp_path / "two" / "layout.xml").read_bytes() == \
        (tmp_path / "one" / "layout.xml").read_bytes()
    places = [[w["worker"] for w in r["timings"]["windows"]] for r in two.records]
    assert all(len(p) == WINDOWS for p in places)
    assert len({w for p in places for w in p}) == 2  # both workers took pieces
    assert IN_PROCESS not in places[0]
    assert len({w["worker"] for r in one.records for w in r["timings"]["windows"]}) == 1


def _kill_once(marker: str, window: int, function, piece):
    """The piece of ``window`` kills its own worker process the first time it runs."""
    if piece.index == window and not os.path.exists(marker):
        with open(marker, "w") as fh:
            fh.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return function(piece)


def _always_fails(window: int, function, piece):
    if piece.index == window:
        raise RuntimeError("scratch disk full")
    return function(piece)


class _Wrapped(DaskEngine):
    """The engine of a fixture, with every piece's function wrapped by ``wrapper``."""

    def __init__(self, engine: DaskEngine, wrapper):
        self.__dict__.update(engine.__dict__)
        self.wrapper = wrapper

    def map(self, function, items, passthrough=(), done=None):
        return super().map(functools.partial(self.wrapper, function), items, passthrough, done)

    def close(self) -> None:  # the fixture closes the real one
        pass


def test_killed_worker_has_its_piece_rerun_and_the_result_is_unchanged(
        argon, in_process, two_workers, tmp_path):  # noqa: F811
    marker = tmp_path / "killed"
    engine = _Wrapped(two_workers, functools.partial(_kill_once, str(marker), 2))
    result = fit(_windows_config(argon, "layout", epochs=1), tmp_path / "out", progress=False,
                 engine=engine)
    killed = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # that worker process is gone
    assert _results(result) == _results(in_process)[:1]
    assert result.parameters == in_process.records[0]["parameters_after"]


def test_a_piece_that_keeps_failing_stops_the_fit_naming_its_window(argon, two_workers,  # noqa: F811
                                                                    tmp_path):  # noqa: F811
    engine = _Wrapped(two_workers, functools.partial(_always_fails, 2))
    with pytest.raises(TrainingFailed, match=r"^epoch 1: reversible window 3 \(started at "
                       r"OpenMM step 500\): piece 3 of 4 failed on all 3 runs allowed "
                       r"\(parallel\.retries = 2\): RuntimeError: scratch disk full\. The fit "
                       r"stops; the last good parameters are kept in "):
        fit(_windows_config(argon, "failing"), tmp_path / "out", progress=False,
            engine=engine)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def _threads(_item) -> int:
    return torch.get_num_threads()


def _allowed_failures(dask_scheduler) -> int:
    return dask_scheduler.allowed_failures


def test_workers_run_with_the_threads_and_retries_asked_for(two_workers):
    # A piece may take its worker down `retries` times before it counts as failed.
    assert two_workers.client.run_on_scheduler(_allowed_failures) == 2
    ran = two_workers.map(_threads, range(4))
    assert [r.value for r in ran] == [1] * 4
    assert all(r.where.startswith("tcp://") for r in ran)
    assert [r.value for r in InProcess().map(_threads, range(2))] == [torch.get_num_threads()] * 2


@pytest.mark.parametrize("address, reason", [
    ("tcp://127.0.0.1:9", "OSError"),           # nothing listens there
    ("nowhere://host:8786", "ValueError"),       # no such protocol
])
def test_bad_or_unreachable_scheduler_is_one_clear_error(address, reason):
    with pytest.raises(ClusterUnavailable) as info:
        open_engine(ParallelConfig(scheduler=address, connect_timeout=1.0))
    message = str(info.value)
    assert message.startswith(f"parallel.scheduler = {address!r}: cannot connect to a Dask "
                              f"scheduler there ({reason}")
    assert "give the address it prints" in message
    assert isinstance(info.value, InputError)  # the command line exits 2 with this line


def test_config_and_command_line_choose_the_layout(argon, tmp_path):  # noqa: F811
    assert isinstance(open_engine(ParallelConfig()), InProcess)
    _config(argon, "cli", SIGMA, EPSILON)
    toml = argon[0] / "cli.toml"
    base = toml.read_text()
    for section, error in [
            ('workers = 2\nscheduler = "tcp://h:8786"',
             r"^parallel: give either 'workers' \(local worker processes\) or 'scheduler' "
             r"\(the address of a running cluster\), not both$"),
            ("threads_per_worker = 0", r"^parallel\.threads_per_worker = 0: must be > 0$")]:
        toml.write_text(base + f"\n[parallel]\n{section}\n")
        with pytest.raises(InputError, match=error):
            load_config(toml)
    toml.write_text(base + "\n[parallel]\nworkers = 3\nthreads_per_worker = 2\n")
    assert load_config(toml).parallel == ParallelConfig(workers=3, threads_per_worker=2)
    toml.write_text(base)
    parser = argparse.ArgumentParser()
    fit_cli.add_arguments(parser)
    with pytest.raises(SystemExit):  # one or the other
        parser.parse_args([str(toml), "--workers", "2", "--scheduler", "tcp://h:1"])
    with pytest.raises(InputError, match=r"^--workers 0: must be >= 1$"):
        fit_cli.run(parser.parse_args([str(toml), "--workers", "0"]))


def test_a_fit_resumes_on_another_layout_as_if_uninterrupted(argon, in_process, two_workers,  # noqa: F811
                                                             tmp_path):
    """The checkpoint does not hold the layout: epoch 1 here, epoch 2 on 2 workers (a config
    whose [parallel] section changed) continue the in-process run exactly."""
    fit(_windows_config(argon, "layout", epochs=1), tmp_path / "out", progress=False)
    resumed = fit(_windows_config(argon, "layout", workers=2), tmp_path / "out", resume=True,
                  progress=False, engine=two_workers)
    assert [r["epoch"] for r in resumed.records] == [1, 2]
    assert _results(resumed) == _results(in_process)
    assert {w["worker"] for w in resumed.records[1]["timings"]["windows"]} != {IN_PROCESS}


def test_state_points_on_workers_as_in_process(argon, two_workers, tmp_path):  # noqa: F811
    """The pieces of several systems and state points on workers (each worker builds the model
    of a piece's state point from the config): the same epoch bit for bit as in-process."""
    from test_train import LABELS, _systems_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = fit(_systems_config(argon, epochs=1), tmp_path / "here", progress=False)
    finally:
        torch.set_num_threads(threads)
    there = fit(_systems_config(argon, epochs=1), tmp_path / "there", progress=False,
                engine=two_workers)
    assert _results(there) == _results(here)
    assert there.records[0]["stderr"] == here.records[0]["stderr"]
    windows = there.records[0]["timings"]["windows"]
    assert [w["state_point"] for w in windows] == LABELS
    assert IN_PROCESS not in {w["worker"] for w in windows}
