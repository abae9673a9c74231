"""Input manifests: one row per sample, validated before any work starts.

Formats: Parquet (``.parquet``), CSV (``.csv``) or JSON lines (``.jsonl``). Columns:

- ``key``   unique string, no ``.``, ``/`` or whitespace (it becomes the tar member prefix)
- ``label`` integer class id or class name
- ``split`` one of train / val / test
- ``image``, ``audio``, ``video`` optional media paths: relative to the manifest's folder,
  absolute, or fsspec URLs (``s3://...``); empty or null means the modality is absent
- ``text``  optional inline string; bytes that are not UTF-8 are kept as surrogate escapes
  and refused per sample when the text is decoded (``pipelines.media.load_text``), so one
  badly encoded row does not stop the run

Other columns are allowed and ignored.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.errors import ManifestError

SPLITS = ("train", "val", "test")
MEDIA_COLUMNS = ("image", "audio", "video")
MODALITY_COLUMNS = (*MEDIA_COLUMNS, "text")
REQUIRED_COLUMNS = ("key", "label", "split")
_BAD_KEY = re.compile(r"[./\\\s]")


@dataclass(frozen=True)
class Sample:
    """One validated manifest row; media paths resolved to absolute paths or URLs."""

    key: str
    label: int
    split: str
    row: int
    media: dict[str, str] = field(default_factory=dict)  # modality -> path, URL or inline text


class SampleTable(Sequence):
    """Manifest rows in compact columns; a ``Sample`` is built when a row is read.

    A driver planning millions of rows holds these columns (Arrow strings and bytes, numpy
    ints) instead of one Python object per row; a shard task receives a compact table of just
    its own rows (``take``), which pickles as a few buffers.
    """

    __slots__ = ("keys", "labels", "splits", "rows", "media")

    def __init__(self, keys, labels, splits, rows, media: dict) -> None:
        self.keys = keys  # pa.StringArray
        self.labels = labels  # np.int64: class ids
        self.splits = splits  # np.int8: index into SPLITS
        self.rows = rows  # np.int64: 1-based manifest rows
        self.media = media  # modality -> pa.BinaryArray (UTF-8, surrogate escapes kept), null = absent

    @classmethod
    def from_samples(cls, samples) -> SampleTable:
        import pyarrow as pa

        samples = list(samples)
        modalities = [m for m in MODALITY_COLUMNS if any(m in s.media for s in samples)]
        return cls(
            pa.array([s.key for s in samples], pa.string()),
            np.array([s.label for s in samples], np.int64),
            np.array([SPLITS.index(s.split) for s in samples], np.int8),
            np.array([s.row for s in samples], np.int64),
            {m: pa.array([_encode(s.media.get(m)) for s in samples], pa.binary()) for m in modalities},
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        media = {m: col[i].as_py() for m, col in self.media.items()}
        return Sample(
            key=self.keys[i].as_py(),
            label=int(self.labels[i]),
            split=SPLITS[self.splits[i]],
            row=int(self.rows[i]),
            media={m: _decode(v) for m, v in media.items() if v is not None},
        )

    def __iter__(self) -> Iterator[Sample]:
        for start in range(0, len(self), _CHUNK):
            stop = min(start + _CHUNK, len(self))
            keys = self.keys[start:stop].to_pylist()
            media = {m: col[start:stop].to_pylist() for m, col in self.media.items()}
            for j, key in enumerate(keys):
                i = start + j
                yield Sample(
                    key=key,
                    label=int(self.labels[i]),
                    split=SPLITS[self.splits[i]],
                    row=int(self.rows[i]),
                    media={m: _decode(v[j]) for m, v in media.items() if v[j] is not None},
                )

    def take(self, indices) -> SampleTable:
        """A compact table of the rows at ``indices`` (a copy: it holds nothing of this one)."""
        import pyarrow as pa

        idx = np.asarray(indices, dtype=np.int64)
        at = pa.array(idx)
        return SampleTable(
            self.keys.take(at),
            self.labels[idx],
            self.splits[idx],
            self.rows[idx],
            {m: col.take(at) for m, col in self.media.items()},
        )

    def view(self, indices) -> SampleView:
        return SampleView(self, np.asarray(indices, dtype=np.int64))

    def __reduce__(self):
        return (SampleTable, (self.keys, self.labels, self.splits, self.rows, self.media))


class SampleView(Sequence):
    """Some rows of a ``SampleTable`` by index (8 bytes a row); pickles as a compact table."""

    __slots__ = ("table", "indices")

    def __init__(self, table: SampleTable, indices: np.ndarray) -> None:
        self.table, self.indices = table, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return SampleView(self.table, self.indices[i])
        return self.table[int(self.indices[i])]

    def __iter__(self) -> Iterator[Sample]:
        for start in range(0, len(self), _CHUNK):
            yield from self.table.take(self.indices[start : start + _CHUNK])

    def __reduce__(self):
        return self.table.take(self.indices).__reduce__()


_CHUNK = 8192  # rows converted to Python objects at a time


def _encode(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8", "surrogateescape")


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Manifest:
    path: str
    samples: SampleTable
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modalities(self) -> list[str]:
        media = self.samples.media
        return [m for m in MODALITY_COLUMNS if m in media and media[m].null_count < len(media[m])]

    def split_indices(self, split: str) -> np.ndarray:
        """Manifest positions of the rows of ``split``, in order."""
        return np.flatnonzero(self.samples.splits == SPLITS.index(split))


def _read_table(path: Path):
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix == ".csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    # text as bytes: an undecodable row becomes a per-sample error, not a failed manifest
                    column_types={c: pa.string() for c in ("key", "split", *MEDIA_COLUMNS)}
                    | {"text": pa.binary()},
                    strings_can_be_null=True,
                ),
            )
        elif suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pajson

            table = pajson.read_json(path)
        else:
            raise ManifestError(
                f"{path}: unsupported manifest format {suffix!r}; use .parquet, .csv or .jsonl"
            )
        names = table.column_names
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ManifestError(f"{path}: duplicate column name(s) {dup}")
        return table
    except ManifestError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:  # Arrow*Error, undecodable names or values
        raise ManifestError(f"{path}: cannot parse manifest: {_describe(exc)}") from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, UnicodeError) else str(exc)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (manifest fingerprints, shard hashes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve(value: str, base: str) -> str:
    """An absolute, normalised path (symlinks kept: a path costs no system call) or a URL."""
    if "://" in value:
        return value[len("file://") :] if value.startswith("file://") else value
    return os.path.normpath(os.path.join(base, value))


def read_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read and validate a manifest.

    Every problem raises ``ManifestError`` naming the file, the row (1-based, data rows)
    and the column. With ``check_files`` local media files must exist and be readable.
    Rows are checked ``_CHUNK`` at a time into compact columns (``SampleTable``): no Python
    object per row outlives its chunk.
    """
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    table = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {missing}; found columns {sorted(table.column_names)}"
        )
    n = table.num_rows
    if n == 0:
        raise ManifestError(f"{path}: manifest has no rows")
    base = str(path.parent.resolve())
    ids, classes = _label_ids(path, table.column("label"))

    present_cols = [c for c in MODALITY_COLUMNS if c in table.column_names]
    keys: list = []
    media: dict[str, list] = {c: [] for c in present_cols}
    splits = np.empty(n, np.int8)
    for start in range(0, n, _CHUNK):
        chunk = table.slice(start, _CHUNK)
        chunk_keys = []
        chunk_media = {c: [] for c in present_cols}
        values = {c: chunk.column(c).to_pylist() for c in present_cols}
        for j, (key, split) in enumerate(
            zip(chunk.column("key").to_pylist(), chunk.column("split").to_pylist(), strict=True)
        ):
            row = start + j + 1
            if key is None or not str(key).strip():
                raise ManifestError(f"{path}: row {row}, column 'key': empty key")
            key = str(key)
            if _BAD_KEY.search(key):
                raise ManifestError(
                    f"{path}: row {row}, column 'key': {key!r} contains '.', '/', '\\' or whitespace, "
                    "which WebDataset treats as separators; rename the key"
                )
            if split not in SPLITS:
                raise ManifestError(
                    f"{path}: row {row}, column 'split': {split!r} is not one of {list(SPLITS)}"
                )
            splits[row - 1] = SPLITS.index(split)
            chunk_keys.append(key)
            for c in present_cols:
                chunk_media[c].append(_encode(_media_value(path, row, c, values[c][j], base, check_files)))
        keys.append(pa.array(chunk_keys, pa.string()))
        for c in present_cols:
            media[c].append(pa.array(chunk_media[c], pa.binary()))
    key_array = pa.concat_arrays(keys)
    if len(key_array.unique()) != n:
        _raise_duplicate(path, key_array)
    samples = SampleTable(
        key_array,
        ids,
        splits,
        np.arange(1, n + 1, dtype=np.int64),
        {c: pa.concat_arrays(media[c]) for c in present_cols},
    )
    return Manifest(path=str(path), samples=samples, classes=classes, fingerprint=sha256_file(path))


