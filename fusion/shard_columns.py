"""One shard of every requested group as columns: batches gathered straight from the mapped shards.

``ShardWriter`` writes the same members for every sample of a group, in the same order
(``<key>.json``, then ``<key>.<field>.npy`` by field name). When a group's catalog entry has
that shape, its members form one column per suffix, found by vectorised string operations on
the member names rather than a Python loop over members. Each ``.npy`` column's headers are
compared with the first member's (decoded by ``np.load(allow_pickle=False)``, which refuses
pickles) in one vectorised pass. When every member of a column has that header and the same
size, the tar layout repeats, so the column is one strided view of the mapped file and a
batch's rows are one fancy-indexed copy; other members are decoded one by one, by
``np.frombuffer`` where the header allows it and ``decode_member`` otherwise, as on the
reference path. ``.json`` members (label, present) are decoded for the rows taken only.

A shard that is not that regular (a stale catalog, a refused or missing member, keys that
disagree between groups, another sample count than ``store.json``'s) is not handled here:
``open_columns`` returns None and the loader reads it with ``fusion.loader.JoinedShard``,
the reference path, which also raises the precise errors.
"""

from __future__ import annotations

import copy
import math
import mmap
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import ShardFormatError, StoreError
from fusion.shard_reader import NpyLayout, ShardMembers, _loads_json, _map_file, _tar_matches
from pipelines import shards as shard_format
from pipelines.lookup import decode_member, is_npy
from pipelines.storage import is_url

_CHUNK_BYTES = 1 << 22  # header bytes compared per vectorised step
# A sample's .json member exactly as ShardWriter writes it (json.dumps(sort_keys=True)): printable
# ASCII strings without escapes, a JSON integer label of at most 18 digits, a JSON boolean.
_STR = rb'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'
_META_LINE = re.compile(
    rb'^\{"key": '
    + _STR
    + rb', "label": (-?(?:0|[1-9][0-9]{0,17})), "present": (true|false), "split": '
    + _STR
    + rb"\}$",
    re.MULTILINE,
)


def sample_meta(shard: str, key: str, meta) -> tuple[int, bool]:
    """(label, present) from a sample's ``.json`` member, checked: it comes from a file."""
    label = meta.get("label") if isinstance(meta, dict) else None
    if not isinstance(label, int) or isinstance(label, bool):
        raise ShardFormatError(f"shard {shard}: member '{key}.json' has no integer label: {str(meta)[:200]}")
    return label, bool(meta.get("present", True))


def _regular_columns(m: ShardMembers) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """(keys, {suffix: (offsets, sizes)}) when every sample has the same suffixes in the same
    order and webdataset's ``group_by_keys`` would group the members exactly so; else None."""
    names, total = m.names, len(m.names)
    if total == 0:
        return np.empty(0, "S1"), {}
    key0, dot, _ = names[0].partition(b".")
    if not dot or not key0:
        return None
    prefix, width = key0 + b".", 1
    while width < total and names[width].startswith(prefix):
        width += 1
    if total % width or (np.char.find(names, b"/") >= 0).any():
        return None
    keys, cols = None, {}
    for j in range(width):
        parts = np.char.partition(names[j::width], b".")
        k, dots, rest = parts[:, 0], parts[:, 1], parts[:, 2]
        try:
            suffix = rest[0].decode("ascii")
        except UnicodeDecodeError:
            return None
        if (
            suffix != suffix.lower()
            or suffix in cols
            or not (dots == b".").all()
            or not (rest == rest[0]).all()
        ):
            return None
        if keys is None:
            keys = k
        elif not np.array_equal(k, keys):
            return None
        cols[suffix] = (m.offsets[j::width], m.sizes[j::width])
    if (keys == b"").any() or np.char.startswith(keys, b"__").any() or (keys[1:] == keys[:-1]).any():
        return None  # empty or meta keys, or two samples that group_by_keys would merge
    return keys, cols


