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
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.errors import ManifestError
from pipelines.spill import release_arrow_memory

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

    def __init__(self, keys, labels, splits, rows, media) -> None:
        self.keys = keys  # pa.StringArray or ChunkedArray
        self.labels = labels  # np.int64: class ids
        self.splits = splits  # np.int8: index into SPLITS
        self.rows = rows  # np.int64: 1-based manifest rows
        # modality -> binary (Chunked)Array (UTF-8, surrogate escapes kept; null = absent), or a
        # SpilledMedia: the same columns in a local Parquet file, read for the rows taken
        self.media = media

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
        if isinstance(self.media, SpilledMedia):
            return next(iter(self.take([i])))
        media = {m: col[i].as_py() for m, col in self.media.items()}
        return Sample(
            key=self.keys[i].as_py(),
            label=int(self.labels[i]),
            split=SPLITS[self.splits[i]],
            row=int(self.rows[i]),
            media={m: _decode(v) for m, v in media.items() if v is not None},
        )

    def __iter__(self) -> Iterator[Sample]:
        if isinstance(self.media, SpilledMedia):
            for start in range(0, len(self), _CHUNK):
                yield from self.take(np.arange(start, min(start + _CHUNK, len(self))))
            return
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

    def take(self, indices, media: bool = True) -> SampleTable:
        """A compact table of the rows at ``indices`` (a copy: it holds nothing of this one);
        without ``media``, keys, labels and splits only."""
        import pyarrow as pa

        idx = np.asarray(indices, dtype=np.int64)
        at = pa.array(idx)
        if not media:
            media = {}
        elif isinstance(self.media, SpilledMedia):
            media = self.media.take(idx)
        else:
            media = {m: col.take(at) for m, col in self.media.items()}
        return SampleTable(self.keys.take(at), self.labels[idx], self.splits[idx], self.rows[idx], media)

    def modalities(self) -> list[str]:
        """The modalities some row has."""
        if isinstance(self.media, SpilledMedia):
            return [m for m in MODALITY_COLUMNS if self.media.present.get(m)]
        return [m for m, col in self.media.items() if col.null_count < len(col)]

    def view(self, indices) -> SampleView:
        return SampleView(self, np.asarray(indices, dtype=np.int64))

    def __reduce__(self):
        if isinstance(self.media, SpilledMedia):  # the file is this process's: send the rows
            return self.take(np.arange(len(self))).__reduce__()
        # One in-band bytes object. Dask pickles with protocol 5 and passes Arrow and numpy
        # buffers out of band, and its client kept those of every submitted shard task alive
        # after the task was done (20 MB at 300k samples, 64 MB at 1M; BENCHMARKS.md, "Driver
        # memory"); like dask/distributed#8859. Protocol 4 has no out-of-band buffers.
        state = (self.keys, self.labels, self.splits, self.rows, self.media)
        return (_load_table, (pickle.dumps(state, protocol=4),))


def _load_table(blob: bytes) -> SampleTable:
    return SampleTable(*pickle.loads(blob))


