"""The av-digits recipe on the real FSDD and MNIST files (skipped when ../shared/data is absent)."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
import soundfile
from PIL import Image

from features.errors import ConfigError
from pipelines.datasets import make_av_digits, read_mnist
from pipelines.manifest import read_manifest


def _mnist_from_raw(shared_data):
    # Independent IDX parsing: the format's fixed header sizes, nothing else.
    d = shared_data / "mnist-t10k"
    images = np.frombuffer(gzip.open(d / "t10k-images-idx3-ubyte.gz").read()[16:], np.uint8).reshape(
        -1, 28, 28
    )
    labels = np.frombuffer(gzip.open(d / "t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
    return images, labels


def _rows(manifest):
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def test_av_digits_pairs_by_label_with_disjoint_images(shared_data, tmp_path):
    manifest = make_av_digits(
        tmp_path / "avd", shared_data / "fsdd", shared_data / "mnist-t10k", max_per_digit=2, progress=False
    )
    rows = _rows(manifest)
    assert len(rows) == 10 * 2 * 3  # digits x per digit x splits
    images, labels = _mnist_from_raw(shared_data)
    seen = {}
    for r in rows:
        digit, speaker, index = r["key"].split("_")
        assert int(r["label"]) == int(digit)
        # test = FSDD's usual test recordings (index 0-4)
        assert (r["split"] == "test") == (int(index) < 5)
        img = np.array(Image.open(tmp_path / "avd" / r["image"]))
        assert np.array_equal(img, images[int(r["mnist_index"])])
        assert labels[int(r["mnist_index"])] == int(digit)
        audio, sr = soundfile.read(tmp_path / "avd" / r["audio"])
        assert sr == 8000 and audio.ndim == 1 and len(audio) > 0
        seen.setdefault(r["mnist_index"], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in seen.values())  # no image in two splits
    assert len(seen) == len(rows)  # and none used twice
    manifest_obj = read_manifest(manifest)  # the project's own validation accepts it
    assert len(manifest_obj) == len(rows)


def test_av_digits_holds_out_a_speaker_and_degrades(shared_data, tmp_path):
    manifest = make_av_digits(
        tmp_path / "avd",
        shared_data / "fsdd",
        shared_data / "mnist-t10k",
        test_speaker="theo",
        max_per_digit=1,
        image_pca_energy=0.75,
        audio_snr_db=0.0,
        progress=False,
    )
    rows = _rows(manifest)
    assert {r["speaker"] for r in rows if r["split"] == "test"} == {"theo"}
    assert "theo" not in {r["speaker"] for r in rows if r["split"] != "test"}
    images, _ = _mnist_from_raw(shared_data)
    train = [r for r in rows if r["split"] == "train"]  # the images the PCA was fitted on
    degraded = np.stack([np.array(Image.open(tmp_path / "avd" / r["image"])) for r in train]).astype(float)
    original = images[[int(r["mnist_index"]) for r in train]].astype(float)
    # 75 % of the PCA energy gone: about a quarter of the variance around the mean image is left
    # (a little more after rounding and clipping to 0..255)
    ratio = ((degraded - degraded.mean(0)) ** 2).sum() / ((original - original.mean(0)) ** 2).sum()
    assert 0.15 < ratio < 0.35, ratio
    # 0 dB white noise: the recording is about half noise, so it differs strongly from the source
    r = train[0]
    clean, _ = soundfile.read(shared_data / "fsdd" / "recordings" / f"{r['key']}.wav")
    noisy, _ = soundfile.read(tmp_path / "avd" / r["audio"])
    assert noisy.shape == clean.shape
    assert np.corrcoef(clean, noisy)[0, 1] < 0.85


def test_av_digits_errors_name_the_problem(shared_data, tmp_path):
    with pytest.raises(
        ConfigError, match=r"test_speaker 'nobody' is not an FSDD speaker; speakers: \['george'"
    ):
        make_av_digits(tmp_path, shared_data / "fsdd", shared_data / "mnist-t10k", test_speaker="nobody")
    with pytest.raises(ConfigError, match="no FSDD recordings"):
        make_av_digits(tmp_path, tmp_path, shared_data / "mnist-t10k")
    with pytest.raises(ConfigError, match="no MNIST IDX files"):
        read_mnist(tmp_path)


def test_av_digits_from_the_command_line(shared_data, tmp_path, capsys):
    from modalstore import main

    args = ["datasets", "av-digits", str(tmp_path / "out"), "--fsdd", str(shared_data / "fsdd")]
    args += ["--mnist", str(shared_data / "mnist-t10k"), "--max-per-digit", "1", "--quiet"]
    assert main(args) == 0
    assert "manifest.csv" in capsys.readouterr().out
    assert len(_rows(tmp_path / "out" / "manifest.csv")) == 30
    assert main([*args[:3], "--fsdd", str(tmp_path), "--mnist", str(shared_data / "mnist-t10k")]) == 2
    assert "no FSDD recordings" in capsys.readouterr().err
