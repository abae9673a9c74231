"""Group versions: each feature group's output is kept under a content hash of what made it.

A group's *version* hashes its extractor name and version, parameters, fitted artifact (for
fit-then-transform extractors), the shard layout settings and the input manifest's
fingerprint. Versions live side by side::

    versions/<group>/<version>/group.json          the group's store.json entry + fit errors
    versions/<group>/<version>/parts/<shard>.json  catalog rows of one finished shard
    versions/<group>/<version>/stats.npz           train-split field statistics
    shards/<group>/<version>/<split>-NNNNNN.tar    the shards

A part is written only after its shard was renamed into place, so it is the record that the
shard is finished: an interrupted run resumes by computing the shards without a part. A
shard whose samples (keys, labels, media) and group config are unchanged since another
version is hard-linked from it instead of recomputed, which is how appending manifest rows
or changing one group leaves every other shard untouched.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.shards import ShardPlan
from pipelines.storage import as_location

VERSIONS_DIR = "versions"
VERSION_CHARS = 16  # hex digits of sha256 kept in a version name


def _sha(obj: Any) -> str:
    return hashlib.sha256(_dumps(obj).encode()).hexdigest()


def config_hash(
    extractor: str,
    extractor_version: int,
    params: dict,
    artifact_sha: str | None,
    samples_per_shard: int,
    missing_media: str,
) -> str:
    """What one shard of a group is a function of, besides the shard's own rows."""
    return _sha(
        {
            "extractor": extractor,
            "extractor_version": extractor_version,
            "params": params,
            "artifact": artifact_sha,
            "samples_per_shard": samples_per_shard,
            "missing_media": missing_media,
        }
    )


def group_version(cfg_hash: str, manifest_fingerprint: str) -> str:
    """The version of a group: its config hash joined with the input manifest's fingerprint."""
    return _sha([cfg_hash, manifest_fingerprint])[:VERSION_CHARS]


def rows_hash(plan: ShardPlan) -> str:
    """Fingerprint of a shard's rows: name, keys in order, labels, splits and media sources.

    Kept on the plan once computed: the driver needs it for the run's identity and for every
    group's finished-shard record, and each computation reads the shard's rows back.
    """
    cached = plan.__dict__.get("_rows_hash")
    if cached is None:
        cached = _sha([plan.name, [(s.key, s.split, s.label, s.media) for s in plan.samples]])
        object.__setattr__(plan, "_rows_hash", cached)  # a frozen dataclass: a cache, not state
    return cached


def fit_key(extractor: str, extractor_version: int, params: dict, train_samples) -> str:
    """What a fitted artifact is a function of: the extractor config and the train rows.

    The sha256 of ``json.dumps([extractor, extractor_version, params, rows])``, fed row by row
    (the same bytes, without the whole JSON text in memory).
    """
    h = hashlib.sha256()
    h.update(_dumps([extractor, extractor_version, params, []])[:-2].encode())
    for i, s in enumerate(train_samples):
        h.update((", " * bool(i) + _dumps([s.key, s.label, s.media])).encode())
    h.update(b"]]")
    return h.hexdigest()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def version_rel(group: str, version: str) -> str:
    return f"{VERSIONS_DIR}/{group}/{version}"


def shard_rel(group: str, version: str, shard: str) -> str:
    return f"shards/{group}/{version}/{shard}.tar"


def part_rel(group: str, version: str, shard: str) -> str:
    return f"{version_rel(group, version)}/parts/{shard}.json"


def version_dir(store: Path, group: str, version: str) -> Path:
    return Path(store) / version_rel(group, version)


def shard_dir(store: Path, group: str, version: str) -> Path:
    return Path(store) / "shards" / group / version


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def save_part(store, part: dict) -> None:
    """Record a finished shard of one group version (call after the tar is in place)."""
    rel = part_rel(part["group"], part["version"], part["shard"])
    as_location(store).write_bytes(rel, json.dumps(_to_jsonable(part)).encode())


def read_part(store, group: str, version: str, shard: str) -> dict:
    """A part record as saved (the catalog reads each shard's presence and members from it)."""
    return _from_jsonable(json.loads(as_location(store).read_bytes(part_rel(group, version, shard))))


