"""Checkpoint files: atomic writes, safe loads, and the RNG states that make resume exact.

Everything saved is tensors and plain Python data, so ``torch.load(weights_only=True)`` reads
every checkpoint (no pickled classes, no code run on load).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from features.errors import ModalstoreError


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, as the bare model names it (never DDP's ``module.``)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return {k: v.detach().cpu() for k, v in unwrapped_state(model.state_dict()).items()}


def unwrapped_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without a DDP ``module.`` prefix on every key (a foreign checkpoint may have one)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def save_checkpoint(data: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: never a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)


def load_checkpoint_file(path: str | Path) -> dict:
    """A checkpoint loaded safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise ModalstoreError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)
