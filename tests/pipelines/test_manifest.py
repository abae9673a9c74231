import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.errors import ManifestError
from pipelines.manifest import read_manifest


def write_csv(path, rows, header="key,label,split,audio,text"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def media(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "b.wav").write_bytes(b"RIFF")
    return tmp_path


def test_csv_resolves_relative_paths_and_absent_modalities(media):
    m = read_manifest(
        write_csv(media / "m.csv", ["k1,0,train,a.wav,hello", "k2,1,test,,", "k3,1,val,b.wav,"])
    )
    assert [s.key for s in m.samples] == ["k1", "k2", "k3"]
    assert m.samples[0].media == {"audio": str((media / "a.wav").resolve()), "text": "hello"}
    assert m.samples[1].media == {}  # empty cells mean the modality is absent
    assert m.samples[2].media == {"audio": str((media / "b.wav").resolve())}
    assert m.classes == ["0", "1"] and [s.label for s in m.samples] == [0, 1, 1]
    assert m.modalities == ["audio", "text"]
    assert len(m.fingerprint) == 64


def test_jsonl_and_parquet_with_string_labels(media):
    rows = [
        {"key": "x", "label": "dog", "split": "train", "text": "woof"},
        {"key": "y", "label": "cat", "split": "test", "text": "meow"},
    ]
    jl = media / "m.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), media / "m.parquet")
    for path in (jl, media / "m.parquet"):
        m = read_manifest(path)
        assert m.classes == ["cat", "dog"]
        assert [s.label for s in m.samples] == [1, 0]


@pytest.mark.parametrize(
    ("rows", "header", "match"),
    [
        (
            ["k1,0,train,a.wav,"],
            "name,label,split,audio,text",
            r"m\.csv: missing required column\(s\) \['key'\]",
        ),
        (
            ["k1,0,train,a.wav,", "k1,1,test,b.wav,"],
            None,
            r"row 2, column 'key': duplicate key 'k1' \(first at row 1\)",
        ),
        (["k1,0,training,a.wav,"], None, r"row 1, column 'split': 'training' is not one of"),
        (
            ["k1,0,train,a.wav,", "k2,0,train,nope.wav,"],
            None,
            r"row 2, column 'audio': file not found: .*nope\.wav",
        ),
        (["k.1,0,train,a.wav,"], None, r"row 1, column 'key': 'k\.1' contains"),
        (["k1,,train,a.wav,"], None, r"row 1, column 'label': empty label"),
        (["k1,-1,train,a.wav,"], None, r"row 1, column 'label': negative class id"),
    ],
)
def test_bad_manifests_name_file_row_and_column(media, rows, header, match):
    path = write_csv(media / "m.csv", rows, header or "key,label,split,audio,text")
    with pytest.raises(ManifestError, match=match):
        read_manifest(path)


def test_missing_file_allowed_when_not_checking(media):
    m = read_manifest(write_csv(media / "m.csv", ["k1,0,train,nope.wav,"]), check_files=False)
    assert m.samples[0].media["audio"].endswith("nope.wav")


def test_unsupported_format_and_missing_manifest(tmp_path):
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ManifestError, match="unsupported manifest format '.xlsx'"):
        read_manifest(tmp_path / "m.xlsx")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_streamed_manifest_equals_a_row_by_row_parse(tmp_path, monkeypatch, fmt):
    """Small chunks and spill row groups, so that rows cross every boundary: the samples, plan
    views and pickled views equal what Python's csv module reads, and no file is left named."""
    import csv
    import pickle
    import random
    import tempfile

    import pipelines.manifest as manifest_mod
    from pipelines.shards import plan_shards

    monkeypatch.setattr(manifest_mod, "_CHUNK", 37)
    monkeypatch.setattr(manifest_mod, "_SPILL_ROWS", 16)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "spill"))
    (tmp_path / "spill").mkdir()
    rng = random.Random(3)
    rows = [
        {
            "key": f"k{i:04d}",
            "label": str(rng.randrange(5)),
            "split": rng.choice(["train", "val", "test"]),
            "audio": f"a/{i}.wav" if rng.random() < 0.7 else "",
            "text": " ".join(rng.choice(["red", "cat", "sat", "é"]) for _ in range(rng.randrange(4))),
        }
        for i in range(500)
    ]
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if fmt == "parquet":
        table = pa.table({c: [r[c] or None for r in rows] for c in rows[0]})
        path = tmp_path / "m.parquet"
        pq.write_table(table.set_column(1, "label", pa.array([int(r["label"]) for r in rows])), path)
    m = read_manifest(path, check_files=False)
    assert list((tmp_path / "spill").iterdir()) == []  # the spill file has no name

    def expected(r):
        media = {}
        if r["audio"]:
            media["audio"] = str(tmp_path / r["audio"])
        if r["text"].strip():
            media["text"] = r["text"]
        return (r["key"], int(r["label"]), r["split"], media)

    want = [expected(r) for r in rows]
    got = [(s.key, s.label, s.split, s.media) for s in m.samples]
    assert got == want
    assert [s.row for s in m.samples] == list(range(1, 501))
    assert (m.samples[123].key, m.samples[-1].key) == ("k0123", "k0499")
    for plan in plan_shards(m.samples, 29):
        keys = [s.key for s in plan.samples]
        assert all(want[int(k[1:])][2] == plan.split for k in keys)
        assert [(s.key, s.media) for s in pickle.loads(pickle.dumps(plan.samples))] == [
            (k, want[int(k[1:])][3]) for k in keys
        ]
        # as Dask pickles a task (protocol 5, buffers out of band): no buffer goes out of band,
        # so nothing of the driver's memory is referenced by the message once it is sent
        out_of_band = []
        blob = pickle.dumps(plan.samples, protocol=5, buffer_callback=out_of_band.append)
        assert out_of_band == []
        got = pickle.loads(blob)
        assert [(s.key, s.label, s.split, s.media) for s in got] == [want[int(k[1:])] for k in keys]


