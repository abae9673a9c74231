"""Data-parallel training with two ``torchrun`` processes on the CPU (gloo) and the tiny store.

The truths: the store's own list of train keys (each epoch covered once, ranks disjoint), and
single-process training on the same config. ``batch_size`` is the global batch: two ranks of
4 samples per step, with gradients averaged by DDP and batch norm over the global batch
(``GlobalBatchNorm``), compute the same step as one process with 8, so plain SGD without
dropout ends at the same weights up to float32 summation order (relative 1e-6 measured; a
rank-local batch norm is off by ~0.8 relative, one process with batch 4 by ~1). The tiny
train split (34 samples, shards of 8, 8, 8, 8, 2) ends each epoch with a step of 2 samples,
one per rank, so no rank pads and the comparison is exact in exact arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from features.errors import ConfigError
from fusion.checkpoint import unwrapped_state
from fusion.distributed import World, env_world
from fusion.train import TrainConfig, load_train_config, rank_batch_size, store_loader_factory, train_all
from pipelines.store import open_store

ROOT = Path(__file__).resolve().parents[2]
CONFIG = dict(
    groups=["image", "audio"],
    models=["early_fusion"],
    epochs=2,
    batch_size=8,
    optimizer="sgd",
    momentum=0.0,
    lr=0.05,
    hidden=16,
    dropout=0.0,
    amp=False,
    threads=1,
    device="cpu",
    log_keys=True,
)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 summation order only; real mistakes are ~1 relative

# A run that dies on rank 0 as epoch 2 starts, after epoch 1's last.pt is written (like a lost node).
CRASHING = """
import os, sys, torch
from fusion.train import load_train_config, store_loader_factory, train_all

config = load_train_config(sys.argv[1])

class DiesInEpoch2:
    def __init__(self, inner):
        self.inner = inner
        self.field_specs, self.field_groups = inner.field_specs, inner.field_groups
        self.num_classes = inner.num_classes
    def set_epoch(self, epoch): self.inner.set_epoch(epoch)
    def __len__(self): return len(self.inner)
    def __iter__(self):
        if self.inner.epoch == 2 and os.environ.get("RANK", "0") == "0":
            os._exit(3)
        return iter(self.inner)

def factory(split, groups, shuffle):
    loader = store_loader_factory(config, torch.device("cpu"), config.seed)(split, groups, shuffle)
    return DiesInEpoch2(loader) if split == "train" else loader

