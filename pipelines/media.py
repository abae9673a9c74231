"""Media decoding: a path or URL in, the array an extractor expects out.

One loader per modality and ``decode(modality, source, request)``, which passes an
extractor's ``decode_request()`` to the loader. Sources are local paths, ``file://`` URLs
or any fsspec URL (``s3://``, ``http://``...; those are read into memory first, within
``timeout`` seconds, default ``REMOTE_TIMEOUT_S``). Every failure raises
``MediaError("{source}: ...")``, never a library's own exception.

What counts as broken: empty files, truncated files (images and videos by their decoders,
WAV by its data chunk's declared length), images over ``MAX_IMAGE_PIXELS`` (refused from the
header, before any pixel is decoded), videos without a decodable frame, audio with NaN or
Inf samples after decoding (refused, never repaired), text that is not valid UTF-8 (the
manifest keeps undecodable bytes as surrogate escapes, refused here). Silent audio is valid
audio: every audio extractor turns it into finite features (dB floors, no division by energy).
"""

from __future__ import annotations

import inspect
import io
import os
import struct
import threading
import warnings
from typing import Any

import numpy as np

from features.errors import ConfigError, MediaError
from features.video import evenly_spaced

MAX_IMAGE_PIXELS = 50_000_000  # decompression-bomb guard: refuse larger images before decoding
REMOTE_TIMEOUT_S = 60.0  # a remote read that takes longer is a per-sample error, not a hung run


def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _remote_options(source: str, timeout: float) -> dict:
    """fsspec options that make the filesystem itself give up after ``timeout`` seconds."""
    if source.split("://", 1)[0] in ("http", "https"):
        try:
            import aiohttp
        except ImportError:  # fsspec's HTTP filesystem needs it; its own error says so
            return {}
        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
    return {}


def _read_remote(source: str, timeout: float) -> bytes:
    """The bytes of an fsspec URL, or MediaError; never waits longer than ``timeout`` seconds.

    The read runs in a daemon thread: a filesystem without its own timeout (or one that
    ignores it) cannot hang the run; the abandoned thread ends with its connection.
    """
    import fsspec

    result: dict = {}

    def fetch() -> None:
        try:
            with fsspec.open(source, "rb", **_remote_options(source, timeout)) as f:
                result["data"] = f.read()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=fetch, name="modalstore-remote-read", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise MediaError(
            f"{source}: timed out after {timeout:g} s reading a remote file (no answer); "
            "check the server or raise the remote timeout"
        )
    exc = result.get("error")
    if isinstance(exc, FileNotFoundError):
        raise MediaError(f"{source}: file not found") from exc
    if isinstance(exc, TimeoutError) or type(exc).__name__ in ("ServerTimeoutError", "TimeoutError"):
        raise MediaError(f"{source}: timed out after {timeout:g} s reading a remote file ({_describe(exc)})")
    if exc is not None:
        raise MediaError(f"{source}: cannot read ({_describe(exc)})") from exc
    return result["data"]


