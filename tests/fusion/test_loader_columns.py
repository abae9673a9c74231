"""StreamingLoader's column reads, persistent workers and bucketing by length, on synthetic stores
written by the real shard and catalog writers.

Truths tested against: plain webdataset reads of the same shards (decoded with np.load and
json), the tar-iterating reference path (``fast=False``), and the catalog's keys.
"""

import io
import json
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import webdataset as wds
from batch_checks import assert_same_batches

from features.errors import ConfigError, ShardFormatError
from features.spec import FieldSpec
from fusion.loader import StreamingLoader
from fusion.shard_columns import open_columns
from fusion.shard_reader import load_member_index
from pipelines.manifest import Sample
from pipelines.shards import ShardWriter, plan_shards
from pipelines.store import open_store, write_catalog, write_store_manifest
from pipelines.versions import save_part

SPEC = {
    "a": {"vec": FieldSpec("float16", (6,)), "seq": FieldSpec("float32", (None, 3))},
    "b": {"grid": FieldSpec("float16", (None, 2, 2))},
}


def write_store(root, n=90, per_shard=16, seed=0, member=None):
    """A train split of ``n`` samples; ``member(group, i, arrays, meta)`` may change what is written."""
    rng = np.random.default_rng(seed)
    samples = [Sample(f"k{i:04d}", int(rng.integers(5)), "train", i) for i in range(n)]
    plans = plan_shards(samples, per_shard)
    parts = {g: {} for g in SPEC}
    for plan in plans:
        for g, fields in SPEC.items():
            with ShardWriter(root / f"shards/{g}/v1/{plan.name}.tar") as w:
                for s in plan.samples:
                    arrays = {
                        "vec": rng.standard_normal(6).astype(np.float16),
                        "seq": rng.standard_normal((int(rng.integers(1, 30)), 3)).astype(np.float32),
                        "grid": rng.standard_normal((4, 2, 2)).astype(np.float16),
                    }
                    arrays = {f: arrays[f] for f in fields}
                    meta = {"key": s.key, "label": s.label, "split": "train", "present": True}
                    if member is not None:
                        member(g, s.row, arrays, meta)
                    w.add_sample(s.key, meta, arrays)
                nbytes, sha = w.close()
            parts[g][plan.name] = part = {
                "group": g,
                "version": "v1",
                "shard": plan.name,
                "present": [True] * len(plan.samples),
                "errors": [],
                "file": {"group": g, "version": "v1", "shard": plan.name, "split": "train",
                         "samples": len(plan.samples), "bytes": nbytes, "sha256": sha},
                "members": [[m.name, m.offset, m.size] for m in w.members],
            }  # fmt: skip
            save_part(root, part)  # the record extraction keeps per shard; the catalog is built from it
    write_catalog(root, plans, [SimpleNamespace(name=g, version="v1") for g in SPEC], parts, {})
    splits = {sp: {"samples": 0, "shards": [], "shard_samples": []} for sp in ("val", "test")}
    splits["train"] = {
        "samples": n,
        "shards": [p.name for p in plans],
        "shard_samples": [len(p.samples) for p in plans],
    }
    groups = {
        g: {"fields": {f: fs.to_dict() for f, fs in fields.items()}, "dir": f"shards/{g}/v1"}
        for g, fields in SPEC.items()
    }
    write_store_manifest(root, {"classes": [str(c) for c in range(5)], "splits": splits, "groups": groups})
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("columns") / "s")


def plain_reads(root):
    """{key: (label, {field: array})} by plain webdataset, np.load and json: independent of the loader."""
    st = open_store(root)
    out = {}
    for g in st.groups:
        for shard in st.shards("train"):
            for s in wds.WebDataset(str(st.shard_path(g, shard)), shardshuffle=False):
                label, fields = out.setdefault(s["__key__"], [None, {}])
                out[s["__key__"]][0] = json.loads(s["json"])["label"]
                for k, v in s.items():
                    if k.endswith(".npy"):
                        fields[f"{g}.{k[:-4]}"] = np.load(io.BytesIO(v), allow_pickle=False)
    return out


