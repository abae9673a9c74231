"""Exact epochs, balanced ranks and deterministic resume of StreamingLoader on the tiny store.

The truths tested against are independent of the loader: the catalog's keys of a split, and
the documented partition rule (re-implemented here in a few lines) applied to the epoch order
a single-process loader delivers.
"""

import io
import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from batch_checks import assert_same_batches

from features.errors import ConfigError
from fusion import loader as loader_mod
from fusion.epochs import EpochOrder
from fusion.loader import StreamingLoader
from pipelines.store import open_store


def split_keys(store_root, split):
    return [r["key"] for r in open_store(store_root).table("samples").to_pylist() if r["split"] == split]


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def epoch_order(store_root, split, **kw):
    """The epoch's global order: what one process with batches of one sample delivers."""
    return keys_of(StreamingLoader(store_root, split, batch_size=1, num_workers=0, **kw))


def rank_slices(order, start, world, batch, drop_last):
    """The documented rule: steps of world*batch; the last partial step split evenly, padded by
    wrapping to the start of the order (or dropped). Returns {rank: [batch keys, ...]}."""
    n = len(order)
    out = {r: [] for r in range(world)}
    pos = start
    while n - pos >= world * batch:
        for r in range(world):
            out[r].append(order[pos + r * batch : pos + (r + 1) * batch])
        pos += world * batch
    last = n - pos
    if last and not drop_last:
        b = math.ceil(last / world)
        for r in range(world):
            out[r].append([order[p % n] for p in range(pos + r * b, pos + (r + 1) * b)])
    return out


SHUFFLED = dict(shuffle=True, seed=11, buffer_size=8)


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_across_two_ranks_and_two_workers(tiny_store, drop_last):
    expected = split_keys(tiny_store, "train")
    n, world, batch = len(expected), 2, 3
    got = Counter()
    counts = []
    for rank in range(world):
        loader = StreamingLoader(
            tiny_store, "train", batch_size=batch, num_workers=2, rank=rank, world_size=world,
            drop_last=drop_last, **SHUFFLED,
        )  # fmt: skip
        loader.set_epoch(3)
        batches = list(loader)
        assert len(batches) == len(loader)
        counts.append(len(batches))
        got.update(keys_of(batches))
    assert counts[0] == counts[1]
    last = n % (world * batch)
    if drop_last:  # every delivered sample once; exactly the last partial step is missing
        assert max(got.values()) == 1 and set(got) <= set(expected)
        assert len(expected) - len(got) == last
    else:  # an even split needs no padding: every sample exactly once
        assert last % world == 0
        assert got == Counter(expected)


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_follow_the_documented_slices_of_one_global_order(tiny_store, world, num_workers, drop_last):
    order = epoch_order(tiny_store, "train", **SHUFFLED)
    assert sorted(order) == sorted(split_keys(tiny_store, "train"))
    want = rank_slices(order, 0, world, 4, drop_last)
    for rank in range(world):
        loader = StreamingLoader(
            tiny_store, "train", batch_size=4, num_workers=num_workers, rank=rank, world_size=world,
            drop_last=drop_last, **SHUFFLED,
        )  # fmt: skip
        assert [b["keys"] for b in loader] == want[rank]
        assert len(loader) == len(want[rank])


