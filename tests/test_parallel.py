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
import pickle
import signal

import numpy as np
import pytest
import torch
from test_train import EPSILON, SIGMA, _config, argon  # noqa: F401 - argon is a fixture
from torch.torch_version import TorchVersion

from openmm_reversible import parallel
from openmm_reversible.commands import fit as fit_cli
from openmm_reversible.config import ParallelConfig, load_config
from openmm_reversible.errors import InputError
from openmm_reversible.parallel import (
    IN_PROCESS,
    ClusterUnavailable,
    DaskEngine,
    InProcess,
    PieceFailed,
    PieceProgress,
    Ran,
    WorkerMismatch,
    by_worker,
    code_hash,
    describe_progress,
    open_engine,
)
from openmm_reversible.sampler import SimulationExploded
from openmm_reversible.train import CHECKPOINT, ReplicaPiece, TrainingFailed, fit

WINDOWS = 4


def _windows_config(argon, name: str, epochs: int = 2, replicas: int = 1,  # noqa: F811
                    **parallel):
    config = _config(argon, name, SIGMA * 1.02, EPSILON * 0.95, epochs=epochs)
    return dataclasses.replace(
        config, schedule=dataclasses.replace(config.schedule, windows=WINDOWS,
                                             replicas=replicas),
        parallel=dataclasses.replace(config.parallel, **parallel))


def _results(result) -> list[tuple]:
    """What must not depend on the layout: every epoch's loss, terms, gradient and step."""
    return [(r["loss"], r["terms"], r["gradient"], r["parameters"], r["parameters_after"],
             r["observables"]) for r in result.records]


@pytest.fixture(scope="module")
def in_process(argon, tmp_path_factory):  # noqa: F811
    """The reference: the windows run here, one after another, with 1 torch thread (as in the
    workers)."""
    return _one_thread_fit(_windows_config(argon, "layout"), tmp_path_factory.mktemp("here"))


