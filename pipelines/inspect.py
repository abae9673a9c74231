"""What a store holds: groups, splits, sizes, presence and errors, from store.json and the catalog.

Everything is computed with pyarrow (``group_by``/``aggregate`` over the needed columns only),
so inspecting a catalog of a million samples reads a few columns, never Python rows.
``catalog/members.parquet``, the largest table, is not read: its row count comes from the
Parquet footer.
"""

from __future__ import annotations

from pathlib import Path

from features.errors import StoreError
from pipelines.store import Store, open_store
from pipelines.versions import list_versions, shard_dir

CATALOG_TABLES = ("samples", "shards", "errors", "members")


def catalog_path(store: Store, name: str) -> Path:
    path = store.root / "catalog" / f"{name}.parquet"
    if not path.exists():
        raise StoreError(f"{store.root}: catalog table {name!r} missing ({path})")
    return path


def read_columns(store: Store, name: str, columns: list[str], filters=None):
    """Only ``columns`` of a catalog table; a missing column is a StoreError naming it."""
    import pyarrow.parquet as pq

    path = catalog_path(store, name)
    names = pq.read_schema(path).names
    missing = [c for c in columns if c not in names]
    if missing:
        raise StoreError(f"{path}: column(s) {missing} missing (has {names}); the catalog is damaged")
    return pq.read_table(path, columns=columns, filters=filters)


def inspect_store(path: str | Path) -> dict:
    """Summary of a store as a JSON-ready dict; ``format_inspect`` prints it as tables."""
    import pyarrow.parquet as pq

    store = open_store(path)
    meta = store.meta
    groups = store.groups

    has_cols = [f"has_{g}" for g in groups]
    samples = read_columns(store, "samples", ["split", *has_cols])
    by_split = {
        r["split"]: r
        for r in samples.group_by("split")
        .aggregate([("split", "count"), *[(c, "sum") for c in has_cols]])
        .to_pylist()
    }

    shards = read_columns(store, "shards", ["group", "bytes"])
    by_group = {
        r["group"]: r
        for r in shards.group_by("group").aggregate([("bytes", "sum"), ("bytes", "count")]).to_pylist()
    }

    errors = read_columns(store, "errors", ["group", "stage", "error_type"])
    error_rows = (
        errors.group_by(["group", "stage", "error_type"])
        .aggregate([([], "count_all")])
        .sort_by([("group", "ascending"), ("stage", "ascending"), ("error_type", "ascending")])
        .to_pylist()
    )
    errors_by_group: dict[str, int] = {}
    for r in error_rows:  # one row per (group, stage, error type): a handful, not per sample
        errors_by_group[r["group"]] = errors_by_group.get(r["group"], 0) + r["count_all"]

    # Splits of store.json in their order, then any the catalog has that store.json lacks.
    split_names = [*meta["splits"], *sorted(set(by_split) - set(meta["splits"]))]
    splits = {}
    for split in split_names:
        row = by_split.get(split, {})
        splits[split] = {
            "samples": int(row.get("split_count", 0)),
            "shards": len(meta["splits"].get(split, {}).get("shards", [])),
            "present": {g: int(row.get(f"has_{g}_sum") or 0) for g in groups},
        }

    group_info = {}
    for g in groups:
        gm = meta["groups"][g]
        stats = gm.get("stats")
        group_info[g] = {
            "extractor": gm["extractor"],
            "extractor_version": gm["extractor_version"],
            "version": gm["version"],
            "modality": gm.get("modality"),
            "params": gm.get("params", {}),
            "fields": {
                f: {"dtype": v["dtype"], "shape": v["shape"]} for f, v in (gm.get("fields") or {}).items()
            },
            "stats": stats is not None and (store.root / stats["path"]).exists(),
            "artifact": gm.get("artifact"),
            "shards": int(by_group.get(g, {}).get("bytes_count", 0)),
            "bytes": int(by_group.get(g, {}).get("bytes_sum") or 0),
            "present": sum(s["present"][g] for s in splits.values()),
            "errors": errors_by_group.get(g, 0),
        }

    manifest = meta.get("manifest", {})
    on_disk = list_versions(store.root)
    inactive = [
        {"group": g, "version": v, "bytes": _dir_bytes(shard_dir(store.root, g, v))}
        for g, versions in on_disk.items()
        for v in versions
        if meta["groups"].get(g, {}).get("version") != v
    ]
    return {
        "path": str(store.root),
        "format_version": meta.get("format_version"),
        "created": meta.get("created"),
        "manifest": {k: manifest.get(k) for k in ("path", "sha256", "rows")},
        "classes": store.classes,
        "samples": samples.num_rows,
        "bytes": sum(gi["bytes"] for gi in group_info.values()),
        "splits": splits,
        "groups": group_info,
        "errors": {
            "total": errors.num_rows,
            "by_group_stage_type": [
                {
                    "group": r["group"],
                    "stage": r["stage"],
                    "error_type": r["error_type"],
                    "count": r["count_all"],
                }
                for r in error_rows
            ],
        },
        "inactive_versions": inactive,
        "catalog_rows": {
            name: pq.ParquetFile(catalog_path(store, name)).metadata.num_rows for name in CATALOG_TABLES
        },
    }


