"""Streaming loader: store shards -> joined, decoded samples -> batched tensors on the device.

Groups are stored side by side (one tar per group per shard, same keys in the same order),
so a sample is the join of its members across the requested groups; keys that disagree are
an error. Only ``.npy`` (``allow_pickle=False``) and ``.json`` members are decoded.

Two ways to read a shard give the same samples:

- indexed (default): ``catalog/members.parquet`` gives every member's payload offset and size,
  so the file is memory-mapped and payloads are sliced, never parsed as a tar. Before that,
  the tar headers at the catalog's offsets are checked in one vectorised pass (contiguous
  members, name, size, type, checksum, zeros after the last member); a shard that does not
  match its catalog is read by tar iteration instead, with a ``CatalogMismatchWarning``.
  ``.npy`` headers are parsed once per field and shard; members with the same header but
  for the first axis become ``np.frombuffer`` views, anything else goes through ``np.load``.
- tar iteration (``fast=False``, or no ``members.parquet``): webdataset's tar iterator and
  ``decode_member``, the reference the indexed path is tested against.

Node/worker splitting and the shuffle buffer are webdataset's.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import split_by_node, split_by_worker
from webdataset.tariterators import group_by_keys, tar_file_iterator

from features.errors import ShardFormatError
from features.spec import FieldSpec
from pipelines.lookup import decode_member  # the one safe-decoding rule, shared with `get`
from pipelines.store import Store, open_store

_BLOCK = 512  # tar header and padding unit
_NPY_MAGIC = b"\x93NUMPY"
_NPY_MAX_HEADER = 10000  # np.load's max_header_size when allow_pickle=False


class CatalogMismatchWarning(UserWarning):
    """A shard file does not match ``catalog/members.parquet``; it is read by tar iteration."""


def iter_group_shard(path: Path) -> Iterator[dict]:
    """Samples of one group's tar shard: {"__key__", "json", "<field>.npy", ...} as raw bytes."""
    with open(path, "rb") as f:
        stream = ({**m, "__url__": str(path)} for m in tar_file_iterator(f))
        yield from group_by_keys(stream)


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
    with open(path, "rb") as f:
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
        fp = io.BytesIO(bytes(data[: 12 + _NPY_MAX_HEADER]))
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp, max_header_size=_NPY_MAX_HEADER)
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
        if n0 >= 0 and pad >= 0 and hl - self.start <= _NPY_MAX_HEADER:
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
            except ValueError:
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


def _reference_decoder(shard: str):
    def decode(group: str, key: str, suffix: str, data):
        return decode_member(shard, f"{key}.{suffix}", suffix, data)

    return decode


def iter_joined(
    shard: str, paths: dict[str, Path], members: dict[str, ShardMembers] | None = None
) -> Iterator[dict]:
    """Join one shard across groups by key; decode; yield {"key", "label", "present", "fields"}.

    Without ``members`` every group is read by tar iteration and decoded by ``decode_member``
    (the reference). With ``members`` ({group: catalog entry}; groups without one are read
    by tar iteration) shards are read through the catalog and arrays may be read-only views
    of the mapped shard.
    """
    if members is None:
        iters = {g: iter_group_shard(p) for g, p in paths.items()}
        decode = _reference_decoder(shard)
    else:
        iters = {
            g: iter_indexed_shard(p, members[g], shard, g) if g in members else iter_group_shard(p)
            for g, p in paths.items()
        }
        decode = MemberDecoder(shard)
    groups = list(iters)
    its = list(iters.values())
    field_names: dict[tuple[str, str], str] = {}  # (group, suffix) -> "group.field"
    while True:
        raws = [next(it, None) for it in its]
        if None in raws:
            ended = [g for g, r in zip(groups, raws, strict=True) if r is None]
            if len(ended) != len(groups):
                live = [g for g, r in zip(groups, raws, strict=True) if r is not None]
                nxt = next(r for r in raws if r is not None)["__key__"]
                raise ShardFormatError(
                    f"shard {shard}: group(s) {ended} ended before {live} (next key {nxt!r})"
                )
            return
        key = raws[0]["__key__"]
        for g, r in zip(groups, raws, strict=True):
            if r["__key__"] != key:
                raise ShardFormatError(
                    f"shard {shard}: key mismatch between groups: {groups[0]!r} has {key!r}, "
                    f"{g!r} has {r['__key__']!r}"
                )
        present, fields = {}, {}
        sample = {"key": key, "label": None, "present": present, "fields": fields}
        for g, r in zip(groups, raws, strict=True):
            for suffix, data in r.items():
                if suffix.startswith("__"):
                    continue
                value = decode(g, key, suffix, data)
                if suffix == "json":
                    sample["label"] = int(value["label"])
                    present[g] = bool(value.get("present", True))
                else:
                    name = field_names.get((g, suffix))
                    if name is None:
                        name = field_names[g, suffix] = f"{g}.{suffix[: -len('.npy')]}"
                    fields[name] = value
        yield sample


