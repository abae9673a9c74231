"""Peak memory of the `extract` driver at 10k and 100k samples (issue 7, "Memory").

The issue's target: the driver holds no sample data, so its peak memory does not grow with
the number of samples. A cheap job isolates the driver: a manifest of N rows of the demo data
(its 1,600 rows cycled with unique keys: absolute paths to its image, audio and video files,
which the driver checks exist, and its inline `text`; `--rows synthetic`: text only), the
`bow` extractor on the text (64 features), 1,000 samples per shard. The driver's work does
not depend on the extractor; a media extractor would only make the run slower. Each extract runs in a
fresh child process (the driver); its own peak RSS is `getrusage(RUSAGE_SELF).ru_maxrss`.

Modes: `cluster` (the driver is a client of a `dask scheduler` + 2 `dask worker` processes on
loopback, so all extraction happens elsewhere) and `serial` (the driver does the work). In
`cluster` mode the workers' peak RSS so far is read after each size: the same workers run the
sizes in turn, so a flat column means no task's memory grows with the number of samples
(`--group lbp`: shard tasks only; `bow` adds its fit, which holds the train split's texts).

With tracing on (default), a second child per size runs under `tracemalloc` and reports the
Python memory held at each stage of `pipelines.extract.run_extract` (manifest and shard
plans; the collected per-shard parts; the catalog assembly in `write_catalog`) and the top
allocation sites when the catalog is written, so growth can be attributed.

Allocations by pyarrow (manifest parsing, catalog tables) bypass `tracemalloc`; the child
reports the peak of pyarrow's memory pools separately (the driver allocates on the system pool,
`pipelines.spill.system_memory_pool`; the larger of the two peaks).

Prints a table and writes JSON to --out (default .bench/driver_memory.json; .bench/ is gitignored).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "manifest.csv"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = (
    "the a red green blue small large cat dog bird car tram boat park beach city river hill quiet "
    "loud calm rowdy bright dark old new fast slow morning evening stood ran flew sat near far"
).split()

# Runs in the child (the driver). argv: config, scheduler address or "serial", "trace" or "plain".
CHILD = r"""
import json, resource, sys, time, tracemalloc

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

import pipelines.extract as ex
from pipelines.extract import load_extract_config, run_extract
import features.text_fitted, sklearn.feature_extraction.text  # the fit's imports, before the baseline
import pyarrow as pa

cfg_path, where, mode = sys.argv[1:4]
out = {"rss_after_imports_mb": rss_mb()}
trace = mode == "trace"
STAGES = ("prepare", "fit_groups", "_finish_store", "write_catalog", "write_store_manifest")
if trace:
    tracemalloc.start(16)
    MB = 1 / 2**20
    PEAK = [0]

    def wrap(name, before=None, after=None):
        fn = getattr(ex, name, None)
        if fn is None:
            out.setdefault("missing_probes", []).append(name)
            return

        def probe(*a, **k):
            cur = tracemalloc.get_traced_memory()[0]
            out[f"{name}.held_at_entry_mb"] = cur * MB
            out[f"{name}.arrow_pool_peak_before_mb"] = max(p.max_memory() for p in (pa.default_memory_pool(), pa.system_memory_pool())) * MB
            if name == "_finish_store":  # what run_extract holds, above the baseline
                sites = {}
                for st in tracemalloc.take_snapshot().compare_to(BASE, "traceback"):
                    frames = list(st.traceback)  # oldest first
                    ours = next((f for f in reversed(frames) if "/pipelines/" in f.filename), None)
                    site = (str(frames[-1]), str(ours) if ours else "")
                    mb, n = sites.get(site, (0.0, 0))
                    sites[site] = (mb + st.size_diff * MB, n + st.count_diff)
                top = sorted(sites.items(), key=lambda kv: -kv[1][0])[:10]
                out["top_sites_at_finish"] = [[a, b, mb, n] for (a, b), (mb, n) in top]
            PEAK[0] = max(PEAK[0], tracemalloc.get_traced_memory()[1])
            tracemalloc.reset_peak()
            r = fn(*a, **k)
            cur2, peak = tracemalloc.get_traced_memory()
            PEAK[0] = max(PEAK[0], peak)
            out[f"{name}.held_after_mb"] = cur2 * MB
            out[f"{name}.peak_above_entry_mb"] = (peak - cur) * MB
            out[f"{name}.arrow_pool_peak_so_far_mb"] = max(p.max_memory() for p in (pa.default_memory_pool(), pa.system_memory_pool())) * MB
            return r

        setattr(ex, name, probe)

    for name in STAGES:
        wrap(name)
