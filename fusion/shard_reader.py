"""Reading one shard: by the catalog's member offsets (memory-mapped, headers checked in one
vectorised pass, ``.npy`` headers parsed once per field) or by tar iteration, the reference.

Both yield the same raw samples; ``fusion.loader`` joins them across groups and batches them.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import group_by_keys

from features.errors import ShardFormatError, StoreError
from pipelines import shards as shard_format
from pipelines.lookup import NPY_MAX_HEADER, decode_member  # the rules shared with `get`
from pipelines.storage import is_url, open_url, read_url, url_size
from pipelines.store import Store

_BLOCK = 512  # tar header and padding unit
_NPY_MAGIC = b"\x93NUMPY"


class CatalogMismatchWarning(UserWarning):
    """A shard file does not match ``catalog/members.parquet``; it is read by tar iteration."""


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: such members are not samples


def iter_group_shard(path: Path) -> Iterator[dict]:
    """Samples of one group's tar shard: {"__key__", "json", "<field>.npy", ...} as raw bytes.

    Every member header is checked before its payload is read (``member_problem``: links,
    absolute or ``..`` names, oversized members), and the tar must end with its end-of-archive
    blocks: ``tarfile`` stops silently at a cut or damaged header, which would drop samples.
    """
    yield from group_by_keys(_checked_members(path))


def _open_shard(path: Path | str):
    """A local shard file, or an fsspec URL (a remote store)."""
    try:
        return open_url(str(path))
    except FileNotFoundError:
        raise StoreError(f"{path}: shard file missing; run modalstore verify") from None


def _checked_members(path: Path) -> Iterator[dict]:
    last = None
    with _open_shard(path) as f:
        size = url_size(str(path)) if is_url(str(path)) else os.fstat(f.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            for info in tar:
                problem = shard_format.member_problem(info)
                if problem is not None:
                    raise ShardFormatError(f"{path}: member {info.name!r} {problem}")
                if _META.match(info.name):
                    continue
                data = tar.extractfile(info).read()
                last = info.name
                yield {"fname": info.name, "data": data, "__url__": str(path)}
                tar.members = []  # keep memory flat over long shards
            end = tar.offset
        except (tarfile.TarError, EOFError) as exc:
            after = f" after member {last!r}" if last else ""
            raise ShardFormatError(f"{path}: damaged tar{after}: {exc}; run modalstore verify") from exc
        f.seek(end)
        tail = f.read(max(0, min(size - end, 1 << 20)))
        if len(tail) < 2 * _BLOCK or tail.strip(b"\0") or size - end > len(tail):
            after = f" after member {last!r}" if last else " before its first member"
            raise ShardFormatError(
                f"{path}: tar ends{after} without a valid end-of-archive (truncated, or a damaged "
                f"header at byte {end}); run modalstore verify"
            )


# ---- the member index: catalog/members.parquet as compact arrays per (group, shard) ----------


@dataclass(frozen=True)
class ShardMembers:
    """One group's tar shard as the catalog describes it: members in tar order.

    ``nbytes`` is the file size from ``catalog/shards.parquet`` (-1 when unknown).
    """

    names: np.ndarray  # (n,) "S" utf-8 member names
    offsets: np.ndarray  # (n,) int64 payload offsets
    sizes: np.ndarray  # (n,) int64 payload sizes
    nbytes: int = -1


def load_member_index(
    store: Store, groups: list[str], shards: list[str]
) -> dict[tuple[str, str], ShardMembers]:
    """``catalog/members.parquet`` for these groups and shards, keyed by (group, shard).

    Empty when the table is missing (older stores): every shard is then read by tar iteration.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cat = store.root / "catalog"
    path = cat / "members.parquet"
    cols = ["group", "shard", "member", "offset", "size"]
    if not path.exists() or not set(cols) <= set(pq.read_schema(path).names) or not groups or not shards:
        return {}
    where = [("group", "in", list(groups)), ("shard", "in", list(shards))]
    table = pq.read_table(path, columns=cols, filters=where)
    if table.num_rows == 0:
        return {}
    nbytes = {}
    spath = cat / "shards.parquet"
    if spath.exists() and {"group", "shard", "bytes"} <= set(pq.read_schema(spath).names):
        st = pq.read_table(spath, columns=["group", "shard", "bytes"], filters=where).to_pydict()
        nbytes = {(g, s): int(b) for g, s, b in zip(st["group"], st["shard"], st["bytes"], strict=True)}
    g = table["group"].combine_chunks().dictionary_encode()
    s = table["shard"].combine_chunks().dictionary_encode()
    gi, si = g.indices.to_numpy(), s.indices.to_numpy()
    offsets = table["offset"].to_numpy().astype(np.int64)
    sizes = table["size"].to_numpy().astype(np.int64)
    names = pc.cast(table["member"], pa.binary()).to_numpy(zero_copy_only=False).astype(np.bytes_)
    order = np.lexsort((offsets, si, gi))  # tar order within each (group, shard)
    code = gi[order].astype(np.int64) * len(s.dictionary) + si[order]
    bounds = np.flatnonzero(np.diff(code)) + 1
    index = {}
    for part in np.split(order, bounds):
        key = (g.dictionary[gi[part[0]]].as_py(), s.dictionary[si[part[0]]].as_py())
        index[key] = ShardMembers(names[part], offsets[part], sizes[part], nbytes.get(key, -1))
    return index


