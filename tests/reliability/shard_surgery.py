"""Tools to damage a copy of a store the way real faults and attackers do, member by member.

``Member`` describes one tar entry (any type, any name); ``rewrite`` writes a group's shard
from a member list and, with ``update_catalog``, makes ``catalog/members.parquet`` and
``catalog/shards.parquet`` agree with the new file, so the loader's indexed path (which trusts
a matching catalog) is exercised and not just its fallback.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.store import Store


@dataclass
class Member:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # header size when it must differ from len(data)


def read_members(path) -> list[Member]:
    with tarfile.open(path) as tar:
        return [Member(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def tar_bytes(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname, info.mtime, info.mode = m.type, m.linkname, 0, 0o644
            info.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(m.data) if m.type == tarfile.REGTYPE else None)
    raw = bytearray(buf.getvalue())
    for m in members:  # forge header sizes after the fact (tarfile would write that many bytes)
        if m.size is not None:
            at = _header_offset(bytes(raw), m.name)
            raw[at + 124 : at + 136] = b"%011o\0" % m.size
            raw[at + 148 : at + 156] = b"        "
            raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])
    return bytes(raw)


def _header_offset(raw: bytes, name: str) -> int:
    for at in range(0, len(raw), 512):
        if raw[at : at + 100].rstrip(b"\0") == name.encode()[:100]:
            return at
    raise KeyError(name)


def rewrite(store: Store, group: str, shard: str, members: list[Member], update_catalog: bool = True):
    """Replace ``group``'s ``shard`` with ``members``; optionally make the catalog agree."""
    path = store.shard_path(group, shard)
    raw = tar_bytes(members)
    path.write_bytes(raw)
    if update_catalog:
        update_catalog_for(store, group, shard)
    return path


def update_catalog_for(store: Store, group: str, shard: str) -> None:
    """Rows of members.parquet and shards.parquet for ``(group, shard)`` recomputed from the file."""
    path = store.shard_path(group, shard)
    raw = path.read_bytes()
    rows = []
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as tar:
        for info in tar:
            rows.append(
                {
                    "group": group,
                    "shard": shard,
                    "member": info.name,
                    "offset": info.offset_data,
                    "size": info.size,
                }
            )
    cat = store.root / "catalog"
    table = pq.read_table(cat / "members.parquet")
    others = [
        r for r in table.to_pylist() if (r["group"], r["shard"]) != (group, shard)
    ]  # catalog order: other shards first is fine for readers (they group by (group, shard))
    pq.write_table(pa.Table.from_pylist(others + rows, schema=table.schema), cat / "members.parquet")
    shards = pq.read_table(cat / "shards.parquet")
    srows = shards.to_pylist()
    for r in srows:
        if (r["group"], r["shard"]) == (group, shard):
            r["bytes"], r["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    pq.write_table(pa.Table.from_pylist(srows, schema=shards.schema), cat / "shards.parquet")
