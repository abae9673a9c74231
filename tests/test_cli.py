"""The command line end to end on a tiny dataset: demo-data -> extract -> train -> evaluate -> report."""

import json
import subprocess
import sys

import pytest
import yaml

from modalstore import main


def test_help_explains_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "modalstore", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("demo-data", "extract", "train", "evaluate", "report", "extractors"):
        assert cmd in out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("key,label,split\nk1,0,train\nk1,1,test\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "manifest": str(tmp_path / "m.csv"),
                "store": str(tmp_path / "s"),
                "groups": {"audio": {"extractor": "mfcc"}},
            }
        )
    )
    assert main(["extract", str(cfg), "--serial"]) == 2
    assert "duplicate key 'k1'" in capsys.readouterr().err
    assert main(["extract", str(cfg), "--serial", "--set", "samples_per_shard=0"]) == 2
    assert "samples_per_shard: must be >= 1" in capsys.readouterr().err


def test_extractors_lists_registry(capsys):
    assert main(["extractors", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"cnn", "mfcc", "flow", "sentence"} <= set(rows)
    assert rows["mfcc"]["params"]["n_mfcc"] == 40 and rows["mfcc"]["modality"] == "audio"


@pytest.mark.slow
def test_whole_pipeline_from_the_cli(tmp_path, capsys):
    data, store, runs = tmp_path / "data", tmp_path / "store", tmp_path / "runs"
    assert main(["demo-data", str(data), "--samples", "64", "--seed", "1", "--quiet"]) == 0
    extract_cfg = tmp_path / "extract.yaml"
    extract_cfg.write_text(
        yaml.safe_dump(
            {
                "manifest": str(data / "manifest.csv"),
                "store": str(store),
                "samples_per_shard": 16,
                "groups": {
                    "image": {"extractor": "cnn", "params": {"image_size": 32}},
                    "audio": {"extractor": "mfcc"},
                    "video": {"extractor": "flow", "params": {"size": 32}},
                },
            }
        )
    )
    assert main(["extract", str(extract_cfg), "--serial", "--quiet"]) == 0
    assert main(["extract", str(extract_cfg), "--serial", "--quiet", "--dry-run"]) == 0
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(
        yaml.safe_dump(
            {
                "store": str(store),
                "runs_dir": str(runs),
                "groups": ["image", "audio", "video"],
                "models": ["late_fusion", "unimodal"],
                "epochs": 1,
                "batch_size": 16,
            }
        )
    )
    assert main(["train", str(train_cfg), "--quiet", "--set", "hidden=16"]) == 0
    assert main(["evaluate", str(runs)]) == 0
    assert main(["report", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "| late_fusion |" in out and "| unimodal-video |" in out
    for run in ("late_fusion", "unimodal-image", "unimodal-audio", "unimodal-video"):
        metrics = json.loads((runs / run / "metrics.json").read_text())
        assert {"accuracy", "macro_recall", "macro_f1"} <= set(metrics) and metrics["split"] == "test"
        assert yaml.safe_load((runs / run / "config.yaml").read_text())["epochs"] == 1
    assert (runs / "report.md").exists()
