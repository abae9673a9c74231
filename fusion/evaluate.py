"""Evaluate trained runs on a split: accuracy, macro/micro precision, recall and F1, per-class
scores, the confusion matrix, MSE/MAE of regression heads, and missing-modality robustness.

Metrics come from torchmetrics; each run directory gets ``metrics.json``, ``predictions.csv``
and ``confusion.png``.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from features.errors import ModalstoreError, StoreError
from features.spec import FieldSpec
from fusion.checkpoint import load_checkpoint_file
from fusion.device import resolve_device, to_device
from fusion.loader import StreamingLoader
from fusion.models import create_model
from fusion.perturb import corrupt, hide
from fusion.plots import confusion_png

# (split, groups, shuffle) -> an iterable of batches with field_specs, field_groups, num_classes.
LoaderFactory = Callable[[str, list[str], bool], Any]


def open_loader(
    store: str,
    split: str,
    groups: list[str],
    *,
    shuffle: bool,
    batch_size: int,
    seed: int,
    num_workers: int,
    device: torch.device,
):
    """The real streaming loader over ``store`` (tests inject fakes through ``loader_factory``)."""
    return StreamingLoader(
        store,
        split=split,
        groups=list(groups),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        device=device,
    )


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader, device: torch.device, transform: Callable[[dict], dict] | None = None
) -> dict[str, Any]:
    """Run ``model`` (in eval mode) over ``loader``; everything on the CPU.

    Returns {"keys", "labels" (n,), "preds" (n,), "logits" (n, classes)} and, for models with a
    regression head, "values" and "targets" (n,). ``transform(batch)`` alters each batch first
    (masking or corrupting a modality for robustness tests).
    """
    was_training = model.training
    model.eval()
    keys, labels, preds, logits_all, values, targets = [], [], [], [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        if transform is not None:
            batch = transform(batch)
        out = model(batch)
        logits = out["logits"].float()  # (batch, classes)
        keys.extend(batch.get("keys") or [""] * logits.shape[0])
        labels.append(batch["label"].cpu())
        preds.append(logits.argmax(-1).cpu())
        logits_all.append(logits.cpu())
        if "value" in out and hasattr(model, "regression_target"):
            values.append(out["value"].float().cpu())
            targets.append(model.regression_target(batch).float().cpu())
    model.train(was_training)
    empty = torch.zeros(0, dtype=torch.long)
    result = {
        "keys": keys,
        "labels": torch.cat(labels) if labels else empty,
        "preds": torch.cat(preds) if preds else empty,
        "logits": torch.cat(logits_all) if logits_all else torch.zeros(0, 0),
    }
    if values:
        result["values"], result["targets"] = torch.cat(values), torch.cat(targets)
    return result


def load_checkpoint(run_dir: str | Path) -> dict:
    """A run's ``checkpoint.pt``, loaded safely (``weights_only=True``) onto the CPU."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise ModalstoreError(f"{run_dir}: no checkpoint.pt; train the run first")
    return load_checkpoint_file(path)


def model_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    """Rebuild the run's model from the registry and load its best weights."""
    run = checkpoint["run"]
    specs = {f: FieldSpec.from_dict(d) for f, d in checkpoint["field_specs"].items()}
    model = create_model(
        run["model"],
        specs,
        checkpoint["field_groups"],
        run["groups"],
        checkpoint["num_classes"],
        **checkpoint["model_kwargs"],
    )
    model.load_state_dict(checkpoint["model"])
    return model


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    loader_factory: LoaderFactory | None = None,
    device: str = "auto",
    store: str | None = None,
    robustness: bool = True,
    noise_scale: float = 1.0,
) -> dict:
    """Evaluate a trained run on ``split``; write and return ``run_dir/metrics.json``.

    Also writes ``predictions.csv`` and ``confusion.png``. ``robustness`` adds the accuracy with
    each modality masked out and with each corrupted by Gaussian noise of ``noise_scale`` x the
    field's standard deviation. ``store`` overrides the store path saved in the checkpoint.
    """
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    config, run = checkpoint["config"], checkpoint["run"]
    dev = resolve_device(device)
    if config.get("threads"):
        torch.set_num_threads(config["threads"])  # as in training (TrainConfig.threads)
    model = model_from_checkpoint(checkpoint).to(dev)

    if loader_factory is not None:
        loader = loader_factory(split, list(run["groups"]), False)
    else:
        loader = open_loader(
            store or config["store"],
            split,
            run["groups"],
            shuffle=False,
            batch_size=config["batch_size"],
            seed=config["seed"],
            num_workers=config["num_workers"],
            device=dev,
        )
    _check_compatible(run_dir, checkpoint, loader)

    out = predict(model, loader, dev)
    preds, labels = out["preds"], out["labels"]
    if len(labels) == 0:
        raise StoreError(f"{run_dir}: split {split!r} has no samples to evaluate")
    c = checkpoint["num_classes"]
    metrics = {
        "run": run["name"],
        "model": run["model"],
        "groups": list(run["groups"]),
        "seed": run.get("seed", config["seed"]),
        "base_run": _base_name(run["name"], config.get("seeds", 1), run.get("seed")),
        "split": split,
        "n": len(labels),
        **classification_metrics(preds, labels, c),
        "num_classes": c,
        "checkpoint_epoch": checkpoint["epoch"],
        "best_val_acc": checkpoint["best_val_acc"],
    }
    if "values" in out:
        err = out["values"] - out["targets"]
        metrics["regression"] = {"mse": (err**2).mean().item(), "mae": err.abs().mean().item()}
    if robustness:
        metrics["robustness"] = robustness_scores(model, loader, dev, run["groups"], noise_scale)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (run_dir / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "prediction"])
        writer.writerows(zip(out["keys"], labels.tolist(), preds.tolist(), strict=True))
    confusion_png(metrics["confusion_matrix"], run_dir / "confusion.png", f"{run['name']} ({split})")
    return metrics