def _label_ids(path: Path, column) -> tuple[np.ndarray, list[str]]:
    """Class ids of the label column, and the class names (ids as strings, or sorted names)."""
    labels = column.to_pylist()
    for i, lab in enumerate(labels):
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            raise ManifestError(f"{path}: row {i + 1}, column 'label': empty label")
        if isinstance(lab, float) and not lab.is_integer():
            raise ManifestError(f"{path}: row {i + 1}, column 'label': {lab!r} is not an integer class id")
    if all(isinstance(lab, int | float) and not isinstance(lab, bool) for lab in labels):
        ids = np.array([int(lab) for lab in labels], np.int64)
        if ids.min() < 0:
            row = int(ids.argmin()) + 1
            raise ManifestError(f"{path}: row {row}, column 'label': negative class id {ids.min()}")
        return ids, [str(c) for c in range(int(ids.max()) + 1)]
    names = [str(lab) for lab in labels]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[s] for s in names], np.int64), classes


def _media_value(path: Path, row: int, c: str, value, base: str, check_files: bool) -> str | None:
    """A row's text, or its media path resolved (and checked), or None when absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if c == "text":
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")  # refused per sample if not UTF-8
        else:
            value = str(value)
        return value if value.strip() else None
    if not isinstance(value, str) or "\0" in value:
        raise ManifestError(f"{path}: row {row}, column {c!r}: expected a path, got {value!r}")
    resolved = _resolve(value, base)
    if check_files and "://" not in resolved:
        if not os.path.isfile(resolved):
            raise ManifestError(f"{path}: row {row}, column {c!r}: file not found: {resolved}")
        if not os.access(resolved, os.R_OK):
            raise ManifestError(f"{path}: row {row}, column {c!r}: file not readable: {resolved}")
    return resolved


def _raise_duplicate(path: Path, keys) -> None:
    seen: dict[str, int] = {}
    for row, key in enumerate(keys.to_pylist(), start=1):
        if key in seen:
            raise ManifestError(
                f"{path}: row {row}, column 'key': duplicate key {key!r} (first at row {seen[key]})"
            )
        seen[key] = row