def _map_file(path: Path):
    """The whole file as a read-only buffer: an mmap (no copy into our memory), else bytes."""
    if is_url(str(path)):  # a remote store: the whole object in one request
        try:
            return read_url(str(path))
        except FileNotFoundError:
            raise StoreError(f"{path}: shard file missing; run modalstore verify") from None
    with _open_shard(path) as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # an empty file, or a filesystem without mmap
            return f.read()
    if hasattr(mmap, "MADV_WILLNEED"):
        buf.madvise(mmap.MADV_WILLNEED)  # read ahead the whole shard: we read all of it
    return buf


def _octal_fields(values: np.ndarray, digits: int) -> np.ndarray:
    """(n, digits) ASCII octal digits of ``values``, zero-padded as tarfile writes them."""
    shifts = 3 * np.arange(digits - 1, -1, -1)
    return ((values[:, None] >> shifts) & 7).astype(np.uint8) + ord("0")


def _tar_matches(buf, m: ShardMembers) -> bool:
    """Whether a tar walk of ``buf`` would find exactly the catalog's members, and nothing else.

    Members must follow each other (header, payload padded to 512 bytes, next header), each
    header must be a valid regular-file header with the catalog's name and size, and only
    zeros may follow the last member (the end-of-archive blocks).
    """
    data = np.frombuffer(buf, np.uint8)
    n = len(m.offsets)
    if m.nbytes >= 0 and len(data) != m.nbytes:
        return False
    if n == 0:
        return not data.any()
    sizes, offsets = m.sizes, m.offsets
    if sizes.min() < 0 or sizes.max() >= 8**11:  # larger sizes use tar's base-256 encoding
        return False
    padded = (sizes + _BLOCK - 1) // _BLOCK * _BLOCK
    if offsets[0] != _BLOCK or np.any(offsets[1:] != offsets[:-1] + padded[:-1] + _BLOCK):
        return False  # a gap: extra members, long-name or pax headers; the tar walk handles those
    end = int(offsets[-1] + padded[-1])
    if end > len(data) or data[end:].any():
        return False
    blocks = data[: len(data) // _BLOCK * _BLOCK].reshape(-1, _BLOCK)  # offsets are block-aligned here
    hdr = blocks[offsets // _BLOCK - 1]  # (n, 512) the header block before each payload
    names = m.names.astype("S100").view(np.uint8).reshape(n, 100)  # NUL-padded, as in the header
    if not np.array_equal(hdr[:, :100], names):
        return False
    if not np.array_equal(hdr[:, 124:135], _octal_fields(sizes, 11)) or hdr[:, 135].any():
        return False
    if not np.isin(hdr[:, 156], (ord("0"), 0)).all():  # regular files only
        return False
    # Checksum: the header's byte sum with the checksum field counted as spaces (tarfile's rule).
    chk = hdr.sum(axis=1, dtype=np.uint32) - hdr[:, 148:156].sum(axis=1, dtype=np.uint32) + 8 * 32
    stored = ((hdr[:, 148:154].astype(np.int64) - ord("0")) << (3 * np.arange(5, -1, -1))).sum(axis=1)
    digits_ok = ((hdr[:, 148:154] >= ord("0")) & (hdr[:, 148:154] <= ord("7"))).all()
    return bool(digits_ok and np.array_equal(stored, chk))


def _indexed_samples(buf, m: ShardMembers) -> list[dict] | None:
    """The raw samples of a shard from its catalog entry; None when the catalog does not match.

    Same grouping as webdataset's ``group_by_keys`` (key = name up to the first '.', suffix
    lowercased); names it would treat differently (paths, ``__meta__``) or duplicate
    suffixes also return None, so that the tar walk handles them exactly as before.
    """
    if not _tar_matches(buf, m):
        return None
    view = memoryview(buf)
    samples: list[dict] = []
    cur: dict = {"__key__": None}
    for raw, off, size in zip(m.names.tolist(), m.offsets.tolist(), m.sizes.tolist(), strict=True):
        name = raw.decode("utf-8", "surrogateescape")
        key, dot, suffix = name.partition(".")
        if not dot or not key or "/" in name or key.startswith("__"):
            return None
        suffix = suffix.lower()
        if key != cur["__key__"]:
            cur = {"__key__": key}
            samples.append(cur)
        elif suffix in cur:
            return None
        cur[suffix] = view[off : off + size]
    return samples


def iter_indexed_shard(path: Path, members: ShardMembers, shard: str, group: str) -> Iterator[dict]:
    """``iter_group_shard`` through the catalog: payloads are memoryviews of the mapped file.

    A file that does not match its catalog entry is read by tar iteration, with a warning.
    """
    if len(members.sizes) and members.sizes.max() > shard_format.MAX_MEMBER_BYTES:
        i = int(np.argmax(members.sizes))
        raise ShardFormatError(
            f"{path}: member {members.names[i].decode('utf-8', 'replace')!r} is {int(members.sizes[i]):,} "
            f"bytes, over the limit of {shard_format.MAX_MEMBER_BYTES:,} (refused before reading)"
        )
    samples = _indexed_samples(_map_file(path), members)
    if samples is None:
        warnings.warn(
            f"{path}: does not match catalog/members.parquet (group {group!r}, shard {shard}); "
            "reading it by tar iteration (slower); run modalstore verify",
            CatalogMismatchWarning,
            stacklevel=2,
        )
        yield from iter_group_shard(path)
        return
    yield from samples


# ---- decoding -------------------------------------------------------------------------------


class NpyLayout:
    """The ``.npy`` header shared by one field's members in one shard, but for the first axis.

    Built from a first member that ``np.load(allow_pickle=False)`` accepted, so its dtype holds
    no Python objects, nor can any member that matches its header. ``decode`` returns
    a zero-copy view for a member whose header is byte-for-byte this header with its own
    first-axis length (the length the payload size implies), else None: the caller then uses
    ``np.load``. Same bytes, same header: the array is bit-identical to ``np.load``'s.
    """

    def __init__(self, data) -> None:
        self.fast = False
        head = bytes(data[:12])
        if len(head) < 12 or head[:6] != _NPY_MAGIC or head[6] not in (1, 2):
            return  # version 3 (utf-8 headers) and odd files: np.load only
        fp = io.BytesIO(bytes(data[: 12 + NPY_MAX_HEADER]))
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp, max_header_size=NPY_MAX_HEADER)
        self.start = 10 if version[0] == 1 else 12
        self.hl = fp.tell()  # header end: the data offset
        self.magic = head[:8]
        header = bytes(data[self.start : self.hl])
        core = header[: header.rfind(b"}") + 1]
        pat = b"'shape': ("
        i = core.find(pat) + len(pat)
        first = str(shape[0]).encode() if shape else b""
        rest = shape[1:]
        self.dtype, self.rest, self.order = dtype, rest, "F" if fortran else "C"
        self.row_items = math.prod(rest)
        self.row_bytes = dtype.itemsize * self.row_items
        if (
            not shape
            or dtype.subdtype is not None  # np.load expands sub-array dtypes into the shape
            or self.row_bytes == 0
            or i < len(pat)
            or core[i : i + len(first)] != first
        ):
            return
        self.pre, self.post = core[:i], core[i + len(first) :]
        self.headers: dict[tuple[int, int], bytes] = {}
        self.fast = self._header(self.hl, shape[0]) == bytes(data[: self.hl])

    def _header(self, hl: int, n0: int) -> bytes:
        """The exact header bytes of this layout with ``n0`` rows and data at ``hl`` (b"": none)."""
        core = self.pre + str(n0).encode() + self.post
        pad = hl - self.start - len(core) - 1
        want = b""
        if n0 >= 0 and pad >= 0 and hl - self.start <= NPY_MAX_HEADER:
            want = (
                self.magic + (hl - self.start).to_bytes(self.start - 8, "little") + core + b" " * pad + b"\n"
            )
        if len(self.headers) < 4096:
            self.headers[hl, n0] = want
        return want

    def decode(self, data) -> np.ndarray | None:
        if not self.fast or len(data) < 12:
            return None
        if self.start == 10:
            hl = (data[8] | data[9] << 8) + 10
        else:
            hl = int.from_bytes(data[8:12], "little") + 12
        n0, rem = divmod(len(data) - hl, self.row_bytes)
        want = self.headers.get((hl, n0))
        if want is None:
            want = self._header(hl, n0)
        if rem or not want or bytes(data[:hl]) != want:
            return None
        return np.frombuffer(data, self.dtype, n0 * self.row_items, hl).reshape(
            (n0, *self.rest), order=self.order
        )


def _loads_json(data):
    """``json.loads`` of bytes, skipping its encoding sniffing for what can only be UTF-8."""
    b = bytes(data)
    if b[:1] == b"{" and b[1:2] != b"\0":  # json.detect_encoding says utf-8 for these
        return json.loads(b.decode("utf-8", "surrogatepass"))
    return json.loads(b)


class MemberDecoder:
    """``decode_member`` for one shard, with ``.npy`` headers parsed once per (group, field)."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.layouts: dict[tuple[str, str], NpyLayout] = {}

    def __call__(self, group: str, key: str, suffix: str, data):
        if suffix == "json":
            try:
                return _loads_json(data)
            except (ValueError, RecursionError):
                pass  # decode_member raises the standard error
        elif suffix.endswith(".npy") or suffix == "npy":
            layout = self.layouts.get((group, suffix))
            if layout is None:
                name = f"{key}.{suffix}"
                value = decode_member(self.shard, name, suffix, bytes(data))  # refuses pickles
                self.layouts[group, suffix] = NpyLayout(data)
                return value
            value = layout.decode(data)
            if value is not None:
                return value
        return decode_member(self.shard, f"{key}.{suffix}", suffix, bytes(data))
