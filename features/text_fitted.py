"""Fit-then-transform text extractors: ``bow``, ``tfidf``, ``lda`` and ``word2vec``.

Each learns its state (vocabulary, idf, topics, word vectors) from the train split with
``fit``, keeps it as plain numpy arrays (``artifact``) and rebuilds the transform from those
arrays alone (``load_artifact``). ``fit`` itself ends by calling ``load_artifact``, so a fitted
instance and a fresh instance loaded from its artifact run the same code on the same arrays.

Every artifact holds ``meta``: a 0-d unicode array, the JSON of the extractor name, version
and full params. ``load_artifact`` refuses an artifact fitted with other params.
"""

from __future__ import annotations

import json
import zlib
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from features.errors import ConfigError, ExtractionError, MediaError, StoreError, require
from features.registry import Extractor, register_extractor
from features.spec import FieldSpec

# --- artifact helpers, shared by every fit-then-transform extractor (sift.py imports them) ----


def artifact_meta(ex: Extractor) -> np.ndarray:
    """0-d unicode array: the JSON of what produced an artifact."""
    meta = {"extractor": ex.name, "version": ex.version, "params": ex.params()}
    return np.array(json.dumps(meta, sort_keys=True))


def check_artifact(ex: Extractor, arrays: dict[str, np.ndarray], required: tuple[str, ...]) -> dict:
    """The arrays of ``required`` (plus ``meta``) after checking they were made by this config."""
    missing = sorted((set(required) | {"meta"}) - set(arrays))
    if missing:
        raise StoreError(
            f"extractor {ex.name!r}: artifact is missing array(s) {missing} (has {sorted(arrays)}); "
            "refit the extractor"
        )
    saved = json.loads(str(np.asarray(arrays["meta"])[()]))
    wanted = json.loads(str(artifact_meta(ex)[()]))
    if saved != wanted:
        raise ConfigError(
            f"extractor {ex.name!r}: artifact was fitted by {saved}, this extractor is {wanted}; "
            "refit with these params or create the extractor with the artifact's params"
        )
    return {key: np.asarray(arrays[key]) for key in (*required, "meta")}


def not_fitted(ex: Extractor) -> ExtractionError:
    return ExtractionError(
        f"extractor {ex.name!r} is not fitted: call fit(train_medias) or load_artifact(arrays) first"
    )


# --- configs --------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> None:
    """ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_max_features(value: Any) -> None:
    if value is not None:
        check_int("max_features", value, 1)


@dataclass(frozen=True)
class BowConfig:
    """CountVectorizer parameters (``max_features=None``: keep every term).

    ``min_df``: an int is a document count, a float in (0, 1] a fraction of train documents.
    """

    max_features: int | None = 5000
    ngram_range: tuple[int, int] = (1, 1)
    min_df: int | float = 1
    lowercase: bool = True
    binary: bool = False

    def __post_init__(self) -> None:
        _check_max_features(self.max_features)
        ngram = self.ngram_range
        if (
            not isinstance(ngram, (tuple, list))
            or len(ngram) != 2
            or not all(_is_int(n) for n in ngram)
            or not 1 <= ngram[0] <= ngram[1]
        ):
            raise ValueError(
                f"ngram_range must be two ints (min_n, max_n) with 1 <= min_n <= max_n, got {ngram!r}"
            )
        object.__setattr__(self, "ngram_range", (int(ngram[0]), int(ngram[1])))
        if _is_int(self.min_df):
            ok = self.min_df >= 1
        else:
            ok = isinstance(self.min_df, float) and 0.0 < self.min_df <= 1.0
        if not ok:
            raise ValueError(
                f"min_df must be an int >= 1 (documents) or a float in (0, 1] (fraction), got {self.min_df!r}"
            )
        _check_bool("lowercase", self.lowercase)
        _check_bool("binary", self.binary)


@dataclass(frozen=True)
class TfidfConfig(BowConfig):
    """CountVectorizer parameters plus TfidfTransformer's (``norm``: "l2", "l1" or None)."""

    norm: str | None = "l2"
    use_idf: bool = True
    smooth_idf: bool = True
    sublinear_tf: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm not in ("l1", "l2", None):
            raise ValueError(f"norm must be 'l1', 'l2' or null, got {self.norm!r}")
        for name in ("use_idf", "smooth_idf", "sublinear_tf"):
            _check_bool(name, getattr(self, name))


