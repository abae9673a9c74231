import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from features.errors import ShardFormatError
from fusion.loader import StreamingLoader, iter_joined
from pipelines.shards import ShardWriter
from pipelines.store import open_store


def keys_of(loader):
    return [k for b in loader for k in b["keys"]]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_exactly_once_per_epoch(tiny_store, num_workers, shuffle):
    store = open_store(tiny_store)
    expected = [r["key"] for r in store.table("samples").to_pylist() if r["split"] == "train"]
    loader = StreamingLoader(
        tiny_store, "train", batch_size=5, shuffle=shuffle, seed=1, num_workers=num_workers
    )
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        got = [k for b in batches for k in b["keys"]]
        assert Counter(got) == Counter(expected)
        if not shuffle and num_workers == 0:
            assert got == expected


def test_shuffle_is_seeded_per_epoch(tiny_store):
    a = StreamingLoader(tiny_store, "train", batch_size=4, shuffle=True, seed=7, buffer_size=16)
    b = StreamingLoader(tiny_store, "train", batch_size=4, shuffle=True, seed=7, buffer_size=16)
    assert keys_of(a) == keys_of(b)
    a.set_epoch(1)
    assert keys_of(a) != keys_of(b)


def test_batches_match_plain_reads_with_padding_and_masks(tiny_store):
    store = open_store(tiny_store)
    direct = {}
    for shard in store.shards("val"):
        for s in wds.WebDataset(str(store.shard_path("audio", shard)), shardshuffle=False):
            direct[s["__key__"]] = (np.load(io.BytesIO(s["mfcc.npy"])), json.loads(s["json"])["label"])
    loader = StreamingLoader(tiny_store, "val", groups=["audio"], batch_size=64)
    (batch,) = list(loader)
    feats, lengths, mask = (
        batch["features"]["audio.mfcc"],
        batch["lengths"]["audio.mfcc"],
        batch["mask"]["audio.mfcc"],
    )
    assert feats.shape[0] == len(direct) and feats.shape[1] == max(a.shape[0] for a, _ in direct.values())
    for i, key in enumerate(batch["keys"]):
        arr, label = direct[key]
        assert int(lengths[i]) == arr.shape[0] and int(batch["label"][i]) == label
        np.testing.assert_array_equal(feats[i, : arr.shape[0]].numpy(), arr)
        assert not feats[i, arr.shape[0] :].any()
        assert mask[i].sum() == arr.shape[0] and mask[i, : arr.shape[0]].all()
    assert batch["present"]["audio"].all()


def _copy_store(src, dst):
    shutil.copytree(src, dst)
    return open_store(dst)


def _rewrite(path, members):
    with ShardWriter(path) as w:
        for name, data in members:
            w.add(name, data)
        w.close()


def _members(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def test_pickle_members_are_refused(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("test")[0]
    path = store.shard_path("audio", shard)
    members = _members(path)
    key = members[0][0].split(".")[0]
    _rewrite(path, [*members[:2], (f"{key}.extra.pkl", b"\x80\x04K\x01.")])
    with pytest.raises(
        ShardFormatError, match=rf"{shard}: member '{key}.extra.pkl': extension 'extra.pkl' is not allowed"
    ):
        list(iter_joined(shard, {"audio": path}))
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    _rewrite(path, [members[0], (f"{key}.mfcc.npy", buf.getvalue())])
    with pytest.raises(ShardFormatError, match="pickle refused"):
        list(iter_joined(shard, {"audio": path}))


def test_key_mismatch_between_groups_is_named(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("test")[0]
    path = store.shard_path("video", shard)
    members = _members(path)
    key = members[0][0].split(".")[0]
    _rewrite(path, [(name.replace(key, "intruder", 1), data) for name, data in members])
    loader = StreamingLoader(tmp_path / "s", "test", groups=["audio", "video"], batch_size=4)
    with pytest.raises(
        ShardFormatError,
        match=rf"shard {shard}: key mismatch between groups: 'audio' has '{key}', 'video' has 'intruder'",
    ):
        list(loader)


def test_unknown_group_and_split(tiny_store):
    from features.errors import StoreError

    with pytest.raises(StoreError, match=r"unknown group\(s\) \['smell'\]"):
        StreamingLoader(tiny_store, "train", groups=["smell"])
    with pytest.raises(StoreError, match="no split 'dev'"):
        StreamingLoader(tiny_store, "dev")


def test_normalize_uses_train_statistics(tiny_store):
    store = open_store(tiny_store)
    st = store.stats("audio")["mfcc"]
    raw = next(iter(StreamingLoader(tiny_store, "test", groups=["audio"], batch_size=64)))
    norm = next(iter(StreamingLoader(tiny_store, "test", groups=["audio"], batch_size=64, normalize=True)))
    x, z, mask = raw["features"]["audio.mfcc"], norm["features"]["audio.mfcc"], raw["mask"]["audio.mfcc"]
    want = (x.numpy() - st["mean"]) / st["std"]
    np.testing.assert_allclose(z.numpy()[mask.numpy()], want[mask.numpy()], rtol=1e-5, atol=1e-5)
    assert not z[~mask].any()  # padding stays zero
