"""Model-based video extractors: ``frame_cnn`` (an image backbone on sampled frames) and
``clip`` (a torchvision action-recognition model on evenly spaced clips)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import MediaError
from features.image import (
    Cnn,
    CnnConfig,
    check_views,
    is_checkpoint,
    load_checkpoint,
    resolve_device,
    resolve_weights,
    seeded_model,
)
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec
from features.video import check_video, evenly_spaced


def _check_sampling(fps: float | None, num_frames: int | None, max_frames: int) -> None:
    if fps is not None and num_frames is not None:
        raise ValueError(
            f"give at most one of fps ({fps}) and num_frames ({num_frames}); "
            "set num_frames=None to sample by time"
        )
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 or None, got {fps}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    if max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 (0: no cap), got {max_frames}")
    if num_frames and max_frames and num_frames > max_frames:
        raise ValueError(f"num_frames ({num_frames}) exceeds max_frames ({max_frames})")


def _rgb(video: Any, who: str) -> np.ndarray:
    """(T, H, W, 3) uint8 with T >= 1; gray frames are repeated into three channels."""
    v = check_video(video, who)
    if len(v) == 0 or 0 in v.shape[1:3]:
        raise MediaError(f"{who}: video has no frames or no pixels: shape {v.shape}")
    return np.repeat(v[..., None], 3, axis=-1) if v.ndim == 3 else v


# --- frame_cnn ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameCnnConfig:
    """The ``cnn`` extractor's parameters plus the frame sampling done when decoding.

    ``num_frames``: that many frames evenly spaced over the video; ``fps``: frames sampled at
    that rate by timestamp (set ``num_frames=None`` to use it); ``max_frames``: a cap (0: none).
    ``views``, ``crop_scale``, ``flip``, ``augment_seed``: as for ``cnn``, with one crop and flip
    per view shared by all frames of the video (drawn from the sampled frames' content).
    """

    backbone: str = "resnet18"
    weights: str | None = None
    image_size: int = 112
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    fps: float | None = None
    num_frames: int | None = 8
    max_frames: int = 64
    views: int = 1
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    augment_seed: int = 0

    def __post_init__(self) -> None:
        CnnConfig(
            backbone=self.backbone,
            weights=self.weights,
            image_size=self.image_size,
            batch_size=self.batch_size,
            seed=self.seed,
            device=self.device,
        )
        check_views(self)
        _check_sampling(self.fps, self.num_frames, self.max_frames)


@register_extractor
class FrameCnn(Cnn):
    """The image ``cnn`` extractor run on every sampled frame: one embedding row per frame,
    (frames, dim), or (frames, views, dim) with ``views > 1``.

    Frames are sampled when decoding (``decode_request``). ``extract`` embeds the frames it is
    given, after picking ``num_frames`` of them evenly (a no-op on frames decoded with the
    request) and applying the ``max_frames`` cap; gray frames are repeated into RGB. View k of
    a video is one crop and flip applied to all its frames, so it stays consistent over time.
    """

    name = "frame_cnn"
    version = 1
    modality = "video"
    description = "Per-frame pooled features of a torchvision image backbone on sampled frames."
    Config = FrameCnnConfig

    def decode_request(self) -> dict:
        cfg = self.config
        return {
            "gray": False,
            "size": None,
            "fps": cfg.fps,
            "num_frames": cfg.num_frames,
            "max_frames": cfg.max_frames or None,
        }

    def output_spec(self) -> dict[str, FieldSpec]:
        views = self.config.views
        if views > 1:
            return {
                "embedding": FieldSpec(
                    "float32",
                    (None, views, self.embedding_dim()),
                    "(sampled frames, views, dim) pooled backbone features",
                )
            }
        return {
            "embedding": FieldSpec(
                "float32", (None, self.embedding_dim()), "(sampled frames, dim) pooled backbone features"
            )
        }

    def _frames(self, video: Any) -> np.ndarray:
        cfg = self.config
        frames = _rgb(video, self.name)
        if cfg.num_frames and len(frames) != cfg.num_frames:
            frames = frames[evenly_spaced(len(frames), cfg.num_frames)]
        return frames[: cfg.max_frames] if cfg.max_frames else frames

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        return self.extract_batch([media])[0]

    def extract_batch(self, medias: list[Any]) -> list[dict[str, np.ndarray]]:
        videos = [self._frames(m) for m in medias]
        if not videos:
            return []

        def inputs():
            for video in videos:
                views = self._view_list(video)  # from the whole video: one crop per view for all frames
                for frame in video:
                    yield from self._inputs(frame, views)

        # Every view of every frame of every video through the backbone, in batches of batch_size.
        emb, _ = self._embed(inputs(), grid=False)  # (all frames * views, dim)
        k = self.config.views
        bounds = np.cumsum([len(v) * k for v in videos])[:-1]
        return [
            {"embedding": np.ascontiguousarray(e.reshape(len(v), k, -1) if k > 1 else e)}
            for v, e in zip(videos, np.split(emb, bounds), strict=True)
        ]


# --- clip ---------------------------------------------------------------------------------

# torchvision video backbone -> (attribute holding the classification head, embedding dim)
CLIP_BACKBONES = {
    "r3d_18": ("fc", 512),
    "r2plus1d_18": ("fc", 512),
    "mc3_18": ("fc", 512),
    "s3d": ("classifier", 1024),
    "mvit_v1_b": ("head", 768),
}
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


@dataclass(frozen=True)
class ClipConfig:
    """Parameters of the ``clip`` extractor.

    ``weights``: as for ``cnn``: None for random weights seeded by ``seed``, a torchvision
    weights name ("DEFAULT", "KINETICS400_V1", "R3D_18_Weights.KINETICS400_V1") or a local
    ``.pt``/``.pth`` state dict. ``clips`` clips of ``clip_len`` consecutive frames are taken
    evenly spaced over the decoded video; frames are decoded at ``fps`` (15: the rate
    torchvision's Kinetics models were trained at; None: the native rate), at most
    ``max_frames`` of them (0: no cap). mvit_v1_b is built for 16 frames of 224 x 224.
    """

    backbone: str = "r3d_18"
    weights: str | None = None
    clip_len: int = 16
    image_size: int = 112
    clips: int = 1
    seed: int = 0
    device: str = "auto"
    fps: float | None = 15.0
    max_frames: int = 256

    def __post_init__(self) -> None:
        if self.backbone not in CLIP_BACKBONES:
            raise ValueError(
                f"backbone {self.backbone!r} is not supported; use one of {sorted(CLIP_BACKBONES)}"
            )
        if self.clip_len < 1:
            raise ValueError(f"clip_len must be >= 1, got {self.clip_len}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.clips < 1:
            raise ValueError(f"clips must be >= 1, got {self.clips}")
        if self.backbone == "mvit_v1_b" and (self.clip_len, self.image_size) != (16, 224):
            raise ValueError(
                f"mvit_v1_b is built for clip_len=16 and image_size=224, got {self.clip_len} and {self.image_size}"
            )
        _check_sampling(self.fps, None, self.max_frames)
        if self.max_frames and self.max_frames < self.clip_len:
            raise ValueError(f"max_frames ({self.max_frames}) must be 0 or >= clip_len ({self.clip_len})")


def make_clip_preprocess(image_size: int, weights_enum: Any = None):
    """Callable: uint8 tensor (T, 3, H, W) -> normalised float (3, T, image_size, image_size).

    With a torchvision weights enum, its ``transforms()`` (resize, centre crop, Kinetics
    normalisation) scaled to ``image_size``; otherwise a square bilinear resize (antialiased),
    scaling to [0, 1] and the Kinetics mean and std.
    """
    import torch
    from torchvision.transforms.v2 import functional as TF

    if weights_enum is not None:
        default = weights_enum.transforms()
        crop = default.crop_size[0]
        resize = tuple(round(r * image_size / crop) for r in default.resize_size)
        return weights_enum.transforms(crop_size=(image_size, image_size), resize_size=resize)

    mean = torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(KINETICS_STD).view(1, 3, 1, 1)

    def preprocess(x):
        x = TF.resize(x.float().div(255.0), [image_size, image_size], antialias=True)  # (T, 3, s, s)
        return ((x - mean) / std).permute(1, 0, 2, 3)  # (3, T, s, s)

    return preprocess


@register_extractor
class Clip(Extractor):
    """One embedding per clip from a torchvision video classifier with its head removed.

    Clip starts are ``evenly_spaced(T - clip_len + 1, clips)``; a video shorter than
    ``clip_len`` is padded by repeating its last frame (all its clips are then the same).
    """

    name = "clip"
    version = 1
    modality = "video"
    description = "Pooled features of a torchvision action-recognition model on evenly spaced clips."
    Config = ClipConfig

    def __init__(self, config: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._model = None

    def decode_request(self) -> dict:
        cfg = self.config
        return {
            "gray": False,
            "size": None,
            "fps": cfg.fps,
            "num_frames": None,
            "max_frames": cfg.max_frames or None,
        }

    def output_spec(self) -> dict[str, FieldSpec]:
        cfg = self.config
        dim = CLIP_BACKBONES[cfg.backbone][1]
        return {
            "embedding": FieldSpec(
                "float32",
                (cfg.clips, dim),
                f"(clips, dim) pooled {cfg.backbone} features of {cfg.clip_len}-frame clips",
            )
        }

    def setup(self) -> None:
        if self._model is not None:
            return
        import torch
        from torch import nn

        cfg = self.config
        head = CLIP_BACKBONES[cfg.backbone][0]
        enum = resolve_weights(cfg.backbone, cfg.weights, owner=self.name)
        model = seeded_model(cfg.backbone, enum, cfg.seed, owner=self.name)
        setattr(model, head, nn.Identity())
        if is_checkpoint(cfg.weights):
            load_checkpoint(model, str(cfg.weights), head, owner=self.name)
        self._device = torch.device(resolve_device(cfg.device))
        self._model = model.eval().to(self._device)
        self._preprocess = make_clip_preprocess(cfg.image_size, enum)

    def _embed(self, x):
        """(clips, 3, T, s, s) -> (clips, dim)."""
        if self.config.backbone == "s3d":
            # S3D's classifier holds its last layer (a 1x1x1 conv) and its avgpool assumes
            # 224 px: average the feature maps over time and space instead.
            return self._model.features(x).mean(dim=(2, 3, 4))
        return self._model(x)

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        import torch

        cfg = self.config
        frames = _rgb(media, self.name)
        if cfg.max_frames:
            frames = frames[: cfg.max_frames]
        if len(frames) < cfg.clip_len:  # pad by repeating the last frame
            frames = np.concatenate([frames, np.repeat(frames[-1:], cfg.clip_len - len(frames), axis=0)])
        starts = evenly_spaced(len(frames) - cfg.clip_len + 1, cfg.clips)
        self.setup()
        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
        with torch.inference_mode():
            x = torch.stack([self._preprocess(video[s : s + cfg.clip_len]) for s in starts])
            emb = self._embed(x.to(self._device)).float().cpu().numpy()  # (clips, dim)
        return {"embedding": np.ascontiguousarray(emb, dtype=np.float32)}