def _one_thread_fit(config, output):
    """A fit in this process with 1 torch thread, as in the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit(config, output, progress=False)
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
    for record in two.records:  # per worker: which windows, how long in all
        workers = record["timings"]["workers"]
        assert sorted(n for w in workers.values() for n in w["pieces"]) == [1, 2, 3, 4]
        for where, work in workers.items():
            windows = [w for w in record["timings"]["windows"] if w["worker"] == where]
            assert work["pieces"] == [w["window"] for w in windows]
            assert work["seconds"] == pytest.approx(sum(w["seconds"] for w in windows))


def test_log_says_which_pieces_each_worker_ran_and_how_long():
    ran = {2: Ran(None, "tcp://127.0.0.1:40123", 1.5), 0: Ran(None, "tcp://127.0.0.1:40123", 2.0),
           1: Ran(None, "tcp://127.0.0.1:40777", 0.3)}
    summary = by_worker(ran)
    assert summary == {"tcp://127.0.0.1:40123": {"pieces": [1, 3], "seconds": 3.5},
                       "tcp://127.0.0.1:40777": {"pieces": [2], "seconds": 0.3}}


A, B, C = "tcp://127.0.0.1:40123", "tcp://127.0.0.1:40777", "tcp://127.0.0.1:40999"


def test_progress_status_says_what_each_worker_runs_now_and_how_much_it_finished():
    assert describe_progress({}, []) == ""
    assert describe_progress({B: "window 2", A: "window 4"},
                             [Ran(None, A, 2.0), Ran(None, A, 1.5), Ran(None, B, 0.25)]) == \
        "127.0.0.1:40123: window 4, 2 done (3.5 s); 127.0.0.1:40777: window 2, 1 done (0.2 s)"
    assert describe_progress({B: "replica 1"}, [Ran(None, A, 0.3)]) == \
        "127.0.0.1:40123: idle, 1 done (0.3 s); 127.0.0.1:40777: replica 1, 0 done"


def test_one_bar_follows_the_pieces_of_several_maps_as_they_start_and_finish():
    """Replicas, then windows, on two workers: the status after each event; a start event
    that comes after its piece finished (events and results travel apart) is dropped."""
    with PieceProgress("epoch 1", 5, enabled=False) as progress:
        started, done = progress.phase(["replica 1", "replica 2"])
        started(0, A)
        started(1, B)
        assert progress.status() == "127.0.0.1:40123: replica 1, 0 done; " \
                                    "127.0.0.1:40777: replica 2, 0 done"
        done(1, Ran(None, B, 1.0))
        done(0, Ran(None, A, 2.0))
        started(0, A)  # late
        assert progress.status() == "127.0.0.1:40123: idle, 1 done (2.0 s); " \
                                    "127.0.0.1:40777: idle, 1 done (1.0 s)"
        started, done = progress.phase(["window 1", "window 2", "window 3"])
        started(0, A)
        started(1, B)
        done(0, Ran(None, A, 0.5))
        started(2, A)
        assert progress.status() == "127.0.0.1:40123: window 3, 2 done (2.5 s); " \
                                    "127.0.0.1:40777: window 2, 1 done (1.0 s)"
        assert len(progress.finished) == 3 and progress.bar.total == 5
        started(1, C)  # B died running window 2: it runs again on a new worker
        assert progress.status() == "127.0.0.1:40123: window 3, 2 done (2.5 s); " \
                                    "127.0.0.1:40777: idle, 1 done (1.0 s); " \
                                    "127.0.0.1:40999: window 2, 0 done"


def _square_slowly(x: int) -> int:
    import time

    time.sleep(0.2)
    return x * x


def test_workers_announce_each_piece_as_it_starts(two_workers):
    import time

    starts, finished = [], []
    ran = two_workers.map(_square_slowly, range(4), started=lambda i, w: starts.append((i, w)),
                          done=lambda i, r: finished.append(i))
    deadline = time.monotonic() + 10.0  # start events travel apart from the results
    while len(starts) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(i for i, _ in starts) == [0, 1, 2, 3]
    assert {i: w for i, w in starts} == {i: r.where for i, r in enumerate(ran)}
    assert len({w for _, w in starts}) == 2  # both workers ran pieces
    assert sorted(finished) == [0, 1, 2, 3]
    here = []
    InProcess().map(_square, range(2), started=lambda i, w: here.append((i, w)))
    assert here == [(0, IN_PROCESS), (1, IN_PROCESS)]


def test_four_workers_give_the_single_process_result_bit_for_bit(argon, in_process, tmp_path):  # noqa: F811
    """As many workers as windows: every window of an epoch may run at once, the result is
    still the in-process one."""
    four = fit(_windows_config(argon, "layout", epochs=1, workers=4), tmp_path / "four",
               progress=False)
    assert _results(four) == _results(in_process)[:1]
    assert four.parameters == in_process.records[0]["parameters_after"]
    places = [w["worker"] for w in four.records[0]["timings"]["windows"]]
    assert len(places) == WINDOWS and IN_PROCESS not in places
    assert len(set(places)) > 1  # spread over the workers, not queued on one


def test_replicas_are_pieces_with_their_own_seeds_and_the_same_result_on_any_layout(
        argon, in_process, two_workers, tmp_path):  # noqa: F811
    """2 replicas of 4 windows: each replica's OpenMM sampling is a piece, then the 8 windows
    are; in-process and on 2 workers alike."""
    config = _windows_config(argon, "replicas", replicas=2)
    here = _one_thread_fit(config, tmp_path / "here")
    two = fit(config, tmp_path / "two", progress=False, engine=two_workers)
    assert _results(two) == _results(here)
    assert [r["replica_losses"] for r in two.records] == \
        [r["replica_losses"] for r in here.records]
    assert [r["state"] for r in two.records] == [r["state"] for r in here.records]
    assert two.parameters == here.parameters
    first = here.records[0]
    # Replica 1 is the chain of the fit without replicas; replica 2 has its own noise.
    assert first["replica_losses"][0] == in_process.records[0]["loss"]
    assert first["replica_losses"][1] != first["replica_losses"][0]
    assert first["loss"] == pytest.approx(sum(first["replica_losses"]) / 2, rel=1e-12)
    assert first["gradient"] != in_process.records[0]["gradient"]
    for result, where in ((here, {IN_PROCESS}), (two, None)):
        timings = result.records[0]["timings"]
        assert [(w["replica"], w["window"]) for w in timings["windows"]] == \
            [(r, w) for r in (1, 2) for w in range(1, WINDOWS + 1)]
        places = {p["worker"] for p in timings["replicas"]}
        assert places == where if where else IN_PROCESS not in places
    assert "replica_losses" not in in_process.records[0]


class _Recording(InProcess):
    """Runs the pieces here and keeps every replica piece with its sampling."""

    def __init__(self):
        self.replicas = []

    def map(self, function, items, passthrough=(), done=None, started=None):
        results = super().map(function, items, passthrough, done, started)
        self.replicas += [(item, ran.value) for item, ran in zip(items, results, strict=True)
                          if isinstance(item, ReplicaPiece)]
        return results


def _same_state(a, b) -> bool:
    return (a.step == b.step and np.array_equal(a.positions, b.positions)
            and np.array_equal(a.velocities, b.velocities))


def test_each_replica_continues_its_own_chain_also_after_resuming(argon, tmp_path):  # noqa: F811
    """Replica r of epoch 2 starts where replica r ended epoch 1, not where replica 1 did; the
    checkpoint keeps every replica's end state, so a resumed fit gives the uninterrupted one."""
    engine = _Recording()
    whole = fit(_windows_config(argon, "chains", replicas=2), tmp_path / "whole",
                progress=False, engine=engine)
    pieces = [(p.epoch, p.index) for p, _ in engine.replicas]
    assert pieces == [(1, 0), (1, 1), (2, 0), (2, 1)]
    (first1, ran1), (first2, ran2), (second1, _), (second2, _) = engine.replicas
    assert _same_state(first1.state, first2.state)  # epoch 1: both from the start state
    assert not _same_state(ran1.end, ran2.end)  # their own noise: two chains
    assert _same_state(second1.state, ran1.end)
    assert _same_state(second2.state, ran2.end)
    saved = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)
    assert len(saved["replica_states"]) == 1 and len(saved["replica_states"][0]) == 1
    assert saved["replica_states"][0][0]["step"] == saved["state"]["step"]
    assert not torch.equal(saved["replica_states"][0][0]["positions"],
                           saved["state"]["positions"])

    fit(_windows_config(argon, "chains", epochs=1, replicas=2), tmp_path / "split",
        progress=False)
    resumed = _Recording()
    again = fit(_windows_config(argon, "chains", replicas=2), tmp_path / "split", resume=True,
                progress=False, engine=resumed)
    assert [(p.epoch, p.index) for p, _ in resumed.replicas] == [(2, 0), (2, 1)]
    assert _same_state(resumed.replicas[1][0].state, ran2.end)
    assert _results(again) == _results(whole)
    assert [r["replica_losses"] for r in again.records] == \
        [r["replica_losses"] for r in whole.records]
    assert again.parameters == whole.parameters


