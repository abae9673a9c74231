"""Building blocks shared by the fusion models: per-field encoders, a per-group encoder, a TCN.

Every block respects the loader's masks: padded frames never change an output, and a missing
modality (no valid frame, zero features) encodes to something finite. Shapes are noted as
``# (batch, time, hidden)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from features.errors import ConfigError
from features.spec import FieldSpec

SEQUENCE_ENCODERS = ("conv", "tcn")

# ---------------------------------------------------------------------------------------------
# Batch helpers


def field_mask(batch: dict, field: str, x: torch.Tensor) -> torch.Tensor | None:
    """The (batch, time) validity mask of a variable field, from ``mask`` or else ``lengths``."""
    mask = batch.get("mask", {}).get(field)
    if mask is None and field in batch.get("lengths", {}):
        lengths = batch["lengths"][field]
        mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return mask


def group_present(batch: dict, group: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """(batch,) bool: whether each sample has the group (all True when the loader does not say)."""
    present = batch.get("present", {}).get(group)
    if present is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    return present.bool()


def batch_size_of(batch: dict) -> int:
    return batch["label"].shape[0] if "label" in batch else next(iter(batch["features"].values())).shape[0]


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames of (batch, time, dim); a sequence with no valid frame gives zeros."""
    valid = mask.unsqueeze(-1).to(h.dtype)  # (batch, time, 1)
    return (h * valid).sum(1) / valid.sum(1).clamp_min(1)