def collate(
    samples: list[dict],
    specs: dict[str, FieldSpec],
    field_groups: dict[str, str],
    norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """Batch samples: stack fixed fields, zero-pad variable ones with lengths and masks.

    With ``norm`` ({field: (mean, std)}) present values are standardised; padding and
    missing samples stay zero.
    """
    b = len(samples)
    batch = {
        "keys": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "features": {},
        "lengths": {},
        "mask": {},
        "present": {},
    }
    for g in dict.fromkeys(field_groups.values()):
        batch["present"][g] = torch.tensor([s["present"].get(g, False) for s in samples], dtype=torch.bool)
    fields = [s["fields"] for s in samples]
    for name, spec in specs.items():
        dtype = np.float32 if np.dtype(spec.dtype).kind == "f" else np.dtype(spec.dtype)
        arrays = [f.get(name) for f in fields]
        stats = norm.get(name) if norm is not None else None
        # Standardise the whole batch at once where that gives the same bits as per sample:
        # when (array - mean) / std is computed in the batch's dtype anyway.
        batched = stats is not None and all(
            np.result_type(a.dtype, *stats) == dtype for a in arrays if a is not None
        )
        if stats is not None and not batched:
            mean, std = stats
            arrays = [None if a is None else (a - mean) / std for a in arrays]
        if spec.variable:
            lengths = np.array([0 if a is None else a.shape[0] for a in arrays], dtype=np.int64)
            rest = next((a.shape[1:] for a in arrays if a is not None), tuple(spec.shape[1:]))
            out = np.zeros((b, max(int(lengths.max()), 1), *rest), dtype=dtype)  # (batch, time, ...)
            for i, a in enumerate(arrays):
                if a is not None:
                    out[i, : a.shape[0]] = a
            mask = np.arange(out.shape[1])[None, :] < lengths[:, None]  # (batch, time)
            if batched:
                out -= stats[0]
                out /= stats[1]
                out[~mask] = 0
            batch["lengths"][name] = torch.from_numpy(lengths)
            batch["mask"][name] = torch.from_numpy(mask)
        else:
            out = np.empty((b, *spec.shape), dtype=dtype)
            for i, a in enumerate(arrays):
                if a is None:
                    out[i] = 0
                else:
                    out[i] = a
            if batched:
                out -= stats[0]
                out /= stats[1]
                out[[a is None for a in arrays]] = 0
        batch["features"][name] = torch.from_numpy(out)
    return batch


def _epoch_seed(seed: int, epoch: int, *extra: int) -> int:
    return hash((seed, epoch, *extra)) & 0x7FFFFFFF


class ShardStream(IterableDataset):
    """Batches from the shards of one split, split by node and DataLoader worker.

    ``members`` ({(group, shard): catalog entry}) selects indexed reads; None, tar iteration.
    """

    def __init__(
        self,
        root: str,
        shards: list[str],
        paths: dict[str, dict[str, str]],
        specs,
        field_groups,
        batch_size: int,
        shuffle: bool,
        seed: int,
        buffer_size: int,
        members: dict[tuple[str, str], ShardMembers] | None = None,
    ) -> None:
        self.root, self.shards, self.paths, self.members = root, shards, paths, members
        self.specs, self.field_groups = specs, field_groups
        self.batch_size, self.shuffle, self.seed, self.buffer_size = batch_size, shuffle, seed, buffer_size
        self.epoch = 0
        self.norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def epoch_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(_epoch_seed(self.seed, self.epoch)).shuffle(shards)
        return shards

    def _members(self, shard: str) -> dict[str, ShardMembers] | None:
        if self.members is None:
            return None
        return {g: self.members[g, shard] for g in self.paths if (g, shard) in self.members}

    def __iter__(self) -> Iterator[dict]:
        shards = list(split_by_worker(split_by_node(self.epoch_shards())))
        samples = (
            s
            for shard in shards
            for s in iter_joined(
                shard, {g: Path(p[shard]) for g, p in self.paths.items()}, self._members(shard)
            )
        )
        if self.shuffle:
            from webdataset.filters import _shuffle

            info = get_worker_info()
            wid = info.id if info else 0
            rng = random.Random(_epoch_seed(self.seed, self.epoch, wid, _rank()))
            samples = _shuffle(samples, bufsize=self.buffer_size, initial=self.buffer_size, rng=rng)
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) == self.batch_size:
                yield collate(buf, self.specs, self.field_groups, self.norm)
                buf = []
        if buf:
            yield collate(buf, self.specs, self.field_groups, self.norm)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _as_is(batch: dict) -> dict:
    return batch