def _check_headers(data: np.ndarray, layout: NpyLayout, o: np.ndarray, s: np.ndarray):
    """(ok, hl, n0) per member: whether its ``.npy`` header is ``layout``'s but for the first
    axis (so ``np.frombuffer`` gives ``np.load``'s array), its data offset and first-axis length."""
    ok = s >= 12
    at = np.where(ok, o, 0)
    width = layout.start - 8  # header-length field: 2 bytes (version 1), 4 (version 2)
    hl = np.zeros(len(o), np.int64)
    for i in range(width):
        hl |= data[at + 8 + i].astype(np.int64) << (8 * i)
    hl += layout.start
    body = s - hl
    ok &= (body >= 0) & (body % layout.row_bytes == 0)
    n0 = np.where(ok, body // layout.row_bytes, -1)
    combos = np.unique(np.stack([hl[ok], n0[ok]], axis=1), axis=0)
    for h, r in combos.tolist():
        sel = np.flatnonzero(ok & (hl == h) & (n0 == r))
        want = layout._header(h, r)
        if not want:
            ok[sel] = False
            continue
        expected = np.frombuffer(want, np.uint8)
        step = max(1, _CHUNK_BYTES // h)
        for c in range(0, len(sel), step):
            part = sel[c : c + step]
            same = (data[o[part][:, None] + np.arange(h)] == expected).all(axis=1)
            ok[part[~same]] = False
    return ok, hl, n0


@dataclass
class FieldColumn:
    """One ``.npy`` suffix of one group in one shard: where each sample's member lies and how to read it."""

    group: str
    suffix: str
    offsets: np.ndarray  # (n,) payload offsets in the mapped file
    sizes: np.ndarray  # (n,)
    layout: NpyLayout | None = None
    fast: np.ndarray | None = None  # (n,) bool: np.frombuffer gives np.load's array
    hl: np.ndarray | None = None  # (n,) .npy data offset within the member
    n0: np.ndarray | None = None  # (n,) first-axis length
    periodic: tuple | None = None  # (offset, shape, strides): the column as one strided array


def _periodic(layout: NpyLayout, col: FieldColumn) -> tuple | None:
    """Where the whole column lies as one strided array of the file, when its layout repeats."""
    n = len(col.offsets)
    if n == 0 or not col.fast.all() or (col.hl != col.hl[0]).any() or (col.n0 != col.n0[0]).any():
        return None
    stride = int(col.offsets[1] - col.offsets[0]) if n > 1 else layout.row_bytes
    if n > 1 and (stride <= 0 or (np.diff(col.offsets) != stride).any()):
        return None
    shape = (int(col.n0[0]), *layout.rest)
    item = layout.dtype.itemsize
    dims = shape if layout.order == "C" else shape[::-1]
    inner = [item * math.prod(dims[k + 1 :]) for k in range(len(dims))]
    if layout.order == "F":
        inner = inner[::-1]
    return int(col.offsets[0] + col.hl[0]), (n, *shape), (stride, *inner)


class ShardColumns:
    """One shard of every requested group, as columns (see the module doc). Build with ``open_columns``.

    The columns (member spans, checked headers) do not depend on the mapping: ``rebind`` gives the
    same columns over a new mapping of the same, unchanged files (``idents``).
    """

    def __init__(self, shard: str, keys: np.ndarray, bufs: dict, cols: dict[str, dict], idents=None) -> None:
        self.shard, self.groups, self.keys, self.idents = shard, list(bufs), keys, idents
        self.json = {g: c["json"] for g, c in cols.items()}
        n = len(keys)  # (label, present, decoded yet) per group and sample, filled as read
        self.meta = {g: (np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)) for g in cols}
        self.fields: dict[str, FieldColumn] = {}  # "group.field" -> column
        self._bind(bufs)
        for g, c in cols.items():
            data = np.frombuffer(bufs[g], np.uint8)
            for suffix, (o, s) in c.items():
                if suffix != "json":
                    self.fields[f"{g}.{suffix[: -len('.npy')]}"] = self._field(g, suffix, o, s, data)
        if not self._bind(bufs):  # cannot happen after _tar_matches: every member lies in the file
            raise ShardFormatError(f"shard {shard}: a column lies outside its file; run modalstore verify")

    def _bind(self, bufs: dict) -> bool:
        self.bufs = bufs
        self.views = {g: memoryview(buf) for g, buf in bufs.items()}
        self.arrays = {}  # "group.field" -> (n, ...) strided view of the mapped file
        for name, col in self.fields.items():
            if col.periodic is not None:
                offset, shape, strides = col.periodic
                try:
                    self.arrays[name] = np.ndarray(
                        shape, col.layout.dtype, buffer=bufs[col.group], offset=offset, strides=strides
                    )
                except (ValueError, TypeError):
                    return False
        return True

    def rebind(self, bufs: dict) -> ShardColumns | None:
        """These columns over ``bufs``, new mappings of the same files (None: they do not fit)."""
        new = copy.copy(self)
        return new if new._bind(bufs) else None

    def detached(self) -> ShardColumns:
        """These columns without the mappings (what a cache may keep: no file pages held)."""
        new = copy.copy(self)
        new.bufs, new.views, new.arrays = {}, {}, {}
        return new

    def __len__(self) -> int:
        return len(self.keys)

    def _field(self, g: str, suffix: str, o: np.ndarray, s: np.ndarray, data: np.ndarray) -> FieldColumn:
        col = FieldColumn(g, suffix, o, s)
        if len(o) == 0:
            return col
        key = self.keys[0].decode("utf-8", "surrogateescape")
        first = bytes(self.views[g][int(o[0]) : int(o[0] + s[0])])
        decode_member(self.shard, f"{key}.{suffix}", suffix, first)  # refuses pickles, names the member
        layout = NpyLayout(first)
        if not layout.fast:
            return col
        col.layout = layout
        col.fast, col.hl, col.n0 = _check_headers(data, layout, o, s)
        col.periodic = _periodic(layout, col)
        if col.periodic is not None:  # all that is needed now: drop the per-member arrays
            col.fast = col.hl = col.n0 = None
        return col

    def _member(self, col: FieldColumn, i: int, key: str):
        o, s = int(col.offsets[i]), int(col.sizes[i])
        if col.fast is not None and col.fast[i]:
            lay, n0 = col.layout, int(col.n0[i])
            return np.frombuffer(
                self.bufs[col.group], lay.dtype, n0 * lay.row_items, o + int(col.hl[i])
            ).reshape((n0, *lay.rest), order=lay.order)
        data = bytes(self.views[col.group][o : o + s])
        return decode_member(self.shard, f"{key}.{col.suffix}", col.suffix, data)

    def _metas(self, g: str, idx: np.ndarray, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(labels, present) of samples ``idx`` from group ``g``'s ``.json`` members, each decoded
        once: the values are kept with the columns (and so in ``ColumnsCache``) for later epochs."""
        labels, present, known = self.meta[g]
        todo = ~known[idx]
        if todo.any():
            new = idx[todo]
            labels[new], present[new] = self._decode_metas(
                g, new, [k for k, t in zip(keys, todo.tolist(), strict=True) if t]
            )
            known[new] = True
        return labels[idx], present[idx]

    def _decode_metas(self, g: str, idx: np.ndarray, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        view = self.views[g]
        offsets, sizes = self.json[g]
        spans = list(zip(offsets[idx].tolist(), sizes[idx].tolist(), strict=True))
        raws = [view[o : o + s] for o, s in spans]
        # One regex pass over the batch's members, one a line, when every one is exactly what
        # ShardWriter writes (then json.loads would give these values); anything else: json.loads.
        joined = b"\n".join(raws)
        if joined.count(b"\n") == len(raws) - 1:
            found = _META_LINE.findall(joined)
            if len(found) == len(raws):
                label = np.fromiter((int(x) for x, _ in found), np.int64, len(found))
                return label, np.fromiter((p == b"true" for _, p in found), bool, len(found))
        label, present = np.empty(len(raws), np.int64), np.empty(len(raws), bool)
        for r, (raw, key) in enumerate(zip(raws, keys, strict=True)):
            try:
                meta = _loads_json(raw)
            except (ValueError, RecursionError):
                meta = decode_member(self.shard, f"{key}.json", "json", bytes(raw))  # raises
            label[r], present[r] = sample_meta(self.shard, key, meta)
        return label, present

    def take(self, idx: np.ndarray, wanted) -> tuple[list[str], np.ndarray, dict, dict]:
        """Samples ``idx`` of the shard: (keys, labels, {group: present}, {field: rows}).

        A field's rows are one array (len(idx), ...) when its column is a strided view, else a
        list of arrays. Fields not in ``wanted`` are decoded (so that they are checked) and dropped.
        """
        il = idx.tolist()
        keys = [k.decode("utf-8", "surrogateescape") for k in self.keys[idx].tolist()]
        label = np.empty(len(il), np.int64)
        present = {}
        for g in self.groups:  # the label of the last group wins, as in JoinedShard.sample
            label, present[g] = self._metas(g, idx, keys)
        fields = {}
        for name, col in self.fields.items():
            if name in self.arrays:
                if name in wanted:
                    fields[name] = self.arrays[name][idx]
                continue
            values = [self._member(col, i, key) for i, key in zip(il, keys, strict=True)]
            if name in wanted:
                fields[name] = values
        return keys, label, present, fields


def _allowed(suffix: str) -> bool:
    return suffix == "json" or is_npy(suffix)


def _map(path) -> tuple[object, tuple | None]:
    """(the mapped file, its identity: device, inode, size, mtime; None for a remote store)."""
    if is_url(str(path)):
        return _map_file(path), None
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if st.st_size else b""
    except FileNotFoundError:
        raise StoreError(f"{path}: shard file missing; run modalstore verify") from None
    if hasattr(mmap, "MADV_WILLNEED") and st.st_size:
        buf.madvise(mmap.MADV_WILLNEED)  # read ahead: a shard is read whole within a window or two
    return buf, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ColumnsCache:
    """Checked columns of recently opened shards, so that a worker reopening a shard in a later
    epoch (persistent DataLoader workers) maps it again without checking it again. Only used
    while the files are unchanged (same device, inode, size and mtime); at most ``size`` shards."""

    def __init__(self, size: int = 256) -> None:
        self.size, self.entries = size, OrderedDict()

    def get(self, shard: str, idents: dict) -> ShardColumns | None:
        cols = self.entries.get(shard)
        if cols is None or None in idents.values() or cols.idents != idents:
            return None
        self.entries.move_to_end(shard)
        return cols

    def put(self, cols: ShardColumns) -> None:
        if None in cols.idents.values():
            return
        self.entries[cols.shard] = cols.detached()
        self.entries.move_to_end(cols.shard)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


def open_columns(
    shard: str,
    paths: dict[str, Path],
    members: dict[str, ShardMembers],
    expected: int | None,
    cache: ColumnsCache | None = None,
) -> ShardColumns | None:
    """The shard as columns, or None when it is not regular (the caller then reads it with
    ``JoinedShard``, which handles or names every irregularity)."""
    if any(members.get(g) is None for g in paths):
        return None
    mapped = {g: _map(path) for g, path in paths.items()}
    bufs = {g: buf for g, (buf, _) in mapped.items()}
    idents = {g: ident for g, (_, ident) in mapped.items()}
    cached = cache.get(shard, idents) if cache is not None else None
    if cached is not None:
        cols = cached.rebind(bufs)
        if cols is not None:
            return cols
    parsed, keys = {}, None
    for g in paths:
        m = members[g]
        if len(m.sizes) and m.sizes.max() > shard_format.MAX_MEMBER_BYTES:
            return None  # JoinedShard refuses it, naming the member
        regular = _regular_columns(m)
        if regular is None:
            return None
        k, c = regular
        if ("json" not in c and len(k)) or not all(_allowed(x) for x in c):
            return None
        if keys is None:
            keys = k
        elif not np.array_equal(keys, k):
            return None
        if not _tar_matches(bufs[g], m):
            return None
        parsed[g] = c
    if keys is None or (expected is not None and len(keys) != expected):
        return None
    cols = ShardColumns(shard, keys, bufs, parsed, idents)
    if cache is not None:
        cache.put(cols)
    return cols
