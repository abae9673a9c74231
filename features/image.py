"""Image extractors: ``cnn``, the pooled penultimate features of a torchvision backbone,
optionally of several augmented views per image and with the spatial feature map (``grid``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

from features.errors import ConfigError, MediaError
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec
from features.views import check_views, content_digest, sample_view, seed_from_digest, view_params, view_seed  # noqa: F401  (public via features.image too)

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
# Backbone family -> module whose output is the last feature map before global pooling.
_GRID_MODULES = {
    "resnet": "layer4",
    "resnext": "layer4",
    "wide_resnet": "layer4",
    "regnet": "trunk_output",
    "mobilenet": "features",
    "efficientnet": "features",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECKPOINT_SUFFIXES = (".pt", ".pth")


def _family(backbone: str) -> str | None:
    # Longest prefix first, so "wide_resnet50_2" is not taken for a plain resnet.
    for prefix in sorted(_HEADS, key=len, reverse=True):
        if backbone.startswith(prefix):
            return prefix
    return None


def _head_attr(backbone: str) -> str | None:
    family = _family(backbone)
    return None if family is None else _HEADS[family]


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

    ``views=1``: the image as is (resized, or the weights' own transforms); ``views=K > 1``: K
    augmented views, each a random resized crop (area fraction in ``crop_scale``, aspect ratio
    in 3/4..4/3, resized to ``image_size``) flipped horizontally with probability 0.5 when
    ``flip``; drawn deterministically from the image's content, ``augment_seed`` and the view
    index (see ``view_params``). ``grid``: also output the backbone's last feature map.
    """

    backbone: str = "resnet18"
    weights: str | None = None
    image_size: int = 224
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    views: int = 1
    crop_scale: tuple[float, float] = (0.6, 1.0)
    flip: bool = True
    augment_seed: int = 0
    grid: bool = False

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
        check_views(self)
        if not isinstance(self.grid, bool):
            raise ValueError(f"grid must be true or false, got {self.grid!r}")
        if self.grid and _family(self.backbone) == "vit":
            raise ValueError(
                f"grid is not available for ViT backbones ({self.backbone} has no spatial feature "
                "map before pooling); use a CNN backbone or grid=False"
            )


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


