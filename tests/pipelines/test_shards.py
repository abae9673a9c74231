import io
import json

import numpy as np
import pytest
import webdataset as wds

from pipelines.manifest import Sample
from pipelines.shards import ShardWriter, npy_bytes, plan_shards, sha256_file


def arrays(rng):
    return {
        "vec": rng.standard_normal(7).astype(np.float32),
        "seq": rng.standard_normal((5, 3)).astype(np.float16),
        "ids": rng.integers(0, 100, size=(4,), dtype=np.int64),
    }


def write(path, data):
    with ShardWriter(path) as w:
        for key, arrs in data.items():
            w.add_sample(key, {"key": key, "label": 1, "split": "train", "present": True}, arrs)
        return w.close(), w.members


def test_round_trip_with_plain_webdataset_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    data = {f"s{i}": arrays(rng) for i in range(5)}
    (size, digest), _ = write(tmp_path / "x.tar", data)
    assert size == (tmp_path / "x.tar").stat().st_size and digest == sha256_file(tmp_path / "x.tar")
    seen = []
    for sample in wds.WebDataset(str(tmp_path / "x.tar"), shardshuffle=False):
        key = sample["__key__"]
        seen.append(key)
        assert json.loads(sample["json"])["key"] == key
        for field, want in data[key].items():
            got = np.load(io.BytesIO(sample[f"{field}.npy"]), allow_pickle=False)
            assert got.dtype == want.dtype and np.array_equal(got, want)
    assert seen == list(data)


def test_deterministic_bytes_and_member_offsets(tmp_path):
    data = {f"s{i}": arrays(np.random.default_rng(i)) for i in range(3)}
    (_, d1), members = write(tmp_path / "a.tar", data)
    (_, d2), _ = write(tmp_path / "b.tar", data)
    assert d1 == d2
    blob = (tmp_path / "a.tar").read_bytes()
    rec = next(m for m in members if m.name == "s1.seq.npy")
    assert blob[rec.offset : rec.offset + rec.size] == npy_bytes(data["s1"]["seq"])


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "x.tar") as w:
        w.add("a.json", b"{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_plan_shards_by_split_in_order():
    samples = [Sample(f"k{i}", 0, ["train", "test"][i % 2], i + 1) for i in range(7)]
    plans = plan_shards(samples, 2)
    assert [p.name for p in plans] == ["train-000000", "train-000001", "test-000000", "test-000001"]
    assert [s.key for s in plans[1].samples] == ["k4", "k6"]
    with pytest.raises(ValueError, match="samples_per_shard"):
        plan_shards(samples, 0)
