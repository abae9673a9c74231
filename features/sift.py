"""Fit-then-transform image extractor: ``sift``, a bag of visual words over OpenCV SIFT.

Fit learns a codebook (k-means centres of train-split SIFT descriptors); extract assigns each
descriptor of an image to its nearest centre and returns the normalised histogram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import ConfigError, MediaError, StoreError
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

# The artifact helpers shared by every fit-then-transform extractor (``meta`` layout and checks).
from features.text_fitted import artifact_meta, check_artifact, check_int, not_fitted

DESCRIPTOR_DIM = 128


@dataclass(frozen=True)
class SiftConfig:
    """``nfeatures``: keypoints kept per image by SIFT (0: all). ``max_descriptors``: train
    descriptors randomly kept (seeded) for k-means. ``size``: resize the gray image to
    size x size before SIFT (0: keep the image size)."""

    codebook_size: int = 64
    nfeatures: int = 0
    max_descriptors: int = 20000
    size: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("codebook_size", self.codebook_size, 2)
        check_int("nfeatures", self.nfeatures, 0)
        check_int("max_descriptors", self.max_descriptors, 1)
        if self.max_descriptors < self.codebook_size:
            raise ValueError(
                f"max_descriptors ({self.max_descriptors}) must be >= codebook_size ({self.codebook_size})"
            )
        check_int("size", self.size, 0)
        if 0 < self.size < 16:
            raise ValueError(f"size must be 0 (no resize) or >= 16, got {self.size}")
        check_int("seed", self.seed, 0)


def _check_image(image: Any, where: str) -> np.ndarray:
    if not (
        isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    ):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise MediaError(f"sift: {where}: expected a uint8 RGB image (height, width, 3), got {got}")
    return image


def nearest_centre(descriptors: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean) of each descriptor, in float64."""
    x = descriptors.astype(np.float64)  # (n, 128)
    c = centres.astype(np.float64)  # (k, 128)
    d2 = (x * x).sum(1)[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]  # (n, k)
    return d2.argmin(axis=1)


@register_extractor
class Sift(Extractor):
    """Artifact: ``centres`` (codebook_size, 128) float32 and ``meta`` (see ``features.text_fitted``)."""

    name = "sift"
    version = 1
    modality = "image"
    description = "Bag of visual words: OpenCV SIFT descriptors assigned to a k-means codebook fitted on the train split."
    Config = SiftConfig
    fit_required = True

    def __init__(self, config: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._centres: np.ndarray | None = None

    def output_spec(self) -> dict[str, FieldSpec]:
        k = self.config.codebook_size
        return {
            "histogram": FieldSpec(
                "float32", (k,), "visual-word frequencies (sum 1; zeros without keypoints)"
            )
        }

    def descriptors(self, image: np.ndarray, sift: Any = None) -> np.ndarray:
        """SIFT descriptors (n, 128) float32 of an RGB image, as fit and extract see them."""
        import cv2

        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if self.config.size:
            gray = cv2.resize(gray, (self.config.size, self.config.size), interpolation=cv2.INTER_AREA)
        # A new detector per call unless given: cv2 objects neither pickle nor share across threads.
        if sift is None:
            sift = cv2.SIFT_create(nfeatures=self.config.nfeatures)
        _, desc = sift.detectAndCompute(gray, None)
        if desc is None:
            return np.zeros((0, DESCRIPTOR_DIM), dtype=np.float32)
        return desc.astype(np.float32, copy=False)

    def fit(self, medias: list[Any]) -> None:
        import cv2
        from sklearn.cluster import KMeans

        cfg = self.config
        if not medias:
            raise ConfigError("extractor 'sift': fit got no train images")
        sift = cv2.SIFT_create(nfeatures=cfg.nfeatures)
        descs = [self.descriptors(_check_image(m, f"train image {i}"), sift) for i, m in enumerate(medias)]
        train = np.concatenate(descs)  # (n_train_descriptors, 128)
        n = train.shape[0]
        if n < cfg.codebook_size:
            fix = f"use codebook_size <= {n}, or " if n >= 2 else ""
            raise ConfigError(
                f"extractor 'sift': the {len(medias)} train images gave {n} SIFT descriptors, fewer "
                f"than codebook_size={cfg.codebook_size}; {fix}give more, larger or more textured train "
                "images (size > 0 upsamples small ones)"
            )
        if n > cfg.max_descriptors:
            rng = np.random.default_rng(cfg.seed)
            train = train[np.sort(rng.choice(n, cfg.max_descriptors, replace=False))]
        kmeans = KMeans(n_clusters=cfg.codebook_size, random_state=cfg.seed, n_init=1).fit(train)
        self.load_artifact({"centres": kmeans.cluster_centers_, "meta": artifact_meta(self)})

    def artifact(self) -> dict[str, np.ndarray]:
        if self._centres is None:
            raise not_fitted(self)
        return {"centres": self._centres.copy(), "meta": artifact_meta(self)}

    def load_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        centres = check_artifact(self, arrays, ("centres",))["centres"]
        if centres.shape != (self.config.codebook_size, DESCRIPTOR_DIM):
            raise StoreError(
                f"extractor 'sift': artifact centres have shape {centres.shape}, expected "
                f"({self.config.codebook_size}, {DESCRIPTOR_DIM}); refit"
            )
        self._centres = centres.astype(np.float32)

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        image = _check_image(media, "image")
        if self._centres is None:
            raise not_fitted(self)
        k = self.config.codebook_size
        desc = self.descriptors(image)
        if desc.shape[0] == 0:
            return {"histogram": np.zeros(k, dtype=np.float32)}
        counts = np.bincount(nearest_centre(desc, self._centres), minlength=k)
        return {"histogram": (counts / counts.sum()).astype(np.float32)}
