"""``modalstore gc``: remove group versions no config refers to (local or remote stores).

Kept: the active version of every group (``store.json``) and the versions the given
extraction configs would produce (so a config you switch back and forth between keeps its
shards). Removed: every other version (its ``versions/<group>/<version>/`` record and its
``shards/<group>/<version>/`` folder), fitted artifacts no kept version uses, and temporary
files of interrupted writes. Shards a kept version shares by hard link stay readable: only
the removed version's link goes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from features.errors import StoreError
from pipelines.storage import Location
from pipelines.store import open_store
from pipelines.versions import VERSIONS_DIR, list_versions, read_group_meta, version_rel


@dataclass
class GcPlan:
    store: str  # folder or URL
    keep: dict[str, list[str]]  # group -> versions kept
    versions: list[tuple[str, str]] = field(default_factory=list)  # (group, version) to remove
    paths: list[str] = field(default_factory=list)  # files and folders to remove, relative to the store
    bytes: int = 0  # freed (local stores: files not also linked from a kept version)

    @property
    def empty(self) -> bool:
        return not self.paths


def _size(loc: Location, rel: str) -> int:
    if loc.remote:
        return int(loc.fs.du(f"{loc.base}/{rel}"))
    path = loc.path / rel
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.stat().st_nlink == 1)


def config_versions(config_path: str | Path, store: Location) -> dict[str, str]:
    """The version every group of an extraction config has (or would have) in ``store``.

    A fit-then-transform group that was never fitted on this train split has no version yet.
    """
    from features.registry import get_extractor
    from pipelines.extract import fit_rows, load_extract_config, prepare, version_tasks
    from pipelines.versions import find_fitted, fit_key

    config = load_extract_config(config_path)
    same = (
        Location(config.store).url == store.url
        if store.remote
        else not Location(config.store).remote
        and Location(config.store).path.resolve() == store.path.resolve()
    )
    if not same:
        raise StoreError(f"{config_path}: config is for store {config.store!r}, not {str(store)!r}")
    manifest, _, tasks, _ = prepare(config, incremental=False)
    known = []
    for task in tasks:
        cls = get_extractor(task.extractor)
        if cls.fit_required:
            train = fit_rows(manifest, task)
            fitted = find_fitted(store, task.name, fit_key(task.extractor, cls.version, task.params, train))
            if fitted is None:
                continue
            art = fitted["artifact"]
            task = dataclasses.replace(
                task, artifact=str(store.join(art["path"])), artifact_sha=art["sha256"]
            )
        known.append(task)
    return {t.name: t.version for t in version_tasks(config, manifest, tuple(known))}


def plan_gc(path: str | Path, configs: list[str | Path] = ()) -> GcPlan:
    """What ``gc`` would remove from the store at ``path`` (a folder or an fsspec URL),
    keeping the active versions and those the ``configs`` produce."""
    store = open_store(path)
    loc = Location(store.url or store.root)
    keep: dict[str, set[str]] = {g: {store.meta["groups"][g]["version"]} for g in store.groups}
    for cfg in configs:
        for g, v in config_versions(cfg, loc).items():
            keep.setdefault(g, set()).add(v)
    plan = GcPlan(str(loc), {g: sorted(v) for g, v in keep.items()})
    on_disk = list_versions(loc)
    for g, versions in on_disk.items():
        for v in versions:
            if v not in keep.get(g, set()):
                plan.versions.append((g, v))
                plan.paths += [rel for rel in (version_rel(g, v), f"shards/{g}/{v}") if loc.exists(rel)]
    for g in loc.listdir("shards"):  # shard folders without a version record: a stray copy
        for v in loc.listdir(f"shards/{g}"):
            if v not in on_disk.get(g, []) and not v.startswith("."):
                plan.paths.append(f"shards/{g}/{v}")
    used = {
        (read_group_meta(loc, g, v) or {}).get("artifact", {}).get("path")
        for g, vs in keep.items()
        for v in vs
    }
    plan.paths += [f"artifacts/{a}" for a in loc.listdir("artifacts") if f"artifacts/{a}" not in used]
    if not loc.remote:  # temporary files of interrupted local writes (objects appear whole)
        removed = set(plan.paths)
        for sub in ("shards", VERSIONS_DIR, "catalog"):
            for p in sorted((loc.path / sub).rglob(".*.tmp*")):
                rel = p.relative_to(loc.path)
                if not any(str(parent) in removed for parent in rel.parents):
                    plan.paths.append(str(rel))
    plan.bytes = sum(_size(loc, rel) for rel in plan.paths)
    return plan


def run_gc(plan: GcPlan) -> None:
    """Remove what ``plan`` lists, then group folders left empty."""
    loc = Location(plan.store)
    for rel in plan.paths:
        loc.remove(rel)
    if not loc.remote:  # object stores have no empty folders
        for sub in ("shards", VERSIONS_DIR):
            base = loc.path / sub
            for gdir in base.iterdir() if base.is_dir() else ():
                if gdir.is_dir() and not any(gdir.iterdir()):
                    gdir.rmdir()