def as_frames(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A variable field as float (batch, time, dim) frames plus a (batch, time) bool mask.

    A batch whose sequences are all empty (time 0) gets one all-masked frame, so shapes stay valid.
    """
    b, t = x.shape[:2]
    if mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
    if t == 0:
        x, mask, t = x.new_zeros(b, 1, *x.shape[2:]), mask.new_zeros(b, 1), 1
    return x.float().reshape(b, t, -1), mask.bool()


def resample(h: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Area-average each sample's valid frames onto ``steps`` equal time bins: (batch, steps, dim).

    Time-aligns sequences of different rates (100 MFCC frames, 15 flow frames) for models that
    concatenate them. Bin ``t`` averages the frames overlapping ``[t/steps, (t+1)/steps)`` of the
    sample's own duration, so padding never enters; an empty sequence resamples to zeros.
    """
    lengths = mask.sum(1).to(h.dtype)  # (batch,)
    j = torch.arange(h.shape[1], device=h.device, dtype=h.dtype)
    t = torch.arange(steps, device=h.device, dtype=h.dtype)
    span = lengths.clamp_min(1)[:, None]  # (batch, 1)
    lo = torch.maximum((j / span)[:, None, :], (t / steps)[None, :, None])  # (batch, steps, time)
    hi = torch.minimum(((j + 1) / span)[:, None, :], ((t + 1) / steps)[None, :, None])
    w = (hi - lo).clamp_min(0) * mask[:, None, :].to(h.dtype)  # overlap of frame j with bin t
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    return w @ torch.where(mask.unsqueeze(-1), h, 0.0)  # (batch, steps, dim)


def module_key(field: str) -> str:
    return field.replace(".", "__")  # nn.ModuleDict keys cannot contain dots


# ---------------------------------------------------------------------------------------------
# Normalisation


class SignedLog(nn.Module):
    """sign(x) * log1p(|x|): compresses large magnitudes where a LayerNorm cannot (1-d inputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * torch.log1p(x.abs())


def input_norm(dim: int) -> nn.Module:
    # Features come in very different scales (random-CNN embeddings ~1e2, MFCC ~1e2, sentence embeddings ~1e-1);
    # a LayerNorm per field puts them on one scale. It would zero out a single scalar, hence SignedLog.
    return nn.LayerNorm(dim) if dim > 1 else SignedLog()


class Standardize(nn.BatchNorm1d):
    """Per-feature standardisation with running train statistics (a BatchNorm1d).

    Fixed-size embeddings (random-CNN features above all) carry information in features of very
    different scales; standardising each feature, as a linear probe's StandardScaler does, took the
    demo's image bit from 87 % to 97 % where a per-sample LayerNorm could not. A training batch of
    one sample uses the running statistics instead of failing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


# ---------------------------------------------------------------------------------------------
# Field encoders


class VectorEncoder(nn.Module):
    """A fixed-shape field (all dims flattened) -> Standardize -> Linear-ReLU-Dropout -> hidden."""

    def __init__(self, shape: tuple[int, ...], hidden: int, dropout: float) -> None:
        super().__init__()
        dim = math.prod(shape)
        self.norm = Standardize(dim) if dim > 1 else SignedLog()
        self.proj = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float().reshape(x.shape[0], -1)  # (batch, dim)
        return self.drop(F.relu(self.proj(self.norm(x))))  # (batch, hidden)


class SequenceEncoder(nn.Module):
    """A variable-length field: per-frame LayerNorm + Linear, temporal conv, masked mean+max pool.

    Padded frames never influence the output: they are zeroed before the convolution (so it sees
    the same zero padding after every sequence's end) and excluded from both poolings. A sequence
    with no valid frame (a missing modality) pools to zeros.
    """

    def __init__(
        self, frame_shape: tuple[int, ...], hidden: int, dropout: float, pooled: bool = True
    ) -> None:
        super().__init__()
        dim = math.prod(frame_shape)
        self.norm = input_norm(dim)
        self.proj = nn.Linear(dim, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1)
        self.out = nn.Linear(2 * hidden, hidden) if pooled else None  # None: frames only
        self.drop = nn.Dropout(dropout)

    def frames(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame features (batch, time, hidden), zero at padded frames, and the mask."""
        x, mask = as_frames(x, mask)  # (batch, time, dim)
        valid = mask.unsqueeze(-1)  # (batch, time, 1)
        h = torch.where(valid, self.proj(self.norm(x)), 0.0)  # (batch, time, hidden)
        h = F.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)  # (batch, time, hidden)
        return torch.where(valid, h, 0.0), mask

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h, mask = self.frames(x, mask)
        mean = masked_mean(h, mask)  # (batch, hidden)
        # After the ReLU every value is >= 0, so the zeros at padded frames never beat a valid frame
        # in the max, and an empty sequence pools to 0.
        peak = h.amax(1)  # (batch, hidden)
        return self.drop(F.relu(self.out(torch.cat([mean, peak], dim=-1))))  # (batch, hidden)


class TemporalBlock(nn.Module):
    """One TCN residual block: two dilated causal convolutions (ReLU, dropout) plus a skip."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.pad = (kernel_size - 1) * dilation  # left padding only: frame t sees frames <= t
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (batch, channels, time)
        y = self.drop(F.relu(self.conv1(F.pad(h, (self.pad, 0)))))
        y = self.drop(F.relu(self.conv2(F.pad(y, (self.pad, 0)))))
        return F.relu(h + y)  # (batch, channels, time)


class TCN(nn.Module):
    """Temporal convolutional network (Bai et al. 2018): dilations 1, 2, 4, ... over (batch, time, dim).

    Causal, so the zero padding after a sequence's end never reaches its valid frames.
    """

    def __init__(
        self, in_dim: int, channels: int, levels: int = 3, kernel_size: int = 3, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(in_dim, channels)
        self.blocks = nn.ModuleList(
            TemporalBlock(channels, kernel_size, 2**i, dropout) for i in range(levels)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = mask.unsqueeze(-1)  # (batch, time, 1)
        h = torch.where(valid, self.inp(x), 0.0).transpose(1, 2)  # (batch, channels, time)
        for block in self.blocks:
            h = block(h)
        return torch.where(valid, h.transpose(1, 2), 0.0)  # (batch, time, channels)


class TCNEncoder(nn.Module):
    """A variable-length field through a TCN, then masked mean + last-valid-frame pooling."""

    def __init__(
        self, frame_shape: tuple[int, ...], hidden: int, dropout: float, pooled: bool = True
    ) -> None:
        super().__init__()
        dim = math.prod(frame_shape)
        self.norm = input_norm(dim)
        self.tcn = TCN(dim, hidden, dropout=dropout)
        self.out = nn.Linear(2 * hidden, hidden) if pooled else None  # None: frames only
        self.drop = nn.Dropout(dropout)

    def frames(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = as_frames(x, mask)
        return self.tcn(self.norm(x), mask), mask  # (batch, time, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h, mask = self.frames(x, mask)
        last = (mask.sum(1) - 1).clamp_min(0)  # (batch,) index of the last valid frame
        final = h[torch.arange(h.shape[0], device=h.device), last]  # (batch, hidden); 0 when empty
        return self.drop(F.relu(self.out(torch.cat([masked_mean(h, mask), final], dim=-1))))


def sequence_encoder(
    kind: str, frame_shape: tuple[int, ...], hidden: int, dropout: float, pooled: bool = True
) -> nn.Module:
    """A ``"conv"`` (SequenceEncoder) or ``"tcn"`` (TCNEncoder) encoder of one variable field."""
    if kind == "conv":
        return SequenceEncoder(frame_shape, hidden, dropout, pooled)
    if kind == "tcn":
        return TCNEncoder(frame_shape, hidden, dropout, pooled)
    raise ConfigError(f"sequence encoder must be one of {list(SEQUENCE_ENCODERS)}, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Group encoders


class GroupEncoder(nn.Module):
    """Encodes every field of one group and mixes them: concat -> Linear-ReLU-Dropout -> hidden."""

    def __init__(
        self, field_specs: dict[str, FieldSpec], hidden: int, dropout: float, encoder: str = "conv"
    ) -> None:
        super().__init__()
        self.fields = sorted(field_specs)
        encoders = {}
        for name in self.fields:
            spec = field_specs[name]
            if spec.variable:
                encoders[module_key(name)] = sequence_encoder(encoder, tuple(spec.shape[1:]), hidden, dropout)
            else:
                encoders[module_key(name)] = VectorEncoder(tuple(spec.shape), hidden, dropout)
        self.encoders = nn.ModuleDict(encoders)
        self.mix = nn.Linear(len(self.fields) * hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, batch: dict) -> torch.Tensor:
        parts = []
        for name in self.fields:
            x = batch["features"][name]
            parts.append(self.encoders[module_key(name)](x, field_mask(batch, name, x)))  # (batch, hidden)
        return self.drop(F.relu(self.mix(torch.cat(parts, dim=-1))))  # (batch, hidden)


class GroupSequence(nn.Module):
    """A group as one sequence of hidden vectors: every field's frames (or its vector as one frame).

    Fields are concatenated along time, each tagged with a learned field embedding; the mask marks
    the valid frames, and a sample without the group has none. With ``steps``, every sequence
    field is area-resampled (``resample``) to exactly that many frames, whatever its length.
    """

    def __init__(
        self,
        field_specs: dict[str, FieldSpec],
        hidden: int,
        dropout: float,
        encoder: str = "conv",
        steps: int | None = None,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.fields = sorted(field_specs)
        self.variable = {f: field_specs[f].variable for f in self.fields}
        encoders = {}
        for name in self.fields:
            spec = field_specs[name]
            if spec.variable:
                encoders[module_key(name)] = sequence_encoder(
                    encoder, tuple(spec.shape[1:]), hidden, dropout, pooled=False
                )
            else:
                encoders[module_key(name)] = VectorEncoder(tuple(spec.shape), hidden, dropout)
        self.encoders = nn.ModuleDict(encoders)
        self.field_embedding = nn.Parameter(0.02 * torch.randn(len(self.fields), hidden))

    def forward(self, batch: dict, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seqs, masks = [], []
        for i, name in enumerate(self.fields):
            x = batch["features"][name]
            enc = self.encoders[module_key(name)]
            if self.variable[name]:
                h, mask = enc.frames(x, field_mask(batch, name, x))  # (batch, time, hidden)
                if self.steps is not None:
                    h = resample(h, mask, self.steps)  # (batch, steps, hidden)
                    mask = mask.any(1, keepdim=True).expand(-1, self.steps)
            else:
                h, mask = enc(x).unsqueeze(1), present[:, None]  # (batch, 1, hidden)
            seqs.append(h + self.field_embedding[i])
            masks.append(mask & present[:, None])
        return torch.cat(seqs, dim=1), torch.cat(masks, dim=1)  # (batch, time, hidden), (batch, time)
