"""Trainer features: exact resume, schedule, losses, modality dropout, early stopping, pretraining,
seeds; and the learning test: every fusion model beats every unimodal baseline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fusion.evaluate import evaluate_all, evaluate_run
from fusion.losses import classification_loss
from fusion.models import list_models
from fusion.optim import make_scheduler
from fusion.report import write_report
from fusion.train import RunSpec, TrainConfig, drop_modalities, train_one

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPS = ("image", "audio")
HERE = Path(__file__).resolve().parent


def config(runs_dir, **kw) -> TrainConfig:
    base = dict(
        store="fake-store",
        runs_dir=str(runs_dir),
        groups=list(GROUPS),
        models=["late_fusion"],
        epochs=3,
        batch_size=32,
        lr=3e-3,
        hidden=16,
        dropout=0.2,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


# The resume config touches every piece of state: dropout and modality dropout (RNG), AdamW
# moments (optimiser), warmup + cosine (scheduler), clipping.
RESUME = dict(
    optimizer="adamw",
    weight_decay=0.01,
    schedule="cosine",
    warmup_steps=3,
    grad_clip=1.0,
    modality_dropout=0.3,
)


class Interrupted(Exception):
    pass


class CrashAfter:
    """A train loader that raises after ``steps`` batches in total (a kill mid-epoch)."""

    def __init__(self, loader, steps: int) -> None:
        self.loader, self.left = loader, steps
        self.field_specs, self.field_groups = loader.field_specs, loader.field_groups
        self.num_classes = loader.num_classes

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.left == 0:
                raise Interrupted
            self.left -= 1
            yield batch


def _rows(path: Path, drop=("seconds",)) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()
    ]


def test_resume_after_a_crash_mid_epoch_gives_the_same_weights(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 128, "val": 64}, batch_size=32)
    run = RunSpec("late_fusion", "late_fusion", GROUPS)
    full = train_one(config(tmp_path / "full", **RESUME), run, factory, progress=False)

    def crashing(split, groups, shuffle):
        loader = factory(split, groups, shuffle)
        return CrashAfter(loader, 4 + 2) if split == "train" else loader  # 4 steps per epoch

    cfg = config(tmp_path / "resumed", **RESUME)
    with pytest.raises(Interrupted):
        train_one(cfg, run, crashing, progress=False)
    part = tmp_path / "resumed" / "late_fusion"
    assert [r["epoch"] for r in _rows(part / "log.jsonl")] == [1]
    torch.manual_seed(123)  # whatever the process did since, resume restores the RNG
    train_one(cfg, run, factory, progress=False, resume=True)

    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["state"] == b["state"]
    assert _rows(full / "log.jsonl") == _rows(part / "log.jsonl")
    assert _rows(full / "steps.jsonl") == _rows(part / "steps.jsonl")


def test_resume_refuses_another_config_and_skips_a_finished_run(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 64, "val": 32}, batch_size=32)
    run = RunSpec("late_fusion", "late_fusion", GROUPS)
    out = train_one(config(tmp_path, epochs=1), run, factory, progress=False)
    before = (out / "last.pt").read_bytes()
    train_one(config(tmp_path, epochs=1), run, factory, progress=False, resume=True)
    assert (out / "last.pt").read_bytes() == before  # nothing left to train
    with pytest.raises(Exception, match="another config"):
        train_one(config(tmp_path, epochs=1, lr=0.1), run, factory, progress=False, resume=True)


SCRIPT = """
import os, sys
sys.path.insert(0, {here!r})
import torch
torch.set_num_threads(1)
import conftest
from fusion.train import RunSpec, TrainConfig, train_one

factory = conftest.make_fake_loader_factory(groups=("image", "audio"), sizes={{"train": 128, "val": 64}})
kill_after = int(sys.argv[2])

def killing(split, groups, shuffle):
    loader = factory(split, groups, shuffle)
    if split != "train" or kill_after < 0:
        return loader
    inner = loader.__iter__
    def dying():
        for i, batch in enumerate(inner()):
            if loader.epoch == 2 and i == kill_after:
                os._exit(9)  # like SIGKILL: no cleanup, no exception handling
            yield batch
    loader.__iter__ = dying
    return loader

class Loader:
    def __init__(self, inner):
        self.inner = inner
        self.field_specs, self.field_groups = inner.field_specs, inner.field_groups
        self.num_classes = inner.num_classes
    def set_epoch(self, e): self.inner.set_epoch(e)
    def __len__(self): return len(self.inner)
    def __iter__(self): return self.inner.__iter__()

