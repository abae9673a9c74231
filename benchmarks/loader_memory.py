"""Loader memory against dataset size: peak RSS reading synthetic stores of N and 10*N samples.

Each store has one group of per-sample arrays like the loader issue's (a 512-d float16
vector and a float16 40-coefficient sequence of 50-100 frames), in shards of 250 samples,
written with the real shard writer plus the catalog the loader reads. Each measurement runs
in a fresh child process (two shuffled epochs, batch 256) and reports ``ru_maxrss``: of the
child itself and of its largest DataLoader worker, with the RSS right after the imports as
the baseline (``import torch`` alone is ~500 MB).

    python benchmarks/loader_memory.py [--n 2000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PER_SHARD = 250

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from fusion.loader import StreamingLoader
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loader = StreamingLoader({store!r}, "train", batch_size=256, shuffle=True, num_workers={workers})
n = 0
for epoch in range(2):
    loader.set_epoch(epoch)
    n += sum(len(b["keys"]) for b in loader)
print(json.dumps({{
    "samples": n,
    "base_kb": base,
    "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}}))
"""


def build_store(root: Path, n: int) -> Path:
    """A one-group store of ``n`` train samples that StreamingLoader can read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.shards import ShardWriter

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((64, 512)).astype(np.float16)
    mfcc = rng.standard_normal((64, 100, 40)).astype(np.float16)
    shards, counts, members, shard_rows = [], [], [], []
    for s, start in enumerate(range(0, n, PER_SHARD)):
        name = f"train-{s:06d}"
        with ShardWriter(root / "shards" / "syn" / f"{name}.tar") as w:
            for i in range(start, min(start + PER_SHARD, n)):
                key = f"s{i:08d}"
                meta = {"key": key, "label": i % 16, "split": "train", "present": True}
                w.add_sample(key, meta, {"emb": emb[i % 64], "mfcc": mfcc[i % 64, : 50 + i % 51]})
            nbytes, _ = w.close()
        shards.append(name)
        counts.append(min(PER_SHARD, n - start))
        members += [
            {"group": "syn", "shard": name, "member": m.name, "offset": m.offset, "size": m.size}
            for m in w.members
        ]
        shard_rows.append({"group": "syn", "shard": name, "bytes": nbytes})
    (root / "catalog").mkdir()
    pq.write_table(pa.Table.from_pylist(members), root / "catalog" / "members.parquet")
    pq.write_table(pa.Table.from_pylist(shard_rows), root / "catalog" / "shards.parquet")
    fields = {"emb": {"dtype": "float16", "shape": [512]}, "mfcc": {"dtype": "float16", "shape": [None, 40]}}
    meta = {
        "format": "modalstore",
        "format_version": 2,
        "classes": [str(c) for c in range(16)],
        "splits": {"train": {"samples": n, "shards": shards, "shard_samples": counts}},
        "groups": {"syn": {"fields": fields, "dir": "shards/syn"}},
    }
    (root / "store.json").write_text(json.dumps(meta))
    return root


def measure(store: Path, workers: int) -> dict:
    code = CHILD.format(root=str(ROOT), store=str(store), workers=workers)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="samples of the small store (the large has 10x)")
    ap.add_argument("--workdir", default=None, help="where to write the stores (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        stores = {n: build_store(Path(tmp) / f"n{n}", n) for n in (args.n, 10 * args.n)}
        print(
            "| samples | workers | peak RSS, loader process (MB) | above imports (MB) | peak RSS, largest worker (MB) |"
        )
        print("| --- | --- | --- | --- | --- |")
        for workers in (0, 2):
            for n, store in stores.items():
                r = measure(store, workers)
                assert r["samples"] == 2 * n, r
                worker = f"{r['workers_kb'] / 1024:.0f}" if workers else ""
                print(
                    f"| {n:,} | {workers} | {r['self_kb'] / 1024:.0f} | {(r['self_kb'] - r['base_kb']) / 1024:.0f} "
                    f"| {worker} |"
                )


if __name__ == "__main__":
    main()
