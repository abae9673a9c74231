"""Training, evaluation and report on the two-bit synthetic task, checked against scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from features.errors import ConfigError, StoreError
from features.spec import FieldSpec
from fusion.evaluate import evaluate_all, evaluate_run
from fusion.models import get_model
from fusion.report import write_report
from fusion.train import (
    RunSpec,
    TrainConfig,
    load_run_config,
    load_train_config,
    make_optimizer,
    plan_runs,
    train_all,
    train_one,
)
from pipelines.config import to_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GROUPS = ("image", "audio")
RUN_NAMES = ["late_fusion", "unimodal-image", "unimodal-audio"]


def small_config(runs_dir, **kw) -> TrainConfig:
    base = dict(
        store="fake-store",
        runs_dir=str(runs_dir),
        groups=list(GROUPS),
        models=["late_fusion", "unimodal"],
        epochs=6,
        batch_size=32,  # the fake factory's batch size
        lr=3e-3,
        hidden=32,
        dropout=0.0,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_loader_factory, one_torch_thread):
    """Train, evaluate and report all three runs once for the module."""
    runs_dir = tmp_path_factory.mktemp("runs")
    factory = fake_loader_factory(groups=GROUPS, batch_size=32)
    config = small_config(runs_dir)
    paths = train_all(config, progress=False, loader_factory=factory)
    metrics = {m["run"]: m for m in evaluate_all(runs_dir, "test", loader_factory=factory, device="cpu")}
    report = write_report(runs_dir)
    return SimpleNamespace(
        runs_dir=runs_dir, config=config, factory=factory, paths=paths, metrics=metrics, report=report
    )


def test_plan_runs_expands_unimodal_per_group(tmp_path):
    runs = plan_runs(small_config(tmp_path))
    assert runs == [
        RunSpec("late_fusion", "late_fusion", ("image", "audio")),
        RunSpec("unimodal-image", "unimodal", ("image",)),
        RunSpec("unimodal-audio", "unimodal", ("audio",)),
    ]
    seeded = plan_runs(small_config(tmp_path, models=["late_fusion"], seed=3, seeds=2))
    assert seeded == [
        RunSpec("late_fusion-seed3", "late_fusion", ("image", "audio"), 3),
        RunSpec("late_fusion-seed4", "late_fusion", ("image", "audio"), 4),
    ]


def test_fusion_beats_every_unimodal_run(trained):
    acc = {name: m["accuracy"] for name, m in trained.metrics.items()}
    assert set(acc) == set(RUN_NAMES)
    assert acc["late_fusion"] > 0.9, acc
    for name in ("unimodal-image", "unimodal-audio"):
        # one bit of two: ~50 % at best, and clearly above the 25 % chance level once learned
        assert 0.35 < acc[name] < 0.6, acc


def test_run_folder_holds_config_log_and_checkpoint(trained):
    for path, run in zip(trained.paths, plan_runs(trained.config), strict=True):
        assert path == trained.runs_dir / run.name
        config, saved_run = load_run_config(path / "config.yaml")
        assert config == trained.config and saved_run == run

        log = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in log] == list(range(1, trained.config.epochs + 1))
        assert set(log[0]) == {
            "epoch",
            "step",
            "phase",
            "train_loss",
            "train_acc",
            "val_loss",
            "val_acc",
            "val_macro_f1",
            "lr",
            "seconds",
        }
        steps = [json.loads(line) for line in (path / "steps.jsonl").read_text().splitlines()]
        assert [row["step"] for row in steps] == list(range(1, len(steps) + 1))
        assert len(steps) == trained.config.epochs * 16 == log[-1]["step"]  # 512 samples / 32
        assert {"loss", "ce", "lr", "epoch"} <= set(steps[0])

        ckpt = torch.load(path / "checkpoint.pt", weights_only=True)
        assert ckpt["config"] == to_dict(trained.config)
        assert ckpt["run"] == {"name": run.name, "model": run.model, "groups": list(run.groups), "seed": 0}
        assert ckpt["num_classes"] == 4
        assert set(ckpt["field_groups"].values()) == set(run.groups)
        last = torch.load(path / "last.pt", weights_only=True)
        assert {"state", "param_groups"} <= set(last["optimizer"])
        assert {"model", "scheduler", "rng", "state", "config", "loader"} <= set(last)
        assert last["state"]["epoch"] == trained.config.epochs and last["state"]["step"] == log[-1]["step"]
        # the checkpoint is the first epoch with the best validation accuracy in the log
        best = max(row["val_acc"] for row in log)
        assert ckpt["best_val_acc"] == best
        assert ckpt["epoch"] == next(row["epoch"] for row in log if row["val_acc"] == best)


def rebuild(ckpt: dict) -> torch.nn.Module:
    specs = {f: FieldSpec.from_dict(d) for f, d in ckpt["field_specs"].items()}
    cls = get_model(ckpt["run"]["model"])
    model = cls(
        specs, ckpt["field_groups"], ckpt["run"]["groups"], ckpt["num_classes"], **ckpt["model_kwargs"]
    )
    model.load_state_dict(ckpt["model"])
    return model.eval()


@torch.no_grad()
def predictions(model, loader) -> tuple[list[int], list[int]]:
    labels, preds = [], []
    for batch in loader:
        labels += batch["label"].tolist()
        preds += model(batch)["logits"].argmax(-1).tolist()
    return labels, preds


def test_checkpoint_weights_reproduce_the_best_val_accuracy(trained):
    for path in trained.paths:
        ckpt = torch.load(path / "checkpoint.pt", weights_only=True)
        labels, preds = predictions(rebuild(ckpt), trained.factory("val", ckpt["run"]["groups"], False))
        assert accuracy_score(labels, preds) == pytest.approx(ckpt["best_val_acc"])


def test_metrics_equal_scikit_learn_on_independent_predictions(trained):
    for path in trained.paths:
        ckpt = torch.load(path / "checkpoint.pt", weights_only=True)
        labels, preds = predictions(rebuild(ckpt), trained.factory("test", ckpt["run"]["groups"], False))
        metrics = json.loads((path / "metrics.json").read_text())
        assert metrics == trained.metrics[path.name]
        assert metrics["n"] == len(labels) == 256
        assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6)
        assert metrics["macro_recall"] == pytest.approx(
            recall_score(labels, preds, average="macro"), abs=1e-6
        )
        assert metrics["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-6)
        for avg in ("macro", "micro"):
            assert metrics[f"{avg}_precision"] == pytest.approx(
                precision_score(labels, preds, average=avg, zero_division=0), abs=1e-6
            )
            assert metrics[f"{avg}_f1"] == pytest.approx(f1_score(labels, preds, average=avg), abs=1e-6)
        p, r, f, support = precision_recall_fscore_support(labels, preds, labels=range(4), zero_division=0)
        for k, row in enumerate(metrics["per_class"]):
            assert row["class"] == k and row["support"] == support[k]
            assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[k], r[k], f[k]), abs=1e-6)
        assert (path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert metrics["confusion_matrix"] == confusion_matrix(labels, preds, labels=range(4)).tolist()
        rows = (path / "predictions.csv").read_text().splitlines()[1:]
        assert [int(r.split(",")[2]) for r in rows] == preds


def test_report_lists_every_run_fusion_first(trained):
    md = (trained.runs_dir / "report.md").read_text()
    assert md == trained.report
    lines = md.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| run | model")))
    table = lines[start + 2 : start + 5]
    assert [line.split(" | ")[0][2:] for line in table] == ["late_fusion", "unimodal-audio", "unimodal-image"]
    for name, m in trained.metrics.items():
        row = next(line for line in table if line.startswith(f"| {name} |"))
        cells = [100 * m[c] for c in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_f1")]
        assert "| 1 | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {m['n']} |" in row
    # robustness: the drop when masking a modality, from the metrics' own masked accuracies
    rob = next(line for line in lines if line.startswith("| late_fusion | ") and line.count("|") == 7)
    m = trained.metrics["late_fusion"]
    drops = [100 * (m["accuracy"] - m["robustness"][k][g]) for k in ("masked", "noise") for g in GROUPS]
    assert (
        rob == f"| late_fusion | {100 * m['accuracy']:.1f} | " + " | ".join(f"{d:+.1f}" for d in drops) + " |"
    )
    assert "](late_fusion/confusion.png)" in md and "](curves.png)" in md
    best_uni = max(trained.metrics[n]["accuracy"] for n in RUN_NAMES[1:])
    margin = 100 * (trained.metrics["late_fusion"]["accuracy"] - best_uni)
    assert f"margin {margin:+.1f} points" in md
    assert "](report.png)" in md
    for png in ("report.png", "curves.png"):
        assert (trained.runs_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_is_deterministic(tmp_path, fake_loader_factory):
    factory = fake_loader_factory(groups=GROUPS, sizes={"train": 128, "val": 64}, batch_size=32)
    run = RunSpec("late_fusion", "late_fusion", GROUPS)
    states = []
    for name in ("a", "b"):
        config = small_config(tmp_path / name, epochs=2, dropout=0.2)
        ckpt = torch.load(
            train_one(config, run, factory, progress=False) / "checkpoint.pt", weights_only=True
        )
        states.append(ckpt["model"])
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_evaluate_refuses_a_store_with_other_classes(trained, fake_loader_factory):
    other = fake_loader_factory(groups=("image", "audio", "video"), sizes={"test": 16})
    with pytest.raises(StoreError, match="trained for 4 classes, the loader has 8"):
        evaluate_run(trained.runs_dir / "late_fusion", "test", loader_factory=other, device="cpu")


# -- configuration errors ----------------------------------------------------------------------------


def test_config_rejects_a_bad_optimizer(tmp_path):
    with pytest.raises(
        ConfigError, match=r"TrainConfig.optimizer: must be one of \['adam', 'adamw', 'sgd'\], got 'rmsprop'"
    ):
        small_config(tmp_path, optimizer="rmsprop")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("epochs", 0, r"TrainConfig.epochs: must be >= 1, got 0"),
        ("lr", 0.0, r"TrainConfig.lr: must be > 0"),
        ("dropout", 1.0, r"TrainConfig.dropout: must be in \[0, 1\)"),
        ("groups", [], r"TrainConfig.groups: must be a non-empty list"),
        (
            "models",
            ["late_fusion", "transformer"],
            r"unknown model\(s\) \['transformer'\]; available: .*late_fusion",
        ),
        (
            "model_params",
            {"late_fusion": {"depth": 2}},
            r"unknown option\(s\) \['depth'\]; valid: \['combine'\]",
        ),
        (
            "model_params",
            {"late_fusoin": {"combine": "mean"}},
            r"TrainConfig.model_params: unknown model 'late_fusoin'; available: .*late_fusion",
        ),
    ],
)
def test_config_rejects_bad_values(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        small_config(tmp_path, **{key: value})


def test_load_config_rejects_unknown_keys_naming_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("store: stores/demo\ngroups: [image]\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: unknown key\(s\) \['learning_rate'\]"):
        load_train_config(path)


def test_load_config_with_overrides_and_bad_value_names_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "store: stores/demo\ngroups: [image, audio]\nmodel_params: {late_fusion: {combine: learned}}\n"
    )
    config = load_train_config(path, ["epochs=3", "optimizer=sgd"])
    assert (config.epochs, config.optimizer, config.models) == (3, "sgd", ["late_fusion", "unimodal"])
    assert config.model_params == {"late_fusion": {"combine": "learned"}}
    with pytest.raises(ConfigError, match=r"train\.yaml: TrainConfig.epochs: must be >= 1"):
        load_train_config(path, ["epochs=0"])


def test_models_override_keeps_the_other_models_params_unused():
    demo = Path(__file__).resolve().parents[2] / "configs" / "train_demo.yaml"
    config = load_train_config(demo, ["models=[lmf,tcn]"])
    assert config.models == ["lmf", "tcn"] and config.model_params["lmf"] == {"rank": 4}
    assert "cross_attention" in config.model_params  # kept, validated, not trained


def test_sgd_uses_momentum(tmp_path):
    opt = make_optimizer(
        small_config(tmp_path, optimizer="sgd", lr=0.1), [torch.nn.Parameter(torch.zeros(2))]
    )
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    opt = make_optimizer(
        small_config(tmp_path, optimizer="adamw", weight_decay=0.01), [torch.nn.Parameter(torch.zeros(2))]
    )
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01


@pytest.mark.slow
def test_end_to_end_on_a_real_store(tiny_store, tmp_path):
    """Wiring with the real StreamingLoader: train -> evaluate -> report on the tiny extracted store."""
    from fusion.loader import StreamingLoader

    groups = ["image", "audio", "video"]
    config = small_config(tmp_path / "runs", store=str(tiny_store), groups=groups, epochs=2, batch_size=8)
    paths = train_all(config, progress=False)
    assert [p.name for p in paths] == ["late_fusion", "unimodal-image", "unimodal-audio", "unimodal-video"]
    metrics = evaluate_all(config.runs_dir, "test", device="cpu")
    n_test = StreamingLoader(tiny_store, "test").num_samples
    assert [m["n"] for m in metrics] == [n_test] * 4
    ckpt = torch.load(paths[0] / "checkpoint.pt", weights_only=True)
    assert {"image.embedding", "audio.mfcc", "video.grid"} <= set(ckpt["field_specs"])
    report = write_report(config.runs_dir)
    assert all(f"| {p.name} |" in report for p in paths)


def test_robustness_masked_accuracy_matches_an_independent_computation(trained):
    ckpt = torch.load(trained.runs_dir / "late_fusion" / "checkpoint.pt", weights_only=True)
    model = rebuild(ckpt)
    metrics = trained.metrics["late_fusion"]
    for group in GROUPS:
        labels, preds = [], []
        with torch.no_grad():
            for batch in trained.factory("test", list(GROUPS), False):
                batch["present"][group][:] = False  # what a missing modality looks like
                for f, x in batch["features"].items():
                    if f.startswith(group + "."):
                        x.zero_()
                        if f in batch["mask"]:
                            batch["mask"][f][:] = False
                            batch["lengths"][f][:] = 0
                labels += batch["label"].tolist()
                preds += model(batch)["logits"].argmax(-1).tolist()
        assert metrics["robustness"]["masked"][group] == pytest.approx(
            accuracy_score(labels, preds), abs=1e-6
        )
        # one bit of two is left: about half the clean accuracy, never more than the clean one
        assert 0.3 < metrics["robustness"]["masked"][group] < 0.65
    assert set(metrics["robustness"]["noise"]) == set(GROUPS)
