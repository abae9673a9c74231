"""Synthetic multimodal demo dataset: real PNG, WAV and MP4 files plus captions, and a manifest.

Label design: four independent fair binary factors, one per modality;
label = 8*image_bit + 4*audio_bit + 2*video_bit + text_bit (16 classes). So any single modality
can know only 1 of 4 bits: at most 1/8 = 12.5 % accuracy alone, whereas a fusion of all four can
reach > 90 %.

- image_bit: whether the handwritten digit (scikit-learn's ``load_digits``, deskewed, centred
  and upscaled, with slight jitter and noise) is >= 5. Train samples draw from one pool of digit
  images and val/test samples from a disjoint pool, so no test image is a train image.
- audio_bit: pitch register of a short harmonic tone of a few notes: 0 = low (fundamentals in
  150-320 Hz), 1 = high (650-1300 Hz). Random duration, onset, amplitude and white noise
  (SNR 5-15 dB); the bit does not depend on temporal order, so time-pooled MFCC statistics see it.
- video_bit: horizontal motion direction of a smooth random texture: 0 = leftwards,
  1 = rightwards, at 1.5-3 px/frame with a small vertical drift (|dy| <= 0.5 px/frame).
- text_bit: the caption holds one mood word, calm (0) or lively (1), inside a random template
  with filler words (colors, objects, places) independent of every factor.

Labels are balanced (each class n/16 times, +-1) and splits (train 70 %, val 15 %, test 15 %)
are stratified by label. Every sample draws from its own generator ``default_rng([seed, 0, i])``,
so a given seed always gives byte-identical files whatever the generation order.
"""

from __future__ import annotations

import csv
import math
import wave
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from features.errors import ConfigError

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
MEDIA_COLUMNS = ("image", "audio", "video", "text")
MANIFEST_COLUMNS = (
    "key",
    "label",
    "split",
    *MEDIA_COLUMNS,
    "digit",
    "image_bit",
    "audio_bit",
    "video_bit",
    "text_bit",
)

LOW_REGISTER_HZ = (150.0, 320.0)
HIGH_REGISTER_HZ = (650.0, 1300.0)
CALM_WORDS = (
    "calm",
    "quiet",
    "gentle",
    "peaceful",
    "serene",
    "soft",
    "still",
    "tranquil",
    "mellow",
    "hushed",
)
LIVELY_WORDS = (
    "loud",
    "wild",
    "energetic",
    "chaotic",
    "fierce",
    "frantic",
    "noisy",
    "vibrant",
    "rowdy",
    "hectic",
)
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "grey", "white", "brown", "pink")
OBJECTS = ("kite", "bicycle", "lantern", "teapot", "umbrella", "boat", "piano", "garden", "bridge", "tram")
PLACES = ("harbor", "market", "park", "library", "station", "village", "forest", "rooftop", "beach", "square")
TEMPLATES = (
    "A {mood} scene with a {color} {obj} near the {place}.",
    "The {place} felt {mood} around the {color} {obj}.",
    "Someone left a {color} {obj} in a {mood} corner of the {place}.",
    "{Mood} afternoon at the {place}, a {color} {obj} in view.",
    "We watched a {color} {obj} by the {place}; everything was {mood}.",
    "At the {place} the mood was {mood} and a {color} {obj} stood nearby.",
)

# Stream tags keep the per-sample, assignment and missingness generators independent.
_SAMPLE_STREAM, _ASSIGN_STREAM, _MISSING_STREAM, _POOL_STREAM = 0, 1, 2, 3


