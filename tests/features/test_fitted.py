"""Fit-then-transform extractors (bow, tfidf, lda, word2vec, sift): each against the library
fitted directly on the same train split, then the artifact round trip, leakage, determinism
and the errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.errors import ConfigError, ExtractionError, MediaError, StoreError
from features.registry import create_extractor
from features.sift import Sift  # noqa: F401  (importing registers the extractors)
from features.text_fitted import Bow  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ["a dog", "the cat", "two birds", "a child", "an old man"]
VERBS = ["runs in", "sleeps near", "looks at", "plays with", "walks past"]
PLACES = ["the park", "a red ball", "the river", "green grass", "the tall tree"]
TEST_TEXTS = ["a zebra runs in the park", "zebra zebra", "", "the cat plays with the dog and the cat", "!!"]

# Small settings: each extractor fits in well under a second.
FAST = {
    "bow": {},
    "tfidf": {},
    "lda": {"n_topics": 4, "max_features": 40, "max_iter": 10},
    "word2vec": {"dim": 16, "epochs": 5},
    "sift": {"codebook_size": 8, "max_descriptors": 50, "seed": 3},
}
TEXT_NAMES = ["bow", "tfidf", "lda", "word2vec"]


def captions(n: int = 40, seed: int = 0) -> list[str]:
    """Short captions from templates; none contains "zebra"."""
    rng = np.random.default_rng(seed)
    return [
        f"{SUBJECTS[rng.integers(5)]} {VERBS[rng.integers(5)]} {PLACES[rng.integers(5)]}".capitalize() + "."
        for _ in range(n)
    ]


def shapes_image(seed: int, size: int = 64) -> np.ndarray:
    """uint8 (size, size, 3) RGB: filled rectangles and circles, whose corners SIFT finds."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 40, np.uint8)
    for _ in range(4):
        colour = tuple(int(v) for v in rng.integers(80, 255, 3))
        x, y = (int(v) for v in rng.integers(4, size - 20, 2))
        w, h = (int(v) for v in rng.integers(8, 20, 2))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + w, y + h), colour, -1)
        else:
            cv2.circle(img, (x + w // 2, y + h // 2), min(w, h) // 2, colour, -1)
    return img


TRAIN_TEXTS = captions()
TRAIN_IMAGES = [shapes_image(s) for s in range(8)]
TEST_IMAGES = [shapes_image(s) for s in range(100, 103)] + [np.zeros((48, 40, 3), np.uint8)]


def data(name: str) -> tuple[list, list]:
    return (TRAIN_IMAGES, TEST_IMAGES) if name == "sift" else (TRAIN_TEXTS, TEST_TEXTS)


def fitted(name: str, **params):
    ex = create_extractor(name, {**FAST[name], **params})
    ex.fit(data(name)[0])
    return ex


def npz_round_trip(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        return dict(npz)


def stack(outputs: list[dict], field: str) -> np.ndarray:
    return np.stack([o[field] for o in outputs])


# --- each against the library fitted directly --------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{}, {"ngram_range": (1, 2), "min_df": 2, "max_features": 30, "binary": True, "lowercase": False}],
)
def test_bow_equals_countvectorizer(params):
    from sklearn.feature_extraction.text import CountVectorizer

    ex = fitted("bow", **params)
    ref = CountVectorizer(**params).fit(TRAIN_TEXTS)
    np.testing.assert_array_equal(ex.artifact()["terms"], ref.get_feature_names_out())
    got = stack(ex.extract_batch(TEST_TEXTS), "counts")
    assert got.dtype == np.float32 and ex.output_spec()["counts"].shape == (len(ref.vocabulary_),)
    np.testing.assert_array_equal(got, ref.transform(TEST_TEXTS).toarray())


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"norm": "l1", "sublinear_tf": True, "smooth_idf": False, "ngram_range": (1, 2)},
        {"use_idf": False, "binary": True, "max_features": 12},
        {"norm": None, "min_df": 0.1},
    ],
)
def test_tfidf_equals_tfidfvectorizer(params):
    from sklearn.feature_extraction.text import TfidfVectorizer

    ex = fitted("tfidf", **params)
    ref = TfidfVectorizer(**params).fit(TRAIN_TEXTS)
    np.testing.assert_array_equal(ex.artifact()["terms"], ref.get_feature_names_out())
    got = stack(ex.extract_batch(TEST_TEXTS), "tfidf")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref.transform(TEST_TEXTS).toarray(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["batch", "online"])
