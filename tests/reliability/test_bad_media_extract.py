"""Bad media through the real extract path: one broken file among good ones.

Every broken sample becomes one row of ``catalog/errors.parquet`` whose message names the
file and the reason; every other sample's arrays are byte-identical to a run over the good
samples alone (the broken neighbours change nothing).
"""

from __future__ import annotations

import csv
import io
import os
import re
import socket
import struct
import threading
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
from media_factories import make_audio, make_image, make_shifted_frames, write_mp4, write_png, write_wav
from store_fixtures import write_extract_config

import pipelines.media as media_mod
from features.errors import MediaError
from pipelines.extract import load_extract_config, run_extract
from pipelines.store import open_store

GROUPS = {
    "image": {"extractor": "lbp", "params": {"radii": [1, 2], "size": 32}},
    "audio": {"extractor": "mfcc", "params": {"n_mfcc": 13}},
    "video": {"extractor": "flow", "params": {"size": 32, "max_frames": 6}},
    "text": {"extractor": "bow", "params": {"max_features": 50}},
}
COLUMNS = ["key", "label", "split", "image", "audio", "video", "text"]
TEXTS = ["a dog runs in the park", "spectrograms show energy", "the cat sleeps", "rain on the roof"]


def _truncate(path, keep=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _png_bomb(path):
    """A valid small PNG whose header claims 100000 x 100000 pixels (30 GB as RGB)."""
    raw = bytearray(write_png(path, make_image(8, 8)).read_bytes())
    raw[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))
    return path


def _mp4_without_frames(path):
    """An MP4 whose video packets are all zero bytes: the container opens, nothing decodes."""
    raw = bytearray(write_mp4(path, make_shifted_frames(frames=4, size=32)).read_bytes())
    at = raw.find(b"mdat")
    size = struct.unpack(">I", raw[at - 4 : at])[0]
    raw[at + 4 : at - 4 + size] = bytes(size - 8)
    path.write_bytes(bytes(raw))
    return path


def _float_wav(path, value):
    y = make_audio(0.3)
    y[100:110] = value
    soundfile.write(path, y, 16000, subtype="FLOAT")
    return path


def _good_row(d, i):
    return {
        "key": f"good{i}",
        "label": i % 2,
        "split": "train" if i < 4 else "val",
        "image": write_png(d / f"g{i}.png", make_image(32, 32, seed=i)).name,
        "audio": write_wav(d / f"g{i}.wav", make_audio(0.3, seed=i), 16000).name,
        "video": write_mp4(d / f"g{i}.mp4", make_shifted_frames(frames=4, size=32, seed=i)).name,
        "text": TEXTS[i % len(TEXTS)],
    }


def _bad_rows(d):
    """(row, regex its error message must match); each row holds only its broken modality."""
    for name in ("zero.png", "zero.wav"):
        (d / name).write_bytes(b"")
    for name in ("fake.png", "fake.wav", "fake.mp4"):
        (d / name).write_text("this is not media\n")
    rows = {
        "zero_png": ("image", "zero.png", r"zero\.png: file is empty \(0 bytes\)"),
        "zero_wav": ("audio", "zero.wav", r"zero\.wav: file is empty \(0 bytes\)"),
        "trunc_png": (
            "image",
            _truncate(write_png(d / "t.png", make_image(64, 64))).name,
            r"t\.png: cannot decode image.*truncated",
        ),
        "trunc_wav": (
            "audio",
            _truncate(write_wav(d / "t.wav", make_audio(0.5), 16000)).name,
            r"t\.wav: truncated WAV: its data chunk declares 16,000 bytes",
        ),
        "trunc_mp4": (
            "video",
            _truncate(write_mp4(d / "t.mp4", make_shifted_frames(frames=6, size=32))).name,
            r"t\.mp4: cannot decode video",
        ),
        "text_as_png": ("image", "fake.png", r"fake\.png: cannot decode image"),
        "text_as_wav": ("audio", "fake.wav", r"fake\.wav: cannot decode audio"),
        "text_as_mp4": ("video", "fake.mp4", r"fake\.mp4: cannot decode video"),
        "bomb_png": ("image", _png_bomb(d / "bomb.png").name, r"bomb\.png: .*decompression bomb"),
        "no_frames": ("video", _mp4_without_frames(d / "nf.mp4").name, r"nf\.mp4: cannot decode video"),
        "nan_wav": ("audio", _float_wav(d / "nan.wav", np.nan).name, r"nan\.wav: audio contains NaN or Inf"),
        "inf_wav": ("audio", _float_wav(d / "inf.wav", np.inf).name, r"inf\.wav: audio contains NaN or Inf"),
        "missing_wav": ("audio", "gone.wav", r"gone\.wav: file not found"),
        "bad_utf8": ("text", b"caf\xe9 au lait", r"not valid UTF-8 \(byte 0xe9 at character 3\)"),
    }
    return {
        key: ({"key": key, "label": 0, "split": "val", modality: value}, match)
        for key, (modality, value, match) in rows.items()
    }


