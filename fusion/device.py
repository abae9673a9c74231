"""Moving batches to the device: ``"auto"`` device resolution, nested ``.to(device)``, and on
CUDA a side stream that copies the next batch while the current one is used."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Tensors in nested dicts/lists/tuples moved to ``device``; everything else unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def _record_stream(batch: dict, stream) -> None:
    for v in batch.values():
        for t in v.values() if isinstance(v, dict) else [v]:
            if isinstance(t, torch.Tensor):
                t.record_stream(stream)


def _on_device(batches, device: torch.device) -> Iterator[dict]:
    """``batches`` moved to ``device``; on CUDA the next batch is copied while this one is used."""
    if device.type == "cpu":  # the loader's tensors are on the CPU already
        yield from batches
        return
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    copy_stream = torch.cuda.Stream(device=device)
    pending = None
    for batch in batches:
        with torch.cuda.stream(copy_stream):
            nxt = to_device(batch, device, non_blocking=True)
        if pending is not None:
            yield pending  # the consumer's step overlaps the copy of ``nxt``
        main = torch.cuda.current_stream(device)
        main.wait_stream(copy_stream)
        _record_stream(nxt, main)  # allocated on the side stream, used on the main one
        pending = nxt
    if pending is not None:
        yield pending