def test_lda_equals_sklearn(method):
    from sklearn.decomposition import LatentDirichletAllocation
    from sklearn.feature_extraction.text import CountVectorizer

    ex = fitted("lda", learning_method=method, doc_topic_prior=0.5)
    counter = CountVectorizer(max_features=40)
    ref = LatentDirichletAllocation(
        n_components=4, max_iter=10, learning_method=method, random_state=0, doc_topic_prior=0.5
    ).fit(counter.fit_transform(TRAIN_TEXTS))
    np.testing.assert_array_equal(ex.artifact()["components"], ref.components_)
    got = stack(ex.extract_batch(TEST_TEXTS), "topics")
    assert got.shape == (len(TEST_TEXTS), 4) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.transform(counter.transform(TEST_TEXTS)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)


def test_word2vec_equals_gensim():
    from gensim.models import Word2Vec
    from gensim.utils import simple_preprocess

    ex = fitted("word2vec")
    # gensim 4 seeds the initial vectors with default_rng(seed), so its default hashfxn is fine.
    ref = Word2Vec(
        [simple_preprocess(t) for t in TRAIN_TEXTS],
        vector_size=16,
        window=5,
        min_count=1,
        epochs=5,
        seed=0,
        workers=1,
    ).wv
    for text, out in zip(TEST_TEXTS, ex.extract_batch(TEST_TEXTS), strict=True):
        known = [t for t in simple_preprocess(text) if t in ref.key_to_index]
        want = np.stack([ref[t] for t in known]) if known else np.zeros((0, 16), np.float32)
        np.testing.assert_array_equal(out["tokens"], want)
        np.testing.assert_allclose(out["mean"], want.mean(axis=0) if known else np.zeros(16), atol=1e-7)
        assert out["tokens"].dtype == out["mean"].dtype == np.float32
    assert ex.extract("the cat")["tokens"].shape == (2, 16)
    assert ex.extract("")["tokens"].shape == (0, 16)


@pytest.mark.parametrize("binary", [False, True])
def test_word2vec_loads_vectors_file(tmp_path, binary):
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=3)
    kv.add_vectors(["cat", "park", "dog"], np.arange(9, dtype=np.float32).reshape(3, 3) / 7)
    path = tmp_path / ("vectors.bin" if binary else "vectors.txt")
    kv.save_word2vec_format(str(path), binary=binary)

    ex = create_extractor("word2vec", {"vectors_path": str(path), "binary": binary, "dim": 3})
    ex.fit(["only words outside the file"])  # nothing is trained: the file is the vocabulary
    np.testing.assert_array_equal(ex.artifact()["terms"], ["cat", "park", "dog"])
    out = ex.extract("A dog, a zebra and a cat")
    np.testing.assert_array_equal(out["tokens"], np.stack([kv["dog"], kv["cat"]]))
    np.testing.assert_allclose(out["mean"], (kv["dog"] + kv["cat"]) / 2, atol=1e-7)

    with pytest.raises(ConfigError, match=r"holds 3-d vectors but dim=64; set dim=3"):
        create_extractor("word2vec", {"vectors_path": str(path), "binary": binary}).fit(["x"])


@pytest.mark.parametrize("size", [0, 48])
def test_sift_equals_opencv_sift_and_kmeans(size):
    import cv2
    from scipy.spatial.distance import cdist
    from sklearn.cluster import KMeans

    def descriptors(image):
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if size:
            gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
        _, desc = cv2.SIFT_create().detectAndCompute(gray, None)
        return np.zeros((0, 128), np.float32) if desc is None else desc

    ex = fitted("sift", size=size)
    train = np.concatenate([descriptors(im) for im in TRAIN_IMAGES])
    assert train.shape[0] > 50  # so the seeded subsample below is exercised
    keep = np.sort(np.random.default_rng(3).choice(train.shape[0], 50, replace=False))
    centres = KMeans(n_clusters=8, random_state=3, n_init=1).fit(train[keep]).cluster_centers_
    np.testing.assert_array_equal(ex.artifact()["centres"], centres)

    for image in TEST_IMAGES:
        desc = descriptors(image)
        want = np.zeros(8)
        if len(desc):
            want = np.bincount(cdist(desc, centres, "sqeuclidean").argmin(axis=1), minlength=8) / len(desc)
        got = ex.extract(image)["histogram"]
        assert got.dtype == np.float32 and got.shape == (8,)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert not ex.extract(TEST_IMAGES[-1])["histogram"].any()  # a blank image: no keypoints


