"""Small synthetic media for tests, in memory or written to a path (used by conftest fixtures
and imported directly by tests that build their own datasets)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def make_image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 (height, width, 3) RGB: a colour gradient plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx + yy) / (height + width)], axis=-1)
    img = base * 200 + rng.integers(0, 56, size=(height, width, 3))
    return img.astype(np.uint8)


def make_audio(seconds: float = 0.5, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """float32 mono: two tones and a little noise, peak below 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    y = (
        0.4 * np.sin(2 * np.pi * 440 * t)
        + 0.2 * np.sin(2 * np.pi * 1250 * t)
        + 0.01 * rng.standard_normal(t.size)
    )
    return y.astype(np.float32)


def make_shifted_frames(
    frames: int = 6, size: int = 64, dx: float = 2.0, dy: float = -1.0, seed: int = 0
) -> np.ndarray:
    """uint8 (frames, size, size): a smooth random texture moving (dx, dy) px per frame.

    Frame t is the texture warped by (t*dx, t*dy) with sub-pixel cubic interpolation, cropped
    from the interior of a larger canvas so no border ever enters the view.
    """
    import cv2

    rng = np.random.default_rng(seed)
    pad = int(np.ceil((abs(dx) + abs(dy)) * frames)) + 8
    big = size + 2 * pad
    tex = cv2.GaussianBlur(rng.standard_normal((big, big)).astype(np.float32), (0, 0), 2.0)
    tex = (tex - tex.min()) / (tex.max() - tex.min()) * 255.0
    out = []
    for t in range(frames):
        shift = np.float32([[1, 0, t * dx], [0, 1, t * dy]])  # content moves by (+t*dx, +t*dy)
        moved = cv2.warpAffine(tex, shift, (big, big), flags=cv2.INTER_CUBIC)
        out.append(np.clip(np.round(moved[pad : pad + size, pad : pad + size]), 0, 255).astype(np.uint8))
    return np.stack(out)


def make_rgb_video(frames: int = 5, height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    """uint8 (frames, height, width, 3): a moving texture, a different mix per channel."""
    gray = make_shifted_frames(frames=frames, size=max(height, width), seed=seed)[:, :height, :width]
    return np.stack([gray, 255 - gray, gray // 2 + 60], axis=-1)


def make_media(modality: str, request: dict | None = None, seed: int = 0):
    """A small decoded media item of ``modality`` honouring an extractor's decode request."""
    request = request or {}
    if modality == "image":
        return make_image(seed=seed)
    if modality == "audio":
        return make_audio(sample_rate=request.get("sample_rate") or 16000, seed=seed)
    if modality == "video":
        video = make_shifted_frames(frames=4, size=request.get("size") or 48, seed=seed)
        return video if request.get("gray") else np.repeat(video[..., None], 3, axis=-1)
    if modality == "text":
        return ["A dog runs in the park.", "Spectrograms show energy over time.", "ok"][seed % 3]
    raise ValueError(f"no media factory for modality {modality!r}")


def write_png(path: Path, image: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    img = Image.fromarray(image)
    (img.convert(mode) if mode else img).save(path)
    return path


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    import soundfile

    soundfile.write(path, audio, sample_rate, subtype="PCM_16")
    return path


def write_mp4(path: Path, frames: np.ndarray, fps: int = 10, crf: int = 12) -> Path:
    """H.264 yuv420p MP4 of uint8 (T, H, W) gray or (T, H, W, 3) RGB frames (H, W even)."""
    import av

    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "x264-params": "threads=1"}
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_m4a(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """AAC in an MP4 container: a format soundfile cannot read (exercises the PyAV fallback)."""
    import av

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        frame_size = 1024
        pcm = audio.astype(np.float32)
        for i, start in enumerate(range(0, pcm.size, frame_size)):
            chunk = pcm[start : start + frame_size]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, i * frame_size
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# Fixtures hand out the factories, so tests need no imports from this file.
