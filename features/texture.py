"""Texture extractors: ``lbp``, scikit-image Local Binary Pattern histograms at several radii."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import MediaError
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

# method -> number of codes for P sampling points (codes run 0 .. n - 1).
_N_CODES = {
    "uniform": lambda p: p + 2,  # rotation-invariant uniform patterns, plus one "non-uniform" code
    "nri_uniform": lambda p: p * (p - 1) + 3,  # uniform patterns without rotation invariance
}


@dataclass(frozen=True)
class LbpConfig:
    """Parameters of ``skimage.feature.local_binary_pattern`` at each radius.

    Radius R samples P = ``points_per_radius * R`` neighbours. ``size=0`` keeps the native
    image size; otherwise the gray image is resized to ``size x size`` (cv2.INTER_AREA) first.
    Each radius's histogram counts the pixels at least R from every border: scikit-image reads
    samples outside the image as 0, so border codes would describe a dark frame, not the
    texture (and a uniform image would not give a single code).
    """

    radii: tuple[int, ...] = (1, 2, 3)
    points_per_radius: int = 8
    method: str = "uniform"
    size: int = 0

    def __post_init__(self) -> None:
        radii = self.radii
        if (
            not isinstance(radii, (tuple, list))
            or not radii
            or not all(_is_int(r) and r >= 1 for r in radii)
            or len(set(radii)) != len(radii)
        ):
            raise ValueError(
                f"radii must be a non-empty list of distinct integers >= 1, got {radii!r}; e.g. radii=[1, 2, 3]"
            )
        object.__setattr__(self, "radii", tuple(int(r) for r in radii))  # hashable, as saved
        if not _is_int(self.points_per_radius) or self.points_per_radius < 1:
            raise ValueError(f"points_per_radius must be an integer >= 1, got {self.points_per_radius!r}")
        if self.method not in _N_CODES:
            raise ValueError(
                f"method must be one of {sorted(_N_CODES)}, got {self.method!r} ('default' and 'ror' "
                "have 2**P codes, too many to histogram; 'var' is not a code)"
            )
        min_size = 2 * max(self.radii) + 1
        if not _is_int(self.size) or (self.size != 0 and self.size < min_size):
            raise ValueError(
                f"size must be 0 (native) or >= 2 * max(radii) + 1 = {min_size}, got {self.size!r}"
            )

    def points(self) -> list[int]:
        """P for each radius, in radius order."""
        return [self.points_per_radius * r for r in self.radii]

    def n_codes(self) -> list[int]:
        """Histogram length for each radius, in radius order."""
        return [_N_CODES[self.method](p) for p in self.points()]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def to_gray_uint8(image: np.ndarray, size: int = 0) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> uint8 gray: ``img_as_ubyte(rgb2gray(image))``, i.e. the luma
    0.2125 R + 0.7154 G + 0.0721 B rounded to the nearest level, resized with cv2.INTER_AREA
    to (size, size) when ``size`` > 0.

    LBP compares neighbours for >=: integer levels avoid codes flipping on float rounding noise.
    """
    from skimage.color import rgb2gray
    from skimage.util import img_as_ubyte

    gray = img_as_ubyte(rgb2gray(image))
    if size:
        import cv2

        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    return gray


@register_extractor
class Lbp(Extractor):
    name = "lbp"
    version = 1
    modality = "image"
    description = "Normalised Local Binary Pattern code histograms (scikit-image) at several radii."
    Config = LbpConfig

    def output_spec(self) -> dict[str, FieldSpec]:
        cfg = self.config
        parts = ", ".join(
            f"R={r} P={p}: {n}" for r, p, n in zip(cfg.radii, cfg.points(), cfg.n_codes(), strict=True)
        )
        return {
            "histogram": FieldSpec(
                "float32",
                (sum(cfg.n_codes()),),
                f"{cfg.method} LBP code frequencies per radius, each summing to 1, concatenated ({parts})",
            )
        }

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        from skimage.feature import local_binary_pattern

        image = np.asarray(media)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise MediaError(
                f"lbp: expected a uint8 RGB image of shape (height, width, 3), got {image.dtype} {image.shape}"
            )
        cfg = self.config
        gray = to_gray_uint8(image, cfg.size)
        if min(gray.shape) < 2 * max(cfg.radii) + 1:
            raise MediaError(
                f"lbp: image of {gray.shape[0]}x{gray.shape[1]} px is too small for radius "
                f"{max(cfg.radii)}: need at least {2 * max(cfg.radii) + 1} px per side (or set size)"
            )
        hists = []
        for radius, points, n_codes in zip(cfg.radii, cfg.points(), cfg.n_codes(), strict=True):
            codes = local_binary_pattern(gray, points, radius, cfg.method)  # (H, W) float codes
            inner = codes[radius:-radius, radius:-radius]  # every sample inside the image
            counts = np.bincount(inner.astype(np.int64).ravel(), minlength=n_codes)
            hists.append(counts / inner.size)
        return {"histogram": np.concatenate(hists).astype(np.float32)}
