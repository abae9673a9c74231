"""Video extractors: ``flow``, OpenCV Farneback optical flow between consecutive frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import MediaError
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec


@dataclass(frozen=True)
class FlowConfig:
    """Frame size and ``cv2.calcOpticalFlowFarneback`` parameters, plus the summaries' sizes.

    ``size=0`` keeps the native frame size; ``max_frames=0`` keeps every frame.
    """

    size: int = 64
    max_frames: int = 32
    pyr_scale: float = 0.5
    levels: int = 3
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2
    grid: int = 4
    bins: int = 8

    def __post_init__(self) -> None:
        if self.size < 0 or 0 < self.size < self.grid:
            raise ValueError(f"size must be 0 (native) or >= grid ({self.grid}), got {self.size}")
        if self.max_frames < 0 or self.max_frames == 1:
            raise ValueError(f"max_frames must be 0 (all) or >= 2, got {self.max_frames}")
        if not 0 < self.pyr_scale < 1:
            raise ValueError(f"pyr_scale must be in (0, 1), got {self.pyr_scale}")
        for key in ("levels", "winsize", "iterations", "poly_n", "grid", "bins"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.poly_sigma <= 0:
            raise ValueError(f"poly_sigma must be > 0, got {self.poly_sigma}")


def flow_stats(flow: np.ndarray, bins: int) -> np.ndarray:
    """(4 + bins,) of one flow field (H, W, 2): mean dx, mean dy, mean and std magnitude,
    then the magnitude-weighted histogram of directions (sums to 1, or all 0 without motion).

    Directions are ``atan2(dy, dx)`` in image coordinates (y points down), bin 0 starting at
    +x (rightwards) and going towards +y.
    """
    import cv2

    dx, dy = flow[..., 0], flow[..., 1]
    mag, ang = cv2.cartToPolar(dx, dy)  # ang in [0, 2*pi)
    idx = np.minimum((ang * (bins / (2 * np.pi))).astype(np.int64), bins - 1)
    hist = np.bincount(idx.ravel(), weights=mag.ravel().astype(np.float64), minlength=bins)
    total = hist.sum()
    hist = hist / total if total > 0 else hist
    head = [
        dx.mean(dtype=np.float64),
        dy.mean(dtype=np.float64),
        mag.mean(dtype=np.float64),
        mag.std(dtype=np.float64),
    ]
    return np.concatenate([head, hist]).astype(np.float32)


def _to_gray_frames(video: Any, size: int) -> np.ndarray:
    """(T, H, W) uint8 from (T, H, W) or (T, H, W, 3) RGB, resized to size x size if needed."""
    import cv2

    v = np.asarray(video)
    if v.dtype != np.uint8 or v.ndim not in (3, 4) or (v.ndim == 4 and v.shape[3] != 3):
        raise MediaError(f"flow: expected uint8 video (frames, height, width[, 3]), got {v.dtype} {v.shape}")
    if v.ndim == 4:
        v = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in v]) if len(v) else v[..., 0]
    if size and v.shape[1:] != (size, size):
        v = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in v]) if len(v) else v
    return v


@register_extractor
class Flow(Extractor):
    name = "flow"
    version = 1
    modality = "video"
    description = "Farneback optical flow per frame pair: global stats, direction histogram, pooled grid."
    Config = FlowConfig

    def decode_request(self) -> dict:
        cfg = self.config
        return {"gray": True, "size": cfg.size or None, "max_frames": cfg.max_frames or None}

    def output_spec(self) -> dict[str, FieldSpec]:
        g, b = self.config.grid, self.config.bins
        return {
            "stats": FieldSpec(
                "float32",
                (None, 4 + b),
                f"(frame pairs, mean dx, mean dy, mean |flow|, std |flow|, {b}-bin direction histogram)",
            ),
            "grid": FieldSpec(
                "float32", (None, 2, g, g), "(frame pairs, dx/dy, grid rows, grid cols) mean flow"
            ),
        }

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        import cv2

        cfg = self.config
        frames = _to_gray_frames(media, cfg.size)
        if cfg.max_frames:
            frames = frames[: cfg.max_frames]
        if len(frames) < 2:
            raise MediaError(f"flow: needs at least 2 frames to compute optical flow, got {len(frames)}")
        if min(frames.shape[1:]) < cfg.grid:
            raise MediaError(
                f"flow: frames of {frames.shape[1:]} px are smaller than the {cfg.grid}x{cfg.grid} grid"
            )
        stats, grids = [], []
        for prev, nxt in zip(frames[:-1], frames[1:], strict=True):
            flow = cv2.calcOpticalFlowFarneback(
                prev,
                nxt,
                None,
                cfg.pyr_scale,
                cfg.levels,
                cfg.winsize,
                cfg.iterations,
                cfg.poly_n,
                cfg.poly_sigma,
                0,
            )  # (H, W, 2): dx, dy in pixels
            stats.append(flow_stats(flow, cfg.bins))
            pooled = cv2.resize(flow, (cfg.grid, cfg.grid), interpolation=cv2.INTER_AREA)  # (g, g, 2)
            grids.append(pooled.transpose(2, 0, 1))
        return {
            "stats": np.stack(stats).astype(np.float32),
            "grid": np.ascontiguousarray(np.stack(grids), dtype=np.float32),
        }
