"""Audio extractors: ``mfcc``, librosa's MFCCs (optionally with deltas)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import MediaError
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

DELTA_WIDTH = 9  # librosa.feature.delta's default


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

    def __post_init__(self) -> None:
        for key in ("sample_rate", "n_mfcc", "n_fft", "hop_length", "n_mels"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.n_mfcc > self.n_mels:
            # librosa would silently return only n_mels coefficients.
            raise ValueError(f"n_mfcc ({self.n_mfcc}) must be <= n_mels ({self.n_mels})")
        nyquist = self.sample_rate / 2
        fmax = nyquist if self.fmax is None else self.fmax
        if not 0 <= self.fmin < fmax <= nyquist:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate / 2 = {nyquist}, got fmin={self.fmin}, fmax={self.fmax}"
            )


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
class Mfcc(Extractor):
    name = "mfcc"
    version = 1
    modality = "audio"
    description = "MFCC frames from librosa.feature.mfcc, optionally with deltas and delta-deltas."
    Config = MfccConfig

    def decode_request(self) -> dict:
        return {"sample_rate": self.config.sample_rate}

    def output_spec(self) -> dict[str, FieldSpec]:
        cols = self.config.n_mfcc * (3 if self.config.deltas else 1)
        what = "MFCC, delta, delta-delta" if self.config.deltas else "MFCC"
        return {"mfcc": FieldSpec("float32", (None, cols), f"(frames, coefficients): {what}")}

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        import librosa

        y = np.asarray(media)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.floating):
            raise MediaError(f"mfcc: expected mono float audio of shape (samples,), got {y.dtype} {y.shape}")
        if y.size == 0:
            raise MediaError("mfcc: audio is empty")
        if not np.isfinite(y).all():
            raise MediaError("mfcc: audio contains NaN or Inf")
        cfg = self.config
        m = librosa.feature.mfcc(
            y=y,
            sr=cfg.sample_rate,
            n_mfcc=cfg.n_mfcc,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            fmin=cfg.fmin,
            fmax=cfg.fmax,
        )  # (n_mfcc, frames)
        if cfg.deltas:
            m = np.concatenate([m, *deltas(m)], axis=0)
        return {"mfcc": np.ascontiguousarray(m.T, dtype=np.float32)}
