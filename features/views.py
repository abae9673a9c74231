"""Augmented views: which random resized crop and flip view K of an item gets.

A view is a pure function of the item's content, ``augment_seed`` and the view index, so it
is the same in every batch, order and process; ``cnn`` and ``frame_cnn`` apply it.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Any

import numpy as np

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


def check_views(config: Any) -> None:
    """Validate the ``views``, ``crop_scale``, ``flip`` and ``augment_seed`` fields of a frozen
    config, storing ``crop_scale`` as a tuple of two floats."""
    views = config.views
    if not isinstance(views, numbers.Integral) or isinstance(views, bool) or views < 1:
        raise ValueError(f"views must be an integer >= 1 (1: no augmentation), got {views!r}")
    scale = config.crop_scale
    ok = (
        isinstance(scale, (tuple, list))
        and len(scale) == 2
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scale)
    )
    if not ok or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(
            f"crop_scale must be two area fractions (low, high) with 0 < low <= high <= 1, got {scale!r}"
        )
    object.__setattr__(config, "crop_scale", (float(scale[0]), float(scale[1])))
    if not isinstance(config.flip, bool):
        raise ValueError(f"flip must be true or false, got {config.flip!r}")
    seed = config.augment_seed
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"augment_seed must be an integer, got {seed!r}")


# --- augmented views ------------------------------------------------------------------------
# Crop and flip are drawn with a private torch.Generator seeded from the media's content, not
# with torchvision's v2.RandomResizedCrop / v2.RandomHorizontalFlip objects: those draw from the
# global RNG, and seeding it (fork_rng + manual_seed) races with any other thread using it (Dask
# threaded workers). ``sample_view`` makes the same draws, in the same order, as
# v2.RandomResizedCrop.make_params then v2.RandomHorizontalFlip, so under a global seed equal to
# ``view_seed`` torchvision's transforms pick the same view; the transforms are then applied with
# torchvision.transforms.v2.functional (resized_crop, horizontal_flip).


def content_digest(media: np.ndarray) -> bytes:
    """sha256 of an array's dtype, shape and bytes: the identity views are derived from."""
    a = np.ascontiguousarray(media)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a))
    return h.digest()


def seed_from_digest(digest: bytes, augment_seed: int, view: int) -> int:
    return int.from_bytes(hashlib.sha256(digest + f":{augment_seed}:{view}".encode()).digest()[:8], "little")


def view_seed(media: np.ndarray, augment_seed: int, view: int) -> int:
    """The 64-bit seed of view ``view`` of ``media``: sha256 of its content, ``augment_seed``
    and ``view``; independent of batch composition, order and process."""
    return seed_from_digest(content_digest(media), augment_seed, view)


def sample_view(
    height: int, width: int, seed: int, crop_scale: tuple[float, float], flip: bool
) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flipped) of a random resized crop of a ``height`` x ``width``
    image, drawn from a torch.Generator seeded with ``seed`` exactly as RandomResizedCrop
    (scale ``crop_scale``, ratio 3/4..4/3) then RandomHorizontalFlip(p=0.5) draw them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    area = height * width
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(crop_scale[0], crop_scale[1], generator=g).item()
        aspect = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=g)
        ).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            break
    else:  # torchvision's fallback: the central crop at the nearest allowed aspect ratio
        in_ratio = width / height
        if in_ratio < min(CROP_RATIO):
            w, h = width, int(round(width / min(CROP_RATIO)))
        elif in_ratio > max(CROP_RATIO):
            w, h = int(round(height * max(CROP_RATIO))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flipped = bool(torch.rand(1, generator=g).item() < 0.5) and flip
    return top, left, h, w, flipped


def view_params(
    media: np.ndarray,
    augment_seed: int,
    view: int,
    crop_scale: tuple[float, float] = (0.6, 1.0),
    flip: bool = True,
) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flipped) of view ``view`` of ``media``, as ``cnn`` (an
    (H, W, 3) uint8 image) and ``frame_cnn`` (its sampled (T, H, W, 3) RGB frames: one crop for
    every frame of a view) with ``views > 1`` take it."""
    media = np.asarray(media)
    if media.ndim not in (3, 4) or media.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image or (T, H, W, 3) frames, got shape {media.shape}")
    height, width = media.shape[-3:-1]
    return sample_view(height, width, view_seed(media, augment_seed, view), crop_scale, flip)
