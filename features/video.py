"""Video extractors: ``flow``, optical flow between consecutive frames (OpenCV Farneback, or
torchvision RAFT), summarised per frame pair. The model-based video extractors (``frame_cnn``,
``clip``) live in ``video_models``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import MediaError
from features.image import is_checkpoint, load_checkpoint, resolve_device, resolve_weights, seeded_model
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

FLOW_METHODS = ("farneback", "raft")
RAFT_MODELS = ("raft_small", "raft_large")
_RAFT_MIN_SIZE = 128  # RAFT downsamples by 8 and its correlation pyramid needs 16x16 feature maps
_RAFT_PAIRS_PER_BATCH = 8


def evenly_spaced(total: int, count: int) -> np.ndarray:
    """``count`` indices evenly spaced over ``range(total)``: ``np.round(np.linspace(0, total - 1,
    count))`` (halves round to even); indices repeat when ``count > total``, empty if ``total == 0``."""
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.round(np.linspace(0, total - 1, count)).astype(np.int64)


@dataclass(frozen=True)
class FlowConfig:
    """Frame size and ``cv2.calcOpticalFlowFarneback`` parameters, plus the summaries' sizes.

    ``size=0`` keeps the native frame size; ``max_frames=0`` keeps every frame.

    ``method="raft"`` computes the flow with torchvision's ``raft_model`` on RGB frames instead
    (``size`` must then be 0 or a multiple of 8 >= 128), taking its last of ``raft_iters``
    refinements. ``raft_weights``: None for random weights seeded by ``seed`` (for tests only),
    a torchvision weights name ("DEFAULT", "C_T_V2" or "Raft_Small_Weights.C_T_V2") or a local
    ``.pt``/``.pth`` state dict. ``device``: "auto" (CUDA when available), "cpu", "cuda:1"...
    The Farneback parameters are ignored by RAFT and the RAFT ones by Farneback.
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
    method: str = "farneback"
    raft_model: str = "raft_small"
    raft_weights: str | None = None
    raft_iters: int = 12
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in FLOW_METHODS:
            raise ValueError(f"method must be one of {FLOW_METHODS}, got {self.method!r}")
        if self.raft_model not in RAFT_MODELS:
            raise ValueError(f"raft_model must be one of {RAFT_MODELS}, got {self.raft_model!r}")
        if self.raft_iters < 1:
            raise ValueError(f"raft_iters must be >= 1, got {self.raft_iters}")
        if self.method == "raft" and self.size and (self.size % 8 or self.size < _RAFT_MIN_SIZE):
            raise ValueError(
                f"method='raft' needs size to be 0 (native) or a multiple of 8 >= {_RAFT_MIN_SIZE} "
                f"(RAFT downsamples by 8 and its correlation pyramid needs 16x16 feature maps), got {self.size}"
            )
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


def check_video(video: Any, who: str) -> np.ndarray:
    """The video as a uint8 array (T, H, W) or (T, H, W, 3), or a MediaError naming ``who``."""
    v = np.asarray(video)
    if v.dtype != np.uint8 or v.ndim not in (3, 4) or (v.ndim == 4 and v.shape[3] != 3):
        raise MediaError(f"{who}: expected uint8 video (frames, height, width[, 3]), got {v.dtype} {v.shape}")
    return v


def _to_gray_frames(video: Any, size: int) -> np.ndarray:
    """(T, H, W) uint8 from (T, H, W) or (T, H, W, 3) RGB, resized to size x size if needed."""
    import cv2

    v = check_video(video, "flow")
    if v.ndim == 4:
        v = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in v]) if len(v) else v[..., 0]
    if size and v.shape[1:] != (size, size):
        v = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in v]) if len(v) else v
    return v


