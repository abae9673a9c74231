"""Per-field feature statistics: exact per shard, merged across shards (Chan et al.).

Statistics are per feature: over samples and, for variable-length fields, over frames too,
so a (frames, 40) MFCC field has 40 means. Each shard task computes count, mean, M2
(sum of squared deviations), min and max in float64 with a two-pass formula; the driver
merges shards with the parallel update of Chan, Golub & LeVeque, which is numerically
stable and gives the same result in any shard order up to rounding.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipelines.shards import write_atomic


def field_moments(arrays: list[np.ndarray], variable: bool) -> dict[str, np.ndarray] | None:
    """count, mean, m2, min, max of one field over a shard's present samples."""
    if not arrays:
        return None
    x = np.concatenate(arrays, axis=0) if variable else np.stack(arrays)
    if x.shape[0] == 0:
        return None
    x = x.astype(np.float64)
    mean = x.mean(axis=0)
    return {
        "count": np.array(x.shape[0], dtype=np.int64),
        "mean": mean,
        "m2": ((x - mean) ** 2).sum(axis=0),
        "min": x.min(axis=0),
        "max": x.max(axis=0),
    }


def merge_moments(a: dict | None, b: dict | None) -> dict | None:
    if a is None:
        return b
    if b is None:
        return a
    na, nb = int(a["count"]), int(b["count"])
    n = na + nb
    delta = b["mean"] - a["mean"]
    return {
        "count": np.array(n, dtype=np.int64),
        "mean": a["mean"] + delta * (nb / n),
        "m2": a["m2"] + b["m2"] + delta**2 * (na * nb / n),
        "min": np.minimum(a["min"], b["min"]),
        "max": np.maximum(a["max"], b["max"]),
    }


def finalize(moments: dict) -> dict[str, np.ndarray]:
    """mean, std (population), min, max as float32, and count."""
    n = int(moments["count"])
    return {
        "mean": moments["mean"].astype(np.float32),
        "std": np.sqrt(moments["m2"] / n).astype(np.float32),
        "min": moments["min"].astype(np.float32),
        "max": moments["max"].astype(np.float32),
        "count": np.array(n, dtype=np.int64),
    }


def stats_bytes(stats: dict[str, dict[str, np.ndarray]]) -> bytes:
    """``{field: {mean, std, min, max, count}}`` as the bytes of one .npz (keys ``field.stat``)."""
    arrays = {f"{field}.{k}": v for field, s in stats.items() for k, v in s.items()}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_stats(path: str | Path, stats: dict[str, dict[str, np.ndarray]]) -> None:
    """Write ``{field: {mean, std, min, max, count}}`` as one .npz file."""
    write_atomic(path, stats_bytes(stats))


def load_stats(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            field, stat = key.rsplit(".", 1)
            out.setdefault(field, {})[stat] = npz[key]
    return out