cfg = TrainConfig(store="x", runs_dir=sys.argv[1], groups=["image", "audio"], models=["late_fusion"],
                  epochs=3, batch_size=32, lr=3e-3, hidden=16, dropout=0.2, device="cpu", optimizer="adamw",
                  weight_decay=0.01, schedule="cosine", warmup_steps=3, grad_clip=1.0, modality_dropout=0.3)
train_one(cfg, RunSpec("late_fusion", "late_fusion", ("image", "audio")),
          lambda *a: Loader(killing(*a)), progress=False, resume=sys.argv[3] == "resume")
"""


@pytest.mark.slow
def test_resume_after_a_killed_process_gives_the_same_weights(tmp_path, fake_loader_factory):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT.format(here=str(HERE))))
    root = str(HERE.parents[1])

    def run(out, kill, mode):
        return subprocess.run(
            [sys.executable, str(script), str(out), str(kill), mode], cwd=root, capture_output=True, text=True
        )

    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 128, "val": 64}, batch_size=32)
    run_spec = RunSpec("late_fusion", "late_fusion", GROUPS)
    train_one(config(tmp_path / "full", **RESUME), run_spec, factory, progress=False)  # uninterrupted
    killed = run(tmp_path / "killed", 2, "fresh")
    assert killed.returncode == 9, killed.stderr
    assert run(tmp_path / "killed", -1, "resume").returncode == 0
    a = torch.load(tmp_path / "full/late_fusion/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed/late_fusion/last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_warmup_then_cosine_matches_torch_cosine_annealing():
    lr, warmup, total, floor = 0.1, 4, 20, 0.1
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(ours, "cosine", warmup, total, floor)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=total - warmup, eta_min=floor * lr)
    seen = []
    for step in range(total):
        seen.append(ours.param_groups[0]["lr"])
        if step < warmup:
            assert seen[-1] == pytest.approx(lr * (step + 1) / warmup)
        else:
            assert seen[-1] == pytest.approx(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref.step()
        ours.step()
        sched.step()
    assert seen[warmup] == pytest.approx(lr) and seen[-1] > floor * lr


def test_classification_loss_with_smoothing_and_class_weights():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 3, generator=gen), torch.tensor([0, 1, 2, 2, 1, 0])
    logp = logits.log_softmax(-1)
    nll = -logp[torch.arange(6), labels]
    eps = 0.2
    smoothed = ((1 - eps) * nll - eps / 3 * logp.sum(-1)).mean()
    assert classification_loss(logits, labels, label_smoothing=eps) == pytest.approx(smoothed.item())
    w = torch.tensor([1.0, 2.0, 0.5])
    weighted = (w[labels] * nll).sum() / w[labels].sum()
    assert classification_loss(logits, labels, class_weights=w.tolist()) == pytest.approx(weighted.item())
    with pytest.raises(ValueError, match="class_weights has 2 values but the model has 3 classes"):
        classification_loss(logits, labels, class_weights=[1.0, 2.0])


def test_modality_dropout_hides_groups_like_missing_ones_but_never_all(fake_loader_factory):
    loader = fake_loader_factory(groups=GROUPS, sizes={"train": 64}, batch_size=64, missing=0.0)(
        "train", GROUPS, False
    )
    batch = next(iter(loader))
    torch.manual_seed(0)
    out = drop_modalities(batch, list(GROUPS), 0.6)
    present = torch.stack([out["present"][g] for g in GROUPS], 1)
    assert present.any(1).all() and (~present).any()
    hidden_audio = ~out["present"]["audio"]
    assert torch.equal(
        out["features"]["audio.mfcc"][hidden_audio],
        torch.zeros_like(batch["features"]["audio.mfcc"][hidden_audio]),
    )
    assert not out["mask"]["audio.mfcc"][hidden_audio].any()
    assert (out["lengths"]["audio.mfcc"][hidden_audio] == 0).all()
    kept = out["present"]["image"]
    assert torch.equal(out["features"]["image.embedding"][kept], batch["features"]["image.embedding"][kept])
    assert batch["present"]["audio"].all()  # the input batch is not modified


def test_early_stopping_and_monitor(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 64, "val": 32}, batch_size=32)
    run = RunSpec("late_fusion", "late_fusion", GROUPS)
    # lr 1e-9: the weights barely move (only BatchNorm statistics do), so validation stalls
    out = train_one(
        config(tmp_path, epochs=10, lr=1e-9, early_stopping=2, dropout=0.0), run, factory, progress=False
    )
    log = _rows(out / "log.jsonl")
    best, best_epoch, bad, stop = -1.0, 0, 0, 10
    for r in log:  # the rule, replayed independently over the logged scores
        if r["val_acc"] > best:
            best, best_epoch, bad = r["val_acc"], r["epoch"], 0
        else:
            bad += 1
            if bad == 2:
                stop = r["epoch"]
                break
    assert stop < 10 and [r["epoch"] for r in log] == list(range(1, stop + 1))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == best_epoch and ckpt["monitor"] == "val_acc"
    out = train_one(config(tmp_path / "loss", epochs=3, monitor="val_loss"), run, factory, progress=False)
    log = _rows(out / "log.jsonl")
    best = min(log, key=lambda r: r["val_loss"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == best["epoch"] and ckpt["best_score"] == pytest.approx(best["val_loss"])


def test_autoencoder_pretrains_unsupervised_first(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 64, "val": 32}, batch_size=32)
    run = RunSpec("autoencoder", "autoencoder", GROUPS)
    out = train_one(
        config(tmp_path, models=["autoencoder"], epochs=3, pretrain_epochs=2), run, factory, progress=False
    )
    assert [r["phase"] for r in _rows(out / "log.jsonl")] == ["pretrain", "pretrain", "train"]
    steps = _rows(out / "steps.jsonl")
    assert set(steps[0]) >= {"pretrain"} and "ce" not in steps[0]
    assert {"ce", "reconstruction"} <= set(steps[-1])
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 3  # pretraining never selected


@pytest.mark.slow  # two seeds x three runs, evaluated and plotted: ~3 s
def test_seeds_give_mean_and_std_in_the_report(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 64, "val": 32, "test": 64}, batch_size=32)
    from fusion.train import train_all

    cfg = config(tmp_path, models=["late_fusion", "unimodal"], epochs=1, seeds=2)
    paths = train_all(cfg, progress=False, loader_factory=factory)
    assert [p.name for p in paths][:2] == ["late_fusion-seed0", "late_fusion-seed1"]
    metrics = evaluate_all(tmp_path, "test", loader_factory=factory, device="cpu", robustness=False)
    assert {m["base_run"] for m in metrics} == {"late_fusion", "unimodal-image", "unimodal-audio"}
    md = write_report(tmp_path)
    acc = [m["accuracy"] for m in metrics if m["base_run"] == "late_fusion"]
    mean, std = sum(acc) / 2, abs(acc[0] - acc[1]) / math.sqrt(2)
    assert f"| late_fusion | late_fusion | image + audio | 2 | {100 * mean:.1f} ± {100 * std:.1f} |" in md
    assert "over 2 seeds" in md
    # several folders: one comparison, run names prefixed with their folder
    import shutil

    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy")
    both = write_report(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy", out_dir=tmp_path / "cmp")
    assert f"| {tmp_path.name}/late_fusion |" in both and f"| {tmp_path.name}-copy/late_fusion |" in both
    assert (tmp_path / "cmp" / "report.md").read_text() == both


# -- learning: every fusion model beats every unimodal baseline ---------------------------------------

LEARN_GROUPS = ("image", "audio", "video")  # 8 classes; one group alone knows one bit of three


@pytest.fixture(scope="module")
def learn_factory(fake_loader_factory):
    return fake_loader_factory(
        groups=LEARN_GROUPS, sizes={"train": 384, "val": 128, "test": 256}, batch_size=32, missing=0.03
    )


def _learn(tmp_path, factory, model: str, groups: tuple[str, ...]) -> float:
    cfg = TrainConfig(
        store="fake",
        runs_dir=str(tmp_path),
        groups=list(LEARN_GROUPS),
        models=[model],
        epochs=6,
        batch_size=32,
        lr=3e-3,
        hidden=32,
        dropout=0.0,
        device="cpu",
        # 9-frame sequences: 8 attention steps are plenty, and keep the test fast
        model_params={"cross_attention": {"steps": 8}} if model == "cross_attention" else {},
    )
    out = train_one(cfg, RunSpec(f"{model}-{'-'.join(groups)}", model, groups), factory, progress=False)
    return evaluate_run(out, "test", loader_factory=factory, device="cpu", robustness=False)["accuracy"]


@pytest.fixture(scope="module")
def unimodal_accuracy(tmp_path_factory, learn_factory, one_torch_thread):
    runs = tmp_path_factory.mktemp("unimodal")
    return {g: _learn(runs, learn_factory, "unimodal", (g,)) for g in LEARN_GROUPS}


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(m, marks=pytest.mark.slow) if m == "cross_attention" else m  # ~3 s on 2 busy cores
        for m in list_models()
        if m != "unimodal"
    ],
)
def test_every_fusion_model_beats_every_unimodal_baseline(model, tmp_path, learn_factory, unimodal_accuracy):
    for g, acc in unimodal_accuracy.items():
        assert 0.15 < acc < 0.35, (g, acc)  # ~25 %: one bit of three learned, two at chance
    fused = _learn(tmp_path, learn_factory, model, LEARN_GROUPS)
    assert fused > 0.8, fused
    assert fused > max(unimodal_accuracy.values()) + 0.4


def test_bf16_autocast_is_cuda_only(tmp_path, fake_loader_factory):
    # On CPU the amp flag must not change anything: same weights with and without it.
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 64, "val": 32}, batch_size=32)
    run = RunSpec("late_fusion", "late_fusion", GROUPS)
    a = train_one(config(tmp_path / "a", epochs=1, amp=True), run, factory, progress=False)
    b = train_one(config(tmp_path / "b", epochs=1, amp=False), run, factory, progress=False)
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_on_cuda(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 64, "val": 32}, batch_size=32)
    run = RunSpec("cross_attention", "cross_attention", GROUPS)
    out = train_one(
        config(tmp_path, models=["cross_attention"], epochs=2, device="cuda"), run, factory, progress=False
    )
    log = _rows(out / "log.jsonl")
    assert all(math.isfinite(r["train_loss"]) for r in log)


class _PairedLoader:
    """Two groups carrying the *same* bit: one modality predicts the other (4 classes: bit, bit)."""

    field_groups = {"image.embedding": "image", "audio.mfcc": "audio"}
    num_classes = 2

    def __init__(self, n: int, seed: int) -> None:
        from features.spec import FieldSpec

        self.field_specs = {
            "image.embedding": FieldSpec("float32", (12,)),
            "audio.mfcc": FieldSpec("float32", (None, 6)),
        }
        world = torch.Generator().manual_seed(99)
        d_img, d_aud = torch.randn(12, generator=world), torch.randn(6, generator=world)
        gen = torch.Generator().manual_seed(seed)
        self.bit = torch.randint(0, 2, (n,), generator=gen)
        sign = (2.0 * self.bit - 1.0)[:, None]
        self.image = 10.0 * (torch.randn(n, 12, generator=gen) + sign * d_img + 2)
        self.audio = 10.0 * (torch.randn(n, 5, 6, generator=gen) + sign[:, None] * d_aud + 2)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.bit) / 32)

    def __iter__(self):
        for s in range(0, len(self.bit), 32):
            b = self.bit[s : s + 32]
            yield {
                "label": b,
                "features": {"image.embedding": self.image[s : s + 32], "audio.mfcc": self.audio[s : s + 32]},
                "mask": {"audio.mfcc": torch.ones(len(b), 5, dtype=torch.bool)},
                "lengths": {"audio.mfcc": torch.full((len(b),), 5)},
                "present": {
                    "image": torch.ones(len(b), dtype=torch.bool),
                    "audio": torch.ones(len(b), dtype=torch.bool),
                },
            }


def test_autoencoder_reconstructs_a_missing_modality_from_the_other(tmp_path):
    from fusion.evaluate import load_checkpoint, model_from_checkpoint
    from fusion.perturb import hide

    loaders = {"train": _PairedLoader(512, 0), "val": _PairedLoader(128, 1), "test": _PairedLoader(256, 2)}
    cfg = config(
        tmp_path,
        models=["autoencoder"],
        epochs=8,
        pretrain_epochs=7,
        modality_dropout=0.5,
        dropout=0.0,
        hidden=32,
    )
    out = train_one(
        cfg, RunSpec("autoencoder", "autoencoder", GROUPS), lambda s, g, sh: loaders[s], progress=False
    )
    model = model_from_checkpoint(load_checkpoint(out)).eval()
    test = loaders["test"]
    batch = next(iter(test))
    with torch.no_grad():
        recon = model.reconstruct(hide(batch, "image"))["image"]  # from the audio alone
    truth = batch["features"]["image.embedding"]
    err = ((recon - truth) ** 2).mean()
    mean_guess = ((loaders["train"].image.mean(0) - truth) ** 2).mean()
    # the audio tells the bit, so the image is known up to its noise: about half the error of a mean guess
    assert err < 0.75 * mean_guess, (err, mean_guess)