def make_view_preprocess(image_size: int, weights_enum: Any = None):
    """Callable: (uint8 tensor (3, H, W), view params) -> normalised float (3, image_size,
    image_size): crop and resize (bilinear, antialiased), flip, then the weights' normalisation
    (ImageNet's for random weights)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    if weights_enum is not None:
        default = weights_enum.transforms()
        mean_std = (default.mean, default.std)
    else:
        mean_std = (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in mean_std)

    def preprocess(x, params: tuple[int, int, int, int, bool]):
        top, left, height, width, flipped = params
        x = TF.resized_crop(x.float().div(255.0), top, left, height, width, [image_size, image_size])
        if flipped:
            x = TF.horizontal_flip(x)
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
    return image


def _tensor(image: np.ndarray):
    """uint8 (H, W, 3) array -> uint8 tensor (3, H, W)."""
    import torch

    image = image if image.flags.writeable else image.copy()  # torch warns on read-only arrays
    return torch.from_numpy(image).permute(2, 0, 1)


@register_extractor
class Cnn(Extractor):
    """Pooled features of a torchvision backbone with its head removed: ``embedding`` (dim,),
    or (views, dim) with ``views > 1``; with ``grid`` also the last feature map before global
    pooling, ``grid`` (channels, h, w) or (views, channels, h, w)."""

    name = "cnn"
    version = 1
    modality = "image"
    description = "Pooled penultimate features of a torchvision CNN/ViT backbone."
    Config = CnnConfig

    def __init__(self, config: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._model = None
        self._dim: int | None = None
        self._grid_shape: tuple[int, int, int] | None = None

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
        self._view_preprocess = make_view_preprocess(cfg.image_size, enum)

    def _shape_model(self):
        """The backbone with random weights, built on the meta device (allocates and initialises
        nothing: milliseconds) where the model allows it, else on the CPU."""
        import torch
        from torchvision import models

        backbone = self.config.backbone
        try:
            try:
                with torch.device("meta"):
                    return models.get_model(backbone, weights=None)
            except NotImplementedError:  # RegNet computes its widths from tensors at build time
                return models.get_model(backbone, weights=None)
        except ValueError as exc:
            raise ConfigError(f"extractor {self.name!r}: unknown torchvision backbone {backbone!r}") from exc

    def embedding_dim(self) -> int:
        if self._dim is None:
            from torch import nn

            head = getattr(self._shape_model(), _head_attr(self.config.backbone))
            self._dim = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features
        return self._dim

    def grid_shape(self) -> tuple[int, int, int]:
        """(channels, h, w) of the last feature map at ``image_size``, from a forward on the meta device."""
        if self._grid_shape is None:
            import torch

            model = self._shape_model().eval()
            param = next(model.parameters())
            x = torch.zeros(1, 3, self.config.image_size, self.config.image_size, device=param.device)
            with torch.inference_mode():
                _, grid = self._forward(model, x, grid=True)
            self._grid_shape = tuple(grid.shape[1:])
        return self._grid_shape

    def output_spec(self) -> dict[str, FieldSpec]:
        cfg = self.config
        views = (cfg.views,) if cfg.views > 1 else ()
        per = "(views, dim) " if views else ""
        spec = {
            "embedding": FieldSpec(
                "float32", (*views, self.embedding_dim()), f"{per}pooled backbone features"
            )
        }
        if cfg.grid:
            spec["grid"] = FieldSpec(
                "float32",
                (*views, *self.grid_shape()),
                f"({'views, ' if views else ''}channels, h, w) last feature map before global pooling",
            )
        return spec

    def _view_list(self, media: np.ndarray) -> list[tuple[int, int, int, int, bool] | None]:
        """The views of ``media`` (an image, or one video's frames): [None] for the plain image."""
        cfg = self.config
        if cfg.views == 1:
            return [None]
        digest = content_digest(media)
        height, width = media.shape[-3:-1]
        return [
            sample_view(
                height, width, seed_from_digest(digest, cfg.augment_seed, k), cfg.crop_scale, cfg.flip
            )
            for k in range(cfg.views)
        ]

    def _inputs(self, image: np.ndarray, views: list) -> Iterator[Any]:
        """Normalised float (3, image_size, image_size) tensors: one per view of ``image``."""
        x = _tensor(image)  # (3, H, W) uint8
        for params in views:
            yield self._preprocess(x) if params is None else self._view_preprocess(x, params)

    def _forward(self, model, x, grid: bool):
        """(embeddings (batch, dim), last feature maps (batch, C, h, w) or None) of one batch."""
        if not grid:
            return model(x), None
        kept = []
        module = getattr(model, _GRID_MODULES[_family(self.config.backbone)])
        handle = module.register_forward_hook(lambda _m, _i, out: kept.append(out))
        try:
            emb = model(x)
        finally:
            handle.remove()
        return emb, kept[-1]

    def _embed(self, inputs: Iterable[Any], grid: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the backbone over preprocessed inputs in batches of ``batch_size``:
        ((n, dim), (n, C, h, w) or None) float32."""
        import torch

        self.setup()
        inputs = iter(inputs)
        embs, grids = [], []
        with torch.inference_mode():
            while batch := list(islice(inputs, self.config.batch_size)):
                emb, fmap = self._forward(self._model, torch.stack(batch).to(self._device), grid)
                embs.append(emb.float().cpu().numpy())  # (batch, dim)
                if grid:
                    grids.append(fmap.float().cpu().numpy())  # (batch, C, h, w)
        if not embs:
            return np.zeros((0, self.embedding_dim()), np.float32), None
        return np.concatenate(embs), (np.concatenate(grids) if grid else None)

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        return self.extract_batch([media])[0]

    def extract_batch(self, medias: list[Any]) -> list[dict[str, np.ndarray]]:
        cfg = self.config
        images = [_check_image(m) for m in medias]
        emb, grid = self._embed(
            (t for img in images for t in self._inputs(img, self._view_list(img))), cfg.grid
        )
        k = cfg.views
        out: list[dict[str, np.ndarray]] = []
        for i in range(len(images)):
            rows = slice(i * k, (i + 1) * k) if k > 1 else i  # (views, ...) or one row
            item = {"embedding": np.ascontiguousarray(emb[rows], dtype=np.float32)}
            if grid is not None:
                item["grid"] = np.ascontiguousarray(grid[rows], dtype=np.float32)
            out.append(item)
        return out
