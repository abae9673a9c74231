"""Shuffle quality on the demo store's train split: StreamingLoader vs a plain webdataset shuffle.

For each loader and epoch, the delivered key order is compared with the store order:

- Spearman rank correlation between a sample's store position and its delivered position
  (0 for a perfect shuffle, 1 for none), as |rho| averaged over epochs;
- mean label run length of the delivered labels (consecutive equal labels; the demo's
  labels are already random, so this is near its ideal ~1.07 whatever the shuffle);
- the same run length as if the store were sorted by label (label = store position * 16 / n):
  the worst case for a local shuffle, which shows how far samples travel;
- mean |displacement| / n.

Baselines: no shuffle, and ``np.random.permutation`` (ideal). Plain webdataset:
``WebDataset(urls, shardshuffle=..., detshuffle=True, seed=s).shuffle(bufsize, initial=bufsize)``.

    python benchmarks/shuffle_quality.py [--store stores/demo] [--epochs 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP = "text"  # the smallest shards: only keys and labels matter here


def store_order(store) -> tuple[list[str], dict[str, int]]:
    rows = [r for r in store.table("samples").to_pylist() if r["split"] == "train"]
    return [r["key"] for r in rows], {r["key"]: int(r["label"]) for r in rows}


def modalstore_keys(store_root: str, epoch: int, bufsize: int) -> list[str]:
    from fusion.loader import StreamingLoader

    loader = StreamingLoader(
        store_root, "train", groups=[GROUP], batch_size=256, shuffle=True, seed=0, buffer_size=bufsize
    )
    loader.set_epoch(epoch)
    return [k for b in loader for k in b["keys"]]


def webdataset_keys(store, epoch: int, bufsize: int) -> list[str]:
    import webdataset as wds

    urls = [str(store.shard_path(GROUP, s)) for s in store.shards("train")]
    ds = wds.WebDataset(urls, shardshuffle=len(urls), detshuffle=True, seed=epoch, empty_check=False)
    ds = ds.shuffle(bufsize, initial=bufsize, seed=epoch)
    return [s["__key__"] for s in ds]


def run_length(labels: np.ndarray) -> float:
    return len(labels) / (1 + np.count_nonzero(labels[1:] != labels[:-1]))


def quality(delivered: list[str], pos: dict[str, int], labels: dict[str, int]) -> np.ndarray:
    from scipy.stats import spearmanr

    n = len(pos)
    assert sorted(delivered) == sorted(pos), "a loader lost or repeated samples"
    p = np.array([pos[k] for k in delivered])
    rho = abs(spearmanr(p, np.arange(n)).statistic)
    sorted_labels = p * 16 // n
    return np.array(
        [
            rho,
            run_length(np.array([labels[k] for k in delivered])),
            run_length(sorted_labels),
            np.abs(p - np.arange(n)).mean() / n,
        ]
    )


def main() -> None:
    from pipelines.store import open_store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="stores/demo")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    store = open_store(args.store)
    keys, labels = store_order(store)
    pos = {k: i for i, k in enumerate(keys)}
    rng = np.random.default_rng(0)
    loaders = {
        "no shuffle (store order)": lambda e: keys,
        "ideal: np.random.permutation": lambda e: [keys[i] for i in rng.permutation(len(keys))],
        "plain webdataset, shard shuffle + buffer 512": lambda e: webdataset_keys(store, e, 512),
        "StreamingLoader, shard shuffle + window 512 (default)": lambda e: modalstore_keys(
            args.store, e, 512
        ),
        "plain webdataset, shard shuffle + buffer 128": lambda e: webdataset_keys(store, e, 128),
        "StreamingLoader, shard shuffle + window 128": lambda e: modalstore_keys(args.store, e, 128),
    }
    print(
        f"{len(keys)} train samples in {len(store.shards('train'))} shards; means over {args.epochs} epochs\n"
    )
    print(
        "| order | |Spearman ρ| | label run length | run length if sorted by label | mean |displacement| / n |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, order in loaders.items():
        q = np.mean([quality(order(e), pos, labels) for e in range(args.epochs)], axis=0)
        print(f"| {name} | {q[0]:.3f} | {q[1]:.2f} | {q[2]:.2f} | {q[3]:.3f} |")


if __name__ == "__main__":
    main()
