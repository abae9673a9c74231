"""Extraction on a real Dask cluster (`dask scheduler` + `dask worker` processes on loopback):
the same store as a local run, survival of a worker SIGKILL, bounded retries of a poison shard."""

import os
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cluster_fixtures import dask_cluster
from distributed import Client
from store_fixtures import TINY_GROUPS, write_extract_config

from fusion.loader import StreamingLoader
from modalstore import main
from pipelines.extract import load_extract_config, run_extract
from pipelines.store import open_store
from pipelines.verify import verify_store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GROUPS = {"audio": TINY_GROUPS["audio"], "video": TINY_GROUPS["video"]}
POISON = Path(__file__).parent.parent / "poison_preload.py"


def shard_hashes(root):
    return {
        (r["group"], r["shard"]): r["sha256"]
        for r in pq.read_table(root / "catalog/shards.parquet").to_pylist()
    }


def store_files(root):
    """Every file under shards/: (relative path, bytes) — no leftovers allowed."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "shards").rglob("*")) if p.is_file()
    }


@pytest.fixture
def reference(demo_dir, tmp_path):
    """A serial run of the config the cluster runs (2 samples per shard: 24 tasks)."""
    cfg = write_extract_config(tmp_path / "ref.yaml", demo_dir / "manifest.csv", tmp_path / "ref", GROUPS, 2)
    run_extract(load_extract_config(cfg), progress=False)
    return tmp_path / "ref"


def cluster_config(demo_dir, tmp_path):
    return write_extract_config(tmp_path / "c.yaml", demo_dir / "manifest.csv", tmp_path / "s", GROUPS, 2)


def test_cli_on_a_real_cluster_gives_the_local_store(demo_dir, tmp_path, reference):
    with dask_cluster(tmp_path, {"w1": [], "w2": []}) as addr:
        assert main(["extract", str(cluster_config(demo_dir, tmp_path)), "--scheduler", addr, "--quiet"]) == 0
        with Client(addr) as client:
            assert len(client.scheduler_info()["workers"]) == 2  # the cluster stays up after the job
    assert shard_hashes(tmp_path / "s") == shard_hashes(reference)
    assert store_files(tmp_path / "s") == store_files(reference)
    assert pq.read_table(tmp_path / "s/catalog/samples.parquet").equals(
        pq.read_table(reference / "catalog/samples.parquet")
    )


TRIALS = 10


def test_worker_sigkill_mid_job_loses_and_duplicates_nothing(demo_dir, tmp_path, reference):
    """10 seeded trials on one cluster: a random worker SIGKILLed after a random number of shards."""
    with dask_cluster(tmp_path, {"w1": [], "w2": []}) as addr, Client(addr) as client:
        for trial in range(TRIALS):
            rng = random.Random(trial)
            store = tmp_path / f"s{trial}"
            cfg = load_extract_config(
                write_extract_config(tmp_path / f"c{trial}.yaml", demo_dir / "manifest.csv", store, GROUPS, 2)
            )
            client.wait_for_workers(2, timeout=120)  # the nanny restarted the last trial's victim
            pids = sorted(client.run(os.getpid).values())
            stop_after = rng.randint(1, 16)  # of 24 shards
            outcome = {}

            def job(cfg=cfg, outcome=outcome):
                try:
                    outcome["summary"] = run_extract(cfg, client=client, progress=False)
                except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                    outcome["error"] = exc

            thread = threading.Thread(target=job)
            thread.start()
            deadline = time.time() + 120
            while time.time() < deadline and len(list(store.glob("versions/video/*/parts/*"))) < stop_after:
                time.sleep(0.01)
            assert thread.is_alive(), f"trial {trial}: the job finished before the kill"
            os.kill(rng.choice(pids), signal.SIGKILL)
            thread.join(timeout=300)
            assert "error" not in outcome, (trial, outcome.get("error"))
            summary = outcome["summary"]
            assert summary.failed_shards == [] and summary.errors == 0, trial
            assert shard_hashes(store) == shard_hashes(reference), trial
            assert store_files(store) == store_files(reference), trial  # no partial shard, no temp file
            keys = [
                k
                for split in ("train", "val", "test")
                for b in StreamingLoader(store, split)
                for k in b["keys"]
            ]
            assert len(keys) == len(set(keys)) == 48, trial
            assert verify_store(store, progress=False).ok, trial


def test_poison_shard_is_retried_a_bounded_number_of_times_then_reported(demo_dir, tmp_path, reference):
    rows = pq.read_table(reference / "catalog/samples.parquet").to_pylist()
    poison = next(r for r in rows if r["shard"] == "train-000003")
    # One worker with 3 threads holds several tasks when the poison kills it, and with
    # allowed-failures=0 Dask gives up on all of them at once: only the poison may be reported.
    env = {"MODALSTORE_POISON_KEY": poison["key"], "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    cfg = cluster_config(demo_dir, tmp_path)
    with dask_cluster(tmp_path, {"w1": ["--preload", str(POISON), "--nthreads", "3"]}, env) as addr:
        assert main(["extract", str(cfg), "--scheduler", addr, "--quiet"]) == 1
    store = open_store(tmp_path / "s")
    assert store.meta["failed_shards"] == ["train-000003"]
    errors = pq.read_table(tmp_path / "s/catalog/errors.parquet").to_pylist()
    keys = {r["key"] for r in rows if r["shard"] == "train-000003"}
    assert {(e["key"], e["group"]) for e in errors} == {(k, g) for k in keys for g in GROUPS}
    assert {e["stage"] for e in errors} == {"worker"} and {e["error_type"] for e in errors} == {
        "KilledWorker"
    }
    got, ref = shard_hashes(tmp_path / "s"), shard_hashes(reference)
    assert {k: v for k, v in got.items() if k[1] != "train-000003"} == {
        k: v for k, v in ref.items() if k[1] != "train-000003"
    }
    batches = list(StreamingLoader(tmp_path / "s", "train", batch_size=64))
    present = {
        k: bool(p) for b in batches for k, p in zip(b["keys"], b["present"]["audio"].tolist(), strict=True)
    }
    assert len(present) == sum(r["split"] == "train" for r in rows)  # aligned: every sample still there
    assert {k for k, p in present.items() if not p} == keys
    # the input is fixed (here: no poison): the next run retries only that shard
    summary = run_extract(load_extract_config(cfg), progress=False)
    assert summary.computed == {"audio": 1, "video": 1} and summary.failed_shards == []
    assert shard_hashes(tmp_path / "s") == shard_hashes(reference)
    assert store_files(tmp_path / "s") == store_files(reference)