class SpilledMedia:
    """A manifest's media columns (paths, URLs, inline text) in a temporary local Parquet file,
    in row groups of ``_SPILL_ROWS``: the driver reads back only the rows of the shard it
    hashes or sends, so its memory does not hold the manifest's data. The file has no name:
    its space is freed when this object is collected or the process ends, however it ends."""

    def __init__(self, columns: list[str]) -> None:
        import tempfile

        # anonymous (unlinked at once): nothing is left behind, even by a killed process
        self._spill = tempfile.TemporaryFile(prefix="modalstore-manifest-", suffix=".parquet")
        self.columns = columns
        self.present: dict[str, int] = dict.fromkeys(columns, 0)  # non-null rows per column
        self._writer = None
        self._pending: list = []
        self._pending_rows = 0
        self._file = None

    def append(self, arrays: dict) -> None:
        import pyarrow as pa

        for m, arr in arrays.items():
            self.present[m] += len(arr) - arr.null_count
        self._pending.append(pa.table(arrays, schema=self._schema()))
        self._pending_rows += len(next(iter(arrays.values()))) if arrays else 0
        while self._pending_rows >= _SPILL_ROWS:
            self._flush(_SPILL_ROWS)

    def _schema(self):
        import pyarrow as pa

        return pa.schema([pa.field(m, pa.binary()) for m in self.columns])

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._writer is None:
            self._writer = pq.ParquetWriter(self._spill, self._schema(), compression="none")
        table = pa.concat_tables(self._pending) if self._pending else self._schema().empty_table()
        self._writer.write_table(table.slice(0, n), row_group_size=max(n, 1))
        rest = table.slice(n)
        self._pending, self._pending_rows = [rest], rest.num_rows

    def close(self) -> None:
        if self._pending_rows or self._writer is None:
            self._flush(self._pending_rows)
        self._writer.close()
        self._writer = None

    def take(self, idx: np.ndarray) -> dict:
        """The rows at ``idx`` (manifest positions): modality -> binary array."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._file is None:
            self._file = pq.ParquetFile(self._spill)
        groups = np.unique(idx // _SPILL_ROWS)
        if len(groups) == 0:
            return {m: pa.array([], pa.binary()) for m in self.columns}
        table = self._file.read_row_groups(groups.tolist(), columns=self.columns)
        starts = np.searchsorted(groups, idx // _SPILL_ROWS) * _SPILL_ROWS  # where each group begins
        at = pa.array(starts + idx % _SPILL_ROWS)
        return {m: table.column(m).take(at).combine_chunks() for m in self.columns}


_SPILL_ROWS = 1024


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
# CSV blocks parsed at a time (one row must fit in one block).
_CSV_BLOCK = 512 << 10


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
        return self.samples.modalities()

    def split_indices(self, split: str) -> np.ndarray:
        """Manifest positions of the rows of ``split``, in order."""
        return np.flatnonzero(self.samples.splits == SPLITS.index(split))


def _batches(path: Path) -> tuple[list[str], Iterator]:
    """(column names, an iterator of Arrow tables of at most ``_CHUNK`` rows with the columns we
    use): CSV and Parquet are streamed, JSON lines read whole. Parse errors raise ManifestError
    (also from the iterator)."""
    import pyarrow as pa

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            file = pq.ParquetFile(path)
            names = file.schema_arrow.names
            ours = _ours(path, names)
            batches = (pa.Table.from_batches([b]) for b in file.iter_batches(batch_size=_CHUNK, columns=ours))
        elif suffix == ".csv":
            names = _csv_header(path)
            ours = _ours(path, names)
            batches = _csv_batches(path, ours)
        elif suffix in (".jsonl", ".json", ".ndjson"):
            import pyarrow.json as pajson

            table = pajson.read_json(path)
            names = table.column_names
            table = table.select(_ours(path, names))
            batches = (table.slice(i, _CHUNK) for i in range(0, table.num_rows, _CHUNK))
        else:
            raise ManifestError(
                f"{path}: unsupported manifest format {suffix!r}; use .parquet, .csv or .jsonl"
            )
    except ManifestError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:  # Arrow*Error, undecodable names or values
        raise ManifestError(f"{path}: cannot parse manifest: {_describe(exc)}") from exc
    return names, _parse_errors(path, batches)


def _ours(path: Path, names: list[str]) -> list[str]:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"{path}: duplicate column name(s) {dup}")
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; found columns {sorted(names)}")
    return [c for c in (*REQUIRED_COLUMNS, *MODALITY_COLUMNS) if c in names]


def _csv_header(path: Path) -> list[str]:
    import csv

    with open(path, "rb") as f:  # the first line only: rows may hold text that is not UTF-8
        line = f.readline()
    try:
        return next(csv.reader([line.decode("utf-8-sig")]), [])
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot parse manifest header: {exc}") from exc


def _csv_batches(path: Path, ours: list[str]) -> Iterator:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # a Python file object: given a path, Arrow buffers the whole file ahead of the parser
    with open(path, "rb") as f:
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=ours,
                # labels as text, typed below over the whole column; inline text as bytes: an
                # undecodable row becomes a per-sample error, not a failed manifest
                column_types={c: pa.string() for c in ("key", "label", "split", *MEDIA_COLUMNS)}
                | {"text": pa.binary()},
                strings_can_be_null=True,
            ),
        )
        for batch in reader:
            table = pa.Table.from_batches([batch])
            for i in range(0, table.num_rows, _CHUNK):
                yield table.slice(i, _CHUNK)


def _parse_errors(path: Path, batches: Iterator) -> Iterator:
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowException, OSError, ValueError) as exc:
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

    Rows are streamed ``_CHUNK`` at a time (CSV and Parquet; JSON lines are parsed whole):
    what stays in memory is keys, labels and splits as compact columns; the media columns go
    to a temporary local Parquet file (``SpilledMedia``) and are read back shard by shard.
    """
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    names, batches = _batches(path)
    base = str(path.parent.resolve())
    present_cols = [c for c in MODALITY_COLUMNS if c in names]
    media = SpilledMedia(present_cols)
    labels = _Labels(path, csv=path.suffix.lower() == ".csv")
    keys: list = []
    splits: list[np.ndarray] = []
    start = 0
    for chunk in batches:
        chunk_keys, chunk_splits = [], np.empty(chunk.num_rows, np.int8)
        chunk_media: dict[str, list] = {c: [] for c in present_cols}
        values = {c: chunk.column(c).to_pylist() for c in present_cols}
        for j, (key, label, split) in enumerate(
            zip(*(chunk.column(c).to_pylist() for c in REQUIRED_COLUMNS), strict=True)
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
            labels.add(row, label)
            if split not in SPLITS:
                raise ManifestError(
                    f"{path}: row {row}, column 'split': {split!r} is not one of {list(SPLITS)}"
                )
            chunk_splits[j] = SPLITS.index(split)
            chunk_keys.append(key)
            for c in present_cols:
                chunk_media[c].append(_encode(_media_value(path, row, c, values[c][j], base, check_files)))
        keys.append(pa.array(chunk_keys, pa.string()))
        splits.append(chunk_splits)
        media.append({c: pa.array(chunk_media[c], pa.binary()) for c in present_cols})
        start += chunk.num_rows
    n = start
    if n == 0:
        raise ManifestError(f"{path}: manifest has no rows")
    media.close()
    ids, classes = labels.finish()
    key_array = pa.chunked_array(keys, pa.string())
    if _has_duplicates(key_array):
        _raise_duplicate(path, key_array)
    release_arrow_memory()  # the sort's transient: ~28 B a row
    samples = SampleTable(key_array, ids, np.concatenate(splits), np.arange(1, n + 1, dtype=np.int64), media)
    return Manifest(path=str(path), samples=samples, classes=classes, fingerprint=sha256_file(path))


_INT = re.compile(r"\s*[+-]?\d+\s*")
_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?)\s*")


