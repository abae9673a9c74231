"""Random access to one sample by key: catalog lookup, then a seek and a read per member.

``catalog/samples.parquet`` gives the sample's shard; ``catalog/members.parquet`` gives, per
group, each member's payload offset and size in that shard's tar, so no tar is iterated.
Before decoding, the 512-byte tar header in front of each payload is checked against the
catalog (name, size, checksum): a catalog that no longer matches its shards is an error,
never silently wrong data. Members decode under the loader's rules: ``.npy`` without
pickle and ``.json`` only.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np

from features.errors import ModalstoreError, ShardFormatError, StoreError
from pipelines import shards as shard_format
from pipelines.inspect import catalog_path, format_table
from pipelines.storage import open_url
from pipelines.store import Store, open_store

_HEADER = 512
NPY_MAX_HEADER = 10000  # np.load's max_header_size when allow_pickle=False


def is_npy(suffix: str) -> bool:
    return suffix == "npy" or suffix.endswith(".npy")


def allowed_suffix(suffix: str) -> bool:
    """Whether ``decode_member`` decodes a member with this suffix (``.json``, ``.npy``) at all."""
    return suffix == "json" or is_npy(suffix)


def _decode_plain(shard: str, name: str, suffix: str, data: bytes):
    """Decode one member: ``.json`` or ``.npy`` (no pickle) only; anything else is refused."""
    if suffix == "json":
        try:
            return json.loads(data)
        except ValueError as exc:
            raise ShardFormatError(f"{shard}: member {name!r}: invalid JSON: {exc}") from exc
    if is_npy(suffix):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise ShardFormatError(
                f"{shard}: member {name!r}: not a plain .npy array (pickle refused): {exc}"
            ) from exc
    raise ShardFormatError(
        f"{shard}: member {name!r}: extension {suffix!r} is not allowed (only .npy and .json)"
    )


def decode_member(shard: str, name: str, suffix: str, data):
    """Decode one member under the loader's rules (``.npy`` without pickle, ``.json``), hardened
    for hostile bytes; the streaming loader uses this same function. A ``.npy`` header whose
    shape does not fit the payload is refused before ``np.load`` allocates it, and any other
    decoder failure (``np.load`` raises TokenError, TypeError, EOFError... on crafted headers;
    deeply nested JSON, RecursionError) is a ShardFormatError naming the member."""
    if is_npy(suffix):
        problem = _npy_size_problem(data)
        if problem is not None:
            raise ShardFormatError(f"{shard}: member {name!r}: {problem}")
    try:
        return _decode_plain(shard, name, suffix, data)
    except ModalstoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever bytes a shard holds, the reader names it
        raise ShardFormatError(
            f"{shard}: member {name!r}: cannot decode ({type(exc).__name__}: {exc})"
        ) from exc


def _npy_size_problem(data) -> str | None:
    """Why a ``.npy`` payload cannot hold what its header declares (None: it can, or np.load decides)."""
    fp = io.BytesIO(bytes(data[: 12 + NPY_MAX_HEADER]))
    try:
        version = np.lib.format.read_magic(fp)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(fp, max_header_size=NPY_MAX_HEADER)
        declared = math.prod(shape) * dtype.itemsize
    except Exception:  # noqa: BLE001 - an unreadable header: np.load gives the standard error
        return None
    if dtype.hasobject:
        return None  # np.load(allow_pickle=False) refuses it with the standard message
    held = len(data) - fp.tell()
    if declared != held:
        return f"its .npy header declares {declared:,} bytes of array data ({dtype}, shape {shape}), the member holds {held:,}"
    return None


def _read_member(f, shard: str, name: str, offset: int, size: int) -> bytes:
    """The payload of one member, after checking the tar header just before it."""
    if offset < _HEADER:
        raise ShardFormatError(
            f"{shard}: member {name!r}: catalog offset {offset} is inside the first header"
        )
    if size > shard_format.MAX_MEMBER_BYTES:
        raise ShardFormatError(
            f"{shard}: member {name!r}: {size:,} bytes per the catalog, over the limit of "
            f"{shard_format.MAX_MEMBER_BYTES:,} (refused before reading)"
        )
    end = f.seek(0, os.SEEK_END)  # a local file or an fsspec one (remote store)
    if offset + size > end:
        raise ShardFormatError(
            f"{shard}: member {name!r}: catalog says bytes {offset}..{offset + size}, the shard has {end} "
            "(truncated, or the catalog does not match); run modalstore verify"
        )
    f.seek(offset - _HEADER)
    buf = f.read(_HEADER + size)
    if len(buf) < _HEADER + size:
        raise ShardFormatError(
            f"{shard}: member {name!r}: shard ends before byte {offset + size} (truncated); run modalstore verify"
        )
    try:
        info = tarfile.TarInfo.frombuf(buf[:_HEADER], "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        raise ShardFormatError(
            f"{shard}: member {name!r}: no valid tar header before offset {offset} ({exc}); "
            "the catalog does not match the shard, run modalstore verify"
        ) from exc
    problem = shard_format.member_problem(info)
    if problem is not None:
        raise ShardFormatError(f"{shard}: member {name!r}: {problem}")
    # GNU tar keeps names over 100 bytes in a preceding long-name entry; this header holds a prefix.
    expected = name.encode("utf-8", "surrogateescape")[:100]
    if info.name.encode("utf-8", "surrogateescape")[:100] != expected or info.size != size:
        raise ShardFormatError(
            f"{shard}: member {name!r} ({size} bytes at offset {offset}) per catalog/members.parquet, "
            f"but the tar header there is {info.name!r} ({info.size} bytes); run modalstore verify"
        )
    return buf[_HEADER:]


def point_lookup(store, name: str, column: str, value: str, columns: list[str]):
    """Rows of a catalog table where ``column == value``; the table is sorted by ``column``
    (``keys`` by key, ``members`` by shard), so a binary search over the row groups' min/max
    statistics finds the one or two to read, whatever the store's size."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = catalog_path(store, name)
    pf = pq.ParquetFile(path)
    missing = [c for c in [*columns, column] if c not in pf.schema_arrow.names]
    if missing:
        raise StoreError(
            f"{path}: column(s) {missing} missing; the catalog is damaged, run modalstore verify"
        )
    at = pf.schema_arrow.get_field_index(column)
    meta = pf.metadata

    def bounds(i: int):
        st = meta.row_group(i).column(at).statistics
        return (st.min, st.max) if st is not None and st.has_min_max else (None, None)

    lo, hi = 0, pf.num_row_groups
    while lo < hi:  # the first row group whose max >= value
        mid = (lo + hi) // 2
        top = bounds(mid)[1]
        if top is None:
            lo, hi = 0, pf.num_row_groups  # no statistics: read everything
            break
        if top < value:
            lo = mid + 1
        else:
            hi = mid
    groups = []
    for i in range(lo, pf.num_row_groups):  # the groups from there on that can still hold it
        low = bounds(i)[0]
        if low is not None and low > value:
            break
        groups.append(i)
    table = pf.read_row_groups(groups, columns=list(dict.fromkeys([*columns, column])))
    return table.filter(pc.field(column) == value).select(columns)


