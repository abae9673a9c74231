import io
import json
import shutil
import tempfile
from types import SimpleNamespace

import librosa
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from store_fixtures import TINY_GROUPS, write_extract_config

from features.errors import ConfigError, ModalstoreError, StoreError
from pipelines.extract import load_extract_config, run_extract
from pipelines.manifest import read_manifest
from pipelines.shards import sha256_file
from pipelines.store import open_store


def test_catalog_matches_manifest(tiny_store, demo_dir):
    manifest = read_manifest(demo_dir / "manifest.csv")
    store = open_store(tiny_store)
    samples = store.table("samples").to_pylist()
    assert [r["key"] for r in samples] == [
        s.key for p in ("train", "val", "test") for s in manifest.samples if s.split == p
    ]
    by_key = {s.key: s for s in manifest.samples}
    for r in samples:
        assert r["split"] == by_key[r["key"]].split and r["label"] == by_key[r["key"]].label
        assert r["shard"].startswith(r["split"] + "-")
        assert all(r[f"has_{g}"] for g in TINY_GROUPS)
    assert store.num_samples("train") + store.num_samples("val") + store.num_samples("test") == len(manifest)
    assert store.table("errors").num_rows == 0
    for row in store.table("shards").to_pylist():
        path = store.shard_path(row["group"], row["shard"])
        assert row["sha256"] == sha256_file(path) and row["bytes"] == path.stat().st_size


def test_plain_webdataset_reads_shards_and_specs_hold(tiny_store):
    store = open_store(tiny_store)
    for group in store.groups:
        specs = store.field_specs(group)
        urls = [str(store.shard_path(group, s)) for s in store.shards("train")]
        n = 0
        for sample in wds.WebDataset(urls, shardshuffle=False):
            meta = json.loads(sample["json"])
            assert meta["present"] and meta["key"] == sample["__key__"]
            for field, spec in specs.items():
                spec.check(field, np.load(io.BytesIO(sample[f"{field}.npy"]), allow_pickle=False))
            n += 1
        assert n == store.num_samples("train")


def test_mfcc_in_store_equals_direct_librosa(tiny_store, demo_dir):
    store = open_store(tiny_store)
    params = store.meta["groups"]["audio"]["params"]
    manifest = {s.key: s for s in read_manifest(demo_dir / "manifest.csv").samples}
    shard = store.shards("test")[0]
    checked = 0
    for sample in wds.WebDataset(str(store.shard_path("audio", shard)), shardshuffle=False):
        stored = np.load(io.BytesIO(sample["mfcc.npy"]), allow_pickle=False)
        y, _ = librosa.load(manifest[sample["__key__"]].media["audio"], sr=params["sample_rate"], mono=True)
        direct = librosa.feature.mfcc(
            y=y,
            sr=params["sample_rate"],
            n_mfcc=params["n_mfcc"],
            n_fft=params["n_fft"],
            hop_length=params["hop_length"],
            n_mels=params["n_mels"],
            fmin=params["fmin"],
            fmax=params["fmax"],
        ).T.astype(np.float32)
        np.testing.assert_array_equal(stored, direct)
        checked += 1
    assert checked > 0