class _Labels:
    """Class ids of the label column, typed over the whole column as it streams by: when every
    label is a number (an integer, or a float with an integer value) labels are class ids;
    otherwise they are class names, numbered in sorted order. CSV labels are read as text, and
    text that reads as a number counts as one (as a whole-file CSV parse would type it)."""

    def __init__(self, path: Path, csv: bool) -> None:
        self.path, self.csv = path, csv
        self.code: dict = {}  # (type, value) -> code, in order of first appearance
        self.first_row: list[int] = []  # per code
        self.codes: list[np.ndarray] = []
        self._pending: list[int] = []

    def add(self, row: int, label) -> None:
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ManifestError(f"{self.path}: row {row}, column 'label': empty label")
        if isinstance(label, float) and not label.is_integer():
            raise ManifestError(
                f"{self.path}: row {row}, column 'label': {label!r} is not an integer class id"
            )
        key = (type(label).__name__, label)
        code = self.code.get(key)
        if code is None:
            code = self.code[key] = len(self.code)
            self.first_row.append(row)
        self._pending.append(code)
        if len(self._pending) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        self.codes.append(np.array(self._pending, np.int64))
        self._pending = []

    def finish(self) -> tuple[np.ndarray, list[str]]:
        self._flush()
        codes = np.concatenate(self.codes)
        values = [v for _, v in self.code]
        numbers = [_number(v) if self.csv and isinstance(v, str) else v for v in values]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            for v, row in zip(numbers, self.first_row, strict=True):
                if isinstance(v, float) and not v.is_integer():
                    raise ManifestError(
                        f"{self.path}: row {row}, column 'label': {v!r} is not an integer class id"
                    )
            ids = np.array([int(v) for v in numbers], np.int64)
            if ids.min() < 0:
                row = min(r for i, r in zip(ids, self.first_row, strict=True) if i == ids.min())
                raise ManifestError(f"{self.path}: row {row}, column 'label': negative class id {ids.min()}")
            return ids[codes], [str(c) for c in range(int(ids.max()) + 1)]
        names = [str(v) for v in values]
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[n] for n in names], np.int64)[codes], classes


def _number(text: str):
    """``text`` as an int or float when it reads as one, else itself."""
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


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


def _has_duplicates(keys) -> bool:
    """Whether a key repeats: sorted, compared with its neighbour (a hash set of millions of
    keys costs ~10x the keys' own memory in Arrow's unique())."""
    import pyarrow.compute as pc

    if len(keys) < 2:
        return False
    ordered = keys.take(pc.sort_indices(keys))
    return pc.any(pc.equal(ordered[1:], ordered[:-1])).as_py()


def _raise_duplicate(path: Path, keys) -> None:
    seen: dict[str, int] = {}
    for row, key in enumerate(keys.to_pylist(), start=1):
        if key in seen:
            raise ManifestError(
                f"{path}: row {row}, column 'key': duplicate key {key!r} (first at row {seen[key]})"
            )
        seen[key] = row
