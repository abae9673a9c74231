"""Shard planning and writing: deterministic WebDataset tar files, written atomically.

A shard is a plain tar file readable by ``webdataset.WebDataset``: for every sample a
``<key>.json`` member (key, label, split, present) and one ``<key>.<field>.npy`` member per
feature field. Headers are deterministic (mtime 0, uid 0, mode 0644) so the same inputs
give byte-identical shards, and each shard is written to a temporary name and renamed
only when complete, so a crash never leaves a shard that looks finished: a write error
(a full disk) removes the temporary file and raises ``StoreError`` naming the shard.

``member_problem`` is the one rule for what a shard read from elsewhere may contain: regular
files with relative names, none larger than ``MAX_MEMBER_BYTES``; readers check every member
header against it before reading the payload.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from features.errors import StoreError
from pipelines.manifest import SPLITS, ManifestRows, Sample, SampleTable, sha256_file  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: its name (``train-000003``), split and samples in order."""

    name: str
    split: str
    samples: Sequence[Sample]  # SplitRows (on disk) in the driver; a compact SampleTable once pickled


class Layout(NamedTuple):
    """A finished store's sample -> (shard, index) layout, as columns (``key`` is unique)."""

    keys: Any  # pa.StringArray
    shards: Any  # pa.StringArray
    index: np.ndarray  # int64


def plan_shards(
    samples: Sequence[Sample],
    samples_per_shard: int,
    previous: Layout | None = None,
) -> list[ShardPlan]:
    """Assign samples to shards split by split, in manifest order.

    ``samples``: a manifest's ``ManifestRows`` (or any sequence of ``Sample``, spilled first).
    A plan's samples are ``SplitRows`` of it: a range of its split's rows, read when used, so
    planning holds nothing per sample. ``previous`` (an existing store's layout) keeps every
    known key in its shard and order, and puts new keys in new shards numbered after the last
    one of their split: appending manifest rows then leaves every existing shard as it was
    (this join holds one split's keys in memory).
    """
    import pyarrow.compute as pc

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    rows = samples if isinstance(samples, ManifestRows) else ManifestRows.from_samples(samples)
    names: list[str] = []  # the previous layout's shard names; rows refer to them by code
    if previous is not None and len(previous.keys):
        encoded = previous.shards.dictionary_encode()
        names = encoded.dictionary.to_pylist()
        shard_codes = encoded.indices.to_numpy(zero_copy_only=False)
    plans = []
    for split in SPLITS:
        part = rows.split(split)
        prefix = f"{split}-"
        numbers = [int(n.rsplit("-", 1)[1]) for n in names if n.startswith(prefix)]
        new = part  # the rows for new shards: without a previous shard of this split, all of them
        if numbers:  # known keys stay in their previous shard, in their previous order
            keys = part.arrow(["key"]).column("key")
            pos = pc.index_in(keys, value_set=previous.keys).fill_null(-1).to_numpy()
            code = np.full(len(part), -1, np.int64)
            index = np.zeros(len(part), np.int64)
            known = pos >= 0
            code[known] = shard_codes[pos[known]]
            index[known] = previous.index[pos[known]]
            ours = np.array([n.startswith(prefix) for n in names] + [False], dtype=bool)  # [-1]: unknown key
            mine = ours[code]
            kept = np.flatnonzero(mine)
            for c in sorted(set(code[kept].tolist()), key=names.__getitem__):
                in_shard = kept[code[kept] == c]
                in_shard = in_shard[np.argsort(index[in_shard], kind="stable")]
                plans.append(ShardPlan(names[c], split, part.at(in_shard)))
            new = part.at(np.flatnonzero(~mine))
        start = max(numbers) + 1 if numbers else 0
        for i in range(0, len(new), samples_per_shard):
            name = f"{split}-{start + i // samples_per_shard:06d}"
            plans.append(ShardPlan(name, split, new[i : i + samples_per_shard]))
    return plans


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array as ``.npy`` bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


# Readers refuse larger members before reading them: a shard from elsewhere must not make a
# reader allocate whatever its header claims. Big enough for an hour of STFT frames.
MAX_MEMBER_BYTES = 1 << 30


def member_problem(info: tarfile.TarInfo, max_bytes: int | None = None) -> str | None:
    """Why a tar member may not be read (None: it may): only what ``ShardWriter`` writes passes.

    Links, directories and devices, absolute names, ``..`` components and members over
    ``max_bytes`` (default ``MAX_MEMBER_BYTES``) are refused, from the header alone.
    """
    limit = MAX_MEMBER_BYTES if max_bytes is None else max_bytes
    if info.issym() or info.islnk():
        return f"is a {'symbolic' if info.issym() else 'hard'} link (to {info.linkname!r}); links are refused"
    if not info.isreg():
        return f"is not a regular file (tar type {info.type!r}); only regular files are allowed"
    name = info.name
    if name.startswith(("/", "\\")):
        return "has an absolute path; member names must be relative"
    if ".." in name.replace("\\", "/").split("/"):
        return "has a '..' path component; member names must stay inside the shard"
    if info.size > limit:
        return f"is {info.size:,} bytes, over the limit of {limit:,} (refused before reading)"
    return None


def write_error(path: Path, exc: OSError) -> StoreError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return StoreError(
        f"{path}: cannot write ({reason}); its temporary file was removed, nothing was published "
        "under this name. Free disk space (or fix the cause) and run the same command again: "
        "finished shards are kept and the run resumes"
    )


@dataclass
class MemberRecord:
    """Where one member's payload lives inside a shard: for random access without parsing."""

    name: str
    offset: int
    size: int


class ShardWriter:
    """Write one tar shard to ``path`` via a temporary file; ``close()`` publishes it.

    Use as a context manager: on an exception the temporary file is removed and nothing
    appears at ``path``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.tmp, "wb")
        except OSError as exc:
            self.tmp.unlink(missing_ok=True)
            raise write_error(self.path, exc) from exc
        self._hash = hashlib.sha256()
        self._tar = tarfile.open(
            fileobj=_HashingWriter(self._file, self._hash), mode="w", format=tarfile.GNU_FORMAT
        )
        self.members: list[MemberRecord] = []

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        try:
            self._tar.addfile(info, io.BytesIO(data))
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from exc
        padded = (len(data) + 511) // 512 * 512
        self.members.append(MemberRecord(name, self._tar.offset - padded, len(data)))

    def add_sample(self, key: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        self.add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        for field in sorted(arrays):
            self.add(f"{key}.{field}.npy", npy_bytes(arrays[field]))

    def close(self) -> tuple[int, str]:
        """Finish the tar, fsync, rename into place; return (bytes, sha256 hex)."""
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            size = self._file.tell()
            self._file.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise write_error(self.path, exc) from exc
        return size, self._hash.hexdigest()

    def abort(self) -> None:
        """Remove the temporary file; nothing appears at ``path``."""
        try:
            self._file.close()
        except OSError:
            pass  # flushing after a write error fails again; the first error is being raised
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class _HashingWriter:
    """File wrapper hashing every byte written (tarfile writes through ``write``)."""

    def __init__(self, f, h) -> None:
        self._f, self._h = f, h

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc
