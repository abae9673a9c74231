"""The extractor interface and its registry.

An extractor is a name, a version, a frozen config dataclass, an output spec and one
``extract`` method. Adding one is a config class and a function body::

    @register_extractor
    class Mfcc(Extractor):
        name = "mfcc"
        modality = "audio"
        Config = MfccConfig

        def output_spec(self): ...
        def extract(self, audio): ...
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from features.errors import ConfigError
from features.spec import FieldSpec

MODALITIES = ("image", "audio", "video", "text")


class Extractor(ABC):
    """Base class: decoded media in, a dict of named numpy arrays out.

    Media handed to ``extract`` by modality:
      image: uint8 array (height, width, 3), RGB
      audio: float32 array (samples,), mono, at ``decode_request()["sample_rate"]``
      video: uint8 array (frames, height, width[, 3]) as ``decode_request()`` asks
      text:  str
    """

    name: ClassVar[str]
    version: ClassVar[int] = 1
    modality: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any = None, **params: Any) -> None:
        if config is None:
            config = build_config(self.Config, params, where=f"extractor {self.name!r}")
        self.config = config

    def params(self) -> dict:
        """The full parameter set, defaults included, as saved in the store manifest."""
        return dataclasses.asdict(self.config)

    def decode_request(self) -> dict:
        """How the pipeline should decode media for this extractor (sample rate, frame size...)."""
        return {}

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load heavy state (models) once per process; called before the first extract."""

    @abstractmethod
    def output_spec(self) -> dict[str, FieldSpec]:
        """Field name -> FieldSpec of every array ``extract`` returns."""

    @abstractmethod
    def extract(self, media: Any) -> dict[str, np.ndarray]:
        """Compute features of one decoded media item."""

    def extract_batch(self, medias: list[Any]) -> list[dict[str, np.ndarray]]:
        """Compute features of several items; model-based extractors override this to batch."""
        return [self.extract(m) for m in medias]

    # -- Fit-then-transform extractors (bag of words, TF-IDF, LDA, SIFT codebook, word2vec) --
    # The pipeline calls ``fit`` once with the decoded media of the TRAIN split only, saves
    # ``artifact()`` in the store (an .npz, loaded with allow_pickle=False, hashed into the
    # group's version), and before transforming any split calls ``load_artifact`` on a fresh
    # instance in every worker. ``output_spec`` may depend on the fitted state.

    fit_required: ClassVar[bool] = False

    def fit(self, medias: list[Any]) -> None:
        """Learn state (vocabulary, codebook...) from train-split media."""
        raise NotImplementedError(f"extractor {self.name!r} has nothing to fit")

    def artifact(self) -> dict[str, np.ndarray]:
        """The fitted state as plain numpy arrays (numeric or unicode; never objects)."""
        raise NotImplementedError(f"extractor {self.name!r} has no fitted state")

    def load_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the fitted state saved by ``artifact``."""
        raise NotImplementedError(f"extractor {self.name!r} has no fitted state")


_REGISTRY: dict[str, type[Extractor]] = {}


def register_extractor(cls: type[Extractor]) -> type[Extractor]:
    """Class decorator adding an extractor to the registry under ``cls.name``."""
    name = cls.name
    if name in _REGISTRY:
        raise ValueError(f"extractor name {name!r} is already registered by {_REGISTRY[name].__module__}")
    if cls.modality not in MODALITIES:
        raise ValueError(f"extractor {name!r}: modality {cls.modality!r} is not one of {MODALITIES}")
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"extractor {name!r}: Config must be a dataclass")
    _REGISTRY[name] = cls
    return cls


def get_extractor(name: str) -> type[Extractor]:
    """The extractor class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown extractor {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def list_extractors() -> list[str]:
    return sorted(_REGISTRY)


def create_extractor(name: str, params: dict | None = None) -> Extractor:
    """Instantiate extractor ``name`` with ``params`` (unknown keys are an error)."""
    cls = get_extractor(name)
    return cls(build_config(cls.Config, params or {}, where=f"extractor {name!r}"))


def build_config(config_cls: type, params: dict, where: str) -> Any:
    """Build a frozen config dataclass from a dict, with errors naming the bad key."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {unknown}; valid parameters: {sorted(fields)}")
    coerced = {}
    for key, value in params.items():
        # YAML gives lists where the dataclass wants tuples (frozen, hashable).
        if isinstance(value, list):
            value = tuple(value)
        coerced[key] = value
    try:
        return config_cls(**coerced)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def describe_params(cls: type[Extractor]) -> list[tuple[str, str, Any]]:
    """(name, type, default) of every parameter of an extractor class."""
    out = []
    for f in dataclasses.fields(cls.Config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append((f.name, str(f.type), default))
    return out
