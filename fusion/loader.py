"""Streaming loader: store shards -> joined, decoded samples -> batched tensors on the device.

Groups are stored side by side (one tar per group per shard, same keys in the same order),
so a sample is the join of its members across the requested groups; keys that disagree are
an error. Only ``.npy`` (``allow_pickle=False``) and ``.json`` members are decoded.

Three ways to read a shard give the same batches, bit for bit:

- columns (default, ``fusion.shard_columns``): ``catalog/members.parquet`` gives every
  member's payload offset and size; when a shard holds the same members for every sample
  (what extraction writes), each field is a column of the memory-mapped file, its ``.npy``
  headers checked in one vectorised pass, and a batch's rows are gathered per field in one
  copy (a strided view when the members' sizes repeat), decoded by ``np.load`` only where a
  header differs. ``.json`` members are decoded once per sample (label, present).
- indexed samples (a shard that is not that regular): the same offsets, one sample at a
  time (``JoinedShard`` with the catalog; ``.npy`` headers parsed once per field and shard).
  Either indexed way first checks the tar headers at the catalog's offsets in one vectorised
  pass (contiguous members, name, size, type, checksum, zeros after the last member); a
  shard that does not match its catalog is read by tar iteration instead, with a
  ``CatalogMismatchWarning``.
- tar iteration (``fast=False``, or no ``members.parquet``): ``iter_group_shard`` and
  ``decode_member``, the reference the others are tested against.

Either way a shard is checked whole when it is opened: a member of a refused type is an
error even if its sample is never decoded, the groups' keys must agree, and the shard must
hold as many samples as ``store.json`` records (an epoch is planned from those counts).

Which samples go where is index arithmetic (``fusion.epochs``): an epoch's
sample order is a pure function of (shard sizes, shuffle, seed, epoch, window, bucketing),
each rank takes fixed slices of it and each DataLoader worker whole batches of its rank's, so
samples are read by (shard, index in shard) and a resume skips to a position without
reading what comes before it. DataLoader workers persist across epochs: each iteration's
(epoch, start) reaches them through a shared-memory mailbox, and each batch comes back as
one reused shared-memory segment (``fusion.worker_batches``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from features.errors import ConfigError, ShardFormatError, StoreError
from features.spec import FieldSpec
from fusion.collate import assemble, sample_columns
from fusion.device import _on_device, resolve_device
from fusion.epochs import EpochOrder, EpochPlan, resolve_world
from fusion.shard_columns import ColumnsCache, ShardColumns, open_columns, sample_meta
from fusion.shard_reader import (
    MemberDecoder,
    ShardMembers,
    iter_group_shard,
    iter_indexed_shard,
    load_member_index,
)
from fusion.worker_batches import SLOTS, Receiver, SlotPool
from pipelines.lookup import allowed_suffix, decode_member
from pipelines.storage import is_url
from pipelines.store import open_store

STATE_VERSION = 1  # of StreamingLoader.state_dict()


# ---- one shard, all groups: raw members joined by key, decoded one sample at a time ---------


def _allowed(suffix: str) -> bool:
    return allowed_suffix(suffix) or suffix.startswith("__")  # __key__ and webdataset's meta


def _check_suffixes(shard: str, raws: dict[str, list[dict]]) -> None:
    """Refuse a shard holding any member ``decode_member`` refuses by name, decoded or not."""
    for r in raws.values():
        if all(_allowed(suffix) for suffix in set().union(*r)):
            continue
        raw, suffix = next((raw, x) for raw in r for x in raw if not _allowed(x))  # the first one
        decode_member(shard, f"{raw['__key__']}.{suffix}", suffix, bytes(raw[suffix]))  # raises


def _check_join(shard: str, raws: dict[str, list[dict]], expected: int | None) -> None:
    """Raise unless every group holds the same keys in the same order (and ``expected`` of them)."""
    groups, lists = list(raws), list(raws.values())
    n = min(len(r) for r in lists)
    keys = [[raw["__key__"] for raw in r[:n]] for r in lists]
    bad = [  # (first differing index, group, its keys) per group that differs from the first
        (next(i for i, (a, b) in enumerate(zip(keys[0], other, strict=True)) if a != b), g, other)
        for g, other in zip(groups[1:], keys[1:], strict=True)
        if other != keys[0]
    ]
    if bad:
        i, g, other = min(bad, key=lambda t: t[0])  # the first mismatch in shard order
        raise ShardFormatError(
            f"shard {shard}: key mismatch between groups: {groups[0]!r} has {keys[0][i]!r}, "
            f"{g!r} has {other[i]!r}"
        )
    ended = [g for g, r in zip(groups, lists, strict=True) if len(r) == n]
    if len(ended) != len(groups):
        live = [g for g, r in zip(groups, lists, strict=True) if len(r) > n]
        nxt = raws[live[0]][n]["__key__"]
        raise ShardFormatError(f"shard {shard}: group(s) {ended} ended before {live} (next key {nxt!r})")
    if expected is not None and n != expected:
        raise ShardFormatError(
            f"shard {shard}: its tar file(s) hold {n} readable samples, store.json says {expected}; "
            "the shard is truncated or was rewritten: run modalstore verify on the store"
        )


class JoinedShard:
    """One shard of every requested group, members joined by key; ``sample(i)`` decodes one.

    Without ``members`` every group is read by tar iteration and decoded by ``decode_member``
    (the reference). With ``members`` ({group: catalog entry}; groups without one are read
    by tar iteration) shards are read through the catalog and arrays may be read-only views
    of the mapped shard. ``expected``: the sample count the store records for the shard.
    """

    def __init__(
        self,
        shard: str,
        paths: dict[str, Path],
        members: dict[str, ShardMembers] | None = None,
        expected: int | None = None,
    ) -> None:
        if members is None:
            raws = {g: list(iter_group_shard(p)) for g, p in paths.items()}
            self._decode = lambda g, key, suffix, data: decode_member(shard, f"{key}.{suffix}", suffix, data)
        else:
            raws = {
                g: list(iter_indexed_shard(p, members[g], shard, g) if g in members else iter_group_shard(p))
                for g, p in paths.items()
            }
            self._decode = MemberDecoder(shard)
        _check_suffixes(shard, raws)
        _check_join(shard, raws, expected)
        self.shard, self.groups = shard, list(raws)
        self.rows = list(zip(*raws.values(), strict=True))  # (samples,) of (groups,) raw member dicts
        self._field_names: dict[tuple[str, str], str] = {}  # (group, suffix) -> "group.field"

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, i: int) -> dict:
        """Sample ``i`` decoded: {"key", "label", "present": {group: bool}, "fields": {name: array}}."""
        row = self.rows[i]
        key = row[0]["__key__"]
        present, fields = {}, {}
        sample = {"key": key, "label": None, "present": present, "fields": fields}
        for g, r in zip(self.groups, row, strict=True):
            for suffix, data in r.items():
                if suffix.startswith("__"):
                    continue
                value = self._decode(g, key, suffix, data)
                if suffix == "json":
                    sample["label"], present[g] = sample_meta(self.shard, key, value)
                else:
                    name = self._field_names.get((g, suffix))
                    if name is None:
                        name = self._field_names[g, suffix] = f"{g}.{suffix[: -len('.npy')]}"
                    fields[name] = value
        missing = [g for g in self.groups if g not in present]
        if missing:
            raise ShardFormatError(
                f"shard {self.shard}: sample {key!r} has no '{key}.json' member in group(s) {missing}; "
                "run modalstore verify"
            )
        return sample

    def take(self, idx: np.ndarray, wanted) -> tuple[list[str], np.ndarray, dict, dict]:
        """``ShardColumns.take`` through ``sample``: (keys, labels, {group: present}, {field: list})."""
        samples = [self.sample(i) for i in idx.tolist()]
        return sample_columns(samples, self.groups, wanted)


def iter_joined(
    shard: str, paths: dict[str, Path], members: dict[str, ShardMembers] | None = None
) -> Iterator[dict]:
    """Every sample of one shard in order, joined across groups and decoded (see ``JoinedShard``)."""
    joined = JoinedShard(shard, paths, members)
    for i in range(len(joined)):
        yield joined.sample(i)


# ---- the epoch plan: which sample each rank, worker and batch gets (index arithmetic only) ----


class _OpenShards:
    """A worker's open shards (``ShardColumns`` or ``JoinedShard``), keyed by their place k in the
    epoch's shard order.

    Shards that end before ``EpochOrder.window_start`` of the batch being read are closed:
    a worker reads positions in increasing order, so it never needs them again (but for
    padding, which reopens one). At most the shards of about two windows stay open.
    """

    def __init__(self, stream: ShardStream, order: EpochOrder) -> None:
        self.stream, self.order = stream, order
        self.ends = order.starts[1:].tolist()  # where the k-th shard ends in the concatenation
        self.open: dict[int, ShardColumns | JoinedShard] = {}

    def get(self, k: int) -> ShardColumns | JoinedShard:
        joined = self.open.get(k)
        if joined is None:
            shard = self.stream.shards[int(self.order.shard_order[k])]
            joined = self.open[k] = self.stream.open_shard(shard)
        return joined

    def close_before(self, concat_position: int) -> None:
        for k in [k for k in self.open if self.ends[k] <= concat_position]:
            del self.open[k]


class ShardStream(IterableDataset):
    """Batches of one rank of one split; each DataLoader worker makes every n-th batch.

    ``sizes``: samples per shard. ``members`` ({(group, shard): catalog entry}) selects
    indexed reads; None, tar iteration. ``epoch``, ``start`` (positions already consumed),
    ``rank``, ``world`` and ``drop_last`` define the plan (``plan()``). Batch j of the rank
    goes to worker j % num_workers, which is the order a DataLoader returns them in.
    """

    def __init__(
        self,
        shards: list[str],
        sizes: list[int],
        paths: dict[str, dict[str, str]],
        specs: dict[str, FieldSpec],
        field_groups: dict[str, str],
        batch_size: int,
        shuffle: bool,
        seed: int,
        buffer_size: int,
        members: dict[tuple[str, str], ShardMembers] | None = None,
        drop_last: bool = False,
    ) -> None:
        self.shards, self.sizes, self.paths, self.members = shards, sizes, paths, members
        self.specs, self.field_groups = specs, field_groups
        self.batch_size, self.shuffle, self.seed, self.buffer_size = batch_size, shuffle, seed, buffer_size
        self.drop_last = drop_last
        self.epoch, self.start = 0, 0
        self.rank: int | None = None  # None: torch.distributed's, when initialised
        self.world: int | None = None
        self.norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self.lengths: np.ndarray | None = None  # per sample in split order: bucketing by length
        self.bucket_size = 0
        self._expected = dict(zip(shards, sizes, strict=True))
        # (epoch, start) of the current iteration, shared with (persistent) DataLoader workers
        self.mailbox = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._cache: ColumnsCache | None = None  # made where shards are read (each worker its own)
        self.slots: torch.Tensor | None = None  # (workers, SLOTS) shared slot flags (fusion.worker_batches)
        self.known: torch.Tensor | None = None  # (workers, SLOTS) segments the main process holds
        self._pool: SlotPool | None = None  # a worker's reusable segments

    def order(self) -> EpochOrder:
        return EpochOrder(
            self.sizes, self.shuffle, self.seed, self.epoch, self.buffer_size, self.lengths, self.bucket_size
        )

    def plan(self) -> EpochPlan:
        rank, world = resolve_world(self.rank, self.world)
        return EpochPlan(self.order(), self.start, rank, world, self.batch_size, self.drop_last)

    def open_shard(self, shard: str) -> ShardColumns | JoinedShard:
        """The shard as columns (indexed reads of a regular shard), else as a ``JoinedShard``."""
        members = None
        if self.members is not None:
            members = {g: self.members[g, shard] for g in self.paths if (g, shard) in self.members}
        paths = {g: p[shard] if is_url(p[shard]) else Path(p[shard]) for g, p in self.paths.items()}
        if members:
            if self._cache is None:
                self._cache = ColumnsCache()
            columns = open_columns(shard, paths, members, self._expected[shard], self._cache)
            if columns is not None:
                return columns
        return JoinedShard(shard, paths, members, self._expected[shard])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "_pool": None}  # both belong to the process that made them

    def publish(self) -> None:
        """Hand this iteration's (epoch, start) to DataLoader workers, persistent ones included."""
        self.mailbox[0], self.mailbox[1] = self.epoch, self.start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:  # a worker's copy: the plan of the iteration published last
            self.epoch, self.start = (int(x) for x in self.mailbox.tolist())
            if self.slots is not None:
                if self._pool is None:
                    known = None if self.known is None else self.known[info.id]
                    self._pool = SlotPool(self.slots[info.id], known, info.id)
                self._pool.reclaim()
        return self._batches(self.plan())  # the plan is fixed now, not at the first batch

    def _batches(self, plan: EpochPlan) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = _OpenShards(self, plan.order)
        for j in range(worker, plan.num_batches, workers):
            positions = plan.positions(j)
            shards.close_before(plan.order.window_start(int(positions[0])))
            ks, idx = plan.order.locate(positions)
            yield self._batch(shards, ks, idx)

    def _batch(self, shards: _OpenShards, ks: np.ndarray, idx: np.ndarray) -> dict:
        """One batch: each shard's rows taken at once, then assembled in batch order."""
        b = len(ks)
        keys: list = [None] * b
        label = np.empty(b, dtype=np.int64)
        present = {g: np.zeros(b, dtype=bool) for g in self.paths}
        columns: dict[str, list] = {name: [] for name in self.specs}
        order = np.argsort(ks, kind="stable")
        for rows in np.split(order, np.flatnonzero(np.diff(ks[order])) + 1):  # one part per shard
            k_keys, k_label, k_present, k_fields = shards.get(int(ks[rows[0]])).take(idx[rows], self.specs)
            for r, key in zip(rows.tolist(), k_keys, strict=True):
                keys[r] = key
            label[rows] = k_label
            for g, p in k_present.items():
                present[g][rows] = p
            for name, values in k_fields.items():
                columns[name].append((rows, values))
        packed = get_worker_info() is not None  # one shared-memory segment for the trip to the main process
        return assemble(
            keys, label, present, columns, self.specs, self.field_groups, self.norm, packed, self._pool
        )


