"""Group versions: add or change one group and only it is computed; append rows and only new
shards are written; gc removes what no config uses."""

import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from store_fixtures import TINY_GROUPS, write_extract_config

from fusion.loader import StreamingLoader
from modalstore import main
from pipelines.extract import load_extract_config, run_extract
from pipelines.gc import plan_gc
from pipelines.lookup import get_sample
from pipelines.store import open_store
from pipelines.verify import verify_store

AUDIO, VIDEO = TINY_GROUPS["audio"], TINY_GROUPS["video"]


def files_of(root, group):
    """{relative path: (mtime_ns, inode, sha256)} of every file of the group's active version."""
    store = open_store(root)
    folder = root / store.meta["groups"][group]["dir"]
    return {
        p.name: (p.stat().st_mtime_ns, p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.iterdir())
    }


def extract(tmp_path, manifest, groups, name="c.yaml", **kw):
    cfg = write_extract_config(tmp_path / name, manifest, tmp_path / "s", groups, samples_per_shard=8, **kw)
    return run_extract(load_extract_config(cfg), progress=False), cfg


def all_keys(root, groups, split="train"):
    loader = StreamingLoader(root, split, groups=groups, batch_size=64)
    return sorted(k for b in loader for k in b["keys"])


def test_adding_a_group_computes_only_that_group(demo_dir, tmp_path):
    first, _ = extract(tmp_path, demo_dir / "manifest.csv", {"audio": AUDIO})
    before = files_of(tmp_path / "s", "audio")
    second, _ = extract(tmp_path, demo_dir / "manifest.csv", {"audio": AUDIO, "video": VIDEO})
    assert second.computed == {"audio": 0, "video": second.shards}
    assert files_of(tmp_path / "s", "audio") == before  # same files: mtime, inode and bytes
    store = open_store(tmp_path / "s")
    assert store.groups == ["audio", "video"]
    assert all_keys(tmp_path / "s", ["audio", "video"]) == all_keys(tmp_path / "s", ["audio"])
    assert verify_store(tmp_path / "s", progress=False).ok


def test_changing_a_parameter_makes_a_new_version_beside_the_old(demo_dir, tmp_path):
    groups = {"audio": AUDIO, "video": VIDEO}
    extract(tmp_path, demo_dir / "manifest.csv", groups)
    old = open_store(tmp_path / "s").meta["groups"]
    audio_before, video_before = files_of(tmp_path / "s", "audio"), files_of(tmp_path / "s", "video")
    changed = {"audio": {"extractor": "mfcc", "params": {"n_mfcc": 13}}, "video": VIDEO}
    summary, _ = extract(tmp_path, demo_dir / "manifest.csv", changed)
    assert summary.computed == {"audio": summary.shards, "video": 0}
    new = open_store(tmp_path / "s").meta["groups"]
    assert new["video"]["version"] == old["video"]["version"]
    assert new["audio"]["version"] != old["audio"]["version"]
    assert files_of(tmp_path / "s", "video") == video_before
    # the old version is still on disk, untouched, beside the new one
    old_dir = tmp_path / "s" / old["audio"]["dir"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in old_dir.iterdir()} == {
        k: v[2] for k, v in audio_before.items()
    }
    key = pq.read_table(tmp_path / "s" / "catalog" / "samples.parquet").column("key")[0].as_py()
    assert get_sample(tmp_path / "s", key, ["audio"])["groups"]["audio"]["fields"]["mfcc"].shape[-1] == 13
    # switching back reuses the old version: nothing is computed
    back, _ = extract(tmp_path, demo_dir / "manifest.csv", groups)
    assert back.computed == {"audio": 0, "video": 0} and not back.up_to_date
    assert open_store(tmp_path / "s").meta["groups"]["audio"]["version"] == old["audio"]["version"]
    assert extract(tmp_path, demo_dir / "manifest.csv", groups)[0].up_to_date


