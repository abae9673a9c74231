"""Bucketing by length: padding and throughput of StreamingLoader with and without ``bucket_by``.

A synthetic one-group store (written by the project's shard and catalog writers, see
``synthetic_store.py``) of 20,000 samples, each a 512-d float16 vector and a float16 MFCC of
40 coefficients by 20-400 frames (uniform), shuffled epochs at batch 256. Padding: the share
of the padded (batch, time) cells that are padding, over an epoch.

    python benchmarks/loader_bucketing.py [--n 20000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def epoch_stats(loader, epoch: int) -> tuple[float, float, int]:
    """(padding fraction, samples/s, samples) of one epoch."""
    loader.set_epoch(epoch)
    pad = cells = n = 0
    t0 = time.perf_counter()
    for b in loader:
        lengths = b["lengths"]["syn.mfcc"]
        width = b["features"]["syn.mfcc"].shape[1]
        pad += len(lengths) * width - int(lengths.sum())
        cells += len(lengths) * width
        n += len(lengths)
    return pad / cells, n / (time.perf_counter() - t0), n


def main() -> int:
    from synthetic_store import write_store

    from features.spec import FieldSpec
    from fusion.loader import StreamingLoader

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    spec = {"syn": {"emb": FieldSpec("float16", (512,)), "mfcc": FieldSpec("float16", (None, 40))}}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        store = write_store(
            Path(tmp) / "s",
            spec,
            args.n,
            1000,
            lengths={"syn.mfcc": lambda i, rng: int(rng.integers(20, 401))},
        )
        print("| order | workers | padding (share of padded cells) | samples/s: median of 3 epochs (runs) |")
        print("| --- | --- | --- | --- |")
        for workers in (0, 2):
            for label, kw in (
                ("shuffled (window 512)", {}),
                ("shuffled + `bucket_by`, bucket 4096", {"bucket_by": "syn.mfcc"}),
                ("shuffled + `bucket_by`, bucket 1024", {"bucket_by": "syn.mfcc", "bucket_size": 1024}),
            ):
                loader = StreamingLoader(
                    store, "train", batch_size=256, shuffle=True, num_workers=workers, **kw
                )
                epoch_stats(loader, 0)  # warm-up: page cache, workers
                stats = [epoch_stats(loader, e) for e in (1, 2, 3)]
                assert all(s[2] == args.n for s in stats)
                rates = [s[1] for s in stats]
                print(
                    f"| {label} | {workers} | {np.mean([s[0] for s in stats]):.1%} | {np.median(rates):,.0f} "
                    f"({', '.join(f'{r:,.0f}' for r in rates)}) |"
                )
                del loader
    return 0


if __name__ == "__main__":
    sys.exit(main())