def test_equal_batch_counts_on_uneven_shards(tiny_store):
    store = open_store(tiny_store)
    sizes = store.meta["splits"]["train"]["shard_samples"]
    assert len(set(sizes)) > 1  # the tiny store's last shard is short
    n = sum(sizes)
    for world in (2, 3, len(sizes) + 2):  # more ranks than shards: still balanced
        for drop_last in (False, True):
            counts, sizes_seen = [], set()
            for rank in range(world):
                loader = StreamingLoader(
                    tiny_store, "train", batch_size=2, num_workers=2, rank=rank, world_size=world,
                    drop_last=drop_last, shuffle=True, seed=5,
                )  # fmt: skip
                batches = list(loader)
                counts.append(len(batches))
                sizes_seen |= {len(b["keys"]) for b in batches}
            assert len(set(counts)) == 1, (world, drop_last, counts)
            assert counts[0] == (n // (2 * world) if drop_last else math.ceil(n / (2 * world)))
            if drop_last:
                assert sizes_seen <= {2}


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 2 cores here
@pytest.mark.parametrize(("split", "batch_size", "num_workers"), [("train", 5, 2), ("val", 4, 3)])
def test_batches_do_not_depend_on_the_number_of_workers(tiny_store, split, batch_size, num_workers):
    kw = dict(batch_size=batch_size, **SHUFFLED)
    want = list(StreamingLoader(tiny_store, split, num_workers=0, **kw))
    if split == "val":
        assert len(want) <= num_workers + 1  # workers left without a batch, or with one only
    assert_same_batches(list(StreamingLoader(tiny_store, split, num_workers=num_workers, **kw)), want)


def test_same_seed_same_order_other_epoch_or_seed_another(tiny_store):
    def order(seed, epoch):
        loader = StreamingLoader(tiny_store, "train", batch_size=4, shuffle=True, seed=seed, buffer_size=8)
        loader.set_epoch(epoch)
        return keys_of(loader)

    a = order(1, 0)
    assert a == order(1, 0)
    assert sorted(a) == sorted(order(1, 1)) and a != order(1, 1)
    assert a != order(2, 0)
    assert a != split_keys(tiny_store, "train")  # shuffled at all


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_a_random_batch_gives_exactly_the_remaining_batches(tiny_store, world, num_workers):
    rng = random.Random(1000 * world + num_workers)
    kw = dict(batch_size=3, num_workers=num_workers, world_size=world, **SHUFFLED)
    for rank in range(world):
        full = StreamingLoader(tiny_store, "train", rank=rank, **kw)
        full.set_epoch(2)
        want = list(full)
        k = rng.randrange(1, len(want))
        first = StreamingLoader(tiny_store, "train", rank=rank, **kw)
        first.set_epoch(2)
        it = iter(first)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
        del it
        resumed = StreamingLoader(tiny_store, "train", rank=rank, **kw)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # what a training loop does next: same epoch, position kept
        assert len(resumed) == len(want) - k
        assert_same_batches(head + list(resumed), want)
        # The resume applies once: the next iteration is the whole epoch again.
        assert [b["keys"] for b in resumed] == [b["keys"] for b in want]


@pytest.mark.parametrize("fast", [True, False])
def test_resume_decodes_no_skipped_sample(tiny_store, monkeypatch, fast):
    kw = dict(batch_size=4, fast=fast, **SHUFFLED)
    first = StreamingLoader(tiny_store, "train", **kw)
    it = iter(first)
    next(it), next(it), next(it)
    state = first.state_dict()
    decoded, sampled = [], []  # sample indices taken (decoded) from shards, by either shard reader
    for cls in (loader_mod.ShardColumns, loader_mod.JoinedShard):
        monkeypatch.setattr(
            cls,
            "take",
            lambda self, idx, wanted, real=cls.take: decoded.extend(idx.tolist()) or real(self, idx, wanted),
        )
    real = loader_mod.JoinedShard.sample
    monkeypatch.setattr(loader_mod.JoinedShard, "sample", lambda self, i: sampled.append(i) or real(self, i))
    resumed = StreamingLoader(tiny_store, "train", **kw)
    resumed.load_state_dict(state)
    rest = keys_of(resumed)
    assert len(decoded) == len(rest) == len(split_keys(tiny_store, "train")) - 12
    assert len(sampled) == (0 if fast else len(rest))  # the indexed path reads columns, not samples


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_world_size_covers_the_rest_once(tiny_store, new_world):
    everything = split_keys(tiny_store, "train")
    order = epoch_order(tiny_store, "train", **SHUFFLED)
    seen = Counter()
    states = []
    for rank in range(2):  # two ranks, two batches each, then the job stops
        loader = StreamingLoader(tiny_store, "train", batch_size=3, rank=rank, world_size=2, **SHUFFLED)
        it = iter(loader)
        seen.update(k for _ in range(2) for k in next(it)["keys"])
        states.append(loader.state_dict())
    assert states[0] == states[1] and states[0]["position"] == 12
    rest = Counter()
    counts = set()
    for rank in range(new_world):
        loader = StreamingLoader(
            tiny_store, "train", batch_size=2, rank=rank, world_size=new_world, num_workers=2, **SHUFFLED
        )
        loader.load_state_dict(states[0])
        batches = list(loader)
        counts.add(len(batches))
        rest.update(keys_of(batches))
    assert len(counts) == 1
    assert seen == Counter(order[:12])
    pad = sum(rest.values()) - (len(everything) - 12)
    assert 0 <= pad < new_world
    assert seen + rest == Counter(everything) + Counter(order[:pad])


def test_state_dict_is_small_and_serialisable(tiny_store):
    loader = StreamingLoader(tiny_store, "train", batch_size=4, **SHUFFLED)
    loader.set_epoch(4)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state["epoch"] == 4 and state["position"] == 4
    assert json.loads(json.dumps(state)) == state and len(json.dumps(state)) < 300
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state
    list(it)
    assert loader.state_dict()["position"] == loader.num_samples  # the epoch is done


def test_set_epoch_to_another_epoch_drops_a_loaded_position(tiny_store):
    loader = StreamingLoader(tiny_store, "train", batch_size=4, **SHUFFLED)
    loader.load_state_dict({**loader.state_dict(), "epoch": 1, "position": 8})
    assert len(loader) == math.ceil((loader.num_samples - 8) / 4)
    loader.set_epoch(2)
    assert len(loader) == math.ceil(loader.num_samples / 4)


def test_load_state_dict_refuses_another_order(tiny_store):
    loader = StreamingLoader(tiny_store, "train", batch_size=4, **SHUFFLED)
    state = loader.state_dict()
    other = StreamingLoader(tiny_store, "train", batch_size=4, shuffle=True, seed=12, buffer_size=8)
    with pytest.raises(ConfigError, match=r"state has seed=11, this loader 12"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"position 9999 is outside \[0, "):
        loader.load_state_dict({**state, "position": 9999})
    with pytest.raises(ConfigError, match=r"state version None"):
        loader.load_state_dict({"epoch": 0, "position": 0})
    val = StreamingLoader(tiny_store, "val", batch_size=4, **SHUFFLED).state_dict()
    test = StreamingLoader(tiny_store, "test", batch_size=4, **SHUFFLED)
    with pytest.raises(ConfigError, match=r"state has (num_samples|shards)=.*same split, shards"):
        test.load_state_dict(val)


def test_state_after_a_drop_last_epoch_resumes_to_nothing(tiny_store):
    kw = dict(batch_size=5, drop_last=True, **SHUFFLED)
    loader = StreamingLoader(tiny_store, "train", **kw)
    assert loader.num_samples % 5  # a remainder is dropped
    list(loader)
    state = loader.state_dict()
    assert state["position"] == loader.num_samples
    resumed = StreamingLoader(tiny_store, "train", **kw)
    resumed.load_state_dict(state)
    assert len(resumed) == 0 and list(resumed) == []


def test_rank_and_world_size_are_checked_and_default_to_torch_distributed(tiny_store, monkeypatch):
    with pytest.raises(ConfigError, match=r"rank 2 with world_size 2: need 0 <= rank < world_size"):
        StreamingLoader(tiny_store, "train", rank=2, world_size=2)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    from_dist = StreamingLoader(tiny_store, "train", batch_size=3)
    explicit = StreamingLoader(tiny_store, "train", batch_size=3, rank=1, world_size=2)
    assert [b["keys"] for b in from_dist] == [b["keys"] for b in explicit]


@pytest.mark.parametrize("shuffle", [False, True])
def test_epoch_order_is_a_permutation_of_every_sample(shuffle):
    sizes = [5, 0, 17, 1, 64, 3, 0, 40]
    order = EpochOrder(sizes, shuffle=shuffle, seed=3, epoch=1, window=16)
    ks, idx = order.locate(np.arange(order.n))
    shards = order.shard_order[ks]
    pairs = set(zip(shards.tolist(), idx.tolist(), strict=True))
    assert pairs == {(s, i) for s, size in enumerate(sizes) for i in range(size)}
    assert (idx < np.asarray(sizes)[shards]).all()
    if not shuffle:
        assert list(zip(shards.tolist(), idx.tolist(), strict=True)) == sorted(pairs)
    else:  # samples move less than two windows, and never before the shards a reader keeps open
        p = np.arange(order.n)
        c = order.concat_index(p)
        assert (np.abs(c - p) < 2 * 16).all() and not (c == p).all()
        assert all(c[q:].min() >= order.window_start(q) for q in range(order.n))
