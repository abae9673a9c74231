"""Check a store against its catalog: every shard file's size and sha256, and (optionally) its keys.

Each shard is read once, in 1 MiB blocks: the blocks feed sha256 and, with ``check_keys``,
a streaming ``tarfile`` (mode ``r|``, nothing extracted) that lists the member headers. The
member names give each group's key sequence, compared with ``catalog/samples.parquet``
(by ``index``); the headers' payload offsets and sizes are compared with
``catalog/members.parquet``, which random access (``modalstore get``) relies on. A damaged
tar becomes a problem in the report, never an exception.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.inspect import read_columns
from pipelines.shards import member_problem
from pipelines.storage import open_url, url_size
from pipelines.store import Store, open_store
from pipelines.versions import list_versions

BLOCK = 1 << 20
_SHOWN = 5  # keys listed in one problem's detail


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` (e.g. ``hash_mismatch``), where (group, shard) and what."""

    kind: str
    group: str | None
    shard: str | None
    detail: str

    def __str__(self) -> str:
        where = "/".join(p for p in (self.group, self.shard) if p) or "store"
        return f"{self.kind}: {where}: {self.detail}"


@dataclass
class VerifyReport:
    """Outcome of ``verify_store``; ``ok`` when no problem was found."""

    store: str
    shards: int = 0  # shard files checked
    bytes: int = 0  # bytes read
    keys_checked: bool = True
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = "sizes, sha256 and keys" if self.keys_checked else "sizes and sha256"
        verdict = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        kinds: dict[str, int] = {}
        for p in self.problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        by_kind = " (" + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")" if kinds else ""
        return f"{self.store}: checked {what} of {self.shards} shard file(s), {self.bytes} bytes: {verdict}{by_kind}"


class _HashingReader:
    """Read-only file wrapper hashing every byte read, in order (tarfile reads through it)."""

    def __init__(self, f) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.pos += len(data)
        return data

    def drain(self) -> None:
        while self.read(BLOCK):
            pass


@dataclass(frozen=True)
class _Expected:
    """What the catalog says one (group, shard) file holds."""

    group: str
    shard: str
    path: Path
    bytes: int
    sha256: str
    # Kept as Arrow arrays until the shard is checked: as Python objects, the members of a
    # million-sample store would take gigabytes. None when keys are not checked.
    keys: Any = None  # pa.Array of keys by index
    present: Any = None  # pa.Array of has_<group> per key
    members: Any = None  # (names, offsets, sizes) pa.Arrays from members.parquet


def verify_store(
    path: str | Path, check_keys: bool = True, progress: bool = True, workers: int = 1
) -> VerifyReport:
    """Re-hash every shard against ``catalog/shards.parquet``; with ``check_keys`` check keys too.

    ``workers`` threads check shards in parallel (hashing releases the GIL); problems are
    reported in catalog order whatever the number of workers.
    """
    from tqdm.auto import tqdm

    store = open_store(path)
    report = VerifyReport(str(store.root), keys_checked=check_keys)
    expected, problems = _plan(store, check_keys)
    report.problems.extend(problems)
    bar = tqdm(total=len(expected), desc="verify", unit="shard", disable=True if not progress else None)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for found, nbytes in pool.map(_check_file, expected):
                report.problems.extend(found)
                report.shards += nbytes is not None
                report.bytes += nbytes or 0
                bar.update(1)
    finally:
        bar.close()
    report.problems.extend(_unexpected_files(store, {(e.group, e.shard) for e in expected}))
    return report


def _plan(store: Store, check_keys: bool) -> tuple[list[_Expected], list[Problem]]:
    """Cross-check store.json with the catalog; list every shard file with what it should hold."""
    problems: list[Problem] = []
    shards = read_columns(store, "shards", ["group", "shard", "samples", "bytes", "sha256"]).to_pylist()
    planned = {
        (g, s): split for g in store.groups for split in store.meta["splits"] for s in store.shards(split)
    }
    listed = {(r["group"], r["shard"]) for r in shards}
    for g, s in planned.keys() - listed:
        problems.append(
            Problem("catalog_missing_shard", g, s, "listed in store.json, absent from catalog/shards.parquet")
        )
    for g, s in sorted(listed - planned.keys()):
        problems.append(
            Problem("catalog_unknown_shard", g, s, "in catalog/shards.parquet, not listed in store.json")
        )
    problems.sort(key=lambda p: (p.shard or "", p.group or ""))

    keys = members = None
    if check_keys:
        keys, dup = _catalog_keys(store)
        problems.extend(dup)
        members = _catalog_members(store)

    out = []
    for r in shards:
        g, s = r["group"], r["shard"]
        if g not in store.meta["groups"]:
            continue  # reported above as catalog_unknown_shard
        exp = _Expected(group=g, shard=s, path=store.shard_path(g, s), bytes=r["bytes"], sha256=r["sha256"])
        if check_keys:
            empty = (pa.array([], pa.string()), pa.array([], pa.int64()), pa.array([], pa.int64()))
            shard_keys, present = keys.get(s, (pa.array([], pa.string()), {}))
            exp = dataclasses.replace(
                exp,
                keys=shard_keys,
                present=present.get(g, pa.array([False] * len(shard_keys))),
                members=members.get((g, s), empty),
            )
            if len(shard_keys) != r["samples"]:
                problems.append(
                    Problem(
                        "catalog_mismatch",
                        g,
                        s,
                        f"catalog/shards.parquet says {r['samples']} samples, catalog/samples.parquet has "
                        f"{len(shard_keys)}",
                    )
                )
        out.append(exp)
    return out, problems


