"""The av-digits recipe on the real FSDD and MNIST files (skipped when ../shared/data is absent), and
its downloads, from a local HTTP server serving small archives in the real layouts."""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.server
import io
import json
import re
import socket
import struct
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import soundfile
from PIL import Image

from features.errors import ConfigError
from pipelines import datasets
from pipelines.datasets import download_fsdd, download_mnist, make_av_digits, read_mnist
from pipelines.download import DownloadError
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


# -- downloads, against a local HTTP server on loopback serving archives in the real layouts


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (path -> bytes) with ``Range`` support; logs every request."""

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            start = int(re.match(r"bytes=(\d+)-$", self.headers["Range"])[1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = srv.cut.pop(self.path, None)  # send only this many bytes, then drop the connection
        self.wfile.write(data[start:cut])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    srv.files, srv.cut, srv.log = {}, {}, []
    srv.url = f"http://127.0.0.1:{srv.server_port}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _idx(images: np.ndarray, labels: np.ndarray) -> tuple[bytes, bytes]:
    # IDX: big-endian magic (2051 images, 2049 labels), counts, then the raw uint8 data
    n, rows, cols = images.shape
    image_file = struct.pack(">4I", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()
    label_file = struct.pack(">2I", 2049, n) + labels.astype(np.uint8).tobytes()
    return gzip.compress(image_file, mtime=0), gzip.compress(label_file, mtime=0)


def _sources(root):
    """Small FSDD and MNIST folders in their real layouts: digits 0-2, 2 speakers, 3 takes each."""
    rng = np.random.default_rng(0)
    rec = root / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for digit in range(3):
        for speaker in ("alice", "bob"):
            for index in (0, 5, 6):
                t = np.arange(800) / 8000
                tone = 0.3 * np.sin(2 * np.pi * (200 + 100 * digit) * t) + 0.01 * rng.standard_normal(800)
                soundfile.write(rec / f"{digit}_{speaker}_{index}.wav", tone, 8000, subtype="PCM_16")
    mnist = root / "mnist-t10k"
    mnist.mkdir()
    images, labels = _idx(rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 3)
    (mnist / "t10k-images-idx3-ubyte.gz").write_bytes(images)
    (mnist / "t10k-labels-idx1-ubyte.gz").write_bytes(labels)
    return root / "fsdd", mnist


def _fsdd_archive(fsdd, kind: str) -> bytes:
    """The recordings as GitHub's release archive lays them out, with the repository's other files."""
    top = "free-spoken-digit-dataset-1.0.10"
    members = {f"{top}/README.md": b"# FSDD\n", f"{top}/utils/spectogramer.py": b"pass\n"}
    members |= {f"{top}/recordings/{p.name}": p.read_bytes() for p in sorted(fsdd.glob("recordings/*.wav"))}
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _serve(server, fsdd, mnist, kind="tar.gz"):
    fsdd_path = f"/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.{kind}"
    server.files[fsdd_path] = _fsdd_archive(fsdd, kind)
    for p in mnist.glob("*.gz"):
        server.files[f"/mnist/{p.name}"] = p.read_bytes()
    checks = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in mnist.glob("*.gz")}
    return server.url + fsdd_path, server.url + "/mnist/", checks


def _same_dataset(a, b):
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    for row in _rows(a / "manifest.csv"):
        for col in ("image", "audio"):
            assert (a / row[col]).read_bytes() == (b / row[col]).read_bytes(), row[col]
    params_a, params_b = (json.loads((d / "dataset.json").read_text()) for d in (a, b))
    where = {"fsdd", "mnist", "fsdd_source", "mnist_source"}
    assert {k: v for k, v in params_a.items() if k not in where} == {
        k: v for k, v in params_b.items() if k not in where
    }


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_downloaded_sources_build_the_same_dataset_as_local_folders(tmp_path, server, kind):
    fsdd, mnist = _sources(tmp_path / "src")
    fsdd_url, mnist_url, checks = _serve(server, fsdd, mnist, kind)
    cache = tmp_path / "cache"
    got_fsdd = download_fsdd(cache, fsdd_url, progress=False)
    got_mnist = download_mnist(cache, mnist_url, sha256=checks, progress=False)

    kw = dict(val_fraction=0.25, image_pca_energy=0.5, audio_snr_db=10.0, progress=False)
    make_av_digits(tmp_path / "local", fsdd, mnist, **kw)
    make_av_digits(tmp_path / "downloaded", got_fsdd, got_mnist, **kw)
    _same_dataset(tmp_path / "local", tmp_path / "downloaded")
    assert sorted(p.name for p in (got_fsdd / "recordings").iterdir()) == sorted(
        p.name for p in (fsdd / "recordings").iterdir()
    )  # only the recordings, flat; no archive or .part left
    assert sorted(p.name for p in got_fsdd.iterdir()) == ["recordings", "source.json"]

    # What was fetched is recorded (size and sha256 computed here from the served bytes) ...
    archive = server.files[fsdd_url.removeprefix(server.url)]
    source = json.loads((got_fsdd / "source.json").read_text())
    assert source == {
        "url": fsdd_url,
        "bytes": len(archive),
        "sha256": hashlib.sha256(archive).hexdigest(),
        "recordings": 18,
    }
    params = json.loads((tmp_path / "downloaded" / "dataset.json").read_text())
    assert params["fsdd_source"] == source
    assert (
        params["mnist_source"]["files"]["t10k-labels-idx1-ubyte.gz"]["sha256"]
        == checks["t10k-labels-idx1-ubyte.gz"]
    )
    # ... and a second call reuses the cache without a request.
    requests = len(server.log)
    download_fsdd(cache, fsdd_url, progress=False)
    download_mnist(cache, mnist_url, sha256=checks, progress=False)
    assert len(server.log) == requests


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, server):
    fsdd, mnist = _sources(tmp_path / "src")
    fsdd_url, _, _ = _serve(server, fsdd, mnist)
    path = fsdd_url.removeprefix(server.url)
    half = len(server.files[path]) // 2
    server.cut[path] = half
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=rf"{re.escape(fsdd_url)}: .*run again to resume"):
        download_fsdd(cache, fsdd_url, progress=False)
    assert not (cache / "fsdd" / "recordings").exists()  # nothing half-made where the recipe looks
    assert [p.stat().st_size for p in (cache / "fsdd").glob("*.part")] == [half]
    got = download_fsdd(cache, fsdd_url, progress=False)
    assert server.log[-1] == (path, f"bytes={half}-")  # the second request asked for the rest only
    assert (
        json.loads((got / "source.json").read_text())["sha256"]
        == hashlib.sha256(server.files[path]).hexdigest()
    )
    assert len(list((got / "recordings").glob("*.wav"))) == 18


def test_download_errors_name_the_url(tmp_path, server):
    fsdd, mnist = _sources(tmp_path / "src")
    fsdd_url, mnist_url, checks = _serve(server, fsdd, mnist)
    missing = server.url + "/nothing/here.tar.gz"
    with pytest.raises(DownloadError, match=rf"{re.escape(missing)}: HTTP 404"):
        download_fsdd(tmp_path / "c1", missing, progress=False)
    wrong = {**checks, "t10k-images-idx3-ubyte.gz": "0" * 64}
    with pytest.raises(
        DownloadError,
        match=rf"{re.escape(mnist_url)}t10k-images-idx3-ubyte.gz: sha256 [0-9a-f]{{64}} does not",
    ):
        download_mnist(tmp_path / "c2", mnist_url, sha256=wrong, progress=False)
    assert not list((tmp_path / "c2" / "mnist-t10k").glob("t10k-images*"))  # the bad file is gone
    # the real MNIST checksums apply to any mirror: these test files are not MNIST
    with pytest.raises(DownloadError, match="does not match the expected 8d422c7b"):
        download_mnist(tmp_path / "c3", mnist_url, progress=False)
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1.0.10.tar.gz"
    with pytest.raises(DownloadError, match=rf"{re.escape(closed)}: cannot download"):
        download_fsdd(tmp_path / "c4", closed, progress=False)
    not_fsdd = server.url + "/mnist/t10k-labels-idx1-ubyte.gz"  # a gzip file, not an archive
    with pytest.raises(ConfigError, match=rf"{re.escape(not_fsdd)}: cannot unpack .*neither a tar nor a zip"):
        download_fsdd(tmp_path / "c5", not_fsdd, progress=False)
    assert list((tmp_path / "c5" / "fsdd").iterdir()) == []  # the broken download is not kept


def test_av_digits_download_from_the_command_line(tmp_path, server, monkeypatch, capsys):
    from modalstore import main

    fsdd, mnist = _sources(tmp_path / "src")
    fsdd_url, mnist_url, checks = _serve(server, fsdd, mnist)
    monkeypatch.setattr(datasets, "MNIST_SHA256", checks)  # the test files stand in for MNIST
    monkeypatch.setenv("MODALSTORE_MNIST_URL", mnist_url)  # the environment names one source ...
    cache = tmp_path / "cache"
    args = ["datasets", "av-digits", str(tmp_path / "out"), "--download", "--cache", str(cache)]
    assert main([*args, "--fsdd-url", fsdd_url, "--quiet"]) == 0  # ... a flag the other
    assert "manifest.csv" in capsys.readouterr().out
    assert {r[0] for r in server.log} == {fsdd_url.removeprefix(server.url)} | {
        f"/mnist/{name}" for name in checks
    }
    make_av_digits(tmp_path / "local", fsdd, mnist, progress=False)
    _same_dataset(tmp_path / "local", tmp_path / "out")

    assert main([*args, "--fsdd", str(fsdd)]) == 2
    assert "drop --fsdd/--mnist" in capsys.readouterr().err
    assert (
        main([*args[:3], "--download", "--cache", str(tmp_path / "c2"), "--fsdd-url", server.url + "/x"]) == 2
    )
    assert f"{server.url}/x: HTTP 404" in capsys.readouterr().err
