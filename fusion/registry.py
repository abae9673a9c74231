"""The model registry and the base class every fusion model derives from.

Every model takes the same constructor arguments (the loader's ``field_specs``,
``field_groups`` and ``num_classes``, the groups it uses, ``hidden``, ``dropout`` and the
sequence ``encoder``, ``"conv"`` or ``"tcn"``) plus its own options, and maps a batch to
``{"logits": (batch, classes), ...}``. Models with auxiliary objectives (reconstruction,
auxiliary heads) return their weighted terms from ``aux_losses``; ``pretrain_loss`` is the
unsupervised objective of models that have one. The models themselves live in
``fusion/models.py`` (which imports the others, so importing it registers every model).
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import nn

from features.errors import ConfigError
from features.spec import FieldSpec
from fusion.encoders import GroupEncoder, batch_size_of, group_present

# ---------------------------------------------------------------------------------------------
# Registry


_MODELS: dict[str, type[FusionModel]] = {}


def register_model(cls: type[FusionModel]) -> type[FusionModel]:
    """Class decorator adding a model to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"model class {cls.__qualname__} needs a class attribute `name`")
    if name in _MODELS:
        raise ValueError(f"model name {name!r} is already registered by {_MODELS[name].__module__}")
    _MODELS[name] = cls
    return cls


def get_model(name: str) -> type[FusionModel]:
    """The model class registered under ``name``."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(_MODELS))}") from None


def list_models() -> list[str]:
    return sorted(_MODELS)


SHARED_ARGS = ("field_specs", "field_groups", "groups", "num_classes", "hidden", "dropout", "encoder")


def create_model(
    name: str,
    field_specs: dict[str, FieldSpec],
    field_groups: dict[str, str],
    groups: list[str],
    num_classes: int,
    **kwargs,
) -> FusionModel:
    """Instantiate model ``name``; a keyword it does not take is a ConfigError naming the model."""
    cls = get_model(name)
    try:
        return cls(field_specs, field_groups, list(groups), num_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: {exc}") from exc


def model_options(name: str) -> list[str]:
    """Extra constructor keywords of model ``name`` beyond the shared signature (``combine``...)."""
    return [
        p for p in inspect.signature(get_model(name).__init__).parameters if p not in {"self", *SHARED_ARGS}
    ]


# ---------------------------------------------------------------------------------------------
# Base


class FusionModel(nn.Module):
    """Base class: checks the groups against the loader's fields and keeps the fields per group."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    min_groups: ClassVar[int] = 1

    def __init__(
        self,
        field_specs: dict[str, FieldSpec],
        field_groups: dict[str, str],
        groups: list[str],
        num_classes: int,
        hidden: int = 128,
        dropout: float = 0.1,
        encoder: str = "conv",
    ) -> None:
        super().__init__()
        groups = list(groups)
        if not groups:
            raise ConfigError(f"model {self.name!r}: needs at least one group")
        if len(set(groups)) != len(groups):
            raise ConfigError(f"model {self.name!r}: duplicate groups in {groups}")
        if len(groups) < self.min_groups:
            raise ConfigError(f"model {self.name!r}: needs at least {self.min_groups} groups, got {groups}")
        if num_classes < 2:
            raise ConfigError(f"model {self.name!r}: num_classes must be >= 2, got {num_classes}")
        self.groups = groups
        self.num_classes = num_classes
        self.group_specs = {
            g: {f: spec for f, spec in field_specs.items() if field_groups.get(f) == g} for g in groups
        }
        empty = [g for g in groups if not self.group_specs[g]]
        if empty:
            available = sorted({field_groups.get(f, "?") for f in field_specs})
            raise ConfigError(
                f"model {self.name!r}: no fields for group(s) {empty}; groups with fields: {available}"
            )

    def present(self, batch: dict) -> torch.Tensor:
        """(batch, groups) bool: which of the model's groups each sample has."""
        b = batch_size_of(batch)
        device = next(iter(batch["features"].values())).device
        return torch.stack([group_present(batch, g, b, device) for g in self.groups], dim=1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def aux_losses(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted auxiliary loss terms added to the classification loss (none by default)."""
        return {}

    def pretrain_loss(self, out: dict, batch: dict) -> torch.Tensor | None:
        """The unsupervised objective (labels unused), or None when the model has none."""
        return None


def classifier_head(hidden: int, num_classes: int, dropout: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


def masked_softmax(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1 (groups) restricted to the present groups; all-absent rows get all zeros."""
    e = torch.exp(scores - scores.detach().amax(1, keepdim=True)) * present.to(scores.dtype)
    return e / e.sum(1, keepdim=True).clamp_min(1e-12)


class PerGroupModel(FusionModel):
    """A FusionModel with one GroupEncoder per group; ``encode`` gives (batch, groups, hidden)."""

    def __init__(
        self, field_specs, field_groups, groups, num_classes, hidden=128, dropout=0.1, encoder="conv"
    ):
        super().__init__(field_specs, field_groups, groups, num_classes, hidden, dropout, encoder)
        self.encoders = nn.ModuleDict(
            {g: GroupEncoder(self.group_specs[g], hidden, dropout, encoder) for g in self.groups}
        )

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        present = self.present(batch)  # (batch, groups)
        h = torch.stack([self.encoders[g](batch) for g in self.groups], dim=1)  # (batch, groups, hidden)
        return h * present.unsqueeze(-1).to(h.dtype), present
