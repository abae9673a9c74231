import io
import json
import pickle
import shutil
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from batch_checks import assert_same_batches

from features.errors import ShardFormatError
from features.spec import FieldSpec
from fusion.collate import collate
from fusion.loader import StreamingLoader, iter_joined
from fusion.shard_reader import CatalogMismatchWarning, MemberDecoder, load_member_index
from pipelines.shards import ShardWriter, npy_bytes
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


# ---- the indexed path (catalog offsets, no tar parsing) against the tar-iterating reference ----


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle", [False, True])
def test_indexed_path_gives_the_tar_paths_batches(tiny_store, num_workers, shuffle):
    kw = dict(batch_size=5, shuffle=shuffle, seed=3, buffer_size=8, num_workers=num_workers)
    fast = StreamingLoader(tiny_store, "train", **kw)
    ref = StreamingLoader(tiny_store, "train", fast=False, **kw)
    assert fast.dataset.members and ref.dataset.members is None
    for epoch in range(2):
        fast.set_epoch(epoch)
        ref.set_epoch(epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CatalogMismatchWarning)  # no shard may fall back here
            got = list(fast)
        assert_same_batches(got, list(ref))


def test_indexed_path_normalizes_like_the_tar_path(tiny_store):
    kw = dict(batch_size=7, normalize=True)
    assert_same_batches(
        list(StreamingLoader(tiny_store, "val", **kw)),
        list(StreamingLoader(tiny_store, "val", fast=False, **kw)),
    )


def test_indexed_samples_are_views_of_the_mapped_shard(tiny_store):
    store = open_store(tiny_store)
    shard = store.shards("val")[0]
    groups = ["audio", "video"]
    index = load_member_index(store, groups, [shard])
    paths = {g: store.shard_path(g, shard) for g in groups}
    fast = list(iter_joined(shard, paths, {g: index[g, shard] for g in groups}))
    ref = list(iter_joined(shard, paths))
    assert [s["key"] for s in fast] == [s["key"] for s in ref]
    for i, (a, b) in enumerate(zip(fast, ref, strict=True)):
        assert (a["label"], a["present"]) == (b["label"], b["present"])
        for name, arr in a["fields"].items():
            # Past each field's first member (its header parsed by np.load): np.frombuffer views.
            assert arr.flags.writeable == (i == 0)
            assert arr.dtype == b["fields"][name].dtype and arr.tobytes() == b["fields"][name].tobytes()


def test_loader_state_pickles_for_spawned_workers(tiny_store):
    loader = StreamingLoader(tiny_store, "train", batch_size=4)
    clone = pickle.loads(pickle.dumps(loader.dataset))
    assert clone.members.keys() == loader.dataset.members.keys()
    key = next(iter(clone.members))
    np.testing.assert_array_equal(clone.members[key].offsets, loader.dataset.members[key].offsets)


