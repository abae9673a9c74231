"""Dataset recipes: real media plus a manifest, ready for ``modalstore extract``.

``make_av_digits``: an audio-visual digits dataset (as AV-MNIST, used by MultiBench) from FSDD
spoken digits and MNIST images paired by label. The test split holds out FSDD's usual test
recordings (index 0-4) or one whole speaker; the MNIST images of each split are disjoint. The
optional degradation follows AV-MNIST: image PCA energy removed, noise mixed into the audio.

``download_fsdd`` and ``download_mnist`` fetch both sources into a cache folder for users with
a network (URLs overridable by argument or ``MODALSTORE_FSDD_URL`` / ``MODALSTORE_MNIST_URL``).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import tarfile
import urllib.parse
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from features.errors import ConfigError, MediaError

FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
MNIST_URL = "https://yann.lecun.com/exdb/mnist/"
# The release archive of FSDD's latest tag (3,000 recordings, 6 speakers). GitHub builds its
# archives on the fly, so their bytes (and sha256) are not guaranteed stable: the download's
# size and sha256 are recorded in fsdd/source.json instead of checked against a pinned value.
FSDD_ARCHIVE_URL = f"{FSDD_URL}/archive/refs/tags/v1.0.10.tar.gz"
# torchvision's mirror of the original MNIST files.
MNIST_MIRROR_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# sha256 of the original t10k files: those whose md5 torchvision pins (9fb629c4189551a2d022fa330f9573f3,
# ec29112dd5afa0611ce80d1b7f02629c), hashed here from such a copy. Every mirror serves these bytes.
MNIST_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
_RECORDING = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def read_mnist(mnist_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images (n, 28, 28) uint8 and labels (n,) from the gzipped IDX files in ``mnist_dir``.

    Reads ``t10k-*`` (the test set) when present, else ``train-*``.
    """
    d = Path(mnist_dir)
    for prefix in ("t10k", "train"):
        images, labels = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
        if images.exists() and labels.exists():
            break
    else:
        raise ConfigError(
            f"{d}: no MNIST IDX files (t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz); "
            f"download them from {MNIST_URL} (or use av-digits --download)"
        )
    raw_images, raw_labels = gzip.decompress(images.read_bytes()), gzip.decompress(labels.read_bytes())
    magic, n, rows, cols = np.frombuffer(raw_images[:16], dtype=">u4")
    if magic != 2051 or len(raw_images) != 16 + n * rows * cols:
        raise MediaError(f"{images}: not an IDX image file (magic {magic}, {len(raw_images)} bytes)")
    magic_l, n_l = np.frombuffer(raw_labels[:8], dtype=">u4")
    if magic_l != 2049 or n_l != n or len(raw_labels) != 8 + n:
        raise MediaError(f"{labels}: not an IDX label file for {n} images (magic {magic_l}, count {n_l})")
    imgs = np.frombuffer(raw_images, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    return imgs, np.frombuffer(raw_labels, dtype=np.uint8, offset=8).astype(np.int64)


def list_fsdd(fsdd_dir: str | Path) -> list[dict]:
    """FSDD recordings ``{digit}_{speaker}_{index}.wav`` in ``fsdd_dir`` (or its ``recordings/``)."""
    d = Path(fsdd_dir)
    if (d / "recordings").is_dir():
        d = d / "recordings"
    rows = []
    for p in sorted(d.glob("*.wav")) if d.is_dir() else []:
        m = _RECORDING.match(p.name)
        if m:
            rows.append({"path": p, "digit": int(m[1]), "speaker": m[2], "index": int(m[3])})
    if not rows:
        raise ConfigError(
            f"{fsdd_dir}: no FSDD recordings named DIGIT_SPEAKER_INDEX.wav; get them from {FSDD_URL} "
            "(or use av-digits --download)"
        )
    return rows


def default_cache_dir() -> Path:
    """``$MODALSTORE_CACHE``, else ``$XDG_CACHE_HOME/modalstore``, else ``~/.cache/modalstore``."""
    if os.environ.get("MODALSTORE_CACHE"):
        return Path(os.environ["MODALSTORE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modalstore"


def download_mnist(
    cache_dir: str | Path,
    url: str | None = None,
    *,
    sha256: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Fetch the MNIST test set (two IDX .gz files) into ``cache_dir/mnist-t10k``; return that folder.

    ``url`` is the folder URL the two file names are appended to (default: ``MODALSTORE_MNIST_URL``,
    else torchvision's mirror). Each file must match ``sha256`` (default ``MNIST_SHA256``, the
    original files). Files already in the cache are checked, not fetched again.
    """
    from pipelines.download import download
    from pipelines.manifest import sha256_file

    url = url or os.environ.get("MODALSTORE_MNIST_URL") or MNIST_MIRROR_URL
    checks = MNIST_SHA256 if sha256 is None else sha256
    folder = Path(cache_dir) / "mnist-t10k"
    files = {}
    for name in MNIST_SHA256:
        file_url = url.rstrip("/") + "/" + name
        path = download(file_url, folder / name, sha256=checks.get(name), progress=progress)
        # download() has already checked a pinned hash: hash again only when nothing was pinned
        digest = checks.get(name) or sha256_file(path)
        files[name] = {"url": file_url, "bytes": path.stat().st_size, "sha256": digest}
    read_mnist(folder)  # valid IDX files, or an error naming them
    (folder / "source.json").write_text(json.dumps({"files": files}, indent=2) + "\n")
    return folder


def _archive_recordings(archive: Path):
    """(file name, bytes) of every ``recordings/DIGIT_SPEAKER_INDEX.wav`` in a .tar(.gz) or .zip."""
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and parts[-2:-1] == ["recordings"] and _RECORDING.match(parts[-1]):
                    yield parts[-1], tar.extractfile(member).read()
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if not info.is_dir() and parts[-2:-1] == ["recordings"] and _RECORDING.match(parts[-1]):
                    yield parts[-1], zf.read(info)
    else:
        raise ConfigError(f"{archive}: neither a tar nor a zip archive")


def download_fsdd(
    cache_dir: str | Path,
    url: str | None = None,
    *,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch an FSDD archive (.tar.gz or .zip) and unpack its recordings into ``cache_dir/fsdd``.

    ``url`` defaults to ``MODALSTORE_FSDD_URL``, else the v1.0.10 release (``FSDD_ARCHIVE_URL``);
    ``sha256`` pins the archive when you know it. Only ``*/recordings/*.wav`` is unpacked, under
    its file name; ``fsdd/source.json`` records the URL, size and sha256 of what was fetched.
    A cache already unpacked from the same URL is reused.
    """
    from pipelines.download import download
    from pipelines.manifest import sha256_file

    url = url or os.environ.get("MODALSTORE_FSDD_URL") or FSDD_ARCHIVE_URL
    folder = Path(cache_dir) / "fsdd"
    recordings, source = folder / "recordings", folder / "source.json"
    if recordings.is_dir() and source.exists() and json.loads(source.read_text()).get("url") == url:
        return folder
    # The archive's name carries the URL's hash: a .part left by another URL is never resumed.
    name = Path(urllib.parse.urlsplit(url).path).name or "archive"
    archive = download(
        url,
        folder / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}",
        sha256=sha256,
        progress=progress,
    )
    unpacking = folder / "recordings.part"
    shutil.rmtree(unpacking, ignore_errors=True)
    unpacking.mkdir(parents=True)
    count = 0
    try:
        for file_name, data in _archive_recordings(archive):
            (unpacking / file_name).write_bytes(data)
            count += 1
    except (ConfigError, tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        archive.unlink()  # else every later call would reuse the broken file
        shutil.rmtree(unpacking, ignore_errors=True)
        raise ConfigError(f"{url}: cannot unpack the download ({exc}); it was removed, run again") from exc
    if count == 0:
        archive.unlink()
        unpacking.rmdir()
        raise ConfigError(f"{url}: the archive holds no recordings/DIGIT_SPEAKER_INDEX.wav; is it FSDD?")
    shutil.rmtree(recordings, ignore_errors=True)
    os.replace(unpacking, recordings)  # the folder appears whole or not at all
    info = {
        "url": url,
        "bytes": archive.stat().st_size,
        "sha256": sha256 or sha256_file(archive),
        "recordings": count,
    }
    source.write_text(json.dumps(info, indent=2) + "\n")
    archive.unlink()  # the recordings are what the recipe reads; source.json keeps the archive's identity
    return folder


def _assign_splits(
    recordings: list[dict], test_speaker: str | None, val_fraction: float, rng: np.random.Generator
) -> None:
    speakers = sorted({r["speaker"] for r in recordings})
    if test_speaker is not None and test_speaker not in speakers:
        raise ConfigError(f"test_speaker {test_speaker!r} is not an FSDD speaker; speakers: {speakers}")
    rest = []
    for r in recordings:
        held_out = r["speaker"] == test_speaker if test_speaker is not None else r["index"] < 5
        r["split"] = "test" if held_out else "train"
        if not held_out:
            rest.append(r)
    for i in rng.permutation(len(rest))[: round(val_fraction * len(rest))]:
        rest[i]["split"] = "val"


def _pca_remove(images: np.ndarray, fit_on: np.ndarray, energy: float) -> np.ndarray:
    """Remove the leading principal components holding ``energy`` of the variance (AV-MNIST)."""
    from sklearn.decomposition import PCA

    x = images.reshape(len(images), -1).astype(np.float64)
    pca = PCA().fit(fit_on.reshape(len(fit_on), -1).astype(np.float64))
    k = int(np.searchsorted(np.cumsum(pca.explained_variance_ratio_), energy) + 1)
    top = pca.components_[:k]  # (k, 784)
    centred = x - pca.mean_
    kept = centred - (centred @ top.T) @ top + pca.mean_
    return np.clip(np.round(kept), 0, 255).astype(np.uint8).reshape(images.shape)


def make_av_digits(
    out_dir: str | Path,
    fsdd_dir: str | Path,
    mnist_dir: str | Path,
    *,
    test_speaker: str | None = None,
    val_fraction: float = 0.1,
    max_per_digit: int | None = None,
    image_pca_energy: float = 0.0,
    audio_snr_db: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the audio-visual digits dataset; return its manifest (``OUT/manifest.csv``).

    Every FSDD recording (at most ``max_per_digit`` per digit and split) is paired with an MNIST
    image of the same digit, drawn without replacement from that split's own pool. Label = digit.
    ``image_pca_energy`` (AV-MNIST: 0.75) removes that fraction of PCA energy from the images
    (PCA fitted on the train images); ``audio_snr_db`` mixes white noise in at that SNR. The
    parameters are saved in ``OUT/dataset.json``.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= image_pca_energy < 1:
        raise ConfigError(f"image_pca_energy must be in [0, 1), got {image_pca_energy}")
    if max_per_digit is not None and max_per_digit < 1:
        raise ConfigError(f"max_per_digit must be >= 1, got {max_per_digit}")
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(seed)
    recordings = list_fsdd(fsdd_dir)
    images, labels = read_mnist(mnist_dir)
    _assign_splits(recordings, test_speaker, val_fraction, rng)
    by_cell: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in recordings:
        by_cell[r["split"], r["digit"]].append(r)
    chosen = []
    for (_split, _digit), cell in sorted(by_cell.items()):
        if max_per_digit is not None and len(cell) > max_per_digit:
            cell = [cell[i] for i in sorted(rng.choice(len(cell), max_per_digit, replace=False))]
        chosen.extend(cell)

    # Disjoint MNIST pools per split, sized like the split's share of recordings of that digit.
    splits = ("train", "val", "test")
    for digit in range(10):
        pool = rng.permutation(np.flatnonzero(labels == digit))
        wanted = {s: [r for r in chosen if r["digit"] == digit and r["split"] == s] for s in splits}
        total = sum(len(v) for v in wanted.values())
        if total > len(pool):
            raise ConfigError(
                f"{total} recordings of digit {digit} but only {len(pool)} MNIST images; lower max_per_digit"
            )
        start = 0
        for s in splits:
            for r, idx in zip(wanted[s], pool[start : start + len(wanted[s])], strict=True):
                r["mnist_index"] = int(idx)
            start += len(wanted[s])

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    picked = images[[r["mnist_index"] for r in chosen]]
    if image_pca_energy > 0:
        train_rows = [i for i, r in enumerate(chosen) if r["split"] == "train"]
        picked = _pca_remove(picked, picked[train_rows], image_pca_energy)
    rows = []
    for r, img in tqdm(list(zip(chosen, picked, strict=True)), desc="av-digits", disable=not progress):
        key = f"{r['digit']}_{r['speaker']}_{r['index']}"
        Image.fromarray(img, mode="L").save(out / "images" / f"{key}.png")
        wav = out / "audio" / f"{key}.wav"
        if audio_snr_db is None:
            shutil.copyfile(r["path"], wav)
        else:
            try:
                y, sr = soundfile.read(r["path"], dtype="float32")
            except RuntimeError as exc:
                raise MediaError(f"{r['path']}: cannot read audio: {exc}") from exc
            noise = rng.standard_normal(y.shape).astype(np.float32)
            scale = np.sqrt(np.mean(y**2) / (np.mean(noise**2) * 10 ** (audio_snr_db / 10)))
            mixed = y + scale * noise
            peak = np.abs(mixed).max()
            soundfile.write(wav, mixed / peak * 0.99 if peak > 0.99 else mixed, sr, subtype="PCM_16")
        rows.append(
            {
                "key": key,
                "label": r["digit"],
                "split": r["split"],
                "image": f"images/{key}.png",
                "audio": f"audio/{key}.wav",
                "speaker": r["speaker"],
                "recording": r["index"],
                "mnist_index": r["mnist_index"],
            }
        )
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    params = {
        "recipe": "av-digits",
        "fsdd": str(fsdd_dir),
        "mnist": str(mnist_dir),
        **{  # where download_fsdd / download_mnist fetched them from
            f"{name}_source": json.loads((Path(d) / "source.json").read_text())
            for name, d in (("fsdd", fsdd_dir), ("mnist", mnist_dir))
            if (Path(d) / "source.json").exists()
        },
        "test_speaker": test_speaker,
        "val_fraction": val_fraction,
        "max_per_digit": max_per_digit,
        "image_pca_energy": image_pca_energy,
        "audio_snr_db": audio_snr_db,
        "seed": seed,
        "samples": {s: sum(r["split"] == s for r in rows) for s in splits},
    }
    (out / "dataset.json").write_text(json.dumps(params, indent=2) + "\n")
    return manifest