def _catalog_keys(store: Store) -> tuple[dict, list[Problem]]:
    """{shard: (keys in ``index`` order, {group: has_<group> flags})}; duplicate keys are problems."""
    import pyarrow.compute as pc

    has_cols = [f"has_{g}" for g in store.groups]
    t = read_columns(store, "samples", ["key", "shard", "index", *has_cols])
    problems = []
    counts = pc.value_counts(t["key"])
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        shown = dup.field("values").to_pylist()[:_SHOWN]
        problems.append(
            Problem(
                "catalog_duplicate_key",
                None,
                None,
                f"{len(dup)} key(s) appear more than once in catalog/samples.parquet: {shown}",
            )
        )
    per_shard = (
        t.sort_by([("shard", "ascending"), ("index", "ascending")])
        .group_by("shard", use_threads=False)  # keeps the sorted order inside each shard's lists
        .aggregate([("key", "list"), *[(c, "list") for c in has_cols]])
    )
    lists = {c: per_shard[c].combine_chunks() for c in per_shard.column_names if c.endswith("_list")}
    out = {}
    for i, s in enumerate(per_shard["shard"].to_pylist()):  # one row per shard
        flags = {g: lists[f"{c}_list"][i].values for g, c in zip(store.groups, has_cols, strict=True)}
        out[s] = (lists["key_list"][i].values, flags)
    return out, problems


def _catalog_members(store: Store) -> dict[tuple[str, str], tuple]:
    """{(group, shard): (names, offsets, sizes)} in catalog order, as Arrow arrays.

    Extraction writes each (group, shard)'s members as one contiguous run of rows; then the
    arrays are zero-copy slices of the table. Otherwise (an edited catalog) they are gathered
    with a group_by, which copies the table once more.
    """
    import numpy as np
    import pyarrow.compute as pc

    t = read_columns(store, "members", ["group", "shard", "member", "offset", "size"]).combine_chunks()
    n = t.num_rows
    if n == 0:
        return {}
    g, s = t["group"].chunk(0), t["shard"].chunk(0)
    change = pc.or_(pc.not_equal(g.slice(1), g.slice(0, n - 1)), pc.not_equal(s.slice(1), s.slice(0, n - 1)))
    starts = np.concatenate([[0], np.flatnonzero(change.to_numpy(zero_copy_only=False)) + 1])
    ends = np.append(starts[1:], n)
    idx = pa.array(starts)
    pairs = list(zip(pc.take(g, idx).to_pylist(), pc.take(s, idx).to_pylist(), strict=True))
    cols = [t[c].chunk(0) for c in ("member", "offset", "size")]
    if len(set(pairs)) == len(pairs):
        return {
            pair: tuple(c.slice(a, b - a) for c in cols)
            for pair, a, b in zip(pairs, starts.tolist(), ends.tolist(), strict=True)
        }
    per = t.group_by(["group", "shard"], use_threads=False).aggregate(
        [("member", "list"), ("offset", "list"), ("size", "list")]
    )
    lists = [per[c].combine_chunks() for c in ("member_list", "offset_list", "size_list")]
    out = {}
    for i, pair in enumerate(zip(per["group"].to_pylist(), per["shard"].to_pylist(), strict=True)):
        out[pair] = tuple(col[i].values for col in lists)
    return out


