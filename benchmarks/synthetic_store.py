"""A synthetic store written through the project's own writers, for loader benchmarks.

Shards are written by ``pipelines.shards.ShardWriter`` (the tar layout extraction writes: a
``<key>.json`` member and one ``<key>.<field>.npy`` per field), the catalog by
``pipelines.store.write_catalog`` (the same ``members.parquet`` offsets extraction records) and
``store.json`` by ``write_store_manifest``; only the arrays are random instead of computed
from media. ``ISSUE_SPEC`` is the loader issue's benchmark layout.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from features.spec import FieldSpec
from pipelines.manifest import Sample
from pipelines.shards import ShardPlan, ShardWriter, plan_shards
from pipelines.store import write_catalog, write_store_manifest
from pipelines.versions import save_part

# group -> field -> spec: per sample a 512-d image vector, a 100 x 40 MFCC, a 16 x 2 x 14 x 14 flow
# tensor and a 384-d text vector, float16 (the loader issue's benchmark).
ISSUE_SPEC = {
    "image": {"embedding": FieldSpec("float16", (512,))},
    "audio": {"mfcc": FieldSpec("float16", (None, 40))},
    "video": {"flow": FieldSpec("float16", (None, 2, 14, 14))},
    "text": {"embedding": FieldSpec("float16", (384,))},
}
ISSUE_LENGTHS = {"audio.mfcc": 100, "video.flow": 16}  # frames of the variable fields


def write_store(
    root: Path,
    spec: dict[str, dict[str, FieldSpec]],
    n: int,
    samples_per_shard: int = 1000,
    lengths=None,
    classes: int = 16,
    seed: int = 0,
) -> Path:
    """Write a train-split store of ``n`` samples to ``root``; returns ``root``.

    ``lengths``: {"group.field": int or callable(i, rng) -> int} first-axis lengths of the
    variable fields (default ``ISSUE_LENGTHS``, else 10). Arrays repeat a pool of 64 random
    ones per field (writing cost, not randomness, is what matters here).
    """
    rng = np.random.default_rng(seed)
    lengths = ISSUE_LENGTHS if lengths is None else lengths
    samples = [Sample(f"s{i:08d}", int(rng.integers(classes)), "train", i) for i in range(n)]
    plans: list[ShardPlan] = plan_shards(samples, samples_per_shard)
    pools = {}
    for g, fields in spec.items():
        for f, fs in fields.items():
            frame = fs.shape[1:] if fs.variable else fs.shape
            longest = 1
            if fs.variable:
                rule = lengths.get(f"{g}.{f}", 10)
                longest = rule if isinstance(rule, int) else 1024
            pools[g, f] = rng.standard_normal((64, longest if fs.variable else 1, *frame)).astype(fs.dtype)
    tasks = [SimpleNamespace(name=g, version="v1") for g in spec]
    parts: dict[str, dict[str, dict]] = {g: {} for g in spec}
    for plan in plans:
        for g, fields in spec.items():
            rel = f"shards/{g}/v1/{plan.name}.tar"
            with ShardWriter(root / rel) as w:
                for s in plan.samples:
                    arrays = {}
                    for f, fs in fields.items():
                        pool = pools[g, f][s.row % 64]
                        if fs.variable:
                            rule = lengths.get(f"{g}.{f}", 10)
                            t = rule if isinstance(rule, int) else int(rule(s.row, rng))
                            arrays[f] = pool[:t]
                        else:
                            arrays[f] = pool[0]
                    meta = {"key": s.key, "label": s.label, "split": s.split, "present": True}
                    w.add_sample(s.key, meta, arrays)
                nbytes, sha = w.close()
            parts[g][plan.name] = part = {
                "group": g,
                "version": "v1",
                "shard": plan.name,
                "present": [True] * len(plan.samples),
                "errors": [],
                "file": {
                    "group": g,
                    "version": "v1",
                    "shard": plan.name,
                    "split": plan.split,
                    "samples": len(plan.samples),
                    "bytes": nbytes,
                    "sha256": sha,
                },
                "members": [[m.name, m.offset, m.size] for m in w.members],
            }
            save_part(root, part)  # the record extraction keeps per shard; the catalog is built from it
    write_catalog(root, plans, tasks, parts, {})
    groups = {
        g: {"fields": {f: fs.to_dict() for f, fs in fields.items()}, "dir": f"shards/{g}/v1", "version": "v1"}
        for g, fields in spec.items()
    }
    splits = {
        split: {
            "samples": sum(len(p.samples) for p in plans if p.split == split),
            "shards": [p.name for p in plans if p.split == split],
            "shard_samples": [len(p.samples) for p in plans if p.split == split],
        }
        for split in ("train", "val", "test")
    }
    write_store_manifest(
        root, {"classes": [str(c) for c in range(classes)], "splits": splits, "groups": groups}
    )
    return root