def test_an_exploded_simulation_crosses_from_a_worker_with_its_step_and_reason():
    error = pickle.loads(pickle.dumps(SimulationExploded(120, "NaN in positions or energy")))
    assert (error.step, error.reason) == (120, "NaN in positions or energy")
    assert str(error) == "simulation exploded at OpenMM step 120: NaN in positions or energy"


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

    def map(self, function, items, passthrough=(), done=None, started=None):
        return super().map(functools.partial(self.wrapper, function), items, passthrough, done,
                           started)

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


def test_a_replica_whose_sampling_keeps_failing_stops_the_fit_naming_it(argon, two_workers,  # noqa: F811
                                                                       tmp_path):
    engine = _Wrapped(two_workers, functools.partial(_always_fails, 1))
    with pytest.raises(TrainingFailed, match=r"^epoch 1: OpenMM sampling of replica 2: piece 2 "
                       r"of 2 failed on all 3 runs allowed \(parallel\.retries = 2\): "
                       r"RuntimeError: scratch disk full\. The fit stops; "):
        fit(_windows_config(argon, "failing", replicas=2), tmp_path / "out", progress=False,
            engine=engine)


def _threads(_item) -> int:
    return torch.get_num_threads()


def _numba_threads(_item) -> int:
    import numba

    return numba.get_num_threads()


def _allowed_failures(dask_scheduler) -> int:
    return dask_scheduler.allowed_failures