def _check_file(exp: _Expected) -> tuple[list[Problem], int | None]:
    """Problems of one shard file and the bytes read (None when it could not be read)."""
    g, s = exp.group, exp.shard
    try:
        size = url_size(exp.path)
    except FileNotFoundError:
        return [Problem("missing_shard", g, s, f"file not found: {exp.path}")], None
    problems = []
    if size != exp.bytes:
        problems.append(Problem("size_mismatch", g, s, f"{size} bytes on disk, catalog says {exp.bytes}"))
    try:
        with open_url(str(exp.path)) as f:
            reader = _HashingReader(f)
            headers: list[tuple[str, int, int]] | None = None
            if exp.keys is not None:
                headers, damage = _read_headers(reader, exp.path, size)
                problems.extend(Problem(kind, g, s, detail) for kind, detail in damage)
                if damage:  # the keys of a damaged tar say nothing more
                    headers = None
            reader.drain()
    except OSError as exc:
        return [*problems, Problem("unreadable", g, s, f"{exp.path}: {exc}")], None
    digest = reader.sha.hexdigest()
    if digest != exp.sha256:
        problems.append(
            Problem("hash_mismatch", g, s, f"sha256 {digest[:16]}..., catalog says {exp.sha256[:16]}...")
        )
    if headers is not None:
        problems.extend(_compare_keys(exp, headers))
    return problems, reader.pos


def _read_headers(
    reader: _HashingReader, path: Path, size: int
) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """Member (name, payload offset, size) from a streaming tar read, and any damage found.

    ``tarfile`` ends an archive silently at a damaged or cut header after the first, so the
    bytes after the last header it read are checked too: only zero padding may follow, and
    at least the two zero blocks of the end-of-archive marker.
    """
    headers: list[tuple[str, int, int]] = []
    unsafe: list[tuple[str, str]] = []
    try:
        tar = tarfile.open(fileobj=reader, mode="r|", bufsize=BLOCK)
        for info in tar:
            headers.append((info.name, info.offset_data, info.size))
            problem = _member_safety(tar, info)
            if problem is not None:
                unsafe.append(problem)
        end = tar.offset
    except tarfile.ReadError as exc:
        msg = str(exc)
        kind = "truncated" if ("unexpected end" in msg or "empty file" in msg) else "corrupt"
        where = f" after member {headers[-1][0]!r}" if headers else ""
        return headers, [*unsafe, (kind, f"tar read failed{where}: {msg}")]
    except (tarfile.TarError, EOFError, ValueError) as exc:
        return headers, [*unsafe, ("corrupt", f"tar read failed: {type(exc).__name__}: {exc}")]
    with open_url(str(path)) as f:  # the trailer is small and was just read: cheap
        f.seek(end)
        tail, nonzero = 0, None
        for block in iter(lambda: f.read(BLOCK), b""):
            stripped = block.lstrip(b"\0")
            if stripped:
                nonzero = end + tail + len(block) - len(stripped)
                break
            tail += len(block)
    if nonzero is not None:
        if size - end < 512:
            return headers, [
                *unsafe,
                (
                    "truncated",
                    f"file ends {size - end} bytes into the tar header at byte {end} ({len(headers)} members before it)",
                ),
            ]
        return headers, [
            *unsafe,
            (
                "corrupt",
                f"damaged tar header at byte {end} after {len(headers)} members: data follows at byte {nonzero}",
            ),
        ]
    if tail < 1024:
        return headers, [
            *unsafe,
            ("truncated", f"no end-of-archive marker after byte {end} ({len(headers)} members)"),
        ]
    return headers, unsafe


def _member_safety(tar: tarfile.TarFile, info: tarfile.TarInfo) -> tuple[str, str] | None:
    """A member the loader and ``get`` would refuse, as a (kind, detail) problem, from its header.

    ``unsafe_member``: a link, not a regular file, an absolute or ``..`` name, oversized;
    ``disallowed_member``: an extension other than ``.npy`` and ``.json`` (``.pkl``, ``.pyd``...);
    ``pickle_member``: a ``.npy`` whose header declares Python objects (it would need pickle).
    """
    problem = member_problem(info)
    if problem is not None:
        return "unsafe_member", f"member {info.name!r} {problem}"
    suffix = os.path.basename(info.name).partition(".")[2].lower()
    if suffix != "json" and not suffix.endswith("npy"):
        return (
            "disallowed_member",
            f"member {info.name!r}: extension {suffix!r} is not allowed (only .npy and .json)",
        )
    if suffix.endswith("npy"):
        head = tar.extractfile(info).read(min(info.size, 12 + _NPY_MAX_HEADER))
        problem = _npy_problem(head)
        if problem is not None:
            return "pickle_member" if "object" in problem else "corrupt", f"member {info.name!r}: {problem}"
    return None


_NPY_MAX_HEADER = 10000  # np.load's max_header_size when allow_pickle=False


def _npy_problem(head: bytes) -> str | None:
    """Why a ``.npy`` payload that starts with ``head`` cannot be loaded without pickle."""
    import io

    import numpy as np

    fp = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_NPY_MAX_HEADER)
        else:
            _, _, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_NPY_MAX_HEADER)
    except Exception as exc:  # noqa: BLE001 - any unreadable header is a finding, not a crash
        return f"not a readable .npy header ({type(exc).__name__}: {exc})"
    if dtype.hasobject:
        return f"a .npy array of Python objects (dtype {dtype}); it would need pickle to load"
    return None


