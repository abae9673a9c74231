"""Sequence fusion models: MulT-style cross-modal attention and a TCN over time-aligned sequences."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from features.errors import ConfigError
from fusion.encoders import (
    TCN,
    GroupSequence,
    SignedLog,
    Standardize,
    as_frames,
    field_mask,
    input_norm,
    masked_mean,
    module_key,
    resample,
)
from fusion.registry import FusionModel, classifier_head, register_model


class CrossModalBlock(nn.Module):
    """Target frames attend to source frames (pre-norm cross-attention + feed-forward, residual).

    A learned null key/value is always attendable, so a missing source (no valid frame) gives a
    finite output instead of a softmax over nothing.
    """

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = (
            nn.LayerNorm(hidden),
            nn.LayerNorm(hidden),
            nn.LayerNorm(hidden),
        )
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))
        self.ff = nn.Sequential(
            nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * hidden, hidden)
        )

    def forward(self, target: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        b = source.shape[0]
        kv = torch.cat(
            [self.null.expand(b, -1, -1), self.norm_kv(source)], dim=1
        )  # (batch, 1 + time_s, hidden)
        valid = torch.cat([source_mask.new_ones(b, 1), source_mask], dim=1)
        attended, _ = self.attn(self.norm_q(target), kv, kv, key_padding_mask=~valid, need_weights=False)
        h = target + attended  # (batch, time_t, hidden)
        return h + self.ff(self.norm_ff(h))


@register_model
class CrossModalAttention(FusionModel):
    """MulT-style fusion: for every ordered pair of groups, the target's frames attend to the source's.

    Each group is one sequence (its fields' frames; a vector field is a length-1 sequence); each
    sequence field is area-resampled to ``steps`` frames after its frame encoder, which bounds the
    attention cost (100 MFCC frames -> 16). The outputs of every pair are pooled over the target's
    valid frames and concatenated.
    """

    name = "cross_attention"
    description = (
        "pairwise cross-modal transformer blocks over sequences (each modality attends to the others)"
    )
    reference = "Tsai et al., Multimodal Transformer for Unaligned Multimodal Language Sequences, ACL 2019"
    min_groups = 2

    def __init__(
        self,
        field_specs,
        field_groups,
        groups,
        num_classes,
        hidden=128,
        dropout=0.1,
        encoder="conv",
        heads: int = 4,
        steps: int = 16,
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        if hidden % heads:
            raise ConfigError(
                f"model 'cross_attention': hidden ({hidden}) must be divisible by heads ({heads})"
            )
        if steps < 1:
            raise ConfigError(f"model 'cross_attention': steps must be >= 1, got {steps}")
        self.sequences = nn.ModuleDict(
            {g: GroupSequence(self.group_specs[g], hidden, dropout, encoder, steps) for g in self.groups}
        )
        self.pairs = [(t, s) for t in self.groups for s in self.groups if s != t]
        self.blocks = nn.ModuleDict(
            {f"{t}__{s}": CrossModalBlock(hidden, heads, dropout) for t, s in self.pairs}
        )
        self.mix = nn.Linear(len(self.pairs) * hidden, hidden)
        self.head = classifier_head(hidden, num_classes, dropout)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        present = self.present(batch)
        seqs = {g: self.sequences[g](batch, present[:, i]) for i, g in enumerate(self.groups)}
        pooled = []
        for t, s in self.pairs:
            (ht, mt), (hs, ms) = seqs[t], seqs[s]
            pooled.append(masked_mean(self.blocks[f"{t}__{s}"](ht, hs, ms), mt))  # (batch, hidden)
        fused = F.relu(self.mix(torch.cat(pooled, dim=-1)))  # (batch, hidden)
        return {"logits": self.head(fused)}


@register_model
class TCNFusion(FusionModel):
    """A TCN over the groups' time-aligned sequences concatenated along channels.

    Every sequence field is normalised per frame and area-resampled onto ``steps`` bins of its own
    duration (so 100 MFCC frames and 15 flow frames line up); vector fields are repeated over the
    bins; presence flags are extra channels. Then dilated causal residual convolutions and pooling.
    """

    name = "tcn"
    description = "dilated causal residual convolutions over time-aligned, channel-concatenated sequences"
    reference = "Bai et al., An Empirical Evaluation of Generic Convolutional and Recurrent Networks, 2018"

    def __init__(
        self,
        field_specs,
        field_groups,
        groups,
        num_classes,
        hidden=128,
        dropout=0.1,
        encoder="conv",
        steps: int = 16,
        levels: int = 3,
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        if steps < 1 or levels < 1:
            raise ConfigError(f"model 'tcn': steps and levels must be >= 1, got {steps}, {levels}")
        self.steps = steps
        self.fields = [(g, f, spec) for g in self.groups for f, spec in sorted(self.group_specs[g].items())]
        norms, dim = {}, len(self.groups)
        for _, f, spec in self.fields:
            d = math.prod(spec.shape[1:] if spec.variable else spec.shape)
            norms[module_key(f)] = (
                input_norm(d) if spec.variable else (Standardize(d) if d > 1 else SignedLog())
            )
            dim += d
        self.norms = nn.ModuleDict(norms)
        self.tcn = TCN(dim, hidden, levels=levels, dropout=dropout)
        self.head = classifier_head(2 * hidden, num_classes, dropout)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        present = self.present(batch)
        pf = present.to(torch.float32)
        channels = []
        for g, f, spec in self.fields:
            x = batch["features"][f]
            norm = self.norms[module_key(f)]
            keep = pf[:, self.groups.index(g), None, None]  # (batch, 1, 1)
            if spec.variable:
                frames, mask = as_frames(x, field_mask(batch, f, x))
                channels.append(resample(norm(frames), mask, self.steps) * keep)  # (batch, steps, dim)
            else:
                v = norm(x.float().reshape(x.shape[0], -1)).unsqueeze(1)  # (batch, 1, dim)
                channels.append(v.expand(-1, self.steps, -1) * keep)
        channels.append(pf.unsqueeze(1).expand(-1, self.steps, -1))
        x = torch.cat(channels, dim=-1)  # (batch, steps, channels)
        h = self.tcn(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))  # (batch, steps, hidden)
        return {"logits": self.head(torch.cat([h.mean(1), h[:, -1]], dim=-1))}
