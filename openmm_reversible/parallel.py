"""Where the independent pieces of an epoch run: in this process, or on Dask workers.

An epoch's gradient is a sum over pieces that are independent once their inputs are fixed (the
reversible windows, given their start states, the parameter values and their seeds). An
:class:`Engine` maps a picklable function over such pieces and hands the results back *in the
order of the pieces*, whatever order they finished in, so that the caller's reduction (a sum
in window order) is the same with any number of workers: the results are identical bit for bit
to a single-process run.

- :class:`InProcess` runs the pieces one after another here (the default);
- :class:`DaskEngine` runs them on a Dask ``distributed`` cluster: ``workers`` local worker
  processes (a ``LocalCluster``), worker jobs it submits to Slurm or PBS (``dask-jobqueue``,
  :func:`jobqueue_cluster`), or a running scheduler given by its address (a cluster started
  by hand). Each worker runs one piece at a time with ``threads_per_worker`` torch threads,
  so N workers × threads stay within the cores.

GPUs: where this process sees CUDA GPUs, each local worker gets one of them as its only
visible device (``CUDA_VISIBLE_DEVICES``, :func:`local_workers`), round robin, and
``workers = "auto"`` starts one worker per GPU. OpenMM's CUDA platform (``platform = "auto"``
or ``"CUDA"``) then runs a worker's sampling on its own GPU (device index 0 of the one it
sees). The reversible windows run in float64 torch on the CPU, which a GPU does not change.

Faults: a worker that dies while running a piece (killed, out of memory) has the piece re-run on
another worker, and an unexpected exception in a piece is retried, ``retries`` times each; a
piece that fails every time raises :class:`PieceFailed` naming it. Exceptions the caller lists
as ``passthrough`` (deterministic failures the caller handles itself, which another run would
only repeat) are not retried and reach the caller with their own type, the first in piece order.

Versions: the pieces of a worker that runs other versions of openmm-reversible, torch or
OpenMM, or other openmm-reversible source code, than this process would not give this
process's numbers. The engine compares every worker's :func:`environment` with its own when it
connects, and again on the worker before each piece (a worker may join later); a worker that
differs is refused with :class:`WorkerMismatch` before it runs any piece.

Every result says where it ran (the worker's address, or ``"in-process"``) and how long the
piece's function took (s); the rest of a piece's wall time is the engine's overhead
(serialisation, transfer, scheduling).

Progress: a map tells its caller when each piece starts on a worker (``started``) and when it
finishes (``done``); :class:`PieceProgress` turns both into one bar for an epoch, whose status
says what each worker runs now and how many pieces it has finished (:func:`describe_progress`).
On Dask the start of a piece reaches the coordinator as an event the worker logs to the
scheduler, under a topic of the engine's own.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import InputError

IN_PROCESS = "in-process"
"""The ``where`` of a piece run by :class:`InProcess`."""
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "OPENMM_CPU_THREADS")
"""Environment variables set to ``threads_per_worker`` in local workers: the math libraries'
and the fused kernels' (numba) threads, and the default thread count of OpenMM's CPU platform
(a replica's sampling)."""


SCHEDULER_HTTP = "127.0.0.1:0"
"""Where a scheduler this process starts serves its HTTP endpoint (health, metrics): a free
local port instead of 8787, which another cluster may hold; no dashboard."""


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


class WorkerMismatch(ClusterUnavailable):
    """A worker runs other versions of openmm-reversible, torch or OpenMM, or other
    openmm-reversible source code, than this process."""


@functools.cache
def code_hash() -> str:
    """The first 12 hex digits of the SHA-256 of openmm-reversible's Python sources (each
    file's path relative to the package, then its bytes, in path order): tells apart two
    checkouts of one version with different edits. Computed once per process."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict[str, str]:
    """What a worker must share with the coordinator for its pieces to give the same numbers.

    Returns
    -------
    dict of str to str
        ``openmm-reversible``, ``torch`` and ``openmm`` versions, and ``openmm-reversible
        source`` (:func:`code_hash`).
    """
    import openmm

    from . import __version__

    return {"openmm-reversible": __version__, "torch": str(torch.__version__),
            "openmm": openmm.__version__, "openmm-reversible source": code_hash()}


def mismatch(where: str, theirs: dict[str, str], ours: dict[str, str]) -> str | None:
    """The error text for a worker whose :func:`environment` differs from this process's, or
    None when they agree."""
    differ = [key for key in ours if theirs.get(key) != ours[key]]
    if not differ:
        return None
    return (f"worker {where} runs {', '.join(f'{k} {theirs.get(k)}' for k in differ)} but "
            f"this process runs {', '.join(f'{k} {ours[k]}' for k in differ)}, so its pieces "
            f"would not give this process's numbers; install the same versions on every node "
            f"(pip install -r requirements.lock, and openmm-reversible from the same commit: "
            f"pip install -e .) and restart that worker")


def gpu_count() -> int:
    """CUDA GPUs this process sees (those of ``CUDA_VISIBLE_DEVICES``); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_workers(workers: int | str, threads: int, gpus: int, cores: int,
                  visible: str | None = None) -> list[dict[str, str]]:
    """The environment of each local worker process: its threads and, with GPUs, its GPU.

    Parameters
    ----------
    workers : int or "auto"
        How many workers; ``"auto"``: one per GPU, or without GPUs one per ``threads`` cores.
    threads : int
        Threads of each worker (:data:`THREAD_VARIABLES`).
    gpus : int
        CUDA GPUs this process sees (:func:`gpu_count`).
    cores : int
        CPU cores of the machine.
    visible : str, optional
        This process's ``CUDA_VISIBLE_DEVICES`` (its GPUs' ids, comma-separated); None or empty
        when unset, the GPUs are then 0, 1, ...

    Returns
    -------
    list of dict of str to str
        Per worker, the variables to set. With GPUs, worker k sees GPU k mod ``gpus`` of this
        process's only (``CUDA_VISIBLE_DEVICES``), so that each gets its own while there are
        as many GPUs as workers.
    """
    ids = [i.strip() for i in visible.split(",")] if visible else [str(i) for i in range(gpus)]
    ids = ids[:gpus]
    count = (len(ids) or max(1, cores // threads)) if workers == "auto" else int(workers)
    env = {name: str(threads) for name in THREAD_VARIABLES}
    return [{**env, **({"CUDA_VISIBLE_DEVICES": ids[k % len(ids)]} if ids else {})}
            for k in range(count)]


def _job_environment(threads: int) -> list[str]:
    """Shell lines of a worker job that set its threads as :func:`local_workers` does (the
    nanny keeps variables set in its environment), and keep Dask's nanny from setting
    ``MALLOC_TRIM_THRESHOLD_`` (see :class:`DaskEngine`)."""
    spawn = {"MALLOC_TRIM_THRESHOLD_": None}
    return [f"export {' '.join(f'{name}={threads}' for name in THREAD_VARIABLES)}",
            f'export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{spawn!r}"']


def jobqueue_cluster(settings, submit: bool = True):
    """A dask-jobqueue cluster of ``settings.workers`` batch jobs, one worker each.

    The scheduler runs in this process; each job runs one worker that runs one piece at a time
    and books ``threads_per_worker`` CPUs for its torch threads, with the thread variables
    set as for local workers and the interpreter of this process (``sys.executable``: the
    nodes must see it at the same path).

    Parameters
    ----------
    settings : ParallelConfig
        ``cluster`` (``"slurm"`` or ``"pbs"``), ``workers``, ``threads_per_worker``,
        ``queue``, ``account``, ``memory``, ``walltime``, ``job_extra`` (extra directives,
        e.g. ``--gres=gpu:1``) and ``prologue`` (shell lines before the worker starts).
    submit : bool
        Submit the jobs (``scale``); False only builds the cluster, e.g. to read its
        ``job_script()``.

    Returns
    -------
    dask_jobqueue.JobQueueCluster
        Close it when done (this cancels its jobs).

    Raises
    ------
    ClusterUnavailable
        dask-jobqueue is not installed.
    """
    try:
        import dask
        import dask_jobqueue
    except ImportError:
        raise ClusterUnavailable(
            f"parallel.cluster = {settings.cluster!r} needs dask-jobqueue; install the pinned "
            f"packages (pip install -r requirements.lock) or set parallel.cluster = 'local'"
        ) from None
    threads = settings.threads_per_worker
    options = {"queue": settings.queue, "account": settings.account, "cores": 1,
               "processes": 1, "memory": settings.memory, "walltime": settings.walltime,
               "job_extra_directives": list(settings.job_extra),
               "job_script_prologue": _job_environment(threads) + list(settings.prologue),
               "python": sys.executable, "scheduler_options": {
                   "dashboard_address": SCHEDULER_HTTP}}
    if settings.cluster == "slurm":
        cls = dask_jobqueue.SLURMCluster
        options["job_cpu"] = threads
    else:
        from dask.utils import parse_bytes
        from dask_jobqueue.pbs import pbs_format_bytes_ceil

        cls = dask_jobqueue.PBSCluster
        options["resource_spec"] = (f"select=1:ncpus={threads}:"
                                    f"mem={pbs_format_bytes_ceil(parse_bytes(settings.memory))}")
    with dask.config.set({"distributed.scheduler.allowed-failures": settings.retries}):
        cluster = cls(**options)
    if submit:
        cluster.scale(jobs=int(settings.workers))
    return cluster


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


def by_worker(ran: Mapping[int, Ran]) -> dict[str, dict]:
    """What each worker did: its pieces and the time they took.

    Parameters
    ----------
    ran : mapping of int to Ran
        Finished pieces by their 0-based index (all of a map, or those finished so far).

    Returns
    -------
    dict of str to dict
        Per worker address (``"in-process"`` here), in the order of their first piece:
        ``pieces``, the 1-based piece numbers in order, and ``seconds`` (s), their total time
        in the function.
    """
    summary: dict[str, dict] = {}
    for index in sorted(ran):
        entry = summary.setdefault(ran[index].where, {"pieces": [], "seconds": 0.0})
        entry["pieces"].append(index + 1)
        entry["seconds"] += ran[index].seconds
    return summary


def describe_progress(running: Mapping[str, str], finished: Iterable[Ran]) -> str:
    """What each worker runs now and how much it has finished, for a progress bar:
    ``127.0.0.1:40123: window 4, 2 done (3.5 s); 127.0.0.1:40777: idle, 1 done (0.3 s)``.

    Parameters
    ----------
    running : mapping of str to str
        Worker address to the label of the piece it runs now.
    finished : iterable of Ran
        The pieces finished so far.

    Returns
    -------
    str
        One entry per worker, in address order: what it runs (``idle`` when nothing), the
        number of pieces it finished and their total time in the function (s).
    """
    done: dict[str, list[float]] = {}
    for ran in finished:
        done.setdefault(ran.where, []).append(ran.seconds)
    parts = []
    for where in sorted(set(running) | set(done)):
        times = done.get(where, [])
        parts.append(f"{where.removeprefix('tcp://')}: {running.get(where, 'idle')}, "
                     f"{len(times)} done" + (f" ({sum(times):.1f} s)" if times else ""))
    return "; ".join(parts)


class PieceProgress:
    """One progress bar over the pieces of several maps (an epoch's replicas, then its
    windows), with what each worker runs now (:func:`describe_progress`) as its status.

    Parameters
    ----------
    description : str
        The bar's label, e.g. ``"epoch 3"``.
    total : int
        The pieces of all the maps the bar will follow.
    enabled : bool
        Whether to show the bar (the status is kept either way).
    """

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.bar = tqdm(total=total, desc=description, unit="piece", leave=False,
                        disable=not enabled or None)
        self.running: dict[str, str] = {}
        self.finished: list[Ran] = []
        # started() may come from the Dask client's thread, done() from the caller's.
        self._lock = threading.Lock()

    def phase(self, labels: Sequence[str]) -> tuple[Callable[[int, str], None],
                                                     Callable[[int, Ran], None]]:
        """The ``started`` and ``done`` callbacks of one :meth:`Engine.map` whose items are
        named ``labels`` (short: ``"window 3"``), in item order."""
        over: set[int] = set()

        def forget(index: int) -> None:
            """The piece no longer runs where it ran before (also on a worker that died)."""
            for where in [w for w, label in self.running.items() if label == labels[index]]:
                del self.running[where]

        def started(index: int, where: str) -> None:
            with self._lock:
                if index not in over:  # a late start event of a finished piece is dropped
                    forget(index)
                    self.running[where] = labels[index]
                    self.bar.set_postfix_str(self.status(), refresh=True)

        def done(index: int, ran: Ran) -> None:
            with self._lock:
                over.add(index)
                forget(index)
                self.finished.append(ran)
                self.bar.update(1)
                self.bar.set_postfix_str(self.status(), refresh=True)

        return started, done

    def status(self) -> str:
        """The bar's status now (:func:`describe_progress`)."""
        return describe_progress(self.running, self.finished)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> PieceProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _Raised:
    """A passthrough exception, carried back as a value so that the engine does not retry it."""

    error: BaseException


def _run_piece(function: Callable, threads: int | None, passthrough: tuple,
               expected: dict | None, item, announce: tuple[str, dict] | None = None) -> Ran:
    """Run ``function(item)``: on a Dask worker with ``threads`` torch threads, or here when
    ``threads`` is None. On a worker whose :func:`environment` differs from ``expected`` the
    piece is not run: a :class:`WorkerMismatch` comes back instead. ``announce``, on a
    worker, is ``(topic, message)`` of the event logged as the piece starts (the worker's
    address is added to the message as ``where``). Module-level so that it pickles."""
    where = IN_PROCESS
    if threads is not None:
        from distributed import get_worker

        worker = get_worker()
        where = worker.address
        problem = mismatch(where, environment(), expected)
        if problem is not None:
            return Ran(_Raised(WorkerMismatch(problem)), where, 0.0)
        torch.set_num_threads(threads)
        _set_numba_threads(threads)
        if announce is not None:
            worker.log_event(announce[0], {**announce[1], "where": where})
    start = time.perf_counter()
    try:
        value = function(item)
    except passthrough as exc:
        value = _Raised(exc)
    return Ran(value, where, time.perf_counter() - start)


def _set_numba_threads(threads: int) -> None:
    """The fused kernels' threads on a worker (also one started by hand, whose environment
    the engine does not set): at most ``threads``, so that workers sharing a node do not
    oversubscribe its cores."""
    if importlib.util.find_spec("numba") is None:
        return
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


class Engine:
    """Maps a function over pieces; subclasses say where the pieces run."""

    local = True
    """Whether the pieces run in this process (and may use its objects as they are)."""

    def map(self, function: Callable, items: Sequence, passthrough: tuple = (),
            done: Callable[[int, Ran], None] | None = None,
            started: Callable[[int, str], None] | None = None) -> list[Ran]:
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
        started : callable, optional
            Called as ``started(index, where)`` when a piece starts on a worker (``where``: its
            address), possibly from another thread; a piece re-run elsewhere starts again.

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

    def map(self, function, items, passthrough=(), done=None, started=None):
        results = []
        for index, item in enumerate(items):
            if started is not None:
                started(index, IN_PROCESS)
            ran = _run_piece(function, None, passthrough, None, item)
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
    workers : int or "auto", optional
        Start a ``LocalCluster`` of this many worker processes (one piece at a time each),
        each with a GPU of its own where there are GPUs (:func:`local_workers`).
    scheduler : str, optional
        Or connect to a running scheduler at this address (``tcp://host:8786``).
    cluster : dask_jobqueue.JobQueueCluster, optional
        Or use this cluster (:func:`jobqueue_cluster`); the engine closes it.
    threads_per_worker : int
        torch threads in each worker while it runs a piece.
    retries : int
        Extra runs of a piece whose worker died or that raised an unexpected exception.
    connect_timeout : float, s
        How long to wait for the scheduler (and for each local worker to start).

    Raises
    ------
    ClusterUnavailable
        The address is malformed or unreachable, or the cluster's Dask version differs from
        this one.
    WorkerMismatch
        A worker runs other versions of openmm-reversible, torch or OpenMM, or other
        openmm-reversible source code (:func:`environment`).
    """

    local = False

    def __init__(self, workers: int | str | None = None, scheduler: str | None = None,
                 threads_per_worker: int = 1, retries: int = 2, connect_timeout: float = 10.0,
                 cluster=None):
        import dask
        from distributed import Client, LocalCluster

        if sum(x is not None for x in (workers, scheduler, cluster)) != 1:
            raise InputError("parallel: give either a number of local workers, the address "
                             "of a running scheduler or a cluster")
        self.threads = int(threads_per_worker)
        self.retries = int(retries)
        self.environment = environment()
        self._cluster = None
        self._topic = f"openmm-reversible-started-{uuid.uuid4().hex}"
        """The topic of this engine's piece-start events (:meth:`map`'s ``started``)."""
        if cluster is not None:  # its scheduler lives in this process; its jobs join later
            self._cluster = cluster
            self.client = Client(cluster, timeout=connect_timeout)
            self._check_workers()
            return
        if scheduler is None:
            # The scheduler lives in this process: how often a piece may take its worker down
            # before it counts as failed is set here. Dask starts its workers with
            # MALLOC_TRIM_THRESHOLD_ set, which turns off glibc's adaptive mmap threshold: every
            # tensor over 128 KiB is then mapped and unmapped, and torch ran 1.4 to 1.8 times
            # slower in a worker than in a plain process (measured); it is left unset.
            # Each worker has an environment of its own (its GPU), so the cluster starts
            # without workers and is then given one spec per worker; they start while the
            # settings above hold.
            layout = local_workers(workers, self.threads, gpu_count(), os.cpu_count() or 1,
                                   os.environ.get("CUDA_VISIBLE_DEVICES"))
            with dask.config.set({
                    "distributed.scheduler.allowed-failures": self.retries,
                    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
                self._cluster = LocalCluster(
                    n_workers=0, threads_per_worker=1, processes=True,
                    dashboard_address=None, memory_limit=0, silence_logs=logging.ERROR,
                    scheduler_kwargs={"dashboard_address": SCHEDULER_HTTP})
                spec = self._cluster.new_spec
                for k, env in enumerate(layout):
                    self._cluster.worker_spec[k] = {
                        "cls": spec["cls"], "options": {**spec["options"], "env": env}}
                self._cluster.scale(len(layout))
                self.client = Client(self._cluster, timeout=connect_timeout)
                try:
                    self.client.wait_for_workers(len(layout),
                                                 timeout=connect_timeout * len(layout))
                except TimeoutError as exc:
                    self.close()
                    raise ClusterUnavailable(
                        f"parallel.workers = {workers!r}: the local workers did not all start "
                        f"within {connect_timeout:g} s each ({exc}); raise "
                        f"parallel.connect_timeout on a busy machine, or start fewer "
                        f"workers") from None
            self._check_workers()
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
        self._check_workers()

    def _check_workers(self) -> None:
        """Refuse the cluster if a worker already connected differs from this process
        (workers that join later are checked before each piece)."""
        reports = self.client.run(environment, on_error="return")
        for where, theirs in sorted(reports.items()):
            if isinstance(theirs, BaseException):
                problem = (f"worker {where} cannot report its versions "
                           f"({type(theirs).__name__}: {theirs}); install openmm-reversible "
                           f"there as here (pip install -r requirements.lock, then pip "
                           f"install -e . from the same commit) and restart that worker")
            else:
                problem = mismatch(where, theirs, self.environment)
            if problem is not None:
                self.close()
                raise WorkerMismatch(problem)

    def map(self, function, items, passthrough=(), done=None, started=None):
        token = uuid.uuid4().hex  # tells this map's start events from a previous map's
        if started is not None:
            def on_event(event) -> None:
                message = event[1]
                if message.get("map") == token:
                    started(message["index"], message["where"])

            self.client.subscribe_topic(self._topic, on_event)
        futures = [self.client.submit(_run_piece, function, self.threads, passthrough,
                                      self.environment, item,
                                      None if started is None
                                      else (self._topic, {"map": token, "index": i}),
                                      pure=False, retries=self.retries)
                   for i, item in enumerate(items)]
        results: list[Ran | None] = [None] * len(futures)
        try:
            for i, outcome in self._outcomes(futures):
                if isinstance(outcome, BaseException):  # whatever it was, the piece is named
                    raise PieceFailed(i, f"piece {i + 1} of {len(futures)} failed on all "
                                         f"{self.retries + 1} runs allowed "
                                         f"(parallel.retries = {self.retries}): "
                                         f"{type(outcome).__name__}: {outcome}") from outcome
                ran = outcome
                if isinstance(ran.value, _Raised) and isinstance(ran.value.error,
                                                                 WorkerMismatch):
                    raise ran.value.error
                results[i] = ran
                if done is not None and not isinstance(ran.value, _Raised):
                    done(i, ran)
        finally:
            for future in futures:
                future.cancel()
            if started is not None:
                self.client.unsubscribe_topic(self._topic)
        for ran in results:
            if isinstance(ran.value, _Raised):
                raise ran.value.error
        return results

    POLL_S = 5.0
    """How long to wait for the next finished piece before asking the scheduler directly."""

    def _outcomes(self, futures):
        """``(index, Ran or exception)`` for each future as it finishes, in completion order.

        Dask's client is told of finished tasks by messages from the scheduler, and a lost
        message leaves a future pending forever although its task is done (all keys in
        memory, futures not done: dask/distributed#6285). So the wait is in slices of
        :attr:`POLL_S`; after a slice in which no future finished, the scheduler is asked for
        the state of the pending keys, and results it holds are fetched from it directly.
        """
        import asyncio

        from distributed import wait

        pending = dict(enumerate(futures))
        while pending:
            finished = [i for i, f in pending.items() if f.done()]
            if not finished:
                try:
                    wait(list(pending.values()), timeout=self.POLL_S,
                         return_when="FIRST_COMPLETED")
                    continue
                except (TimeoutError, asyncio.TimeoutError):  # distinct before Python 3.11
                    pass
                finished = [i for i, f in pending.items() if f.done()]
            if finished:
                for i in finished:
                    future = pending.pop(i)
                    try:
                        yield i, future.result()
                    except Exception as exc:
                        yield i, exc
                continue
            keys = {pending[i].key: i for i in pending}
            states = self.client.run_on_scheduler(_task_states, keys=list(keys))
            stored = [key for key, (state, _) in states.items() if state == "memory"]
            if stored:
                response = self.client.sync(self.client.scheduler.gather, keys=stored)
                if response.get("status") == "OK":
                    for key in stored:
                        del pending[keys[key]]
                        yield keys[key], response["data"][key]
            for key, (state, text) in states.items():
                if state == "erred" and keys[key] in pending:
                    del pending[keys[key]]
                    yield keys[key], RuntimeError(text)

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


def _task_states(keys: list, dask_scheduler=None) -> dict:
    """On the scheduler: ``key -> (state, exception text)`` of each key ("forgotten" when
    the scheduler no longer knows it)."""
    out = {}
    for key in keys:
        task = dask_scheduler.tasks.get(key)
        out[key] = (("forgotten", "") if task is None
                    else (task.state, str(getattr(task, "exception_text", "") or "")))
    return out


def open_engine(settings) -> Engine:
    """The engine a ``[parallel]`` config section asks for.

    Parameters
    ----------
    settings : ParallelConfig
        ``workers``, ``scheduler``, ``threads_per_worker``, ``retries``, ``connect_timeout``,
        and ``cluster`` with its job keys (:func:`jobqueue_cluster`).

    Returns
    -------
    Engine
        :class:`InProcess` when neither ``workers`` nor ``scheduler`` is given, else a
        :class:`DaskEngine` (close it when done) on local workers, on worker jobs it
        submits (``cluster`` = slurm or pbs) or on the scheduler's cluster.
    """
    if settings.workers is None and settings.scheduler is None:
        return InProcess()
    common = {"threads_per_worker": settings.threads_per_worker, "retries": settings.retries,
              "connect_timeout": settings.connect_timeout}
    if settings.cluster != "local":
        return DaskEngine(cluster=jobqueue_cluster(settings), **common)
    return DaskEngine(workers=settings.workers, scheduler=settings.scheduler, **common)
