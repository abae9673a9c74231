"""Image extractors: ``cnn``, the pooled penultimate features of a torchvision backbone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import ConfigError, MediaError
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

# Backbone family (name prefix) -> attribute holding the classification head.
_HEADS = {
    "resnet": "fc",
    "resnext": "fc",
    "wide_resnet": "fc",
    "regnet": "fc",
    "mobilenet": "classifier",
    "efficientnet": "classifier",
    "vit": "heads",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECKPOINT_SUFFIXES = (".pt", ".pth")


def _head_attr(backbone: str) -> str | None:
    # Longest prefix first, so "wide_resnet50_2" is not taken for a plain resnet.
    for prefix in sorted(_HEADS, key=len, reverse=True):
        if backbone.startswith(prefix):
            return _HEADS[prefix]
    return None


def _random_weights(weights: str | None) -> bool:
    return weights is None or str(weights).lower() == "none"


def is_checkpoint(weights: str | None) -> bool:
    """Whether ``weights`` names a local ``.pt``/``.pth`` state dict (load it with ``load_checkpoint``)."""
    return not _random_weights(weights) and str(weights).lower().endswith(_CHECKPOINT_SUFFIXES)


@dataclass(frozen=True)
class CnnConfig:
    """Parameters of the ``cnn`` extractor.

    ``weights``: None or "none" for random weights seeded by ``seed``; a torchvision weights
    name ("DEFAULT", "IMAGENET1K_V1" or "ResNet18_Weights.IMAGENET1K_V1", downloaded where
    there is a network); or a local ``.pt``/``.pth`` state dict of the model.
    """

    backbone: str = "resnet18"
    weights: str | None = None
    image_size: int = 224
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if _head_attr(self.backbone) is None:
            raise ValueError(
                f"backbone {self.backbone!r} is not supported; use a torchvision model of the "
                f"families {sorted(_HEADS)} (e.g. resnet18, resnet50, mobilenet_v3_small, "
                "efficientnet_b0, vit_b_16)"
            )
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_weights(backbone: str, weights: str | None, owner: str = "cnn"):
    """The torchvision weights enum member ``weights`` names for ``backbone``; None for random
    weights (None or "none") and for a local checkpoint file."""
    if _random_weights(weights) or is_checkpoint(weights):
        return None
    return _weights_enum(backbone, str(weights), owner)


def _weights_enum(backbone: str, weights: str, owner: str = "cnn"):
    """The torchvision weights enum member named by ``weights`` for ``backbone``."""
    from torchvision import models

    try:
        enum_cls = models.get_model_weights(backbone)
    except ValueError as exc:
        raise ConfigError(f"extractor {owner!r}: unknown torchvision backbone {backbone!r}") from exc
    name = weights.split(".", 1)[1] if weights.startswith(enum_cls.__name__ + ".") else weights
    if name == "DEFAULT":
        return enum_cls.DEFAULT
    try:
        return enum_cls[name]
    except KeyError:
        valid = ["DEFAULT"] + [m.name for m in enum_cls]
        raise ConfigError(
            f"extractor {owner!r}: weights {weights!r} do not exist for {backbone!r}; "
            f"valid: {valid}, None, or a local .pt/.pth file"
        ) from None


def make_preprocess(image_size: int, weights_enum: Any = None):
    """Callable: uint8 tensor (3, H, W) -> normalised float (3, image_size, image_size).

    With a torchvision weights enum, its ``transforms()`` (resize the short side, centre
    crop, normalise) scaled to ``image_size``; otherwise a plain square resize and ImageNet
    normalisation.
    """
    import torch
    from torchvision.transforms.v2 import functional as TF

    if weights_enum is not None:
        default = weights_enum.transforms()
        crop = default.crop_size[0]
        resize = round(default.resize_size[0] * image_size / crop)
        return weights_enum.transforms(crop_size=image_size, resize_size=resize)

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def preprocess(x):
        x = TF.resize(x.float().div(255.0), [image_size, image_size], antialias=True)
        return (x - mean) / std

    return preprocess


def seeded_model(backbone: str, enum: Any, seed: int, owner: str = "cnn", **kwargs: Any):
    """``torchvision.models.get_model(backbone, weights=enum, **kwargs)`` with its random init
    seeded by ``seed``; build and download failures become ConfigErrors naming ``owner``."""
    import torch
    from torchvision import models

    # Seed only the CPU generator (weight init runs on the CPU) and restore it afterwards, so
    # the same seed gives the same weights in every process without touching global state.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        try:
            return models.get_model(backbone, weights=enum, **kwargs)
        except (ValueError, AssertionError) as exc:  # unknown name; ViT size not a patch multiple
            raise ConfigError(f"extractor {owner!r}: cannot build backbone {backbone!r}: {exc}") from exc
        except (OSError, RuntimeError) as exc:  # download failed
            raise ConfigError(
                f"extractor {owner!r}: cannot load weights {enum!s} for {backbone!r} ({exc}); "
                "without network access use weights=None or a local .pt/.pth file"
            ) from exc


def build_backbone(backbone: str, weights: str | None, image_size: int, seed: int, owner: str = "cnn"):
    """(headless model in eval mode, embedding dim, weights enum or None); nothing downloaded
    unless ``weights`` names torchvision weights."""
    from torch import nn

    head = _head_attr(backbone)
    enum = resolve_weights(backbone, weights, owner)
    kwargs: dict[str, Any] = {}
    if backbone.startswith("vit"):
        if enum is not None and enum.meta["min_size"][0] != image_size:
            raise ConfigError(
                f"extractor {owner!r}: {backbone} with weights {weights!r} needs image_size="
                f"{enum.meta['min_size'][0]}, got {image_size}"
            )
        if enum is None:
            kwargs["image_size"] = image_size  # ViT's position embeddings are sized at build time
    model = seeded_model(backbone, enum, seed, owner, **kwargs)
    dim = next(m for m in getattr(model, head).modules() if isinstance(m, nn.Linear)).in_features
    setattr(model, head, nn.Identity())
    if is_checkpoint(weights):
        load_checkpoint(model, str(weights), head, owner)
    return model.eval(), dim, enum


def load_checkpoint(model, path: str, head: str | None, owner: str = "cnn") -> None:
    """Load a local state dict; the weights of the classification head ``head``, if any, are ignored."""
    import torch

    if not os.path.isfile(path):
        raise ConfigError(f"extractor {owner!r}: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"extractor {owner!r}: cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):  # common training-checkpoint wrappers
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ConfigError(f"extractor {owner!r}: {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if head is not None:
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"extractor {owner!r}: {path} does not fit the backbone: {exc}") from exc


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise MediaError(
            f"cnn: expected a uint8 RGB image of shape (height, width, 3), got {image.dtype} {image.shape}"
        )
    return image if image.flags.writeable else image.copy()  # torch warns on read-only arrays


@register_extractor
class Cnn(Extractor):
    name = "cnn"
    version = 1
    modality = "image"
    description = "Pooled penultimate features of a torchvision CNN/ViT backbone."
    Config = CnnConfig

    def __init__(self, config: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._model = None
        self._dim: int | None = None

    def setup(self) -> None:
        if self._model is not None:
            return
        import torch

        cfg = self.config
        model, self._dim, enum = build_backbone(
            cfg.backbone, cfg.weights, cfg.image_size, cfg.seed, owner=self.name
        )
        self._device = torch.device(resolve_device(cfg.device))
        self._model = model.to(self._device)
        self._preprocess = make_preprocess(cfg.image_size, enum)

    def embedding_dim(self) -> int:
        if self._dim is None:
            # Building on the meta device allocates and initialises nothing: milliseconds.
            import torch
            from torch import nn
            from torchvision import models

            try:
                with torch.device("meta"):
                    model = models.get_model(self.config.backbone, weights=None)
            except ValueError as exc:
                raise ConfigError(
                    f"extractor {self.name!r}: unknown torchvision backbone {self.config.backbone!r}"
                ) from exc
            head = getattr(model, _head_attr(self.config.backbone))
            self._dim = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
        return self._dim

    def output_spec(self) -> dict[str, FieldSpec]:
        return {"embedding": FieldSpec("float32", (self.embedding_dim(),), "pooled backbone features")}

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        return self.extract_batch([media])[0]

    def extract_batch(self, medias: list[Any]) -> list[dict[str, np.ndarray]]:
        import torch

        self.setup()
        images = [_check_image(m) for m in medias]
        out: list[dict[str, np.ndarray]] = []
        bs = self.config.batch_size
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                batch = torch.stack(
                    [
                        self._preprocess(torch.from_numpy(img).permute(2, 0, 1))  # (3, H, W) uint8
                        for img in images[start : start + bs]
                    ]
                ).to(self._device)
                emb = self._model(batch).float().cpu().numpy()  # (batch, dim)
                out.extend({"embedding": np.ascontiguousarray(e, dtype=np.float32)} for e in emb)
        return out
