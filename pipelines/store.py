"""The feature store on disk: ``store.json``, the Parquet catalog and the shard files.

Layout::

    STORE/
      store.json                      groups (extractor, version, params, fields, dir), splits, classes
      catalog/samples.parquet         key, split, label, shard, index, has_<group>
      catalog/shards.parquet          group, version, shard, split, samples, bytes, sha256
      catalog/errors.parquet          key, group, shard, stage, error_type, message
      catalog/members.parquet         group, shard, member, offset, size (byte offsets in the tar)
      artifacts/<group>-<sha>.npz     fitted state of fit-then-transform extractors (train split)
      versions/<group>/<version>/     group.json, parts/<shard>.json, stats.npz (pipelines/versions.py)
      shards/<group>/<version>/<split>-NNNNNN.tar

The catalog and ``store.json`` describe the active version of every group (the latest
config's); other versions stay beside them until ``modalstore gc``. ``store.json`` is
written last: a store without it is incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from features.errors import StoreError
from features.spec import FieldSpec
from pipelines.shards import write_atomic, write_error
from pipelines.spill import release_arrow_memory
from pipelines.storage import Location, as_location, is_url, local_path

STORE_FILE = "store.json"
# Row groups of the catalog tables: rows are in shard order, so a lookup by shard reads one
# row group (members: ``get`` and the loader's per-shard member lists).
CATALOG_ROW_GROUP = 8192
# The key index (catalog/keys.parquet: samples sorted by key) and members.parquet use small
# row groups: a point lookup reads one of ~8k rows, whatever the store's size (BENCHMARKS.md).
LOOKUP_ROW_GROUP = 8192
FORMAT_VERSION = 2  # 2: group versions (shards/<group>/<version>/)


def _schema(fields):
    import pyarrow as pa

    return pa.schema([pa.field(n, getattr(pa, t)()) for n, t in fields])


_SCHEMAS = {
    "samples": [  # then one has_<group> bool column per group
        ("key", "string"),
        ("split", "string"),
        ("label", "int64"),
        ("shard", "string"),
        ("index", "int64"),
    ],
    "members": [
        ("group", "string"),
        ("shard", "string"),
        ("member", "string"),
        ("offset", "int64"),
        ("size", "int64"),
    ],
    "errors": [
        ("key", "string"),
        ("group", "string"),
        ("shard", "string"),
        ("stage", "string"),
        ("error_type", "string"),
        ("message", "string"),
    ],
}


def write_catalog(store, plans, tasks, parts: dict, fit_errors: dict) -> None:
    """Write the catalog tables of the active group versions.

    ``parts`` (group -> shard -> part) may be slim (``versions.slim_part``): each shard's
    per-sample rows (presence, member offsets) are read back from its part record one shard at
    a time and streamed into the tables; memory holds one shard's rows, the presence flags as
    bits and a run of the key index's external sort. ``store``: a folder, URL or ``Location``.
    """
    import numpy as np
    import pyarrow as pa

    from pipelines.versions import read_part

    loc = as_location(store)
    files = [parts[t.name][p.name]["file"] for p in plans for t in tasks]
    errors = [e for t in tasks for e in fit_errors.get(t.name, [])]
    errors += [e for p in plans for t in tasks for e in parts[t.name][p.name]["errors"]]
    tables = {
        "shards": pa.Table.from_pylist(files),
        "errors": pa.Table.from_pylist(errors) if errors else _schema(_SCHEMAS["errors"]).empty_table(),
    }
    for name, table in tables.items():
        with _CatalogWriter(loc, name, table.schema, CATALOG_ROW_GROUP) as w:
            w.write(table)

    # members, sorted by shard (each shard's groups in config order): every part is read once;
    # its presence flags are kept for the samples table, packed (one bit a sample)
    present: dict[tuple[str, str], tuple[np.ndarray, int]] = {}
    members = _schema(_SCHEMAS["members"])
    with _CatalogWriter(loc, "members", members, LOOKUP_ROW_GROUP) as w:
        for plan in sorted(plans, key=lambda p: p.name):
            for t in tasks:
                part = read_part(loc, t.name, t.version, plan.name)
                present[t.name, plan.name] = (
                    np.packbits(np.array(part["present"], bool)),
                    len(part["present"]),
                )
                name, offset, size = zip(*part["members"], strict=True) if part["members"] else ((), (), ())
                n = len(name)
                w.write(
                    pa.table(
                        {
                            "group": pa.array([t.name] * n, pa.string()),
                            "shard": pa.array([plan.name] * n, pa.string()),
                            "member": pa.array(name, pa.string()),
                            "offset": pa.array(offset, pa.int64()),
                            "size": pa.array(size, pa.int64()),
                        },
                        schema=members,
                    )
                )
    # samples in plan order; the key index (keys.parquet) sorted by key
    schema = pa.schema(
        [*_schema(_SCHEMAS["samples"]), *(pa.field(f"has_{t.name}", pa.bool_()) for t in tasks)]
    )
    key_schema = pa.schema([schema.field(c) for c in ("key", "split", "label", "shard", "index")])
    key_index = _KeyIndex(plans, key_schema)
    with _CatalogWriter(loc, "samples", schema, CATALOG_ROW_GROUP) as w:
        for number, plan in enumerate(plans):
            rows = _as_table(plan.samples)
            n = len(rows)
            labels = pa.array(rows.labels, pa.int64())
            table = pa.table(
                {
                    "key": rows.keys,
                    "split": pa.array([plan.split] * n, pa.string()),
                    "label": labels,
                    "shard": pa.array([plan.name] * n, pa.string()),
                    "index": pa.array(np.arange(n), pa.int64()),
                    **{f"has_{t.name}": pa.array(_unpack(*present.pop((t.name, plan.name)))) for t in tasks},
                },
                schema=schema,
            )
            w.write(table)
            key_index.add(number, table.column("key"), labels)
    with _CatalogWriter(loc, "keys", key_schema, LOOKUP_ROW_GROUP) as w:
        key_index.write(w)
    release_arrow_memory()


def _unpack(bits, n: int):
    import numpy as np

    return np.unpackbits(bits, count=n).astype(bool)


def _as_table(samples):
    """Keys and labels of a plan's samples as a SampleTable (media not read)."""
    from pipelines.manifest import SampleTable

    if hasattr(samples, "table"):  # SplitRows or SampleTable
        return samples.table(media=False)
    return SampleTable.from_samples(samples)


