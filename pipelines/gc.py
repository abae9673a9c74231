"""``modalstore gc``: remove group versions no config refers to.

Kept: the active version of every group (``store.json``) and the versions the given
extraction configs would produce (so a config you switch back and forth between keeps its
shards). Removed: every other version (its ``versions/<group>/<version>/`` record and its
``shards/<group>/<version>/`` folder), fitted artifacts no kept version uses, and temporary
files of interrupted writes. Shards a kept version shares by hard link stay readable: only
the removed version's link goes.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from features.errors import StoreError
from pipelines.store import open_store
from pipelines.versions import VERSIONS_DIR, list_versions, read_group_meta, shard_dir, version_dir


@dataclass
class GcPlan:
    store: str
    keep: dict[str, list[str]]  # group -> versions kept
    versions: list[tuple[str, str]] = field(default_factory=list)  # (group, version) to remove
    paths: list[Path] = field(default_factory=list)  # files and folders to remove
    bytes: int = 0  # freed on disk (files not also linked from a kept version)

    @property
    def empty(self) -> bool:
        return not self.paths


def _size(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.stat().st_nlink == 1)


def config_versions(config_path: str | Path, store: Path) -> dict[str, str]:
    """The version every group of an extraction config has (or would have) in ``store``.

    A fit-then-transform group that was never fitted on this train split has no version yet.
    """
    from features.registry import get_extractor
    from pipelines.extract import load_extract_config, prepare, version_tasks
    from pipelines.versions import find_fitted, fit_key

    config = load_extract_config(config_path)
    if Path(config.store).resolve() != store.resolve():
        raise StoreError(f"{config_path}: config is for store {config.store!r}, not {str(store)!r}")
    manifest, _, tasks, _ = prepare(config, incremental=False)
    train = [s for s in manifest.samples if s.split == "train"]
    known = []
    for task in tasks:
        cls = get_extractor(task.extractor)
        if cls.fit_required:
            fitted = find_fitted(store, task.name, fit_key(task.extractor, cls.version, task.params, train))
            if fitted is None:
                continue
            task = dataclasses.replace(task, artifact=str(store / fitted["artifact"]["path"]))
        known.append(task)
    return {t.name: t.version for t in version_tasks(config, manifest, tuple(known))}


def plan_gc(path: str | Path, configs: list[str | Path] = ()) -> GcPlan:
    """What ``gc`` would remove from the store at ``path``, keeping active and configs' versions."""
    store = open_store(path)
    if store.url is not None:
        raise StoreError(
            f"{store.url}: gc works on local stores only so far; list versions with "
            "`modalstore inspect` and delete them with your object store's tools"
        )
    root = store.root
    keep: dict[str, set[str]] = {g: {store.meta["groups"][g]["version"]} for g in store.groups}
    for cfg in configs:
        for g, v in config_versions(cfg, root).items():
            keep.setdefault(g, set()).add(v)
    plan = GcPlan(str(root), {g: sorted(v) for g, v in keep.items()})
    on_disk = list_versions(root)
    for g, versions in on_disk.items():
        for v in versions:
            if v not in keep.get(g, set()):
                plan.versions.append((g, v))
                plan.paths += [p for p in (version_dir(root, g, v), shard_dir(root, g, v)) if p.exists()]
    shards = root / "shards"
    if shards.is_dir():  # shard folders without a version record: an unfinished write or stray copy
        for gdir in sorted(p for p in shards.iterdir() if p.is_dir()):
            for vdir in sorted(p for p in gdir.iterdir() if p.is_dir()):
                if vdir.name not in on_disk.get(gdir.name, []):
                    plan.paths.append(vdir)
    used = {
        (read_group_meta(root, g, v) or {}).get("artifact", {}).get("path")
        for g, vs in keep.items()
        for v in vs
    }
    artifacts = root / "artifacts"
    if artifacts.is_dir():
        plan.paths += [p for p in sorted(artifacts.iterdir()) if f"artifacts/{p.name}" not in used]
    removed = set(plan.paths)
    plan.paths += [
        p
        for sub in ("shards", VERSIONS_DIR, "catalog")
        for p in sorted((root / sub).rglob(".*.tmp*"))
        if not any(parent in removed for parent in p.parents)
    ]
    plan.bytes = sum(_size(p) for p in plan.paths)
    return plan


def run_gc(plan: GcPlan) -> None:
    """Remove what ``plan`` lists."""
    for p in plan.paths:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for sub in ("shards", VERSIONS_DIR):  # group folders left empty
        base = Path(plan.store) / sub
        for gdir in base.iterdir() if base.is_dir() else ():
            if gdir.is_dir() and not any(gdir.iterdir()):
                gdir.rmdir()
