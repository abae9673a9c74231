"""Audio extractors over librosa: ``mfcc``, ``melspec`` (log-mel spectrogram), ``stft``
(magnitude spectrogram) and ``cqt`` (constant-Q magnitude).

Each returns float32 (frames, bins) with librosa's centred frames: ``1 + samples // hop_length``
frames, every one kept; or, with ``pool``, a fixed-size vector of statistics over those frames:
"mean" (bins,), "meanstd" (2 * bins,: mean then std), "stats" (4 * bins,: mean, std, min, max).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import MediaError
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

DELTA_WIDTH = 9  # librosa.feature.delta's default
POWER_AMIN = 1e-10  # librosa.power_to_db's default floor
AMPLITUDE_AMIN = 1e-5  # librosa.amplitude_to_db's default floor (its square is POWER_AMIN)
# pool -> statistics over frames, concatenated in this order (std is the population std, ddof=0).
POOLS = {"none": (), "mean": ("mean",), "meanstd": ("mean", "std"), "stats": ("mean", "std", "min", "max")}


# --- helpers shared by the extractors ------------------------------------------------------


def _check_ints(config: Any, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(config, key)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")


def _check_bool(config: Any, key: str) -> None:
    value = getattr(config, key)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def _check_pool(config: Any) -> None:
    if not isinstance(config.pool, str) or config.pool not in POOLS:
        raise ValueError(
            f"pool must be one of {list(POOLS)} (none: the (frames, n) sequence; mean: (n,); "
            f"meanstd: (2n,) mean then std; stats: (4n,) mean, std, min, max), got {config.pool!r}"
        )


def _pooled(spec: FieldSpec, pool: str) -> FieldSpec:
    """The spec of the (frames, n) sequence ``spec`` after pooling by ``pool``."""
    if pool == "none":
        return spec
    stats = POOLS[pool]
    return FieldSpec(
        "float32", (len(stats) * spec.shape[1],), f"{', '.join(stats)} over frames of {spec.description}"
    )


def _pool(frames: np.ndarray, pool: str) -> np.ndarray:
    """(frames, n) float32 -> itself (``none``) or the float32 statistics of ``pool`` over frames
    (computed in float64), concatenated: (k * n,)."""
    if pool == "none":
        return frames
    x = frames.astype(np.float64)
    funcs = {"mean": np.mean, "std": np.std, "min": np.min, "max": np.max}
    return np.concatenate([funcs[s](x, axis=0) for s in POOLS[pool]]).astype(np.float32)


def _check_band(sample_rate: int, fmin: float, fmax: float | None) -> None:
    nyquist = sample_rate / 2
    top = nyquist if fmax is None else fmax
    if not 0 <= fmin < top <= nyquist:
        raise ValueError(
            f"need 0 <= fmin < fmax <= sample_rate / 2 = {nyquist}, got fmin={fmin}, fmax={fmax}; "
            "fmax=None means sample_rate / 2"
        )


def _check_audio(name: str, media: Any) -> np.ndarray:
    y = np.asarray(media)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.floating):
        raise MediaError(f"{name}: expected mono float audio of shape (samples,), got {y.dtype} {y.shape}")
    if y.size == 0:
        raise MediaError(f"{name}: audio is empty")
    if not np.isfinite(y).all():
        raise MediaError(f"{name}: audio contains NaN or Inf")
    return y


def _to_db(S: np.ndarray, power: float) -> np.ndarray:
    """Decibels with ref=1 and no top_db clipping: power_to_db for power spectra (power=2),
    amplitude_to_db for magnitudes (power=1)."""
    import librosa

    if power == 2.0:
        return librosa.power_to_db(S, ref=1.0, amin=POWER_AMIN, top_db=None)
    return librosa.amplitude_to_db(S, ref=1.0, amin=AMPLITUDE_AMIN, top_db=None)


def _mel_kwargs(cfg: Any) -> dict[str, Any]:
    """The mel filterbank and framing arguments MfccConfig and MelspecConfig share."""
    return {
        "sr": cfg.sample_rate,
        "n_fft": cfg.n_fft,
        "hop_length": cfg.hop_length,
        "n_mels": cfg.n_mels,
        "fmin": cfg.fmin,
        "fmax": cfg.fmax,
    }


def _frames(S: np.ndarray) -> np.ndarray:
    """librosa's (bins, frames) -> contiguous float32 (frames, bins)."""
    return np.ascontiguousarray(S.T, dtype=np.float32)


# --- mfcc ----------------------------------------------------------------------------------


class AudioExtractor(Extractor):
    """Base of the audio extractors: mono audio decoded and resampled to ``config.sample_rate``."""

    modality = "audio"

    def decode_request(self) -> dict:
        return {"sample_rate": self.config.sample_rate}


