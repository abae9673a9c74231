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
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class Manifest:
    path: str
    samples: list[Sample]
    classes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITY_COLUMNS if any(m in s.media for s in self.samples)]


def _read_table(path: Path) -> dict[str, list]:
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
        return {name: table.column(name).to_pylist() for name in names}
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
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    cols = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; found columns {sorted(cols)}")
    n = len(cols["key"])
    if n == 0:
        raise ManifestError(f"{path}: manifest has no rows")
    base = str(path.parent.resolve())

    labels = cols["label"]
    for i, lab in enumerate(labels):
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            raise ManifestError(f"{path}: row {i + 1}, column 'label': empty label")
        if isinstance(lab, float) and not lab.is_integer():
            raise ManifestError(f"{path}: row {i + 1}, column 'label': {lab!r} is not an integer class id")
    if all(isinstance(lab, int | float) and not isinstance(lab, bool) for lab in labels):
        ids = [int(lab) for lab in labels]
        if min(ids) < 0:
            row = ids.index(min(ids)) + 1
            raise ManifestError(f"{path}: row {row}, column 'label': negative class id {min(ids)}")
        classes = [str(c) for c in range(max(ids) + 1)]
    else:
        names = [str(lab) for lab in labels]
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        ids = [index[s] for s in names]

    seen: dict[str, int] = {}
    samples = []
    present_cols = [c for c in MODALITY_COLUMNS if c in cols]
    for i in range(n):
        row = i + 1
        key = cols["key"][i]
        if key is None or not str(key).strip():
            raise ManifestError(f"{path}: row {row}, column 'key': empty key")
        key = str(key)
        if _BAD_KEY.search(key):
            raise ManifestError(
                f"{path}: row {row}, column 'key': {key!r} contains '.', '/', '\\' or whitespace, "
                "which WebDataset treats as separators; rename the key"
            )
        if key in seen:
            raise ManifestError(
                f"{path}: row {row}, column 'key': duplicate key {key!r} (first at row {seen[key]})"
            )
        seen[key] = row
        split = cols["split"][i]
        if split not in SPLITS:
            raise ManifestError(f"{path}: row {row}, column 'split': {split!r} is not one of {list(SPLITS)}")
        media = {}
        for c in present_cols:
            value = cols[c][i]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if c == "text":
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "surrogateescape")  # refused per sample if not UTF-8
                else:
                    value = str(value)
                if value.strip():
                    media[c] = value
                continue
            if not isinstance(value, str) or "\0" in value:
                raise ManifestError(f"{path}: row {row}, column {c!r}: expected a path, got {value!r}")
            resolved = _resolve(value, base)
            if check_files and "://" not in resolved:
                if not os.path.isfile(resolved):
                    raise ManifestError(f"{path}: row {row}, column {c!r}: file not found: {resolved}")
                if not os.access(resolved, os.R_OK):
                    raise ManifestError(f"{path}: row {row}, column {c!r}: file not readable: {resolved}")
            media[c] = resolved
        samples.append(Sample(key=key, label=ids[i], split=split, row=row, media=media))
    return Manifest(path=str(path), samples=samples, classes=classes, fingerprint=sha256_file(path))
