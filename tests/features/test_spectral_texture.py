"""Spectral audio extractors (melspec, stft, cqt) against librosa called directly, and the lbp
texture extractor against scikit-image called directly, with histograms built here."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from features import create_extractor
from features.errors import ConfigError, MediaError

SR = 16000

# librosa warns when a clip is shorter than a frame (short clips are tested on purpose), and its
# CQT warns whenever a low octave's filter is longer than the downsampled clip.
short_clip_warning = pytest.mark.filterwarnings("ignore:n_fft=.* is too large:UserWarning")


def _real_recording(shared_data):
    from pipelines.media import load_audio

    path = shared_data / "fsdd" / "recordings" / "0_george_0.wav"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return load_audio(path, SR)  # FSDD is 8 kHz: resampled on load


# --- references: librosa called directly ---------------------------------------------------


def _librosa_melspec(
    y, sr=SR, n_fft=400, hop_length=160, n_mels=64, fmin=0.0, fmax=None, power=2.0, log=True
):
    import librosa

    S = librosa.feature.melspectrogram(
        y=y, sr=sr, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, fmin=fmin, fmax=fmax, power=power
    )
    if log and power == 2.0:
        S = librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=None)
    elif log:
        S = librosa.amplitude_to_db(S, ref=1.0, amin=1e-5, top_db=None)
    return S.T.astype(np.float32)


def _librosa_stft(y, n_fft=512, hop_length=160, win_length=None, window="hann", log=True):
    import librosa

    S = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop_length, win_length=win_length, window=window))
    if log:
        S = librosa.amplitude_to_db(S, ref=1.0, amin=1e-5, top_db=None)
    return S.T.astype(np.float32)


def _librosa_cqt(y, sr=SR, hop_length=256, fmin=32.70, n_bins=72, bins_per_octave=12, log=True):
    import librosa

    C = np.abs(
        librosa.cqt(
            y, sr=sr, hop_length=hop_length, fmin=fmin, n_bins=n_bins, bins_per_octave=bins_per_octave
        )
    )
    if log:
        C = librosa.amplitude_to_db(C, ref=1.0, amin=1e-5, top_db=None)
    return C.T.astype(np.float32)


REFERENCES = {"melspec": _librosa_melspec, "stft": _librosa_stft, "cqt": _librosa_cqt}


def _assert_equal_to_reference(out, expected):
    assert out.dtype == np.float32 and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


# --- melspec / stft / cqt ------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"n_fft": 512, "hop_length": 128, "n_mels": 40, "fmin": 60.0, "fmax": 7000.0},
        {"power": 1.0},
        {"power": 1.0, "log": False},
        {"log": False},
    ],
)
def test_melspec_equals_librosa(params, audio_factory):
    y = audio_factory(0.4, SR, seed=1)
    ex = create_extractor("melspec", params)
    out = ex.extract(y)["melspec"]
    ex.output_spec()["melspec"].check("melspec", out)
    _assert_equal_to_reference(out, _librosa_melspec(y, **params))
    assert out.shape == (1 + y.size // ex.config.hop_length, ex.config.n_mels)


@pytest.mark.parametrize(
    "params",
    [{}, {"n_fft": 256, "hop_length": 100, "win_length": 200, "window": "hamming"}, {"log": False}],
)
def test_stft_equals_librosa(params, audio_factory):
    y = audio_factory(0.4, SR, seed=2)
    ex = create_extractor("stft", params)
    out = ex.extract(y)["stft"]
    assert ex.output_spec()["stft"].shape == (None, ex.config.n_fft // 2 + 1)
    ex.output_spec()["stft"].check("stft", out)
    _assert_equal_to_reference(out, _librosa_stft(y, **params))


def test_stft_window_tuple_from_yaml_list(audio_factory):
    y = audio_factory(0.2, SR)
    ex = create_extractor("stft", {"window": ["kaiser", 8.0]})  # YAML gives a list
    assert ex.config.window == ("kaiser", 8.0)
    _assert_equal_to_reference(ex.extract(y)["stft"], _librosa_stft(y, window=("kaiser", 8.0)))


@short_clip_warning
@pytest.mark.parametrize("params", [{}, {"hop_length": 200, "n_bins": 48, "log": False}])
def test_cqt_equals_librosa(params, audio_factory):
    y = audio_factory(0.5, SR, seed=3)
    ex = create_extractor("cqt", params)
    out = ex.extract(y)["cqt"]
    ex.output_spec()["cqt"].check("cqt", out)
    _assert_equal_to_reference(out, _librosa_cqt(y, **params))
    assert out.shape == (1 + y.size // ex.config.hop_length, ex.config.n_bins)


@short_clip_warning
def test_cqt_tone_peaks_at_its_bin():
    # A 440 Hz tone (A4) is 45 semitones above C1 = 32.70 Hz: bin 45 at 12 bins per octave.
    t = np.arange(SR // 2) / SR
    y = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = create_extractor("cqt").extract(y)["cqt"]
    assert (out[4:-4].argmax(axis=1) == 45).all()


@short_clip_warning
@pytest.mark.parametrize("name", ["melspec", "stft", "cqt"])
def test_defaults_equal_librosa_on_real_recording(name, shared_data):
    y = _real_recording(shared_data)
    out = create_extractor(name).extract(y)[name]
    _assert_equal_to_reference(out, REFERENCES[name](y))
    hop = create_extractor(name).config.hop_length
    assert out.shape[0] == 1 + y.size // hop  # every frame, none truncated


@short_clip_warning
@pytest.mark.parametrize("name", ["melspec", "stft", "cqt"])
def test_every_frame_is_kept_for_any_length(name, audio_factory):
    ex = create_extractor(name)
    hop = ex.config.hop_length
    for samples in (1, 100, 1000, 4003):
        y = audio_factory(0.5, SR, seed=samples)[:samples]
        out = ex.extract(y)[name]
        assert out.shape == (1 + samples // hop, ex.output_spec()[name].shape[1])
        assert np.isfinite(out).all()


@pytest.mark.parametrize("name", ["melspec", "stft", "cqt"])
def test_spectral_bad_audio(name):
    ex = create_extractor(name)
    with pytest.raises(MediaError, match=f"{name}: audio is empty"):
        ex.extract(np.zeros(0, dtype=np.float32))
    with pytest.raises(MediaError, match=f"{name}: audio contains NaN or Inf"):
        ex.extract(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(MediaError, match=f"{name}: expected mono float audio"):
        ex.extract(np.zeros((2, 100), dtype=np.float32))


def test_decode_requests_ask_for_the_sample_rate():
    for name in ("mfcc", "melspec", "stft", "cqt"):
        assert create_extractor(name, {"sample_rate": 22050}).decode_request() == {"sample_rate": 22050}


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("melspec", {"n_mels": 0}, "n_mels must be an integer >= 1, got 0"),
        ("melspec", {"n_fft": 400.5}, "n_fft must be an integer >= 1, got 400.5"),
        ("melspec", {"power": 3.0}, r"power must be 1.0 \(magnitude\) or 2.0 \(power\), got 3.0"),
        ("melspec", {"log": "yes"}, "log must be true or false, got 'yes'"),
        ("melspec", {"sample_rate": 8000, "fmax": 6000.0}, r"fmax <= sample_rate / 2 = 4000.0, got"),
        ("melspec", {"fmin": 9000.0}, "need 0 <= fmin < fmax"),
        ("mfcc", {"n_mels": 20}, r"n_mfcc \(40\) must be <= n_mels \(20\)"),
        ("mfcc", {"hop_length": True}, "hop_length must be an integer >= 1, got True"),
        ("stft", {"hop_length": 0}, "hop_length must be an integer >= 1, got 0"),
        ("stft", {"win_length": 600}, r"win_length \(600\) must be <= n_fft \(512\)"),
        ("stft", {"window": "hannn"}, "window 'hannn' is not a scipy.signal window"),
        (
            "cqt",
            {"sample_rate": 8000, "n_bins": 84},
            r"= 4185.6 Hz, not below the Nyquist frequency sample_rate / 2 = 4000.0 Hz.*lower n_bins",
        ),
        ("cqt", {"fmin": 0.0}, r"fmin must be a frequency > 0 Hz, got 0.0"),
        ("cqt", {"bins_per_octave": 0}, "bins_per_octave must be an integer >= 1, got 0"),
    ],
)
def test_spectral_bad_configs(name, params, message):
    with pytest.raises(ConfigError, match=rf"extractor '{name}': .*{message}"):
        create_extractor(name, params)


@short_clip_warning
def test_cqt_nyquist_check_is_at_least_as_strict_as_librosa(audio_factory):
    # The highest config the check allows at 8 kHz (83 bins reach 3950.6 Hz < 4000 Hz) runs.
    y = audio_factory(0.25, 8000)
    ex = create_extractor("cqt", {"sample_rate": 8000, "n_bins": 83, "hop_length": 128})
    _assert_equal_to_reference(ex.extract(y)["cqt"], _librosa_cqt(y, sr=8000, n_bins=83, hop_length=128))


# --- lbp -----------------------------------------------------------------------------------


def _skimage_lbp(image, radii=(1, 2, 3), points_per_radius=8, method="uniform", size=0):
    """Reference: scikit-image's gray conversion and LBP, histograms by np.bincount over the
    pixels whose samples all lie inside the image."""
    import cv2
    from skimage.color import rgb2gray
    from skimage.feature import local_binary_pattern
    from skimage.util import img_as_ubyte

    gray = img_as_ubyte(rgb2gray(image))
    if size:
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    hists = []
    for r in radii:
        p = points_per_radius * r
        n_codes = p + 2 if method == "uniform" else p * (p - 1) + 3
        codes = local_binary_pattern(gray, p, r, method)
        inner = codes[r : gray.shape[0] - r, r : gray.shape[1] - r].astype(int).ravel()
        hists.append(np.bincount(inner, minlength=n_codes) / inner.size)
    return np.concatenate(hists)


def _digit_image(index=0, size=64):
    """An sklearn digit (8x8, 0..16) upscaled and coloured into a uint8 RGB image."""
    import cv2
    from sklearn.datasets import load_digits

    digit = load_digits().images[index] / 16.0
    big = cv2.resize(digit, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    rgb = np.stack([big, 0.6 * big + 0.2, 1.0 - big], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _mnist_image(shared_data, index=0):
    path = shared_data / "mnist-t10k" / "t10k-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with gzip.open(path, "rb") as f:
        f.seek(16 + index * 28 * 28)  # idx3 header: magic, count, rows, cols (4 bytes each)
        gray = np.frombuffer(f.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"radii": (1, 3), "points_per_radius": 4},
        {"radii": (2,), "method": "nri_uniform"},
        {"size": 32},
        {"size": 96, "radii": (1, 2)},
    ],
)
def test_lbp_equals_skimage_on_synthetic_and_digit_images(params, image_factory):
    ex = create_extractor("lbp", params)
    spec = ex.output_spec()["histogram"]
    for image in (image_factory(48, 64, seed=7), _digit_image(3)):
        out = ex.extract(image)["histogram"]
        spec.check("histogram", out)
        np.testing.assert_allclose(out, _skimage_lbp(image, **params), rtol=1e-6, atol=0)


def test_lbp_default_layout_and_sums(image_factory):
    ex = create_extractor("lbp")
    out = ex.extract(image_factory(seed=1))["histogram"]
    assert ex.output_spec()["histogram"].shape == (10 + 18 + 26,)  # P + 2 codes for P = 8, 16, 24
    assert out.shape == (54,) and out.dtype == np.float32
    np.testing.assert_allclose([out[:10].sum(), out[10:28].sum(), out[28:].sum()], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.sum(), 3.0, rtol=1e-6)  # len(radii)


def test_lbp_equals_skimage_on_real_mnist_digit(shared_data):
    image = _mnist_image(shared_data, index=0)
    out = create_extractor("lbp", {"radii": (1, 2)}).extract(image)["histogram"]
    np.testing.assert_allclose(out, _skimage_lbp(image, radii=(1, 2)), rtol=1e-6, atol=0)
    np.testing.assert_allclose(out.sum(), 2.0, rtol=1e-6)


@pytest.mark.parametrize("level", [0, 128, 255])
def test_lbp_uniform_image_puts_all_mass_in_one_bin(level):
    # Every neighbour equals the centre, so every bit is 1: code P (all ones) at each radius.
    image = np.full((24, 30, 3), level, dtype=np.uint8)
    out = create_extractor("lbp").extract(image)["histogram"]
    expected = np.zeros(54, dtype=np.float32)
    expected[[8, 10 + 16, 28 + 24]] = 1.0
    np.testing.assert_array_equal(out, expected)


def test_lbp_uniform_histogram_is_rotation_invariant(image_factory):
    # P = 8 R samples map onto each other under a 90 degree turn; 'nri_uniform' is not invariant.
    image = image_factory(40, 40, seed=5)
    turned = np.ascontiguousarray(np.rot90(image))
    uniform = create_extractor("lbp")
    np.testing.assert_allclose(
        uniform.extract(turned)["histogram"], uniform.extract(image)["histogram"], atol=1e-6
    )
    nri = create_extractor("lbp", {"method": "nri_uniform", "radii": (1,)})
    assert not np.allclose(nri.extract(turned)["histogram"], nri.extract(image)["histogram"])


def test_lbp_gray_conversion_is_rounded_luma(image_factory):
    from features.texture import to_gray_uint8

    image = image_factory(seed=2)
    luma = image.astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])  # skimage's rgb2gray
    gray = to_gray_uint8(image)
    assert gray.dtype == np.uint8 and gray.shape == image.shape[:2]
    assert np.abs(gray.astype(np.float64) - luma).max() <= 0.5 + 1e-6


def test_lbp_bad_inputs_and_configs(image_factory):
    with pytest.raises(
        ConfigError, match=r"radii must be a non-empty list of distinct integers >= 1, got \(0, 1\)"
    ):
        create_extractor("lbp", {"radii": [0, 1]})
    with pytest.raises(ConfigError, match=r"radii must be .*, got 2; e.g. radii=\[1, 2, 3\]"):
        create_extractor("lbp", {"radii": 2})
    with pytest.raises(ConfigError, match=r"radii must be .*, got \(1, 1\)"):
        create_extractor("lbp", {"radii": [1, 1]})
    with pytest.raises(ConfigError, match=r"radii must be .*, got \(1.5,\)"):
        create_extractor("lbp", {"radii": [1.5]})
    with pytest.raises(ConfigError, match="points_per_radius must be an integer >= 1, got 0"):
        create_extractor("lbp", {"points_per_radius": 0})
    with pytest.raises(ConfigError, match=r"method must be one of \['nri_uniform', 'uniform'\], got 'ror'"):
        create_extractor("lbp", {"method": "ror"})
    with pytest.raises(
        ConfigError, match=r"size must be 0 \(native\) or >= 2 \* max\(radii\) \+ 1 = 7, got 4"
    ):
        create_extractor("lbp", {"size": 4})
    ex = create_extractor("lbp")
    with pytest.raises(
        MediaError, match="lbp: image of 6x40 px is too small for radius 3: need at least 7 px"
    ):
        ex.extract(image_factory(6, 40))
    with pytest.raises(MediaError, match="lbp: expected a uint8 RGB image"):
        ex.extract(image_factory()[..., 0])
    # The same small image is fine once resized.
    assert create_extractor("lbp", {"size": 16}).extract(image_factory(6, 40))["histogram"].shape == (54,)
