"""Train fusion models and unimodal baselines on the feature stream.

One ``TrainConfig`` (YAML) plans several runs: ``models: [late_fusion, unimodal]`` over
``groups: [image, audio]`` gives ``late_fusion``, ``unimodal-image`` and ``unimodal-audio``.
Each run writes ``runs_dir/<run>/config.yaml``, ``checkpoint.pt`` (the best-validation-accuracy
weights) and ``log.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from features.errors import ConfigError, StoreError
from fusion.evaluate import LoaderFactory, open_loader, predict
from fusion.loader import resolve_device, to_device
from fusion.models import create_model, list_models, model_options
from pipelines.config import from_dict, load_config, to_dict

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What to train, on which store and groups, and how."""

    store: str  # feature store directory
    runs_dir: str = "runs/demo"  # one subfolder per run
    groups: list[str]  # modality groups of the store to use
    models: list[str] = field(default_factory=lambda: ["late_fusion", "unimodal"])
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.0
    hidden: int = 128
    dropout: float = 0.1
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    # Extra constructor options per model name, e.g. {late_fusion: {combine: learned}}.
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{key}: {message}, got {getattr(self, key)!r}")

        if not self.store:
            raise bad("store", "must name a feature store directory")
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise bad("groups", "must be a non-empty list without duplicates")
        if not self.models or len(set(self.models)) != len(self.models):
            raise bad("models", "must be a non-empty list without duplicates")
        unknown = [m for m in self.models if m not in list_models()]
        if unknown:
            raise bad("models", f"unknown model(s) {unknown}; available: {', '.join(list_models())}")
        for key in ("epochs", "batch_size", "hidden"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {list(OPTIMIZERS)}")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if not 0 <= self.dropout < 1:
            raise bad("dropout", "must be in [0, 1)")
        if self.num_workers < 0:
            raise bad("num_workers", "must be >= 0")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise bad("device", "must be 'auto' or a torch device such as 'cpu' or 'cuda:0'") from None
        for name, params in self.model_params.items():
            if name not in self.models:
                raise ConfigError(f"TrainConfig.model_params: {name!r} is not in models {self.models}")
            extra = sorted(set(params) - set(model_options(name)))
            if extra:
                raise ConfigError(
                    f"TrainConfig.model_params.{name}: unknown option(s) {extra}; "
                    f"valid: {model_options(name)}"
                )


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load a ``TrainConfig`` from YAML with ``key=value`` overrides; errors name the file."""
    try:
        return load_config(TrainConfig, path, overrides)
    except ConfigError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class RunSpec:
    """One training run: its folder name, registered model and groups."""

    name: str
    model: str
    groups: tuple[str, ...]


def plan_runs(config: TrainConfig) -> list[RunSpec]:
    """The runs of a config: ``unimodal`` expands to ``unimodal-<group>`` per group."""
    runs = []
    for model in config.models:
        if model == "unimodal":
            runs.extend(RunSpec(f"unimodal-{g}", model, (g,)) for g in config.groups)
        else:
            runs.append(RunSpec(model, model, tuple(config.groups)))
    return runs


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    raise ConfigError(f"TrainConfig.optimizer: must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")


def train_one(
    config: TrainConfig,
    run: RunSpec,
    loader_factory: LoaderFactory | None = None,
    progress: bool = True,
) -> Path:
    """Train one run and return its folder (``config.yaml``, ``checkpoint.pt``, ``log.jsonl``).

    ``loader_factory(split, groups, shuffle)`` replaces the store's StreamingLoader (tests).
    """
    out_dir = Path(config.runs_dir) / run.name
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    # -- data
    # (split, groups, shuffle) -> batches: the store's StreamingLoader unless a test injects one
    make_loader = loader_factory or functools.partial(_store_loader, config=config, device=device)
    train_loader = make_loader("train", list(run.groups), True)
    val_loader = make_loader("val", list(run.groups), False)
    field_groups = {f: g for f, g in train_loader.field_groups.items() if g in run.groups}
    field_specs = {f: train_loader.field_specs[f] for f in field_groups}
    num_classes = train_loader.num_classes

    # -- model and optimizer
    model_kwargs = {
        "hidden": config.hidden,
        "dropout": config.dropout,
        **config.model_params.get(run.model, {}),
    }
    model = create_model(run.model, field_specs, field_groups, list(run.groups), num_classes, **model_kwargs)
    model.to(device)
    optimizer = make_optimizer(config, model.parameters())
    save_run_config(config, run, out_dir / "config.yaml")

    # -- loop: train an epoch, measure validation accuracy, keep the best weights
    best: dict[str, Any] = {"val_acc": -1.0}
    with (out_dir / "log.jsonl").open("w") as log:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            n = 0
            bar = tqdm(
                train_loader,
                total=len(train_loader),
                desc=f"{run.name} {epoch}/{config.epochs}",
                leave=False,
                disable=None if progress else True,  # None: off when not a TTY
            )
            for batch in bar:
                batch = to_device(batch, device)
                logits = model(batch)["logits"]  # (batch, classes)
                loss = F.cross_entropy(logits, batch["label"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                b = batch["label"].shape[0]
                loss_sum += loss.detach() * b
                correct += (logits.argmax(-1) == batch["label"]).sum()
                n += b
            if n == 0:
                raise StoreError(f"run {run.name}: the train split yielded no samples")

            val = predict(model, val_loader, device)
            if len(val["labels"]) == 0:
                raise StoreError(f"run {run.name}: the val split has no samples; it selects the best epoch")
            val_acc = (val["preds"] == val["labels"]).float().mean().item()
            if val_acc > best["val_acc"]:
                best = {
                    "val_acc": val_acc,
                    "epoch": epoch,
                    "model": copy.deepcopy(model.state_dict()),
                    "optimizer": copy.deepcopy(optimizer.state_dict()),
                }
            row = {
                "epoch": epoch,
                "train_loss": loss_sum.item() / n,
                "train_acc": correct.item() / n,
                "val_acc": val_acc,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            if progress:
                tqdm.write(
                    f"{run.name} epoch {epoch}/{config.epochs}: loss {row['train_loss']:.4f} "
                    f"train acc {row['train_acc']:.3f} val acc {val_acc:.3f}"
                )

    # -- checkpoint: plain types and tensors only, so torch.load(weights_only=True) reads it
    checkpoint = {
        "format_version": 1,
        "model": to_device(best["model"], "cpu"),
        "optimizer": to_device(best["optimizer"], "cpu"),
        "epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "config": to_dict(config),
        "run": {"name": run.name, "model": run.model, "groups": list(run.groups)},
        "model_kwargs": model_kwargs,
        "field_specs": {f: spec.to_dict() for f, spec in field_specs.items()},
        "field_groups": field_groups,
        "num_classes": num_classes,
    }
    tmp = out_dir / "checkpoint.pt.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, out_dir / "checkpoint.pt")  # never leave a half-written checkpoint behind
    return out_dir


def _store_loader(split: str, groups: list[str], shuffle: bool, *, config: TrainConfig, device: torch.device):
    return open_loader(
        config.store,
        split,
        groups,
        shuffle=shuffle,
        batch_size=config.batch_size,
        seed=config.seed,
        num_workers=config.num_workers,
        device=device,
    )


def save_run_config(config: TrainConfig, run: RunSpec, path: str | Path) -> None:
    """The resolved config plus a ``run:`` section (name, model, groups) as YAML."""
    data = {**to_dict(config), "run": {"name": run.name, "model": run.model, "groups": list(run.groups)}}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def load_run_config(path: str | Path) -> tuple[TrainConfig, RunSpec]:
    """Read back a run's ``config.yaml`` as (TrainConfig, RunSpec)."""
    data = yaml.safe_load(Path(path).read_text())
    run = data.pop("run")
    return from_dict(TrainConfig, data, where=str(path)), RunSpec(
        run["name"], run["model"], tuple(run["groups"])
    )


def train_all(
    config: TrainConfig,
    progress: bool = True,
    loader_factory: LoaderFactory | None = None,
) -> list[Path]:
    """Train every run of ``plan_runs(config)`` in turn; return their folders."""
    return [
        train_one(config, run, loader_factory=loader_factory, progress=progress) for run in plan_runs(config)
    ]