def _compare_keys(exp: _Expected, headers: list[tuple[str, int, int]]) -> list[Problem]:
    g, s = exp.group, exp.shard
    problems = []
    # WebDataset's rule: a sample's key is the member name up to its first dot.
    tar_keys: list[str] = []
    has_arrays: list[bool] = []
    for name, _, _ in headers:
        key, _, suffix = os.path.basename(name).partition(".")
        if not tar_keys or tar_keys[-1] != key:
            tar_keys.append(key)
            has_arrays.append(False)
        if suffix.endswith("npy"):
            has_arrays[-1] = True
    cat_keys = exp.keys.to_pylist()
    cat_present = exp.present.to_pylist()
    names, offsets, sizes = (a.to_pylist() for a in exp.members)
    cat_members = list(zip(names, offsets, sizes, strict=True))
    if tar_keys != cat_keys:
        problems.append(Problem("key_mismatch", g, s, _key_diff(tar_keys, cat_keys)))
    elif has_arrays != cat_present:
        bad = [k for k, a, p in zip(tar_keys, has_arrays, cat_present, strict=True) if a != p]
        problems.append(
            Problem(
                "present_mismatch",
                g,
                s,
                f"has_{g} in catalog/samples.parquet disagrees with the arrays in the shard for {bad[:_SHOWN]}",
            )
        )
    if headers != cat_members:
        at = next(
            (i for i, (a, b) in enumerate(zip(headers, cat_members, strict=False)) if a != b),
            min(len(headers), len(cat_members)),
        )
        tar_m = headers[at] if at < len(headers) else "(end)"
        cat_m = cat_members[at] if at < len(cat_members) else "(end)"
        problems.append(
            Problem(
                "member_mismatch",
                g,
                s,
                f"member #{at}: tar has {tar_m}, catalog/members.parquet has {cat_m} "
                f"((name, offset, size); {len(headers)} vs {len(cat_members)} members)",
            )
        )
    return problems


def _key_diff(tar_keys: list[str], cat_keys: list[str]) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(tar_keys, cat_keys, strict=False)) if a != b),
        min(len(tar_keys), len(cat_keys)),
    )
    tar_k = repr(tar_keys[at]) if at < len(tar_keys) else "no more keys"
    cat_k = repr(cat_keys[at]) if at < len(cat_keys) else "no more keys"
    parts = [f"sample #{at}: the tar has {tar_k}, catalog/samples.parquet has {cat_k}"]
    extra = [k for k in tar_keys if k not in set(cat_keys)]
    missing = [k for k in cat_keys if k not in set(tar_keys)]
    if extra:
        parts.append(f"{len(extra)} key(s) not in the catalog for this shard: {extra[:_SHOWN]}")
    if missing:
        parts.append(f"{len(missing)} catalog key(s) not in the tar: {missing[:_SHOWN]}")
    if not extra and not missing:
        parts.append("same keys in another order" if len(tar_keys) == len(cat_keys) else "keys repeated")
    return "; ".join(parts)


def _unexpected_files(store: Store, known: set[tuple[str, str]]) -> list[Problem]:
    """Entries under shards/ the catalog does not list (leftover temporary files, stray copies).

    Folders of other versions of a group (``versions/<group>/<version>`` exists) are not
    problems: they are kept beside the active one until ``modalstore gc``.
    """
    root = store.root / "shards"
    if store.url is not None or not root.is_dir():  # a remote store: objects appear whole, no leftovers
        return []
    active = {Path(store.meta["groups"][g]["dir"]): g for g in store.groups}
    recorded = {(g, v) for g, versions in list_versions(store.root).items() for v in versions}
    problems = []
    for group_dir in sorted(root.iterdir()):
        entries = sorted(group_dir.iterdir()) if group_dir.is_dir() else [group_dir]
        for entry in entries:
            rel = entry.relative_to(store.root)
            group = active.get(rel)
            if group is None:
                if entry.is_dir() and (group_dir.name, entry.name) in recorded:
                    continue  # an inactive version
                problems.append(
                    Problem(
                        "unexpected_file", None, None, f"{entry}: belongs to no group version of the store"
                    )
                )
                continue
            for path in sorted(entry.rglob("*")):
                if path.parent == entry and path.suffix == ".tar" and (group, path.stem) in known:
                    continue
                if path.is_dir() and path.parent != entry:
                    continue  # its folder is reported
                hint = " (temporary file of an interrupted write)" if ".tmp" in path.name else ""
                problems.append(
                    Problem("unexpected_file", group, None, f"{path}: not in catalog/shards.parquet{hint}")
                )
    return problems
