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
    """Rows of a manifest in compact in-memory columns; a ``Sample`` is built when a row is read.

    What a shard task receives (the rows of its shard), and what tests and benchmarks build
    from a list of samples. A whole manifest is a ``ManifestRows``: its rows stay on disk.
    """

    __slots__ = ("keys", "labels", "splits", "rows", "media")

    def __init__(self, keys, labels, splits, rows, media) -> None:
        self.keys = keys  # pa.StringArray or ChunkedArray
        self.labels = labels  # np.int64: class ids
        self.splits = splits  # np.int8: index into SPLITS
        self.rows = rows  # np.int64: 1-based manifest rows
        # modality -> binary (Chunked)Array (UTF-8, surrogate escapes kept; null = absent)
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

    def take(self, indices, media: bool = True) -> SampleTable:
        """A compact table of the rows at ``indices`` (a copy: it holds nothing of this one);
        without ``media``, keys, labels and splits only."""
        import pyarrow as pa

        idx = np.asarray(indices, dtype=np.int64)
        at = pa.array(idx)
        cols = {m: col.take(at) for m, col in self.media.items()} if media else {}
        return SampleTable(self.keys.take(at), self.labels[idx], self.splits[idx], self.rows[idx], cols)

    def table(self, media: bool = True) -> SampleTable:
        return self if media else self.take(np.arange(len(self)), media=False)

    def modalities(self) -> list[str]:
        """The modalities some row has."""
        return [m for m, col in self.media.items() if col.null_count < len(col)]

    def __reduce__(self):
        # One in-band bytes object. Dask pickles with protocol 5 and passes Arrow and numpy
        # buffers out of band, and its client kept those of every submitted shard task alive
        # after the task was done (20 MB at 300k samples, 64 MB at 1M; BENCHMARKS.md, "Driver
        # memory"); like dask/distributed#8859. Protocol 4 has no out-of-band buffers.
        state = (self.keys, self.labels, self.splits, self.rows, self.media)
        return (_load_table, (pickle.dumps(state, protocol=4),))


def _load_table(blob: bytes) -> SampleTable:
    return SampleTable(*pickle.loads(blob))


_SPILL_ROWS = 1024  # rows per batch of a split's spill: a shard reads about its own rows


def _spill_schema(media: list[str]):
    import pyarrow as pa

    return pa.schema(
        [("key", pa.string()), ("label", pa.int64()), ("row", pa.int64())] + [(m, pa.binary()) for m in media]
    )


class ManifestRows(Sequence):
    """Every row of a manifest, kept on local disk: one ``Spill`` per split (key, label code,
    manifest row, media columns), read back a shard or a chunk at a time.

    The driver holds the label codes' class ids and row counts, nothing per sample: a shard
    plan is a range of its split's spill (``SplitRows``), and a shard task receives the rows
    of its range as a compact ``SampleTable``.
    """

    def __init__(self, spills: dict, label_ids: np.ndarray | None, present: dict[str, int]) -> None:
        self.spills = spills  # split -> closed Spill
        self.label_ids = label_ids  # label code -> class id (None: codes are class ids)
        self.present = present  # modality -> rows that have it
        self.media = [m for m in MODALITY_COLUMNS if m in present]

    @classmethod
    def from_samples(cls, samples) -> ManifestRows:
        """Spill a sequence of ``Sample`` (tests, benchmarks, a plan from a list)."""
        import pyarrow as pa

        from pipelines.spill import Spill

        samples = list(samples)
        media = [m for m in MODALITY_COLUMNS if any(m in s.media for s in samples)]
        schema = _spill_schema(media)
        spills = {s: Spill(schema, _SPILL_ROWS, f"modalstore-{s}-") for s in SPLITS}
        for split in SPLITS:
            ours = [s for s in samples if s.split == split]
            for start in range(0, len(ours), _CHUNK):
                t = SampleTable.from_samples(ours[start : start + _CHUNK])
                nulls = pa.nulls(len(t), pa.binary())
                columns = {"key": t.keys, "label": t.labels, "row": t.rows}
                spills[split].append(pa.table({**columns, **{m: t.media.get(m, nulls) for m in media}}))
            spills[split].close()
        present = {m: sum(m in s.media for s in samples) for m in media}
        return cls(spills, None, present)

    def split(self, split: str) -> SplitRows:
        """The rows of ``split``, in manifest order."""
        return SplitRows(self, split, 0, len(self.spills[split]))

    def __len__(self) -> int:
        return sum(len(s) for s in self.spills.values())

    def modalities(self) -> list[str]:
        """The modalities some row has."""
        return [m for m in self.media if self.present[m]]

    def __iter__(self) -> Iterator[Sample]:
        """Every row in manifest order (the splits' rows merged by row number)."""
        import heapq

        return heapq.merge(*(iter(self.split(s)) for s in SPLITS), key=lambda s: s.row)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        rows = [self.spills[s].read(0, len(self.spills[s]), ["row"]).column("row").to_numpy() for s in SPLITS]
        order = np.argsort(np.concatenate(rows), kind="stable")
        split_of = np.repeat(np.arange(len(SPLITS)), [len(r) for r in rows])[order[i]]
        position = order[i] - sum(len(r) for r in rows[:split_of])
        return self.split(SPLITS[split_of])[int(position)]


