"""Interrupted extraction resumes where it stopped and ends byte-identical to an uninterrupted run."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from store_fixtures import TINY_GROUPS, snapshot, write_extract_config

import pipelines.extract as extract_mod
from pipelines.extract import load_extract_config, run_extract

GROUPS = {"audio": TINY_GROUPS["audio"], "video": TINY_GROUPS["video"]}


@pytest.fixture
def reference(demo_dir, tmp_path):
    """Config, store path and the bytes of an uninterrupted run at that same path."""
    store = tmp_path / "store"
    cfg = load_extract_config(
        write_extract_config(
            tmp_path / "c.yaml", demo_dir / "manifest.csv", store, GROUPS, samples_per_shard=4
        )
    )
    run_extract(cfg, progress=False)
    files = snapshot(store)
    shutil.rmtree(store)
    return cfg, store, files


def test_failure_mid_run_then_resume_is_byte_identical(reference, monkeypatch):
    cfg, store, files = reference
    real = extract_mod.extract_shard
    calls = []

    def flaky(plan, tasks, root):
        calls.append(plan.name)
        if len(calls) == 4:
            raise RuntimeError("worker lost")
        return real(plan, tasks, root)

    monkeypatch.setattr(extract_mod, "extract_shard", flaky)
    with pytest.raises(RuntimeError, match="worker lost"):
        run_extract(cfg, progress=False)
    assert not (store / "store.json").exists() and len(list(store.glob("versions/*/*/parts/*.json"))) == 6
    calls.clear()
    monkeypatch.setattr(extract_mod, "extract_shard", lambda *a: (calls.append(a[0].name), real(*a))[1])
    summary = run_extract(cfg, progress=False)
    assert summary.resumed_shards == 3 and len(calls) == summary.shards - 3  # only the missing shards ran
    assert snapshot(store) == files
    assert run_extract(cfg, progress=False).up_to_date


def test_interrupted_run_with_another_config_stays_beside_the_new_one(reference, monkeypatch):
    cfg, store, _ = reference
    monkeypatch.setattr(extract_mod, "extract_shard", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        run_extract(cfg, progress=False)
    monkeypatch.undo()
    other = load_extract_config(store.parent / "c.yaml", ["groups.audio.params.n_mfcc=13"])
    summary = run_extract(other, progress=False)
    assert summary.resumed_shards == 0 and summary.computed == {
        "audio": summary.shards,
        "video": summary.shards,
    }
    versions = {p.name for p in (store / "versions" / "audio").iterdir()}
    assert len(versions) == 2  # the interrupted run's version stays beside the new one (gc removes it)


def test_temporary_files_of_a_killed_run_are_removed_on_resume(reference):
    """A process killed inside ``write_atomic`` or a catalog write leaves a temporary file;
    the next run removes every one (found by the SIGKILL test below when its kill fell
    inside a part record's write)."""
    cfg, store, files = reference
    run_extract(cfg, progress=False)
    (store / "store.json").unlink()  # as if killed before the end
    part = next(store.glob("versions/audio/*/parts/*.json"))
    left = [
        part.with_name(f".{part.name}.tmp-4242"),
        part.parent.parent / ".group.json.tmp-4242",
        next(store.glob("shards/audio/*/*.tar")).with_name(".train-000000.tar.tmp-4242"),
        store / "catalog" / ".samples.parquet.tmp",
        store / ".store.json.tmp-4242",
    ]
    for path in left:
        path.write_bytes(b"half")
    summary = run_extract(cfg, progress=False)
    assert summary.resumed_shards == summary.shards
    assert snapshot(store) == files


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_sigkill_at_a_random_shard_then_resume_is_byte_identical(reference, trial):
    cfg, store, files = reference
    n_shards = sum(1 for f in files if f.startswith("shards/audio/"))
    stop_after = random.Random(trial).randint(1, n_shards - 2)
    cfg_path = store.parent / "c.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modalstore", "extract", str(cfg_path), "--serial", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(store.glob("versions/video/*/parts/*.json"))) >= stop_after:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / "store.json").exists(), "the run finished before it could be killed"
    summary = run_extract(cfg, progress=False)
    assert summary.resumed_shards >= stop_after
    assert snapshot(store) == files


def test_max_errors_aborts_keeps_finished_shards_and_resumes(demo_dir, tmp_path, capsys):
    from modalstore import main

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    lines = (data / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    bad = [lines[i].split(",") for i in (10, 11, 12)]  # train rows in the 3rd shard (4 per shard)
    for row in bad:
        (data / row[header.index("audio")]).write_text("not audio")
    cfg = write_extract_config(
        tmp_path / "c.yaml",
        data / "manifest.csv",
        tmp_path / "s",
        {"audio": TINY_GROUPS["audio"]},
        samples_per_shard=4,
        missing_media="record",
    )
    assert main(["extract", str(cfg), "--serial", "--quiet", "--max-errors", "2"]) == 2
    err = capsys.readouterr().err
    assert "3 per-sample errors exceed max_errors=2" in err and "finished shards are kept" in err
    assert not (tmp_path / "s" / "store.json").exists()
    parts = sorted(p.name for p in (tmp_path / "s").glob("versions/audio/*/parts/*.json"))
    assert parts == ["train-000000.json", "train-000001.json", "train-000002.json"]  # nothing after the abort
    # a fraction: 3 errors of 48 samples is 6 %, under 10 %: the run resumes and completes
    assert main(["extract", str(cfg), "--serial", "--quiet", "--max-errors", "0.1"]) == 0
    import pyarrow.parquet as pq

    errors = pq.read_table(tmp_path / "s" / "catalog" / "errors.parquet").to_pylist()
    assert sorted(e["key"] for e in errors) == sorted(row[0] for row in bad)
