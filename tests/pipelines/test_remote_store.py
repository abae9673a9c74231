"""A store on object storage: an S3-compatible server (moto's server mode) on loopback.

Extraction writes there (serially and from Dask worker processes), the loader streams from
there, ``verify``, ``inspect`` and ``get`` read there, and the store equals a local one."""

import os
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from store_fixtures import TINY_GROUPS, write_extract_config

from fusion.loader import StreamingLoader
from fusion.train import TrainConfig, train_all
from modalstore import main
from pipelines.extract import load_extract_config, run_extract
from pipelines.inspect import inspect_store
from pipelines.lookup import get_sample
from pipelines.store import open_store
from pipelines.verify import verify_store

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

GROUPS = {"audio": TINY_GROUPS["audio"], "video": TINY_GROUPS["video"]}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port; fsspec (and worker processes) pointed at it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,  # read by fsspec at import: Dask worker processes
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    import s3fs

    old_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}  # this process imported fsspec already
    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3")
    fs.mkdir("modalstore-test")
    yield fs
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if old_conf is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = old_conf
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def local_ref(demo_dir, tmp_path):
    cfg = write_extract_config(tmp_path / "local.yaml", demo_dir / "manifest.csv", tmp_path / "local", GROUPS)
    run_extract(load_extract_config(cfg), progress=False)
    return tmp_path / "local"


def _hashes(store):
    return {(r["group"], r["shard"]): r["sha256"] for r in store.table("shards").to_pylist()}


def _batches(root, split="train"):
    return list(StreamingLoader(root, split, batch_size=16, shuffle=True, seed=5))


def test_extract_stream_verify_get_on_s3(demo_dir, tmp_path, s3_endpoint, local_ref, monkeypatch, capsys):
    fs = s3_endpoint
    monkeypatch.setenv("MODALSTORE_CACHE", str(tmp_path / "cache"))
    url = "s3://modalstore-test/serial"
    cfg = write_extract_config(tmp_path / "s3.yaml", demo_dir / "manifest.csv", url, GROUPS)
    first = run_extract(load_extract_config(cfg), progress=False)
    assert first.computed == {"audio": first.shards, "video": first.shards}
    assert fs.exists("modalstore-test/serial/store.json")
    remote, local = open_store(url), open_store(local_ref)
    assert remote.url == url and _hashes(remote) == _hashes(local)  # byte-identical shards
    assert remote.meta["groups"] == local.meta["groups"]
    # the loader streams from S3: the same batches as from the local copy
    for a, b in zip(_batches(url), _batches(local_ref), strict=True):
        assert a["keys"] == b["keys"]
        for name in a["features"]:
            assert np.array_equal(a["features"][name].numpy(), b["features"][name].numpy())
    key = pq.read_table(local_ref / "catalog/samples.parquet").column("key")[5].as_py()
    got, want = get_sample(url, key), get_sample(local_ref, key)
    for g in GROUPS:
        for f, arr in want["groups"][g]["fields"].items():
            assert np.array_equal(got["groups"][g]["fields"][f], arr)
    assert inspect_store(url)["samples"] == inspect_store(local_ref)["samples"]
    assert verify_store(url, progress=False).ok
    # training streams from S3 and gives the same weights as from the local copy
    trained = {}
    for name, root in (("s3", url), ("local", str(local_ref))):
        config = TrainConfig(
            store=root, runs_dir=str(tmp_path / name), groups=list(GROUPS), models=["late_fusion"],
            epochs=1, batch_size=8, hidden=16, device="cpu",
        )  # fmt: skip
        (run,) = train_all(config, progress=False)
        trained[name] = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert trained["s3"].keys() == trained["local"].keys()
    assert all(torch.equal(trained["s3"][k], trained["local"][k]) for k in trained["s3"])
    # a second run is a no-op; changing one group computes only it, on S3 too
    assert run_extract(load_extract_config(cfg), progress=False).up_to_date
    changed = load_extract_config(cfg, ["groups.audio.params.n_mfcc=13"])
    assert run_extract(changed, progress=False).computed == {"audio": first.shards, "video": 0}
    assert len(fs.ls("modalstore-test/serial/shards/audio")) == 2  # both versions, side by side
    # gc on S3: the dry run lists the old audio version, --yes removes it, the store stays whole
    assert main(["gc", url]) == 0 and "would remove version audio" in capsys.readouterr().out
    assert main(["gc", url, "--yes"]) == 0
    fs.invalidate_cache()
    assert len(fs.ls("modalstore-test/serial/shards/audio")) == 1
    assert verify_store(url, progress=False).ok
    # one flipped byte in a shard object: verify (from the CLI) names the shard
    shard = open_store(url).shards("train")[1]
    path = open_store(url).shard_path("video", shard).removeprefix("s3://")
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    assert main(["verify", url, "--quiet"]) == 1
    assert f"video/{shard}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.cluster
def test_dask_workers_write_the_store_to_s3(demo_dir, tmp_path, s3_endpoint, local_ref, monkeypatch):
    from pipelines.cluster import local_client, shutdown

    monkeypatch.setenv("MODALSTORE_CACHE", str(tmp_path / "cache"))
    url = "s3://modalstore-test/dask"
    cfg = write_extract_config(tmp_path / "s3.yaml", demo_dir / "manifest.csv", url, GROUPS)
    client = local_client(2)  # worker processes: they reach S3 through the environment only
    try:
        run_extract(load_extract_config(cfg), client=client, progress=False)
    finally:
        shutdown(client)
    assert _hashes(open_store(url)) == _hashes(open_store(local_ref))
    assert verify_store(url, progress=False).ok
