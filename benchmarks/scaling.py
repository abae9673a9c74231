"""Scaling figures (issue 7): extract throughput vs worker count, scheduler placement, task overhead.

1. `run_extract` of the demo data (groups mfcc + Farnebäck flow at 64 px, shards of 24) serially,
   on a LocalCluster with 1 and 2 single-threaded worker processes (parallel efficiency
   T1 / (2 T2)), and on a cluster started as separate processes (`dask scheduler` + 2 ×
   `dask worker` on loopback, as tests/pipelines/test_extract.py does), once with Dask's
   defaults and once with `MALLOC_TRIM_THRESHOLD_` unset through a Dask config file, as
   `pipelines.cluster.local_client` does for its LocalCluster. Workers are warmed (imports)
   on a small extract before each timed run. Busy time is the sum of the extract tasks'
   compute spans from Dask's task stream; what is left of workers × wall time is overhead.
2. Scheduler overhead per task: N no-op tasks submitted at once to a fresh separate-process
   scheduler with 2 workers, at N = 2,000 and at the extract job's task count: wall / N and
   the CPU the scheduler, workers and client spend per task (CPU holds up on a shared
   machine; the scheduler is single-threaded, so 1 / its CPU per task bounds tasks/s), plus
   the round-trip latency of one task submitted and awaited at a time.

Prints a table and writes JSON to --out (default .bench/scaling.json; .bench/ is gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
GROUPS = {
    "audio": {"extractor": "mfcc", "params": {"n_mfcc": 40}},
    "video": {"extractor": "flow", "params": {"size": 64, "max_frames": 16}},
}
# A Dask config file that drops the nanny's MALLOC_TRIM_THRESHOLD_ (only a YAML null unsets it;
# DASK_* environment variables are merged into the default dict and cannot remove the key).
NO_TRIM_YAML = "distributed:\n  nanny:\n    pre-spawn-environ:\n      MALLOC_TRIM_THRESHOLD_: null\n"


def noop(i: int) -> int:
    return i


def demo_manifest(n: int) -> Path:
    """The first ``n`` rows of a demo dataset (generated once under .bench/)."""
    data = ROOT / ".bench" / "scaling-data"
    full = data / "manifest.csv"
    if not full.exists() or sum(1 for _ in full.open()) - 1 < n:
        subprocess.run(
            [str(BIN / "modalstore"), "demo-data", str(data), "--samples", str(max(n, 640)), "--quiet"],
            check=True,
        )
    with full.open() as f:
        rows = list(csv.reader(f))
    out = data / f"manifest-{n}.csv"  # beside the media: paths stay relative
    with out.open("w", newline="") as f:
        csv.writer(f).writerows(rows[: n + 1])
    return out


def extract_config(manifest: Path, store: Path, per_shard: int):
    import yaml

    from pipelines.extract import load_extract_config

    path = store.with_suffix(".yaml")
    body = {"manifest": str(manifest), "store": str(store), "samples_per_shard": per_shard, "groups": GROUPS}
    path.write_text(yaml.safe_dump(body))
    return load_extract_config(path)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed_extract(cfg, client, external: bool = False) -> dict:
    """One extract (store overwritten): wall time, its tasks' compute time, CPU seconds used.

    CPU seconds hold up on a shared machine where wall time does not: ``worker_cpu_s`` is the
    extraction (the serial run's main thread, or every worker process), ``coord_cpu_s`` the
    driver process (which hosts a LocalCluster's scheduler) plus a separate scheduler process.
    """
    from pipelines.extract import run_extract

    if client is None:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        summary = run_extract(cfg, overwrite=True, progress=False)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        return {
            "wall_s": wall,
            "busy_s": wall,
            "worker_cpu_s": cpu,
            "coord_cpu_s": 0.0,
            "tasks": summary.shards,
            "samples": summary.samples,
        }
    from distributed import get_task_stream

    cpu0 = _cpu_s() + (client.run_on_scheduler(_cpu_s) if external else 0.0)
    workers0 = client.run(_cpu_s)
    with get_task_stream(client) as ts:
        t0 = time.perf_counter()
        summary = run_extract(cfg, client=client, overwrite=True, progress=False)
        wall = time.perf_counter() - t0
    workers1 = client.run(_cpu_s)
    coord = _cpu_s() + (client.run_on_scheduler(_cpu_s) if external else 0.0) - cpu0
    busy = sum(
        s["stop"] - s["start"]
        for t in ts.data
        if str(t["key"]).startswith("extract-")
        for s in t["startstops"]
        if s["action"] == "compute"
    )
    return {
        "wall_s": wall,
        "busy_s": busy,
        "worker_cpu_s": sum(workers1[w] - workers0.get(w, 0.0) for w in workers1),
        "coord_cpu_s": coord,
        "tasks": summary.shards,
        "samples": summary.samples,
    }


@contextlib.contextmanager
def external_cluster(n_workers: int, work: Path, trim: bool = True, resources: str | None = None):
    """`dask scheduler` and ``n_workers`` `dask worker` processes on loopback; yields a Client."""
    from distributed import Client

    sched_file = work / f"scheduler-{time.monotonic_ns()}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not trim:
        cfg_dir = work / "dask-config"
        cfg_dir.mkdir(exist_ok=True)
        (cfg_dir / "no-trim.yaml").write_text(NO_TRIM_YAML)
        env["DASK_CONFIG"] = str(cfg_dir)
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard"]
            + ["--scheduler-file", str(sched_file)],
            **quiet,
        )
    ]
    try:
        for _ in range(600):
            if sched_file.exists():
                break
            time.sleep(0.1)
        worker = [str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file), "--nthreads", "1"]
        worker += ["--no-dashboard", "--host", "127.0.0.1"]
        worker += ["--resources", resources] if resources else []
        procs += [subprocess.Popen([*worker, "--name", f"w{i}"], **quiet) for i in range(n_workers)]
        with Client(scheduler_file=str(sched_file)) as client:
            client.wait_for_workers(n_workers, timeout=120)
            yield client
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def task_overhead(client, n: int, repeats: int) -> dict:
    """No-op tasks on a separate-process scheduler: ``n`` submitted at once, per task:
    wall time, scheduler CPU, worker CPU, client CPU; and one at a time (round trip)."""
    from distributed import wait

    client.gather(client.map(noop, range(50), pure=False))  # warm: function pickled, workers up
    runs = []
    for _ in range(repeats):
        s0, w0, c0 = client.run_on_scheduler(_cpu_s), client.run(_cpu_s), _cpu_s()
        t0 = time.perf_counter()
        futs = client.map(noop, range(n), pure=False)
        wait(futs)
        wall = time.perf_counter() - t0
        s1, w1, c1 = client.run_on_scheduler(_cpu_s), client.run(_cpu_s), _cpu_s()
        runs.append(
            {
                "wall_ms": wall / n * 1e3,
                "scheduler_cpu_ms": (s1 - s0) / n * 1e3,
                "worker_cpu_ms": sum(w1[w] - w0[w] for w in w1) / n * 1e3,
                "client_cpu_ms": (c1 - c0) / n * 1e3,
            }
        )
        del futs
    t0 = time.perf_counter()
    k = 100
    for i in range(k):
        client.submit(noop, i, pure=False).result()
    return {"tasks": n, "runs": runs, "round_trip_ms": (time.perf_counter() - t0) / k * 1e3}


def bytes_per_sample(store: Path) -> dict:
    import pyarrow.parquet as pq

    shards = pq.read_table(store / "catalog" / "shards.parquet").to_pylist()
    n = json.loads((store / "store.json").read_text())["manifest"]["rows"]
    by_group: dict[str, int] = {}
    for row in shards:
        by_group[row["group"]] = by_group.get(row["group"], 0) + row["bytes"]
    return {"samples": n, "bytes_per_sample": {g: b / n for g, b in by_group.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=240)
    ap.add_argument("--per-shard", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--noop-tasks", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / ".bench" / "scaling.json"))
    args = ap.parse_args()

    from pipelines.cluster import local_client, shutdown

    (ROOT / ".bench").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scaling-", dir=ROOT / ".bench"))
    manifest = demo_manifest(args.samples)
    warm_manifest = demo_manifest(48)
    cfg = extract_config(manifest, work / "store", args.per_shard)
    warm = extract_config(warm_manifest, work / "warm", args.per_shard)
    overhead: dict[str, dict] = {}

    with contextlib.ExitStack() as stack:
        # every setup up at once, runs interleaved: load drift on the shared machine hits all alike
        setups: list[tuple[str, int, object]] = [("serial (no Dask), 1 process", 1, None)]
        for n in (1, 2):
            client = local_client(n)
            stack.callback(shutdown, client)
            setups.append((f"LocalCluster, {n} worker{'s' if n > 1 else ''}", n, client))
        for trim in (False, True):
            client = stack.enter_context(external_cluster(2, work, trim=trim))
            note = "trim unset" if not trim else "Dask defaults (MALLOC_TRIM_THRESHOLD_=65536)"
            setups.append((f"`dask scheduler` + 2 `dask worker` processes, {note}", 2, client))
        for label, _, client in setups:
            timed_extract(warm, client, "dask" in label)  # imports and extractor setup everywhere
        runs: dict[str, list[dict]] = {label: [] for label, _, _ in setups}
        for rep in range(args.repeats):
            for label, _, client in setups:
                runs[label].append(timed_extract(cfg, client, "dask" in label))
                print(
                    f"  run {rep + 1}, {label}: {runs[label][-1]['wall_s']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
        rows = [{"label": label, "workers": w, "runs": runs[label]} for label, w, _ in setups]
    tasks = rows[0]["runs"][0]["tasks"]
    # on its own: LocalClusters in this process would slow the client's event loop
    with external_cluster(2, work, trim=False) as client:
        for n in (args.noop_tasks, tasks):
            overhead[n] = task_overhead(client, n, args.repeats if n == args.noop_tasks else 5)

    sizes = bytes_per_sample(work / "store")
    shutil.rmtree(work, ignore_errors=True)
    t1 = statistics.median(r["wall_s"] for r in rows[1]["runs"])
    out = [
        "| setup | workers | wall (s): median (runs) | samples/s | task busy (s) | idle (% of workers × wall) "
        "| extraction CPU per sample (ms) | driver + scheduler CPU per sample (ms) |"
    ]
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        w = row["workers"]
        row["cpu_ms_per_sample"] = (
            1e3 * statistics.median(r["worker_cpu_s"] for r in row["runs"]) / args.samples
        )
        row["coord_ms_per_sample"] = (
            1e3 * statistics.median(r["coord_cpu_s"] for r in row["runs"]) / args.samples
        )
        wall = statistics.median(r["wall_s"] for r in row["runs"])
        busy = statistics.median(r["busy_s"] for r in row["runs"])
        row.update(workers=w, wall_median_s=wall, samples_per_s=args.samples / wall)
        row["overhead_pct"] = 100 * (1 - busy / (w * wall))
        if w == 2:
            row["parallel_efficiency"] = t1 / (2 * wall)
        runs = ", ".join(f"{r['wall_s']:.1f}" for r in row["runs"])
        out.append(
            f"| {row['label']} | {w} | {wall:.1f} ({runs}) "
            f"| {row['samples_per_s']:.1f} | {busy:.1f} | {row['overhead_pct']:.0f} % | {row['cpu_ms_per_sample']:.1f} "
            f"| {row['coord_ms_per_sample']:.1f} |"
        )
    out.append("")
    out += [
        f"parallel efficiency T1/(2·T2), {r['label']}: {r['parallel_efficiency']:.2f}"
        for r in rows
        if "parallel_efficiency" in r
    ]
    out.append("")
    out.append(
        "| no-op tasks at once | wall per task (ms) | scheduler CPU per task (ms) | worker CPU per task (ms) "
        "| client CPU per task (ms) | one-at-a-time round trip (ms) |"
    )
    out.append("| --- | --- | --- | --- | --- | --- |")
    for n, o in overhead.items():
        cells = [
            f"{statistics.median(r[k] for r in o['runs']):.2f} ({', '.join(f'{r[k]:.2f}' for r in o['runs'])})"
            for k in ("wall_ms", "scheduler_cpu_ms", "worker_cpu_ms", "client_cpu_ms")
        ]
        out.append(f"| {n} | " + " | ".join(cells) + f" | {o['round_trip_ms']:.1f} |")
    out.append("")
    out.append(
        f"shard bytes per sample: {json.dumps({g: round(b) for g, b in sizes['bytes_per_sample'].items()})}"
    )
    print("\n".join(out))
    result = {
        "samples": args.samples,
        "samples_per_shard": args.per_shard,
        "groups": GROUPS,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "extract": rows,
        "task_overhead": overhead,
        "store": sizes,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