def _write_manifest(path, rows):
    """CSV written as bytes, so a text cell can hold bytes that are not UTF-8."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    raw = out.getvalue().encode()
    for row in rows:
        cells = []
        for c in COLUMNS:
            v = row.get(c, "")
            cells.append(v if isinstance(v, bytes) else str(v).encode())
        raw += b",".join(cells) + b"\n"
    path.write_bytes(raw)
    return path


def _arrays_by_key(store_path):
    """{(group, key): {member suffix: bytes}} for every present sample, read with plain tarfile."""
    import tarfile

    store = open_store(store_path)
    out = {}
    for row in store.table("shards").to_pylist():
        with tarfile.open(store.shard_path(row["group"], row["shard"])) as tar:
            for m in tar.getmembers():
                key, _, suffix = m.name.partition(".")
                out.setdefault((row["group"], key), {})[suffix] = tar.extractfile(m).read()
    return out


def _extract(tmp_path, name, rows, **kw):
    d = tmp_path / "data"
    manifest = _write_manifest(d / f"{name}.csv", rows)
    cfg = write_extract_config(
        tmp_path / f"{name}.yaml",
        manifest,
        tmp_path / name,
        GROUPS,
        samples_per_shard=8,
        missing_media="record",
    )
    return run_extract(load_extract_config(cfg), progress=False, **kw), tmp_path / name


@pytest.mark.slow
def test_every_bad_media_kind_is_one_error_row_and_the_rest_is_unchanged(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    good = [_good_row(d, i) for i in range(6)]
    bad = _bad_rows(d)
    mixed = [good[0], good[1], good[2], good[3]] + [row for row, _ in bad.values()] + [good[4], good[5]]
    summary, store_path = _extract(tmp_path, "mixed", mixed)
    assert summary.errors == len(bad)

    store = open_store(store_path)
    errors = {r["key"]: r for r in store.table("errors").to_pylist()}
    assert set(errors) == set(bad), "one error row per broken sample, none for the good ones"
    for key, (_, match) in bad.items():
        assert errors[key]["stage"] == "decode", errors[key]
        assert errors[key]["error_type"] == "MediaError"
        assert re.search(match, errors[key]["message"]), (key, errors[key]["message"])
    samples = {r["key"]: r for r in store.table("samples").to_pylist()}
    assert set(samples) == {r["key"] for r in mixed}, "no sample is dropped from the catalog"
    for key in bad:
        assert not any(samples[key][f"has_{g}"] for g in GROUPS)
    for row in good:
        assert all(samples[row["key"]][f"has_{g}"] for g in GROUPS)

    # The good samples' arrays equal those of a run that never saw a broken file.
    _, clean_path = _extract(tmp_path, "clean", good)
    assert open_store(clean_path).table("errors").num_rows == 0
    mixed_arrays, clean_arrays = _arrays_by_key(store_path), _arrays_by_key(clean_path)
    for row in good:
        for g in GROUPS:
            want = clean_arrays[(g, row["key"])]
            assert mixed_arrays[(g, row["key"])] == want, (g, row["key"])
            assert any(s.endswith("npy") for s in want)
    # NaN/Inf never reach the store: every stored float array is finite.
    for (g, _), members in mixed_arrays.items():
        for suffix, data in members.items():
            if suffix.endswith("npy"):
                arr = np.load(io.BytesIO(data), allow_pickle=False)
                assert arr.dtype.kind != "f" or np.isfinite(arr).all(), (g, suffix)


def test_silent_audio_is_valid_and_every_audio_extractor_gives_finite_features():
    """The documented rule: silence is audio, not an error; features stay finite (dB floors)."""
    from features import create_extractor, list_extractors

    checked = 0
    for name in list_extractors():
        ex = create_extractor(name)
        if ex.modality != "audio":
            continue
        ex.setup()
        for y in (np.zeros(4000, np.float32), np.full(4000, 1e-30, np.float32)):
            out = ex.extract(y)
            for field, arr in out.items():
                assert np.isfinite(arr).all(), (name, field)
        checked += 1
    assert checked >= 4


def test_silent_audio_is_extracted_not_an_error(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_wav(d / "silent.wav", np.zeros(4800, np.float32), 16000)
    write_wav(d / "tone.wav", make_audio(0.3), 16000)
    (d / "m.csv").write_text("key,label,split,audio\nsilent,0,train,silent.wav\ntone,1,train,tone.wav\n")
    cfg = write_extract_config(tmp_path / "c.yaml", d / "m.csv", tmp_path / "s", {"audio": GROUPS["audio"]})
    assert run_extract(load_extract_config(cfg), progress=False).errors == 0
    rows = open_store(tmp_path / "s").table("samples").to_pylist()
    assert all(r["has_audio"] for r in rows)


def test_nan_audio_is_refused_not_sanitised(tmp_path):
    with pytest.raises(MediaError, match=r"nan\.wav: audio contains NaN or Inf samples"):
        media_mod.load_audio(_float_wav(tmp_path / "nan.wav", np.nan), 16000)


def test_unreadable_file_is_one_error_row(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    write_wav(d / "ok.wav", make_audio(0.3), 16000)
    locked = write_wav(d / "locked.wav", make_audio(0.3, seed=1), 16000)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads every file whatever its mode (CI runs as root): deny it here
        real = os.access
        monkeypatch.setattr(
            media_mod.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode)
        )
    (d / "m.csv").write_text("key,label,split,audio\nok,0,train,ok.wav\nlocked,1,train,locked.wav\n")
    cfg = write_extract_config(
        tmp_path / "c.yaml", d / "m.csv", tmp_path / "s", {"audio": GROUPS["audio"]}, missing_media="record"
    )
    try:
        assert run_extract(load_extract_config(cfg), progress=False).errors == 1
    finally:
        locked.chmod(0o644)
    errors = pq.read_table(tmp_path / "s" / "catalog" / "errors.parquet").to_pylist()
    assert [(e["key"], "permission denied" in e["message"]) for e in errors] == [("locked", True)]


# ---- remote sources that never answer ----------------------------------------------------


class _HangingFS:
    """An fsspec filesystem whose files never deliver a byte (a server that accepts, then stalls)."""

    release = threading.Event()

    @classmethod
    def install(cls):
        import fsspec
        from fsspec.spec import AbstractFileSystem

        class Hang(AbstractFileSystem):
            protocol = "modalstore-hang"

            def _open(self, path, mode="rb", **kwargs):
                cls.release.wait(30)  # released by the test's teardown
                raise OSError("released")

        fsspec.register_implementation("modalstore-hang", Hang, clobber=True)


@pytest.fixture
def hanging_fs():
    _HangingFS.release.clear()
    _HangingFS.install()
    yield "modalstore-hang://server/never.wav"
    _HangingFS.release.set()


def test_remote_read_that_never_answers_times_out_as_one_error_row(tmp_path, hanging_fs):
    d = tmp_path / "data"
    d.mkdir()
    write_wav(d / "ok.wav", make_audio(0.3), 16000)
    (d / "m.csv").write_text(f"key,label,split,audio\nok,0,train,ok.wav\nstuck,1,train,{hanging_fs}\n")
    cfg = write_extract_config(tmp_path / "c.yaml", d / "m.csv", tmp_path / "s", {"audio": GROUPS["audio"]})
    summary = run_extract(load_extract_config(cfg, ["remote_timeout=0.3"]), progress=False)
    assert summary.errors == 1
    (error,) = pq.read_table(tmp_path / "s" / "catalog" / "errors.parquet").to_pylist()
    assert error["key"] == "stuck"
    assert f"{hanging_fs}: timed out after 0.3 s" in error["message"]


@pytest.fixture
def silent_server():
    """A loopback TCP server that accepts connections (kernel backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/a.wav"
    sock.close()


def test_http_url_to_a_silent_server_times_out(silent_server):
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    with pytest.raises(MediaError, match=r"127\.0\.0\.1:\d+/a\.wav: timed out after 0\.5 s"):
        media_mod.decode("audio", silent_server, {"sample_rate": 16000}, timeout=0.5)
