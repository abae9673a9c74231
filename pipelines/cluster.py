"""Dask clients for extraction: a LocalCluster by default, or an existing scheduler.

Parallelism is injected: ``run_extract`` takes an optional client and runs serially
without one. This module only builds clients.
"""

from __future__ import annotations

import os

import dask

# Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker, which costs librosa
# ~25-50 % more CPU (measured in FIELD_NOTES.md). Keep the thread pins, drop the trim.
WORKER_ENV = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


# Shard tasks run for seconds, so Dask's sub-second housekeeping is pure overhead here. On
# an idle 2-worker LocalCluster (2 vCPUs) the defaults cost 2.4-3.4 % of a core in each worker
# and 3.5-5.4 % in the driver (scheduler + client); with these, 0.3 % and 0.8 % (BENCHMARKS.md).
QUIET = {
    "distributed.worker.profile.enabled": False,  # the statistical profiler samples every 10 ms
    "distributed.admin.tick.interval": "1s",  # every event loop's blocked-loop check (20 ms)
    "distributed.admin.system-monitor.interval": "2s",  # dashboard metrics (500 ms)
    "distributed.worker.memory.monitor-interval": "500ms",  # the memory limit's check (100 ms)
}


# The driver's message log: every Dask comm keeps its last ``low-level-log-length`` (1,000)
# messages under 1 MB for debugging (``BatchedSend.recent_message_log``), and a shard task's
# message carries its shard's rows: 8.6 MB held at 100k samples (100 shards), every task's
# message up to 1,000 (BENCHMARKS.md, "Driver memory"). The client (and a LocalCluster's
# scheduler, which runs in the driver) keep none.
DRIVER = {"distributed.admin.low-level-log-length": 0}


def worker_config() -> dict:
    return {"distributed.nanny.pre-spawn-environ": dict(WORKER_ENV), **QUIET}


def local_client(n_workers: int | None = None, memory_limit: str = "auto"):
    """A ``distributed.Client`` on a LocalCluster: one single-threaded process per core."""
    from distributed import Client, LocalCluster

    n_workers = n_workers or os.cpu_count() or 1
    with dask.config.set({**worker_config(), **DRIVER}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=None,
        )
        return Client(cluster)


def connect(scheduler: str):
    """A client on an existing cluster (``tcp://HOST:PORT``)."""
    from distributed import Client

    with dask.config.set(DRIVER):
        return Client(scheduler)


def shutdown(client) -> None:
    """Close ``client`` and the LocalCluster it started, if any (an external cluster stays up)."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()