# Rows per sorted run of the key index: the most the catalog step holds of it at once.
KEY_SORT_RUN = 16384
KEY_MERGE_BATCH = 1024  # rows read from each run at a time while merging


class _KeyIndex:
    """catalog/keys.parquet (every sample's row, sorted by key) by an external merge sort
    (``pipelines.spill.ExternalSort``): rows come in plan order, every ``KEY_SORT_RUN`` of them
    are sorted and spilled to an anonymous temporary file, and ``write`` merges the runs
    ``KEY_MERGE_BATCH`` rows a run at a time. A 1M-sample store has 62 runs, merged 16 at a time."""

    def __init__(self, plans, schema) -> None:
        import pyarrow as pa

        from pipelines.spill import ExternalSort

        self.schema = schema
        # split and shard names by plan number: a row carries 4 bytes for them while sorting
        self.splits = pa.array([p.split for p in plans], pa.string())
        self.names = pa.array([p.name for p in plans], pa.string())
        sort_schema = pa.schema(
            [("key", pa.string()), ("plan", pa.int32()), ("index", pa.int64()), ("label", pa.int64())]
        )
        self.sort = ExternalSort(sort_schema, ["key"], KEY_SORT_RUN, KEY_MERGE_BATCH, "modalstore-keys-")

    def add(self, number: int, keys, labels) -> None:
        import numpy as np
        import pyarrow as pa

        n = len(keys)
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        plan, index = pa.array(np.full(n, number, np.int32)), pa.array(np.arange(n, dtype=np.int64))
        self.sort.add(pa.table([keys, plan, index, labels], schema=self.sort.schema))

    def _expand(self, table):
        """Sort-table rows as key-index rows (split and shard names from the plan number)."""
        import pyarrow as pa

        of = table.column("plan")
        columns = {
            "key": table.column("key"),
            "split": self.splits.take(of),
            "label": table.column("label"),
            "shard": self.names.take(of),
            "index": table.column("index"),
        }
        return pa.table(columns, schema=self.schema)

    def write(self, writer) -> None:
        with self.sort:
            for table in self.sort.merged():
                writer.write(self._expand(table))