# --- no leakage, round trip, determinism -------------------------------------------------


@pytest.mark.parametrize("name", TEXT_NAMES)
def test_fit_sees_only_train(name):
    ex = fitted(name)
    artifact = ex.artifact()
    assert "zebra" not in set(artifact["terms"].tolist())
    out = ex.extract("zebra zebra")
    if name == "word2vec":
        assert out["tokens"].shape == (0, 16) and not out["mean"].any()
    elif name == "lda":
        np.testing.assert_allclose(out["topics"], 0.25, atol=1e-6)  # no known term: the uniform prior
    else:
        assert not next(iter(out.values())).any()

    # Fitting another instance on train + test changes nothing for one fitted on train.
    fitted_on_all = create_extractor(name, FAST[name])
    fitted_on_all.fit(TRAIN_TEXTS + TEST_TEXTS)
    assert "zebra" in set(fitted_on_all.artifact()["terms"].tolist())
    again = fitted(name).artifact()
    assert set(again) == set(artifact)
    for key in artifact:
        np.testing.assert_array_equal(again[key], artifact[key])


@pytest.mark.parametrize("name", [*TEXT_NAMES, "sift"])
def test_artifact_npz_round_trip_gives_identical_outputs(name):
    ex = fitted(name)
    arrays = npz_round_trip(ex.artifact())
    assert all(a.dtype.kind in "biufU" for a in arrays.values()), {k: a.dtype for k, a in arrays.items()}
    assert all(a.dtype == np.float32 for k, a in arrays.items() if k in ("vectors", "centres"))

    fresh = create_extractor(name, ex.params())
    fresh.load_artifact(arrays)
    assert fresh.output_spec() == ex.output_spec()
    medias = data(name)[1]
    expected = ex.extract_batch(medias)
    for got, want in zip(fresh.extract_batch(medias), expected, strict=True):
        assert set(got) == set(ex.output_spec())
        for field, spec in ex.output_spec().items():
            spec.check(field, got[field])
            np.testing.assert_array_equal(got[field], want[field])
    single = fresh.extract(medias[0])
    for field in single:
        np.testing.assert_array_equal(single[field], expected[0][field])


@pytest.mark.parametrize(
    "name, other_seed", [("lda", {"seed": 1}), ("word2vec", {"seed": 1}), ("sift", {"seed": 4})]
)
def test_same_seed_same_artifact(name, other_seed):
    a, b = fitted(name).artifact(), fitted(name).artifact()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    changed = fitted(name, **other_seed).artifact()
    numeric = "centres" if name == "sift" else ("components" if name == "lda" else "vectors")
    assert not np.array_equal(changed[numeric], a[numeric])


