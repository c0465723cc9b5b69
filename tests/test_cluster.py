"""Where the workers start: one GPU per local worker (with a faked GPU count: this machine has
none), and Slurm or PBS worker jobs through dask-jobqueue (their job scripts, never submitted;
one is run here by hand as a real worker of the cluster's scheduler).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import pytest
from test_train import EPSILON, SIGMA, _config, argon  # noqa: F401 - argon is a fixture

from openmm_reversible import parallel
from openmm_reversible.commands import fit as fit_cli
from openmm_reversible.config import ParallelConfig, check_parallel
from openmm_reversible.errors import InputError
from openmm_reversible.parallel import (
    THREAD_VARIABLES,
    ClusterUnavailable,
    DaskEngine,
    jobqueue_cluster,
    local_workers,
)

THREADS = {name: "2" for name in THREAD_VARIABLES}


def test_each_local_worker_gets_a_gpu_of_its_own_and_auto_starts_one_per_gpu():
    # 4 GPUs, workers = "auto": one worker per GPU, each seeing only its own.
    assert local_workers("auto", 2, gpus=4, cores=16) == [
        {**THREADS, "CUDA_VISIBLE_DEVICES": str(k)} for k in range(4)]
    # This process sees GPUs 2 and 5 only: the workers get those ids.
    assert [w["CUDA_VISIBLE_DEVICES"] for w in local_workers("auto", 2, 2, 16, "2, 5")] == \
        ["2", "5"]
    assert [w["CUDA_VISIBLE_DEVICES"] for w in local_workers(2, 1, 2, 16, "GPU-ab,GPU-cd")] == \
        ["GPU-ab", "GPU-cd"]
    # More workers than GPUs: round robin, so they share.
    assert [w["CUDA_VISIBLE_DEVICES"] for w in local_workers(3, 1, 2, 16)] == ["0", "1", "0"]
    # Fewer: the first GPUs.
    assert [w["CUDA_VISIBLE_DEVICES"] for w in local_workers(1, 1, 4, 16)] == ["0"]
    # No GPU: no device variable, and "auto" fills the cores with threads_per_worker each.
    assert local_workers("auto", 2, gpus=0, cores=16) == [THREADS] * 8
    assert local_workers("auto", 4, gpus=0, cores=2) == [{n: "4" for n in THREAD_VARIABLES}]
    assert local_workers(2, 2, gpus=0, cores=16, visible="") == [THREADS] * 2


def _device() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _environment() -> dict:
    return {name: os.environ.get(name) for name in
            ("OMP_NUM_THREADS", "OPENMM_CPU_THREADS", "MALLOC_TRIM_THRESHOLD_")}


def test_local_workers_start_with_their_own_device(monkeypatch):
    """The engine with 2 faked GPUs: each worker process sees one, and keeps the threads and
    allocator settings of every local worker."""
    monkeypatch.setattr(parallel, "gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with DaskEngine(workers="auto", threads_per_worker=1) as engine:
        devices = engine.client.run(_device)
        assert sorted(devices.values()) == ["0", "1"]
        for report in engine.client.run(_environment).values():
            assert report == {"OMP_NUM_THREADS": "1", "OPENMM_CPU_THREADS": "1",
                              "MALLOC_TRIM_THRESHOLD_": None}


def _jobs(**keys) -> ParallelConfig:
    settings = ParallelConfig(**{"workers": 4, "threads_per_worker": 2, "memory": "8GB",
                                 **keys})
    check_parallel(settings)
    return settings


def _script(settings) -> str:
    cluster = jobqueue_cluster(settings, submit=False)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def test_slurm_job_script_books_the_threads_and_a_gpu_and_sets_the_worker_up():
    pytest.importorskip("dask_jobqueue")
    script = _script(_jobs(cluster="slurm", queue="gpu", account="chem", walltime="04:00:00",
                           job_extra=["--gres=gpu:1"],
                           prologue=["source /shared/venv/bin/activate"]))
    lines = script.splitlines()
    for directive in ("#SBATCH -p gpu", "#SBATCH -A chem", "#SBATCH --cpus-per-task=2",
                      "#SBATCH -t 04:00:00", "#SBATCH --gres=gpu:1", "#SBATCH -n 1"):
        assert directive in lines
    assert any(line.startswith("#SBATCH --mem=") for line in lines)
    assert "export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 " \
           "NUMBA_NUM_THREADS=2 OPENMM_CPU_THREADS=2" in lines
    assert "source /shared/venv/bin/activate" in lines
    worker = lines[-1]
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://")
    assert "--nthreads 1" in worker  # one piece at a time
    # The environment comes before the worker starts.
    assert lines.index("source /shared/venv/bin/activate") < len(lines) - 1


def test_pbs_job_script_books_the_threads_and_memory():
    pytest.importorskip("dask_jobqueue")
    lines = _script(_jobs(cluster="pbs", queue="workq", walltime="01:00:00")).splitlines()
    assert "#PBS -q workq" in lines
    assert "#PBS -l select=1:ncpus=2:mem=7630MB" in lines  # 8 GB in PBS's MB (MiB), rounded up
    assert "#PBS -l walltime=01:00:00" in lines
    assert "--nthreads 1" in lines[-1]


def _worker_report() -> dict:
    import openmm

    import openmm_reversible

    return {"threads": openmm.Platform.getPlatformByName("CPU").getPropertyDefaultValue(
        "Threads"), "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "omp": os.environ.get("OMP_NUM_THREADS"), "package": openmm_reversible.__file__}


def test_a_slurm_job_script_run_by_hand_gives_a_worker_that_runs_pieces(tmp_path):
    """The job's shell lines are right: its worker joins the cluster, passes the version
    check, runs pieces with the threads asked for, and Dask's nanny left the allocator
    alone (what sbatch would run, started here with bash)."""
    pytest.importorskip("dask_jobqueue")
    settings = _jobs(cluster="slurm", workers=1, threads_per_worker=2)
    cluster = jobqueue_cluster(settings, submit=False)
    script = tmp_path / "job.sh"
    script.write_text(cluster.job_script())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    job = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with DaskEngine(cluster=cluster, threads_per_worker=2, connect_timeout=30) as engine:
            engine.client.wait_for_workers(1, timeout=120)
            (report,) = engine.client.run(_worker_report).values()
            assert report["threads"] == "2" and report["omp"] == "2"
            assert report["trim"] is None
            import openmm_reversible

            assert report["package"] == openmm_reversible.__file__
            ran = engine.map(abs, [-1, -2, 3])
            assert [r.value for r in ran] == [1, 2, 3]
            assert all(r.where.startswith("tcp://") for r in ran)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)


@pytest.mark.parametrize("keys, error", [
    ({"queue": "gpu"}, r"^parallel\.queue: only for worker jobs; set parallel\.cluster = "
                       r"'slurm' or 'pbs', or remove it$"),
    ({"cluster": "slurm", "memory": "8GB"},
     r"^parallel\.cluster = 'slurm': give parallel\.workers, the number of worker jobs to "
     r"submit, e\.g\. workers = 8$"),
    ({"cluster": "slurm", "workers": "auto", "memory": "8GB"},
     r"^parallel\.cluster = 'slurm': give parallel\.workers, the number of worker jobs"),
    ({"cluster": "pbs", "workers": 2},
     r"^parallel\.cluster = 'pbs': give parallel\.memory, the memory of each worker job, "
     r"e\.g\. memory = '8GB'$"),
    ({"cluster": "slurm", "workers": 2, "memory": "8GB", "scheduler": "tcp://h:8786"},
     r"^parallel: give either 'workers'"),
    ({"cluster": "slurm", "memory": "8GB", "scheduler": "tcp://h:8786"},
     r"^parallel\.cluster = 'slurm': starts its own scheduler; remove parallel\.scheduler"),
])
def test_worker_job_settings_are_checked_as_a_whole(keys, error):
    with pytest.raises(InputError, match=error):
        check_parallel(ParallelConfig(**keys))


def test_config_and_command_line_ask_for_worker_jobs(argon, monkeypatch):  # noqa: F811
    from openmm_reversible.config import load_config

    _config(argon, "jobs", SIGMA, EPSILON)
    toml = argon[0] / "jobs.toml"
    toml.write_text(toml.read_text() + '\n[parallel]\ncluster = "slurm"\nworkers = 8\n'
                    'memory = "8GB"\njob_extra = ["--gres=gpu:1"]\nthreads_per_worker = 4\n')
    config = load_config(toml)
    assert (config.parallel.cluster, config.parallel.workers, config.parallel.job_extra,
            config.parallel.threads_per_worker) == ("slurm", 8, ["--gres=gpu:1"], 4)

    seen = {}

    class _Stop(Exception):
        pass

    def trainer(config, output, **_):
        seen["parallel"] = config.parallel
        raise _Stop

    monkeypatch.setattr("openmm_reversible.train.Trainer", trainer)
    parser = argparse.ArgumentParser()
    fit_cli.add_arguments(parser)
    for argv, expected in [
            (["--workers", "16"], {"cluster": "slurm", "workers": 16, "memory": "8GB"}),
            (["--scheduler", "tcp://h:8786"], {"cluster": "local", "workers": None,
                                               "memory": None, "job_extra": []})]:
        with pytest.raises(_Stop):
            fit_cli.run(parser.parse_args([str(toml), *argv]))
        for key, value in expected.items():
            assert getattr(seen["parallel"], key) == value
    with pytest.raises(InputError, match=r"^parallel\.cluster = 'slurm': give parallel\."
                                         r"workers, the number of worker jobs"):
        fit_cli.run(parser.parse_args([str(toml), "--workers", "auto"]))
    with pytest.raises(InputError, match=r"^--workers two: give a number of workers or "
                                         r"'auto'$"):
        fit_cli.run(parser.parse_args([str(toml), "--workers", "two"]))


def test_worker_jobs_without_dask_jobqueue_are_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ClusterUnavailable, match=r"^parallel\.cluster = 'slurm' needs "
                                                 r"dask-jobqueue; install the pinned packages"):
        jobqueue_cluster(_jobs(cluster="slurm"), submit=False)
