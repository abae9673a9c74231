"""Fake streaming loaders: synthetic splits where every group carries one independent label bit.

``label = sum(bit_g * 2**(G-1-g))`` over the bit groups, so a single group can know only one bit
(4 classes, 2 groups: at most 50 % accuracy alone) while a fusion of all of them can reach ~100 %.
Batches follow the StreamingLoader contract: zero-padded variable fields with ``lengths`` and
``mask``, and ``present[group] = False`` (features zeroed, length 0) for a missing modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from features.spec import FieldSpec

# Scales of ~1e2 like random-CNN embeddings and MFCCs; image.patch is a pure distractor.
GROUP_FIELDS: dict[str, dict[str, FieldSpec]] = {
    "image": {"image.embedding": FieldSpec("float32", (12,)), "image.patch": FieldSpec("float32", (2, 3))},
    "audio": {"audio.mfcc": FieldSpec("float32", (None, 6))},
    "video": {"video.grid": FieldSpec("float32", (None, 2, 3, 3))},
}
DISTRACTORS = {"image.patch"}
MIN_LEN, MAX_LEN = 2, 9
SCALE = 100.0


@dataclass
class FakeSplit:
    groups: tuple[str, ...]
    keys: list[str]
    label: torch.Tensor  # (n,)
    features: dict[str, torch.Tensor]  # fixed: (n, *shape); variable: (n, MAX_LEN, *frame), zero-padded
    lengths: dict[str, torch.Tensor]  # (n,) for variable fields
    present: dict[str, torch.Tensor]  # (n,) bool per group


def make_split(name: str, n: int, groups: tuple[str, ...], seed: int, missing: float) -> FakeSplit:
    world = torch.Generator().manual_seed(1234)  # class directions, shared by every split
    directions = {
        f: torch.randn(spec.shape[1:] if spec.variable else spec.shape, generator=world)
        for g in groups
        for f, spec in GROUP_FIELDS[g].items()
    }
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n, len(groups)), generator=gen)
    label = (bits * 2 ** torch.arange(len(groups) - 1, -1, -1)).sum(1)
    features, lengths, present = {}, {}, {}
    for i, g in enumerate(groups):
        present[g] = torch.rand(n, generator=gen) >= missing
        for f, spec in GROUP_FIELDS[g].items():
            bit = torch.zeros(n) if f in DISTRACTORS else 2.0 * bits[:, i] - 1.0  # (n,) in {-1, +1}
            ones = [1] * len(spec.shape)
            if spec.variable:
                length = torch.randint(MIN_LEN, MAX_LEN + 1, (n,), generator=gen) * present[g]
                valid = torch.arange(MAX_LEN)[None, :] < length[:, None]  # (n, time)
                noise = torch.randn(n, MAX_LEN, *spec.shape[1:], generator=gen)
                x = SCALE * (noise + 0.8 * bit.view(n, *ones) * directions[f] + 2.0)
                x = x * valid.view(n, MAX_LEN, *ones[1:])  # zero padding after each sequence
                lengths[f] = length
            else:
                noise = torch.randn(n, *spec.shape, generator=gen)
                x = SCALE * (noise + bit.view(n, *ones) * directions[f] + 2.0)
                x = x * present[g].view(n, *ones)  # a missing modality has zero features
            features[f] = x.float()
    keys = [f"{name}-{i:05d}" for i in range(n)]
    return FakeSplit(tuple(groups), keys, label, features, lengths, present)


class FakeLoader:
    """The StreamingLoader interface over an in-memory FakeSplit."""

    def __init__(self, data: FakeSplit, groups: list[str], batch_size: int, shuffle: bool, seed: int = 0):
        unknown = [g for g in groups if g not in data.groups]
        if unknown:
            raise ValueError(f"fake store has no group(s) {unknown}")
        self.data, self.groups = data, list(groups)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, 0
        self.field_specs = {f: s for g in self.groups for f, s in GROUP_FIELDS[g].items()}
        self.field_groups = {f: g for g in self.groups for f in GROUP_FIELDS[g]}
        self.num_classes = 2 ** len(data.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.data.keys) / self.batch_size)

    def __iter__(self):
        n = len(self.data.keys)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 * self.seed + self.epoch))
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield self.collate(order[start : start + self.batch_size])

    def collate(self, idx: torch.Tensor) -> dict:
        d = self.data
        batch = {
            "keys": [d.keys[i] for i in idx.tolist()],
            "label": d.label[idx],
            "features": {},
            "lengths": {},
            "mask": {},
            "present": {g: d.present[g][idx] for g in self.groups},
        }
        for f, spec in self.field_specs.items():
            x = d.features[f][idx]
            if spec.variable:
                length = d.lengths[f][idx]
                t = max(int(length.max()), 1)  # like the real loader: at least one (padded) frame
                batch["features"][f] = x[:, :t].clone()
                batch["lengths"][f] = length
                batch["mask"][f] = torch.arange(t)[None, :] < length[:, None]
            else:
                batch["features"][f] = x.clone()
        return batch


def make_fake_loader_factory(
    groups: tuple[str, ...] = ("image", "audio"),
    sizes: dict[str, int] | None = None,
    batch_size: int = 32,
    missing: float = 0.03,
    seed: int = 0,
):
    """A ``loader_factory(split, groups, shuffle)`` over fresh synthetic train/val/test splits."""
    sizes = sizes or {"train": 512, "val": 256, "test": 256}
    splits = {
        name: make_split(name, n, tuple(groups), seed=100 * seed + i, missing=missing)
        for i, (name, n) in enumerate(sizes.items())
    }

    def factory(split: str, groups: list[str], shuffle: bool) -> FakeLoader:
        return FakeLoader(splits[split], groups, batch_size, shuffle, seed)

    return factory


@pytest.fixture(scope="session")
def fake_loader_factory():
    """``make_fake_loader_factory`` itself: call it with the groups, sizes and batch size you need."""
    return make_fake_loader_factory


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run far faster on one thread (10x on a busy 2-core machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