class _CatalogWriter:
    """One catalog table, written in row groups of exactly ``rows`` rows (the last may be
    shorter) as tables are appended, to a temporary file published on close; a write error
    (a full disk) leaves nothing under the final name."""

    def __init__(self, loc: Location, name: str, schema, rows: int) -> None:
        import pyarrow.parquet as pq

        self.loc, self.rel, self.rows = loc, f"catalog/{name}.parquet", rows
        self.tmp = loc.staging_dir(self.rel) / f".{name}.parquet.tmp"
        self.pending: list = []
        self.count = 0
        try:
            self.writer = pq.ParquetWriter(self.tmp, schema)
        except OSError as exc:
            self._fail(exc)

    def write(self, table) -> None:
        self.pending.append(table)
        self.count += table.num_rows
        while self.count >= self.rows:
            self._flush(self.rows)

    def _flush(self, n: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.pending)
        try:
            self.writer.write_table(table.slice(0, n), row_group_size=n)  # chunks and all: one row group
        except OSError as exc:
            self._fail(exc)
        rest = table.slice(n)
        self.pending, self.count = [rest], rest.num_rows
        # Arrow's allocator keeps the pages a row group's encoding freed: writing 300k member
        # rows raised RSS by 35 MB with nothing allocated, and by 0 with this (BENCHMARKS.md)
        release_arrow_memory()

    def _fail(self, exc: OSError):
        self.tmp.unlink(missing_ok=True)
        if self.loc.remote:
            shutil.rmtree(self.tmp.parent, ignore_errors=True)
        raise write_error(Path(str(self.loc.join(self.rel))), exc) from exc

    def __enter__(self) -> _CatalogWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self.count:
                    self._flush(self.count)
                self.writer.close()
                self.loc.put_file(self.tmp, self.rel)
            else:
                self.writer.close()
                self.tmp.unlink(missing_ok=True)
        except OSError as exc2:
            self._fail(exc2)
        finally:
            if self.loc.remote:
                shutil.rmtree(self.tmp.parent, ignore_errors=True)


def write_store_manifest(store, body: dict) -> None:
    """Write ``store.json`` (last: it marks the store complete)."""
    meta = {"format": "modalstore", "format_version": FORMAT_VERSION, **body}
    as_location(store).write_bytes(STORE_FILE, json.dumps(meta, indent=2, default=str).encode())