def _npy(array, version=None):
    buf = io.BytesIO()
    if version is None:
        np.save(buf, array, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("dtype", ["float16", "float32", "int64", ">f4"])
@pytest.mark.parametrize("rest", [(), (3,), (2, 4, 4)])
@pytest.mark.parametrize("fortran", [False, True])
@pytest.mark.parametrize("version", [None, (2, 0)])
def test_npy_fast_decode_equals_np_load(dtype, rest, fortran, version):
    rng = np.random.default_rng(0)
    decoder = MemberDecoder("train-000000")
    # Lengths across digit counts (header padding changes), including an empty sequence.
    for i, n in enumerate([5, 0, 1, 9, 10, 123, 1000, 7]):
        a = (rng.standard_normal((n, *rest)) * 1000).astype(dtype)
        if a.dtype.kind == "f" and a.size:
            a.flat[0] = np.nan  # bit-identical, not merely equal
        if fortran:
            a = np.asfortranarray(a)
        data = _npy(a, version)
        got = decoder("audio", f"k{i}", "mfcc.npy", memoryview(data))
        want = np.load(io.BytesIO(data), allow_pickle=False)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes(order="A") == want.tobytes(order="A")
        assert got.flags.f_contiguous == want.flags.f_contiguous
        assert got.flags.c_contiguous == want.flags.c_contiguous
        # np.save writes fortran_order only for arrays not also C-contiguous (not (1, 3), (0, 3)).
        order = a.flags.f_contiguous and not a.flags.c_contiguous
        if i == 0:
            first_order = order
        # Same header but for the first axis: a read-only np.frombuffer view; else np.load.
        assert got.flags.writeable == (i == 0 or order != first_order)
    layout = decoder.layouts["audio", "mfcc.npy"]
    assert layout.fast
    # A member whose header differs but for the first axis goes through np.load, still right.
    other = rng.standard_normal((4, 6)).astype(dtype)
    got = decoder("audio", "k9", "mfcc.npy", memoryview(_npy(other, version)))
    assert got.flags.writeable and got.dtype == other.dtype and got.tobytes() == other.tobytes()


def test_npy_fast_decode_refuses_a_later_object_member():
    decoder = MemberDecoder("train-000000")
    decoder("audio", "k0", "mfcc.npy", memoryview(_npy(np.ones((2, 3), np.float32))))
    evil = io.BytesIO()
    np.save(evil, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ShardFormatError, match=r"train-000000: member 'k1.mfcc.npy': .*pickle refused"):
        decoder("audio", "k1", "mfcc.npy", memoryview(evil.getvalue()))


def _rewrite_with_catalog(store, group, shard, members, hide=()):
    """Rewrite one group's shard and its catalog rows, as extraction would have written them.

    Members named in ``hide`` are written to the tar but left out of the catalog.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = store.shard_path(group, shard)
    with ShardWriter(path) as w:
        for name, data in members:
            w.add(name, data)
        nbytes, sha = w.close()
    cat = store.root / "catalog"
    table = pq.read_table(cat / "members.parquet")
    keep = pc.invert(pc.and_(pc.equal(table["group"], group), pc.equal(table["shard"], shard)))
    rows = [
        {"group": group, "shard": shard, "member": m.name, "offset": m.offset, "size": m.size}
        for m in w.members
        if m.name not in hide
    ]
    new = pa.Table.from_pylist(rows, schema=table.schema)
    pq.write_table(pa.concat_tables([table.filter(keep), new]), cat / "members.parquet")
    shards = pq.read_table(cat / "shards.parquet").to_pylist()
    for r in shards:
        if (r["group"], r["shard"]) == (group, shard):
            r["bytes"], r["sha256"] = nbytes, sha
    pq.write_table(pa.Table.from_pylist(shards), cat / "shards.parquet")


@pytest.mark.parametrize("which", [0, 1])  # the field's first member (header parse) or a later one
def test_indexed_path_refuses_object_npy_with_a_matching_catalog(tiny_store, tmp_path, which):
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("test")[0]
    members = _members(store.shard_path("audio", shard))
    npys = [i for i, (name, _) in enumerate(members) if name.endswith(".mfcc.npy")]
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    victim = members[npys[which]][0]
    members[npys[which]] = (victim, buf.getvalue())
    _rewrite_with_catalog(store, "audio", shard, members)
    loader = StreamingLoader(tmp_path / "s", "test", groups=["audio"], batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)  # the catalog matches: indexed path
        with pytest.raises(
            ShardFormatError, match=rf"{shard}: member '{victim}': not a plain .npy.*pickle refused"
        ):
            list(loader)


def test_indexed_path_refuses_other_extensions_with_a_matching_catalog(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("test")[0]
    members = _members(store.shard_path("audio", shard))
    key = members[0][0].split(".")[0]
    _rewrite_with_catalog(store, "audio", shard, [*members[:2], (f"{key}.extra.pkl", b"\x80\x04K\x01.")])
    loader = StreamingLoader(tmp_path / "s", "test", groups=["audio"], batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)
        with pytest.raises(
            ShardFormatError,
            match=rf"{shard}: member '{key}.extra.pkl': extension 'extra.pkl' is not allowed",
        ):
            list(loader)


@pytest.mark.parametrize("change", ["resized", "reordered"])
def test_stale_catalog_falls_back_to_tar_iteration(tiny_store, tmp_path, change):
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("val")[0]
    path = store.shard_path("audio", shard)
    members = _members(path)
    size = path.stat().st_size
    if change == "resized":  # one sequence two frames shorter: the file size changes
        i = next(i for i, (name, _) in enumerate(members) if name.endswith(".mfcc.npy"))
        arr = np.load(io.BytesIO(members[i][1]))
        members[i] = (members[i][0], npy_bytes(arr[:-2]))
    else:  # the first two samples swapped: same size, but every catalog offset is wrong
        first = [m for m in members if m[0].startswith(members[0][0].split(".")[0] + ".")]
        second = members[len(first) : 2 * len(first)]
        members = [*second, *first, *members[2 * len(first) :]]
    _rewrite(path, members)  # catalog/members.parquet not updated
    if change == "reordered":
        assert path.stat().st_size == size
    fast = StreamingLoader(tmp_path / "s", "val", groups=["audio", "video"], batch_size=64)
    ref = StreamingLoader(tmp_path / "s", "val", groups=["audio", "video"], batch_size=64, fast=False)
    if change == "reordered":  # the join now fails, naming the shard, on both paths
        for loader in (fast, ref):
            with pytest.warns(CatalogMismatchWarning) if loader is fast else warnings.catch_warnings():
                with pytest.raises(ShardFormatError, match=rf"shard {shard}: key mismatch"):
                    list(loader)
        audio_only = dict(groups=["audio"], batch_size=64)
        fast = StreamingLoader(tmp_path / "s", "val", **audio_only)
        ref = StreamingLoader(tmp_path / "s", "val", fast=False, **audio_only)
    with pytest.warns(
        CatalogMismatchWarning, match=rf"audio/(\S*/)?{shard}\.tar: does not match catalog/members.parquet"
    ):
        got = list(fast)
    assert_same_batches(got, list(ref))


def test_store_without_members_table_reads_tars(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s")
    (store.root / "catalog" / "members.parquet").unlink()
    fast = StreamingLoader(tmp_path / "s", "val", batch_size=6)
    assert fast.dataset.members == {}
    assert_same_batches(list(fast), list(StreamingLoader(tiny_store, "val", batch_size=6, fast=False)))


def test_corrupt_tar_header_is_an_error_on_both_paths(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("val")[0]
    path = store.shard_path("audio", shard)
    rows = [r for r in store.table("members").to_pylist() if (r["group"], r["shard"]) == ("audio", shard)]
    victim = rows[len(rows) // 2]
    raw = bytearray(path.read_bytes())
    raw[victim["offset"] - 512 + 136] ^= 1  # an mtime bit: name, size and file size unchanged
    path.write_bytes(bytes(raw))
    # tarfile stops at a header with a bad checksum: samples would be lost, so both paths refuse.
    kw = dict(groups=["audio"], batch_size=64)
    with pytest.warns(CatalogMismatchWarning):
        with pytest.raises(ShardFormatError, match=rf"{shard}\.tar.*run modalstore verify"):
            list(StreamingLoader(tmp_path / "s", "val", **kw))
    with pytest.raises(ShardFormatError, match=rf"{shard}\.tar.*run modalstore verify"):
        list(StreamingLoader(tmp_path / "s", "val", fast=False, **kw))


@pytest.mark.parametrize("fast", [True, False])
def test_shard_with_fewer_samples_than_the_store_records_is_refused(tiny_store, tmp_path, fast):
    # A well-formed shard, catalog rows matching it, but store.json's count is larger: an exact
    # epoch cannot be planned over samples that are not there, so the shard is named.
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("val")[0]
    want = store.meta["splits"]["val"]["shard_samples"][0]
    for group in store.groups:
        members = _members(store.shard_path(group, shard))
        first_key = members[0][0].split(".")[0]
        kept = [m for m in members if not m[0].startswith(first_key + ".")]
        _rewrite_with_catalog(store, group, shard, kept)
    loader = StreamingLoader(tmp_path / "s", "val", batch_size=4, fast=fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CatalogMismatchWarning)  # the catalog matches the files
        with pytest.raises(
            ShardFormatError,
            match=rf"shard {shard}: .* hold {want - 1} readable samples, store.json says {want}",
        ):
            list(loader)


def _standardise(norm, name, a):
    """The per-sample formula, computed independently of collate."""
    return a if norm is None or name not in norm else (a - norm[name][0]) / norm[name][1]


def test_collate_pads_masks_missing_and_normalizes():
    specs = {
        "a.seq": FieldSpec("float32", (None, 3)),
        "a.vec": FieldSpec("float16", (4,)),
        "b.x": FieldSpec("float64", (2,)),
        "b.n": FieldSpec("int64", (2,)),
    }
    groups = {"a.seq": "a", "a.vec": "a", "b.x": "b", "b.n": "b"}
    rng = np.random.default_rng(0)
    samples = []
    for i, n in enumerate([3, 0, 5, 1]):
        fields = {"b.x": rng.standard_normal(2), "b.n": np.array([i, 10 * i])}
        if i != 1:  # sample 1 misses group a
            fields["a.seq"] = rng.standard_normal((n, 3)).astype(np.float32)
            fields["a.vec"] = rng.standard_normal(4).astype(np.float16)
        samples.append({"key": f"k{i}", "label": i, "present": {"a": i != 1, "b": True}, "fields": fields})
    norm = {
        "a.seq": (np.array([0.5, -1, 2], np.float32), np.array([2, 0.5, 1], np.float32)),
        "a.vec": (np.full(4, 0.25, np.float32), np.full(4, 3, np.float32)),
        "b.x": (np.array([1, 2], np.float32), np.array([3, 4], np.float32)),
    }
    for nm in (None, norm):
        batch = collate(samples, specs, groups, nm)
        seq, vec = batch["features"]["a.seq"].numpy(), batch["features"]["a.vec"].numpy()
        assert seq.shape == (4, 5, 3) and seq.dtype == np.float32 and vec.dtype == np.float32
        assert batch["lengths"]["a.seq"].tolist() == [3, 0, 5, 1]
        assert batch["mask"]["a.seq"].tolist() == [[j < n for j in range(5)] for n in [3, 0, 5, 1]]
        assert batch["present"]["a"].tolist() == [True, False, True, True]
        for i, s in enumerate(samples):
            f = s["fields"]
            if i == 1:
                assert not seq[i].any() and not vec[i].any()
                continue

            n = len(f["a.seq"])
            assert seq[i, :n].tobytes() == _standardise(nm, "a.seq", f["a.seq"]).astype(np.float32).tobytes()
            assert not seq[i, n:].any()  # padding stays zero, normalised or not
            assert vec[i].tobytes() == _standardise(nm, "a.vec", f["a.vec"]).astype(np.float32).tobytes()
            x = batch["features"]["b.x"].numpy()[i]
            assert (
                x.tobytes() == _standardise(nm, "b.x", f["b.x"]).astype(np.float32).tobytes()
            )  # float64 math, then float32
            assert batch["features"]["b.n"].numpy()[i].tolist() == f["b.n"].tolist()


def test_member_missing_from_the_catalog_is_still_refused(tiny_store, tmp_path):
    # A catalog that skips a member (offsets otherwise right) must not hide it from the checks.
    store = _copy_store(tiny_store, tmp_path / "s")
    shard = store.shards("test")[0]
    members = _members(store.shard_path("audio", shard))
    key = members[0][0].split(".")[0]
    evil = (f"{key}.extra.pkl", b"\x80\x04K\x01.")
    _rewrite_with_catalog(store, "audio", shard, [members[0], evil, *members[1:]], hide={evil[0]})
    loader = StreamingLoader(tmp_path / "s", "test", groups=["audio"], batch_size=4)
    with pytest.warns(CatalogMismatchWarning):
        with pytest.raises(
            ShardFormatError, match=rf"member '{key}.extra.pkl': extension 'extra.pkl' is not allowed"
        ):
            list(loader)


def test_loader_reads_a_catalog_selection_only(tiny_store):
    import pyarrow.compute as pc

    from features.errors import StoreError

    store = open_store(tiny_store)
    rows = store.table("samples").to_pylist()
    label = next(r["label"] for r in rows if r["split"] == "train")
    shards = store.select(pc.field("label") == label, split="train")
    want = Counter(r["key"] for r in rows if r["shard"] in shards)  # every sample of those shards
    loader = StreamingLoader(tiny_store, "train", batch_size=4, shards=shards)
    assert Counter(keys_of(loader)) == want and loader.num_samples == sum(want.values())
    assert any(r["label"] == label for r in rows if r["key"] in want)
    with pytest.raises(StoreError, match=r"shard\(s\) \['test-000000'\] are not in split 'train'"):
        StreamingLoader(tiny_store, "train", shards=["test-000000"])
