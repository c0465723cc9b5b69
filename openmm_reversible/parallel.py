"""Where the independent pieces of an epoch run: in this process, or on Dask workers.

An epoch's gradient is a sum over pieces that are independent once their inputs are fixed (the
reversible windows, given their start states, the parameter values and their seeds). An
:class:`Engine` maps a picklable function over such pieces and hands the results back *in the
order of the pieces*, whatever order they finished in, so that the caller's reduction (a sum
in window order) is the same with any number of workers: the results are identical bit for bit
to a single-process run.

- :class:`InProcess` runs the pieces one after another here (the default);
- :class:`DaskEngine` runs them on a Dask ``distributed`` cluster: ``workers`` local worker
  processes (a ``LocalCluster``) or a running scheduler given by its address (a cluster
  started by hand or by ``dask-jobqueue`` on Slurm/PBS). Each worker runs one piece at a time
  with ``threads_per_worker`` torch threads, so N workers × threads stay within the cores.

Faults: a worker that dies while running a piece (killed, out of memory) has the piece re-run on
another worker, and an unexpected exception in a piece is retried, ``retries`` times each; a
piece that fails every time raises :class:`PieceFailed` naming it. Exceptions the caller lists
as ``passthrough`` (deterministic failures the caller handles itself, which another run would
only repeat) are not retried and reach the caller with their own type, the first in piece order.

Every result says where it ran (the worker's address, or ``"in-process"``) and how long the
piece's function took (s); the rest of a piece's wall time is the engine's overhead
(serialisation, transfer, scheduling).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import InputError

IN_PROCESS = "in-process"
"""The ``where`` of a piece run by :class:`InProcess`."""


class PieceFailed(RuntimeError):
    """A piece failed on every run the engine allows.

    Attributes
    ----------
    index : int
        Position of the piece in the mapped sequence (0-based).
    """

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class ClusterUnavailable(InputError):
    """The scheduler address is malformed or unreachable, or the cluster runs other versions of
    Dask's required packages."""


@dataclass(frozen=True)
class Ran:
    """The result of one piece.

    Attributes
    ----------
    value : object
        What the function returned.
    where : str
        The worker's address, or ``"in-process"``.
    seconds : float, s
        Time spent in the function (excludes transfer and scheduling).
    """

    value: object
    where: str
    seconds: float


@dataclass(frozen=True)
class _Raised:
    """A passthrough exception, carried back as a value so that the engine does not retry it."""

    error: BaseException


def _run_piece(function: Callable, threads: int | None, passthrough: tuple, item) -> Ran:
    """Run ``function(item)``: on a Dask worker with ``threads`` torch threads, or here when
    ``threads`` is None. Module-level so that it pickles."""
    if threads is not None:
        torch.set_num_threads(threads)
    where = IN_PROCESS
    if threads is not None:
        from distributed import get_worker

        where = get_worker().address
    start = time.perf_counter()
    try:
        value = function(item)
    except passthrough as exc:
        value = _Raised(exc)
    return Ran(value, where, time.perf_counter() - start)


