"""Evaluate trained runs on a split: accuracy, macro recall, macro F1 and the confusion matrix.

Metrics come from torchmetrics; each run directory gets ``metrics.json`` and ``predictions.csv``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_recall,
)

from features.errors import ModalstoreError, StoreError
from features.spec import FieldSpec
from fusion.loader import StreamingLoader, resolve_device, to_device
from fusion.models import create_model

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
def predict(model: torch.nn.Module, loader, device: torch.device) -> dict[str, Any]:
    """Run ``model`` (in eval mode) over ``loader``: {"keys", "labels" (n,), "preds" (n,)} on CPU."""
    was_training = model.training
    model.eval()
    keys, labels, preds = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits = model(batch)["logits"]  # (batch, classes)
        keys.extend(batch.get("keys") or [""] * logits.shape[0])
        labels.append(batch["label"].cpu())
        preds.append(logits.argmax(-1).cpu())
    model.train(was_training)
    empty = torch.zeros(0, dtype=torch.long)
    return {
        "keys": keys,
        "labels": torch.cat(labels) if labels else empty,
        "preds": torch.cat(preds) if preds else empty,
    }


def load_checkpoint(run_dir: str | Path) -> dict:
    """A run's ``checkpoint.pt``, loaded safely (``weights_only=True``) onto the CPU."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise ModalstoreError(f"{run_dir}: no checkpoint.pt; train the run first")
    return torch.load(path, map_location="cpu", weights_only=True)


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
) -> dict:
    """Evaluate a trained run on ``split``; write and return ``run_dir/metrics.json``.

    ``store`` overrides the store path saved in the checkpoint (a moved store).
    """
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    config, run = checkpoint["config"], checkpoint["run"]
    dev = resolve_device(device)
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
        "split": split,
        "n": len(labels),
        "accuracy": multiclass_accuracy(preds, labels, num_classes=c, average="micro").item(),
        "macro_recall": multiclass_recall(preds, labels, num_classes=c, average="macro").item(),
        "macro_f1": multiclass_f1_score(preds, labels, num_classes=c, average="macro").item(),
        "num_classes": c,
        "checkpoint_epoch": checkpoint["epoch"],
        "best_val_acc": checkpoint["best_val_acc"],
        "confusion_matrix_axes": "rows: true label, columns: predicted label",
        "confusion_matrix": multiclass_confusion_matrix(preds, labels, num_classes=c).tolist(),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (run_dir / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "label", "prediction"])
        writer.writerows(zip(out["keys"], labels.tolist(), preds.tolist(), strict=True))
    return metrics


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
) -> list[dict]:
    """``evaluate_run`` on every subfolder of ``runs_dir`` that holds a checkpoint."""
    run_dirs = sorted(p.parent for p in Path(runs_dir).glob("*/checkpoint.pt"))
    if not run_dirs:
        raise ModalstoreError(f"{runs_dir}: no run folder with a checkpoint.pt; train first")
    return [evaluate_run(d, split, loader_factory=loader_factory, device=device) for d in run_dirs]
