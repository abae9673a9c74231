"""A real Dask cluster for tests: the `dask scheduler` and `dask worker` commands on loopback."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time


@contextlib.contextmanager
def dask_cluster(tmp_path, workers: dict[str, list[str]], env: dict | None = None):
    """Start a scheduler and one `dask worker` per entry of ``workers`` (name -> extra args).

    Yields the scheduler address once every worker has joined; every process is stopped on exit.
    """
    from distributed import Client

    bindir = os.path.dirname(sys.executable)
    sched_file = tmp_path / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    log = open(tmp_path / "dask.log", "ab")  # noqa: SIM115 - closed with the processes
    quiet = {"env": env, "stdout": log, "stderr": log}
    scheduler = [f"{bindir}/dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
    procs = [subprocess.Popen([*scheduler, "--scheduler-file", str(sched_file)], **quiet)]
    try:
        for _ in range(300):
            if sched_file.exists():
                break
            time.sleep(0.1)
        common = [f"{bindir}/dask", "worker", "--scheduler-file", str(sched_file), "--nthreads", "1"]
        common += ["--no-dashboard", "--host", "127.0.0.1"]
        for name, extra in workers.items():
            procs.append(subprocess.Popen([*common, "--name", name, *extra], **quiet))
        with Client(scheduler_file=str(sched_file)) as client:
            client.wait_for_workers(len(workers), timeout=120)
            address = client.scheduler.address
        yield address
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