def slim_part(part: dict) -> dict:
    """A part without its per-sample lists (presence, members): what the driver keeps of each
    shard while a job runs, so that its memory grows with shards, not samples."""
    return {k: v for k, v in part.items() if k not in ("present", "members")}


def load_part(store, group: str, version: str, plan: ShardPlan) -> dict | None:
    """A finished shard's part, if it is for these rows and its tar is present and whole."""
    loc = as_location(store)
    rel = part_rel(group, version, plan.name)
    if not loc.exists(rel):
        return None
    try:
        part = read_part(loc, group, version, plan.name)
    except (ValueError, OSError):
        return None
    if part.get("failed") or part.get("rows") != rows_hash(plan):
        return None  # placeholders of a shard whose task kept crashing are retried
    tar = shard_rel(group, version, plan.name)
    if not loc.exists(tar) or loc.size(tar) != part["file"]["bytes"]:
        return None
    return part


def write_group_meta(store, group: str, version: str, meta: dict) -> None:
    rel = f"{version_rel(group, version)}/group.json"
    as_location(store).write_bytes(rel, json.dumps(_to_jsonable(meta), indent=2).encode())


def read_group_meta(store, group: str, version: str) -> dict | None:
    try:
        data = as_location(store).read_bytes(f"{version_rel(group, version)}/group.json")
        return _from_jsonable(json.loads(data))
    except (OSError, ValueError):
        return None


def list_versions(store) -> dict[str, list[str]]:
    """Every group version on disk: {group: [version, ...]} (sorted)."""
    loc = as_location(store)
    return {g: loc.listdir(f"{VERSIONS_DIR}/{g}") for g in loc.listdir(VERSIONS_DIR)}


def find_fitted(store, group: str, key: str) -> dict | None:
    """The ``group.json`` of an existing version of ``group`` fitted with the same fit key.

    Its ``artifact`` (path, sha256, fit key) and ``fit_errors`` let a run skip the fit.
    """
    loc = as_location(store)
    for version in list_versions(loc).get(group, []):
        meta = read_group_meta(loc, group, version)
        art = (meta or {}).get("artifact")
        if art and art.get("fit_key") == key and loc.exists(art["path"]):
            return meta
    return None


def same_config_versions(store, group: str, version: str, cfg_hash: str) -> list[str]:
    """The other versions of ``group`` made with the same config (they differ in rows only)."""
    loc = as_location(store)
    return [
        other
        for other in list_versions(loc).get(group, [])
        if other != version and (read_group_meta(loc, group, other) or {}).get("config_hash") == cfg_hash
    ]


def reuse_shard(store, group: str, version: str, siblings: list[str], plan: ShardPlan) -> dict | None:
    """Take a shard with the same rows from one of ``siblings`` (``same_config_versions``).

    The tar is hard-linked (its bytes and modification time stay those of the original; a
    server-side copy on object storage) and the part is copied under this version. Returns
    the part, or None when no sibling has it.
    """
    loc = as_location(store)
    for other in siblings:
        part = load_part(loc, group, other, plan)
        if part is None:
            continue
        loc.link(shard_rel(group, other, plan.name), shard_rel(group, version, plan.name))
        part = {**part, "version": version, "file": {**part["file"], "version": version}}
        save_part(loc, part)
        return part
    return None


# Temporary names of interrupted writes: ``write_atomic``'s ``.NAME.tmp-PID`` and the catalog's
# ``.NAME.parquet.tmp``.
_LEFTOVERS = (
    ".*.tmp-*",
    "artifacts/.*.tmp-*",
    "catalog/.*.tmp*",
    "shards/*/*/.*.tmp-*",
    "versions/*/*/.*.tmp-*",
    "versions/*/*/parts/.*.tmp-*",
)


def remove_leftovers(store) -> int:
    """Delete temporary files of interrupted local writes (shards, part and group records,
    artifacts, catalog tables, ``store.json``); returns how many."""
    loc = as_location(store)
    if loc.remote:
        return 0  # an object appears only when its upload completes: nothing half-written
    n = 0
    for pattern in _LEFTOVERS:
        for leftover in loc.path.glob(pattern):
            leftover.unlink(missing_ok=True)
            n += 1
    return n