def make_demo_dataset(
    out_dir: str | Path,
    n_samples: int = 1600,
    seed: int = 0,
    *,
    image_size: int = 32,
    audio_seconds: float = 1.0,
    sample_rate: int = 16000,
    video_frames: int = 16,
    video_size: int = 64,
    fps: int = 8,
    missing_rate: float = 0.0,
    progress: bool = True,
) -> Path:
    """Write the synthetic multimodal demo dataset; return the manifest path (OUT/manifest.csv).

    ``missing_rate`` blanks that fraction of each media cell independently (the file is not
    written and the manifest cell is empty); the documentation columns keep every bit. Bad
    arguments raise ``ConfigError``, a ``ValueError``.
    """
    _check_args(
        n_samples, seed, image_size, audio_seconds, sample_rate, video_frames, video_size, fps, missing_rate
    )
    out = Path(out_dir)
    for sub in ("images", "audio", "video"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    labels, splits = _assign_labels_and_splits(n_samples, seed)
    digits, sources = _assign_digits(labels >> 3, splits, seed)
    rows = []
    for i in tqdm(range(n_samples), desc="demo dataset", unit="sample", disable=not progress):
        key = f"demo-{i:06d}"
        label, split = int(labels[i]), SPLITS[splits[i]]
        bits = {name: (label >> shift) & 1 for name, shift in zip(MEDIA_COLUMNS, (3, 2, 1, 0), strict=True)}
        missing = np.random.default_rng([seed, _MISSING_STREAM, i]).random(len(MEDIA_COLUMNS)) < missing_rate
        present = dict(zip(MEDIA_COLUMNS, ~missing, strict=True))
        rng = np.random.default_rng([seed, _SAMPLE_STREAM, i])
        # Draw every factor in a fixed order whether or not its file is written, so that
        # missing_rate changes which cells are blank but not what the present ones contain.
        rgb = _render_digit(rng, _load_digits()[0][sources[i]], image_size)
        pcm = _make_audio(rng, bits["audio"], audio_seconds, sample_rate)
        frames = _make_video(rng, bits["video"], video_frames, video_size)
        caption = _make_caption(rng, bits["text"])

        row = {"key": key, "label": label, "split": split, "digit": int(digits[i])}
        row.update({f"{name}_bit": bit for name, bit in bits.items()})
        row["image"] = row["audio"] = row["video"] = row["text"] = ""
        if present["image"]:
            row["image"] = f"images/{key}.png"
            Image.fromarray(rgb).save(out / row["image"], format="PNG")
        if present["audio"]:
            row["audio"] = f"audio/{key}.wav"
            _write_wav(out / row["audio"], pcm, sample_rate)
        if present["video"]:
            row["video"] = f"video/{key}.mp4"
            _write_mp4(out / row["video"], frames, fps)
        if present["text"]:
            row["text"] = caption
        rows.append(row)

    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(
            f, fieldnames=MANIFEST_COLUMNS, quoting=csv.QUOTE_MINIMAL, lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _check_args(
    n_samples, seed, image_size, audio_seconds, sample_rate, video_frames, video_size, fps, missing_rate
) -> None:
    def bad(name: str, value: object, need: str) -> ConfigError:
        return ConfigError(f"make_demo_dataset: {name}={value!r} is invalid; {need}")

    def is_int(value: object) -> bool:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)

    if not is_int(n_samples) or n_samples < 16:
        raise bad("n_samples", n_samples, "need an int >= 16 so that all 16 classes can appear")
    if not is_int(seed) or seed < 0:
        raise bad("seed", seed, "need a non-negative int")
    if not is_int(image_size) or image_size < 8:
        raise bad("image_size", image_size, "need an int >= 8 (the source digits are 8x8)")
    if not isinstance(audio_seconds, int | float) or not audio_seconds > 0:
        raise bad("audio_seconds", audio_seconds, "need a positive duration")
    if not is_int(sample_rate) or sample_rate < 4000:
        raise bad("sample_rate", sample_rate, "need an int >= 4000 Hz so the high register is below Nyquist")
    if not is_int(video_frames) or video_frames < 2:
        raise bad("video_frames", video_frames, "need an int >= 2 so that there is motion")
    if not is_int(video_size) or video_size < 16 or video_size % 2:
        raise bad("video_size", video_size, "need an even int >= 16 (yuv420p needs even sizes)")
    if not is_int(fps) or fps < 1:
        raise bad("fps", fps, "need an int >= 1")
    if not isinstance(missing_rate, int | float) or not 0.0 <= missing_rate < 1.0:
        raise bad("missing_rate", missing_rate, "need a fraction in [0, 1)")


def _assign_labels_and_splits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, _ASSIGN_STREAM])
    labels = rng.permutation(np.resize(np.arange(16), n))
    # Rank samples by how many of their class came before: the first 70 % of ranks then hold
    # ~70 % of every class, so each split is stratified by label.
    occurrence = np.zeros(n, dtype=np.int64)
    counts = np.zeros(16, dtype=np.int64)
    for i, label in enumerate(labels):
        occurrence[i] = counts[label]
        counts[label] += 1
    order = np.lexsort((rng.random(n), occurrence / counts[labels]))
    bounds = np.round(np.cumsum(SPLIT_FRACTIONS)[:-1] * n).astype(int)
    splits = np.empty(n, dtype=np.int64)
    splits[order] = np.searchsorted(bounds, np.arange(n), side="right")
    return labels, splits


@cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _assign_digits(image_bits: np.ndarray, splits: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, a digit of its bit's half (0-4 or 5-9) and the index of its sklearn image.

    The images of each digit are split 70/30 into a train pool and a val/test pool, so no
    val/test image is a train image. Within a pool, samples take the images in a shuffled cycle
    rather than with replacement: 1120 train samples then show ~1120 distinct handwritings
    instead of ~740, worth about a point of held-out accuracy.
    """
    _, targets = _load_digits()
    rng = np.random.default_rng([seed, _POOL_STREAM])
    digits = np.empty(len(image_bits), dtype=np.int64)
    sources = np.empty(len(image_bits), dtype=np.int64)
    pools = []
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(targets == d))
        cut = int(round(0.7 * len(idx)))
        pools.append((idx[:cut], idx[cut:]))
    for is_eval in (False, True):
        for bit in (0, 1):
            members = np.flatnonzero(((splits > 0) == is_eval) & (image_bits == bit))
            digits[members] = rng.permutation(np.resize(np.arange(5) + 5 * bit, len(members)))
            for d in range(5 * bit, 5 * bit + 5):
                chosen = members[digits[members] == d]
                sources[chosen] = np.resize(rng.permutation(pools[d][is_eval]), len(chosen))
    return digits, sources


def _render_digit(rng: np.random.Generator, src: np.ndarray, size: int) -> np.ndarray:
    # One affine warp from the 8x8 source straight to the canvas: deskew and centre the ink by
    # its moments (the MNIST normalisation), upscale, then a little rotation, scale and shift.
    # The jitter is kept small on purpose: with untrained ResNet features, +-8 degrees and
    # +-2 px cost about 8 points of held-out accuracy on the digit factor.
    mom = cv2.moments(src)
    centroid = np.array([mom["m10"], mom["m01"]]) / mom["m00"]
    deskew = np.array([[1.0, -mom["mu11"] / max(mom["mu02"], 1e-6)], [0.0, 1.0]])
    angle = math.radians(rng.uniform(-3.0, 3.0))
    scale = size / 8.0 * rng.uniform(0.85, 0.9)  # a thin margin, as in MNIST
    rotate = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    m = np.empty((2, 3))
    m[:, :2] = rotate @ deskew
    m[:, 2] = (size - 1) / 2.0 + rng.uniform(-0.02, 0.02, size=2) * size - m[:, :2] @ centroid
    gray = np.clip(cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_CUBIC, borderValue=0.0), 0.0, 1.0)
    rgb = gray[..., None] + rng.normal(0.0, 0.02, size=(size, size, 3))  # white ink, mild colour noise
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _make_audio(rng: np.random.Generator, bit: int, seconds: float, sr: int) -> np.ndarray:
    n_out = int(round(seconds * sr))
    duration = rng.uniform(0.5, 1.0)
    n_tone = int(round(duration * sr))
    n_notes = int(rng.integers(2, 4))
    lo, hi = HIGH_REGISTER_HZ if bit else LOW_REGISTER_HZ
    f0s = rng.uniform(lo, hi, size=n_notes)
    harmonic_decay = rng.uniform(0.4, 0.7)
    edges = np.linspace(0, n_tone, n_notes + 1).astype(int)
    tone = np.zeros(n_tone)
    for f0, start, stop in zip(f0s, edges[:-1], edges[1:], strict=True):
        t = np.arange(stop - start) / sr
        note = np.zeros_like(t)
        for k in range(1, 5):
            if k * f0 < 0.45 * sr:
                note += harmonic_decay ** (k - 1) * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
        ramp = min(len(t) // 2, int(0.01 * sr))  # 10 ms fades avoid clicks between notes
        env = np.ones_like(t)
        if ramp:
            env[:ramp] = np.linspace(0.0, 1.0, ramp)
            env[-ramp:] = env[:ramp][::-1]
        tone[start:stop] = note * env
    tone *= rng.uniform(0.2, 0.6) / max(np.abs(tone).max(), 1e-9)
    onset = int(rng.integers(0, max(n_out - n_tone, 0) + 1))
    signal = np.zeros(n_out)
    kept = tone[: max(n_out - onset, 0)]
    signal[onset : onset + len(kept)] = kept
    snr_db = rng.uniform(5.0, 15.0)
    noise_rms = math.sqrt(np.mean(tone**2) / 10 ** (snr_db / 10))
    signal += rng.normal(0.0, noise_rms, size=n_out)
    return (np.clip(signal, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def _make_video(rng: np.random.Generator, bit: int, n_frames: int, size: int) -> np.ndarray:
    speed = rng.uniform(1.5, 3.0) * (1 if bit else -1)
    drift = rng.uniform(-0.5, 0.5)
    margin_x = int(math.ceil(3.0 * (n_frames - 1))) + 4
    margin_y = int(math.ceil(0.5 * (n_frames - 1))) + 4
    h, w = size + 2 * margin_y, size + 2 * margin_x
    sigma = rng.uniform(1.5, 3.0)
    texture = cv2.GaussianBlur(rng.normal(size=(h, w, 3)).astype(np.float32), (0, 0), sigma)
    texture = (texture - texture.mean()) / (texture.std() + 1e-6)
    texture = np.clip(0.5 + 0.18 * texture * rng.uniform(0.7, 1.3, size=3), 0.0, 1.0).astype(np.float32)
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    x0 = margin_x + 0.5 * (n_frames - 1) * speed  # start so the window stays inside the texture
    y0 = margin_y - 0.5 * (n_frames - 1) * drift
    for t in range(n_frames):
        # dst(x, y) = texture(x + ox, y + oy): shrinking ox moves the content rightwards.
        ox, oy = x0 - speed * t, y0 + drift * t
        m = np.array([[1.0, 0.0, ox], [0.0, 1.0, oy]])
        frame = cv2.warpAffine(texture, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        frame = frame + rng.normal(0.0, 0.01, size=frame.shape)
        frames[t] = (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return frames


def _make_caption(rng: np.random.Generator, bit: int) -> str:
    mood = str(rng.choice(LIVELY_WORDS if bit else CALM_WORDS))
    template = str(rng.choice(TEMPLATES))
    return template.format(
        mood=mood,
        Mood=mood.capitalize(),
        color=rng.choice(COLORS),
        obj=rng.choice(OBJECTS),
        place=rng.choice(PLACES),
    )


def _write_wav(path: Path, pcm: np.ndarray, sr: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.astype("<i2").tobytes())


def _write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Reproducible bytes need one encoder thread and, with x264 165 as bundled by PyAV, no
        # B-frames and no macroblock tree: with either on, identical frames encoded in the same
        # process came out different from call to call.
        stream.options = {"x264-params": "threads=1:bframes=0:mbtree=0", "crf": "18", "preset": "veryfast"}
        stream.codec_context.thread_count = 1
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