train_all(config, progress=False, loader_factory=factory)
"""


def write_config(path: Path, store: Path, runs_dir: Path, **kw) -> Path:
    path.write_text(yaml.safe_dump({"store": str(store), "runs_dir": str(runs_dir), **CONFIG, **kw}))
    return path


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tiny_store, tmp_path_factory):
    """One uninterrupted run with 2 torchrun ranks and one in this process, same config."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = write_config(root / "two.yaml", tiny_store, root / "two")
    done = torchrun("-m", "modalstore", "train", str(cfg), "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    one = load_train_config(write_config(root / "one.yaml", tiny_store, root / "one"))
    torch.manual_seed(0)
    train_all(one, progress=False)
    return {"root": root, "two": root / "two" / "early_fusion", "one": root / "one" / "early_fusion"}


@pytest.mark.slow
@pytest.mark.cluster
def test_two_ranks_write_one_checkpoint_without_ddp_prefix(runs):
    run = runs["two"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt", "config.yaml", "keys.rank0.jsonl", "keys.rank1.jsonl", "last.pt", "log.jsonl",
        "steps.jsonl",
    ]  # fmt: skip
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and last["state"]["epoch"] == 2
    assert not any(k.startswith("module.") for k in last["model"])
    assert weights(runs["one"]).keys() == last["model"].keys()
    assert [r["epoch"] for r in rows(run / "log.jsonl")] == [1, 2]  # one writer, no duplicate lines


@pytest.mark.slow
@pytest.mark.cluster
def test_ranks_see_disjoint_samples_covering_each_epoch(runs, tiny_store):
    train_keys = sorted(
        r["key"] for r in open_store(tiny_store).table("samples").to_pylist() if r["split"] == "train"
    )
    ranks = [rows(runs["two"] / f"keys.rank{r}.jsonl") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 * 5  # same steps on both ranks: ceil(34 / 8) per epoch
    for epoch in (1, 2):
        seen = [[k for row in rank if row["epoch"] == epoch for k in row["keys"]] for rank in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == train_keys
    # what one process trained on at each step is what the two ranks trained on together
    single = rows(runs["one"] / "keys.rank0.jsonl")
    for a, b, s in zip(*ranks, single, strict=True):
        assert a["step"] == b["step"] == s["step"]
        assert a["keys"] + b["keys"] == s["keys"]


@pytest.mark.slow
@pytest.mark.cluster
def test_two_ranks_match_one_process(runs, tiny_store):
    assert_close_weights(weights(runs["two"]), weights(runs["one"]))
    two, one = rows(runs["two"] / "log.jsonl"), rows(runs["one"] / "log.jsonl")
    for a, b in zip(two, one, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # the comparison can fail: one process with the per-rank batch of 4 trains otherwise
    cfg = load_train_config(
        write_config(runs["root"] / "b4.yaml", tiny_store, runs["root"] / "b4", batch_size=4)
    )
    train_all(cfg, progress=False)
    with pytest.raises(AssertionError):
        assert_close_weights(weights(runs["root"] / "b4" / "early_fusion"), weights(runs["one"]))


@pytest.mark.slow
@pytest.mark.cluster
def test_two_rank_checkpoint_resumes_in_one_process(runs, tiny_store, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_store, tmp_path / "runs")
    script = tmp_path / "crashing.py"
    script.write_text(textwrap.dedent(CRASHING))
    died = torchrun(str(script), str(cfg))
    assert died.returncode != 0
    run = tmp_path / "runs" / "early_fusion"
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 1
    train_all(load_train_config(cfg), progress=False, resume=True)  # one process now
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 2
    assert_close_weights(weights(run), weights(runs["two"]))
    assert [r["epoch"] for r in rows(run / "log.jsonl")] == [1, 2]


class Interrupted(Exception):
    pass


class StopsInEpoch2:
    """A train loader that raises as epoch 2 starts (the process then dies in the test)."""

    def __init__(self, inner):
        self.inner = inner
        self.field_specs, self.field_groups = inner.field_specs, inner.field_groups
        self.num_classes = inner.num_classes

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        if self.inner.epoch == 2:
            raise Interrupted
        return iter(self.inner)


@pytest.mark.slow
@pytest.mark.cluster
def test_one_process_checkpoint_resumes_on_two_ranks(runs, tiny_store, tmp_path):
    config = load_train_config(write_config(tmp_path / "cfg.yaml", tiny_store, tmp_path / "runs"))
    store_loaders = store_loader_factory(config, torch.device("cpu"), config.seed)

    def factory(split, groups, shuffle):
        loader = store_loaders(split, groups, shuffle)
        return StopsInEpoch2(loader) if split == "train" else loader

    with pytest.raises(Interrupted):
        train_all(config, progress=False, loader_factory=factory)
    run = tmp_path / "runs" / "early_fusion"
    assert torch.load(run / "last.pt", weights_only=True)["world_size"] == 1
    done = torchrun("-m", "modalstore", "train", str(tmp_path / "cfg.yaml"), "--quiet", "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["world_size"] == 2 and last["state"]["epoch"] == 2
    assert_close_weights(weights(run), weights(runs["one"]))
    assert [r["epoch"] for r in rows(run / "log.jsonl")] == [1, 2]


def test_global_batch_must_split_evenly_over_the_ranks():
    config = TrainConfig(store="x", groups=["image"], batch_size=8)
    assert rank_batch_size(config, World(1, 4)) == 2
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        rank_batch_size(config, World(0, 3))


def test_torchrun_environment_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == World(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 with WORLD_SIZE=2"):
        env_world()


def test_ddp_prefix_is_stripped_from_foreign_state_dicts():
    state = {"module.a": torch.zeros(1), "module.b.c": torch.ones(1)}
    assert list(unwrapped_state(state)) == ["a", "b.c"]
    assert list(unwrapped_state({"a": torch.zeros(1)})) == ["a"]