def test_word2vec_same_in_another_process_with_another_hash_seed():
    code = (
        "import json, sys; sys.path.insert(0, '.');"
        "from features.registry import create_extractor; import features.text_fitted;"
        "ex = create_extractor('word2vec', {'dim': 16, 'epochs': 5}); ex.fit(json.loads(sys.stdin.read()));"
        "print(ex.artifact()['vectors'].tobytes().hex())"
    )
    import json

    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(TRAIN_TEXTS),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
        timeout=60,
    )
    there = np.frombuffer(bytes.fromhex(done.stdout.strip()), dtype=np.float32)
    np.testing.assert_array_equal(there, fitted("word2vec").artifact()["vectors"].ravel())


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*TEXT_NAMES, "sift"])
def test_extract_before_fit_is_an_error(name):
    ex = create_extractor(name, FAST[name])
    media = data(name)[1][0]
    with pytest.raises(ExtractionError, match=rf"extractor '{name}' is not fitted: call fit\(train_medias\)"):
        ex.extract(media)
    with pytest.raises(ExtractionError, match="is not fitted"):
        ex.artifact()
    if name in ("bow", "tfidf"):  # their width is the fitted vocabulary size
        with pytest.raises(ExtractionError, match="is not fitted"):
            ex.output_spec()
    else:
        assert ex.output_spec()  # fixed width: known from the config


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("bow", {"max_features": 0}, r"max_features must be an int >= 1, got 0"),
        ("bow", {"ngram_range": [2, 1]}, r"ngram_range must be two ints .* got \(2, 1\)"),
        ("bow", {"min_df": 1.5}, r"min_df must be an int >= 1 .* got 1.5"),
        ("tfidf", {"norm": "l3"}, r"norm must be 'l1', 'l2' or null, got 'l3'"),
        ("tfidf", {"use_idf": "yes"}, r"use_idf must be true or false"),
        ("lda", {"n_topics": 0}, r"n_topics must be an int >= 1, got 0"),
        ("lda", {"learning_method": "gibbs"}, r"learning_method must be 'batch' or 'online'"),
        ("lda", {"doc_topic_prior": -1.0}, r"doc_topic_prior must be a number > 0 or null"),
        ("word2vec", {"dim": 0}, r"dim must be an int >= 1, got 0"),
        ("word2vec", {"vectors_path": ""}, r"vectors_path must be a file path or null"),
        ("sift", {"codebook_size": 1}, r"codebook_size must be an int >= 2, got 1"),
        ("sift", {"max_descriptors": 10}, r"max_descriptors \(10\) must be >= codebook_size \(64\)"),
        ("sift", {"size": 8}, r"size must be 0 \(no resize\) or >= 16, got 8"),
    ],
)
def test_bad_config_is_a_config_error(name, params, match):
    with pytest.raises(ConfigError, match=rf"extractor '{name}': {match}"):
        create_extractor(name, params)


def test_fit_errors_name_the_numbers_and_the_fix(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"8 train images gave \d+ SIFT descriptors, fewer than codebook_size=500; use codebook_size <= \d+",
    ):
        create_extractor("sift", {"codebook_size": 500}).fit(TRAIN_IMAGES)
    with pytest.raises(ConfigError, match=r"1 train images gave 0 SIFT descriptors"):
        create_extractor("sift", {"codebook_size": 2}).fit([np.zeros((32, 32, 3), np.uint8)])
    with pytest.raises(ConfigError, match=r"extractor 'bow': fit on 2 train texts failed: empty vocabulary"):
        create_extractor("bow").fit(["!", "?"])
    with pytest.raises(ConfigError, match=r"no token occurs min_count=500 times in 40 train texts"):
        create_extractor("word2vec", {"min_count": 500}).fit(TRAIN_TEXTS)
    with pytest.raises(ConfigError, match=r"cannot read vectors_path"):
        create_extractor("word2vec", {"vectors_path": str(tmp_path / "missing.txt")}).fit(["x"])
    with pytest.raises(MediaError, match=r"tfidf: item 1: expected a str, got int"):
        create_extractor("tfidf").fit(["a text", 3])
    with pytest.raises(MediaError, match=r"sift: train image 0: expected a uint8 RGB image"):
        create_extractor("sift").fit([np.zeros((32, 32), np.uint8)])


def test_load_artifact_refuses_another_config_or_a_broken_artifact():
    arrays = fitted("tfidf").artifact()
    with pytest.raises(
        ConfigError, match=r"extractor 'tfidf': artifact was fitted by .*'sublinear_tf': False"
    ):
        create_extractor("tfidf", {"sublinear_tf": True}).load_artifact(arrays)
    with pytest.raises(StoreError, match=r"artifact is missing array\(s\) \['idf'\]"):
        create_extractor("tfidf").load_artifact({k: v for k, v in arrays.items() if k != "idf"})
    sift = fitted("sift").artifact()
    sift["centres"] = sift["centres"][:4]
    with pytest.raises(StoreError, match=r"artifact centres have shape \(4, 128\), expected \(8, 128\)"):
        create_extractor("sift", FAST["sift"]).load_artifact(sift)