@dataclass
class Store:
    """Read side of a store: metadata, field specs, shard paths and catalog tables."""

    root: Path  # the store folder; for a remote store, a local copy of its metadata and catalog
    meta: dict
    url: str | None = None  # a remote store's fsspec URL: shards are read from there

    @property
    def groups(self) -> list[str]:
        return list(self.meta["groups"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    def check_groups(self, groups: list[str] | None) -> list[str]:
        if groups is None:
            return self.groups
        unknown = [g for g in groups if g not in self.meta["groups"]]
        if unknown:
            raise StoreError(f"{self.root}: unknown group(s) {unknown}; the store has {self.groups}")
        return list(groups)

    def stats(self, group: str) -> dict[str, dict]:
        """Train-split statistics of a group's fields: {field: {mean, std, min, max, count}}."""
        from pipelines.stats import load_stats

        self.check_groups([group])
        info = self.meta["groups"][group].get("stats")
        if info is None:
            raise StoreError(f"{self.root}: group {group!r} has no statistics (no train samples?)")
        return load_stats(self.root / info["path"])

    def field_specs(self, group: str) -> dict[str, FieldSpec]:
        self.check_groups([group])
        return {k: FieldSpec.from_dict(v) for k, v in self.meta["groups"][group]["fields"].items()}

    def shards(self, split: str) -> list[str]:
        try:
            return list(self.meta["splits"][split]["shards"])
        except KeyError:
            raise StoreError(
                f"{self.root}: no split {split!r}; splits: {sorted(self.meta['splits'])}"
            ) from None

    def num_samples(self, split: str) -> int:
        return int(self.meta["splits"][split]["samples"])

    def shard_path(self, group: str, shard: str) -> Path | str:
        """The shard's local path, or its URL for a remote store."""
        rel = f"{self.meta['groups'][group]['dir']}/{shard}.tar"
        return f"{self.url}/{rel}" if self.url else self.root / rel

    def select(self, filter=None, split: str | None = None) -> list[str]:
        """Shards holding the samples that match, in store order, without rewriting data.

        ``filter`` is a pyarrow expression over ``catalog/samples.parquet`` columns, e.g.
        ``pc.field("label").isin([3, 5])`` or ``pc.field("has_audio")``; hand the result to
        ``StreamingLoader(..., shards=...)``.
        """
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        expr = None if split is None else pc.field("split") == split
        if filter is not None:
            expr = filter if expr is None else expr & filter
        table = pq.read_table(self.root / "catalog" / "samples.parquet", columns=["shard"], filters=expr)
        wanted = set(pc.unique(table.column("shard")).to_pylist())
        order = [
            sh for sp in ("train", "val", "test") for sh in self.meta["splits"].get(sp, {}).get("shards", [])
        ]
        return [sh for sh in order if sh in wanted]

    def table(self, name: str):
        """A catalog table (``samples``, ``shards``, ``errors``, ``members``) as a pyarrow Table."""
        import pyarrow.parquet as pq

        path = self.root / "catalog" / f"{name}.parquet"
        if not path.exists():
            raise StoreError(f"{self.root}: catalog table {name!r} missing ({path})")
        return pq.read_table(path)


def _check_meta(where: str, meta) -> None:
    if not isinstance(meta, dict) or meta.get("format") != "modalstore":
        raise StoreError(f"{where}: not a modalstore store manifest")
    if meta.get("format_version", 0) < FORMAT_VERSION:
        raise StoreError(
            f"{where}: store format {meta.get('format_version')} predates group versions "
            f"(format {FORMAT_VERSION}); re-extract it: modalstore extract CONFIG --overwrite"
        )
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(
            f"{where}: store format {meta['format_version']} is newer than this modalstore "
            f"understands ({FORMAT_VERSION}); upgrade modalstore"
        )


def _parse_meta(where: str, data: bytes) -> dict:
    try:
        meta = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"{where}: corrupt store manifest: {exc}") from exc
    _check_meta(where, meta)
    return meta


def cache_root() -> Path:
    """Where remote stores' metadata is copied: ``$MODALSTORE_CACHE`` or ``~/.cache/modalstore``."""
    return Path(os.environ.get("MODALSTORE_CACHE") or Path.home() / ".cache" / "modalstore")


def _open_remote(url: str) -> Store:
    """A store at an fsspec URL: ``store.json``, the catalog and the active groups' statistics
    are copied to a local cache (keyed by URL and ``store.json`` content, so a store that
    changes gets a fresh copy); shards stay remote and are read from the URL."""
    import hashlib

    loc = Location(url)
    try:
        data = loc.read_bytes(STORE_FILE)
    except FileNotFoundError:
        hint = " (extraction did not finish; run extract again)" if loc.exists("shards") else ""
        raise StoreError(f"{url}: not a modalstore store: {STORE_FILE} missing{hint}") from None
    meta = _parse_meta(f"{url}/{STORE_FILE}", data)
    key = hashlib.sha256(loc.url.encode()).hexdigest()[:16]
    root = cache_root() / "remote" / key / hashlib.sha256(data).hexdigest()[:16]
    if not (root / STORE_FILE).exists():
        wanted = [f"catalog/{name}.parquet" for name in ("samples", "shards", "errors", "members", "keys")]
        wanted += [g["stats"]["path"] for g in meta["groups"].values() if g.get("stats")]
        for rel in wanted:
            if loc.exists(rel):
                write_atomic(root / rel, loc.read_bytes(rel))
        write_atomic(root / STORE_FILE, data)  # last: a complete copy
    return Store(root=root, meta=meta, url=loc.url)


def open_store(path: str | Path) -> Store:
    """Open a finished store (a folder or an fsspec URL); a missing or incomplete one is a StoreError."""
    if is_url(path):
        return _open_remote(str(path))
    root = local_path(path)
    meta_path = root / STORE_FILE
    if not meta_path.exists():
        hint = " (extraction did not finish; run extract again)" if (root / "shards").exists() else ""
        raise StoreError(f"{root}: not a modalstore store: {STORE_FILE} missing{hint}")
    return Store(root=root, meta=_parse_meta(str(meta_path), meta_path.read_bytes()))