# ---- the device path and the loader ----------------------------------------------------------


def _as_is(batch: dict) -> dict:
    return batch


class StreamingLoader:
    """Iterable of batch dicts for one split of a store, exact per epoch and resumable.

    Batches: ``{"keys", "label", "features": {group.field: (B, ...)}, "lengths", "mask",
    "present": {group: (B,)}}``. The epoch's sample order is a pure function of (seed,
    epoch): shards shuffled, then samples shuffled within windows of ``buffer_size``, twice,
    the second time with windows shifted by half a window (``EpochOrder``). Each rank takes fixed slices of that order (``EpochPlan``): every
    sample once per epoch across ranks and DataLoader workers, the same number of batches
    on every rank; the last partial step is padded with the first samples of the epoch
    (fewer than ``world_size`` repeats), or dropped with ``drop_last``. ``rank`` and
    ``world_size`` default to torch.distributed's when it is initialised.

    ``state_dict()`` records the position reached; ``load_state_dict()`` makes the next
    iteration yield exactly the batches an uninterrupted run would still have yielded,
    without reading the samples before it; on another world size, the rest of the epoch
    once each. On CUDA, batches come from pinned memory and the next batch is copied on a
    side stream while the current one is used. ``normalize=True`` standardises every field
    with the train split's per-feature mean and std stored with the group.

    Shards are read through ``catalog/members.parquet`` (no tar parsing): a batch's rows of a
    field are gathered straight from the mapped shard (``fusion.shard_columns``); ``fast=False``
    reads them by tar iteration and ``np.load`` (the reference path, same batches). DataLoader
    workers are started once and kept across epochs (each iteration's plan reaches them through
    shared memory), and send each batch as one shared-memory segment.

    ``bucket_by="group.field"`` (a variable-length field) sorts the epoch order by that field's
    length within consecutive buckets of ``bucket_size`` positions, so that a batch holds
    samples of similar lengths and less padding; still every sample once per epoch, the same
    order for a given (seed, epoch) and resumable. Lengths come from the catalog's member sizes.
    """

    def __init__(
        self,
        store: str | Path,
        split: str,
        groups: list[str] | None = None,
        batch_size: int = 64,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        device: str | torch.device = "cpu",
        buffer_size: int = 512,
        normalize: bool = False,
        fast: bool = True,
        shards: list[str] | None = None,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        bucket_by: str | None = None,
        bucket_size: int = 4096,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("buffer_size", buffer_size),
            ("bucket_size", bucket_size),
        ):
            if value < 1:
                raise ConfigError(f"StreamingLoader: {name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"StreamingLoader: num_workers must be >= 0, got {num_workers}")
        self.store = open_store(store)
        self.split = split
        self.groups = self.store.check_groups(groups)
        self.batch_size, self.shuffle, self.seed, self.num_workers = batch_size, shuffle, seed, num_workers
        self.device = resolve_device(device)
        self.field_specs: dict[str, FieldSpec] = {}
        self.field_groups: dict[str, str] = {}
        for g in self.groups:
            for f, spec in self.store.field_specs(g).items():
                self.field_specs[f"{g}.{f}"] = spec
                self.field_groups[f"{g}.{f}"] = g
        shards, sizes = self._select_shards(shards)
        paths = {g: {s: str(self.store.shard_path(g, s)) for s in shards} for g in self.groups}
        self.dataset = ShardStream(
            shards,
            sizes,
            paths,
            self.field_specs,
            self.field_groups,
            batch_size,
            shuffle,
            seed,
            buffer_size,
            load_member_index(self.store, self.groups, shards) if fast else None,
            drop_last,
        )
        self.dataset.rank, self.dataset.world = rank, world_size
        self.bucket_by = bucket_by
        if bucket_by is not None:
            self.dataset.lengths = self._lengths(bucket_by, shards, sizes)
            self.dataset.bucket_size = bucket_size
        resolve_world(rank, world_size)  # fail early on an impossible pair
        if normalize:
            self.dataset.norm = self._train_stats()
        self._position = 0  # positions consumed by the current (or last) iteration
        self._dataloader: DataLoader | None = None
        if num_workers:
            self.dataset.slots = torch.zeros((num_workers, SLOTS), dtype=torch.int8).share_memory_()
            if self.device.type != "cuda":  # pinned memory: the main process gets copies, keeps no segment
                self.dataset.known = torch.zeros((num_workers, SLOTS), dtype=torch.int64).share_memory_()
        self._receiver = Receiver(self.dataset.slots, self.dataset.known)
        listing = ",".join(f"{sh}:{n}" for sh, n in zip(shards, self.dataset.sizes, strict=True))
        self._fingerprint = f"{zlib.crc32(listing.encode()):08x}"

    def _select_shards(self, shards: list[str] | None) -> tuple[list[str], list[int]]:
        """(shards, samples per shard) in split order: all of the split's, or the selection."""
        all_shards = self.store.shards(self.split)
        sizes = dict(zip(all_shards, self.store.meta["splits"][self.split]["shard_samples"], strict=True))
        if shards is not None:
            # a selection, e.g. from Store.select(...): read those shards only, no data rewritten
            foreign = [sh for sh in shards if sh not in sizes]
            if foreign:
                raise StoreError(f"{self.store.root}: shard(s) {foreign} are not in split {self.split!r}")
            chosen = set(shards)
            all_shards = [sh for sh in all_shards if sh in chosen]
        return all_shards, [sizes[sh] for sh in all_shards]

    def _lengths(self, field: str, shards: list[str], sizes: list[int]) -> np.ndarray:
        """Every sample's size of ``field``'s member from the catalog, in split order: its length
        (up to the ``.npy`` header) without reading a shard. Missing members count as 0."""
        variable = [f for f, spec in self.field_specs.items() if spec.variable]
        if field not in variable:
            raise ConfigError(
                f"StreamingLoader: bucket_by={field!r} is not a variable-length field of the groups read; "
                f"variable-length fields: {variable}"
            )
        group, suffix = self.field_groups[field], field.split(".", 1)[1] + ".npy"
        index = load_member_index(self.store, [group], shards)
        out = []
        for shard, n in zip(shards, sizes, strict=True):
            m = index.get((group, shard))
            if m is None:
                raise ConfigError(
                    f"StreamingLoader: bucket_by needs catalog/members.parquet rows for group {group!r}, "
                    f"shard {shard} (member sizes); run modalstore verify, or re-extract the group"
                )
            sample = np.cumsum(np.char.endswith(m.names, b".json")) - 1  # json comes first in a sample
            mine = np.char.endswith(m.names, b"." + suffix.encode()) & (sample >= 0) & (sample < n)
            lengths = np.zeros(n, dtype=np.int64)
            lengths[sample[mine]] = m.sizes[mine]
            out.append(lengths)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _train_stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(mean, std) per field from the train split; constant features keep std 1."""
        norm = {}
        for g in self.groups:
            for f, st in self.store.stats(g).items():
                std = np.where(st["std"] > 1e-8, st["std"], 1.0).astype(np.float32)
                norm[f"{g}.{f}"] = (st["mean"].astype(np.float32), std)
        return norm

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def num_samples(self) -> int:
        return sum(self.dataset.sizes)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields; a resumed position is kept for its own epoch."""
        if epoch != self.dataset.epoch:
            self.dataset.epoch, self.dataset.start, self._position = epoch, 0, 0

    def __len__(self) -> int:
        """Batches the next iteration yields on this rank (after ``load_state_dict``: the rest)."""
        return self.dataset.plan().num_batches

    def state_dict(self) -> dict[str, Any]:
        """Where this epoch stands: a small JSON-serialisable dict for ``load_state_dict``.

        ``position`` counts the epoch-order positions all ranks have consumed, assuming
        every rank has yielded as many batches as this one (as DDP steps do), so any rank's
        state will do. After the epoch's last batch it equals ``num_samples``. ``shards``
        fingerprints the shard names and sizes the order is drawn over.
        """
        return {
            "version": STATE_VERSION,
            "epoch": self.dataset.epoch,
            "position": self._position,
            "num_samples": self.num_samples,
            "shards": self._fingerprint,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "buffer_size": self.dataset.buffer_size,
            "bucket_by": self.bucket_by,
            "bucket_size": self.dataset.bucket_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields the rest of ``state``'s epoch (on any world size).

        The order must be the same: same shards, shuffle, seed and ``buffer_size`` (batch
        size, world size and workers may differ). Raises ConfigError naming what differs.
        """
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"StreamingLoader.load_state_dict: state version {state.get('version')!r}, "
                f"expected {STATE_VERSION}: the state was not made by this loader"
            )
        mine = self.state_dict()
        before = {"bucket_by": None, "bucket_size": 0}  # states saved before bucketing existed
        for key in ("num_samples", "shards", "shuffle", "seed", "buffer_size", "bucket_by", "bucket_size"):
            if state.get(key, before.get(key)) != mine[key]:
                raise ConfigError(
                    f"StreamingLoader.load_state_dict: state has {key}={state.get(key)!r}, this loader "
                    f"{mine[key]!r}; the epoch order differs, so the position cannot be resumed: "
                    "build the loader with the same split, shards, shuffle, seed, buffer_size and bucketing"
                )
        position = int(state["position"])
        if not 0 <= position <= self.num_samples:
            raise ConfigError(
                f"StreamingLoader.load_state_dict: position {position} is outside [0, {self.num_samples}]"
            )
        self.dataset.epoch, self.dataset.start, self._position = int(state["epoch"]), position, position

    def close(self) -> None:
        """Stop the DataLoader worker processes now (they persist across epochs, and would
        otherwise stay until the loader is garbage collected). Iterating again starts new
        ones; batches already yielded stay valid."""
        loader, self._dataloader = self._dataloader, None
        if loader is None:
            return
        workers = getattr(loader, "_iterator", None)
        loader._iterator = None
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()  # what the iterator's __del__ does, done now

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loader(self) -> DataLoader:
        # Workers persist across epochs (started once); each iteration's plan reaches them
        # through the dataset's shared mailbox, published just before the iteration starts.
        if self._dataloader is None:
            self._dataloader = DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.num_workers > 0,
                collate_fn=_as_is,  # batches are tensors already; skip default_convert's walk
            )
        return self._dataloader

    def __iter__(self) -> Iterator[dict]:
        plan = self.dataset.plan()
        self.dataset.publish()
        batches = iter(self._loader())  # workers (or the in-process stream) take the plan's start here
        self.dataset.start = 0  # a resume applies to one iteration; the next one replays the epoch
        self._position = plan.start
        return self._count(plan, _on_device(map(self._receiver.unpack, batches), self.device))

    def _count(self, plan: EpochPlan, batches: Iterator[dict]) -> Iterator[dict]:
        for j, batch in enumerate(batches):
            self._position = plan.consumed_after(j)  # before the yield: this batch is consumed
            yield batch
        self._position = plan.order.n  # the epoch is done, also when drop_last left a remainder