def to_device(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=non_blocking)
        elif isinstance(v, dict):
            out[k] = {n: t.to(device, non_blocking=non_blocking) for n, t in v.items()}
        else:
            out[k] = v
    return out


def _record_stream(batch: dict, stream) -> None:
    for v in batch.values():
        for t in v.values() if isinstance(v, dict) else [v]:
            if isinstance(t, torch.Tensor):
                t.record_stream(stream)


class StreamingLoader:
    """Iterable of batch dicts for one split of a store.

    Batches: ``{"keys", "label", "features": {group.field: (B, ...)}, "lengths", "mask",
    "present": {group: (B,)}}``. Shards are shuffled per epoch from (seed, epoch) and
    samples through a buffer; shards are split across ranks and DataLoader workers. On
    CUDA, batches come from pinned memory and the next batch is copied on a side stream
    while the current one is used. ``normalize=True`` standardises every field with the
    train split's per-feature mean and std stored with the group.

    Shards are read through ``catalog/members.parquet`` (no tar parsing); ``fast=False``
    reads them by tar iteration and ``np.load`` (the reference path, same batches).
    """

    def __init__(
        self,
        store: str | Path,
        split: str,
        groups: list[str] | None = None,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        buffer_size: int = 512,
        normalize: bool = False,
        fast: bool = True,
    ) -> None:
        self.store = open_store(store)
        self.split = split
        self.groups = self.store.check_groups(groups)
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers
        self.device = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        self.field_specs: dict[str, FieldSpec] = {}
        self.field_groups: dict[str, str] = {}
        for g in self.groups:
            for f, spec in self.store.field_specs(g).items():
                self.field_specs[f"{g}.{f}"] = spec
                self.field_groups[f"{g}.{f}"] = g
        shards = self.store.shards(split)
        self._shard_sizes = dict(zip(shards, self.store.meta["splits"][split]["shard_samples"], strict=True))
        paths = {g: {s: str(self.store.shard_path(g, s)) for s in shards} for g in self.groups}
        self.dataset = ShardStream(
            str(self.store.root),
            shards,
            paths,
            self.field_specs,
            self.field_groups,
            batch_size,
            shuffle,
            seed,
            buffer_size,
            load_member_index(self.store, self.groups, shards) if fast else None,
        )
        if normalize:
            # (x - mean) / std with the train split's statistics; constant features keep std 1.
            norm = {}
            for g in self.groups:
                for f, st in self.store.stats(g).items():
                    std = np.where(st["std"] > 1e-8, st["std"], 1.0).astype(np.float32)
                    norm[f"{g}.{f}"] = (st["mean"].astype(np.float32), std)
            self.dataset.norm = norm

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def num_samples(self) -> int:
        return self.store.num_samples(self.split)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (each worker ends with a partial batch)."""
        shards = self.dataset.epoch_shards()[_rank() :: _world()]
        n_workers = max(self.num_workers, 1)
        return sum(
            math.ceil(sum(self._shard_sizes[s] for s in shards[w::n_workers]) / self.batch_size)
            for w in range(n_workers)
        )

    def __iter__(self) -> Iterator[dict]:
        cuda = self.device.type == "cuda"
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=cuda,
            persistent_workers=False,
            collate_fn=_as_is,  # batches are tensors already; skip default_convert's walk
        )
        if not cuda:
            for batch in loader:
                yield to_device(batch, self.device)
            return
        copy_stream = torch.cuda.Stream(device=self.device)
        pending = None
        for batch in loader:
            with torch.cuda.stream(copy_stream):
                nxt = to_device(batch, self.device, non_blocking=True)
            if pending is not None:
                yield pending  # the consumer's step overlaps the copy of ``nxt``
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(copy_stream)
            _record_stream(nxt, main)  # allocated on the side stream, used on the main one
            pending = nxt
        if pending is not None:
            yield pending
