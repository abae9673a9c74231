"""Property-based fuzzing of what modalstore reads from users and from elsewhere.

The manifest parser, the config loader and the shard reader get random and mutated inputs;
every input must end in a result or a project exception (``ModalstoreError``), never another
exception or a hang (each example runs under a 10 s alarm).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.errors import ModalstoreError
from fusion.loader import iter_joined
from fusion.shard_reader import ShardMembers
from pipelines.extract import load_extract_config
from pipelines.manifest import read_manifest
from pipelines.shards import ShardWriter

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)),  # FUZZ_EXAMPLES=800 for a deeper search
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
    # the same examples on every run (CI stays deterministic); FUZZ_RANDOM=1 searches afresh
    derandomize=not os.environ.get("FUZZ_RANDOM"),
)


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    def alarm(*_):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn, *args, **kwargs):
    """``fn``'s result, or the ModalstoreError it raised; any other exception fails the test."""
    with no_hang(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kwargs)
        except ModalstoreError as exc:
            assert str(exc), "a project error must say what went wrong"
            return exc


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (op, position, byte) edits: 0 flips a byte, 1 inserts one, 2 deletes one, 3 truncates."""
    buf = bytearray(data)
    for op, pos, byte in edits:
        if not buf:
            break
        i = pos % len(buf)
        if op == 0:
            buf[i] ^= byte or 1
        elif op == 1:
            buf.insert(i, byte)
        elif op == 2:
            del buf[i]
        else:
            del buf[i:]
    return bytes(buf)


EDITS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=6
)


# ---- manifests ---------------------------------------------------------------------------

VALID_CSV = (
    b"key,label,split,image,audio,text\n"
    b"a1,cat,train,img/a1.png,,a cat\n"
    b'a2,dog,val,,aud/a2.wav,"a dog, barking"\n'
    b"a3,cat,test,s3://bucket/a3.png,aud/a3.wav,caf\xc3\xa9\n"
)
VALID_JSONL = b"".join(
    json.dumps(r).encode() + b"\n"
    for r in [
        {"key": "a1", "label": 0, "split": "train", "image": "a.png", "text": "x"},
        {"key": "a2", "label": 1, "split": "val", "audio": "b.wav"},
    ]
)


def _parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(
        pa.table({"key": ["a", "b"], "label": [0, 1], "split": ["train", "test"], "text": ["x", None]}), buf
    )
    return buf.getvalue()


def _read_manifest_bytes(data: bytes, suffix: str, check_files: bool = False):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"manifest{suffix}"
        path.write_bytes(data)
        result = outcome(read_manifest, path, check_files=check_files)
    if not isinstance(result, Exception):
        assert len(result) >= 1 and all(s.split in ("train", "val", "test") for s in result.samples)
        assert len({s.key for s in result.samples}) == len(result)
    return result


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".jsonl", ".parquet", ".txt"]))
def test_manifest_random_bytes(data, suffix):
    _read_manifest_bytes(data, suffix)


@FUZZ
@given(
    base=st.sampled_from([(VALID_CSV, ".csv"), (VALID_JSONL, ".jsonl"), (None, ".parquet")]),
    edits=EDITS,
    check=st.booleans(),
)
def test_manifest_mutated(base, edits, check):
    data, suffix = base
    _read_manifest_bytes(mutate(data if data is not None else _parquet_bytes(), edits), suffix, check)


CELL = st.one_of(
    st.text(max_size=12), st.integers(-3, 3), st.sampled_from(["train", "val", "test", "", "a.png"])
)


@FUZZ
@given(
    columns=st.lists(
        st.sampled_from(["key", "label", "split", "image", "audio", "video", "text", "extra", "key"]),
        min_size=1,
        max_size=7,
    ),
    rows=st.lists(st.lists(CELL, min_size=7, max_size=7), max_size=5),
    as_jsonl=st.booleans(),
)
def test_manifest_structured(columns, rows, as_jsonl):
    if as_jsonl:
        data = b"".join(json.dumps(dict(zip(columns, r, strict=False))).encode() + b"\n" for r in rows)
    else:
        import csv

        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows([r[: len(columns)] for r in rows])
        data = out.getvalue().encode("utf-8", "surrogateescape")
    _read_manifest_bytes(data, ".jsonl" if as_jsonl else ".csv")


# ---- configs -----------------------------------------------------------------------------

VALID_YAML = yaml.safe_dump(
    {
        "manifest": "data/manifest.csv",
        "store": "stores/x",
        "samples_per_shard": 8,
        "missing_media": "record",
        "max_errors": 0.1,
        "groups": {"audio": {"extractor": "mfcc", "params": {"n_mfcc": 20}}, "image": {"extractor": "lbp"}},
    }
).encode()

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**400), 10**400),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.sampled_from(["mfcc", "lbp", "record", "error", "audio"]),
)
YAML_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    ["manifest", "store", "groups", "extractor", "params", "max_errors", "samples_per_shard"]
                ),
                st.text(max_size=6),
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


def _load_config_bytes(data: bytes, overrides=None):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "extract.yaml"
        path.write_bytes(data)
        return outcome(load_extract_config, path, overrides)


@FUZZ
@given(data=st.binary(max_size=300))
def test_config_random_bytes(data):
    _load_config_bytes(data)


@FUZZ
@given(edits=EDITS)
def test_config_mutated(edits):
    _load_config_bytes(mutate(VALID_YAML, edits))


@FUZZ
@given(tree=YAML_VALUES, overrides=st.lists(st.text(max_size=20), max_size=3))
def test_config_structured_and_overrides(tree, overrides):
    _load_config_bytes(yaml.safe_dump(tree).encode(), overrides)
    _load_config_bytes(VALID_YAML, overrides)


# ---- shards ------------------------------------------------------------------------------


def _members(writer, size: int) -> ShardMembers:
    """The member index a shard's writer recorded, as the loader's reader takes it."""
    m = writer.members
    return ShardMembers(
        np.array([r.name.encode() for r in m]),
        np.array([r.offset for r in m], np.int64),
        np.array([r.size for r in m], np.int64),
        size,
    )


def _valid_shard() -> tuple[bytes, ShardMembers]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train-000000.tar"
        with ShardWriter(path) as w:
            for i in range(3):
                meta = {"key": f"k{i}", "label": i, "split": "train", "present": True}
                w.add_sample(
                    f"k{i}", meta, {"seq": np.full((i + 1, 4), i, np.float32), "vec": np.arange(3.0)}
                )
            w.close()
        data = path.read_bytes()
    return data, _members(w, len(data))


SHARD, SHARD_MEMBERS = _valid_shard()


def _read_shard_bytes(data: bytes, indexed: bool):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train-000000.tar"
        path.write_bytes(data)
        members = {"g": SHARD_MEMBERS} if indexed else None
        result = outcome(lambda: list(iter_joined("train-000000", {"g": path}, members)))
    if not isinstance(result, Exception):
        for sample in result:
            assert isinstance(sample["key"], str) and isinstance(sample["label"], int)
            assert all(isinstance(v, np.ndarray) and v.dtype != object for v in sample["fields"].values())
    return result


def test_unmutated_shard_reads_back():
    samples = _read_shard_bytes(SHARD, indexed=True)
    assert [s["key"] for s in samples] == ["k0", "k1", "k2"]
    assert [s["key"] for s in _read_shard_bytes(SHARD, indexed=False)] == ["k0", "k1", "k2"]


@FUZZ
@given(edits=EDITS, indexed=st.booleans())
def test_shard_reader_mutated(edits, indexed):
    _read_shard_bytes(mutate(SHARD, edits), indexed)


@FUZZ
@given(data=st.binary(max_size=3000), indexed=st.booleans())
def test_shard_reader_random_bytes(data, indexed):
    _read_shard_bytes(data, indexed)


@FUZZ
@given(
    # Payload edits only: the tar stays well-formed, so the .npy and .json decoders are what is fuzzed.
    member=st.integers(0, len(SHARD_MEMBERS.offsets) - 1),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8),
    indexed=st.booleans(),
)
def test_shard_reader_mutated_payloads(member, edits, indexed):
    raw = bytearray(SHARD)
    off, size = int(SHARD_MEMBERS.offsets[member]), int(SHARD_MEMBERS.sizes[member])
    for pos, byte in edits:
        raw[off + pos % size] = byte
    _read_shard_bytes(bytes(raw), indexed)


@pytest.mark.parametrize("indexed", [True, False])
def test_npy_header_claiming_a_huge_shape_is_refused_without_allocating(indexed):
    """A small .npy whose header claims 2**40 float64 values (8 TiB) is a format error, not a
    MemoryError (or an 8 TiB allocation): the payload size contradicts the header."""
    raw = bytearray(SHARD)
    member = next(i for i, n in enumerate(SHARD_MEMBERS.names) if n.endswith(b".vec.npy"))
    off = int(SHARD_MEMBERS.offsets[member])
    old = b"'shape': (3,), }"
    new = b"'shape': (1099511627776,), }"
    at = raw.index(old, off)
    pad = len(new) - len(old)
    assert raw[at + len(old) : at + len(old) + pad] == b" " * pad  # header padding absorbs the change
    raw[at : at + len(old) + pad] = new
    result = _read_shard_bytes(bytes(raw), indexed)
    assert isinstance(result, ModalstoreError), result


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["key", "label", "present", "split", "x"]), inner, max_size=5),
    ),
    max_leaves=10,
)


def _shard_with(json_payload: bytes, npy_payload: bytes) -> tuple[bytes, ShardMembers]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train-000000.tar"
        with ShardWriter(path) as w:
            w.add("k0.json", json_payload)
            w.add("k0.seq.npy", npy_payload)
            w.close()
        data = path.read_bytes()
    return data, _members(w, len(data))


NPY_HEADERS = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda descr, fortran, shape: repr({"descr": descr, "fortran_order": fortran, "shape": shape}),
        st.one_of(
            st.sampled_from(["<f4", "|O", "<i8", "|V8", "<U3", "x"]), st.integers(), st.text(max_size=4)
        ),
        st.one_of(st.booleans(), st.integers()),
        st.one_of(st.tuples(), st.lists(st.integers(-2, 10**12), max_size=3).map(tuple), st.text(max_size=3)),
    ),
)


@FUZZ
@given(meta=JSON_VALUES, header=NPY_HEADERS, body=st.binary(max_size=64), indexed=st.booleans())
def test_shard_reader_hostile_json_and_npy_headers(meta, header, body, indexed):
    """Well-formed tars whose members hold any JSON value and any .npy header text."""
    head = header.encode("utf-8", "surrogateescape")
    npy = b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + body
    data, members = _shard_with(json.dumps(meta).encode(), npy)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train-000000.tar"
        path.write_bytes(data)
        outcome(lambda: list(iter_joined("train-000000", {"g": path}, {"g": members} if indexed else None)))


@pytest.fixture
def store_for_verify(tiny_store, tmp_path):
    import shutil

    from pipelines.store import open_store

    return open_store(shutil.copytree(tiny_store, tmp_path / "store"))


@pytest.mark.slow
@settings(FUZZ, max_examples=20)
@given(edits=EDITS)
def test_verify_reports_any_mutated_shard_without_raising(store_for_verify, edits):
    """``verify`` turns whatever a shard holds into problems in its report, never an exception."""
    from pipelines.verify import verify_store

    store = store_for_verify
    shard = store.shards("val")[0]
    path = store.shard_path("audio", shard)
    original = path.read_bytes()
    mutated = mutate(original, edits)
    path.write_bytes(mutated)
    try:
        with no_hang():
            report = verify_store(store.root, progress=False)
    finally:
        path.write_bytes(original)
    assert report.ok == (mutated == original), report.problems
    assert all(p.shard == shard for p in report.problems)


TRAIN_KEYS = [
    "store",
    "groups",
    "models",
    "epochs",
    "lr",
    "optimizer",
    "class_weights",
    "model_params",
    "seeds",
]
TRAIN_VALUES = st.recursive(
    st.one_of(SCALARS, st.sampled_from(["late_fusion", "unimodal", "adam", "cosine", "val_acc"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["late_fusion", "combine", "x"]), inner, max_size=3),
    ),
    max_leaves=8,
)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(TRAIN_KEYS), TRAIN_VALUES, max_size=7))
def test_train_config_structured(tree):
    from fusion.train import load_train_config

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.yaml"
        path.write_text(yaml.safe_dump(tree))
        outcome(load_train_config, path)
