import pytest

from features.errors import ConfigError
from pipelines.extract import ExtractConfig, load_extract_config

GOOD = """
manifest: m.csv
store: s
samples_per_shard: 8
groups:
  audio: {extractor: mfcc, params: {n_mfcc: 13}}
"""


def test_load_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    cfg = load_extract_config(path, ["samples_per_shard=4", "groups.audio.params.n_mfcc=20"])
    assert isinstance(cfg, ExtractConfig)
    assert cfg.samples_per_shard == 4
    assert cfg.groups["audio"].extractor == "mfcc" and cfg.groups["audio"].params == {"n_mfcc": 20}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            GOOD.replace("samples_per_shard: 8", "shards_per_sample: 8"),
            r"unknown key\(s\) \['shards_per_sample'\]",
        ),
        (
            GOOD.replace("samples_per_shard: 8", "samples_per_shard: many"),
            r"samples_per_shard: expected an integer",
        ),
        (
            GOOD.replace("extractor: mfcc", "extractor: mfccc"),
            r"unknown extractor 'mfccc'; available: .*mfcc",
        ),
        (GOOD.replace("store: s\n", ""), r"missing required key 'store'"),
        (GOOD.replace("audio:", "Audio:"), r"groups.Audio: group names are lower-case"),
        ("[1, 2]", r"top level must be a mapping"),
        ("a: [", r"not valid YAML"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_extract_config(path)


def test_bad_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_extract_config(path, ["samples_per_shard"])
