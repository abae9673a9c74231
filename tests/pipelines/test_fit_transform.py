"""Fit-then-transform groups: fitted on the train split only, artifact stored and reused."""

import csv
import io
import json

import numpy as np
import pytest
import webdataset as wds
from sklearn.feature_extraction.text import TfidfVectorizer
from store_fixtures import write_extract_config

from pipelines.extract import load_extract_config, run_extract
from pipelines.store import open_store


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "split", "text"])
        w.writerows(rows)
    return path


CAPTIONS = [
    "a red kite over the quiet harbor",
    "a loud blue tram in the busy square",
    "the calm garden at dawn",
    "wild waves crash on the noisy beach",
]


def corpus():
    rows = []
    for i in range(24):
        split = "train" if i < 16 else ("val" if i < 20 else "test")
        text = CAPTIONS[i % 4] + f" number{i % 3}"
        if split == "test" and i == 23:
            text += " zebra"  # a word only the test split has
        rows.append((f"k{i:02d}", i % 2, split, text))
    return rows


def test_tfidf_fitted_on_train_only_and_equal_to_sklearn(tmp_path):
    rows = corpus()
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cfg = write_extract_config(
        tmp_path / "c.yaml",
        manifest,
        tmp_path / "store",
        {"words": {"extractor": "tfidf", "params": {}}},
        samples_per_shard=5,
    )
    run_extract(load_extract_config(cfg), progress=False)
    store = open_store(tmp_path / "store")
    meta = store.meta["groups"]["words"]
    art = meta["artifact"]
    assert art["split"] == "train" and art["fitted_on"] == 16 and len(art["sha256"]) == 64
    npz_path = tmp_path / "store" / art["path"]
    with np.load(npz_path, allow_pickle=False) as npz:
        terms = [str(t) for k in npz.files for t in np.atleast_1d(npz[k]) if npz[k].dtype.kind == "U"]
    assert "zebra" not in terms  # nothing of the test split reached the fit
    reference = TfidfVectorizer().fit([t for _, _, s, t in rows if s == "train"])
    assert "zebra" not in reference.vocabulary_
    texts = {k: t for k, _, _, t in rows}
    (field,) = meta["fields"]
    assert meta["fields"][field]["shape"] == [len(reference.vocabulary_)]
    seen = 0
    for split in ("train", "val", "test"):
        urls = [str(store.shard_path("words", s)) for s in store.shards(split)]
        for sample in wds.WebDataset(urls, shardshuffle=False):
            assert json.loads(sample["json"])["present"]
            got = np.load(io.BytesIO(sample[f"{field}.npy"]), allow_pickle=False)
            want = reference.transform([texts[sample["__key__"]]]).toarray()[0].astype(np.float32)
            np.testing.assert_allclose(got, want, atol=1e-6)
            seen += 1
    assert seen == len(rows)


def test_changing_test_texts_does_not_change_the_fit(tmp_path):
    digests = []
    for variant in ("a", "b"):
        rows = [
            (k, y, s, t + (" extra words only here" if s == "test" and variant == "b" else ""))
            for k, y, s, t in corpus()
        ]
        manifest = write_manifest(tmp_path / f"m{variant}.csv", rows)
        cfg = write_extract_config(
            tmp_path / f"c{variant}.yaml",
            manifest,
            tmp_path / f"s{variant}",
            {"words": {"extractor": "tfidf", "params": {}}},
        )
        run_extract(load_extract_config(cfg), progress=False)
        digests.append(open_store(tmp_path / f"s{variant}").meta["groups"]["words"]["artifact"]["sha256"])
    assert digests[0] == digests[1]


def test_fit_needs_train_media(tmp_path):
    rows = [(k, y, "test", t) for k, y, _, t in corpus()[:4]]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    cfg = write_extract_config(
        tmp_path / "c.yaml", manifest, tmp_path / "store", {"words": {"extractor": "tfidf", "params": {}}}
    )
    with pytest.raises(Exception, match="must be fitted on the train split, but no train sample"):
        run_extract(load_extract_config(cfg), progress=False)


def test_fit_samples_fits_on_evenly_spaced_train_rows(tmp_path):
    """``fit_samples: 5`` fits on 5 of the 16 train rows, evenly spaced (rows 0, 3, 6, 9, 12 of the
    split): the features equal sklearn's fitted on those texts; a second run reuses the artifact."""
    from features.errors import ConfigError

    rows = corpus()
    for i in (3, 9):  # words only two of the chosen rows have
        rows[i] = (*rows[i][:3], rows[i][3] + " lighthouse")
    rows[1] = (*rows[1][:3], rows[1][3] + " submarine")  # a train row the fit skips
    manifest = write_manifest(tmp_path / "m.csv", rows)
    groups = {"words": {"extractor": "tfidf", "params": {}, "fit_samples": 5}}
    cfg = write_extract_config(tmp_path / "c.yaml", manifest, tmp_path / "store", groups, samples_per_shard=5)
    run_extract(load_extract_config(cfg), progress=False)
    store = open_store(tmp_path / "store")
    art = store.meta["groups"]["words"]["artifact"]
    assert art["fitted_on"] == 5
    train = [t for _, _, s, t in rows if s == "train"]
    reference = TfidfVectorizer().fit([train[i] for i in (0, 3, 6, 9, 12)])
    assert "lighthouse" in reference.vocabulary_ and "submarine" not in reference.vocabulary_
    texts = {k: t for k, _, _, t in rows}
    (field,) = store.meta["groups"]["words"]["fields"]
    urls = [str(store.shard_path("words", s)) for split in ("train", "test") for s in store.shards(split)]
    for sample in wds.WebDataset(urls, shardshuffle=False):
        got = np.load(io.BytesIO(sample[f"{field}.npy"]), allow_pickle=False)
        want = reference.transform([texts[sample["__key__"]]]).toarray()[0].astype(np.float32)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert run_extract(load_extract_config(cfg), progress=False).up_to_date
    bad = write_extract_config(
        tmp_path / "b.yaml",
        manifest,
        tmp_path / "s2",
        {"audio": {"extractor": "mfcc", "params": {}, "fit_samples": 5}},
    )
    with pytest.raises(ConfigError, match=r"groups.audio.fit_samples: extractor 'mfcc' is not fitted"):
        load_extract_config(bad)
