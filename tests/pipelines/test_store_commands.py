"""inspect, verify and get on the tiny store, against the catalog, the files and plain webdataset."""

import io
import json
import os
import pickle
import shutil
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from features.errors import ShardFormatError, StoreError
from modalstore import main
from pipelines.inspect import inspect_store
from pipelines.lookup import get_sample
from pipelines.shards import ShardWriter
from pipelines.store import open_store
from pipelines.verify import verify_store


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    """A private copy of the session store, for tests that damage it."""
    return shutil.copytree(tiny_store, tmp_path / "store")


def tar_members(path):
    """(name, bytes) of every member, read with plain tarfile."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def rewrite_shard(path, members):
    with ShardWriter(path) as writer:
        for name, data in members:
            writer.add(name, data)
        writer.close()
    return writer.members


def catalog(store, name):
    return pq.read_table(store / "catalog" / f"{name}.parquet").to_pylist()


# ---------------------------------------------------------------- inspect


def test_inspect_counts_match_catalog_and_files(store_copy):
    # Make presence and errors non-trivial: some samples miss video/audio, a few errors recorded.
    samples = pq.read_table(store_copy / "catalog" / "samples.parquet")
    keys = samples["key"].to_pylist()
    video = [i % 3 != 0 for i in range(len(keys))]
    audio = [i % 5 != 1 for i in range(len(keys))]
    samples = samples.set_column(samples.schema.get_field_index("has_video"), "has_video", pa.array(video))
    samples = samples.set_column(samples.schema.get_field_index("has_audio"), "has_audio", pa.array(audio))
    pq.write_table(samples, store_copy / "catalog" / "samples.parquet")
    error_rows = [
        {
            "key": keys[0],
            "group": "video",
            "shard": "train-000000",
            "stage": "decode",
            "error_type": "MediaError",
            "message": "x",
        },
        {
            "key": keys[3],
            "group": "video",
            "shard": "train-000000",
            "stage": "decode",
            "error_type": "MediaError",
            "message": "y",
        },
        {
            "key": keys[1],
            "group": "audio",
            "shard": "train-000000",
            "stage": "extract",
            "error_type": "ValueError",
            "message": "z",
        },
    ]
    pq.write_table(pa.Table.from_pylist(error_rows), store_copy / "catalog" / "errors.parquet")

    info = inspect_store(store_copy)
    meta = json.loads((store_copy / "store.json").read_text())
    rows = catalog(store_copy, "samples")

    assert info["samples"] == len(rows) == meta["manifest"]["rows"]
    assert info["classes"] == meta["classes"]
    assert info["created"] == meta.get("created")  # not stored: stores are byte-identical across runs
    assert info["manifest"]["sha256"] == meta["manifest"]["sha256"]
    for split, s in meta["splits"].items():
        assert info["splits"][split]["samples"] == s["samples"] == Counter(r["split"] for r in rows)[split]
        assert info["splits"][split]["shards"] == len(s["shards"])
        for g in meta["groups"]:
            assert info["splits"][split]["present"][g] == sum(
                r[f"has_{g}"] for r in rows if r["split"] == split
            )
    assert info["groups"]["video"]["present"] == sum(video)
    assert info["groups"]["audio"]["present"] == sum(audio)
    for g, gm in meta["groups"].items():
        files = sorted((store_copy / gm["dir"]).glob("*.tar"))
        gi = info["groups"][g]
        assert gi["shards"] == len(files)
        assert gi["bytes"] == sum(os.path.getsize(f) for f in files)
        assert (gi["extractor"], gi["version"], gi["params"]) == (
            gm["extractor"],
            gm["version"],
            gm["params"],
        )
        assert gi["fields"] == {
            f: {"dtype": v["dtype"], "shape": v["shape"]} for f, v in gm["fields"].items()
        }
        assert gi["stats"] is (store_copy / gm["stats"]["path"]).exists()
    assert info["errors"]["total"] == 3
    got = {
        (r["group"], r["stage"], r["error_type"]): r["count"] for r in info["errors"]["by_group_stage_type"]
    }
    assert got == Counter((r["group"], r["stage"], r["error_type"]) for r in error_rows)
    assert info["groups"]["video"]["errors"] == 2 and info["groups"]["image"]["errors"] == 0
    assert info["catalog_rows"]["members"] == len(catalog(store_copy, "members"))


def test_inspect_cli_json_and_table(tiny_store, capsys):
    assert main(["inspect", str(tiny_store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    meta = json.loads((tiny_store / "store.json").read_text())
    assert set(info["groups"]) == set(meta["groups"])
    assert {s: v["samples"] for s, v in info["splits"].items()} == {
        s: v["samples"] for s, v in meta["splits"].items()
    }
    assert main(["inspect", str(tiny_store)]) == 0
    out = capsys.readouterr().out
    assert meta["manifest"]["sha256"] in out
    for g in meta["groups"]:
        assert f"\n  {g} " in out


def test_inspect_not_a_store_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "store.json missing" in capsys.readouterr().err


# ---------------------------------------------------------------- verify


def test_verify_clean_store(tiny_store, capsys):
    report = verify_store(tiny_store, progress=False)
    assert report.ok, report.problems
    assert report.shards == len(catalog(tiny_store, "shards"))
    assert report.bytes == sum(os.path.getsize(p) for p in (tiny_store / "shards").rglob("*.tar"))
    assert main(["verify", str(tiny_store), "--quiet"]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["middle", "payload"])
def test_verify_flipped_byte_is_hash_mismatch(store_copy, capsys, where):
    path = open_store(store_copy).shard_path("image", "train-000001")
    data = bytearray(path.read_bytes())
    member = [
        m for m in catalog(store_copy, "members") if m["group"] == "image" and m["shard"] == "train-000001"
    ][3]
    at = len(data) // 2 if where == "middle" else member["offset"] + member["size"] // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_store(store_copy, progress=False)
    assert all((p.group, p.shard) == ("image", "train-000001") for p in report.problems)
    kinds = [p.kind for p in report.problems]
    assert "hash_mismatch" in kinds and "size_mismatch" not in kinds
    if where == "payload":  # the tar structure is intact: only the hash can tell
        assert kinds == ["hash_mismatch"]
    assert main(["verify", str(store_copy), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "hash_mismatch: image/train-000001" in out


@pytest.mark.parametrize("cut", ["half", "payload", "header_boundary", "inside_header"])
def test_verify_truncated_shard_is_reported(store_copy, cut):
    path = open_store(store_copy).shard_path("audio", "val-000000")
    size = path.stat().st_size
    third = [
        m for m in catalog(store_copy, "members") if m["group"] == "audio" and m["shard"] == "val-000000"
    ][2]
    at = {
        "half": size // 2,
        "header_boundary": third["offset"] - 512,
        "inside_header": third["offset"] - 400,
        "payload": third["offset"] + 100,
    }[cut]
    with open(path, "r+b") as f:
        f.truncate(at)
    report = verify_store(store_copy, progress=False)
    kinds = {p.kind for p in report.problems if (p.group, p.shard) == ("audio", "val-000000")}
    assert {"size_mismatch", "hash_mismatch", "truncated"} <= kinds
    assert all((p.group, p.shard) == ("audio", "val-000000") for p in report.problems)


def test_verify_missing_shard_and_stray_file(store_copy):
    (open_store(store_copy).shard_path("video", "train-000003")).unlink()
    open_store(store_copy).shard_path("audio", "train-000000").with_name(
        ".train-000000.tar.tmp-99"
    ).write_bytes(b"partial")
    report = verify_store(store_copy, progress=False)
    missing = [(p.group, p.shard) for p in report.problems if p.kind == "missing_shard"]
    assert missing == [("video", "train-000003")]
    stray = [p for p in report.problems if p.kind == "unexpected_file"]
    assert len(stray) == 1 and ".train-000000.tar.tmp-99" in stray[0].detail


def test_verify_renamed_key_is_key_mismatch(store_copy, capsys):
    path = open_store(store_copy).shard_path("video", "train-000002")
    members = tar_members(path)
    old = members[0][0].split(".", 1)[0]
    victim = [n.split(".", 1)[0] for n, _ in members][len(members) // 2]
    assert victim != old
    renamed = [
        (n.replace(victim, "renamed-key", 1) if n.startswith(f"{victim}.") else n, d) for n, d in members
    ]
    rewrite_shard(path, renamed)
    report = verify_store(store_copy, progress=False)
    mism = [p for p in report.problems if p.kind == "key_mismatch"]
    assert [(p.group, p.shard) for p in mism] == [("video", "train-000002")]
    assert "renamed-key" in mism[0].detail and victim in mism[0].detail
    assert {p.kind for p in report.problems} <= {
        "key_mismatch",
        "hash_mismatch",
        "member_mismatch",
        "size_mismatch",
    }
    assert main(["verify", str(store_copy), "--quiet"]) == 1
    assert "key_mismatch: video/train-000002" in capsys.readouterr().out
    # sizes and hashes only: the rename is still caught, by sha256
    report = verify_store(store_copy, check_keys=False, progress=False, workers=2)
    assert [(p.kind, p.group, p.shard) for p in report.problems] == [
        ("hash_mismatch", "video", "train-000002")
    ]


def test_verify_stale_member_offsets(store_copy):
    members = pq.read_table(store_copy / "catalog" / "members.parquet")
    offsets = members["offset"].to_pylist()
    offsets[5] += 512
    members = members.set_column(members.schema.get_field_index("offset"), "offset", pa.array(offsets))
    pq.write_table(members, store_copy / "catalog" / "members.parquet")
    row = members.slice(5, 1).to_pylist()[0]
    report = verify_store(store_copy, progress=False)
    assert [(p.kind, p.group, p.shard) for p in report.problems] == [
        ("member_mismatch", row["group"], row["shard"])
    ]


def test_verify_accepts_members_in_any_row_order(store_copy):
    # Interleave the groups' rows (order within each group and shard kept): no longer contiguous.
    path = store_copy / "catalog" / "members.parquet"
    rows = sorted(catalog(store_copy, "members"), key=lambda m: (m["shard"], m["offset"]))
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert verify_store(store_copy, progress=False).ok
    rows[0], rows[1] = rows[1], rows[0]  # same shard, other group: each group still in order
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert verify_store(store_copy, progress=False).ok
    a, b = next((i, i + 1) for i in range(len(rows)) if rows[i]["group"] == rows[i + 1]["group"])
    rows[a], rows[b] = rows[b], rows[a]  # two members of one group swapped
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems = verify_store(store_copy, progress=False).problems
    assert [(p.kind, p.group, p.shard) for p in problems] == [
        ("member_mismatch", rows[a]["group"], rows[a]["shard"])
    ]


# ---------------------------------------------------------------- get


def scan(store, group):
    """key -> {"json": meta, field: array} from a full read with plain webdataset."""
    st = open_store(store)
    urls = [str(st.shard_path(group, s)) for split in ("train", "val", "test") for s in st.shards(split)]
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        rec = {"json": json.loads(s["json"])}
        for k, v in s.items():
            if k.endswith(".npy"):
                rec[k[: -len(".npy")]] = np.load(io.BytesIO(v))
        out[s["__key__"]] = rec
    return out


def sample_keys(store):
    rows = catalog(store, "samples")
    first = {}
    for r in rows:
        first.setdefault(r["split"], r["key"])
    return sorted({*first.values(), rows[5]["key"], rows[-1]["key"]}), rows


def test_get_matches_a_full_webdataset_scan(tiny_store):
    keys, rows = sample_keys(tiny_store)
    by_key = {r["key"]: r for r in rows}
    assert {by_key[k]["split"] for k in keys} == {"train", "val", "test"}
    groups = open_store(tiny_store).groups
    scans = {g: scan(tiny_store, g) for g in groups}
    for key in keys:
        sample = get_sample(tiny_store, key)
        assert (sample["key"], sample["split"], sample["label"], sample["shard"]) == (
            key,
            by_key[key]["split"],
            by_key[key]["label"],
            by_key[key]["shard"],
        )
        assert set(sample["groups"]) == set(groups)
        for g in groups:
            ref = scans[g][key]
            got = sample["groups"][g]
            assert got["present"] == ref["json"]["present"]
            assert set(got["fields"]) == set(ref) - {"json"}
            for field, arr in got["fields"].items():
                assert arr.dtype == ref[field].dtype
                np.testing.assert_array_equal(arr, ref[field])
    only = get_sample(tiny_store, keys[0], groups=["audio"])
    assert list(only["groups"]) == ["audio"]


def test_get_cli_json_and_npz(tiny_store, tmp_path, capsys):
    keys, _ = sample_keys(tiny_store)
    ref = scan(tiny_store, "audio")[keys[1]]
    out = tmp_path / "sample.npz"
    assert main(["get", str(tiny_store), keys[1], "--group", "audio", "--json", "--out", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    mfcc = doc["groups"]["audio"]["fields"]["mfcc"]
    np.testing.assert_array_equal(np.asarray(mfcc["data"], dtype=mfcc["dtype"]), ref["mfcc"])
    with np.load(out) as npz:
        assert npz.files == ["audio.mfcc"]
        np.testing.assert_array_equal(npz["audio.mfcc"], ref["mfcc"])
    assert main(["get", str(tiny_store), keys[1]]) == 0
    text = capsys.readouterr().out
    assert keys[1] in text and "mfcc" in text and str(ref["mfcc"].shape) in text
    assert main(["get", str(tiny_store), "no-such-key"]) == 2
    assert "no sample with key 'no-such-key'" in capsys.readouterr().err


def test_get_unknown_key_and_group(tiny_store):
    with pytest.raises(StoreError, match="no sample with key 'nope'"):
        get_sample(tiny_store, "nope")
    keys, _ = sample_keys(tiny_store)
    with pytest.raises(StoreError, match="unknown group"):
        get_sample(tiny_store, keys[0], groups=["smell"])


def test_get_refuses_a_pickle_member(store_copy):
    _, rows = sample_keys(store_copy)
    key = next(r["key"] for r in rows if r["split"] == "test")
    path = open_store(store_copy).shard_path("audio", "test-000000")
    evil = pickle.dumps({"boom": 1})
    # Appended after every sample, so the offsets of the other members do not move.
    records = rewrite_shard(path, [*tar_members(path), (f"{key}.evil.pkl", evil)])
    members = pq.read_table(store_copy / "catalog" / "members.parquet")
    extra = {"group": "audio", "shard": "test-000000", "member": records[-1].name}
    extra |= {"offset": records[-1].offset, "size": records[-1].size}
    pq.write_table(
        pa.concat_tables([members, pa.Table.from_pylist([extra], schema=members.schema)]),
        store_copy / "catalog" / "members.parquet",
    )
    with pytest.raises(ShardFormatError, match=rf"test-000000.*{key}\.evil\.pkl.*not allowed"):
        get_sample(store_copy, key)
    get_sample(store_copy, key, groups=["image"])  # other groups are unaffected


def test_get_detects_stale_offsets(store_copy):
    keys, _ = sample_keys(store_copy)
    members = pq.read_table(store_copy / "catalog" / "members.parquet")
    rows = members.to_pylist()
    i = next(i for i, m in enumerate(rows) if m["member"] == f"{keys[0]}.json" and m["group"] == "image")
    offsets = members["offset"].to_pylist()
    offsets[i] += 1024
    members = members.set_column(members.schema.get_field_index("offset"), "offset", pa.array(offsets))
    pq.write_table(members, store_copy / "catalog" / "members.parquet")
    with pytest.raises(ShardFormatError, match="run modalstore verify"):
        get_sample(store_copy, keys[0], groups=["image"])
