"""Optimisers (SGD with momentum, Adam, AdamW) and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from features.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def make_optimizer(
    name: str, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """``"adam"``, ``"adamw"`` (decoupled weight decay) or ``"sgd"`` (with ``momentum``)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


class WarmupCosine:
    """LR factor at step s: linear warmup over ``warmup`` steps, then cosine to ``min_ratio``.

    A plain object (not a closure), so ``LambdaLR.state_dict()`` stores its numbers and the
    checkpoint stays loadable with ``weights_only=True``.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0, cosine: bool = True) -> None:
        self.warmup, self.total, self.min_ratio, self.cosine = warmup, max(total, 1), min_ratio, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler: ``"cosine"`` (after warmup) or ``"constant"`` (after warmup)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    factor = WarmupCosine(warmup_steps, total_steps, min_lr_ratio, cosine=schedule == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