def assert_matches_plain_reads(batches, direct):
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            label, fields = direct[key]
            assert int(batch["label"][i]) == label
            for name, arr in fields.items():
                x = batch["features"][name][i].numpy()
                if name in batch["lengths"]:
                    assert int(batch["lengths"][name][i]) == len(arr)
                    assert not x[len(arr) :].any()
                    x = x[: len(arr)]
                assert x.dtype == np.float32 and np.array_equal(x, arr.astype(np.float32))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_column_reads_match_plain_webdataset_and_the_tar_path(store, num_workers):
    kw = dict(batch_size=7, shuffle=True, seed=2, buffer_size=16, num_workers=num_workers)
    got = list(StreamingLoader(store, "train", **kw))
    assert_matches_plain_reads(got, plain_reads(store))
    assert_same_batches(got, list(StreamingLoader(store, "train", fast=False, **kw)))
    assert Counter(k for b in got for k in b["keys"]) == Counter(plain_reads(store).keys())


def test_regular_shards_are_read_as_strided_columns(store):
    st = open_store(store)
    shard = st.shards("train")[0]
    paths = {g: st.shard_path(g, shard) for g in st.groups}
    index = load_member_index(st, st.groups, [shard])
    cols = open_columns(shard, paths, {g: index[g, shard] for g in st.groups}, 16)
    assert cols is not None
    # fixed shapes: one strided view each; a variable-length field: per-member views
    assert set(cols.arrays) == {"a.vec", "b.grid"}
    idx = np.array([5, 0, 9])
    keys, label, present, fields = cols.take(idx, {"a.vec", "a.seq", "b.grid"})
    direct = plain_reads(store)
    assert keys == [f"k{i:04d}" for i in idx.tolist()]
    assert label.tolist() == [direct[k][0] for k in keys] and present["a"].all()
    for name in ("a.vec", "b.grid"):
        assert isinstance(fields[name], np.ndarray)
        for row, key in zip(fields[name], keys, strict=True):
            assert row.tobytes() == direct[key][1][name].tobytes()
    assert [a.tobytes() for a in fields["a.seq"]] == [direct[k][1]["a.seq"].tobytes() for k in keys]


def test_odd_members_take_the_reference_rules(tmp_path):
    # Another header (Fortran order, another dtype), another JSON layout: still the right values.
    def member(g, i, arrays, meta):
        if g == "a" and i == 3:
            arrays["vec"] = arrays["vec"].astype(np.float64)
        if g == "b" and i == 5:
            arrays["grid"] = np.asfortranarray(arrays["grid"])
        if i == 7:
            meta["note"] = 'extra key, "escaped"'

    root = write_store(tmp_path / "s", n=40, member=member)
    got = list(StreamingLoader(root, "train", batch_size=9))
    assert_matches_plain_reads(got, plain_reads(root))
    assert_same_batches(got, list(StreamingLoader(root, "train", batch_size=9, fast=False)))


def test_a_hostile_json_member_is_refused_on_the_column_path(tmp_path):
    def member(g, i, arrays, meta):
        if i == 20 and g == "b":
            meta["label"] = "seven"

    root = write_store(tmp_path / "s", n=40, member=member)
    with pytest.raises(ShardFormatError, match=r"train-000001: member 'k0020.json' has no integer label"):
        list(StreamingLoader(root, "train", batch_size=8))