class Engine:
    """Maps a function over pieces; subclasses say where the pieces run."""

    local = True
    """Whether the pieces run in this process (and may use its objects as they are)."""

    def map(self, function: Callable, items: Sequence, passthrough: tuple = (),
            done: Callable[[int, Ran], None] | None = None) -> list[Ran]:
        """``function(item)`` for every item, results in the order of ``items``.

        Parameters
        ----------
        function : callable
            Picklable (module-level, or a ``functools.partial`` of one) for remote engines.
        items : sequence
            The pieces' inputs.
        passthrough : tuple of exception types
            Raised to the caller unchanged (the first in item order), never retried.
        done : callable, optional
            Called as ``done(index, ran)`` when a piece finishes (progress bars).

        Raises
        ------
        PieceFailed
            A piece failed on every allowed run (remote engines only; here its exception
            propagates).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the workers (a no-op here)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcess(Engine):
    """Run the pieces one after another in this process."""

    def map(self, function, items, passthrough=(), done=None):
        results = []
        for index, item in enumerate(items):
            ran = _run_piece(function, None, passthrough, item)
            if isinstance(ran.value, _Raised):
                raise ran.value.error
            results.append(ran)
            if done is not None:
                done(index, ran)
        return results


class DaskEngine(Engine):
    """Run the pieces on a Dask ``distributed`` cluster.

    Parameters
    ----------
    workers : int, optional
        Start a ``LocalCluster`` of this many worker processes (one piece at a time each).
    scheduler : str, optional
        Or connect to a running scheduler at this address (``tcp://host:8786``).
    threads_per_worker : int
        torch threads in each worker while it runs a piece.
    retries : int
        Extra runs of a piece whose worker died or that raised an unexpected exception.
    connect_timeout : float, s
        How long to wait for the scheduler (and for the local workers to start).

    Raises
    ------
    ClusterUnavailable
        The address is malformed or unreachable, or the cluster's Dask version differs from
        this one.
    """

    local = False

    def __init__(self, workers: int | None = None, scheduler: str | None = None,
                 threads_per_worker: int = 1, retries: int = 2, connect_timeout: float = 10.0):
        import dask
        from distributed import Client, LocalCluster

        if (workers is None) == (scheduler is None):
            raise InputError("parallel: give either a number of local workers or the address "
                             "of a running scheduler")
        self.threads = int(threads_per_worker)
        self.retries = int(retries)
        self._cluster = None
        if scheduler is None:
            # The scheduler lives in this process: how often a piece may take its worker down
            # before it counts as failed is set here.
            with dask.config.set({"distributed.scheduler.allowed-failures": self.retries}):
                self._cluster = LocalCluster(
                    n_workers=int(workers), threads_per_worker=1, processes=True,
                    dashboard_address=None, memory_limit=0, silence_logs=logging.ERROR,
                    env={"OMP_NUM_THREADS": str(self.threads)},
                    # No dashboard; the scheduler's own HTTP endpoint (health, metrics) on a
                    # free local port instead of 8787, which another cluster may hold.
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            self.client = Client(self._cluster, timeout=connect_timeout)
            return
        try:
            self.client = Client(scheduler, timeout=connect_timeout)
        except (OSError, ValueError, TypeError) as exc:
            raise ClusterUnavailable(
                f"parallel.scheduler = {scheduler!r}: cannot connect to a Dask scheduler "
                f"there ({type(exc).__name__}: {exc}); start one (`dask scheduler`, or a "
                f"dask-jobqueue cluster) and give the address it prints, e.g. "
                f"tcp://10.0.0.5:8786, or set parallel.workers for local workers instead"
            ) from None
        try:
            self.client.get_versions(check=True)
        except ValueError as exc:
            self.client.close()
            raise ClusterUnavailable(
                f"parallel.scheduler = {scheduler!r}: the cluster runs other package versions "
                f"than this process ({exc}); install the same versions (requirements.lock) on "
                f"every node") from None

    def map(self, function, items, passthrough=(), done=None):
        from distributed import as_completed

        futures = [self.client.submit(_run_piece, function, self.threads, passthrough, item,
                                      pure=False, retries=self.retries)
                   for item in items]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list[Ran | None] = [None] * len(futures)
        try:
            for future in as_completed(futures):
                i = index[future.key]
                try:
                    ran = future.result()
                except Exception as exc:  # whatever it was, the piece is named
                    raise PieceFailed(i, f"piece {i + 1} of {len(futures)} failed on all "
                                         f"{self.retries + 1} runs allowed "
                                         f"(parallel.retries = {self.retries}): "
                                         f"{type(exc).__name__}: {exc}") from exc
                results[i] = ran
                if done is not None and not isinstance(ran.value, _Raised):
                    done(i, ran)
        finally:
            for future in futures:
                future.cancel()
        for ran in results:
            if isinstance(ran.value, _Raised):
                raise ran.value.error
        return results

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def open_engine(settings) -> Engine:
    """The engine a ``[parallel]`` config section asks for.

    Parameters
    ----------
    settings : ParallelConfig
        ``workers``, ``scheduler``, ``threads_per_worker``, ``retries``, ``connect_timeout``.

    Returns
    -------
    Engine
        :class:`InProcess` when neither ``workers`` nor ``scheduler`` is given, else a
        :class:`DaskEngine` (close it when done).
    """
    if settings.workers is None and settings.scheduler is None:
        return InProcess()
    return DaskEngine(workers=settings.workers, scheduler=settings.scheduler,
                      threads_per_worker=settings.threads_per_worker, retries=settings.retries,
                      connect_timeout=settings.connect_timeout)
