"""Runs that must stop: a full disk (simulated ENOSPC) and an error budget given as a fraction.

Either way the user sees one clear message, no shard that looks complete but is not is left
behind, and running the same command again resumes to the store an uninterrupted run makes.
"""

from __future__ import annotations

import errno
import os
import pathlib
import re
import shutil

import pytest
from store_fixtures import TINY_GROUPS, snapshot, write_extract_config

import pipelines.shards as shards_mod
from modalstore import main
from pipelines.extract import load_extract_config, run_extract

GROUPS = {"audio": TINY_GROUPS["audio"]}


@pytest.fixture
def reference(demo_dir, tmp_path):
    """Config path, store path and the files of an uninterrupted run at that same path."""
    store = tmp_path / "store"
    cfg = write_extract_config(
        tmp_path / "c.yaml", demo_dir / "manifest.csv", store, GROUPS, samples_per_shard=8
    )
    run_extract(load_extract_config(cfg), progress=False)
    files = snapshot(store)
    shutil.rmtree(store)
    return cfg, store, files


def _enospc(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_third_shard(monkeypatch, where):
    """Make the disk fill up while the third shard (or its resume record) is written."""
    opened = []
    real_init, real_write = shards_mod.ShardWriter.__init__, shards_mod._HashingWriter.write

    def init(self, path):
        opened.append(path)
        real_init(self, path)

    def write(self, data):
        if len(opened) == 3 and where == "write":
            _enospc()
        return real_write(self, data)

    monkeypatch.setattr(shards_mod.ShardWriter, "__init__", init)
    monkeypatch.setattr(shards_mod._HashingWriter, "write", write)
    if where == "fsync":
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: _enospc() if len(opened) == 3 else real_fsync(fd))
    if where == "part":  # the shard's tar is published; the record that lets a resume skip it is not
        real_write_bytes = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if len(opened) == 3 and "parts" in self.parts:
                _enospc()
            return real_write_bytes(self, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    return opened


@pytest.mark.slow
@pytest.mark.parametrize("where", ["write", "fsync", "part"])
def test_disk_full_is_a_clear_error_and_resume_completes(reference, monkeypatch, capsys, where):
    cfg, store, files = reference
    opened = _fail_third_shard(monkeypatch, where)
    assert main(["extract", str(cfg), "--serial", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command again" in err, err
    assert "Traceback" not in err
    monkeypatch.undo()

    left = {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}
    assert not [p for p in left if ".tmp" in p], f"temporary files left behind: {left}"
    assert not (store / "store.json").exists()
    failing = opened[2].relative_to(store).as_posix()
    if where == "part":
        assert failing in left  # published whole (renamed after fsync): a complete shard
    else:
        assert failing not in left, "a shard that looks complete but is not"
    for p in left:  # every tar left behind is complete: the bytes an uninterrupted run writes
        if p.endswith(".tar"):
            assert (store / p).read_bytes() == files[p], p

    summary = run_extract(load_extract_config(cfg), progress=False)
    assert summary.resumed_shards == 2
    assert snapshot(store) == files


def test_shard_writer_full_disk_removes_its_temporary_file(tmp_path, monkeypatch):
    from features.errors import StoreError

    monkeypatch.setattr(shards_mod._HashingWriter, "write", _enospc)
    with pytest.raises(StoreError, match=r"x\.tar: cannot write \(No space left on device\)"):
        with shards_mod.ShardWriter(tmp_path / "x.tar") as w:
            w.add("a.json", b"{}")
            w.close()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pathlib.Path, "write_bytes", _enospc)
    with pytest.raises(StoreError, match=r"y\.json: cannot write \(No space left on device\)"):
        shards_mod.write_atomic(tmp_path / "y.json", b"{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_max_errors_as_a_fraction_aborts_then_resumes(demo_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    lines = (data / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    bad = [lines[i].split(",") for i in (2, 3, 4)]  # train rows of the first shard
    for row in bad:
        (data / row[header.index("audio")]).write_text("not audio")
    cfg = write_extract_config(
        tmp_path / "c.yaml",
        data / "manifest.csv",
        tmp_path / "s",
        GROUPS,
        samples_per_shard=8,
        missing_media="record",
    )
    # 3 errors in 48 samples is 6.25 %: over 5 %, so the run stops after the first shard.
    assert main(["extract", str(cfg), "--serial", "--quiet", "--max-errors", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "3 per-sample errors exceed max_errors=0.05" in err, err
    assert re.search(r"finished shard(s|\(s\)) are kept", err), err
    assert not (tmp_path / "s" / "store.json").exists()
    parts = sorted(p.name for p in (tmp_path / "s").rglob("parts/*.json"))  # finished-shard records
    assert parts == ["train-000000.json"]
    assert main(["extract", str(cfg), "--serial", "--quiet", "--max-errors", "0.07"]) == 0
    import pyarrow.parquet as pq

    errors = pq.read_table(tmp_path / "s" / "catalog" / "errors.parquet").to_pylist()
    assert sorted(e["key"] for e in errors) == sorted(row[0] for row in bad)
    assert pq.read_table(tmp_path / "s" / "catalog" / "samples.parquet").num_rows == len(lines) - 1


@pytest.mark.slow
def test_disk_full_while_writing_the_catalog(reference, monkeypatch, capsys):
    import pyarrow.parquet as pq

    cfg, store, files = reference

    class FullDisk(pq.ParquetWriter):  # the catalog streams its tables through ParquetWriter
        def __init__(self, where, *args, **kwargs):
            super().__init__(where, *args, **kwargs)
            self.where = str(where)

        def write_table(self, table, *args, **kwargs):
            if "samples" in self.where:
                super().write_table(table.slice(0, 1), *args, **kwargs)  # a partial file
                _enospc()
            return super().write_table(table, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetWriter", FullDisk)
    assert main(["extract", str(cfg), "--serial", "--quiet"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    assert not [p for p in store.rglob("*") if ".tmp" in p.name]
    run_extract(load_extract_config(cfg), progress=False)
    assert snapshot(store) == files