def get_sample(path: str | Path | Store, key: str, groups: list[str] | None = None) -> dict:
    """One sample's metadata and arrays, read by random access.

    Returns ``{"key", "split", "label", "shard", "index", "groups": {group: {"present",
    "fields": {field: ndarray}}}}``.
    """
    import pyarrow.compute as pc

    store = path if isinstance(path, Store) else open_store(path)
    groups = store.check_groups(groups)
    # catalog/keys.parquet is sorted by key in small row groups: one is read, whatever the size
    index = "keys" if (store.root / "catalog" / "keys.parquet").exists() else "samples"
    rows = point_lookup(store, index, "key", key, ["key", "split", "label", "shard", "index"])
    if rows.num_rows == 0:
        raise StoreError(f"{store.root}: no sample with key {key!r}")
    if rows.num_rows > 1:
        raise StoreError(
            f"{store.root}: key {key!r} appears {rows.num_rows} times in catalog/samples.parquet"
        )
    row = rows.to_pylist()[0]
    shard = row["shard"]
    members = point_lookup(store, "members", "shard", shard, ["group", "shard", "member", "offset", "size"])
    members = members.filter(
        pc.field("group").isin(groups) & pc.starts_with(pc.field("member"), pattern=f"{key}.")
    ).to_pylist()
    by_group: dict[str, list[dict]] = {g: [] for g in groups}
    for m in members:  # the members of one sample: a handful per group
        by_group[m["group"]].append(m)

    out = {k: row[k] for k in ("key", "split", "label", "shard", "index")}
    out["groups"] = {}
    for g in groups:
        name = f"{store.meta['groups'][g]['dir']}/{shard}.tar"
        if not any(m["member"] == f"{key}.json" for m in by_group[g]):
            raise StoreError(
                f"{name}: catalog/members.parquet has no {key}.json member; run modalstore verify"
            )
        fields, meta = {}, None
        try:
            f = open_url(str(store.shard_path(g, shard)))
        except FileNotFoundError:
            raise StoreError(f"{store.root}: shard file {name} missing; run modalstore verify") from None
        with f:
            for m in by_group[g]:
                suffix = m["member"][len(key) + 1 :]
                data = _read_member(f, name, m["member"], m["offset"], m["size"])
                value = decode_member(name, m["member"], suffix, data)
                if suffix == "json":
                    meta = value
                else:
                    fields[suffix[: -len(".npy")]] = value
        if not isinstance(meta, dict) or meta.get("key") != key:
            raise ShardFormatError(f"{name}: member {key}.json does not describe key {key!r}: {meta!r}")
        out["groups"][g] = {"present": bool(meta.get("present", True)), "fields": fields}
    return out


