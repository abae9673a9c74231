"""Feature extractors: decoded media in, numpy arrays out. Imports nothing else of ours."""

from features.errors import ModalstoreError
from features.registry import (
    Extractor,
    create_extractor,
    get_extractor,
    list_extractors,
    register_extractor,
)
from features.spec import FieldSpec

# Importing the modules registers their extractors.
from features import audio, image, sift, text, text_fitted, texture, video, video_models  # noqa: E402,F401  isort: skip

__all__ = [
    "Extractor",
    "FieldSpec",
    "ModalstoreError",
    "create_extractor",
    "get_extractor",
    "list_extractors",
    "register_extractor",
]