@dataclass(frozen=True)
class LdaConfig:
    """LatentDirichletAllocation over lowercased unigram counts of the ``max_features`` most
    frequent train terms. Priors None mean sklearn's default 1 / n_topics."""

    n_topics: int = 10
    max_features: int | None = 2000
    max_iter: int = 20
    learning_method: str = "batch"
    seed: int = 0
    doc_topic_prior: float | None = None
    topic_word_prior: float | None = None

    def __post_init__(self) -> None:
        check_int("n_topics", self.n_topics, 1)
        _check_max_features(self.max_features)
        check_int("max_iter", self.max_iter, 1)
        if self.learning_method not in ("batch", "online"):
            raise ValueError(f"learning_method must be 'batch' or 'online', got {self.learning_method!r}")
        check_int("seed", self.seed, 0)
        for name in ("doc_topic_prior", "topic_word_prior"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
            ):
                raise ValueError(f"{name} must be a number > 0 or null, got {value!r}")


@dataclass(frozen=True)
class Word2VecConfig:
    """gensim Word2Vec (CBOW) trained on the train texts, or pre-trained vectors.

    ``vectors_path``: a word2vec-format file (text, or binary with ``binary=True``); fit then
    only loads it and ``dim`` must equal its vector size. Texts are tokenised with
    ``gensim.utils.simple_preprocess`` (lowercase, 2-15 letters), so cased vocabularies only
    match their lowercase entries.
    """

    dim: int = 64
    window: int = 5
    min_count: int = 1
    epochs: int = 10
    seed: int = 0
    vectors_path: str | None = None
    binary: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "window", "min_count", "epochs"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        if self.vectors_path is not None and (
            not isinstance(self.vectors_path, str) or not self.vectors_path
        ):
            raise ValueError(f"vectors_path must be a file path or null, got {self.vectors_path!r}")
        _check_bool("binary", self.binary)


# --- the shared fit / load / transform skeleton ---------------------------------------------


def _check_texts(name: str, medias: list[Any]) -> list[str]:
    for i, text in enumerate(medias):
        if not isinstance(text, str):
            raise MediaError(
                f"{name}: item {i}: expected a str, got {type(text).__name__} {str(text)[:40]!r}"
            )
    return list(medias)