def test_versions_are_content_hashes_independent_of_the_store_path(demo_dir, tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    extract(a, demo_dir / "manifest.csv", {"audio": AUDIO})
    extract(b, demo_dir / "manifest.csv", {"audio": AUDIO})
    va = open_store(a / "s").meta["groups"]["audio"]["version"]
    assert va == open_store(b / "s").meta["groups"]["audio"]["version"] and len(va) == 16
    assert files_of(a / "s", "audio").keys() == files_of(b / "s", "audio").keys()


def _sub_manifest(demo_dir, out, n_rows):
    """The first ``n_rows`` rows of the demo manifest, media paths made absolute."""
    lines = (demo_dir / "manifest.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = []
    for line in lines[1 : n_rows + 1]:
        cells = line.split(",")
        for i, col in enumerate(header):
            if col in ("image", "audio", "video") and cells[i]:
                cells[i] = str(demo_dir / cells[i])
        rows.append(",".join(cells))
    out.write_text("\n".join([lines[0], *rows]) + "\n")
    return out


def test_appending_rows_writes_new_shards_only(demo_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    groups = {"audio": AUDIO, "video": VIDEO}
    first, _ = extract(tmp_path, _sub_manifest(demo_dir, manifest, 30), groups)
    store = open_store(tmp_path / "s")
    old_shards = {sp: store.shards(sp) for sp in ("train", "val", "test")}
    before = {g: files_of(tmp_path / "s", g) for g in groups}
    second, _ = extract(tmp_path, _sub_manifest(demo_dir, manifest, 48), groups)
    store = open_store(tmp_path / "s")
    for sp, shards in old_shards.items():  # old shards keep their names and samples, new ones follow
        assert store.shards(sp)[: len(shards)] == shards
    new_shards = second.shards - first.shards
    assert new_shards > 0 and second.computed == {"audio": new_shards, "video": new_shards}
    for g in groups:
        after = files_of(tmp_path / "s", g)
        assert {k: after[k] for k in before[g]} == before[g]  # same inode, mtime, bytes: not rewritten
    rows = pq.read_table(tmp_path / "s" / "catalog" / "samples.parquet").to_pylist()
    assert len(rows) == 48 and len({r["key"] for r in rows}) == 48
    keys = all_keys(tmp_path / "s", ["audio", "video"])
    assert keys == sorted(r["key"] for r in rows if r["split"] == "train")
    assert verify_store(tmp_path / "s", progress=False).ok


def test_a_fitted_group_is_not_refitted_for_the_same_train_split(demo_dir, tmp_path, monkeypatch):
    import pipelines.extract as extract_mod

    text = {"extractor": "tfidf", "params": {"max_features": 64}}
    extract(tmp_path, demo_dir / "manifest.csv", {"audio": AUDIO, "text": text})
    art = open_store(tmp_path / "s").meta["groups"]["text"]["artifact"]
    monkeypatch.setattr(extract_mod, "fit_group", lambda *a: pytest.fail("fitted again"))
    summary, _ = extract(tmp_path, demo_dir / "manifest.csv", {"audio": {"extractor": "mfcc"}, "text": text})
    assert summary.computed["text"] == 0
    assert open_store(tmp_path / "s").meta["groups"]["text"]["artifact"] == art


def test_gc_lists_then_removes_unused_versions(demo_dir, tmp_path, capsys):
    groups = {"audio": AUDIO, "video": VIDEO}
    _, cfg_a = extract(tmp_path, demo_dir / "manifest.csv", groups, name="a.yaml")
    old_audio = open_store(tmp_path / "s").meta["groups"]["audio"]
    changed = {"audio": {"extractor": "mfcc", "params": {"n_mfcc": 13}}, "video": VIDEO}
    _, cfg_b = extract(tmp_path, demo_dir / "manifest.csv", changed, name="b.yaml")
    root = tmp_path / "s"
    # config a still refers to the old audio version: kept
    assert plan_gc(root, [cfg_a]).empty
    assert main(["gc", str(root)]) == 0  # dry run
    out = capsys.readouterr().out
    assert f"would remove version audio {old_audio['version']}" in out and "--yes" in out
    assert (root / old_audio["dir"]).exists()
    before = {g: files_of(root, g) for g in groups}
    assert main(["gc", str(root), "--yes"]) == 0
    assert not (root / old_audio["dir"]).exists()
    assert not (root / "versions" / "audio" / old_audio["version"]).exists()
    assert {g: files_of(root, g) for g in groups} == before
    assert verify_store(root, progress=False).ok
    assert main(["gc", str(root)]) == 0 and "nothing to remove" in capsys.readouterr().out
    sample = get_sample(root, pq.read_table(root / "catalog" / "samples.parquet").column("key")[0].as_py())
    assert np.isfinite(sample["groups"]["audio"]["fields"]["mfcc"]).all()


def test_gc_removes_unused_fitted_artifacts_and_leftovers(demo_dir, tmp_path):
    text = {"extractor": "tfidf", "params": {"max_features": 64}}
    extract(tmp_path, demo_dir / "manifest.csv", {"text": text})
    root = tmp_path / "s"
    old_art = root / open_store(root).meta["groups"]["text"]["artifact"]["path"]
    extract(tmp_path, demo_dir / "manifest.csv", {"text": {**text, "params": {"max_features": 32}}})
    stray = root / open_store(root).meta["groups"]["text"]["dir"] / ".val-000000.tar.tmp-123"
    stray.write_bytes(b"partial")
    plan = plan_gc(root)
    assert {str(old_art.relative_to(root)), str(stray.relative_to(root))} <= set(plan.paths)
    main(["gc", str(root), "--yes"])
    assert not old_art.exists() and not stray.exists()
    assert (root / open_store(root).meta["groups"]["text"]["artifact"]["path"]).exists()