def _to_rgb_frames(video: Any, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 from (T, H, W) gray or (T, H, W, 3) RGB, resized to size x size if needed."""
    import cv2

    v = check_video(video, "flow")
    if v.ndim == 3:
        v = np.repeat(v[..., None], 3, axis=-1)
    if size and v.shape[1:3] != (size, size):
        v = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in v]) if len(v) else v
    return v


@register_extractor
class Flow(Extractor):
    name = "flow"
    version = 1
    modality = "video"
    description = (
        "Optical flow per frame pair (Farneback or RAFT): global stats, direction histogram, pooled grid."
    )
    Config = FlowConfig

    def __init__(self, config: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._raft = None

    def decode_request(self) -> dict:
        cfg = self.config
        gray = cfg.method == "farneback"  # RAFT reads RGB
        return {"gray": gray, "size": cfg.size or None, "max_frames": cfg.max_frames or None}

    def setup(self) -> None:
        if self.config.method != "raft" or self._raft is not None:
            return
        import torch

        cfg = self.config
        enum = resolve_weights(cfg.raft_model, cfg.raft_weights, owner=self.name)
        model = seeded_model(cfg.raft_model, enum, cfg.seed, owner=self.name)
        if is_checkpoint(cfg.raft_weights):
            load_checkpoint(model, str(cfg.raft_weights), None, owner=self.name)
        self._device = torch.device(resolve_device(cfg.device))
        self._raft = model.eval().to(self._device)
        self._raft_transforms = enum.transforms() if enum is not None else _raft_transforms

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
        cfg = self.config
        if cfg.method == "raft":
            frames = _to_rgb_frames(media, cfg.size)
        else:
            frames = _to_gray_frames(media, cfg.size)
        if cfg.max_frames:
            frames = frames[: cfg.max_frames]
        if len(frames) < 2:
            raise MediaError(f"flow: needs at least 2 frames to compute optical flow, got {len(frames)}")
        if min(frames.shape[1:3]) < cfg.grid:
            raise MediaError(
                f"flow: frames of {frames.shape[1:3]} px are smaller than the {cfg.grid}x{cfg.grid} grid"
            )
        import cv2

        flows = self._raft_flows(frames) if cfg.method == "raft" else self._farneback_flows(frames)
        stats, grids = [], []
        for flow in flows:  # (H, W, 2): dx, dy in pixels
            stats.append(flow_stats(flow, cfg.bins))
            pooled = cv2.resize(flow, (cfg.grid, cfg.grid), interpolation=cv2.INTER_AREA)  # (g, g, 2)
            grids.append(pooled.transpose(2, 0, 1))
        return {
            "stats": np.stack(stats).astype(np.float32),
            "grid": np.ascontiguousarray(np.stack(grids), dtype=np.float32),
        }

    def _farneback_flows(self, frames: np.ndarray):
        import cv2

        cfg = self.config
        for prev, nxt in zip(frames[:-1], frames[1:], strict=True):
            yield cv2.calcOpticalFlowFarneback(
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
            )

    def _raft_flows(self, frames: np.ndarray):
        import torch

        h, w = frames.shape[1:3]
        if h % 8 or w % 8 or min(h, w) < _RAFT_MIN_SIZE:
            raise MediaError(
                f"flow: RAFT needs frames whose sides are multiples of 8 and >= {_RAFT_MIN_SIZE}, "
                f"got {h}x{w}; set size to such a value"
            )
        self.setup()
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        pairs = len(video) - 1
        with torch.inference_mode():
            for start in range(0, pairs, _RAFT_PAIRS_PER_BATCH):
                end = min(start + _RAFT_PAIRS_PER_BATCH, pairs)
                first, second = self._raft_transforms(video[start:end], video[start + 1 : end + 1])
                preds = self._raft(
                    first.to(self._device), second.to(self._device), num_flow_updates=self.config.raft_iters
                )
                flows = preds[-1].float().cpu().permute(0, 2, 3, 1).numpy()  # (pairs, H, W, 2)
                yield from np.ascontiguousarray(flows)


def _raft_transforms(first, second):
    """torchvision's ``OpticalFlow`` preset: uint8 -> float in [-1, 1], for weights=None/checkpoints."""
    return (first.float() / 255 - 0.5) / 0.5, (second.float() / 255 - 0.5) / 0.5
