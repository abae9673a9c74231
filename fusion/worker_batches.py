"""Batches from DataLoader workers to the main process: one reused shared-memory segment each.

Torch sends every tensor of a worker's batch as its own shared-memory segment: a new segment
per tensor per batch (page faults and zeroing of fresh pages: ~9 ms for an 11 MB batch, against
~1 ms to fill reused memory), each file descriptor fetched by the main process from the
worker's resource-sharer thread (which waits for the worker's GIL: up to a 5 ms switch
interval a batch). Here a worker carves a whole batch out of one segment (``Arena``), taken
from a small per-worker pool (``SlotPool``) and reused once the main process has let go of the
batch that last used it. Two shared ``(workers, slots)`` tables:

- ``flags``: 0 free, 1 sent by the worker, 2 unpacked by the main process (``Receiver``); the
  main process sets 2 back to 0 once no tensor of that batch is alive (checked at every batch
  it unpacks); a worker starting an iteration sets its 1s back to 0: those batches were sent
  before the main process reset the DataLoader, which drops them unseen;
- ``known``: the generation of each slot's segment that the main process holds. A worker sends
  a segment (its file descriptor) only when the main process does not hold it yet, so that
  batches after the first of a slot carry no file descriptor at all.

With pinned memory (CUDA) the main process gets pinned copies, not the segments: workers then
send every segment and the main process only tracks when each batch is let go. When every
slot is in use (the caller holds many batches) a worker takes a fresh, unpooled segment.
The main process gets the same batch dict as without workers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

SLOTS = 4  # per worker: prefetched batches (2 by default), the one in use, one more held by the caller


def torch_dtype(dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class SlotPool:
    """A worker's reusable shared-memory segments; ``flags``, ``known``: its rows of the tables."""

    def __init__(self, flags: torch.Tensor, known: torch.Tensor | None, worker: int) -> None:
        self.flags, self.known, self.worker = flags, known, worker
        self.storages: list[torch.UntypedStorage | None] = [None] * len(flags)
        self.gens = [0] * len(flags)  # generation of each slot's segment (a new segment: +1)

    def reclaim(self) -> None:
        """At the start of an iteration: batches sent but never unpacked were dropped unseen."""
        self.flags[self.flags == 1] = 0

    def get(self, nbytes: int) -> tuple[torch.UntypedStorage, int, int]:
        """A segment of at least ``nbytes``, its slot (-1: a fresh one, not pooled) and generation."""
        flags = self.flags.tolist()
        free = [i for i, f in enumerate(flags) if f == 0]
        fits = [i for i in free if self.storages[i] is not None and self.storages[i].nbytes() >= nbytes]
        if fits:
            slot = min(fits, key=lambda i: self.storages[i].nbytes())
        elif free:  # an empty slot, else a free one, replaced by a bigger segment
            slot = next((i for i in free if self.storages[i] is None), free[0])
            # as large as the largest so far, with room: batches of varying size then fit any slot
            size = max([nbytes + nbytes // 8] + [st.nbytes() for st in self.storages if st is not None])
            self.storages[slot] = None
            self.storages[slot] = torch.UntypedStorage._new_shared(size)
            self.gens[slot] += 1
        else:
            return torch.UntypedStorage._new_shared(nbytes), -1, 0
        self.flags[slot] = 1
        return self.storages[slot], slot, self.gens[slot]

    def held_by_receiver(self, slot: int) -> bool:
        """Whether the main process holds this slot's current segment (then it is not sent)."""
        return self.known is not None and slot >= 0 and int(self.known[slot]) == self.gens[slot]


class Arena:
    """The tensors of one batch carved out of one segment (64-byte aligned), and its packed form."""

    def __init__(self, items: list[tuple[str, str | None, tuple, np.dtype]], pool: SlotPool | None) -> None:
        self.layout, total = [], 0
        for part, name, shape, dtype in items:  # (part of the batch, field or None, shape, dtype)
            self.layout.append((part, name, total, np.dtype(dtype).str, tuple(shape)))
            total += -(-math.prod(shape) * np.dtype(dtype).itemsize // 64) * 64
        self.nbytes = total = max(total, 64)
        self.pool = pool
        if pool is None:
            storage, self.slot = torch.UntypedStorage._new_shared(total), (-1, -1, 0)
        else:
            storage, slot, gen = pool.get(total)
            self.slot = (pool.worker, slot, gen)
        self.flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (total,))
        self.index = {(part, name): i for i, (part, name, *_) in enumerate(self.layout)}

    def tensor(self, part: str, name: str | None = None, *_) -> torch.Tensor:
        return _view(self.flat, *self.layout[self.index[part, name]][2:])

    def pack(self, keys: list[str]) -> dict:
        """The batch to send: its layout, and its segment unless the main process holds it."""
        held = self.pool is not None and self.pool.held_by_receiver(self.slot[1])
        return {
            "packed": self.layout,
            "flat": None if held else self.flat,
            "nbytes": self.nbytes,
            "keys": keys,
            "slot": self.slot,
        }


def _view(flat: torch.Tensor, offset: int, dtype: str, shape: tuple) -> torch.Tensor:
    n = math.prod(shape) * np.dtype(dtype).itemsize
    return flat[offset : offset + n].view(torch_dtype(dtype)).view(shape)


def unpack(batch: dict, flat: torch.Tensor | None = None) -> dict:
    """A packed batch (``Arena.pack``) as the batch dict (views of ``flat``, default the batch's
    own segment); any other batch unchanged."""
    if "packed" not in batch:
        return batch
    flat = batch["flat"] if flat is None else flat
    out = {"keys": batch["keys"], "label": None, "features": {}, "lengths": {}, "mask": {}, "present": {}}
    for part, name, offset, dtype, shape in batch["packed"]:
        t = _view(flat, offset, dtype, shape)
        if name is None:
            out[part] = t
        else:
            out[part][name] = t
    return out


class Receiver:
    """The main process's side: unpacks batches, keeps the workers' segments (``known`` given)
    and frees their slots once their batches are let go."""

    def __init__(self, flags: torch.Tensor | None, known: torch.Tensor | None) -> None:
        self.flags, self.known = flags, known
        self.segments: dict[tuple[int, int], tuple[int, torch.UntypedStorage]] = {}  # (worker, slot)
        self.held: list[tuple[object, int, int]] = []  # (a weak ref, or None: a kept segment; worker, slot)

    def _free(self, ref, worker: int, slot: int) -> bool:
        if ref is not None:
            return ref.expired()
        # only our own reference to the segment is left: no tensor of the batch is alive
        return torch._C._storage_Use_Count(self.segments[worker, slot][1]._cdata) == 1

    def sweep(self) -> None:
        alive = []
        for ref, worker, slot in self.held:
            if self._free(ref, worker, slot):
                self.flags[worker, slot] = 0
            else:
                alive.append((ref, worker, slot))
        self.held = alive

    def unpack(self, batch: dict) -> dict:
        if self.flags is None or "packed" not in batch:
            return unpack(batch)
        self.sweep()
        worker, slot, gen = batch["slot"]
        if slot < 0:
            return unpack(batch)
        if self.known is None:  # pinned copies: track them, keep nothing
            self.flags[worker, slot] = 2
            self.held.append((StorageWeakRef(batch["flat"].untyped_storage()), worker, slot))
            return unpack(batch)
        if batch["flat"] is not None:  # a segment new to us: keep it for the slot's next batches
            self.segments[worker, slot] = (gen, batch["flat"].untyped_storage())
            self.known[worker, slot] = gen
        kept_gen, storage = self.segments.get((worker, slot), (None, None))
        if kept_gen != gen:
            raise RuntimeError(
                f"StreamingLoader: worker {worker} sent a batch in slot {slot} (segment {gen}) that this "
                f"process does not hold (it holds {kept_gen}); please report this"
            )
        self.flags[worker, slot] = 2
        self.held.append((None, worker, slot))
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (batch["nbytes"],))
        return unpack(batch, flat)