def test_csv_row_longer_than_the_parser_block_is_read_with_larger_blocks(tmp_path, monkeypatch):
    """The CSV parser reads 64 KB blocks (a bounded read-ahead); a longer row makes the manifest
    be read again with larger ones, and a row over the largest is a clear error."""
    import pipelines.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "_CSV_BLOCKS", (64 << 10, 1 << 20))
    long_text = "word " * 60_000  # 300 KB
    rows = [f"k{i},{i % 3},train,short text {i}" for i in range(3000)]
    path = write_csv(
        tmp_path / "m.csv",
        [*rows, f"long,1,val,{long_text}", "last,2,test,end"],
        header="key,label,split,text",
    )
    m = read_manifest(path, check_files=False)
    assert len(m) == 3002
    assert [s.media["text"] for s in m.split("val")] == [long_text]
    assert [(s.key, s.row) for s in m.split("test")] == [("last", 3002)]
    huge = write_csv(
        tmp_path / "h.csv", [*rows, "huge,1,val," + "x" * (2 << 20)], header="key,label,split,text"
    )
    with pytest.raises(ManifestError, match=r"h.csv: cannot parse manifest: a row is longer than 1 MB"):
        read_manifest(huge, check_files=False)


@pytest.mark.parametrize("seed", range(6))
def test_duplicate_key_found_across_sort_runs_names_the_first_repeat(tmp_path, monkeypatch, seed):
    """Duplicate keys are found by an external sort: with runs of 7 rows merged 3 at a time,
    the error names the same row as a Python scan in manifest order (the earliest repeat, and
    its key's first row)."""
    import random

    import pipelines.manifest as manifest_mod

    monkeypatch.setattr(manifest_mod, "_KEY_RUN", 7)
    monkeypatch.setattr(manifest_mod, "_KEY_BATCH", 3)
    monkeypatch.setattr(manifest_mod, "_CHUNK", 5)
    rng = random.Random(seed)
    keys = [f"k{rng.randrange(60 if seed else 10_000):05d}" for _ in range(50)]
    first: dict[str, int] = {}
    want = None
    for row, key in enumerate(keys, start=1):
        if key in first:
            want = (row, key, first[key])
            break
        first[key] = row
    path = write_csv(
        tmp_path / "m.csv", [f"{k},0,{rng.choice(['train', 'val'])}" for k in keys], "key,label,split"
    )
    if want is None:
        assert len(read_manifest(path)) == 50
        return
    row, key, at = want
    with pytest.raises(
        ManifestError, match=rf"row {row}, column 'key': duplicate key '{key}' \(first at row {at}\)$"
    ):
        read_manifest(path)


def test_progress_shows_the_rows_validated(tmp_path, capsys):
    rows = [f"k{i},{i % 3},train,t{i}" for i in range(20_000)]
    read_manifest(write_csv(tmp_path / "m.csv", rows, "key,label,split,text"), progress=True)
    err = capsys.readouterr().err
    assert "manifest m.csv" in err and "20.0k rows" in err
    read_manifest(tmp_path / "m.csv")
    assert capsys.readouterr().err == ""  # silent by default