class SplitRows(Sequence):
    """Some rows of one split of a ``ManifestRows``: a range (``start:stop``) of its spill, or
    positions in it. Reads the spill when iterated; pickles as a compact ``SampleTable``."""

    __slots__ = ("source", "split", "start", "stop", "positions")

    def __init__(self, source: ManifestRows, split: str, start: int, stop: int, positions=None) -> None:
        self.source, self.split, self.start, self.stop = source, split, start, stop
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return self.stop - self.start if self.positions is None else len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if self.positions is None and step == 1:
                return SplitRows(self.source, self.split, self.start + start, self.start + max(start, stop))
            return self.at(self._positions()[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self[i : i + 1].table()[0]

    def at(self, positions) -> SplitRows:
        """The rows at ``positions`` of the split's spill."""
        return SplitRows(self.source, self.split, 0, 0, positions)

    def _positions(self) -> np.ndarray:
        return np.arange(self.start, self.stop) if self.positions is None else self.positions

    def __iter__(self) -> Iterator[Sample]:
        for start in range(0, len(self), _CHUNK):
            yield from self[start : start + _CHUNK].table()

    def arrow(self, columns: list[str] | None = None):
        """The rows as an Arrow table of the spill's columns (label: the code)."""
        spill = self.source.spills[self.split]
        if self.positions is None:
            return spill.read(self.start, self.stop, columns)
        return spill.take(self.positions, columns)

    def table(self, media: bool = True) -> SampleTable:
        """The rows as a compact in-memory ``SampleTable`` (without ``media``: keys and labels)."""
        media_cols = self.source.media if media else []
        t = self.arrow(["key", "label", "row", *media_cols])
        codes = t.column("label").to_numpy()
        ids = self.source.label_ids
        return SampleTable(
            t.column("key").combine_chunks(),
            (codes if ids is None else ids[codes]).astype(np.int64),
            np.full(t.num_rows, SPLITS.index(self.split), np.int8),
            t.column("row").to_numpy().astype(np.int64),
            {m: t.column(m).combine_chunks() for m in media_cols},
        )

    def __reduce__(self):
        return self.table().__reduce__()


_CHUNK = 8192  # rows converted to Python objects at a time
# CSV blocks parsed at a time, tried in turn: a row must fit in one block. Arrow's streaming
# reader buffers blocks ahead of the parser: with 512 KB blocks that held 16 MB more at 300k
# rows than at 10k, with 64 KB blocks 2 MB (BENCHMARKS.md, "Driver memory"); a manifest with a
# longer row (long inline text) is read again with larger blocks.
_CSV_BLOCKS = (64 << 10, 1 << 20, 16 << 20, 256 << 20)


class _BlockTooSmall(Exception):
    """A CSV row does not fit in the parser's block."""


def _encode(value: str | None) -> bytes | None:
    return None if value is None else value.encode("utf-8", "surrogateescape")


def _decode(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Manifest:
    path: str
    samples: ManifestRows
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modalities(self) -> list[str]:
        return self.samples.modalities()

    def split(self, split: str) -> SplitRows:
        """The rows of ``split``, in manifest order."""
        return self.samples.split(split)


def _batches(path: Path, csv_block: int = _CSV_BLOCKS[0]) -> tuple[list[str], Iterator]:
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
            batches = _csv_batches(path, ours, csv_block)
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


def _csv_batches(path: Path, ours: list[str], block: int) -> Iterator:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # a Python file object: given a path, Arrow buffers the whole file ahead of the parser
    with open(path, "rb") as f:
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=block, use_threads=False),
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
    except pa.ArrowInvalid as exc:
        if "straddl" in str(exc):  # "straddling object straddles two block boundaries"
            raise _BlockTooSmall from exc
        raise ManifestError(f"{path}: cannot parse manifest: {_describe(exc)}") from exc
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


def read_manifest(path: str | Path, check_files: bool = True, progress: bool = False) -> Manifest:
    """Read and validate a manifest.

    Every problem raises ``ManifestError`` naming the file, the row (1-based, data rows)
    and the column. With ``check_files`` local media files must exist and be readable.
    ``progress`` shows the rows validated so far (stderr).

    Rows are streamed ``_CHUNK`` at a time (CSV and Parquet; JSON lines are parsed whole) into
    one temporary local Arrow file per split (``ManifestRows``), read back shard by shard;
    duplicate keys are found by an external sort. Memory holds a chunk and a sort run, not the
    manifest: nothing grows with the number of rows but the distinct labels.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    from tqdm.auto import tqdm

    with tqdm(desc=f"manifest {path.name}", unit=" rows", unit_scale=True, disable=not progress) as bar:
        for block in _CSV_BLOCKS:
            try:
                return _read(path, check_files, block, bar)
            except _BlockTooSmall:
                bar.reset()  # a CSV row longer than the block: read again with larger blocks
    raise ManifestError(
        f"{path}: cannot parse manifest: a row is longer than {_CSV_BLOCKS[-1] >> 20} MB, "
        "the most one CSV row may hold; shorten its inline text"
    )


def _read(path: Path, check_files: bool, csv_block: int, bar) -> Manifest:
    import pyarrow as pa

    from pipelines.spill import ExternalSort, Spill

    names, batches = _batches(path, csv_block)
    base = str(path.parent.resolve())
    present_cols = [c for c in MODALITY_COLUMNS if c in names]
    schema = _spill_schema(present_cols)
    spills = {s: Spill(schema, _SPILL_ROWS, f"modalstore-{s}-") for s in SPLITS}
    present = dict.fromkeys(present_cols, 0)
    labels = _Labels(path, csv=path.suffix.lower() == ".csv")
    key_schema = pa.schema([("key", pa.string()), ("row", pa.int64())])
    keys = ExternalSort(key_schema, ["key", "row"], _KEY_RUN, _KEY_BATCH, "modalstore-keys-")
    start = 0
    with keys:
        for chunk in batches:
            chunk_keys, chunk_labels = [], []
            chunk_splits = np.empty(chunk.num_rows, np.int8)
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
                chunk_labels.append(labels.add(row, label))
                if split not in SPLITS:
                    raise ManifestError(
                        f"{path}: row {row}, column 'split': {split!r} is not one of {list(SPLITS)}"
                    )
                chunk_splits[j] = SPLITS.index(split)
                chunk_keys.append(key)
                for c in present_cols:
                    chunk_media[c].append(
                        _encode(_media_value(path, row, c, values[c][j], base, check_files))
                    )
            rows = pa.array(np.arange(start + 1, start + chunk.num_rows + 1, dtype=np.int64))
            table = pa.table(
                {
                    "key": pa.array(chunk_keys, pa.string()),
                    "label": pa.array(chunk_labels, pa.int64()),
                    "row": rows,
                    **{c: pa.array(chunk_media[c], pa.binary()) for c in present_cols},
                },
                schema=schema,
            )
            for c in present_cols:
                present[c] += table.num_rows - table.column(c).null_count
            for code, split in enumerate(SPLITS):
                mask = chunk_splits == code
                if mask.all():
                    spills[split].append(table)
                elif mask.any():
                    spills[split].append(table.filter(pa.array(mask)))
            keys.add(table.select(["key", "row"]))
            del table, chunk_keys, chunk_media, values
            release_arrow_memory()  # the chunk's transients: mimalloc would keep their pages
            start += chunk.num_rows
            bar.update(chunk.num_rows)
        if start == 0:
            raise ManifestError(f"{path}: manifest has no rows")
        for spill in spills.values():
            spill.close()
        ids, classes = labels.finish()
        _check_duplicates(path, keys)
    release_arrow_memory()
    samples = ManifestRows(spills, ids, present)
    return Manifest(path=str(path), samples=samples, classes=classes, fingerprint=sha256_file(path))


# Sorted runs of the duplicate-key check: the most of the manifest's keys held at once.
_KEY_RUN = 16384
_KEY_BATCH = 1024


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

    def add(self, row: int, label) -> int:
        """The label's code (its distinct value's number, in order of first appearance)."""
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
        return code

    def finish(self) -> tuple[np.ndarray, list[str]]:
        """(the class id of every code, the class names)."""
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
            return ids, [str(c) for c in range(int(ids.max()) + 1)]
        names = [str(v) for v in values]
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[n] for n in names], np.int64), classes


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


def _check_duplicates(path: Path, keys) -> None:
    """Raise ``ManifestError`` for the first row (in manifest order) whose key an earlier row
    has, from the (key, row) pairs of ``keys`` (an ``ExternalSort``) in sorted order: a hash
    set of millions of keys would cost ~10x the keys' own memory (Arrow's unique())."""
    import pyarrow.compute as pc

    found = None  # (row, first row, key) of the earliest repeat so far
    last = None  # (key, first row) of the previous table's last key
    for table in keys.merged():
        col = table.column("key")
        repeats = pc.equal(col[1:], col[:-1]) if len(col) > 1 else None
        joined = last is not None and len(col) and col[0].as_py() == last[0]
        if not joined and (repeats is None or not pc.any(repeats).as_py()):
            last = (col[-1].as_py(), table.column("row")[-1].as_py()) if len(col) else last
            continue
        first = last[1] if joined else None
        prev = last[0] if joined else None
        for key, row in zip(col.to_pylist(), table.column("row").to_pylist(), strict=True):
            if key == prev:
                if found is None or row < found[0]:
                    found = (row, first, key)
            else:
                prev, first = key, row
        last = (prev, first)
    if found is not None:
        row, first, key = found
        raise ManifestError(f"{path}: row {row}, column 'key': duplicate key {key!r} (first at row {first})")
