"""Media loaders: shapes, dtypes and values on generated files; every failure is a MediaError."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from features.errors import ConfigError, MediaError
from pipelines.media import decode, load_audio, load_image, load_text, load_video

# --- images -----------------------------------------------------------------------------


def test_load_image_rgb_png_is_lossless(media_files, image_factory):
    image = image_factory(30, 40)
    out = load_image(media_files.png("a.png", image))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_image_converts_modes_to_rgb(media_files, image_factory, mode):
    from PIL import Image

    image = image_factory(20, 24)
    path = media_files.png(f"a_{mode}.png", image, mode=mode)
    expected = np.asarray(Image.fromarray(image).convert(mode).convert("RGB"))
    out = load_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 24, 3)
    np.testing.assert_array_equal(out, expected)
    if mode == "L":
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_load_image_refuses_too_many_pixels(media_files, image_factory):
    path = media_files.png("big.png", image_factory(20, 20))
    with pytest.raises(MediaError, match=r"big\.png: image of 20x20 = 400 pixels exceeds the limit of 399"):
        load_image(path, max_pixels=399)
    assert load_image(path, max_pixels=400).shape == (20, 20, 3)


# --- audio ------------------------------------------------------------------------------


def test_load_audio_wav_native_rate_matches_samples(media_files, audio_factory):
    audio = audio_factory(0.25, 16000)
    path = media_files.wav("a.wav", audio, 16000)
    out = load_audio(path, 16000)
    assert out.dtype == np.float32 and out.shape == audio.shape
    np.testing.assert_allclose(out, audio, atol=1.0 / 32768 + 1e-7)  # 16-bit PCM quantisation


def test_load_audio_resamples_and_downmixes(tmp_path, audio_factory):
    import librosa

    left, right = audio_factory(0.25, 16000, seed=1), audio_factory(0.25, 16000, seed=2) * 0.5
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    out = load_audio(path, 8000)
    expected = librosa.resample((left + right) / 2, orig_sr=16000, target_sr=8000)
    assert out.dtype == np.float32 and out.ndim == 1 and out.size == 2000
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_pyav_fallback_equals_librosa_on_wav(tmp_path, audio_factory):
    from pipelines.media import _pyav_load_audio

    stereo = np.stack([audio_factory(0.3, 16000, seed=1), audio_factory(0.3, 16000, seed=2) * 0.5], axis=1)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo, 16000, subtype="PCM_16")
    for sr in (16000, 8000):
        via_librosa = load_audio(path, sr)
        via_pyav = _pyav_load_audio(str(path), sr)  # two independent decoders, same downmix
        np.testing.assert_allclose(via_pyav, via_librosa, atol=1e-6)


def test_load_audio_falls_back_to_pyav_for_aac(media_files):
    sr = 16000
    t = np.arange(sr // 2) / sr
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    out = load_audio(media_files.m4a("tone.m4a", tone, sr), sr)
    assert out.dtype == np.float32 and out.ndim == 1
    # AAC adds priming samples and pads the last frame: about the same length, same pitch.
    assert abs(out.size - tone.size) <= 3 * 1024
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * sr / out.size
    assert abs(peak_hz - 1000) < 10


def test_load_audio_from_fsspec_url(media_files, audio_factory):
    import fsspec

    path = media_files.wav("a.wav", audio_factory(0.2, 16000), 16000)
    url = "memory://modalstore-test/a.wav"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    try:
        np.testing.assert_array_equal(load_audio(url, 16000), load_audio(path, 16000))
        with pytest.raises(MediaError, match=r"memory://modalstore-test/missing\.wav: file not found"):
            load_audio("memory://modalstore-test/missing.wav", 16000)
    finally:
        fsspec.filesystem("memory").rm(url)


def test_load_audio_rejects_non_finite(tmp_path):
    path = tmp_path / "nan.wav"
    soundfile.write(path, np.array([0.0, np.nan, 0.1] * 100, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(MediaError, match=r"nan\.wav: audio contains NaN or Inf"):
        load_audio(path, 16000)


def test_load_audio_rejects_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")  # header only
    with pytest.raises(MediaError, match=r"empty\.wav: "):
        load_audio(path, 16000)


# --- video ------------------------------------------------------------------------------


def _brightness_frames(n=5, h=32, w=48):
    """RGB frames of constant colour whose brightness steps up frame by frame."""
    levels = np.linspace(40, 200, n)
    return np.stack([np.full((h, w, 3), (lv, lv * 0.8, lv * 0.6)) for lv in levels]).astype(np.uint8)


def test_load_video_rgb_native(media_files):
    frames = _brightness_frames()
    out = load_video(media_files.mp4("v.mp4", frames))
    assert out.dtype == np.uint8 and out.shape == (5, 32, 48, 3)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), frames.mean(axis=(1, 2)), atol=4)  # lossy codec


def test_load_video_gray_resized_and_limited(media_files):
    import cv2

    frames = _brightness_frames()
    out = load_video(media_files.mp4("v.mp4", frames), gray=True, size=16, max_frames=3)
    assert out.dtype == np.uint8 and out.shape == (3, 16, 16)
    expected = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).mean() for f in frames[:3]]
    np.testing.assert_allclose(out.mean(axis=(1, 2)), expected, atol=4)


def test_load_video_size_none_or_zero_is_native(media_files):
    path = media_files.mp4("v.mp4", _brightness_frames(n=2))
    assert load_video(path, gray=True, size=None).shape == (2, 32, 48)
    assert load_video(path, gray=True, size=0).shape == (2, 32, 48)


def test_load_video_audio_only_file_has_no_video_stream(media_files, audio_factory):
    path = media_files.m4a("a.m4a", audio_factory(0.2, 16000), 16000)
    with pytest.raises(MediaError, match=r"a\.m4a: no video stream"):
        load_video(path)


def _bar_frames(n=24, h=16, w=96):
    """RGB frames, black but for a white 4-px vertical bar at x = 4 * index: frame i shows i."""
    frames = np.zeros((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, :, 4 * i : 4 * i + 4] = 255
    return frames


def _bar_indices(video):
    """Which frame of ``_bar_frames`` each decoded frame is (the brightest 4-px column band)."""
    columns = video.reshape(video.shape[0], video.shape[1], video.shape[2], -1).mean(axis=(1, 3))  # (T, W)
    return [int(np.argmax(c.reshape(-1, 4).mean(axis=1))) for c in columns]


@pytest.fixture
def bar_mp4(media_files):
    return media_files.mp4("bars.mp4", _bar_frames(), fps=12)  # 24 frames, 2 s


def test_load_video_samples_at_fps_by_timestamp(bar_mp4):
    assert _bar_indices(load_video(bar_mp4, gray=True)) == list(range(24))  # the decoder keeps the bars
    out = load_video(bar_mp4, fps=6)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 96, 3)
    assert _bar_indices(out) == list(range(0, 24, 2))
    # 5 fps: instant k/5 s is met by the first frame at or after it, frame ceil(12 k / 5).
    assert _bar_indices(load_video(bar_mp4, gray=True, fps=5)) == [
        int(np.ceil(12 * k / 5)) for k in range(10)
    ]
    # At or above the native rate every frame is kept once; max_frames caps what is returned.
    assert _bar_indices(load_video(bar_mp4, gray=True, fps=30)) == list(range(24))
    assert _bar_indices(load_video(bar_mp4, gray=True, fps=6, max_frames=4)) == [0, 2, 4, 6]


def test_load_video_num_frames_evenly_spaced(bar_mp4):
    out = load_video(bar_mp4, num_frames=5)
    assert out.dtype == np.uint8 and out.shape == (5, 16, 96, 3)
    assert _bar_indices(out) == [0, 6, 12, 17, 23]  # round(linspace(0, 23, 5)): 0, 5.75, 11.5, 17.25, 23
    assert _bar_indices(load_video(bar_mp4, gray=True, num_frames=1)) == [0]
    # More frames than the video has: some repeat, in order.
    many = _bar_indices(load_video(bar_mp4, gray=True, num_frames=30, max_frames=30))
    assert len(many) == 30 and many[0] == 0 and many[-1] == 23 and many == sorted(many)
    assert set(many) == set(range(24))


def test_load_video_num_frames_from_fsspec_url(bar_mp4):
    import fsspec

    url = "memory://modalstore-test/bars.mp4"
    with fsspec.open(url, "wb") as f:
        f.write(bar_mp4.read_bytes())
    try:  # the in-memory copy is read twice (count, then convert)
        assert _bar_indices(decode("video", url, {"gray": True, "num_frames": 3})) == [0, 12, 23]
    finally:
        fsspec.filesystem("memory").rm(url)


def test_load_video_sampling_options_are_checked(bar_mp4):
    with pytest.raises(ConfigError, match=r"at most one of fps \(6\) and num_frames \(5\)"):
        load_video(bar_mp4, fps=6, num_frames=5)
    with pytest.raises(ConfigError, match="fps must be > 0"):
        load_video(bar_mp4, fps=0)
    with pytest.raises(ConfigError, match="num_frames must be >= 1"):
        load_video(bar_mp4, num_frames=0)
    with pytest.raises(ConfigError, match=r"num_frames \(8\) exceeds max_frames \(4\)"):
        load_video(bar_mp4, num_frames=8, max_frames=4)


# --- failures: one message format for every loader ----------------------------------------

LOADERS = {
    "png": lambda p: load_image(p),
    "wav": lambda p: load_audio(p, 16000),
    "mp4": lambda p: load_video(p, gray=True),
}


@pytest.mark.parametrize("ext", sorted(LOADERS))
def test_missing_file(tmp_path, ext):
    path = tmp_path / f"missing.{ext}"
    with pytest.raises(MediaError, match=rf"missing\.{ext}: file not found"):
        LOADERS[ext](path)


@pytest.mark.parametrize("ext", sorted(LOADERS))
def test_zero_byte_file(tmp_path, ext):
    path = tmp_path / f"empty.{ext}"
    path.write_bytes(b"")
    with pytest.raises(MediaError, match=rf"empty\.{ext}: file is empty \(0 bytes\)"):
        LOADERS[ext](path)


@pytest.mark.parametrize("ext", sorted(LOADERS))
def test_text_file_with_media_extension(media_files, ext):
    path = media_files.text(f"fake.{ext}")
    with pytest.raises(MediaError, match=rf"fake\.{ext}: cannot decode"):
        LOADERS[ext](path)


@pytest.mark.parametrize("ext", sorted(LOADERS))
def test_directory_is_not_a_file(tmp_path, ext):
    path = tmp_path / f"dir.{ext}"
    path.mkdir()
    with pytest.raises(MediaError, match=rf"dir\.{ext}: not a regular file"):
        LOADERS[ext](path)


# --- text and the dispatcher --------------------------------------------------------------


def test_load_text():
    assert load_text("hello") == "hello"
    for bad in ("", "   ", None, 3):
        with pytest.raises(MediaError, match="text must be a non-empty str"):
            load_text(bad)


def test_decode_dispatches_with_request(media_files, image_factory, audio_factory):
    img_path = media_files.png("a.png", image_factory(10, 12))
    assert decode("image", str(img_path), {}).shape == (10, 12, 3)
    wav = media_files.wav("a.wav", audio_factory(0.1, 16000), 16000)
    assert decode("audio", f"file://{wav}", {"sample_rate": 8000}).shape == (800,)
    mp4 = media_files.mp4("v.mp4", _brightness_frames(n=3))
    assert decode("video", str(mp4), {"gray": True, "size": 8, "max_frames": 2}).shape == (2, 8, 8)
    assert decode("text", "some words", {}) == "some words"


def test_decode_rejects_unknown_modality_and_request_keys(media_files, image_factory):
    with pytest.raises(ConfigError, match=r"unknown modality 'smell'; available: \['audio', 'image'"):
        decode("smell", "x", {})
    path = media_files.png("a.png", image_factory(10, 12))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sample_rate'\]"):
        decode("image", str(path), {"sample_rate": 16000})


def test_decode_honours_every_extractor_request(media_files, image_factory, audio_factory):
    """Each registered extractor's decode_request is accepted by its modality's loader."""
    from features import create_extractor, list_extractors

    sources = {
        "image": str(media_files.png("a.png", image_factory(16, 16))),
        "audio": str(media_files.wav("a.wav", audio_factory(0.1, 16000), 16000)),
        "video": str(media_files.mp4("v.mp4", _brightness_frames(n=3))),
        "text": "a sentence",
    }
    for name in list_extractors():
        ex = create_extractor(name)
        decode(ex.modality, sources[ex.modality], ex.decode_request())