class _FittedText(Extractor):
    """Fit learns ``_fit_arrays(texts)``; everything else runs from those arrays."""

    modality = "text"
    fit_required = True
    _arrays_needed: ClassVar[tuple[str, ...]]

    def __init__(self, config: Any = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._arrays: dict[str, np.ndarray] | None = None

    def fit(self, medias: list[Any]) -> None:
        texts = _check_texts(self.name, medias)
        if not texts:
            raise ConfigError(f"extractor {self.name!r}: fit got no train texts")
        arrays = self._fit_arrays(texts)
        arrays["meta"] = artifact_meta(self)
        self.load_artifact(arrays)

    def artifact(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            raise not_fitted(self)
        return {key: value.copy() for key, value in self._arrays.items()}

    def load_artifact(self, arrays: dict[str, np.ndarray]) -> None:
        arrays = check_artifact(self, arrays, self._arrays_needed)
        self._build(arrays)
        self._arrays = arrays

    def extract(self, media: Any) -> dict[str, np.ndarray]:
        return self.extract_batch([media])[0]

    def extract_batch(self, medias: list[Any]) -> list[dict[str, np.ndarray]]:
        texts = _check_texts(self.name, medias)
        if self._arrays is None:
            raise not_fitted(self)
        return self._transform(texts) if texts else []

    def _n_terms(self) -> int:
        if self._arrays is None:
            raise not_fitted(self)
        return int(self._arrays["terms"].shape[0])

    @abstractmethod
    def _fit_arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        """The fitted state as arrays (``meta`` is added by ``fit``)."""

    @abstractmethod
    def _build(self, arrays: dict[str, np.ndarray]) -> None:
        """Rebuild the transform from checked artifact arrays."""

    @abstractmethod
    def _transform(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        """Features of several texts (at least one)."""


def _terms(vectorizer: Any) -> np.ndarray:
    return np.array(list(vectorizer.get_feature_names_out()), dtype=str)  # column order


def _fit_vectorizer(ex: Extractor, vectorizer: Any, texts: list[str]) -> Any:
    """``vectorizer.fit_transform(texts)`` with sklearn's data errors turned into ours."""
    try:
        return vectorizer.fit_transform(texts)
    except ValueError as exc:  # "empty vocabulary", "no terms remain" after min_df
        raise ConfigError(f"extractor {ex.name!r}: fit on {len(texts)} train texts failed: {exc}") from exc


def _counter(terms: np.ndarray, **analyzer: Any) -> Any:
    """A CountVectorizer with a fixed vocabulary: the transform half of a fitted one."""
    from sklearn.feature_extraction.text import CountVectorizer

    return CountVectorizer(vocabulary=[str(t) for t in terms], **analyzer)


def _analyzer(cfg: BowConfig) -> dict:
    return {"lowercase": cfg.lowercase, "ngram_range": cfg.ngram_range, "binary": cfg.binary}


def _rows(field: str, matrix: Any) -> list[dict[str, np.ndarray]]:
    dense = matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)
    return [{field: np.ascontiguousarray(row, dtype=np.float32)} for row in dense]


# --- bow ------------------------------------------------------------------------------------


@register_extractor
class Bow(_FittedText):
    """Artifact: ``terms`` (V,) unicode in column order, ``meta``."""

    name = "bow"
    version = 1
    description = "Bag of words: scikit-learn CountVectorizer term counts over the train-split vocabulary."
    Config = BowConfig
    _arrays_needed = ("terms",)

    def output_spec(self) -> dict[str, FieldSpec]:
        """Needs the fitted vocabulary: raises the not-fitted error before fit/load_artifact."""
        return {"counts": FieldSpec("float32", (self._n_terms(),), "term counts, columns = artifact terms")}

    def _fit_arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        from sklearn.feature_extraction.text import CountVectorizer

        cfg = self.config
        vectorizer = CountVectorizer(max_features=cfg.max_features, min_df=cfg.min_df, **_analyzer(cfg))
        _fit_vectorizer(self, vectorizer, texts)
        return {"terms": _terms(vectorizer)}

    def _build(self, arrays: dict[str, np.ndarray]) -> None:
        self._vectorizer = _counter(arrays["terms"], **_analyzer(self.config))

    def _transform(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        return _rows("counts", self._vectorizer.transform(texts))


# --- tfidf ----------------------------------------------------------------------------------


@register_extractor
class Tfidf(_FittedText):
    """Artifact: ``terms`` (V,) unicode, ``idf`` (V,) float64 (all ones when use_idf is false,
    and then unused), ``meta``. Transform: fixed-vocabulary counts, then a TfidfTransformer
    holding the saved idf."""

    name = "tfidf"
    version = 1
    description = "TF-IDF: scikit-learn TfidfVectorizer weights over the train-split vocabulary and idf."
    Config = TfidfConfig
    _arrays_needed = ("terms", "idf")

    def output_spec(self) -> dict[str, FieldSpec]:
        """Needs the fitted vocabulary: raises the not-fitted error before fit/load_artifact."""
        return {"tfidf": FieldSpec("float32", (self._n_terms(),), "tf-idf weights, columns = artifact terms")}

    def _fit_arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        from sklearn.feature_extraction.text import TfidfVectorizer

        cfg = self.config
        vectorizer = TfidfVectorizer(
            max_features=cfg.max_features,
            min_df=cfg.min_df,
            **_analyzer(cfg),
            norm=cfg.norm,
            use_idf=cfg.use_idf,
            smooth_idf=cfg.smooth_idf,
            sublinear_tf=cfg.sublinear_tf,
        )
        _fit_vectorizer(self, vectorizer, texts)
        terms = _terms(vectorizer)
        idf = np.asarray(vectorizer.idf_, dtype=np.float64) if cfg.use_idf else np.ones(terms.shape[0])
        return {"terms": terms, "idf": idf}

    def _build(self, arrays: dict[str, np.ndarray]) -> None:
        from sklearn.feature_extraction.text import TfidfTransformer

        cfg = self.config
        terms, idf = arrays["terms"], arrays["idf"]
        if idf.shape != terms.shape:
            raise StoreError(
                f"extractor 'tfidf': artifact idf has shape {idf.shape}, terms {terms.shape}; refit"
            )
        self._counter = _counter(terms, **_analyzer(cfg))
        # The fitted state of a TfidfTransformer is its idf_ and n_features_in_: set both.
        transformer = TfidfTransformer(
            norm=cfg.norm, use_idf=cfg.use_idf, smooth_idf=cfg.smooth_idf, sublinear_tf=cfg.sublinear_tf
        )
        if cfg.use_idf:
            transformer.idf_ = idf.astype(np.float64)
        transformer.n_features_in_ = int(terms.shape[0])
        self._transformer = transformer

    def _transform(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        counts = self._counter.transform(texts).astype(np.float64)  # as TfidfVectorizer's dtype
        return _rows("tfidf", self._transformer.transform(counts, copy=False))


# --- lda ------------------------------------------------------------------------------------


@register_extractor
class Lda(_FittedText):
    """Artifact: ``terms`` (V,) unicode, ``components`` and ``exp_dirichlet_component``
    (n_topics, V) float64, ``doc_topic_prior`` and ``topic_word_prior`` 0-d float64, ``meta``:
    everything ``LatentDirichletAllocation.transform`` reads."""

    name = "lda"
    version = 1
    description = (
        "LDA topic distribution: scikit-learn LatentDirichletAllocation over train-split term counts."
    )
    Config = LdaConfig
    _arrays_needed = ("terms", "components", "exp_dirichlet_component", "doc_topic_prior", "topic_word_prior")

    def output_spec(self) -> dict[str, FieldSpec]:
        return {"topics": FieldSpec("float32", (self.config.n_topics,), "topic proportions (sum to 1)")}

    def _lda(self) -> Any:
        from sklearn.decomposition import LatentDirichletAllocation

        cfg = self.config
        return LatentDirichletAllocation(
            n_components=cfg.n_topics,
            max_iter=cfg.max_iter,
            learning_method=cfg.learning_method,
            random_state=cfg.seed,
            doc_topic_prior=cfg.doc_topic_prior,
            topic_word_prior=cfg.topic_word_prior,
        )

    def _fit_arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        from sklearn.feature_extraction.text import CountVectorizer

        vectorizer = CountVectorizer(max_features=self.config.max_features)
        counts = _fit_vectorizer(self, vectorizer, texts)
        lda = self._lda().fit(counts)
        return {
            "terms": _terms(vectorizer),
            "components": lda.components_,
            "exp_dirichlet_component": lda.exp_dirichlet_component_,
            "doc_topic_prior": np.float64(lda.doc_topic_prior_),
            "topic_word_prior": np.float64(lda.topic_word_prior_),
        }

    def _build(self, arrays: dict[str, np.ndarray]) -> None:
        terms = arrays["terms"]
        want = (self.config.n_topics, terms.shape[0])
        for key in ("components", "exp_dirichlet_component"):
            if arrays[key].shape != want:
                raise StoreError(
                    f"extractor 'lda': artifact {key} has shape {arrays[key].shape}, expected {want}; refit"
                )
        self._counter = _counter(terms)  # the defaults LDA fitted with
        lda = self._lda()
        lda.components_ = arrays["components"].astype(np.float64)
        lda.exp_dirichlet_component_ = arrays["exp_dirichlet_component"].astype(np.float64)
        lda.doc_topic_prior_ = float(arrays["doc_topic_prior"])
        lda.topic_word_prior_ = float(arrays["topic_word_prior"])
        lda.n_features_in_ = int(terms.shape[0])
        self._model = lda

    def _transform(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        # A text without known terms gets the prior: uniform topics.
        return _rows("topics", self._model.transform(self._counter.transform(texts)))


# --- word2vec -------------------------------------------------------------------------------


def crc32_hash(text: str) -> int:
    """Process-independent stand-in for ``hash`` (gensim's ``hashfxn``; str hashes are salted
    per process unless PYTHONHASHSEED is fixed)."""
    return zlib.crc32(text.encode("utf-8"))


def tokenize(text: str) -> list[str]:
    return require("gensim.utils", "text").simple_preprocess(text)


@register_extractor
class Word2Vec(_FittedText):
    """Artifact: ``terms`` (V,) unicode, ``vectors`` (V, dim) float32, ``meta``.

    Training uses ``workers=1`` and ``seed``: gensim's initial vectors come from
    ``default_rng(seed)`` and its sampling from ``RandomState(seed)``; ``hashfxn`` is a crc32 so
    nothing depends on the per-process str hash salt either.
    """

    name = "word2vec"
    version = 1
    description = "word2vec token vectors and their mean: gensim Word2Vec trained on the train split, or a vectors file."
    Config = Word2VecConfig
    _arrays_needed = ("terms", "vectors")

    def output_spec(self) -> dict[str, FieldSpec]:
        dim = self.config.dim
        return {
            "tokens": FieldSpec("float32", (None, dim), "vectors of in-vocabulary tokens, in text order"),
            "mean": FieldSpec("float32", (dim,), "mean of the token vectors (zeros when none)"),
        }

    def _fit_arrays(self, texts: list[str]) -> dict[str, np.ndarray]:
        gensim_models = require("gensim.models", "text")
        cfg = self.config
        if cfg.vectors_path is not None:
            return self._load_vectors(gensim_models.KeyedVectors)
        sentences = [tokenize(t) for t in texts]
        counts = Counter(token for sentence in sentences for token in sentence)
        if not any(n >= cfg.min_count for n in counts.values()):
            raise ConfigError(
                f"extractor 'word2vec': no token occurs min_count={cfg.min_count} times in "
                f"{len(texts)} train texts ({len(counts)} distinct tokens); lower min_count"
            )
        model = gensim_models.Word2Vec(
            sentences=sentences,
            vector_size=cfg.dim,
            window=cfg.window,
            min_count=cfg.min_count,
            epochs=cfg.epochs,
            seed=cfg.seed,
            workers=1,
            hashfxn=crc32_hash,
        )
        wv = model.wv
        return {"terms": np.array(list(wv.index_to_key), dtype=str), "vectors": wv.vectors.astype(np.float32)}

    def _load_vectors(self, keyed_vectors: Any) -> dict[str, np.ndarray]:
        cfg = self.config
        try:
            kv = keyed_vectors.load_word2vec_format(cfg.vectors_path, binary=cfg.binary)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"extractor 'word2vec': cannot read vectors_path {cfg.vectors_path!r} "
                f"(binary={cfg.binary}): {exc}"
            ) from exc
        if kv.vector_size != cfg.dim:
            raise ConfigError(
                f"extractor 'word2vec': {cfg.vectors_path} holds {kv.vector_size}-d vectors but "
                f"dim={cfg.dim}; set dim={kv.vector_size}"
            )
        return {"terms": np.array(list(kv.index_to_key), dtype=str), "vectors": kv.vectors.astype(np.float32)}

    def _build(self, arrays: dict[str, np.ndarray]) -> None:
        terms, vectors = arrays["terms"], arrays["vectors"]
        if vectors.shape != (terms.shape[0], self.config.dim):
            raise StoreError(
                f"extractor 'word2vec': artifact vectors have shape {vectors.shape}, expected "
                f"({terms.shape[0]}, {self.config.dim}); refit"
            )
        self._index = {str(t): i for i, t in enumerate(terms)}
        self._vectors = vectors.astype(np.float32)

    def _transform(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        out = []
        for text in texts:
            rows = [self._index[t] for t in tokenize(text) if t in self._index]
            tokens = self._vectors[rows]  # (n_known_tokens, dim)
            mean = tokens.mean(axis=0) if rows else np.zeros(self.config.dim, dtype=np.float32)
            out.append({"tokens": np.ascontiguousarray(tokens), "mean": mean.astype(np.float32)})
        return out