def _worker_environment() -> dict:
    import openmm

    return {"threads": openmm.Platform.getPlatformByName("CPU").getPropertyDefaultValue(
        "Threads"), "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def test_workers_run_with_the_threads_and_retries_asked_for(two_workers):
    # A piece may take its worker down `retries` times before it counts as failed.
    assert two_workers.client.run_on_scheduler(_allowed_failures) == 2
    # OpenMM's CPU platform (replicas' sampling) takes threads_per_worker threads, and glibc
    # keeps its adaptive allocation thresholds (Dask would set MALLOC_TRIM_THRESHOLD_).
    for report in two_workers.client.run(_worker_environment).values():
        assert report == {"threads": "1", "trim": None}
    ran = two_workers.map(_threads, range(4))
    assert [r.value for r in ran] == [1] * 4
    assert all(r.where.startswith("tcp://") for r in ran)
    # The fused kernels' threads too: 2 workers of 1 thread on 2 cores, not 2 × 2.
    assert [r.value for r in two_workers.map(_numba_threads, range(2))] == [1] * 2
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


FIX = ("install the same versions on every node (pip install -r requirements.lock, and "
       "openmm-reversible from the same commit: pip install -e .) and restart that worker")


def _set_torch_version(version: str) -> None:
    """On a worker: make torch report ``version``."""
    torch.__version__ = TorchVersion(version)


def _set_code_hash(value: str | None) -> None:
    """On a worker: make the source hash ``value`` (None: the real one again)."""
    parallel.code_hash = code_hash if value is None else functools.partial(str, value)


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def test_a_worker_with_another_torch_is_refused_on_connecting_naming_both_versions(
        two_workers):
    client = two_workers.client
    real = str(torch.__version__)
    worker = sorted(client.scheduler_info()["workers"])[0]
    client.run(_set_torch_version, "2.0.0", workers=[worker])
    try:
        with pytest.raises(WorkerMismatch) as info:
            DaskEngine(scheduler=client.scheduler.address)
    finally:
        client.run(_set_torch_version, real, workers=[worker])
    assert str(info.value) == (f"worker {worker} runs torch 2.0.0 but this process runs torch "
                               f"{real}, so its pieces would not give this process's numbers; "
                               + FIX)
    assert isinstance(info.value, ClusterUnavailable)  # an InputError: exit 2, one line
    assert two_workers.map(_threads, range(2))  # the refusal left the cluster itself alone


def test_a_worker_with_other_source_code_runs_no_piece(two_workers, tmp_path):
    """A worker that changed after the engine connected (or joined later) is refused by the
    check each piece makes before it runs."""
    client = two_workers.client
    client.run(_set_code_hash, "000000000000")
    try:
        with pytest.raises(WorkerMismatch) as info:
            two_workers.map(_touch, [str(tmp_path / f"ran{i}") for i in range(2)])
    finally:
        client.run(_set_code_hash, None)
    assert str(info.value).endswith(
        " runs openmm-reversible source 000000000000 but this process runs openmm-reversible "
        f"source {code_hash()}, so its pieces would not give this process's numbers; " + FIX)
    assert str(info.value).startswith("worker tcp://")
    assert not list(tmp_path.iterdir())  # no piece ran
    assert len(code_hash()) == 12 and code_hash() != "000000000000"


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


@pytest.mark.slow
def test_benchmark_reports_time_and_overhead_per_piece_and_speed_up_in_one_run(argon):  # noqa: F811
    from openmm_reversible.benchmarks.parallel import measure

    _config(argon, "bench", SIGMA * 1.02, EPSILON * 0.95, epochs=1)
    result = measure(str(argon[0] / "bench.toml"), workers=2, windows=2, replicas=2, epochs=1,
                     progress=False)
    assert (result["windows"], result["replicas"], result["workers"]) == (2, 2, 2)
    assert result["identical"] is True  # Reference platform: every layout the same numbers
    assert result["window_piece_s"] > 0 and result["replica_piece_s"] > 0
    assert result["overhead_per_piece_s"] > 0  # one worker: wall time beyond the pieces'
    for key in ("windows_speedup", "sampling_speedup", "epoch_speedup"):
        assert result[key] > 0
    assert result["piece_bytes"] < result["replica_result_bytes"]  # 3 states against 1


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


def _square(x: int) -> int:
    return x * x


def test_results_the_client_was_never_told_of_are_fetched_from_the_scheduler(two_workers,
                                                                            monkeypatch):
    """Dask can lose the message that a task finished (its future then stays pending with
    the key in memory); the engine asks the scheduler after a quiet slice and fetches what
    it holds. Here every such message is dropped, so only that path can finish the map."""
    client = two_workers.client
    monkeypatch.setattr(two_workers, "POLL_S", 0.2)
    monkeypatch.setitem(client._stream_handlers, "key-in-memory", lambda **_: None)
    assert [ran.value for ran in two_workers.map(_square, range(4))] == [0, 1, 4, 9]


def _fail(_item) -> None:
    raise ValueError("this piece fails")


def test_a_failure_the_client_was_never_told_of_is_named(two_workers, monkeypatch):
    client = two_workers.client
    monkeypatch.setattr(two_workers, "POLL_S", 0.2)
    monkeypatch.setitem(client._stream_handlers, "task-erred", lambda **_: None)
    with pytest.raises(PieceFailed, match=r"^piece 1 of 1 failed on all 3 runs allowed "
                                          r"\(parallel.retries = 2\): .*this piece fails"):
        two_workers.map(_fail, [0])