@dataclass(frozen=True)
class MfccConfig:
    """Parameters of ``librosa.feature.mfcc``; ``fmax=None`` means ``sample_rate / 2``."""

    sample_rate: int = 16000
    n_mfcc: int = 40
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float | None = None
    deltas: bool = False
    pool: str = "none"

    def __post_init__(self) -> None:
        _check_pool(self)
        _check_ints(self, ("sample_rate", "n_mfcc", "n_fft", "hop_length", "n_mels"))
        if self.n_mfcc > self.n_mels:
            # librosa would silently return only n_mels coefficients.
            raise ValueError(f"n_mfcc ({self.n_mfcc}) must be <= n_mels ({self.n_mels})")
        _check_band(self.sample_rate, self.fmin, self.fmax)


def deltas(mfcc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Delta and delta-delta of (n_mfcc, frames), as librosa.feature.delta computes them.

    librosa needs at least ``width`` frames; shorter inputs use the largest odd width that
    fits (>= 3), and fewer than 3 frames have zero deltas.
    """
    import librosa

    frames = mfcc.shape[1]
    width = min(DELTA_WIDTH, frames if frames % 2 else frames - 1)
    if width < 3:
        return np.zeros_like(mfcc), np.zeros_like(mfcc)
    return (
        librosa.feature.delta(mfcc, width=width, order=1),
        librosa.feature.delta(mfcc, width=width, order=2),
    )


@register_extractor
class Mfcc(AudioExtractor):
    name = "mfcc"
    version = 1
    description = "MFCC frames from librosa.feature.mfcc, optionally with deltas and delta-deltas."
    Config = MfccConfig

    def output_spec(self) -> dict[str, FieldSpec]:
        cols = self.config.n_mfcc * (3 if self.config.deltas else 1)
        what = "MFCC, delta, delta-delta" if self.config.deltas else "MFCC"
        spec = FieldSpec("float32", (None, cols), f"(frames, coefficients): {what}")
        return {"mfcc": _pooled(spec, self.config.pool)}

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        import librosa

        y = _check_audio(self.name, media)
        cfg = self.config
        m = librosa.feature.mfcc(y=y, n_mfcc=cfg.n_mfcc, **_mel_kwargs(cfg))  # (n_mfcc, frames)
        if cfg.deltas:
            m = np.concatenate([m, *deltas(m)], axis=0)
        return {"mfcc": _pool(_frames(m), cfg.pool)}


# --- melspec -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MelspecConfig:
    """Parameters of ``librosa.feature.melspectrogram``; ``fmax=None`` means ``sample_rate / 2``.

    ``power=2`` gives a power spectrogram (``log`` applies ``power_to_db``), ``power=1`` a
    magnitude one (``log`` applies ``amplitude_to_db``); both with ref=1 and no top_db.
    """

    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float | None = None
    power: float = 2.0
    log: bool = True
    pool: str = "none"

    def __post_init__(self) -> None:
        _check_pool(self)
        _check_ints(self, ("sample_rate", "n_fft", "hop_length", "n_mels"))
        _check_band(self.sample_rate, self.fmin, self.fmax)
        if self.power not in (1.0, 2.0) or isinstance(self.power, bool):
            raise ValueError(f"power must be 1.0 (magnitude) or 2.0 (power), got {self.power!r}")
        _check_bool(self, "log")


@register_extractor
class Melspec(AudioExtractor):
    name = "melspec"
    version = 1
    description = "Mel spectrogram frames from librosa.feature.melspectrogram, in dB by default."
    Config = MelspecConfig

    def output_spec(self) -> dict[str, FieldSpec]:
        unit = "dB" if self.config.log else ("power" if self.config.power == 2.0 else "magnitude")
        spec = FieldSpec("float32", (None, self.config.n_mels), f"(frames, mel bands), {unit}")
        return {"melspec": _pooled(spec, self.config.pool)}

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        import librosa

        y = _check_audio(self.name, media)
        cfg = self.config
        S = librosa.feature.melspectrogram(y=y, power=cfg.power, **_mel_kwargs(cfg))  # (n_mels, frames)
        if cfg.log:
            S = _to_db(S, cfg.power)
        return {"melspec": _pool(_frames(S), cfg.pool)}


# --- stft ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StftConfig:
    """Parameters of ``librosa.stft``; the output is ``|STFT|``, in dB (``amplitude_to_db``,
    ref=1, no top_db) when ``log``.

    ``win_length=None`` means ``n_fft``; ``window`` is a ``scipy.signal.get_window`` name or
    (name, parameter) tuple, e.g. "hann", "hamming", ("kaiser", 8.0).
    """

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 160
    win_length: int | None = None
    window: str | tuple = "hann"
    log: bool = True
    pool: str = "none"

    def __post_init__(self) -> None:
        _check_pool(self)
        _check_ints(self, ("sample_rate", "n_fft", "hop_length"))
        if self.win_length is not None:
            _check_ints(self, ("win_length",))
            if self.win_length > self.n_fft:
                raise ValueError(
                    f"win_length ({self.win_length}) must be <= n_fft ({self.n_fft}); "
                    "use win_length=None for n_fft"
                )
        _check_window(self.window, self.win_length or self.n_fft)
        _check_bool(self, "log")


def _check_window(window: Any, length: int) -> None:
    from scipy.signal import get_window  # what librosa.filters.get_window calls for names

    try:
        if not isinstance(window, (str, tuple)):
            raise TypeError
        get_window(window, length, fftbins=True)
    except (TypeError, ValueError):
        raise ValueError(
            f"window {window!r} is not a scipy.signal window; use a name such as 'hann', "
            "'hamming' or 'blackman', or a (name, parameter) pair such as ['kaiser', 8.0]"
        ) from None


@register_extractor
class Stft(AudioExtractor):
    name = "stft"
    version = 1
    description = "STFT magnitude frames from librosa.stft, in dB by default."
    Config = StftConfig

    def output_spec(self) -> dict[str, FieldSpec]:
        bins = self.config.n_fft // 2 + 1
        unit = "dB" if self.config.log else "magnitude"
        spec = FieldSpec("float32", (None, bins), f"(frames, frequency bins), {unit}")
        return {"stft": _pooled(spec, self.config.pool)}

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        import librosa

        y = _check_audio(self.name, media)
        cfg = self.config
        S = np.abs(
            librosa.stft(
                y,
                n_fft=cfg.n_fft,
                hop_length=cfg.hop_length,
                win_length=cfg.win_length,
                window=cfg.window,
            )
        )  # (n_fft // 2 + 1, frames)
        if cfg.log:
            S = _to_db(S, 1.0)
        return {"stft": _pool(_frames(S), cfg.pool)}


# --- cqt -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CqtConfig:
    """Parameters of ``librosa.cqt`` (tuning fixed at 0); the output is ``|CQT|``, in dB
    (``amplitude_to_db``, ref=1, no top_db) when ``log``. ``fmin=32.70`` is C1.

    Any ``hop_length`` works (librosa >= 0.9), but a multiple of 2**(n_octaves - 1), with
    n_octaves = ceil(n_bins / bins_per_octave), lets librosa downsample for every lower octave;
    otherwise it stops halving at the first odd hop and the low octaves are slower to compute.
    """

    sample_rate: int = 16000
    hop_length: int = 256
    fmin: float = 32.70
    n_bins: int = 72
    bins_per_octave: int = 12
    log: bool = True
    pool: str = "none"

    def __post_init__(self) -> None:
        _check_pool(self)
        _check_ints(self, ("sample_rate", "hop_length", "n_bins", "bins_per_octave"))
        if not isinstance(self.fmin, numbers.Real) or not self.fmin > 0:
            raise ValueError(f"fmin must be a frequency > 0 Hz, got {self.fmin!r}")
        top = self.fmin * 2 ** (self.n_bins / self.bins_per_octave)
        nyquist = self.sample_rate / 2
        if not top < nyquist:
            raise ValueError(
                f"the CQT bins reach fmin * 2**(n_bins / bins_per_octave) = {top:.1f} Hz, not below "
                f"the Nyquist frequency sample_rate / 2 = {nyquist} Hz (fmin={self.fmin}, "
                f"n_bins={self.n_bins}, bins_per_octave={self.bins_per_octave}); "
                "lower n_bins or fmin, or raise sample_rate"
            )
        _check_bool(self, "log")


@register_extractor
class Cqt(AudioExtractor):
    name = "cqt"
    version = 1
    description = "Constant-Q transform magnitude frames from librosa.cqt, in dB by default."
    Config = CqtConfig

    def output_spec(self) -> dict[str, FieldSpec]:
        unit = "dB" if self.config.log else "magnitude"
        spec = FieldSpec("float32", (None, self.config.n_bins), f"(frames, CQT bins), {unit}")
        return {"cqt": _pooled(spec, self.config.pool)}

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        import librosa

        y = _check_audio(self.name, media)
        cfg = self.config
        try:
            C = np.abs(
                librosa.cqt(
                    y,
                    sr=cfg.sample_rate,
                    hop_length=cfg.hop_length,
                    fmin=cfg.fmin,
                    n_bins=cfg.n_bins,
                    bins_per_octave=cfg.bins_per_octave,
                    tuning=0.0,
                )
            )  # (n_bins, frames)
        except librosa.util.exceptions.ParameterError as exc:  # e.g. too short to downsample
            raise MediaError(f"cqt: cannot transform audio of {y.size} samples: {exc}") from exc
        if cfg.log:
            C = _to_db(C, 1.0)
        return {"cqt": _pool(_frames(C), cfg.pool)}
