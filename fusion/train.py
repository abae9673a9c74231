"""Train fusion models and unimodal baselines on the feature stream.

One ``TrainConfig`` (YAML) plans several runs: ``models: [late_fusion, unimodal]`` over
``groups: [image, audio]`` gives ``late_fusion``, ``unimodal-image`` and ``unimodal-audio``
(with ``seeds: N > 1``, one folder per seed: ``late_fusion-seed0``, ...). Each run writes
``runs_dir/<run>/``:

- ``config.yaml``: the resolved config and the run;
- ``last.pt``: written after every epoch (model, optimiser, scheduler, RNG states, step,
  epoch, best score, early-stopping counter, config): ``resume=True`` continues from it and
  ends with the same weights as an uninterrupted run (CPU, deterministic);
- ``checkpoint.pt``: the best epoch by the validation ``monitor``;
- ``log.jsonl`` (one line per epoch) and ``steps.jsonl`` (one line per optimiser step);
- with ``log_keys``, ``keys.rank<R>.jsonl``: the sample keys of every batch rank R trained on;
- with ``tensorboard``, ``tb/``: TensorBoard event files holding the same numbers as the JSONL
  logs (``step/<key>`` per optimiser step, ``epoch/<key>`` per epoch, both over the global step).

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop trains data-parallel: each rank streams
its slice of every step's global batch, gradients (and batch-norm statistics) are averaged
over the global batch, validation is split over the ranks and merged, and only rank 0 writes
files. ``batch_size`` is the global batch, so a run's checkpoints resume on any world size.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torchmetrics.functional.classification import multiclass_f1_score
from tqdm import tqdm

from features.errors import ConfigError, StoreError
from fusion.checkpoint import (
    load_checkpoint_file,
    model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrapped_state,
)
from fusion.device import resolve_device, to_device
from fusion.distributed import (
    World,
    broadcast,
    current_world,
    gather_predictions,
    global_batchnorm,
    process_group,
    rank_device,
    sum_across,
)
from fusion.encoders import SEQUENCE_ENCODERS
from fusion.evaluate import LoaderFactory, open_loader, predict
from fusion.losses import training_loss
from fusion.models import FusionModel, create_model, list_models, model_options
from fusion.optim import OPTIMIZERS, SCHEDULES, make_scheduler
from fusion.optim import make_optimizer as _make_optimizer
from fusion.perturb import hide
from pipelines.config import from_dict, load_config, to_dict

MONITORS = {"val_acc": "max", "val_macro_f1": "max", "val_loss": "min"}
CHECKPOINT_FORMAT = 2


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What to train, on which store and groups, and how."""

    store: str  # feature store directory
    runs_dir: str = "runs/demo"  # one subfolder per run
    groups: list[str]  # modality groups of the store to use
    models: list[str] = field(default_factory=lambda: ["late_fusion", "unimodal"])
    epochs: int = 20
    batch_size: int = 64  # per optimiser step over all ranks; each of N ranks loads batch_size / N
    optimizer: str = "adam"  # "adam", "adamw" or "sgd"
    momentum: float = 0.9  # sgd only
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant" or "cosine", per step, after the warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine ends at lr * min_lr_ratio
    grad_clip: float = 0.0  # max global gradient norm; 0: off
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None  # one weight per class for the cross-entropy
    modality_dropout: float = 0.0  # train-time probability of hiding each present group of a sample
    amp: bool = True  # bf16 autocast; used on CUDA only
    pretrain_epochs: int = 0  # first epochs on the unsupervised loss (models that have one)
    monitor: str = "val_acc"  # selects the best checkpoint: val_acc, val_macro_f1 or val_loss
    early_stopping: int = 0  # stop after this many epochs without improvement; 0: never
    hidden: int = 128
    dropout: float = 0.1
    encoder: str = "conv"  # sequence encoder of every group encoder: "conv" or "tcn"
    seed: int = 0
    seeds: int = 1  # runs per model with seeds seed, seed+1, ...
    num_workers: int = 0
    threads: int = 0  # torch CPU threads while training/evaluating; 0: torch's default
    device: str = "auto"  # "auto": cuda when available, else cpu; under torchrun cuda:LOCAL_RANK
    log_keys: bool = False  # every rank writes its batches' sample keys to keys.rank<R>.jsonl
    tensorboard: bool = False  # rank 0 also writes the step and epoch logs to <run>/tb/ (extra: tensorboard)
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
        for key in ("epochs", "batch_size", "hidden", "seeds"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("warmup_steps", "pretrain_epochs", "early_stopping", "num_workers", "threads"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        choices = {
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "monitor": tuple(MONITORS),
            "encoder": SEQUENCE_ENCODERS,
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise bad(key, f"must be one of {list(valid)}")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        for key in ("weight_decay", "grad_clip", "momentum"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("dropout", "label_smoothing", "modality_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise bad(key, "must be in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise bad(
                "tensorboard",
                "needs the tensorboard package; install it with pip install 'modalstore[tensorboard]' "
                "or set tensorboard: false",
            )
        if self.class_weights is not None and any(w < 0 for w in self.class_weights):
            raise bad("class_weights", "must be >= 0")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise bad("device", "must be 'auto' or a torch device such as 'cpu' or 'cuda:0'") from None
        for name, params in self.model_params.items():
            # params of a model not in `models` are kept unused (so `--set models=[lmf]` works
            # on a config that sets others), but a name no model has is a typo
            if name not in list_models():
                raise ConfigError(
                    f"TrainConfig.model_params: unknown model {name!r}; available: {', '.join(list_models())}"
                )
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
    """One training run: its folder name, registered model, groups and seed (None: config.seed)."""

    name: str
    model: str
    groups: tuple[str, ...]
    seed: int | None = None


def plan_runs(config: TrainConfig) -> list[RunSpec]:
    """The runs of a config: ``unimodal`` expands to ``unimodal-<group>``; seeds to ``-seed<s>``."""
    base = []
    for model in config.models:
        if model == "unimodal":
            base.extend(RunSpec(f"unimodal-{g}", model, (g,)) for g in config.groups)
        else:
            base.append(RunSpec(model, model, tuple(config.groups)))
    if config.seeds == 1:
        return base
    seeds = range(config.seed, config.seed + config.seeds)
    return [replace(r, name=f"{r.name}-seed{s}", seed=s) for r in base for s in seeds]


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    return _make_optimizer(config.optimizer, params, config.lr, config.weight_decay, config.momentum)


class _Objective(torch.nn.Module):
    """Model and loss in one forward, so DDP sees which parameters the loss uses.

    (A pretraining loss ignores the classifier head: DDP must not wait for its gradients.)
    """

    def __init__(self, model: FusionModel, config: TrainConfig, amp) -> None:
        super().__init__()
        self.model, self.config, self.amp = model, config, amp

    def forward(self, batch: dict, pretrain: bool) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        with self.amp:
            out = self.model(batch)
        c = self.config
        loss, parts = training_loss(
            self.model, out, batch, c.label_smoothing, c.class_weights, pretrain=pretrain
        )
        return loss, parts, out["logits"].detach().float()


def rank_batch_size(config: TrainConfig, world: World) -> int:
    """Samples per batch on each rank: the global ``batch_size`` split evenly over the ranks."""
    if config.batch_size % world.size:
        raise ConfigError(
            f"TrainConfig.batch_size: {config.batch_size} is not divisible by the {world.size} ranks "
            "(it is the global batch per step); pick a multiple of the number of processes"
        )
    return config.batch_size // world.size


def drop_modalities(batch: dict, groups: list[str], p: float) -> dict:
    """Hide each present group of each sample with probability ``p`` (never all of a sample's).

    A hidden group looks like a missing one (``perturb.hide``); draws use the torch RNG, whose
    state every checkpoint saves.
    """
    present = torch.stack([batch["present"][g] for g in groups], dim=1)  # (batch, groups)
    drop = (torch.rand(present.shape).to(present.device) < p) & present
    drop[(present & ~drop).sum(1) == 0] = False  # a sample keeps every group rather than none
    for i, g in enumerate(groups):
        if drop[:, i].any():
            batch = hide(batch, g, drop[:, i])
    return batch


def _jsonl_keep(path: Path, last_epoch: int) -> None:
    """Drop the lines of epochs after ``last_epoch`` (what a killed run wrote past its checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r)["epoch"] <= last_epoch]
    path.write_text("".join(r + "\n" for r in kept))


def _tensorboard_writer(out_dir: Path, step: int):
    """A SummaryWriter on ``out_dir/tb`` that hides the events logged after ``step`` before it.

    As the JSONL logs are cut back: all of an earlier run's on a fresh start (``step`` 0), and
    what a killed run logged past its last checkpoint on resume.
    """
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tb"), purge_step=step + 1)


def _tensorboard_log(writer, prefix: str, row: dict, step: int) -> None:
    """Every number of a JSONL log row as the scalar ``prefix/<key>`` at ``step``."""
    for key, value in row.items():
        if key not in ("step", "epoch") and isinstance(value, int | float) and not isinstance(value, bool):
            writer.add_scalar(f"{prefix}/{key}", value, step)


def train_one(
    config: TrainConfig,
    run: RunSpec,
    loader_factory: LoaderFactory | None = None,
    progress: bool = True,
    resume: bool = False,
) -> Path:
    """Train one run and return its folder; ``resume`` continues from its ``last.pt``.

    ``loader_factory(split, groups, shuffle)`` replaces the store's StreamingLoader (tests).
    """
    out_dir = Path(config.runs_dir) / run.name
    world = current_world()
    main = world.main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = rank_device(resolve_device(config.device), world)
    if config.threads:
        # Small models on a busy CPU: one thread can be 10x faster than oversubscribed ones.
        torch.set_num_threads(config.threads)
    seed = config.seed if run.seed is None else run.seed
    torch.manual_seed(seed)

    # -- data
    # (split, groups, shuffle) -> batches: the store's StreamingLoader unless a test injects one
    make_loader = loader_factory or store_loader_factory(config, device, seed)
    train_loader = make_loader("train", list(run.groups), True)
    val_loader = make_loader("val", list(run.groups), False)
    field_groups = {f: g for f, g in train_loader.field_groups.items() if g in run.groups}
    field_specs = {f: train_loader.field_specs[f] for f in field_groups}
    num_classes = train_loader.num_classes

    # -- model, optimiser, schedule
    model_kwargs = {
        "hidden": config.hidden,
        "dropout": config.dropout,
        "encoder": config.encoder,
        **config.model_params.get(run.model, {}),
    }
    model = create_model(run.model, field_specs, field_groups, list(run.groups), num_classes, **model_kwargs)
    if world.distributed:
        global_batchnorm(model)  # statistics of the global batch, as one process would compute
    model.to(device)
    optimizer = make_optimizer(config, model.parameters())
    steps_per_epoch = len(train_loader)
    scheduler = make_scheduler(
        optimizer, config.schedule, config.warmup_steps, config.epochs * steps_per_epoch, config.min_lr_ratio
    )
    can_pretrain = type(model).pretrain_loss is not FusionModel.pretrain_loss
    pretrain_epochs = config.pretrain_epochs if can_pretrain else 0
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if config.amp and device.type == "cuda"
        else nullcontext()
    )
    run_info = {"name": run.name, "model": run.model, "groups": list(run.groups), "seed": seed}
    meta = {
        "format_version": CHECKPOINT_FORMAT,
        "config": to_dict(config),
        "run": run_info,
        "model_kwargs": model_kwargs,
        "field_specs": {f: spec.to_dict() for f, spec in field_specs.items()},
        "field_groups": field_groups,
        "num_classes": num_classes,
        "world_size": world.size,  # informative only: checkpoints resume on any world size
    }
    sign = 1.0 if MONITORS[config.monitor] == "max" else -1.0

    # -- state: fresh, or what the last finished epoch saved
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "stopped": False}
    last_path = out_dir / "last.pt"
    last = None
    if resume:  # rank 0 reads; every rank gets its copy (the run folder need not be shared)
        last = broadcast(load_checkpoint_file(last_path) if main and last_path.exists() else None)
    if last is not None:
        if last["config"] != meta["config"] or last["run"] != run_info:
            raise ConfigError(
                f"{last_path}: saved with another config or run; resume with the same config "
                "(or train into a new runs_dir)"
            )
        model.load_state_dict(unwrapped_state(last["model"]))
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        set_rng_state(last["rng"])
        state = dict(last["state"])
    # DDP averages the gradients over the ranks; ``model`` stays the unwrapped module
    objective = _Objective(model, config, amp)
    if world.distributed:
        objective = torch.nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=pretrain_epochs > 0,  # the classifier head waits while pretraining
        )
    keys_path = out_dir / f"keys.rank{world.rank}.jsonl"
    if config.log_keys:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state["epoch"] == 0:
            keys_path.write_text("")
        else:
            _jsonl_keep(keys_path, state["epoch"])
    if main:
        save_run_config(config, run, out_dir / "config.yaml")
        for name in ("log.jsonl", "steps.jsonl"):
            if state["epoch"] == 0:
                (out_dir / name).write_text("")
            else:
                _jsonl_keep(out_dir / name, state["epoch"])

    # flushed with the JSONL logs after every epoch, so a crash loses no more than they do
    tb = _tensorboard_writer(out_dir, state["step"]) if config.tensorboard and main else None

    # -- loop: train an epoch, validate, checkpoint (last every epoch, best on the monitor)
    start = state["epoch"] + 1
    for epoch in range(start, config.epochs + 1):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        pretrain = epoch <= pretrain_epochs
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        n = 0
        step_rows, key_rows = [], []
        bar = tqdm(
            train_loader,
            total=steps_per_epoch,
            desc=f"{run.name} {epoch}/{config.epochs}",
            leave=False,
            disable=None if progress and main else True,  # None: off when not a TTY
        )
        for batch in bar:
            batch = to_device(batch, device)
            if config.modality_dropout > 0 and len(run.groups) > 1:
                batch = drop_modalities(batch, list(run.groups), config.modality_dropout)
            loss, parts, logits = objective(batch, pretrain)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if config.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
            optimizer.step()
            scheduler.step()
            state["step"] += 1

            b = batch["label"].shape[0]
            loss_sum += loss.detach() * b
            correct += (logits.argmax(-1) == batch["label"]).sum()
            n += b
            if config.log_keys:
                key_rows.append({"epoch": epoch, "step": state["step"], "keys": list(batch["keys"])})
            step_rows.append(
                {
                    "step": state["step"],
                    "epoch": epoch,
                    "loss": loss.item(),  # this rank's batch (rank 0's in steps.jsonl)
                    **parts,
                    "lr": scheduler.get_last_lr()[0],
                    **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                }
            )
        if config.log_keys:
            with keys_path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in key_rows)
        loss_total, correct_total, n = sum_across([loss_sum.item(), correct.item(), n], device)
        if n == 0:
            raise StoreError(f"run {run.name}: the train split yielded no samples")

        val = gather_predictions(predict(model, val_loader, device))  # each rank scored its slice
        if len(val["labels"]) == 0:
            raise StoreError(f"run {run.name}: the val split has no samples; it selects the best epoch")
        scores = {
            "val_loss": F.cross_entropy(val["logits"], val["labels"]).item(),
            "val_acc": (val["preds"] == val["labels"]).float().mean().item(),
            "val_macro_f1": multiclass_f1_score(
                val["preds"], val["labels"], num_classes=num_classes, average="macro"
            ).item(),
        }
        score = scores[config.monitor]
        improved = not pretrain and (state["best"] is None or sign * score > sign * state["best"])
        if improved:
            state.update(best=score, best_epoch=epoch, bad_epochs=0)
        elif not pretrain:
            state["bad_epochs"] += 1
            if config.early_stopping and state["bad_epochs"] >= config.early_stopping:
                state["stopped"] = True
        state["epoch"] = epoch
        row = {
            "epoch": epoch,
            "step": state["step"],
            "phase": "pretrain" if pretrain else "train",
            "train_loss": loss_total / n,
            "train_acc": correct_total / n,
            **scores,
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if main:
            weights = model_state(model)
            if improved:
                save_checkpoint(
                    {
                        **meta,
                        "model": weights,
                        "epoch": epoch,
                        "monitor": config.monitor,
                        "best_score": score,
                        "best_val_acc": scores["val_acc"],
                    },
                    out_dir / "checkpoint.pt",
                )
            with (out_dir / "steps.jsonl").open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in step_rows)
            with (out_dir / "log.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            if tb is not None:
                for r in step_rows:
                    _tensorboard_log(tb, "step", r, r["step"])
                _tensorboard_log(tb, "epoch", row, row["step"])
                tb.flush()
            save_checkpoint(
                {
                    **meta,
                    "model": weights,
                    "optimizer": to_device(optimizer.state_dict(), "cpu"),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "state": state,
                    "loader": {"epoch": epoch},  # the next epoch re-seeds its order from (seed, epoch)
                },
                last_path,
            )
        if progress and main:
            tqdm.write(
                f"{run.name} epoch {epoch}/{config.epochs}{' (pretrain)' if pretrain else ''}: "
                f"loss {row['train_loss']:.4f} train acc {row['train_acc']:.3f} "
                f"val acc {scores['val_acc']:.3f}"
            )
        if state["stopped"] and progress and main:
            tqdm.write(
                f"{run.name}: early stop, no {config.monitor} improvement in {config.early_stopping} epochs"
            )
    if tb is not None:
        tb.close()
    if state["best_epoch"] is None:
        raise ConfigError(
            f"run {run.name}: no supervised epoch (pretrain_epochs >= epochs); nothing to select"
        )
    return out_dir


def store_loader_factory(config: TrainConfig, device: torch.device, seed: int) -> LoaderFactory:
    """``(split, groups, shuffle)`` -> the store's StreamingLoader for this rank (its batch share).

    The loaders take rank and world size from torch.distributed: each rank reads its own
    slices of the epoch, and every rank gets the same number of batches.
    """
    return functools.partial(
        _store_loader,
        config=config,
        device=device,
        seed=seed,
        batch_size=rank_batch_size(config, current_world()),
    )


def _store_loader(
    split: str,
    groups: list[str],
    shuffle: bool,
    *,
    config: TrainConfig,
    device: torch.device,
    seed: int,
    batch_size: int,
):
    return open_loader(
        config.store,
        split,
        groups,
        shuffle=shuffle,
        batch_size=batch_size,
        seed=seed,
        num_workers=config.num_workers,
        device=device,
    )


def save_run_config(config: TrainConfig, run: RunSpec, path: str | Path) -> None:
    """The resolved config plus a ``run:`` section (name, model, groups, seed) as YAML."""
    data = {
        **to_dict(config),
        "run": {"name": run.name, "model": run.model, "groups": list(run.groups), "seed": run.seed},
    }
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def load_run_config(path: str | Path) -> tuple[TrainConfig, RunSpec]:
    """Read back a run's ``config.yaml`` as (TrainConfig, RunSpec)."""
    data = yaml.safe_load(Path(path).read_text())
    run = data.pop("run")
    return from_dict(TrainConfig, data, where=str(path)), RunSpec(
        run["name"], run["model"], tuple(run["groups"]), run.get("seed")
    )


def train_all(
    config: TrainConfig,
    progress: bool = True,
    loader_factory: LoaderFactory | None = None,
    resume: bool = False,
) -> list[Path]:
    """Train every run of ``plan_runs(config)`` in turn; return their folders.

    Under torchrun (``WORLD_SIZE > 1``) the processes join one group for all runs and leave
    it at the end (see ``fusion.distributed``).
    """
    with process_group(resolve_device(config.device)):
        return [
            train_one(config, run, loader_factory=loader_factory, progress=progress, resume=resume)
            for run in plan_runs(config)
        ]