def test_persistent_workers_take_each_iterations_plan(store):
    kw = dict(batch_size=6, shuffle=True, seed=4, buffer_size=16)
    want = {e: [b["keys"] for b in _epoch(StreamingLoader(store, "train", **kw), e)] for e in (0, 1)}
    loader = StreamingLoader(store, "train", num_workers=2, **kw)
    for e in (0, 1, 0):
        assert [b["keys"] for b in _epoch(loader, e)] == want[e]
    pids = {w.pid for w in loader._dataloader._iterator._workers}
    # a resume after workers have started: they must get the position too, and only once
    loader.set_epoch(1)
    it = iter(loader)
    head = [next(it)["keys"] for _ in range(3)]
    state = loader.state_dict()
    del it
    loader.load_state_dict(state)
    assert head + [b["keys"] for b in loader] == want[1]
    assert [b["keys"] for b in loader] == want[1]
    assert {w.pid for w in loader._dataloader._iterator._workers} == pids  # started once
    assert all(os.path.exists(f"/proc/{p}") for p in pids)


def test_close_stops_the_workers_and_a_new_iteration_restarts_them(store):
    kw = dict(batch_size=6, shuffle=True, seed=4, buffer_size=16)
    want = _epoch(StreamingLoader(store, "train", **kw), 1)
    with StreamingLoader(store, "train", num_workers=2, **kw) as loader:
        kept = _epoch(loader, 1)
        workers = list(loader._dataloader._iterator._workers)
        assert all(w.is_alive() for w in workers)
        loader.close()
        assert not any(w.is_alive() for w in workers)  # joined, not left to the garbage collector
        assert_same_batches(kept, want)  # batches yielded before close stay valid
        assert_same_batches(_epoch(loader, 1), want)  # new workers, same epoch
        again = list(loader._dataloader._iterator._workers)
        assert {w.pid for w in again}.isdisjoint({w.pid for w in workers})
    assert not any(w.is_alive() for w in again)  # the with block closed it
    loader.close()  # twice is fine


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def padding(batches, name):
    pad = total = 0
    for b in batches:
        lengths = b["lengths"][name]
        pad += int(len(lengths) * lengths.max() - lengths.sum())
        total += int(len(lengths) * lengths.max())
    return pad / total


def test_bucketing_reduces_padding_and_keeps_exact_epochs(store):
    direct = plain_reads(store)
    kw = dict(batch_size=8, shuffle=True, seed=3, buffer_size=16)
    plain = StreamingLoader(store, "train", **kw)
    bucketed = StreamingLoader(store, "train", bucket_by="a.seq", bucket_size=32, **kw)
    for epoch in (0, 1):
        for loader in (plain, bucketed):
            loader.set_epoch(epoch)
        a, b = list(plain), list(bucketed)
        assert Counter(k for x in b for k in x["keys"]) == Counter(direct.keys())  # every sample once
        assert padding(b, "a.seq") < 0.5 * padding(a, "a.seq")
        order = [k for x in b for k in x["keys"]]
        for lo in range(0, len(order), 32):  # sorted by length within each bucket
            lengths = [len(direct[k][1]["a.seq"]) for k in order[lo : lo + 32]]
            assert lengths == sorted(lengths)
        # the same samples in each bucket as the unbucketed order: only sorted within it
        plain_order = [k for x in a for k in x["keys"]]
        for lo in range(0, len(order), 32):
            assert set(order[lo : lo + 32]) == set(plain_order[lo : lo + 32])
        assert_matches_plain_reads(b, direct)
    again = StreamingLoader(store, "train", bucket_by="a.seq", bucket_size=32, **kw)
    again.set_epoch(1)
    assert [x["keys"] for x in again] == [x["keys"] for x in b]  # deterministic per (seed, epoch)
    again.set_epoch(0)
    assert [x["keys"] for x in again] != [x["keys"] for x in b]