def test_bad_media_is_recorded_and_alignment_kept(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    lines = (data / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    first = lines[1].split(",")
    (data / first[header.index("audio")]).write_text("this is not audio")  # a text file named .wav
    second = lines[2].split(",")
    (data / second[header.index("video")]).unlink()  # a missing file
    groups = {"audio": TINY_GROUPS["audio"], "video": TINY_GROUPS["video"]}
    cfg = write_extract_config(
        tmp_path / "c.yaml", data / "manifest.csv", tmp_path / "store", groups, missing_media="record"
    )
    summary = run_extract(load_extract_config(cfg), progress=False)
    assert summary.errors == 2
    store = open_store(tmp_path / "store")
    errors = {(r["key"], r["group"]): r for r in store.table("errors").to_pylist()}
    assert set(errors) == {(first[0], "audio"), (second[0], "video")}
    assert errors[(first[0], "audio")]["stage"] == "decode" and errors[(first[0], "audio")]["message"]
    rows = {r["key"]: r for r in store.table("samples").to_pylist()}
    assert not rows[first[0]]["has_audio"] and rows[first[0]]["has_video"]
    assert not rows[second[0]]["has_video"] and rows[second[0]]["has_audio"]
    # every group's shard holds the same keys in the same order
    shard = rows[first[0]]["shard"]
    keys = {
        g: [s["__key__"] for s in wds.WebDataset(str(store.shard_path(g, shard)), shardshuffle=False)]
        for g in groups
    }
    assert keys["audio"] == keys["video"] and first[0] in keys["audio"]
    # with the default policy a missing file stops before any work
    cfg2 = write_extract_config(tmp_path / "c2.yaml", data / "manifest.csv", tmp_path / "store2", groups)
    with pytest.raises(Exception, match=r"row 2, column 'video': file not found"):
        run_extract(load_extract_config(cfg2), progress=False)
    assert not (tmp_path / "store2").exists()


def test_rerun_is_a_no_op_and_overwrite_refuses_a_foreign_folder(tiny_store, demo_dir, tmp_path):
    groups = {"audio": TINY_GROUPS["audio"]}
    cfg = write_extract_config(tmp_path / "c.yaml", demo_dir / "manifest.csv", tmp_path / "s", groups)
    first = run_extract(load_extract_config(cfg), progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*") if p.is_file()}
    again = run_extract(load_extract_config(cfg), progress=False)  # same config and manifest: nothing to do
    assert again.up_to_date and not first.up_to_date and "is up to date" in str(again)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*") if p.is_file()} == before
    changed = load_extract_config(cfg, ["groups.audio.params.n_mfcc=13"])
    run_extract(changed, overwrite=True, progress=False)  # empties the store: one version left
    assert len(list((tmp_path / "s" / "shards" / "audio").iterdir())) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    cfg2 = write_extract_config(tmp_path / "c2.yaml", demo_dir / "manifest.csv", tmp_path / "other", groups)
    with pytest.raises(StoreError, match="is not a modalstore store"):
        run_extract(load_extract_config(cfg2), overwrite=True, progress=False)
    assert (tmp_path / "other" / "precious.txt").exists()


def test_extract_driver_allocates_arrow_memory_on_the_system_pool(tmp_path, monkeypatch):
    """mimalloc (Arrow's default pool) kept the pages of spill reads; the driver runs on the
    system allocator and gives the default back afterwards, also when the run fails."""
    import pyarrow as pa

    import pipelines.extract as ex

    seen = []
    prepare = ex.prepare

    def spy(*a, **k):
        seen.append(pa.default_memory_pool().backend_name)
        return prepare(*a, **k)

    monkeypatch.setattr(ex, "prepare", spy)
    before = pa.default_memory_pool().backend_name
    (tmp_path / "m.csv").write_text("key,label,split,text\nk1,0,train,hello there\nk2,1,val,bye now\n")
    groups = {"text": {"extractor": "bow", "params": {"max_features": 8}}}
    cfg = write_extract_config(tmp_path / "c.yaml", tmp_path / "m.csv", tmp_path / "s", groups)
    assert run_extract(load_extract_config(cfg), progress=False).samples == 2
    bad = write_extract_config(tmp_path / "b.yaml", tmp_path / "none.csv", tmp_path / "s2", groups)
    with pytest.raises(ModalstoreError, match="manifest not found"):
        run_extract(load_extract_config(bad), progress=False)
    assert seen == ["system", "system"]
    assert pa.default_memory_pool().backend_name == before != "system"


def test_group_needing_absent_modality_is_rejected(tmp_path):
    (tmp_path / "m.csv").write_text("key,label,split,text\nk1,0,train,hello\n")
    cfg = write_extract_config(
        tmp_path / "c.yaml", tmp_path / "m.csv", tmp_path / "s", {"audio": TINY_GROUPS["audio"]}
    )
    with pytest.raises(ConfigError, match=r"groups.audio: extractor 'mfcc' needs 'audio' media"):
        run_extract(load_extract_config(cfg), progress=False)


def _worker_settings() -> dict:
    import os

    import dask

    from pipelines.cluster import QUIET

    return {
        **{k: dask.config.get(k) for k in QUIET},
        **{k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")},
    }


def _kept_messages(client) -> int:
    """Messages the client keeps after sending them: Dask's debugging log of its comm (1,000 by
    default), where every shard task's message, carrying its shard's rows, stayed alive."""
    return len(client.scheduler_comm.recent_message_log)


@pytest.mark.slow
def test_dask_local_cluster_gives_byte_identical_store(tiny_store, demo_dir, tmp_path):
    from pipelines.cluster import local_client, shutdown

    cfg = write_extract_config(tmp_path / "c.yaml", demo_dir / "manifest.csv", tmp_path / "store")
    client = local_client(2)
    try:
        run_extract(load_extract_config(cfg), client=client, progress=False)
        # the workers run with the housekeeping turned down and without Dask's malloc trim
        settings = client.run(_worker_settings)
        kept = _kept_messages(client)
    finally:
        shutdown(client)
    assert kept == 0
    assert len(settings) == 2
    for got in settings.values():
        assert got == {
            # written out, not read from QUIET: the values BENCHMARKS.md measured
            "distributed.worker.profile.enabled": False,
            "distributed.admin.tick.interval": "1s",
            "distributed.admin.system-monitor.interval": "2s",
            "distributed.worker.memory.monitor-interval": "500ms",
            "MALLOC_TRIM_THRESHOLD_": None,
            "OMP_NUM_THREADS": "1",
        }
    serial = {
        (r["group"], r["shard"]): r["sha256"]
        for r in pq.read_table(tiny_store / "catalog/shards.parquet").to_pylist()
    }
    dask = {
        (r["group"], r["shard"]): r["sha256"]
        for r in pq.read_table(tmp_path / "store/catalog/shards.parquet").to_pylist()
    }
    assert serial == dask
    assert pq.read_table(tmp_path / "store/catalog/samples.parquet").equals(
        pq.read_table(tiny_store / "catalog/samples.parquet")
    )


def _train_arrays(store, group, field):
    arrays = []
    for shard in store.shards("train"):
        for s in wds.WebDataset(str(store.shard_path(group, shard)), shardshuffle=False):
            if f"{field}.npy" in s:
                arrays.append(np.load(io.BytesIO(s[f"{field}.npy"]), allow_pickle=False))
    return arrays


@pytest.mark.parametrize(("group", "field"), [("audio", "mfcc"), ("image", "embedding"), ("video", "grid")])
def test_train_statistics_equal_numpy_over_all_train_arrays(tiny_store, group, field):
    store = open_store(tiny_store)
    arrays = _train_arrays(store, group, field)
    spec = store.field_specs(group)[field]
    x = (np.concatenate(arrays) if spec.variable else np.stack(arrays)).astype(np.float64)
    st = store.stats(group)[field]
    assert int(st["count"]) == x.shape[0]
    np.testing.assert_allclose(st["mean"], x.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st["std"], x.std(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(st["min"], x.min(0).astype(np.float32))
    np.testing.assert_array_equal(st["max"], x.max(0).astype(np.float32))
    assert store.meta["groups"][group]["stats"]["split"] == "train"


@pytest.fixture
def dask_cluster(tmp_path):
    """A real cluster: `dask scheduler` and two `dask worker` processes, one with GPU=1."""
    from cluster_fixtures import dask_cluster as start

    from pipelines.cluster import connect

    with start(tmp_path, {"cpu": [], "gpu": ["--resources", "GPU=1"]}) as address, connect(address) as client:
        yield client


@pytest.mark.cluster
@pytest.mark.slow
def test_gpu_resource_routes_tasks_to_gpu_workers(demo_dir, tmp_path, dask_cluster):
    from distributed import get_task_stream

    client = dask_cluster
    groups = {"audio": {**TINY_GROUPS["audio"], "resources": {"GPU": 1}}}
    cfg = load_extract_config(
        write_extract_config(tmp_path / "c.yaml", demo_dir / "manifest.csv", tmp_path / "s", groups)
    )
    with get_task_stream(client) as ts:
        summary = run_extract(cfg, client=client, progress=False)
    names = {w["id"]: w["name"] for w in client.scheduler_info()["workers"].values()}
    names.update({addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()})
    placed = {
        str(t["key"]): names.get(t["worker"], t["worker"])
        for t in ts.data
        if str(t["key"]).startswith("extract-")
    }
    assert len(placed) == len(open_store(tmp_path / "s").shards("train")) + 2  # train shards + val + test
    assert set(placed.values()) == {"gpu"}
    assert summary.samples == 48 and summary.errors == 0
    assert _kept_messages(client) == 0
    cfg2 = load_extract_config(
        write_extract_config(
            tmp_path / "c2.yaml",
            demo_dir / "manifest.csv",
            tmp_path / "s2",
            {"audio": {**TINY_GROUPS["audio"], "resources": {"TPU": 1}}},
        )
    )
    with pytest.raises(ConfigError, match=r"worker resource TPU=1, but no worker of the cluster offers it"):
        run_extract(cfg2, client=client, progress=False)
    assert not (tmp_path / "s2").exists()  # refused before any work


def test_select_turns_a_catalog_query_into_shard_lists(tiny_store):
    import pyarrow.compute as pc

    store = open_store(tiny_store)
    rows = store.table("samples").to_pylist()
    label = rows[0]["label"]
    want = []
    for r in rows:  # independent: shards of the matching rows, in catalog order
        if r["split"] == "train" and r["label"] == label and r["shard"] not in want:
            want.append(r["shard"])
    assert store.select(pc.field("label") == label, split="train") == want
    assert store.select(split="test") == store.shards("test")
    assert store.select(pc.field("label") == 999) == []


def test_key_index_by_external_merge_equals_a_python_sort_of_the_catalog(demo_dir, tmp_path, monkeypatch):
    import pipelines.store as st

    # runs of 5 rows merged 3 rows at a time: the 48 demo samples go through 10 runs
    monkeypatch.setattr(st, "KEY_SORT_RUN", 5)
    monkeypatch.setattr(st, "KEY_MERGE_BATCH", 3)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the runs are spilled
    cfg = write_extract_config(
        tmp_path / "c.yaml", demo_dir / "manifest.csv", tmp_path / "s", {"audio": TINY_GROUPS["audio"]}, 4
    )
    run_extract(load_extract_config(cfg), progress=False)
    columns = ["key", "split", "label", "shard", "index"]
    samples = pq.read_table(tmp_path / "s/catalog/samples.parquet", columns=columns).to_pylist()
    index = pq.read_table(tmp_path / "s/catalog/keys.parquet")
    assert index.column_names == columns
    assert index.to_pylist() == sorted(samples, key=lambda r: r["key"])
    assert not list((tmp_path / "tmp").iterdir())  # the runs had no name: nothing left


def test_key_index_merge_of_random_unicode_keys_in_many_runs(tmp_path, monkeypatch):
    import random

    import pyarrow as pa

    import pipelines.store as st
    from pipelines.shards import ShardPlan

    rng = random.Random(7)
    alphabet = "abcXYZ019_-éßж中😀"
    keys = list({"".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(3000)})
    rng.shuffle(keys)
    monkeypatch.setattr(st, "KEY_SORT_RUN", 97)
    monkeypatch.setattr(st, "KEY_MERGE_BATCH", rng.choice([1, 7, 64]))
    plans, expected, at = [], [], 0
    while at < len(keys):
        n = rng.randint(1, 150)
        plans.append(ShardPlan(f"train-{len(plans):06d}", "train", []))
        for i, k in enumerate(keys[at : at + n]):
            expected.append(
                {"key": k, "split": "train", "label": len(k), "shard": plans[-1].name, "index": i}
            )
        at += n
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("split", pa.string()),
            ("label", pa.int64()),
            ("shard", pa.string()),
            ("index", pa.int64()),
        ]
    )
    index = st._KeyIndex(plans, schema)
    for number, plan in enumerate(plans):
        part = [r["key"] for r in expected if r["shard"] == plan.name]
        index.add(number, pa.array(part, pa.string()), pa.array([len(k) for k in part], pa.int64()))

    tables: list = []
    index.write(SimpleNamespace(write=tables.append))
    got = pa.concat_tables(tables).to_pylist()
    assert got == sorted(expected, key=lambda r: r["key"])  # code-point order = UTF-8 byte order
