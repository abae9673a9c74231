"""Store catalog at scale: `inspect`, a catalog selection, and `get` at 10k vs 1M samples.

Builds synthetic stores whose catalog has N sample rows (2 members each, 256 samples per
shard). Only the shard holding the probed key exists on disk, written with the real shard
writer; the catalog is written as `extract` writes it (small row groups, shard order).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PER_SHARD = 256
VERSION = "0123456789abcdef"  # the group version (any 16 hex digits)


def build(root: Path, n: int) -> str:
    from pipelines.shards import ShardWriter
    from pipelines.store import CATALOG_ROW_GROUP, LOOKUP_ROW_GROUP

    # rows in the order extract writes them: split by split, shard by shard
    idx = np.arange(n)
    splits = np.where(idx < 0.8 * n, "train", np.where(idx < 0.9 * n, "val", "test"))
    start = {s: int(np.argmax(splits == s)) for s in ("train", "val", "test")}
    within = idx - np.array([start[s] for s in splits])
    shard_of = np.cumsum(np.r_[0, (within[1:] % PER_SHARD == 0) | (splits[1:] != splits[:-1])])
    n_shards = int(shard_of[-1]) + 1
    shard_names = np.char.add(np.char.add(splits, "-"), np.char.zfill((within // PER_SHARD).astype(str), 6))
    probe_shard = int(shard_of[n // 2])
    keys = np.char.add("k", np.char.zfill(idx.astype(str), 8))
    rng = np.random.default_rng(0)
    # the probed shard: real bytes on disk, real member offsets
    rows_of_probe = np.flatnonzero(shard_of == probe_shard)
    probe = slice(int(rows_of_probe[0]), int(rows_of_probe[-1]) + 1)
    path = root / "shards" / "audio" / VERSION / f"{shard_names[probe][0]}.tar"
    with ShardWriter(path) as w:
        for k, lab in zip(keys[probe], idx[probe] % 16, strict=True):  # noqa: B905
            w.add_sample(
                str(k),
                {"key": str(k), "label": int(lab), "split": str(splits[probe][0]), "present": True},
                {"mfcc": rng.standard_normal((100, 40)).astype(np.float32)},
            )
        size, digest = w.close()
        real = w.members
    offsets = np.tile(np.array([512, 2048]), n)
    sizes = np.tile(np.array([80, 16128]), n)
    offsets[probe.start * 2 : probe.stop * 2] = [m.offset for m in real]
    sizes[probe.start * 2 : probe.stop * 2] = [m.size for m in real]
    member_names = np.empty(2 * n, dtype=object)
    member_names[0::2] = np.char.add(keys, ".json")
    member_names[1::2] = np.char.add(keys, ".mfcc.npy")
    first = np.flatnonzero(np.r_[True, shard_of[1:] != shard_of[:-1]])  # first row of each shard
    cat = root / "catalog"
    cat.mkdir(parents=True)
    tables = {
        "samples": pa.table(
            {
                "key": keys,
                "split": splits,
                "label": idx % 16,
                "shard": shard_names,
                "index": idx % PER_SHARD,
                "has_audio": np.ones(n, bool),
            }
        ),
        "shards": pa.table(
            {
                "group": ["audio"] * n_shards,
                "shard": shard_names[first],
                "split": splits[first],
                "samples": np.bincount(shard_of),
                "bytes": np.full(n_shards, size),
                "sha256": [digest] * n_shards,
            }
        ),
        "members": pa.table(
            {
                "group": np.full(2 * n, "audio"),
                "shard": np.repeat(shard_names, 2),
                "member": member_names.astype(str),
                "offset": offsets,
                "size": sizes,
            }
        ),
        "errors": pa.table(
            {
                c: pa.array([], pa.string())
                for c in ("key", "group", "shard", "stage", "error_type", "message")
            }
        ),
    }
    # as write_catalog does: the key index sorted by key; small row groups for point lookups
    tables["keys"] = tables["samples"].select(["key", "split", "label", "shard", "index"]).sort_by("key")
    tables["members"] = tables["members"].take(pc.sort_indices(tables["members"], [("shard", "ascending")]))
    for name, table in tables.items():
        rows = LOOKUP_ROW_GROUP if name in ("keys", "members") else CATALOG_ROW_GROUP
        pq.write_table(table, cat / f"{name}.parquet", row_group_size=rows)
    split_meta = {}
    for s in ("train", "val", "test"):
        mask = splits[first] == s
        names = [str(x) for x in shard_names[first][mask]]
        counts = [int(c) for c in np.bincount(shard_of)[mask]]
        split_meta[s] = {"samples": sum(counts), "shards": names, "shard_samples": counts}
    (root / "store.json").write_text(
        json.dumps(
            {
                "format": "modalstore",
                "format_version": 2,
                "classes": [str(c) for c in range(16)],
                "manifest": {"path": "synthetic", "sha256": "0" * 64, "rows": n},
                "splits": split_meta,
                "groups": {
                    "audio": {
                        "extractor": "mfcc",
                        "extractor_version": 1,
                        "version": VERSION,
                        "modality": "audio",
                        "params": {},
                        "fields": {"mfcc": {"dtype": "float32", "shape": [None, 40], "description": ""}},
                        "dir": f"shards/audio/{VERSION}",
                    }
                },
                "errors": 0,
            }
        )
    )
    return str(keys[probe][len(rows_of_probe) // 3])


def timed(fn, repeat=5) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def selection(root: Path) -> list[str]:
    t = pq.read_table(
        root / "catalog" / "samples.parquet",
        columns=["shard"],
        filters=[("split", "=", "train"), ("label", "=", 3)],
    )
    return pc.unique(t.column("shard")).to_pylist()


def main() -> int:
    from pipelines.inspect import inspect_store
    from pipelines.lookup import get_sample

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (10_000, 1_000_000):
            root = Path(tmp) / f"s{n}"
            key = build(root, n)
            got = get_sample(root, key)
            assert got["groups"]["audio"]["fields"]["mfcc"].shape == (100, 40)
            rows.append(
                (
                    n,
                    timed(lambda r=root: inspect_store(r), 3),
                    timed(lambda r=root: selection(r)),
                    timed(lambda r=root, k=key: get_sample(r, k), 7),
                    len(selection(root)),
                )
            )
    lines = [
        f"Store catalog, synthetic, 256 samples/shard, 2 members/sample ({time.strftime('%Y-%m-%d')}); medians:",
        "",
        "| samples | inspect (s) | select train & label 3 → shard list (s) | get one key (ms) | shards selected |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {n:,} | {a:.3f} | {b:.3f} | {c * 1000:.1f} | {m:,} |" for n, a, b, c, m in rows],
        "",
        f"get at 1M / get at 10k: {rows[1][3] / rows[0][3]:.2f}x",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
