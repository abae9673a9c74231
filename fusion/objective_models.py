"""Fusion models with auxiliary objectives: a multimodal autoencoder and a multitask model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fusion.encoders import (
    as_frames,
    field_mask,
    masked_mean,
)
from fusion.registry import PerGroupModel, classifier_head, register_model


@register_model
class MultimodalAutoencoder(PerGroupModel):
    """A joint latent (mean of the present groups' projections) with one decoder per group.

    Decoders reconstruct each group's summary (vector fields, and the masked mean of sequence
    frames, standardised without learned parameters) from the joint latent, so a missing group can
    be reconstructed from the others (``reconstruct``). The reconstruction loss counts present
    groups only; ``pretrain_loss`` is that loss alone (unsupervised pretraining).
    """

    name = "autoencoder"
    description = "joint latent from present modalities, per-modality decoders, reconstruction + class losses"
    reference = "Ngiam et al., Multimodal Deep Learning, ICML 2011"

    def __init__(
        self,
        field_specs,
        field_groups,
        groups,
        num_classes,
        hidden=128,
        dropout=0.1,
        encoder="conv",
        recon_weight: float = 1.0,
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        self.recon_weight = recon_weight
        self.to_latent = nn.ModuleDict({g: nn.Linear(hidden, hidden) for g in self.groups})
        dims = {
            g: sum(math.prod(s.shape[1:] if s.variable else s.shape) for s in self.group_specs[g].values())
            for g in self.groups
        }
        self.target_norm = nn.ModuleDict({g: nn.BatchNorm1d(d, affine=False) for g, d in dims.items()})
        self.decoders = nn.ModuleDict(
            {
                g: nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, d))
                for g, d in dims.items()
            }
        )
        self.head = classifier_head(hidden, num_classes, dropout)

    def summary(self, batch: dict, group: str) -> torch.Tensor:
        """(batch, dim) what the decoder of ``group`` reconstructs (raw, before standardising)."""
        parts = []
        for f, spec in sorted(self.group_specs[group].items()):
            x = batch["features"][f]
            if spec.variable:
                parts.append(masked_mean(*as_frames(x, field_mask(batch, f, x))))
            else:
                parts.append(x.float().reshape(x.shape[0], -1))
        return torch.cat(parts, dim=-1)

    def latent(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        h, present = self.encode(batch)
        z = torch.stack([self.to_latent[g](h[:, i]) for i, g in enumerate(self.groups)], dim=1)
        w = present.to(z.dtype).unsqueeze(-1)  # (batch, groups, 1)
        return (z * w).sum(1) / w.sum(1).clamp_min(1), present  # (batch, hidden)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        z, present = self.latent(batch)
        recon = {g: self.decoders[g](z) for g in self.groups}  # standardised summaries
        return {"logits": self.head(z), "latent": z, "reconstruction": recon}

    def reconstruct(self, batch: dict) -> dict[str, torch.Tensor]:
        """Every group's summary decoded from the latent of the present groups, un-standardised."""
        recon = self(batch)["reconstruction"]
        out = {}
        for g, r in recon.items():
            norm = self.target_norm[g]
            out[g] = r * (norm.running_var + norm.eps).sqrt() + norm.running_mean
        return out

    def _recon_loss(self, out: dict, batch: dict) -> torch.Tensor:
        present = self.present(batch)
        total = out["logits"].new_zeros(())
        for i, g in enumerate(self.groups):
            target = self.target_norm[g](self.summary(batch, g)).detach()  # (batch, dim)
            err = ((out["reconstruction"][g] - target) ** 2).mean(-1)  # (batch,)
            keep = present[:, i].to(err.dtype)
            total = total + (err * keep).sum() / keep.sum().clamp_min(1)
        return total / len(self.groups)

    def aux_losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"reconstruction": self.recon_weight * self._recon_loss(out, batch)}

    def pretrain_loss(self, out: dict, batch: dict) -> torch.Tensor:
        return self._recon_loss(out, batch)


@register_model
class MultiTask(PerGroupModel):
    """A shared fused trunk with several heads and a weighted CE + MSE objective.

    Heads: the class (``logits``); one auxiliary classifier per group on that group's embedding
    (``group_logits``, cross-entropy on present groups, weight ``aux_weight``); and a regression
    head (``value``) predicting ``label / (classes - 1)`` with MSE (weight ``mse_weight``), an
    ordinal target that is meaningful when class indices are ordered (the demo's bit code).
    """

    name = "multitask"
    description = (
        "shared fused trunk; class head + per-modality auxiliary heads + a regression head (CE + MSE)"
    )
    reference = "Caruana, Multitask Learning, Machine Learning 1997"

    def __init__(
        self,
        field_specs,
        field_groups,
        groups,
        num_classes,
        hidden=128,
        dropout=0.1,
        encoder="conv",
        aux_weight: float = 0.3,
        mse_weight: float = 0.5,
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        self.aux_weight, self.mse_weight = aux_weight, mse_weight
        g = len(self.groups)
        self.trunk = nn.Sequential(nn.Linear(g * hidden + g, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = classifier_head(hidden, num_classes, dropout)
        self.aux_heads = nn.ModuleDict({grp: nn.Linear(hidden, num_classes) for grp in self.groups})
        self.value_head = nn.Linear(hidden, 1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        h, present = self.encode(batch)
        trunk = self.trunk(torch.cat([h.flatten(1), present.to(h.dtype)], dim=-1))  # (batch, hidden)
        group_logits = torch.stack([self.aux_heads[g](h[:, i]) for i, g in enumerate(self.groups)], dim=1)
        return {
            "logits": self.head(trunk),
            "group_logits": group_logits,
            "value": self.value_head(trunk)[:, 0],
        }

    def regression_target(self, batch: dict) -> torch.Tensor:
        return batch["label"].float() / (self.num_classes - 1)

    def aux_losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        present = self.present(batch)
        labels = batch["label"]
        ce = out["logits"].new_zeros(())
        for i in range(len(self.groups)):
            per = F.cross_entropy(out["group_logits"][:, i], labels, reduction="none")
            keep = present[:, i].to(per.dtype)
            ce = ce + (per * keep).sum() / keep.sum().clamp_min(1)
        mse = F.mse_loss(out["value"], self.regression_target(batch))
        return {"aux_ce": self.aux_weight * ce / len(self.groups), "mse": self.mse_weight * mse}