def format_sample(sample: dict, classes: list[str] | None = None) -> str:
    """The human-readable ``modalstore get`` report: metadata, then one line per field."""
    label = sample["label"]
    name = f" (class {classes[label]!r})" if classes and 0 <= label < len(classes) else ""
    lines = [
        f"key    {sample['key']}",
        f"split  {sample['split']}",
        f"label  {label}{name}",
        f"shard  {sample['shard']} (sample #{sample['index']})",
        "",
    ]
    rows = []
    for g, gs in sample["groups"].items():
        if not gs["present"]:
            rows.append([g, "(missing)", "", "", "", "", ""])
        for field, arr in gs["fields"].items():
            if arr.size and arr.dtype.kind in "biuf":
                stats = [f"{arr.min():.4g}", f"{arr.mean():.4g}", f"{arr.max():.4g}"]
            else:
                stats = ["-", "-", "-"]
            rows.append([g, field, str(arr.dtype), str(arr.shape), *stats])
    lines.append(
        format_table(
            ["group", "field", "dtype", "shape", "min", "mean", "max"], rows, right=("min", "mean", "max")
        )
    )
    return "\n".join(lines)


def sample_to_json(sample: dict) -> dict:
    """``sample`` with arrays as nested lists (and their dtype and shape)."""
    return {
        **{k: v for k, v in sample.items() if k != "groups"},
        "groups": {
            g: {
                "present": gs["present"],
                "fields": {
                    f: {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.tolist()}
                    for f, a in gs["fields"].items()
                },
            }
            for g, gs in sample["groups"].items()
        },
    }


def save_npz(sample: dict, path: str | Path) -> list[str]:
    """Save a sample's arrays to ``path`` (``.npz``) under ``group.field`` names; return the names."""
    arrays = {f"{g}.{f}": a for g, gs in sample["groups"].items() for f, a in gs["fields"].items()}
    with open(path, "wb") as fh:  # a file object, so numpy does not append ".npz" to the name
        np.savez(fh, **arrays)
    return sorted(arrays)
