"""Training objectives: cross-entropy (label smoothing, class weights) plus a model's own terms.

A model's auxiliary terms (reconstruction MSE, auxiliary heads, a regression head's MSE) come
from ``model.aux_losses``, already weighted; ``pretrain_loss`` is the unsupervised objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from features.errors import ConfigError


def classification_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    class_weights: list[float] | None = None,
) -> torch.Tensor:
    """Cross-entropy of (batch, classes) logits, with optional smoothing and per-class weights."""
    weight = None
    if class_weights:
        if len(class_weights) != logits.shape[-1]:
            raise ConfigError(
                f"class_weights has {len(class_weights)} values but the model has {logits.shape[-1]} classes"
            )
        weight = torch.tensor(class_weights, dtype=logits.dtype, device=logits.device)
    return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=label_smoothing)


def training_loss(
    model: torch.nn.Module,
    out: dict,
    batch: dict,
    label_smoothing: float = 0.0,
    class_weights: list[float] | None = None,
    pretrain: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise and its named parts (floats, for logging).

    ``pretrain``: the model's unsupervised objective alone (labels unused).
    """
    if pretrain:
        loss = model.pretrain_loss(out, batch)
        if loss is None:
            raise ConfigError(f"model {model.name!r} has no unsupervised objective to pretrain with")
        return loss, {"pretrain": loss.item()}
    ce = classification_loss(out["logits"], batch["label"], label_smoothing, class_weights)
    parts = {"ce": ce}
    parts.update(model.aux_losses(out, batch))
    loss = sum(parts.values())
    return loss, {k: v.item() for k, v in parts.items()}
