"""Fusion models: one interface, a loader batch in, a dict of outputs out.

The interface (shared constructor arguments, ``aux_losses``, ``pretrain_loss``) and the registry
are in ``fusion.registry``. The ``present`` mask of the batch is respected: a missing modality
never contributes, whatever its (zeroed) features hold. Adding a model::

    @register_model
    class MyFusion(FusionModel):
        name = "my_fusion"
        def __init__(self, field_specs, field_groups, groups, num_classes, hidden=128,
                     dropout=0.1, encoder="conv", depth=2): ...
        def forward(self, batch): return {"logits": ...}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from features.errors import ConfigError
from fusion.encoders import (  # noqa: F401  (SequenceEncoder, VectorEncoder: building blocks, importable from here)
    GroupEncoder,
    SequenceEncoder,
    Standardize,
    VectorEncoder,
    as_frames,
    field_mask,
    masked_mean,
)
from fusion.registry import (  # noqa: F401  (the registry's API, importable from here)
    FusionModel,
    PerGroupModel,
    classifier_head,
    create_model,
    get_model,
    list_models,
    masked_softmax,
    model_options,
    register_model,
)


@register_model
class Unimodal(FusionModel):
    """A single-group baseline: group encoder -> linear classifier."""

    name = "unimodal"
    description = "one modality: its group encoder and a linear classifier (the baseline)"
    reference = "-"

    def __init__(
        self, field_specs, field_groups, groups, num_classes, hidden=128, dropout=0.1, encoder="conv"
    ):
        if len(groups) != 1:
            raise ConfigError(
                f"model 'unimodal' takes exactly one group, got {list(groups)}; "
                "train one unimodal run per group instead"
            )
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        self.encoder = GroupEncoder(self.group_specs[self.groups[0]], hidden, dropout, encoder)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.encoder(batch))}  # (batch, classes)


@register_model
class EarlyFusion(FusionModel):
    """Features concatenated before one shared network.

    No learned encoder precedes the concatenation: vector fields enter as they are, sequences as
    the masked mean and standard deviation of their frames; one Standardize and an MLP follow.
    A missing group enters as zeros plus a presence flag.
    """

    name = "early_fusion"
    description = "pooled raw features of every modality concatenated, then one shared MLP"
    reference = "Snoek et al., Early versus late fusion in semantic video analysis, ACM MM 2005"

    def __init__(
        self, field_specs, field_groups, groups, num_classes, hidden=128, dropout=0.1, encoder="conv"
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        self.fields = [(g, f, spec) for g in self.groups for f, spec in sorted(self.group_specs[g].items())]
        dim = sum(
            2 * math.prod(spec.shape[1:]) if spec.variable else math.prod(spec.shape)
            for _, _, spec in self.fields
        )
        self.norm = Standardize(dim)
        self.net = nn.Sequential(
            nn.Linear(dim + len(self.groups), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            classifier_head(hidden, num_classes, dropout),
        )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        present = self.present(batch)  # (batch, groups)
        parts, keep = [], []
        for g, f, spec in self.fields:
            x = batch["features"][f]
            if spec.variable:
                frames, mask = as_frames(x, field_mask(batch, f, x))  # (batch, time, dim)
                mean = masked_mean(frames, mask)
                std = (masked_mean((frames - mean.unsqueeze(1)) ** 2, mask) + 1e-6).sqrt()  # no inf grad at 0
                parts += [mean, std]
            else:
                parts.append(x.float().reshape(x.shape[0], -1))
            here = present[:, self.groups.index(g), None]  # (batch, 1)
            keep += [here.expand(-1, p.shape[1]) for p in parts[len(keep) :]]
        x = self.norm(torch.cat(parts, dim=-1))  # (batch, dim)
        keep = torch.cat(keep, dim=1)  # (batch, dim)
        x = torch.where(keep, x, 0.0)  # a missing group is zeros after standardising too
        return {"logits": self.net(torch.cat([x, present.to(x.dtype)], dim=-1))}


@register_model
class LateFusion(PerGroupModel):
    """One classifier per group; fused logits = (weighted) mean over the groups each sample has.

    ``combine="mean"`` weighs the present groups equally; ``"learned"`` by a softmax over one
    learned scalar per group, renormalised over the present groups. A sample with no group
    present gets zero logits. ``forward`` also returns the per-group logits.
    """

    name = "late_fusion"
    description = "one classifier per modality; logits averaged (or learned weights) over present modalities"
    reference = "Snoek et al., Early versus late fusion in semantic video analysis, ACM MM 2005"

    def __init__(
        self,
        field_specs,
        field_groups,
        groups,
        num_classes,
        hidden=128,
        dropout=0.1,
        encoder="conv",
        combine: str = "mean",
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        if combine not in ("mean", "learned"):
            raise ConfigError(f"model 'late_fusion': combine must be 'mean' or 'learned', got {combine!r}")
        self.combine = combine
        self.heads = nn.ModuleDict({g: nn.Linear(hidden, num_classes) for g in self.groups})
        if combine == "learned":
            self.group_scores = nn.Parameter(torch.zeros(len(self.groups)))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        present = self.present(batch)
        logits = torch.stack(
            [self.heads[g](self.encoders[g](batch)) for g in self.groups], dim=1
        )  # (batch, groups, classes)
        weights = present.to(logits.dtype)
        if self.combine == "learned":
            weights = torch.softmax(self.group_scores, dim=0)[None, :] * weights
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)  # all-absent rows stay 0
        fused = (weights.unsqueeze(-1) * logits).sum(1)  # (batch, classes)
        return {"logits": fused, "group_logits": logits}


@register_model
class GatedFusion(PerGroupModel):
    """Dynamic fusion: a gating network gives per-sample, per-feature weights over the present groups.

    As in a Gated Multimodal Unit, the gate sees every group's embedding; its scores are a softmax
    over groups for each hidden feature, so different features can follow different modalities.
    ``weights`` (batch, groups) is their mean over features; a missing group's weight is 0.
    """

    name = "gated"
    description = "per-sample softmax gates over modality embeddings; a missing modality gets weight 0"
    reference = "Arevalo et al., Gated Multimodal Units for Information Fusion, ICLR-W 2017"

    def __init__(
        self, field_specs, field_groups, groups, num_classes, hidden=128, dropout=0.1, encoder="conv"
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        g = len(self.groups)
        self.gate = nn.Sequential(nn.Linear(g * hidden + g, hidden), nn.Tanh(), nn.Linear(hidden, g * hidden))
        nn.init.zeros_(self.gate[-1].weight)  # start as the mean of the present groups
        nn.init.zeros_(self.gate[-1].bias)
        self.head = classifier_head(hidden, num_classes, dropout)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        h, present = self.encode(batch)  # (batch, groups, hidden)
        b, g, d = h.shape
        scores = self.gate(torch.cat([h.flatten(1), present.to(h.dtype)], dim=-1)).view(b, g, d)
        weights = masked_softmax(scores, present.unsqueeze(-1).expand(-1, -1, d))  # (batch, groups, hidden)
        fused = (weights * h).sum(1)  # (batch, hidden)
        return {"logits": self.head(fused), "weights": weights.mean(-1)}


@register_model
class LowRankFusion(PerGroupModel):
    """Low-rank multimodal fusion: the TFN outer product of [h_g, 1] factorised into rank-r factors.

    fused = sum_r w_r * prod_g ([h_g, 1] @ W_g^r). A missing group enters as [0, ..., 0, 1], so it
    contributes only its learned constant factor.
    """

    name = "lmf"
    description = "tensor fusion of [h, 1] outer products, computed with low-rank modality factors"
    reference = "Liu et al., Efficient Low-rank Multimodal Fusion with Modality-Specific Factors, ACL 2018"

    def __init__(
        self,
        field_specs,
        field_groups,
        groups,
        num_classes,
        hidden=128,
        dropout=0.1,
        encoder="conv",
        rank: int = 4,
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        if rank < 1:
            raise ConfigError(f"model 'lmf': rank must be >= 1, got {rank}")
        self.factors = nn.ParameterDict(
            {
                g: nn.Parameter(torch.randn(rank, hidden + 1, hidden) / math.sqrt(hidden + 1))
                for g in self.groups
            }
        )
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.norm = nn.LayerNorm(hidden)
        self.head = classifier_head(hidden, num_classes, dropout)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        h, _ = self.encode(batch)  # (batch, groups, hidden); zero for a missing group
        ones = h.new_ones(h.shape[0], 1)
        product = None
        for i, g in enumerate(self.groups):
            z = torch.cat([h[:, i], ones], dim=-1)  # (batch, hidden + 1)
            factor = torch.einsum("bi,rio->rbo", z, self.factors[g])  # (rank, batch, hidden)
            product = factor if product is None else product * factor
        fused = torch.einsum("r,rbo->bo", self.rank_weights, product) + self.bias  # (batch, hidden)
        return {"logits": self.head(F.relu(self.norm(fused)))}


# The sequence and objective models register themselves on import.
from fusion import objective_models, sequence_models  # noqa: E402,F401