@pytest.mark.parametrize("new_world", [1, 3])
def test_bucketed_resume_on_another_world_size_covers_the_rest_once(store, new_world):
    kw = dict(shuffle=True, seed=3, buffer_size=16, bucket_by="a.seq", bucket_size=32)
    order = [k for b in StreamingLoader(store, "train", batch_size=1, **kw) for k in b["keys"]]
    seen, states = Counter(), []
    for rank in range(2):
        loader = StreamingLoader(store, "train", batch_size=5, rank=rank, world_size=2, **kw)
        it = iter(loader)
        seen.update(k for _ in range(2) for k in next(it)["keys"])
        states.append(loader.state_dict())
    assert seen == Counter(order[:20])
    rest = Counter()
    for rank in range(new_world):
        loader = StreamingLoader(
            store, "train", batch_size=4, rank=rank, world_size=new_world, num_workers=2, **kw
        )
        loader.load_state_dict(states[0])
        rest.update(k for b in loader for k in b["keys"])
    pad = sum(rest.values()) - (len(order) - 20)
    assert 0 <= pad < new_world
    assert seen + rest == Counter(order) + Counter(order[:pad])


def test_bucketing_is_checked(store):
    with pytest.raises(
        ConfigError, match=r"bucket_by='a.vec' is not a variable-length field.*\['a.seq', 'b.grid'\]"
    ):
        StreamingLoader(store, "train", bucket_by="a.vec")
    plain = StreamingLoader(store, "train", batch_size=4, shuffle=True)
    bucketed = StreamingLoader(store, "train", batch_size=4, shuffle=True, bucket_by="a.seq")
    with pytest.raises(ConfigError, match=r"state has bucket_by=None, this loader 'a.seq'"):
        bucketed.load_state_dict(plain.state_dict())


def test_worker_segments_are_reused_only_once_let_go(store):
    from fusion import worker_batches

    kw = dict(batch_size=4, shuffle=True, seed=8, buffer_size=16)
    ref = StreamingLoader(store, "train", fast=False, **kw)
    loader = StreamingLoader(store, "train", num_workers=2, **kw)
    kept = []  # every third batch stays alive: its segment must not be written again
    for epoch in range(3):
        ref.set_epoch(epoch)
        loader.set_epoch(epoch)
        want = list(ref)
        for j, (got, w) in enumerate(zip(loader, want, strict=True)):
            assert_same_batches([got], [w])  # compared while later batches are being made
            if j % 3 == 0:
                kept.append((got, w))
        if epoch == 1:  # an iteration abandoned mid-epoch: its batches in flight are dropped unseen
            it = iter(loader)
            next(it)
            del it
    assert_same_batches([g for g, _ in kept], [w for _, w in kept])
    flags = loader.dataset.slots
    assert flags.shape == (2, worker_batches.SLOTS) and set(flags.flatten().tolist()) <= {0, 1, 2}
    assert (flags == 2).sum() <= len(kept)  # held: only batches still alive here
    # segments are kept here and reused: batches after a slot's first carry no file descriptor
    known = loader.dataset.known
    assert loader._receiver.segments and all(
        int(known[w, s]) == gen for (w, s), (gen, _) in loader._receiver.segments.items()
    )


@pytest.mark.parametrize("shuffle", [False, True])
def test_bucketed_epoch_order_is_a_permutation_read_within_its_windows(shuffle):
    from fusion.epochs import EpochOrder

    sizes = [5, 0, 17, 1, 64, 3, 0, 40]
    lengths = np.random.default_rng(0).integers(0, 50, sum(sizes))
    order = EpochOrder(sizes, shuffle=shuffle, seed=3, epoch=1, window=16, lengths=lengths, bucket=24)
    plain = EpochOrder(sizes, shuffle=shuffle, seed=3, epoch=1, window=16)
    p = np.arange(order.n)
    c = order.concat_index(p)
    assert sorted(c.tolist()) == list(range(order.n))  # every sample once
    ks, idx = order.locate(p)
    split = np.concatenate([[0], np.cumsum(sizes)])[order.shard_order[ks]] + idx
    for lo in range(0, order.n, 24):  # each bucket: the plain order's samples, sorted by length
        assert sorted(c[lo : lo + 24].tolist()) == sorted(plain.concat_index(p[lo : lo + 24]).tolist())
        assert (np.diff(lengths[split[lo : lo + 24]]) >= 0).all()
    # a reader that closes shards before window_start never needs them again
    assert all(c[q:].min() >= order.window_start(q) for q in range(order.n))
