from __future__ import annotations

import csv
import re
import wave
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipelines import demo_data
from pipelines.demo_data import CALM_WORDS, LIVELY_WORDS, make_demo_dataset

N = 48
COLUMNS = [
    "key",
    "label",
    "split",
    "image",
    "audio",
    "video",
    "text",
    "digit",
    "image_bit",
    "audio_bit",
    "video_bit",
    "text_bit",
]


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_wav(path: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    with wave.open(str(path), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm, (w.getnchannels(), w.getsampwidth(), w.getframerate())


def read_gray_frames(path: Path) -> tuple[list[np.ndarray], str]:
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context.name
        frames = [f.to_ndarray(format="gray") for f in container.decode(video=0)]
    return frames, codec


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    manifest = make_demo_dataset(tmp_path_factory.mktemp("demo"), N, seed=0, progress=False)
    return manifest, read_manifest(manifest)


def test_manifest_schema_and_labels(demo):
    manifest, rows = demo
    assert manifest.name == "manifest.csv"
    with manifest.open(newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    assert len(rows) == N
    assert len({r["key"] for r in rows}) == N
    for r in rows:
        assert re.fullmatch(r"demo-\d{6}", r["key"])
        bits = [int(r[f"{m}_bit"]) for m in ("image", "audio", "video", "text")]
        assert int(r["label"]) == 8 * bits[0] + 4 * bits[1] + 2 * bits[2] + bits[3]
        assert bits[0] == int(int(r["digit"]) >= 5)
        assert r["image"] == f"images/{r['key']}.png"
        assert r["audio"] == f"audio/{r['key']}.wav"
        assert r["video"] == f"video/{r['key']}.mp4"
    # Balanced labels: 48 samples are 3 of each of the 16 classes.
    assert np.bincount([int(r["label"]) for r in rows], minlength=16).tolist() == [3] * 16


def test_splits_are_70_15_15_and_stratified(demo):
    _, rows = demo
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert counts == {
        "train": round(0.7 * N),
        "val": round(0.85 * N) - round(0.7 * N),
        "test": N - round(0.85 * N),
    }
    labels, splits = demo_data._assign_labels_and_splits(1600, seed=3)
    per_class = np.zeros((16, 3), dtype=int)
    np.add.at(per_class, (labels, splits), 1)
    assert (per_class == [70, 15, 15]).all()


def test_images_decode_and_show_ink(demo):
    manifest, rows = demo
    for r in rows:
        with Image.open(manifest.parent / r["image"]) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
            arr = np.asarray(im, dtype=np.float64)
        centre, border = arr[8:24, 8:24].mean(), np.concatenate([arr[:2], arr[-2:]]).mean()
        assert centre > border + 20, r["key"]  # white ink on a dark background


def test_audio_decodes_and_pitch_matches_bit(demo):
    manifest, rows = demo
    for r in rows:
        pcm, params = read_wav(manifest.parent / r["audio"])
        assert params == (1, 2, 16000)
        assert len(pcm) == 16000
        spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
        peak_hz = np.argmax(spectrum) * 16000 / len(pcm)
        expected = (650, 1300) if r["audio_bit"] == "1" else (150, 320)
        assert expected[0] - 5 <= peak_hz <= expected[1] + 5, (r["key"], peak_hz)


def test_video_decodes_and_flow_matches_direction(demo):
    manifest, rows = demo
    for r in rows:
        frames, codec = read_gray_frames(manifest.parent / r["video"])
        assert codec == "h264"
        assert len(frames) == 16 and frames[0].shape == (64, 64)
        flow = np.stack(
            [
                cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
                for a, b in zip(frames[:-1], frames[1:], strict=True)
            ]
        )
        dx, dy = flow[..., 0].mean(), flow[..., 1].mean()
        sign = 1 if r["video_bit"] == "1" else -1
        assert 1.2 <= sign * dx <= 3.3, (r["key"], dx)
        assert abs(dy) <= 0.7, (r["key"], dy)


def test_caption_has_one_mood_word_of_its_bit(demo):
    _, rows = demo
    for r in rows:
        words = re.findall(r"[a-z]+", r["text"].lower())
        calm = [w for w in words if w in CALM_WORDS]
        lively = [w for w in words if w in LIVELY_WORDS]
        assert len(calm) + len(lively) == 1, r["text"]
        assert bool(lively) == (r["text_bit"] == "1")
        assert not re.search(r"\d", r["text"])


def test_no_digit_image_is_shared_between_train_and_eval(tmp_path, monkeypatch):
    digits = load_digits()
    index_of = {(img / 16.0).astype(np.float32).tobytes(): i for i, img in enumerate(digits.images)}
    rendered: list[int] = []
    real_render = demo_data._render_digit

    def spy(rng, src, size):
        rendered.append(index_of[src.tobytes()])
        return real_render(rng, src, size)

    monkeypatch.setattr(demo_data, "_render_digit", spy)
    # Videos are irrelevant here and the costliest part: stub them to afford 800 samples, enough
    # that one shared pool would show ~75 reused images.
    monkeypatch.setattr(demo_data, "_make_video", lambda *args: None)
    monkeypatch.setattr(demo_data, "_write_mp4", lambda *args: None)
    rows = read_manifest(make_demo_dataset(tmp_path, 800, seed=0, progress=False))
    assert len(rendered) == len(rows)  # one image per sample, in key order
    train_used, eval_used = set(), set()
    for r, index in zip(rows, rendered, strict=True):
        assert digits.target[index] == int(r["digit"])
        (train_used if r["split"] == "train" else eval_used).add(index)
    # Images are taken in a cycle, so 560 train samples use 560 distinct images.
    assert len(train_used) == sum(r["split"] == "train" for r in rows)
    assert len(eval_used) > 200
    assert not train_used & eval_used


def media_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = media_bytes(make_demo_dataset(tmp_path / "a", 16, seed=7, progress=False).parent)
    b = media_bytes(make_demo_dataset(tmp_path / "b", 16, seed=7, progress=False).parent)
    c = media_bytes(make_demo_dataset(tmp_path / "c", 16, seed=8, progress=False).parent)
    assert len(a) == 1 + 3 * 16
    assert a.keys() == b.keys() == c.keys()
    for name in a:  # MP4 included: the encoder is set up to be reproducible
        assert a[name] == b[name], name
    assert a["manifest.csv"] != c["manifest.csv"]
    assert a["images/demo-000000.png"] != c["images/demo-000000.png"]
    assert a["audio/demo-000000.wav"] != c["audio/demo-000000.wav"]


def test_missing_rate_blanks_cells_without_changing_the_rest(tmp_path):
    full_dir, gappy_dir = tmp_path / "full", tmp_path / "gappy"
    full = read_manifest(make_demo_dataset(full_dir, 32, seed=1, progress=False))
    gappy = read_manifest(make_demo_dataset(gappy_dir, 32, seed=1, missing_rate=0.5, progress=False))
    blanks = 0
    for f, g in zip(full, gappy, strict=True):
        for col in ("key", "label", "split", "digit", "image_bit", "audio_bit", "video_bit", "text_bit"):
            assert f[col] == g[col]
        for col in ("image", "audio", "video", "text"):
            if g[col] == "":
                blanks += 1
                if col != "text":
                    assert not (gappy_dir / f[col]).exists()
            elif col == "text":
                assert g[col] == f[col]
            else:
                assert (gappy_dir / g[col]).read_bytes() == (full_dir / f[col]).read_bytes()
    assert 0.3 < blanks / (4 * 32) < 0.7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": 15}, "n_samples=15"),
        ({"n_samples": 16.0}, "n_samples"),
        ({"seed": -1}, "seed=-1"),
        ({"image_size": 4}, "image_size=4"),
        ({"audio_seconds": 0.0}, "audio_seconds"),
        ({"sample_rate": 2000}, "sample_rate=2000"),
        ({"video_frames": 1}, "video_frames=1"),
        ({"video_size": 63}, "video_size=63"),
        ({"fps": 0}, "fps=0"),
        ({"missing_rate": 1.0}, "missing_rate=1.0"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, match):
    args = {"out_dir": tmp_path, "n_samples": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_demo_dataset(**args, progress=False)
    assert not (tmp_path / "manifest.csv").exists()
