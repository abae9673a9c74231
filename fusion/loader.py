"""Streaming loader: store shards -> joined, decoded samples -> batched tensors on the device.

Groups are stored side by side (one tar per group per shard, same keys in the same order),
so a sample is the join of its members across the requested groups; keys that disagree are
an error. Only ``.npy`` (``allow_pickle=False``) and ``.json`` members are decoded.

Two ways to read a shard give the same samples:

- indexed (default): ``catalog/members.parquet`` gives every member's payload offset and size,
  so the file is memory-mapped and payloads are sliced, never parsed as a tar. Before that,
  the tar headers at the catalog's offsets are checked in one vectorised pass (contiguous
  members, name, size, type, checksum, zeros after the last member); a shard that does not
  match its catalog is read by tar iteration instead, with a ``CatalogMismatchWarning``.
  ``.npy`` headers are parsed once per field and shard; members with the same header but
  for the first axis become ``np.frombuffer`` views, anything else goes through ``np.load``.
- tar iteration (``fast=False``, or no ``members.parquet``): webdataset's tar iterator and
  ``decode_member``, the reference the indexed path is tested against.

Node/worker splitting and the shuffle buffer are webdataset's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import split_by_node, split_by_worker

from features.errors import ShardFormatError, StoreError
from features.spec import FieldSpec
from fusion.shard_reader import (
    CatalogMismatchWarning,  # noqa: F401  (raised through the loader; importable from here)
    MemberDecoder,
    ShardMembers,
    _reference_decoder,
    iter_group_shard,
    iter_indexed_shard,
    load_member_index,
)
from pipelines.store import open_store


def iter_joined(
    shard: str, paths: dict[str, Path], members: dict[str, ShardMembers] | None = None
) -> Iterator[dict]:
    """Join one shard across groups by key; decode; yield {"key", "label", "present", "fields"}.

    Without ``members`` every group is read by tar iteration and decoded by ``decode_member``
    (the reference). With ``members`` ({group: catalog entry}; groups without one are read
    by tar iteration) shards are read through the catalog and arrays may be read-only views
    of the mapped shard.
    """
    if members is None:
        iters = {g: iter_group_shard(p) for g, p in paths.items()}
        decode = _reference_decoder(shard)
    else:
        iters = {
            g: iter_indexed_shard(p, members[g], shard, g) if g in members else iter_group_shard(p)
            for g, p in paths.items()
        }
        decode = MemberDecoder(shard)
    groups = list(iters)
    its = list(iters.values())
    field_names: dict[tuple[str, str], str] = {}  # (group, suffix) -> "group.field"
    while True:
        raws = [next(it, None) for it in its]
        if None in raws:
            ended = [g for g, r in zip(groups, raws, strict=True) if r is None]
            if len(ended) != len(groups):
                live = [g for g, r in zip(groups, raws, strict=True) if r is not None]
                nxt = next(r for r in raws if r is not None)["__key__"]
                raise ShardFormatError(
                    f"shard {shard}: group(s) {ended} ended before {live} (next key {nxt!r})"
                )
            return
        key = raws[0]["__key__"]
        for g, r in zip(groups, raws, strict=True):
            if r["__key__"] != key:
                raise ShardFormatError(
                    f"shard {shard}: key mismatch between groups: {groups[0]!r} has {key!r}, "
                    f"{g!r} has {r['__key__']!r}"
                )
        present, fields = {}, {}
        sample = {"key": key, "label": None, "present": present, "fields": fields}
        for g, r in zip(groups, raws, strict=True):
            for suffix, data in r.items():
                if suffix.startswith("__"):
                    continue
                value = decode(g, key, suffix, data)
                if suffix == "json":
                    sample["label"] = int(value["label"])
                    present[g] = bool(value.get("present", True))
                else:
                    name = field_names.get((g, suffix))
                    if name is None:
                        name = field_names[g, suffix] = f"{g}.{suffix[: -len('.npy')]}"
                    fields[name] = value
        yield sample


def collate(
    samples: list[dict],
    specs: dict[str, FieldSpec],
    field_groups: dict[str, str],
    norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """Batch samples: stack fixed fields, zero-pad variable ones with lengths and masks.

    With ``norm`` ({field: (mean, std)}) present values are standardised; padding and
    missing samples stay zero.
    """
    b = len(samples)
    batch = {
        "keys": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "features": {},
        "lengths": {},
        "mask": {},
        "present": {},
    }
    for g in dict.fromkeys(field_groups.values()):
        batch["present"][g] = torch.tensor([s["present"].get(g, False) for s in samples], dtype=torch.bool)
    fields = [s["fields"] for s in samples]
    for name, spec in specs.items():
        dtype = np.float32 if np.dtype(spec.dtype).kind == "f" else np.dtype(spec.dtype)
        arrays = [f.get(name) for f in fields]
        stats = norm.get(name) if norm is not None else None
        # Standardise the whole batch at once where that gives the same bits as per sample:
        # when (array - mean) / std is computed in the batch's dtype anyway.
        batched = stats is not None and all(
            np.result_type(a.dtype, *stats) == dtype for a in arrays if a is not None
        )
        if stats is not None and not batched:
            mean, std = stats
            arrays = [None if a is None else (a - mean) / std for a in arrays]
        if spec.variable:
            lengths = np.array([0 if a is None else a.shape[0] for a in arrays], dtype=np.int64)
            rest = next((a.shape[1:] for a in arrays if a is not None), tuple(spec.shape[1:]))
            out = np.zeros((b, max(int(lengths.max()), 1), *rest), dtype=dtype)  # (batch, time, ...)
            for i, a in enumerate(arrays):
                if a is not None:
                    out[i, : a.shape[0]] = a
            mask = np.arange(out.shape[1])[None, :] < lengths[:, None]  # (batch, time)
            if batched:
                out -= stats[0]
                out /= stats[1]
                out[~mask] = 0
            batch["lengths"][name] = torch.from_numpy(lengths)
            batch["mask"][name] = torch.from_numpy(mask)
        else:
            out = np.empty((b, *spec.shape), dtype=dtype)
            for i, a in enumerate(arrays):
                if a is None:
                    out[i] = 0
                else:
                    out[i] = a
            if batched:
                out -= stats[0]
                out /= stats[1]
                out[[a is None for a in arrays]] = 0
        batch["features"][name] = torch.from_numpy(out)
    return batch


def _epoch_seed(seed: int, epoch: int, *extra: int) -> int:
    return hash((seed, epoch, *extra)) & 0x7FFFFFFF


class ShardStream(IterableDataset):
    """Batches from the shards of one split, split by node and DataLoader worker.

    ``members`` ({(group, shard): catalog entry}) selects indexed reads; None, tar iteration.
    """

    def __init__(
        self,
        shards: list[str],
        paths: dict[str, dict[str, str]],
        specs,
        field_groups,
        batch_size: int,
        shuffle: bool,
        seed: int,
        buffer_size: int,
        members: dict[tuple[str, str], ShardMembers] | None = None,
    ) -> None:
        self.shards, self.paths, self.members = shards, paths, members
        self.specs, self.field_groups = specs, field_groups
        self.batch_size, self.shuffle, self.seed, self.buffer_size = batch_size, shuffle, seed, buffer_size
        self.epoch = 0
        self.norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def epoch_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(_epoch_seed(self.seed, self.epoch)).shuffle(shards)
        return shards

    def _members(self, shard: str) -> dict[str, ShardMembers] | None:
        if self.members is None:
            return None
        return {g: self.members[g, shard] for g in self.paths if (g, shard) in self.members}

    def __iter__(self) -> Iterator[dict]:
        shards = list(split_by_worker(split_by_node(self.epoch_shards())))
        samples = (
            s
            for shard in shards
            for s in iter_joined(
                shard, {g: Path(p[shard]) for g, p in self.paths.items()}, self._members(shard)
            )
        )
        if self.shuffle:
            from webdataset.filters import _shuffle

            info = get_worker_info()
            wid = info.id if info else 0
            rng = random.Random(_epoch_seed(self.seed, self.epoch, wid, _rank()))
            samples = _shuffle(samples, bufsize=self.buffer_size, initial=self.buffer_size, rng=rng)
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) == self.batch_size:
                yield collate(buf, self.specs, self.field_groups, self.norm)
                buf = []
        if buf:
            yield collate(buf, self.specs, self.field_groups, self.norm)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _as_is(batch: dict) -> dict:
    return batch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Tensors in nested dicts/lists/tuples moved to ``device``; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def _record_stream(batch: dict, stream) -> None:
    for v in batch.values():
        for t in v.values() if isinstance(v, dict) else [v]:
            if isinstance(t, torch.Tensor):
                t.record_stream(stream)


class StreamingLoader:
    """Iterable of batch dicts for one split of a store.

    Batches: ``{"keys", "label", "features": {group.field: (B, ...)}, "lengths", "mask",
    "present": {group: (B,)}}``. Shards are shuffled per epoch from (seed, epoch) and
    samples through a buffer; shards are split across ranks and DataLoader workers. On
    CUDA, batches come from pinned memory and the next batch is copied on a side stream
    while the current one is used. ``normalize=True`` standardises every field with the
    train split's per-feature mean and std stored with the group.

    Shards are read through ``catalog/members.parquet`` (no tar parsing); ``fast=False``
    reads them by tar iteration and ``np.load`` (the reference path, same batches).
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
    ) -> None:
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
        all_shards = self.store.shards(split)
        self._shard_sizes = dict(
            zip(all_shards, self.store.meta["splits"][split]["shard_samples"], strict=True)
        )
        if shards is None:
            shards = all_shards
        else:  # a selection, e.g. from Store.select(...): read those shards only, no data rewritten
            foreign = [sh for sh in shards if sh not in self._shard_sizes]
            if foreign:
                raise StoreError(f"{self.store.root}: shard(s) {foreign} are not in split {split!r}")
            chosen = set(shards)
            shards = [sh for sh in all_shards if sh in chosen]
        paths = {g: {s: str(self.store.shard_path(g, s)) for s in shards} for g in self.groups}
        self.dataset = ShardStream(
            shards,
            paths,
            self.field_specs,
            self.field_groups,
            batch_size,
            shuffle,
            seed,
            buffer_size,
            load_member_index(self.store, self.groups, shards) if fast else None,
        )
        if normalize:
            # (x - mean) / std with the train split's statistics; constant features keep std 1.
            norm = {}
            for g in self.groups:
                for f, st in self.store.stats(g).items():
                    std = np.where(st["std"] > 1e-8, st["std"], 1.0).astype(np.float32)
                    norm[f"{g}.{f}"] = (st["mean"].astype(np.float32), std)
            self.dataset.norm = norm

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def num_samples(self) -> int:
        return sum(self._shard_sizes[sh] for sh in self.dataset.shards)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (each worker ends with a partial batch)."""
        shards = self.dataset.epoch_shards()[_rank() :: _world()]
        n_workers = max(self.num_workers, 1)
        return sum(
            math.ceil(sum(self._shard_sizes[s] for s in shards[w::n_workers]) / self.batch_size)
            for w in range(n_workers)
        )

    def __iter__(self) -> Iterator[dict]:
        cuda = self.device.type == "cuda"
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=cuda,
            persistent_workers=False,
            collate_fn=_as_is,  # batches are tensors already; skip default_convert's walk
        )
        if not cuda:
            for batch in loader:
                yield to_device(batch, self.device)
            return
        copy_stream = torch.cuda.Stream(device=self.device)
        pending = None
        for batch in loader:
            with torch.cuda.stream(copy_stream):
                nxt = to_device(batch, self.device, non_blocking=True)
            if pending is not None:
                yield pending  # the consumer's step overlaps the copy of ``nxt``
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(copy_stream)
            _record_stream(nxt, main)  # allocated on the side stream, used on the main one
            pending = nxt
        if pending is not None:
            yield pending