def format_table(header: list[str], rows: list[list], indent: str = "", right: tuple[str, ...] = ()) -> str:
    """Rows as aligned columns: numbers (and the ``right`` columns) right-aligned, text left-aligned."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    numeric = [
        header[i] in right or (bool(rows) and all(isinstance(r[i], int | float) for r in rows))
        for i in range(len(header))
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        lines.append(indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _shape(shape) -> str:
    return (
        "(" + ", ".join("*" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    )


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.tar")) if path.is_dir() else 0


def format_inspect(info: dict) -> str:
    """The human-readable ``modalstore inspect`` report."""
    groups = list(info["groups"])
    manifest = info["manifest"]
    classes = info["classes"]
    shown = ", ".join(classes[:12]) + (f", ... ({len(classes) - 12} more)" if len(classes) > 12 else "")
    out = [
        f"store     {info['path']}",
        f"format    modalstore {info['format_version']}"
        + (f", created {info['created']}" if info["created"] else ""),
        f"manifest  {manifest['path']} ({manifest['rows']} rows, sha256 {manifest['sha256']})",
        f"classes   {len(classes)}: {shown}",
        f"samples   {info['samples']} in {human_bytes(info['bytes'])} of shards",
        "",
        "splits (group columns: samples with that group present)",
    ]
    rows = [
        [name, s["samples"], s["shards"], *(s["present"][g] for g in groups)]
        for name, s in info["splits"].items()
    ]
    rows.append(
        [
            "total",
            info["samples"],
            sum(s["shards"] for s in info["splits"].values()),
            *(info["groups"][g]["present"] for g in groups),
        ]
    )
    out += [format_table(["split", "samples", "shards", *groups], rows, "  "), "", "groups"]
    rows = []
    for g, gi in info["groups"].items():
        fields = ", ".join(f"{f} {v['dtype']}{_shape(v['shape'])}" for f, v in gi["fields"].items()) or "-"
        rows.append(
            [
                g,
                f"{gi['extractor']} v{gi['extractor_version']}",
                gi["version"],
                fields,
                gi["shards"],
                human_bytes(gi["bytes"]),
                gi["present"],
                gi["errors"],
                "yes" if gi["stats"] else "no",
                gi["artifact"]["path"] if gi["artifact"] else "-",
            ]
        )
    out.append(
        format_table(
            [
                "group",
                "extractor",
                "version",
                "fields",
                "shards",
                "size",
                "present",
                "errors",
                "stats",
                "artifact",
            ],
            rows,
            "  ",
            right=("size",),
        )
    )
    for g, gi in info["groups"].items():
        params = " ".join(f"{k}={v}" for k, v in gi["params"].items())
        out.append(f"  {g} params: {params or '-'}")
    if info["inactive_versions"]:
        out += ["", "other versions on disk (not in the catalog; `modalstore gc` lists and removes them)"]
        rows = [[r["group"], r["version"], human_bytes(r["bytes"])] for r in info["inactive_versions"]]
        out.append(format_table(["group", "version", "size"], rows, "  ", right=("size",)))
    out += ["", f"errors    {info['errors']['total']}"]
    if info["errors"]["by_group_stage_type"]:
        rows = [
            [r["group"], r["stage"], r["error_type"], r["count"]]
            for r in info["errors"]["by_group_stage_type"]
        ]
        out.append(format_table(["group", "stage", "error_type", "count"], rows, "  "))
    return "\n".join(out)
