"""Which samples an epoch reads, and where: index arithmetic only, no data.

``EpochOrder`` is an epoch's global sample order, a pure function of (shard sizes, shuffle,
seed, epoch, window) and the same for every world size; ``EpochPlan`` cuts it into the
batches of one rank (equal counts per rank) from a start position, which is what makes
``StreamingLoader.state_dict()`` resume exact on any world size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from features.errors import ConfigError


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([x % 2**64 for x in entropy])


class EpochOrder:
    """The global sample order of one epoch, the same for every world size.

    Shards in split order, or with ``shuffle`` in an order drawn from (seed, epoch); their
    samples concatenated; with ``shuffle`` that sequence is then permuted within
    consecutive windows of ``window`` samples, and the result again within windows shifted
    by half a window (so no window boundary survives), each window by its own draw from
    (seed, epoch, pass, window index). With ``lengths`` (one per sample, in split order) and
    ``bucket``, the result is then sorted by length within consecutive buckets of ``bucket``
    positions (stable, so ties keep the shuffled order): consecutive positions, hence the
    samples of a batch, have similar lengths. ``locate`` maps positions of this order to samples:
    a position's sample lies at most two windows (plus a bucket) before it, so reading needs only
    the shards of about two windows (and a bucket) at a time. Memory is O(shards + window +
    bucket), whatever the number of samples (plus the lengths, when bucketing).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        shuffle: bool,
        seed: int,
        epoch: int,
        window: int,
        lengths: np.ndarray | None = None,
        bucket: int = 0,
    ) -> None:
        sizes = np.asarray(sizes, dtype=np.int64)
        self.n = int(sizes.sum())
        self.shard_order = _rng(seed, epoch, 0).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
        # starts[k]: position of the k-th shard of the epoch's shard order in the concatenation
        self.starts = np.concatenate([[0], np.cumsum(sizes[self.shard_order])])
        self.window = window if shuffle else 0
        self.seed, self.epoch = seed, epoch
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        # Bucketing: lengths[i] of the i-th sample in split order (shards in split order)
        self.bucket = bucket if lengths is not None and bucket > 0 else 0
        if self.bucket:
            self.lengths = np.asarray(lengths)
            if len(self.lengths) != self.n:
                raise ConfigError(f"EpochOrder: {len(self.lengths)} lengths for {self.n} samples")
            self.split_starts = np.concatenate([[0], np.cumsum(sizes)])
        self._chunks: dict[int, np.ndarray] = {}

    def _bounds(self, shift: int, m: int) -> tuple[int, int]:
        return max(0, m * self.window - shift), min(self.n, (m + 1) * self.window - shift)

    def _permute(self, p: np.ndarray, shift: int) -> np.ndarray:
        """Each position replaced by its image under its window's permutation (windows start at -shift)."""
        out = np.empty_like(p)
        block = (p + shift) // self.window
        for m in np.unique(block).tolist():
            perm = self._perms.get((shift, m))
            lo, hi = self._bounds(shift, m)
            if perm is None:
                if len(self._perms) >= 8:  # a batch rarely spans more than two windows per pass
                    self._perms.pop(next(iter(self._perms)))
                perm = self._perms[shift, m] = _rng(self.seed, self.epoch, 1 + shift, m).permutation(hi - lo)
            sel = block == m
            out[sel] = lo + perm[p[sel] - lo]
        return out

    def _shuffled(self, p: np.ndarray) -> np.ndarray:
        if not self.window:
            return p
        return self._permute(self._permute(p, self.window // 2), 0)

    def _chunk(self, m: int) -> np.ndarray:
        """Concatenation indices of bucket ``m``'s positions, sorted by length (stable: ties keep
        the shuffled order)."""
        order = self._chunks.get(m)
        if order is None:
            lo, hi = m * self.bucket, min(self.n, (m + 1) * self.bucket)
            c = self._shuffled(np.arange(lo, hi, dtype=np.int64))
            k = np.searchsorted(self.starts, c, side="right") - 1
            split_index = self.split_starts[self.shard_order[k]] + (c - self.starts[k])
            order = c[np.argsort(self.lengths[split_index], kind="stable")]
            if len(self._chunks) >= 4:  # a batch rarely spans more than two buckets
                self._chunks.pop(next(iter(self._chunks)))
            self._chunks[m] = order
        return order

    def concat_index(self, positions: np.ndarray) -> np.ndarray:
        """Positions in the epoch order (taken modulo n) -> positions in the shard concatenation."""
        p = np.asarray(positions, dtype=np.int64) % self.n
        if not self.bucket:
            return self._shuffled(p)
        out = np.empty_like(p)
        chunk = p // self.bucket
        for m in np.unique(chunk).tolist():
            sel = chunk == m
            out[sel] = self._chunk(m)[p[sel] - m * self.bucket]
        return out

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions -> (k, index): the k-th shard of ``shard_order`` and the sample's index in it."""
        c = self.concat_index(positions)
        k = np.searchsorted(self.starts, c, side="right") - 1  # 'right' steps over empty shards
        return k, c - self.starts[k]

    def window_start(self, position: int) -> int:
        """The lowest concatenation index that ``position`` or any later position can map to."""
        p = position % self.n
        if self.bucket:  # any position of p's bucket may come next
            p -= p % self.bucket
        if not self.window:
            return p
        lo, _ = self._bounds(self.window // 2, (p + self.window // 2) // self.window)
        return lo - lo % self.window


class EpochPlan:
    """One rank's batches of one epoch, from position ``start`` of the ``EpochOrder`` on.

    The order is consumed in steps of ``world * batch_size`` positions: in each full step
    rank r takes the r-th run of ``batch_size``. The last, partial step of L positions is
    dropped with ``drop_last``; otherwise each rank takes ceil(L / world) of it, and the
    positions past the end wrap to the start of the epoch order (fewer than ``world``
    samples are repeated). So every sample is seen once per epoch (plus that padding),
    every rank yields the same number of batches, and after j batches of every rank the
    ranks have consumed exactly the first ``consumed_after(j - 1)`` positions: a resume,
    on any world size, partitions the rest.
    """

    def __init__(
        self,
        order: EpochOrder,
        start: int,
        rank: int,
        world: int,
        batch_size: int,
        drop_last: bool,
    ) -> None:
        self.order, self.start, self.rank, self.world = order, start, rank, world
        self.batch_size, self.drop_last = batch_size, drop_last
        self.step = world * batch_size
        self.full_steps, self.last = divmod(order.n - start, self.step)

    @property
    def num_batches(self) -> int:
        return self.full_steps + (1 if self.last and not self.drop_last else 0)

    def positions(self, j: int) -> np.ndarray:
        """Epoch-order positions of this rank's batch ``j`` (those >= n are padding)."""
        if j < self.full_steps:
            first = self.start + j * self.step + self.rank * self.batch_size
            return np.arange(first, first + self.batch_size, dtype=np.int64)
        b = math.ceil(self.last / self.world)
        first = self.start + self.full_steps * self.step + self.rank * b
        return np.arange(first, first + b, dtype=np.int64)

    def consumed_after(self, j: int) -> int:
        """Positions every rank together has consumed once each has yielded batch ``j``."""
        return min(self.start + (j + 1) * self.step, self.order.n)


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torch.distributed's when initialised, else (0, 1)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist else 1
    if rank is None:
        rank = torch.distributed.get_rank() if dist else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"StreamingLoader: rank {rank} with world_size {world_size}: need 0 <= rank < world_size; "
            "pass this process's rank and the number of processes, or leave both None to use "
            "torch.distributed's"
        )
    return rank, world_size