else:  # the peak RSS so far (VmHWM) around each stage: where the peak is reached

    def hwm_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    def stage(name):
        fn = getattr(ex, name)

        def probe(*a, **k):
            out[f"{name}.rss_hwm_at_entry_mb"] = hwm_mb()
            r = fn(*a, **k)
            out[f"{name}.rss_hwm_after_mb"] = hwm_mb()
            return r

        setattr(ex, name, probe)

    for name in STAGES:
        stage(name)
client = None
if where != "serial":
    from pipelines.cluster import connect  # as `modalstore extract --scheduler` connects
    client = connect(where)
if trace:
    BASE = tracemalloc.take_snapshot()
    out["baseline_traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
t0 = time.perf_counter()
ru0 = resource.getrusage(resource.RUSAGE_SELF)
summary = run_extract(load_extract_config(cfg_path), client=client, overwrite=True, progress=False)
out["seconds"] = time.perf_counter() - t0
ru1 = resource.getrusage(resource.RUSAGE_SELF)
out["driver_cpu_s"] = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
out["samples"] = summary.samples
out["shards"] = summary.shards
if trace:
    out["traced_peak_mb"] = max(PEAK[0], tracemalloc.get_traced_memory()[1]) / 2**20
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["arrow_pool_peak_mb"] = max(p.max_memory() for p in (pa.default_memory_pool(), pa.system_memory_pool())) / 2**20
print("RESULT " + json.dumps(out))
"""


def write_manifest(path: Path, n: int, rows: str = "demo", seed: int = 0) -> None:
    """``n`` manifest rows: the demo data's rows cycled with unique keys (``demo``: media paths
    to the demo's image, audio and video files, which the driver checks exist, and its text),
    or synthetic text only (``synthetic``)."""
    rng = random.Random(seed)
    demo = []
    if rows == "demo":
        if not DEMO.exists():
            sys.exit(f"{DEMO} not found: run `make data` first (or pass --rows synthetic)")
        with DEMO.open(newline="") as f:
            demo = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        if demo:
            w.writerow(["key", "label", "split", "image", "audio", "video", "text"])
            for i in range(n):
                r = demo[i % len(demo)]
                media = [str(DEMO.parent / r[m]) if r[m] else "" for m in ("image", "audio", "video")]
                w.writerow([f"{r['key']}-r{i:07d}", r["label"], r["split"], *media, r["text"]])
            return
        w.writerow(["key", "label", "split", "text"])
        for i in range(n):
            split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14)))
            w.writerow([f"s{i:07d}", i % 16, split, text])


GROUPS = {
    "bow": {"text": {"extractor": "bow", "params": {"max_features": 64}}},  # fitted on the train split
    "lbp": {"image": {"extractor": "lbp", "params": {}}},  # no fit: shard tasks only
}


def write_config(
    work: Path, n: int, rows: str = "demo", group: str = "bow", fit_samples: int | None = None
) -> Path:
    import yaml

    manifest = work / f"manifest-{n}.csv"
    if not manifest.exists():
        write_manifest(manifest, n, rows)
    body = {
        "manifest": str(manifest),
        "store": str(work / f"store-{n}"),
        "samples_per_shard": 1000,
        "groups": {
            name: {**g, **({"fit_samples": fit_samples} if fit_samples and group == "bow" else {})}
            for name, g in GROUPS[group].items()
        },
    }
    path = work / f"extract-{n}-{group}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _hwm_mb() -> float:
    """This process's peak RSS so far (VmHWM), MB (run on the Dask workers)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(config: Path, where: str, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(config), where, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent), "HOME": str(Path.home())},
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"driver child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--modes", nargs="+", default=["cluster", "serial"], choices=["cluster", "serial"])
    ap.add_argument("--no-trace", action="store_true", help="skip the tracemalloc breakdown")
    ap.add_argument(
        "--rows",
        choices=["demo", "synthetic"],
        default="demo",
        help="manifest rows: the demo data's rows cycled (default; needs `make data`) or synthetic text",
    )
    ap.add_argument(
        "--group",
        choices=sorted(GROUPS),
        default="bow",
        help="bow on the text (default; fitted on the train split in one task) or lbp on the images "
        "(no fit: every task is a shard task; needs --rows demo)",
    )
    ap.add_argument(
        "--fit-samples",
        type=int,
        default=None,
        help="with --group bow: fit on at most this many train rows (the group's fit_samples)",
    )
    ap.add_argument("--out", default=str(ROOT / ".bench" / "driver_memory.json"))
    args = ap.parse_args()

    from scaling import external_cluster

    (ROOT / ".bench").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="driver-memory-", dir=ROOT / ".bench"))
    if args.group == "lbp" and args.rows != "demo":
        ap.error("--group lbp needs --rows demo (image files)")
    configs = {n: write_config(work, n, args.rows, args.group, args.fit_samples) for n in args.sizes}
    results: list[dict] = []
    for mode in args.modes:
        cluster = external_cluster(2, work, trim=False) if mode == "cluster" else None
        client = cluster.__enter__() if cluster else None
        try:
            where = client.scheduler.address if client else "serial"
            for n in args.sizes:
                row = {"mode": mode, "samples": n, **run_child(configs[n], where, "plain")}
                if client is not None:  # the workers' peak RSS so far: every size's tasks so far
                    row["worker_hwm_mb"] = max(client.run(_hwm_mb).values())
                if not args.no_trace:
                    row["trace"] = run_child(configs[n], where, "trace")
                results.append(row)
                print(f"  {mode} {n}: peak RSS {row['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        finally:
            if cluster:
                cluster.__exit__(None, None, None)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}, indent=2)
    )
    lines = [
        "| driver | samples | shards | extract (s) | driver CPU (s) | RSS after imports (MB) | peak RSS (MB) | peak − imports (MB) "
        "| pyarrow pool peak (MB) | workers' peak RSS so far (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['samples']:,} | {r['shards']} | {r['seconds']:.1f} | {r['driver_cpu_s']:.1f} | "
            f"{r['rss_after_imports_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] - r['rss_after_imports_mb']:.0f} | {r['arrow_pool_peak_mb']:.0f} | "
            f"{r.get('worker_hwm_mb', float('nan')):.0f} |"
        )
    for mode in args.modes:
        rows = [r for r in results if r["mode"] == mode]
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            lines.append(
                f"\n{mode}: peak RSS ×{b['peak_rss_mb'] / a['peak_rss_mb']:.2f} at ×{b['samples'] / a['samples']:.0f} "
                f"samples; growth above imports ×"
                f"{(b['peak_rss_mb'] - b['rss_after_imports_mb']) / (a['peak_rss_mb'] - a['rss_after_imports_mb']):.2f}"
            )
    lines += ["", "peak RSS so far (VmHWM, MB) at the entry and exit of each stage of run_extract:", ""]
    lines.append("| stage | " + " | ".join(f"{r['mode']} {r['samples']:,}" for r in results) + " |")
    lines.append("| --- |" + " --- |" * len(results))
    probes = dict.fromkeys(k for r in results for k in r if ".rss_hwm_" in k)  # in the order they ran
    for k in probes:
        lines.append(f"| {k} | " + " | ".join(f"{r.get(k, float('nan')):.0f}" for r in results) + " |")
    if not args.no_trace:
        lines += ["", "tracemalloc (Python allocations, MB) by stage of run_extract:", ""]
        keys = sorted({k for r in results for k in r["trace"] if k.endswith("_mb") and "rss" not in k})
        lines.append("| stage | " + " | ".join(f"{r['mode']} {r['samples']:,}" for r in results) + " |")
        lines.append("| --- |" + " --- |" * len(results))
        for k in keys:
            lines.append(
                f"| {k} | " + " | ".join(f"{r['trace'].get(k, float('nan')):.1f}" for r in results) + " |"
            )
        for r in results:
            lines += [
                "",
                f"allocations held at `_finish_store` entry above the baseline, {r['mode']} {r['samples']:,}:",
            ]
            lines += [
                f"- {site} (via {ours or '-'}): {mb:.1f} MB, {cnt:,} blocks"
                for site, ours, mb, cnt in r["trace"].get("top_sites_at_finish", [])
            ]
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
