"""Output specs: what an extractor promises to produce for each field."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class FieldSpec:
    """One output array: dtype and shape, where ``None`` marks the variable-length axis.

    ``shape=(None, 40)`` is a sequence of 40-d frames; ``shape=(512,)`` a fixed vector.
    At most one axis may be variable and it must be the first one (time).
    """

    dtype: str
    shape: tuple[int | None, ...]
    description: str = ""

    def __post_init__(self) -> None:
        np.dtype(self.dtype)  # raises TypeError on an unknown dtype
        if any(d is None for d in self.shape[1:]):
            raise ValueError(f"FieldSpec: only the first axis may be variable, got shape {self.shape}")

    @property
    def variable(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    def check(self, name: str, array: np.ndarray) -> None:
        """Raise ValueError when ``array`` does not match this spec."""
        if array.dtype != np.dtype(self.dtype):
            raise ValueError(f"field {name!r}: dtype {array.dtype}, spec says {self.dtype}")
        if array.ndim != len(self.shape) or any(
            want is not None and got != want for got, want in zip(array.shape, self.shape, strict=True)
        ):
            raise ValueError(f"field {name!r}: shape {array.shape}, spec says {self.shape}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FieldSpec:
        return cls(dtype=d["dtype"], shape=tuple(d["shape"]), description=d.get("description", ""))