def _open_source(source: str | os.PathLike, timeout: float | None = None) -> str | io.BytesIO:
    """A checked local path, or the bytes of a remote URL in memory (seekable, re-readable)."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise MediaError(f"{source!r}: expected a non-empty path or URL")
    source = os.fspath(source)
    if _is_remote(source):
        data = _read_remote(source, REMOTE_TIMEOUT_S if timeout is None else timeout)
        if not data:
            raise MediaError(f"{source}: file is empty (0 bytes)")
        return io.BytesIO(data)
    path = source.removeprefix("file://")
    if not os.path.exists(path):
        raise MediaError(f"{source}: file not found")
    if not os.path.isfile(path):
        raise MediaError(f"{source}: not a regular file")
    if not os.access(path, os.R_OK):
        raise MediaError(f"{source}: permission denied")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{source}: file is empty (0 bytes)")
    return path


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _failed(source: Any, what: str, exc: BaseException) -> MediaError:
    return MediaError(f"{os.fspath(source)}: {what} ({_describe(exc)})")


def load_image(
    path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, timeout: float | None = None
) -> np.ndarray:
    """uint8 (height, width, 3) RGB; EXIF orientation applied, first frame of animations."""
    from PIL import Image, ImageOps

    src = _open_source(path, timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:  # reads the header only
                w, h = img.size
                if w * h > max_pixels:
                    raise MediaError(
                        f"{os.fspath(path)}: image of {w}x{h} = {w * h:,} pixels exceeds the "
                        f"limit of {max_pixels:,} (possible decompression bomb)"
                    )
                img = ImageOps.exif_transpose(img)
                rgb = np.asarray(img.convert("RGB"))
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires inside Image.open, before our check can read the size.
        raise MediaError(
            f"{os.fspath(path)}: image exceeds the pixel limit (possible decompression bomb): {exc}"
        ) from exc
    except Exception as exc:
        raise _failed(path, "cannot decode image", exc) from exc
    if rgb.size == 0:
        raise MediaError(f"{os.fspath(path)}: image has no pixels")
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def load_audio(
    path: str | os.PathLike, sample_rate: int | None = None, timeout: float | None = None
) -> np.ndarray:
    """float32 (samples,) mono at ``sample_rate`` (None: the file's own rate).

    librosa first (soundfile: wav/flac/ogg; audioread: mp3/m4a), then PyAV for anything
    else FFmpeg reads, including the audio track of a video file.
    """
    src = _open_source(path, timeout)
    _check_wav_complete(src, path)
    try:
        y = _librosa_load(src, sample_rate)
    except Exception as first:
        if isinstance(src, io.BytesIO):
            src.seek(0)
        try:
            y = _pyav_load_audio(src, sample_rate)
        except Exception as exc:
            raise MediaError(
                f"{os.fspath(path)}: cannot decode audio (librosa: {_describe(first)}; PyAV: {_describe(exc)})"
            ) from exc
    if y.size == 0:
        raise MediaError(f"{os.fspath(path)}: audio has no samples")
    if not np.isfinite(y).all():
        raise MediaError(f"{os.fspath(path)}: audio contains NaN or Inf samples")
    return np.ascontiguousarray(y, dtype=np.float32)


def _check_wav_complete(src: str | io.BytesIO, path: Any) -> None:
    """Refuse a WAV whose data chunk declares more bytes than the file holds.

    libsndfile reads such a file without complaint, shortened: a cut download or copy would
    be stored as a shorter sound. Other formats rely on their decoders to notice.
    """
    fh = src if isinstance(src, io.BytesIO) else open(src, "rb")
    try:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0)
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        pos = 12
        for _ in range(1000):  # chunk headers; a real WAV has a handful
            fh.seek(pos)
            chunk = fh.read(8)
            if len(chunk) < 8:
                return
            cid, csize = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if cid == b"data":
                available = size - pos - 8
                if csize not in (0, 0xFFFFFFFF) and csize > available:  # 0 / max: streamed, length unknown
                    raise MediaError(
                        f"{os.fspath(path)}: truncated WAV: its data chunk declares {csize:,} bytes, "
                        f"the file holds {available:,}"
                    )
                return
            pos += 8 + csize + (csize & 1)
    finally:
        if fh is src:
            fh.seek(0)
        else:
            fh.close()


def _librosa_load(src: str | io.BytesIO, sample_rate: int | None) -> np.ndarray:
    import librosa

    with warnings.catch_warnings():
        # "PySoundFile failed. Trying audioread instead." and audioread's deprecation: the
        # PyAV fallback and our own error message cover both.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        y, _ = librosa.load(src, sr=sample_rate, mono=True)
    return y


def _pyav_load_audio(src: str | io.BytesIO, sample_rate: int | None) -> np.ndarray:
    import av
    import librosa

    with av.open(src) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        # Planar float keeps channels apart: to_ndarray() gives (channels, samples).
        resampler = av.AudioResampler(format="fltp")
        chunks, native_rate = [], None
        for frame in container.decode(stream):
            native_rate = native_rate or frame.sample_rate
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise ValueError("no decodable audio frames")
    y = np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)  # downmix like librosa
    if sample_rate is not None and native_rate != sample_rate:
        y = librosa.resample(y, orig_sr=native_rate, target_sr=sample_rate)
    return y


def load_video(
    path: str | os.PathLike,
    gray: bool = False,
    size: int | None = None,
    max_frames: int | None = None,
    fps: float | None = None,
    num_frames: int | None = None,
    timeout: float | None = None,
) -> np.ndarray:
    """uint8 (frames, height, width) if ``gray`` else (frames, height, width, 3) RGB.

    ``size``: frames scaled to size x size by FFmpeg while converting (None or 0: native).
    ``fps``: sample at this rate by timestamp: a frame is kept when its time reaches the next
    sampling instant ``t0 + k / fps`` (``t0`` the first frame's time), so no frame is kept
    twice and at or above the native rate every frame is kept.
    ``num_frames``: exactly this many frames, evenly spaced over the whole video: frame
    indices ``np.round(np.linspace(0, total - 1, num_frames))`` (halves to even), so a video
    with fewer frames repeats some. The video is decoded twice: once to count its frames
    (decoding only, no pixel conversion), once converting just the chosen ones.
    ``max_frames``: at most this many frames are returned (None or 0: no cap); with
    ``num_frames`` it must be >= num_frames. At most one of ``fps`` and ``num_frames``.
    """
    if size is not None and size < 0:
        raise ConfigError(f"load_video: size must be a positive int or None, got {size}")
    if fps is not None and num_frames is not None:
        raise ConfigError(f"load_video: give at most one of fps ({fps}) and num_frames ({num_frames})")
    if fps is not None and not fps > 0:
        raise ConfigError(f"load_video: fps must be > 0 or None, got {fps}")
    if num_frames is not None and num_frames < 1:
        raise ConfigError(f"load_video: num_frames must be >= 1 or None, got {num_frames}")
    if num_frames and max_frames and num_frames > max_frames:
        raise ConfigError(f"load_video: num_frames ({num_frames}) exceeds max_frames ({max_frames})")
    src = _open_source(path, timeout)
    fmt = "gray" if gray else "rgb24"

    def convert(frame) -> np.ndarray:
        # Convert and scale in one swscale call: the conversion costs more than decoding.
        return frame.reformat(
            width=size or None, height=size or None, format=fmt, interpolation="AREA"
        ).to_ndarray()

    try:
        if num_frames:
            total = sum(1 for _ in _decoded_frames(src, path))
            wanted = evenly_spaced(total, num_frames)
            if isinstance(src, io.BytesIO):
                src.seek(0)
            keep = set(wanted.tolist())
            picked = {i: convert(f) for i, f in enumerate(_decoded_frames(src, path)) if i in keep}
            frames = [picked[i] for i in wanted if i in picked]
        else:
            frames = []
            sampler = _FpsSampler(fps, path) if fps else None
            for i, frame in enumerate(_decoded_frames(src, path)):
                if sampler is None or sampler.keep(frame, i):
                    frames.append(convert(frame))
                    if max_frames and len(frames) >= max_frames:
                        break
    except MediaError:
        raise
    except Exception as exc:
        raise _failed(path, "cannot decode video", exc) from exc
    if not frames:
        raise MediaError(f"{os.fspath(path)}: no decodable video frames")
    if num_frames and len(frames) != num_frames:  # the second decoding pass yielded fewer frames
        raise MediaError(
            f"{os.fspath(path)}: frames changed between decoding passes; cannot pick {num_frames}"
        )
    return np.stack(frames)


def _decoded_frames(src: str | io.BytesIO, path: Any):
    """The decoded frames of the first video stream, in presentation order."""
    import av

    with av.open(src) as container:
        if not container.streams.video:
            raise MediaError(f"{os.fspath(path)}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from container.decode(stream)


class _FpsSampler:
    """Keeps a frame when its timestamp reaches the next sampling instant ``t0 + k / fps``."""

    def __init__(self, fps: float, path: Any) -> None:
        self.fps, self.path = fps, path
        self.t0: float | None = None
        self.next_k = 0

    def keep(self, frame: Any, index: int) -> bool:
        if frame.pts is not None and frame.time_base is not None:
            t = float(frame.pts * frame.time_base)
        elif frame.time is not None:
            t = float(frame.time)
        else:
            raise MediaError(
                f"{os.fspath(self.path)}: cannot sample at fps={self.fps}: frame {index} has no timestamp"
            )
        if self.t0 is None:
            self.t0 = t
        k = (t - self.t0) * self.fps  # the frame's time in sampling periods
        if k < self.next_k - 1e-6:  # tolerance: float rounding of exact rational times
            return False
        self.next_k = int(np.floor(k + 1e-6)) + 1
        return True


def load_text(text: Any, timeout: float | None = None) -> str:
    """Inline text passes through; it must be a non-empty str of valid UTF-8.

    The manifest reader keeps bytes that are not UTF-8 as surrogate escapes (U+DC80-U+DCFF);
    such text is refused here, per sample, naming the first bad byte.
    """
    if not isinstance(text, str) or not text.strip():
        raise MediaError(f"{text!r}: text must be a non-empty str")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"{bad!r}"
        shown = text[: min(len(text), 40)].encode("utf-8", "backslashreplace").decode("ascii", "replace")
        raise MediaError(
            f"{shown!r}: text is not valid UTF-8 ({byte} at character {exc.start}); "
            "re-encode the manifest as UTF-8"
        ) from None
    return text


_LOADERS = {"image": load_image, "audio": load_audio, "video": load_video, "text": load_text}


def decode(modality: str, source: str, request: dict | None = None, timeout: float | None = None) -> Any:
    """Decode ``source`` for ``modality`` with an extractor's ``decode_request()`` as options.

    ``timeout``: seconds a remote source may take to read (None: ``REMOTE_TIMEOUT_S``).
    """
    try:
        loader = _LOADERS[modality]
    except KeyError:
        raise ConfigError(f"unknown modality {modality!r}; available: {sorted(_LOADERS)}") from None
    request = dict(request or {})
    allowed = [p for p in list(inspect.signature(loader).parameters)[1:] if p != "timeout"]
    unknown = sorted(set(request) - set(allowed))
    if unknown:
        raise ConfigError(f"decode request for {modality!r} has unknown key(s) {unknown}; allowed: {allowed}")
    return loader(source, **request, timeout=timeout)
