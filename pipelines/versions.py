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
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.shards import ShardPlan, write_atomic

VERSIONS_DIR = "versions"
VERSION_CHARS = 16  # hex digits of sha256 kept in a version name


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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
    """Fingerprint of a shard's rows: name, keys in order, labels, splits and media sources."""
    return _sha([plan.name, [(s.key, s.split, s.label, s.media) for s in plan.samples]])


def fit_key(extractor: str, extractor_version: int, params: dict, train_samples) -> str:
    """What a fitted artifact is a function of: the extractor config and the train rows."""
    rows = [(s.key, s.label, s.media) for s in train_samples]
    return _sha([extractor, extractor_version, params, rows])


def version_dir(store: Path, group: str, version: str) -> Path:
    return Path(store) / VERSIONS_DIR / group / version


def shard_dir(store: Path, group: str, version: str) -> Path:
    return Path(store) / "shards" / group / version


def part_path(store: Path, group: str, version: str, shard: str) -> Path:
    return version_dir(store, group, version) / "parts" / f"{shard}.json"


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


def save_part(store: Path, part: dict) -> None:
    """Record a finished shard of one group version (call after the tar is in place)."""
    path = part_path(store, part["group"], part["version"], part["shard"])
    write_atomic(path, json.dumps(_to_jsonable(part)).encode())


def load_part(store: Path, group: str, version: str, plan: ShardPlan) -> dict | None:
    """A finished shard's part, if it is for these rows and its tar is present and whole."""
    path = part_path(store, group, version, plan.name)
    if not path.exists():
        return None
    try:
        part = _from_jsonable(json.loads(path.read_text()))
    except ValueError:
        return None
    if part.get("failed") or part.get("rows") != rows_hash(plan):
        return None  # placeholders of a shard whose task kept crashing are retried
    tar = shard_dir(store, group, version) / f"{plan.name}.tar"
    if not tar.exists() or tar.stat().st_size != part["file"]["bytes"]:
        return None
    return part


def write_group_meta(store: Path, group: str, version: str, meta: dict) -> None:
    path = version_dir(store, group, version) / "group.json"
    write_atomic(path, json.dumps(_to_jsonable(meta), indent=2).encode())


def read_group_meta(store: Path, group: str, version: str) -> dict | None:
    path = version_dir(store, group, version) / "group.json"
    try:
        return _from_jsonable(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def list_versions(store: Path) -> dict[str, list[str]]:
    """Every group version on disk: {group: [version, ...]} (sorted)."""
    root = Path(store) / VERSIONS_DIR
    if not root.is_dir():
        return {}
    return {
        g.name: sorted(v.name for v in g.iterdir() if v.is_dir())
        for g in sorted(root.iterdir())
        if g.is_dir()
    }


def find_fitted(store: Path, group: str, key: str) -> dict | None:
    """The ``group.json`` of an existing version of ``group`` fitted with the same fit key.

    Its ``artifact`` (path, sha256, fit key) and ``fit_errors`` let a run skip the fit.
    """
    for version in list_versions(store).get(group, []):
        meta = read_group_meta(store, group, version)
        art = (meta or {}).get("artifact")
        if art and art.get("fit_key") == key and (Path(store) / art["path"]).exists():
            return meta
    return None


def _link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (copy where links are not supported); atomic at ``dst``."""
    tmp = dst.parent / f".{dst.name}.tmp-link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def reuse_shard(store: Path, group: str, version: str, cfg_hash: str, plan: ShardPlan) -> dict | None:
    """Take a shard from another version of ``group`` with the same config and the same rows.

    The tar is hard-linked (its bytes and modification time stay those of the original) and
    the part is copied under this version. Returns the part, or None when no version has it.
    """
    for other in list_versions(store).get(group, []):
        if other == version:
            continue
        meta = read_group_meta(store, group, other)
        if meta is None or meta.get("config_hash") != cfg_hash:
            continue
        part = load_part(store, group, other, plan)
        if part is None:
            continue
        dst = shard_dir(store, group, version) / f"{plan.name}.tar"
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link(shard_dir(store, group, other) / f"{plan.name}.tar", dst)
        part = {**part, "version": version, "file": {**part["file"], "version": version}}
        save_part(store, part)
        return part
    return None


def remove_leftovers(store: Path) -> int:
    """Delete temporary files of interrupted shard writes; returns how many."""
    n = 0
    for leftover in (Path(store) / "shards").glob("*/*/.*.tmp-*"):
        leftover.unlink(missing_ok=True)
        n += 1
    return n