def _base_name(name: str, seeds: int, seed: int | None) -> str:
    """The run name without its ``-seed<s>`` suffix (what seeds of one run share)."""
    suffix = f"-seed{seed}"
    return name[: -len(suffix)] if seeds > 1 and seed is not None and name.endswith(suffix) else name


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, macro and micro precision/recall/F1, the per-class table and the confusion matrix."""
    c = num_classes
    metrics = {"accuracy": multiclass_accuracy(preds, labels, num_classes=c, average="micro").item()}
    for avg in ("macro", "micro"):
        metrics[f"{avg}_precision"] = multiclass_precision(preds, labels, num_classes=c, average=avg).item()
        metrics[f"{avg}_recall"] = multiclass_recall(preds, labels, num_classes=c, average=avg).item()
        metrics[f"{avg}_f1"] = multiclass_f1_score(preds, labels, num_classes=c, average=avg).item()
    per_class = {
        "precision": multiclass_precision(preds, labels, num_classes=c, average=None).tolist(),
        "recall": multiclass_recall(preds, labels, num_classes=c, average=None).tolist(),
        "f1": multiclass_f1_score(preds, labels, num_classes=c, average=None).tolist(),
        "support": torch.bincount(labels, minlength=c).tolist(),
    }
    metrics["per_class"] = [{"class": k, **{m: v[k] for m, v in per_class.items()}} for k in range(c)]
    metrics["confusion_matrix_axes"] = "rows: true label, columns: predicted label"
    metrics["confusion_matrix"] = multiclass_confusion_matrix(preds, labels, num_classes=c).tolist()
    return metrics


def robustness_scores(
    model: torch.nn.Module,
    loader,
    device: torch.device,
    groups: list[str],
    noise_scale: float,
) -> dict:
    """Accuracy with each group masked out (``masked``) and with each corrupted by noise (``noise``).

    ``loader`` is iterated once per group and perturbation; an unshuffled loader replays the
    same batches each time.
    """

    def accuracy(transform) -> float:
        out = predict(model, loader, device, transform)
        return (out["preds"] == out["labels"]).float().mean().item()

    def noisy(group: str):
        count = iter(range(1 << 30))  # one noise seed per batch, the same on every evaluation
        return lambda batch: corrupt(batch, group, noise_scale, seed=next(count))

    return {
        "noise_scale": noise_scale,
        "masked": {g: accuracy(functools.partial(hide, group=g)) for g in groups},
        "noise": {g: accuracy(noisy(g)) for g in groups},
    }


def _check_compatible(run_dir: Path, checkpoint: dict, loader) -> None:
    """The split's fields and classes must be those the model was trained on."""
    for field, saved in checkpoint["field_specs"].items():
        spec = loader.field_specs.get(field)
        if spec is None or list(spec.shape) != list(saved["shape"]):
            got = None if spec is None else list(spec.shape)
            raise StoreError(
                f"{run_dir}: field {field!r} was trained with shape {saved['shape']} but the loader "
                f"gives {got}; evaluate on the store the run was trained on"
            )
    if loader.num_classes != checkpoint["num_classes"]:
        raise StoreError(
            f"{run_dir}: trained for {checkpoint['num_classes']} classes, the loader has {loader.num_classes}"
        )


def evaluate_all(
    runs_dir: str | Path,
    split: str = "test",
    loader_factory: LoaderFactory | None = None,
    device: str = "auto",
    robustness: bool = True,
) -> list[dict]:
    """``evaluate_run`` on every subfolder of ``runs_dir`` that holds a checkpoint."""
    run_dirs = sorted(p.parent for p in Path(runs_dir).glob("*/checkpoint.pt"))
    if not run_dirs:
        raise ModalstoreError(f"{runs_dir}: no run folder with a checkpoint.pt; train first")
    return [
        evaluate_run(d, split, loader_factory=loader_factory, device=device, robustness=robustness)
        for d in run_dirs
    ]
