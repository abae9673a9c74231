"""Shards from elsewhere: nothing in them is executed, linked, written outside or read unbounded.

Each hostile member is put into one group's shard of a copy of the tiny store, with the
catalog rewritten to match it (what an attacker shipping a whole store would do), and read
four ways: the loader's indexed path, its tar-iteration path (``fast=False``), ``verify``
and, where the member belongs to a sample, ``modalstore get``.
"""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
import warnings

import numpy as np
import pytest
from shard_surgery import Member, read_members, rewrite

import pipelines.shards as shards_mod
from features.errors import ModalstoreError, ShardFormatError
from fusion.loader import StreamingLoader
from fusion.shard_reader import CatalogMismatchWarning
from pipelines.lookup import get_sample
from pipelines.store import open_store
from pipelines.verify import verify_store

GROUP = "audio"


class _Boom:
    def __reduce__(self):  # unpickling this would run a command: it must never happen
        return (exec, ("raise SystemExit('unpickled!')",))


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([_Boom()], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _hostile(key: str) -> dict[str, tuple[list[Member], str, str]]:
    """name -> (members to insert after the first sample, loader error regex, verify problem kind)."""
    pkl = pickle.dumps(_Boom())
    return {
        "pkl": (
            [Member(f"{key}.extra.pkl", pkl)],
            r"extension 'extra\.pkl' is not allowed",
            "disallowed_member",
        ),
        "pickle": (
            [Member(f"{key}.x.pickle", pkl)],
            r"extension 'x\.pickle' is not allowed",
            "disallowed_member",
        ),
        "pyd": (
            [Member(f"{key}.mod.pyd", b"MZ\x90\0")],
            r"extension 'mod\.pyd' is not allowed",
            "disallowed_member",
        ),
        "object_npy": ([Member(f"{key}.evil.npy", _object_npy())], r"pickle refused", "pickle_member"),
        "absolute": ([Member("/tmp/modalstore-evil.npy", b"x")], r"absolute path", "unsafe_member"),
        "dotdot": ([Member("../../evil.npy", b"x")], r"'\.\.' path component", "unsafe_member"),
        "symlink": (
            [Member(f"{key}.link.npy", type=tarfile.SYMTYPE, linkname="/etc/passwd")],
            r"symbolic link",
            "unsafe_member",
        ),
        "hardlink": (
            [Member(f"{key}.hard.npy", type=tarfile.LNKTYPE, linkname=f"{key}.json")],
            r"hard link",
            "unsafe_member",
        ),
    }


@pytest.fixture
def store(tiny_store, tmp_path):
    return open_store(shutil.copytree(tiny_store, tmp_path / "store"))


def _plant(store, extra: list[Member]):
    shard = store.shards("test")[0]
    members = read_members(store.shard_path(GROUP, shard))
    key = members[0].name.split(".")[0]
    n_first = sum(1 for m in members if m.name.split(".")[0] == key)
    rewrite(store, GROUP, shard, [*members[:n_first], *extra, *members[n_first:]])
    return shard, key


def _read_all(store, fast: bool):
    loader = StreamingLoader(store.root, "test", groups=[GROUP], batch_size=64, fast=fast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogMismatchWarning)  # a fallback to tar iteration is fine
        return list(loader)


KINDS = list(_hostile("k"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fast", [True, False], ids=["indexed", "tar"])
def test_loader_refuses_hostile_member(store, kind, fast):
    shard = store.shards("test")[0]
    key = read_members(store.shard_path(GROUP, shard))[0].name.split(".")[0]
    extra, match, _ = _hostile(key)[kind]
    _plant(store, extra)
    with pytest.raises(ShardFormatError, match=match) as info:
        _read_all(store, fast)
    assert shard in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_reports_hostile_member(store, kind):
    shard = store.shards("test")[0]
    key = read_members(store.shard_path(GROUP, shard))[0].name.split(".")[0]
    extra, _, problem = _hostile(key)[kind]
    _plant(store, extra)
    report = verify_store(store.root, progress=False)
    found = [p for p in report.problems if p.kind == problem]
    assert found and found[0].group == GROUP and found[0].shard == shard, report.problems
    assert extra[0].name in found[0].detail


@pytest.mark.parametrize("kind", ["pkl", "pickle", "pyd", "object_npy"])
def test_get_refuses_hostile_member_of_a_sample(store, kind):
    shard = store.shards("test")[0]
    key = read_members(store.shard_path(GROUP, shard))[0].name.split(".")[0]
    extra, match, _ = _hostile(key)[kind]
    _plant(store, extra)
    with pytest.raises(ShardFormatError, match=match):
        get_sample(store.root, key, groups=[GROUP])


def _link_in_place_of_a_member(store, kind):
    """A link listed in the catalog under a sample's member name (``key.<field>.npy``)."""
    shard = store.shards("test")[0]
    members = read_members(store.shard_path(GROUP, shard))
    key = members[0].name.split(".")[0]
    victim = next(
        i for i, m in enumerate(members) if m.name.startswith(f"{key}.") and m.name.endswith(".npy")
    )
    link = Member(members[victim].name, type=tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE)
    link.linkname = "/etc/passwd" if kind == "symlink" else f"{key}.json"
    members[victim] = link
    rewrite(store, GROUP, shard, members)
    return key


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_loader_refuses_a_link_in_place_of_a_member(store, kind):
    _link_in_place_of_a_member(store, kind)
    for fast in (True, False):
        with pytest.raises(ShardFormatError, match="symbolic link" if kind == "symlink" else "hard link"):
            _read_all(store, fast)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_get_refuses_a_link_in_place_of_a_member(store, kind):
    key = _link_in_place_of_a_member(store, kind)
    with pytest.raises(ShardFormatError, match="link"):
        get_sample(store.root, key, groups=[GROUP])


@pytest.mark.parametrize("fast", [True, False], ids=["indexed", "tar"])
def test_oversized_member_is_refused_before_reading(store, monkeypatch, fast):
    shard = store.shards("test")[0]
    members = read_members(store.shard_path(GROUP, shard))
    key = members[0].name.split(".")[0]
    limit = max(len(m.data) for m in members)  # every genuine member passes
    monkeypatch.setattr(shards_mod, "MAX_MEMBER_BYTES", limit)
    big = io.BytesIO()
    np.save(big, np.zeros(limit // 4 + 64, np.float32))
    _plant(store, [Member(f"{key}.big.npy", big.getvalue())])
    with pytest.raises(
        ShardFormatError, match=rf"{key}\.big\.npy.* over the limit of {limit:,} \(refused before reading\)"
    ):
        _read_all(store, fast)
    report = verify_store(store.root, progress=False)
    assert [p.kind for p in report.problems] == ["unsafe_member"], report.problems


def test_member_whose_header_claims_gigabytes_is_refused_from_the_header(store, monkeypatch):
    """A header claiming 8 GiB with nothing behind it: refused by size, nothing allocated."""
    shard = store.shards("test")[0]
    members = read_members(store.shard_path(GROUP, shard))
    key = members[0].name.split(".")[0]
    claim = 8**11 - 1  # the largest size an ustar header holds: ~8 GiB
    rewrite(
        store, GROUP, shard, [*members[:2], Member(f"{key}.huge.npy", b"", size=claim)], update_catalog=False
    )
    with pytest.raises(ShardFormatError, match=rf"{key}\.huge\.npy.*over the limit"):
        _read_all(store, fast=False)
    with pytest.raises(ShardFormatError, match=rf"{key}\.huge\.npy.*over the limit"):
        _read_all(store, fast=True)  # the catalog does not match: tar iteration, same refusal
    report = verify_store(store.root, progress=False)
    assert any(p.kind == "unsafe_member" and "huge.npy" in p.detail for p in report.problems)


def test_get_refuses_an_oversized_member(store, monkeypatch):
    shard = store.shards("test")[0]
    members = read_members(store.shard_path(GROUP, shard))
    key = members[0].name.split(".")[0]
    limit = max(len(m.data) for m in members)
    monkeypatch.setattr(shards_mod, "MAX_MEMBER_BYTES", limit)
    big = io.BytesIO()
    np.save(big, np.zeros(limit // 4 + 64, np.float32))
    _plant(store, [Member(f"{key}.big.npy", big.getvalue())])
    with pytest.raises(ShardFormatError, match="over the limit"):
        get_sample(store.root, key, groups=[GROUP])


class _TouchOnLoad:
    """Unpickling this creates a file: proof that code in a checkpoint ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_checkpoint_with_code_is_refused_never_executed(tmp_path):
    import pickle as pickle_mod

    import torch

    from fusion.checkpoint import load_checkpoint_file

    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _TouchOnLoad(str(marker))}, path)
    with pytest.raises(
        (ModalstoreError, pickle_mod.UnpicklingError), match="(?i)weights.only|not allowed|unsupported"
    ):
        load_checkpoint_file(path)
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    torch.save({"model": {"w": torch.zeros(2)}}, path)  # tensors and plain data load fine
    assert load_checkpoint_file(path)["model"]["w"].shape == (2,)
