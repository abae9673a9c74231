"""Loader memory against dataset size: peak RSS reading synthetic stores of N and 10*N samples.

Each store has one group of per-sample arrays like the loader issue's (a 512-d float16
vector and a float16 40-coefficient sequence of 50-100 frames), in shards of 250 samples,
written by the project's shard and catalog writers (``synthetic_store.py``). Each measurement runs
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

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
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del loader  # stops the (persistent) workers: RUSAGE_CHILDREN counts them once they are reaped
import gc; gc.collect()
print(json.dumps({{
    "samples": n,
    "base_kb": base,
    "self_kb": self_kb,
    "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}}))
"""


def build_store(root: Path, n: int) -> Path:
    """A one-group store of ``n`` train samples, written by the project's shard and catalog writers."""
    from synthetic_store import write_store

    from features.spec import FieldSpec

    spec = {"syn": {"emb": FieldSpec("float16", (512,)), "mfcc": FieldSpec("float16", (None, 40))}}
    return write_store(root, spec, n, PER_SHARD, lengths={"syn.mfcc": lambda i, rng: 50 + i % 51})


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
