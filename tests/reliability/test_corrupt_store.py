"""Damaged stores: ``verify`` names each fault; the loader stops with an error naming the shard
(and the key, where the damage has one) instead of yielding fewer or wrong samples.

Faults: a truncated shard (inside a payload, at a header boundary, the end-of-archive blocks
cut off), a flipped byte (in a tar header, in a ``.npy`` header, in array data), a missing
shard, a catalog row naming a key the shard does not hold, and two groups whose keys disagree.
"""

from __future__ import annotations

import shutil
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_surgery import read_members, rewrite

from features.errors import ShardFormatError, StoreError
from fusion.loader import StreamingLoader
from fusion.shard_reader import CatalogMismatchWarning
from pipelines.lookup import get_sample
from pipelines.store import open_store
from pipelines.verify import verify_store

GROUP = "audio"


@pytest.fixture
def store(tiny_store, tmp_path):
    return open_store(shutil.copytree(tiny_store, tmp_path / "store"))


def _read(store, fast, groups=(GROUP,)):
    loader = StreamingLoader(store.root, "val", groups=list(groups), batch_size=64, fast=fast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogMismatchWarning)
        return [k for batch in loader for k in batch["keys"]]


def _members_of(store, shard):
    rows = store.table("members").to_pylist()
    return [r for r in rows if (r["group"], r["shard"]) == (GROUP, shard)]


def _kinds(store):
    return sorted({p.kind for p in verify_store(store.root, progress=False).problems})


def _truncate(store, shard, how):
    path = store.shard_path(GROUP, shard)
    raw = path.read_bytes()
    rows = _members_of(store, shard)
    victim = rows[len(rows) // 2]
    cut = {
        "in_payload": victim["offset"] + victim["size"] // 2,
        "at_header": victim["offset"] - 512,  # a whole number of members survive
        "end_blocks": rows[-1]["offset"]
        + rows[-1]["size"]
        + (-rows[-1]["size"]) % 512,  # every member intact
    }[how]
    path.write_bytes(raw[:cut])
    return rows, victim


@pytest.mark.parametrize("how", ["in_payload", "at_header", "end_blocks"])
@pytest.mark.parametrize("fast", [True, False], ids=["indexed", "tar"])
def test_truncated_shard(store, how, fast):
    shard = store.shards("val")[0]
    _truncate(store, shard, how)
    with pytest.raises(ShardFormatError, match=rf"{shard}\.tar.*run modalstore verify"):
        _read(store, fast)
    kinds = _kinds(store)
    assert "size_mismatch" in kinds and "hash_mismatch" in kinds and "truncated" in kinds, kinds


@pytest.mark.parametrize("fast", [True, False], ids=["indexed", "tar"])
def test_flipped_byte_in_a_tar_header(store, fast):
    shard = store.shards("val")[0]
    path = store.shard_path(GROUP, shard)
    victim = _members_of(store, shard)[3]
    raw = bytearray(path.read_bytes())
    raw[victim["offset"] - 512 + 2] ^= 0x20  # a letter of the member's name: the checksum fails
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match=rf"{shard}\.tar"):
        _read(store, fast)
    assert "hash_mismatch" in _kinds(store)


@pytest.mark.parametrize("fast", [True, False], ids=["indexed", "tar"])
def test_flipped_byte_in_an_npy_header_names_the_member(store, fast):
    shard = store.shards("val")[0]
    path = store.shard_path(GROUP, shard)
    victim = next(r for r in _members_of(store, shard) if r["member"].endswith(".npy"))
    raw = bytearray(path.read_bytes())
    raw[victim["offset"] + 1] ^= 0xFF  # the .npy magic
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardFormatError, match=rf"{shard}.*{victim['member']}"):
        _read(store, fast)
    assert "hash_mismatch" in _kinds(store)


def test_flipped_byte_in_array_data_is_found_by_verify(store):
    """Array bytes carry no checksum inside a tar: sha256 in ``verify`` is what finds this."""
    shard = store.shards("val")[0]
    path = store.shard_path(GROUP, shard)
    victim = next(r for r in _members_of(store, shard) if r["member"].endswith(".npy"))
    raw = bytearray(path.read_bytes())
    raw[victim["offset"] + victim["size"] - 1] ^= 0x01
    path.write_bytes(bytes(raw))
    report = verify_store(store.root, progress=False)
    assert [(p.kind, p.group, p.shard) for p in report.problems] == [("hash_mismatch", GROUP, shard)]


@pytest.mark.parametrize("fast", [True, False], ids=["indexed", "tar"])
def test_missing_shard(store, fast):
    shard = store.shards("val")[0]
    store.shard_path(GROUP, shard).unlink()
    with pytest.raises(StoreError, match=rf"{shard}\.tar: shard file missing; run modalstore verify"):
        _read(store, fast)
    assert _kinds(store) == ["missing_shard"]


def test_catalog_row_pointing_to_a_missing_key(store):
    """samples.parquet names a key the shard does not hold: verify and get name it.

    The loader reads the shards, not samples.parquet, so its batches stay what the shards hold.
    """
    shard = store.shards("val")[0]
    cat = store.root / "catalog" / "samples.parquet"
    table = pq.read_table(cat)
    keys = table["key"].to_pylist()
    i = next(i for i, r in enumerate(table.to_pylist()) if r["shard"] == shard)
    keys[i] = "ghost-key"
    pq.write_table(table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys)), cat)
    problems = verify_store(store.root, progress=False).problems
    mismatch = [p for p in problems if p.kind == "key_mismatch"]
    assert mismatch and all(p.shard == shard for p in mismatch) and "ghost-key" in mismatch[0].detail
    with pytest.raises(StoreError, match="ghost-key"):
        get_sample(store.root, "ghost-key")


def test_members_row_pointing_to_a_missing_key(store):
    """members.parquet names a member the shard does not hold: verify finds it, get refuses it,
    and the loader's indexed path falls back to reading the tar itself (same samples)."""
    shard = store.shards("val")[0]
    cat = store.root / "catalog" / "members.parquet"
    table = pq.read_table(cat)
    rows = table.to_pylist()
    i = next(i for i, r in enumerate(rows) if (r["group"], r["shard"]) == (GROUP, shard))
    key = rows[i]["member"].split(".")[0]
    names = table["member"].to_pylist()
    names[i] = names[i].replace(key, "ghost", 1)
    pq.write_table(table.set_column(table.schema.get_field_index("member"), "member", pa.array(names)), cat)
    assert "member_mismatch" in _kinds(store)
    with pytest.raises(StoreError, match=rf"no {key}\.json member|{key}"):
        get_sample(store.root, key, groups=[GROUP])
    assert _read(store, fast=True) == _read(store, fast=False)


@pytest.mark.parametrize("fast", [True, False], ids=["indexed", "tar"])
def test_groups_whose_keys_disagree(store, fast):
    """One group's shard renames a key (its catalog rows updated to match the file)."""
    shard = store.shards("val")[0]
    members = read_members(store.shard_path("video", shard))
    key = members[-1].name.split(".")[0]
    for m in members:
        if m.name.startswith(f"{key}."):
            m.name = m.name.replace(key, "intruder", 1)
    rewrite(store, "video", shard, members)
    with pytest.raises(
        ShardFormatError,
        match=rf"shard {shard}: key mismatch between groups: 'audio' has '{key}', 'video' has 'intruder'",
    ):
        _read(store, fast, groups=("audio", "video"))
    problems = verify_store(store.root, progress=False).problems
    assert [(p.kind, p.group, p.shard) for p in problems] == [("key_mismatch", "video", shard)]
    assert "intruder" in problems[0].detail
