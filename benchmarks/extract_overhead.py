"""The Dask pipeline's overhead over a bare loop, per core, on the demo config (issue 3).

The demo's four groups (cnn resnet18 at 64 px, mfcc, Farnebäck flow at 64 px, MiniLM sentence
embeddings) over the first N demo samples, in shards of C, three ways, alternating in rounds so
that the machine's load hits them alike:

- **bare loop, 1 process**: the same extractors with the same batching in one process pinned to
  one thread (torch, OpenCV, BLAS), decoding included, nothing written;
- **bare loop, one process per core at once**: the samples split in halves (on 2 cores), each
  half in its own process, started together at a barrier: what the hardware gives per core when
  every core is busy (two processes share caches and memory bandwidth);
- **`modalstore extract`** on a Dask LocalCluster with one single-threaded worker per core, end to
  end: planning, decoding, extracting, writing shards and their records, statistics, catalog.

Every process is warmed the same way before timing (models loaded, one sample run through each
extractor). Reported per core: wall-clock throughput against the single bare loop times the
cores (strict: a lone process also has the whole memory system to itself), wall-clock against
the concurrent bare loops (the same hardware load), and CPU seconds per sample of every process
of the run (driver + workers) against the bare loop's: the pipeline's extra work, which the
machine's noise barely moves.

Prints a markdown table and writes it to .bench/extract_overhead.md.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import run as base  # noqa: E402  (the demo groups, the bare loop and the worker warm-up)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bare(exs: list, samples, chunk: int) -> tuple[float, float]:
    """(wall s, CPU s) of the bare loop over ``samples`` in this process."""
    c0 = _cpu()
    seconds = base.demo_loop(exs, samples, chunk)
    return seconds, _cpu() - c0


def _bare_child(samples, groups: dict, chunk: int, barrier, out) -> None:
    exs = base.demo_extractors(groups, samples[0])  # imports, models, warm-up: before the barrier
    barrier.wait()
    out.put(_bare(exs, samples, chunk))


def bare_concurrent(samples, groups: dict, chunk: int, procs: int) -> tuple[float, float]:
    """(wall s, CPU s): ``procs`` bare loops over disjoint parts of ``samples``, started together."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    size = -(-len(samples) // procs)
    parts = [samples[i : i + size] for i in range(0, len(samples), size)]
    children = [ctx.Process(target=_bare_child, args=(p, groups, chunk, barrier, out)) for p in parts]
    for c in children:
        c.start()
    results = [out.get() for _ in children]
    for c in children:
        c.join()
    return max(r[0] for r in results), sum(r[1] for r in results)


def pipeline(manifest: Path, groups: dict, chunk: int, workers: int, warm_media: dict) -> tuple[float, float]:
    """(wall s, CPU s of the driver and every worker) of ``modalstore extract`` on a LocalCluster."""
    import yaml

    from pipelines.cluster import local_client, shutdown
    from pipelines.extract import load_extract_config, run_extract

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "manifest": str(manifest),
                    "store": f"{tmp}/store",
                    "samples_per_shard": chunk,
                    "groups": groups,
                }
            )
        )
        config = load_extract_config(cfg)
        client = local_client(workers)
        try:
            client.run(base._warm_demo_worker, groups, warm_media)
            w0, c0 = client.run(_cpu), _cpu()
            t0 = time.perf_counter()
            run_extract(config, client=client, progress=False)
            seconds = time.perf_counter() - t0
            c1, w1 = _cpu(), client.run(_cpu)
        finally:
            shutdown(client)
    return seconds, (c1 - c0) + sum(w1[k] - w0[k] for k in w0)


def _write_manifest(samples, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "split", "image", "audio", "video", "text"])
        for s in samples:
            w.writerow([s.key, s.label, s.split, *(s.media[m] for m in ("image", "audio", "video", "text"))])


def measure(n: int, chunk: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    from pipelines.manifest import read_manifest

    groups = base._demo_groups()
    samples = read_manifest(base.DATA / "manifest.csv").samples[:n]
    cores = min(2, os.cpu_count() or 1)
    runs: dict[str, list[tuple[float, float]]] = {"bare": [], "concurrent": [], "dask": []}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.csv"
        _write_manifest(samples, manifest)
        exs = base.demo_extractors(groups, samples[0])
        base.demo_loop(exs, samples[:chunk], chunk)  # page cache
        for r in range(rounds):
            runs["bare"].append(_bare(exs, samples, chunk))
            runs["concurrent"].append(bare_concurrent(samples, groups, chunk, cores))
            runs["dask"].append(pipeline(manifest, groups, chunk, cores, samples[0].media))
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in runs.items()),
                file=sys.stderr,
            )
    return runs


def report(runs: dict[str, list[tuple[float, float]]], n: int, chunk: int, cores: int) -> list[str]:
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    listed = {k: ", ".join(f"{w:.1f}" for w, _ in v) for k, v in runs.items()}
    strict = (wall["bare"] / cores) / wall["dask"]
    matched = wall["concurrent"] / wall["dask"]
    cpu_ratio = cpu["dask"] / cpu["bare"]
    return [
        f"{n} demo samples in shards of {chunk}, {cores} cores; medians of {len(runs['dask'])} alternating rounds.",
        "",
        "| what | wall s (runs) | samples/s | CPU ms/sample (all processes) |",
        "| --- | --- | --- | --- |",
        f"| bare loop, 1 process | {wall['bare']:.1f} ({listed['bare']}) | {n / wall['bare']:.1f} "
        f"| {1e3 * cpu['bare'] / n:.1f} |",
        f"| bare loop, {cores} processes at once | {wall['concurrent']:.1f} ({listed['concurrent']}) "
        f"| {n / wall['concurrent']:.1f} | {1e3 * cpu['concurrent'] / n:.1f} |",
        f"| `modalstore extract`, Dask {cores} workers, end to end | {wall['dask']:.1f} ({listed['dask']}) "
        f"| {n / wall['dask']:.1f} | {1e3 * cpu['dask'] / n:.1f} |",
        "",
        "| overhead per core of the Dask pipeline, against | efficiency | overhead |",
        "| --- | --- | --- |",
        f"| the lone bare loop × {cores} (strict) | {strict:.0%} | {1 / strict - 1:+.0%} |",
        f"| {cores} bare loops at once (same hardware load) | {matched:.0%} | {1 / matched - 1:+.0%} |",
        f"| CPU seconds per sample, every process | {1 / cpu_ratio:.0%} | {cpu_ratio - 1:+.0%} |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=768, help="demo samples to extract (default 768)")
    parser.add_argument("--shard", type=int, default=32, help="samples per shard (default 32)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds, medians reported (default 3)"
    )
    args = parser.parse_args()
    if not (base.DATA / "manifest.csv").exists():
        print("run `make data` first (the demo data)", file=sys.stderr)
        return 2
    cores = min(2, os.cpu_count() or 1)
    runs = measure(args.samples, args.shard, args.rounds)
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d %H:%M')}, load average at the end {os.getloadavg()[0]:.2f}",
        "",
        *report(runs, args.samples, args.shard, cores),
    ]
    out = "\n".join(lines)
    (ROOT / ".bench").mkdir(exist_ok=True)
    (ROOT / ".bench" / "extract_overhead.md").write_text(out + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
